"""The pidfile: written without following links planted by whoever can write its directory."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from dispatch.pidfile import Pidfile, PidfileError
from tests.helpers import ROOT


def test_create_writes_our_pid_and_remove_deletes_it(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    pidfile = Pidfile(str(path))
    pidfile.create()
    assert path.read_text() == f"{os.getpid()}\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    pidfile.remove()
    assert not path.exists()
    assert os.listdir(tmp_path) == []  # no temporary file left behind


def test_create_does_not_follow_a_symlink_planted_at_the_temporary_name(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "app.pid"
    os.symlink(victim, f"{path}.{os.getpid()}.tmp")
    Pidfile(str(path)).create()
    assert victim.read_text() == "precious\n"
    assert path.read_text() == f"{os.getpid()}\n"
    assert not path.is_symlink()


def test_a_symlink_at_the_pidfile_path_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text(f"{os.getpid()}\n")
    path = tmp_path / "app.pid"
    os.symlink(victim, path)
    pidfile = Pidfile(str(path))
    with pytest.raises(PidfileError, match=re.escape(f"pidfile {path} is a symbolic link")):
        pidfile.create()
    assert victim.read_text() == f"{os.getpid()}\n"


@pytest.mark.timeout(5)
def test_a_symlink_to_a_fifo_is_not_opened(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")  # opening it for reading would wait for a writer forever
    path = tmp_path / "app.pid"
    os.symlink(tmp_path / "fifo", path)
    with pytest.raises(PidfileError, match="is a symbolic link"):
        Pidfile(str(path)).create()


@pytest.mark.timeout(5)
def test_a_fifo_at_the_pidfile_path_does_not_block(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    os.mkfifo(path)
    with pytest.raises(PidfileError, match=re.escape(f"pidfile {path} is not a regular file")):
        Pidfile(str(path)).create()


@pytest.mark.parametrize("content", ["x" * 1_000_000, " " * 40 + "1\n", "-1\n", "0\n", "99999999999999999999\n"],
                         ids=["huge", "too-long", "negative", "zero", "out-of-range"])
def test_a_file_that_names_no_pid_is_replaced(tmp_path: Path, content: str) -> None:
    path = tmp_path / "app.pid"
    path.write_text(content)
    Pidfile(str(path)).create()
    assert path.read_text() == f"{os.getpid()}\n"


def test_missing_directory_is_a_pidfile_error(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "app.pid"
    with pytest.raises(PidfileError, match=re.escape(f"cannot write pidfile {path}: No such file or directory")) as info:
        Pidfile(str(path)).create()
    assert "\n" not in str(info.value)


def test_directory_as_pidfile_is_a_pidfile_error(tmp_path: Path) -> None:
    path = tmp_path / "app.pid"
    path.mkdir()
    with pytest.raises(PidfileError, match=re.escape(f"pidfile {path} is a directory")):
        Pidfile(str(path)).create()
    assert os.listdir(tmp_path) == ["app.pid"]


def test_unwritable_directory_is_a_pidfile_error() -> None:
    with tempfile.TemporaryDirectory() as top:  # not tmp_path: nobody cannot reach into that
        os.chmod(top, 0o755)
        directory = Path(top) / "ro"
        directory.mkdir(mode=0o555)
        assert _create_as_nobody(directory / "app.pid") == (
            f"cannot write pidfile {directory / 'app.pid'}: Permission denied"
        )


def _create_as_nobody(path: Path) -> str:
    """Run Pidfile(path).create() in a child that is not root; what it raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            if os.geteuid() == 0:  # root may write any directory
                os.setgroups([])
                os.setresgid(65534, 65534, 65534)
                os.setresuid(65534, 65534, 65534)
            Pidfile(str(path)).create()
            os.write(write, b"created")
        except BaseException as exc:
            os.write(write, str(exc).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        message = f.read().decode()
    os.waitpid(pid, 0)
    return message


def test_cli_exits_1_with_one_line_for_a_missing_directory(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "app.pid"
    result = subprocess.run(
        [sys.executable, "-m", "dispatch", "tests.apps:pid_app", "--workers", "1",
         "--bind", "127.0.0.1:0", "--log-level", "warning", "--pidfile", str(path)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 1
    assert result.stderr.splitlines() == [f"dispatch: error: cannot write pidfile {path}: No such file or directory"]
    assert result.stdout == ""

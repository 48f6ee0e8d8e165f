"""Workers started as root become ``user``/``group`` for good, and still die with the primary."""

from __future__ import annotations

import grp
import json
import os
import pwd
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from dispatch.config import Config
from tests.helpers import ROOT, ServerProcess, children, connect, pid_alive, wait_for

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing user and groups needs root")

# The primary runs with root's groups, as a login shell or sudo gives them, so a worker that
# kept them would show: `python -c WITH_ROOT_GROUPS ARGS...` runs `python ARGS...` with them.
ROOT_GROUPS = [0, 4, 27]
WITH_ROOT_GROUPS = (
    f"import os, sys; os.setgroups({ROOT_GROUPS!r}); "
    "os.execv(sys.executable, [sys.executable, *sys.argv[1:]])"
)


def _unnamed_id() -> int:
    """An id that is neither a user's nor a group's on this machine."""
    for candidate in range(54321, 54421):
        try:
            pwd.getpwuid(candidate)
            continue
        except KeyError:
            pass
        try:
            grp.getgrgid(candidate)
        except KeyError:
            return candidate
    raise AssertionError("no unnamed id between 54321 and 54420")


UNNAMED = _unnamed_id()


def _credentials(pid: int) -> dict[str, list[int]]:
    """Uid, Gid (real, effective, saved, fs) and Groups from /proc/PID/status."""
    found = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("Uid", "Gid", "Groups"):
                found[key] = [int(v) for v in value.split()]
    return found


# ------------------------------------------------------------------ config
def test_a_numeric_user_or_group_string_is_an_id() -> None:
    config = Config("tests.apps:pid_app", user=str(UNNAMED), group=str(UNNAMED))
    assert (config.uid, config.gid) == (UNNAMED, UNNAMED)


def test_a_user_without_passwd_entry_needs_a_group() -> None:
    with pytest.raises(ValueError, match=f"user {UNNAMED} has no passwd entry; pass group= too"):
        Config("tests.apps:pid_app", user=UNNAMED)
    with pytest.raises(ValueError, match="has no passwd entry"):
        Config("tests.apps:pid_app", user=str(UNNAMED))


def test_a_user_with_a_passwd_entry_gets_its_group() -> None:
    nobody = pwd.getpwnam("nobody")
    for user in ("nobody", str(nobody.pw_uid), nobody.pw_uid):
        config = Config("tests.apps:pid_app", user=user)
        assert (config.uid, config.gid) == (nobody.pw_uid, nobody.pw_gid)


@pytest.mark.parametrize("bad", [-1, 2**32 - 1, 2**32, "4294967295"])
def test_ids_out_of_range_are_refused(bad: int | str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        Config("tests.apps:pid_app", user=bad, group=0)
    with pytest.raises(ValueError, match="out of range"):
        Config("tests.apps:pid_app", group=bad)


def test_cli_refuses_a_user_without_passwd_entry_and_no_group() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dispatch", "tests.apps:pid_app", "--user", str(UNNAMED)],
        cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"dispatch: error: user {UNNAMED} has no passwd entry; pass group= too"
    ]


# ------------------------------------------------------- real workers as root
@needs_root
def test_cli_numeric_user_and_group_drop_every_root_group() -> None:
    cli = ["-m", "dispatch", "tests.apps:pid_app", "--workers", "2", "--bind", "127.0.0.1:0",
           "--user", str(UNNAMED), "--group", str(UNNAMED)]
    with ServerProcess(command=[sys.executable, "-c", WITH_ROOT_GROUPS, *cli]) as server:
        assert _credentials(server.pid)["Groups"] == ROOT_GROUPS
        for pid in server.wait_ready(2):
            assert _credentials(pid) == {"Uid": [UNNAMED] * 4, "Gid": [UNNAMED] * 4, "Groups": []}


@needs_root
def test_script_user_without_passwd_entry_drops_every_root_group() -> None:
    options = {"handler": "tests.apps:pid_app", "workers": 2, "bind": "127.0.0.1:0",
               "user": UNNAMED, "group": UNNAMED}
    script = [str(ROOT / "tests" / "serve_script.py"), json.dumps(options)]
    with ServerProcess(command=[sys.executable, "-c", WITH_ROOT_GROUPS, *script]) as server:
        for pid in server.wait_ready(2):
            assert _credentials(pid) == {"Uid": [UNNAMED] * 4, "Gid": [UNNAMED] * 4, "Groups": []}


@needs_root
def test_a_named_user_gets_its_own_groups_and_none_of_roots() -> None:
    nobody = pwd.getpwnam("nobody")
    expected = sorted(set(os.getgrouplist("nobody", nobody.pw_gid)))
    cli = ["-m", "dispatch", "tests.apps:pid_app", "--workers", "1", "--bind", "127.0.0.1:0",
           "--user", "nobody"]
    with ServerProcess(command=[sys.executable, "-c", WITH_ROOT_GROUPS, *cli]) as server:
        (pid,) = server.wait_ready(1)
        assert _credentials(pid) == {"Uid": [nobody.pw_uid] * 4, "Gid": [nobody.pw_gid] * 4, "Groups": expected}


@contextmanager
def _busy(address: str, count: int) -> Iterator[None]:
    """``count`` connections, each holding a worker in a long request."""
    socks = [connect(address) for _ in range(count)]
    try:
        for sock in socks:
            sock.sendall(b"GET /sleep/60000 HTTP/1.0\r\n\r\n")
        yield
    finally:
        for sock in socks:
            sock.close()


@needs_root
@pytest.mark.parametrize("balance", ["round-robin", "shared"])
def test_workers_running_as_a_user_die_with_a_killed_primary(balance: str) -> None:
    with ServerProcess("tests.apps:pid_app", workers=2, balance=balance, user=UNNAMED, group=UNNAMED) as server:
        workers = server.wait_ready(2)
        try:
            # A busy worker outlives its closed channel until the request is done: only
            # the parent-death signal ends it at once.
            with _busy(server.address, 2):
                server.wait_events("handling")  # a busy worker
                assert sorted(children(server.pid)) == sorted(workers)
                server.signal(signal.SIGKILL)
                wait_for(lambda: not any(pid_alive(pid) for pid in workers), timeout=3,
                         what="the workers to die with the primary")
        finally:
            for pid in workers:
                if pid_alive(pid):
                    os.kill(pid, signal.SIGKILL)


# --------------------------------------------- drop_privileges in a child
def _in_child(function: Callable[[], Any]) -> Any:
    """Run ``function`` in a forked child (credentials change for good); its result or error."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            try:
                result: Any = {"result": function()}
            except BaseException as exc:
                result = {"error": f"{type(exc).__name__}: {exc}"}
            os.write(write, json.dumps(result).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return json.loads(data)


def _ids() -> list[Any]:
    return [os.getresuid(), os.getresgid(), sorted(os.getgroups())]


@needs_root
def test_drop_privileges_without_a_name_leaves_no_group() -> None:
    from dispatch.privileges import drop_privileges

    def drop() -> list[Any]:
        os.setgroups(ROOT_GROUPS)
        drop_privileges(UNNAMED, UNNAMED + 1, None)
        return _ids()

    assert _in_child(drop) == {"result": [[UNNAMED] * 3, [UNNAMED + 1] * 3, []]}


@needs_root
def test_root_cannot_be_regained_after_the_drop() -> None:
    from dispatch.privileges import drop_privileges

    def drop_then_regain() -> None:
        drop_privileges(UNNAMED, UNNAMED, None)
        os.setresuid(0, 0, 0)

    assert _in_child(drop_then_regain) == {"error": "PermissionError: [Errno 1] Operation not permitted"}


@needs_root
@pytest.mark.parametrize("broken", ["setresuid", "setresgid", "setgroups"])
def test_a_drop_the_kernel_did_not_apply_fails_loudly(broken: str) -> None:
    from dispatch.privileges import PrivilegeError, drop_privileges

    def drop() -> None:
        os.setgroups(ROOT_GROUPS)
        setattr(os, broken, lambda *args: None)  # as if the call had silently done nothing
        drop_privileges(UNNAMED, UNNAMED, None)

    outcome = _in_child(drop)
    assert outcome["error"].startswith(f"{PrivilegeError.__name__}: ")


@needs_root
def test_a_drop_that_is_not_permitted_is_a_privilege_error() -> None:
    from dispatch.privileges import drop_privileges

    def drop_twice() -> None:
        drop_privileges(UNNAMED, UNNAMED, None)
        drop_privileges(UNNAMED + 1, UNNAMED + 1, None)

    assert _in_child(drop_twice) == {
        "error": f"PrivilegeError: cannot switch to uid {UNNAMED + 1}, gid {UNNAMED + 1}: Operation not permitted"
    }


def test_the_primary_pid_comes_from_the_channel_not_the_parent() -> None:
    import socket

    from dispatch.privileges import die_with_primary, primary_pid

    me = os.getpid()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with ours, theirs:
        assert _in_child(lambda: primary_pid(theirs)) == {"result": me}
    assert _in_child(lambda: die_with_primary(me)) == {"result": True}
    assert _in_child(lambda: die_with_primary(me + 1)) == {"result": False}  # as if it had died

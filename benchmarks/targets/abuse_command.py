"""What the abuse attacks' server runs: benchmarks/targets/abuse_apps.py with a JSON of
options, in which environment, under which limits, and as which user.

Two attacks run it as an unprivileged user (``dispatch-abuse``, created with useradd if
missing); prepare_user checks that this user can read the repository and import dispatch,
and finds an interpreter it can run when the venv's is out of its reach.
"""

from __future__ import annotations

import json
import os
import platform
import pwd
import stat
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.measurement.probes import HOST
from benchmarks.paths import BENCH, ROOT
from benchmarks.progress import log

USER = "dispatch-abuse"
GRACEFUL = 3  # graceful_timeout of every server, so that a stop is quick
RUNNER = BENCH / "targets" / "abuse_apps.py"


def server_env(extra: Sequence[str] = ()) -> dict[str, str]:
    """The environment of a server: ROOT importable (for benchmarks.targets.abuse_apps), after
    any PYTHONPATH given to this script (to test another source tree)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, str(ROOT), *extra]))


# ====================================================================== the unprivileged user
@dataclass
class UserEnv:
    """How to run the server as USER, or why it cannot run."""

    uid: int = -1
    gid: int = -1
    python: str | None = None
    pythonpath: list[str] = field(default_factory=list)
    note: str = ""  # how it runs, when not simply with the venv's interpreter
    reason: str = ""  # why it cannot run at all


def closed_dir(path: Path, uid: int, gid: int) -> str | None:
    """The first directory on the way to ``path`` that ``uid`` cannot traverse, described."""
    for directory in [*reversed(path.parents)]:
        try:
            st = directory.stat()
        except OSError as exc:
            return f"{directory}: {exc.strerror}"
        if st.st_uid == uid:
            bit = stat.S_IXUSR
        elif st.st_gid == gid:
            bit = stat.S_IXGRP
        else:
            bit = stat.S_IXOTH
        if not st.st_mode & bit:
            try:
                owner = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                owner = str(st.st_uid)
            return f"{directory} is mode {stat.filemode(st.st_mode)} (owner {owner})"
    return None


def ensure_user() -> tuple[int, int] | str:
    """USER's uid and gid, creating the user if needed; or why that failed."""
    try:
        entry = pwd.getpwnam(USER)
    except KeyError:
        try:
            done = subprocess.run(["useradd", "--system", "--no-create-home", USER],
                                  capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"useradd failed: {exc}"
        if done.returncode != 0:
            return f"useradd failed: {done.stderr.strip()}"
        log(f"created user {USER}")
        entry = pwd.getpwnam(USER)
    return entry.pw_uid, entry.pw_gid


def as_user(uid: int, gid: int, command: list[str]) -> list[str]:
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--", *command]


def try_import(python: str, extra: list[str], uid: int, gid: int) -> tuple[str | None, str]:
    """Run ``python`` as the user: (None, its Python version) if it imports dispatch and its
    extension, else (the error, "")."""
    code = ("import platform, sys, dispatch, dispatch._fdpass, psutil; "
            "print(platform.python_version(), 'from', sys.base_prefix)")
    try:
        done = subprocess.run(as_user(uid, gid, [python, "-c", code]), cwd=ROOT, env=server_env(extra),
                              capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc), ""
    if done.returncode == 0:
        return None, done.stdout.strip()
    lines = (done.stderr or done.stdout).strip().splitlines()
    return (lines[-1] if lines else f"exit {done.returncode}"), ""


def prepare_user() -> UserEnv:
    """Check that USER can read the repository and import dispatch; find an interpreter it can run."""
    got = ensure_user()
    if isinstance(got, str):
        return UserEnv(reason=got)
    uid, gid = got
    for needed in (RUNNER, ROOT / "src" / "dispatch" / "__init__.py"):
        blocked = closed_dir(needed, uid, gid)
        if blocked or not os.stat(needed).st_mode & stat.S_IROTH:
            return UserEnv(uid, gid, reason=f"{USER} cannot read {needed}: {blocked or 'not readable by others'}")
    venv_python = sys.executable
    real = Path(os.path.realpath(venv_python))
    closed = closed_dir(real, uid, gid)
    error, version = try_import(venv_python, [], uid, gid)
    if error is None:
        note = ""
        ours = f"{platform.python_version()} from {sys.base_prefix}"
        if version != ours:
            # The interpreter's own files are out of reach; the loader found another libpython.
            note = (f"as {USER} the venv's interpreter runs Python {version} (as root: {ours}; "
                    f"{closed or 'its own library is out of reach'})")
        return UserEnv(uid, gid, venv_python, note=note)
    # The same interpreter version outside the closed directory can run the same code.
    minor = f"python{sys.version_info.major}.{sys.version_info.minor}"
    extra = [str(ROOT / "src"), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    for candidate in (f"/usr/bin/{minor}", f"/usr/local/bin/{minor}"):
        if not os.access(candidate, os.X_OK) or closed_dir(Path(candidate), uid, gid):
            continue
        if try_import(candidate, extra, uid, gid)[0] is None:
            note = (f"{USER} cannot run the venv's interpreter {real} ({closed or error}); the server "
                    f"ran {candidate} with src/ and the venv's site-packages on PYTHONPATH")
            return UserEnv(uid, gid, candidate, extra, note)
    return UserEnv(uid, gid, reason=f"{USER} cannot run the venv's interpreter {real}: {closed or error}")


# ====================================================================== the command
def runner_command(options: dict, user: UserEnv | None, limits: list[str]) -> tuple[list[str], dict[str, str]]:
    """benchmarks/targets/abuse_apps.py with ``options``, as ``user`` and under ``limits`` (prlimit flags)."""
    options = {"bind": f"{HOST}:0", "log_level": "info", "graceful_timeout": GRACEFUL, **options}
    python = user.python if user is not None else sys.executable
    assert python is not None
    command = [python, str(RUNNER), json.dumps(options)]
    if user is not None:
        command = as_user(user.uid, user.gid, command)
    if limits:
        command = ["prlimit", *limits, *command]  # prlimit and setpriv exec: the pid is python's
    return command, server_env(user.pythonpath if user is not None else [])

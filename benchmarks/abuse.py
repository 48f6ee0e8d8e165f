"""Attacks on a live dispatch server: does the primary stay up, keep serving, keep its descriptors?

    python benchmarks/abuse.py                  # every attack, about 3 minutes
    python benchmarks/abuse.py --only NAME      # one attack (or a comma-separated few)
    python benchmarks/abuse.py --list           # the attacks, and what a sound server does

Each attack starts its own server (a subprocess listening on 127.0.0.1 on a free
port; no traffic goes anywhere else), sends normal requests while the attack
runs and for 5 s after it, lets the server settle, counts the primary's open
descriptors, and stops it. The script reports what happens and asserts
nothing: an attack that crashes or stalls the server is a row saying so.
Results: benchmarks/results/abuse.md; each server's log:
benchmarks/results/logs/abuse-NAME.log.

Run it as root: two attacks run the server as an unprivileged user
(``dispatch-abuse``, created with useradd if missing) and the pidfile attack
plants symlinks. Every wait has a deadline, every load loop is bounded in
count and time, and every process started here is stopped by pid in a
``finally`` block, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import os
import platform
import pwd
import re
import resource
import select
import shlex
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from run import CLK_TCK, children, cpu_ticks, log, proc_stat, source_version, start_time, trim_log

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
USER = "dispatch-abuse"
REQUEST_TIMEOUT = 2.0  # per socket operation of one probe request
AFTER_SECONDS = 5.0
SETTLE_SECONDS = 3.0
START_DEADLINE = 15.0
HOG_CONNECTS = 500_000  # connections one health-pool attack may open
STOP_DEADLINE = 8.0  # SIGTERM, then SIGKILL
GRACEFUL = 3  # graceful_timeout of every server, so that a stop is quick
READY = re.compile(r"\(pid (\d+)\) ready")
STARTED = re.compile(r"started pid (\d+)")
PROBLEM = re.compile(r"\] (ERROR|CRITICAL|WARNING) [\w.]+: (.*)")
RESTART_DONE = "rolling restart complete"
RESTART_ABORTED = "rolling restart aborted"


# ====================================================================== one result
@dataclass
class Row:
    attack: str
    outcome: str = ""
    during: tuple[int, int] | None = None  # requests answered 200 / attempted
    after: tuple[int, int] | None = None
    fds: tuple[int | None, int | None] = (None, None)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


# ====================================================================== /proc
def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def uid_tasks(uid: int) -> int:
    """Processes and threads whose real uid is ``uid``: what RLIMIT_NPROC counts."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{name}/status").read_text().splitlines())
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"].strip())
    return total


def group_members(pgid: int, not_before: int | None) -> list[int]:
    """Processes in process group ``pgid`` started no earlier than its leader was."""
    found = []
    for name in os.listdir("/proc"):
        fields = proc_stat(int(name)) if name.isdigit() else None
        if fields and int(fields[2]) == pgid and not_before is not None and int(fields[19]) >= not_before:
            found.append(int(name))
    return found


def accept_queue(port: int) -> int | None:
    """Connections waiting in the listen backlog of 127.0.0.1:``port`` (never accepted yet)."""
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                return int(queues.split(":")[1], 16)  # rx_queue of a listener: its accept queue
    return None


def held(target: Target) -> str:
    """Where the connections are at the end of an idle flood."""
    fds = [fd_count(pid) or 0 for pid in target.workers()]
    queue = accept_queue(target.port)
    return (f"at the end of the hold {'?' if queue is None else queue} waiting in the listen backlog, "
            f"workers' open fds {'+'.join(map(str, fds)) or 'none'}")


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {-code} ({signal.Signals(-code).name})"
        return f"signal {-code}"
    return f"exit {code}"


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
    for needed in (HERE / "abuse_apps.py", ROOT / "src" / "dispatch" / "__init__.py"):
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


# ====================================================================== servers
def server_env(extra: Sequence[str] = ()) -> dict[str, str]:
    """The environment of a server: ROOT importable (for benchmarks.abuse_apps), after any
    PYTHONPATH given to this script (to test another source tree)."""
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([*paths, str(ROOT), *extra]))


_LIVE: list[Target] = []  # started and not yet stopped: stopped again at exit, whatever happened


class Target:
    """One dispatch primary in a subprocess, with its workers; stopped by pid."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], logs: Path,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.log_path = logs / f"abuse-{name}.log"
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self.log_file, pass_fds=pass_fds,
                                     start_new_session=True)  # Ctrl-C reaches us, not them
        _LIVE.append(self)
        self.pid = self.proc.pid
        self.started_at = start_time(self.pid)
        self.port = 0
        self.health_port = 0
        self.seen: dict[int, int | None] = {}  # every worker pid seen -> its start time
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        # Workers are remembered so that any left behind can be killed by pid and start time.
        while not self._stop.wait(0.1):
            for kid in children(self.pid):
                self.seen.setdefault(kid, start_time(kid))

    def read_json(self, deadline: float) -> dict | None:
        """The runner's one line about itself, or None if it exited or said nothing in time."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            byte = os.read(fd, 1)
            if not byte:
                return None
            line += byte
        info = json.loads(line)
        self.pid = int(info["pid"])
        self.port = int(info["addresses"][0].rpartition(":")[2])
        if info.get("health"):
            self.health_port = int(info["health"].rpartition(":")[2])
        return info

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, offset: int = 0) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def workers(self) -> list[int]:
        return children(self.pid)

    def wait_ready(self, workers: int, deadline: float, probe: bool = True) -> bool:
        """``workers`` workers said ready and (if ``probe``) one request was answered."""
        while time.monotonic() < deadline and self.alive():
            live = set(self.workers())
            ready = {int(p) for p in READY.findall(self.log())} & live
            if len(ready) >= workers and (not probe or request_ok(self.port, "/", 1.0)):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_DEADLINE; then any worker left behind, by pid and start time."""
        self._stop.set()
        self._sampler.join(timeout=2)
        with contextlib.suppress(OSError):
            for kid in children(self.pid):
                self.seen.setdefault(kid, start_time(kid))
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
        # A worker forked just before the primary died can escape the sampler: its process
        # group (the primary's pid, from start_new_session) still names it.
        for pid in group_members(self.proc.pid, self.started_at):
            self.seen.setdefault(pid, start_time(pid))
        for pid, started in self.seen.items():
            until = time.monotonic() + 2
            while started is not None and start_time(pid) == started and time.monotonic() < until:
                time.sleep(0.02)  # workers die with the primary; give them a moment
            if started is not None and start_time(pid) == started:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log_file.close()
        trim_log(self.log_path)  # a spinning server can write megabytes a second
        if self in _LIVE:
            _LIVE.remove(self)


@dataclass
class Context:
    args: argparse.Namespace
    _user: UserEnv | None = None

    def user(self) -> UserEnv:
        if self._user is None:
            self._user = prepare_user()
        return self._user


def runner_command(options: dict, user: UserEnv | None, limits: list[str]) -> tuple[list[str], dict[str, str]]:
    """benchmarks/abuse_apps.py with ``options``, as ``user`` and under ``limits`` (prlimit flags)."""
    options = {"bind": f"{HOST}:0", "log_level": "info", "graceful_timeout": GRACEFUL, **options}
    python = user.python if user is not None else sys.executable
    assert python is not None
    command = [python, str(HERE / "abuse_apps.py"), json.dumps(options)]
    if user is not None:
        command = as_user(user.uid, user.gid, command)
    if limits:
        command = ["prlimit", *limits, *command]  # prlimit and setpriv exec: the pid is python's
    return command, server_env(user.pythonpath if user is not None else [])


@contextlib.contextmanager
def launch(row: Row, ctx: Context, options: dict, user: UserEnv | None = None,
           limits: list[str] = (), probe: bool = True) -> Iterator[Target | None]:
    """A ready server, or None with the reason in ``row``; stopped on the way out.
    ``probe=False``: ready from the log alone, when the first request is the attack."""
    command, env = runner_command(options, user, list(limits))
    target = Target(row.attack, command, env, ctx.args.logs)
    try:
        deadline = time.monotonic() + START_DEADLINE
        if (target.read_json(deadline) is None
                or not target.wait_ready(options.get("workers", 2), deadline, probe)):
            not_started(row, target)
            yield None
        else:
            yield target
    finally:
        target.stop()


def not_started(row: Row, target: Target) -> None:
    code = target.proc.poll()
    row.outcome = "did not start" + (f" ({describe_exit(code)})" if code is not None else f" in {START_DEADLINE:g}s")
    last = last_error(target.log())
    if last:
        row.notes.append(f"log: `{last}`")


# ====================================================================== clients
def http_get(port: int, path: str = "/", timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes]:
    """One HTTP/1.0 request on a new connection: (status, body); raises OSError."""
    with socket.create_connection((HOST, port), timeout=timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: abuse\r\n\r\n".encode())
        data = b""
        while len(data) < 1 << 20:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data.startswith(b"HTTP/1."):
        raise ConnectionError(f"no HTTP answer: {data[:40]!r}")
    return int(data.split(b" ", 2)[1]), data.partition(b"\r\n\r\n")[2]


def request_ok(port: int, path: str, timeout: float) -> bool:
    try:
        return http_get(port, path, timeout)[0] == 200
    except (OSError, ValueError, IndexError):
        return False


class Probe:
    """Client threads sending one request per connection, started when the attack is in
    place; bounded in time and count. ``finish()`` gives (answered 200, attempted)."""

    def __init__(self, port: int, path: str = "/", clients: int = 2, interval: float = 0.0,
                 max_seconds: float = 25.0, max_requests: int = 200_000) -> None:
        self.port, self.path, self.clients, self.interval = port, path, clients, interval
        self.max_seconds, self.budget = max_seconds, max_requests
        self.ok = self.tried = 0
        self.bodies: Counter[bytes] = Counter()
        self.result: tuple[int, int] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> Probe:
        self._deadline = time.monotonic() + self.max_seconds
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if self.budget <= 0:
                    return
                self.budget -= 1
            try:
                status, body = http_get(self.port, self.path)
            except (OSError, ValueError, IndexError):
                status, body = 0, b""
            with self._lock:
                self.tried += 1
                if status == 200:
                    self.ok += 1
                    self.bodies[body] += 1
            if self.interval or status != 200:
                self._stop.wait(self.interval or 0.1)  # a refused client backs off instead of spinning

    def finish(self) -> tuple[int, int] | None:
        if self._threads and self.result is None:
            self._stop.set()
            for thread in self._threads:
                thread.join(timeout=REQUEST_TIMEOUT * 3 + 1)
            self.result = (self.ok, self.tried)
        return self.result


def run_probe(port: int, path: str, seconds: float, clients: int = 2, interval: float = 0.0) -> tuple[int, int]:
    probe = Probe(port, path, clients, interval, max_seconds=seconds).start()
    time.sleep(seconds)
    return probe.finish() or (0, 0)


def open_idle(port: int, count: int, seconds: float) -> tuple[list[socket.socket], int]:
    """``count`` connections that send nothing, opened without blocking; returns them and
    how many finished their handshake within ``seconds``."""
    deadline = time.monotonic() + seconds
    socks: list[socket.socket] = []
    pending: dict[int, socket.socket] = {}
    poller = select.poll()
    connected = 0
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        socks.append(sock)
        err = sock.connect_ex((HOST, port))
        if err == 0:
            connected += 1
        elif err == errno.EINPROGRESS:
            pending[sock.fileno()] = sock
            poller.register(sock, select.POLLOUT)
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            sock = pending.pop(fd)
            poller.unregister(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected += 1
    return socks, connected


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()
    socks.clear()


def hold(target: Target, seconds: float) -> None:
    """Wait ``seconds``, less if the primary exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and target.alive():
        time.sleep(0.1)


def trickle(socks: list[socket.socket], stop: threading.Event, period: float, max_seconds: float) -> None:
    """One byte per ``period`` on each socket: a request head that never ends."""
    text = b"GET / HTTP/1.0\r\nX-Slow: " + b"a" * 4096
    deadline = time.monotonic() + max_seconds
    i = 0
    while not stop.is_set() and time.monotonic() < deadline and i < len(text):
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.send(text[i : i + 1])
        i += 1
        stop.wait(period)


# ====================================================================== measuring
Attack = Callable[[Target, Row, Probe], None]


def measure(row: Row, target: Target, attack: Attack, path: str = "/", port: int = 0,
            interval: float = 0.0, clients: int = 2) -> None:
    """Run ``attack`` (which starts the probe once it is in place), then the 5 s after,
    then count the primary's descriptors once it settled."""
    port = port or target.port
    fds_before = fd_count(target.pid)
    offset = target.log_size()
    seen_before = set(target.seen) | set(target.workers())
    probe = Probe(port, path, clients, interval)
    try:
        attack(target, row, probe)
    finally:
        row.during = probe.finish()
    if target.alive():
        row.after = run_probe(port, path, AFTER_SECONDS, clients, interval)
        hold(target, SETTLE_SECONDS)
    text = target.log(offset)
    fds_after = fd_count(target.pid) if target.alive() else None
    row.fds = (fds_before, fds_after)
    started = {int(p) for p in STARTED.findall(text)} | (set(target.seen) - seen_before)
    code = target.proc.poll()
    state = "alive" if code is None else f"**died** ({describe_exit(code)})"
    row.outcome = f"{state}; {len(started)} workers replaced"
    row.notes += log_notes(text, died=code is not None)


def last_error(text: str) -> str | None:
    """The last exception line or ERROR/CRITICAL message of a log, else its last line."""
    lines = [line for line in text.splitlines() if line.strip()]
    for line in reversed(lines):
        match = PROBLEM.search(line)
        if match and match.group(1) != "WARNING":
            return match.group(2)[:160]
        if re.match(r"^[\w.]+(Error|Exception|Exit)\b.*", line):
            return line[:160]
    return lines[-1][:160] if lines else None


def log_notes(text: str, died: bool) -> list[str]:
    """How many ERROR and WARNING lines and tracebacks, and the most frequent of each."""
    notes = []
    found = [(m.group(1), re.sub(r"\d+", "N", m.group(2))) for m in PROBLEM.finditer(text)]
    for levels, name in ((("ERROR", "CRITICAL"), "ERROR"), (("WARNING",), "WARNING")):
        counts = Counter(message for level, message in found if level in levels)
        if counts:
            common, times = counts.most_common(1)[0]
            notes.append(f"{sum(counts.values())} {name} lines, most: `{common[:110]}` ×{times}")
    tracebacks = text.count("Traceback (most recent call last)")
    if tracebacks:
        notes.append(f"{tracebacks} tracebacks")
    if died:
        last = last_error(text)
        if last:
            notes.append(f"last error: `{last}`")
    return notes


# ====================================================================== the attacks
def fd_flood_nonroot(ctx: Context) -> Row:
    row = Row("fd-flood-nonroot")
    user = ctx.user()
    if user.reason:
        row.outcome = "skipped"
        row.notes.append(user.reason)
        return row
    if user.note:
        row.notes.append(user.note)
    options = {"handler": "dispatch.demo:stream_app", "workers": 4}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        socks, connected = open_idle(target.port, 1800, 8.0)
        try:
            probe.start()  # measures the hold, not the seconds it took to open them
            row.notes.append(f"{connected} of 1800 idle connections established")
            hold(target, 5.0)
            row.notes.append(held(target))
        finally:
            close_all(socks)

    with launch(row, ctx, options, user, ["--nofile=1024:1024"]) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def idle_plain(ctx: Context, slow: bool = False) -> Row:
    row = Row("idle-plain-trickle" if slow else "idle-plain")
    options = {"handler": "dispatch.demo:sync_app", "workers": 2, "threads": 1}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        socks, connected = open_idle(target.port, 2, 2.0)
        stop = threading.Event()
        dripper = threading.Thread(target=trickle, args=(socks, stop, 1.0, 10.0), daemon=True)
        try:
            if slow:
                dripper.start()
            time.sleep(0.5)  # they reach the workers first
            probe.start()
            hold(target, 5.0)
        finally:
            stop.set()
            if slow:
                dripper.join(timeout=3)
            close_all(socks)
        row.notes.append(f"{connected} {'trickling' if slow else 'idle'} connections, then 5 s of requests")

    with launch(row, ctx, options) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def worker_emfile(ctx: Context) -> Row:
    row = Row("worker-emfile")
    options = {"handler": "dispatch.demo:stream_app", "workers": 2, "health": f"{HOST}:0"}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        socks, connected = open_idle(target.port, 600, 6.0)
        try:
            probe.start()
            hold(target, 5.0)
            where = held(target)
        finally:
            close_all(socks)
        probe.finish()
        row.notes.append(f"server under prlimit --nofile=256; {connected} of 600 idle connections; {where}")
        row.notes.append(serves_again(target, 12.0))
        row.notes.append(heartbeat_ages(target))

    with launch(row, ctx, options, limits=["--nofile=256:256"]) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def serves_again(target: Target, seconds: float) -> str:
    """How long after the attack until a request is answered again."""
    t0 = time.monotonic()
    while time.monotonic() < t0 + seconds and target.alive():
        if request_ok(target.port, "/", 1.0):
            return f"serves again {time.monotonic() - t0:.1f} s after the connections closed"
        time.sleep(0.2)
    return f"not serving {seconds:g} s after the connections closed"


def heartbeat_ages(target: Target) -> str:
    try:
        status, body = http_get(target.health_port, "/cluster-health")
        ages = [w.get("heartbeat_age_s") for w in json.loads(body)["workers"]]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return f"/cluster-health unanswered ({exc.__class__.__name__})"
    return "heartbeat ages after: " + ", ".join("?" if a is None else f"{a:.1f} s" for a in ages)


def fork_fail(ctx: Context) -> Row:
    row = Row("fork-fail")
    user = ctx.user()
    if user.reason:
        row.outcome = "skipped"
        row.notes.append(user.reason)
        return row
    if user.note:
        row.notes.append(user.note)
    workers = 2
    options = {"handler": "dispatch.demo:stream_app", "workers": workers, "boot_timeout": 5}
    # RLIMIT_NPROC counts every task of the uid: what it runs already, the primary, one thread
    # per worker with a coroutine handler; one more allows a single fork beyond that.
    others = uid_tasks(user.uid)
    limit = others + 1 + workers + 1

    def attack(target: Target, row: Row, probe: Probe) -> None:
        row.notes.append(f"RLIMIT_NPROC {limit}; {USER} had {uid_tasks(user.uid)} tasks once ready")
        probe.start()
        first = rolling_restart(target, 6.0)
        for _ in range(3):
            if target.alive():
                os.kill(target.pid, signal.SIGTTIN)
            hold(target, 1.0)
        second = rolling_restart(target, 6.0)
        row.notes.append(f"SIGUSR2: {first}; 3 × SIGTTIN; SIGUSR2: {second}; "
                         f"{len(target.workers())} workers at the end")

    with launch(row, ctx, options, user, [f"--nproc={limit}:{limit}"]) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def rolling_restart(target: Target, seconds: float) -> str:
    """SIGUSR2, then wait for the primary to say how the restart ended."""
    if not target.alive():
        return "primary already gone"
    offset = target.log_size()
    os.kill(target.pid, signal.SIGUSR2)
    t0 = time.monotonic()
    while time.monotonic() < t0 + seconds:
        text = target.log(offset)
        if RESTART_DONE in text:
            return f"complete in {time.monotonic() - t0:.1f} s"
        if RESTART_ABORTED in text:
            return "aborted"
        if not target.alive():
            return "primary exited"
        time.sleep(0.05)
    return f"no outcome in {seconds:g} s"


def bad_policy(ctx: Context, policy: str) -> Row:
    row = Row(f"bad-policy-{policy}")
    options = {"handler": "dispatch.demo:stream_app", "workers": 2, "policy": policy}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        probe.start()
        hold(target, 5.0)

    with launch(row, ctx, options, probe=False) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def listen_fds_udp(ctx: Context) -> Row:
    row = Row("listen-fds-udp")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, 0))
    udp_port = udp.getsockname()[1]
    # As systemd does: the socket at fd 3, LISTEN_PID naming the process that runs dispatch.
    launcher = (
        "import os, sys\n"
        f"os.dup2({udp.fileno()}, 3, inheritable=True)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'dispatch', 'dispatch.demo:app', '--workers', '2',\n"
        f"         '--bind', '{HOST}:1', '--log-level', 'info', '--graceful-timeout', '{GRACEFUL}'])\n"
    )
    target = Target(row.attack, [sys.executable, "-c", launcher], server_env(), ctx.args.logs,
                    pass_fds=(udp.fileno(),))
    try:
        udp.close()  # only the server holds it now
        started = wait_started(target, 8.0)
        if not started:
            code = target.proc.poll()
            row.outcome = f"refused to start ({describe_exit(code)})" if code is not None else "no answer in 8 s"
            last = last_error(target.log())
            row.notes.append(f"log: `{last}`" if last else "nothing in the log")
            return row
        udp_spin(row, target, udp_port)
    finally:
        target.stop()
    return row


def wait_started(target: Target, seconds: float) -> bool:
    """The CLI logged its listening line (True) or exited (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and target.alive():
        if "listening on" in target.log():
            return True
        time.sleep(0.05)
    return False


def udp_spin(row: Row, target: Target, udp_port: int) -> None:
    """Started on a UDP socket: what does a datagram do to the primary's loop?"""
    hold(target, 1.0)
    fds_before = fd_count(target.pid)
    offset = target.log_size()
    idle_cpu = cpu_percent(target.pid, 2.0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(20):
            sender.sendto(b"hello", (HOST, udp_port))
    busy_cpu = cpu_percent(target.pid, 3.0)
    text = target.log(offset)
    hold(target, SETTLE_SECONDS)
    code = target.proc.poll()
    row.fds = (fds_before, fd_count(target.pid) if code is None else None)
    row.outcome = "started anyway; " + ("alive" if code is None else f"**died** ({describe_exit(code)})")
    row.notes.append("no TCP listener: nothing to request")
    row.notes.append(f"primary CPU {idle_cpu:.0f}% before, {busy_cpu:.0f}% in the 3 s after 20 datagrams; "
                     f"log grew {len(text.encode()) / 1024:.0f} KiB")
    row.notes += log_notes(text, died=code is not None)


def cpu_percent(pid: int, seconds: float) -> float:
    before = cpu_ticks(pid)
    time.sleep(seconds)
    after = cpu_ticks(pid)
    if before is None or after is None:
        return float("nan")
    return 100.0 * (after - before) / CLK_TCK / seconds


def client_resets(ctx: Context) -> Row:
    row = Row("client-resets")
    options = {"handler": "dispatch.demo:sync_app", "workers": 2, "threads": 4}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        probe.start()
        sent, failed = reset_burst(target.port, 500, 15.0)
        hold(target, 1.0)  # let the workers meet the resets
        row.notes.append(f"{sent} request+RST connections ({failed} could not connect)")

    with launch(row, ctx, options) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def reset_burst(port: int, count: int, seconds: float) -> tuple[int, int]:
    """Connections that send a request and close with SO_LINGER 0 (RST instead of FIN)."""
    deadline = time.monotonic() + seconds
    sent = failed = 0
    linger = struct.pack("ii", 1, 0)
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            with socket.create_connection((HOST, port), timeout=1.0) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\nHost: abuse\r\n\r\n")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sent += 1
        except OSError:
            failed += 1
    return sent, failed


def channel_flood(ctx: Context) -> Row:
    row = Row("channel-flood")
    options = {"handler": "benchmarks.abuse_apps:flood_app", "workers": 2, "threads": 2}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        answer: list[str] = []
        flooder = threading.Thread(target=lambda: answer.append(flood_request(target.port)), daemon=True)
        probe.start()
        flooder.start()
        flooder.join(timeout=15)
        row.notes.append("a handler thread writes valid Heartbeats on its own control channel for 5 s: "
                         + (answer[0] if answer else "no answer in 15 s"))

    with launch(row, ctx, options) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def flood_request(port: int) -> str:
    try:
        status, body = http_get(port, "/flood", timeout=12.0)
    except (OSError, ValueError, IndexError) as exc:
        return f"/flood failed ({exc.__class__.__name__})"
    return body.decode(errors="replace") + " messages" if status == 200 else f"/flood: {status}"


def fake_done(ctx: Context) -> Row:
    row = Row("fake-done")
    options = {"handler": "benchmarks.abuse_apps:fake_done_app", "workers": 2, "threads": 2,
               "balance": "least-connections"}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        try:
            faker = http_get(target.port, "/fake-done")[1].decode()
        except (OSError, ValueError, IndexError) as exc:
            row.notes.append(f"/fake-done failed ({exc.__class__.__name__})")
            return
        probe.start()
        hold(target, 5.0)
        probe.finish()
        share = probe.bodies.get(faker.encode(), 0) / probe.ok if probe.ok else 0.0
        row.notes.append(f"{faker} reported Done(1000000) on its channel; least-connections then gave it "
                         f"{share:.0%} of the requests ({len(probe.bodies)} workers answered)")

    with launch(row, ctx, options) as target:
        if target is not None:
            measure(row, target, attack, clients=4)
    return row


def health_pool(ctx: Context, slow: bool = False) -> Row:
    row = Row("health-slowloris" if slow else "health-idle-pool")
    options = {"handler": "dispatch.demo:stream_app", "workers": 2, "health": f"{HOST}:0"}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        stats: Counter[str] = Counter()
        stop = threading.Event()
        pool = threading.Thread(target=hog_health, args=(target.health_port, 70, slow, stop, 14.0, stats),
                                daemon=True)
        pool.start()
        try:
            time.sleep(0.5)  # the pool is in place
            probe.start()
            hold(target, 12.0)
        finally:
            stop.set()
            pool.join(timeout=5)
        row.notes.append(f"70 {'trickling' if slow else 'idle'} health clients for 12 s: "
                         f"{stats['cut']} cut and reconnected, {stats['503']} told 503, "
                         f"{stats['refused']} connects failed; during/after count GET /healthz every 0.2 s")

    with launch(row, ctx, options) as target:
        if target is not None:
            measure(row, target, attack, path="/healthz", port=target.health_port, interval=0.2, clients=1)
    return row


def hog_health(port: int, count: int, slow: bool, stop: threading.Event, max_seconds: float,
               stats: Counter[str]) -> None:
    """``count`` clients on the health port that send nothing (or one byte every 0.5 s) and
    reconnect as soon as the server cuts them (at most ``HOG_CONNECTS`` times in all)."""
    deadline = time.monotonic() + max_seconds
    socks: list[socket.socket | None] = [None] * count
    sent = [0] * count
    head = b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 4096
    next_drip = time.monotonic()
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            for i, sock in enumerate(socks):
                if sock is None and not stop.is_set() and stats["connects"] < HOG_CONNECTS:
                    stats["connects"] += 1
                    try:
                        socks[i] = socket.create_connection((HOST, port), timeout=0.5)
                        sent[i] = 0
                    except OSError:
                        stats["refused"] += 1
            live = {s.fileno(): (i, s) for i, s in enumerate(socks) if s is not None}
            poller = select.poll()
            for fd in live:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(100):
                i, sock = live[fd]
                with contextlib.suppress(OSError):
                    if sock.recv(4096).startswith(b"HTTP/1.1 503"):
                        stats["503"] += 1
                stats["cut"] += 1
                sock.close()
                socks[i] = None
            if slow and time.monotonic() >= next_drip:
                next_drip = time.monotonic() + 0.5
                for i, sock in enumerate(socks):
                    if sock is not None and sent[i] < len(head):
                        with contextlib.suppress(OSError):
                            sock.send(head[sent[i] : sent[i] + 1])
                        sent[i] += 1
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()


def pidfile_symlink(ctx: Context) -> Row:
    row = Row("pidfile-symlink")
    tmp = Path(tempfile.mkdtemp(prefix="dispatch-abuse-"))
    victim = tmp / "victim.txt"
    victim.write_text("precious\n")
    pidfile = tmp / "app.pid"
    # The primary writes "{pidfile}.{its pid}.tmp" first: plant that name for the next 200 pids.
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    planted = range(last + 1, last + 201)
    for pid in planted:
        os.symlink(victim, f"{pidfile}.{pid}.tmp")
    options = {"handler": "dispatch.demo:stream_app", "workers": 2, "pidfile": str(pidfile)}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        probe.start()
        content = victim.read_text()
        where = "in" if target.pid in planted else "outside"
        link = "a symlink to the victim" if pidfile.is_symlink() else "a plain file"
        verdict = "**overwritten** with " + repr(content) if content != "precious\n" else "untouched"
        row.notes.append(f"primary pid {target.pid}, {where} the planted range {last + 1}..{last + 200}; "
                         f"victim file {verdict}; the pidfile is {link}")
        hold(target, 3.0)

    try:
        with launch(row, ctx, options) as target:
            if target is not None:
                measure(row, target, attack)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # removes the links, never follows them
    return row


@dataclass(frozen=True)
class Entry:
    run: Callable[[Context], Row]
    what: str
    expected: str


ATTACKS: dict[str, Entry] = {
    "fd-flood-nonroot": Entry(
        fd_flood_nonroot,
        f"server as user {USER} under prlimit --nofile=1024:1024, 4 workers, coroutine handler; "
        "1,800 idle TCP connections held 5 s, then closed",
        "the primary stays up and serves again once they close"),
    "idle-plain": Entry(
        idle_plain,
        "plain handler, 2 workers, threads=1; 2 connections that send nothing, then 5 s of requests",
        "normal requests are still served"),
    "idle-plain-trickle": Entry(
        lambda ctx: idle_plain(ctx, slow=True),
        "as idle-plain, but the 2 connections trickle one byte a second of a head that never ends",
        "normal requests are still served"),
    "worker-emfile": Entry(
        worker_emfile,
        "whole server under prlimit --nofile=256, coroutine handler, 2 workers; 600 idle connections "
        "held 5 s, enough to run the workers out of descriptors if the primary passes them all; "
        "then how long until it serves again",
        "heartbeats survive; it serves again at once"),
    "fork-fail": Entry(
        fork_fail,
        f"server as user {USER} under prlimit --nproc one above the tasks it needs; "
        "SIGUSR2, 3 × SIGTTIN, SIGUSR2",
        "the primary survives, the old workers keep serving"),
    "bad-policy-out-of-range": Entry(
        lambda ctx: bad_policy(ctx, "out-of-range"),
        "a ConnectionPolicy whose choose() returns an index past the last worker; 5 s of requests",
        "falls back to a valid worker and keeps serving"),
    "bad-policy-bad-shares": Entry(
        lambda ctx: bad_policy(ctx, "bad-shares"),
        "a batch Policy whose assign() shares sum to one more than the batch; 5 s of requests",
        "falls back and keeps serving"),
    "listen-fds-udp": Entry(
        listen_fds_udp,
        "LISTEN_PID/LISTEN_FDS hand the CLI a UDP socket at fd 3; then 20 datagrams to it",
        "refuses to start with a clear error; no spin"),
    "client-resets": Entry(
        client_resets,
        "plain handler, threads=4; 500 connections that send a request and close with SO_LINGER 0 (RST)",
        "no ERROR traceback per reset"),
    "channel-flood": Entry(
        channel_flood,
        "a plain handler thread writes valid Heartbeat messages on its worker's control channel for 5 s",
        "the primary keeps dispatching other connections"),
    "fake-done": Entry(
        fake_done,
        "least-connections; a handler reports Done(1000000) on its control channel, then 5 s of requests",
        "the primary does not trust a count above what it sent; the load stays spread"),
    "health-idle-pool": Entry(
        health_pool,
        "70 idle clients on the health port (its limit is 64), reconnecting when cut, for 12 s; "
        "GET /healthz every 0.2 s",
        "/healthz stays 200"),
    "health-slowloris": Entry(
        lambda ctx: health_pool(ctx, slow=True),
        "as health-idle-pool, but each client trickles one byte of a head every 0.5 s",
        "/healthz stays 200"),
    "pidfile-symlink": Entry(
        pidfile_symlink,
        "symlinks planted at `{pidfile}.{pid}.tmp` for the next 200 pids, pointing to a victim file; "
        "the server (as root) starts with that pidfile",
        "the victim is untouched"),
}


# ====================================================================== report
def cell(pair: tuple[int | None, int | None] | None, sep: str = " / ") -> str:
    if pair is None:
        return "–"
    return sep.join("–" if v is None else f"{v:,}" for v in pair)


def markdown(rows: list[Row], args: argparse.Namespace, took: float, commit: tuple[str, str]) -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    lines = [
        "# dispatch: abuse",
        "",
        f"- command: `{args.invocation}`",
        f"- date: {args.date}; took {took:.0f} s",
        f"- machine: Linux {platform.release()}, {len(os.sched_getaffinity(0))} CPUs ({cpu}), "
        f"Python {platform.python_version()}",
        f"- dispatch source: commit {commit[0]} at the start, {commit[1]} at the end "
        "(`+dirty`: src/ had uncommitted changes)",
        "- each attack starts its own server on 127.0.0.1 (a free port, `--log-level info`, "
        f"graceful timeout {GRACEFUL} s); during = requests (one per connection, 2 client threads, "
        f"{REQUEST_TIMEOUT:g} s timeout) sent while the attack runs, after = the same in the "
        f"{AFTER_SECONDS:g} s after it; fds = entries of /proc/PID/fd of the primary before the attack "
        f"and {SETTLE_SECONDS:g} s after the after-window; workers replaced = workers forked after "
        "the attack began. Logs: `benchmarks/results/logs/abuse-NAME.log` (not committed).",
        "",
        "| attack | outcome | served OK during / attempted | served OK after (5 s) / attempted "
        "| primary fds before / after | notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        notes = "; ".join(n.replace("|", "\\|") for n in row.notes) or "–"
        lines.append(f"| {row.attack} | {row.outcome} | {cell(row.during)} | {cell(row.after)} "
                     f"| {cell(row.fds)} | {notes} |")
    lines += ["", "## The attacks", ""]
    for row in rows:
        entry = ATTACKS[row.attack]
        lines.append(f"- **{row.attack}** ({row.seconds:.0f} s): {entry.what}. Expected: {entry.expected}.")
    lines.append("")
    return "\n".join(lines)


# ====================================================================== main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", help="run only this attack (comma-separated for several); see --list")
    p.add_argument("--list", action="store_true", help="list the attacks and exit")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default %(default)s)")
    args = p.parse_args(argv)
    args.names = list(ATTACKS)
    if args.only:
        args.names = [n.strip() for n in args.only.split(",") if n.strip()]
        for name in args.names:
            if name not in ATTACKS:
                p.error(f"unknown attack {name!r}; --list shows them")
    args.logs = args.out / "logs"
    args.invocation = shlex.join(["python", "benchmarks/abuse.py", *(sys.argv[1:] if argv is None else argv)])
    args.date = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    return args


def run(args: argparse.Namespace) -> int:
    if args.list:
        for name, entry in ATTACKS.items():
            print(f"{name:<24} {entry.what}. Expected: {entry.expected}.")
        return 0
    if os.geteuid() != 0:
        log("run this as root: some attacks switch to an unprivileged user or plant files for root")
        return 2
    args.logs.mkdir(parents=True, exist_ok=True)
    # Our side of the floods needs a few thousand descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    ctx = Context(args)
    commit = source_version()
    rows: list[Row] = []
    started = time.monotonic()
    for i, name in enumerate(args.names, 1):
        t0 = time.monotonic()
        try:
            row = ATTACKS[name].run(ctx)
        except Exception as exc:  # one broken attack must not lose the others' rows
            row = Row(name, outcome="attack failed", notes=[f"{exc.__class__.__name__}: {exc}"])
        row.seconds = time.monotonic() - t0
        rows.append(row)
        log(f"[{i}/{len(args.names)}] {name:<24} {row.seconds:4.0f}s  {row.outcome}  "
            f"during {cell(row.during)}  after {cell(row.after)}  fds {cell(row.fds)}")
    text = markdown(rows, args, time.monotonic() - started, (commit, source_version()))
    print(text)
    (args.out / "abuse.md").write_text(text)
    log(f"done in {time.monotonic() - started:.0f}s: {args.out / 'abuse.md'}")
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    try:
        return run(parse_args(argv))
    finally:
        for target in list(_LIVE):
            target.stop()


if __name__ == "__main__":
    sys.exit(main())

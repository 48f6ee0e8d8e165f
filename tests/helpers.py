"""Real servers in subprocesses, real clients, and deadlines for every wait.

Tests observe what a server *does*, never what it logs: the answers and the pids in
them, the primary's children and listening sockets (``/proc``), exit codes,
``/cluster-health`` and ``/metrics``, the ``sd_notify`` messages the primary sends,
and a stream of JSON-lines events (see ``ServerProcess.events``) written by the
public hooks in ``tests/serve_script.py`` and by the handlers in ``tests/apps.py``.
The server's log is kept for failure messages, and for the few tests whose subject
is the log itself.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent

#: The environment variable naming the event file; tests/apps.py and tests/serve_script.py
#: append one JSON object per line to it.
EVENTS_ENV = "DISPATCH_TEST_EVENTS"


def wait_for(condition: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll ``condition`` until it is truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def free_port() -> int:
    """A loopback port nothing listens on, for a server told to bind it later. Taken below
    the ephemeral range (Linux's default starts at 32768): a port the kernel hands out for
    ``bind(0)`` may be the source port of some client's connection by the time the server
    binds it."""
    for _ in range(200):
        port = random.randrange(20000, 32768)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise AssertionError("no free port below the ephemeral range")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def signal_pending(pid: int, signum: int) -> bool:
    """Whether ``signum`` sent to ``pid`` waits to be delivered (``/proc/PID/status``)."""
    with open(f"/proc/{pid}/status") as f:
        masks = [int(line.split()[1], 16) for line in f if line.startswith(("SigPnd:", "ShdPnd:"))]
    return any(mask >> (signum - 1) & 1 for mask in masks)


# ------------------------------------------------------------ listening sockets
def _tcp_listeners() -> dict[int, str]:
    """``{inode: address}`` of every listening TCP socket, from the kernel's sock_diag
    netlink interface, which filters by state: /proc/net/tcp lists every TIME_WAIT
    socket too (100,000s after a test run), too slow to poll."""
    found: dict[int, str] = {}
    for family in (socket.AF_INET, socket.AF_INET6):
        with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, 4) as nl:  # NETLINK_SOCK_DIAG
            # inet_diag_req_v2: family, protocol, ext, pad, states (1 << TCP_LISTEN), sockid.
            req = struct.pack("=BBBxI48x", family, socket.IPPROTO_TCP, 0, 1 << 10)
            # nlmsghdr: SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST | NLM_F_DUMP.
            nl.send(struct.pack("=IHHII", 16 + len(req), 20, 0x301, 1, 0) + req)
            done = False
            while not done:
                data = nl.recv(65536)
                offset = 0
                while offset + 16 <= len(data):
                    length, kind = struct.unpack_from("=IH", data, offset)
                    if kind == 3:  # NLMSG_DONE
                        done = True
                        break
                    if kind == 2:  # NLMSG_ERROR
                        raise OSError(-struct.unpack_from("=i", data, offset + 16)[0], "sock_diag")
                    msg = offset + 16  # inet_diag_msg
                    port = struct.unpack_from("!H", data, msg + 4)[0]
                    raw = data[msg + 8:msg + 8 + (4 if family == socket.AF_INET else 16)]
                    inode = struct.unpack_from("=I", data, msg + 68)[0]
                    host = socket.inet_ntop(family, raw)
                    found[inode] = f"{host}:{port}" if family == socket.AF_INET else f"[{host}]:{port}"
                    offset += (length + 3) & ~3
    return found


def listening_sockets(pid: int) -> list[tuple[int, str]]:
    """``(inode, address)`` of each listening TCP or unix stream socket ``pid`` holds, in
    descriptor order; addresses are written as dispatch writes them
    (``127.0.0.1:PORT``, ``[::1]:PORT``, ``unix:PATH``)."""
    listening = _tcp_listeners()
    with open(f"/proc/{pid}/net/unix") as f:
        for row in f.readlines()[1:]:
            fields = row.split()
            # Flags 0x10000 is __SO_ACCEPTCON (listening); type 1 is SOCK_STREAM.
            if len(fields) > 7 and int(fields[3], 16) & 0x10000 and int(fields[4], 16) == 1:
                listening[int(fields[6])] = "unix:" + fields[7]
    found = []
    for fd in sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except FileNotFoundError:
            continue
        if target.startswith("socket:[") and int(target[8:-1]) in listening:
            inode = int(target[8:-1])
            found.append((inode, listening[inode]))
    return found


def _bind_count(command: Iterable[str]) -> int:
    """How many addresses a command line binds: its ``--bind``/``-b`` flags, or one."""
    args = list(command)
    return max(1, sum(1 for arg in args if arg in ("--bind", "-b") or arg.startswith("--bind=")))


# ------------------------------------------------------------ sd_notify
class NotifySink:
    """A ``NOTIFY_SOCKET`` for a primary: collects every ``sd_notify`` message it sends.

    A reader thread drains it at once, so the primary never blocks on a full socket
    (``net.unix.max_dgram_qlen`` is small).
    """

    def __init__(self) -> None:
        # Abstract namespace: no file to clean up, and no permission check for a
        # primary running as another user.
        self.address = f"@dispatch-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind("\0" + self.address[1:])
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._run, daemon=True)
        self._reader.start()

    def _run(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            if not data:  # shut down by close()
                return
            fields = dict(line.partition("=")[::2] for line in data.decode().splitlines())
            with self._lock:
                self.messages.append(fields)

    def count(self, key: str, value: str = "1") -> int:
        with self._lock:
            return sum(1 for message in self.messages if message.get(key) == value)

    def close(self) -> None:
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader
        except OSError:
            pass
        self._reader.join(5)
        self._sock.close()


class ServerProcess:
    """A dispatch primary in a subprocess, stopped (by pid) on exit.

    A scripted server (``tests/serve_script.py``, the default) serves
    ``/cluster-health`` (``health="127.0.0.1:0"`` unless given) and reports its hook
    calls as events. Every server gets a ``NOTIFY_SOCKET`` (unless ``env`` names one)
    and the event file in ``$DISPATCH_TEST_EVENTS``, which the handlers of
    ``tests/apps.py`` write to.
    """

    #: Every server started in this test session: tests/conftest.py removes their files
    #: when the whole session passed (servers not used as a context manager included).
    created: ClassVar[list[ServerProcess]] = []

    def __init__(self, handler: str = "tests.apps:pid_app", *, cli: list[str] | None = None,
                 command: list[str] | None = None, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = (), cwd: Path = ROOT, wrapper: list[str] | None = None,
                 **options: Any) -> None:
        """Run ``tests/serve_script.py`` with ``options``, the CLI with the ``cli`` flags,
        or any ``command`` that serves with dispatch. ``wrapper`` goes before the command
        (``prlimit ...``, ``setpriv ...``)."""
        options.setdefault("bind", "127.0.0.1:0")
        options.setdefault("workers", 2)
        options.setdefault("log_level", "debug")
        options["handler"] = handler
        stamp = f"{os.getpid()}-{time.monotonic_ns()}"
        self.log_path = Path(f"/tmp/dispatch-test-{stamp}.log")
        self._log = open(self.log_path, "w+b")  # noqa: SIM115 - closed in stop()
        # World-writable, and opened without O_CREAT by the writers, so workers running as
        # another user can append to it in sticky /tmp (fs.protected_regular).
        self.events_path = Path(f"/tmp/dispatch-test-{stamp}.events")
        ServerProcess.created.append(self)
        os.close(os.open(self.events_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        os.chmod(self.events_path, 0o666)
        scripted = cli is None and command is None
        if scripted:
            options.setdefault("health", "127.0.0.1:0")
            command = [sys.executable, str(ROOT / "tests" / "serve_script.py"), json.dumps(options)]
        elif command is None:
            command = [sys.executable, "-m", "dispatch", handler, *cli]
        listeners = _bind_count(command)
        command = [*(wrapper or []), *command]
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        full_env[EVENTS_ENV] = str(self.events_path)
        self.notify: NotifySink | None = None
        if "NOTIFY_SOCKET" not in (env or {}):
            self.notify = NotifySink()
            full_env["NOTIFY_SOCKET"] = self.notify.address
        self.proc = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._log,
                                     env=full_env, pass_fds=pass_fds)
        self.pid = self.proc.pid
        self.health: str | None = None
        if scripted:
            info = json.loads(self._read_line(timeout=15))
            self.addresses: list[str] = info["addresses"]
            self.health = info["health"]
        else:
            self.addresses = self._wait_listening(listeners)
        self.address = self.addresses[0]

    def _read_line(self, timeout: float) -> str:
        result: list[bytes] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout)
        if not result or not result[0]:
            self.stop()
            raise AssertionError(f"server did not start; log:\n{self.log()}")
        return result[0].decode()

    def _wait_listening(self, count: int, timeout: float = 15.0) -> list[str]:
        """The first ``count`` listening sockets of the primary, once it holds them: it
        binds its addresses, in order, before anything else listens (health, hooks)."""
        def bound() -> list[str] | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}; log:\n{self.log()}")
            found = listening_sockets(self.pid)
            return [address for _, address in found[:count]] if len(found) >= count else None

        try:
            return wait_for(bound, timeout, interval=0.02, what=f"{count} listening sockets")
        except AssertionError:
            self.stop()
            raise

    def log(self) -> str:
        """What the server wrote to stderr: for failure messages, and for the few tests
        whose subject is the log itself (each says why)."""
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        return children(self.pid)

    # ------------------------------------------------------------ events
    def events(self, kind: str | None = None) -> list[dict[str, Any]]:
        """The event stream so far: dicts with ``event``, ``pid`` and ``t``
        (``time.monotonic()`` in the writer, comparable across processes), and:

        - ``starting`` (``addresses``), ``reload``: the ``on_starting`` and ``on_reload``
          hooks, in the primary (scripted servers);
        - ``worker_exit`` (``worker_id``, ``how``; ``pid`` is the worker's): ``on_worker_exit``;
        - ``handling``, ``handled`` (``path``): a handler of tests/apps.py started and
          finished a ``/sleep/MS`` request, in the worker.
        """
        with open(self.events_path) as f:
            lines = f.read().splitlines()
        found = [json.loads(line) for line in lines if line.endswith("}")]
        return [e for e in found if kind is None or e["event"] == kind]

    def exits(self) -> dict[int, str]:
        """``{pid: how}`` of every worker that exited, from ``on_worker_exit``."""
        return {e["pid"]: e["how"] for e in self.events("worker_exit")}

    def wait_events(self, kind: str, count: int = 1, timeout: float = 10.0,
                    where: Callable[[dict[str, Any]], bool] = lambda e: True) -> list[dict[str, Any]]:
        """At least ``count`` events of ``kind`` for which ``where`` holds."""
        def enough() -> list[dict[str, Any]] | None:
            found = [e for e in self.events(kind) if where(e)]
            return found if len(found) >= count else None

        return wait_for(enough, timeout, interval=0.02, what=f"{count} {kind} events")

    # ------------------------------------------------------------ health
    def cluster_health(self) -> dict[str, Any]:
        assert self.health is not None, "this server has no health endpoint"
        status, text = http_get(self.health, "/cluster-health")
        assert status == 200, f"/cluster-health answered {status}: {text[:200]}"
        return json.loads(text)

    def worker_health(self, pid: int) -> dict[str, Any] | None:
        """The ``/cluster-health`` entry of worker ``pid``, or None."""
        return next((w for w in self.cluster_health()["workers"] if w["pid"] == pid), None)

    def metrics(self) -> dict[str, float]:
        """``/metrics`` samples by name, labels included: ``{'x_total{cause="exit"}': 1.0}``."""
        assert self.health is not None, "this server has no health endpoint"
        status, text = http_get(self.health, "/metrics")
        assert status == 200, f"/metrics answered {status}: {text[:200]}"
        samples = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                samples[name] = float(value)
        return samples

    # ------------------------------------------------------------ readiness
    def wait_ready(self, count: int, timeout: float = 15.0, interval: float = 0.02) -> list[int]:
        """Pids of at least ``count`` live workers in state ready, by worker id.

        Without a health endpoint (the CLI, other commands) ready means what systemd
        sees: the ``READY=1`` the primary sends once all its workers first became ready;
        then its children are those workers. Call it at start only, there.
        """
        if self.health is not None:
            return wait_for(lambda: self._ready_pids(count), timeout, interval=interval,
                            what=f"{count} ready workers")
        assert self.notify is not None, "no health endpoint and no NOTIFY_SOCKET of ours"
        self.wait_notified("READY", 1, timeout)
        return wait_for(lambda: self._live_children(count), timeout, interval=interval,
                        what=f"{count} workers")

    def _ready_pids(self, count: int) -> list[int] | None:
        live = set(self.workers())
        doc = self.cluster_health()
        ready = [w["pid"] for w in doc["workers"] if w["state"] == "ready" and w["pid"] in live]
        return ready if len(ready) >= count else None

    def _live_children(self, count: int) -> list[int] | None:
        found = sorted(p for p in self.workers() if pid_alive(p))
        return found if len(found) >= count else None

    def wait_notified(self, key: str, count: int = 1, timeout: float = 15.0) -> None:
        """At least ``count`` ``sd_notify`` messages with ``KEY=1``: ``READY`` once at
        start and again when each rolling restart has ended (complete or aborted),
        ``RELOADING`` when one starts, ``STOPPING`` on shutdown."""
        assert self.notify is not None
        notify = self.notify

        def enough() -> bool:
            if self.proc.poll() is not None and notify.count(key) < count:
                raise AssertionError(f"server exited with {self.proc.returncode}; log:\n{self.log()}")
            return notify.count(key) >= count

        wait_for(enough, timeout, interval=0.02, what=f"{count} {key}=1 notifications")

    def wait_replaced(self, old: Iterable[int], count: int, timeout: float = 30.0) -> list[int]:
        """After a rolling restart: ``count`` workers, all ready, none of ``old``, and
        every one of ``old`` gone. The new pids."""
        old = set(old)

        def replaced() -> list[int] | None:
            workers = self.cluster_health()["workers"]
            pids = {w["pid"] for w in workers}
            if (len(workers) == count and all(w["state"] == "ready" for w in workers)
                    and not pids & old and not any(pid_alive(p) for p in old)):
                return sorted(pids)
            return None

        return wait_for(replaced, timeout, interval=0.02, what=f"{count} new workers replacing {sorted(old)}")

    def wait_signal_delivered(self, signum: int, timeout: float = 10.0) -> None:
        """Until the primary has taken ``signum`` (it is no longer pending)."""
        wait_for(lambda: not signal_pending(self.pid, signum), timeout, interval=0.005,
                 what=f"signal {signum} delivered")

    # ------------------------------------------------------------ control
    def signal(self, signum: int) -> None:
        os.kill(self.pid, signum)

    def wait(self, timeout: float = 20.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._log.close()
        self.proc.stdout.close()
        if self.notify is not None:
            self.notify.close()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if exc[0] is None:
            self.remove_files()

    def remove_files(self) -> None:
        """Delete the log and event files (kept when a test fails, to read them)."""
        self.log_path.unlink(missing_ok=True)
        self.events_path.unlink(missing_ok=True)


TEST_USER = "dispatch-test"


def unprivileged_user() -> tuple[int, int]:
    """(uid, gid) of a non-root user for tests that need one, created if missing.

    Needs root (CI runs the tests as root); otherwise the caller should skip.
    """
    import pwd

    try:
        entry = pwd.getpwnam(TEST_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        TEST_USER], check=True, capture_output=True, timeout=30)
        entry = pwd.getpwnam(TEST_USER)
    return entry.pw_uid, entry.pw_gid


def as_user(uid: int, gid: int) -> list[str]:
    """A command prefix that runs what follows as ``uid``/``gid`` with no capabilities."""
    return ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups", "--inh-caps=-all"]


def connect(address: str, timeout: float = 10.0) -> socket.socket:
    if address.startswith("unix:"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(address[5:])
        return sock
    host, _, port = address.rpartition(":")
    host = host.strip("[]")
    return socket.create_connection((host, int(port)), timeout=timeout)


def http_get(address: str, path: str = "/", timeout: float = 10.0) -> tuple[int, str]:
    """One HTTP/1.0 request on a new connection; the status and body, or raise on failure."""
    with connect(address, timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: test\r\n\r\n".encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep or not head.startswith(b"HTTP/1."):
        raise ConnectionError(f"no response (got {data[:80]!r})")
    return int(head.split(b" ", 2)[1]), body.decode()


def request(address: str, path: str = "/", timeout: float = 10.0) -> str:
    """One HTTP/1.0 request on a new connection; the body, or raise on failure."""
    return http_get(address, path, timeout)[1]


def answering_pid(body: str) -> int:
    return int(body.split()[1])


class Load:
    """Client threads sending requests until stopped; counts answers and failures."""

    def __init__(self, address: str, clients: int = 4, path: str = "/", max_requests: int = 100_000,
                 max_seconds: float = 60.0) -> None:
        self.address, self.path = address, path
        self.ok = 0
        self.failed: list[str] = []
        self.pids: dict[int, int] = {}
        self.slowest = 0.0  # seconds, of the answered requests
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._budget = max_requests
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if self._budget <= 0:
                    return
                self._budget -= 1
            began = time.monotonic()
            try:
                pid = answering_pid(request(self.address, self.path))
            except (OSError, ValueError, IndexError) as exc:
                with self._lock:
                    self.failed.append(repr(exc))
                continue
            took = time.monotonic() - began
            with self._lock:
                self.slowest = max(self.slowest, took)
                self.ok += 1
                self.pids[pid] = self.pids.get(pid, 0) + 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        wait_for(lambda: self.ok + len(self.failed) >= count, timeout, what=f"{count} requests")

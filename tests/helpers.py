"""Real servers in subprocesses, real clients, and deadlines for every wait."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


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


class ServerProcess:
    """A dispatch primary in a subprocess, stopped (by pid) on exit."""

    def __init__(self, handler: str = "tests.apps:pid_app", *, cli: list[str] | None = None,
                 command: list[str] | None = None, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = (), cwd: Path = ROOT, wrapper: list[str] | None = None,
                 **options: Any) -> None:
        """Run ``tests/serve_script.py`` with ``options``, the CLI with the ``cli`` flags,
        or any ``command`` that logs dispatch's "listening on" line. ``wrapper`` goes
        before the command (``prlimit ...``, ``setpriv ...``)."""
        options.setdefault("bind", "127.0.0.1:0")
        options.setdefault("workers", 2)
        options.setdefault("log_level", "debug")
        options["handler"] = handler
        self.log_path = Path(f"/tmp/dispatch-test-{os.getpid()}-{time.monotonic_ns()}.log")
        self._log = open(self.log_path, "w+b")
        scripted = cli is None and command is None
        if scripted:
            command = [sys.executable, str(ROOT / "tests" / "serve_script.py"), json.dumps(options)]
        elif command is None:
            command = [sys.executable, "-m", "dispatch", handler, *cli]
        command = [*(wrapper or []), *command]
        full_env = dict(os.environ, PYTHONPATH=str(ROOT), **(env or {}))
        self.proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=self._log,
                                     env=full_env, pass_fds=pass_fds)
        self.pid = self.proc.pid
        if scripted:
            info = json.loads(self._read_line(timeout=15))
            self.addresses: list[str] = info["addresses"]
            self.health: str | None = info["health"]
        else:
            found = wait_for(lambda: re.search(r"listening on (\S+) \(", self.log()), 15,
                             what="the CLI's listening line")
            self.addresses = found.group(1).rstrip(",").split(",")
            self.health = None
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

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def workers(self) -> list[int]:
        return children(self.pid)

    def wait_ready(self, count: int, timeout: float = 15.0) -> list[int]:
        return wait_for(lambda: self._ready_pids(count), timeout, what=f"{count} ready workers")

    def _ready_pids(self, count: int) -> list[int] | None:
        pids = dict.fromkeys(int(p) for p in re.findall(r"\(pid (\d+)\) ready", self.log()))
        live = [p for p in pids if p in self.workers()]
        return live if len(live) >= count else None

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

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
        if exc[0] is None:
            self.log_path.unlink(missing_ok=True)


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


def request(address: str, path: str = "/", timeout: float = 10.0) -> str:
    """One HTTP/1.0 request on a new connection; the body, or raise on failure."""
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
    return body.decode()


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
            try:
                pid = answering_pid(request(self.address, self.path))
            except (OSError, ValueError, IndexError) as exc:
                with self._lock:
                    self.failed.append(repr(exc))
                continue
            with self._lock:
                self.ok += 1
                self.pids[pid] = self.pids.get(pid, 0) + 1

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)

    def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        wait_for(lambda: self.ok + len(self.failed) >= count, timeout, what=f"{count} requests")

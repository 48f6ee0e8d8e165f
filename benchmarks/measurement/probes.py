"""Plain HTTP requests on a new connection each, and a probe that counts how many of them a
server answers while something else happens to it."""

from __future__ import annotations

import socket
import threading
import time
from collections import Counter

HOST = "127.0.0.1"  # every server under test listens here, and nowhere else
REQUEST_TIMEOUT = 2.0  # per socket operation of one probe request


def http_get(port: int, path: str = "/", timeout: float = 1.0) -> tuple[int, bytes]:
    """One HTTP/1.1 ``Connection: close`` request: (status, body), status 0 if the answer is not HTTP."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.partition(b"\r\n\r\n")[2]


def fetch(port: int, path: str = "/", timeout: float = REQUEST_TIMEOUT) -> tuple[int, bytes]:
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
        return fetch(port, path, timeout)[0] == 200
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
                status, body = fetch(self.port, self.path)
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

"""Handlers the integration tests serve. Each answers with the pid that handled it.

A request for ``/sleep/MS`` sleeps MS milliseconds before answering, and reports
``handling`` when it starts and ``handled`` when it is done (answered or not) on the
test's event stream: the file named by ``$DISPATCH_TEST_EVENTS`` (tests/helpers.py).
"""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from typing import Any

_events_lock = threading.Lock()
_events: tuple[int, int] | None = None  # (pid, fd): a forked child opens its own


def emit(event: str, **fields: Any) -> None:
    """Append one JSON line to the test's event stream, if there is one."""
    global _events
    path = os.environ.get("DISPATCH_TEST_EVENTS")
    if not path:
        return
    record = {"event": event, "pid": os.getpid(), "t": time.monotonic(), **fields}
    line = ("{" + ", ".join(f"{_json(k)}: {_json(v)}" for k, v in record.items()) + "}\n").encode()
    with _events_lock:
        if _events is None or _events[0] != os.getpid():
            # No O_CREAT: the test created the file, world-writable, for workers that run
            # as another user (O_CREAT on another user's file in sticky /tmp is refused).
            _events = (os.getpid(), os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC))
        os.write(_events[1], line)  # one write per line: O_APPEND keeps lines whole


def _json(value: Any) -> str:
    """JSON for a str, int or float. Not the json module: a worker that dropped root to
    a user who cannot read the standard library can import only what is loaded."""
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def _response(body: str) -> bytes:
    data = body.encode()
    return b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data)


def _read_head(conn: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = conn.recv(65536)
        if not chunk:
            break
        head += chunk
    return head


def _sleep_path(head: bytes) -> str | None:
    """The path of a ``GET /sleep/MS`` request, else None."""
    parts = head.split(b" ", 2)
    if len(parts) > 1 and parts[1].startswith(b"/sleep/"):
        return parts[1].decode("latin-1")
    return None


def _start(head: bytes) -> float:
    """Seconds to sleep before answering; a ``/sleep/MS`` request says it started."""
    path = _sleep_path(head)
    if path is None:
        return 0.0
    emit("handling", path=path)
    return int(path[len("/sleep/"):]) / 1000


def _finish(head: bytes) -> None:
    path = _sleep_path(head)
    if path is not None:
        emit("handled", path=path)


def pid_app(conn: socket.socket, addr: Any) -> None:
    head = _read_head(conn)
    try:
        time.sleep(_start(head))
        conn.sendall(_response(f"pid {os.getpid()}"))
    finally:
        _finish(head)


async def async_pid_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    try:
        await asyncio.sleep(_start(head))
        writer.write(_response(f"pid {os.getpid()} async"))
        await writer.drain()
    finally:
        _finish(head)


def raising_app(conn: socket.socket, addr: Any) -> None:
    head = _read_head(conn)
    if b"/raise" in head:
        raise RuntimeError("boom from the handler")
    conn.sendall(_response(f"pid {os.getpid()}"))


def garbage_app(conn: socket.socket, addr: Any) -> None:
    """Writes garbage onto this worker's control channel (a protocol violation)."""
    head = _read_head(conn)
    if b"/ok" not in head:
        for fd in os.listdir("/proc/self/fd"):
            try:
                sock = socket.socket(fileno=int(fd))
            except OSError:
                continue
            try:
                if sock.type == socket.SOCK_SEQPACKET:
                    sock.send(b"\xffgarbage")
            finally:
                sock.detach()
    conn.sendall(_response(f"pid {os.getpid()}"))


# ---------------------------------------------------------------- misbehaving code
class OutOfRangePolicy:
    """A per-connection policy with a bug: an index past the end of the worker list."""

    needs_loads = False

    def choose(self, client: Any, workers: Any, loads: Any) -> int:
        return len(workers) + 5


class BrokenBatchPolicy:
    """A batch policy with every bug in turn: negative shares that still sum right,
    a wrong sum, the wrong length, an exception."""

    needs_loads = False

    def __init__(self) -> None:
        self.calls = 0

    def assign(self, count: int, loads: Any, workers: int) -> list[int]:
        self.calls += 1
        kind = self.calls % 4
        if kind == 0:
            return [count + 1] + [-1] * (workers - 1) if workers > 1 else [-1]
        if kind == 1:
            return [count * 2] + [0] * (workers - 1)
        if kind == 2:
            return [count]
        raise ZeroDivisionError("policy bug")


_active = 0


async def concurrency_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answers with how many connections this worker was serving at once, itself included."""
    global _active
    _active += 1
    head = b""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        seen = _active
        await asyncio.sleep(_start(head))
        writer.write(_response(f"pid {os.getpid()} active {seen}"))
        await writer.drain()
    finally:
        _active -= 1
        _finish(head)


def greeting_app(conn: socket.socket, addr: Any) -> None:
    """Speaks first, as SMTP or FTP servers do."""
    conn.sendall(f"hello from {os.getpid()}\r\n".encode())


def addr_app(conn: socket.socket, addr: Any) -> None:
    """Answers with the pid and the client address it was given (``addr``)."""
    _read_head(conn)
    host, port = (addr[0], addr[1]) if isinstance(addr, tuple) else (repr(addr), 0)
    conn.sendall(_response(f"pid {os.getpid()} addr {host} {port}"))


def burn_app(conn: socket.socket, addr: Any) -> None:
    """``GET /burn/MS`` spends MS milliseconds of CPU before answering; others answer at once."""
    head = _read_head(conn)
    parts = head.split(b" ", 2)
    if len(parts) > 1 and parts[1].startswith(b"/burn/"):
        end = time.process_time() + int(parts[1][len(b"/burn/"):]) / 1000
        while time.process_time() < end:
            pass
    conn.sendall(_response(f"pid {os.getpid()}"))


def banner_app(conn: socket.socket, addr: Any) -> None:
    """Speaks first: a banner naming the client address it was given, then closes."""
    host, port = (addr[0], addr[1]) if isinstance(addr, tuple) else (repr(addr), 0)
    conn.sendall(f"220 addr {host} {port}\r\n".encode())


async def async_addr_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """The coroutine handler's way to the client address: ``dispatch.client_address``."""
    import dispatch

    await reader.readuntil(b"\r\n\r\n")
    addr = dispatch.client_address(writer.get_extra_info("socket"))
    writer.write(_response(f"pid {os.getpid()} addr {addr[0]} {addr[1]}"))
    await writer.drain()

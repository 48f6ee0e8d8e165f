"""Handlers the integration tests serve. Each answers with the pid that handled it."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any


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


def _delay(head: bytes) -> float:
    # "GET /sleep/1500 ..." sleeps 1.5 s before answering, and says so in the log.
    parts = head.split(b" ")
    if len(parts) > 1 and parts[1].startswith(b"/sleep/"):
        delay = int(parts[1][len(b"/sleep/") :]) / 1000
        if delay >= 0.5:
            logging.getLogger("dispatch.tests").info("pid %d sleeping %.1fs", os.getpid(), delay)
        return delay
    return 0.0


def pid_app(conn: socket.socket, addr: Any) -> None:
    head = _read_head(conn)
    time.sleep(_delay(head))
    conn.sendall(_response(f"pid {os.getpid()}"))


async def async_pid_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    await asyncio.sleep(_delay(head))
    writer.write(_response(f"pid {os.getpid()} async"))
    await writer.drain()


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
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        seen = _active
        await asyncio.sleep(_delay(head))
        writer.write(_response(f"pid {os.getpid()} active {seen}"))
        await writer.drain()
    finally:
        _active -= 1


def greeting_app(conn: socket.socket, addr: Any) -> None:
    """Speaks first, as SMTP or FTP servers do."""
    conn.sendall(f"hello from {os.getpid()}\r\n".encode())

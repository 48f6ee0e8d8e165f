"""The demo application: a tiny HTTP server that says which worker answered.

``python -m dispatch dispatch.demo:app`` serves it on every core. Three shapes
of the same application, one per kind of handler dispatch runs:

- ``app``: an ``asyncio.Protocol`` (HTTP/1.1, keep-alive), the lightest; the
  benchmarks use it;
- ``stream_app``: a coroutine handler on asyncio streams;
- ``sync_app``: a plain handler in a worker thread, one request per connection.

All answer ``/slow?ms=N`` after sleeping N milliseconds and ``/burn?ms=N``
after burning N milliseconds of CPU, for the benchmarks' mixed workloads.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

_MAX_HEAD = 65536


_PLAIN: dict[tuple[int, bool], bytes] = {}  # (pid, keep_alive) -> response to "/"


def _respond(path: str, keep_alive: bool) -> tuple[bytes, float]:
    """The response for ``path`` and how long to sleep before sending it."""
    if path == "/":
        cached = _PLAIN.get((os.getpid(), keep_alive))
        if cached is not None:
            return cached, 0.0
    sleep = 0.0
    route, _, query = path.partition("?")
    params = dict(p.partition("=")[::2] for p in query.split("&") if p)
    ms = int(params.get("ms", "0") or 0) if params.get("ms", "0").isdigit() else 0
    if route == "/slow":
        sleep = ms / 1000
    elif route == "/burn":
        end = time.perf_counter() + ms / 1000
        while time.perf_counter() < end:
            pass
    body = f"hello from worker pid {os.getpid()}\n".encode()
    head = (
        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
        f"Content-Length: {len(body)}\r\nConnection: {'keep-alive' if keep_alive else 'close'}\r\n\r\n"
    )
    response = head.encode() + body
    if path == "/":
        _PLAIN[(os.getpid(), keep_alive)] = response
    return response, sleep


def _parse(head: bytes) -> tuple[str, bool]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    path = parts[1] if len(parts) >= 2 else "/"
    version = parts[2] if len(parts) >= 3 else "HTTP/1.0"
    headers = {k.strip().lower(): v.strip().lower() for k, _, v in (line.partition(":") for line in lines[1:])}
    connection = headers.get("connection", "")
    keep_alive = connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"
    return path, keep_alive


class HttpProtocol(asyncio.Protocol):
    """Minimal HTTP/1.1: GET-style requests without bodies, keep-alive, pipelining."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""
        self.waiting = False  # a /slow response is pending; later requests wait

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self._serve_buffered()

    def _serve_buffered(self) -> None:
        while not self.waiting:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self.buffer) > _MAX_HEAD:
                    self.transport.close()
                return
            head, self.buffer = self.buffer[:end], self.buffer[end + 4 :]
            path, keep_alive = _parse_fast(head)
            response, sleep = _respond(path, keep_alive)
            if sleep:
                self.waiting = True
                asyncio.get_running_loop().call_later(sleep, self._send_later, response, keep_alive)
                return
            self.transport.write(response)
            if not keep_alive:
                self.transport.close()
                return

    def _send_later(self, response: bytes, keep_alive: bool) -> None:
        if self.transport.is_closing():
            return
        self.waiting = False
        self.transport.write(response)
        if keep_alive:
            self._serve_buffered()
        else:
            self.transport.close()


def _parse_fast(head: bytes) -> tuple[str, bool]:
    line_end = head.find(b"\r\n")
    parts = (head if line_end < 0 else head[:line_end]).split(b" ")
    path = parts[1].decode("latin-1") if len(parts) >= 2 else "/"
    lower = head.lower()
    if len(parts) >= 3 and parts[2] == b"HTTP/1.0":
        return path, b"connection: keep-alive" in lower
    return path, b"connection: close" not in lower


async def stream_app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 with keep-alive, on asyncio streams."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            return
        path, keep_alive = _parse(head[:_MAX_HEAD])
        response, sleep = _respond(path, keep_alive)
        if sleep:
            await asyncio.sleep(sleep)
        writer.write(response)
        await writer.drain()
        if not keep_alive:
            return


def sync_app(conn: socket.socket, addr: Any) -> None:
    """One request per connection, in a worker thread."""
    head = b""
    while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
        chunk = conn.recv(65536)
        if not chunk:
            return
        head += chunk
    path, _ = _parse(head.split(b"\r\n\r\n", 1)[0])
    response, sleep = _respond(path, keep_alive=False)
    if sleep:
        time.sleep(sleep)
    conn.sendall(response)


def _make_app() -> object:
    from dispatch.handlers import AsyncioProtocol

    return AsyncioProtocol(HttpProtocol)


app = _make_app()

"""The demo application: a tiny HTTP server that says which worker answered.

``python -m dispatch dispatch.demo:app`` serves it on every core. ``app`` is a
coroutine handler with keep-alive; ``sync_app`` is a plain handler that
answers one request per connection. Both answer ``/slow?ms=N`` after sleeping
N milliseconds and ``/burn?ms=N`` after burning N milliseconds of CPU, which
the benchmarks use for their mixed workloads.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Any

_MAX_HEAD = 65536


def _respond(path: str, keep_alive: bool) -> tuple[bytes, float]:
    """The response for ``path`` and how long to sleep before sending it."""
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
    return head.encode() + body, sleep


def _parse(head: bytes) -> tuple[str, bool]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    path = parts[1] if len(parts) >= 2 else "/"
    version = parts[2] if len(parts) >= 3 else "HTTP/1.0"
    headers = {k.strip().lower(): v.strip().lower() for k, _, v in (line.partition(":") for line in lines[1:])}
    connection = headers.get("connection", "")
    keep_alive = connection == "keep-alive" if version == "HTTP/1.0" else connection != "close"
    return path, keep_alive


async def app(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """HTTP/1.1 with keep-alive, on the worker's event loop."""
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

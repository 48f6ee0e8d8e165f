"""The demo response as a WSGI app (gunicorn) and an ASGI app (uvicorn).

Both answer "hello from worker pid N" like ``dispatch.demo:app``; ``/burn?ms=N``
burns N ms of CPU first and ``/slow?ms=N`` sleeps N ms first.

    gunicorn --workers 2 --worker-class sync --bind 127.0.0.1:PORT benchmarks.peers.python_apps:wsgi
    uvicorn --workers 2 --host 127.0.0.1 --port PORT --log-level warning benchmarks.peers.python_apps:asgi
"""

from __future__ import annotations

import asyncio
import os
import time
from urllib.parse import parse_qs


def _ms(query: str) -> int:
    values = parse_qs(query).get("ms", ["0"])
    return int(values[0]) if values[0].isdigit() else 0


def _burn(ms: int) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def wsgi(environ, start_response):
    path, query = environ.get("PATH_INFO", "/"), environ.get("QUERY_STRING", "")
    if path == "/burn":
        _burn(_ms(query))
    elif path == "/slow":
        time.sleep(_ms(query) / 1000)
    body = f"hello from worker pid {os.getpid()}\n".encode()
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi(scope, receive, send):
    if scope["type"] != "http":
        return
    path, query = scope["path"], scope["query_string"].decode()
    if path == "/burn":
        _burn(_ms(query))
    elif path == "/slow":
        await asyncio.sleep(_ms(query) / 1000)
    body = f"hello from worker pid {os.getpid()}\n".encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

"""Real web apps for tests/test_web.py: a Starlette app and a Flask app, served by dispatch.

Both report which worker answered (``pid``). The Starlette app's lifespan counts its
startups in this process and appends ``lifespan_startup``/``lifespan_shutdown`` events
(one JSON object per line, as tests/helpers.py reads them) to ``$DISPATCH_TEST_EVENTS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

from flask import Flask, Response, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

STARTUPS = 0  # lifespan startups in this process: one per worker
STREAM_CHUNKS = 5


def emit(event: str, **fields: Any) -> None:
    """One event line for ``ServerProcess.events()``."""
    path = os.environ.get("DISPATCH_TEST_EVENTS")
    if not path:
        return
    record = {"event": event, "pid": os.getpid(), "t": time.monotonic(), **fields}
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


# ------------------------------------------------------------------ Starlette
@contextlib.asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
    global STARTUPS
    STARTUPS += 1
    started = time.monotonic()
    emit("lifespan_startup")
    yield {"started_at": started}  # lifespan state: request.state.started_at
    emit("lifespan_shutdown")


async def home(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "startups": STARTUPS, "started_at": request.state.started_at,
                         "now": time.monotonic()})


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"item": int(request.path_params["item_id"]), "q": request.query_params.get("q")})


async def echo_json(request: Request) -> JSONResponse:
    body = await request.json()
    return JSONResponse({"got": body, "pid": os.getpid()}, status_code=201)


async def stream(request: Request) -> StreamingResponse:
    async def chunks() -> AsyncIterator[bytes]:
        for i in range(STREAM_CHUNKS):
            yield f"chunk {i}\n".encode()
            await asyncio.sleep(0.01)

    return StreamingResponse(chunks(), media_type="text/plain")


async def upload(request: Request) -> JSONResponse:
    digest, size = hashlib.sha256(), 0
    async for chunk in request.stream():
        digest.update(chunk)
        size += len(chunk)
    return JSONResponse({"size": size, "sha256": digest.hexdigest()})


async def client(request: Request) -> JSONResponse:
    assert request.client is not None
    return JSONResponse({"host": request.client.host, "scheme": request.url.scheme})


async def sleep(request: Request) -> JSONResponse:
    await asyncio.sleep(float(request.query_params.get("s", "0.1")))
    return JSONResponse({"pid": os.getpid()})


async def ws_echo(websocket: WebSocket) -> None:
    await websocket.accept()
    await websocket.send_text(f"hello from {os.getpid()}")
    try:
        while True:
            await websocket.send_text(await websocket.receive_text())
    except WebSocketDisconnect:
        pass


async def ws_client(websocket: WebSocket) -> None:
    await websocket.accept()
    assert websocket.client is not None
    await websocket.send_text(websocket.client.host)
    await websocket.close()


starlette_app = Starlette(
    routes=[
        Route("/", home),
        Route("/items/{item_id:int}", item),
        Route("/json", echo_json, methods=["POST"]),
        Route("/stream", stream),
        Route("/upload", upload, methods=["POST"]),
        Route("/client", client),
        Route("/sleep", sleep),
        WebSocketRoute("/ws", ws_echo),
        WebSocketRoute("/ws-client", ws_client),
    ],
    lifespan=lifespan,
)


# ------------------------------------------------------------------ failing startup
@contextlib.asynccontextmanager
async def failing_lifespan(app: Starlette) -> AsyncIterator[None]:
    raise RuntimeError("cannot reach the database (web_apps.failing_app)")
    yield  # pragma: no cover


failing_app = Starlette(routes=[Route("/", home)], lifespan=failing_lifespan)


# ------------------------------------------------------------------ Flask
flask_app = Flask(__name__)
_barrier = threading.Barrier(2, timeout=5)


@flask_app.get("/")
def flask_home() -> dict[str, Any]:
    return {"pid": os.getpid(), "framework": "flask"}


@flask_app.get("/client")
def flask_client() -> dict[str, Any]:
    return {"host": request.remote_addr, "remote_addr": request.environ.get("REMOTE_ADDR")}


@flask_app.post("/json")
def flask_json() -> tuple[dict[str, Any], int]:
    return {"got": request.get_json(), "pid": os.getpid()}, 201


@flask_app.get("/stream")
def flask_stream() -> Response:
    def chunks() -> Iterator[bytes]:
        for i in range(STREAM_CHUNKS):
            yield f"chunk {i}\n".encode()

    return Response(chunks(), mimetype="text/plain")


@flask_app.post("/upload")
def flask_upload() -> dict[str, Any]:
    digest, size = hashlib.sha256(), 0
    while chunk := request.stream.read(65536):
        digest.update(chunk)
        size += len(chunk)
    return {"size": size, "sha256": digest.hexdigest()}


@flask_app.get("/barrier")
def flask_barrier() -> dict[str, Any]:
    """Answers only when a second request waits too: proof of two threads at once."""
    _barrier.wait()
    return {"thread": threading.current_thread().name}


# ------------------------------------------------------------------ not telling
def ambiguous(*args: Any) -> None:
    """Could be anything: dispatch cannot tell without --interface."""

"""The web comparison's apps, shared by every target: one Starlette (ASGI) app and one Flask
(WSGI) app with the same two routes.

- ``/``: a small JSON body, ``{"message": "hello", "pid": N}`` (N: the worker's pid, which the
  benchmark's boot check reads to see every worker answer).
- ``/burn?ms=N``: burns N ms of CPU in the worker first (blocking its event loop, or one of its
  threads), then answers the same body: the mixed workload's slow request.

    python -m dispatch benchmarks.peers.web_apps:starlette_app --workers 2 --bind 127.0.0.1:PORT
    python -m uvicorn --workers 2 --port PORT benchmarks.peers.web_apps:starlette_app
    python -m gunicorn --workers 2 --worker-class gthread benchmarks.peers.web_apps:flask_app
"""

from __future__ import annotations

import os
import time

from flask import Flask, request
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


def body() -> dict[str, object]:
    return {"message": "hello", "pid": os.getpid()}


def burn(ms: str | None) -> None:
    """Busy-loop ``ms`` milliseconds (0 if it is not a whole number)."""
    end = time.perf_counter() + (int(ms) if ms and ms.isdigit() else 0) / 1000
    while time.perf_counter() < end:
        pass


async def hello(request: Request) -> JSONResponse:
    return JSONResponse(body())


async def burn_then_hello(request: Request) -> JSONResponse:
    burn(request.query_params.get("ms"))
    return JSONResponse(body())


starlette_app = Starlette(routes=[Route("/", hello), Route("/burn", burn_then_hello)])

flask_app = Flask(__name__)


@flask_app.get("/")
def flask_hello() -> dict[str, object]:
    return body()


@flask_app.get("/burn")
def flask_burn() -> dict[str, object]:
    burn(request.args.get("ms"))
    return body()

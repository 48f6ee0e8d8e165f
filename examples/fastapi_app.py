"""A FastAPI app on every core: JSON in and out, a lifespan, a WebSocket.

    pip install 'dispatch[web]' fastapi
    python examples/fastapi_app.py --bind 127.0.0.1:8000
    curl -s localhost:8000/ ; curl -s -XPOST localhost:8000/items -d '{"name": "pen", "price": 2.5}'

or, the same app from the shell (run from this directory, so that it is importable):

    python -m dispatch fastapi_app:app --workers 4 --bind 127.0.0.1:8000 --balance least-connections

The app is unchanged FastAPI: each worker runs its lifespan startup before it takes
connections, and its shutdown when it drains (a rolling restart: ``kill -USR2 <primary>``).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import AsyncIterator

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import BaseModel

import dispatch


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[dict[str, object]]:
    # Open your database pool here: once per worker, before its first request.
    yield {"worker_pid": os.getpid()}


app = FastAPI(lifespan=lifespan)


class Item(BaseModel):
    name: str
    price: float


@app.get("/")
async def hello() -> dict[str, object]:
    return {"hello": "world", "pid": os.getpid()}


@app.post("/items", status_code=201)
async def create_item(item: Item) -> dict[str, object]:
    return {"name": item.name, "price_with_tax": round(item.price * 1.2, 2)}


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    try:
        while True:
            await websocket.send_text(f"echo: {await websocket.receive_text()}")
    except WebSocketDisconnect:
        pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:8000")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    # The app object itself: workers are forked, so they have it already.
    dispatch.serve(app, workers=args.workers, bind=args.bind, balance="least-connections")


if __name__ == "__main__":
    main()

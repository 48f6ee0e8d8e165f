"""The web parts alone: interface detection, the loop choice, uvicorn's shape check, and the
ASGI runner on an in-process loop with socketpairs for connections."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi import FastAPI
from flask import Flask
from starlette.applications import Starlette

from dispatch import loops
from dispatch.__main__ import main
from dispatch.config import Config
from dispatch.handlers import AsyncioProtocol, runner_for
from dispatch.interfaces import CannotServe, InterfaceError, interface_of
from dispatch.runners.streams import StreamRunner
from dispatch.runners.threads import ThreadRunner
from dispatch.runners.web import AsgiRunner, WsgiRunner

DEADLINE = 5.0


# ------------------------------------------------------------------ interfaces
async def asgi_function(scope: Any, receive: Any, send: Any) -> None: ...


def asgi_by_names(scope: Any, receive: Any, send: Any) -> Any: ...


class AsgiClass:
    async def __call__(self, scope: Any, receive: Any, send: Any) -> None: ...


def wsgi_function(environ: Any, start_response: Any) -> Any: ...


class DjangoLike:  # django.core.handlers.wsgi.WSGIHandler's shape
    def __call__(self, environ: Any, start_response: Any) -> Any: ...


def plain(conn: socket.socket, addr: Any) -> None: ...


def plain_with_option(conn: socket.socket, addr: Any, verbose: bool = False) -> None: ...


async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None: ...


@pytest.mark.parametrize("handler, expected", [
    (Starlette(), "asgi"),
    (FastAPI(), "asgi"),
    (asgi_function, "asgi"),
    (asgi_by_names, "asgi"),
    (AsgiClass(), "asgi"),
    (Flask(__name__), "wsgi"),
    (wsgi_function, "wsgi"),
    (DjangoLike(), "wsgi"),
    (plain, "handler"),
    (plain_with_option, "handler"),
    (lambda conn, addr: None, "handler"),
    (stream, "handler"),
    (AsyncioProtocol(asyncio.Protocol), "handler"),
])
def test_auto_detection(handler: Callable[..., Any], expected: str) -> None:
    assert interface_of(handler) == expected


async def one_argument(x: Any) -> None: ...


def three_unnamed(a: Any, b: Any, c: Any) -> None: ...


@pytest.mark.parametrize("handler", [lambda *args: None, Starlette, one_argument, three_unnamed, print])
def test_ambiguous_objects_name_the_option_to_pass(handler: Callable[..., Any]) -> None:
    with pytest.raises(InterfaceError, match="--interface asgi, wsgi or handler"):
        interface_of(handler)


def test_an_explicit_interface_wins() -> None:
    assert interface_of(lambda *args: None, "wsgi") == "wsgi"
    assert interface_of(wsgi_function, "handler") == "handler"


def test_each_interface_gets_its_runner() -> None:
    assert runner_for(Starlette()) is AsgiRunner
    assert runner_for(Flask(__name__)) is WsgiRunner
    assert runner_for(plain) is ThreadRunner
    assert runner_for(stream) is StreamRunner
    assert runner_for(lambda *args: None, "asgi") is AsgiRunner


def test_interface_values_are_checked_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="interface must be one of auto, asgi, wsgi, handler"):
        Config(plain, interface="rsgi")
    with pytest.raises(ValueError, match="loop must be one of"):
        Config(plain, loop="trio")
    with pytest.raises(SystemExit) as info:
        main(["tests.web_apps:flask_app", "--http", "zttp"])
    assert info.value.code == 2


# ------------------------------------------------------------------ loops
def test_uvloop_only_for_web_apps_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert loops.wants_uvloop("auto", "asgi") and loops.wants_uvloop("auto", "wsgi")
    assert not loops.wants_uvloop("auto", "handler")  # raw handlers keep asyncio's loop
    assert not loops.wants_uvloop("asyncio", "asgi")
    assert loops.wants_uvloop("uvloop", "handler")
    monkeypatch.setattr(loops.importlib.util, "find_spec", lambda name: None)  # not installed
    assert not loops.wants_uvloop("auto", "asgi")
    with pytest.raises(CannotServe, match="pip install uvloop"):
        loops.wants_uvloop("uvloop", "asgi")


# ------------------------------------------------------------------ uvicorn's shape
def test_a_changed_uvicorn_fails_at_import_saying_what_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from dispatch.web import uvicorn_bridge

    monkeypatch.delattr(H11Protocol, "on_response_complete")
    with pytest.raises(ImportError) as info:
        uvicorn_bridge._check_shape()
    assert "H11Protocol.on_response_complete() is gone" in str(info.value)
    assert uvicorn_bridge.TESTED in str(info.value)


# ------------------------------------------------------------------ the runner, in process
class SlowApp:
    """An ASGI app whose ``/slow`` answers when the test says so."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.requests = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        self.requests += 1
        if scope["path"] == "/slow":
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run_until(loop: asyncio.AbstractEventLoop, condition: Callable[[], Any], timeout: float = DEADLINE) -> None:
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met before the deadline"
        loop.run_until_complete(asyncio.sleep(0.01))


def read_response(loop: asyncio.AbstractEventLoop, client: socket.socket) -> bytes:
    client.setblocking(False)
    data = b""

    def complete() -> bool:
        nonlocal data
        try:
            data += client.recv(65536)
        except BlockingIOError:
            pass
        return data.endswith(b"ok")

    run_until(loop, complete)
    return data


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_drain_says_connection_close_on_responses_in_progress_and_closes_idle_ones(
        loop: asyncio.AbstractEventLoop, parser: str) -> None:
    app = SlowApp()
    done: list[int] = []
    runner = AsgiRunner(loop, app, Config(app, http=parser), 0, lambda: done.append(1))
    runner.limits(100)
    loop.run_until_complete(runner.startup())
    clients = []
    for _ in range(2):
        server, client = socket.socketpair()
        runner.start(server.detach())
        clients.append(client)
    busy, idle = clients
    idle.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    assert b"connection: close" not in read_response(loop, idle).lower()
    busy.sendall(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
    run_until(loop, lambda: app.requests == 2)
    assert runner.active == 2
    runner.drain(30)
    app.release.set()
    response = read_response(loop, busy)  # started before the drain, answered after it
    assert b"connection: close" in response.lower()
    run_until(loop, lambda: len(done) == 2)  # the busy one closed after its response, the idle one after the grace
    assert runner.active == 0
    for client in clients:
        client.setblocking(True)
        client.settimeout(1)
        assert client.recv(100) == b""
        client.close()
    loop.run_until_complete(runner.shutdown())
    runner.close()

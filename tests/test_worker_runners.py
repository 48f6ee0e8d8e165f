"""The handler runners alone: an in-process loop, socketpairs for connections, no worker."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dispatch.config import Config
from dispatch.handlers import AsyncioProtocol, runner_for
from dispatch.runners import Runner
from dispatch.runners.protocols import ProtocolRunner
from dispatch.runners.streams import StreamRunner
from dispatch.runners.threads import IDLE_POOL, ThreadRunner

DEADLINE = 5.0


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run_until(loop: asyncio.AbstractEventLoop, condition: Callable[[], bool], timeout: float = DEADLINE) -> None:
    """Run ``loop`` until ``condition()`` holds; fail after ``timeout`` seconds."""
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "condition not met before the deadline"
        loop.run_until_complete(asyncio.sleep(0.01))


class Harness:
    """A runner on ``loop`` that counts its completions."""

    def __init__(self, loop: asyncio.AbstractEventLoop, handler: Callable[..., Any], **options: Any) -> None:
        self.loop = loop
        self.done = 0
        self.runner: Runner = runner_for(handler)(loop, handler, Config(handler, **options), 0, self._done)
        self.capacity, self.max_batch = self.runner.limits(2000)
        self.clients: list[socket.socket] = []

    def _done(self) -> None:
        self.done += 1

    def connect(self, first_bytes: bytes = b"") -> socket.socket:
        """Start one connection on the runner; return the client's end."""
        server, client = socket.socketpair()
        if first_bytes:
            client.sendall(first_bytes)
        self.runner.start(server.detach())
        self.clients.append(client)
        return client

    def close(self) -> None:
        self.runner.close()
        for client in self.clients:
            client.close()


@pytest.fixture
def harness(loop: asyncio.AbstractEventLoop) -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(handler: Callable[..., Any], **options: Any) -> Harness:
        made.append(Harness(loop, handler, **options))
        return made[-1]

    yield make
    for h in made:
        h.close()


def peek(client: socket.socket, size: int) -> bytes:
    """What the server sent so far, without waiting and without consuming it."""
    try:
        return client.recv(size, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


def closed_by_server(client: socket.socket) -> bool:
    client.setblocking(False)
    try:
        return client.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionResetError:
        return True


# ------------------------------------------------------------------ which runner
def test_each_kind_of_handler_gets_its_runner() -> None:
    def plain(conn: socket.socket, addr: Any) -> None: ...

    async def coroutine(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None: ...

    class AsyncCallable:
        async def __call__(self, reader: Any, writer: Any) -> None: ...

    assert runner_for(plain) is ThreadRunner
    assert runner_for(coroutine) is StreamRunner
    assert runner_for(AsyncCallable()) is StreamRunner
    assert runner_for(AsyncioProtocol(asyncio.Protocol)) is ProtocolRunner


# ------------------------------------------------------------- plain handlers
def test_plain_capacity_is_threads_plus_an_idle_pool_within_the_descriptor_table(
    loop: asyncio.AbstractEventLoop,
) -> None:
    def handler(conn: socket.socket, addr: Any) -> None: ...

    def limits(headroom: int, **options: Any) -> tuple[int, int]:
        runner = ThreadRunner(loop, handler, Config(handler, **options), 0, lambda: None)
        try:
            return runner.limits(headroom)
        finally:
            runner.close()

    assert limits(10, threads=4) == (10, 4)  # 4 threads + 6 waiting
    assert limits(5000, threads=4) == (4 + IDLE_POOL, 4)
    assert limits(2, threads=4) == (2, 4)  # never more than the table holds
    assert limits(5000, threads=4, server_speaks_first=True) == (4, 4)  # no idle pool
    assert limits(5000, threads=4, client_timeout=0) == (4, 4)
    assert limits(5000, threads=300) == (300 + IDLE_POOL, 253)  # SCM_MAX_FD per message


def test_a_silent_connection_waits_on_the_loop_and_is_closed_after_client_timeout(
    harness: Callable[..., Harness], loop: asyncio.AbstractEventLoop
) -> None:
    calls: list[Any] = []
    h = harness(lambda conn, addr: calls.append(addr), threads=1, client_timeout=0.2)
    client = h.connect()
    assert h.runner.active == 1 and h.runner.room() == 1  # no thread taken
    run_until(loop, lambda: h.done == 1)
    assert calls == []  # the handler never saw it
    assert h.runner.active == 0 and closed_by_server(client)


def test_first_bytes_move_a_waiting_connection_to_a_thread(
    harness: Callable[..., Harness], loop: asyncio.AbstractEventLoop
) -> None:
    seen: list[tuple[str, float | None, bytes]] = []

    def handler(conn: socket.socket, addr: Any) -> None:
        seen.append((threading.current_thread().name, conn.gettimeout(), conn.recv(10)))
        conn.sendall(b"bye")

    h = harness(handler, threads=1, client_timeout=3)
    client = h.connect()
    loop.run_until_complete(asyncio.sleep(0.05))
    assert seen == [] and h.done == 0
    client.sendall(b"hi")
    run_until(loop, lambda: h.done == 1)
    name, timeout, data = seen[0]
    assert name.startswith("dispatch-handler") and timeout == 3 and data == b"hi"
    assert client.recv(10) == b"bye"


def test_connections_with_bytes_queue_for_a_busy_thread(
    harness: Callable[..., Harness], loop: asyncio.AbstractEventLoop
) -> None:
    release = threading.Event()
    order: list[bytes] = []

    def handler(conn: socket.socket, addr: Any) -> None:
        order.append(conn.recv(10))
        release.wait(DEADLINE)

    h = harness(handler, threads=1, client_timeout=3)
    waiting = h.connect()  # silent: waits on the loop
    h.connect(b"first")  # takes the only thread
    run_until(loop, lambda: order == [b"first"])
    assert h.runner.room() <= 0  # the thread is busy: the source must stop
    waiting.sendall(b"second")  # bytes, but no thread: queued, not run
    loop.run_until_complete(asyncio.sleep(0.05))
    assert order == [b"first"] and h.runner.active == 2
    release.set()
    run_until(loop, lambda: h.done == 2)
    assert order == [b"first", b"second"] and h.runner.active == 0 and h.runner.room() == 1


@pytest.mark.parametrize("options", [{"server_speaks_first": True}, {"client_timeout": 0}])
def test_without_the_first_bytes_wait_a_silent_connection_gets_a_thread_at_once(
    harness: Callable[..., Harness], loop: asyncio.AbstractEventLoop, options: dict[str, Any]
) -> None:
    h = harness(lambda conn, addr: conn.sendall(b"220 hello\r\n"), threads=1, **options)
    client = h.connect()
    run_until(loop, lambda: h.done == 1)
    assert client.recv(20) == b"220 hello\r\n"


def test_a_client_that_stalls_mid_request_frees_its_thread_after_client_timeout(
    harness: Callable[..., Harness], loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(conn: socket.socket, addr: Any) -> None:
        while conn.recv(10):  # the client never finishes
            pass

    caplog.set_level(logging.DEBUG, "dispatch.worker")
    h = harness(handler, threads=1, client_timeout=0.2)
    client = h.connect(b"GET / HT")
    run_until(loop, lambda: h.done == 1)
    assert closed_by_server(client)
    ended = [r for r in caplog.records if "ended" in r.getMessage()]
    assert ended and ended[0].levelno == logging.DEBUG


def test_a_handler_exception_is_logged_with_its_traceback_and_a_reset_is_a_debug_line(
    harness: Callable[..., Harness], loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    def handler(conn: socket.socket, addr: Any) -> None:
        if conn.recv(10) == b"bug":
            raise ValueError("handler bug")
        raise ConnectionResetError("peer went away")

    caplog.set_level(logging.DEBUG, "dispatch.worker")
    h = harness(handler, threads=2)
    buggy, reset = h.connect(b"bug"), h.connect(b"reset")
    run_until(loop, lambda: h.done == 2)
    assert closed_by_server(buggy) and closed_by_server(reset)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info and "handler raised" in errors[0].getMessage()
    assert any(r.levelno == logging.DEBUG and "peer went away" in r.getMessage() for r in caplog.records)


# ------------------------------------------------------------ coroutine handlers
def test_a_coroutine_handler_runs_on_the_loop_and_its_writer_is_closed(
    harness: Callable[..., Harness], loop: asyncio.AbstractEventLoop
) -> None:
    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(await reader.read(10))
        await writer.drain()

    h = harness(echo, max_connections=3)
    assert (h.capacity, h.max_batch) == (3, 3)
    clients = [h.connect(b"one"), h.connect(b"two")]
    assert h.runner.active == 2 and h.runner.room() == 1  # counted at once
    run_until(loop, lambda: h.done == 2)
    assert [c.recv(10) for c in clients] == [b"one", b"two"]
    assert all(closed_by_server(c) for c in clients) and h.runner.room() == 3


def test_a_coroutine_handler_exception_ends_only_its_connection(
    harness: Callable[..., Harness], loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if await reader.read(10) == b"bug":
            raise ValueError("handler bug")
        writer.write(b"ok")

    h = harness(handler)
    buggy, fine = h.connect(b"bug"), h.connect(b"fine")
    run_until(loop, lambda: h.done == 2)
    assert fine.recv(10) == b"ok" and closed_by_server(buggy)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].exc_info


# ------------------------------------------------------------- protocol handlers
class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.transport.write(data)
        if data == b"bye":
            self.transport.close()


def test_a_protocol_connection_is_done_once_when_its_transport_closes(
    harness: Callable[..., Harness], loop: asyncio.AbstractEventLoop
) -> None:
    h = harness(AsyncioProtocol(Echo))
    client = h.connect(b"hello")
    run_until(loop, lambda: peek(client, 5) == b"hello")
    assert h.done == 0 and h.runner.active == 1  # the protocol still owns it
    client.sendall(b"bye")
    run_until(loop, lambda: h.done == 1)
    loop.run_until_complete(asyncio.sleep(0.05))
    assert h.done == 1 and h.runner.active == 0


def test_a_protocol_factory_that_raises_is_logged_and_done(
    harness: Callable[..., Harness], loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> asyncio.Protocol:
        raise RuntimeError("no protocol today")

    h = harness(AsyncioProtocol(broken))
    h.connect()
    run_until(loop, lambda: h.done == 1)
    assert h.runner.active == 0
    assert any(r.levelno == logging.ERROR and "could not start the protocol" in r.getMessage() for r in caplog.records)

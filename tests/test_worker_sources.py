"""Where a worker's connections come from, alone: a real channel or listener, a fake runner."""

from __future__ import annotations

import array
import asyncio
import logging
import os
import resource
import socket
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from dispatch import _fdpass, protocol
from dispatch.sources import ChannelSource, ListenerSource

DEADLINE = 5.0


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


def run_until(loop: asyncio.AbstractEventLoop, condition: Callable[[], bool]) -> None:
    deadline = loop.time() + DEADLINE
    while not condition():
        assert loop.time() < deadline, "condition not met before the deadline"
        loop.run_until_complete(asyncio.sleep(0.01))


class FakeRunner:
    """Takes up to ``capacity`` connections and keeps them until ``finish``."""

    def __init__(self, capacity: int = 100) -> None:
        self.active = 0
        self.capacity = capacity
        self.fds: list[int] = []

    def limits(self, headroom: int) -> tuple[int, int]:
        return self.capacity, 1

    def start(self, fd: int) -> None:
        self.active += 1
        self.fds.append(fd)

    def room(self) -> int:
        return self.capacity - self.active

    def close(self) -> None:
        for fd in self.fds:
            os.close(fd)


def lowest_free_fd() -> int:
    fd = os.dup(0)
    os.close(fd)
    return fd


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# ------------------------------------------------------------------- the channel
class Channel:
    """A control channel with a ChannelSource on the worker's end."""

    def __init__(self, loop: asyncio.AbstractEventLoop, runner: FakeRunner, pause_when_full: bool = True,
                 one_per_pass_below: int = 0) -> None:
        self.primary, self.worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.worker.setblocking(False)
        self.runner = runner
        self.lost: list[int] = []
        self.drains: list[str] = []
        self.source = ChannelSource(loop, self.worker, runner, worker_id=0, lost=self.lost.append,
                                    drain=self._drain, pause_when_full=pause_when_full,
                                    one_per_pass_below=one_per_pass_below)
        self.clients: list[socket.socket] = []

    def _drain(self, why: str) -> None:
        self.drains.append(why)
        self.source.close()  # what the worker does

    def send_connections(self, count: int, announced: int | None = None) -> None:
        """One Fds message with ``count`` descriptors, claiming ``announced`` of them."""
        servers = []
        for _ in range(count):
            server, client = socket.socketpair()
            servers.append(server)
            self.clients.append(client)
        fds = array.array("i", [s.fileno() for s in servers])
        data = protocol.encode_fds(count if announced is None else announced)
        assert _fdpass.send_fds(self.primary.fileno(), fds, data=data)
        for server in servers:
            server.close()

    def close(self) -> None:
        self.runner.close()
        for sock in (self.primary, self.worker, *self.clients):
            sock.close()


@pytest.fixture
def channel(loop: asyncio.AbstractEventLoop) -> Iterator[Callable[..., Channel]]:
    made: list[Channel] = []

    def make(runner: FakeRunner | None = None, **options: Any) -> Channel:
        made.append(Channel(loop, runner or FakeRunner(), **options))
        return made[-1]

    yield make
    for c in made:
        c.close()


def test_passed_descriptors_go_to_the_runner(channel: Callable[..., Channel], loop: asyncio.AbstractEventLoop) -> None:
    ch = channel()
    ch.source.resume()
    ch.send_connections(3)
    ch.send_connections(1)
    run_until(loop, lambda: ch.runner.active == 4)
    assert ch.lost == [] and not ch.source.paused


def test_a_full_runner_leaves_the_rest_unread_in_the_channel(
    channel: Callable[..., Channel], loop: asyncio.AbstractEventLoop
) -> None:
    ch = channel(FakeRunner(capacity=1))
    ch.source.resume()
    ch.send_connections(1)
    ch.send_connections(1)
    run_until(loop, lambda: ch.source.paused)
    assert ch.runner.active == 1
    # Still in the socket, where the primary could take it back.
    got = _fdpass.recv_fds(ch.worker.fileno(), 64)
    assert got is not None and protocol.decode(got[0]) == protocol.Fds(1) and len(got[1]) == 1
    os.close(got[1][0])


def test_a_runner_that_filled_up_between_messages_leaves_the_next_one_unread(
    channel: Callable[..., Channel], loop: asyncio.AbstractEventLoop
) -> None:
    ch = channel(FakeRunner(capacity=1))
    ch.source.resume()
    # Its only place was taken after the last read (a plain handler's thread started on a
    # connection whose bytes came later): a connection read now would wait behind it.
    ch.runner.active = 1
    ch.send_connections(1)
    run_until(loop, lambda: ch.source.paused)
    assert ch.runner.fds == []
    got = _fdpass.recv_fds(ch.worker.fileno(), 64)  # still there, for the primary to move
    assert got is not None and protocol.decode(got[0]) == protocol.Fds(1) and len(got[1]) == 1
    os.close(got[1][0])


def test_in_the_kernel_modes_the_channel_is_read_whatever_the_room(
    channel: Callable[..., Channel], loop: asyncio.AbstractEventLoop
) -> None:
    # There the channel carries requests only: a full runner must not leave a Drain unread.
    ch = channel(FakeRunner(capacity=1), pause_when_full=False)
    ch.source.resume()
    ch.send_connections(1)
    ch.primary.send(protocol.encode(protocol.Drain()))
    run_until(loop, lambda: ch.drains == ["asked by the primary"])
    assert ch.runner.active == 1


def test_fewer_descriptors_than_announced_come_back_as_credits(
    channel: Callable[..., Channel], loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    ch = channel()
    ch.source.resume()
    ch.send_connections(1, announced=3)
    run_until(loop, lambda: ch.lost == [2])
    assert ch.runner.active == 1 and ch.source.dropped == 2
    assert any("2 descriptors were dropped in transit" in r.getMessage() for r in caplog.records)


def test_descriptors_truncated_by_a_full_table_are_closed_and_reported(
    channel: Callable[..., Channel], caplog: pytest.LogCaptureFixture
) -> None:
    # MSG_CTRUNC for real: the kernel can install one descriptor of three, the
    # one that arrived is closed (never leaked), and all three credits come back.
    ch = channel()
    ch.send_connections(3)
    before = open_fds()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd() + 1, hard))
    try:
        ch.source._on_readable()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert ch.lost == [3] and ch.runner.active == 0 and ch.source.dropped == 3
    assert open_fds() == before
    assert any(r.levelno == logging.ERROR and "dropped in transit" in r.getMessage() for r in caplog.records)


def test_a_bad_message_is_logged_its_descriptors_closed_and_reading_goes_on(
    channel: Callable[..., Channel], loop: asyncio.AbstractEventLoop, caplog: pytest.LogCaptureFixture
) -> None:
    ch = channel()
    stray, client = socket.socketpair()
    ch.clients += [stray, client]
    fds = array.array("i", [stray.fileno()])
    assert _fdpass.send_fds(ch.primary.fileno(), fds, data=b"\x63\x01\x00\x01")  # unknown version
    ch.send_connections(1)
    before = open_fds()
    ch.source.resume()
    run_until(loop, lambda: ch.runner.active == 1)
    assert open_fds() == before + 1  # the good one only
    assert any("bad message from the primary" in r.getMessage() for r in caplog.records)


def test_drain_and_eof_ask_the_worker_to_drain(channel: Callable[..., Channel], loop: asyncio.AbstractEventLoop) -> None:
    asked, closed = channel(), channel()
    for ch in (asked, closed):
        ch.source.resume()
    asked.primary.send(protocol.encode(protocol.Drain()))
    closed.primary.shutdown(socket.SHUT_RDWR)
    run_until(loop, lambda: bool(asked.drains and closed.drains))
    loop.run_until_complete(asyncio.sleep(0.05))
    assert asked.drains == ["asked by the primary"] and asked.source.closed
    assert closed.drains == ["the primary closed the channel"] and closed.source.closed


def test_a_closed_channel_source_never_resumes(channel: Callable[..., Channel], loop: asyncio.AbstractEventLoop) -> None:
    ch = channel()
    ch.source.resume()
    ch.source.close()
    ch.source.resume()
    ch.send_connections(1)
    loop.run_until_complete(asyncio.sleep(0.05))
    assert ch.source.paused and ch.runner.active == 0


# ----------------------------------------------------------------- the listeners
@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.create_server(("127.0.0.1", 0))
    yield sock
    sock.close()


def listener_source(loop: asyncio.AbstractEventLoop, listeners: list[socket.socket], runner: FakeRunner,
                    errors: list[str] | None = None, reuseport: bool = False) -> ListenerSource:
    def log_error(kind: str, message: str, *args: Any, exc_info: bool = False) -> None:
        if errors is not None:
            errors.append(kind)

    return ListenerSource(loop, listeners, runner, worker_id=0, reuseport=reuseport, backlog=16,
                          log_error=log_error)


def test_a_listener_accepts_only_what_the_runner_has_room_for(
    loop: asyncio.AbstractEventLoop, listener: socket.socket
) -> None:
    runner = FakeRunner(capacity=2)
    source = listener_source(loop, [listener], runner)
    clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
    try:
        source.resume()
        run_until(loop, lambda: source.paused)
        assert runner.active == 2
        os.close(runner.fds.pop())
        runner.active -= 1
        source.resume()  # what the worker does when a connection finishes
        run_until(loop, lambda: runner.active == 2 and source.paused)
    finally:
        runner.close()
        for client in clients:
            client.close()


def test_accept_errors_back_off_instead_of_spinning(
    loop: asyncio.AbstractEventLoop, listener: socket.socket
) -> None:
    runner, errors = FakeRunner(), list[str]()
    source = listener_source(loop, [listener], runner, errors)
    client = socket.create_connection(listener.getsockname())
    try:
        source.resume()
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (lowest_free_fd(), hard))  # EMFILE
        try:
            source._on_readable(listener)
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert errors == ["accept"] and source.paused and runner.active == 0
        run_until(loop, lambda: runner.active == 1)  # resumed after the backoff
        assert errors == ["accept"]
    finally:
        runner.close()
        client.close()


def test_a_closed_listener_source_closes_its_listeners_and_never_resumes(
    loop: asyncio.AbstractEventLoop, listener: socket.socket
) -> None:
    source = listener_source(loop, [listener], FakeRunner())
    source.resume()
    source.close()
    source.resume()
    assert source.paused and listener.fileno() == -1


def test_reuseport_gives_the_worker_its_own_listener_on_the_reserved_address(
    loop: asyncio.AbstractEventLoop,
) -> None:
    reserved = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    reserved.bind(("127.0.0.1", 0))  # bound, not listening: what the primary holds
    address = reserved.getsockname()
    runner = FakeRunner()
    source = listener_source(loop, [reserved], runner, reuseport=True)
    (own,) = source.listeners
    try:
        assert own is not reserved and reserved.fileno() == -1 and own.getsockname() == address
        source.resume()
        with socket.create_connection(address):
            run_until(loop, lambda: runner.active == 1)
    finally:
        runner.close()
        source.close()



def test_what_queued_while_the_loop_ran_is_taken_in_one_pass(
    channel: Callable[..., Channel], loop: asyncio.AbstractEventLoop
) -> None:
    ch = channel()
    ch.source.resume()
    for _ in range(3):
        ch.send_connections(1)
    ch.source._on_readable()  # one wakeup of the loop
    assert ch.runner.active == 3
    assert _fdpass.recv_fds(ch.worker.fileno(), 64) is None


def test_one_pass_takes_at_most_a_batch_and_only_what_has_room(
    channel: Callable[..., Channel], loop: asyncio.AbstractEventLoop
) -> None:
    from dispatch.sources import BATCH

    ch = channel()
    ch.source.resume()
    for _ in range(BATCH + 2):
        ch.send_connections(1)
    ch.source._on_readable()
    assert ch.runner.active == BATCH  # the other two at the next pass
    run_until(loop, lambda: ch.runner.active == BATCH + 2)

    small = channel(FakeRunner(capacity=2))
    small.source.resume()
    for _ in range(3):
        small.send_connections(1)
    small.source._on_readable()
    assert small.runner.active == 2 and small.source.paused
    got = _fdpass.recv_fds(small.worker.fileno(), 64)  # the third waits where the primary can move it
    assert got is not None and len(got[1]) == 1
    os.close(got[1][0])


def test_below_one_per_message_a_worker_takes_one_message_per_pass(
    channel: Callable[..., Channel], loop: asyncio.AbstractEventLoop
) -> None:
    ch = channel(one_per_pass_below=2)
    ch.source.resume()
    for _ in range(3):
        ch.send_connections(1)
    ch.source._on_readable()
    assert ch.runner.active == 1  # held fewer than 2: one message, the rest stay movable
    ch.source._on_readable()
    assert ch.runner.active == 2
    ch.source._on_readable()
    assert ch.runner.active == 3

"""The worker's loop in process: a real channel (socketpair), no fork."""

from __future__ import annotations

import array
import asyncio
import errno
import resource
import socket
import threading
from typing import Any

from dispatch import _fdpass, protocol
from dispatch.config import Config
from dispatch.worker import REPORT_BATCH, Worker


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    writer.close()


def run_worker_for(worker: Worker, seconds: float) -> None:
    async def run() -> None:
        main = asyncio.ensure_future(worker._main())
        await asyncio.sleep(seconds)
        worker._finish(0)
        await main

    asyncio.run(run())


def messages(channel: socket.socket) -> list[protocol.Message]:
    found = []
    while (got := _fdpass.recv_fds(channel.fileno(), 64)) is not None:
        found.append(protocol.decode(got[0]))
    return found


def test_heartbeats_survive_a_report_that_fails() -> None:
    # EMFILE opening /proc/self/statm once ended the heartbeat chain for good, and the
    # primary then killed a healthy worker as hung.
    class Broken:
        def memory_info(self) -> None:
            raise OSError(errno.EMFILE, "Too many open files")

    primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    primary_end.setblocking(False)
    with primary_end, worker_end:
        worker = Worker(Config(echo, timeout=0.2), 0, worker_end, [], echo)  # beats every 0.05 s
        worker._process = Broken()  # type: ignore[assignment]
        run_worker_for(worker, 0.4)
        beats = [m for m in messages(primary_end) if isinstance(m, protocol.Heartbeat)]
        assert len(beats) >= 4


def test_capacity_fits_in_the_descriptor_table() -> None:
    # The primary never sends more than the advertised capacity, so the kernel never
    # has to drop descriptors in transit because the worker's table is full.
    primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    primary_end.setblocking(False)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with primary_end, worker_end:
            worker = Worker(Config(echo), 0, worker_end, [], echo)
            run_worker_for(worker, 0.05)
            ready = next(m for m in messages(primary_end) if isinstance(m, protocol.Ready))
            assert 0 < ready.capacity <= 256 - 64
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_completions_in_one_loop_pass_are_reported_in_one_done() -> None:
    # least-connections weighs loads: every pass that finished connections reports them.
    primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    primary_end.setblocking(False)

    async def run() -> None:
        worker = Worker(Config(echo, balance="least-connections"), 0, worker_end, [], echo)
        main = asyncio.ensure_future(worker._main())
        await asyncio.sleep(0.05)
        messages(primary_end)  # Ready, first heartbeat
        worker.runner.active += 3  # as if three connections were in hand...
        for _ in range(3):
            worker._completed()  # ...and all finished in this pass
        await asyncio.sleep(0.05)
        assert [m for m in messages(primary_end) if isinstance(m, protocol.Done)] == [protocol.Done(3)]
        assert worker.total == 3 and worker.unreported_done == 0
        worker._finish(0)
        await main

    with primary_end, worker_end:
        asyncio.run(run())


def test_without_loads_completions_are_reported_in_batches_or_with_the_heartbeat() -> None:
    # round-robin does not weigh loads: fewer Done messages, credits back within a heartbeat.
    primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    primary_end.setblocking(False)

    async def run() -> None:
        worker = Worker(Config(echo, timeout=2.0), 0, worker_end, [], echo)  # beats every 0.5 s
        main = asyncio.ensure_future(worker._main())
        await asyncio.sleep(0.05)
        messages(primary_end)  # Ready, first heartbeat
        every = worker._report_every
        assert every == REPORT_BATCH
        worker.runner.active += every + 3
        for _ in range(every - 1):
            worker._completed()
        await asyncio.sleep(0.05)
        assert not [m for m in messages(primary_end) if isinstance(m, protocol.Done)]
        for _ in range(4):
            worker._completed()
        await asyncio.sleep(0.05)
        assert [m for m in messages(primary_end) if isinstance(m, protocol.Done)] == [protocol.Done(every + 3)]
        worker.runner.active += 2
        worker._completed()
        worker._completed()
        await asyncio.sleep(0.6)  # the next heartbeat carries them
        assert [m for m in messages(primary_end) if isinstance(m, protocol.Done)] == [protocol.Done(2)]
        worker._finish(0)
        await main

    with primary_end, worker_end:
        asyncio.run(run())


def send_connections(primary_end: socket.socket, count: int, announced: int) -> list[socket.socket]:
    """Pass ``count`` connections in one Fds message claiming ``announced``; return the clients."""
    pairs = [socket.socketpair() for _ in range(count)]
    fds = array.array("i", [server.fileno() for server, _ in pairs])
    assert _fdpass.send_fds(primary_end.fileno(), fds, data=protocol.encode_fds(announced))
    for server, _ in pairs:
        server.close()
    return [client for _, client in pairs]


def test_descriptors_lost_in_transit_come_back_as_done() -> None:
    # The primary counts every announced descriptor as outstanding: those that never
    # arrived must be reported too, or the worker's credits shrink for good.
    primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    primary_end.setblocking(False)
    with primary_end, worker_end:
        worker = Worker(Config(echo, timeout=0.4), 0, worker_end, [], echo)
        clients = send_connections(primary_end, 1, announced=3)
        run_worker_for(worker, 0.3)
        done = sum(m.count for m in messages(primary_end) if isinstance(m, protocol.Done))
        assert done == 3 and worker.total == 1
        for client in clients:
            client.close()


def test_a_drained_worker_finishes_its_connections_reports_them_and_exits_0() -> None:
    release = threading.Event()

    def slow(conn: socket.socket, addr: Any) -> None:
        release.wait(5)

    primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    primary_end.setblocking(False)

    async def run() -> int:
        worker = Worker(Config(slow, threads=2), 0, worker_end, [], slow)
        main = asyncio.ensure_future(worker._main())
        # One thread stays free, so the worker reads on (a full one leaves the Drain
        # queued behind connections it has not read yet).
        clients = send_connections(primary_end, 1, announced=1)
        clients[0].sendall(b"x")
        primary_end.send(protocol.encode(protocol.Drain()))
        await asyncio.sleep(0.1)
        assert worker.draining and not main.done() and worker.active == 1
        release.set()
        code = await asyncio.wait_for(main, 5)
        for client in clients:
            client.close()
        return code

    with primary_end, worker_end:
        assert asyncio.run(run()) == 0
        found = messages(primary_end)
        assert isinstance(found[0], protocol.Ready) and found[0].max_batch == 2
        assert sum(m.count for m in found if isinstance(m, protocol.Done)) == 1


def test_in_a_kernel_mode_the_worker_accepts_itself_and_reports_no_done() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    primary_end.setblocking(False)

    async def run() -> None:
        config = Config(echo, balance="shared", timeout=0.2)
        worker = Worker(config, 0, worker_end, [listener], echo)
        main = asyncio.ensure_future(worker._main())
        loop = asyncio.get_running_loop()
        for _ in range(2):
            with socket.create_connection(listener.getsockname()) as client:
                client.setblocking(False)
                assert await loop.sock_recv(client, 1) == b""  # echo closes it
        await asyncio.sleep(0.1)
        primary_end.send(protocol.encode(protocol.Drain()))
        assert await asyncio.wait_for(main, 5) == 0
        assert listener.fileno() == -1  # closed by the drain

    with primary_end, worker_end:
        asyncio.run(run())
        found = messages(primary_end)
        assert not any(isinstance(m, protocol.Done) for m in found)
        assert max(m.total for m in found if isinstance(m, protocol.Heartbeat)) == 2

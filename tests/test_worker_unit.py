"""The worker's loop in process: a real channel (socketpair), no fork."""

from __future__ import annotations

import asyncio
import errno
import resource
import socket

from dispatch import _fdpass, protocol
from dispatch.config import Config
from dispatch.worker import Worker


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

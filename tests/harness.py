"""The in-process harness of the dispatch path: a ``Server`` that is not started, an
epoll, fake workers whose channels are real ``SOCK_SEQPACKET`` socketpairs.

The ``harness`` fixture (tests/conftest.py) makes them; ``_kill`` is recorded
instead of sent.
"""

from __future__ import annotations

import array
import logging
import os
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from dispatch import Server, _fdpass, protocol, supervisor
from dispatch import dispatcher as dispatcher_module
from dispatch import fleet as fleet_module
from dispatch.balance import make_policy
from dispatch.dispatcher import Dispatcher
from dispatch.fleet import Fleet
from dispatch.logs import FailureLog
from dispatch.processes import WorkerHandle
from dispatch.reactor import IN, Reactor


def handler(conn: socket.socket, addr: Any) -> None:  # never called: nothing is forked
    pass


class Harness:
    def __init__(self, balance: Any = None, **options: Any) -> None:
        options.setdefault("workers", 2)
        self.server = Server(handler, balance=balance or "round-robin", **options)
        self.killed: list[int] = []
        self.reactor = Reactor()
        self.server._reactor = self.reactor
        balance = balance or "round-robin"
        policy = make_policy(balance) if isinstance(balance, str) else balance
        self.dispatcher = Dispatcher(policy, self.server.workers,
                                     self.reactor, self.server.counters, FailureLog(logging.getLogger("dispatch")), 16, 16,
                                     self.server.config.skip_busy, self.server.config.reclaim_after,
                                     self.server.config.one_per_message_below)
        self.dispatcher.budget = 10_000
        self.server._dispatcher = self.dispatcher
        self.fleet = Fleet(self.server.config, self.server.supervisor, self.reactor, self.server.workers,
                           self.server.counters, self.server._apply, list, [], lambda: None,
                           lambda *args: None)
        self.fleet.dispatcher = self.dispatcher
        self.server._fleet = self.fleet
        self.ends: dict[int, socket.socket] = {}

    def worker(self, worker_id: int, capacity: int = 0, max_batch: int = 253) -> WorkerHandle:
        primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        primary_end.setblocking(False)
        worker_end.setblocking(False)
        pid = 4_000_000 + worker_id
        handle = WorkerHandle(worker_id, pid, -1, primary_end, worker_end, 0)
        handle.life.move(supervisor.READY)
        handle.set_capacity(capacity, max_batch)
        self.server.workers[pid] = handle
        self.reactor.register(handle.fd, IN, lambda events, w=handle: self.fleet._on_channel(w, events))
        self.dispatcher.rebuild_targets()
        self.ends[pid] = worker_end
        return handle

    def connections(self, count: int) -> array.array:
        """``count`` real descriptors to pass (the primary closes what it sends)."""
        return array.array("i", [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(count)])

    def dispatch(self, count: int) -> int:
        """Pass ``count`` new connections; returns how many are left over (and closes them)."""
        buf = self.connections(count)
        start, left = self.dispatcher.dispatch(buf, 0, count)
        _fdpass.close_fds(buf, start, left)
        return left

    def received(self, worker: WorkerHandle) -> int:
        """Descriptors waiting unread in ``worker``'s channel (read and closed here)."""
        total = 0
        while (got := _fdpass.recv_fds(worker.worker_end.fileno(), 64)) is not None:
            for fd in got[1]:
                os.close(fd)
            total += len(got[1])
        return total

    def from_worker(self, worker: WorkerHandle, message: protocol.Message | bytes) -> None:
        data = message if isinstance(message, bytes) else protocol.encode(message)
        self.ends[worker.pid].send(data)

    def close(self) -> None:
        for worker in self.server.workers.values():
            self.received(worker)
            worker.channel.close()
            worker.worker_end.close()
        self.dispatcher.close_pending()
        self.reactor.close()


def make_harness(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Yields ``make(**options)``; closes every harness it made afterwards."""
    made: list[Harness] = []
    killed: list[int] = []
    monkeypatch.setattr(dispatcher_module, "kill", killed.append)
    monkeypatch.setattr(fleet_module, "kill", killed.append)

    def make(**options: Any) -> Harness:
        made.append(Harness(**options))
        made[-1].killed = killed  # type: ignore[attr-defined]
        return made[-1]

    yield make
    for h in made:
        h.close()



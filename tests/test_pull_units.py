"""The pull dispatcher without processes: a failed send, and what a stop takes from the backlog."""

from __future__ import annotations

import array
import errno
import logging
import os
import socket
from collections.abc import Iterator

import pytest

from dispatch import _fdpass, supervisor
from dispatch.balance import Pull
from dispatch.counters import Counters
from dispatch.logs import FailureLog
from dispatch.processes import WorkerHandle
from dispatch.pull import PullDispatcher
from dispatch.reactor import Reactor


@pytest.fixture
def pull() -> Iterator[PullDispatcher]:
    reactor = Reactor()
    workers: dict[int, WorkerHandle] = {}
    dispatcher = PullDispatcher(Pull(), workers, reactor, Counters(), FailureLog(logging.getLogger("dispatch")),
                                64, 2048)
    dispatcher.budget = 10_000
    primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    worker = WorkerHandle(0, 4_000_000, -1, primary_end, worker_end, 0)
    worker.life.move(supervisor.READY)
    workers[worker.pid] = worker
    dispatcher.rebuild_targets()
    yield dispatcher
    dispatcher.release()
    worker.channel.close()
    worker.worker_end.close()
    reactor.close()


def _connections(count: int) -> array.array[int]:
    return array.array("i", [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(count)])


def test_a_failed_send_pauses_the_queue_until_the_next_tick(pull: PullDispatcher) -> None:
    # ENOBUFS (memory pressure) is not a full queue: no EPOLLOUT will come for it.
    assert pull._passer is not None
    pull._passer.fail_sends(1, errno.ENOBUFS)
    buf = _connections(1)
    start, left = pull.dispatch(buf, 0, 1)
    pull.pending.extend(buf[start : start + left])
    assert (left, pull.targets) == (1, [])
    pull.tick(0.0, 0)
    assert pull.targets == [pull.target] and not pull.pending
    assert pull.in_flight() == 1


def test_a_stop_takes_from_the_backlog_no_more_than_the_queue_holds(pull: PullDispatcher) -> None:
    # What it cannot queue stays in the backlog (a new primary shares it after an upgrade),
    # instead of being accepted only to be closed.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(2048)
    clients = [socket.create_connection(listener.getsockname(), timeout=5) for _ in range(600)]
    try:
        room = pull.queue.room()
        pull.add_listener(listener)
        pull.stop_accepting()
        taken = len(pull.pending)
        assert 0 < taken <= room < 600
        pull.dispatch_pending()
        assert not pull.pending  # everything it took fits in the queue
        rest = array.array("i", bytes(4))
        assert _fdpass.accept_batch(listener.fileno(), rest, 1) == 1  # the rest waits there
        os.close(rest[0])
    finally:
        for client in clients:
            client.close()
        listener.close()

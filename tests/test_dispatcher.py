"""The primary's dispatch path, in process: real socketpairs, real descriptors, no fork.

Each test builds a ``Server`` that is not started, gives it an epoll object and
fake workers whose channels are ``SOCK_SEQPACKET`` socketpairs, and drives the
methods the event loop would call. ``_kill`` is recorded instead of sent.
"""

from __future__ import annotations

import errno
import os
import select
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import pytest

from dispatch import Server, Sticky, _fdpass, protocol, supervisor
from dispatch import dispatcher as dispatcher_module
from dispatch.control import Scale
from dispatch.health.views import worker_connections_total
from dispatch.processes import WorkerHandle
from dispatch.reactor import IN
from tests.harness import handler


def test_a_worker_never_gets_more_than_its_credits(harness: Any) -> None:
    h = harness()
    worker = h.worker(0, capacity=2)
    assert h.dispatch(5) == 3
    assert worker.outstanding == 2 and h.received(worker) == 2
    assert h.dispatcher.targets == [] and not h.dispatcher.accepting
    buf = h.connections(3)
    h.dispatcher.pending.extend(buf)
    h.dispatcher.on_done(worker, 1)  # a credit comes back: one waiting connection goes
    assert worker.outstanding == 2 and len(h.dispatcher.pending) == 2
    assert h.received(worker) == 1


def test_descriptors_in_flight_stay_within_the_budget(harness: Any) -> None:
    h = harness()
    a, b = h.worker(0), h.worker(1)
    h.dispatcher.budget = 3
    assert h.dispatch(5) == 2
    assert h.dispatcher.outstanding == 3 == a.outstanding + b.outstanding
    assert not h.dispatcher.accepting  # the rest waits in the kernel's backlog


@pytest.mark.parametrize("balance", ["round-robin", "least-connections", Sticky()])
def test_etoomanyrefs_is_backpressure_not_a_broken_worker(harness: Any, monkeypatch: Any, balance: Any) -> None:
    # Root never gets ETOOMANYREFS for real (CAP_SYS_RESOURCE): the sends are made to fail.
    h = harness(balance=balance)
    worker = h.worker(0)
    if h.dispatcher._passer is not None:
        h.dispatcher._passer.fail_sends(1, errno.ETOOMANYREFS)
    else:
        def refuse(*args: Any) -> bool:
            raise OSError(errno.ETOOMANYREFS, os.strerror(errno.ETOOMANYREFS))

        monkeypatch.setattr(_fdpass, "send_fds", refuse)
    assert h.dispatch(4) == 4
    assert h.killed == [] and worker in h.dispatcher.targets
    assert h.server.counters.inflight_full == 1 and not h.dispatcher.accepting
    assert worker.sent == 0 and h.dispatcher.outstanding == 0


@pytest.mark.parametrize("balance", ["round-robin", "least-connections"])
def test_a_channel_that_refuses_a_send_retires_its_worker_and_the_batch_goes_on(harness: Any,
                                                                                balance: str) -> None:
    h = harness(balance=balance)
    bad, good = h.worker(0), h.worker(1)
    assert h.dispatcher._passer is not None
    h.dispatcher._passer.fail_sends(1, errno.EPIPE)  # the first send: to worker 0
    assert h.dispatch(4) == 0
    assert h.killed == [bad.pid] and h.dispatcher.targets == [good]
    assert (h.received(bad), h.received(good)) == (0, 4)
    assert (bad.sent, good.sent, h.dispatcher.outstanding) == (0, 4, 4)


def test_a_batch_policy_with_negative_shares_falls_back(harness: Any) -> None:
    class Negative:
        needs_loads = False

        def assign(self, count: int, loads: Any, workers: int) -> list[int]:
            return [count + 1, -1]  # sums right, but would close descriptors it never got

    h = harness(balance=Negative())
    a, b = h.worker(0), h.worker(1)
    assert h.dispatch(4) == 0
    assert h.received(a) + h.received(b) == 4
    assert h.server.counters.policy_errors == 1


def test_a_connection_policy_that_raises_falls_back(harness: Any) -> None:
    class Raising:
        needs_loads = True

        def choose(self, client: Any, workers: Any, loads: Any) -> int:
            raise KeyError(client)

    h = harness(balance=Raising())
    a, b = h.worker(0), h.worker(1)
    assert h.dispatch(4) == 0
    assert h.received(a) == 2 and h.received(b) == 2


def test_done_is_clamped_to_what_was_sent(harness: Any) -> None:
    h = harness(balance="least-connections")
    worker = h.worker(0)
    h.dispatch(3)
    h.from_worker(worker, protocol.Done(2**32 - 1))
    h.fleet._on_channel(worker, IN)
    assert worker.done == worker.sent == 3 and h.dispatcher.outstanding == 0


def test_a_protocol_error_retires_the_worker_without_breaking_the_loop(harness: Any) -> None:
    h = harness()
    bad, good = h.worker(0), h.worker(1)
    h.from_worker(bad, b"\xffgarbage")
    h.fleet._on_channel(bad, IN)
    assert h.killed == [bad.pid] and h.dispatcher.targets == [good]
    # Later calls that touch its (now unregistered) channel must not raise.
    h.reactor.modify(bad.fd, IN | select.EPOLLOUT)
    h.dispatcher._backpressure(bad)
    assert h.dispatch(2) == 0 and h.received(good) == 2


def test_one_pass_reads_a_bounded_number_of_messages(harness: Any) -> None:
    h = harness()
    worker = h.worker(0)
    for _ in range(200):
        h.from_worker(worker, protocol.Heartbeat(0, 0, 0, 0))
    h.fleet._on_channel(worker, IN)
    left = 0
    while _fdpass.recv_fds(worker.fd, 64) is not None:
        left += 1
    assert left == 200 - 64


def test_a_second_ready_is_a_protocol_error(harness: Any) -> None:
    h = harness()
    worker = h.worker(0)
    h.server.supervisor.by_pid[worker.pid] = worker.life
    worker.life.said_ready = True
    h.from_worker(worker, protocol.Ready(10, 10))
    h.fleet._on_channel(worker, IN)
    assert h.killed == [worker.pid] and h.dispatcher.targets == []


def test_sticky_balancing_enforces_max_requests(harness: Any) -> None:
    h = harness(balance=Sticky(), max_requests=3)
    worker = h.worker(0)
    worker.request_limit = 3
    h.dispatch(4)
    assert h.dispatcher.over_limit == [worker]


def test_every_accept_error_backs_off_longer_each_time(harness: Any) -> None:
    h = harness()
    h.worker(0)
    h.dispatcher._accept_failed(OSError(errno.EINVAL, "not listening"))
    first = h.dispatcher._accept_resume_at
    h.dispatcher._accept_failed(OSError(errno.EINVAL, "not listening"))
    assert h.dispatcher._accept_resume_at > first and not h.dispatcher.accepting


@pytest.mark.parametrize("balance", ["round-robin", "least-connections", Sticky()])
def test_an_accept_that_works_starts_the_backoff_over(harness: Any, balance: Any) -> None:
    h = harness(balance=balance)
    a = h.worker(0)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        h.dispatcher.add_listener(listener)
        h.dispatcher._accept_failed(OSError(errno.EMFILE, "full"))
        h.dispatcher._accept_resume_at = 0.0
        h.dispatcher.update_accepting()
        with socket.create_connection(listener.getsockname()):
            deadline = time.monotonic() + 5
            while not h.received(a):  # the acceptor takes it and passes it on
                assert time.monotonic() < deadline
                h.reactor.poll(0.05)
        before = time.monotonic()
        h.dispatcher._accept_failed(OSError(errno.EMFILE, "full"))
        # The first delay again, not the second: the failures in a row ended with that accept.
        assert h.dispatcher._accept_resume_at - before < dispatcher_module.ACCEPT_BACKOFF[0] * 1.5


def test_an_exit_not_yet_reapable_is_not_taken_for_exit_code_0(harness: Any) -> None:
    h = harness()
    child = subprocess.Popen(["sleep", "30"])
    try:
        worker = h.worker(0)
        del h.server.workers[worker.pid]
        worker.pid = child.pid
        h.server.workers[child.pid] = worker
        h.fleet._on_exit(worker)  # waitpid says (0, 0): it is still running
        assert child.pid in h.server.workers
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(10)


def test_scale_passes_the_number_on() -> None:
    server = Server(handler, workers=2)
    server.scale(5)
    server.scale(0)
    server.scale(-2)
    assert server._early_requests == [Scale(5), Scale(-2)]
    with pytest.raises(TypeError):
        server.scale(1.5)  # type: ignore[arg-type]


def test_a_failed_start_leaves_nothing_behind_and_can_be_retried(tmp_path: Any) -> None:
    pidfile = tmp_path / "app.pid"
    sock_path = tmp_path / "app.sock"
    before = signal.getsignal(signal.SIGTERM)
    server = Server("tests.broken_app:app", workers=1, preload=True, pidfile=str(pidfile),
                    bind=["127.0.0.1:0", f"unix:{sock_path}"])
    for _ in range(2):  # the second time it fails the same way, not with "already started"
        with pytest.raises(RuntimeError, match="broken_app refuses to import"):
            server.start(install_signal_handlers=True)
        assert not pidfile.exists() and not sock_path.exists()
        assert signal.getsignal(signal.SIGTERM) is before
        assert server.listeners == [] and server.workers == {}


# ------------------------------------------------------------------ skip_busy
def _unread_goes_stale() -> None:
    """Wait until what was just sent is no longer fresh: a worker that has not read it
    by then is behind, not waking up."""
    time.sleep(dispatcher_module.FRESH_UNREAD * 2)


def test_a_worker_that_has_not_read_its_channel_is_passed_over(harness: Any) -> None:
    h = harness()
    a, b = h.worker(0), h.worker(1)
    assert h.dispatch(1) == 0  # round-robin: to worker 0, which does not read it
    assert _fdpass.unread_bytes(a.fd) > 0 and _fdpass.unread_bytes(b.fd) == 0
    _unread_goes_stale()
    assert h.dispatch(4) == 0
    assert (h.received(a), h.received(b)) == (1, 4)  # all four went to the reading worker
    assert (a.skipped_busy, b.skipped_busy, h.server.counters.skipped_busy) == (1, 0, 1)


def test_when_every_worker_is_behind_the_policy_splits_as_usual(harness: Any) -> None:
    h = harness()
    a, b = h.worker(0), h.worker(1)
    h.dispatch(1)
    _unread_goes_stale()
    h.dispatch(1)  # worker 0 had not read: to worker 1; now both are behind
    _unread_goes_stale()
    assert h.dispatch(4) == 0
    assert (h.received(a), h.received(b)) == (3, 3)
    assert h.server.counters.skipped_busy == 1


def test_a_worker_just_sent_something_is_still_counted_as_reading(harness: Any, monkeypatch: Any) -> None:
    # The primary runs before the worker it just woke has had a chance to read (with a
    # real-time primary, on the worker's own CPU): that is not a blocked loop. Passed
    # over for it, an idle-looking worker whose loop is in fact blocked got the connection.
    monkeypatch.setattr(dispatcher_module, "FRESH_UNREAD", 30.0)  # however slow this machine is
    h = harness(balance="least-connections")
    a, b = h.worker(0), h.worker(1)
    h.dispatch(2)  # one each; worker 0 reads its own (a request that will block its loop)
    h.received(a)
    h.dispatcher.on_done(b, h.received(b))
    h.dispatch(1)  # loads 1 and 0: to worker 1, which has not read it yet
    # Loads 1 and 1, worker 1 finished one last: the tie is worker 1's, though its channel
    # is not empty yet and worker 0's is.
    h.dispatch(1)
    assert (h.received(a), h.received(b)) == (0, 2)
    assert h.server.counters.skipped_busy == 0


def test_round_robin_keeps_the_strict_rule(harness: Any, monkeypatch: Any) -> None:
    # It cannot take back what it gives a loop that blocks: a worker with anything unread
    # is passed over at once, however recent.
    monkeypatch.setattr(dispatcher_module, "FRESH_UNREAD", 30.0)
    h = harness(balance="round-robin")
    a, b = h.worker(0), h.worker(1)
    h.dispatch(1)  # to worker 0, not read
    h.dispatch(2)
    assert (h.received(a), h.received(b)) == (1, 2)
    assert a.skipped_busy == 1


def test_skip_busy_off_is_plain_push(harness: Any) -> None:
    h = harness(skip_busy=False)
    a, b = h.worker(0), h.worker(1)
    h.dispatch(1)
    h.dispatch(4)
    assert (h.received(a), h.received(b)) == (3, 2)
    assert a.skipped_busy == b.skipped_busy == 0


def test_a_policy_in_python_keeps_a_worker_just_sent_its_last_connection(harness: Any, monkeypatch: Any) -> None:
    # Policies run in Python (sticky, a user's) judge unread messages as the Passer does:
    # one sent a moment ago is not a blocked loop, and must not turn the choice elsewhere.
    class FirstWorker:
        needs_loads = True  # weighs loads, as sticky does: the rule is for such policies

        def choose(self, client: str | None, workers: Sequence[int], loads: Sequence[int]) -> int:
            return workers.index(0) if 0 in workers else 0

    monkeypatch.setattr(dispatcher_module, "FRESH_UNREAD", 30.0)
    h = harness(balance=FirstWorker())
    a, b = h.worker(0), h.worker(1)
    h.dispatch(1)
    h.dispatch(1)  # worker 0 has not read the first yet
    assert (h.received(a), h.received(b)) == (2, 0)
    assert a.skipped_busy == 0


def test_least_connections_and_sticky_pass_over_a_worker_that_is_not_reading(harness: Any) -> None:
    for balance in ("least-connections", Sticky()):
        h = harness(balance=balance)
        a, b = h.worker(0), h.worker(1)
        # A message worker 0 has not read, while its count says it holds nothing: the
        # stale view a push model works from (a blocked loop cannot report).
        _fdpass.send_fds(a.fd, h.connections(1), 0, 1, protocol.encode_fds(1), 0, True)
        to_b = 0
        for _ in range(3):
            h.dispatch(1)
            to_b += h.received(b)  # worker 1 reads what it gets; worker 0 never does
            h.dispatcher.on_done(b, 1)
        assert (h.received(a), to_b) == (1, 3), balance
        assert a.skipped_busy == 3, balance
    h = harness(balance="least-connections", skip_busy=False)  # the same, pushed blind
    a, b = h.worker(0), h.worker(1)
    _fdpass.send_fds(a.fd, h.connections(1), 0, 1, protocol.encode_fds(1), 0, True)
    for _ in range(3):
        h.dispatch(1)
        h.dispatcher.on_done(b, h.received(b))
    assert h.received(a) > 1


def test_least_connections_gives_a_tie_to_the_worker_that_finished_last(harness: Any) -> None:
    h = harness(balance="least-connections", skip_busy=False, reclaim_after=0)
    a, b = h.worker(0), h.worker(1)
    h.dispatch(2)  # one each
    assert (h.received(a), h.received(b)) == (1, 1)
    h.dispatcher.on_done(a, 1)
    h.dispatch(1)  # to worker 0, the idler: loads 1 and 1, worker 0 finished one, worker 1 none
    assert (h.received(a), h.received(b)) == (1, 0)
    for _ in range(4):
        h.dispatch(1)  # a tie each time: rotation would alternate
        assert (h.received(a), h.received(b)) == (1, 0)
        h.dispatcher.on_done(a, 1)
    assert a.progress > b.progress == 0


# ------------------------------------------------------------------ reclaim_after
def _later(seconds: float) -> float:
    return time.monotonic() + seconds


def test_connections_a_worker_leaves_unread_go_to_a_worker_that_reads(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, b = h.worker(0), h.worker(1)
    assert h.dispatch(1) == 0  # round-robin: to worker 0, whose loop never reads it
    assert h.dispatcher.reclaim_due > 0
    assert h.dispatcher.reclaim(_later(0.0)) == 0  # not yet: it may still read it
    assert h.dispatcher.reclaim(_later(0.1)) == 1
    assert h.received(b) == 1
    assert (a.reclaimed, b.reclaimed, h.server.counters.reclaimed) == (1, 0, 1)
    assert (a.sent, b.sent, h.dispatcher.outstanding) == (0, 1, 1)
    # What is left in worker 0's channel is an empty marker: it is passed over until it reads.
    assert _fdpass.unread_bytes(a.fd) > 0
    _unread_goes_stale()  # as it is by the time reclaim runs (reclaim_after)
    assert h.dispatch(3) == 0
    assert (h.received(a), h.received(b)) == (0, 3)


def test_a_worker_that_reads_keeps_what_it_was_given(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, _b = h.worker(0), h.worker(1)
    h.dispatch(1)
    assert h.received(a) == 1  # its loop took it
    assert h.dispatcher.reclaim(_later(0.1)) == 0
    assert a.unread_since == 0 and h.dispatcher.reclaim_due == 0  # nothing left to watch
    assert a.reclaimed == 0


def test_when_every_worker_is_behind_nothing_is_reclaimed(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, b = h.worker(0), h.worker(1)
    h.dispatch(1)
    h.dispatch(1)  # worker 0 had not read: to worker 1; now neither reads
    assert h.dispatcher.reclaim(_later(0.1)) == 0  # load, not one blocked loop
    assert h.dispatcher.reclaim_due > 0  # looked at again later
    assert (h.received(a), h.received(b)) == (1, 1)
    assert h.server.counters.reclaimed == 0


def test_a_worker_that_read_some_since_the_last_look_is_not_stuck(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, b = h.worker(0), h.worker(1)
    for _ in range(2):  # two messages to worker 0, sent as a blind push would
        _fdpass.send_fds(a.fd, h.connections(1), 0, 1, protocol.encode_fds(1), 0, True)
        a.sent += 1
        h.dispatcher.outstanding += 1
    h.dispatcher._watch_unread(a, time.monotonic())
    assert h.dispatcher.reclaim(_later(0.01)) == 0  # seen: two unread
    assert _fdpass.recv_fds(a.worker_end.fileno(), 64) is not None  # its loop takes one...
    assert h.dispatcher.reclaim(_later(0.1)) == 0  # ...so it is reading, slowly
    assert h.dispatcher.reclaim(_later(0.2)) == 1  # and then it did not read for 0.1 s
    assert h.received(b) == 1


def test_reclaim_leaves_draining_and_stopping_workers_alone(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, b = h.worker(0), h.worker(1)
    h.dispatch(1)
    h.dispatcher.stopping = True  # what is taken back when stopping is closed, so take nothing
    assert h.dispatcher.reclaim(_later(0.1)) == 0
    h.dispatcher.stopping = False
    a.life.move(supervisor.DRAINING)
    h.dispatcher._watch_unread(a, time.monotonic())
    assert h.dispatcher.reclaim(_later(0.1)) == 0
    assert (h.received(a), h.received(b)) == (1, 0)


def test_reclaim_off_watches_nothing(harness: Any) -> None:
    h = harness(reclaim_after=0)
    a, _b = h.worker(0), h.worker(1)
    h.dispatch(1)
    assert h.dispatcher.reclaim_due == 0 and a.unread_since == 0


def test_a_per_connection_policy_keeps_its_choice(harness: Any) -> None:
    h = harness(balance=Sticky(), reclaim_after=0.05)
    a, b = h.worker(0), h.worker(1)
    h.dispatch(1)  # a new client: to one worker, which does not read it yet
    assert h.dispatcher.reclaim_due == 0
    assert h.dispatcher.reclaim(_later(1.0)) == 0
    assert h.received(a) + h.received(b) == 1 and a.reclaimed == b.reclaimed == 0


def _give(h: Any, worker: WorkerHandle, messages: int, announced: int = 1) -> None:
    """``messages`` one-descriptor messages to ``worker``, sent as a blind push would
    (``announced``: the count the message claims), watched by the reclaim timer."""
    for _ in range(messages):
        _fdpass.send_fds(worker.fd, h.connections(1), 0, 1, protocol.encode_fds(announced), 0, True)
        worker.sent += announced
        h.dispatcher.outstanding += announced
    h.dispatcher._watch_unread(worker, time.monotonic())


def test_a_worker_that_read_everything_is_watched_afresh(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, b = h.worker(0), h.worker(1)
    h.dispatch(1)
    assert h.received(a) == 1  # read at once...
    time.sleep(0.06)  # ...and nothing happened for longer than reclaim_after
    h.dispatch(1)
    assert h.received(b) == 1
    h.dispatch(1)  # worker 0's turn: what it gets now is fresh, not 60 ms old
    assert h.dispatcher.reclaim(time.monotonic()) == 0
    assert (h.received(a), a.reclaimed) == (1, 0)


def test_counters_never_go_down_when_connections_are_taken_back(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, b = h.worker(0), h.worker(1, capacity=1)
    _give(h, b, 1)  # worker 1 holds its one credit: nobody can take what worker 0 leaves
    assert h.received(b) == 1
    _give(h, a, 2)
    before = (h.dispatcher.dispatched_total, worker_connections_total(a))
    h.dispatcher.on_done(b, 1)  # a credit comes back: one connection can move
    assert h.dispatcher.reclaim(_later(0.1)) == 1
    assert (a.sent, a.taken_back, a.reclaimed) == (1, 1, 1)
    assert worker_connections_total(a) == before[1] == 2  # passed to it, taken back or not
    assert h.dispatcher.dispatched_total >= before[0]


def test_reclaim_takes_no_more_than_the_readers_can_take(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, b = h.worker(0), h.worker(1, capacity=1)
    _give(h, a, 3)
    assert h.dispatcher.reclaim(_later(0.1)) == 1  # worker 1 has one credit
    assert h.received(b) == 1 and len(h.dispatcher.pending) == 0
    assert _messages(a) == [1, 1]  # the rest stayed, in order, and no marker went behind them
    assert h.dispatcher.reclaim_due > 0  # and worker 0 is still watched


def test_connections_lost_on_the_way_back_give_their_credits_back(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, b = h.worker(0), h.worker(1)
    _give(h, a, 1, announced=2)  # a message that lost a descriptor in transit
    assert h.dispatcher.reclaim(_later(0.1)) == 1
    assert (a.sent, a.taken_back, h.dispatcher.outstanding) == (0, 2, 1)  # only worker 1's
    assert h.received(b) == 1


def test_a_worker_taken_back_below_max_requests_is_not_recycled(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, _b = h.worker(0), h.worker(1)
    a.life.request_limit = a.request_limit = 1
    h.dispatch(1)  # its first connection reaches max_requests: recycled on the next tick
    assert h.dispatcher.over_limit == [a] and a.request_limit == 0
    assert h.dispatcher.reclaim(_later(0.1)) == 1  # it never read it
    assert h.dispatcher.over_limit == [] and a.request_limit == 1


def _messages(worker: WorkerHandle) -> list[int]:
    """The descriptor count of each message waiting in ``worker``'s channel (read and closed)."""
    counts = []
    while (got := _fdpass.recv_fds(worker.worker_end.fileno(), 64)) is not None:
        for fd in got[1]:
            os.close(fd)
        counts.append(len(got[1]))
    return counts


def test_a_worker_that_holds_little_gets_one_connection_per_message(harness: Any) -> None:
    h = harness(reclaim_after=0, one_per_message_below=4)
    a, b = h.worker(0), h.worker(1)
    assert h.dispatch(6) == 0  # three each, one per message
    assert _messages(a) == [1, 1, 1] and _messages(b) == [1, 1, 1]
    assert h.dispatch(20) == 0  # they hold 3 each (no Done yet): from the 4th on, batches
    assert _messages(a) == [1, 9] and _messages(b) == [1, 9]


def test_whole_batches_by_default(harness: Any) -> None:
    h = harness(reclaim_after=0)
    a, b = h.worker(0), h.worker(1)
    assert h.dispatch(6) == 0
    assert _messages(a) == [3] and _messages(b) == [3]


def test_reclaim_never_moves_more_than_evens_the_loads(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, b = h.worker(0), h.worker(1)
    # A burst of keep-alive connections: worker 1 read its 4, worker 0 is still starting
    # the first 2 of its 4 and has not read the other 2. Moving them would leave 6 to 2.
    _give(h, b, 4)
    assert h.received(b) == 4
    _give(h, a, 4)
    assert _fdpass.recv_fds(a.worker_end.fileno(), 64) is not None
    assert _fdpass.recv_fds(a.worker_end.fileno(), 64) is not None
    assert h.dispatcher.reclaim(_later(0.1)) == 0
    assert h.received(a) == 2 and a.reclaimed == 0
    # A worker blocked with 2 while the other holds none: one of them moves.
    h2 = harness(balance="least-connections", reclaim_after=0.05)
    c, d = h2.worker(0), h2.worker(1)
    _give(h2, c, 2)
    assert _fdpass.recv_fds(c.worker_end.fileno(), 64) is not None  # it read one, then blocked
    assert h2.dispatcher.reclaim(_later(0.1)) == 1
    assert h2.received(d) == 1


def test_round_robin_does_not_take_back(harness: Any) -> None:
    # Its workers report completions in batches: loads too stale to move connections by.
    h = harness(balance="round-robin", reclaim_after=0.05)
    a, _b = h.worker(0), h.worker(1)
    h.dispatch(1)
    assert h.dispatcher.reclaim_due == 0 and h.dispatcher.reclaim(_later(1.0)) == 0
    assert h.received(a) == 1 and a.reclaimed == 0

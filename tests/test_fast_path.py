"""The dispatcher's fast path (``Dispatcher.poll``): the reactor's waits, with the
listeners read in C, and everything a pass did credited as the callback would.

In process, as tests/test_dispatcher.py: real listeners, real client connections,
real channels, no fork.
"""

from __future__ import annotations

import array
import errno
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from dispatch import _fdpass, protocol
from dispatch.reactor import WaitFailed
from tests.harness import Harness


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        sock.setblocking(False)
        yield sock


@pytest.fixture
def clients(listener: socket.socket) -> Iterator[Any]:
    made: list[socket.socket] = []

    def connect(count: int) -> None:
        made.extend(socket.create_connection(listener.getsockname(), timeout=5) for _ in range(count))
        time.sleep(0.02)  # the handshakes complete in the kernel

    yield connect
    for sock in made:
        sock.close()


def fast(h: Harness, listener: socket.socket) -> Harness:
    h.dispatcher.add_listener(listener)
    h.reactor.set_poller(h.fleet.poll)  # as the primary sets it
    return h


def test_connections_go_through_the_fast_path_and_are_credited(harness: Any, listener: Any, clients: Any) -> None:
    h = fast(harness(), listener)
    a, b = h.worker(0), h.worker(1)
    clients(6)
    h.reactor.poll(0.1)
    assert h.dispatcher._passer.run_passes >= 1  # the listener was read in C, not by its callback
    assert (a.sent, b.sent, h.dispatcher.outstanding) == (3, 3, 6)
    assert (h.received(a), h.received(b)) == (3, 3)
    h.from_worker(a, protocol.Done(3))
    h.reactor.poll(0.01)  # read in C too
    assert (a.done, h.dispatcher.outstanding) == (3, 3)


def test_skips_and_the_watch_for_reclaim_are_kept_as_the_callback_keeps_them(harness: Any, listener: Any,
                                                                             clients: Any) -> None:
    h = fast(harness(balance="least-connections", reclaim_after=0.05), listener)
    a, b = h.worker(0), h.worker(1)
    _fdpass.send_fds(a.fd, array.array("i"), data=protocol.encode_fds(0))  # a is behind
    clients(1)
    before = time.monotonic()
    h.reactor.poll(0.02)
    assert (a.sent, b.sent) == (0, 1)
    assert (a.skipped_busy, b.skipped_busy, h.server.counters.skipped_busy) == (1, 0, 1)
    assert before <= b.unread_since <= time.monotonic()  # dated from its send, as _sent_to dates it
    assert h.dispatcher.reclaim_due == pytest.approx(b.unread_since + 0.05)
    assert a.unread_since == 0.0


def test_what_the_budget_has_no_room_for_waits_and_accepting_stops(harness: Any, listener: Any,
                                                                    clients: Any) -> None:
    h = fast(harness(), listener)
    a, b = h.worker(0), h.worker(1)
    h.dispatcher.budget = 2
    h.dispatcher.update_accepting()
    clients(5)
    h.reactor.poll(0.1)
    assert h.dispatcher.outstanding == 2 and len(h.dispatcher.pending) == 3
    assert not h.dispatcher.accepting
    assert h.dispatcher.poll(h.reactor._epoll.fileno(), 0.0) is None  # waiting connections: the slow path
    assert h.received(a) + h.received(b) == 2


def test_a_full_channel_in_a_run_is_backpressure_and_the_rest_goes_on(harness: Any, listener: Any,
                                                                      clients: Any) -> None:
    h = fast(harness(), listener)
    a, b = h.worker(0), h.worker(1)
    h.dispatcher._passer.fail_sends(1, errno.EAGAIN)  # the first send finds worker 0's channel full
    clients(4)
    h.reactor.poll(0.1)
    assert a.full and a not in h.dispatcher.targets
    assert (h.received(a), h.received(b)) == (0, 4)
    assert (a.sent, b.sent, h.dispatcher.outstanding, len(h.dispatcher.pending)) == (0, 4, 4, 0)


def test_an_accept_error_in_a_run_backs_off(harness: Any) -> None:
    h = harness()
    h.worker(0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # readable, and accept fails
        udp.bind(("127.0.0.1", 0))
        udp.sendto(b"x", udp.getsockname())
        fast(h, udp)
        h.reactor.poll(0.1)
        assert h.server.counters.accept_errors == 1
        assert not h.dispatcher.accepting and h.dispatcher._accept_resume_at > 0


def test_done_messages_are_read_in_the_run_and_credited_like_the_callback_does(harness: Any, listener: Any,
                                                                              clients: Any,
                                                                              monkeypatch: Any) -> None:
    h = fast(harness(balance="least-connections"), listener)
    a, b = h.worker(0), h.worker(1)
    heard: list[int] = []
    monkeypatch.setattr(h.server.supervisor, "heard_from", lambda pid, now: heard.append(pid) or [])
    callback_reads: list[int] = []
    monkeypatch.setattr(h.fleet, "_on_channel", lambda worker, events: callback_reads.append(worker.pid))
    clients(4)
    h.reactor.poll(0.05)
    assert (a.sent, b.sent) == (2, 2)
    h.from_worker(a, protocol.Done(1))
    h.from_worker(a, protocol.Done(9))  # more than it holds: clamped, as on_done clamps
    h.from_worker(b, protocol.Done(1))
    h.reactor.poll(0.05)
    assert (a.done, b.done, h.dispatcher.outstanding) == (2, 1, 1)
    assert callback_reads == [] and sorted(heard) == sorted([a.pid, b.pid])
    # Least-connections sees the loads and the stamps: the next one goes to a (0 held).
    assert a.progress != b.progress and h.dispatcher._progress == max(a.progress, b.progress)
    clients(1)
    h.reactor.poll(0.05)
    assert (a.sent, b.sent) == (3, 2)


def test_any_other_message_read_in_a_run_is_handled_before_the_rest_of_its_channel(harness: Any, listener: Any,
                                                                                    clients: Any) -> None:
    h = fast(harness(balance="least-connections"), listener)
    a, _ = h.worker(0), h.worker(1)
    clients(2)
    h.reactor.poll(0.05)
    h.from_worker(a, protocol.Done(1))
    h.from_worker(a, protocol.Heartbeat(active=0, total=7, rss=1 << 20, cpu_ms=5))
    h.from_worker(a, protocol.Done(0))
    h.reactor.poll(0.05)  # the run reads Done(1), stops at the heartbeat; the callback reads the rest
    assert a.done == 1 and a.report is not None and a.report.total == 7
    assert _fdpass.unread_bytes(h.ends[a.pid].fileno()) == 0 and h.dispatcher.outstanding == 1


def test_a_message_that_breaks_the_protocol_in_a_run_retires_the_worker(harness: Any, listener: Any) -> None:
    h = fast(harness(), listener)
    a, _ = h.worker(0), h.worker(1)
    h.from_worker(a, b"\x63\x01garbage")
    h.reactor.poll(0.05)
    assert a not in h.dispatcher.targets and h.killed == [a.pid]


def test_the_done_the_run_reads_is_the_protocol_s_done() -> None:
    for count in (0, 1, 300, 2**32 - 1):
        assert protocol.encode(protocol.Done(count)) == protocol.DONE_PREFIX + count.to_bytes(4, "big")


def test_reclaim_s_watch_runs_in_c_while_every_worker_is_behind(harness: Any, listener: Any,
                                                                 clients: Any) -> None:
    h = fast(harness(balance="least-connections", reclaim_after=0.03), listener)
    a, b = h.worker(0), h.worker(1)
    for worker in (a, b):  # neither reads
        _fdpass.send_fds(worker.fd, array.array("i"), data=protocol.encode_fds(0))
    clients(2)
    h.reactor.poll(0.05)
    assert (a.sent, b.sent) == (1, 1) and h.dispatcher.reclaim_due
    watched_from = min(a.unread_since, b.unread_since)
    h.dispatcher.tick_due = time.monotonic() + 0.2
    h.reactor.poll(0.03)  # the server's loop would wake for reclaim; the run looks itself
    assert time.monotonic() >= h.dispatcher.tick_due - 0.01
    # As reclaim re-arms its watches when nobody could take anything: from the last look on.
    assert a.unread_since > watched_from and b.unread_since > watched_from
    assert h.dispatcher.reclaim_due > time.monotonic() - 0.03
    assert h.dispatcher.reclaim(h.dispatcher.reclaim_due) == 0  # still nothing to take back


def test_a_failed_wait_is_raised_as_the_reactor_s_own_would_be(harness: Any, listener: Any) -> None:
    h = fast(harness(), listener)
    h.worker(0), h.worker(1)
    with pytest.raises(WaitFailed) as failed:
        h.fleet.poll(-1, 0.0)  # no epoll at all
    assert failed.value.errno == errno.EBADF
    h.reactor.set_poller(lambda epfd, timeout: h.fleet.poll(-1, timeout))
    with pytest.raises(WaitFailed):  # out of serve_forever, as a failing epoll.poll would
        h.reactor.poll(0.0)


def test_a_poller_that_fails_otherwise_is_logged_and_the_reactor_polls(harness: Any, listener: Any,
                                                                       clients: Any) -> None:
    h = fast(harness(), listener)
    a, b = h.worker(0), h.worker(1)

    def broken(epfd: int, timeout: float) -> Any:
        raise ValueError("a bug")

    h.reactor.set_poller(broken)
    clients(2)
    h.reactor.poll(0.05)  # the listener's own callback takes them
    assert h.received(a) + h.received(b) == 2


def test_a_message_that_fails_does_not_lose_the_others_the_run_read(harness: Any, listener: Any,
                                                                      clients: Any, monkeypatch: Any) -> None:
    h = fast(harness(balance="least-connections"), listener)
    a, b = h.worker(0), h.worker(1)
    real = h.fleet._on_message

    def fails_for_a(worker: Any, message: Any, now: float) -> None:
        if worker is a:
            raise RuntimeError("a bug in handling a's report")
        real(worker, message, now)

    monkeypatch.setattr(h.fleet, "_on_message", fails_for_a)
    for worker in (a, b):
        h.from_worker(worker, protocol.Heartbeat(active=0, total=3, rss=1, cpu_ms=1))
    h.reactor.poll(0.05)
    assert b.report is not None and b.report.total == 3


def test_a_done_that_credits_nothing_still_says_the_worker_is_alive(harness: Any, listener: Any,
                                                                      monkeypatch: Any) -> None:
    h = fast(harness(balance="least-connections"), listener)
    a, _ = h.worker(0), h.worker(1)
    heard: list[int] = []
    monkeypatch.setattr(h.server.supervisor, "heard_from", lambda pid, now: heard.append(pid) or [])
    h.from_worker(a, protocol.Done(1))  # it holds nothing: clamped to 0
    h.reactor.poll(0.05)
    assert heard == [a.pid] and a.done == 0 and h.dispatcher.outstanding == 0


def test_a_watch_not_yet_due_keeps_its_age_when_every_worker_is_behind(harness: Any) -> None:
    h = harness(balance="least-connections", reclaim_after=0.05)
    a, b = h.worker(0), h.worker(1)
    a.unread_since, b.unread_since = 10.0, 10.04
    h.dispatcher._all_behind(10.06, 10.11)
    assert (a.unread_since, b.unread_since) == (10.06, 10.04)  # a was stuck: re-armed; b was not due
    assert h.dispatcher.reclaim_due == 10.11

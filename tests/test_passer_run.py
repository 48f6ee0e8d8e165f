"""``Passer.run``, the listeners' fast path: real epoll, real listeners, real channels.

One call waits on the reactor's epoll and accepts and passes for every readable
listener, pass after pass, until something else needs Python: another descriptor
ready, the deadline, a signal, no room left, a pass that ended short.
"""

from __future__ import annotations

import array
import errno
import os
import select
import signal
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from dispatch import _fdpass
from tests.test_passer import MESSAGES, Channels

ACCEPT_LIMIT = 16


class Rig:
    """An epoll with ``listeners`` registered, a Passer over ``targets`` channels."""

    def __init__(self, targets: int, listeners: int = 1, kind: int = _fdpass.ROUND_ROBIN) -> None:
        self.epoll = select.epoll()
        self.listeners = [socket.create_server(("127.0.0.1", 0)) for _ in range(listeners)]
        for sock in self.listeners:
            sock.setblocking(False)
            self.epoll.register(sock.fileno(), select.EPOLLIN)
        self.listen_fds = array.array("i", [s.fileno() for s in self.listeners])
        self.channels = Channels(targets)
        self.buffer = array.array("i", bytes(4 * ACCEPT_LIMIT))
        self.passer = _fdpass.Passer(kind, MESSAGES, self.buffer)
        self.passer.set_targets(self.channels.fds, [0] * targets, [0] * targets, [253] * targets, [0] * targets)
        self.clients: list[socket.socket] = []

    def connect(self, count: int, listener: int = 0) -> None:
        address = self.listeners[listener].getsockname()
        self.clients += [socket.create_connection(address, timeout=5) for _ in range(count)]
        time.sleep(0.02)  # the handshakes complete in the kernel

    def run(self, timeout: float, room: int = 10_000, skip_busy: bool = False,
            reclaim_ns: int = 0, watch_due: int = 0) -> list[tuple[int, int]]:
        return self.passer.run(self.epoll.fileno(), self.listen_fds, timeout, room, ACCEPT_LIMIT,
                               skip_busy, reclaim_ns, 0, watch_due)

    def received(self) -> list[int]:
        return [sum(self.channels.received(i)) for i in range(len(self.channels.ours))]

    def close(self) -> None:
        for sock in self.clients + self.listeners:
            sock.close()
        self.channels.close()
        self.epoll.close()


@pytest.fixture
def rig() -> Iterator[type[Rig]]:
    made: list[Rig] = []

    class Made(Rig):
        def __init__(self, *args: int, **kwargs: int) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    yield Made
    for r in made:
        r.close()


def test_a_run_passes_from_every_listener_until_its_deadline(rig: type[Rig]) -> None:
    r = rig(2, listeners=2)
    r.connect(3, listener=0)
    r.connect(2, listener=1)
    started = time.monotonic()
    assert r.run(0.3) == []  # nothing but listeners: nothing for the caller
    assert time.monotonic() - started >= 0.25  # it waited out its deadline in C
    assert r.passer.run_passed == 5 and r.passer.run_passes >= 2 and not r.passer.unsettled
    given = [r.passer.run_given(0), r.passer.run_given(1)]
    assert sorted(given) == [2, 3] and r.received() == given  # round-robin, batch by batch


def test_connections_arriving_during_a_run_are_passed_in_the_same_run(rig: type[Rig]) -> None:
    r = rig(2)
    later = threading.Timer(0.1, r.connect, (4,))
    later.start()
    try:
        assert r.run(1.0) == []
    finally:
        later.join()
    assert r.passer.run_passed == 4
    assert sum(r.received()) == 4


def test_any_other_ready_descriptor_ends_the_run_at_once(rig: type[Rig]) -> None:
    r = rig(2)
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        r.epoll.register(read_end, select.EPOLLIN)
        r.connect(2)
        os.write(write_end, b"x")
        started = time.monotonic()
        events = r.run(5.0)
        assert time.monotonic() - started < 1.0
        assert events == [(read_end, select.EPOLLIN)]
        r.run(0.0)  # the listener's turn if the pipe came first in that wait
        assert sum(r.received()) == 2
    finally:
        os.close(read_end)
        os.close(write_end)


def test_a_run_stops_when_room_is_spent_and_leaves_the_rest_to_the_caller(rig: type[Rig]) -> None:
    r = rig(2)
    r.connect(5)
    assert r.run(5.0, room=3) == []
    p = r.passer
    assert p.unsettled and p.accepted == 5 and p.passed == 3 and p.run_passed == 3
    assert p.status == _fdpass.PASSED
    assert sum(r.received()) == 3
    _fdpass.close_fds(r.buffer, 3, 2)  # the caller's two


def test_a_listener_with_no_room_or_no_target_goes_to_the_caller(rig: type[Rig]) -> None:
    r = rig(2)
    r.connect(1)
    fd = r.listeners[0].fileno()
    assert r.run(5.0, room=0) == [(fd, select.EPOLLIN)]
    r.passer.set_targets([], [], [], [], [])
    assert r.run(5.0) == [(fd, select.EPOLLIN)]
    assert r.passer.run_passes == 0 and sum(r.received()) == 0


def test_an_accept_that_fails_ends_the_run_with_its_error(rig: type[Rig]) -> None:
    r = rig(2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:  # readable, but accept fails
        udp.bind(("127.0.0.1", 0))
        udp.sendto(b"x", udp.getsockname())
        r.epoll.register(udp.fileno(), select.EPOLLIN)
        listen_fds = array.array("i", [udp.fileno()])
        assert r.passer.run(r.epoll.fileno(), listen_fds, 5.0, 100, ACCEPT_LIMIT, False, 0) == []
        assert r.passer.run_error == errno.EOPNOTSUPP and r.passer.run_passes == 0


def test_a_full_channel_ends_the_run_with_its_status(rig: type[Rig]) -> None:
    r = rig(1)
    r.passer.fail_sends(1, errno.EAGAIN)  # the channel says EAGAIN once
    r.connect(2)
    assert r.run(5.0) == []
    p = r.passer
    assert p.unsettled and p.status == _fdpass.CHANNEL_FULL and p.slot == 0 and p.passed == 0
    _fdpass.close_fds(r.buffer, 0, p.accepted)


def test_skips_and_reads_are_counted_over_the_whole_run(rig: type[Rig]) -> None:
    r = rig(2)
    _fdpass.send_fds(r.channels.fds[0], array.array("i"), data=MESSAGES[0])  # worker 0 does not read
    r.connect(1)
    later = threading.Timer(0.1, lambda: (r.channels.received(1), r.connect(1)))  # worker 1 reads
    started = time.monotonic_ns()
    later.start()
    try:
        assert r.run(0.4, skip_busy=True, reclaim_ns=10**9) == []
    finally:
        later.join()
    p = r.passer
    assert p.run_passes == 2 and p.run_passed == 2
    assert p.run_skips(0) == 2 and p.run_skips(1) == 0
    assert p.run_given(0) == 0 and p.run_given(1) == 2
    assert p.run_seen(0) == (False, 0)
    seen, first_send = p.run_seen(1)  # read everything, then sent: dated from that send
    assert seen and started + 50_000_000 <= first_send <= time.monotonic_ns()
    assert r.received() == [0, 1]


def test_a_run_ends_in_time_to_look_at_what_it_sent(rig: type[Rig]) -> None:
    r = rig(2)
    r.connect(1)
    started = time.monotonic()
    assert r.run(5.0, skip_busy=True, reclaim_ns=50_000_000) == []  # 50 ms
    assert time.monotonic() - started < 1.0
    assert r.passer.run_passed == 1


def test_a_signal_ends_the_run_so_its_handler_runs(rig: type[Rig]) -> None:
    r = rig(2)
    caught: list[int] = []
    previous = signal.signal(signal.SIGALRM, lambda signum, frame: caught.append(signum))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.1)
        started = time.monotonic()
        assert r.run(5.0) == []
        assert time.monotonic() - started < 2.0
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert caught == [signal.SIGALRM]


def test_while_every_target_is_behind_a_watch_does_not_end_the_run(rig: type[Rig]) -> None:
    r = rig(2)
    for fd in r.channels.fds:  # neither worker reads: that is load, nothing to take back
        _fdpass.send_fds(fd, array.array("i"), data=MESSAGES[0])
    r.connect(1)
    started = time.monotonic()
    assert r.run(0.3, skip_busy=True, reclaim_ns=30_000_000) == []
    p = r.passer
    assert time.monotonic() - started >= 0.25  # it looked every 30 ms and went on
    assert started * 1e9 < p.all_behind < p.watch_due <= p.all_behind + 30_000_000
    assert p.run_passed == 1


def test_a_watch_ends_the_run_once_some_target_has_read_everything(rig: type[Rig]) -> None:
    r = rig(2)
    for fd in r.channels.fds:
        _fdpass.send_fds(fd, array.array("i"), data=MESSAGES[0])
    reads = threading.Timer(0.1, r.channels.received, (1,))  # worker 1 catches up
    started = time.monotonic()
    reads.start()
    try:
        assert r.run(5.0, skip_busy=True, reclaim_ns=30_000_000,
                     watch_due=time.monotonic_ns() + 30_000_000) == []
    finally:
        reads.join()
    assert 0.1 <= time.monotonic() - started < 1.0
    assert r.passer.all_behind  # it had looked before and found both behind


def test_a_wait_that_fails_ends_the_run_and_keeps_what_it_passed(rig: type[Rig]) -> None:
    r = rig(2)
    r.connect(1)
    assert r.run(0.05) == []
    assert r.passer.run_passed == 1 and r.passer.wait_error == 0
    with socket.socket() as not_epoll:  # epoll_wait on it: EINVAL
        assert r.passer.run(not_epoll.fileno(), r.listen_fds, 1.0, 100, ACCEPT_LIMIT, False) == []
    assert r.passer.wait_error == errno.EINVAL and r.passer.run_passes == 0

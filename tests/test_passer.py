"""The C dispatch loop (``_fdpass.Passer``) alone: real socketpairs, real descriptors.

Its split must be the Python policies' split to the letter (rotation and ties
included): the dispatcher uses it in their place.
"""

from __future__ import annotations

import array
import errno
import os
import socket
import time
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch import _fdpass, protocol
from dispatch.balance import LeastConnections, RoundRobin

MESSAGES = [protocol.encode_fds(n) for n in range(_fdpass.SCM_MAX_FD + 1)]


class Channels:
    """``n`` SEQPACKET pairs: the passer sends on ``ours``, ``theirs`` are the workers' ends."""

    def __init__(self, n: int) -> None:
        pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(n)]
        self.ours = [a for a, _ in pairs]
        self.theirs = [b for _, b in pairs]
        for sock in self.ours + self.theirs:
            sock.setblocking(False)

    @property
    def fds(self) -> list[int]:
        return [s.fileno() for s in self.ours]

    def received(self, i: int) -> list[int]:
        """The descriptor count of each message waiting for worker ``i`` (read and closed)."""
        counts = []
        while (got := _fdpass.recv_fds(self.theirs[i].fileno(), 64)) is not None:
            assert protocol.decode(got[0]) == protocol.Fds(len(got[1]))
            for fd in got[1]:
                os.close(fd)
            counts.append(len(got[1]))
        return counts

    def close(self) -> None:
        for sock in self.ours + self.theirs:
            sock.close()


@pytest.fixture
def channels() -> Iterator[type[Channels]]:
    made: list[Channels] = []

    class Made(Channels):
        def __init__(self, n: int) -> None:
            super().__init__(n)
            made.append(self)

    yield Made
    for c in made:
        c.close()


def connections(count: int) -> array.array[int]:
    return array.array("i", [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(count)])


def passer(kind: int, below: int = 0, fresh_ns: int = 0) -> _fdpass.Passer:
    return _fdpass.Passer(kind, MESSAGES, array.array("i", bytes(4 * 16)), below, fresh_ns)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 5), st.lists(st.integers(1, 20), min_size=1, max_size=6))
def test_round_robin_splits_like_the_policy(n: int, batches: list[int]) -> None:
    ch = Channels(n)
    try:
        p, policy = passer(_fdpass.ROUND_ROBIN), RoundRobin()
        p.set_targets(ch.fds, [0] * n, [0] * n, [253] * n, [0] * n)
        for count in batches:
            assert p.pass_batch(connections(count), 0, count, False) == count
            assert p.status == _fdpass.PASSED
            assert [p.given(i) for i in range(n)] == policy.assign(count, (), n)
            assert [sum(ch.received(i)) for i in range(n)] == [p.given(i) for i in range(n)]
    finally:
        ch.close()


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_least_connections_splits_like_the_policy(data: st.DataObject) -> None:
    n = data.draw(st.integers(1, 5))
    loads = data.draw(st.lists(st.integers(0, 6), min_size=n, max_size=n))
    recent = data.draw(st.lists(st.integers(0, 9), min_size=n, max_size=n))
    ch = Channels(n)
    try:
        p, policy = passer(_fdpass.LEAST_CONNECTIONS), LeastConnections()
        p.set_targets(ch.fds, loads, [0] * n, [253] * n, recent)
        for _ in range(3):
            count = data.draw(st.integers(1, 12))
            assert p.pass_batch(connections(count), 0, count, False) == count
            expected = policy.assign(count, loads, n, recent)
            assert [p.given(i) for i in range(n)] == expected
            loads = [load + share for load, share in zip(loads, expected, strict=True)]
            for i in range(n):
                ch.received(i)
            finished = data.draw(st.integers(0, n - 1))
            if loads[finished]:
                p.done(finished, 1, max(recent) + 1)
                loads[finished] -= 1
                recent[finished] = max(recent) + 1
    finally:
        ch.close()


def test_credits_bound_each_target_and_say_so(channels: type[Channels]) -> None:
    ch = channels(2)
    p = passer(_fdpass.ROUND_ROBIN)
    p.set_targets(ch.fds, [0, 0], [2, 0], [253, 253], [0, 0])  # worker 0 may hold 2
    buf = connections(8)
    passed = p.pass_batch(buf, 0, 8, False)
    assert passed == 6 and p.status == _fdpass.OUT_OF_CREDIT
    assert (sum(ch.received(0)), sum(ch.received(1))) == (2, 4)
    _fdpass.close_fds(buf, passed, 8 - passed)  # the caller's: never sent


def test_batches_go_in_chunks_of_max_batch_or_one_below_the_threshold(channels: type[Channels]) -> None:
    ch = channels(1)
    p = passer(_fdpass.ROUND_ROBIN)
    p.set_targets(ch.fds, [0], [0], [3], [0])
    assert p.pass_batch(connections(7), 0, 7, False) == 7
    assert ch.received(0) == [3, 3, 1]
    p = passer(_fdpass.ROUND_ROBIN, below=2)  # one per message while it holds fewer than 2
    p.set_targets(ch.fds, [0], [0], [253], [0])
    assert p.pass_batch(connections(5), 0, 5, False) == 5
    assert ch.received(0) == [1, 1, 3]


def test_a_target_with_unread_messages_is_passed_over_while_another_reads(channels: type[Channels]) -> None:
    ch = channels(3)
    p = passer(_fdpass.ROUND_ROBIN)
    p.set_targets(ch.fds, [0] * 3, [0] * 3, [253] * 3, [0] * 3)
    assert p.pass_batch(connections(1), 0, 1, True) == 1  # to worker 0, which does not read it
    assert p.pass_batch(connections(4), 0, 4, True) == 4
    assert p.looked and p.any_skipped and p.skipped(0) and p.unread(0)
    assert not p.skipped(1) and not p.unread(1)
    assert (len(ch.received(0)), sum(ch.received(1)) + sum(ch.received(2))) == (1, 4)
    # Every target behind: that is load, not one blocked loop; nobody is skipped.
    for i in range(3):
        _fdpass.send_fds(ch.fds[i], array.array("i"), data=MESSAGES[0])
    assert p.pass_batch(connections(3), 0, 3, True) == 3
    assert not p.any_skipped and all(p.unread(i) for i in range(3))
    assert [sum(ch.received(i)) for i in range(3)] == [1, 1, 1]


def test_a_full_channel_stops_the_pass_at_that_target(channels: type[Channels]) -> None:
    ch = channels(1)
    p = passer(_fdpass.ROUND_ROBIN)
    p.set_targets(ch.fds, [0], [0], [1], [0])
    sent = 0
    while True:  # one descriptor per message until the channel is full
        buf = connections(1)
        if p.pass_batch(buf, 0, 1, False) == 0:
            break
        sent += 1
    assert p.status == _fdpass.CHANNEL_FULL and p.slot == 0 and p.error == errno.EAGAIN
    assert sent > 0
    _fdpass.close_fds(buf)
    assert len(ch.received(0)) == sent


def test_accept_and_pass_takes_from_the_listener_and_leaves_what_has_no_room(channels: type[Channels]) -> None:
    ch = channels(2)
    buffer = array.array("i", bytes(4 * 16))
    p = _fdpass.Passer(_fdpass.ROUND_ROBIN, MESSAGES, buffer)
    p.set_targets(ch.fds, [0, 0], [0, 0], [253, 253], [0, 0])
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(5)]
        try:
            assert p.accept_and_pass(listener.fileno(), 16, 3, False) == 5  # room for 3
            assert p.passed == 3 and p.status == _fdpass.PASSED
            assert sum(ch.received(0)) + sum(ch.received(1)) == 3
            _fdpass.close_fds(buffer, 3, 2)  # the caller's two
            assert p.accept_and_pass(listener.fileno(), 16, 3, False) == 0  # nothing waits
        finally:
            for client in clients:
                client.close()


def test_accept_errors_raise_like_accept_batch(channels: type[Channels]) -> None:
    p = passer(_fdpass.ROUND_ROBIN)
    with socket.socket() as unbound:  # not listening: EINVAL
        with pytest.raises(OSError):
            p.accept_and_pass(unbound.fileno(), 16, 16, False)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        _fdpass.Passer(7, MESSAGES, array.array("i", [0]))
    with pytest.raises(ValueError):
        _fdpass.Passer(_fdpass.ROUND_ROBIN, MESSAGES[:5], array.array("i", [0]))
    p = passer(_fdpass.ROUND_ROBIN)
    with pytest.raises(ValueError):
        p.set_targets([1, 2], [0], [0, 0], [1, 1], [0, 0])
    with pytest.raises(ValueError):
        p.pass_batch(array.array("i", [0]), 0, 2, False)


def test_a_send_time_follows_its_worker_when_the_slots_shift(channels: type[Channels]) -> None:
    ch = channels(3)
    p = passer(_fdpass.ROUND_ROBIN, fresh_ns=30 * 10**9)  # everything sent in this test is fresh
    p.set_targets(ch.fds, [0] * 3, [0] * 3, [253] * 3, [0] * 3)
    assert p.pass_batch(connections(3), 0, 3, True) == 3  # one each
    assert sum(ch.received(2)) == 1  # the last one read its own; the middle one not yet
    p.set_targets(ch.fds[1:], [1, 1], [0, 0], [253, 253], [0, 0])  # the first one leaves
    assert p.pass_batch(connections(2), 0, 2, True) == 2
    assert not p.any_skipped  # the middle one was just sent its own: it still counts as reading
    assert [sum(ch.received(i)) for i in (1, 2)] == [2, 1]


def test_sends_without_a_look_are_timed_too(channels: type[Channels]) -> None:
    ch = channels(2)
    p = passer(_fdpass.ROUND_ROBIN, fresh_ns=30 * 10**9)
    p.set_targets(ch.fds[:1], [0], [0], [253], [0])  # one target: nothing to compare
    assert p.pass_batch(connections(1), 0, 1, True) == 1
    p.set_targets(ch.fds, [1, 0], [0, 0], [253, 253], [0, 0])
    assert p.pass_batch(connections(2), 0, 2, True) == 2
    assert not p.skipped(0) and not p.any_skipped


def test_unread_older_than_the_window_is_behind(channels: type[Channels]) -> None:
    ch = channels(2)
    p = passer(_fdpass.ROUND_ROBIN, fresh_ns=1_000_000)  # 1 ms
    p.set_targets(ch.fds, [0, 0], [0, 0], [253, 253], [0, 0])
    assert p.pass_batch(connections(1), 0, 1, True) == 1  # to slot 0, never read
    time.sleep(0.005)
    assert p.pass_batch(connections(2), 0, 2, True) == 2
    assert p.skipped(0) and not p.skipped(1)
    assert [sum(ch.received(i)) for i in range(2)] == [1, 2]

"""Micro-benchmarks of the primary's hot path (pytest-benchmark).

    pytest benchmarks/test_fdpass_bench.py --benchmark-enable

pyproject's addopts has ``--benchmark-disable`` (and testpaths only ``tests``),
so these run only when asked, as above; disabled, each runs once as a test.

- fdpass: one round sends N duplicated descriptors over an AF_UNIX
  SOCK_SEQPACKET socketpair in one message, receives them on the other end and
  closes them: ``dispatch._fdpass.send_fds`` + ``recv_fds`` against the stdlib
  ``socket.send_fds`` + ``socket.recv_fds``, at N = 1, 16 and 253 (SCM_MAX_FD).
  The dups are made outside the timed region (the primary has its
  descriptors from accept4; making them is not the hot path's cost) but the
  sender closing its copies is inside, as in the primary (``close_sent``).
  Divide the mean by N for the cost per descriptor.
- accept: K connections wait in a listener's backlog; one round takes all of
  them with ``dispatch._fdpass.accept_batch`` or with a ``sock.accept()``
  loop, then closes them. Connecting them again is outside the timed region.

Every descriptor a round creates is closed by that round or by the fixture.
"""

from __future__ import annotations

import array
import contextlib
import os
import socket
from collections.abc import Iterator

import pytest

from dispatch import _fdpass

BATCHES = [1, 16, 253]
PENDING = [16, 128]


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(autouse=True)
def no_leaks() -> Iterator[None]:
    """Every benchmark gives back every descriptor it made (fixtures included)."""
    before = _open_fds()
    yield
    leaked = _open_fds() - before
    assert not leaked, f"descriptors left open: {sorted(leaked)}"


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Room for a 253-fd message on both sides.
    for s in (a, b):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    try:
        yield a, b
    finally:
        # Anything still in flight is closed with the sockets.
        a.close()
        b.close()


@pytest.fixture
def source() -> Iterator[int]:
    """A descriptor to duplicate: /dev/null, cheap to dup and close."""
    fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    try:
        yield fd
    finally:
        os.close(fd)


def _dups(fd: int, n: int) -> array.array:
    return array.array("i", [os.dup(fd) for _ in range(n)])


def _close_all(fds: list[int] | array.array) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


@pytest.mark.benchmark(group="fdpass")
@pytest.mark.parametrize("n", BATCHES)
def test_fdpass_cython(benchmark, pair, source, n: int) -> None:
    a, b = pair
    send, recv, close_fds = _fdpass.send_fds, _fdpass.recv_fds, _fdpass.close_fds
    afd, bfd = a.fileno(), b.fileno()
    data = b"\0"
    leftovers: list[array.array] = []

    def setup():
        fds = _dups(source, n)
        leftovers.append(fds)
        return (fds,), {}

    def round_trip(fds: array.array) -> None:
        assert send(afd, fds, 0, n, data, 0, True)  # closes our copies, like the primary
        leftovers.pop()
        got = recv(bfd, 16, n)
        assert got is not None and len(got[1]) == n
        close_fds(array.array("i", got[1]))

    try:
        benchmark.pedantic(round_trip, setup=setup, rounds=_rounds(n), iterations=1, warmup_rounds=5)
    finally:
        for fds in leftovers:
            _close_all(fds)
    benchmark.extra_info["fds_per_round"] = n


@pytest.mark.benchmark(group="fdpass")
@pytest.mark.parametrize("n", BATCHES)
def test_fdpass_stdlib(benchmark, pair, source, n: int) -> None:
    a, b = pair
    send, recv = socket.send_fds, socket.recv_fds
    close = os.close
    data = [b"\0"]
    leftovers: list[list[int]] = []

    def setup():
        fds = [os.dup(source) for _ in range(n)]
        leftovers.append(fds)
        return (fds,), {}

    def round_trip(fds: list[int]) -> None:
        send(a, data, fds)
        for fd in fds:
            close(fd)
        leftovers.pop()
        msg, got, flags, _ = recv(b, 16, n)
        assert len(got) == n
        for fd in got:
            close(fd)

    try:
        benchmark.pedantic(round_trip, setup=setup, rounds=_rounds(n), iterations=1, warmup_rounds=5)
    finally:
        for fds in leftovers:
            _close_all(fds)
    benchmark.extra_info["fds_per_round"] = n


def _rounds(n: int) -> int:
    return 3000 if n == 1 else 1500 if n <= 16 else 300


# ------------------------------------------------------------------ accept
class Listener:
    """A non-blocking loopback listener and the client sockets connected to it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.clients: list[socket.socket] = []

    def connect(self, k: int) -> None:
        """K completed connections waiting in the backlog; the previous clients closed."""
        self.close_clients()
        addr = self.sock.getsockname()
        for _ in range(k):
            c = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self.clients.append(c)
            c.connect(addr)  # loopback: returns once the server's kernel has queued it

    def close_clients(self) -> None:
        for c in self.clients:
            c.close()
        self.clients.clear()

    def close(self) -> None:
        while True:  # whatever a failed round left in the backlog
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                break
            conn.close()
        self.close_clients()
        self.sock.close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    lst = Listener()
    try:
        yield lst
    finally:
        lst.close()


@pytest.mark.benchmark(group="accept")
@pytest.mark.parametrize("k", PENDING)
def test_accept_batch(benchmark, listener: Listener, k: int) -> None:
    buf = array.array("i", bytes(4 * 256))
    fd = listener.sock.fileno()
    accept_batch, close_fds = _fdpass.accept_batch, _fdpass.close_fds

    def setup():
        listener.connect(k)
        return (), {}

    def take_all() -> None:
        n = accept_batch(fd, buf)
        close_fds(buf, 0, n)
        assert n == k

    benchmark.pedantic(take_all, setup=setup, rounds=200 if k <= 16 else 40, iterations=1, warmup_rounds=2)
    benchmark.extra_info["connections_per_round"] = k


@pytest.mark.benchmark(group="accept")
@pytest.mark.parametrize("k", PENDING)
def test_accept_python_loop(benchmark, listener: Listener, k: int) -> None:
    accept = listener.sock.accept

    def setup():
        listener.connect(k)
        return (), {}

    def take_all() -> None:
        n = 0
        while True:
            try:
                conn, _ = accept()
            except BlockingIOError:
                break
            conn.close()
            n += 1
        assert n == k

    benchmark.pedantic(take_all, setup=setup, rounds=200 if k <= 16 else 40, iterations=1, warmup_rounds=2)
    benchmark.extra_info["connections_per_round"] = k

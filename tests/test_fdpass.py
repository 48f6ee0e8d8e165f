"""The hot path's descriptor calls (``dispatch._fdpass``), on real descriptors and socketpairs."""

from __future__ import annotations

import array
import os
import socket

import pytest

from dispatch import _fdpass


def _open(count: int) -> list[int]:
    return [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(count)]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_close_fds_closes_runs_and_only_the_given_descriptors() -> None:
    fds = _open(9)
    keep = fds[3], fds[6]  # holes in the runs: must stay open
    given = [fd for fd in fds if fd not in keep]
    given.sort()
    _fdpass.close_fds(array.array("i", given))
    assert [fd for fd in fds if _is_open(fd)] == list(keep)
    for fd in keep:
        os.close(fd)


def test_send_fds_closes_exactly_what_it_sent() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        fds = _open(6)
        sent = array.array("i", [fds[0], fds[1], fds[2], fds[4]])  # a run, then a gap
        assert _fdpass.send_fds(a.fileno(), sent, 0, 4, None, 0, True)
        assert [fd for fd in fds if _is_open(fd)] == [fds[3], fds[5]]
        data, got, _ = _fdpass.recv_fds(b.fileno())
        assert len(got) == 4 and all(_is_open(fd) for fd in got)
        for fd in [*got, fds[3], fds[5]]:
            os.close(fd)


def test_unread_bytes_counts_what_the_peer_has_not_read() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with a, b:
        assert _fdpass.unread_bytes(a.fileno()) == 0
        a.send(b"x" * 10)
        a.send(b"y" * 10)
        queued = _fdpass.unread_bytes(a.fileno())
        assert queued > 0
        b.recv(100)
        assert 0 < _fdpass.unread_bytes(a.fileno()) < queued
        b.recv(100)
        assert _fdpass.unread_bytes(a.fileno()) == 0
    with pytest.raises(OSError):
        _fdpass.unread_bytes(a.fileno())  # closed: -1

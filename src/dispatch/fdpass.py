"""Fast descriptor passing, usable on its own.

These are the primary's hot-path calls, exposed with a friendly surface. They
work on any ``AF_UNIX`` socket and take either socket objects or raw file
descriptors. Compared with ``socket.send_fds``/``socket.recv_fds`` they make
no Python object per descriptor on the sending side, release the GIL around
the syscall, and close every descriptor of a truncated message.
"""

from __future__ import annotations

import array
import socket
from collections.abc import Iterable

from dispatch._fdpass import CTRUNC, DONTWAIT, SCM_MAX_FD, accept_batch, close_fds
from dispatch._fdpass import recv_fds as _recv_fds
from dispatch._fdpass import send_fds as _send_fds

__all__ = [
    "CTRUNC", "DONTWAIT", "SCM_MAX_FD", "accept_batch", "close_fds", "send_fds", "recv_fds",
]


def _fileno(sock: socket.socket | int) -> int:
    return sock if isinstance(sock, int) else sock.fileno()


def send_fds(
    sock: socket.socket | int,
    fds: Iterable[int] | array.array[int],
    data: bytes = b"\0",
    *,
    flags: int = 0,
    close_sent: bool = False,
) -> bool:
    """Send up to 253 descriptors with ``data`` in one ``sendmsg``.

    Returns ``False`` instead of blocking when ``flags=DONTWAIT`` (or the socket
    is non-blocking) and the socket is full; raises ``OSError`` on failure.
    """
    buf = fds if isinstance(fds, array.array) and fds.typecode == "i" else array.array("i", fds)
    return _send_fds(_fileno(sock), buf, 0, len(buf), data, flags, close_sent)


def recv_fds(
    sock: socket.socket | int, bufsize: int = 4096, maxfds: int = SCM_MAX_FD, *, flags: int = 0
) -> tuple[bytes, list[int], int] | None:
    """Receive one message: ``(data, fds, msg_flags)``; ``None`` if it would block.

    Descriptors arrive close-on-exec. On ``MSG_CTRUNC`` the descriptors that
    did arrive are closed and ``fds`` is empty; check ``msg_flags & CTRUNC``.
    """
    return _recv_fds(_fileno(sock), bufsize, maxfds, flags)

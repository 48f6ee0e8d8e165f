"""Binding the listening sockets, with errors that name the address."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import stat
from typing import Any

from dispatch.config import Address


class BindError(OSError):
    """An address could not be bound; the message names it."""


def bind(address: Address, backlog: int, reserve_only: bool = False) -> socket.socket:
    """A non-blocking listening socket on ``address``.

    With ``reserve_only`` the socket is bound with ``SO_REUSEPORT`` but does not
    listen: it holds the port (and resolves port 0) while each worker binds
    its own ``SO_REUSEPORT`` listener beside it. The kernel only balances over
    listening sockets, so the reservation never receives a connection.
    """
    try:
        if address.family == socket.AF_UNIX:
            _remove_stale_unix_socket(address.host)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: str | tuple[Any, ...] = address.host
        else:
            family, target = _resolve(address)
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if reserve_only:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(target)
            if not reserve_only:
                sock.listen(backlog)
        except BaseException:
            sock.close()
            raise
    except OSError as exc:
        if isinstance(exc, BindError):
            raise
        raise BindError(exc.errno, f"cannot listen on {address}: {exc.strerror or exc}") from None
    sock.setblocking(False)
    return sock


def bound_name(sock: socket.socket) -> str:
    """``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH`` of a bound socket."""
    name = sock.getsockname()
    if sock.family == socket.AF_UNIX:
        return f"unix:{name}"
    if sock.family == socket.AF_INET6:
        return f"[{name[0]}]:{name[1]}"
    return f"{name[0]}:{name[1]}"


def remove_unix_path(sock: socket.socket) -> None:
    """Unlink the path of a unix listener we created (on shutdown)."""
    if sock.family != socket.AF_UNIX or sock.fileno() < 0:
        return
    with contextlib.suppress(OSError):
        os.unlink(sock.getsockname())


def _resolve(address: Address) -> tuple[int, tuple[Any, ...]]:
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, address.family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise BindError(errno.EADDRNOTAVAIL, f"cannot resolve {address}: {exc.strerror}") from None
    family, _, _, _, sockaddr = infos[0]
    return family, sockaddr


def _remove_stale_unix_socket(path: str) -> None:
    """A socket file left by a dead server is removed; a live one is an error."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise BindError(errno.EADDRINUSE, f"cannot listen on unix:{path}: a non-socket file is there")
    # Non-blocking: a listener whose backlog is full and that never accepts
    # would block a plain connect() forever; on a unix socket it fails at
    # once with EAGAIN instead, which still means someone listens there.
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        err = probe.connect_ex(path)
    finally:
        probe.close()
    if err == errno.ECONNREFUSED:
        os.unlink(path)
    elif err in (errno.EAGAIN, errno.EINPROGRESS):
        raise BindError(errno.EADDRINUSE, f"cannot listen on unix:{path}: another server is "
                        "listening there (busy: its backlog is full)")
    elif err == 0:
        raise BindError(errno.EADDRINUSE, f"cannot listen on unix:{path}: another server is listening there")
    # Anything else: let bind() report what is wrong.

"""Who is on the other end of a connection: its PROXY header's client, or the socket's peer.

:mod:`dispatch.proxy_gate` records the address a PROXY header named, by descriptor,
before the runner sees the connection (and clears it for one without), so a number the
kernel reuses for a later connection never carries an old address. Runners, the web
bridge and handlers read it here; with the PROXY protocol off the table stays empty and a
look-up costs one truth test.
"""

from __future__ import annotations

import socket

from dispatch.proxy_protocol import Address

_clients: dict[int, Address] = {}


def record(fd: int, source: Address | None) -> None:
    """Connection ``fd`` came from ``source`` (None: from its socket's peer)."""
    if source is None:
        _clients.pop(fd, None)
    else:
        _clients[fd] = source


def proxied(fd: int) -> Address | None:
    """The address a PROXY header gave connection ``fd``, or None."""
    return _clients.get(fd) if _clients else None


def client_address(sock: socket.socket) -> object:
    """The client's address: from its PROXY header if it had one, else ``getpeername()``
    (None when there is none, or the connection is already gone)."""
    if _clients:
        real = _clients.get(sock.fileno())
        if real is not None:
            return real
    try:
        return sock.getpeername()
    except OSError:
        return None

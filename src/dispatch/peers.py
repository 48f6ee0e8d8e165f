"""Who is on the other end of a connection: its PROXY header's client, or the socket's peer.

:mod:`dispatch.proxy_gate` records the address a PROXY header named, by descriptor,
before the runner sees the connection (and clears it for one without), so a number the
kernel reuses for a later connection never carries an old address. Runners, the web
bridge and handlers read it here; with the PROXY protocol off the table stays empty and a
look-up costs one truth test.
"""

from __future__ import annotations

from typing import Any, Protocol

from dispatch.proxy_protocol import Address


class Socket(Protocol):
    """A ``socket.socket``, or asyncio's ``transport.get_extra_info("socket")``."""

    def fileno(self) -> int: ...
    def getpeername(self) -> Any: ...

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


def client_address(sock: Socket) -> Any:
    """The client's address: from its PROXY header if it had one, else ``getpeername()``
    (None when there is none, or the connection is already gone).

    Plain handlers get it as ``addr`` and web apps as the ASGI client; coroutine and
    protocol handlers ask with ``dispatch.client_address(writer.get_extra_info("socket"))``.
    """
    if _clients:
        real = _clients.get(sock.fileno())
        if real is not None:
            return real
    try:
        return sock.getpeername()
    except OSError:
        return None

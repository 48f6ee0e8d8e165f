"""HAProxy's agent-check: a TCP port that answers each connection with one line and closes.

HAProxy (``agent-check agent-port N agent-inter 2s``) connects, reads a line and acts on
its words: ``up``/``down`` set the operational state, ``ready``/``drain``/``maint`` the
administrative one, ``N%`` the weight. :func:`reply` chooses the line from the server's
state; :class:`AgentServer` serves it from the primary's epoll loop.

Nothing is read from the client and nothing waits: each accepted connection gets the line,
a FIN and a close at once, so an idle client, garbage, or a flood costs one accept each
(at most 16 per loop pass), never a slot held open.

HAProxy keeps a ``drain`` or ``maint`` an agent said (perhaps the previous process on this
port, during a deploy) until an agent says ``ready`` — and ``ready`` also ends a
``maint`` or ``drain`` set from HAProxy's own CLI (measured with HAProxy 2.6). So the agent
says ``ready`` only for ``READY_WINDOW`` seconds after it starts answering ``up`` (at start,
after maintenance): long enough for every balancer polling it to clear what it said before,
short enough that an operator's own ``set server ... state maint`` holds afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from dispatch.listeners import bind, bound_name
from dispatch.side_server import SideServer
from dispatch.values import Address

log = logging.getLogger("dispatch")

#: Seconds the agent says ``ready`` after it goes (back) to ``up``: several of HAProxy's
#: default ``agent-inter`` (2 s), for every balancer that polls it.
READY_WINDOW = 30.0


@dataclass(frozen=True)
class Status:
    """What the agent reports: stopping, in maintenance, and the workers' load (None when
    no worker is ready)."""

    stopping: bool
    maintenance: bool
    load: float | None


class Replies:
    """Chooses each line; pure but for remembering when it last went to ``up``."""

    def __init__(self, weight: Callable[[float], int], window: float = READY_WINDOW) -> None:
        self._weight = weight
        self._window = window
        self._ready_until: float | None = None  # None: not answering up now

    def line(self, status: Status, now: float) -> bytes:
        """``maint`` once stopping (the listeners are about to close); ``drain`` in
        maintenance or with no worker ready; else ``up N%`` with the load's weight, with
        ``ready`` during the window after each return to ``up``."""
        if status.stopping or status.maintenance or status.load is None:
            self._ready_until = None
            return b"maint\n" if status.stopping else b"drain\n"
        if self._ready_until is None:
            self._ready_until = now + self._window
        words = "up ready" if now < self._ready_until else "up"
        return f"{words} {self._weight(status.load)}%\n".encode()


class AgentServer(SideServer):
    """Answers every connection on ``address`` with a line for ``status()`` and closes it.

    Binds and listens at once (``BindError`` names the address); serves once ``attach()``
    has put its listener into the owner's epoll loop.
    """

    kind = "agent"

    def __init__(self, address: Address, status: Callable[[], Status], weight: Callable[[float], int],
                 backlog: int = 128, listener: socket.socket | None = None) -> None:
        """``listener``: one already bound (an upgrade hands its predecessor's over)."""
        self.status = status
        self.replies = Replies(weight)
        super().__init__(listener if listener is not None else bind(address, backlog))
        self._address = bound_name(self.listener)
        self.answered = 0

    @property
    def address(self) -> str:
        """What was bound, ``HOST:PORT`` (port 0 resolved)."""
        return self._address

    def __str__(self) -> str:
        return self._address

    def fds(self) -> list[int]:
        """Every descriptor this owns (a forked worker closes them)."""
        return [self.listener.fileno()] if self.listener.fileno() >= 0 else []

    def tick(self, now: float) -> None:
        """Resume accepting after a pause (``now`` is ``time.monotonic()``)."""
        self._resume_accepting(now)

    def close(self) -> None:
        """Close the listener. Safe to call twice."""
        self.stop_listening()

    def _accepted(self, sock: socket.socket) -> None:
        with sock:
            self._answer(sock)

    def _answer(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            line = self.replies.line(self.status(), time.monotonic())
        except Exception:
            log.exception("agent: computing the answer failed")
            return
        with contextlib.suppress(OSError):
            sock.send(line, socket.MSG_NOSIGNAL)  # a few bytes: a fresh socket's buffer takes them
            sock.shutdown(socket.SHUT_WR)
            # Unread input would turn the close into a reset that can beat our line to the reader.
            sock.recv(4096)
        self.answered += 1

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
import errno
import logging
import select
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from dispatch.health.server import Register, Unregister
from dispatch.listeners import bind, bound_name
from dispatch.values import Address

log = logging.getLogger("dispatch")

_ACCEPT_BATCH = 16  # per readiness event; epoll is level-triggered, the rest waits a turn
_ACCEPT_PAUSE = 1.0  # seconds without accepting after EMFILE and the like
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
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


class AgentServer:
    """Answers every connection on ``address`` with a line for ``status()`` and closes it.

    Binds and listens at once (``BindError`` names the address); serves once ``attach()``
    has put its listener into the owner's epoll loop.
    """

    def __init__(self, address: Address, status: Callable[[], Status], weight: Callable[[float], int],
                 backlog: int = 128, listener: socket.socket | None = None) -> None:
        """``listener``: one already bound (an upgrade hands its predecessor's over)."""
        self.status = status
        self.replies = Replies(weight)
        self.listener = listener if listener is not None else bind(address, backlog)
        self.listener.setblocking(False)
        self._address = bound_name(self.listener)
        self._register: Register | None = None
        self._unregister: Unregister | None = None
        self._listening = False
        self._accept_resume_at = 0.0
        self.answered = 0

    @property
    def address(self) -> str:
        """What was bound, ``HOST:PORT`` (port 0 resolved)."""
        return self._address

    def __str__(self) -> str:
        return self._address

    def attach(self, register: Register, unregister: Unregister) -> None:
        """Start serving from the owner's epoll loop."""
        self._register, self._unregister = register, unregister
        self._listen()

    def fds(self) -> list[int]:
        """Every descriptor this owns (a forked worker closes them)."""
        return [self.listener.fileno()] if self.listener.fileno() >= 0 else []

    def tick(self, now: float) -> None:
        """Resume accepting after a pause (``now`` is ``time.monotonic()``)."""
        if self._accept_resume_at and now >= self._accept_resume_at:
            self._accept_resume_at = 0.0
            self._listen()

    def close(self) -> None:
        """Close the listener. Safe to call twice."""
        self.stop_listening()
        self.listener.close()

    def stop_listening(self) -> None:
        """Take no new clients (another process serves the port now)."""
        if self._listening and self._unregister is not None:
            self._unregister(self.listener.fileno())
        self._listening = False

    def _listen(self) -> None:
        if self._register is not None and not self._listening and self.listener.fileno() >= 0:
            self._register(self.listener.fileno(), select.EPOLLIN, self._on_listener)
            self._listening = True

    def _on_listener(self, events: int) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    # The listener stays readable: stop watching it instead of spinning.
                    log.error("agent: accept failed: %s; pausing for %gs", exc, _ACCEPT_PAUSE)
                    assert self._unregister is not None
                    self._unregister(self.listener.fileno())
                    self._listening = False
                    self._accept_resume_at = time.monotonic() + _ACCEPT_PAUSE
                    return
                continue  # ECONNABORTED and friends: that client is gone
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

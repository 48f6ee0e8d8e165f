"""HAProxy's agent-check: a TCP port that answers each connection with one line and closes.

HAProxy (``agent-check agent-port N agent-inter 2s``) connects, reads a line and acts on
its words: ``up``/``down`` set the operational state, ``ready``/``drain``/``maint`` the
administrative one, ``N%`` the weight. :func:`reply` chooses the line from the server's
state; :class:`AgentServer` serves it from the primary's epoll loop.

Nothing is read from the client and nothing waits: each accepted connection gets the line,
a FIN and a close at once, so an idle client, garbage, or a flood costs one accept each
(at most 16 per loop pass), never a slot held open. ``ready`` is in every normal answer
because HAProxy keeps a ``drain`` or ``maint`` an agent said (perhaps the previous process
on this port, during a deploy) until an agent says ``ready``; it also ends a ``maint`` set
from HAProxy's own CLI, so take a server out through dispatch (``SIGUSR1``), not HAProxy,
when the agent is on.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import select
import socket
import time
from collections.abc import Callable

from dispatch.health.server import Register, Unregister
from dispatch.listeners import bind, bound_name
from dispatch.values import Address

log = logging.getLogger("dispatch")

_ACCEPT_BATCH = 16  # per readiness event; epoll is level-triggered, the rest waits a turn
_ACCEPT_PAUSE = 1.0  # seconds without accepting after EMFILE and the like
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def reply(*, stopping: bool, maintenance: bool, load: float | None, weight: Callable[[float], int]) -> bytes:
    """The agent's line: ``maint`` once stopping (the listeners are about to close),
    ``drain`` in maintenance or with no worker ready (``load`` None), else
    ``up ready N%`` with the weight of ``load``."""
    if stopping:
        return b"maint\n"
    if maintenance or load is None:
        return b"drain\n"
    return f"up ready {weight(load)}%\n".encode()


class AgentServer:
    """Answers every connection on ``address`` with ``answer()`` and closes it.

    Binds and listens at once (``BindError`` names the address); serves once ``attach()``
    has put its listener into the owner's epoll loop.
    """

    def __init__(self, address: Address, answer: Callable[[], bytes], backlog: int = 128) -> None:
        self.answer = answer
        self.listener = bind(address, backlog)
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
        if self._listening and self._unregister is not None:
            self._unregister(self.listener.fileno())
        self._listening = False
        self.listener.close()

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
            line = self.answer()
        except Exception:
            log.exception("agent: computing the answer failed")
            return
        with contextlib.suppress(OSError):
            sock.send(line, socket.MSG_NOSIGNAL)  # a few bytes: a fresh socket's buffer takes them
            sock.shutdown(socket.SHUT_WR)
            # Unread input would turn the close into a reset that can beat our line to the reader.
            sock.recv(4096)
        self.answered += 1

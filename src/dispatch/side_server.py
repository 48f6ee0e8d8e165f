"""The accepting part of the primary's small servers (health, probe, agent, control).

Each serves a listening socket from the primary's epoll loop, off the dispatch hot path:
at most ``ACCEPT_BATCH`` accepts per readiness event (the loop is level-triggered, the rest
waits a turn), a pause of ``ACCEPT_PAUSE`` seconds after EMFILE and the like (the listener
stays readable: watching it would spin), and ``stop_listening()`` when another primary has
taken the socket over. A subclass says what to do with each client in ``_accepted``.
"""

from __future__ import annotations

import errno
import logging
import select
import socket
import time
from collections.abc import Callable

log = logging.getLogger("dispatch")

Callback = Callable[[int], None]
Register = Callable[[int, int, Callback], None]
Unregister = Callable[[int], None]

ACCEPT_BATCH = 16
ACCEPT_PAUSE = 1.0
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


class SideServer:
    """A listener accepted from the owner's epoll loop; ``_accepted(sock)`` takes each client."""

    #: How the logs name it.
    kind = "server"

    def __init__(self, listener: socket.socket) -> None:
        #: The listening socket: options set on it are inherited by accepted clients.
        self.listener = listener
        self.listener.setblocking(False)
        self._register: Register | None = None
        self._unregister: Unregister | None = None
        self._listening = False
        self._accept_resume_at = 0.0

    def attach(self, register: Register, unregister: Unregister) -> None:
        """Start serving from the owner's epoll loop."""
        self._register, self._unregister = register, unregister
        self._listen()

    def stop_listening(self) -> None:
        """Take no new clients (another process serves the socket now); answer the ones here."""
        if self._listening and self._unregister is not None:
            self._unregister(self.listener.fileno())
        self._listening = False
        self.listener.close()

    def _resume_accepting(self, now: float) -> None:
        """After a pause, accept again (``now`` is ``time.monotonic()``)."""
        if self._accept_resume_at and now >= self._accept_resume_at:
            self._accept_resume_at = 0.0
            self._listen()

    def _listen(self) -> None:
        if self._register is not None and not self._listening and self.listener.fileno() >= 0:
            self._register(self.listener.fileno(), select.EPOLLIN, self._on_listener)
            self._listening = True

    def _on_listener(self, events: int) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                sock, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    log.error("%s: accept failed: %s; pausing for %gs", self.kind, exc, ACCEPT_PAUSE)
                    assert self._unregister is not None
                    self._unregister(self.listener.fileno())
                    self._listening = False
                    self._accept_resume_at = time.monotonic() + ACCEPT_PAUSE
                    return
                continue  # ECONNABORTED and friends: that client is gone
            self._accepted(sock)

    def _accepted(self, sock: socket.socket) -> None:
        raise NotImplementedError

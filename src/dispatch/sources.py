"""Where a worker's connections come from: its control channel, or kernel listeners.

A source hands each new connection to the runner (``runner.start(fd)``) while
the runner has room, and pauses when it has none; the worker resumes it when
a connection finishes. ``close()`` stops it for good (drain).

- ``ChannelSource``: descriptors the primary passed on the control channel
  (user-space balancing). While paused, they wait unread in the channel, where
  the primary can take them back if this worker dies. In the kernel modes the
  same class reads the channel for the primary's requests only
  (``pause_when_full=False``).
- ``ListenerSource``: accepts on listeners of its own (``reuseport``) or one
  inherited from the primary (``shared``).
"""

from __future__ import annotations

import array
import asyncio
import logging
import os
import select
import socket
from collections.abc import Callable
from typing import Protocol

from dispatch import _fdpass, protocol
from dispatch.runners import Runner

log = logging.getLogger("dispatch.worker")

#: Most descriptors taken from one recvmsg or one accept batch.
BATCH = 64
#: How long accepts pause after an error (EMFILE...): the listener stays readable.
ACCEPT_BACKOFF = 0.1


class Source(Protocol):
    """Connections for the runner; the worker pauses, resumes and closes it."""

    paused: bool
    closed: bool

    def resume(self) -> None:
        """Take connections again (nothing once closed)."""
        ...

    def pause(self) -> None:
        """Take no connections until ``resume``."""
        ...

    def close(self) -> None:
        """Take no connections ever again."""
        ...


class ChannelSource:
    """Reads the control channel: ``Fds`` go to the runner, ``Drain`` and EOF to ``drain``.

    Descriptors that the kernel dropped in transit (``MSG_CTRUNC``, or fewer
    than the message announced) are reported to ``lost`` after the ones that
    did arrive were closed: their credits must come back to the primary.
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        channel: socket.socket,
        runner: Runner,
        *,
        worker_id: int,
        lost: Callable[[int], None],
        drain: Callable[[str], None],
        pause_when_full: bool,
        one_per_pass_below: int = 0,
    ) -> None:
        """``one_per_pass_below``: while the runner holds fewer connections than this, take
        one message per pass of the loop (``one_per_message_below``: the primary sends them
        one per message then, so the rest wait unread where they can still be moved)."""
        self.paused = True
        self.closed = False
        self.dropped = 0  # descriptors lost in transit
        self._loop = loop
        self._fd = channel.fileno()
        self._start = runner.start
        self._room = runner.room
        self._runner = runner
        self._worker_id = worker_id
        self._lost = lost
        self._drain = drain
        self._pause_when_full = pause_when_full
        self._one_per_pass_below = one_per_pass_below

    def resume(self) -> None:
        if not self.closed:
            self.paused = False
            self._loop.add_reader(self._fd, self._on_readable)

    def pause(self) -> None:
        self.paused = True
        self._loop.remove_reader(self._fd)

    def close(self) -> None:
        """Stop reading; the channel itself stays open for the worker's reports."""
        if not self.paused:
            self.pause()
        self.closed = True

    def _on_readable(self) -> None:
        # What queued while the loop ran is taken in one pass, as a listener's backlog is in
        # one accept batch: a pass of the loop per message cost the worker more than the
        # connections themselves at saturation (one wakeup per one or two descriptors). At
        # most BATCH descriptors and messages per pass, never more than the runner has room for: what
        # cannot start now stays unread, where the primary sees it (skip_busy) and can take
        # it back.
        taken = messages = 0
        most = 1 if self._runner.active < self._one_per_pass_below else BATCH
        while taken < BATCH and messages < most and not self.closed:
            if self._pause_when_full and self._room() <= 0:
                # Full since the last message (a plain handler's only thread took a request that
                # arrived later): what waits could not start here, so it stays where it can move.
                self.pause()
                return
            got = _fdpass.recv_fds(self._fd, BATCH)
            if got is None:
                return
            data, fds, flags = got
            if not data:
                self.close()
                self._drain("the primary closed the channel")
                return
            messages += 1
            taken += self._take(data, fds, flags)

    def sealed(self) -> bool:
        """True once the other end will send nothing more (the primary shut the shared queue
        down for writing when it began to stop): what is still in it ends with end-of-file."""
        poller = select.poll()
        poller.register(self._fd, select.POLLRDHUP)
        return any(events & select.POLLRDHUP for _, events in poller.poll(0))

    def _take(self, data: bytes, fds: list[int], flags: int) -> int:
        """One message from the primary; how many descriptors went to the runner."""
        try:
            message = protocol.decode_from(data, protocol.TO_WORKER)
        except protocol.ProtocolError as exc:
            for fd in fds:
                os.close(fd)
            log.error("worker %d: bad message from the primary: %s", self._worker_id, exc)
            return 0
        if isinstance(message, protocol.Fds):
            if flags & _fdpass.CTRUNC or len(fds) != message.count:
                lost = message.count - len(fds)
                self.dropped += lost
                log.error("worker %d: %d descriptors were dropped in transit (RLIMIT_NOFILE?)", self._worker_id, lost)
                self._lost(lost)
            for fd in fds:
                self._start(fd)
            return len(fds)
        if isinstance(message, protocol.Drain):
            self._drain("asked by the primary")
        return 0


class ListenerSource:
    """Accepts on kernel listeners, at most as many connections as the runner has room for."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        listeners: list[socket.socket],
        runner: Runner,
        *,
        worker_id: int,
        reuseport: bool,
        backlog: int,
        log_error: Callable[..., None],
    ) -> None:
        """``reuseport``: replace each listener the primary reserved with one of our own.

        ``log_error(kind, message, *args)`` logs an accept failure, throttled.
        """
        if reuseport:
            listeners = [reuseport_listener(sock, backlog) for sock in listeners]
        for sock in listeners:
            sock.setblocking(False)
        self.listeners = listeners
        self.paused = True
        self.closed = False
        self._loop = loop
        self._start = runner.start
        self._room = runner.room
        self._worker_id = worker_id
        self._log_error = log_error
        self._accepted = array.array("i", bytes(4 * BATCH))

    def resume(self) -> None:
        if not self.closed:
            self.paused = False
            for sock in self.listeners:
                self._loop.add_reader(sock.fileno(), self._on_readable, sock)

    def pause(self) -> None:
        self.paused = True
        for sock in self.listeners:
            self._loop.remove_reader(sock.fileno())

    def close(self) -> None:
        """Stop accepting and close the listeners: with reuseport, the kernel hashes
        new connections to the other workers' listeners from now on."""
        if not self.paused:
            self.pause()
        self.closed = True
        for sock in self.listeners:
            sock.close()

    def _resume_if_room(self) -> None:
        if self.paused and not self.closed and self._room() > 0:
            self.resume()

    def _on_readable(self, sock: socket.socket) -> None:
        limit = min(self._room(), BATCH)
        if limit <= 0:
            self.pause()
            return
        try:
            count = _fdpass.accept_batch(sock.fileno(), self._accepted, limit)
        except OSError as exc:
            # EMFILE and the like: the listener stays readable, so back off instead of spinning.
            self._log_error("accept", "worker %d: accept failed: %s; pausing accepts for 0.1s", self._worker_id, exc)
            if not self.paused:
                self.pause()
                self._loop.call_later(ACCEPT_BACKOFF, self._resume_if_room)
            return
        for i in range(count):
            self._start(self._accepted[i])
        if self._room() <= 0 and not self.paused:
            self.pause()


def reuseport_listener(reserved: socket.socket, backlog: int) -> socket.socket:
    """This worker's own SO_REUSEPORT listener on the address the primary reserved."""
    address = reserved.getsockname()
    sock = socket.socket(reserved.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if reserved.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(address)
    sock.listen(backlog)
    reserved.close()
    return sock

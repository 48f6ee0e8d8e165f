"""The primary's event loop: one epoll, a callback per descriptor, a wakeup pipe, signals.

Nothing here knows about workers or connections. The primary registers the
listeners, each worker's channel and pidfd, and the health server's sockets,
and calls ``poll`` in a loop. Signals and ``request()`` from other threads
queue a request and write a byte to the wakeup pipe, so the loop handles them
between two polls, never inside a signal handler.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
from collections.abc import Callable, Mapping
from typing import Any

from dispatch.logs import FailureLog

log = logging.getLogger("dispatch")

IN = select.EPOLLIN
OUT = select.EPOLLOUT
ERR = select.EPOLLERR | select.EPOLLHUP

Callback = Callable[[int], None]
#: ``poller(epoll_fd, timeout)``: the events a fast path left to the callbacks, or None
#: when it does not apply now (then the reactor polls itself).
Poller = Callable[[int, float], "list[tuple[int, int]] | None"]


class WaitFailed(OSError):
    """A poller's wait on the epoll itself failed: raised from ``poll`` as ``epoll.poll``'s
    own failure would be (any other error of a poller is logged and the reactor polls)."""
#: Events taken from one epoll_wait (the rest come on the next): a small buffer per poll
#: instead of select.epoll's default of 1,023 entries.
_MAX_EVENTS = 64


class Reactor:
    """An epoll loop with callbacks; ``modify``/``unregister`` tolerate vanished descriptors."""

    def __init__(self, failures: FailureLog | None = None) -> None:
        self._epoll = select.epoll()
        self._callbacks: dict[int, Callback] = {}
        self._failures = failures or FailureLog(log)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._requests: list[object] = []
        self._on_requests: Callable[[list[object]], None] | None = None
        self._saved_signals: dict[int, Any] = {}
        self._saved_wakeup_fd: int | None = None
        self._poller: Poller | None = None
        self.register(self._wake_r, IN, self._on_wakeup)

    # ------------------------------------------------------------ descriptors
    def register(self, fd: int, events: int, callback: Callback) -> None:
        self._epoll.register(fd, events)
        self._callbacks[fd] = callback

    def unregister(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)

    def modify(self, fd: int, events: int) -> None:
        """Change what we wait for on ``fd``; one that is no longer registered (closed or
        unregistered on an error path) is ignored, as trio does."""
        if fd not in self._callbacks:
            return
        try:
            self._epoll.modify(fd, events)
        except (FileNotFoundError, ValueError):
            self._callbacks.pop(fd, None)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            self._callbacks.pop(fd, None)

    def registered(self, fd: int) -> bool:
        return fd in self._callbacks

    def fds(self) -> list[int]:
        """Descriptors the reactor itself owns (a forked child closes them)."""
        return [self._epoll.fileno(), self._wake_r, self._wake_w]

    # ------------------------------------------------------------ running
    def set_poller(self, poller: Poller | None) -> None:
        """Let ``poller`` wait on our epoll instead of us, handling some events itself (the
        dispatcher's listeners, in C) and leaving the rest to the callbacks."""
        self._poller = poller

    def poll(self, timeout: float) -> None:
        """Wait up to ``timeout`` seconds and run the callbacks of what is ready. A
        callback that raises is logged and the loop goes on: a bug in one handler must
        not take every worker down with it."""
        callbacks = self._callbacks
        ready = None
        if self._poller is not None:
            try:
                ready = self._poller(self._epoll.fileno(), timeout)
            except WaitFailed:
                raise
            except Exception:
                self._failures.error("poller", "the fast path of the primary failed", exc_info=True)
                timeout = 0.0  # its time has passed: take what is ready and go on
        if ready is None:
            ready = self._epoll.poll(timeout, _MAX_EVENTS)
        for fd, events in ready:
            callback = callbacks.get(fd)
            if callback is not None:
                try:
                    callback(events)
                except Exception:
                    self._failures.error("event", "an event handler of the primary failed", exc_info=True)

    # ------------------------------------------------------------ requests and signals
    def on_requests(self, handler: Callable[[list[object]], None]) -> None:
        """``handler(requests)`` runs in the loop with the requests queued since last time."""
        self._on_requests = handler

    def request(self, request: object) -> None:
        """Queue a request for the loop; safe from a signal handler or another thread."""
        self._requests.append(request)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def install_signal_handlers(self, requests: Mapping[int, object]) -> None:
        """Each signal in ``requests`` queues its request; needs the main thread."""

        def on_signal(signum: int, frame: object) -> None:
            self._requests.append(requests[signum])

        for signum in requests:
            self._saved_signals[signum] = signal.signal(signum, on_signal)
        self._saved_wakeup_fd = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def restore_signal_handlers(self) -> None:
        if self._saved_wakeup_fd is not None:
            signal.set_wakeup_fd(self._saved_wakeup_fd)
            self._saved_wakeup_fd = None
        for signum, previous in self._saved_signals.items():
            signal.signal(signum, previous)
        self._saved_signals.clear()

    def _on_wakeup(self, events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        if self._requests and self._on_requests is not None:
            requests, self._requests = self._requests, []
            self._on_requests(requests)

    # ------------------------------------------------------------ teardown
    def close(self) -> None:
        """Restore the signals and close the epoll object and the pipe. Safe to call twice."""
        self.restore_signal_handlers()
        self._epoll.close()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        self._callbacks.clear()

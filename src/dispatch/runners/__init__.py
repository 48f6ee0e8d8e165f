"""How a worker serves a connection once it has its descriptor.

One runner per worker, chosen once at boot by ``dispatch.handlers.runner_for``:

- ``threads.ThreadRunner``: plain ``handler(conn, addr)`` in a thread pool;
- ``streams.StreamRunner``: ``async handler(reader, writer)`` on the loop;
- ``protocols.ProtocolRunner``: an ``asyncio.Protocol`` factory on the loop;
- ``web.AsgiRunner``, ``web.WsgiRunner``: ASGI and WSGI apps through uvicorn's
  protocol classes (``pip install 'dispatch[web]'``; imported only for them).

They share one small interface (``Runner``): a source calls ``start(fd)`` for
each connection while ``room()`` is positive, and the runner calls the
``done`` callback it was built with once per finished connection. The worker
turns those calls into credits for the primary. Around that, the worker awaits
``startup()`` before it says ``Ready``, calls ``drain()`` when it stops taking
connections, and awaits ``shutdown()`` after the last one of a graceful stop:
the hooks of an application that has a lifespan of its own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

from dispatch import _fdpass
from dispatch.config import Config
from dispatch.peers import client_address

# Every worker-side module logs as "dispatch.worker": the README documents that name.
log = logging.getLogger("dispatch.worker")

#: Called once per finished connection, on the loop.
Done = Callable[[], None]


class StartupFailed(Exception):
    """The application's own startup failed: a boot failure. Its error is logged already."""


class Runner(Protocol):
    """Serves connections with the user's handler.

    ``active`` counts the connections in hand (started and not yet done,
    whatever stage they are at).
    """

    active: int

    def limits(self, headroom: int) -> tuple[int, int]:
        """Fix the most connections held at once within ``headroom`` descriptors.

        Returns ``(capacity, max_batch)`` for the worker's ``Ready`` message.
        Called once, before the first ``start``.
        """
        ...

    def start(self, fd: int) -> None:
        """Take ownership of connection ``fd``; ``done`` is called when it is over."""
        ...

    def room(self) -> int:
        """How many more connections this runner can start now."""
        ...

    def close(self) -> None:
        """Stop whatever the runner owns (threads); the worker is exiting."""
        ...

    async def startup(self) -> None:
        """Before the worker says ``Ready``: start the application. Raising fails the boot."""
        ...

    def drain(self, graceful_timeout: float) -> None:
        """No connection will come any more: finish the ones in hand within ``graceful_timeout``."""
        ...

    async def shutdown(self) -> None:
        """After the last connection of a graceful stop: stop the application."""
        ...


class NoLifespan:
    """The lifecycle hooks of runners whose handler has no startup or shutdown of its own."""

    async def startup(self) -> None:
        """Nothing to start."""

    def drain(self, graceful_timeout: float) -> None:
        """Nothing to do: connections end when their handler returns."""

    async def shutdown(self) -> None:
        """Nothing to stop."""


class RunnerFactory(Protocol):
    """A runner class: ``(loop, handler, config, worker_id, done) -> Runner``."""

    def __call__(
        self,
        loop: asyncio.AbstractEventLoop,
        handler: Callable[..., Any],
        config: Config,
        worker_id: int,
        done: Done,
        family: int = 0,
    ) -> Runner: ...


class LoopRunner(NoLifespan):
    """Base of the runners whose connections are tasks on the worker's loop.

    Each connection is one task; the runner holds at most ``max_connections``
    of them (0: as many as the descriptor table allows).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handler: Callable[..., Any],
        config: Config,
        worker_id: int,
        done: Done,
        family: int = 0,
    ) -> None:
        self.active = 0
        self.capacity = 0
        self._family = family
        self._loop = loop
        self._handler = handler
        self._worker_id = worker_id
        self._done = done
        self._ssl = config.ssl
        self._max_connections = config.max_connections
        # The loop keeps only weak references to tasks: hold them until they end.
        self._tasks: set[asyncio.Task[None]] = set()
        self._forget = self._tasks.discard

    def limits(self, headroom: int) -> tuple[int, int]:
        """``max_connections`` within ``headroom``; batches as large as that (up to SCM_MAX_FD)."""
        self.capacity = min(self._max_connections or headroom, headroom)
        return self.capacity, min(self.capacity, _fdpass.SCM_MAX_FD)

    def room(self) -> int:
        """Capacity not yet taken: every connection in hand counts, whatever it is doing."""
        return self.capacity - self.active

    def start(self, fd: int) -> None:
        """Serve ``fd`` in a task of its own, at once."""
        self.active += 1
        task = self._loop.create_task(self._serve(fd))
        self._tasks.add(task)
        task.add_done_callback(self._forget)

    def close(self) -> None:
        """Nothing to stop: the loop's end cancels the tasks."""

    def _serve(self, fd: int) -> Coroutine[Any, Any, None]:
        """Serve connection ``fd``; at its end, ``active -= 1`` and call ``_done``.

        (Inline, not a helper: one call less per connection on the hot path.)
        """
        raise NotImplementedError


def adopt(fd: int, family: int) -> socket.socket:
    """A socket object for connection ``fd``, a non-blocking stream socket.

    ``family`` is the address family every connection of this worker has (0 when
    its listeners differ): given it, the object costs no system call, where
    ``socket.socket(fileno=fd)`` spends three finding out what we know.
    """
    if not family:
        return socket.socket(fileno=fd)
    proto = socket.IPPROTO_TCP if family in (socket.AF_INET, socket.AF_INET6) else 0
    return socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK, proto, fd)


def peer(sock: socket.socket) -> Any:
    """The client's address (its PROXY header's, if it had one), or None (a unix socket
    without a name, or already reset)."""
    return client_address(sock)

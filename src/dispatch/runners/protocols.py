"""``asyncio.Protocol`` factories (``dispatch.AsyncioProtocol``) on the worker's loop."""

from __future__ import annotations

import asyncio
import asyncio.selector_events
import socket
from collections.abc import Callable
from typing import Any

from dispatch.config import Config
from dispatch.runners import Done, LoopRunner, adopt, log


class ProtocolRunner(LoopRunner):
    """Each connection goes to the user's protocol on a transport of the worker's loop.

    The protocol owns the connection: it is done when its transport closes
    (``connection_lost``), or when it could not be started at all.

    Without TLS, on asyncio's own loop, the transport is made at once, the way
    the loop's own servers make it for a connection they accepted: no task, no
    coroutine, no future per connection. With TLS (the handshake must be
    awaited) or another loop, each connection goes through
    ``loop.connect_accepted_socket`` in a task.
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
        super().__init__(loop, handler, config, worker_id, done, family)
        # The constructor asyncio's selector loop calls for each connection its own
        # servers accept (private, stable since 3.7); None: use the public coroutine.
        self._make_transport: Callable[..., Any] | None = None
        if self._ssl is None and isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop):
            self._make_transport = getattr(loop, "_make_socket_transport", None)

    def start(self, fd: int) -> None:
        """Serve ``fd`` with a new protocol: at once, or in a task when TLS needs one."""
        if self._make_transport is None:
            super().start(fd)
            return
        self.active += 1
        try:
            sock = adopt(fd, self._family)
        except OSError as exc:
            log.debug("worker %d: connection failed before the protocol started: %s", self._worker_id, exc)
            _close_fd(fd)
            self._finish()
            return
        try:
            self._make_transport(sock, self._wrap(self._handler(), self._finish))
        except Exception:
            log.exception("worker %d: could not start the protocol for a connection", self._worker_id)
            sock.close()
            self._finish()

    def _finish(self) -> None:
        self.active -= 1
        self._done()

    @staticmethod
    def _wrap(protocol_: asyncio.BaseProtocol, finish: Callable[[], None]) -> asyncio.BaseProtocol:
        """The protocol, with ``connection_lost`` also calling ``finish``."""
        connection_lost = protocol_.connection_lost

        def lost(exc: Exception | None) -> None:
            try:
                connection_lost(exc)
            finally:
                finish()

        protocol_.connection_lost = lost  # type: ignore[method-assign]
        return protocol_

    async def _serve(self, fd: int) -> None:
        completed = False

        def complete() -> None:
            nonlocal completed
            if not completed:
                completed = True
                self._finish()

        def factory() -> asyncio.BaseProtocol:
            return self._wrap(self._handler(), complete)

        try:
            await self._loop.connect_accepted_socket(factory, adopt(fd, self._family), ssl=self._ssl)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("worker %d: connection failed before the protocol started: %s", self._worker_id, exc)
            complete()
        except Exception:
            log.exception("worker %d: could not start the protocol for a connection", self._worker_id)
            complete()


def _close_fd(fd: int) -> None:
    try:
        socket.close(fd)
    except OSError:
        pass

"""``asyncio.Protocol`` factories (``dispatch.AsyncioProtocol``) on the worker's loop."""

from __future__ import annotations

import asyncio
import socket

from dispatch.runners import LoopRunner, log


class ProtocolRunner(LoopRunner):
    """Each connection goes to ``loop.connect_accepted_socket(handler, sock)``.

    The user's protocol owns the connection: it is done when its transport
    closes (``connection_lost``), or when it could not be started at all.
    """

    async def _serve(self, fd: int) -> None:
        completed = False

        def complete() -> None:
            nonlocal completed
            if not completed:
                completed = True
                self.active -= 1
                self._done()

        def factory() -> asyncio.BaseProtocol:
            protocol_: asyncio.BaseProtocol = self._handler()
            connection_lost = protocol_.connection_lost

            def lost(exc: Exception | None) -> None:
                try:
                    connection_lost(exc)
                finally:
                    complete()

            protocol_.connection_lost = lost  # type: ignore[method-assign]
            return protocol_

        try:
            await self._loop.connect_accepted_socket(factory, socket.socket(fileno=fd), ssl=self._ssl)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("worker %d: connection failed before the protocol started: %s", self._worker_id, exc)
            complete()
        except Exception:
            log.exception("worker %d: could not start the protocol for a connection", self._worker_id)
            complete()

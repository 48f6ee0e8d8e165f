"""Coroutine handlers ``async handler(reader, writer)`` with asyncio streams, on the loop."""

from __future__ import annotations

import asyncio
from typing import Any

from dispatch.runners import LoopRunner, adopt, log, peer


class StreamRunner(LoopRunner):
    """Each connection is a task running the handler with a ``StreamReader``/``StreamWriter``.

    The writer is closed when the handler returns. A client that goes away is
    a debug line; anything else the handler raises is logged with its
    traceback and ends only that connection.
    """

    async def _serve(self, fd: int) -> None:
        loop = self._loop
        addr: Any = None
        try:
            sock = adopt(fd, self._family)
            addr = peer(sock)
            reader = asyncio.StreamReader(loop=loop)
            stream_protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
            transport, _ = await loop.connect_accepted_socket(
                lambda: stream_protocol, sock, ssl=self._ssl
            )
            writer = asyncio.StreamWriter(transport, stream_protocol, reader, loop)
            try:
                await self._handler(reader, writer)
            except (ConnectionError, TimeoutError) as exc:
                log.debug("worker %d: connection from %s ended: %s", self._worker_id, addr, exc or type(exc).__name__)
            except Exception:
                log.exception("worker %d: handler raised for connection from %s", self._worker_id, addr)
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except (OSError, asyncio.CancelledError):
                    pass
        except OSError as exc:
            log.debug("worker %d: connection from %s failed: %s", self._worker_id, addr, exc)
        finally:
            self.active -= 1
            self._done()

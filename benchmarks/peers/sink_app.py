"""A handler that does nothing: each connection is closed as soon as the worker has it.

``python -m dispatch benchmarks.peers.sink_app:app``: workers that cost next to nothing,
so the load on the primary (accept, pass, credits) is all that is left to measure.
"""

from __future__ import annotations

import asyncio

from dispatch import AsyncioProtocol


class Sink(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


app = AsyncioProtocol(Sink)

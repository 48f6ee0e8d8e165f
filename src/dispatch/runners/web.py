"""ASGI and WSGI apps on the worker's loop, with uvicorn's HTTP and WebSocket protocols.

Each connection goes to ``loop.connect_accepted_socket`` with uvicorn's HTTP protocol
(``dispatch.web.uvicorn_bridge``). It counts as active until its transport closes — also
after a WebSocket upgrade, which swaps the protocol — so credits, least-connections, health
and drain all see it. Around the connections:

- ``startup()``: the app's lifespan startup, before the worker says ``Ready``; a failure
  is a boot failure (``StartupFailed``). ``Date`` is refreshed once a second from then on.
- ``drain()``: responses say ``Connection: close`` from now on, connections idle for more
  than ``IDLE_GRACE`` close, in-flight requests finish; at the end of ``graceful_timeout``
  (less a reserve for the app's shutdown) WebSockets close with 1012 and the rest is closed.
- ``shutdown()``: the app's lifespan shutdown, once the connections are gone.

WSGI apps run through ``a2wsgi.WSGIMiddleware`` in a pool of ``threads`` threads.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

from dispatch.config import Config
from dispatch.runners import Done, LoopRunner, StartupFailed, adopt, log
from dispatch.web.uvicorn_bridge import UvicornApp, route_logs

#: A draining worker closes a keep-alive connection idle (no request in progress, nothing
#: read, no response finished) for this long. Shorter, and a client that sends its next
#: request just as we close sees an error.
IDLE_GRACE = 1.0
#: How often a draining worker looks for idle connections.
SWEEP_EVERY = 0.2
#: How often ``Date`` is refreshed.
TICK_EVERY = 1.0


class AsgiRunner(LoopRunner):
    """An ASGI 3 app (FastAPI, Starlette, ...) with its lifespan."""

    #: uvicorn's lifespan mode: "auto" runs it when the app supports it.
    lifespan: Literal["auto", "off"] = "auto"

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
        route_logs(config.access_log)
        self.app = UvicornApp(
            self.asgi_app(handler, config), loop=loop, lost=self._lost, http=config.http,
            lifespan=self.lifespan, proxy_headers=config.proxy_headers,
            forwarded_allow_ips=config.forwarded_allow_ips, access_log=config.access_log,
            keep_alive=config.client_timeout or None,
        )
        self._factory = self.app.protocol_factory
        self._connect = loop.connect_accepted_socket
        self._connecting: set[asyncio.Task[Any]] = set()  # the loop holds tasks weakly
        self._tick_timer: asyncio.TimerHandle | None = None
        self._sweep_timer: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None

    def asgi_app(self, handler: Callable[..., Any], config: Config) -> Any:
        """The ASGI app that serves requests: the handler itself."""
        return handler

    # ------------------------------------------------------------ connections
    def start(self, fd: int) -> None:
        """Hand ``fd`` to uvicorn's HTTP protocol; done when its transport closes."""
        self.active += 1
        task = self._loop.create_task(self._connect(self._factory, adopt(fd, self._family), ssl=self._ssl))
        self._connecting.add(task)
        task.add_done_callback(self._connected)

    def _connected(self, task: asyncio.Task[Any]) -> None:
        self._connecting.discard(task)
        if task.cancelled():
            return  # the loop is ending
        exc = task.exception()
        if exc is None:
            return  # the protocol owns the connection now; its connection_lost reports
        if isinstance(exc, (ConnectionError, TimeoutError, OSError)):
            log.debug("worker %d: connection failed before the protocol started: %s", self._worker_id, exc)
        else:
            log.error("worker %d: could not start a connection", self._worker_id, exc_info=exc)
        self._lost()

    def _lost(self) -> None:
        self.active -= 1
        self._done()

    # ------------------------------------------------------------ lifecycle
    async def startup(self) -> None:
        """The app's lifespan startup, and ``Date`` from now on."""
        if not await self.app.startup():
            raise StartupFailed("the application's startup failed")
        self._tick()

    def _tick(self) -> None:
        try:
            self.app.tick()
        finally:  # whatever it raised: stale Date headers for ever would be worse
            self._tick_timer = self._loop.call_later(TICK_EVERY, self._tick)

    def drain(self, graceful_timeout: float) -> None:
        """``Connection: close`` on every response from now on; close what is idle; at the
        end of ``graceful_timeout`` close WebSockets (1012) and whatever is left."""
        self.app.begin_drain()
        self._sweep()
        reserve = min(1.0, graceful_timeout / 4)  # for the app's lifespan shutdown
        self._deadline_timer = self._loop.call_later(graceful_timeout - reserve, self.app.shutdown_connections)

    def _sweep(self) -> None:
        try:
            self.app.close_idle(self._loop.time() - IDLE_GRACE)
        finally:
            if self.active:
                self._sweep_timer = self._loop.call_later(SWEEP_EVERY, self._sweep)

    async def shutdown(self) -> None:
        """The app's lifespan shutdown."""
        await self.app.shutdown()

    def close(self) -> None:
        """Stop the timers; the loop's end takes the connections."""
        for timer in (self._tick_timer, self._sweep_timer, self._deadline_timer):
            if timer is not None:
                timer.cancel()


class WsgiRunner(AsgiRunner):
    """A WSGI app (Flask, Django, ...) through a2wsgi, in a pool of ``threads`` threads."""

    lifespan: Literal["auto", "off"] = "off"  # WSGI has none

    def asgi_app(self, handler: Callable[..., Any], config: Config) -> Any:
        """``handler`` wrapped by ``a2wsgi.WSGIMiddleware``, made here, after the fork."""
        from a2wsgi import WSGIMiddleware

        self._wsgi = WSGIMiddleware(handler, workers=config.threads)
        return self._wsgi

    def close(self) -> None:
        """Stop the timers and the thread pool (a request still running dies with the process)."""
        super().close()
        self._wsgi.executor.shutdown(wait=False, cancel_futures=True)

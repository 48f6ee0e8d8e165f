"""Every use of uvicorn's internals, in one place, checked when this module is imported.

uvicorn has no documented entry point for a socket that is already accepted. What dispatch
relies on, all of it present since uvicorn 0.30 (``TESTED``):

- ``uvicorn.Config(app, ...)`` and ``config.load()``, which set ``http_protocol_class``,
  ``ws_protocol_class``, ``lifespan_class``, ``loaded_app`` and ``encoded_headers``;
- the HTTP and WebSocket protocol classes, built per connection as
  ``cls(config=, server_state=, app_state=, _loop=)`` and handed to
  ``loop.connect_accepted_socket``; the HTTP one builds the WebSocket one from
  ``config.ws_protocol_class`` on an upgrade and swaps it in with ``transport.set_protocol``;
- on HTTP protocols: ``connection_made/lost``, ``data_received``, ``on_response_complete``,
  ``shutdown()``, the keep-alive timer (``timeout_keep_alive``, ``timeout_keep_alive_task``,
  ``timeout_keep_alive_handler``), the current ``cycle`` (``response_started``,
  ``response_complete``, ``default_headers``) and, with httptools, the ``pipeline``;
- on WebSocket protocols: ``connection_lost`` and ``shutdown()`` (a close with code 1012);
- ``uvicorn.server.ServerState``: ``default_headers`` (read by each new response cycle),
  ``connections`` and ``tasks``;
- the lifespan classes: ``cls(config)``, ``await startup()``, ``should_exit``, ``state``,
  ``await shutdown()``. Never ``Server.startup()``: it calls ``sys.exit(3)`` on failure.

If an installed uvicorn lacks any of it, importing this module raises ``ImportError``
saying what changed and which versions work.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import time
from collections.abc import Callable
from email.utils import formatdate
from typing import Any, Literal

import uvicorn
from uvicorn.config import Config as UvicornConfig
from uvicorn.server import ServerState

from dispatch import peers

TESTED = "uvicorn>=0.30,<0.60"

#: Added to every response started while the worker drains: the client opens a new
#: connection (to another worker) for its next request, instead of racing our close.
CLOSE = (b"connection", b"close")

#: The per-connection constructor keywords (stable since uvicorn 0.22).
_PROTOCOL_KEYWORDS = ("config", "server_state", "app_state", "_loop")
_HTTP_METHODS = ("connection_made", "connection_lost", "data_received", "on_response_complete",
                 "shutdown", "timeout_keep_alive_handler")
_WS_METHODS = ("connection_made", "connection_lost", "shutdown")


def _problems_of(cls: Any, methods: tuple[str, ...], keywords: tuple[str, ...]) -> list[str]:
    name = f"{cls.__module__}.{cls.__qualname__}"
    found = [f"{name}.{method}() is gone" for method in methods if not callable(getattr(cls, method, None))]
    parameters = inspect.signature(cls.__init__).parameters
    found += [f"{name}() no longer takes {keyword}=" for keyword in keywords if keyword not in parameters]
    return found


def _check_shape() -> None:
    """Fail now, with what changed, rather than on the first request."""
    import importlib

    problems: list[str] = []
    state = ServerState()
    problems += [f"ServerState has no {attr}" for attr in ("default_headers", "connections", "tasks")
                 if not hasattr(state, attr)]
    config_keywords = ("app", "http", "ws", "lifespan", "interface", "log_config", "access_log",
                       "proxy_headers", "forwarded_allow_ips", "timeout_keep_alive")
    problems += _problems_of(UvicornConfig, ("load",), config_keywords)
    modules = ["uvicorn.protocols.http.h11_impl"]
    try:
        import httptools  # noqa: F401
    except ImportError:
        pass
    else:
        modules.append("uvicorn.protocols.http.httptools_impl")
    for module_name in modules:
        module = importlib.import_module(module_name)
        protocol = next((v for k, v in vars(module).items() if k.endswith("Protocol") and
                         inspect.isclass(v) and v.__module__ == module_name), None)
        cycle = getattr(module, "RequestResponseCycle", None)
        if protocol is None or cycle is None:
            problems.append(f"{module_name} has no protocol class or RequestResponseCycle")
            continue
        problems += _problems_of(protocol, _HTTP_METHODS, _PROTOCOL_KEYWORDS)
        problems += _problems_of(cycle, (), ("default_headers",))
    from uvicorn.protocols.websockets.auto import AutoWebSocketsProtocol

    if AutoWebSocketsProtocol is not None:
        problems += _problems_of(AutoWebSocketsProtocol, _WS_METHODS, _PROTOCOL_KEYWORDS[:3])
    from uvicorn.lifespan.off import LifespanOff
    from uvicorn.lifespan.on import LifespanOn

    for lifespan in (LifespanOn, LifespanOff):
        problems += _problems_of(lifespan, ("startup", "shutdown"), ("config",))
    if problems:
        raise ImportError(
            f"dispatch cannot drive uvicorn {uvicorn.__version__}: " + "; ".join(problems)
            + f". Install a version dispatch was tested with: pip install '{TESTED}'"
        )


_check_shape()


class UvicornApp:
    """One worker's app as uvicorn serves it: config, lifespan, server state, protocol classes.

    ``lost()`` is called exactly once per connection, when its transport closes — on the
    HTTP protocol, or on the WebSocket protocol that replaced it after an upgrade.
    """

    def __init__(self, app: Any, *, loop: asyncio.AbstractEventLoop, lost: Callable[[], None],
                 http: str, lifespan: Literal["auto", "off"], proxy_headers: bool, forwarded_allow_ips: str | None,
                 access_log: bool, keep_alive: float | None) -> None:
        """``keep_alive``: seconds a connection may stay silent before its first request and
        between requests (None: no limit)."""
        self.config = config = UvicornConfig(
            app, http=http, ws="auto", lifespan=lifespan, interface="asgi3", log_config=None,
            access_log=access_log, proxy_headers=proxy_headers,
            forwarded_allow_ips=forwarded_allow_ips,
            timeout_keep_alive=keep_alive if keep_alive is not None else 86400,  # type: ignore[arg-type]
        )
        config.load()  # probes app() for a factory: a real app raises TypeError, ignored
        self.state = ServerState()
        self.draining = False
        self.http_class = _tracked_http(config.http_protocol_class, lost, loop.time, keep_alive is not None)
        if config.ws_protocol_class is not None:  # the HTTP protocol reads it per connection
            config.ws_protocol_class = _tracked_ws(config.ws_protocol_class, lost)
        self.lifespan = config.lifespan_class(config)
        #: The protocol factory for ``loop.connect_accepted_socket``: one call per connection.
        self.protocol_factory: Callable[[], asyncio.Protocol] = functools.partial(
            self.http_class, config=config, server_state=self.state,
            app_state=self.lifespan.state, _loop=loop)

    # ------------------------------------------------------------ lifecycle
    async def startup(self) -> bool:
        """Run the app's lifespan startup; False if it failed (uvicorn logged why)."""
        self.tick()
        await self.lifespan.startup()
        return not self.lifespan.should_exit

    async def shutdown(self) -> None:
        """Wait for request tasks that outlived their connection, then the lifespan shutdown."""
        if self.state.tasks:
            await asyncio.wait(set(self.state.tasks))
        await self.lifespan.shutdown()

    def tick(self) -> None:
        """Refresh the headers every response starts with: ``Date``, ``Server``, and while
        draining ``Connection: close``. Call once a second."""
        headers = list(self.config.encoded_headers)
        if self.config.date_header:
            headers.insert(0, (b"date", formatdate(time.time(), usegmt=True).encode()))
        if self.draining:
            headers.append(CLOSE)
        self.state.default_headers = headers

    # ------------------------------------------------------------ draining
    def begin_drain(self) -> None:
        """Every response not started yet says ``Connection: close`` — those of requests in
        progress or pipelined too (their cycle took the headers when it was made)."""
        self.draining = True
        self.tick()
        headers = self.state.default_headers
        for protocol in list(self.state.connections):
            cycles = [getattr(protocol, "cycle", None)]
            cycles += [cycle for cycle, _ in getattr(protocol, "pipeline", ())]
            for cycle in cycles:
                if cycle is not None and not cycle.response_started:
                    cycle.default_headers = headers

    def close_idle(self, quiet_since: float) -> None:
        """Close HTTP connections with no request in progress and no bytes read or response
        finished since ``quiet_since`` (loop time). A client writes its next request as soon
        as it has read a response: one idle for a moment may have a request on the wire."""
        for protocol in list(self.state.connections):
            if not isinstance(protocol, self.http_class):
                continue
            cycle = protocol.cycle
            if cycle is not None and not cycle.response_complete or getattr(protocol, "pipeline", None):
                continue
            if protocol.dispatch_active_at <= quiet_since:
                protocol.shutdown()

    def shutdown_connections(self) -> None:
        """The graceful time is up: WebSockets close with 1012 (service restart), idle HTTP
        connections close, busy ones close after their response."""
        for protocol in list(self.state.connections):
            try:
                protocol.shutdown()
            except Exception:
                logging.getLogger("dispatch.worker").exception("closing a connection failed")

    @property
    def open_connections(self) -> int:
        """Connections uvicorn knows of (HTTP and WebSocket)."""
        return len(self.state.connections)


def _tracked_http(base: Any, lost: Callable[[], None], clock: Callable[[], float],
                  first_bytes_timeout: bool) -> Any:
    """``base`` (uvicorn's HTTP protocol class) that reports its end and its last activity."""

    class TrackedHTTP(base):  # type: ignore[misc]
        dispatch_active_at = 0.0  # loop time of the last bytes read or response finished

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            _use_proxied_client(self, transport)
            self.dispatch_active_at = clock()
            if first_bytes_timeout:
                # uvicorn arms this timer only after a response: a client that never sends
                # its first request would hold the connection (and its credit) for ever.
                # data_received() cancels it.
                self.timeout_keep_alive_task = self.loop.call_later(
                    self.timeout_keep_alive, self.timeout_keep_alive_handler)

        def data_received(self, data: bytes) -> None:
            self.dispatch_active_at = clock()
            super().data_received(data)

        def on_response_complete(self) -> None:
            self.dispatch_active_at = clock()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                lost()

    TrackedHTTP.__qualname__ = TrackedHTTP.__name__ = f"Tracked{base.__name__}"
    return TrackedHTTP


def _tracked_ws(base: Any, lost: Callable[[], None]) -> Any:
    """``base`` (uvicorn's WebSocket protocol class) that reports its end."""

    class TrackedWS(base):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # Connection: close (draining) is for HTTP responses, not a 101 handshake.
            headers = getattr(self, "default_headers", None)
            if headers is not None and CLOSE in headers:
                self.default_headers = [h for h in headers if h != CLOSE]
            extra = getattr(self, "extra_headers", None)  # the legacy websockets protocol
            if extra is not None and ("connection", "close") in extra:
                self.extra_headers = [h for h in extra if h != ("connection", "close")]

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            super().connection_made(transport)
            _use_proxied_client(self, transport)

        def connection_lost(self, exc: Exception | None) -> None:
            try:
                super().connection_lost(exc)
            finally:
                lost()

    TrackedWS.__qualname__ = TrackedWS.__name__ = f"Tracked{base.__name__}"
    return TrackedWS


def _use_proxied_client(protocol: Any, transport: asyncio.BaseTransport) -> None:
    """The client a PROXY header named, as ``scope["client"]`` (and WSGI's ``REMOTE_ADDR``):
    uvicorn's protocols take ``self.client`` from the socket's peer in ``connection_made``."""
    sock = transport.get_extra_info("socket")
    real = peers.proxied(sock.fileno()) if sock is not None else None
    if real is not None:
        protocol.client = (real[0], real[1])


def route_logs(access_log: bool) -> None:
    """Send uvicorn's log (an app's traceback, a failed startup, bad requests) where
    dispatch's goes, unless the application configured logging itself."""
    ours = logging.getLogger("dispatch")
    theirs = logging.getLogger("uvicorn")
    if theirs.handlers or logging.getLogger().handlers or not ours.handlers:
        return
    theirs.handlers = list(ours.handlers)
    theirs.propagate = False
    level = ours.getEffectiveLevel()
    theirs.setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    if access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)

"""What the user hands us: load it, and decide once which runner serves it.

A handler is a plain function ``handler(conn, addr)``, a coroutine function
``async handler(reader, writer)``, an ``AsyncioProtocol`` wrapping a protocol
factory, an ASGI or WSGI app, or an import string ``"package.module:attr"``
naming one of those. ``runner_for`` looks at the loaded handler once, when the
worker boots (``dispatch.interfaces`` tells which kind it is); the worker never
asks again per connection.
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
from collections.abc import Callable
from typing import Any

from dispatch.config import Handler
from dispatch.interfaces import ASGI, HANDLER, WSGI, InterfaceError, interface_of
from dispatch.runners import RunnerFactory
from dispatch.runners.protocols import ProtocolRunner
from dispatch.runners.streams import StreamRunner
from dispatch.runners.threads import ThreadRunner


class HandlerImportError(ImportError):
    """The handler's import string could not be resolved in the worker."""


def load_handler(handler: Handler) -> Callable[..., Any]:
    """Resolve ``"package.module:attr"`` to the object, or return ``handler`` as is."""
    if not isinstance(handler, str):
        return handler
    module_name, _, attr_path = handler.partition(":")
    module = importlib.import_module(module_name)
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerImportError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise HandlerImportError(f"{handler!r} is not callable")
    loaded: Callable[..., Any] = target
    return loaded


def is_async_handler(handler: Callable[..., Any]) -> bool:
    """True for a coroutine function, or an object whose ``__call__`` is one."""
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
    )


class AsyncioProtocol:
    """Serve connections with an ``asyncio.Protocol`` factory on the worker's loop.

    ``dispatch.serve(AsyncioProtocol(MyProtocol), ...)``: each connection is
    handed to ``loop.connect_accepted_socket(MyProtocol, sock)``, so a custom
    protocol (or an existing asyncio server's protocol class) runs unchanged.
    """

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        if not callable(factory):
            raise TypeError("AsyncioProtocol needs a protocol factory")
        self.factory = factory

    def __call__(self) -> asyncio.BaseProtocol:
        return self.factory()


def runner_for(handler: Callable[..., Any], interface: str = "auto") -> RunnerFactory:
    """The runner that serves ``handler``: a web app's, or protocol, coroutine stream, or
    plain in threads. ``interface`` is the option's value (``auto``: detect)."""
    kind = interface_of(handler, interface)
    if kind == HANDLER:
        if isinstance(handler, AsyncioProtocol):
            return ProtocolRunner
        if is_async_handler(handler):
            return StreamRunner
        return ThreadRunner
    try:  # only now: raw handlers need none of it
        from dispatch.runners.web import AsgiRunner, WsgiRunner

        if kind == WSGI:
            import a2wsgi  # noqa: F401
    except ImportError as exc:
        raise InterfaceError(f"serving {handler!r} as an {kind.upper()} app needs the web extra: "
                             f"pip install 'dispatch[web]' ({exc})") from exc
    return AsgiRunner if kind == ASGI else WsgiRunner

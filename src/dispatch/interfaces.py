"""Which interface a loaded handler speaks: ASGI, WSGI, or one of dispatch's handler shapes.

Decided once, in the worker, after the handler is imported (``interface="auto"``), from
the object alone; nothing is called:

- ``asgi``: an ``async`` callable taking three arguments, ``(scope, receive, send)`` — a
  FastAPI or Starlette app, an ``async def app(scope, receive, send)`` — or a plain
  callable whose three parameters are named so (ASGI middleware that returns the
  awaitable);
- ``wsgi``: a callable with a ``wsgi_app`` attribute (Flask), or one taking two arguments
  named ``(environ, start_response)`` (Django's ``WSGIHandler``, most WSGI apps);
- ``handler``: ``dispatch.AsyncioProtocol``, ``async handler(reader, writer)``, or a plain
  ``handler(conn, addr)`` whose parameters are not named like WSGI's.

Anything else (``*args`` signatures, a class, a signature Python cannot read, an
``async`` callable with a count of arguments that fits nothing) is ambiguous:
``interface_of`` raises ``InterfaceError``, which names the option to pass.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

#: What ``interface_of`` returns.
ASGI, WSGI, HANDLER = "asgi", "wsgi", "handler"

_WSGI_FIRST = ("environ", "env", "environment")
_ASGI_NAMES = ("scope", "receive", "send")


class CannotServe(Exception):
    """The worker cannot serve this handler as configured; the message says why, in a line."""


class InterfaceError(CannotServe, TypeError):
    """The handler's interface cannot be told, or serving it needs packages that are missing."""


def interface_of(handler: Callable[..., Any], requested: str = "auto") -> str:
    """``asgi``, ``wsgi`` or ``handler``: ``requested`` unless it is ``auto``."""
    if requested != "auto":
        return requested
    from dispatch.handlers import AsyncioProtocol  # handlers imports this module

    if isinstance(handler, AsyncioProtocol):
        return HANDLER
    if inspect.isclass(handler):
        raise _ambiguous(handler, "it is a class, not an instance")
    if callable(getattr(handler, "wsgi_app", None)):
        return WSGI  # Flask, and apps built like it
    names = _positional_names(handler)
    if names is None:
        raise _ambiguous(handler, "its signature takes *args or cannot be read")
    if _is_async(handler):
        if len(names) == 3:
            return ASGI
        if len(names) == 2:
            return HANDLER  # async handler(reader, writer)
        raise _ambiguous(handler, f"it is async and takes {len(names)} arguments (ASGI takes 3, "
                                  "a stream handler 2)")
    if len(names) == 3 and tuple(names) == _ASGI_NAMES:
        return ASGI
    if len(names) == 2:
        if names[0] in _WSGI_FIRST or names[1] == "start_response":
            return WSGI
        return HANDLER  # handler(conn, addr)
    raise _ambiguous(handler, f"it takes {len(names)} arguments (WSGI and plain handlers take 2)")


def _is_async(handler: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
    )


def _positional_names(handler: Callable[..., Any]) -> list[str] | None:
    """The names of the positional parameters a call must fill (those without a default),
    or None for ``*args`` or a signature that cannot be read."""
    try:
        signature = inspect.signature(handler)  # bound: no self; follows __wrapped__
    except (TypeError, ValueError):
        return None
    names = []
    for parameter in signature.parameters.values():
        if parameter.kind is parameter.VAR_POSITIONAL:
            return None
        if (parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD)
                and parameter.default is parameter.empty):
            names.append(parameter.name)
    return names


def _ambiguous(handler: object, why: str) -> InterfaceError:
    return InterfaceError(
        f"cannot tell what {handler!r} is: {why}. Pass --interface asgi, wsgi or handler "
        "(interface= in serve()/Server)"
    )

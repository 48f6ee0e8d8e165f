"""The worker's event loop: asyncio's own, or uvloop (the ``loop`` option).

``auto`` is uvloop for web apps when it is installed and asyncio's loop for every
other handler, whose behaviour (and speed) stays what it was; ``uvloop`` asks for it
whatever the handler.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

from dispatch.interfaces import HANDLER, CannotServe

T = TypeVar("T")


def wants_uvloop(loop: str, interface: str) -> bool:
    """Whether the worker runs uvloop, for the ``loop`` option and the handler's interface."""
    if loop == "uvloop":
        if importlib.util.find_spec("uvloop") is None:
            raise CannotServe("loop='uvloop' needs the uvloop package: pip install uvloop")
        return True
    if loop == "asyncio" or interface == HANDLER:
        return False
    return importlib.util.find_spec("uvloop") is not None


def run(main: Coroutine[Any, Any, T], uvloop: bool) -> T:
    """Run ``main`` to its end on a new loop, as ``asyncio.run`` does."""
    if not uvloop:
        return asyncio.run(main)
    import uvloop as _uvloop

    return _uvloop.run(main)

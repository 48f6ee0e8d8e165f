"""dispatch: use every CPU core from one Python server.

A primary process owns the listening sockets, accepts connections and passes
each descriptor to one of N worker processes over a Unix socket
(``SCM_RIGHTS``). The same socket is the worker's control channel, which
carries readiness, heartbeats, health reports and drain requests.

    import dispatch

    def handler(conn, addr):
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\\r\\nContent-Length: 2\\r\\nConnection: close\\r\\n\\r\\nok")

    dispatch.serve(handler, workers=4, bind="127.0.0.1:8000")
"""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from dispatch.balance import ConnectionPolicy, LeastConnections, Policy, RoundRobin, Sticky
from dispatch.config import Address, Config, Handler
from dispatch.handlers import AsyncioProtocol
from dispatch.listeners import BindError
from dispatch.options import Options
from dispatch.peers import client_address
from dispatch.pidfile import PidfileError
from dispatch.primary import BootError, Server
from dispatch.protocol import ProtocolError

if TYPE_CHECKING:
    from typing_extensions import Unpack  # typing.Unpack is 3.11+; only type checkers need it

__version__ = "0.1.0"

__all__ = [
    "Address", "AsyncioProtocol", "BindError", "BootError", "Config", "ConnectionPolicy", "Handler",
    "LeastConnections", "PidfileError", "Policy", "ProtocolError", "RoundRobin", "Server", "Sticky",
    "client_address", "configure_logging", "serve", "__version__",
]

LOG_FORMAT = "%(asctime)s [%(process)d] %(levelname)s %(name)s: %(message)s"


def configure_logging(level: str = "info") -> None:
    """Log ``dispatch`` records to stderr, unless the application set up logging itself."""
    logger = logging.getLogger("dispatch")
    logger.setLevel(level.upper())
    if not logger.handlers and not logging.getLogger().handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(handler)


def serve(handler: Handler, **options: Unpack[Options]) -> None:
    """Serve ``handler`` on every core until SIGTERM/SIGINT; the options are ``Options``.

    ``handler`` is ``handler(conn, addr)`` (run in a thread pool of ``threads``
    per worker), ``async handler(reader, writer)`` (run on the worker's event
    loop), or an import string ``"package.module:attr"`` that each worker
    imports after it is forked. Bad options raise ``TypeError``/``ValueError``
    before anything is bound; an address that cannot be bound raises
    ``BindError``; workers that keep failing to boot raise ``BootError``.
    """
    server = Server(handler, **options)
    configure_logging(server.config.log_level)
    server.start(install_signal_handlers=True)
    code = server.serve_forever()
    if code:
        raise BootError(f"workers failed to boot; the primary stopped with exit code {code}")

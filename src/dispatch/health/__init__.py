"""The health endpoint: ``/cluster-health``, ``/metrics``, ``/healthz``, ``/readyz``.

The primary's one entry is :class:`HealthServer`. The rooms behind it:

- ``http``: HTTP/1.x request heads in, responses out, no sockets;
- ``server``: ``HTTPServer``, bounded and non-blocking inside the owner's
  epoll loop (clients, deadlines, eviction, ``EPOLLOUT``); knows routes only;
- ``source``: what the views may read of the primary, as Protocols;
- ``views``: ``/cluster-health``, ``/healthz``, ``/readyz``;
- :class:`ProbeServer`: ``/healthz`` and ``/readyz`` alone, on an address of their own;
- ``metrics``: ``/metrics``, with the optional ``prometheus_client``.
"""

from __future__ import annotations

import socket

from dispatch.config import Address
from dispatch.health.http import text
from dispatch.health.server import HTTPServer, Route
from dispatch.health.source import PrimaryView, WorkerView
from dispatch.health.views import ClusterHealthView, healthz, readyz
from dispatch.side_server import Register, Unregister

__all__ = ["HTTPServer", "HealthServer", "PrimaryView", "ProbeServer", "Register", "Unregister",
           "WorkerView"]


class HealthServer(HTTPServer):
    """Answers health and metrics requests about ``server`` on ``address``.

    Binds and listens at once (``BindError`` names the address); serves once
    ``attach()`` has put its sockets into the primary's epoll loop. See
    :class:`~dispatch.health.server.HTTPServer` for the bounds on clients.
    """

    def __init__(self, server: PrimaryView, address: Address, *, timeout: float = 5.0,
                 max_clients: int = 64, max_head: int = 8192, backlog: int = 128,
                 listener: socket.socket | None = None) -> None:
        self.server = server
        routes: dict[str, Route] = {
            "/cluster-health": ClusterHealthView(server),
            "/metrics": _metrics_route(server),
            "/healthz": healthz,
            "/readyz": lambda: readyz(server),
        }
        super().__init__(address, routes, timeout=timeout, max_clients=max_clients,
                         max_head=max_head, backlog=backlog, listener=listener)


class ProbeServer(HTTPServer):
    """Only ``/healthz`` and ``/readyz`` on ``address`` (``--probe``): what a load balancer
    or Kubernetes needs, reachable from them, without the internals of the health port."""

    kind = "probe port"

    def __init__(self, server: PrimaryView, address: Address, *, timeout: float = 5.0,
                 max_clients: int = 64, max_head: int = 8192, backlog: int = 128,
                 listener: socket.socket | None = None) -> None:
        routes: dict[str, Route] = {"/healthz": healthz, "/readyz": lambda: readyz(server)}
        super().__init__(address, routes, timeout=timeout, max_clients=max_clients,
                         max_head=max_head, backlog=backlog, listener=listener)


def _metrics_route(server: PrimaryView) -> Route:
    try:
        from dispatch.health.metrics import MetricsView
    except ImportError:  # an optional dependency: `pip install 'dispatch[metrics]'`
        return _no_metrics
    return MetricsView(server)


def _no_metrics() -> bytes:
    return text(501, "/metrics needs prometheus_client: pip install 'dispatch[metrics]'")


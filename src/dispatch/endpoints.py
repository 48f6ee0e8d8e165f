"""What the primary opens before anything is forked: listeners, the health, probe and agent
endpoints, the pidfile.

``open()`` either opens all of them or raises (``BindError``, ``PidfileError``)
with nothing left behind; ``close()`` undoes it and is safe to call twice.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from dispatch.config import Config
from dispatch.listeners import bind, bound_name, remove_unix_path
from dispatch.pidfile import Pidfile
from dispatch.systemd import listen_sockets

if TYPE_CHECKING:
    from dispatch.agent import AgentServer
    from dispatch.health import HealthServer, ProbeServer

log = logging.getLogger("dispatch")


class Endpoints:
    """The sockets and files a server owns for its whole life."""

    def __init__(self) -> None:
        self.listeners: list[socket.socket] = []
        self.health: HealthServer | None = None
        self.probe: ProbeServer | None = None
        self.agent: AgentServer | None = None
        self.pidfile: Pidfile | None = None

    def open(self, config: Config, server: Any) -> None:
        """Bind (or take systemd's sockets), start the health, probe and agent endpoints, write
        the pidfile."""
        try:
            self._open(config, server)
        except BaseException:
            self.close()
            raise

    def _open(self, config: Config, server: Any) -> None:
        reserve = config.balance == "reuseport"
        self.listeners = listen_sockets()
        if self.listeners and reserve:
            raise ValueError("balance='reuseport' cannot use sockets passed by systemd")
        if self.listeners:
            log.info("using %d listening sockets passed by systemd instead of binding", len(self.listeners))
        else:
            for address in config.addresses:
                self.listeners.append(bind(address, config.backlog, reserve_only=reserve))
        if config.health_address is not None:
            from dispatch.health import HealthServer

            self.health = HealthServer(server, config.health_address)
        if config.probe_address is not None:
            from dispatch.health import ProbeServer

            self.probe = ProbeServer(server, config.probe_address)
        if config.agent_address is not None:
            from dispatch.agent import AgentServer
            from dispatch.load import weight

            self.agent = AgentServer(config.agent_address, server.agent_status, weight)
        if config.pidfile:
            pidfile = Pidfile(config.pidfile)
            pidfile.create()
            self.pidfile = pidfile

    @property
    def addresses(self) -> list[str]:
        """The addresses actually bound, in the order given (port 0 resolved)."""
        return [bound_name(sock) for sock in self.listeners if sock.fileno() >= 0]

    def servers(self) -> list[HealthServer | ProbeServer | AgentServer]:
        """The small servers living in the primary's loop: health, probe, agent."""
        return [s for s in (self.health, self.probe, self.agent) if s is not None]

    def fds(self) -> list[int]:
        """Descriptors a worker must not keep (the health, probe and agent servers')."""
        return [fd for s in self.servers() for fd in s.fds()]

    def close_listeners(self) -> None:
        for sock in self.listeners:
            remove_unix_path(sock)
            sock.close()

    def close(self) -> None:
        self.close_listeners()
        for s in self.servers():
            s.close()
        if self.pidfile is not None:
            self.pidfile.remove()

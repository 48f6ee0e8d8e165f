"""What the primary opens before anything is forked: listeners, the health, probe and agent
endpoints, the pidfile, the control socket.

``open()`` either opens all of them or raises (``BindError``, ``PidfileError``)
with nothing left behind; ``close()`` undoes it and is safe to call twice.
"""

from __future__ import annotations

import logging
import socket
from typing import TYPE_CHECKING, Any

from dispatch.config import Config
from dispatch.control_socket import ControlServer, Handler
from dispatch.listeners import bind, bound_name, remove_unix_path
from dispatch.pidfile import Pidfile
from dispatch.systemd import listen_sockets

if TYPE_CHECKING:
    from dispatch.agent import AgentServer
    from dispatch.health import HealthServer, ProbeServer
    from dispatch.upgrade import Successor

log = logging.getLogger("dispatch")


class Endpoints:
    """The sockets and files a server owns for its whole life."""

    def __init__(self) -> None:
        self.listeners: list[socket.socket] = []
        self.health: HealthServer | None = None
        self.probe: ProbeServer | None = None
        self.agent: AgentServer | None = None
        self.pidfile: Pidfile | None = None
        self.control: ControlServer | None = None
        #: Leave unix sockets' files in place on close: another primary serves them.
        self.keep_paths = False

    def open(self, config: Config, server: Any, control: Handler | None = None,
             successor: Successor | None = None) -> None:
        """Bind (or take systemd's sockets, or those of the primary we upgrade), start the
        health, probe and agent endpoints, write the pidfile, create the control socket
        (``control`` answers)."""
        self.keep_paths = successor is not None  # until the old primary has handed over
        try:
            self._open(config, server, control, successor)
        except BaseException:
            self.close()
            raise

    def _open(self, config: Config, server: Any, control: Handler | None, successor: Successor | None) -> None:
        reserve = config.balance == "reuseport"
        self.listeners = listen_sockets()
        if self.listeners and reserve:
            raise ValueError("balance='reuseport' cannot use sockets passed by systemd")
        if self.listeners and successor is not None:
            log.info("upgrade: taking over %d listening sockets from primary %d", len(self.listeners), successor.parent)
        elif self.listeners:
            log.info("using %d listening sockets passed by systemd instead of binding", len(self.listeners))
        else:
            for address in config.addresses:
                self.listeners.append(bind(address, config.backlog, reserve_only=reserve))
        inherited = successor.others if successor is not None else {}
        inherited_health = successor.health if successor is not None else None
        if config.health_address is not None:
            from dispatch.health import HealthServer

            self.health = HealthServer(server, config.health_address, listener=inherited_health)
        elif inherited_health is not None:
            inherited_health.close()
        if config.probe_address is not None:
            from dispatch.health import ProbeServer

            self.probe = ProbeServer(server, config.probe_address, listener=inherited.pop("probe", None))
        if config.agent_address is not None:
            from dispatch.agent import AgentServer
            from dispatch.load import weight

            self.agent = AgentServer(config.agent_address, server.agent_status, weight,
                                     listener=inherited.pop("agent", None))
        for unused in inherited.values():  # the command line no longer asks for them
            unused.close()
        if config.pidfile:
            pidfile = Pidfile(config.pidfile)
            pidfile.create(replacing=successor.parent if successor is not None else None)
            self.pidfile = pidfile
        inherited_control = successor.control if successor is not None else None
        if config.control_path is not None and control is not None:
            self.control = ControlServer(config.control_path, control, listener=inherited_control)
        elif inherited_control is not None:
            inherited_control.close()

    @property
    def addresses(self) -> list[str]:
        """The addresses actually bound, in the order given (port 0 resolved)."""
        return [bound_name(sock) for sock in self.listeners if sock.fileno() >= 0]

    def servers(self) -> list[HealthServer | ProbeServer | AgentServer | ControlServer]:
        """The small servers living in the primary's loop: health, probe, agent, control."""
        return [s for s in (self.health, self.probe, self.agent, self.control) if s is not None]

    def side_listeners(self) -> dict[str, socket.socket]:
        """What an upgrade hands over besides the listeners: probe and agent, by name."""
        return {name: s.listener for name, s in (("probe", self.probe), ("agent", self.agent)) if s is not None}

    def fds(self) -> list[int]:
        """Descriptors a worker must not keep (the health, probe, agent and control servers')."""
        return [fd for s in self.servers() for fd in s.fds()]

    def handed_over(self) -> None:
        """A new primary serves our sockets now: take no more health, probe, agent or control
        clients, and leave every socket file to it."""
        self.keep_paths = True
        if self.control is not None:
            self.control.owns_path = False
        for s in self.servers():
            s.stop_listening()

    def taken_over(self) -> None:
        """We serve now (the old primary hands over): the socket files are ours to remove."""
        self.keep_paths = False
        if self.control is not None:
            self.control.owns_path = True

    def close_listeners(self) -> None:
        for sock in self.listeners:
            if not self.keep_paths:
                remove_unix_path(sock)
            sock.close()

    def close(self) -> None:
        self.close_listeners()
        for s in self.servers():
            s.close()
        if self.pidfile is not None:
            self.pidfile.remove()

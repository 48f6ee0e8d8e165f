"""What the control socket's commands do in the primary: answer now, or once the work is done.

``Commands.handle`` is the control server's handler. ``status`` answers at once;
``reload``, ``scale`` and ``upgrade`` start the work and answer when it is over
(a rolling restart complete or aborted and why, the workers ready, the new
primary serving or not and why), or when the request's ``timeout`` has passed;
``stop`` answers, then stops; ``drain``/``undrain`` answer at once. More commands plug
in with ``register``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from dispatch import control, ctl_protocol, supervisor
from dispatch.control_socket import Reply
from dispatch.health.views import ClusterHealth, ClusterHealthView

if TYPE_CHECKING:
    from dispatch.primary import Server

log = logging.getLogger("dispatch")

Command = Callable[[dict[str, Any], Reply], None]
#: A wait: None while not over, else the reply.
Check = Callable[[], "dict[str, Any] | None"]

_DEFAULT_WAIT = 300.0
_MAX_WAIT = 3600.0


class Status(ClusterHealth):
    """What ``status`` answers: ``/cluster-health``'s document and these."""

    workers_wanted: int  # the supervisor's target (scale changes it)
    restarting: bool  # a rolling restart is in progress
    last_reload: str | None  # "complete" or "aborted: why", None before the first
    stopping: bool
    upgrading: bool  # a new primary is starting (dispatch ctl upgrade, SIGUSR1)
    draining: str | None  # why /readyz says 503 while serving (maintenance, drain delay), or None


@dataclass
class _Waiter:
    reply: Reply
    check: Check
    deadline: float
    progress: Callable[[], str]


class Commands:
    """The commands of one primary, and the replies it still owes."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self._view = ClusterHealthView(server)
        self._waiters: list[_Waiter] = []
        self._upgrade_replies: list[Reply] = []
        self.commands: dict[str, Command] = {
            "status": self._status,
            "reload": self._reload,
            "scale": self._scale,
            "stop": self._stop,
            "upgrade": self._upgrade,
            "drain": self._maintenance,
            "undrain": self._maintenance,
        }

    def register(self, name: str, command: Command) -> None:
        """Add a command (``drain``, ``undrain``...): ``command(request, reply)``."""
        self.commands[name] = command

    # ------------------------------------------------------------ the control server's handler
    def handle(self, request: dict[str, Any], reply: Reply) -> None:
        command = self.commands.get(request["cmd"])
        if command is None:
            raise ctl_protocol.ProtocolError(
                f"unknown command {request['cmd'][:40]!r}; this primary knows {', '.join(sorted(self.commands))}")
        command(request, reply)

    def tick(self, now: float) -> None:
        """Answer the waits that are over or past their deadline."""
        for waiter in list(self._waiters):
            if not waiter.reply.open:
                self._waiters.remove(waiter)
                continue
            result = waiter.check()
            if result is None and now >= waiter.deadline:
                result = {"ok": False, "error": f"timed out; {waiter.progress()}"}
            if result is not None:
                self._waiters.remove(waiter)
                waiter.reply.send(result)

    # ------------------------------------------------------------ status
    def status(self) -> Status:
        """``/cluster-health``'s document, and what only an operator asks about."""
        sup = self.server.supervisor
        return {
            **self._view.document(),
            "workers_wanted": sup.workers,
            "restarting": sup.restarting,
            "last_reload": sup.last_restart or None,
            "stopping": sup.stopping,
            "upgrading": self.server.upgrading,
            "draining": self.server.draining_reason,
        }

    def _status(self, request: dict[str, Any], reply: Reply) -> None:
        reply.send({"ok": True, "status": self.status()})

    # ------------------------------------------------------------ drain, undrain
    def _maintenance(self, request: dict[str, Any], reply: Reply) -> None:
        """``drain``: /readyz 503 and the agent ``drain`` while serving on; ``undrain`` ends it."""
        if self.server.supervisor.stopping:
            raise ctl_protocol.ProtocolError("the primary is shutting down")
        self.server.control_now(control.Maintenance(request["cmd"] == "drain"))
        reply.send({"ok": True, "draining": self.server.draining_reason})

    # ------------------------------------------------------------ reload
    def _reload(self, request: dict[str, Any], reply: Reply) -> None:
        sup = self.server.supervisor
        if sup.stopping:
            raise ctl_protocol.ProtocolError("the primary is shutting down")
        finished = sup.restarts_finished
        self.server.control_now(control.Reload())

        def check() -> dict[str, Any] | None:
            if sup.stopping:
                return {"ok": False, "error": "the primary is shutting down"}
            if sup.restarting or sup.restarts_finished == finished:
                return None
            pids = [w.pid for w in sup.live() if w.state == supervisor.READY]
            if sup.last_restart == "complete":
                return {"ok": True, "outcome": "complete", "workers": pids}
            return {"ok": False, "outcome": "aborted", "error": f"rolling restart {sup.last_restart}",
                    "workers": pids}

        self._wait(request, reply, check, lambda: f"{len(sup.restart_queue)} workers still to replace")

    # ------------------------------------------------------------ scale
    def _scale(self, request: dict[str, Any], reply: Reply) -> None:
        sup = self.server.supervisor
        if sup.stopping:
            raise ctl_protocol.ProtocolError("the primary is shutting down")
        target = ctl_protocol.parse_scale(request.get("n"), sup.workers)
        if target != sup.workers:
            self.server.control_now(control.Scale(target - sup.workers))

        def ready() -> list[int]:
            return [w.pid for w in sup.live() if w.state == supervisor.READY and w.worker_id < sup.workers]

        def check() -> dict[str, Any] | None:
            if sup.stopping:
                return {"ok": False, "error": "the primary is shutting down"}
            pids = ready()
            return {"ok": True, "workers": sup.workers, "pids": pids} if len(pids) >= sup.workers else None

        self._wait(request, reply, check, lambda: f"{len(ready())} of {sup.workers} workers ready")

    # ------------------------------------------------------------ stop
    def _stop(self, request: dict[str, Any], reply: Reply) -> None:
        fast = bool(request.get("fast"))
        reply.send({"ok": True, "pid": os.getpid(), "stopping": "fast" if fast else "graceful",
                    "graceful_timeout": self.server.config.graceful_timeout})
        self.server.stop(graceful=not fast)  # queued: the reply leaves first

    # ------------------------------------------------------------ upgrade
    def _upgrade(self, request: dict[str, Any], reply: Reply) -> None:
        why = self.server.start_upgrade()
        if why:
            raise ctl_protocol.ProtocolError(why)
        self._upgrade_replies.append(reply)

    def upgrade_done(self, old_pid: int, new_pid: int) -> None:
        self._answer_upgrade({"ok": True, "old_pid": old_pid, "new_pid": new_pid})

    def upgrade_failed(self, why: str, new_pid: int) -> None:
        self._answer_upgrade({"ok": False, "error": f"upgrade failed: {why}; the old primary keeps serving",
                              "pid": os.getpid(), "new_pid": new_pid})

    def _answer_upgrade(self, message: dict[str, Any]) -> None:
        replies, self._upgrade_replies = self._upgrade_replies, []
        for reply in replies:
            reply.send(message)

    # ------------------------------------------------------------ waiting
    def _wait(self, request: dict[str, Any], reply: Reply, check: Check, progress: Callable[[], str]) -> None:
        timeout = request.get("timeout", _DEFAULT_WAIT)
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not 0 <= timeout <= _MAX_WAIT:
            raise ctl_protocol.ProtocolError(f'"timeout" must be a number of seconds from 0 to {_MAX_WAIT:g}')
        result = check()
        if result is not None:
            reply.send(result)
            return
        self._waiters.append(_Waiter(reply, check, time.monotonic() + timeout, progress))

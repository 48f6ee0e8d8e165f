"""Upgrading the primary in place: a new primary, started from the same command line,
takes the sockets over only once its workers are ready.

The old primary (``Upgrader``) forks and execs ``sys.executable`` with the
command line it was started with, so the code on disk now runs: dispatch, the
application and Python itself. The child inherits the listening sockets as
systemd passes them (``LISTEN_FDS``, ``LISTEN_PID``, descriptors from 3), which
``systemd.listen_sockets()`` already takes, and, named in ``$DISPATCH_UPGRADE``,
the health and control listeners and the write end of a pipe. The new primary
(``Successor``) binds nothing, forks its workers, and once they are all ready
starts accepting (and answering health and control requests) and writes to the
pipe. Only then does the old one stop accepting, drain its workers and exit;
meanwhile both accept from the same listening sockets, so a connection waiting
in a backlog is taken by one or the other, never lost. If the pipe closes
first (the new primary exited: a module that fails to import, a bad option) or
nothing comes within the timeout (it is killed), the old primary goes on as if
nothing happened.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence

from dispatch.processes import describe_exit, reap
from dispatch.reactor import IN

log = logging.getLogger("dispatch")

ENV = "DISPATCH_UPGRADE"
_FIRST_FD = 3  # SD_LISTEN_FDS_START
_READY = b"R"

#: Side listeners handed over besides health and control: the probe and agent ports.
OTHER_SIDES = ("probe", "agent")

Register = Callable[[int, int, Callable[[int], None]], None]
Unregister = Callable[[int], None]


def command_line() -> list[str]:
    """How this process was started, with the interpreter's path (the same file, new code)."""
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
    return [sys.executable, *argv[1:]]


# ================================================================ the new primary's side
class Successor:
    """What a primary started by an upgrade inherited besides its listeners."""

    def __init__(self, parent: int, health: socket.socket | None, control: socket.socket | None,
                 ready_fd: int, others: dict[str, socket.socket] | None = None) -> None:
        self.parent = parent
        self.health = health
        self.control = control
        #: The other side listeners handed over, by name: "probe", "agent".
        self.others = others or {}
        self._ready_fd = ready_fd
        #: True once the old primary was told: from then on the sockets' paths are ours.
        self.reported = False

    @classmethod
    def from_environment(cls) -> Successor | None:
        """The inheritance named in ``$DISPATCH_UPGRADE``, if our parent left us one.

        The variable is removed, so our own children never mistake it for theirs.
        """
        value = os.environ.pop(ENV, "")
        if not value:
            return None
        fields = dict(item.partition("=")[::2] for item in value.split(","))
        try:
            parent, ready = int(fields["parent"]), int(fields["ready"])
            health = int(fields["health"]) if fields.get("health") else None
            control = int(fields["control"]) if fields.get("control") else None
            others = {name: int(fields[name]) for name in OTHER_SIDES if fields.get(name)}
        except (KeyError, ValueError):
            log.warning("ignoring %s=%r: not what an upgrading primary writes", ENV, value)
            return None
        if parent != os.getppid():
            return None  # inherited by accident (a copy of the environment): not ours
        try:
            for fd in (ready, health, control, *others.values()):
                if fd is not None:
                    os.set_inheritable(fd, False)
            return cls(parent, _socket(health), _socket(control), ready,
                       {name: sock for name, fd in others.items() if (sock := _socket(fd)) is not None})
        except OSError as exc:
            log.warning("ignoring %s=%r: %s", ENV, value, exc)
            return None

    def fds(self) -> list[int]:
        return [self._ready_fd] if self._ready_fd >= 0 else []

    def report_ready(self) -> None:
        """Tell the old primary we serve: it stops accepting and drains."""
        if self._ready_fd < 0:
            return
        try:
            os.write(self._ready_fd, _READY)
        except OSError as exc:
            log.warning("upgrade: cannot tell the old primary %d that we are ready: %s", self.parent, exc)
        finally:
            os.close(self._ready_fd)
            self._ready_fd = -1
        self.reported = True
        log.info("upgrade: all workers ready; the old primary %d hands over", self.parent)

    def close(self) -> None:
        if self._ready_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self._ready_fd)
            self._ready_fd = -1


def _socket(fd: int | None) -> socket.socket | None:
    if fd is None:
        return None
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


# ================================================================ the old primary's side
class Upgrader:
    """One upgrade at a time: start the new primary, wait for it, say how it went.

    ``on_ready(pid)`` runs when the new primary serves; ``on_failed(why)`` when it
    exited or timed out before (it was then killed and reaped); ``failed_pid`` names it.
    """

    def __init__(self, register: Register, unregister: Unregister, timeout: float,
                 on_ready: Callable[[int], None], on_failed: Callable[[str], None]) -> None:
        self._register, self._unregister = register, unregister
        self.timeout = timeout
        self._on_ready, self._on_failed = on_ready, on_failed
        self.pid = 0  # the new primary, while an upgrade is in progress
        self._pidfd = -1
        self._ready_r = -1
        self._deadline = 0.0
        self._ready = False
        self._why = ""
        self.failed_pid = 0

    @property
    def in_progress(self) -> bool:
        return self.pid != 0

    def fds(self) -> list[int]:
        return [fd for fd in (self._pidfd, self._ready_r) if fd >= 0]

    def start(self, listeners: Sequence[socket.socket], health: socket.socket | None,
              control: socket.socket | None, **others: socket.socket | None) -> None:
        """Fork and exec the new primary; ``OSError`` if it cannot be started. ``others``:
        more side listeners to hand over, by a name of ``OTHER_SIDES``."""
        ready_r, ready_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            sources = [s.fileno() for s in listeners]
            fields = [f"parent={os.getpid()}"]
            for name, sock in (("health", health), ("control", control), *others.items()):
                if sock is not None:
                    fields.append(f"{name}={_FIRST_FD + len(sources)}")
                    sources.append(sock.fileno())
            fields.append(f"ready={_FIRST_FD + len(sources)}")
            sources.append(ready_w)
            env = dict(os.environ, LISTEN_FDS=str(len(listeners)),
                       LISTEN_FDNAMES=":".join(["listener"] * len(listeners)))
            env[ENV] = ",".join(fields)
            argv = command_line()
            for handler in logging.getLogger().handlers + log.handlers:
                handler.flush()  # or the child would write the same buffered lines again
            pid = os.fork()
            if pid == 0:
                _exec_successor(argv, env, sources)
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
        except BaseException:
            os.close(ready_r)
            raise
        finally:
            os.close(ready_w)
        self.pid, self._pidfd, self._ready_r = pid, pidfd, ready_r
        self._ready, self._why = False, ""
        self._deadline = time.monotonic() + self.timeout
        self._register(ready_r, IN, self._on_pipe)
        self._register(pidfd, IN, self._on_exit)
        log.info("upgrade: started a new primary, pid %d: %s", pid, " ".join(argv))

    def tick(self, now: float) -> None:
        if self.pid and not self._ready and not self._why and now > self._deadline:
            self._why = f"new primary {self.pid} was not ready within {self.timeout:g}s; killed it"
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGKILL)  # its workers die with it (PR_SET_PDEATHSIG)

    def abandon(self) -> None:
        """We stop before it was ready: it must not outlive us half-started."""
        if self.pid and not self._ready:
            # SIGQUIT, a fast stop: it never served, so it has nothing to drain.
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGQUIT)
        self._close()

    def _on_pipe(self, events: int) -> None:
        try:
            data = os.read(self._ready_r, 64)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._unregister(self._ready_r)
        os.close(self._ready_r)
        self._ready_r = -1
        if data.startswith(_READY) and not self._why:
            self._ready = True
            pid = self.pid
            self._close()  # it is no longer ours to watch: we are the one leaving
            self._on_ready(pid)
        # Closed without a word: it is exiting; its pidfd says how.

    def _on_exit(self, events: int) -> None:
        status = reap(self.pid)
        if status is None:
            return
        why = self._why or f"new primary {self.pid} {describe_exit(status)} before it was ready"
        self.failed_pid = self.pid
        self._close()
        self._on_failed(why)

    def _close(self) -> None:
        for fd in (self._ready_r, self._pidfd):
            if fd >= 0:
                self._unregister(fd)
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._ready_r = self._pidfd = -1
        self.pid = 0


def _exec_successor(argv: list[str], env: dict[str, str], sources: list[int]) -> None:
    """In the forked child: put ``sources`` at 3, 4, ... and exec. Never returns."""
    try:
        # Copies above the targets first, so no source is overwritten before it is moved.
        copies = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, _FIRST_FD + len(sources)) for fd in sources]
        for target, fd in enumerate(copies, _FIRST_FD):
            os.dup2(fd, target, inheritable=True)
        env["LISTEN_PID"] = str(os.getpid())
        os.execve(argv[0], argv, env)
    except BaseException:
        pass
    os._exit(127)

"""systemd conventions: socket activation (``LISTEN_FDS``) and ``sd_notify``.

No dependency on libsystemd: both are small, documented protocols. See
sd_listen_fds(3) and sd_notify(3).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
import time

from dispatch.listeners import BindError

log = logging.getLogger("dispatch")

_FIRST_FD = 3  # SD_LISTEN_FDS_START
_FAMILIES = (socket.AF_INET, socket.AF_INET6, socket.AF_UNIX)


def listen_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed to this process, or ``[]``.

    Honoured only when ``LISTEN_PID`` is our pid, as the protocol requires. The
    variables are removed afterwards so that workers and children do not
    mistake the sockets for their own. Raises ``BindError`` (and takes none
    of them) unless every one is a listening TCP or unix stream socket.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not pid or not count or not pid.isdigit() or int(pid) != os.getpid():
        return []
    if not count.isdigit():
        raise BindError(errno.EINVAL, f"socket activation: LISTEN_FDS={count!r} is not a number")
    fds = range(_FIRST_FD, _FIRST_FD + int(count))
    # All checked before any is taken: the primary would otherwise wake for a
    # UDP or non-listening socket in a loop where accept() never succeeds.
    for fd in fds:
        check_listener(fd)
    sockets = []
    for fd in fds:
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


def check_listener(fd: int) -> None:
    """Raise ``BindError`` naming ``fd`` unless it is a listening stream socket we can serve."""
    problem = _listener_problem(fd)
    if problem:
        raise BindError(errno.EINVAL, f"socket activation: fd {fd} passed by systemd {problem}")


def _listener_problem(fd: int) -> str:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        return "is not open"
    if not stat.S_ISSOCK(mode):
        return "is not a socket"
    try:
        probe = socket.socket(fileno=fd)
    except OSError as exc:
        return f"cannot be inspected: {exc.strerror or exc}"
    try:
        family = probe.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        kind = probe.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        return f"cannot be inspected: {exc.strerror or exc}"
    finally:
        probe.detach()  # the descriptor stays as it was handed over
    if family not in _FAMILIES:
        return f"is an {_name(socket.AddressFamily, family)} socket; AF_INET, AF_INET6 or AF_UNIX is needed"
    if kind != socket.SOCK_STREAM:
        return f"is a {_name(socket.SocketKind, kind)} socket, not SOCK_STREAM (ListenStream=)"
    if listening != 1:
        return "is a socket that is not listening"
    return ""


def _name(enum: type, value: int) -> str:
    try:
        return str(enum(value).name)
    except ValueError:
        return str(value)


class Notifier:
    """Sends ``sd_notify`` messages to ``$NOTIFY_SOCKET``; does nothing without it."""

    def __init__(self, address: str | None = None) -> None:
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self._sock: socket.socket | None = None
        self._address = ""
        if address:
            # An address starting with "@" is in the abstract namespace.
            self._address = "\0" + address[1:] if address.startswith("@") else address
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, **fields: object) -> None:
        """``notify(READY=1, STATUS="4 workers")`` sends ``READY=1\\nSTATUS=4 workers``."""
        if self._sock is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._sock.sendto(message, self._address)
        except OSError as exc:
            log.warning("sd_notify to %s failed: %s", self._address.lstrip("\0"), exc)

    def reloading(self) -> None:
        # Type=notify-reload wants the monotonic time with RELOADING=1.
        self.notify(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)

    def fds(self) -> list[int]:
        return [self._sock.fileno()] if self._sock is not None else []

    def close(self) -> None:
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None


class Readiness:
    """Tells the service manager when the server is ready: once every worker first is,
    ``RELOADING=1`` when a rolling restart starts, and ``READY=1`` again when it ends."""

    def __init__(self, notifier: Notifier, balance: str) -> None:
        self._notifier = notifier
        self._balance = balance
        self._announced_ready = False
        self._reloading = False

    def workers_ready(self, ready: int, wanted: int) -> None:
        if not self._announced_ready and ready >= wanted:
            self._announced_ready = True
            self._ready(ready)

    def reload_started(self) -> None:
        self._notifier.reloading()
        self._reloading = True

    def tick(self, restarting: bool, ready: int) -> None:
        if self._reloading and not restarting:
            self._reloading = False
            self._ready(ready)

    def _ready(self, ready: int) -> None:
        self._notifier.notify(READY=1, STATUS=f"{ready} workers ready, balance={self._balance}")

"""systemd conventions: socket activation (``LISTEN_FDS``) and ``sd_notify``.

No dependency on libsystemd: both are small, documented protocols. See
sd_listen_fds(3) and sd_notify(3).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time

log = logging.getLogger("dispatch")

_FIRST_FD = 3  # SD_LISTEN_FDS_START


def listen_sockets() -> list[socket.socket]:
    """The listening sockets systemd passed to this process, or ``[]``.

    Honoured only when ``LISTEN_PID`` is our pid, as the protocol requires. The
    variables are removed afterwards so that workers and children do not
    mistake the sockets for their own.
    """
    pid = os.environ.get("LISTEN_PID")
    count = os.environ.get("LISTEN_FDS")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if not pid or not count or not pid.isdigit() or int(pid) != os.getpid():
        return []
    sockets = []
    for fd in range(_FIRST_FD, _FIRST_FD + int(count)):
        os.set_inheritable(fd, False)
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        sockets.append(sock)
    return sockets


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

"""What an operator can ask of a running primary: by a signal, or a call on ``Server``.

Requests are queued from signal handlers or other threads and carried out by
the primary's loop, between two polls.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass


@dataclass(frozen=True)
class Stop:
    """Stop serving: gracefully (drain in-flight connections) or at once."""

    graceful: bool = True


@dataclass(frozen=True)
class Reload:
    """Replace every worker, ``restart_batch`` at a time, without losing a connection."""


@dataclass(frozen=True)
class Scale:
    """``delta`` more workers, or fewer when negative (never below one)."""

    delta: int


@dataclass(frozen=True)
class Maintenance:
    """Say "not ready" to load balancers (``/readyz`` 503, agent ``drain``) while serving
    on, or stop saying it; ``on=None`` turns it over (the signal)."""

    on: bool | None = None


@dataclass(frozen=True)
class Upgrade:
    """Start a new primary from the same command line (new code on disk) and hand it the
    sockets once its workers are ready; if it fails, this one keeps serving."""


Request = Stop | Reload | Scale | Maintenance | Upgrade

#: The signals operators know (gunicorn's vocabulary).
SIGNALS: dict[int, Request] = {
    signal.SIGTERM: Stop(graceful=True),
    signal.SIGINT: Stop(graceful=True),
    signal.SIGQUIT: Stop(graceful=False),
    signal.SIGHUP: Reload(),
    signal.SIGUSR2: Reload(),
    signal.SIGTTIN: Scale(1),
    signal.SIGTTOU: Scale(-1),
    signal.SIGUSR1: Upgrade(),
    signal.SIGWINCH: Maintenance(None),
}


def resized_terminal() -> bool:
    """Whether a SIGWINCH may just be a terminal's resize: we are the foreground process
    group of a terminal on stdin, stdout or stderr. Such a SIGWINCH is not an operator's
    maintenance request (gunicorn ignores it the same way when not daemonized)."""
    for fd in (0, 1, 2):
        try:
            if os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp():
                return True
        except OSError:
            continue
    return False

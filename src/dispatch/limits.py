"""Resource limits the primary adjusts at start."""

from __future__ import annotations

import logging
import os
import resource


def raise_fd_limit() -> tuple[int, str]:
    """Raise the soft RLIMIT_NOFILE to the hard one: every connection is a descriptor,
    in the primary's table or in flight to a worker. Workers inherit it. Returns the
    log level and line that say what was done (logged once the listeners are bound,
    so that a bind error stays one line)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            return logging.WARNING, f"RLIMIT_NOFILE: cannot raise the soft limit {soft} to {target}: {exc}"
        return logging.INFO, f"RLIMIT_NOFILE: raised the soft limit from {soft} to the hard limit {target}"
    shown = "unlimited" if hard == resource.RLIM_INFINITY else hard
    return logging.INFO, f"RLIMIT_NOFILE: soft limit {soft}, hard limit {shown}"


def descriptors_free(reserve: int, transient: int = 0) -> int | None:
    """Descriptors this process may still open, less ``reserve`` kept aside for other uses.

    The reserve never takes more than half of what is free, so that a small
    RLIMIT_NOFILE still leaves room to serve. ``transient`` open descriptors are
    about to be closed and not counted. None when /proc cannot be read (EMFILE).
    """
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    try:
        in_use = len(os.listdir("/proc/self/fd")) - transient
    except OSError:
        return None
    free = max(0, soft - in_use)
    return free - min(reserve, free // 2)

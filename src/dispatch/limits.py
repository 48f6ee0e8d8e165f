"""Resource limits the primary adjusts at start."""

from __future__ import annotations

import logging
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

"""``primary_realtime``: the primary's loop runs under ``SCHED_FIFO``.

Every new connection passes through the primary, so on a machine whose cores
are all busy the primary's wait for a CPU is added to each one. A ``SCHED_FIFO``
thread runs the moment it wakes, ahead of every ordinary process. The policy
is set with ``SCHED_RESET_ON_FORK``, so the workers (and anything else forked)
start under the ordinary policy; the kernel's real-time throttling
(``kernel.sched_rt_runtime_us``, 95% of each second by default) bounds what
a primary that never sleeps could take. Only the thread that runs the loop is
changed, and it gets its old policy back when the loop ends.

Needs ``CAP_SYS_NICE`` or an ``RLIMIT_RTPRIO`` at least as high as the priority;
without it the primary logs why and runs as before.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

log = logging.getLogger("dispatch")


@dataclass(frozen=True)
class Previous:
    """The policy (with its ``SCHED_RESET_ON_FORK`` flag) and priority the thread had before."""

    policy: int
    priority: int


def run_realtime(priority: int) -> Previous | None:
    """Put the calling thread under ``SCHED_FIFO`` at ``priority`` (1-99); returns what to
    restore, or None when nothing changed (0, or refused: logged)."""
    if not priority:
        return None
    try:
        previous = Previous(os.sched_getscheduler(0), os.sched_getparam(0).sched_priority)
        os.sched_setscheduler(0, os.SCHED_FIFO | os.SCHED_RESET_ON_FORK, os.sched_param(priority))
    except OSError as exc:
        log.warning("primary_realtime %d: cannot run the primary under SCHED_FIFO (%s; it needs "
                    "CAP_SYS_NICE or RLIMIT_RTPRIO >= %d); running under the ordinary policy",
                    priority, exc, priority)
        return None
    log.info("the primary's loop runs under SCHED_FIFO, priority %d (workers keep the ordinary policy)",
             priority)
    return previous


def restore(previous: Previous | None) -> None:
    """Give the calling thread back the policy ``run_realtime`` replaced."""
    if previous is None:
        return
    try:
        os.sched_setscheduler(0, previous.policy, os.sched_param(previous.priority))
    except PermissionError:
        # Clearing SCHED_RESET_ON_FORK needs CAP_SYS_NICE (RLIMIT_RTPRIO is not enough):
        # keep the flag, which only means that children start under the ordinary policy.
        try:
            os.sched_setscheduler(0, previous.policy | os.SCHED_RESET_ON_FORK, os.sched_param(previous.priority))
        except OSError as exc:
            log.warning("cannot restore the primary's scheduling policy: %s", exc)
    except OSError as exc:
        log.warning("cannot restore the primary's scheduling policy: %s", exc)

"""The primary's counters: what happened since it started, for /metrics and /cluster-health."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Counters:
    """Monotonic event counts kept by the primary (never reset while it runs)."""

    #: connections taken back from a dead or stalled worker's channel and passed on
    salvaged: int = 0
    #: times a worker's channel was full (EAGAIN) and it was skipped
    backpressure: int = 0
    #: connections taken back unread from a worker that was not reading, and passed on (reclaim_after)
    reclaimed: int = 0
    #: times a worker was passed over because it had not read what it was given (skip_busy)
    skipped_busy: int = 0
    #: failed accept() calls on the listeners
    accept_errors: int = 0
    #: times a worker went silent and stopped getting connections
    stalls: int = 0
    #: times no more descriptors could be in flight (the budget, or ETOOMANYREFS)
    inflight_full: int = 0
    #: balancing-policy answers that were invalid or raised
    policy_errors: int = 0
    #: workers that could not be forked (fork, socketpair, pidfd_open)
    spawn_errors: int = 0
    #: periodic tasks of the primary that raised
    tick_errors: int = 0

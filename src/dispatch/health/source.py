"""What the health views read of the primary, and nothing more: the contract as Protocols.

``dispatch.primary.Server`` satisfies :class:`PrimaryView` structurally; tests
pass a plain stand-in. Every member is a read-only property, so the primary
may implement each as an attribute or as a property; the views never write.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from dispatch.counters import Counters
from dispatch.protocol import Heartbeat


class WorkerView(Protocol):
    """One live worker process, as the primary tracks it."""

    @property
    def worker_id(self) -> int: ...
    @property
    def pid(self) -> int: ...
    @property
    def state(self) -> str:
        """``booting``, ``ready`` or ``draining``."""
    @property
    def stalled(self) -> bool:
        """Silent too long: passed over until it speaks again."""
    @property
    def started_at(self) -> float:
        """``time.time()`` when it was forked."""
    @property
    def last_seen(self) -> float:
        """``time.monotonic()`` when it was last heard from."""
    @property
    def sent(self) -> int:
        """Connections passed to it (user-space modes)."""
    @property
    def skipped_busy(self) -> int:
        """Batches it was passed over for, not having read what it was given (skip_busy)."""
    @property
    def taken_back(self) -> int:
        """Connections passed to it and taken back unread while it lived (not in ``sent``)."""
    @property
    def reclaimed(self) -> int:
        """Connections taken back unread while it was not reading (reclaim_after)."""
    @property
    def report(self) -> Heartbeat | None:
        """Its last heartbeat, None before the first."""


class SlotView(Protocol):
    """A worker id's history: survives the processes that fill it."""

    @property
    def restarts(self) -> int: ...


class SupervisorView(Protocol):
    @property
    def stopping(self) -> bool:
        """Shutting down: /readyz says 503 so load balancers stop sending."""
    @property
    def slots(self) -> Mapping[int, SlotView]: ...


class ConfigView(Protocol):
    @property
    def balance(self) -> object:
        """A mode name, or a policy object (named by its class)."""


class PrimaryView(Protocol):
    """The primary, as /cluster-health and /metrics read it."""

    @property
    def config(self) -> ConfigView: ...
    @property
    def supervisor(self) -> SupervisorView: ...
    @property
    def started_at(self) -> float:
        """``time.time()`` when the primary started."""
    @property
    def workers(self) -> Mapping[int, WorkerView]:
        """The live workers (any key; the views sort by id)."""
    @property
    def dispatched_total(self) -> int:
        """Connections passed to workers since start, exited workers included."""
    @property
    def restarts_by_cause(self) -> Mapping[str, int]: ...
    @property
    def counters(self) -> Counters: ...
    @property
    def accepting(self) -> bool:
        """The primary is taking new connections off its listeners."""
    @property
    def pending_count(self) -> int:
        """Connections accepted (or taken back) but not yet passed on."""
    @property
    def in_flight(self) -> int:
        """Connections passed to workers and not yet reported done."""
    @property
    def draining_reason(self) -> str | None:
        """Why /readyz says 503 while the server still serves (``drain_delay``, maintenance)."""

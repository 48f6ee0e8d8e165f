"""Balancing policies: which workers get the connections of one accepted batch.

Pure code. The primary calls ``assign(count, loads)`` once per batch with the
workers that can take connections right now (ready and not backpressured) and
gets back how many of the batch each of them receives, in the same order. A
policy that sets ``needs_loads`` gets each worker's current number of
connections (sent to it and not yet reported done); others get an empty list,
so the primary does not have to track completions for them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable


@runtime_checkable
class Policy(Protocol):
    """What the primary needs from a balancing policy."""

    #: True if ``assign`` needs the workers' current loads (and so completions).
    needs_loads: bool

    def assign(self, count: int, loads: Sequence[int], workers: int) -> list[int]:
        """Split ``count`` connections over ``workers`` candidates; sum must be ``count``."""
        ...


class RoundRobin:
    """Each connection to the next worker in turn, batches split evenly."""

    needs_loads = False

    def __init__(self) -> None:
        self._cursor = 0

    def assign(self, count: int, loads: Sequence[int], workers: int) -> list[int]:
        share, extra = divmod(count, workers)
        counts = [share] * workers
        start = self._cursor % workers
        for i in range(extra):
            counts[(start + i) % workers] += 1
        self._cursor = start + extra
        return counts


class LeastConnections:
    """Each connection to the worker holding the fewest right now.

    A batch is poured like water: the least-loaded workers are filled up to
    the next one's level first. Ties between idle workers rotate, so that they
    share evenly; ties between busy ones go to the one that finished a
    connection most recently (``recent``): one whose loop is blocked finishes
    nothing, and its equal count hides that it is stuck.
    """

    needs_loads = True

    def __init__(self) -> None:
        self._cursor = 0

    def assign(self, count: int, loads: Sequence[int], workers: int,
               recent: Sequence[int] = ()) -> list[int]:
        """``recent[i]``: when worker ``i`` last reported a connection done, as a
        number that grows with each report (higher: more recent); empty: rotate all ties."""
        start = self._cursor % workers
        self._cursor = start + 1
        if recent:
            order = sorted(range(workers), key=lambda i: (loads[i], -recent[i] if loads[i] else 0,
                                                          (i - start) % workers))
        else:
            order = sorted(range(workers), key=lambda i: (loads[i], (i - start) % workers))
        counts = [0] * workers
        remaining = count
        level = loads[order[0]]
        filled = 1  # order[:filled] are the workers at `level`
        while remaining:
            while filled < workers and loads[order[filled]] <= level:
                filled += 1
            if filled == workers:
                room = remaining
            else:
                room = (loads[order[filled]] - level) * filled
            if room >= remaining:
                share, extra = divmod(remaining, filled)
                for rank, index in enumerate(order[:filled]):
                    counts[index] += share + (1 if rank < extra else 0)
                break
            step = loads[order[filled]] - level
            for index in order[:filled]:
                counts[index] += step
            remaining -= room
            level += step
        return counts


@runtime_checkable
class ConnectionPolicy(Protocol):
    """A policy that looks at each connection's client address (slower: one call each)."""

    needs_loads: bool

    def choose(self, client: str | None, workers: Sequence[int], loads: Sequence[int]) -> int:
        """Index into ``workers`` (their ids) for a connection from ``client`` (an IP, or None)."""
        ...


class Sticky:
    """Same client IP, same worker, while that worker lives.

    A client seen for the first time goes to the least-loaded worker. The table
    remembers the ``max_clients`` most recent clients.
    """

    needs_loads = True

    def __init__(self, max_clients: int = 65536) -> None:
        from collections import OrderedDict

        self.max_clients = max_clients
        self._table: OrderedDict[str, int] = OrderedDict()
        self._cursor = 0  # rotates ties between equally loaded workers

    def choose(self, client: str | None, workers: Sequence[int], loads: Sequence[int]) -> int:
        if client is not None:
            worker_id = self._table.get(client)
            if worker_id is not None and worker_id in workers:
                self._table.move_to_end(client)
                return workers.index(worker_id)
        count = len(workers)
        start = self._cursor % count
        self._cursor = start + 1
        index = min(range(count), key=lambda i: (loads[i], (i - start) % count))
        if client is not None:
            self._table[client] = workers[index]
            self._table.move_to_end(client)
            if len(self._table) > self.max_clients:
                self._table.popitem(last=False)
        return index


class Pull(RoundRobin):
    """No choice in the primary: every connection goes into one queue that all workers
    read, and the first worker whose loop reads it takes it (the shared listener's pull,
    with the primary still accepting). The dispatcher has one target then, the queue, so
    round-robin over it is all there is to ``assign``."""


#: Balance modes where the primary accepts and passes descriptors.
USER_MODES: dict[str, type[RoundRobin] | type[LeastConnections] | type[Sticky]] = {
    "round-robin": RoundRobin, "least-connections": LeastConnections, "sticky": Sticky, "pull": Pull,
}
#: Balance modes where the kernel picks the worker.
KERNEL_MODES = ("reuseport", "shared")
MODES = (*USER_MODES, *KERNEL_MODES)


def make_policy(mode: str) -> Policy | ConnectionPolicy:
    """The policy object for a user-space balance mode."""
    try:
        return USER_MODES[mode]()
    except KeyError:
        raise ValueError(f"no user-space policy for balance mode {mode!r}") from None


class GuardedPolicy:
    """A user's policy with every answer checked: a bad one is reported and that batch
    (or connection) goes round-robin instead. A policy bug never takes the primary down.

    ``on_error(what)`` is told what was wrong, in words.
    """

    def __init__(self, policy: Policy | ConnectionPolicy, on_error: Callable[[str], None]) -> None:
        self.policy = policy
        self.needs_loads = bool(policy.needs_loads)
        # Policies that look at each client address take the slower, per-connection path.
        self.per_connection = isinstance(policy, ConnectionPolicy) and not isinstance(policy, Policy)
        self._fallback = RoundRobin()
        self._on_error = on_error
        if type(policy) in (RoundRobin, LeastConnections, Sticky, Pull):
            # Ours are right by construction, and this runs once per batch on the hot path:
            # the checks are for user code.
            self.assign = getattr(policy, "assign", self.assign)  # type: ignore[method-assign]
            self.choose = getattr(policy, "choose", self.choose)  # type: ignore[method-assign]

    def assign(self, count: int, loads: Sequence[int], workers: int) -> list[int]:
        try:
            shares = self.policy.assign(count, loads, workers)  # type: ignore[union-attr]
        except Exception as exc:
            self._on_error(f"raised {type(exc).__name__}: {exc}")
        else:
            if valid_shares(shares, count, workers):
                return shares
            self._on_error(f"assigned {str(shares)[:80]} for {count} connections over {workers} workers")
        return self._fallback.assign(count, (), workers)

    def choose(self, client: str | None, workers: Sequence[int], loads: Sequence[int]) -> int:
        try:
            index = self.policy.choose(client, workers, loads)  # type: ignore[union-attr]
        except Exception as exc:
            self._on_error(f"raised {type(exc).__name__}: {exc}")
        else:
            if type(index) is int and 0 <= index < len(workers):
                return index
            self._on_error(f"chose {str(index)[:40]} among {len(workers)} workers")
        return self._fallback.assign(1, (), len(workers)).index(1)


def valid_shares(shares: object, count: int, workers: int) -> bool:
    """A batch policy's answer: one non-negative int per worker, summing to ``count``."""
    if not isinstance(shares, list | tuple) or len(shares) != workers:
        return False
    total = 0
    for share in shares:
        if type(share) is not int or share < 0:
            return False
        total += share
    return total == count

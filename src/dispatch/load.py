"""How busy the workers are, as one number, from what the primary already knows.

Each worker's heartbeat carries its CPU time; between two heartbeats that is the share of
a core it used. In the user-space modes the primary also knows how many connections each
worker holds against the capacity it advertised. A worker's load is the larger of the
two; a stalled worker (silent, passed over) counts as fully loaded. The server's load is
the mean over its ready workers, and ``weight()`` turns it into the percentage HAProxy's
agent-check reads: 100 when idle, lower as the workers fill, never below 1 (0 would mean
"drain", which is the agent's call to make, not the load's).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

from dispatch import supervisor
from dispatch.protocol import Heartbeat

#: Weight of the newest interval in each worker's smoothed CPU share.
SMOOTHING = 0.5


class LoadedWorker(Protocol):
    """What the meter reads of a worker (``processes.WorkerHandle`` has it)."""

    @property
    def pid(self) -> int: ...
    @property
    def state(self) -> str: ...
    @property
    def stalled(self) -> bool: ...
    @property
    def report(self) -> Heartbeat | None: ...
    @property
    def capacity(self) -> int: ...
    @property
    def outstanding(self) -> int: ...


class LoadMeter:
    """Samples the workers' heartbeats (``sample`` on the primary's tick) into a load."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[Heartbeat, float]] = {}  # pid: (report, seen at)
        self._cpu: dict[int, float] = {}  # pid: smoothed share of a core, 0..1

    def sample(self, workers: Iterable[LoadedWorker], now: float) -> None:
        """Note each new heartbeat (``now`` is ``time.monotonic()``); forget exited workers."""
        seen = set()
        for worker in workers:
            report = worker.report
            seen.add(worker.pid)
            if report is None:
                continue
            last = self._last.get(worker.pid)
            if last is not None and last[0] is report:
                continue
            self._last[worker.pid] = (report, now)
            if last is not None and now > last[1]:
                share = max(0.0, min(1.0, (report.cpu_ms - last[0].cpu_ms) / 1000 / (now - last[1])))
                old = self._cpu.get(worker.pid, share)
                self._cpu[worker.pid] = old + SMOOTHING * (share - old)
        for pid in set(self._last) - seen:
            del self._last[pid]
            self._cpu.pop(pid, None)

    def worker_load(self, worker: LoadedWorker) -> float:
        """0 (idle) to 1 (a core's worth of CPU, or every connection slot taken)."""
        if worker.stalled:
            return 1.0
        # What it holds: counted by the primary, or (pull: it took them itself) last reported.
        active = worker.report.active if worker.report is not None else 0
        held = max(worker.outstanding, active) / worker.capacity if worker.capacity else 0.0
        return max(0.0, min(1.0, max(self._cpu.get(worker.pid, 0.0), held)))

    def load(self, workers: Mapping[int, LoadedWorker]) -> float | None:
        """The mean load of the ready workers, or None when none is ready."""
        ready = [w for w in workers.values() if w.state == supervisor.READY]
        if not ready:
            return None
        return sum(self.worker_load(w) for w in ready) / len(ready)


def weight(load: float) -> int:
    """The agent-check percentage for a load: 100 idle, 1 at the least."""
    return max(1, min(100, round(100 * (1 - load))))

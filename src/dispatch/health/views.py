"""The JSON and plain-text views: ``/cluster-health``, ``/healthz``, ``/readyz``.

Each reads state the primary already holds (workers, their last heartbeat,
supervisor slots, counters) through :class:`~dispatch.health.source.PrimaryView`;
only ``cpu_percent`` asks the kernel, through psutil, and only when someone
asks for ``/cluster-health``.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from typing import TypedDict

import psutil

from dispatch import supervisor
from dispatch.health.http import render, text
from dispatch.health.source import PrimaryView, WorkerView


class WorkerEntry(TypedDict):
    """One worker in ``/cluster-health``."""

    id: int
    pid: int
    state: str
    stalled: bool
    uptime_s: float
    memory_rss: int
    cpu_percent: float
    connections_total: int
    connections_active: int
    heartbeat_age_s: float
    restarts: int
    skipped_busy: int
    reclaimed: int
    cpus: list[int]


class ClusterHealth(TypedDict):
    """The ``/cluster-health`` document."""

    primary_pid: int
    uptime_s: float
    balance: str
    worker_count: int
    connections_total: int
    connections_in_flight: int
    accepting: bool
    workers: list[WorkerEntry]


# ---------------------------------------------------------------- probes
def healthz() -> bytes:
    """200 while the primary runs: answering at all is the proof."""
    return text(200, "ok")


def readyz(server: PrimaryView) -> bytes:
    """200 while some worker is ready, the server is not shutting down (nor waiting out
    ``drain_delay`` before it does) and not drained for maintenance."""
    if server.supervisor.stopping:
        return text(503, "not ready: shutting down")
    if server.draining_reason is not None:
        return text(503, f"not ready: {server.draining_reason}")
    if not any(w.state == supervisor.READY for w in server.workers.values()):
        return text(503, "not ready: no worker is ready")
    return text(200, "ready")


# ---------------------------------------------------------------- /cluster-health
class ClusterHealthView:
    """Renders ``/cluster-health``; keeps a psutil handle per worker between requests."""

    def __init__(self, server: PrimaryView) -> None:
        self.server = server
        self._cpu = CpuMeter()

    def __call__(self) -> bytes:
        body = json.dumps(self.document(), indent=2).encode() + b"\n"
        return render(200, body, "application/json")

    def document(self) -> ClusterHealth:
        """The ``/cluster-health`` document.

        ``connections_total`` of a worker is what it was passed (user-space
        modes) or, in kernel modes, what its last heartbeat says it handled.
        The cluster's is the larger of connections dispatched (exited workers
        included) and the sum over live workers. ``cpu_percent`` is measured
        since the previous request, or since the worker started on the first.
        """
        server = self.server
        wall, mono = time.time(), time.monotonic()
        workers = sorted_workers(server)
        self._cpu.forget_all_but(w.pid for w in workers)
        entries: list[WorkerEntry] = []
        for w in workers:
            slot = server.supervisor.slots.get(w.worker_id)
            entries.append({
                "id": w.worker_id,
                "pid": w.pid,
                "state": w.state,
                "stalled": w.stalled,
                "uptime_s": round(wall - w.started_at, 3),
                "memory_rss": worker_rss(w),
                "cpu_percent": self._cpu.percent(w.pid, wall),
                "connections_total": worker_connections_total(w),
                "connections_active": w.report.active if w.report is not None else 0,
                "heartbeat_age_s": round(mono - w.last_seen, 3),
                "restarts": slot.restarts if slot is not None else 0,
                "skipped_busy": w.skipped_busy,
                "reclaimed": w.reclaimed,
                "cpus": worker_cpus(w.pid),
            })
        return {
            "primary_pid": os.getpid(),
            "uptime_s": round(wall - server.started_at, 3),
            "balance": balance_name(server),
            "worker_count": len(entries),
            "connections_total": max(server.dispatched_total, sum(e["connections_total"] for e in entries)),
            "connections_in_flight": server.in_flight,
            "accepting": server.accepting,
            "workers": entries,
        }


class CpuMeter:
    """CPU use of processes by pid; psutil measures between two calls on one handle."""

    def __init__(self) -> None:
        self._processes: dict[int, psutil.Process] = {}

    def forget_all_but(self, pids: Iterable[int]) -> None:
        """Drop the handles of processes that are no longer workers."""
        for pid in set(self._processes) - set(pids):
            del self._processes[pid]

    def percent(self, pid: int, wall: float) -> float:
        """Since the previous call for ``pid``, or since it started on the first."""
        process = self._processes.get(pid)
        try:
            if process is not None:
                return round(process.cpu_percent(interval=None), 1)
            process = self._processes[pid] = psutil.Process(pid)
            process.cpu_percent(interval=None)  # starts the measurement for next time
            cpu = process.cpu_times()
            return round(100 * (cpu.user + cpu.system) / max(wall - process.create_time(), 1e-3), 1)
        except psutil.Error:  # exited, and not yet reaped by the primary
            self._processes.pop(pid, None)
            return 0.0


# ---------------------------------------------------------------- shared with /metrics
def sorted_workers(server: PrimaryView) -> list[WorkerView]:
    """Live workers by id; a replacement after the one it replaces."""
    return sorted(server.workers.values(), key=lambda w: (w.worker_id, w.started_at))


def worker_connections_total(worker: WorkerView) -> int:
    """Connections passed to (or, in kernel modes, handled by) one worker, including
    those taken back from it later: a counter never goes down."""
    reported = worker.report.total if worker.report is not None else 0
    return max(worker.sent + worker.taken_back, reported)


def worker_rss(worker: WorkerView) -> int:
    """Resident memory from the last heartbeat, or from /proc before the first."""
    if worker.report is not None:
        return int(worker.report.rss)
    try:
        return int(psutil.Process(worker.pid).memory_info().rss)
    except psutil.Error:
        return 0


def worker_cpus(pid: int) -> list[int]:
    """The CPUs a worker may run on (one with ``worker_affinity``); [] if it is gone."""
    try:
        return sorted(os.sched_getaffinity(pid))
    except OSError:
        return []


def balance_name(server: PrimaryView) -> str:
    """The balance mode, or the class name of a custom policy."""
    balance = server.config.balance
    return balance if isinstance(balance, str) else type(balance).__name__

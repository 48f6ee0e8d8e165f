"""The supervisor: which workers should exist, as a pure state machine.

It never touches a process. The primary tells it what happened (a worker was
spawned, said ready, sent a heartbeat, exited; time passed; a signal asked for
a reload, a scale change or a shutdown) and gets back a list of actions to
carry out: ``Spawn``, ``Drain``, ``Kill``, ``Stop``, and ``Log`` lines that say
why. Everything about a worker's life is decided here and tested without
processes: crash-loop backoff, heartbeat and boot timeouts, stalls, rolling
restart, recycling thresholds, scaling, and which exits count as restarts.
The vocabulary (phases, actions, state) is in ``dispatch.lifecycle``.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field

from dispatch.lifecycle import (
    BOOTING,
    DRAINING,
    EXIT_BOOT_FAILURE,
    READY,
    Action,
    Drain,
    IllegalTransition,
    Kill,
    Log,
    Phase,
    Resume,
    Slot,
    Spawn,
    Stall,
    Stop,
    WorkerState,
)

__all__ = [
    "BOOTING", "DRAINING", "EXIT_BOOT_FAILURE", "READY", "Action", "Drain", "IllegalTransition",
    "Kill", "Log", "Phase", "Resume", "Slot", "Spawn", "Stall", "Stop", "Supervisor", "WorkerState",
]


@dataclass
class Supervisor:
    """Decides which workers to start, drain and kill."""

    workers: int
    timeout: float = 30.0
    boot_timeout: float = 30.0
    graceful_timeout: float = 30.0
    restart_batch: int = 1
    max_boot_failures: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 30.0
    #: Silence after which a ready worker is passed over (``Stall``); None: never.
    stall_after: float | None = None
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_memory: int = 0
    #: A worker younger than this is not recycled for memory: a max_memory below a fresh
    #: worker's size must not turn into a restart storm.
    memory_grace: float = 5.0
    rng: random.Random = field(default_factory=random.Random)

    by_pid: dict[int, WorkerState] = field(default_factory=dict)
    slots: dict[int, Slot] = field(default_factory=dict)
    ever_ready: bool = False
    stopping: bool = False
    restart_queue: list[int] = field(default_factory=list)  # old pids still to replace
    restarting: bool = False
    reload_pending: bool = False
    #: Rolling restarts over (complete or aborted), and how the last one ended.
    restarts_finished: int = 0
    last_restart: str = ""
    boot_failures_total: int = 0
    exit_code: int = 0
    #: Workers replaced, by cause: exit, signal, timeout, recycle, spawn (a fork that failed).
    restarts_by_cause: dict[str, int] = field(default_factory=dict)

    # ----------------------------------------------------------- lifecycle
    def start(self, now: float) -> list[Action]:
        """The first workers."""
        self.slots = {i: Slot() for i in range(self.workers)}
        return [Spawn(i) for i in range(self.workers)]

    def spawned(self, worker_id: int, pid: int, now: float, replaces: int | None = None) -> WorkerState:
        """A ``Spawn`` was carried out: ``pid`` now fills ``worker_id``. Returns its state,
        which the primary reads (never copies)."""
        self.slots.setdefault(worker_id, Slot()).respawn_at = None
        limit = 0
        if self.max_requests:
            # Jitter spreads the recycling of workers that started together.
            limit = self.max_requests + self.rng.randint(0, self.max_requests_jitter)
        worker = self.by_pid[pid] = WorkerState(
            worker_id, pid, now, last_seen=now, deadline=now + self.boot_timeout, replaces=replaces,
            request_limit=limit,
        )
        return worker

    def ready(self, pid: int, now: float) -> list[Action]:
        """``pid`` said it is ready. A second ``Ready`` is a protocol error
        (``IllegalTransition``); a first one from a worker drained while it booted is
        a race and changes nothing."""
        worker = self.by_pid.get(pid)
        if worker is None:
            return []
        if worker.said_ready:
            raise IllegalTransition(f"worker {worker.worker_id} (pid {pid}) said Ready twice")
        worker.said_ready = True
        if worker.state != BOOTING:
            return []
        worker.move(READY)
        worker.last_seen, worker.deadline = now, None
        self.ever_ready = True
        slot = self.slots[worker.worker_id]
        slot.boot_failures = 0
        if worker.replaces is not None:
            slot.recycle_failures = 0
        actions: list[Action] = []
        if self.stopping:
            return self._drain(worker, now)
        if worker.replaces is not None:
            old = self.by_pid.get(worker.replaces)
            worker.replaces = None
            if old is not None and old.state != DRAINING:
                actions += self._drain(old, now)
            elif old is None:
                actions += self._continue_restart(now)
        return actions

    def heard_from(self, pid: int, now: float) -> list[Action]:
        """Any message from ``pid``: it is alive; a stalled worker gets connections again."""
        worker = self.by_pid.get(pid)
        if worker is None:
            return []
        worker.last_seen = now
        if worker.stalled:
            worker.stalled = False
            return [Resume(pid)]
        return []

    def heartbeat(self, pid: int, now: float, total: int = 0, rss: int = 0) -> list[Action]:
        """A health report: ``total`` connections handled, ``rss`` bytes resident. Recycles
        a worker past ``max_requests`` (kernel modes count here) or ``max_memory``."""
        actions = self.heard_from(pid, now)
        worker = self.by_pid.get(pid)
        if worker is None:
            return actions
        if worker.request_limit and total >= worker.request_limit:
            actions += self.passed(pid, total, now, "handled")
        elif self.max_memory and rss > self.max_memory and now - worker.spawned_at >= self.memory_grace:
            actions += self.recycle(pid, now, f"resident memory {rss} bytes is over max_memory {self.max_memory}")
        return actions

    def passed(self, pid: int, count: int, now: float, verb: str = "passed") -> list[Action]:
        """``pid`` was passed (or handled) ``count`` connections: recycle it at its limit."""
        worker = self.by_pid.get(pid)
        if worker is None or not worker.request_limit or count < worker.request_limit:
            return []
        worker.request_limit = 0  # once
        return self.recycle(pid, now, f"{verb} {count} connections (max_requests {self.max_requests})")

    def expected_exit(self, pid: int, clean: bool) -> bool:
        """Whether ``pid`` ending (``clean``: exit code 0) is what was asked of it."""
        worker = self.by_pid.get(pid)
        return worker is not None and worker.state == DRAINING and clean

    def exited(self, pid: int, now: float, how: str, signaled: bool = False) -> list[Action]:
        """``pid`` is gone; ``how`` says why in words ("exit code 1", "signal 9").

        ``signaled`` says whether a signal ended it, for the restart causes.
        """
        worker = self.by_pid.pop(pid, None)
        if worker is None:
            return []
        slot = self.slots.setdefault(worker.worker_id, Slot())
        actions: list[Action] = []
        if self.stopping:
            if not self.by_pid:
                actions.append(Stop(self.exit_code))
            return actions
        scaled_away = worker.kill_cause == "scale"
        expected = worker.retiring or worker.state == DRAINING or scaled_away
        successor = next((w for w in self.by_pid.values() if w.replaces == pid), None)
        if worker.state == BOOTING and worker.replaces is not None and not scaled_away:
            if successor is not None:
                # It was being replaced itself: its successor takes over from the old worker.
                successor.replaces = worker.replaces
            else:
                # A replacement died before it was ready: keep the old worker serving...
                actions += self._abort_restart(worker, f"new worker {pid} {how} before it was ready", now)
            expected = True
        if expected and worker.worker_id not in self._live_ids() and worker.worker_id < self.workers:
            # ...unless it is gone too: refill the slot.
            expected = False
        if expected:
            actions += self._continue_restart(now)
            return actions
        slot.restarts += 1
        if worker.kill_cause not in ("scale", "shutdown"):
            self._count(worker.kill_cause or ("signal" if signaled else "exit"))
        if worker.state == BOOTING:
            return actions + self._boot_failed(worker.worker_id, now, f"worker {worker.worker_id} (pid {pid}) {how} during boot")
        if worker.worker_id < self.workers:
            actions.append(Spawn(worker.worker_id))
        return actions

    def spawn_failed(self, worker_id: int, replaces: int | None, now: float, why: str) -> list[Action]:
        """A ``Spawn`` could not be carried out (fork, socketpair or pidfd_open failed).

        It is a failed boot: a replacement's failure aborts the rolling restart
        or recycle (the old worker keeps serving); a fresh slot is retried after
        the boot backoff.
        """
        self._count("spawn")
        if replaces is not None:
            attempt = WorkerState(worker_id, 0, now, replaces=replaces)
            return self._abort_restart(attempt, f"cannot start a worker: {why}", now)
        if self.stopping or worker_id >= self.workers:
            return []
        return self._boot_failed(worker_id, now, f"cannot start worker {worker_id}: {why}")

    def tick(self, now: float) -> list[Action]:
        """Time passed: enforce heartbeat, boot and drain deadlines; respawn after backoff."""
        actions: list[Action] = []
        for worker in list(self.by_pid.values()):
            if worker.kill_cause is not None:
                continue
            silent = now - worker.last_seen
            if (self.stall_after is not None and worker.state == READY and not worker.stalled
                    and silent > self.stall_after):
                worker.stalled = True
                actions.append(Stall(worker.pid, silent))
            if worker.state == READY and silent > self.timeout:
                actions += self._kill(worker, "timeout", f"worker {worker.worker_id} (pid {worker.pid}) sent no heartbeat for {now - worker.last_seen:.1f}s (timeout {self.timeout:g}s); killing it")
            elif worker.deadline is not None and now > worker.deadline:
                what = "became ready" if worker.state == BOOTING else "finished draining"
                cause = "timeout" if worker.state == BOOTING else "drain"
                actions += self._kill(worker, cause, f"worker {worker.worker_id} (pid {worker.pid}) has not {what} in time; killing it")
        if not self.stopping:
            for worker_id, slot in self.slots.items():
                if slot.respawn_at is not None and now >= slot.respawn_at:
                    slot.respawn_at = None
                    if worker_id < self.workers and worker_id not in self._live_ids():
                        actions.append(Spawn(worker_id))
            for worker in list(self.by_pid.values()):
                # A recycle whose replacement failed is tried again after its backoff.
                if worker.recycle_why is not None and not worker.retiring and worker.state == READY:
                    actions += self.recycle(worker.pid, now, worker.recycle_why)
        return actions

    # --------------------------------------------------------- operations
    def shutdown(self, now: float, graceful: bool = True) -> list[Action]:
        """SIGTERM/SIGINT (graceful) or SIGQUIT (fast)."""
        if self.stopping and graceful:
            return []
        self.stopping = True
        self.restart_queue.clear()
        for slot in self.slots.values():
            slot.respawn_at = None
        if not self.by_pid:
            return [Stop(self.exit_code)]
        actions: list[Action] = []
        for worker in list(self.by_pid.values()):
            if graceful:
                if worker.state != DRAINING:
                    actions += self._drain(worker, now)
            else:
                actions += self._kill(worker, "shutdown", None)
        return actions

    def reload(self, now: float) -> list[Action]:
        """SIGHUP/SIGUSR2: replace every worker, ``restart_batch`` at a time."""
        if self.stopping:
            return []
        if self.restarting:
            self.reload_pending = True
            return [Log(logging.WARNING, "rolling restart already in progress; another one will follow it")]
        self.restarting = True
        self.restart_queue = sorted(
            (w.pid for w in self.by_pid.values()
             if w.state != DRAINING and not w.retiring and w.worker_id < self.workers),
            key=lambda pid: self.by_pid[pid].worker_id,
        )
        return [Log(logging.INFO, f"rolling restart of {len(self.restart_queue)} workers started")] + self._continue_restart(now)

    def recycle(self, pid: int, now: float, why: str) -> list[Action]:
        """Retire one worker gracefully: its replacement is ready before it drains."""
        worker = self.by_pid.get(pid)
        if worker is None or worker.state != READY or worker.retiring or self.stopping:
            return []
        if worker.worker_id >= self.workers:
            return []  # scaled away: it is being killed, not replaced
        slot = self.slots[worker.worker_id]
        first_request = worker.recycle_why is None
        worker.recycle_why = why
        if now < slot.recycle_not_before:
            if not first_request:
                return []
            return [Log(logging.WARNING, f"recycling worker {worker.worker_id} (pid {pid}) deferred for {slot.recycle_not_before - now:.1f}s after a failed replacement: {why}")]
        worker.retiring = True
        slot.restarts += 1
        self._count("recycle")
        return [Log(logging.INFO, f"recycling worker {worker.worker_id} (pid {pid}): {why}"), Spawn(worker.worker_id, pid, "recycle")]

    def scale(self, delta: int, now: float) -> list[Action]:
        """SIGTTIN (+1) / SIGTTOU (-1), or any ``delta``; never below one worker."""
        if self.stopping:
            return []
        if delta > 0:
            self.workers += delta
            new_ids = [i for i in range(self.workers) if i not in self._live_ids()]
            for i in new_ids:
                self.slots.setdefault(i, Slot())
            spawns: list[Action] = [Spawn(i) for i in new_ids]
            return [Log(logging.INFO, f"scaling up to {self.workers} workers"), *spawns]
        if delta == 0:
            return []
        if self.workers <= 1:
            return [Log(logging.WARNING, "already at one worker; not scaling down")]
        self.workers = max(1, self.workers + delta)
        actions: list[Action] = [Log(logging.INFO, f"scaling down to {self.workers} workers")]
        for worker in list(self.by_pid.values()):
            if worker.worker_id >= self.workers and worker.state != DRAINING:
                actions += self._drain(worker, now) if worker.state == READY else self._kill(worker, "scale", None)
        return actions

    # ----------------------------------------------------------- queries
    def live(self) -> list[WorkerState]:
        return sorted(self.by_pid.values(), key=lambda w: (w.worker_id, w.spawned_at))

    def _live_ids(self) -> set[int]:
        return {w.worker_id for w in self.by_pid.values() if not w.retiring and w.state != DRAINING}

    # ----------------------------------------------------------- internals
    def _count(self, cause: str) -> None:
        self.restarts_by_cause[cause] = self.restarts_by_cause.get(cause, 0) + 1

    def _boot_failed(self, worker_id: int, now: float, what: str) -> list[Action]:
        """Back off before the slot is tried again; stop when no worker ever booted."""
        slot = self.slots.setdefault(worker_id, Slot())
        slot.boot_failures += 1
        self.boot_failures_total += 1
        if not self.ever_ready and self.boot_failures_total >= self.max_boot_failures:
            self.stopping = True
            self.exit_code = EXIT_BOOT_FAILURE
            actions: list[Action] = [Log(logging.CRITICAL, f"workers failed to boot {self.boot_failures_total} times and none ever became ready; stopping")]
            actions += [Kill(p, "shutdown") for p in self.by_pid]
            if not self.by_pid:
                actions.append(Stop(EXIT_BOOT_FAILURE))
            return actions
        delay = min(self.backoff_max, self.backoff_base * 2 ** (slot.boot_failures - 1))
        slot.respawn_at = now + delay
        return [Log(logging.WARNING, f"{what}; retrying in {delay:g}s")]

    def _drain(self, worker: WorkerState, now: float) -> list[Action]:
        worker.move(DRAINING)
        worker.deadline = now + self.graceful_timeout
        return [Drain(worker.pid)]

    def _kill(self, worker: WorkerState, cause: str, message: str | None) -> list[Action]:
        worker.kill_cause = cause
        actions: list[Action] = [Kill(worker.pid, cause)]
        if message:
            actions.insert(0, Log(logging.WARNING, message))
        return actions

    def _continue_restart(self, now: float) -> list[Action]:
        if not self.restarting:
            return []
        # Replacements in flight, counted by the pid they replace: the old
        # worker (retiring) and its new one (replaces) are one, not two.
        in_flight = len({w.pid for w in self.by_pid.values() if w.retiring}
                        | {w.replaces for w in self.by_pid.values() if w.replaces is not None})
        actions: list[Action] = []
        while self.restart_queue and in_flight < self.restart_batch:
            old = self.by_pid.get(self.restart_queue.pop(0))
            if old is None or old.state == DRAINING or old.retiring or old.worker_id >= self.workers:
                continue  # gone, already being replaced, or scaled away
            old.retiring = True
            in_flight += 1
            actions.append(Spawn(old.worker_id, old.pid))
        if not self.restart_queue and in_flight == 0:
            self.restarting = False
            self.restarts_finished += 1
            self.last_restart = "complete"
            actions.append(Log(logging.INFO, "rolling restart complete"))
            if self.reload_pending:
                self.reload_pending = False
                actions += self.reload(now)
        return actions

    def _abort_restart(self, new: WorkerState, why: str, now: float) -> list[Action]:
        old = self.by_pid.get(new.replaces) if new.replaces is not None else None
        retry = ""
        if old is not None:
            old.retiring = False
            if old.recycle_why is not None:
                # Back off before the next recycle attempt, as for a crash loop.
                slot = self.slots[old.worker_id]
                slot.recycle_failures += 1
                delay = min(self.backoff_max, self.backoff_base * 2 ** (slot.recycle_failures - 1))
                slot.recycle_not_before = now + delay
                retry = f"; recycling worker {old.worker_id} again in {delay:g}s"
        was_rolling = self.restarting
        if was_rolling:
            self.restarts_finished += 1
            self.last_restart = f"aborted: {why}"
        self.restarting = False
        self.reload_pending = False
        self.restart_queue.clear()
        what = "rolling restart aborted" if was_rolling else "replacement failed"
        return [Log(logging.ERROR, f"{what}: {why}; the old workers keep serving{retry}")]


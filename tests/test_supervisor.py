"""The supervisor, driven with events the way the primary drives it.

The primary carries out a ``Spawn`` at once by forking and calling
``spawned()``; a ``Kill`` or ``Drain`` ends, some time later, in ``exited()``.
``Cluster`` below does the same with made-up pids, so the tests read as
timelines and assert on the actions the supervisor returns.
"""

from __future__ import annotations

import itertools
import logging
import random

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
)

from dispatch.supervisor import (
    BOOTING,
    DRAINING,
    EXIT_BOOT_FAILURE,
    READY,
    Action,
    Drain,
    IllegalTransition,
    Kill,
    Log,
    Resume,
    Spawn,
    Stall,
    Stop,
    Supervisor,
)


class Cluster:
    """A fake primary: carries out ``Spawn`` like ``Server._apply`` does."""

    def __init__(self, **options: float) -> None:
        # Timeouts only fire in the tests that set them.
        for name in ("timeout", "boot_timeout", "graceful_timeout"):
            options.setdefault(name, 1e6)
        self.sup = Supervisor(**options)  # type: ignore[arg-type]
        self.pids = itertools.count(100)
        self.now = 0.0
        self.actions: list[Action] = []  # every action, in order
        self.spawned: list[tuple[int, int, int | None]] = []  # (worker_id, pid, replaces)

    def apply(self, actions: list[Action]) -> list[Action]:
        self.actions += actions
        for action in actions:
            if isinstance(action, Spawn):
                pid = next(self.pids)
                self.sup.spawned(action.worker_id, pid, self.now, action.replaces)
                self.spawned.append((action.worker_id, pid, action.replaces))
        return actions

    def start(self) -> list[Action]:
        return self.apply(self.sup.start(self.now))

    def ready(self, pid: int) -> list[Action]:
        return self.apply(self.sup.ready(pid, self.now))

    def exited(self, pid: int, how: str = "exited with code 1") -> list[Action]:
        return self.apply(self.sup.exited(pid, self.now, how))

    def tick(self, now: float) -> list[Action]:
        self.now = now
        return self.apply(self.sup.tick(now))

    def reload(self) -> list[Action]:
        return self.apply(self.sup.reload(self.now))

    def scale(self, delta: int) -> list[Action]:
        return self.apply(self.sup.scale(delta, self.now))

    def shutdown(self, graceful: bool = True) -> list[Action]:
        return self.apply(self.sup.shutdown(self.now, graceful))

    def last_pid(self, worker_id: int) -> int:
        return [pid for wid, pid, _ in self.spawned if wid == worker_id][-1]

    def pids_of(self, state: str | None = None) -> list[int]:
        return [w.pid for w in self.sup.live() if state is None or w.state == state]

    def all_ready(self) -> None:
        for pid in self.pids_of(BOOTING):
            self.ready(pid)


def started(workers: int = 3, **options: float) -> Cluster:
    cluster = Cluster(workers=workers, **options)
    cluster.start()
    cluster.all_ready()
    return cluster


def only(actions: list[Action], kind: type) -> list[Action]:
    return [a for a in actions if isinstance(a, kind)]


def logs(actions: list[Action], level: int) -> list[str]:
    return [a.message for a in actions if isinstance(a, Log) and a.level == level]


# ------------------------------------------------------------------ spawning
def test_start_spawns_one_worker_per_slot() -> None:
    cluster = Cluster(workers=4)
    assert cluster.start() == [Spawn(0), Spawn(1), Spawn(2), Spawn(3)]
    assert [w.state for w in cluster.sup.live()] == [BOOTING] * 4


def test_ready_worker_that_exits_is_respawned_at_once() -> None:
    cluster = started(3)
    pid = cluster.last_pid(1)
    assert cluster.exited(pid) == [Spawn(1)]
    assert cluster.last_pid(1) != pid
    assert cluster.sup.slots[1].restarts == 1


def test_ready_and_heartbeat_for_unknown_pids_are_ignored() -> None:
    cluster = started(1)
    assert cluster.ready(99999) == []
    assert cluster.sup.heartbeat(99999, 1.0) == []
    assert cluster.exited(99999) == []


def test_a_second_ready_is_an_illegal_transition() -> None:
    cluster = started(1)
    with pytest.raises(IllegalTransition, match="said Ready twice"):
        cluster.ready(cluster.last_pid(0))


def test_boot_failure_backs_off_exponentially() -> None:
    cluster = started(2, backoff_base=0.5, backoff_max=3.0)
    cluster.exited(cluster.last_pid(0))  # respawned at once: it had been ready
    expected_delays = [0.5, 1.0, 2.0, 3.0, 3.0]
    for delay in expected_delays:
        pid = cluster.last_pid(0)
        actions = cluster.exited(pid)
        assert only(actions, Spawn) == []
        assert f"retrying in {delay:g}s" in logs(actions, logging.WARNING)[0]
        start = cluster.now
        assert cluster.tick(start + delay * 0.9) == []
        assert cluster.tick(start + delay) == [Spawn(0)]
        assert cluster.tick(start + delay + 10) == []  # only once
    assert cluster.sup.slots[0].boot_failures == len(expected_delays)


def test_ready_resets_the_backoff() -> None:
    cluster = started(1, backoff_base=1.0)
    cluster.exited(cluster.last_pid(0))
    for _ in range(3):
        cluster.exited(cluster.last_pid(0))
        cluster.tick(cluster.now + 100)
    cluster.ready(cluster.last_pid(0))
    assert cluster.sup.slots[0].boot_failures == 0
    cluster.exited(cluster.last_pid(0))  # ready worker: at once
    actions = cluster.exited(cluster.last_pid(0))  # boot failure: first delay again
    assert "retrying in 1s" in logs(actions, logging.WARNING)[0]


def test_workers_that_never_boot_stop_the_primary() -> None:
    cluster = Cluster(workers=2, max_boot_failures=3)
    cluster.start()
    first = cluster.exited(cluster.last_pid(0))
    assert only(first, Stop) == []
    cluster.tick(100.0)
    second = cluster.exited(cluster.last_pid(0))
    assert only(second, Stop) == []
    assert cluster.tick(200.0) == [Spawn(0)]
    # The third failure: give up, kill the survivor, stop once it is gone.
    third = cluster.exited(cluster.last_pid(1))
    assert len(logs(third, logging.CRITICAL)) == 1
    assert "failed to boot 3 times" in logs(third, logging.CRITICAL)[0]
    assert only(third, Kill) == [Kill(cluster.last_pid(0), "shutdown")]
    assert only(third, Stop) == []
    assert cluster.tick(1000.0) == []  # no respawn, no second kill while stopping
    assert cluster.exited(cluster.last_pid(0), "was killed by signal 9") == [Stop(EXIT_BOOT_FAILURE)]


def test_last_boot_failure_with_no_worker_left_stops_at_once() -> None:
    cluster = Cluster(workers=1, max_boot_failures=1)
    cluster.start()
    actions = cluster.exited(cluster.last_pid(0))
    assert actions[-1] == Stop(EXIT_BOOT_FAILURE)


def test_boot_failures_after_a_ready_worker_never_stop() -> None:
    cluster = started(1, max_boot_failures=2)
    for i in range(10):
        actions = cluster.exited(cluster.last_pid(0))
        assert only(actions, Stop) == []
        cluster.tick(100.0 * (i + 1))


# ------------------------------------------------------------------ timeouts
def test_heartbeat_timeout_kills() -> None:
    cluster = started(2, timeout=10.0)
    quiet, chatty = cluster.last_pid(0), cluster.last_pid(1)
    cluster.sup.heartbeat(chatty, 8.0)
    assert cluster.tick(10.0) == []  # exactly at the limit: still fine
    actions = cluster.tick(10.5)
    assert only(actions, Kill) == [Kill(quiet, "timeout")]
    assert "sent no heartbeat" in logs(actions, logging.WARNING)[0]
    assert cluster.tick(11.0) == []  # killed once, not on every tick
    assert cluster.exited(quiet, "was killed by signal 9") == [Spawn(0)]


def test_boot_timeout_kills() -> None:
    cluster = Cluster(workers=1, boot_timeout=5.0)
    cluster.start()
    assert cluster.tick(5.0) == []
    actions = cluster.tick(5.1)
    assert only(actions, Kill) == [Kill(cluster.last_pid(0), "timeout")]
    assert "has not became ready in time" in logs(actions, logging.WARNING)[0]


def test_drain_deadline_kills() -> None:
    cluster = started(2, graceful_timeout=4.0)
    actions = cluster.shutdown()
    assert sorted(only(actions, Drain), key=lambda a: a.pid) == [Drain(p) for p in cluster.pids_of()]
    first, second = cluster.pids_of()
    assert cluster.exited(first, "exited with code 0") == []
    assert cluster.tick(4.0) == []
    assert only(cluster.tick(4.1), Kill) == [Kill(second, "drain")]
    assert cluster.exited(second, "was killed by signal 9") == [Stop(0)]


# ------------------------------------------------------------- rolling restart
def test_rolling_restart_replaces_one_worker_at_a_time() -> None:
    cluster = started(3)
    old = cluster.pids_of()
    actions = cluster.reload()
    assert "rolling restart of 3 workers started" in logs(actions, logging.INFO)
    assert only(actions, Spawn) == [Spawn(0, old[0])]
    for i in range(3):
        new = cluster.last_pid(i)
        assert cluster.sup.by_pid[new].replaces == old[i]
        # Until the new worker is ready the old one keeps serving.
        assert cluster.tick(cluster.now + 1) == []
        assert cluster.sup.by_pid[old[i]].state == READY
        assert cluster.ready(new) == [Drain(old[i])]
        actions = cluster.exited(old[i], "exited with code 0")
        if i < 2:
            assert actions == [Spawn(i + 1, old[i + 1])]
        else:
            assert actions == [Log(logging.INFO, "rolling restart complete")]
    assert sorted(cluster.pids_of(READY)) == [cluster.last_pid(i) for i in range(3)]
    assert not cluster.sup.restarting


def test_restart_batch_replaces_several_at_a_time() -> None:
    cluster = started(5, restart_batch=2)
    old = cluster.pids_of()
    assert only(cluster.reload(), Spawn) == [Spawn(0, old[0]), Spawn(1, old[1])]
    cluster.ready(cluster.last_pid(0))
    assert only(cluster.exited(old[0], "exited with code 0"), Spawn) == [Spawn(2, old[2])]


def test_broken_new_worker_aborts_the_restart() -> None:
    cluster = started(3)
    old = cluster.pids_of()
    cluster.reload()
    cluster.ready(cluster.last_pid(0))
    cluster.exited(old[0], "exited with code 0")  # worker 0 replaced
    broken = cluster.last_pid(1)
    actions = cluster.exited(broken, "exited with code 1")
    assert only(actions, Drain) == only(actions, Spawn) == []
    errors = logs(actions, logging.ERROR)
    assert len(errors) == 1 and "rolling restart aborted" in errors[0]
    assert f"new worker {broken}" in errors[0]
    # The old workers 1 and 2 keep serving, and are not retiring any more.
    assert set(old[1:]) <= set(cluster.pids_of(READY))
    assert not any(w.retiring for w in cluster.sup.live())
    assert cluster.tick(cluster.now + 1000) == []
    # Their exit is now a crash, replaced at once.
    assert cluster.exited(old[2]) == [Spawn(2)]


def test_new_worker_that_misses_its_boot_timeout_aborts_the_restart() -> None:
    cluster = started(2, boot_timeout=5.0)
    old = cluster.pids_of()
    cluster.reload()
    new = cluster.last_pid(0)
    assert only(cluster.tick(6.0), Kill) == [Kill(new, "timeout")]
    actions = cluster.exited(new, "was killed by signal 9")
    assert any("rolling restart aborted" in m for m in logs(actions, logging.ERROR))
    assert sorted(cluster.pids_of()) == old


def test_second_reload_is_queued_until_the_first_completes() -> None:
    cluster = started(2)
    cluster.reload()
    queued = cluster.reload()
    assert only(queued, Spawn) == []
    assert "already in progress" in logs(queued, logging.WARNING)[0]
    for i in range(2):
        old = [p for p in cluster.pids_of() if cluster.sup.by_pid[p].retiring][0]
        cluster.ready(cluster.last_pid(i))
        actions = cluster.exited(old, "exited with code 0")
    # The first restart completes and the queued one starts at once.
    assert "rolling restart complete" in logs(actions, logging.INFO)
    assert any("rolling restart of 2 workers started" in m for m in logs(actions, logging.INFO))
    assert only(actions, Spawn) == [Spawn(0, cluster.pids_of()[0])]
    assert cluster.sup.restarting


def test_old_worker_crashing_during_its_replacement_boot() -> None:
    cluster = started(2)
    old = cluster.pids_of()
    cluster.reload()
    new = cluster.last_pid(0)
    assert cluster.exited(old[0], "was killed by signal 11") == []  # a replacement is coming
    assert cluster.ready(new) == [Spawn(1, old[1])]


def test_slot_is_refilled_when_old_and_new_workers_both_die() -> None:
    cluster = started(2)
    old = cluster.pids_of()
    cluster.reload()
    new = cluster.last_pid(0)
    cluster.exited(old[0], "was killed by signal 11")
    cluster.exited(new, "exited with code 1")
    cluster.tick(cluster.now + 1000)
    assert 0 in {w.worker_id for w in cluster.sup.live()}


def test_restart_keeps_restart_batch_replacements_in_flight() -> None:
    # Regression: an old worker and its replacement were counted as two, so
    # restart_batch=2 ran one replacement at a time after the first pair.
    cluster = started(4, restart_batch=2)
    old = cluster.pids_of()
    cluster.reload()
    cluster.ready(cluster.last_pid(0))
    assert cluster.exited(old[0], "exited with code 0") == [Spawn(2, old[2])]
    assert sum(1 for w in cluster.sup.live() if w.replaces is not None) == 2


def test_replacement_of_a_replacement_takes_over_from_the_first_worker() -> None:
    # Regression: B (replacing A) was queued by a reload and got its own
    # replacement C; B died booting, A was kept *and* C came up: two workers
    # served slot 0 for good, and nothing ever drained A.
    cluster = started(1, restart_batch=2)
    a = cluster.last_pid(0)
    cluster.apply(cluster.sup.recycle(a, cluster.now, "max_requests"))
    b = cluster.last_pid(0)
    assert only(cluster.reload(), Spawn) == [Spawn(0, b)]
    c = cluster.last_pid(0)
    assert cluster.exited(b, "exited with code 1") == []
    assert cluster.sup.by_pid[c].replaces == a
    assert cluster.ready(c) == [Drain(a)]
    assert "rolling restart complete" in logs(cluster.exited(a, "exited with code 0"), logging.INFO)
    assert cluster.pids_of() == [c]


def test_worker_recycled_while_queued_for_restart_is_replaced_once() -> None:
    # Regression: with restart_batch >= 2 the restart reached a worker that
    # recycling was already replacing, and spawned a second replacement.
    cluster = started(3, restart_batch=2)
    old = cluster.pids_of()
    cluster.reload()  # replaces 0 and 1; 2 waits in the queue
    cluster.apply(cluster.sup.recycle(old[2], cluster.now, "max_memory"))
    for i in (0, 1):
        cluster.ready(cluster.last_pid(i))
        assert only(cluster.exited(old[i], "exited with code 0"), Spawn) == []
    assert [wid for wid, _, replaces in cluster.spawned if replaces == old[2]] == [2]


def test_scale_down_during_reload_spawns_nothing_beyond_the_workers() -> None:
    # Regression: a booting worker killed by a scale-down was still queued by
    # a reload, and its replacement took a slot that no longer exists.
    cluster = Cluster(workers=2)
    cluster.start()
    cluster.ready(cluster.last_pid(0))
    cluster.scale(-1)
    actions = cluster.reload()
    assert "rolling restart of 1 workers started" in logs(actions, logging.INFO)
    assert only(actions, Spawn) == [Spawn(0, cluster.pids_of()[0])]


def test_scaled_away_worker_is_not_recycled() -> None:
    cluster = Cluster(workers=2)
    cluster.start()
    doomed = cluster.last_pid(1)
    cluster.scale(-1)
    cluster.ready(doomed)  # its Ready was read before the SIGKILL landed
    assert cluster.sup.recycle(doomed, cluster.now, "max_requests") == []


def test_killing_a_scaled_away_replacement_is_no_failure() -> None:
    # Neither a boot failure (which could stop the primary) nor a broken
    # rolling restart: the operator asked for one worker fewer.
    cluster = started(2, max_boot_failures=1)
    cluster.reload()
    cluster.ready(cluster.last_pid(0))
    cluster.exited(cluster.pids_of(DRAINING)[0], "exited with code 0")
    new = cluster.last_pid(1)
    actions = cluster.scale(-1)
    assert Kill(new, "scale") in actions
    actions = cluster.exited(new, "was killed by signal 9")
    assert logs(actions, logging.ERROR) == logs(actions, logging.CRITICAL) == []
    assert only(actions, Stop) == []
    assert cluster.sup.slots[1].boot_failures == 0


def test_reload_when_stopping_does_nothing() -> None:
    cluster = started(2)
    cluster.shutdown()
    assert cluster.reload() == []


# ----------------------------------------------------------------- recycling
def test_recycle_spawns_the_replacement_before_draining() -> None:
    cluster = started(2)
    pid = cluster.last_pid(1)
    actions = cluster.apply(cluster.sup.recycle(pid, cluster.now, "too fat"))
    assert only(actions, Spawn) == [Spawn(1, pid, "recycle")]
    assert "too fat" in logs(actions, logging.INFO)[0]
    assert cluster.sup.recycle(pid, cluster.now, "again") == []  # once
    assert cluster.ready(cluster.last_pid(1)) == [Drain(pid)]
    assert cluster.exited(pid, "exited with code 0") == []


def test_failed_recycle_replacement_is_retried_after_a_backoff() -> None:
    cluster = started(2, backoff_base=1.0, backoff_max=4.0)
    old = cluster.last_pid(1)
    cluster.apply(cluster.sup.recycle(old, cluster.now, "max_requests"))
    # The replacement dies during boot: the old worker keeps serving, no drain.
    actions = cluster.exited(cluster.last_pid(1))
    assert only(actions, Drain) == [] and only(actions, Spawn) == []
    assert "recycling worker 1 again in 1s" in logs(actions, logging.ERROR)[0]
    # Heartbeats keep asking (max_memory does, every second): nothing before the backoff.
    assert cluster.apply(cluster.sup.recycle(old, cluster.now, "max_memory")) == []
    assert cluster.tick(0.5) == []
    # After it, the tick retries on its own; each failure doubles the wait, up to backoff_max.
    waits = []
    for _ in range(4):
        assert only(cluster.tick(cluster.sup.slots[1].recycle_not_before), Spawn) == [Spawn(1, old, "recycle")]
        message = logs(cluster.exited(cluster.last_pid(1)), logging.ERROR)[0]
        waits.append(message.rsplit(" in ", 1)[1])
    assert waits == ["2s", "4s", "4s", "4s"]
    # A replacement that becomes ready ends it: the old worker drains and the count resets.
    cluster.tick(cluster.sup.slots[1].recycle_not_before)
    assert cluster.ready(cluster.last_pid(1)) == [Drain(old)]
    assert cluster.sup.slots[1].recycle_failures == 0
    assert cluster.exited(old, "exited with code 0") == []
    assert cluster.tick(cluster.now + 100) == []


def test_failed_rolling_restart_replacement_does_not_schedule_a_recycle() -> None:
    cluster = started(2)
    cluster.reload()
    actions = cluster.exited(cluster.last_pid(0))
    assert "rolling restart aborted" in logs(actions, logging.ERROR)[0]
    assert "again" not in logs(actions, logging.ERROR)[0]
    assert cluster.tick(cluster.now + 100) == []


# ------------------------------------------------------------------- scaling
def test_scale_up_and_down() -> None:
    cluster = started(2)
    actions = cluster.scale(+1)
    assert only(actions, Spawn) == [Spawn(2)]
    assert cluster.sup.workers == 3
    cluster.all_ready()
    top = cluster.last_pid(2)
    actions = cluster.scale(-1)
    assert only(actions, Drain) == [Drain(top)]
    assert cluster.sup.workers == 2
    assert cluster.exited(top, "exited with code 0") == []  # not refilled


def test_scale_down_kills_a_booting_worker() -> None:
    cluster = started(2)
    cluster.scale(+1)
    actions = cluster.scale(-1)
    assert only(actions, Kill) == [Kill(cluster.last_pid(2), "scale")]


def test_never_below_one_worker() -> None:
    cluster = started(2)
    cluster.scale(-1)
    actions = cluster.scale(-1)
    assert cluster.sup.workers == 1
    assert only(actions, Drain) == only(actions, Kill) == []
    assert "already at one worker" in logs(actions, logging.WARNING)[0]


def test_scale_up_fills_only_empty_slots() -> None:
    cluster = started(2)
    assert only(cluster.scale(+2), Spawn) == [Spawn(2), Spawn(3)]


# ------------------------------------------------------------------ shutdown
def test_graceful_shutdown_drains_all_then_stops() -> None:
    cluster = started(3)
    pids = cluster.pids_of()
    actions = cluster.shutdown()
    assert sorted(only(actions, Drain), key=lambda a: a.pid) == [Drain(p) for p in pids]
    assert cluster.shutdown() == []  # a second graceful request changes nothing
    assert cluster.exited(pids[0], "exited with code 0") == []
    assert cluster.exited(pids[1], "exited with code 1") == []  # no respawn
    assert cluster.exited(pids[2], "exited with code 0") == [Stop(0)]


def test_worker_booting_during_shutdown_is_drained_when_ready() -> None:
    cluster = started(2)
    crashed = cluster.last_pid(0)
    cluster.exited(crashed)
    booting = cluster.last_pid(0)
    cluster.shutdown()
    # Drained already by shutdown: Ready changes nothing, no second Drain.
    assert cluster.ready(booting) == []
    assert cluster.sup.by_pid[booting].state == DRAINING


def test_fast_shutdown_kills_all() -> None:
    cluster = started(3)
    pids = cluster.pids_of()
    actions = cluster.shutdown(graceful=False)
    assert actions == [Kill(p, "shutdown") for p in pids]
    for pid in pids[:-1]:
        assert cluster.exited(pid, "was killed by signal 9") == []
    assert cluster.exited(pids[-1], "was killed by signal 9") == [Stop(0)]


def test_fast_shutdown_after_graceful_one() -> None:
    cluster = started(2)
    cluster.shutdown()
    assert len(only(cluster.shutdown(graceful=False), Kill)) == 2


def test_fast_shutdown_after_boot_failure_keeps_the_exit_code() -> None:
    # Regression: a quit request handled in the same loop pass as the last
    # exit turned EXIT_BOOT_FAILURE into Stop(0).
    cluster = Cluster(workers=1, max_boot_failures=1)
    cluster.start()
    assert cluster.exited(cluster.last_pid(0))[-1] == Stop(EXIT_BOOT_FAILURE)
    assert cluster.shutdown(graceful=False) == [Stop(EXIT_BOOT_FAILURE)]


def test_shutdown_with_no_workers_stops_at_once() -> None:
    cluster = started(1)
    cluster.exited(cluster.last_pid(0))
    cluster.exited(cluster.last_pid(0))  # boot failure: slot empty, backing off
    assert cluster.sup.by_pid == {}
    assert cluster.shutdown() == [Stop(0)]
    assert cluster.tick(cluster.now + 1000) == []


# ====================================================== stateful, randomised
class SupervisorMachine(RuleBasedStateMachine):
    """Random events in an order the primary could see them.

    Each action list is carried out as ``Server._apply`` does: ``Spawn`` at
    once with a fresh pid; ``Kill`` and ``Drain`` mark the pid so that a later
    rule delivers its exit (a drained worker may also hang until the drain
    deadline kills it). Any worker may also crash at any moment.
    """

    def __init__(self) -> None:
        super().__init__()
        self.sup: Supervisor | None = None
        self.pids = itertools.count(1000)
        self.now = 0.0
        self.killed: set[int] = set()
        self.drained: set[int] = set()
        self.stopped = False
        self.stop_requested = False
        self.ever_spawned: set[int] = set()
        self.recycled: set[int] = set()  # old pids replaced because of recycle()
        self.forks_to_fail = 0  # the next Spawns fail (fork EAGAIN, socketpair EMFILE)

    # -- carrying out actions
    def apply(self, actions: list[Action], source: str) -> None:
        sup = self.sup
        assert sup is not None
        stopping_before = sup.stopping
        for action in actions:
            if isinstance(action, Spawn) and sup.stopping and not stopping_before:
                continue  # a failed spawn earlier in this list gave up: the primary drops the rest
            assert not self.stopped, f"{action} after Stop"
            if isinstance(action, Spawn):
                assert not sup.stopping, f"{action} while stopping ({source})"
                assert action.worker_id < sup.workers, f"{action} beyond {sup.workers} workers ({source})"
                if action.replaces is not None:
                    old = sup.by_pid[action.replaces]
                    assert old.worker_id == action.worker_id
                    assert old.retiring
                    if action.cause == "recycle":
                        self.recycled.add(action.replaces)
                if self.forks_to_fail:
                    self.forks_to_fail -= 1
                    failed = sup.spawn_failed(action.worker_id, action.replaces, self.now, "EAGAIN")
                    if action.replaces is not None:
                        assert not sup.by_pid[action.replaces].retiring  # it keeps serving
                    self.apply(failed, "spawn_failed")
                    continue
                pid = next(self.pids)
                self.ever_spawned.add(pid)
                sup.spawned(action.worker_id, pid, self.now, action.replaces)
            elif isinstance(action, Drain):
                assert action.pid in sup.by_pid
                assert action.pid not in self.drained, f"second Drain for {action.pid}"
                if source not in ("shutdown", "scale") and not sup.stopping:
                    # Only a ready replacement in the same slot lets a worker drain.
                    wid = sup.by_pid[action.pid].worker_id
                    assert any(
                        w.worker_id == wid and w.state == READY and w.pid != action.pid
                        for w in sup.by_pid.values()
                    ), f"{action} with no ready replacement ({source})"
                self.drained.add(action.pid)
            elif isinstance(action, Kill):
                assert action.pid in sup.by_pid
                self.killed.add(action.pid)
            elif isinstance(action, Stall):
                worker = sup.by_pid[action.pid]
                assert worker.state == READY and worker.stalled
                assert action.silent > sup.stall_after
            elif isinstance(action, Resume):
                assert not sup.by_pid[action.pid].stalled
            elif isinstance(action, Stop):
                assert sup.by_pid == {}, f"Stop with workers left: {sorted(sup.by_pid)}"
                assert action.code in (0, EXIT_BOOT_FAILURE)
                self.stopped = True
            else:
                assert isinstance(action, Log)
                if action.level == logging.CRITICAL:
                    # Giving up on boot failures only while no worker ever served.
                    assert not sup.ever_ready or source != "exited"
                    assert sup.exit_code == EXIT_BOOT_FAILURE

    @rule(
        workers=st.integers(1, 4),
        restart_batch=st.integers(1, 2),
        max_boot_failures=st.integers(1, 6),
    )
    @precondition(lambda self: self.sup is None)
    def start(self, workers: int, restart_batch: int, max_boot_failures: int) -> None:
        self.sup = Supervisor(
            workers=workers,
            timeout=10.0,
            boot_timeout=10.0,
            graceful_timeout=10.0,
            restart_batch=restart_batch,
            max_boot_failures=max_boot_failures,
            backoff_base=0.5,
            backoff_max=4.0,
            stall_after=2.5,
            max_requests=5,
            max_requests_jitter=3,
            max_memory=1000,
            rng=random.Random(0),
        )
        self.apply(self.sup.start(self.now), "start")

    def running(self) -> bool:
        return self.sup is not None and not self.stopped

    def pick(self, data: st.DataObject, pids: list[int]) -> int:
        return data.draw(st.sampled_from(sorted(pids)))

    # -- worker events
    @precondition(lambda self: self.running() and self.booting())
    @rule(data=st.data())
    def ready(self, data: st.DataObject) -> None:
        pid = self.pick(data, self.booting())
        self.apply(self.sup.ready(pid, self.now), "ready")

    def booting(self) -> list[int]:
        return [w.pid for w in self.sup.by_pid.values() if w.state == BOOTING]

    @precondition(lambda self: self.running() and self.sup.by_pid)
    @rule(data=st.data(), total=st.integers(0, 10), rss=st.sampled_from([0, 500, 5000]))
    def heartbeat(self, data: st.DataObject, total: int, rss: int) -> None:
        pid = self.pick(data, list(self.sup.by_pid))
        self.apply(self.sup.heartbeat(pid, self.now, total, rss), "heartbeat")
        assert not self.sup.by_pid[pid].stalled  # it spoke

    @precondition(lambda self: self.running() and self.sup.by_pid)
    @rule(data=st.data(), count=st.integers(0, 10))
    def connections_passed(self, data: st.DataObject, count: int) -> None:
        pid = self.pick(data, list(self.sup.by_pid))
        limit = self.sup.by_pid[pid].request_limit
        actions = self.sup.passed(pid, count, self.now)
        self.apply(actions, "passed")
        if not limit or count < limit:
            assert actions == []

    @precondition(lambda self: self.running() and self.sup.by_pid)
    @rule(data=st.data(), code=st.sampled_from(["exited with code 0", "exited with code 1"]))
    def crash(self, data: st.DataObject, code: str) -> None:
        pid = self.pick(data, list(self.sup.by_pid))
        self.apply(self.sup.exited(pid, self.now, code), "exited")

    @precondition(lambda self: self.running() and self.pending_exits())
    @rule(data=st.data())
    def killed_or_drained_worker_exits(self, data: st.DataObject) -> None:
        pid = self.pick(data, self.pending_exits())
        self.apply(self.sup.exited(pid, self.now, "exited with code 0"), "exited")

    def pending_exits(self) -> list[int]:
        return [p for p in self.sup.by_pid if p in self.killed or p in self.drained]

    @precondition(lambda self: self.running())
    @rule(dt=st.sampled_from([0.1, 0.6, 2.0, 5.0, 11.0]))
    def tick(self, dt: float) -> None:
        self.now += dt
        self.apply(self.sup.tick(self.now), "tick")

    # -- operator requests
    @precondition(lambda self: self.running())
    @rule()
    def reload(self) -> None:
        self.apply(self.sup.reload(self.now), "reload")

    @precondition(lambda self: self.running())
    @rule(count=st.integers(1, 3))
    def forks_fail(self, count: int) -> None:
        self.forks_to_fail = count

    @precondition(lambda self: self.running())
    @rule(delta=st.sampled_from([1, -1, 2, -3]))
    def scale(self, delta: int) -> None:
        before = self.sup.workers
        self.apply(self.sup.scale(delta, self.now), "scale")
        if not self.sup.stopping:
            assert self.sup.workers == max(1, before + delta)

    @precondition(lambda self: self.running() and self.ready_pids())
    @rule(data=st.data())
    def recycle(self, data: st.DataObject) -> None:
        pid = self.pick(data, self.ready_pids())
        self.apply(self.sup.recycle(pid, self.now, "max_requests"), "recycle")

    def ready_pids(self) -> list[int]:
        return [w.pid for w in self.sup.by_pid.values() if w.state == READY]

    @precondition(lambda self: self.running())
    @rule(graceful=st.booleans())
    def shutdown(self, graceful: bool) -> None:
        self.stop_requested = True
        self.apply(self.sup.shutdown(self.now, graceful), "shutdown")

    @precondition(lambda self: self.stopped)
    @rule()
    def primary_has_left_its_loop(self) -> None:
        # Nothing more reaches the supervisor once it said Stop.
        assert self.sup.by_pid == {}
        assert self.sup.stopping

    # -- invariants
    @invariant()
    def pids_are_consistent(self) -> None:
        if self.sup is None:
            return
        for pid, worker in self.sup.by_pid.items():
            assert worker.pid == pid
            assert pid in self.ever_spawned
            assert worker.state in (BOOTING, READY, DRAINING)

    @invariant()
    def one_serving_worker_per_slot(self) -> None:
        # Retiring and draining workers are on their way out; of the others,
        # each slot holds at most one, and none beyond the configured count
        # unless it is already being killed.
        if self.sup is None:
            return
        staying = [w for w in self.sup.by_pid.values() if not w.retiring and w.state != DRAINING]
        ids = [w.worker_id for w in staying]
        assert len(ids) == len(set(ids)), f"two serving workers in one slot: {self.sup.live()}"
        for w in staying:
            assert w.worker_id < self.sup.workers or w.kill_cause is not None, w

    @invariant()
    def every_slot_is_filled_or_waiting(self) -> None:
        sup = self.sup
        if sup is None or sup.stopping:
            return
        staying = {w.worker_id for w in sup.by_pid.values() if not w.retiring and w.state != DRAINING}
        for wid in range(sup.workers):
            assert wid in staying or sup.slots[wid].respawn_at is not None, (
                f"slot {wid} is empty and nothing will refill it: {sup.live()}"
            )

    @invariant()
    def restart_batch_bounds_the_overlap(self) -> None:
        # Old workers being replaced by the rolling restart never exceed the
        # batch; recycling replaces workers on its own account.
        sup = self.sup
        if sup is None:
            return
        replacing = {w.pid for w in sup.by_pid.values() if w.retiring}
        replacing |= {w.replaces for w in sup.by_pid.values() if w.replaces is not None}
        assert len(replacing - self.recycled) <= sup.restart_batch

    @invariant()
    def only_ready_or_draining_workers_stall(self) -> None:
        if self.sup is None:
            return
        for worker in self.sup.by_pid.values():
            assert not worker.stalled or worker.state in (READY, DRAINING)
            assert 0 <= worker.request_limit <= 8

    @invariant()
    def stopping_once_asked(self) -> None:
        if self.stop_requested:
            assert self.sup.stopping


TestSupervisorMachine = SupervisorMachine.TestCase
TestSupervisorMachine.settings = settings(
    max_examples=300,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


"""The supervisor's decisions about failures: failed spawns and what counts as a restart."""

from __future__ import annotations

import random

from dispatch.supervisor import (
    EXIT_BOOT_FAILURE,
    Drain,
    Kill,
    Log,
    Resume,
    Spawn,
    Stall,
    Stop,
    Supervisor,
)


def started(workers: int = 2, **options: object) -> tuple[Supervisor, dict[int, int]]:
    """A supervisor whose first workers are spawned and ready; slot -> pid."""
    sup = Supervisor(workers=workers, **options)  # type: ignore[arg-type]
    pids = {}
    for action in sup.start(0.0):
        assert isinstance(action, Spawn)
        pid = 100 + action.worker_id
        sup.spawned(action.worker_id, pid, 0.0)
        sup.ready(pid, 0.0)
        pids[action.worker_id] = pid
    return sup, pids


def test_a_failed_spawn_in_a_rolling_restart_aborts_it_and_keeps_the_old_worker() -> None:
    sup, pids = started()
    spawn = next(a for a in sup.reload(1.0) if isinstance(a, Spawn))
    actions = sup.spawn_failed(spawn.worker_id, spawn.replaces, 1.0, "fork: EAGAIN")
    assert any(isinstance(a, Log) and "rolling restart aborted" in a.message for a in actions)
    assert not sup.restarting and not sup.by_pid[pids[0]].retiring
    assert sup.restarts_by_cause == {"spawn": 1}
    assert not any(isinstance(a, Spawn) for a in sup.tick(5.0))  # no retry behind the operator's back


def test_a_failed_spawn_of_an_empty_slot_is_retried_after_a_backoff() -> None:
    sup, pids = started()
    assert sup.exited(pids[1], 1.0, "was killed by signal 9", signaled=True) == [Spawn(1)]
    actions = sup.spawn_failed(1, None, 1.0, "socketpair: EMFILE")
    assert any(isinstance(a, Log) and "retrying in 0.5s" in a.message for a in actions)
    assert sup.tick(1.2) == []
    assert sup.tick(1.6) == [Spawn(1)]
    assert sup.restarts_by_cause == {"signal": 1, "spawn": 1}


def test_spawns_that_always_fail_before_any_worker_is_ready_stop_with_exit_3() -> None:
    sup = Supervisor(workers=1, max_boot_failures=3)
    sup.start(0.0)
    now, actions = 0.0, []
    for _ in range(3):
        actions = sup.spawn_failed(0, None, now, "fork: EAGAIN")
        now += 60
        sup.tick(now)
    assert actions[-1] == Stop(EXIT_BOOT_FAILURE) and sup.stopping


def test_a_failed_recycle_spawn_backs_off_before_the_next_attempt() -> None:
    sup, pids = started()
    spawn = next(a for a in sup.recycle(pids[0], 1.0, "max_requests") if isinstance(a, Spawn))
    sup.spawn_failed(spawn.worker_id, spawn.replaces, 1.0, "fork: EAGAIN")
    assert sup.tick(1.2) == []  # backing off
    assert any(isinstance(a, Spawn) for a in sup.tick(2.0))


def test_a_booting_worker_removed_by_scale_down_is_not_a_restart() -> None:
    sup, pids = started()
    sup.scale(1, 1.0)
    sup.spawned(2, 102, 1.0)  # still booting
    assert Kill(102, "scale") in sup.scale(-1, 1.5)
    sup.exited(102, 1.6, "was killed by signal 9", signaled=True)
    assert sup.restarts_by_cause == {}


def test_a_recycled_worker_that_overruns_its_drain_counts_once() -> None:
    sup, pids = started(graceful_timeout=5.0)
    spawn = next(a for a in sup.recycle(pids[0], 1.0, "max_memory") if isinstance(a, Spawn))
    sup.spawned(spawn.worker_id, 200, 1.0, spawn.replaces)
    assert Drain(pids[0]) in sup.ready(200, 1.5)
    assert Kill(pids[0], "drain") in sup.tick(10.0)  # it overran graceful_timeout
    sup.exited(pids[0], 10.1, "was killed by signal 9", signaled=True)
    assert sup.restarts_by_cause == {"recycle": 1}


def test_scale_down_by_more_than_one_never_goes_below_one_worker() -> None:
    sup, pids = started(workers=4)
    actions = sup.scale(-10, 1.0)
    assert sup.workers == 1
    assert sorted(a.pid for a in actions if isinstance(a, Drain)) == [pids[1], pids[2], pids[3]]


def test_memory_recycling_waits_until_the_worker_is_old_enough() -> None:
    sup, pids = started(max_memory=1000, memory_grace=5.0)
    assert sup.heartbeat(pids[0], 4.0, rss=5000) == []  # 4 s old: a fresh worker's size
    actions = sup.heartbeat(pids[0], 5.5, rss=5000)
    assert any(isinstance(a, Spawn) and a.cause == "recycle" for a in actions)


def test_a_silent_worker_stalls_and_resumes_when_it_speaks() -> None:
    sup, pids = started(stall_after=2.5)
    sup.heartbeat(pids[1], 2.0)
    assert sup.tick(3.0) == [Stall(pids[0], 3.0)]
    assert sup.tick(3.5) == []  # once
    assert sup.heard_from(pids[0], 4.0) == [Resume(pids[0])]
    assert sup.heard_from(pids[0], 4.1) == []


def test_max_requests_jitter_comes_from_the_injected_rng() -> None:
    limits = []
    for _ in range(2):
        sup = Supervisor(workers=3, max_requests=100, max_requests_jitter=50, rng=random.Random(7))
        for action in sup.start(0.0):
            assert isinstance(action, Spawn)
            limits.append(sup.spawned(action.worker_id, 10 + action.worker_id, 0.0).request_limit)
    assert limits[:3] == limits[3:] and all(100 <= x <= 150 for x in limits)
    assert len(set(limits[:3])) > 1

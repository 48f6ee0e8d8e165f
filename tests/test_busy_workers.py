"""skip_busy and reclaim_after with real processes: a worker whose event loop is blocked
gets no new connections, and what it was given just before it blocked is taken back."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import psutil
import pytest

from tests.helpers import ServerProcess, request, wait_for

BURN_MS = 3000
FAST = 12
SLOW = 1.0  # seconds: a quick request that took this long waited for the burn


def _pid(body: str) -> int:
    found = re.search(r"pid (\d+)", body)
    assert found, body
    return int(found.group(1))


def _burning(workers: list[int]) -> int | None:
    """The worker spending a whole core now (its loop is in the burn)."""
    before = {pid: sum(psutil.Process(pid).cpu_times()[:2]) for pid in workers}
    time.sleep(0.2)
    for pid in workers:
        if sum(psutil.Process(pid).cpu_times()[:2]) - before[pid] > 0.15:
            return pid
    return None


def test_least_connections_takes_back_what_a_blocked_loop_left_unread() -> None:
    # Quick requests three at a time: the other worker holds some of them, so the
    # blocked one (holding only its burn) ties and gets one now and then.
    waited, burning, skipped, reclaimed = _fast_requests_during_a_burn("least-connections", burst=3)
    assert [s for s in waited if s > SLOW] == [], waited
    assert reclaimed[burning] >= 1, reclaimed


def test_without_taking_back_a_connection_waits_behind_the_blocked_loop() -> None:
    waited, burning, skipped, reclaimed = _fast_requests_during_a_burn("least-connections", burst=3,
                                                                       reclaim_after=0)
    assert len([s for s in waited if s > SLOW]) >= 1, waited
    assert set(reclaimed.values()) == {0}


@pytest.mark.parametrize("balance", ["round-robin", "least-connections"])
def test_a_worker_whose_loop_is_blocked_gets_no_new_connections(balance: str) -> None:
    waited, burning, skipped, reclaimed = _fast_requests_during_a_burn(balance, skip_busy=True, reclaim_after=0)
    # The blocked worker had read its last message before it blocked, so the first
    # connection after may still be given to it; every later one sees it behind.
    assert len([s for s in waited if s > SLOW]) <= 1, waited
    if balance == "round-robin":  # least-connections avoids it anyway: it never reported done
        assert skipped[burning] >= FAST - 2, skipped


def test_without_skip_busy_connections_queue_behind_the_blocked_loop() -> None:
    waited, burning, skipped, reclaimed = _fast_requests_during_a_burn("round-robin", skip_busy=False)
    # Half go to the blocked worker, and wait in its channel until the burn ends or
    # the primary takes them back from the silent worker (stall_after).
    assert len([s for s in waited if s > SLOW]) >= FAST // 4, waited
    assert set(skipped.values()) == {0}
    assert set(reclaimed.values()) == {0}  # reclaiming needs skip_busy


def _fast_requests_during_a_burn(balance: str, burst: int = 1, **options: object) -> tuple[
        list[float], int, dict[int, int], dict[int, int]]:
    """Block one worker's loop with a burn, send FAST quick requests while it lasts:
    how long each took (s), the burning pid, and each worker's skipped_busy and reclaimed."""
    with ServerProcess("dispatch.demo:app", workers=2, balance=balance, **options) as server:
        workers = server.wait_ready(2)
        with ThreadPoolExecutor(FAST * burst + 1) as pool:
            burn = pool.submit(request, server.address, f"/burn?ms={BURN_MS}", 20)
            burning = wait_for(lambda: _burning(workers), timeout=10, what="a worker burning")
            started = time.monotonic()
            fast = []
            for _ in range(FAST):  # open loop: every 20 ms, none waits for the last
                fast += [pool.submit(_timed_request, server.address) for _ in range(burst)]
                time.sleep(0.02)
            waited = [f.result(timeout=20) for f in fast]
            assert _pid(burn.result(timeout=20)) == burning
        assert time.monotonic() - started < BURN_MS / 1000 + 10
        workers_health = server.cluster_health()["workers"]
        skipped = {w["pid"]: w["skipped_busy"] for w in workers_health}
        reclaimed = {w["pid"]: w["reclaimed"] for w in workers_health}
        return waited, burning, skipped, reclaimed


def _timed_request(address: str) -> float:
    began = time.monotonic()
    request(address, "/", 20)
    return time.monotonic() - began

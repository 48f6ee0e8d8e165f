"""worker_affinity: worker N is pinned to the Nth CPU the server may use, replaced ones
too, within the mask the primary was given (a container's cpuset, ``taskset``)."""

from __future__ import annotations

import logging
import os
import signal
from typing import Any

import pytest

from dispatch import worker_boot
from dispatch.config import Config
from dispatch.worker_boot import cpu_for
from tests.helpers import ServerProcess, request, wait_for

ALLOWED = os.sched_getaffinity(0)


def _pinned(server: ServerProcess) -> dict[int, set[int]]:
    """Each worker's id and the CPUs it may run on, from the kernel; /cluster-health says
    the same."""
    workers = server.cluster_health()["workers"]
    pinned = {w["id"]: os.sched_getaffinity(w["pid"]) for w in workers}
    assert {w["id"]: set(w["cpus"]) for w in workers} == pinned
    return pinned


def test_each_worker_runs_on_its_own_cpu_and_a_replacement_on_its_slot_s() -> None:
    with ServerProcess(worker_affinity=True) as server:
        workers = server.wait_ready(2)
        pinned = _pinned(server)
        assert pinned == {0: {cpu_for(0, ALLOWED)}, 1: {cpu_for(1, ALLOWED)}}
        if len(ALLOWED) > 1:
            assert pinned[0] != pinned[1]  # two cores: one each
        victim = next(w for w in server.cluster_health()["workers"] if w["id"] == 1)
        os.kill(victim["pid"], signal.SIGKILL)
        server.wait_replaced([victim["pid"]], 2)
        replacement = wait_for(lambda: next((w for w in server.cluster_health()["workers"]
                                             if w["id"] == 1 and w["pid"] not in workers), None),
                               timeout=20, what="worker 1's replacement")
        assert os.sched_getaffinity(replacement["pid"]) == {cpu_for(1, ALLOWED)}
        assert os.sched_getaffinity(server.pid) == ALLOWED  # the primary keeps its own
        assert "pid" in request(server.address)


def test_within_the_mask_the_server_was_given() -> None:
    cpu = min(ALLOWED)
    with ServerProcess(worker_affinity=True, wrapper=["taskset", "-c", str(cpu)]) as server:
        server.wait_ready(2)
        assert _pinned(server) == {0: {cpu}, 1: {cpu}}  # two workers, one CPU: both on it
        assert "pid" in request(server.address)


def test_the_cli_flag_sets_it() -> None:
    with ServerProcess("dispatch.demo:app", cli=["--workers", "1", "--bind", "127.0.0.1:0",
                                                 "--worker-affinity"]) as server:
        workers = server.wait_ready(1)
        assert os.sched_getaffinity(workers[0]) == {cpu_for(0, ALLOWED)}


def test_without_it_workers_keep_the_primary_s_mask() -> None:
    with ServerProcess() as server:
        workers = server.wait_ready(2)
        assert [os.sched_getaffinity(pid) for pid in workers] == [ALLOWED, ALLOWED]
        assert _pinned(server) == {0: ALLOWED, 1: ALLOWED}


def test_cpus_are_taken_in_order_and_wrap_around() -> None:
    assert [cpu_for(i, {6, 2, 4}) for i in range(5)] == [2, 4, 6, 2, 4]


def test_a_worker_that_cannot_pin_itself_serves_unpinned(monkeypatch: Any, caplog: Any) -> None:
    def refuse(pid: int, cpus: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setaffinity", refuse)
    with caplog.at_level(logging.WARNING, logger="dispatch.worker"):
        worker_boot._pin_to_cpu(3)  # no exception: the worker goes on to serve
    assert "cannot pin itself to a CPU" in caplog.text


def test_only_a_boolean_is_accepted() -> None:
    with pytest.raises((ValueError, TypeError), match="worker_affinity"):
        Config(handler="dispatch.demo:app", worker_affinity="yes")  # type: ignore[arg-type]

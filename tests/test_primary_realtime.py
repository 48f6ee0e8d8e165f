"""primary_realtime: the primary's loop under SCHED_FIFO, the workers under the ordinary
policy (replaced ones too), and a refusal that leaves the server serving."""

from __future__ import annotations

import errno
import os
import signal
import threading
from typing import Any

import pytest

from dispatch import scheduling
from dispatch.config import Config
from tests.helpers import ServerProcess, as_user, request, unprivileged_user, wait_for
from tests.test_attacks import needs_root, needs_tools

PRIORITY = 3


def _policy(pid: int) -> int:
    return os.sched_getscheduler(pid) & ~os.SCHED_RESET_ON_FORK


@needs_root
def test_the_primary_runs_fifo_and_its_workers_do_not() -> None:
    with ServerProcess(primary_realtime=PRIORITY) as server:
        workers = server.wait_ready(2)
        assert _policy(server.pid) == os.SCHED_FIFO
        assert os.sched_getparam(server.pid).sched_priority == PRIORITY
        assert [_policy(pid) for pid in workers] == [os.SCHED_OTHER, os.SCHED_OTHER]
        os.kill(workers[0], signal.SIGKILL)  # forked by the FIFO loop itself
        replaced = wait_for(lambda: [p for p in server.wait_ready(2) if p not in workers] or None,
                            timeout=20, what="a replacement worker")
        assert _policy(replaced[0]) == os.SCHED_OTHER
        assert "pid" in request(server.address)


@needs_root
@needs_tools
def test_refused_without_privilege_the_primary_serves_under_the_ordinary_policy() -> None:
    uid, gid = unprivileged_user()
    wrapper = ["prlimit", "--rtprio=0:0", *as_user(uid, gid)]
    with ServerProcess(primary_realtime=PRIORITY, wrapper=wrapper) as server:
        server.wait_ready(2)
        assert _policy(server.pid) == os.SCHED_OTHER
        assert "pid" in request(server.address)


def test_off_changes_nothing() -> None:
    with ServerProcess() as server:
        server.wait_ready(2)
        assert _policy(server.pid) == os.SCHED_OTHER


@needs_root
def test_the_thread_gets_its_old_policy_back() -> None:
    seen: list[int] = []

    def run() -> None:  # a thread of its own: the policy is per thread
        previous = scheduling.run_realtime(PRIORITY)
        seen.append(_policy(0))
        scheduling.restore(previous)
        seen.append(_policy(0))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert seen == [os.SCHED_FIFO, os.SCHED_OTHER]
    assert scheduling.run_realtime(0) is None


@needs_root
def test_without_cap_sys_nice_the_thread_still_gets_the_ordinary_policy_back(monkeypatch: Any) -> None:
    # With only RLIMIT_RTPRIO the kernel lets a thread into SCHED_FIFO but refuses to clear
    # SCHED_RESET_ON_FORK again (EPERM): the way back keeps the flag. (This machine cannot
    # raise RLIMIT_RTPRIO for a user, so the refusal is the kernel's rule, played here.)
    real = os.sched_setscheduler
    calls: list[int] = []

    def without_cap_sys_nice(pid: int, policy: int, param: os.sched_param) -> None:
        calls.append(policy)
        if policy in (os.SCHED_OTHER, os.SCHED_BATCH, os.SCHED_IDLE):
            raise PermissionError(errno.EPERM, "Operation not permitted")
        real(pid, policy, param)

    monkeypatch.setattr(os, "sched_setscheduler", without_cap_sys_nice)
    seen: list[int] = []

    def run() -> None:
        scheduling.restore(scheduling.run_realtime(PRIORITY))
        seen.append(os.sched_getscheduler(0))

    thread = threading.Thread(target=run)
    thread.start()
    thread.join(10)
    assert seen == [os.SCHED_OTHER | os.SCHED_RESET_ON_FORK]
    assert calls[-1] == os.SCHED_OTHER | os.SCHED_RESET_ON_FORK


@pytest.mark.parametrize("value", [-1, 100, 1.5, "5"])
def test_out_of_range_values_are_refused(value: object) -> None:
    with pytest.raises((ValueError, TypeError), match="primary_realtime"):
        Config(handler="dispatch.demo:app", primary_realtime=value)  # type: ignore[arg-type]

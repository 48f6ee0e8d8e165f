"""The pure parts of running in a fleet: the drain state, the load meter and its weight, the
agent's replies, the control requests of the new signal."""

from __future__ import annotations

import signal
from types import SimpleNamespace

from dispatch import control
from dispatch.agent import Replies, Status
from dispatch.drain import DrainState
from dispatch.load import LoadMeter, weight
from dispatch.protocol import Heartbeat


def test_maintenance_on_off_and_over() -> None:
    state = DrainState()
    assert state.reason is None
    assert state.set_maintenance(None) and "maintenance" in (state.reason or "")
    assert state.set_maintenance(True)
    assert not state.set_maintenance(None) and state.reason is None
    assert not state.set_maintenance(False)


def test_a_delayed_stop_is_due_once_after_the_delay() -> None:
    state = DrainState()
    assert state.delay_stop(100.0, 0.0)  # no delay: stop now
    state = DrainState()
    assert not state.delay_stop(100.0, 2.0)
    assert state.delaying and "shutting down" in (state.reason or "")
    assert not state.due(101.9)
    assert state.due(102.0) and not state.due(103.0)
    assert not state.delaying


def test_sigusr1_turns_maintenance_over() -> None:
    assert control.SIGNALS[signal.SIGWINCH] == control.Maintenance(None)
    assert len(set(control.SIGNALS)) == len(control.SIGNALS)


def worker(pid: int, cpu_ms: int | None, state: str = "ready", capacity: int = 0, outstanding: int = 0,
           stalled: bool = False) -> SimpleNamespace:
    report = None if cpu_ms is None else Heartbeat(0, 0, 0, cpu_ms)
    return SimpleNamespace(pid=pid, state=state, stalled=stalled, report=report, capacity=capacity,
                           outstanding=outstanding)


def test_load_from_cpu_between_heartbeats() -> None:
    meter = LoadMeter()
    a, b = worker(1, 0), worker(2, 0)
    meter.sample([a, b], 10.0)
    a.report, b.report = Heartbeat(0, 0, 0, 1000), Heartbeat(0, 0, 0, 0)  # a burned 1 s in 1 s
    meter.sample([a, b], 11.0)
    meter.sample([a, b], 11.1)  # the same reports again: nothing new
    assert meter.worker_load(a) == 1.0 and meter.worker_load(b) == 0.0
    assert meter.load({1: a, 2: b}) == 0.5 and weight(0.5) == 50
    # Exited workers are forgotten; booting ones do not count; none ready: None.
    meter.sample([b], 12.0)
    assert meter.worker_load(a) == 0.0
    assert meter.load({2: worker(2, 0, state="booting")}) is None


def test_load_from_held_connections_and_stalls() -> None:
    meter = LoadMeter()
    assert meter.worker_load(worker(1, None, capacity=4, outstanding=3)) == 0.75
    assert meter.worker_load(worker(1, None, capacity=0, outstanding=300)) == 0.0  # no limit known
    assert meter.worker_load(worker(1, None, stalled=True)) == 1.0


def test_load_of_a_pull_worker_from_what_it_reported_holding() -> None:
    # In pull mode the primary does not know what a worker took (outstanding stays 0):
    # its last heartbeat's active count says how full it is.
    pulled = worker(1, 0, capacity=4)
    pulled.report = Heartbeat(3, 0, 0, 0)
    assert LoadMeter().worker_load(pulled) == 0.75


def test_weight_bounds() -> None:
    assert weight(0.0) == 100 and weight(1.0) == 1 and weight(0.999) == 1 and weight(0.25) == 75


def test_agent_replies_say_ready_only_in_the_window_after_going_up() -> None:
    replies = Replies(weight, window=30.0)
    up = Status(False, False, 0.0)
    assert replies.line(Status(False, False, None), 0.0) == b"drain\n"  # booting
    assert replies.line(up, 1.0) == b"up ready 100%\n"
    assert replies.line(Status(False, False, 0.5), 30.9) == b"up ready 50%\n"
    assert replies.line(up, 31.0) == b"up 100%\n"  # an operator's own maint holds now
    assert replies.line(Status(False, True, 0.0), 40.0) == b"drain\n"
    assert replies.line(up, 50.0) == b"up ready 100%\n"  # back from maintenance
    assert replies.line(Status(True, False, 0.0), 60.0) == b"maint\n"
    assert replies.line(Status(True, True, None), 61.0) == b"maint\n"

"""worker_nice: workers run at a lower scheduling priority than the primary, replaced
ones too, so that the primary gets a CPU first when every core is busy."""

from __future__ import annotations

import os
import signal

import psutil
import pytest

from dispatch.config import Config
from tests.helpers import ServerProcess, request, wait_for

INCREMENT = 7


def _nice(pid: int) -> int:
    return psutil.Process(pid).nice()


def test_workers_run_nicer_than_the_primary_and_so_do_their_replacements() -> None:
    with ServerProcess(worker_nice=INCREMENT) as server:
        workers = server.wait_ready(2)
        expected = min(19, _nice(server.pid) + INCREMENT)
        assert [_nice(pid) for pid in workers] == [expected, expected]
        os.kill(workers[0], signal.SIGKILL)
        replaced = wait_for(lambda: [p for p in server.wait_ready(2) if p not in workers] or None,
                            timeout=20, what="a replacement worker")
        assert _nice(replaced[0]) == expected
        assert _nice(server.pid) == expected - INCREMENT  # the primary keeps its own
        assert "pid" in request(server.address)


def test_the_cli_flag_sets_it() -> None:
    with ServerProcess("dispatch.demo:app", cli=["--workers", "1", "--bind", "127.0.0.1:0",
                                                 "--worker-nice", "3"]) as server:
        workers = server.wait_ready(1)
        assert _nice(workers[0]) == min(19, _nice(server.pid) + 3)


def test_without_it_workers_keep_the_primary_s_priority() -> None:
    with ServerProcess() as server:
        workers = server.wait_ready(2)
        assert {_nice(pid) for pid in workers} == {_nice(server.pid)}


@pytest.mark.parametrize("value", [-1, 20, 1.5, "5"])
def test_out_of_range_values_are_refused(value: object) -> None:
    with pytest.raises((ValueError, TypeError), match="worker_nice"):
        Config(handler="dispatch.demo:app", worker_nice=value)  # type: ignore[arg-type]

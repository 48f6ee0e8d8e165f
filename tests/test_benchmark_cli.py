"""The benchmark commands' own option checks (no server is started)."""

from __future__ import annotations

import pytest

from benchmarks.cli import build_parser
from benchmarks.commands import abuse


def _abuse_args(*argv: str) -> object:
    top, parsers = build_parser()
    args = top.parse_args(["abuse", *argv])
    abuse.finish(args, parsers["abuse"], "python -m benchmarks abuse")
    return args


def test_abuse_takes_extra_server_options_as_a_json_object() -> None:
    assert _abuse_args("--server-options", '{"worker_nice": 19}').server_options == {"worker_nice": 19}
    assert _abuse_args().server_options == {}


@pytest.mark.parametrize("bad", ["worker_nice=19", "[19]", '"x"'])
def test_abuse_refuses_server_options_that_are_not_a_json_object(bad: str) -> None:
    with pytest.raises(SystemExit):
        _abuse_args("--server-options", bad)


def test_openloop_targets_join_variants_with_plus() -> None:
    from benchmarks.commands.openloop import parse_target

    target = parse_target("least-connections:rt=1+pin")
    assert (target.server, target.args) == ("least-connections", ("--primary-realtime", "1", "--worker-affinity"))
    plain = parse_target("pull/plain:pin")
    assert plain.args == ("--threads", "1", "--worker-affinity")
    assert parse_target("shared").args == ()


@pytest.mark.parametrize("bad", ["shared:pinned", "pull:rt=", "pull:rt=1+", "pull/fast", "uvicorn:pin"])
def test_openloop_refuses_unknown_targets(bad: str) -> None:
    from benchmarks.commands.openloop import parse_target

    with pytest.raises(ValueError, match="unknown target"):
        parse_target(bad)

"""Failure and rolling-restart scenarios under load: what a dead worker or a restart costs.

- failure: SIGKILL the oldest worker every second for the whole run (dispatch modes
  and Node.js cluster rr).
- restart: 3 rolling restarts (SIGUSR2) spread over the run, each waiting for
  "rolling restart complete" (dispatch modes only).

Failed requests are wrk's socket errors (connect, read, write, timeout) plus
non-2xx responses. See benchmarks/README.md for the details. Every process
started here is stopped by pid in a ``finally`` block, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.measurement.wrk import DONE_LUA
from benchmarks.paths import RESULTS
from benchmarks.progress import log
from benchmarks.report import failures as report
from benchmarks.report.machine import machine_info, source_version
from benchmarks.workloads.failures import (
    ALL_TARGETS,
    DEFAULT_PATHS,
    GRACEFUL_TIMEOUT,
    SCENARIOS,
    plan,
    run_one,
)

HELP = "workers killed and rolling restarts under load: how many requests fail"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="10 s runs instead of 30 s")
    p.add_argument("--duration", type=int, help="seconds of load per run (default 30; 10 with --quick)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated among failure,restart")
    p.add_argument("--modes", default=",".join(ALL_TARGETS),
                   help=f"comma-separated among {','.join(ALL_TARGETS)} (node-rr: failure only)")
    p.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                   help="comma-separated request paths, one set of runs each (default %(default)s)")
    p.add_argument("--restarts", type=int, default=3, help="rolling restarts per run (default %(default)s)")
    p.add_argument("--restart-deadline", type=float, default=30.0,
                   help="seconds to wait for each restart to complete (default %(default)s)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default %(default)s)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="worker processes per server (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of keep-alive load after start (default %(default)s)")
    p.add_argument("--stop-timeout", type=float, default=GRACEFUL_TIMEOUT + 5.0,
                   help="seconds between SIGTERM and SIGKILL (default %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default %(default)s)")


def finish(args: argparse.Namespace, p: argparse.ArgumentParser, invocation: str) -> None:
    """The values derived from the options, checked; ``invocation`` is the command line as typed."""
    args.duration = args.duration or (10 if args.quick else 30)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    for s in args.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose among {', '.join(SCENARIOS)}")
    for m in args.modes:
        if m not in ALL_TARGETS:
            p.error(f"unknown mode {m!r}; choose among {', '.join(ALL_TARGETS)}")
    for path in args.paths:
        if not path.startswith("/"):
            p.error(f"a path starts with '/': {path!r}")
    args.invocation = invocation


def parse(argv: list[str], invocation: str) -> argparse.Namespace:
    """These options from ``argv`` (the run command passes its settings on this way)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks failures", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    finish(args, p, invocation)
    return args


def execute(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        log("wrk not found (Debian package 'wrk')")
        return 2
    if shutil.which("node") is None and "node-rr" in args.modes:
        log("node not found: skipping node-rr")
        args.modes = [m for m in args.modes if m != "node-rr"]
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    script = out / "done.lua"
    script.write_text(DONE_LUA)
    machine = machine_info()
    runs = plan(args)
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    for i, (scenario, target, path) in enumerate(runs, 1):
        rec = run_one(scenario, target, path, args, script)
        records.append(rec)
        if "error" in rec:
            log(f"[{i}/{len(runs)}] {scenario:<7} {target:<17} {path:<12} FAILED: {rec['error']}")
        else:
            log(f"[{i}/{len(runs)}] {scenario:<7} {target:<17} {path:<12} {rec['actions']:>2} "
                f"{'kills' if scenario == 'failure' else 'restarts'}  completed {rec['completed']:>7,}  "
                f"failed {rec['failed']:>5,}  re-sent {rec['resent']}  stop {rec['stop_s']:.1f}s")
    machine["dispatch_commit_at_end"] = source_version()
    text = report.markdown(records, machine, args)
    print(text)
    (out / "failures.md").write_text(text)
    report.write_json(out / "failures.json", machine, args, records)
    log(f"done in {time.monotonic() - started:.0f}s: {out / 'failures.md'}, {out / 'failures.json'}")
    return 0

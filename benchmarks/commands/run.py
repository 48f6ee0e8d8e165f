"""Compare dispatch's balance modes with the peers, with wrk, on 127.0.0.1.

Every target serves the same tiny HTTP response: the four dispatch modes run
``dispatch.demo:app`` through the CLI; the peers are Node.js cluster (both
scheduling policies), gunicorn (sync workers) and uvicorn --workers on
``benchmarks/peers/python_apps.py``, and a FLOOR that only accepts and closes. Targets are
interleaved within each round (A B C D ... A B C D ...) and each metric is
reported as the median over rounds with its min-max spread. See
benchmarks/README.md for what each number means and how it is measured.

Everything listens on 127.0.0.1 on a free port picked here; wrk targets only
that address. Every process started here is stopped by pid (SIGTERM, then
SIGKILL after a deadline) in a ``finally`` block, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.commands import failures, web
from benchmarks.commands.serving import Progress, run_server
from benchmarks.paths import RESULTS
from benchmarks.progress import log
from benchmarks.report import plot, results
from benchmarks.report.machine import machine_info, source_version
from benchmarks.targets.servers import (
    ALL_TARGETS,
    DISPATCH_MODES,
    PYTHON_PEERS,
    Server,
    display_command,
    free_port,
)
from benchmarks.targets.web import DEFAULT_THREADS, WEB_TARGETS
from benchmarks.workloads import compare as workloads
from benchmarks.workloads.compare import FAILURE_WORKLOADS, WORKLOADS
from benchmarks.workloads.failures import ALL_TARGETS as FAILURE_TARGETS
from benchmarks.workloads.web import WEB_WORKLOADS

HELP = ("the balance modes next to the peers: tiny, keepalive, mixed, slowio (and web-*, wsgi-*: "
        "the same web app under dispatch and the web servers; failure, restart)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="1 round of 2 s runs (about two minutes)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 8; 2 with --quick)")
    p.add_argument("--rounds", type=int, help="rounds over all targets (default 3; 1 with --quick)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default %(default)s)")
    p.add_argument("--wrk-threads", type=int, default=1,
                   help="wrk threads (default %(default)s: leave the 2 cores to the servers)")
    p.add_argument("--workers", type=int, default=2, help="worker processes per server (default %(default)s)")
    p.add_argument("--modes", default=",".join(ALL_TARGETS + WEB_TARGETS),
                   help=f"comma-separated targets among {','.join(ALL_TARGETS)} and, for the web "
                        f"workloads, {','.join(WEB_TARGETS)} (default: all)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated among {','.join(WORKLOADS + list(WEB_WORKLOADS) + FAILURE_WORKLOADS)} "
                        f"(default: {','.join(WORKLOADS)}; the web ones run the same app under dispatch "
                        "and the web servers (web.md); failure and restart run the failures command afterwards)")
    p.add_argument("--wsgi-threads", type=int, default=DEFAULT_THREADS,
                   help="web workloads: threads per WSGI worker, every WSGI server (default %(default)s)")
    p.add_argument("--max-other-cpu", type=float, metavar="PCT",
                   help="web workloads: run again a run during which other programs used more than PCT %% "
                        "of the CPUs (after a quiet moment; default: never)")
    p.add_argument("--reruns", type=int, default=3,
                   help="web workloads, with --max-other-cpu: the most times one run is run again "
                        "(default %(default)s)")
    p.add_argument("--warmup", type=int, default=1,
                   help="whole seconds of keep-alive load after each start; 0 = none (default %(default)s)")
    p.add_argument("--stop-timeout", type=float,
                   help="seconds between SIGTERM and SIGKILL (default 5; 2 with --quick)")
    p.add_argument("--dispatch-args", default="", metavar="FLAGS",
                   help="extra flags for the dispatch modes, e.g. '--one-per-message-below 4'")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default %(default)s)")


def finish(args: argparse.Namespace, p: argparse.ArgumentParser, invocation: str) -> None:
    """The values derived from the options, checked; ``invocation`` is the command line as typed."""
    args.duration = args.duration or (2 if args.quick else 8)  # wrk takes whole seconds
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.stop_timeout = args.stop_timeout if args.stop_timeout is not None else (2.0 if args.quick else 5.0)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for m in args.modes:
        if m not in ALL_TARGETS + WEB_TARGETS:
            p.error(f"unknown mode {m!r}; choose among {', '.join(ALL_TARGETS + WEB_TARGETS)}")
    known = WORKLOADS + list(WEB_WORKLOADS) + FAILURE_WORKLOADS
    for w in args.workloads:
        if w not in known:
            p.error(f"unknown workload {w!r}; choose among {', '.join(known)}")
    args.web_modes = [m for m in args.modes if m in WEB_TARGETS]
    args.modes = [m for m in args.modes if m in ALL_TARGETS]
    args.failure_workloads = [w for w in args.workloads if w in FAILURE_WORKLOADS]
    args.web_workloads = [w for w in args.workloads if w in WEB_WORKLOADS]
    args.workloads = [w for w in args.workloads if w in WORKLOADS]
    args.invocation = invocation


def execute(args: argparse.Namespace) -> int:
    code = compare(args) if args.workloads else 0
    if code == 0 and args.web_workloads:
        code = web.compare_web(args)
    if code == 0 and args.failure_workloads:
        code = run_failures(args)
    return code


def run_failures(args: argparse.Namespace) -> int:
    """The failure scenarios with this run's settings (their own run length: 30 s, 10 s quick)."""
    modes = [m for m in args.modes if m in FAILURE_TARGETS]
    if not modes:
        log(f"failure/restart: none of the modes run them ({', '.join(FAILURE_TARGETS)})")
        return 2
    argv = ["--scenarios", ",".join(args.failure_workloads), "--modes", ",".join(modes),
            "--connections", str(args.connections), "--wrk-threads", str(args.wrk_threads),
            "--workers", str(args.workers), "--warmup", str(args.warmup), "--out", str(args.out)]
    fargs = failures.parse(argv + (["--quick"] if args.quick else []), invocation=args.invocation)
    return failures.execute(fargs)


def available(args: argparse.Namespace) -> None:
    """Drop from ``args.modes`` the peers this machine cannot run, saying so."""
    if shutil.which("node") is None and any(m.startswith("node-") for m in args.modes):
        log("node not found: skipping the Node.js cluster peers")
        args.modes = [m for m in args.modes if not m.startswith("node-")]
    for target, module in PYTHON_PEERS.items():
        if target in args.modes and importlib.util.find_spec(module) is None:
            log(f"{module} not importable (pip install {module}): skipping {target}")
            args.modes.remove(target)


def compare(args: argparse.Namespace) -> int:
    """The mode and peer comparison: tiny, keepalive, mixed, slowio."""
    if shutil.which("wrk") is None:
        log("wrk not found (Debian package 'wrk')")
        return 2
    available(args)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    scripts = workloads.write_scripts(out)
    machine = machine_info()
    health = ("--health", "127.0.0.1:HPORT", *shlex.split(args.dispatch_args))
    commands = {t: display_command(t, args.workers, dispatch_args=health if t in DISPATCH_MODES else ())
                for t in args.modes}
    records: list[dict[str, Any]] = []
    progress = Progress(sum(len(workloads.workloads_for(t, args.workloads)) for t in args.modes) * args.rounds)
    started = time.monotonic()
    for rnd in range(1, args.rounds + 1):
        for target in args.modes:
            if workloads.workloads_for(target, args.workloads):
                records += one_server(target, rnd, args, scripts, progress)
    machine["dispatch_commit_at_end"] = source_version()
    summary = results.build_summary(records)
    text = results.markdown(summary, records, machine, args, commands)
    print(text)
    (out / "results.md").write_text(text)
    results.write_json(out / "results.json", machine, args, commands, summary, records)
    plotted = plot.plot(summary, out / "results.png")
    log(f"done in {time.monotonic() - started:.0f}s: {out / 'results.md'}, {out / 'results.json'}"
        + (f", {out / 'results.png'}" if plotted else " (matplotlib not importable: no plot)"))
    return 0


def one_server(target: str, rnd: int, args: argparse.Namespace, scripts: dict[str, Path],
               progress: Progress) -> list[dict[str, Any]]:
    """Start ``target``, warm it up, run each of its workloads on it, stop it: the runs' records."""
    server = Server(target, free_port(), args.workers, args.out / "logs" / f"{target}.r{rnd}.log")
    if target in DISPATCH_MODES:  # per-worker connection counts come from /cluster-health
        server.health_port = free_port()
        server.dispatch_args = ("--health", f"127.0.0.1:{server.health_port}", *shlex.split(args.dispatch_args))
    return run_server(server, rnd, workloads.workloads_for(target, args.workloads), workloads.measure,
                      args, scripts, progress)

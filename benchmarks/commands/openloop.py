"""Open-loop latency: fast requests at fixed arrival rates next to slow ones, every mode and peer.

Each target serves ``/`` at once and a slow path (``--mixes``: ``burn`` = 30 ms
of CPU on 3% of requests, ``slow`` = a 50 ms sleep on 10%). Two h2load
generators make one request per new connection on a timer (no coordinated
omission), at ``--loads`` fractions of the target's own capacity (measured
closed-loop with wrk at its first start), or at absolute ``--rates``. The
dispatch modes run the demo app's async handler and, as ``MODE/plain``, its
plain handler with one thread per worker, where head-of-line blocking is worst.
``MODE:push`` runs a mode with ``--no-skip-busy``, ``MODE:keep`` with
``--reclaim-after 0`` (skip_busy without taking connections back),
``MODE:reclaim=SECONDS`` with ``--reclaim-after SECONDS``, ``MODE:one=N``
with ``--one-per-message-below N``, ``MODE:nice=N`` with ``--worker-nice N``, ``MODE:rt=PRIORITY``
with ``--primary-realtime PRIORITY``, ``MODE:pin`` with ``--worker-affinity``; variants
combine with ``+`` (``least-connections:rt=1+pin``). Targets are interleaved
within each round; cells are medians over rounds.

Writes ``DIR/NAME.md``, ``NAME.json`` and ``NAME.png`` (``--name``, default openloop).
Everything listens on 127.0.0.1; every server is stopped by pid in a ``finally``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.paths import RESULTS
from benchmarks.progress import log
from benchmarks.report import openloop as report
from benchmarks.report.machine import machine_info, source_version
from benchmarks.targets.servers import (
    DISPATCH_MODES,
    PYTHON_PEERS,
    Server,
    display_command,
    free_port,
)
from benchmarks.workloads import compare, openloop

HELP = "fast-request latency at fixed arrival rates (h2load, open loop) next to slow requests"
PEERS = ["gunicorn-sync", "uvicorn", "node-rr", "node-none"]
DEFAULT_TARGETS = [*DISPATCH_MODES, *(f"{m}/plain" for m in DISPATCH_MODES), *PEERS]


@dataclass(frozen=True)
class Target:
    """What one name in --targets starts."""

    name: str
    server: str  # a benchmarks.targets.servers target
    app: str = "dispatch.demo:app"
    args: tuple[str, ...] = ()

    @property
    def handler(self) -> str:
        if self.server == "gunicorn-sync" or self.app.endswith("sync_app"):
            return "plain"
        return "async"


#: ``MODE:VARIANT``: the flags each variant adds.
VARIANTS: dict[str, tuple[str, ...]] = {"": (), "push": ("--no-skip-busy",), "keep": ("--reclaim-after", "0"),
                                        "pin": ("--worker-affinity",)}
#: ``MODE:KEY=VALUE``: the flag each takes its value.
VALUED_VARIANTS = {"reclaim": "--reclaim-after", "one": "--one-per-message-below", "nice": "--worker-nice",
                   "rt": "--primary-realtime"}


def parse_target(name: str) -> Target:
    base, _, variant = name.partition(":")
    mode, _, kind = base.partition("/")
    if mode not in DISPATCH_MODES + PEERS or (mode in PEERS and (kind or variant)):
        raise ValueError(f"unknown target {name!r}")
    if kind not in ("", "plain"):
        raise ValueError(f"unknown target {name!r}: MODE or MODE/plain")
    args: tuple[str, ...] = ()
    for part in variant.split("+") if variant else ():
        key, equals, value = part.partition("=")
        if equals and key in VALUED_VARIANTS and value:
            args += (VALUED_VARIANTS[key], value)
        elif not equals and part and part in VARIANTS:
            args += VARIANTS[part]
        else:
            raise ValueError(f"unknown target {name!r}: MODE or MODE/plain, then nothing or variants "
                             "joined with +: push, keep, pin, reclaim=SECONDS, one=N, nice=N, rt=PRIORITY")
    if kind == "plain":
        return Target(name, mode, "dispatch.demo:sync_app", ("--threads", "1", *args))
    return Target(name, mode, args=args)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--targets", default=",".join(DEFAULT_TARGETS),
                   help="comma-separated: MODE (async handler), MODE/plain (threads=1), MODE:push "
                        "(--no-skip-busy), MODE:keep (--reclaim-after 0), MODE:reclaim=SECONDS, "
                        f"MODE:one=N, MODE:nice=N (--worker-nice N), MODE:rt=PRIORITY (--primary-realtime), "
                        f"MODE:pin (--worker-affinity), variants joined with + (MODE:rt=1+pin), or a peer among {','.join(PEERS)} (default: %(default)s)")
    p.add_argument("--mixes", default="burn,slow", help=f"among {','.join(openloop.MIXES)} (default %(default)s)")
    p.add_argument("--loads", default="0.3,0.6,0.9",
                   help="offered load as fractions of each target's capacity (default %(default)s)")
    p.add_argument("--rates", help="absolute request rates per second instead of --loads, the same for "
                                   "every target (e.g. 825: 800/s fast next to 25/s burns)")
    p.add_argument("--duration", type=float, default=6, help="seconds per run (default %(default)s)")
    p.add_argument("--rounds", type=int, default=3, help="rounds over all targets (default %(default)s)")
    p.add_argument("--capacity-seconds", type=int, default=3,
                   help="length of the closed-loop capacity probe (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="worker processes per server (default %(default)s)")
    p.add_argument("--stop-timeout", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL")
    p.add_argument("--name", default="openloop", help="report file name (default %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default %(default)s)")


def finish(args: argparse.Namespace, p: argparse.ArgumentParser, invocation: str) -> None:
    try:
        args.targets = [parse_target(t.strip()) for t in args.targets.split(",") if t.strip()]
    except ValueError as exc:
        p.error(str(exc))
    args.mixes = [m.strip() for m in args.mixes.split(",") if m.strip()]
    for mix in args.mixes:
        if mix not in openloop.MIXES:
            p.error(f"unknown mix {mix!r}; choose among {', '.join(openloop.MIXES)}")
    args.loads = [float(x) for x in args.loads.split(",")] if not args.rates else []
    args.rates = [float(x) for x in args.rates.split(",")] if args.rates else []
    if any(x <= 0 for x in args.loads + args.rates):
        p.error("loads and rates must be positive")
    args.invocation = invocation


def available(targets: list[Target]) -> list[Target]:
    kept = []
    for t in targets:
        if t.server.startswith("node-") and shutil.which("node") is None:
            log(f"node not found: skipping {t.name}")
        elif t.server in PYTHON_PEERS and importlib.util.find_spec(PYTHON_PEERS[t.server]) is None:
            log(f"{PYTHON_PEERS[t.server]} not importable: skipping {t.name}")
        else:
            kept.append(t)
    return kept


def execute(args: argparse.Namespace) -> int:
    for tool in ("h2load", "wrk"):
        if shutil.which(tool) is None:
            log(f"{tool} not found (Debian packages nghttp2-client, wrk)")
            return 2
    targets = available(args.targets)
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    commands = {t.name: display_command(t.server, args.workers, dispatch_args=t.args, app=t.app)
                for t in targets}
    capacities: dict[tuple[str, str], float] = {}
    records: list[dict[str, Any]] = []
    levels = args.rates or args.loads
    total = args.rounds * len(targets) * len(args.mixes) * len(levels)
    started = time.monotonic()
    for rnd in range(1, args.rounds + 1):
        for target in targets:
            records += one_server(target, rnd, args, capacities, out, len(records), total)
    machine["dispatch_commit_at_end"] = source_version()
    text = report.markdown(records, capacities, machine, args, commands)
    print(text)
    (out / f"{args.name}.md").write_text(text)
    (out / f"{args.name}.json").write_text(json.dumps(
        {"machine": machine, "invocation": args.invocation, "commands": commands,
         "capacities": {f"{t}|{m}": c for (t, m), c in capacities.items()}, "records": records}, indent=1))
    plotted = report.plot(records, args, out / f"{args.name}.png")
    log(f"done in {time.monotonic() - started:.0f}s: {out / args.name}.md"
        + ("" if plotted else " (matplotlib not importable: no plot)"))
    return 0


def one_server(target: Target, rnd: int, args: argparse.Namespace, capacities: dict[tuple[str, str], float],
               out: Path, done: int, total: int) -> list[dict[str, Any]]:
    server = Server(target.server, free_port(), args.workers, out / "logs" / f"openloop-{target.name.replace('/', '-')}.r{rnd}.log",
                    dispatch_args=target.args, app=target.app)
    records: list[dict[str, Any]] = []
    try:
        server.start(boot_timeout=20)
        # The warm-up's wrk scripts go with the logs: this report does not name them.
        compare.warm_up(server, 1, compare.write_scripts(out / "logs"))
        for mix in args.mixes:
            if args.rates:
                levels = [(None, rate) for rate in args.rates]
            else:
                key = (target.name, mix)
                if key not in capacities:
                    capacities[key] = openloop.capacity(server, mix, args.capacity_seconds)
                levels = [(load, load * capacities[key]) for load in args.loads]
            for load, rate in levels:
                logs = out / "logs" / f"openloop-{target.name.replace('/', '-')}-{mix}-{rate:.0f}-r{rnd}"
                try:
                    rec = openloop.measure(server, mix, rate, args.duration, logs)
                except (RuntimeError, OSError) as exc:
                    rec = {"target": target.server, "mix": mix, "offered_per_s": rate, "error": str(exc)}
                rec.update(name=target.name, handler=target.handler, load=load, round=rnd)
                records.append(rec)
                _progress(done + len(records), total, rec)
    except (RuntimeError, OSError, TimeoutError) as exc:
        log(f"round {rnd} {target.name}: server failed: {exc}")
    finally:
        server.stop(args.stop_timeout)
    return records


def _progress(n: int, total: int, rec: dict[str, Any]) -> None:
    head = f"[{n}/{total}] round {rec['round']} {rec['name']:<26} {rec['mix']:<5} {rec['offered_per_s']:>7.0f}/s"
    if "error" in rec:
        log(f"{head} FAILED: {rec['error']}")
        return

    def ms(key: str) -> str:
        return "-" if rec[key] is None else f"{rec[key]:.1f}"

    log(f"{head} fast p50 {ms('fast_p50_ms')} p90 {ms('fast_p90_ms')} p99 {ms('fast_p99_ms')} ms"
        f"  failed {rec['failed']}/{rec['planned']}")

"""Attacks on a live dispatch server: does the primary stay up, keep serving, keep its descriptors?

    python -m benchmarks abuse                  # every attack, about 3 minutes
    python -m benchmarks abuse --only NAME      # one attack (or a comma-separated few)
    python -m benchmarks abuse --list           # the attacks, and what a sound server does
    python -m benchmarks abuse --server-options '{"worker_nice": 19}' --out DIR  # another configuration

Each attack starts its own server (a subprocess listening on 127.0.0.1 on a free
port; no traffic goes anywhere else), sends normal requests while the attack
runs and for 5 s after it, lets the server settle, counts the primary's open
descriptors, and stops it. The command reports what happens and asserts
nothing: an attack that crashes or stalls the server is a row saying so.
Results: benchmarks/results/abuse.md; each server's log:
benchmarks/results/logs/abuse-NAME.log.

Run it as root: two attacks run the server as an unprivileged user
(``dispatch-abuse``, created with useradd if missing) and the pidfile attack
plants symlinks. Every wait has a deadline, every load loop is bounded in
count and time, and every process started here is stopped by pid in a
``finally`` block, also on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

from benchmarks.paths import RESULTS
from benchmarks.progress import log
from benchmarks.report import abuse as report
from benchmarks.report.machine import source_version
from benchmarks.targets.abuse import stop_all
from benchmarks.workloads.abuse.base import Context, Row
from benchmarks.workloads.abuse.suite import ATTACKS

HELP = "attacks on a live server (floods, limits, broken policies, hostile handlers); as root"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", help="run only this attack (comma-separated for several); see --list")
    p.add_argument("--list", action="store_true", help="list the attacks and exit")
    p.add_argument("--out", type=Path, default=RESULTS, help="output folder (default %(default)s)")
    p.add_argument("--server-options", default="{}", metavar="JSON",
                   help="dispatch options every attacked server also gets, as a JSON object, e.g. "
                        "'{\"worker_nice\": 19}' (an attack's own options win where they overlap)")


def finish(args: argparse.Namespace, p: argparse.ArgumentParser, invocation: str) -> None:
    """The values derived from the options, checked; ``invocation`` is the command line as typed."""
    args.names = list(ATTACKS)
    if args.only:
        args.names = [n.strip() for n in args.only.split(",") if n.strip()]
        for name in args.names:
            if name not in ATTACKS:
                p.error(f"unknown attack {name!r}; --list shows them")
    try:
        args.server_options = json.loads(args.server_options)
    except ValueError as exc:
        p.error(f"--server-options is not JSON: {exc}")
    if not isinstance(args.server_options, dict):
        p.error("--server-options must be a JSON object of dispatch options")
    args.logs = args.out / "logs"
    args.invocation = invocation
    args.date = time.strftime("%Y-%m-%d %H:%M:%S %Z")


def execute(args: argparse.Namespace) -> int:
    try:
        return attack_all(args)
    finally:
        stop_all()


def attack_all(args: argparse.Namespace) -> int:
    if args.list:
        for name, entry in ATTACKS.items():
            print(f"{name:<24} {entry.what}. Expected: {entry.expected}.")
        return 0
    if os.geteuid() != 0:
        log("run this as root: some attacks switch to an unprivileged user or plant files for root")
        return 2
    args.logs.mkdir(parents=True, exist_ok=True)
    # Our side of the floods needs a few thousand descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))
    ctx = Context(args)
    commit = source_version()
    rows: list[Row] = []
    started = time.monotonic()
    for i, name in enumerate(args.names, 1):
        t0 = time.monotonic()
        try:
            row = ATTACKS[name].run(ctx)
        except Exception as exc:  # one broken attack must not lose the others' rows
            row = Row(name, outcome="attack failed", notes=[f"{exc.__class__.__name__}: {exc}"])
        row.seconds = time.monotonic() - t0
        rows.append(row)
        log(f"[{i}/{len(args.names)}] {name:<24} {row.seconds:4.0f}s  {row.outcome}  "
            f"during {report.cell(row.during)}  after {report.cell(row.after)}  fds {report.cell(row.fds)}")
    text = report.markdown(rows, args, time.monotonic() - started, (commit, source_version()))
    print(text)
    (args.out / "abuse.md").write_text(text)
    log(f"done in {time.monotonic() - started:.0f}s: {args.out / 'abuse.md'}")
    return 0

"""The web comparison (``run --workloads web-keepalive,web-close,web-mixed,wsgi-keepalive``):
the same Starlette app under dispatch round-robin and least-connections, ``uvicorn --workers``,
gunicorn with UvicornWorker and granian; the same Flask app under dispatch, gunicorn gthread and
granian. Targets interleaved within each round; medians over rounds with min–max, and ratios
against ``uvicorn --workers`` (gunicorn gthread for WSGI). Writes web.md, web.json, web.png.

A target whose modules do not import is skipped with a log line, and so are the dispatch
targets if the installed dispatch cannot serve the app (one worker, one request, checked first).
"""

from __future__ import annotations

import argparse
import os
import shutil
import time
from pathlib import Path
from typing import Any

from benchmarks.commands.serving import Progress, run_server
from benchmarks.progress import log
from benchmarks.report import plot
from benchmarks.report import web as report
from benchmarks.report.machine import machine_info, source_version
from benchmarks.report.results import build_summary
from benchmarks.targets.servers import free_port
from benchmarks.targets.web import (
    DISPATCH_BALANCE,
    WebServer,
    dispatch_cannot_serve,
    display_web_command,
    missing_modules,
)
from benchmarks.workloads import compare
from benchmarks.workloads.web import WEB_MIXED, WEB_WORKLOADS, measure_web, web_workloads_for


def available(targets: list[str], args: argparse.Namespace) -> tuple[list[str], dict[str, str]]:
    """The targets this machine can run, and why each of the others is skipped (logged)."""
    keep, skipped = [], {}
    checked: dict[str, str | None] = {}  # interface -> why dispatch cannot serve its app
    for target in targets:
        missing = missing_modules(target)
        why = f"{', '.join(missing)} not importable" if missing else None
        if why is None and target in DISPATCH_BALANCE:
            interface = "wsgi" if target == "dispatch-wsgi" else "asgi"
            if interface not in checked:
                log_path = args.out / "logs" / f"web-check-{interface}.log"
                checked[interface] = dispatch_cannot_serve(target, args.wsgi_threads, log_path)
            if checked[interface]:
                why = f"the installed dispatch cannot serve the {interface.upper()} app: {checked[interface]}"
        if why:
            log(f"skipping {target}: {why}")
            skipped[target] = why
        else:
            keep.append(target)
    return keep, skipped


def compare_web(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        log("wrk not found (Debian package 'wrk')")
        return 2
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    targets = [t for t in args.web_modes if web_workloads_for(t, args.web_workloads)]
    targets, skipped = available(targets, args)
    if not targets:
        log("web: no target to run")
        return 2
    scripts = compare.write_scripts(out)
    machine: dict[str, Any] = {**machine_info(), "web_versions": report.versions(), "skipped": skipped,
                               "loadavg_start": os.getloadavg()}
    commands = {t: display_web_command(t, args.workers, args.wsgi_threads) for t in targets}
    records: list[dict[str, Any]] = []
    progress = Progress(sum(len(web_workloads_for(t, args.web_workloads)) for t in targets) * args.rounds)
    started = time.monotonic()
    for rnd in range(1, args.rounds + 1):
        for target in targets:
            server = WebServer(target, free_port(), args.workers, out / "logs" / f"{target}.r{rnd}.log",
                               threads=args.wsgi_threads)
            if target in DISPATCH_BALANCE:  # per-worker connection counts come from /cluster-health
                server.health_port = free_port()
            records += run_server(server, rnd, web_workloads_for(target, args.web_workloads), measure_web,
                                  args, scripts, progress)
    machine["dispatch_commit_at_end"] = source_version()
    machine["loadavg_end"] = os.getloadavg()
    summary = build_summary(records)
    checks = report.verdicts(summary, records)
    text = report.markdown(summary, records, machine, args, commands, checks)
    print(text)
    (out / "web.md").write_text(text)
    report.write_json(out / "web.json", machine, args, commands, summary, records, checks)
    panels = [(w, "req/s", w in WEB_MIXED) for w in WEB_WORKLOADS]
    plotted = plot.plot_panels(summary, out / "web.png", panels, list(commands), set(DISPATCH_BALANCE),
                               "the same web app: median over rounds, bars = min–max "
                               "(blue: dispatch, gray: peers)")
    log(f"web done in {time.monotonic() - started:.0f}s: {out / 'web.md'}, {out / 'web.json'}"
        + (f", {out / 'web.png'}" if plotted else " (matplotlib not importable: no plot)"))
    return 0

"""The web comparison's workloads: the comparison's wrk runs (``compare.py``) on the web apps.

- web-keepalive / wsgi-keepalive: 64 keep-alive connections on ``/`` (the JSON body).
- web-close / wsgi-close: the same with ``Connection: close``: a new connection per request.
- web-mixed / wsgi-mixed: a new connection per request, 2% of them ``/burn?ms=30``, and the
  concurrent fast-only probe (wrk -c4 on ``/``) whose p99 is the fast requests' latency.

``web-*`` run on the ASGI targets (the Starlette app), ``wsgi-*`` on the WSGI targets (Flask).
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from pathlib import Path
from typing import Any

from benchmarks.measurement.proc import CLK_TCK, system_busy_ticks
from benchmarks.progress import log
from benchmarks.targets.servers import Server
from benchmarks.targets.web import INTERFACE
from benchmarks.workloads.compare import measure

# workload -> (the interface of the targets it runs on, the comparison workload it runs)
WEB_WORKLOADS = {
    "web-keepalive": ("asgi", "keepalive"),
    "web-close": ("asgi", "tiny"),
    "web-mixed": ("asgi", "mixed"),
    "wsgi-keepalive": ("wsgi", "keepalive"),
    "wsgi-close": ("wsgi", "tiny"),
    "wsgi-mixed": ("wsgi", "mixed"),
}
WEB_MIXED = ("web-mixed", "wsgi-mixed")
QUIET_WAIT_S = 60  # --max-other-cpu: the longest wait for a quiet moment before a run again


def web_workloads_for(target: str, workloads: list[str]) -> list[str]:
    """The workloads of ``workloads`` that run on ``target`` (by its interface)."""
    return [w for w in workloads if WEB_WORKLOADS[w][0] == INTERFACE[target]]


def own_cpu_s() -> float:
    """CPU of this process and of its reaped children (the wrk runs), in seconds."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measure_web(server: Server, workload: str, args: argparse.Namespace,
                scripts: dict[str, Path]) -> dict[str, Any]:
    """One wrk run of ``workload`` on a started web server: the comparison's record. With
    ``--max-other-cpu PCT``, a run during which other programs used more than PCT % of the
    CPUs is run again (at most ``--reruns`` times, each after a quiet moment); the record
    lists the runs it replaced under ``rerun_of``."""
    replaced: list[dict[str, Any]] = []
    while True:
        rec = measure_once(server, workload, args, scripts)
        limit = args.max_other_cpu
        if limit is None or rec["other_cpu_pct"] <= limit or len(replaced) >= args.reruns:
            break
        log(f"{server.target} {workload}: other programs used {rec['other_cpu_pct']:.0f}% of the CPUs "
            f"(> {limit:g}%): running it again")
        replaced.append({k: rec[k] for k in ("rate", "p99_ms", "fast_p99_ms", "other_cpu_pct") if k in rec})
        wait_quiet(limit, QUIET_WAIT_S)
    rec["rerun_of"] = replaced
    return rec


def measure_once(server: Server, workload: str, args: argparse.Namespace,
                 scripts: dict[str, Path]) -> dict[str, Any]:
    """``compare.measure`` on the web app, and ``other_cpu_pct``: the machine's CPU that neither
    the server, nor wrk, nor this script used during the run, in % of all CPUs."""
    interface, base = WEB_WORKLOADS[workload]
    busy0, own0, t0 = system_busy_ticks(), own_cpu_s(), time.monotonic()
    rec = measure(server, base, args, scripts)
    busy = (system_busy_ticks() - busy0) / CLK_TCK
    own, wall = own_cpu_s() - own0, time.monotonic() - t0
    server_cpu = rec["primary_cpu_s"] + sum(rec["worker_cpu_s"])
    rec.update(workload=workload, interface=interface, runs_as=base,
               other_cpu_pct=max(0.0, 100 * (busy - own - server_cpu) / (wall * (os.cpu_count() or 1))))
    return rec


def wait_quiet(limit_pct: float, timeout: float) -> None:
    """Until the machine (our idle server included) is busy less than ``limit_pct`` % of its
    CPUs over one second, or ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy0 = system_busy_ticks()
        time.sleep(1.0)
        if 100 * (system_busy_ticks() - busy0) / CLK_TCK / (os.cpu_count() or 1) < limit_pct:
            return

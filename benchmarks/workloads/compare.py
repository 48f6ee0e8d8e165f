"""The comparison's workloads, one wrk run each on a started server: tiny (a new connection
per request), keepalive, mixed (2% of requests burn 30 ms of CPU) and slowio (10% sleep
50 ms), the last two with a fast-only probe next to them. ``measure`` returns one run's
record: rate, latency, errors, CPU per connection, fairness, peak memory, log counts."""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import Any

from benchmarks.measurement.logs import count_log
from benchmarks.measurement.proc import CLK_TCK, MemorySampler, cpu_split, cpu_ticks
from benchmarks.measurement.stats import jain
from benchmarks.measurement.wrk import DONE_LUA, finish_wrk, mixed_lua, reap, start_wrk
from benchmarks.targets.servers import FLOORS, Server

WORKLOADS = ["tiny", "keepalive", "mixed", "slowio"]
# New connection per request with a share of slow paths, and a fast-only probe next to it.
MIXED_WORKLOADS = ("mixed", "slowio")
# The failure scenarios (30 s runs, 10 s with --quick), run after the workloads above: --workloads failure,restart
FAILURE_WORKLOADS = ["failure", "restart"]
# The floor answers nothing, so only the connection-rate workload means anything for it.
FLOOR_WORKLOADS = {"tiny"}

SLOW_PATH = "/burn?ms=30"
SLOW_SHARE = 0.02
SLOWIO_PATH = "/slow?ms=50"  # sleeps (asyncio.sleep / time.sleep / setTimeout): waits, burns nothing
SLOWIO_SHARE = 0.10
MIX = {"mixed": (SLOW_PATH, SLOW_SHARE), "slowio": (SLOWIO_PATH, SLOWIO_SHARE)}
PROBE_CONNECTIONS = 4
HEALTH_SETTLE_S = 1.2  # kernel modes: a worker's count arrives with its heartbeat (every 1 s)

MIXED_LUA = mixed_lua(SLOW_PATH, SLOW_SHARE)
SLOWIO_LUA = mixed_lua(SLOWIO_PATH, SLOWIO_SHARE)
SCRIPTS = {"done": DONE_LUA, "mixed": MIXED_LUA, "slowio": SLOWIO_LUA}  # written as NAME.lua


def write_scripts(out: Path) -> dict[str, Path]:
    """The wrk Lua scripts, written next to the results (the report names them)."""
    scripts = {name: out / f"{name}.lua" for name in SCRIPTS}
    for name, path in scripts.items():
        path.write_text(SCRIPTS[name])
    return scripts


def workloads_for(target: str, workloads: list[str]) -> list[str]:
    return [w for w in workloads if target not in FLOORS or w in FLOOR_WORKLOADS]


def wrk_command(port: int, workload: str, connections: int, threads: int, duration: int,
                scripts: dict[str, Path], probe: bool = False) -> list[str]:
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
           "--timeout", "2s"]
    if workload in ("tiny", *MIXED_WORKLOADS):
        cmd += ["-H", "Connection: close"]
    script = scripts[workload] if workload in MIXED_WORKLOADS and not probe else scripts["done"]
    cmd += ["-s", str(script), f"http://127.0.0.1:{port}/"]
    return cmd


def warm_up(server: Server, seconds: int, scripts: dict[str, Path]) -> None:
    if seconds <= 0 or server.target in FLOORS:
        return
    cmd = wrk_command(server.port, "keepalive", 16, 1, seconds, scripts)
    finish_wrk(start_wrk(cmd), seconds + 30)


def measure(server: Server, workload: str, args: argparse.Namespace, scripts: dict[str, Path]) -> dict[str, Any]:
    duration = args.duration
    workers = server.remember_children() if server.target not in FLOORS else []
    before = {pid: cpu_ticks(pid) for pid in [server.pid, *workers]}
    split_before = {pid: cpu_split(pid) for pid in before}
    offset = server.log_path.stat().st_size
    accepted0 = server.accepted() if server.target in FLOORS else 0
    conns0 = server.worker_connections()
    main_cmd = wrk_command(server.port, workload, args.connections, args.wrk_threads, duration, scripts)
    probe_cmd = None
    t0 = time.monotonic()
    with MemorySampler(server.pid, with_workers=server.target not in FLOORS) as memory:
        main = start_wrk(main_cmd)
        probe = None
        try:
            if workload in MIXED_WORKLOADS:
                probe_cmd = wrk_command(server.port, "tiny", PROBE_CONNECTIONS, 1, duration, scripts, probe=True)
                probe = start_wrk(probe_cmd)
            result = finish_wrk(main, duration + 30)
            probe_result = finish_wrk(probe, duration + 30) if probe else None
        finally:
            reap(main, probe)
    wall = time.monotonic() - t0
    accepted1 = server.accepted() if server.target in FLOORS else 0
    after = {pid: cpu_ticks(pid) for pid in before}
    split_after = {pid: cpu_split(pid) for pid in before}
    conn_share = None
    if conns0 is not None:
        if server.target in ("reuseport", "shared"):
            time.sleep(HEALTH_SETTLE_S)  # the workers' own counts arrive with their next heartbeat
        conns1 = server.worker_connections() or {}
        conn_share = [conns1[pid] - conns0[pid] for pid in sorted(conns0) if pid in conns1]
    _, logs = count_log(server.log_path, offset)

    def delta(pid: int) -> float:
        b, a = before.get(pid), after.get(pid)
        return (a - b) / CLK_TCK if a is not None and b is not None else float("nan")

    secs = result["duration_us"] / 1e6
    completed = result["requests"]
    if server.target in FLOORS:
        completed = accepted1 - accepted0  # the server's own counter: wrk sees only errors
        secs = wall
    primary_cpu = delta(server.pid)
    worker_cpu = [delta(pid) for pid in workers]

    def per_op(pids: list[int], which: int) -> float | None:
        """User (0) or system (1) CPU of ``pids`` together, µs per completed operation."""
        ticks = [a[which] - b[which] for b, a in ((split_before.get(p), split_after.get(p)) for p in pids)
                 if a is not None and b is not None]
        return sum(ticks) / CLK_TCK / completed * 1e6 if completed and ticks else None

    rec: dict[str, Any] = {
        "target": server.target,
        "workload": workload,
        "wrk": shlex.join(main_cmd),
        "completed": completed,
        "rate": completed / secs if secs else 0.0,
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "max_ms": result["max_us"] / 1000,
        "non2xx": result["status"],
        "socket_errors": result["connect"] + result["read"] + result["write"] + result["timeout"],
        "errors_detail": {k: result[k] for k in ("connect", "read", "write", "timeout")},
        "wrk_requests": result["requests"],
        "primary_cpu_s": primary_cpu,
        "worker_cpu_s": worker_cpu,
        "primary_cpu_us_per": primary_cpu / completed * 1e6 if completed else None,
        "server_cpu_us_per": (primary_cpu + sum(worker_cpu)) / completed * 1e6 if completed else None,
        "primary_user_us_per": per_op([server.pid], 0),
        "primary_sys_us_per": per_op([server.pid], 1),
        "workers_user_us_per": per_op(workers, 0),
        "workers_sys_us_per": per_op(workers, 1),
        "jain_worker_cpu": jain(worker_cpu),
        "worker_connections": conn_share,
        "jain_connections": jain(conn_share) if conn_share else None,
        "primary_peak_mib": memory.primary_peak / 2**20 if memory.primary_peak else None,
        "workers_peak_mib": memory.workers_peak / 2**20 if memory.workers_peak else None,
        "memory_samples": memory.samples,
        **logs,
    }
    if conn_share and sum(conn_share) > 0:
        # Sorted largest first: which worker is "first" changes between runs.
        for i, share in enumerate(sorted(conn_share, reverse=True)):
            rec[f"conn_share_{i}"] = 100 * share / sum(conn_share)
    if server.target in FLOORS:
        rec["p50_ms"] = rec["p99_ms"] = rec["max_ms"] = None  # latency of a reset means nothing
    if probe_result is not None:
        rec["probe"] = shlex.join(probe_cmd or [])
        rec["fast_p50_ms"] = probe_result["p50_us"] / 1000
        rec["fast_p99_ms"] = probe_result["p99_us"] / 1000
        rec["fast_max_ms"] = probe_result["max_us"] / 1000
        rec["fast_rate"] = probe_result["requests"] / (probe_result["duration_us"] / 1e6)
        rec["probe_errors"] = (probe_result["status"] + probe_result["connect"] + probe_result["read"]
                               + probe_result["write"] + probe_result["timeout"])
    return rec

"""Open-loop latency: fast requests at a fixed rate next to a few slow ones, on a started server.

Two h2load generators run at once, each making one request per new connection
on a timer: one to ``/`` (the fast requests), one to the mix's slow path (a
30 ms CPU burn, or a 50 ms sleep). What a user of the fast path sees while the
slow ones run is the fast requests' latency percentiles; the server's CPU per
connection (user and system, primary and workers apart) is measured over the run.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, cast

from benchmarks.measurement import h2load
from benchmarks.measurement.proc import CLK_TCK, cpu_split
from benchmarks.measurement.wrk import finish_wrk, mixed_lua, reap, start_wrk
from benchmarks.targets.servers import Server

# name -> (slow path, share of all requests). burn: 25 of every 825 requests burn 30 ms of
# CPU (800/s fast next to 25/s slow at the scenario's rate); slow: 10% sleep 50 ms.
MIXES: dict[str, tuple[str, float]] = {
    "burn": ("/burn?ms=30", 25 / 825),
    "slow": ("/slow?ms=50", 0.10),
}
CAPACITY_CONNECTIONS = 64  # wrk -c for the closed-loop capacity probe
# A fast request slower than LATE_MS is late; the report says how many of the late ones were
# sent within AFTER_SLOW_MS of a slow request (caught by what that request did to a worker).
LATE_MS = 2.0
AFTER_SLOW_MS = 2.0


def capacity(server: Server, mix: str, seconds: int) -> float:
    """Requests/s the server sustains on ``mix`` closed-loop (wrk, a new connection per
    request): the 100% that the open-loop loads are fractions of."""
    path, share = MIXES[mix]
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(mixed_lua(path, share))
    cmd = ["wrk", "-t", "1", "-c", str(CAPACITY_CONNECTIONS), "-d", f"{seconds}s", "--timeout", "2s",
           "-H", "Connection: close", "-s", f.name, f"http://127.0.0.1:{server.port}/"]
    run = start_wrk(cmd)
    try:
        result = finish_wrk(run, seconds + 30)
    finally:
        reap(run)
        Path(f.name).unlink(missing_ok=True)
    return float(result["requests"]) / (result["duration_us"] / 1e6)


def measure(server: Server, mix: str, rate: float, seconds: float, logs: Path) -> dict[str, Any]:
    """``rate`` requests/s in all, ``mix``'s share of them slow, for ``seconds``."""
    path, share = MIXES[mix]
    workers = server.remember_children()
    pids = [server.pid, *workers]
    before = {pid: cpu_split(pid) for pid in pids}
    fast_log, slow_log = Path(f"{logs}.fast.tsv"), Path(f"{logs}.slow.tsv")
    for old in (fast_log, slow_log):
        old.unlink(missing_ok=True)  # h2load appends
    began = time.monotonic()
    fast = h2load.start(server.port, "/", rate * (1 - share), seconds, fast_log)
    slow = None
    try:
        slow = h2load.start(server.port, path, rate * share, seconds, slow_log, drift_against=fast.period_ms)
        limit = seconds + h2load.INACTIVITY_TIMEOUT_S + 30
        fast_result = h2load.finish(fast, limit)
        slow_result = h2load.finish(slow, limit)
    finally:
        h2load.reap(fast, slow)
    wall = time.monotonic() - began
    after = {pid: cpu_split(pid) for pid in pids}
    answered = int(fast_result["answered"]) + int(slow_result["answered"])  # type: ignore[call-overload]

    def per_connection(pid_list: list[int], which: int) -> float | None:
        ticks = [after[p][which] - before[p][which] for p in pid_list
                 if before.get(p) is not None and after.get(p) is not None]
        return sum(ticks) / CLK_TCK / answered * 1e6 if answered and ticks else None

    fast_ms = sorted(fast_result["latencies_ms"])  # type: ignore[type-var]
    slow_ms = sorted(slow_result["latencies_ms"])  # type: ignore[type-var]
    slow_sent = cast("list[tuple[int, float]]", slow_result["sent"])
    late, late_after_slow = h2load.late_after(cast("list[tuple[int, float]]", fast_result["sent"]),
                                              [start for start, _ in slow_sent], LATE_MS, AFTER_SLOW_MS)
    return {
        "target": server.target,
        "mix": mix,
        "offered_per_s": float(fast_result["per_second"]) + float(slow_result["per_second"]),  # type: ignore[arg-type]
        "answered_per_s": answered / wall if wall else 0.0,
        "fast_p50_ms": h2load.percentile(fast_ms, 50),
        "fast_p90_ms": h2load.percentile(fast_ms, 90),
        "fast_p99_ms": h2load.percentile(fast_ms, 99),
        "fast_max_ms": fast_ms[-1] if fast_ms else None,
        "fast_late_pct": late,
        "late_after_slow_pct": late_after_slow,
        "slow_p50_ms": h2load.percentile(slow_ms, 50),
        "slow_p99_ms": h2load.percentile(slow_ms, 99),
        "failed": int(fast_result["failed"]) + int(slow_result["failed"]),  # type: ignore[call-overload]
        "planned": int(fast_result["planned"]) + int(slow_result["planned"]),  # type: ignore[call-overload]
        "primary_user_us": per_connection([server.pid], 0),
        "primary_sys_us": per_connection([server.pid], 1),
        "workers_user_us": per_connection(workers, 0),
        "workers_sys_us": per_connection(workers, 1),
        "h2load": [fast_result["command"], slow_result["command"]],
        "h2load_summary": [fast_result["summary"], slow_result["summary"]],
    }

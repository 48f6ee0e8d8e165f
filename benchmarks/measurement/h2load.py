"""Open-loop load with h2load: connections made at a fixed rate, whatever the server does.

A closed-loop generator (wrk) sends the next request only when an answer came
back, so a server that stalls is also sent less, and the stall hides in the
numbers (coordinated omission). h2load's rate mode (``-r``/``--rate-period``)
starts connections on a timer instead; with ``-n`` equal to ``-c`` each makes
one request. Latencies come from its per-request log (``--log-file``).
"""

from __future__ import annotations

import bisect
import math
import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

# Connections idle this long are given up (h2load -N): bounds a run against a stuck server.
INACTIVITY_TIMEOUT_S = 10


@dataclass
class H2load:
    cmd: list[str]
    proc: subprocess.Popen[str]
    log_file: Path
    planned: int
    per_second: float  # the rate h2load was given, after rounding to its units
    period_ms: int  # h2load opens its connections in bursts, one burst every period


#: How far the offered rate may be from the one asked for, so that the period stays short.
RATE_TOLERANCE = 0.02
#: The same for a second generator whose period must drift against the first one's.
DRIFT_TOLERANCE = 0.03
#: A drifting generator sends one connection per period when a period within this of its rate
#: exists: two slow requests at once would land on both workers of a small server together.
ONE_AT_A_TIME_TOLERANCE = 0.06


def rate_plan(per_second: float, drift_against: int = 0) -> tuple[int, int]:
    """``(N, P)``: N connections every P whole milliseconds (h2load takes no fraction), the
    shortest period within 2% of ``per_second`` (the closest if none is).

    ``drift_against``: the period of a generator running at the same time. P then shares
    no factor with it (within 3%), so this one's bursts fall at every phase of the other's
    over a run. With 25/s every 40 ms next to 800/s as 4 every 5 ms, each slow request
    arrived at the same point between two fast bursts, which the two start times alone
    decided: the fast requests' p99 then swung from 1 to 30 ms between rounds of the same
    server (the open-loop benchmark's logs, commit 39cc657).

    Short periods matter more than an exact rate: h2load opens the N connections of a
    period at once, and a burst of 20 lands in one worker's batch where 3 would not. A
    tolerance of 0.5% once gave 597/s as 22 connections every 37 ms and 602/s as 3 every
    5 ms: two targets at the same load, measured with different traffic."""
    if per_second <= 0:
        raise ValueError("the rate must be positive")
    if drift_against:
        # One at a time where a period allows it: two slow requests at once would land on both
        # workers of a small server together (at 1,200/s, 36/s of burns next to 7 every 6 ms
        # were planned as 2 every 55 ms, and blocked both workers at once).
        error, _, period_ms = _search(per_second, drift_against, DRIFT_TOLERANCE, one_at_a_time=True)
        if error <= ONE_AT_A_TIME_TOLERANCE:
            return 1, period_ms
    _, count, period_ms = _search(per_second, drift_against, DRIFT_TOLERANCE if drift_against else RATE_TOLERANCE)
    return count, period_ms


def _search(per_second: float, drift_against: int, tolerance: float,
            one_at_a_time: bool = False) -> tuple[float, int, int]:
    """``(error, N, P)`` for the shortest period P within ``tolerance`` (sharing no factor
    with ``drift_against``), else for the closest; N is 1 if ``one_at_a_time`` (and P at
    least 2 ms, as long as a rate below 1/s needs)."""
    best: tuple[float, int, int] | None = None
    periods = range(2, max(1001, math.ceil(1100 / per_second) + 1)) if one_at_a_time else range(1, 1001)
    for period_ms in periods:
        if drift_against and math.gcd(period_ms, drift_against) != 1:
            continue
        count = 1 if one_at_a_time else max(1, round(per_second * period_ms / 1000))
        error = abs(count * 1000 / period_ms - per_second) / per_second
        if error <= tolerance:
            return error, count, period_ms
        if best is None or error < best[0]:
            best = (error, count, period_ms)
    assert best is not None
    return best


def start(port: int, path: str, per_second: float, seconds: float, log_file: Path,
          drift_against: int = 0) -> H2load:
    """One request per new connection to ``path`` at ``per_second`` for ``seconds``
    (``drift_against``: see ``rate_plan``)."""
    count, period_ms = rate_plan(per_second, drift_against)
    total = max(1, round(per_second * seconds))
    cmd = ["h2load", "--h1", "-t", "1", "-c", str(total), "-n", str(total), "-r", str(count),
           "--rate-period", f"{period_ms}ms",
           "-N", f"{INACTIVITY_TIMEOUT_S}s", "--log-file", str(log_file), f"http://127.0.0.1:{port}{path}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            text=True)
    return H2load(cmd, proc, log_file, total, count * 1000 / period_ms, period_ms)


def finish(run: H2load, timeout: float) -> dict[str, object]:
    """Wait for ``run``; its latencies (ms, answered 2xx only), and what failed."""
    try:
        out, _ = run.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.communicate(timeout=5)
        raise RuntimeError(f"h2load did not finish in {timeout:g}s: {shlex.join(run.cmd)}") from None
    sent: list[tuple[int, float]] = []  # (send time µs since the epoch, latency ms), 2xx only
    bad_status = 0
    try:
        text = run.log_file.read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        fields = line.split("\t")
        if len(fields) < 3:
            continue
        if fields[1].startswith("2"):
            sent.append((int(fields[0]), int(fields[2]) / 1000))
        else:
            bad_status += 1
    return {"latencies_ms": [ms for _, ms in sent], "sent": sent, "planned": run.planned,
            "per_second": run.per_second, "answered": len(sent),
            "failed": run.planned - len(sent), "bad_status": bad_status,
            "command": shlex.join(run.cmd), "exit": run.proc.returncode, "summary": _summary(out)}


def reap(*runs: H2load | None) -> None:
    """Kill any of ``runs`` still running (after an error), and wait for it."""
    for run in runs:
        if run is not None and run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait(timeout=5)


def percentile(sorted_values: list[float], q: float) -> float | None:
    """Nearest-rank percentile ``q`` (0-100) of an ascending list."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * q // 100))
    return sorted_values[int(rank) - 1]


def late_after(requests: list[tuple[int, float]], others_sent: list[int], late_ms: float,
               window_ms: float) -> tuple[float | None, float | None]:
    """Of ``requests`` ((send time µs, latency ms) pairs), the % slower than ``late_ms``,
    and the % of those sent within ``window_ms`` after one of ``others_sent`` (send times,
    µs): how much of a tail the other generator's requests explain."""
    if not requests:
        return None, None
    others = sorted(others_sent)
    late = [start for start, ms in requests if ms > late_ms]
    if not late:
        return 0.0, None
    near = 0
    for start in late:
        i = bisect.bisect_right(others, start) - 1
        if i >= 0 and start - others[i] <= window_ms * 1000:
            near += 1
    return 100 * len(late) / len(requests), 100 * near / len(late)


def _summary(out: str) -> str:
    for line in out.splitlines():
        if line.startswith("requests:"):
            return line.strip()
    return out.strip().splitlines()[-1] if out.strip() else ""

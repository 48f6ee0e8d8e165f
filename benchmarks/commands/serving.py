"""What every comparison does with one server in one round: start it, warm it up, run its
workloads on it one after the other, stop it; and the progress line of each run."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.measurement.logs import trim_log
from benchmarks.progress import log
from benchmarks.targets.servers import Server
from benchmarks.workloads import compare as workloads

Measure = Callable[[Server, str, argparse.Namespace, dict[str, Path]], dict[str, Any]]


class Progress:
    """One line on stderr per run: [done/total] and the run's headline numbers."""

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0

    def run(self, rnd: int, rec: dict[str, Any]) -> None:
        self.done += 1
        head = f"[{self.done}/{self.total}] round {rnd} {rec['target']:<17} {rec['workload']:<9}"
        if "error" in rec:
            log(f"{head} FAILED: {rec['error']}")
            return
        p99 = f"{rec['p99_ms']:.2f}" if rec["p99_ms"] is not None else "-"
        cpu = rec["primary_cpu_us_per"]
        log(f"{head} "
            f"{rec['rate']:>9,.0f}/s p99 {p99:>6} ms  errors {rec['non2xx']}+{rec['socket_errors']}"
            f"  primary {cpu if cpu is None else round(cpu, 1)} µs/op"
            + (f"  fast p99 {rec['fast_p99_ms']:.2f} ms" if "fast_p99_ms" in rec else "")
            + (f"  others {rec['other_cpu_pct']:.0f}% CPU" if "other_cpu_pct" in rec else ""))


def run_server(server: Server, rnd: int, names: list[str], measure: Measure, args: argparse.Namespace,
               scripts: dict[str, Path], progress: Progress) -> list[dict[str, Any]]:
    """Start ``server``, warm it up, run each workload of ``names`` on it with ``measure``, stop
    it: the runs' records (one error record if the server itself failed)."""
    target = server.target
    records: list[dict[str, Any]] = []
    mine: list[dict[str, Any]] = []
    try:
        server.start(boot_timeout=20)
        workloads.warm_up(server, args.warmup, scripts)
        for workload in names:
            try:
                rec = measure(server, workload, args, scripts)
            except (RuntimeError, OSError, TimeoutError, json.JSONDecodeError) as exc:
                rec = {"target": target, "workload": workload, "error": str(exc)}
            rec.update(round=rnd, port=server.port)
            mine.append(rec)
            records.append(rec)
            progress.run(rnd, rec)
    except (RuntimeError, OSError, TimeoutError) as exc:
        log(f"round {rnd} {target}: server failed: {exc}")
        records.append({"target": target, "workload": "*", "round": rnd, "error": str(exc)})
    finally:
        server.stop(args.stop_timeout)
        trim_log(server.log_path)
        for rec in mine:
            rec["server_stop_s"] = round(server.stop_seconds, 3)
            rec["server_sigkilled"] = server.sigkilled
        if server.sigkilled:
            log(f"round {rnd} {target}: did not exit within {args.stop_timeout:g}s of SIGTERM; killed")
    return records

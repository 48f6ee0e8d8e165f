"""The open-loop report: fast-request latency against offered load, per mix, target and level,
with the CPU each connection cost (user and system, primary and workers apart)."""

from __future__ import annotations

import argparse
import itertools
from collections import defaultdict
from pathlib import Path
from typing import Any

from benchmarks.measurement.stats import summarize
from benchmarks.workloads.openloop import AFTER_SLOW_MS, LATE_MS, MIXES

MIX_TEXT = {
    "burn": "3% of requests (25 of every 825) burn 30 ms of CPU in the handler",
    "slow": "10% of requests sleep 50 ms (waiting, not burning)",
}
# What the goals compare: dispatch's least-connections against the kernel's modes.
OURS, KERNEL = ("least-connections", "pull"), ("reuseport", "shared")

Key = tuple[str, str, float]  # (target name, mix, level: load fraction or rate)


def _level(rec: dict[str, Any]) -> float:
    return float(rec["load"]) if rec.get("load") is not None else round(float(rec["offered_per_s"]))


def summary(records: list[dict[str, Any]]) -> dict[Key, dict[str, Any]]:
    """Per (target, mix, level): the median/min/max over rounds of each number."""
    groups: dict[Key, list[dict[str, Any]]] = defaultdict(list)
    for rec in records:
        if "error" not in rec:
            groups[(rec["name"], rec["mix"], _level(rec))].append(rec)
    fields = ["offered_per_s", "answered_per_s", "fast_p50_ms", "fast_p90_ms", "fast_p99_ms", "fast_late_pct",
              "late_after_slow_pct", "slow_p99_ms",
              "failed", "primary_user_us", "primary_sys_us", "workers_user_us", "workers_sys_us"]
    out: dict[Key, dict[str, Any]] = {}
    for key, recs in groups.items():
        out[key] = {f: summarize([r.get(f) for r in recs]) for f in fields}
        out[key]["handler"] = recs[0]["handler"]
        out[key]["errors"] = sum(1 for r in records if r.get("name") == key[0] and "error" in r)
    return out


def _cell(s: dict[str, float] | None, digits: int = 1) -> str:
    if not s:
        return "–"
    mid = f"{s['median']:,.{digits}f}"
    if s["n"] > 1 and s["min"] != s["max"]:
        return f"{mid} ({s['min']:,.{digits}f}–{s['max']:,.{digits}f})"
    return mid


def _cpu(row: dict[str, Any], who: str) -> str:
    user, sys_ = row[f"{who}_user_us"], row[f"{who}_sys_us"]
    if not user or not sys_:
        return "–"
    return f"{user['median']:.1f} / {sys_['median']:.1f}"


def markdown(records: list[dict[str, Any]], capacities: dict[tuple[str, str], float], machine: dict[str, str],
             args: argparse.Namespace, commands: dict[str, str]) -> str:
    table = summary(records)
    names = list(dict.fromkeys(r["name"] for r in records))
    lines = [
        "# Open-loop latency: fast requests next to slow ones",
        "",
        f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, Linux {machine['kernel']}, "
        f"Python {machine['python']}; load generators and servers share the same CPUs",
        f"- dispatch source: commit {machine['dispatch_commit']} at the start, "
        f"{machine.get('dispatch_commit_at_end', '?')} at the end; started {machine['date']}",
        f"- command: `{args.invocation}`",
        f"- {args.rounds} round(s) × {args.duration:g} s per run, {args.workers} workers; targets interleaved "
        "every round. Two `h2load --h1` generators make one request per new connection on a timer "
        "(`-r`/`--rate-period`: open loop, no coordinated omission); latencies from their `--log-file`. "
        "The slow generator's period shares no factor with the fast one's (25/s: one every 39 ms next "
        "to 4 every 5 ms), so over a run slow requests arrive at every point between two fast bursts, "
        "not at the one the generators' start times gave.",
        "- cells: median over rounds (min–max). *fast*: the requests to `/`. CPU: µs per answered "
        "request, user / system, of the primary and of all workers together.",
        f"- *fast late %*: the fast requests slower than {LATE_MS:g} ms; *late after slow %*: how many of "
        f"those were sent within {AFTER_SLOW_MS:g} ms after a slow request was (the tail that the slow "
        "requests' arrival explains, e.g. connections given to a worker just before its loop blocked).",
        "- `MODE`: the demo app's asyncio protocol handler; `MODE/plain`: its plain handler with "
        "`--threads 1`; `MODE:push`: with `--no-skip-busy`; `MODE:keep`: with `--reclaim-after 0`; "
        "`MODE:reclaim=S`, `MODE:one=N`, `MODE:nice=N`, `MODE:rt=P`: with `--reclaim-after S`, "
        "`--one-per-message-below N`, `--worker-nice N`, `--primary-realtime P`; `MODE:pin`: with "
        "`--worker-affinity`; `+` joins variants.",
        "",
    ]
    for mix in args.mixes:
        path, share = MIXES[mix]
        lines += [f"## {mix}: {MIX_TEXT.get(mix, f'{share:.0%} {path}')}", ""]
        if capacities:
            lines += ["Capacity (the 100% of the loads): closed-loop wrk, 64 connections, new connection per "
                      "request, same mix, measured at each target's first start.", "",
                      "| target | capacity req/s |", "|---|---|"]
            lines += [f"| {n} | {capacities[(n, mix)]:,.0f} |" for n in names if (n, mix) in capacities]
            lines.append("")
        levels = sorted({key[2] for key in table if key[1] == mix})
        lines += ["| load | target | offered/s | answered/s | fast p50 ms | fast p90 ms | fast p99 ms | "
                  "fast late % | late after slow % | slow p99 ms | failed | primary CPU µs user / sys | "
                  "workers CPU µs user / sys |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for level in levels:
            label = f"{level:.0%}" if args.loads else f"{level:,.0f}/s"
            for name in names:
                row = table.get((name, mix, level))
                if row is None:
                    continue
                lines.append(
                    f"| {label} | {name} | {_cell(row['offered_per_s'], 0)} | {_cell(row['answered_per_s'], 0)} | "
                    f"{_cell(row['fast_p50_ms'], 2)} | {_cell(row['fast_p90_ms'], 2)} | {_cell(row['fast_p99_ms'], 2)} | "
                    f"{_cell(row.get('fast_late_pct'), 1)} | {_cell(row.get('late_after_slow_pct'), 0)} | "
                    f"{_cell(row['slow_p99_ms'], 1)} | {_cell(row['failed'], 0)} | {_cpu(row, 'primary')} | "
                    f"{_cpu(row, 'workers')} |")
        lines += ["", *_ratios(table, mix, levels, names, args), ""]
    lines += ["## Commands", ""] + [f"- {n}: `{c}`" for n, c in commands.items()] + [""]
    return "\n".join(lines)


def _ratios(table: dict[Key, dict[str, Any]], mix: str, levels: list[float], names: list[str],
            args: argparse.Namespace) -> list[str]:
    """least-connections' and pull's fast p90/p99 over the kernel modes', per handler kind
    and level."""
    out = []
    for suffix, mode in itertools.product(("", "/plain"), OURS):
        ours = mode + suffix
        if ours not in names:
            continue
        for level in levels:
            label = f"{level:.0%}" if args.loads else f"{level:,.0f}/s"
            mine = table.get((ours, mix, level))
            if not mine or not mine["fast_p99_ms"]:
                continue
            parts = []
            for kernel in KERNEL:
                theirs = table.get((kernel + suffix, mix, level))
                if theirs and theirs["fast_p99_ms"] and theirs["fast_p90_ms"]:
                    p90 = mine["fast_p90_ms"]["median"] / theirs["fast_p90_ms"]["median"]
                    p99 = mine["fast_p99_ms"]["median"] / theirs["fast_p99_ms"]["median"]
                    parts.append(f"÷ {kernel + suffix}: p90 {p90:.2f}×, p99 {p99:.2f}×")
            if parts:
                out.append(f"- {label}, {ours} fast latency " + "; ".join(parts))
    return out


def plot(records: list[dict[str, Any]], args: argparse.Namespace, path: Path) -> bool:
    """Fast p99 against offered load: one panel per mix and handler kind, a line per target."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    table = summary(records)
    if not table:
        return False
    kinds = ["async", "plain"]
    fig, axes = plt.subplots(len(args.mixes), 2, figsize=(12, 4.5 * len(args.mixes)), squeeze=False)
    for row, mix in enumerate(args.mixes):
        for col, kind in enumerate(kinds):
            ax = axes[row][col]
            names = list(dict.fromkeys(k[0] for k in table if k[1] == mix and table[k]["handler"] == kind))
            for name in names:
                points = sorted((k[2], v["fast_p99_ms"]["median"]) for k, v in table.items()
                                if k[0] == name and k[1] == mix and v["fast_p99_ms"])
                if points:
                    style = "-o" if name.startswith(("round-robin", "least-connections")) else "--s"
                    ax.plot([p[0] for p in points], [p[1] for p in points], style, label=name)
            ax.set_yscale("log")
            ax.set_title(f"{mix}, {kind} handlers")
            ax.set_xlabel("offered load (fraction of capacity)" if args.loads else "offered requests/s")
            ax.set_ylabel("fast p99 ms (median over rounds)")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    fig.suptitle("Open loop: fast-request p99 against offered load (solid: dispatch user-space modes)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

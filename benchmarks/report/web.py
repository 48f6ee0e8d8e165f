"""The web comparison's report: web.md (tables per workload with ratios against the baseline,
the targets met or missed, the exact commands) and web.json (every run's numbers)."""

from __future__ import annotations

import argparse
import json
from importlib import metadata
from pathlib import Path
from typing import Any

from benchmarks.measurement.proc import MEMORY_SAMPLE_S
from benchmarks.measurement.stats import summarize
from benchmarks.paths import ROOT
from benchmarks.report.results import fmt
from benchmarks.targets.web import BASELINE, WEB_TARGETS
from benchmarks.workloads.compare import PROBE_CONNECTIONS, SLOW_PATH, SLOW_SHARE
from benchmarks.workloads.web import QUIET_WAIT_S, WEB_MIXED, WEB_WORKLOADS

PACKAGES = ["uvicorn", "uvloop", "httptools", "gunicorn", "uvicorn-worker", "granian", "starlette",
            "flask", "a2wsgi"]
APP = {"asgi": "Starlette JSON app", "wsgi": "Flask JSON app"}
HOW = {"keepalive": "64 keep-alive connections",
       "tiny": "a new connection per request (`Connection: close`)",
       "mixed": f"a new connection per request, {SLOW_SHARE:.0%} of them `{SLOW_PATH}`; fast-only = a "
                f"concurrent `wrk -c{PROBE_CONNECTIONS}` on `/`"}
# (workload, target, metric, at most / at least, bound, what is asked)
TARGETS = [
    ("web-keepalive", "dispatch-rr", "rate", ">=", 1.0,
     "dispatch round-robin ≥ 1.0× `uvicorn --workers` requests/s with keep-alive"),
    ("web-close", "dispatch-rr", "rate", ">=", 1.0,
     "dispatch round-robin ≥ 1.0× `uvicorn --workers` requests/s with a new connection per request"),
    ("web-mixed", "dispatch-lc", "fast_p99_ms", "<=", 0.5,
     "least-connections fast-request p99 ≤ 0.5× `uvicorn --workers`' in the mixed web workload"),
]


def versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def ratio(summary: dict[str, Any], records: list[dict[str, Any]], workload: str, target: str,
          key: str) -> dict[str, float] | None:
    """``target``'s ``key`` over the baseline's: ratio of the medians, and the min–max of the
    per-round ratios (both servers ran in the same round, interleaved)."""
    base = BASELINE[WEB_WORKLOADS[workload][0]]
    mine = (summary.get(workload, {}).get(target) or {}).get(key)
    theirs = (summary.get(workload, {}).get(base) or {}).get(key)
    if not mine or not theirs or not theirs["median"]:
        return None
    by_round: dict[int, dict[str, float]] = {}
    for r in records:
        if r.get("workload") == workload and r.get(key) is not None and "error" not in r:
            by_round.setdefault(r["round"], {})[r["target"]] = r[key]
    per_round = summarize([v[target] / v[base] for v in by_round.values() if target in v and v.get(base)])
    return {"median": mine["median"] / theirs["median"],
            "min": per_round["min"] if per_round else float("nan"),
            "max": per_round["max"] if per_round else float("nan"),
            "n": per_round["n"] if per_round else 0}


def fmt_ratio(r: dict[str, float] | None) -> str:
    if r is None:
        return "–"
    if r["n"] <= 1 or f"{r['min']:.2f}" == f"{r['max']:.2f}":
        return f"{r['median']:.2f}×"
    return f"{r['median']:.2f}× ({r['min']:.2f}–{r['max']:.2f})"


def verdicts(summary: dict[str, Any], records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets: measured ratio, met or missed (None if not measured)."""
    out = []
    for workload, target, key, op, bound, text in TARGETS:
        r = ratio(summary, records, workload, target, key)
        met = None if r is None else (r["median"] >= bound if op == ">=" else r["median"] <= bound)
        out.append({"workload": workload, "target": target, "metric": key, "bound": f"{op} {bound}",
                    "goal": text, "ratio": r, "met": met})
    return out


def table(workload: str, summary: dict[str, Any], records: list[dict[str, Any]]) -> list[str]:
    interface, base_workload = WEB_WORKLOADS[workload]
    base = BASELINE[interface]
    mixed = workload in WEB_MIXED
    head = ["target", "req/s", f"× {base}", "p50 ms", "p99 ms", "max ms"]
    if mixed:
        head += ["fast-only p50 ms", "fast-only p99 ms", f"fast p99 × {base}"]
    head += ["non-2xx", "socket errors", "server CPU µs/req", f"CPU × {base}", "primary CPU µs/req",
             "Jain (worker CPU)", "worker share of conns %", "primary peak MiB", "workers peak MiB (sum)",
             "other programs' CPU %"]
    lines = [f"## {workload}: {APP[interface]}, {HOW[base_workload]}", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    by_target = summary[workload]
    for target in [t for t in WEB_TARGETS if t in by_target]:
        e = by_target[target]
        row = [target, fmt(e["rate"]), fmt_ratio(ratio(summary, records, workload, target, "rate")),
               fmt(e["p50_ms"], 2), fmt(e["p99_ms"], 2), fmt(e["max_ms"], 1)]
        if mixed:
            row += [fmt(e["fast_p50_ms"], 2), fmt(e["fast_p99_ms"], 2),
                    fmt_ratio(ratio(summary, records, workload, target, "fast_p99_ms"))]
        share = " / ".join(fmt(x) for x in e["conn_share_pct"]) if e.get("conn_share_pct") else "–"
        row += [fmt(e["non2xx"]), fmt(e["socket_errors"]), fmt(e["server_cpu_us_per"], 1),
                fmt_ratio(ratio(summary, records, workload, target, "server_cpu_us_per")),
                fmt(e["primary_cpu_us_per"], 1), fmt(e["jain_worker_cpu"], 3), share,
                fmt(e["primary_peak_mib"], 1), fmt(e["workers_peak_mib"], 1), fmt(e["other_cpu_pct"])]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def markdown(summary: dict[str, Any], records: list[dict[str, Any]], machine: dict[str, Any],
             args: argparse.Namespace, commands: dict[str, str], checks: list[dict[str, Any]]) -> str:
    start, end = machine["dispatch_commit"], machine.get("dispatch_commit_at_end", "?")
    lines = ["# dispatch web benchmarks: the same app side by side", "",
             f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, Linux {machine['kernel']}, "
             f"Python {machine['python']}, {machine['wrk']}",
             f"- dispatch source: commit {start} at the start, {end} at the end"
             + (" (**src/ changed during the run**)" if end != start else "") + f"; started {machine['date']}",
             "- " + ", ".join(f"{k} {v}" for k, v in machine["web_versions"].items()),
             "- load average (1, 5, 15 min) at the start: {}, at the end: {} (anything else running on "
             "the machine competes with the servers and wrk)".format(
                 *(" / ".join(f"{x:.2f}" for x in machine.get(k, ())) or "?"
                   for k in ("loadavg_start", "loadavg_end"))),
             f"- {args.rounds} round(s) × {args.duration:g}s per run, {args.connections} wrk connections, "
             f"{args.wrk_threads} wrk thread(s), {args.workers} workers, {args.wsgi_threads} threads per "
             "WSGI worker; targets interleaved every round",
             "- cells: median over rounds (min–max). Ratios: of the medians, against `uvicorn --workers` "
             "(ASGI) or gunicorn gthread (WSGI), with the min–max of the per-round ratios. Load generator "
             f"and servers share the same {machine['nproc']} CPUs.", ""]
    lines += ["## The targets", ""]
    for c in checks:
        verdict = {True: "**met**", False: "**missed**", None: "not measured"}[c["met"]]
        lines.append(f"- {c['goal']}: {verdict} ({fmt_ratio(c['ratio'])}, bound {c['bound']})")
    lines.append("")
    for workload in WEB_WORKLOADS:
        if summary.get(workload):
            lines += table(workload, summary, records)
    lines += [
        "server CPU: utime + stime of the process started and its children (the workers) from "
        "/proc, during the wrk run, ÷ completed requests. primary CPU: the process started alone "
        "(dispatch's primary accepts and passes every connection; uvicorn's supervisor, gunicorn's "
        "arbiter and granian's main process accept nothing). worker share of conns: dispatch only, "
        "from `/cluster-health`. Memory: VmRSS sampled every "
        f"{MEMORY_SAMPLE_S:g} s during the run; workers = the peak over samples of their sum. "
        "max ms: one request, noisy. other programs' CPU: the machine's busy CPU time (/proc/stat) "
        "during the run less the server's, wrk's and the benchmark script's, in % of all CPUs: "
        "anything above a few % is another program competing for the cores, and that run's numbers "
        "are not the servers' alone.", ""]
    reruns = [r for r in records if r.get("rerun_of")]
    if args.max_other_cpu is not None:
        replaced = [f"{r['target']} {r['workload']} round {r['round']} ("
                    + " / ".join(f"{x['other_cpu_pct']:.0f}%" for x in r["rerun_of"]) + ")" for r in reruns]
        lines += [f"Runs during which other programs used more than {args.max_other_cpu:g}% of the CPUs were "
                  f"run again (at most {args.reruns} times, after up to {QUIET_WAIT_S} s for a quiet "
                  "moment); the tables hold the last run of each. Replaced: "
                  + (", ".join(replaced) or "none") + " (their numbers: `rerun_of` in web.json).", ""]
    failed = [r for r in records if "error" in r]
    if failed:
        lines += ["Failed runs:", ""] + [f"- {r['target']} {r['workload']} round {r['round']}: {r['error']}"
                                         for r in failed] + [""]
    if machine.get("skipped"):
        lines += ["Skipped targets:", ""] + [f"- {t}: {why}" for t, why in machine["skipped"].items()] + [""]
    lines += ["## Exact commands", "", "Servers (PORT, HPORT = free ports picked per server start):", ""]
    lines += [f"- {t}: `{c}`" for t, c in commands.items()]
    lines += ["", "Load (wrk; the Lua scripts are written next to web.json):", ""]
    seen: set[tuple[str, str]] = set()
    for r in records:
        for key in ("wrk", "probe"):
            if r.get(key):
                generic = r[key].replace(f"127.0.0.1:{r['port']}", "127.0.0.1:PORT").replace(f"{ROOT}/", "")
                if (r["workload"], generic) not in seen:
                    seen.add((r["workload"], generic))
                    lines.append(f"- {r['workload']}{' (fast-only probe, concurrent)' if key == 'probe' else ''}"
                                 f": `{generic}`")
    return "\n".join(lines + ["", f"Run: `{args.invocation}`", ""])


def write_json(path: Path, machine: dict[str, Any], args: argparse.Namespace, commands: dict[str, str],
               summary: dict[str, Any], records: list[dict[str, Any]], checks: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in vars(args).items()},
                   "commands": commands, "targets": checks, "summary": summary, "runs": records},
                  f, indent=1)

"""The comparison's report: medians over rounds per workload and target, the Markdown of
results.md, and results.json with every run's raw numbers."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.measurement.proc import MEMORY_SAMPLE_S
from benchmarks.measurement.stats import summarize
from benchmarks.targets.servers import ALL_TARGETS, DISPATCH_MODES, FLOORS
from benchmarks.workloads.compare import (
    MIXED_WORKLOADS,
    SLOW_PATH,
    SLOW_SHARE,
    SLOWIO_PATH,
    SLOWIO_SHARE,
    WORKLOADS,
)


def fmt(s: dict[str, float] | None, digits: int = 0, unit: str = "") -> str:
    if s is None:
        return "–"

    def f(v: float) -> str:
        return f"{v:,.{digits}f}"

    if s["n"] == 1 or f(s["min"]) == f(s["max"]):
        return f"{f(s['median'])}{unit}"
    return f"{f(s['median'])}{unit} ({f(s['min'])}–{f(s['max'])})"


def _ratio(entry: dict[str, Any], other: dict[str, Any] | None, key: str) -> str:
    """entry's median of ``key`` over other's, e.g. 1.15×."""
    mine, theirs = entry.get(key), (other or {}).get(key)
    if not mine or not theirs or not theirs["median"]:
        return "–"
    return f"{mine['median'] / theirs['median']:.2f}×"


def _split(entry: dict[str, Any], who: str) -> str:
    """``who``'s (primary, workers) user / system CPU medians, µs per operation."""
    user, sys_ = entry.get(f"{who}_user_us_per"), entry.get(f"{who}_sys_us_per")
    if not user or not sys_:
        return "–"
    return f"{user['median']:.1f} / {sys_['median']:.1f}"


def build_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    keys = ["rate", "p50_ms", "p99_ms", "max_ms", "non2xx", "socket_errors", "primary_cpu_us_per",
            "server_cpu_us_per", "jain_worker_cpu", "jain_connections", "primary_peak_mib",
            "workers_peak_mib", "fast_p50_ms", "fast_p99_ms", "fast_max_ms", "fast_rate",
            "probe_errors", "log_task_destroyed", "other_cpu_pct", "primary_user_us_per",
            "primary_sys_us_per", "workers_user_us_per", "workers_sys_us_per"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for rec in records:
        if "error" in rec:
            continue
        out.setdefault(rec["workload"], {}).setdefault(rec["target"], {"runs": []})["runs"].append(rec)
    for by_target in out.values():
        for entry in by_target.values():
            runs = entry.pop("runs")
            for key in keys:
                entry[key] = summarize([r.get(key) for r in runs])
            shares = sorted({k for r in runs for k in r if k.startswith("conn_share_")})
            entry["conn_share_pct"] = [summarize([r.get(k) for r in runs]) for k in shares] or None
            entry["stops_sigkilled"] = sum(1 for r in runs if r.get("server_sigkilled"))
    return out


def markdown(summary: dict[str, Any], records: list[dict[str, Any]], machine: dict[str, str],
             args: argparse.Namespace, commands: dict[str, str]) -> str:
    lines = ["# dispatch benchmarks", ""]
    lines += [f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, Linux {machine['kernel']}, "
              f"Python {machine['python']}, {machine['wrk']}, node {machine['node']}",
              f"- dispatch source: commit {machine['dispatch_commit']} at the start, "
              f"{machine.get('dispatch_commit_at_end', '?')} at the end"
              + (" (**src/ changed during the run**: later servers imported newer code)"
                 if machine.get("dispatch_commit_at_end", machine["dispatch_commit"]) != machine["dispatch_commit"]
                 else "") + f"; started {machine['date']}",
              f"- {args.rounds} round(s) × {args.duration:g}s per run, {args.connections} wrk connections, "
              f"{args.wrk_threads} wrk thread(s), {args.workers} workers; targets interleaved every round",
              "- cells: median over rounds (min–max). Load generator and servers share the same "
              f"{machine['nproc']} CPUs.", ""]
    floors = {f: summary.get("tiny", {}).get(f, {}).get("primary_cpu_us_per") for f in FLOORS}
    accepting = ("round-robin", "least-connections", "node-rr")  # the primary accepts
    titles = {
        "tiny": "## tiny: a new connection per request (`Connection: close`)",
        "keepalive": "## keepalive: tiny request, keep-alive connections",
        "mixed": f"## mixed: new connection per request, {SLOW_SHARE:.0%} of them `{SLOW_PATH}`",
        "slowio": f"## slowio: new connection per request, {SLOWIO_SHARE:.0%} of them `{SLOWIO_PATH}` "
                  "(sleeping, not burning)",
    }
    for workload in WORKLOADS:
        by_target = summary.get(workload)
        if not by_target:
            continue
        lines += [titles[workload], ""]
        rate = "conn/s" if workload != "keepalive" else "req/s"
        per = "conn" if workload != "keepalive" else "req"
        head = ["target", rate, "p50 ms", "p99 ms", "max ms"]
        if workload in MIXED_WORKLOADS:
            head += ["fast-only p50 ms", "fast-only p99 ms"]
        head += ["non-2xx", "socket errors", f"primary CPU µs/{per}"]
        if workload == "tiny":
            head += [f"÷ {f}" for f in FLOORS if floors[f]]
        head += [f"server CPU µs/{per}", "÷ reuseport's", "primary user / sys µs", "workers user / sys µs",
                 "Jain (worker CPU)", "Jain (connections)", "worker share of conns %",
                 "primary peak MiB", "workers peak MiB (sum)", "tasks destroyed (log)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for target in [t for t in ALL_TARGETS if t in by_target]:
            e = by_target[target]
            name = target + (" ²" if target == "gunicorn-sync" and workload == "keepalive" else "")
            row = [name, fmt(e["rate"]), fmt(e["p50_ms"], 2), fmt(e["p99_ms"], 2), fmt(e["max_ms"], 1)]
            if workload in MIXED_WORKLOADS:
                row += [fmt(e["fast_p50_ms"], 2), fmt(e["fast_p99_ms"], 2)]
            cpu = fmt(e["primary_cpu_us_per"], 1 if workload != "keepalive" else 2)
            if target in ("reuseport", "shared", "node-none"):
                cpu += " ¹"
            row += [fmt(e["non2xx"]), fmt(e["socket_errors"]), cpu]
            if workload == "tiny":
                p = e["primary_cpu_us_per"]
                for f in FLOORS:
                    floor = floors[f]
                    if floor:
                        ok = p and floor["median"] and (target in accepting or target == f)
                        row += [f"{p['median'] / floor['median']:.2f}×" if ok else "–"]
            destroyed = fmt(e["log_task_destroyed"]) if target in DISPATCH_MODES else "–"
            share = " / ".join(fmt(x) for x in e["conn_share_pct"]) if e.get("conn_share_pct") else "–"
            row += [fmt(e["server_cpu_us_per"], 1), _ratio(e, by_target.get("reuseport"), "server_cpu_us_per"),
                    _split(e, "primary"), _split(e, "workers"), fmt(e["jain_worker_cpu"], 3), fmt(e["jain_connections"], 3),
                    share, fmt(e["primary_peak_mib"], 1), fmt(e["workers_peak_mib"], 1), destroyed]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "¹ kernel balancing: the primary (Node's primary for node-none) accepts nothing; the number "
        "is its idle housekeeping divided by the connections the workers served.",
        "",
        "² gunicorn's sync workers close the connection after every response (`Connection: close`), "
        "so its keepalive run is in fact a new connection per request, like tiny.",
        "",
        "Jain (connections), worker share of conns: dispatch modes only, from the connections_total "
        "of each worker in `/cluster-health` (`--health`) before and after the run; share = each "
        "worker's part, largest first (median per rank over rounds). User-space modes count what the "
        "primary passed, kernel modes what each worker reported in its heartbeat. The other servers "
        "do not expose it. Memory: VmRSS from /proc every "
        f"{MEMORY_SAMPLE_S:g} s during the run; workers = the peak over samples of their sum. "
        "max ms: wrk's largest latency of the run (one request: noisy).",
        "",
        "Floors: `benchmarks/peers/accept_close.py`, a plain Python epoll loop around "
        "`dispatch._fdpass.accept_batch`; floor-pass then passes each batch with `send_fds(close_sent=True)` "
        "to a sink process that closes them (the primary's syscalls, no policy or bookkeeping), "
        "floor-close closes them itself (so it also pays the TCP reset teardown a primary leaves to "
        "its workers). Their conn/s and CPU/conn come from their own accept counter (wrk only sees "
        "resets; the socket-error column is wrk's view of those). They run at a higher rate than the "
        "real servers, so their batches are larger: the ÷ floor ratios favour the floors.",
        "",
        "tasks destroyed (log): lines `Task was destroyed but it is pending!` the dispatch server "
        "logged during the run (a worker bug fixed in 3cb8581; should be 0).",
        "",
    ]
    rr = summary.get("tiny", {}).get("round-robin", {}).get("rate")
    node = summary.get("tiny", {}).get("node-rr", {}).get("rate")
    if rr and node:
        lines += [f"**tiny, round-robin ÷ node-rr conn/s: {rr['median'] / node['median']:.2f}×** "
                  "(issue target: ≥ 3×)", ""]
    failed = [r for r in records if "error" in r]
    stops: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for r in records:
        if "server_stop_s" in r:
            stops.setdefault(r["target"], {})[(r["round"], r["port"])] = r
    if stops:
        lines += [f"Shutdown after the runs: seconds from SIGTERM to exit (SIGKILL at {args.stop_timeout:g}s):", "",
                  "| target | SIGTERM → exit s | SIGKILLed |", "|---|---|---|"]
        for target in [t for t in ALL_TARGETS if t in stops]:
            servers = list(stops[target].values())
            lines.append(f"| {target} | {fmt(summarize([r['server_stop_s'] for r in servers]), 2)} | "
                         f"{sum(1 for r in servers if r['server_sigkilled'])} of {len(servers)} |")
        lines.append("")
    if failed:
        lines += ["Failed runs:", ""] + [f"- {r['target']} {r['workload']} round {r['round']}: {r['error']}"
                                         for r in failed] + [""]
    lines += ["## Exact commands", "", "Servers (PORT = a free port picked per server start):", ""]
    lines += [f"- {t}: `{c}`" for t, c in commands.items()]
    lines += ["", "Load (wrk; `done.lua` prints exact counters and percentiles, `mixed.lua` and "
              "`slowio.lua` also pick the path per request; all are written next to results.json):", ""]
    seen: set[str] = set()
    for r in records:
        for key in ("wrk", "probe"):
            cmd = r.get(key)
            if cmd:
                generic = cmd.replace(f"127.0.0.1:{r['port']}", "127.0.0.1:PORT")
                if generic not in seen:
                    seen.add(generic)
                    lines.append(f"- {r['workload']}{' (fast-only probe, concurrent)' if key == 'probe' else ''}: `{generic}`")
    lines += ["", f"Run: `{args.invocation}`", ""]
    return "\n".join(lines)


def write_json(path: Path, machine: dict[str, str], args: argparse.Namespace, commands: dict[str, str],
               summary: dict[str, Any], records: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in vars(args).items()},
                   "commands": commands, "summary": summary, "runs": records}, f, indent=1)

"""The failure and restart scenarios' report: failures.md, and failures.json with every
run's raw numbers and each kill or restart."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.targets.servers import display_command
from benchmarks.workloads.failures import DISPATCH_ARGS, GRACEFUL_TIMEOUT, RESTART_DONE, SCENARIOS


def markdown(records: list[dict[str, Any]], machine: dict[str, str], args: argparse.Namespace) -> str:
    lines = ["# dispatch: failure and restart scenarios", "",
             f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, Linux {machine['kernel']}, "
             f"Python {machine['python']}, {machine['wrk']}, node {machine['node']}",
             f"- dispatch source: commit {machine['dispatch_commit']} at the start, "
             f"{machine.get('dispatch_commit_at_end', '?')} at the end; started {machine['date']}",
             f"- one run per row, {args.duration}s of wrk each ({args.connections} connections, "
             f"{args.wrk_threads} thread(s), new connection per request), {args.workers} workers, "
             f"`--graceful-timeout {GRACEFUL_TIMEOUT}`. Load generator and servers share the same "
             f"{machine['nproc']} CPUs.",
             "- failed = wrk socket errors (connect + read + write + timeout) + non-2xx. "
             "re-sent = connections the primary took back from a dead worker's channel and passed "
             "to another (summed from its log). A single run per row: small differences are noise.",
             ""]
    titles = {
        "failure": "## failure: SIGKILL one worker every second",
        "restart": f"## restart: {args.restarts} rolling restarts (SIGUSR2), one after the other",
    }
    for scenario in SCENARIOS:
        rows = [r for r in records if r["scenario"] == scenario]
        if not rows:
            continue
        lines += [titles[scenario], ""]
        action = "kills" if scenario == "failure" else "restarts"
        head = ["mode", "path", "duration s", action, "completed", "req/s", "failed",
                "failed per " + action.rstrip("s"), "connect/read/write/timeout/non-2xx", "re-sent",
                "p99 ms"]
        if scenario == "restart":
            head += ["restart s"]
        head += ["workers back s", "SIGTERM → exit s"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in rows:
            if "error" in r:
                lines.append(f"| {r['target']} | `{r['path']}` | failed: {r['error']} |")
                continue
            e = r["socket_errors"]
            per = "–" if r["failed_per_action"] is None else f"{r['failed_per_action']:.1f}"
            row = [r["target"], f"`{r['path']}`", f"{r['seconds']:.1f}", str(r["actions"]),
                   f"{r['completed']:,}", f"{r['rate']:,.0f}", f"{r['failed']:,}", per,
                   f"{e['connect']}/{e['read']}/{e['write']}/{e['timeout']}/{r['non2xx']}",
                   "–" if r["resent"] is None else f"{r['resent']:,}", f"{r['p99_ms']:.1f}"]
            if scenario == "restart":
                row.append(", ".join("–" if s is None else f"{s:.1f}" for s in r["restart_s"]) or "–")
            row += ["–" if r["recovered_s"] is None else f"{r['recovered_s']:.1f}",
                    f"{r['stop_s']:.1f}" + (" (SIGKILLed)" if r["sigkilled"] else "")]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
        notes = []
        for r in rows:
            if "error" in r:
                continue
            if r.get("boot_failures"):
                notes.append(f"- {r['target']} `{r['path']}`: {r['boot_failures']} worker(s) died during boot")
            if r.get("tracebacks"):
                notes.append(f"- {r['target']} `{r['path']}`: {r['tracebacks']} traceback(s) in the server log")
            bad = [ev for ev in r["events"] if ev.get("outcome") not in (None, "complete")]
            bad += [ev for ev in r["events"] if ev.get("after_load")]
            if bad:
                notes.append(f"- {r['target']} `{r['path']}`: {bad}")
        if notes:
            lines += ["Notes:", "", *notes, ""]
    commands = {t: display_command(t, args.workers, "info", DISPATCH_ARGS)
                for t in dict.fromkeys(r["target"] for r in records)}
    lines += ["## Exact commands", "", "Servers (PORT = a free port picked per server start):", ""]
    lines += [f"- {t}: `{c}`" for t, c in commands.items()]
    lines += ["", "Load (`done.lua` prints exact counters; written next to failures.json):", ""]
    lines += [f"- `{w}`" for w in dict.fromkeys(r["wrk"] for r in records if "wrk" in r)]
    lines += ["", "Kills: `SIGKILL` to the oldest child of the primary at 0.5 s, 1.5 s, ... of the wrk run. "
              f"Restarts: `SIGUSR2` to the primary at 1/{args.restarts + 1}, 2/{args.restarts + 1}, ... of "
              f"the run, each after the previous one's \"{RESTART_DONE}\" (deadline {args.restart_deadline:g}s).",
              "", f"Run: `{args.invocation}`", ""]
    return "\n".join(lines)


def write_json(path: Path, machine: dict[str, str], args: argparse.Namespace,
               records: list[dict[str, Any]]) -> None:
    with open(path, "w") as f:
        json.dump({"machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "runs": records}, f, indent=1)

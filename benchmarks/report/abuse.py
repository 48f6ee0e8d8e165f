"""The abuse attacks' report: abuse.md, one row per attack and what each attack did."""

from __future__ import annotations

import argparse
import contextlib
import os
import platform

from benchmarks.measurement.probes import REQUEST_TIMEOUT
from benchmarks.targets.abuse_command import GRACEFUL
from benchmarks.workloads.abuse.base import AFTER_SECONDS, SETTLE_SECONDS, Row
from benchmarks.workloads.abuse.suite import ATTACKS


def cell(pair: tuple[int | None, int | None] | None, sep: str = " / ") -> str:
    if pair is None:
        return "–"
    return sep.join("–" if v is None else f"{v:,}" for v in pair)


def markdown(rows: list[Row], args: argparse.Namespace, took: float, commit: tuple[str, str]) -> str:
    cpu = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    lines = [
        "# dispatch: abuse",
        "",
        f"- command: `{args.invocation}`",
        f"- date: {args.date}; took {took:.0f} s",
        f"- machine: Linux {platform.release()}, {len(os.sched_getaffinity(0))} CPUs ({cpu}), "
        f"Python {platform.python_version()}",
        f"- dispatch source: commit {commit[0]} at the start, {commit[1]} at the end"
        + (" (`+dirty`: src/ had uncommitted changes)" if any("+dirty" in c for c in commit) else ""),
        "- each attack starts its own server on 127.0.0.1 (a free port, `--log-level info`, "
        f"graceful timeout {GRACEFUL} s); during = requests (one per connection, 2 client threads, "
        f"{REQUEST_TIMEOUT:g} s timeout) sent while the attack runs, after = the same in the "
        f"{AFTER_SECONDS:g} s after it; fds = entries of /proc/PID/fd of the primary before the attack "
        f"and {SETTLE_SECONDS:g} s after the after-window; workers replaced = workers forked after "
        "the attack began. Logs: `benchmarks/results/logs/abuse-NAME.log` (not committed).",
        "",
        "| attack | outcome | served OK during / attempted | served OK after (5 s) / attempted "
        "| primary fds before / after | notes |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        notes = "; ".join(n.replace("|", "\\|") for n in row.notes) or "–"
        lines.append(f"| {row.attack} | {row.outcome} | {cell(row.during)} | {cell(row.after)} "
                     f"| {cell(row.fds)} | {notes} |")
    lines += ["", "## The attacks", ""]
    for row in rows:
        entry = ATTACKS[row.attack]
        lines.append(f"- **{row.attack}** ({row.seconds:.0f} s): {entry.what}. Expected: {entry.expected}.")
    lines.append("")
    return "\n".join(lines)


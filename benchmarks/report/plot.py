"""The comparison's plot: throughput and p99 per workload, median with min–max bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.targets.servers import ALL_TARGETS, DISPATCH_MODES
from benchmarks.workloads.compare import MIXED_WORKLOADS, WORKLOADS


def plot(summary: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    workloads = [w for w in WORKLOADS if w in summary]
    fig, axes = plt.subplots(2, len(workloads), figsize=(5 * len(workloads), 7.5), squeeze=False)
    for col, workload in enumerate(workloads):
        by_target = summary[workload]
        targets = [t for t in ALL_TARGETS if t in by_target]
        for row, (key, label) in enumerate([
            ("rate", "conn/s" if workload != "keepalive" else "req/s"),
            ("fast_p99_ms" if workload in MIXED_WORKLOADS else "p99_ms",
             "fast-only p99 ms" if workload in MIXED_WORKLOADS else "p99 ms"),
        ]):
            ax = axes[row][col]
            stats = [by_target[t].get(key) for t in targets]
            xs = [i for i, s in enumerate(stats) if s]
            med = [stats[i]["median"] for i in xs]
            err = [[stats[i]["median"] - stats[i]["min"] for i in xs],
                   [stats[i]["max"] - stats[i]["median"] for i in xs]]
            colors = ["tab:blue" if targets[i] in DISPATCH_MODES else "tab:gray" for i in xs]
            ax.bar(xs, med, yerr=err, capsize=4, color=colors)
            ax.set_xticks(range(len(targets)))
            ax.set_xticklabels(targets, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{workload}: {label}", fontsize=10)
    fig.suptitle("dispatch: median over rounds, bars = min–max (blue: dispatch, gray: peers)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


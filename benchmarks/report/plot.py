"""The comparisons' plots: throughput and p99 per workload, median with min–max bars."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.targets.servers import ALL_TARGETS, DISPATCH_MODES
from benchmarks.workloads.compare import MIXED_WORKLOADS, WORKLOADS

# (workload, the label of its rate, whether its latency panel shows the fast-only probe)
Panel = tuple[str, str, bool]


def plot(summary: dict[str, Any], path: Path) -> bool:
    """results.png: the balance modes next to the peers."""
    panels = [(w, "conn/s" if w != "keepalive" else "req/s", w in MIXED_WORKLOADS) for w in WORKLOADS]
    return plot_panels(summary, path, panels, ALL_TARGETS, set(DISPATCH_MODES),
                       "dispatch: median over rounds, bars = min–max (blue: dispatch, gray: peers)")


def plot_panels(summary: dict[str, Any], path: Path, panels: list[Panel], order: list[str],
                ours: set[str], title: str) -> bool:
    """One column per workload of ``panels`` in ``summary``: its rate above, its p99 below (the
    fast-only p99 for mixed workloads); targets in ``order``, ``ours`` in blue. False if
    matplotlib does not import."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [p for p in panels if p[0] in summary]
    if not panels:
        return False
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7.5), squeeze=False)
    for col, (workload, rate_label, mixed) in enumerate(panels):
        by_target = summary[workload]
        targets = [t for t in order if t in by_target]
        for row, (key, label) in enumerate([
            ("rate", rate_label),
            ("fast_p99_ms" if mixed else "p99_ms", "fast-only p99 ms" if mixed else "p99 ms"),
        ]):
            ax = axes[row][col]
            stats = [by_target[t].get(key) for t in targets]
            xs = [i for i, s in enumerate(stats) if s]
            med = [stats[i]["median"] for i in xs]
            err = [[stats[i]["median"] - stats[i]["min"] for i in xs],
                   [stats[i]["max"] - stats[i]["median"] for i in xs]]
            colors = ["tab:blue" if targets[i] in ours else "tab:gray" for i in xs]
            ax.bar(xs, med, yerr=err, capsize=4, color=colors)
            ax.set_xticks(range(len(targets)))
            ax.set_xticklabels(targets, rotation=30, ha="right", fontsize=8)
            ax.set_title(f"{workload}: {label}", fontsize=10)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True

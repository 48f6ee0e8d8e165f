"""``dispatch top``: a live view of a running primary, refreshed every second.

It polls ``status`` on the control socket and shows each worker with its
connections per second (from the change in its total since the last poll),
memory, CPU and restarts. Drawn with ``rich`` (``pip install 'dispatch[top]'``);
when the output is not a terminal it prints one table per refresh instead.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from dispatch.ctl import (
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    ControlClient,
    Unreachable,
    add_target_arguments,
    control_path,
    duration,
    mebibytes,
)


class Rates:
    """Connections per second of each worker, and of the cluster, between two polls."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, int]] = {}
        self._cluster: tuple[float, int] | None = None

    def update(self, status: dict[str, Any], now: float) -> tuple[float, dict[int, float]]:
        per_worker: dict[int, float] = {}
        seen: dict[int, tuple[float, int]] = {}
        for w in status["workers"]:
            total = int(w["connections_total"])
            previous = self._last.get(w["pid"])
            per_worker[w["pid"]] = _rate(previous, now, total)
            seen[w["pid"]] = (now, total)
        self._last = seen
        total = int(status["connections_total"])
        cluster = _rate(self._cluster, now, total)
        self._cluster = (now, total)
        return cluster, per_worker


def _rate(previous: tuple[float, int] | None, now: float, total: int) -> float:
    if previous is None or now <= previous[0]:
        return 0.0
    return max(0, total - previous[1]) / (now - previous[0])


def render(status: dict[str, Any], cluster_rate: float, rates: dict[int, float]) -> Any:
    """The view of one poll, as a rich ``Table``."""
    from rich.table import Table

    notes = [f"primary {status['primary_pid']}", f"up {duration(status['uptime_s'])}", status["balance"],
             f"{status['worker_count']}/{status['workers_wanted']} workers",
             f"{cluster_rate:,.0f} conn/s", f"{status['connections_total']:,} connections",
             f"{status['connections_in_flight']} in flight",
             "accepting" if status["accepting"] else "[red]not accepting[/red]"]
    for flag, text in (("restarting", "rolling restart"), ("upgrading", "upgrading"), ("stopping", "stopping")):
        if status.get(flag):
            notes.append(f"[yellow]{text}[/yellow]")
    table = Table(title=" · ".join(notes), title_justify="left")
    for name in ("id", "pid", "state", "uptime", "conn/s", "active", "total", "memory", "cpu",
                 "restarts", "stalled", "heartbeat"):
        table.add_column(name, justify="left" if name in ("state", "stalled") else "right", no_wrap=True)
    for w in status["workers"]:
        state = w["state"] if w["state"] == "ready" else f"[yellow]{w['state']}[/yellow]"
        table.add_row(str(w["id"]), str(w["pid"]), state, duration(w["uptime_s"]),
                      f"{rates.get(w['pid'], 0.0):,.0f}", str(w["connections_active"]),
                      f"{w['connections_total']:,}", mebibytes(w["memory_rss"]), f"{w['cpu_percent']:.1f}%",
                      str(w["restarts"]), "[red]yes[/red]" if w["stalled"] else "no",
                      f"{w['heartbeat_age_s']:.1f}s")
    return table


def main(argv: list[str] | None = None, prog: str = "python -m dispatch top") -> int:
    parser = argparse.ArgumentParser(prog=prog, description="A live view of a running dispatch primary.")
    add_target_arguments(parser)
    parser.add_argument("--interval", type=float, default=1.0, metavar="SECONDS",
                        help="seconds between refreshes (default: 1)")
    parser.add_argument("--iterations", type=int, default=0, metavar="N",
                        help="stop after N refreshes (default: until Ctrl-C)")
    args = parser.parse_args(argv)
    path = control_path(args)
    if path is None:
        parser.error("which primary? give --control PATH or --pidfile PATH")
    if not args.interval > 0:
        parser.error("--interval must be positive")
    try:
        from rich.console import Console
        from rich.live import Live
    except ImportError:
        print("dispatch top needs rich: pip install 'dispatch[top]'", file=sys.stderr)
        return EXIT_USAGE
    client = ControlClient(path, timeout=10)
    console = Console()
    rates = Rates()

    def poll() -> Any:
        reply = client.status()
        if not reply["ok"]:
            raise Unreachable(0, reply.get("error", "status refused"))
        status = reply["status"]
        return render(status, *rates.update(status, time.monotonic()))

    count = 0
    try:
        if console.is_terminal:
            with Live(poll(), console=console, auto_refresh=False) as live:
                count = 1
                while not args.iterations or count < args.iterations:
                    time.sleep(args.interval)
                    live.update(poll(), refresh=True)
                    count += 1
        else:
            while not args.iterations or count < args.iterations:
                if count:
                    time.sleep(args.interval)
                console.print(poll())
                count += 1
    except Unreachable as exc:
        print(f"dispatch top: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except KeyboardInterrupt:
        pass
    return EXIT_OK

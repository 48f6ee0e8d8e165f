"""How many connections one primary can pass on: dispatch with sink workers, under all the
new connections wrk can make on this machine.

    python -m benchmarks.ceiling                  # 2 rounds, 6 s runs, results/ceiling.md
    python -m benchmarks.ceiling --rounds 3 --duration 8

The workers close each connection at once (``benchmarks/peers/sink_app.py``), so what
costs CPU per connection is the primary (and the load generator). For round-robin
and least-connections, and the floor that only accepts and passes (``floor-pass``),
it measures connections passed per second (from ``/cluster-health``, or the floor's
own count), the primary's CPU per connection (user and system) and the share of one
core it used. One core divided by the CPU per connection is the most one primary
thread can pass: the ceiling. On a machine where the load generator shares the
cores, the primary does not reach 100% of a core, so the ceiling is that quotient,
not an observed rate; the table shows both.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from benchmarks.measurement.proc import CLK_TCK, cpu_split
from benchmarks.measurement.wrk import DONE_LUA, finish_wrk, start_wrk
from benchmarks.paths import RESULTS
from benchmarks.report.machine import machine_info
from benchmarks.targets.servers import Server, free_port

TARGETS = ["round-robin", "least-connections", "floor-pass"]


def one_run(target: str, args: argparse.Namespace, tmp: Path, rnd: int) -> dict[str, float]:
    server = Server(target, free_port(), args.workers, args.out / "logs" / f"ceiling-{target}.r{rnd}.log",
                    app="benchmarks.peers.sink_app:app", answers=False)
    if target != "floor-pass":
        server.health_port = free_port()
        server.dispatch_args = ("--health", f"127.0.0.1:{server.health_port}")
    try:
        server.start(boot_timeout=20)
        count = server.accepted if target == "floor-pass" else lambda: sum((server.worker_connections() or {}).values())
        before, passed0, t0 = cpu_split(server.pid), count(), time.monotonic()
        cmd = ["wrk", "-t", "2", "-c", "128", "-d", f"{args.duration}s", "--timeout", "2s",
               "-s", str(tmp / "done.lua"), f"http://127.0.0.1:{server.port}/"]
        finish_wrk(start_wrk(cmd), args.duration + 30)
        after, passed1, wall = cpu_split(server.pid), count(), time.monotonic() - t0
    finally:
        server.stop(5)
    assert before is not None and after is not None
    passed = passed1 - passed0
    user = (after[0] - before[0]) / CLK_TCK
    system = (after[1] - before[1]) / CLK_TCK
    per = (user + system) / passed * 1e6
    return {"rate": passed / wall, "user_us": user / passed * 1e6, "sys_us": system / passed * 1e6,
            "core_share": (user + system) / wall, "ceiling": 1e6 / per}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.ceiling", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=int, default=6)
    p.add_argument("--workers", type=int, default=1, help="sink workers (default %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    (args.out / "logs").mkdir(parents=True, exist_ok=True)
    tmp = args.out
    (tmp / "done.lua").write_text(DONE_LUA)
    runs: dict[str, list[dict[str, float]]] = {t: [] for t in TARGETS}
    for rnd in range(1, args.rounds + 1):
        for target in TARGETS:
            runs[target].append(one_run(target, args, tmp, rnd))
            r = runs[target][-1]
            print(f"round {rnd} {target}: {r['rate']:,.0f} conn/s, primary {r['user_us']:.1f}+{r['sys_us']:.1f} µs/conn, "
                  f"{r['core_share']:.0%} of a core, ceiling {r['ceiling']:,.0f}/s", flush=True)
    machine = machine_info()
    lines = ["# The primary's ceiling: sink workers, all the load wrk can make", "",
             f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, Linux {machine['kernel']}, "
             f"Python {machine['python']}; commit {machine['dispatch_commit']}; {machine['date']}",
             f"- {args.rounds} rounds × {args.duration} s, {args.workers} sink worker(s), "
             "`wrk -t2 -c128` (a new connection per request: the sink closes it); medians over rounds",
             "- command: `python -m benchmarks.ceiling" + (f" --rounds {args.rounds}" if args.rounds != 2 else "")
             + (f" --duration {args.duration}" if args.duration != 6 else "") + "`", "",
             "| target | passed conn/s | primary µs/conn user / sys | primary's share of one core | "
             "ceiling: one core ÷ µs/conn |", "|---|---|---|---|---|"]
    for target, got in runs.items():
        med = {key: statistics.median(r[key] for r in got) for key in got[0]}
        lines.append(f"| {target} | {med['rate']:,.0f} | {med['user_us']:.1f} / {med['sys_us']:.1f} | "
                     f"{med['core_share']:.0%} | {med['ceiling']:,.0f}/s |")
    text = "\n".join(lines) + "\n"
    print(text)
    (args.out / "ceiling.md").write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

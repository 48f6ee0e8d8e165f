"""System calls per request of the web targets, new connection per request: where the CPU of
a connection goes. Each target serves the Starlette (or Flask) app of the web comparison;
``strace -c -f`` attaches to the process started and its workers while ``wrk -t1 -c16 -d3s
-H "Connection: close"`` runs on ``/``; the counts are divided by wrk's completed requests.

    python -m benchmarks.web_syscalls                        # dispatch-rr and uvicorn-workers
    python -m benchmarks.web_syscalls dispatch-rr granian-asgi --out /tmp/syscalls.md

strace slows every traced call down, so rates under it mean nothing and batches stay small
(about one connection per accept and per descriptor message): the counts are those of a
lightly loaded server. Needs strace (Debian package ``strace``) and root or ptrace rights.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.measurement.wrk import DONE_LUA, finish_wrk, start_wrk
from benchmarks.paths import RESULTS
from benchmarks.report.machine import machine_info
from benchmarks.targets.servers import free_port
from benchmarks.targets.web import WEB_TARGETS, WebServer


def per_request(target: str, tmp: Path, seconds: int) -> tuple[int, dict[str, float]]:
    """(completed requests, syscall name -> calls per request) of one target."""
    server = WebServer(target, free_port(), 2, tmp / f"{target}.log")
    out = tmp / f"{target}.strace"
    try:
        server.start(boot_timeout=20)
        pids = [server.pid, *server.remember_children()]
        strace = subprocess.Popen(["strace", "-c", "-f", "-o", str(out), *[a for p in pids for a in ("-p", str(p))]],
                                  stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1)  # attached
        wrk = ["wrk", "-t1", "-c16", f"-d{seconds}s", "--timeout", "5s", "-H", "Connection: close",
               "-s", str(tmp / "done.lua"), f"http://127.0.0.1:{server.port}/"]
        result = finish_wrk(start_wrk(wrk), seconds + 30)
        strace.send_signal(signal.SIGINT)
        strace.wait(timeout=30)
    finally:
        server.stop(5)
    done = result["requests"]
    calls: dict[str, float] = {}
    for line in out.read_text().splitlines()[2:]:
        fields = line.split()
        # "% time  seconds  usecs/call  calls  [errors]  syscall"; the total line ends in "total"
        if len(fields) >= 5 and fields[3].isdigit():
            calls[fields[-1]] = int(fields[3]) / done if done else float("nan")
    return done, calls


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.web_syscalls", description=__doc__.split("\n\n")[0])
    p.add_argument("targets", nargs="*", default=["dispatch-rr", "uvicorn-workers"],
                   help=f"among {', '.join(WEB_TARGETS)}")
    p.add_argument("--seconds", type=int, default=3, help="wrk run length (default %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS / "web_syscalls.md")
    args = p.parse_args(argv)
    if shutil.which("strace") is None or shutil.which("wrk") is None:
        print("needs strace and wrk", file=sys.stderr)
        return 2
    columns: dict[str, tuple[int, dict[str, float]]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "done.lua").write_text(DONE_LUA)
        for target in args.targets:
            columns[target] = per_request(target, tmp, args.seconds)
    names = sorted({n for _, calls in columns.values() for n in calls if n != "total"},
                   key=lambda n: -max(c.get(n, 0.0) for _, c in columns.values()))
    m = machine_info()
    lines = ["# System calls per request, new connection per request", "",
             f"{m['nproc']} CPUs, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}; dispatch commit "
             f"{m['dispatch_commit']}; {m['date']}. `python -m benchmarks.web_syscalls "
             f"{' '.join(args.targets)}`: `strace -c -f` on the process started and its workers during "
             f"`wrk -t1 -c16 -d{args.seconds}s -H 'Connection: close'` on `/`, ÷ wrk's completed requests "
             "(rates under strace mean nothing; batches stay small).", "",
             "| syscall | " + " | ".join(args.targets) + " |", "|---|" + "---|" * len(args.targets)]
    for name in [*names, "total"]:
        cells = [f"{c[name]:.2f}" if name in c else "–" for _, c in columns.values()]
        lines.append(f"| {'**total**' if name == 'total' else name} | " + " | ".join(cells) + " |")
    lines += ["", "completed requests: " + ", ".join(f"{t} {n}" for t, (n, _) in columns.items()), ""]
    text = "\n".join(lines)
    print(text)
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak: kill workers N times and check the primary leaks nothing.

    python benchmarks/soak_restarts.py --restarts 2000

Starts ``python -m dispatch dispatch.demo:app`` on a free loopback port, then
SIGKILLs its oldest worker and waits for the replacement, N times. Prints the
primary's open descriptors and children (zombies counted) before and after,
and one request's answer at the end. Everything it starts is stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def zombies(pids: list[int]) -> int:
    count = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                count += f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except FileNotFoundError:
            pass
    return count


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)  # each poll is a new connection: don't run out of ephemeral ports
    raise SystemExit(f"timed out waiting for {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--restarts", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    port, health = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "dispatch", "dispatch.demo:app", "--workers", str(args.workers),
         "--bind", f"127.0.0.1:{port}", "--health", f"127.0.0.1:{health}", "--log-level", "info"],
        stderr=open("/tmp/soak.log", "w"), text=True,
    )

    def ready_workers() -> list[dict] | None:
        # Kill only ready workers: one killed while booting counts as a boot failure and
        # is respawned after a back-off, by design. Slots are followed by their restart
        # count, not by pid: after 32k forks pids wrap around and may be reused.
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/cluster-health", timeout=5) as r:
                workers = json.load(r)["workers"]
        except OSError:
            return None
        ready = [w for w in workers if w["state"] == "ready"]
        return ready if len(ready) == args.workers == len(workers) else None

    def restarted(slot: int, restarts: int) -> bool:
        workers = ready_workers()
        return bool(workers) and any(w["id"] == slot and w["restarts"] > restarts for w in workers)

    try:
        wait_for(ready_workers, 15, "workers")
        fds_before = len(os.listdir(f"/proc/{server.pid}/fd"))
        started = time.monotonic()
        for i in range(args.restarts):
            victim = wait_for(ready_workers, 10, f"ready workers before kill {i}")[i % args.workers]
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for(lambda v=victim: restarted(v["id"], v["restarts"]), 10, f"replacement {i}")
        elapsed = time.monotonic() - started
        wait_for(ready_workers, 10, "the last replacement")
        time.sleep(0.5)  # let the health server close our last connection
        fds_after = len(os.listdir(f"/proc/{server.pid}/fd"))
        kids = children(server.pid)
        answer = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode().strip()
        print(f"restarts: {args.restarts} in {elapsed:.1f}s ({args.restarts / elapsed:.0f}/s)")
        print(f"primary fds: {fds_before} before, {fds_after} after")
        print(f"children: {len(kids)}, zombies: {zombies(kids)}")
        print(f"answer after: {answer!r}")
        return 0 if fds_after == fds_before and zombies(kids) == 0 and len(kids) == args.workers else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        err = open("/tmp/soak.log").read()
        errors = [line for line in err.splitlines() if re.search(r"Traceback|ERROR|CRITICAL", line)]
        print(f"server log: {len(errors)} error lines")


if __name__ == "__main__":
    sys.exit(main())

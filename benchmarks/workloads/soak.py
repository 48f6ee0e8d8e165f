"""Soak: kill workers N times and check the primary leaks nothing.

Starts ``python -m dispatch dispatch.demo:app`` on a free loopback port, then
SIGKILLs its oldest worker and waits for the replacement, N times. Prints the
primary's open descriptors and children (zombies counted) before and after,
and one request's answer at the end. Everything it starts is stopped by pid.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable
from typing import Any

from benchmarks.measurement.proc import children, zombies
from benchmarks.targets.servers import free_port, soak_command

LOG = "/tmp/soak.log"


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)  # each poll is a new connection: don't run out of ephemeral ports
    raise SystemExit(f"timed out waiting for {what}")


def soak(restarts: int, workers: int) -> int:
    """0 if the primary has as many descriptors, no zombie and ``workers`` children at the end."""
    port, health = free_port(), free_port()
    with open(LOG, "w") as log_file:
        server = subprocess.Popen(soak_command(port, health, workers), stderr=log_file, text=True)

    def ready_workers() -> list[dict] | None:
        # Kill only ready workers: one killed while booting counts as a boot failure and
        # is respawned after a back-off, by design. Slots are followed by their restart
        # count, not by pid: after 32k forks pids wrap around and may be reused.
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health}/cluster-health", timeout=5) as r:
                found = json.load(r)["workers"]
        except OSError:
            return None
        ready = [w for w in found if w["state"] == "ready"]
        return ready if len(ready) == workers == len(found) else None

    def restarted(slot: int, count: int) -> bool:
        found = ready_workers()
        return bool(found) and any(w["id"] == slot and w["restarts"] > count for w in found)

    try:
        wait_for(ready_workers, 15, "workers")
        time.sleep(0.5)  # as below: the health server closes our connection first, or it is counted
        fds_before = len(os.listdir(f"/proc/{server.pid}/fd"))
        started = time.monotonic()
        for i in range(restarts):
            victim = wait_for(ready_workers, 10, f"ready workers before kill {i}")[i % workers]
            os.kill(victim["pid"], signal.SIGKILL)
            wait_for(lambda v=victim: restarted(v["id"], v["restarts"]), 10, f"replacement {i}")
        elapsed = time.monotonic() - started
        wait_for(ready_workers, 10, "the last replacement")
        time.sleep(0.5)  # let the health server close our last connection
        fds_after = len(os.listdir(f"/proc/{server.pid}/fd"))
        kids = children(server.pid)
        answer = urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10).read().decode().strip()
        print(f"restarts: {restarts} in {elapsed:.1f}s ({restarts / elapsed:.0f}/s)")
        print(f"primary fds: {fds_before} before, {fds_after} after")
        print(f"children: {len(kids)}, zombies: {zombies(kids)}")
        print(f"answer after: {answer!r}")
        return 0 if fds_after == fds_before and zombies(kids) == 0 and len(kids) == workers else 1
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        with open(LOG) as f:
            errors = [line for line in f.read().splitlines() if re.search(r"Traceback|ERROR|CRITICAL", line)]
        print(f"server log: {len(errors)} error lines")

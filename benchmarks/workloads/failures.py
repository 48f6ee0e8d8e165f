"""Failure and rolling-restart scenarios under load: what a dead worker or a restart costs.

Two scenarios, each under steady wrk load with a new connection per request
(``Connection: close``), against one server at a time:

- failure: SIGKILL one worker (the oldest, so never one still booting) every
  second for the whole run. dispatch modes and Node.js cluster (rr).
- restart: SIGUSR2 (rolling restart) to the primary 3 times, spread over the
  run, waiting for "rolling restart complete" in its log (with a deadline)
  before the next one. dispatch modes only: Node's cluster has no rolling
  restart of its own.

Failed requests are wrk's socket errors (connect, read, write, timeout) plus
non-2xx responses. Workers are killed only if they are children of the primary
started here (checked through a pidfd, so a recycled pid is never hit), and
every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import signal
import time
from pathlib import Path
from typing import Any

from benchmarks.measurement.logs import log_text, trim_log
from benchmarks.measurement.probes import http_get
from benchmarks.measurement.proc import proc_stat, start_time
from benchmarks.measurement.wrk import finish_wrk, start_wrk
from benchmarks.targets.servers import DISPATCH_MODES, Server, free_port
from benchmarks.workloads.compare import warm_up

SCENARIOS = ["failure", "restart"]
TARGETS = {"failure": [*DISPATCH_MODES, "node-rr"], "restart": list(DISPATCH_MODES)}
ALL_TARGETS = TARGETS["failure"]
DEFAULT_PATHS = ["/slow?ms=20", "/"]
GRACEFUL_TIMEOUT = 10
DISPATCH_ARGS = ("--graceful-timeout", str(GRACEFUL_TIMEOUT))
# What the primary logs (src/dispatch/); info level is needed for the restart lines.
RESENT = re.compile(r"(\d+) connections it had not read go to other workers")
RESTART_DONE = "rolling restart complete"
RESTART_ABORTED = "rolling restart aborted"
BOOT_FAILED = re.compile(r"during boot; retrying in")


# ====================================================================== processes
def kill_worker(server: Server, pid: int) -> bool:
    """SIGKILL ``pid`` if it is still the child of our primary we saw: via a pidfd, so no pid reuse."""
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return False  # already gone
    try:
        fields = proc_stat(pid)
        if fields is None or int(fields[1]) != server.pid or start_time(pid) != server.known.get(pid):
            return False
        signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return True
    except OSError:
        return False
    finally:
        os.close(pidfd)


def sleep_until(when: float) -> None:
    time.sleep(max(0.0, when - time.monotonic()))


def kill_loop(server: Server, t0: float, duration: int) -> list[dict[str, Any]]:
    """One SIGKILL a second, at t0 + 0.5 s, 1.5 s, ...: the oldest worker, which has long been ready."""
    events: list[dict[str, Any]] = []
    for i in range(duration):
        sleep_until(t0 + 0.5 + i)
        assert server.proc is not None
        if server.proc.poll() is not None:
            events.append({"t": round(time.monotonic() - t0, 2), "error": "primary exited"})
            break
        kids = server.remember_children()
        if not kids:
            events.append({"t": round(time.monotonic() - t0, 2), "workers": 0, "killed": None})
            continue
        victim = min(kids, key=lambda p: server.known.get(p) or 0)
        killed = kill_worker(server, victim)
        events.append({"t": round(time.monotonic() - t0, 2), "workers": len(kids),
                       "killed": victim if killed else None})
    return events


def restart_loop(server: Server, t0: float, duration: int, count: int, offset: int,
                 deadline_s: float) -> list[dict[str, Any]]:
    """``count`` SIGUSR2s spread over the run; each waits for the primary to log the restart's end."""
    events: list[dict[str, Any]] = []
    for i in range(count):
        sleep_until(t0 + duration * (i + 1) / (count + 1))
        assert server.proc is not None
        if server.proc.poll() is not None:
            events.append({"t": round(time.monotonic() - t0, 2), "outcome": "primary exited"})
            break
        text = log_text(server.log_path, offset)
        done0, aborted0 = text.count(RESTART_DONE), text.count(RESTART_ABORTED)
        sent = time.monotonic()
        os.kill(server.pid, signal.SIGUSR2)  # the primary we started (Popen keeps its pid reserved)
        outcome = "timeout"
        while time.monotonic() < sent + deadline_s:
            text = log_text(server.log_path, offset)
            if text.count(RESTART_DONE) > done0:
                outcome = "complete"
                break
            if text.count(RESTART_ABORTED) > aborted0:
                outcome = "aborted"
                break
            if server.proc.poll() is not None:
                outcome = "primary exited"
                break
            time.sleep(0.05)
        took = time.monotonic() - sent
        events.append({"t": round(sent - t0, 2), "outcome": outcome, "seconds": round(took, 2),
                       "after_load": sent + took > t0 + duration})
        server.remember_children()
        if outcome != "complete":
            break
    return events


def wait_recovered(server: Server, workers: int, deadline_s: float) -> float | None:
    """Seconds until the primary has ``workers`` children again and answers, or None."""
    t0 = time.monotonic()
    while time.monotonic() < t0 + deadline_s:
        assert server.proc is not None
        if server.proc.poll() is not None:
            return None
        if len(server.remember_children()) == workers:
            with contextlib.suppress(OSError, ValueError, IndexError):
                if http_get(server.port)[0] == 200:
                    return time.monotonic() - t0
        time.sleep(0.05)
    return None


# ====================================================================== one run
def wrk_command(port: int, path: str, args: argparse.Namespace, script: Path) -> list[str]:
    return ["wrk", "-t", str(args.wrk_threads), "-c", str(args.connections), "-d", f"{args.duration}s",
            "--timeout", "2s", "-H", "Connection: close", "-s", str(script), f"http://127.0.0.1:{port}{path}"]


def slug(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", path.lower()).strip("-") or "root"


def run_one(scenario: str, target: str, path: str, args: argparse.Namespace, script: Path) -> dict[str, Any]:
    log_path = args.out / "logs" / f"{scenario}-{target}-{slug(path)}.log"
    log_path.unlink(missing_ok=True)
    server = Server(target, free_port(), args.workers, log_path, log_level="info", dispatch_args=DISPATCH_ARGS)
    rec: dict[str, Any] = {"scenario": scenario, "target": target, "path": path}
    try:
        server.start(boot_timeout=20)
        warm_up(server, args.warmup, {"done": script})
        offset = log_path.stat().st_size
        cmd = wrk_command(server.port, path, args, script)
        rec["wrk"] = shlex.join(cmd).replace(f"127.0.0.1:{server.port}", "127.0.0.1:PORT")
        t0 = time.monotonic()
        w = start_wrk(cmd)
        try:
            if scenario == "failure":
                events = kill_loop(server, t0, args.duration)
            else:
                events = restart_loop(server, t0, args.duration, args.restarts, offset, args.restart_deadline)
            result = finish_wrk(w, args.duration + args.restart_deadline + 30)
        finally:
            if w.proc.poll() is None:
                w.proc.kill()
                w.proc.wait(timeout=5)
        recovered = wait_recovered(server, args.workers, 15)
        text = log_text(log_path, offset)
        socket_errors = {k: result[k] for k in ("connect", "read", "write", "timeout")}
        failed = sum(socket_errors.values()) + result["status"]
        if scenario == "failure":
            actions = sum(1 for e in events if e.get("killed"))
        else:
            actions = sum(1 for e in events if e.get("outcome") == "complete")
        rec.update({
            "seconds": result["duration_us"] / 1e6,
            "actions": actions,
            "events": events,
            "completed": result["requests"],
            "rate": result["requests"] / (result["duration_us"] / 1e6),
            "failed": failed,
            "failed_per_action": failed / actions if actions else None,
            "non2xx": result["status"],
            "socket_errors": socket_errors,
            "p50_ms": result["p50_us"] / 1000,
            "p99_ms": result["p99_us"] / 1000,
            "max_ms": result["max_us"] / 1000,
            "resent": sum(int(n) for n in RESENT.findall(text)) if target in DISPATCH_MODES else None,
            "boot_failures": len(BOOT_FAILED.findall(text)) if target in DISPATCH_MODES else None,
            "tracebacks": text.count("Traceback (most recent call last)"),
            "recovered_s": None if recovered is None else round(recovered, 2),
        })
        if scenario == "restart":
            rec["restart_s"] = [e.get("seconds") for e in events]
    except (RuntimeError, OSError, TimeoutError, json.JSONDecodeError) as exc:
        rec["error"] = str(exc)
    finally:
        server.stop(args.stop_timeout)
        rec["stop_s"] = round(server.stop_seconds, 2)
        rec["sigkilled"] = server.sigkilled
        trim_log(log_path)
    return rec


def plan(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    """(scenario, target, path) of every run, in order: per path, per scenario, per target."""
    return [(s, t, path) for path in args.paths for s in args.scenarios for t in args.modes if t in TARGETS[s]]

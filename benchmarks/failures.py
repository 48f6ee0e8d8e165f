"""Failure and rolling-restart scenarios under load: what a dead worker or a restart costs.

    python benchmarks/failures.py --quick     # 10 s per run, about 3 minutes
    python benchmarks/failures.py             # 30 s per run, about 10 minutes
    python benchmarks/run.py --workloads failure,restart   # the same, from run.py

Two scenarios, each under steady wrk load with a new connection per request
(``Connection: close``), against one server at a time:

- failure: SIGKILL one worker (the oldest, so never one still booting) every
  second for the whole run. dispatch modes and Node.js cluster (rr).
- restart: SIGUSR2 (rolling restart) to the primary 3 times, spread over the
  run, waiting for "rolling restart complete" in its log (with a deadline)
  before the next one. dispatch modes only: Node's cluster has no rolling
  restart of its own.

Failed requests are wrk's socket errors (connect, read, write, timeout) plus
non-2xx responses. See benchmarks/README.md for the details. Every process
started here is stopped by pid in a ``finally`` block; workers are killed only
if they are children of the primary started here (checked through a pidfd, so
a recycled pid is never hit), and every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

from run import (
    DISPATCH_MODES,
    DONE_LUA,
    HERE,
    Server,
    display_command,
    finish_wrk,
    free_port,
    http_get,
    log,
    machine_info,
    proc_stat,
    source_version,
    start_time,
    start_wrk,
    trim_log,
    warm_up,
)

SCENARIOS = ["failure", "restart"]
TARGETS = {"failure": [*DISPATCH_MODES, "node-rr"], "restart": list(DISPATCH_MODES)}
ALL_TARGETS = TARGETS["failure"]
DEFAULT_PATHS = ["/slow?ms=20", "/"]
GRACEFUL_TIMEOUT = 10
DISPATCH_ARGS = ("--graceful-timeout", str(GRACEFUL_TIMEOUT))
# What the primary logs (src/dispatch/primary.py, supervisor.py); info level is needed for the restart lines.
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


def log_text(server: Server, offset: int) -> str:
    with open(server.log_path, "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


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
        text = log_text(server, offset)
        done0, aborted0 = text.count(RESTART_DONE), text.count(RESTART_ABORTED)
        sent = time.monotonic()
        os.kill(server.pid, signal.SIGUSR2)  # the primary we started (Popen keeps its pid reserved)
        outcome = "timeout"
        while time.monotonic() < sent + deadline_s:
            text = log_text(server, offset)
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
        text = log_text(server, offset)
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


# ====================================================================== report
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


# ====================================================================== main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="10 s runs instead of 30 s")
    p.add_argument("--duration", type=int, help="seconds of load per run (default 30; 10 with --quick)")
    p.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated among failure,restart")
    p.add_argument("--modes", default=",".join(ALL_TARGETS),
                   help=f"comma-separated among {','.join(ALL_TARGETS)} (node-rr: failure only)")
    p.add_argument("--paths", default=",".join(DEFAULT_PATHS),
                   help="comma-separated request paths, one set of runs each (default %(default)s)")
    p.add_argument("--restarts", type=int, default=3, help="rolling restarts per run (default %(default)s)")
    p.add_argument("--restart-deadline", type=float, default=30.0,
                   help="seconds to wait for each restart to complete (default %(default)s)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default %(default)s)")
    p.add_argument("--wrk-threads", type=int, default=1, help="wrk threads (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="worker processes per server (default %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="seconds of keep-alive load after start (default %(default)s)")
    p.add_argument("--stop-timeout", type=float, default=GRACEFUL_TIMEOUT + 5.0,
                   help="seconds between SIGTERM and SIGKILL (default %(default)s)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default %(default)s)")
    args = p.parse_args(argv)
    args.duration = args.duration or (10 if args.quick else 30)
    args.scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    for s in args.scenarios:
        if s not in SCENARIOS:
            p.error(f"unknown scenario {s!r}; choose among {', '.join(SCENARIOS)}")
    for m in args.modes:
        if m not in ALL_TARGETS:
            p.error(f"unknown mode {m!r}; choose among {', '.join(ALL_TARGETS)}")
    for path in args.paths:
        if not path.startswith("/"):
            p.error(f"a path starts with '/': {path!r}")
    args.invocation = shlex.join(["python", "benchmarks/failures.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def run(args: argparse.Namespace) -> int:
    if shutil.which("wrk") is None:
        log("wrk not found (Debian package 'wrk')")
        return 2
    if shutil.which("node") is None and "node-rr" in args.modes:
        log("node not found: skipping node-rr")
        args.modes = [m for m in args.modes if m != "node-rr"]
    out: Path = args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    script = out / "done.lua"
    script.write_text(DONE_LUA)
    machine = machine_info()
    plan = [(s, t, path) for path in args.paths for s in args.scenarios for t in args.modes if t in TARGETS[s]]
    records: list[dict[str, Any]] = []
    started = time.monotonic()
    for i, (scenario, target, path) in enumerate(plan, 1):
        rec = run_one(scenario, target, path, args, script)
        records.append(rec)
        if "error" in rec:
            log(f"[{i}/{len(plan)}] {scenario:<7} {target:<17} {path:<12} FAILED: {rec['error']}")
        else:
            log(f"[{i}/{len(plan)}] {scenario:<7} {target:<17} {path:<12} {rec['actions']:>2} "
                f"{'kills' if scenario == 'failure' else 'restarts'}  completed {rec['completed']:>7,}  "
                f"failed {rec['failed']:>5,}  re-sent {rec['resent']}  stop {rec['stop_s']:.1f}s")
    machine["dispatch_commit_at_end"] = source_version()
    text = markdown(records, machine, args)
    print(text)
    (out / "failures.md").write_text(text)
    with open(out / "failures.json", "w") as f:
        json.dump({"machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "runs": records}, f, indent=1)
    log(f"done in {time.monotonic() - started:.0f}s: {out / 'failures.md'}, {out / 'failures.json'}")
    return 0


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

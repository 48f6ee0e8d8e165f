"""Benchmark dispatch's balance modes side by side, with wrk, on 127.0.0.1.

    python benchmarks/run.py --quick                 # about two minutes
    python benchmarks/run.py --rounds 3 --duration 8

Every target serves the same tiny HTTP response: the four dispatch modes run
``dispatch.demo:app`` through the CLI; the peers are Node.js cluster (both
scheduling policies), gunicorn (sync workers) and uvicorn --workers on
``benchmarks/peers/python_apps.py``, and a FLOOR that only accepts and closes. Targets are
interleaved within each round (A B C D ... A B C D ...) and each metric is
reported as the median over rounds with its min-max spread. See
benchmarks/README.md for what each number means and how it is measured.

Everything listens on 127.0.0.1 on a free port picked here; wrk targets only
that address. Every process started here is stopped by pid (SIGTERM, then
SIGKILL after a deadline) in a ``finally`` block, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import select
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PEERS = HERE / "peers"
CLK_TCK = os.sysconf("SC_CLK_TCK")

DISPATCH_MODES = ["round-robin", "least-connections", "reuseport", "shared"]
PEER_TARGETS = ["node-rr", "node-none", "gunicorn-sync", "uvicorn", "floor-pass", "floor-close"]
FLOORS = ("floor-pass", "floor-close")
# target -> the module run with ``python -m``, on benchmarks.peers.python_apps (repo root on PYTHONPATH)
PYTHON_PEERS = {"gunicorn-sync": "gunicorn", "uvicorn": "uvicorn"}
ALL_TARGETS = DISPATCH_MODES + PEER_TARGETS
WORKLOADS = ["tiny", "keepalive", "mixed", "slowio"]
# New connection per request with a share of slow paths, and a fast-only probe next to it.
MIXED_WORKLOADS = ("mixed", "slowio")
# Run by failures.py (30 s runs, 10 s with --quick) after the workloads above: --workloads failure,restart
FAILURE_WORKLOADS = ["failure", "restart"]
# The floor answers nothing, so only the connection-rate workload means anything for it.
FLOOR_WORKLOADS = {"tiny"}

SLOW_PATH = "/burn?ms=30"
SLOW_SHARE = 0.02
SLOWIO_PATH = "/slow?ms=50"  # sleeps (asyncio.sleep / time.sleep / setTimeout): waits, burns nothing
SLOWIO_SHARE = 0.10
MIX = {"mixed": (SLOW_PATH, SLOW_SHARE), "slowio": (SLOWIO_PATH, SLOWIO_SHARE)}
PROBE_CONNECTIONS = 4
MEMORY_SAMPLE_S = 0.2  # RSS sampling period during a wrk run
HEALTH_SETTLE_S = 1.2  # kernel modes: a worker's count arrives with its heartbeat (every 1 s)

# wrk prints this line from the Lua done() hook: exact counters and percentiles
# instead of wrk's rounded text report.
DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCHJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,' ..
    '"max_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean))
end
"""



def mixed_lua(path: str, share: float) -> str:
    return f"""
-- Each request picks its path: {share:.0%} {path}, the rest are instant.
-- Built in init(): only then does wrk.headers hold Host (and the -H headers).
local slow, fast
init = function(args)
  slow = wrk.format(nil, "{path}")
  fast = wrk.format(nil, "/")
end
request = function()
  if math.random() < {share} then return slow end
  return fast
end
""" + DONE_LUA


MIXED_LUA = mixed_lua(SLOW_PATH, SLOW_SHARE)
SLOWIO_LUA = mixed_lua(SLOWIO_PATH, SLOWIO_SHARE)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ====================================================================== /proc
def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of one process, in clock ticks."""
    fields = proc_stat(pid)
    if fields is None:
        return None
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def start_time(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None  # field 22: identifies the process


def children(pid: int) -> list[int]:
    """The workers: children of ``pid``, without multiprocessing's resource tracker (uvicorn's spawn)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    return sorted(p for p in out if b"resource_tracker" not in cmdline(p))


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def rss_bytes(pid: int) -> int | None:
    """VmRSS from /proc/PID/status, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemorySampler:
    """Samples the RSS of the primary and of its workers every MEMORY_SAMPLE_S in a thread.

    Peak of the primary, and peak over samples of the workers' summed RSS (children
    re-read at every sample, so a worker started during the run counts too).
    """

    def __init__(self, pid: int, with_workers: bool) -> None:
        self.pid, self.with_workers = pid, with_workers
        self.primary_peak = 0
        self.workers_peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.primary_peak = max(self.primary_peak, rss_bytes(self.pid) or 0)
        if self.with_workers:
            self.workers_peak = max(self.workers_peak, sum(rss_bytes(k) or 0 for k in children(self.pid)))
        self.samples += 1

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(MEMORY_SAMPLE_S):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def jain(values: list[float]) -> float | None:
    """Jain's fairness index: 1 = perfectly even, 1/n = one got everything."""
    if not values or sum(values) <= 0:
        return None
    return sum(values) ** 2 / (len(values) * sum(v * v for v in values))


# ====================================================================== servers
def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(target: str, port: int, workers: int, log_level: str = "warning",
                   dispatch_args: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """The command line of one target; ``log_level`` and ``dispatch_args`` apply to dispatch only."""
    env = dict(os.environ)
    if target in DISPATCH_MODES:
        cmd = [sys.executable, "-m", "dispatch", "dispatch.demo:app", "--workers", str(workers),
               "--bind", f"127.0.0.1:{port}", "--balance", target, "--log-level", log_level,
               *dispatch_args]
    elif target in ("node-rr", "node-none"):
        env["NODE_CLUSTER_SCHED_POLICY"] = target.removeprefix("node-")
        cmd = ["node", str(PEERS / "node_cluster.js"), str(port), str(workers)]
    elif target in FLOORS:
        cmd = [sys.executable, str(PEERS / "accept_close.py"), "127.0.0.1", str(port),
               target.removeprefix("floor-")]
    elif target == "gunicorn-sync":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--worker-class", "sync",
               "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "benchmarks.peers.python_apps:wsgi"]
    elif target == "uvicorn":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE.parent), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "uvicorn", "--workers", str(workers), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "benchmarks.peers.python_apps:asgi"]
    else:
        raise ValueError(f"unknown target {target!r}")
    return cmd, env


def display_command(target: str, workers: int, log_level: str = "warning",
                    dispatch_args: tuple[str, ...] = ()) -> str:
    cmd, _ = server_command(target, 0, workers, log_level, dispatch_args)
    text = shlex.join(["python" if c == sys.executable else c for c in cmd]).replace(":0", ":PORT")
    if target in FLOORS:
        text = text.replace("127.0.0.1 0 ", "127.0.0.1 PORT ")
    elif target.startswith("node-"):
        text = text.replace(" 0 ", " PORT ")
        text = f"NODE_CLUSTER_SCHED_POLICY={target.removeprefix('node-')} {text}"
    elif target == "uvicorn":
        text = f"PYTHONPATH=. {text.replace('--port 0 ', '--port PORT ')}"
    elif target in PYTHON_PEERS:
        text = f"PYTHONPATH=. {text}"
    return text.replace(str(HERE.parent) + "/", "")


def http_get(port: int, path: str = "/", timeout: float = 1.0) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    status = int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/") else 0
    return status, data.partition(b"\r\n\r\n")[2]


@dataclass
class Server:
    target: str
    port: int
    workers: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    known: dict[int, int | None] = field(default_factory=dict)  # pid -> start time
    stop_seconds: float = 0.0
    sigkilled: bool = False
    seen_pids: set[int] = field(default_factory=set)
    log_level: str = "warning"
    dispatch_args: tuple[str, ...] = ()
    health_port: int | None = None  # dispatch started with --health 127.0.0.1:health_port

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, boot_timeout: float) -> None:
        cmd, env = server_command(self.target, self.port, self.workers, self.log_level, self.dispatch_args)
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, env=env, stdin=subprocess.DEVNULL, stderr=self.log_file,
            stdout=subprocess.PIPE if self.target in FLOORS else self.log_file,
        )
        self.known[self.proc.pid] = start_time(self.proc.pid)
        deadline = time.monotonic() + boot_timeout
        if self.target in FLOORS:
            line = self.read_line(deadline)
            if not line.startswith("ready"):
                raise RuntimeError(f"floor server did not start: {line!r}")
            return
        # Ready = the expected workers exist and answer; try briefly to see each of them.
        ok = False
        seen_by = deadline
        while time.monotonic() < min(deadline, seen_by):
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.target} exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError, ValueError, IndexError):
                status, body = http_get(self.port)
                if status == 200:
                    if not ok:
                        ok, seen_by = True, time.monotonic() + 2.0
                    with contextlib.suppress(ValueError):
                        self.seen_pids.add(int(body.split()[-1]))
            self.remember_children()
            if ok and len(self.seen_pids) >= self.workers:
                break  # else keep trying up to 2 s: kernel balancing may favour one worker
            time.sleep(0.05)
        if not ok:
            raise RuntimeError(f"{self.target} did not answer within {boot_timeout}s; see {self.log_path}")

    def remember_children(self) -> list[int]:
        kids = children(self.pid)
        for kid in kids:
            self.known.setdefault(kid, start_time(kid))
        return kids

    def read_line(self, deadline: float) -> str:
        """One line of the floor server's stdout, waiting at most until ``deadline``."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError(f"no line from {self.target} in time (got {line!r})")
            byte = os.read(fd, 1)
            if not byte:
                raise RuntimeError(f"{self.target} closed its stdout (got {line!r})")
            line += byte
        return line.decode().strip()

    def worker_connections(self) -> dict[int, int] | None:
        """pid -> connections_total of each worker, from the health endpoint (dispatch only)."""
        if self.health_port is None:
            return None
        url = f"http://127.0.0.1:{self.health_port}/cluster-health"
        with urllib.request.urlopen(url, timeout=5) as resp:  # noqa: S310 - 127.0.0.1, our port
            doc = json.load(resp)
        return {w["pid"]: int(w["connections_total"]) for w in doc["workers"]}

    def accepted(self) -> int:
        """The floor server's own count of accepted connections."""
        os.kill(self.pid, signal.SIGUSR1)
        line = self.read_line(time.monotonic() + 5)
        return int(line.split()[1])

    def stop(self, deadline_s: float) -> None:
        """SIGTERM, then SIGKILL after ``deadline_s``; then any leftover child, by pid."""
        if self.proc is None:
            return
        with contextlib.suppress(OSError):
            self.remember_children()
        t0 = time.monotonic()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                self.sigkilled = True
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
        self.stop_seconds = time.monotonic() - t0
        # Workers die with the primary (PDEATHSIG / IPC EOF); make sure, by pid and start time.
        for pid, started in self.known.items():
            if pid == self.proc.pid:
                continue
            until = time.monotonic() + 2
            while start_time(pid) == started and started is not None and time.monotonic() < until:
                time.sleep(0.02)
            if start_time(pid) == started and started is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log_file.close()


# ====================================================================== wrk
@dataclass
class Wrk:
    cmd: list[str]
    proc: subprocess.Popen[str]


def wrk_command(port: int, workload: str, connections: int, threads: int, duration: int,
                scripts: dict[str, Path], probe: bool = False) -> list[str]:
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
           "--timeout", "2s"]
    if workload in ("tiny", *MIXED_WORKLOADS):
        cmd += ["-H", "Connection: close"]
    script = scripts[workload] if workload in MIXED_WORKLOADS and not probe else scripts["done"]
    cmd += ["-s", str(script), f"http://127.0.0.1:{port}/"]
    return cmd


def start_wrk(cmd: list[str]) -> Wrk:
    return Wrk(cmd, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, text=True))


def finish_wrk(w: Wrk, timeout: float) -> dict[str, Any]:
    try:
        out, _ = w.proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        w.proc.kill()
        out, _ = w.proc.communicate(timeout=5)
        raise RuntimeError(f"wrk did not finish in {timeout}s: {shlex.join(w.cmd)}") from None
    for line in out.splitlines():
        if line.startswith("BENCHJSON "):
            return json.loads(line[len("BENCHJSON ") :])
    raise RuntimeError(f"wrk printed no result ({w.proc.returncode}): {out[-500:]}")


# ====================================================================== one run
def count_log(path: Path, offset: int) -> tuple[int, dict[str, int]]:
    """Lines the server logged since ``offset``: totals of the ones worth knowing."""
    with open(path, "rb") as f:
        f.seek(offset)
        text = f.read().decode(errors="replace")
    counts = {
        "log_lines": text.count("\n"),
        "log_task_destroyed": text.count("Task was destroyed but it is pending"),
        "log_tracebacks": text.count("Traceback (most recent call last)"),
    }
    return path.stat().st_size, counts


def trim_log(path: Path, head: int = 64 * 1024, tail: int = 32 * 1024) -> None:
    """Keep a server log small enough to keep: its start and end (counts are taken before)."""
    size = path.stat().st_size
    if size <= head + tail + 1024:
        return
    with open(path, "rb") as f:
        first = f.read(head)
        f.seek(size - tail)
        last = f.read()
    cut = size - len(first) - len(last)
    path.write_bytes(first + f"\n[... {cut} bytes cut by benchmarks/run.py ...]\n".encode() + last)


def measure(server: Server, workload: str, args: argparse.Namespace, scripts: dict[str, Path]) -> dict[str, Any]:
    duration = args.duration
    workers = server.remember_children() if server.target not in FLOORS else []
    before = {pid: cpu_ticks(pid) for pid in [server.pid, *workers]}
    offset = server.log_path.stat().st_size
    accepted0 = server.accepted() if server.target in FLOORS else 0
    conns0 = server.worker_connections()
    main_cmd = wrk_command(server.port, workload, args.connections, args.wrk_threads, duration, scripts)
    probe_cmd = None
    t0 = time.monotonic()
    with MemorySampler(server.pid, with_workers=server.target not in FLOORS) as memory:
        main = start_wrk(main_cmd)
        probe = None
        try:
            if workload in MIXED_WORKLOADS:
                probe_cmd = wrk_command(server.port, "tiny", PROBE_CONNECTIONS, 1, duration, scripts, probe=True)
                probe = start_wrk(probe_cmd)
            result = finish_wrk(main, duration + 30)
            probe_result = finish_wrk(probe, duration + 30) if probe else None
        finally:
            for w in (main, probe):
                if w is not None and w.proc.poll() is None:
                    w.proc.kill()
                    w.proc.wait(timeout=5)
    wall = time.monotonic() - t0
    accepted1 = server.accepted() if server.target in FLOORS else 0
    after = {pid: cpu_ticks(pid) for pid in before}
    conn_share = None
    if conns0 is not None:
        if server.target in ("reuseport", "shared"):
            time.sleep(HEALTH_SETTLE_S)  # the workers' own counts arrive with their next heartbeat
        conns1 = server.worker_connections() or {}
        conn_share = [conns1[pid] - conns0[pid] for pid in sorted(conns0) if pid in conns1]
    _, logs = count_log(server.log_path, offset)

    def delta(pid: int) -> float:
        b, a = before.get(pid), after.get(pid)
        return (a - b) / CLK_TCK if a is not None and b is not None else float("nan")

    secs = result["duration_us"] / 1e6
    completed = result["requests"]
    if server.target in FLOORS:
        completed = accepted1 - accepted0  # the server's own counter: wrk sees only errors
        secs = wall
    primary_cpu = delta(server.pid)
    worker_cpu = [delta(pid) for pid in workers]
    rec: dict[str, Any] = {
        "target": server.target,
        "workload": workload,
        "wrk": shlex.join(main_cmd),
        "completed": completed,
        "rate": completed / secs if secs else 0.0,
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "max_ms": result["max_us"] / 1000,
        "non2xx": result["status"],
        "socket_errors": result["connect"] + result["read"] + result["write"] + result["timeout"],
        "errors_detail": {k: result[k] for k in ("connect", "read", "write", "timeout")},
        "wrk_requests": result["requests"],
        "primary_cpu_s": primary_cpu,
        "worker_cpu_s": worker_cpu,
        "primary_cpu_us_per": primary_cpu / completed * 1e6 if completed else None,
        "server_cpu_us_per": (primary_cpu + sum(worker_cpu)) / completed * 1e6 if completed else None,
        "jain_worker_cpu": jain(worker_cpu),
        "worker_connections": conn_share,
        "jain_connections": jain(conn_share) if conn_share else None,
        "primary_peak_mib": memory.primary_peak / 2**20 if memory.primary_peak else None,
        "workers_peak_mib": memory.workers_peak / 2**20 if memory.workers_peak else None,
        "memory_samples": memory.samples,
        **logs,
    }
    if conn_share and sum(conn_share) > 0:
        # Sorted largest first: which worker is "first" changes between runs.
        for i, share in enumerate(sorted(conn_share, reverse=True)):
            rec[f"conn_share_{i}"] = 100 * share / sum(conn_share)
    if server.target in FLOORS:
        rec["p50_ms"] = rec["p99_ms"] = rec["max_ms"] = None  # latency of a reset means nothing
    if probe_result is not None:
        rec["probe"] = shlex.join(probe_cmd or [])
        rec["fast_p50_ms"] = probe_result["p50_us"] / 1000
        rec["fast_p99_ms"] = probe_result["p99_us"] / 1000
        rec["fast_max_ms"] = probe_result["max_us"] / 1000
        rec["fast_rate"] = probe_result["requests"] / (probe_result["duration_us"] / 1e6)
        rec["probe_errors"] = (probe_result["status"] + probe_result["connect"] + probe_result["read"]
                               + probe_result["write"] + probe_result["timeout"])
    return rec


def warm_up(server: Server, seconds: int, scripts: dict[str, Path]) -> None:
    if seconds <= 0 or server.target in FLOORS:
        return
    cmd = wrk_command(server.port, "keepalive", 16, 1, seconds, scripts)
    finish_wrk(start_wrk(cmd), seconds + 30)


# ====================================================================== report
def machine_info() -> dict[str, str]:
    model = "unknown"
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break

    def run(cmd: list[str]) -> str:
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return "unavailable"
        return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"

    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "wrk": run(["wrk", "--version"]),
        "node": run(["node", "--version"]) if shutil.which("node") else "not found",
        "dispatch_commit": source_version(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def source_version() -> str:
    """The commit the servers import (dispatch is installed editable), '+dirty' if src/ differs."""
    try:
        head = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"],
                              capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "src"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return (head or "unknown") + ("+dirty" if dirty else "")


def summarize(values: list[float | None]) -> dict[str, float] | None:
    got = [v for v in values if v is not None and v == v]
    if not got:
        return None
    return {"median": statistics.median(got), "min": min(got), "max": max(got), "n": len(got)}


def fmt(s: dict[str, float] | None, digits: int = 0, unit: str = "") -> str:
    if s is None:
        return "–"

    def f(v: float) -> str:
        return f"{v:,.{digits}f}"

    if s["n"] == 1 or f(s["min"]) == f(s["max"]):
        return f"{f(s['median'])}{unit}"
    return f"{f(s['median'])}{unit} ({f(s['min'])}–{f(s['max'])})"


def build_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    keys = ["rate", "p50_ms", "p99_ms", "max_ms", "non2xx", "socket_errors", "primary_cpu_us_per",
            "server_cpu_us_per", "jain_worker_cpu", "jain_connections", "primary_peak_mib",
            "workers_peak_mib", "fast_p50_ms", "fast_p99_ms", "fast_max_ms", "fast_rate",
            "probe_errors", "log_task_destroyed"]
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for rec in records:
        if "error" in rec:
            continue
        out.setdefault(rec["workload"], {}).setdefault(rec["target"], {"runs": []})["runs"].append(rec)
    for by_target in out.values():
        for entry in by_target.values():
            runs = entry.pop("runs")
            for key in keys:
                entry[key] = summarize([r.get(key) for r in runs])
            shares = sorted({k for r in runs for k in r if k.startswith("conn_share_")})
            entry["conn_share_pct"] = [summarize([r.get(k) for r in runs]) for k in shares] or None
            entry["stops_sigkilled"] = sum(1 for r in runs if r.get("server_sigkilled"))
    return out


def markdown(summary: dict[str, Any], records: list[dict[str, Any]], machine: dict[str, str],
             args: argparse.Namespace, commands: dict[str, str]) -> str:
    lines = ["# dispatch benchmarks", ""]
    lines += [f"- machine: {machine['nproc']} CPUs, {machine['cpu']}, Linux {machine['kernel']}, "
              f"Python {machine['python']}, {machine['wrk']}, node {machine['node']}",
              f"- dispatch source: commit {machine['dispatch_commit']} at the start, "
              f"{machine.get('dispatch_commit_at_end', '?')} at the end"
              + (" (**src/ changed during the run**: later servers imported newer code)"
                 if machine.get("dispatch_commit_at_end", machine["dispatch_commit"]) != machine["dispatch_commit"]
                 else "") + f"; started {machine['date']}",
              f"- {args.rounds} round(s) × {args.duration:g}s per run, {args.connections} wrk connections, "
              f"{args.wrk_threads} wrk thread(s), {args.workers} workers; targets interleaved every round",
              "- cells: median over rounds (min–max). Load generator and servers share the same "
              f"{machine['nproc']} CPUs.", ""]
    floors = {f: summary.get("tiny", {}).get(f, {}).get("primary_cpu_us_per") for f in FLOORS}
    accepting = ("round-robin", "least-connections", "node-rr")  # the primary accepts
    titles = {
        "tiny": "## tiny: a new connection per request (`Connection: close`)",
        "keepalive": "## keepalive: tiny request, keep-alive connections",
        "mixed": f"## mixed: new connection per request, {SLOW_SHARE:.0%} of them `{SLOW_PATH}`",
        "slowio": f"## slowio: new connection per request, {SLOWIO_SHARE:.0%} of them `{SLOWIO_PATH}` "
                  "(sleeping, not burning)",
    }
    for workload in WORKLOADS:
        by_target = summary.get(workload)
        if not by_target:
            continue
        lines += [titles[workload], ""]
        rate = "conn/s" if workload != "keepalive" else "req/s"
        per = "conn" if workload != "keepalive" else "req"
        head = ["target", rate, "p50 ms", "p99 ms", "max ms"]
        if workload in MIXED_WORKLOADS:
            head += ["fast-only p50 ms", "fast-only p99 ms"]
        head += ["non-2xx", "socket errors", f"primary CPU µs/{per}"]
        if workload == "tiny":
            head += [f"÷ {f}" for f in FLOORS if floors[f]]
        head += [f"server CPU µs/{per}", "Jain (worker CPU)", "Jain (connections)", "worker share of conns %",
                 "primary peak MiB", "workers peak MiB (sum)", "tasks destroyed (log)"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for target in [t for t in ALL_TARGETS if t in by_target]:
            e = by_target[target]
            name = target + (" ²" if target == "gunicorn-sync" and workload == "keepalive" else "")
            row = [name, fmt(e["rate"]), fmt(e["p50_ms"], 2), fmt(e["p99_ms"], 2), fmt(e["max_ms"], 1)]
            if workload in MIXED_WORKLOADS:
                row += [fmt(e["fast_p50_ms"], 2), fmt(e["fast_p99_ms"], 2)]
            cpu = fmt(e["primary_cpu_us_per"], 1 if workload != "keepalive" else 2)
            if target in ("reuseport", "shared", "node-none"):
                cpu += " ¹"
            row += [fmt(e["non2xx"]), fmt(e["socket_errors"]), cpu]
            if workload == "tiny":
                p = e["primary_cpu_us_per"]
                for f in FLOORS:
                    floor = floors[f]
                    if floor:
                        ok = p and floor["median"] and (target in accepting or target == f)
                        row += [f"{p['median'] / floor['median']:.2f}×" if ok else "–"]
            destroyed = fmt(e["log_task_destroyed"]) if target in DISPATCH_MODES else "–"
            share = " / ".join(fmt(x) for x in e["conn_share_pct"]) if e.get("conn_share_pct") else "–"
            row += [fmt(e["server_cpu_us_per"], 1), fmt(e["jain_worker_cpu"], 3), fmt(e["jain_connections"], 3),
                    share, fmt(e["primary_peak_mib"], 1), fmt(e["workers_peak_mib"], 1), destroyed]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    lines += [
        "¹ kernel balancing: the primary (Node's primary for node-none) accepts nothing; the number "
        "is its idle housekeeping divided by the connections the workers served.",
        "",
        "² gunicorn's sync workers close the connection after every response (`Connection: close`), "
        "so its keepalive run is in fact a new connection per request, like tiny.",
        "",
        "Jain (connections), worker share of conns: dispatch modes only, from the connections_total "
        "of each worker in `/cluster-health` (`--health`) before and after the run; share = each "
        "worker's part, largest first (median per rank over rounds). User-space modes count what the "
        "primary passed, kernel modes what each worker reported in its heartbeat. The other servers "
        "do not expose it. Memory: VmRSS from /proc every "
        f"{MEMORY_SAMPLE_S:g} s during the run; workers = the peak over samples of their sum. "
        "max ms: wrk's largest latency of the run (one request: noisy).",
        "",
        "Floors: `benchmarks/peers/accept_close.py`, a plain Python epoll loop around "
        "`dispatch._fdpass.accept_batch`; floor-pass then passes each batch with `send_fds(close_sent=True)` "
        "to a sink process that closes them (the primary's syscalls, no policy or bookkeeping), "
        "floor-close closes them itself (so it also pays the TCP reset teardown a primary leaves to "
        "its workers). Their conn/s and CPU/conn come from their own accept counter (wrk only sees "
        "resets; the socket-error column is wrk's view of those). They run at a higher rate than the "
        "real servers, so their batches are larger: the ÷ floor ratios favour the floors.",
        "",
        "tasks destroyed (log): lines `Task was destroyed but it is pending!` the dispatch server "
        "logged during the run (a worker bug fixed in 3cb8581; should be 0).",
        "",
    ]
    rr = summary.get("tiny", {}).get("round-robin", {}).get("rate")
    node = summary.get("tiny", {}).get("node-rr", {}).get("rate")
    if rr and node:
        lines += [f"**tiny, round-robin ÷ node-rr conn/s: {rr['median'] / node['median']:.2f}×** "
                  "(issue target: ≥ 3×)", ""]
    failed = [r for r in records if "error" in r]
    stops: dict[str, dict[tuple[int, int], dict[str, Any]]] = {}
    for r in records:
        if "server_stop_s" in r:
            stops.setdefault(r["target"], {})[(r["round"], r["port"])] = r
    if stops:
        lines += [f"Shutdown after the runs: seconds from SIGTERM to exit (SIGKILL at {args.stop_timeout:g}s):", "",
                  "| target | SIGTERM → exit s | SIGKILLed |", "|---|---|---|"]
        for target in [t for t in ALL_TARGETS if t in stops]:
            servers = list(stops[target].values())
            lines.append(f"| {target} | {fmt(summarize([r['server_stop_s'] for r in servers]), 2)} | "
                         f"{sum(1 for r in servers if r['server_sigkilled'])} of {len(servers)} |")
        lines.append("")
    if failed:
        lines += ["Failed runs:", ""] + [f"- {r['target']} {r['workload']} round {r['round']}: {r['error']}"
                                         for r in failed] + [""]
    lines += ["## Exact commands", "", "Servers (PORT = a free port picked per server start):", ""]
    lines += [f"- {t}: `{c}`" for t, c in commands.items()]
    lines += ["", "Load (wrk; `done.lua` prints exact counters and percentiles, `mixed.lua` and "
              "`slowio.lua` also pick the path per request; all are written next to results.json):", ""]
    seen: set[str] = set()
    for r in records:
        for key in ("wrk", "probe"):
            cmd = r.get(key)
            if cmd:
                generic = cmd.replace(f"127.0.0.1:{r['port']}", "127.0.0.1:PORT")
                if generic not in seen:
                    seen.add(generic)
                    lines.append(f"- {r['workload']}{' (fast-only probe, concurrent)' if key == 'probe' else ''}: `{generic}`")
    lines += ["", f"Run: `{args.invocation}`", ""]
    return "\n".join(lines)


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


# ====================================================================== main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="1 round of 2 s runs (about two minutes)")
    p.add_argument("--duration", type=int, help="seconds per wrk run (default 8; 2 with --quick)")
    p.add_argument("--rounds", type=int, help="rounds over all targets (default 3; 1 with --quick)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default %(default)s)")
    p.add_argument("--wrk-threads", type=int, default=1,
                   help="wrk threads (default %(default)s: leave the 2 cores to the servers)")
    p.add_argument("--workers", type=int, default=2, help="worker processes per server (default %(default)s)")
    p.add_argument("--modes", default=",".join(ALL_TARGETS),
                   help=f"comma-separated targets among {','.join(ALL_TARGETS)} (default: all)")
    p.add_argument("--workloads", default=",".join(WORKLOADS),
                   help=f"comma-separated among {','.join(WORKLOADS + FAILURE_WORKLOADS)} (default: "
                        f"{','.join(WORKLOADS)}; failure and restart run benchmarks/failures.py afterwards)")
    p.add_argument("--warmup", type=int, default=1,
                   help="whole seconds of keep-alive load after each start; 0 = none (default %(default)s)")
    p.add_argument("--stop-timeout", type=float,
                   help="seconds between SIGTERM and SIGKILL (default 5; 2 with --quick)")
    p.add_argument("--out", type=Path, default=HERE / "results", help="output folder (default %(default)s)")
    args = p.parse_args(argv)
    args.duration = args.duration or (2 if args.quick else 8)  # wrk takes whole seconds
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.stop_timeout = args.stop_timeout if args.stop_timeout is not None else (2.0 if args.quick else 5.0)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    for m in args.modes:
        if m not in ALL_TARGETS:
            p.error(f"unknown mode {m!r}; choose among {', '.join(ALL_TARGETS)}")
    for w in args.workloads:
        if w not in WORKLOADS + FAILURE_WORKLOADS:
            p.error(f"unknown workload {w!r}; choose among {', '.join(WORKLOADS + FAILURE_WORKLOADS)}")
    args.failure_workloads = [w for w in args.workloads if w in FAILURE_WORKLOADS]
    args.workloads = [w for w in args.workloads if w in WORKLOADS]
    args.invocation = shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    return args


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # A shell's background job starts with SIGINT ignored; make TERM, INT and HUP all clean up.
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _exit_on_signal)
    code = compare(args) if args.workloads else 0
    if code == 0 and args.failure_workloads:
        code = run_failures(args)
    return code


def run_failures(args: argparse.Namespace) -> int:
    """failures.py's scenarios with this run's settings (their own run length: 30 s, 10 s quick)."""
    import failures  # benchmarks/ is sys.path[0] when this file runs as a script

    modes = [m for m in args.modes if m in failures.ALL_TARGETS]
    if not modes:
        log(f"failure/restart: none of the modes run them ({', '.join(failures.ALL_TARGETS)})")
        return 2
    argv = ["--scenarios", ",".join(args.failure_workloads), "--modes", ",".join(modes),
            "--connections", str(args.connections), "--wrk-threads", str(args.wrk_threads),
            "--workers", str(args.workers), "--warmup", str(args.warmup), "--out", str(args.out)]
    fargs = failures.parse_args(argv + (["--quick"] if args.quick else []))
    fargs.invocation = args.invocation
    return failures.run(fargs)


def compare(args: argparse.Namespace) -> int:
    """The mode and peer comparison: tiny, keepalive, mixed, slowio."""
    if shutil.which("wrk") is None:
        log("wrk not found (Debian package 'wrk')")
        return 2
    if shutil.which("node") is None and any(m.startswith("node-") for m in args.modes):
        log("node not found: skipping the Node.js cluster peers")
        args.modes = [m for m in args.modes if not m.startswith("node-")]
    for target, module in PYTHON_PEERS.items():
        if target in args.modes and importlib.util.find_spec(module) is None:
            log(f"{module} not importable (pip install {module}): skipping {target}")
            args.modes.remove(target)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    scripts = {"done": out / "done.lua", "mixed": out / "mixed.lua", "slowio": out / "slowio.lua"}
    scripts["done"].write_text(DONE_LUA)
    scripts["mixed"].write_text(MIXED_LUA)
    scripts["slowio"].write_text(SLOWIO_LUA)
    machine = machine_info()
    health = ("--health", "127.0.0.1:HPORT")
    commands = {t: display_command(t, args.workers, dispatch_args=health if t in DISPATCH_MODES else ())
                for t in args.modes}
    records: list[dict[str, Any]] = []
    total = sum(len([w for w in args.workloads if t not in FLOORS or w in FLOOR_WORKLOADS])
                for t in args.modes) * args.rounds
    done_runs = 0
    started = time.monotonic()
    for rnd in range(1, args.rounds + 1):
        for target in args.modes:
            workloads = [w for w in args.workloads if target not in FLOORS or w in FLOOR_WORKLOADS]
            if not workloads:
                continue
            server = Server(target, free_port(), args.workers, out / "logs" / f"{target}.r{rnd}.log")
            if target in DISPATCH_MODES:  # per-worker connection counts come from /cluster-health
                server.health_port = free_port()
                server.dispatch_args = ("--health", f"127.0.0.1:{server.health_port}")
            mine: list[dict[str, Any]] = []
            try:
                server.start(boot_timeout=20)
                warm_up(server, args.warmup, scripts)
                for workload in workloads:
                    done_runs += 1
                    try:
                        rec = measure(server, workload, args, scripts)
                    except (RuntimeError, OSError, TimeoutError, json.JSONDecodeError) as exc:
                        rec = {"target": target, "workload": workload, "error": str(exc)}
                    rec.update(round=rnd, port=server.port)
                    mine.append(rec)
                    records.append(rec)
                    if "error" in rec:
                        log(f"[{done_runs}/{total}] round {rnd} {target:<17} {workload:<9} FAILED: {rec['error']}")
                    else:
                        p99 = f"{rec['p99_ms']:.2f}" if rec["p99_ms"] is not None else "-"
                        cpu = rec["primary_cpu_us_per"]
                        log(f"[{done_runs}/{total}] round {rnd} {target:<17} {workload:<9} "
                            f"{rec['rate']:>9,.0f}/s p99 {p99:>6} ms  errors {rec['non2xx']}+{rec['socket_errors']}"
                            f"  primary {cpu if cpu is None else round(cpu, 1)} µs/op"
                            + (f"  fast p99 {rec['fast_p99_ms']:.2f} ms" if "fast_p99_ms" in rec else ""))
            except (RuntimeError, OSError, TimeoutError) as exc:
                log(f"round {rnd} {target}: server failed: {exc}")
                records.append({"target": target, "workload": "*", "round": rnd, "error": str(exc)})
            finally:
                server.stop(args.stop_timeout)
                trim_log(server.log_path)
                for rec in mine:
                    rec["server_stop_s"] = round(server.stop_seconds, 3)
                    rec["server_sigkilled"] = server.sigkilled
                if server.sigkilled:
                    log(f"round {rnd} {target}: did not exit within {args.stop_timeout:g}s of SIGTERM; killed")
    machine["dispatch_commit_at_end"] = source_version()
    summary = build_summary(records)
    text = markdown(summary, records, machine, args, commands)
    print(text)
    (out / "results.md").write_text(text)
    with open(out / "results.json", "w") as f:
        json.dump({"machine": machine, "args": {k: (str(v) if isinstance(v, Path) else v)
                                                for k, v in vars(args).items()},
                   "commands": commands, "summary": summary, "runs": records}, f, indent=1)
    plotted = plot(summary, out / "results.png")
    log(f"done in {time.monotonic() - started:.0f}s: {out / 'results.md'}, {out / 'results.json'}"
        + (f", {out / 'results.png'}" if plotted else " (matplotlib not importable: no plot)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

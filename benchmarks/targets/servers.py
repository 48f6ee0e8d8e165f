"""The comparison's servers: dispatch in each balance mode and the peers a user would pick
instead, each started on a free 127.0.0.1 port and stopped by pid (SIGTERM, then SIGKILL
after a deadline, then any worker left behind, by pid and start time)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.measurement.probes import http_get
from benchmarks.measurement.proc import children, start_time
from benchmarks.paths import PEERS, ROOT

DISPATCH_MODES = ["round-robin", "least-connections", "pull", "reuseport", "shared"]
PEER_TARGETS = ["node-rr", "node-none", "gunicorn-sync", "uvicorn", "floor-pass", "floor-close"]
FLOORS = ("floor-pass", "floor-close")
# target -> the module run with ``python -m``, on benchmarks.peers.python_apps (repo root on PYTHONPATH)
PYTHON_PEERS = {"gunicorn-sync": "gunicorn", "uvicorn": "uvicorn"}
ALL_TARGETS = DISPATCH_MODES + PEER_TARGETS
WORKER_PID = re.compile(rb"pid\W+(\d+)")  # the answering worker's pid in a response body


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(target: str, port: int, workers: int, log_level: str = "warning",
                   dispatch_args: tuple[str, ...] = (), app: str = "dispatch.demo:app",
                   ) -> tuple[list[str], dict[str, str]]:
    """The command line of one target; ``log_level``, ``dispatch_args`` and ``app`` apply to
    dispatch only."""
    env = dict(os.environ)
    if target in DISPATCH_MODES:
        cmd = [sys.executable, "-m", "dispatch", app, "--workers", str(workers),
               "--bind", f"127.0.0.1:{port}", "--balance", target, "--log-level", log_level,
               *dispatch_args]
    elif target in ("node-rr", "node-none"):
        env["NODE_CLUSTER_SCHED_POLICY"] = target.removeprefix("node-")
        cmd = ["node", str(PEERS / "node_cluster.js"), str(port), str(workers)]
    elif target in FLOORS:
        cmd = [sys.executable, str(PEERS / "accept_close.py"), "127.0.0.1", str(port),
               target.removeprefix("floor-")]
    elif target == "gunicorn-sync":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "gunicorn", "--workers", str(workers), "--worker-class", "sync",
               "--bind", f"127.0.0.1:{port}", "--log-level", "warning", "benchmarks.peers.python_apps:wsgi"]
    elif target == "uvicorn":
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "uvicorn", "--workers", str(workers), "--host", "127.0.0.1",
               "--port", str(port), "--log-level", "warning", "benchmarks.peers.python_apps:asgi"]
    else:
        raise ValueError(f"unknown target {target!r}")
    return cmd, env


def display_command(target: str, workers: int, log_level: str = "warning",
                    dispatch_args: tuple[str, ...] = (), app: str = "dispatch.demo:app") -> str:
    """The command of ``target`` as the reports show it: PORT for the port, paths from the repo."""
    cmd, _ = server_command(target, 0, workers, log_level, dispatch_args, app)
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
    return text.replace(str(ROOT) + "/", "")


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
    app: str = "dispatch.demo:app"  # what dispatch serves
    answers: bool = True  # False: the app answers nothing; ready = /readyz on the health port

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> tuple[list[str], dict[str, str]]:
        """The command line and environment this server starts with."""
        return server_command(self.target, self.port, self.workers, self.log_level, self.dispatch_args,
                              self.app)

    def start(self, boot_timeout: float) -> None:
        cmd, env = self.command()
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
        if not self.answers:
            self.wait_ready_probe(deadline)
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
                    pid = WORKER_PID.search(body)  # "... pid N" or JSON '..."pid":N}'
                    if pid:
                        self.seen_pids.add(int(pid.group(1)))
            self.remember_children()
            if ok and len(self.seen_pids) >= self.workers:
                break  # else keep trying up to 2 s: kernel balancing may favour one worker
            time.sleep(0.05)
        if not ok:
            raise RuntimeError(f"{self.target} did not answer within {boot_timeout}s; see {self.log_path}")

    def wait_ready_probe(self, deadline: float) -> None:
        """Until ``/readyz`` on the health port says 200 (every worker ready is not needed)."""
        assert self.proc is not None and self.health_port is not None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.target} exited with {self.proc.returncode}; see {self.log_path}")
            with contextlib.suppress(OSError), urllib.request.urlopen(  # noqa: S310 - 127.0.0.1, our port
                    f"http://127.0.0.1:{self.health_port}/readyz", timeout=2) as resp:
                if resp.status == 200 and len(self.remember_children()) >= self.workers:
                    return
            time.sleep(0.05)
        raise RuntimeError(f"{self.target} was not ready in time; see {self.log_path}")

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
        kill_leftovers({pid: s for pid, s in self.known.items() if pid != self.proc.pid})
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log_file.close()


def kill_leftovers(known: dict[int, int | None]) -> None:
    """SIGKILL each pid still running with the start time it had, after up to 2 s to exit."""
    for pid, started in known.items():
        until = time.monotonic() + 2
        while started is not None and start_time(pid) == started and time.monotonic() < until:
            time.sleep(0.02)  # workers die with the primary; give them a moment
        if started is not None and start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def soak_command(port: int, health_port: int, workers: int) -> list[str]:
    """The restart soak's server: the demo app, default balance mode, with its health port."""
    return [sys.executable, "-m", "dispatch", "dispatch.demo:app", "--workers", str(workers),
            "--bind", f"127.0.0.1:{port}", "--health", f"127.0.0.1:{health_port}", "--log-level", "info"]

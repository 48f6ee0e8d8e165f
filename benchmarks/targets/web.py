"""The web comparison's servers: the same Starlette (ASGI) or Flask (WSGI) app from
``benchmarks/peers/web_apps.py`` under dispatch and under the app servers a user would pick
instead. Same loop and parser wherever the server lets us choose (uvloop + httptools); the
same number of worker processes, and for WSGI the same number of threads per worker."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from benchmarks.measurement.logs import log_text
from benchmarks.paths import ROOT
from benchmarks.targets.servers import Server, free_port

ASGI_APP = "benchmarks.peers.web_apps:starlette_app"
WSGI_APP = "benchmarks.peers.web_apps:flask_app"
ASGI_TARGETS = ["dispatch-rr", "dispatch-lc", "uvicorn-workers", "gunicorn-uvicorn", "granian-asgi"]
WSGI_TARGETS = ["dispatch-wsgi", "gunicorn-gthread", "granian-wsgi"]
WEB_TARGETS = ASGI_TARGETS + WSGI_TARGETS
INTERFACE = {**dict.fromkeys(ASGI_TARGETS, "asgi"), **dict.fromkeys(WSGI_TARGETS, "wsgi")}
# What ratios are taken against, per interface.
BASELINE = {"asgi": "uvicorn-workers", "wsgi": "gunicorn-gthread"}
DISPATCH_BALANCE = {"dispatch-rr": "round-robin", "dispatch-lc": "least-connections",
                    "dispatch-wsgi": "round-robin"}
# target -> the modules it needs in this Python (a target whose module is missing is skipped)
NEEDS = {
    "dispatch-rr": ["starlette", "uvicorn"], "dispatch-lc": ["starlette", "uvicorn"],
    "uvicorn-workers": ["starlette", "uvicorn", "uvloop", "httptools"],
    "gunicorn-uvicorn": ["starlette", "gunicorn", "uvicorn_worker", "uvloop", "httptools"],
    "granian-asgi": ["starlette", "granian", "uvloop"],
    "dispatch-wsgi": ["flask", "a2wsgi"], "gunicorn-gthread": ["flask", "gunicorn"],
    "granian-wsgi": ["flask", "granian"],
}
DEFAULT_THREADS = 4  # WSGI: threads per worker, every WSGI target


@functools.lru_cache(maxsize=1)
def dispatch_flags() -> frozenset[str]:
    """The web flags the installed dispatch's CLI has (``--interface``, ``--loop``, ``--http``)."""
    try:
        out = subprocess.run([sys.executable, "-m", "dispatch", "--help"], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return frozenset()
    return frozenset(f for f in ("--interface", "--loop", "--http") if f in out)


def web_command(target: str, port: int, workers: int, threads: int,
                health_port: int | None = None) -> tuple[list[str], dict[str, str]]:
    """The command line of one web target, on 127.0.0.1:``port``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    wsgi = INTERFACE[target] == "wsgi"
    app = WSGI_APP if wsgi else ASGI_APP
    py = [sys.executable, "-m"]
    if target in DISPATCH_BALANCE:
        flags = dispatch_flags()
        cmd = [*py, "dispatch", app, "--workers", str(workers), "--bind", f"127.0.0.1:{port}",
               "--balance", DISPATCH_BALANCE[target], "--log-level", "warning"]
        if "--interface" in flags:
            cmd += ["--interface", INTERFACE[target]]
        cmd += ["--threads", str(threads)] if wsgi else []
        cmd += ["--loop", "uvloop"] if "--loop" in flags else []
        cmd += ["--http", "httptools"] if "--http" in flags else []
        if health_port is not None:
            cmd += ["--health", f"127.0.0.1:{health_port}"]
    elif target == "uvicorn-workers":
        cmd = [*py, "uvicorn", "--workers", str(workers), "--host", "127.0.0.1", "--port", str(port),
               "--loop", "uvloop", "--http", "httptools", "--log-level", "warning", "--no-access-log", app]
    elif target in ("gunicorn-uvicorn", "gunicorn-gthread"):
        worker_class = ["uvicorn_worker.UvicornWorker"] if not wsgi else ["gthread", "--threads", str(threads)]
        cmd = [*py, "gunicorn", "--workers", str(workers), "--worker-class", *worker_class,
               "--bind", f"127.0.0.1:{port}", "--log-level", "warning", app]
    elif target in ("granian-asgi", "granian-wsgi"):
        per_worker = ["--blocking-threads", str(threads)] if wsgi else ["--loop", "uvloop"]
        cmd = [*py, "granian", "--interface", INTERFACE[target], "--workers", str(workers),
               *per_worker, "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning",
               "--no-access-log", app]
    else:
        raise ValueError(f"unknown web target {target!r}")
    return cmd, env


def display_web_command(target: str, workers: int, threads: int) -> str:
    """The command as the reports show it: PORT and HPORT for the ports, paths from the repo."""
    hport = 1 if target in DISPATCH_BALANCE else None
    cmd, _ = web_command(target, 0, workers, threads, hport)
    text = shlex.join(["python" if c == sys.executable else c for c in cmd])
    text = text.replace("127.0.0.1:0 ", "127.0.0.1:PORT ").replace("--port 0 ", "--port PORT ")
    text = text.replace("127.0.0.1:1", "127.0.0.1:HPORT")
    return "PYTHONPATH=. " + text.replace(str(ROOT) + "/", "")


@dataclass
class WebServer(Server):
    """A web target: started like the comparison's servers, with the web command line."""

    threads: int = DEFAULT_THREADS

    def command(self) -> tuple[list[str], dict[str, str]]:
        return web_command(self.target, self.port, self.workers, self.threads, self.health_port)


def missing_modules(target: str) -> list[str]:
    return [m for m in NEEDS[target] if importlib.util.find_spec(m) is None]


def dispatch_cannot_serve(target: str, threads: int, log_path: Path) -> str | None:
    """Why the installed dispatch cannot serve ``target``'s app (one worker, one request), or
    None if it can: before dispatch had web support, it refused an ASGI or WSGI app."""
    server = WebServer(target, free_port(), 1, log_path, threads=threads)
    try:
        server.start(boot_timeout=20)
    except (RuntimeError, OSError, TimeoutError) as exc:
        lines: list[str] = []
        with contextlib.suppress(OSError):
            lines = log_text(log_path).strip().splitlines()
        errors = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b", line)]
        last = (errors or lines or [""])[-1][:200]
        return f"{exc}" + (f" ({last})" if last else "")
    finally:
        server.stop(5)
    return None

"""Rolling restarts of a web app under keep-alive load: how many requests fail?

    python benchmarks/web_restart.py [--workers 2] [--connections 64] [--restarts 3]

Serves the small Starlette JSON app below with ``python -m dispatch web_restart:app``,
drives it with ``wrk -c64`` on keep-alive connections (wrk never sends ``Connection:
close``; like a reverse proxy, it writes its next request as soon as it has read a
response), sends ``SIGUSR2`` three times, each once the previous rolling restart is over
(``/cluster-health``: every worker new and ready, the old ones gone), and prints wrk's
socket errors and non-2xx responses, for round-robin and least-connections. The target
is 0 and 0.

Standalone on purpose: it imports nothing else from ``benchmarks/``. Needs ``wrk`` and
``pip install -e '.[web]'`` plus starlette.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------ the app
def _make_app() -> Any:
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def hello(request: Any) -> JSONResponse:
        return JSONResponse({"hello": "world", "pid": os.getpid()})

    return Starlette(routes=[Route("/", hello)])


if __name__ != "__main__":  # imported by a dispatch worker as web_restart:app
    app = _make_app()


# ------------------------------------------------------------------ plumbing
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def cluster(health: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://{health}/cluster-health", timeout=5) as response:
        return json.loads(response.read())  # type: ignore[no-any-return]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def ready_pids(health: str, count: int, old: set[int]) -> set[int] | None:
    """The workers' pids once ``count`` are ready, none of ``old``, and ``old`` all gone."""
    try:
        workers = cluster(health)["workers"]
    except OSError:
        return None
    pids = {w["pid"] for w in workers}
    if len(workers) == count and all(w["state"] == "ready" for w in workers) and not pids & old \
            and not any(alive(pid) for pid in old):
        return pids
    return None


def parse_wrk(text: str) -> dict[str, Any]:
    """Requests, req/s, socket errors and non-2xx/3xx responses from wrk's summary."""
    found: dict[str, Any] = {"connect": 0, "read": 0, "write": 0, "timeout": 0, "non_2xx": 0}
    if m := re.search(r"(\d+) requests in ([\d.]+)(\w+)", text):
        found["requests"] = int(m.group(1))
    if m := re.search(r"Requests/sec:\s+([\d.]+)", text):
        found["rps"] = float(m.group(1))
    if m := re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text):
        found.update(zip(("connect", "read", "write", "timeout"), map(int, m.groups()), strict=True))
    if m := re.search(r"Non-2xx or 3xx responses: (\d+)", text):
        found["non_2xx"] = int(m.group(1))
    return found


# ------------------------------------------------------------------ one run
def run_mode(balance: str, args: argparse.Namespace) -> dict[str, Any]:
    port, health_port = free_port(), free_port()
    address, health = f"127.0.0.1:{port}", f"127.0.0.1:{health_port}"
    command = [sys.executable, "-m", "dispatch", "web_restart:app", "--workers", str(args.workers),
               "--bind", address, "--health", health, "--balance", balance,
               "--graceful-timeout", str(args.graceful_timeout), "--log-level", args.log_level]
    log_path = Path(f"/tmp/dispatch-web-restart-{balance}-{os.getpid()}.log")
    with open(log_path, "wb") as log:
        server = subprocess.Popen(command, cwd=HERE, stdout=log, stderr=subprocess.STDOUT)
    wrk: subprocess.Popen[str] | None = None
    try:
        pids = wait_for(lambda: ready_pids(health, args.workers, set()), 30, "workers ready")
        wrk = subprocess.Popen(["wrk", "-t1", f"-c{args.connections}", "-d600s", f"http://{address}/"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        time.sleep(args.settle)
        restart_seconds = []
        for _ in range(args.restarts):
            started = time.monotonic()
            server.send_signal(signal.SIGUSR2)
            old = pids
            pids = wait_for(lambda old=old: ready_pids(health, args.workers, old), 60, "a rolling restart")
            restart_seconds.append(time.monotonic() - started)
            time.sleep(args.settle)
        wrk.send_signal(signal.SIGINT)  # wrk prints its summary and exits
        output, _ = wrk.communicate(timeout=30)
    finally:
        if wrk is not None and wrk.poll() is None:
            wrk.kill()
            wrk.wait(5)
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)
    result = parse_wrk(output)
    result.update(balance=balance, restart_seconds=restart_seconds, wrk=output, log=str(log_path))
    return result


def machine() -> str:
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import uvicorn

    return (f"{os.cpu_count()} vCPUs ({model}), Linux {platform.release()}, Python "
            f"{platform.python_version()}, uvicorn {uvicorn.__version__}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--restarts", type=int, default=3)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds of load before and after each restart")
    parser.add_argument("--graceful-timeout", type=float, default=30.0)
    parser.add_argument("--balance", nargs="+", default=["round-robin", "least-connections"])
    parser.add_argument("--log-level", default="warning", help="the server's (its log: --verbose)")
    parser.add_argument("--verbose", action="store_true", help="print wrk's whole output and the server log's path")
    args = parser.parse_args()
    print(f"# {machine()}")
    print(f"# wrk -t1 -c{args.connections} (keep-alive), {args.workers} workers, "
          f"{args.restarts} rolling restarts (SIGUSR2), {args.settle:g}s of load around each\n")
    print("| balance | requests | req/s | socket errors: connect / read / write / timeout | non-2xx | restart took, s |")
    print("|---|---|---|---|---|---|")
    failed = False
    for balance in args.balance:
        r = run_mode(balance, args)
        errors = r["connect"] + r["read"] + r["write"] + r["timeout"]
        failed |= bool(errors or r["non_2xx"])
        took = ", ".join(f"{s:.1f}" for s in r["restart_seconds"])
        print(f"| {balance} | {r.get('requests', 0):,} | {r.get('rps', 0):,.0f} | "
              f"{r['connect']} / {r['read']} / {r['write']} / {r['timeout']} | {r['non_2xx']} | {took} |",
              flush=True)
        if args.verbose:
            print(r["wrk"], f"server log: {r['log']}", sep="\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

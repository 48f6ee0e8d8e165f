"""``dispatch ctl``: talk to a running primary over its control socket.

``ControlClient`` is the typed API (one method per command, each returning the
primary's reply); ``main`` is the command line on top of it:

    python -m dispatch ctl [--control PATH | --pidfile PATH] [--json] COMMAND

Exit codes: 0 when the action succeeded, 1 when the primary refused it or it
failed (an aborted rolling restart, an upgrade whose new primary did not become
ready), 2 for bad usage, 3 when the primary cannot be reached.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from typing import Any

from dispatch import ctl_protocol

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
ENV = "DISPATCH_CONTROL"  # the control socket's path when neither flag is given


class Unreachable(OSError):
    """The primary could not be asked: no socket there, not allowed, no answer in time."""


class ControlClient:
    """The commands of a primary's control socket as calls; each returns the reply
    (``reply["ok"]`` says whether it succeeded, ``reply["error"]`` why not) or raises
    ``Unreachable``."""

    def __init__(self, path: str, timeout: float = 300.0) -> None:
        self.path = path
        self.timeout = timeout  # how long the primary may take to finish a command

    def status(self) -> dict[str, Any]:
        return self.call("status")

    def reload(self) -> dict[str, Any]:
        """A rolling restart; answers when it is complete or aborted."""
        return self.call("reload", timeout=self.timeout)

    def scale(self, n: int | str) -> dict[str, Any]:
        """``n`` workers (``4``), or more or fewer (``"+2"``, ``"-1"``); answers once they are ready."""
        return self.call("scale", n=str(n), timeout=self.timeout)

    def stop(self, fast: bool = False) -> dict[str, Any]:
        return self.call("stop", fast=fast)

    def upgrade(self) -> dict[str, Any]:
        """A new primary from the same command line; answers once it serves, or why it does not."""
        return self.call("upgrade")

    def drain(self) -> dict[str, Any]:
        """Maintenance: ``/readyz`` says 503 (balancers stop sending) while serving on."""
        return self.call("drain")

    def undrain(self) -> dict[str, Any]:
        """End maintenance."""
        return self.call("undrain")

    def call(self, cmd: str, **args: Any) -> dict[str, Any]:
        """Send one request, read the one reply."""
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        except OSError as exc:
            raise Unreachable(exc.errno, f"cannot create a socket: {exc.strerror}") from None
        with sock:
            sock.settimeout(10)
            try:
                sock.connect(self.path)
                try:
                    sock.sendall(ctl_protocol.request(cmd, **args))
                except (BrokenPipeError, ConnectionResetError):
                    pass  # answered (refused, busy) and closed before reading: the answer is there
                sock.settimeout(self.timeout + 10)
                data = _read_line(sock)
            except OSError as exc:
                raise Unreachable(exc.errno, f"control socket {self.path}: {exc.strerror or exc}") from None
        try:
            return ctl_protocol.parse_reply(data)
        except ctl_protocol.ProtocolError as exc:
            raise Unreachable(0, f"control socket {self.path}: {exc}") from None


def _read_line(sock: socket.socket) -> bytes:
    data = bytearray()
    while b"\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            if not data:
                raise ConnectionResetError(0, "the primary closed the connection without answering")
            break
        data += chunk
        if len(data) > ctl_protocol.MAX_REPLY:
            raise OSError(0, "reply too long")
    return bytes(data).split(b"\n", 1)[0]


# ================================================================ the command line
def build_parser(prog: str = "python -m dispatch ctl") -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the primary's reply as JSON")
    parser = argparse.ArgumentParser(prog=prog, parents=[common],
                                     description="Control a running dispatch primary over its control socket.",
                                     epilog="Exit codes: 0 done, 1 refused or failed, 2 usage, 3 unreachable.")
    add_target_arguments(parser)
    parser.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS",
                        help="how long to wait for reload, scale and upgrade (default: 300)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    sub.add_parser("status", parents=[common], help="the workers, like pm2 ls")
    sub.add_parser("reload", parents=[common], help="rolling restart; waits for the outcome")
    scale = sub.add_parser("scale", parents=[common], help="N workers, or +N / -N more or fewer")
    scale.add_argument("n", metavar="N|+N|-N")
    stop = sub.add_parser("stop", parents=[common], help="graceful stop; waits until the primary is gone")
    stop.add_argument("--fast", action="store_true", help="do not drain: stop at once")
    sub.add_parser("upgrade", parents=[common], help="start a new primary with the code on disk and hand over")
    # Issue 15's fleet commands: sent as they are, so a primary that knows them answers.
    sub.add_parser("drain", parents=[common], help="maintenance: /readyz says 503 (balancers stop sending), keep serving")
    sub.add_parser("undrain", parents=[common], help="end maintenance: ready again")
    return parser


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--control", metavar="PATH", help=f"the control socket (default: ${ENV})")
    target.add_argument("--pidfile", metavar="PATH", help="the primary's pidfile: its control socket is beside it")


def control_path(args: argparse.Namespace) -> str | None:
    if args.control:
        return str(args.control)
    if args.pidfile:
        return ctl_protocol.default_path(args.pidfile)
    return os.environ.get(ENV) or None


def main(argv: list[str] | None = None, prog: str = "python -m dispatch ctl") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    path = control_path(args)
    if path is None:
        parser.error(f"which primary? give --control PATH or --pidfile PATH (or set ${ENV})")
    client = ControlClient(path, args.timeout)
    try:
        if args.command == "scale":
            reply = client.scale(args.n)
        elif args.command == "stop":
            reply = client.stop(args.fast)
        else:
            reply = client.call(args.command, **({"timeout": args.timeout} if args.command == "reload" else {}))
        if args.command == "stop" and reply["ok"]:
            reply["stopped"] = _wait_gone(int(reply["pid"]), 10 if args.fast else float(reply["graceful_timeout"]) + 10)
    except Unreachable as exc:
        print(f"dispatch ctl: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    if as_json:
        print(json.dumps(reply, indent=2))
    elif not reply["ok"]:
        print(f"dispatch ctl {args.command}: {reply.get('error', 'failed')}", file=sys.stderr)
    else:
        print(describe(args.command, reply))
    if args.command == "stop" and reply["ok"] and not reply["stopped"]:
        return EXIT_FAILED
    return EXIT_OK if reply["ok"] else EXIT_FAILED


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _running(pid):
            return True
        time.sleep(0.05)
    return False


def _running(pid: int) -> bool:
    """Alive and not a zombie (an exited primary whose parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


# ================================================================ what a person reads
def describe(command: str, reply: dict[str, Any]) -> str:
    if command == "status":
        return status_table(reply["status"])
    if command == "reload":
        return f"rolling restart complete: {len(reply['workers'])} workers ready (pids {_pids(reply['workers'])})"
    if command == "scale":
        return f"{reply['workers']} workers ready (pids {_pids(reply['pids'])})"
    if command == "stop":
        if not reply.get("stopped"):
            return f"primary {reply['pid']} is stopping ({reply['stopping']}) but still running"
        return f"primary {reply['pid']} stopped ({reply['stopping']})"
    if command == "upgrade":
        return f"upgraded: primary {reply['old_pid']} handed over to primary {reply['new_pid']}"
    if command in ("drain", "undrain"):
        why = reply.get("draining")
        return f"not ready ({why}): /readyz says 503, serving on" if why else "ready: /readyz says 200"
    return json.dumps(reply)


def status_table(status: dict[str, Any]) -> str:
    """Like ``pm2 ls``: a line about the primary, then one row per worker."""
    notes = [f"primary {status['primary_pid']}", f"up {duration(status['uptime_s'])}", status["balance"],
             f"{status['worker_count']} workers ({status['workers_wanted']} wanted)",
             "accepting" if status["accepting"] else "not accepting",
             f"{status['connections_total']:,} connections"]
    if status.get("restarting"):
        notes.append("rolling restart in progress")
    if status.get("upgrading"):
        notes.append("upgrade in progress")
    if status.get("stopping"):
        notes.append("stopping")
    if status.get("draining"):
        notes.append(f"not ready ({status['draining']})")
    header = ("id", "pid", "state", "uptime", "memory", "cpu", "conns act/total", "restarts", "stalled")
    rows = [header] + [
        (str(w["id"]), str(w["pid"]), w["state"], duration(w["uptime_s"]), mebibytes(w["memory_rss"]),
         f"{w['cpu_percent']:.1f}%", f"{w['connections_active']}/{w['connections_total']:,}",
         str(w["restarts"]), "yes" if w["stalled"] else "no")
        for w in status["workers"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = [" · ".join(notes)]
    for row in rows:
        lines.append("  ".join(cell.rjust(width) if i not in (2, 8) else cell.ljust(width)
                               for i, (cell, width) in enumerate(zip(row, widths, strict=True))).rstrip())
    return "\n".join(lines)


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600:02d}h"


def mebibytes(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def _pids(pids: list[int]) -> str:
    return ", ".join(str(p) for p in pids)

"""Sticky sessions: connections from one client IP go to the same worker while it lives.

    python examples/sticky_sessions.py --bind 127.0.0.1:9002
    curl http://127.0.0.1:9002/   # the same pid every time from this machine

Useful when a worker keeps per-client state in memory (a session cache, a
websocket room). ``balance="sticky"`` is ``dispatch.Sticky()``; any object with
``needs_loads`` and ``choose(client, worker_ids, loads)`` works the same way.
"""

from __future__ import annotations

import argparse
import os
import socket
from typing import Any

import dispatch

SESSIONS: dict[str, int] = {}  # per-worker memory: why stickiness matters


def handle(conn: socket.socket, addr: Any) -> None:
    conn.recv(65536)
    client = addr[0] if addr else "unknown"
    SESSIONS[client] = SESSIONS.get(client, 0) + 1
    body = f"worker pid {os.getpid()} has seen {client} {SESSIONS[client]} times\n".encode()
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bind", default="127.0.0.1:9002")
    parser.add_argument("--workers", type=int, default=os.cpu_count())
    args = parser.parse_args()
    dispatch.serve(handle, workers=args.workers, bind=args.bind, balance=dispatch.Sticky())


if __name__ == "__main__":
    main()

"""Handlers, policies and a server runner for the abuse attacks (``python -m benchmarks abuse``).

    python benchmarks/targets/abuse_apps.py '{"handler": "dispatch.demo:sync_app", "workers": 2}'

runs a dispatch ``Server`` with the options in the JSON (plus ``"policy"``: the
name of one of the broken policies below, passed as ``balance``) and prints one
line ``{"pid", "addresses", "health"}`` on stdout once it is bound, as
tests/serve_script.py does. The handlers answer ``pid N`` over HTTP/1.0; two of
them misuse the worker's control channel, which a handler can reach because it
runs in the worker's process.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

FLOOD_SECONDS = 5.0  # how long /flood writes to the channel
FLOOD_MAX_MESSAGES = 5_000_000
FAKE_DONE_COUNT = 1_000_000


# ====================================================================== handlers
def _read_head(conn: socket.socket) -> bytes:
    head = b""
    while b"\r\n\r\n" not in head and len(head) < 65536:
        chunk = conn.recv(65536)
        if not chunk:
            break
        head += chunk
    return head


def _answer(conn: socket.socket, body: str) -> None:
    data = body.encode()
    conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(data), data))


def _control_channel() -> socket.socket | None:
    """This worker's control channel: its only SOCK_SEQPACKET socket (the worker closes
    the ones it inherited from its siblings)."""
    for name in os.listdir("/proc/self/fd"):
        try:
            sock = socket.socket(fileno=int(name))
        except OSError:
            continue
        if sock.type == socket.SOCK_SEQPACKET:
            return sock
        sock.detach()
    return None


def _flood(channel: socket.socket, message: bytes) -> int:
    """Write ``message`` on the channel as fast as it takes them, for FLOOD_SECONDS."""
    sent = 0
    deadline = time.monotonic() + FLOOD_SECONDS
    while sent < FLOOD_MAX_MESSAGES and time.monotonic() < deadline:
        try:
            channel.send(message, socket.MSG_DONTWAIT)
            sent += 1
        except BlockingIOError:
            time.sleep(0.0005)  # the primary is behind: let it read
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                break
            raise
    return sent


def flood_app(conn: socket.socket, addr: Any) -> None:
    """``GET /flood`` floods the control channel with valid heartbeats; anything else answers."""
    from dispatch import protocol

    head = _read_head(conn)
    if b" /flood" not in head.split(b"\r\n", 1)[0]:
        _answer(conn, f"pid {os.getpid()}")
        return
    channel = _control_channel()
    if channel is None:
        _answer(conn, "no channel")
        return
    try:
        sent = _flood(channel, protocol.encode(protocol.Heartbeat(0, 0, 0, 0)))
    finally:
        channel.detach()
    _answer(conn, f"flooded {sent}")


def fake_done_app(conn: socket.socket, addr: Any) -> None:
    """``GET /fake-done`` reports a million finished connections that never were."""
    from dispatch import protocol

    head = _read_head(conn)
    if b" /fake-done" in head.split(b"\r\n", 1)[0]:
        channel = _control_channel()
        if channel is not None:
            try:
                channel.send(protocol.encode(protocol.Done(FAKE_DONE_COUNT)))
            finally:
                channel.detach()
    _answer(conn, f"pid {os.getpid()}")


# ====================================================================== policies
class OutOfRange:
    """A per-connection policy whose index is never valid."""

    needs_loads = False

    def choose(self, client: str | None, workers: Sequence[int], loads: Sequence[int]) -> int:
        return len(workers) + 7


class BadShares:
    """A batch policy that hands out one connection more than the batch holds."""

    needs_loads = False

    def assign(self, count: int, loads: Sequence[int], workers: int) -> list[int]:
        return [count + 1] + [0] * (workers - 1)


POLICIES = {"out-of-range": OutOfRange, "bad-shares": BadShares}


# ====================================================================== runner
def main() -> int:
    sys.path.insert(0, os.getcwd())
    import dispatch

    options = json.loads(sys.argv[1])
    handler = options.pop("handler")
    policy = options.pop("policy", None)
    if policy is not None:
        options["balance"] = POLICIES[policy]()
    server = dispatch.Server(handler, **options)
    dispatch.configure_logging(server.config.log_level)
    server.start(install_signal_handlers=True)
    health = server.health.address if server.health is not None else None
    print(json.dumps({"pid": os.getpid(), "addresses": server.addresses, "health": health}), flush=True)
    return server.serve_forever()


if __name__ == "__main__":
    sys.exit(main())

"""The attackers' side: idle and trickling connections, reconnecting pools on the health
port, request-then-RST bursts, and the request that starts a control-channel flood. Every
loop here is bounded in count and time."""

from __future__ import annotations

import contextlib
import errno
import select
import socket
import struct
import threading
import time
from collections import Counter

from benchmarks.measurement.probes import HOST, fetch

HOG_CONNECTS = 500_000  # connections one health-pool attack may open


def open_idle(port: int, count: int, seconds: float) -> tuple[list[socket.socket], int]:
    """``count`` connections that send nothing, opened without blocking; returns them and
    how many finished their handshake within ``seconds``."""
    deadline = time.monotonic() + seconds
    socks: list[socket.socket] = []
    pending: dict[int, socket.socket] = {}
    poller = select.poll()
    connected = 0
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        socks.append(sock)
        err = sock.connect_ex((HOST, port))
        if err == 0:
            connected += 1
        elif err == errno.EINPROGRESS:
            pending[sock.fileno()] = sock
            poller.register(sock, select.POLLOUT)
    while pending and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            sock = pending.pop(fd)
            poller.unregister(fd)
            if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
                connected += 1
    return socks, connected


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()
    socks.clear()


def trickle(socks: list[socket.socket], stop: threading.Event, period: float, max_seconds: float) -> None:
    """One byte per ``period`` on each socket: a request head that never ends."""
    text = b"GET / HTTP/1.0\r\nX-Slow: " + b"a" * 4096
    deadline = time.monotonic() + max_seconds
    i = 0
    while not stop.is_set() and time.monotonic() < deadline and i < len(text):
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.send(text[i : i + 1])
        i += 1
        stop.wait(period)


def hog_health(port: int, count: int, slow: bool, stop: threading.Event, max_seconds: float,
               stats: Counter[str]) -> None:
    """``count`` clients on the health port that send nothing (or one byte every 0.5 s) and
    reconnect as soon as the server cuts them (at most ``HOG_CONNECTS`` times in all)."""
    deadline = time.monotonic() + max_seconds
    socks: list[socket.socket | None] = [None] * count
    sent = [0] * count
    head = b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 4096
    next_drip = time.monotonic()
    try:
        while not stop.is_set() and time.monotonic() < deadline:
            for i, sock in enumerate(socks):
                if sock is None and not stop.is_set() and stats["connects"] < HOG_CONNECTS:
                    stats["connects"] += 1
                    try:
                        socks[i] = socket.create_connection((HOST, port), timeout=0.5)
                        sent[i] = 0
                    except OSError:
                        stats["refused"] += 1
            live = {s.fileno(): (i, s) for i, s in enumerate(socks) if s is not None}
            poller = select.poll()
            for fd in live:
                poller.register(fd, select.POLLIN)
            for fd, _ in poller.poll(100):
                i, sock = live[fd]
                with contextlib.suppress(OSError):
                    if sock.recv(4096).startswith(b"HTTP/1.1 503"):
                        stats["503"] += 1
                stats["cut"] += 1
                sock.close()
                socks[i] = None
            if slow and time.monotonic() >= next_drip:
                next_drip = time.monotonic() + 0.5
                for i, sock in enumerate(socks):
                    if sock is not None and sent[i] < len(head):
                        with contextlib.suppress(OSError):
                            sock.send(head[sent[i] : sent[i] + 1])
                        sent[i] += 1
    finally:
        for sock in socks:
            if sock is not None:
                sock.close()


def reset_burst(port: int, count: int, seconds: float) -> tuple[int, int]:
    """Connections that send a request and close with SO_LINGER 0 (RST instead of FIN)."""
    deadline = time.monotonic() + seconds
    sent = failed = 0
    linger = struct.pack("ii", 1, 0)
    for _ in range(count):
        if time.monotonic() > deadline:
            break
        try:
            with socket.create_connection((HOST, port), timeout=1.0) as sock:
                sock.sendall(b"GET / HTTP/1.0\r\nHost: abuse\r\n\r\n")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            sent += 1
        except OSError:
            failed += 1
    return sent, failed


def flood_request(port: int) -> str:
    try:
        status, body = fetch(port, "/flood", timeout=12.0)
    except (OSError, ValueError, IndexError) as exc:
        return f"/flood failed ({exc.__class__.__name__})"
    return body.decode(errors="replace") + " messages" if status == 200 else f"/flood: {status}"


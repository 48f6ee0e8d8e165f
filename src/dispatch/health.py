"""The health endpoint: ``/cluster-health``, ``/metrics``, ``/healthz``, ``/readyz``.

It lives inside the primary's one epoll loop, not in a thread: the primary
hands it ``register``/``unregister`` and it never blocks. That loop also
dispatches every connection, so a health client must never cost it a wait.
Hence the rules, all bounded:

- one request per connection, then ``Connection: close``;
- the request head is at most ``max_head`` bytes (431 beyond);
- a client has ``timeout`` seconds in all to send its head and read the
  answer, enforced by ``tick(now)`` (which the primary calls every 0.1 s) and,
  should nobody call it, whenever the client table is full;
- at most ``max_clients`` at once; when the table is full, a newcomer takes
  the slot of the oldest client still reading its head (so a crowd of silent
  clients cannot keep a liveness probe out), and gets a 503 only when every
  slot is busy writing an answer;
- reads and writes are non-blocking; an answer that does not fit in the socket
  buffer is finished on ``EPOLLOUT``.

The answers read state the primary already holds (workers, their last
heartbeat, supervisor slots, counters); only ``cpu_percent`` asks the kernel,
through psutil, and only when someone asks for ``/cluster-health``.
"""

from __future__ import annotations

import contextlib
import errno
import http
import json
import logging
import os
import re
import select
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil

from dispatch import supervisor
from dispatch.config import Address
from dispatch.listeners import bind, bound_name

try:
    import prometheus_client
except ImportError:  # an optional dependency: `pip install 'dispatch[metrics]'`
    prometheus_client = None

log = logging.getLogger("dispatch.health")

Register = Callable[[int, int, Callable[[int], None]], None]
Unregister = Callable[[int], None]

#: The classic text format; prometheus_client's own default moved to 1.0.0.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Restart causes always exported (at 0 until they happen), so rate() has a series.
RESTART_CAUSES = ("exit", "signal", "timeout", "recycle", "spawn")
STATES = (supervisor.BOOTING, supervisor.READY, supervisor.DRAINING)

_ACCEPT_BATCH = 16  # per readiness event; epoll is level-triggered, the rest waits a turn
_ACCEPT_PAUSE = 1.0  # seconds without accepting after EMFILE and the like
_METHOD = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_TARGET = re.compile(rb"(?:https?://[^/\s]*)?(/[\x21-\x7e]*)")
_VERSION = re.compile(rb"HTTP/(\d)\.(\d)")


class HTTPError(Exception):
    """A request that gets an error answer: ``status`` and a one-line reason."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def head_end(data: bytes | bytearray) -> int:
    """Length of the request head (through the blank line) in ``data``, or -1."""
    crlf = data.find(b"\r\n\r\n")
    lf = data.find(b"\n\n")
    ends = [i + 4 for i in (crlf,) if i >= 0] + [i + 2 for i in (lf,) if i >= 0]
    return min(ends) if ends else -1


def parse_request_line(head: bytes) -> tuple[str, str]:
    """``(method, path)`` from a request head; raises ``HTTPError`` (400/505).

    The query string is dropped; an absolute-form target keeps only its path.
    """
    line = head.lstrip(b"\r\n").split(b"\n", 1)[0].rstrip(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3:
        raise HTTPError(400, "malformed request line")
    method, target, version = parts
    match = _TARGET.fullmatch(target)
    if not _METHOD.fullmatch(method) or match is None:
        raise HTTPError(400, "malformed request line")
    major = _VERSION.fullmatch(version)
    if major is None:
        raise HTTPError(400, "malformed request line")
    if major.group(1) != b"1":
        raise HTTPError(505, "only HTTP/1.x is served here")
    path = match.group(1).split(b"?", 1)[0].split(b"#", 1)[0]
    return method.decode("ascii"), path.decode("ascii")


def render(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
           headers: tuple[tuple[str, str], ...] = (), head_only: bool = False) -> bytes:
    """A complete ``Connection: close`` response."""
    lines = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in headers),
    ]
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head if head_only else head + body


def _text(status: int, message: str, **kwargs: Any) -> bytes:
    return render(status, (message + "\n").encode(), **kwargs)


class _Client:
    """One health connection: reading its head, then writing its answer."""

    __slots__ = ("sock", "fd", "deadline", "inbuf", "out", "writing")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.deadline = deadline
        self.inbuf = bytearray()
        self.out: memoryview | None = None  # the answer still to send, once there is one
        self.writing = False  # registered for EPOLLOUT instead of EPOLLIN


class HealthServer:
    """Answers health and metrics requests about ``server`` on ``address``.

    Binds and listens at once (``BindError`` names the address); serves once
    ``attach()`` has put its sockets into the primary's epoll loop.
    """

    def __init__(self, server: Any, address: Address, *, timeout: float = 5.0,
                 max_clients: int = 64, max_head: int = 8192, backlog: int = 128) -> None:
        self.server = server
        self.timeout = timeout
        self.max_clients = max_clients
        self.max_head = max_head
        self._listener = bind(address, backlog)
        self._address = bound_name(self._listener)
        self._clients: dict[int, _Client] = {}
        self._register: Register | None = None
        self._unregister: Unregister | None = None
        self._listening = False
        self._accept_resume_at = 0.0
        self._processes: dict[int, psutil.Process] = {}  # cached: cpu_percent measures between calls
        self._registry = _metrics_registry(server)
        self._routes: dict[str, Callable[[], bytes]] = {
            "/cluster-health": self._cluster_health,
            "/metrics": self._metrics,
            "/healthz": self._healthz,
            "/readyz": self._readyz,
        }
        self.refused = 0  # clients turned away because every slot was writing an answer
        self.evicted = 0  # clients closed before their request to make room for a newcomer

    @property
    def address(self) -> str:
        """What was bound, ``HOST:PORT`` (port 0 resolved)."""
        return self._address

    def __str__(self) -> str:
        return self._address

    # ------------------------------------------------------------ the owner's API
    def attach(self, register: Register, unregister: Unregister) -> None:
        """Start serving from the owner's epoll loop."""
        self._register, self._unregister = register, unregister
        self._listen()

    def fds(self) -> list[int]:
        """Every descriptor this owns (a forked worker closes them)."""
        fds = [c.fd for c in self._clients.values()]
        if self._listener.fileno() >= 0:
            fds.insert(0, self._listener.fileno())
        return fds

    def tick(self, now: float) -> None:
        """Drop clients past their deadline; resume accepting after a pause.

        ``now`` is ``time.monotonic()``.
        """
        for client in [c for c in self._clients.values() if now >= c.deadline]:
            self._drop(client)
        if self._accept_resume_at and now >= self._accept_resume_at:
            self._accept_resume_at = 0.0
            self._listen()

    def close(self) -> None:
        """Close every client and the listener. Safe to call twice."""
        for client in list(self._clients.values()):
            self._drop(client)
        if self._listening and self._unregister is not None:
            self._unregister(self._listener.fileno())
        self._listening = False
        self._listener.close()

    # ------------------------------------------------------------ accepting
    def _listen(self) -> None:
        if self._register is not None and not self._listening and self._listener.fileno() >= 0:
            self._register(self._listener.fileno(), select.EPOLLIN, self._on_listener)
            self._listening = True

    def _on_listener(self, events: int) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The listener stays readable: stop watching it instead of spinning.
                    log.error("health endpoint: accept failed: %s; pausing for %gs", exc, _ACCEPT_PAUSE)
                    assert self._unregister is not None
                    self._unregister(self._listener.fileno())
                    self._listening = False
                    self._accept_resume_at = time.monotonic() + _ACCEPT_PAUSE
                    return
                continue  # ECONNABORTED and friends: that client is gone
            self._accepted(sock)

    def _accepted(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        now = time.monotonic()
        if len(self._clients) >= self.max_clients:
            self.tick(now)  # sweep expired clients even if the owner never calls tick()
        if len(self._clients) >= self.max_clients and not self._make_room():
            self.refused += 1
            with contextlib.suppress(OSError):
                sock.send(_text(503, "too many health clients"), socket.MSG_NOSIGNAL)
            _discard_input(sock)
            sock.close()
            return
        client = _Client(sock, now + self.timeout)
        self._clients[client.fd] = client
        assert self._register is not None
        self._register(client.fd, select.EPOLLIN, lambda events: self._on_client(client, events))

    def _make_room(self) -> bool:
        """Free a slot by closing the oldest client still reading its head.

        Clients that never finish a request must not starve the ones that do;
        the oldest has had the longest to speak. Each candidate gets a last
        read first, so a request already waiting in its socket is answered,
        not cut. Clients writing an answer are kept. False if no slot was freed.
        """
        # The dict keeps accept order: oldest first.
        for client in [c for c in self._clients.values() if c.out is None]:
            self._on_client(client, select.EPOLLIN)
            if self._clients.get(client.fd) is client and client.out is None:
                self.evicted += 1
                self._drop(client)
            if len(self._clients) < self.max_clients:
                return True
        return False

    # ------------------------------------------------------------ one client
    def _on_client(self, client: _Client, events: int) -> None:
        if self._clients.get(client.fd) is not client:
            return  # a stale event for a client already dropped
        try:
            if client.out is not None:
                self._write(client)
            else:
                self._read(client)
        except Exception:
            # Whatever went wrong, it must not leave the primary's loop.
            log.exception("health endpoint: error serving a client; dropping it")
            self._drop(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(self.max_head + 1 - len(client.inbuf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:  # the client stopped sending before the blank line
            if client.inbuf:
                self._answer(client, _text(400, "incomplete request head"))
            else:
                self._drop(client)
            return
        client.inbuf += data
        end = head_end(client.inbuf)
        if 0 <= end <= self.max_head:
            self._answer(client, self.handle(bytes(client.inbuf[:end])))
        elif len(client.inbuf) > self.max_head:
            self._answer(client, _text(431, f"request head over {self.max_head} bytes"))

    def _answer(self, client: _Client, response: bytes) -> None:
        client.inbuf = bytearray()
        client.out = memoryview(response)
        self._write(client)

    def _write(self, client: _Client) -> None:
        assert client.out is not None
        try:
            sent = client.sock.send(client.out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(client)
            return
        client.out = client.out[sent:]
        if client.out:
            if not client.writing:  # finish on EPOLLOUT
                assert self._register is not None and self._unregister is not None
                self._unregister(client.fd)
                self._register(client.fd, select.EPOLLOUT, lambda events: self._on_client(client, events))
                client.writing = True
            return
        self._drop(client, discard_input=True)

    def _drop(self, client: _Client, discard_input: bool = False) -> None:
        if self._clients.pop(client.fd, None) is None:
            return
        if self._unregister is not None:
            self._unregister(client.fd)
        if discard_input:
            _discard_input(client.sock)
        client.sock.close()

    # ------------------------------------------------------------ answers
    def handle(self, head: bytes) -> bytes:
        """The complete response to one request head."""
        try:
            method, path = parse_request_line(head)
        except HTTPError as exc:
            return _text(exc.status, exc.reason)
        route = self._routes.get(path)
        if route is None:
            response = _text(404, f"no such path; try {', '.join(self._routes)}")
        elif method not in ("GET", "HEAD"):
            response = _text(405, f"{method} is not allowed here", headers=(("Allow", "GET, HEAD"),))
        else:
            try:
                response = route()
            except Exception:
                log.exception("health endpoint: %s failed", path)
                response = _text(500, "internal error; see the primary's log")
        if method == "HEAD":  # the headers GET would get, Content-Length included
            response = response[: response.index(b"\r\n\r\n") + 4]
        return response

    def _healthz(self) -> bytes:
        return _text(200, "ok")

    def _readyz(self) -> bytes:
        if self.server.supervisor.stopping:
            return _text(503, "not ready: shutting down")
        if not any(w.state == supervisor.READY for w in self.server.workers.values()):
            return _text(503, "not ready: no worker is ready")
        return _text(200, "ready")

    def _cluster_health(self) -> bytes:
        body = json.dumps(self.cluster_health(), indent=2).encode() + b"\n"
        return render(200, body, "application/json")

    def _metrics(self) -> bytes:
        if self._registry is None:
            return _text(501, "/metrics needs prometheus_client: pip install 'dispatch[metrics]'")
        return render(200, prometheus_client.generate_latest(self._registry), METRICS_CONTENT_TYPE)

    def cluster_health(self) -> dict[str, Any]:
        """The ``/cluster-health`` document.

        ``connections_total`` of a worker is what it was passed (user-space
        modes) or, in kernel modes, what its last heartbeat says it handled.
        The cluster's is the larger of connections dispatched (exited workers
        included) and the sum over live workers. ``cpu_percent`` is measured
        since the previous request, or since the worker started on the first.
        """
        server = self.server
        wall, mono = time.time(), time.monotonic()
        workers = sorted(server.workers.values(), key=lambda w: (w.worker_id, w.started_at))
        for pid in set(self._processes) - {w.pid for w in workers}:
            del self._processes[pid]
        entries = []
        for w in workers:
            slot = server.supervisor.slots.get(w.worker_id)
            entries.append({
                "id": w.worker_id,
                "pid": w.pid,
                "state": w.state,
                "stalled": w.stalled,
                "uptime_s": round(wall - w.started_at, 3),
                "memory_rss": worker_rss(w),
                "cpu_percent": self._cpu_percent(w, wall),
                "connections_total": worker_connections_total(w),
                "connections_active": w.report.active if w.report is not None else 0,
                "heartbeat_age_s": round(mono - w.last_seen, 3),
                "restarts": slot.restarts if slot is not None else 0,
            })
        return {
            "primary_pid": os.getpid(),
            "uptime_s": round(wall - server.started_at, 3),
            "balance": _balance_name(server),
            "worker_count": len(entries),
            "connections_total": max(server.dispatched_total, sum(e["connections_total"] for e in entries)),
            "workers": entries,
        }

    def _cpu_percent(self, worker: Any, wall: float) -> float:
        process = self._processes.get(worker.pid)
        try:
            if process is not None:
                return round(process.cpu_percent(interval=None), 1)
            process = self._processes[worker.pid] = psutil.Process(worker.pid)
            process.cpu_percent(interval=None)  # starts the measurement for next time
            cpu = process.cpu_times()
            return round(100 * (cpu.user + cpu.system) / max(wall - process.create_time(), 1e-3), 1)
        except psutil.Error:  # exited, and not yet reaped by the primary
            self._processes.pop(worker.pid, None)
            return 0.0


def _discard_input(sock: socket.socket) -> None:
    """Read (bounded) what a client already sent, before closing after an answer.

    Unread input makes close() send RST, which can destroy the answer before
    the client reads it.
    """
    with contextlib.suppress(OSError):
        for _ in range(4):
            if not sock.recv(65536):
                break


# ---------------------------------------------------------------- shared views
def worker_connections_total(worker: Any) -> int:
    """Connections passed to (or, in kernel modes, handled by) one worker."""
    reported = worker.report.total if worker.report is not None else 0
    return max(worker.sent, reported)


def worker_rss(worker: Any) -> int:
    """Resident memory from the last heartbeat, or from /proc before the first."""
    if worker.report is not None:
        return int(worker.report.rss)
    try:
        return int(psutil.Process(worker.pid).memory_info().rss)
    except psutil.Error:
        return 0


def _balance_name(server: Any) -> str:
    balance = server.config.balance
    return balance if isinstance(balance, str) else type(balance).__name__


# ---------------------------------------------------------------- /metrics
def _metrics_registry(server: Any) -> Any:
    """A private registry holding only this server's collector (None without the library)."""
    if prometheus_client is None:
        return None
    registry = prometheus_client.CollectorRegistry(auto_describe=False)
    registry.register(MetricsCollector(server))
    return registry


class MetricsCollector:
    """A prometheus_client collector: reads the primary's state at scrape time."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        server = self.server
        stats = server.stats
        yield CounterMetricFamily("dispatch_connections_dispatched",
                                  "Connections the primary passed to workers.",
                                  value=server.dispatched_total)
        restarts = CounterMetricFamily("dispatch_worker_restarts",
                                       "Workers replaced, by cause.", labels=["cause"])
        for cause in sorted(set(RESTART_CAUSES) | set(server.restarts_by_cause)):
            restarts.add_metric([cause], server.restarts_by_cause.get(cause, 0))
        yield restarts
        yield CounterMetricFamily("dispatch_accept_backpressure",
                                  "Times a worker's channel was full (EAGAIN) and it was skipped.",
                                  value=stats.get("backpressure", 0))
        yield CounterMetricFamily("dispatch_connections_salvaged",
                                  "Connections taken back from dead workers and passed to others.",
                                  value=stats.get("salvaged", 0))
        yield CounterMetricFamily("dispatch_worker_stalls",
                                  "Times a worker went silent and stopped receiving connections.",
                                  value=stats.get("stalls", 0))
        yield CounterMetricFamily("dispatch_accept_errors", "Failed accept() calls in the primary.",
                                  value=stats.get("accept_errors", 0))
        yield CounterMetricFamily("dispatch_inflight_full",
                                  "Times no more descriptors could be in flight to workers "
                                  "(budget or ETOOMANYREFS) and accepting paused.",
                                  value=stats.get("inflight_full", 0))
        yield CounterMetricFamily("dispatch_policy_errors",
                                  "Answers of the balancing policy that were invalid or raised "
                                  "(round-robin answered instead).",
                                  value=stats.get("policy_errors", 0))
        yield CounterMetricFamily("dispatch_spawn_errors",
                                  "Workers that could not be forked (fork, socketpair, pidfd_open).",
                                  value=stats.get("spawn_errors", 0))
        yield GaugeMetricFamily("dispatch_connections_in_flight",
                                "Connections passed to workers and not yet reported done.",
                                value=getattr(server, "_outstanding", 0))
        yield GaugeMetricFamily("dispatch_accept_paused",
                                "1 while workers exist but the primary is not accepting.",
                                value=1 if server.workers and not server._accepting else 0)
        yield GaugeMetricFamily("dispatch_pending_connections",
                                "Connections accepted (or taken back) but not yet passed on.",
                                value=len(server._pending))
        yield GaugeMetricFamily("dispatch_uptime_seconds", "Seconds since the primary started.",
                                value=time.time() - server.started_at)

        by_state = GaugeMetricFamily("dispatch_workers", "Worker processes, by state.", labels=["state"])
        counts = dict.fromkeys(STATES, 0)
        for w in server.workers.values():
            counts[w.state] = counts.get(w.state, 0) + 1
        for state, count in counts.items():
            by_state.add_metric([state], count)
        yield by_state

        labels = ["worker", "pid"]
        rss = GaugeMetricFamily("dispatch_worker_memory_rss_bytes",
                                "Resident memory of each worker.", labels=labels)
        active = GaugeMetricFamily("dispatch_worker_connections_active",
                                   "Connections each worker is handling (last heartbeat).", labels=labels)
        total = CounterMetricFamily("dispatch_worker_connections",
                                    "Connections passed to (kernel modes: handled by) each worker.",
                                    labels=labels)
        cpu = CounterMetricFamily("dispatch_worker_cpu_seconds",
                                  "User+system CPU time of each worker (last heartbeat).", labels=labels)
        age = GaugeMetricFamily("dispatch_worker_heartbeat_age_seconds",
                                "Seconds since each worker was last heard from.", labels=labels)
        now = time.monotonic()
        for w in sorted(server.workers.values(), key=lambda w: (w.worker_id, w.started_at)):
            values = [str(w.worker_id), str(w.pid)]
            rss.add_metric(values, worker_rss(w))
            active.add_metric(values, w.report.active if w.report is not None else 0)
            total.add_metric(values, worker_connections_total(w))
            cpu.add_metric(values, w.report.cpu_ms / 1000 if w.report is not None else 0)
            age.add_metric(values, max(0.0, now - w.last_seen))
        yield from (rss, active, total, cpu, age)

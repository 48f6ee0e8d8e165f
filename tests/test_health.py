"""The health endpoint: /cluster-health, /metrics, /healthz, /readyz.

Two halves. In-process tests drive a ``HealthServer`` from a tiny epoll loop
of their own, over a stand-in for the primary: the HTTP edge cases, the
bounds on slow and silent clients, partial writes. Integration tests start a
real primary with real workers and check the answers against what the
workers actually did.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import socket
import sys
import time
from collections import Counter
from types import SimpleNamespace
from typing import Any

import psutil
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from dispatch.config import Address
from dispatch.counters import Counters
from dispatch.health import HealthServer, HTTPServer, PrimaryView, WorkerView
from dispatch.health.http import parse_request_line, render
from dispatch.listeners import BindError
from dispatch.primary import Server, WorkerHandle
from dispatch.protocol import Heartbeat
from tests.helpers import ServerProcess, connect, request, wait_for

CLUSTER_FIELDS = {
    "primary_pid", "uptime_s", "balance", "worker_count", "connections_total", "connections_in_flight",
    "accepting", "workers",
}
WORKER_FIELDS = {
    "id", "pid", "state", "stalled", "uptime_s", "memory_rss", "cpu_percent", "connections_total",
    "connections_active", "heartbeat_age_s", "restarts", "skipped_busy",
    "reclaimed", "cpus",
}


# ====================================================================== clients
class Reply:
    def __init__(self, raw: bytes) -> None:
        head, sep, self.body = raw.partition(b"\r\n\r\n")
        assert sep, f"no complete response head in {raw[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        version, status, _ = lines[0].split(" ", 2)
        assert version == "HTTP/1.1"
        self.status = int(status)
        self.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()


def read_to_eof(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def http(address: str, path: str = "/healthz", method: str = "GET", raw: bytes | None = None,
         timeout: float = 10.0) -> Reply:
    """One request on a new connection; the server closes it after answering."""
    with connect(address, timeout) as sock:
        sock.sendall(raw if raw is not None else f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
        return Reply(read_to_eof(sock))


def metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def demo_pid(body: str) -> int:
    match = re.fullmatch(r"hello from worker pid (\d+)\n", body)
    assert match, f"not an answer from the demo app: {body!r}"
    return int(match.group(1))


# ====================================================================== in-process
class Loop:
    """The primary's loop in miniature: register/unregister with callbacks, strictly."""

    def __init__(self) -> None:
        self.epoll = select.epoll()
        self.callbacks: dict[int, Any] = {}

    def register(self, fd: int, events: int, callback: Any) -> None:
        assert fd not in self.callbacks, f"fd {fd} registered twice"
        self.epoll.register(fd, events)
        self.callbacks[fd] = callback

    def unregister(self, fd: int) -> None:
        assert fd in self.callbacks, f"fd {fd} unregistered but never registered"
        del self.callbacks[fd]
        self.epoll.unregister(fd)

    def run_once(self, timeout: float = 0.01) -> None:
        for fd, events in self.epoll.poll(timeout):
            callback = self.callbacks.get(fd)
            if callback is not None:
                callback(events)

    def exchange(self, sock: socket.socket, timeout: float = 5.0) -> bytes:
        """Run the loop until the server closes ``sock``; everything it sent."""
        sock.setblocking(False)
        data = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.run_once()
            try:
                chunk = sock.recv(65536)
            except BlockingIOError:
                continue
            if not chunk:
                return data
            data += chunk
        raise AssertionError(f"server did not close the connection in {timeout}s; got {data[:200]!r}")


def fake_worker(worker_id: int, pid: int, state: str = "ready", sent: int = 0,
                report: Heartbeat | None = None) -> SimpleNamespace:
    """A ``dispatch.health.WorkerView``: exactly the names the views may read."""
    return SimpleNamespace(worker_id=worker_id, pid=pid, state=state, sent=sent, report=report,
                           stalled=False, started_at=time.time() - 2.0, last_seen=time.monotonic() - 0.5,
                           skipped_busy=0, reclaimed=0, taken_back=0)


def fake_primary(workers: list[SimpleNamespace] | None = None) -> SimpleNamespace:
    """A ``dispatch.health.PrimaryView``: what HealthServer reads of a ``dispatch.primary.Server``."""
    if workers is None:
        workers = [
            fake_worker(0, os.getpid(), sent=7, report=Heartbeat(1, 6, 10_000_000, 1500)),
            fake_worker(1, os.getppid(), state="booting"),
        ]
    return SimpleNamespace(
        workers={w.pid: w for w in workers},
        supervisor=SimpleNamespace(slots={0: SimpleNamespace(restarts=2)}, stopping=False),
        dispatched_total=12,
        started_at=time.time() - 10.0,
        config=SimpleNamespace(balance="round-robin"),
        restarts_by_cause={"signal": 2, "oom": 1},
        counters=Counters(salvaged=3, backpressure=4, stalls=1),
        accepting=True,
        pending_count=2,
        in_flight=5,
        draining_reason=None,
    )


class Harness:
    def __init__(self, **options: Any) -> None:
        self.primary = fake_primary()
        self.loop = Loop()
        self.health = HealthServer(self.primary, Address.parse("127.0.0.1:0"), **options)
        self.health.attach(self.loop.register, self.loop.unregister)

    def connect(self) -> socket.socket:
        sock = connect(self.health.address)
        sock.setblocking(False)
        return sock

    def ask(self, raw: bytes) -> Reply:
        with self.connect() as sock:
            sock.sendall(raw)
            return Reply(self.loop.exchange(sock))

    def get(self, path: str, method: str = "GET") -> Reply:
        return self.ask(f"{method} {path} HTTP/1.1\r\nHost: t\r\n\r\n".encode())

    def accept_pending(self, count: int) -> None:
        wait_for(lambda: self.loop.run_once() or len(self.health.fds()) == 1 + count, 5,
                 what=f"{count} clients accepted")

    def close(self) -> None:
        self.health.close()
        assert self.loop.callbacks == {}, "close() left registrations behind"
        assert self.health.fds() == []
        self.health.close()  # twice is fine
        self.loop.epoll.close()


@pytest.fixture
def harness() -> Any:
    made: list[Harness] = []

    def make(**options: Any) -> Harness:
        made.append(Harness(**options))
        return made[-1]

    yield make
    for h in made:
        h.close()


def test_address_is_what_was_bound(harness: Any) -> None:
    h = harness()
    host, port = h.health.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    assert str(h.health) == h.health.address
    assert h.health.fds() == [h.health.listener.fileno()]


def test_bind_error_names_the_address() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(BindError, match=f"127.0.0.1:{port}"):
            HealthServer(fake_primary(), Address.parse(f"127.0.0.1:{port}"))


def test_healthz_and_head(harness: Any) -> None:
    h = harness()
    reply = h.get("/healthz")
    assert (reply.status, reply.text) == (200, "ok\n")
    assert reply.headers["connection"] == "close"
    head = h.get("/healthz", "HEAD")
    assert head.status == 200 and head.body == b"" and head.headers["content-length"] == "3"
    missing = h.get("/nope", "HEAD")
    assert missing.status == 404 and missing.body == b""


def test_readyz_needs_a_ready_worker_and_no_shutdown(harness: Any) -> None:
    h = harness()
    assert h.get("/readyz").status == 200
    h.primary.supervisor.stopping = True
    assert h.get("/readyz").status == 503
    h.primary.supervisor.stopping = False
    for worker in h.primary.workers.values():
        worker.state = "draining"
    assert h.get("/readyz").status == 503


def test_cluster_health_document(harness: Any) -> None:
    h = harness()
    reply = h.get("/cluster-health")
    assert reply.status == 200 and reply.headers["content-type"] == "application/json"
    doc = reply.json()
    assert doc["primary_pid"] == os.getpid()
    assert 9 < doc["uptime_s"] < 60
    assert set(doc) == CLUSTER_FIELDS
    assert (doc["balance"], doc["worker_count"], doc["connections_total"]) == ("round-robin", 2, 12)
    assert (doc["connections_in_flight"], doc["accepting"]) == (5, True)
    ready, booting = doc["workers"]
    assert set(ready) == set(booting) == WORKER_FIELDS
    assert (ready["id"], ready["pid"], ready["state"]) == (0, os.getpid(), "ready")
    assert ready["memory_rss"] == 10_000_000  # from the heartbeat
    assert (ready["connections_total"], ready["connections_active"], ready["restarts"]) == (7, 1, 2)
    assert 0.4 < ready["heartbeat_age_s"] < 30 and 1.9 < ready["uptime_s"] < 60
    assert booting["memory_rss"] > 0  # no heartbeat yet: read from /proc
    assert (booting["state"], booting["connections_total"], booting["restarts"]) == ("booting", 0, 0)
    assert booting["cpu_percent"] >= 0


def test_connections_total_from_heartbeat_in_kernel_modes(harness: Any) -> None:
    h = harness()
    h.primary.dispatched_total = 0
    h.primary.workers = {1: fake_worker(0, os.getpid(), report=Heartbeat(0, 41, 1, 1))}
    doc = h.get("/cluster-health").json()
    assert doc["connections_total"] == doc["workers"][0]["connections_total"] == 41


def test_metrics_exposition(harness: Any) -> None:
    h = harness()
    reply = h.get("/metrics")
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    for name, kind in [("dispatch_connections_dispatched_total", "counter"),
                       ("dispatch_worker_restarts_total", "counter"),
                       ("dispatch_workers", "gauge"),
                       ("dispatch_worker_memory_rss_bytes", "gauge")]:
        assert f"# TYPE {name} {kind}\n" in reply.text and f"# HELP {name} " in reply.text
    samples = metrics(reply.text)
    me, parent = str(os.getpid()), str(os.getppid())
    assert samples[("dispatch_connections_dispatched_total", ())] == 12
    assert samples[("dispatch_worker_restarts_total", (("cause", "signal"),))] == 2
    assert samples[("dispatch_worker_restarts_total", (("cause", "oom"),))] == 1
    assert samples[("dispatch_worker_restarts_total", (("cause", "timeout"),))] == 0
    assert samples[("dispatch_accept_backpressure_total", ())] == 4
    assert samples[("dispatch_connections_salvaged_total", ())] == 3
    assert samples[("dispatch_worker_stalls_total", ())] == 1
    assert samples[("dispatch_workers", (("state", "ready"),))] == 1
    assert samples[("dispatch_workers", (("state", "booting"),))] == 1
    assert samples[("dispatch_workers", (("state", "draining"),))] == 0
    assert samples[("dispatch_worker_memory_rss_bytes", (("pid", me), ("worker", "0")))] == 10_000_000
    assert samples[("dispatch_worker_memory_rss_bytes", (("pid", parent), ("worker", "1")))] > 0
    assert samples[("dispatch_worker_connections_active", (("pid", me), ("worker", "0")))] == 1
    assert samples[("dispatch_worker_connections_total", (("pid", me), ("worker", "0")))] == 7
    assert samples[("dispatch_worker_heartbeat_age_seconds", (("pid", me), ("worker", "0")))] >= 0.5
    assert samples[("dispatch_accept_paused", ())] == 0
    assert samples[("dispatch_pending_connections", ())] == 2
    assert samples[("dispatch_connections_in_flight", ())] == 5
    h.primary.accepting = False
    assert metrics(h.get("/metrics").text)[("dispatch_accept_paused", ())] == 1


#: Every family of /metrics, in order: name, type, help. Dashboards and alerts are built on these.
FAMILIES = [
    ("dispatch_connections_dispatched", "counter", "Connections the primary passed to workers."),
    ("dispatch_worker_restarts", "counter", "Workers replaced, by cause."),
    ("dispatch_accept_backpressure", "counter", "Times a worker's channel was full (EAGAIN) and it was skipped."),
    ("dispatch_connections_salvaged", "counter", "Connections taken back from dead workers and passed to others."),
    ("dispatch_connections_reclaimed", "counter", "Connections taken back unread from a worker that was "
     "not reading and passed to one that was (reclaim_after)."),
    ("dispatch_worker_stalls", "counter", "Times a worker went silent and stopped receiving connections."),
    ("dispatch_accept_errors", "counter", "Failed accept() calls in the primary."),
    ("dispatch_inflight_full", "counter", "Times no more descriptors could be in flight to workers "
                                          "(budget or ETOOMANYREFS) and accepting paused."),
    ("dispatch_policy_errors", "counter", "Answers of the balancing policy that were invalid or raised "
                                          "(round-robin answered instead)."),
    ("dispatch_spawn_errors", "counter", "Workers that could not be forked (fork, socketpair, pidfd_open)."),
    ("dispatch_connections_in_flight", "gauge", "Connections passed to workers and not yet reported done (pull: waiting in the queue)."),
    ("dispatch_accept_paused", "gauge", "1 while workers exist but the primary is not accepting."),
    ("dispatch_pending_connections", "gauge", "Connections accepted (or taken back) but not yet passed on."),
    ("dispatch_uptime_seconds", "gauge", "Seconds since the primary started."),
    ("dispatch_workers", "gauge", "Worker processes, by state."),
    ("dispatch_worker_memory_rss_bytes", "gauge", "Resident memory of each worker."),
    ("dispatch_worker_connections_active", "gauge", "Connections each worker is handling (last heartbeat)."),
    ("dispatch_worker_connections", "counter", "Connections passed to (kernel modes: handled by) each worker."),
    ("dispatch_worker_cpu_seconds", "counter", "User+system CPU time of each worker (last heartbeat)."),
    ("dispatch_worker_skipped_busy", "counter", "Batches each worker was passed over for: it had not read the "
     "connections it was given while another had (skip_busy)."),
    ("dispatch_worker_reclaimed", "counter", "Connections taken back unread from each worker while it was "
     "not reading and another was (reclaim_after)."),
    ("dispatch_worker_heartbeat_age_seconds", "gauge", "Seconds since each worker was last heard from."),
]


def test_metric_families_names_types_and_help_are_stable(harness: Any) -> None:
    families = text_string_to_metric_families(harness().get("/metrics").text)
    assert [(f.name, f.type, f.documentation) for f in families] == FAMILIES


def test_metrics_without_prometheus_client(harness: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "prometheus_client", None)  # import raises ImportError
    monkeypatch.delitem(sys.modules, "dispatch.health.metrics", raising=False)
    h = harness()
    reply = h.get("/metrics")
    assert reply.status == 501 and "prometheus_client" in reply.text
    assert h.get("/cluster-health").status == 200


@pytest.mark.parametrize(("raw", "status"), [
    (b"GET /nope HTTP/1.1\r\n\r\n", 404),
    (b"GET /healthz/ HTTP/1.1\r\n\r\n", 404),
    (b"GET /readyz?verbose=1 HTTP/1.1\r\n\r\n", 200),
    (b"GET http://example.test/healthz HTTP/1.1\r\n\r\n", 200),
    (b"GET /healthz HTTP/1.0\n\n", 200),
    (b"\r\nGET /healthz HTTP/1.1\r\n\r\n", 200),
    (b"hello\r\n\r\n", 400),
    (b"GET /healthz\r\n\r\n", 400),
    (b"GET  /healthz HTTP/1.1\r\n\r\n", 400),
    (b"GET healthz HTTP/1.1\r\n\r\n", 400),
    (b"G(T /healthz HTTP/1.1\r\n\r\n", 400),
    (b"GET /healthz SPDY/3\r\n\r\n", 400),
    (b"GET /healthz HTTP/2.0\r\n\r\n", 505),
    (b"\xff\xfe\r\n\r\n", 400),
])
def test_request_lines(harness: Any, raw: bytes, status: int) -> None:
    assert harness().ask(raw).status == status


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_other_methods_are_not_allowed(harness: Any, method: str) -> None:
    reply = harness().get("/cluster-health", method)
    assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"


def test_a_request_body_does_not_spoil_the_answer(harness: Any) -> None:
    reply = harness().ask(b"POST /healthz HTTP/1.1\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
    assert reply.status == 405


def test_head_over_the_cap_gets_431(harness: Any) -> None:
    h = harness(max_head=1024)
    reply = h.ask(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 2000 + b"\r\n\r\n")
    assert reply.status == 431
    assert h.get("/healthz").status == 200
    exact = b"GET /healthz HTTP/1.1\r\nX: " + b"a" * (1024 - 30) + b"\r\n\r\n"
    assert len(exact) == 1024 and h.ask(exact).status == 200


def test_client_that_stops_mid_head_gets_400(harness: Any) -> None:
    h = harness()
    with h.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        sock.shutdown(socket.SHUT_WR)
        assert Reply(h.loop.exchange(sock)).status == 400


def test_silent_and_slow_clients_are_dropped_at_their_deadline(harness: Any) -> None:
    h = harness(timeout=5.0)
    silent, slow = h.connect(), h.connect()
    h.accept_pending(2)
    slow.sendall(b"GET /heal")
    h.loop.run_once()
    h.health.tick(time.monotonic())
    assert len(h.health.fds()) == 3  # not yet
    h.health.tick(time.monotonic() + 5.1)
    assert h.health.fds() == [h.health.listener.fileno()]
    assert set(h.loop.callbacks) == {h.health.listener.fileno()}
    for sock in (silent, slow):
        sock.setblocking(True)
        sock.settimeout(5)
        assert sock.recv(10) == b""  # closed without an answer
        sock.close()


def test_answer_larger_than_the_socket_buffer_finishes_on_epollout(harness: Any) -> None:
    h = harness()
    workers = [fake_worker(i, 10_000_000 + i, sent=i, report=Heartbeat(0, i, 1 << 20, 10)) for i in range(500)]
    h.primary.workers = {w.pid: w for w in workers}
    h.health.listener.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)  # accepted sockets inherit it
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.settimeout(5)
    sock.connect(h.health.listener.getsockname())
    with sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        wait_for(lambda: h.loop.run_once() or h.health.writing == 1, 5,
                 what="the answer to wait for EPOLLOUT")
        reply = Reply(h.loop.exchange(sock))
    assert reply.status == 200 and int(reply.headers["content-length"]) == len(reply.body) > 100_000
    samples = metrics(reply.text)
    assert samples[("dispatch_worker_connections_total", (("pid", "10000499"), ("worker", "499")))] == 499


def test_a_failing_route_answers_500_and_the_loop_goes_on(harness: Any) -> None:
    h = harness()
    del h.primary.supervisor.slots  # the primary's shape changed under us
    assert h.get("/cluster-health").status == 500
    assert h.get("/healthz").status == 200


def test_fds_lists_clients_and_close_closes_them(harness: Any) -> None:
    h = harness()
    clients = [h.connect() for _ in range(2)]
    h.accept_pending(2)
    owned = h.health.fds()
    assert len(owned) == 3 and all(os.fstat(fd) for fd in owned)
    h.close()
    for sock in clients:
        sock.setblocking(True)
        sock.settimeout(5)
        assert sock.recv(10) == b""
        sock.close()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_any_head_gets_an_http_answer(head: bytes) -> None:
    health = HealthServer(fake_primary(), Address.parse("127.0.0.1:0"))
    try:
        response = health.handle(head)
    finally:
        health.close()
    assert re.match(rb"HTTP/1\.1 [1-5]\d\d ", response)


def test_the_http_server_knows_only_its_routes() -> None:
    loop = Loop()
    server = HTTPServer(Address.parse("127.0.0.1:0"), {"/ping": lambda: render(200, b"pong")})
    server.attach(loop.register, loop.unregister)
    try:
        with connect(server.address) as sock:
            sock.sendall(b"GET /ping?x=1 HTTP/1.1\r\n\r\n")
            reply = Reply(loop.exchange(sock))
        assert (reply.status, reply.body) == (200, b"pong")
        missing = Reply(server.handle(b"GET /healthz HTTP/1.1\r\n\r\n"))
        assert (missing.status, missing.text) == (404, "no such path; try /ping\n")
    finally:
        server.close()
        loop.epoll.close()


def test_the_primary_has_every_name_the_views_read() -> None:
    """``dispatch.primary.Server`` and its workers provide ``PrimaryView`` and ``WorkerView``.

    The names, here; ``mypy`` checks their types where the primary passes itself.
    """
    def members(protocol: type) -> list[str]:
        return [name for name, value in vars(protocol).items() if isinstance(value, property)]

    assert len(members(PrimaryView)) == 11 and len(members(WorkerView)) == 11
    server = Server("tests.apps:pid_app", workers=1)  # not started: nothing bound or forked
    assert [name for name in members(PrimaryView) if not hasattr(server, name)] == []
    assert [name for name in members(WorkerView)
            if name not in WorkerHandle.__slots__ and not hasattr(WorkerHandle, name)] == []


def test_parse_request_line() -> None:
    assert parse_request_line(b"GET /a?b=c HTTP/1.1\r\nHost: x\r\n\r\n") == ("GET", "/a")
    assert parse_request_line(b"HEAD https://h:1/m#f HTTP/1.0\r\n\r\n") == ("HEAD", "/m")


# ====================================================================== real primaries
def health_primary(**options: Any) -> ServerProcess:
    options.setdefault("health", "127.0.0.1:0")
    return ServerProcess("dispatch.demo:app", **options)


def cluster(server: ServerProcess) -> dict[str, Any]:
    reply = http(server.health, "/cluster-health")
    assert reply.status == 200
    return reply.json()


def ready_doc(server: ServerProcess, count: int = 2) -> dict[str, Any]:
    def ready() -> dict[str, Any] | None:
        doc = cluster(server)
        states = [w["state"] for w in doc["workers"]]
        return doc if states == ["ready"] * count else None

    return wait_for(ready, 15, what=f"{count} ready workers in /cluster-health")


def reaper(server: ServerProcess) -> Any:
    """Stop the primary, then SIGKILL by pid any worker that outlived it."""
    class Reaper:
        def __enter__(self) -> ServerProcess:
            return server

        def __exit__(self, *exc: object) -> None:
            workers = []
            for pid in server.workers():
                with contextlib.suppress(psutil.Error):
                    workers.append(psutil.Process(pid))  # remembers its start time: no pid reuse
            server.__exit__(*exc)
            for process in workers:
                with contextlib.suppress(psutil.Error):
                    process.kill()

    return Reaper()


@pytest.mark.parametrize("balance", ["round-robin", "reuseport"])
def test_cluster_health_matches_what_workers_did(balance: str) -> None:
    with reaper(health_primary(balance=balance)) as server:
        before = ready_doc(server)
        assert before["primary_pid"] == server.pid
        assert before["balance"] == balance
        assert sorted(w["pid"] for w in before["workers"]) == sorted(server.workers())
        answered = Counter(demo_pid(request(server.address)) for _ in range(12))
        assert set(answered) <= {w["pid"] for w in before["workers"]}
        if balance == "round-robin":
            assert answered == Counter({w["pid"]: 6 for w in before["workers"]})

        def settled() -> dict[str, Any] | None:
            # In kernel modes the counts come from heartbeats: poll until they catch up.
            doc = cluster(server)
            counts = {w["pid"]: w["connections_total"] for w in doc["workers"] if w["connections_total"]}
            idle = all(w["connections_active"] == 0 for w in doc["workers"])
            return doc if counts == dict(answered) and idle else None

        doc = wait_for(settled, 10, what=f"connection counts {dict(answered)}")
        assert doc["connections_total"] == 12 and doc["worker_count"] == 2
        for worker in doc["workers"]:
            assert set(worker) == WORKER_FIELDS
            assert worker["state"] == "ready" and worker["restarts"] == 0
            assert worker["memory_rss"] > 1_000_000  # a Python process
            assert 0 <= worker["heartbeat_age_s"] < 10
            assert 0 <= worker["uptime_s"] <= doc["uptime_s"] + 1
            assert worker["cpu_percent"] >= 0
        assert sorted(w["id"] for w in doc["workers"]) == [0, 1]

        samples = metrics(http(server.health, "/metrics").text)
        dispatched = 12 if balance == "round-robin" else 0
        assert samples[("dispatch_connections_dispatched_total", ())] == dispatched
        assert samples[("dispatch_workers", (("state", "ready"),))] == 2
        for worker in doc["workers"]:
            labels = (("pid", str(worker["pid"])), ("worker", str(worker["id"])))
            assert samples[("dispatch_worker_connections_total", labels)] == worker["connections_total"]
            assert samples[("dispatch_worker_memory_rss_bytes", labels)] > 1_000_000


def test_cpu_percent_sees_a_worker_burning_cpu() -> None:
    with reaper(health_primary(workers=1)) as server:
        ready_doc(server, 1)  # the first look starts the measurement
        request(server.address, "/burn?ms=400")
        doc = cluster(server)
        assert doc["workers"][0]["cpu_percent"] > 1


def test_killed_worker_is_replaced_and_counted() -> None:
    with reaper(health_primary()) as server:
        before = ready_doc(server)
        victim = before["workers"][0]
        os.kill(victim["pid"], signal.SIGKILL)

        def replaced() -> dict[str, Any] | None:
            doc = cluster(server)
            pids = {w["pid"] for w in doc["workers"]}
            ready = [w["state"] for w in doc["workers"]] == ["ready", "ready"]
            return doc if ready and victim["pid"] not in pids else None

        doc = wait_for(replaced, 15, what="a replacement for the killed worker")
        new = next(w for w in doc["workers"] if w["id"] == victim["id"])
        other = next(w for w in doc["workers"] if w["id"] != victim["id"])
        assert new["pid"] in server.workers() and new["restarts"] == 1 and other["restarts"] == 0
        assert new["uptime_s"] < doc["uptime_s"]
        samples = metrics(http(server.health, "/metrics").text)
        assert samples[("dispatch_worker_restarts_total", (("cause", "signal"),))] == 1
        assert samples[("dispatch_worker_restarts_total", (("cause", "exit"),))] == 0
        wait_for(lambda: demo_pid(request(server.address)) == new["pid"], 10,
                 what="the replacement to answer requests")


def test_readyz_flips_while_draining_and_health_keeps_answering() -> None:
    with reaper(health_primary(graceful_timeout=60)) as server:
        ready_doc(server)
        assert http(server.health, "/readyz").status == 200
        with connect(server.address, timeout=20) as slow:
            slow.sendall(b"GET /slow?ms=4000 HTTP/1.0\r\n\r\n")
            wait_for(lambda: any(w["connections_active"] == 1 for w in cluster(server)["workers"]), 10,
                     what="the slow request to show as active")
            server.signal(signal.SIGTERM)
            reply = wait_for(lambda: (r := http(server.health, "/readyz")).status == 503 and r, 5,
                             what="/readyz to answer 503")
            assert "shutting down" in reply.text
            assert http(server.health, "/healthz").status == 200
            states = [w["state"] for w in cluster(server)["workers"]]
            assert "draining" in states and "ready" not in states
            answer = read_to_eof(slow)
        assert answer.startswith(b"HTTP/1.1 200 ") and b"hello from worker pid" in answer
        assert server.wait(20) == 0


@pytest.fixture(scope="module")
def shared() -> Any:
    """One primary for the tests that only read."""
    with reaper(health_primary()) as server:
        ready_doc(server)
        yield server


def test_http_errors_on_a_real_primary(shared: ServerProcess) -> None:
    assert http(shared.health, "/nope").status == 404
    reply = http(shared.health, "/cluster-health", "POST")
    assert reply.status == 405 and reply.headers["allow"] == "GET, HEAD"
    assert http(shared.health, raw=b"nonsense\r\n\r\n").status == 400
    head = http(shared.health, "/cluster-health", "HEAD")
    assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) > 100


def test_metrics_parse_on_a_real_primary(shared: ServerProcess) -> None:
    reply = http(shared.health, "/metrics")
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    assert all(name.startswith("dispatch_") for name in families)
    assert families["dispatch_connections_dispatched"].type == "counter"
    assert families["dispatch_worker_heartbeat_age_seconds"].type == "gauge"
    assert families["dispatch_workers"].documentation


def test_silent_health_clients_do_not_hold_up_dispatch(shared: ServerProcess) -> None:
    stalled = [connect(shared.health) for _ in range(8)]  # send nothing
    slow = connect(shared.health)
    slow.sendall(b"GET /cluster-he")  # and never the rest
    big = connect(shared.health)
    big.sendall(b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 6000)  # under the cap, unfinished
    try:
        answers = [demo_pid(request(shared.address, timeout=10)) for _ in range(20)]
        assert len(answers) == 20
        assert http(shared.health, "/healthz").status == 200
    finally:
        for sock in [*stalled, slow, big]:
            sock.close()


def test_a_silent_health_client_is_dropped_by_the_primary(shared: ServerProcess) -> None:
    with connect(shared.health, timeout=10) as sock:
        assert sock.recv(10) == b""  # closed by the primary (HealthServer's timeout is 5 s)

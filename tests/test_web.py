"""Web apps served through the CLI by real workers: a Starlette app and a Flask app
(tests/web_apps.py), and examples/fastapi_app.py."""

from __future__ import annotations

import email.utils
import hashlib
import http.client
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as ws_connect

from tests.helpers import ROOT, ServerProcess, connect, listening_sockets, pid_alive, wait_for


def cli_server(app: str, *flags: str, workers: int = 2, health: bool = False) -> ServerProcess:
    """``python -m dispatch tests.web_apps:APP`` on a free port; with ``health``, its
    /cluster-health too (``server.health``)."""
    extra = ["--health", "127.0.0.1:0"] if health else []
    server = ServerProcess(f"tests.web_apps:{app}", cli=["--bind", "127.0.0.1:0", "--workers", str(workers),
                                                          "--log-level", "debug", *extra, *flags])
    if health:
        # The primary binds its addresses first, then the health endpoint.
        server.health = wait_for(lambda: listening_sockets(server.pid)[1:2], 15, what="the health endpoint")[0][1]
    return server


def http_conn(address: str, timeout: float = 10.0) -> http.client.HTTPConnection:
    host, _, port = address.rpartition(":")
    return http.client.HTTPConnection(host, int(port), timeout=timeout)


def call(conn: http.client.HTTPConnection, method: str, path: str, body: Any = None,
         headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on ``conn`` (reused if the server keeps it open); status, headers, body."""
    if body is not None and not isinstance(body, bytes):
        body = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", **(headers or {})}
    conn.request(method, path, body=body, headers=headers or {})
    response = conn.getresponse()
    return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()


def get_json(address: str, path: str = "/") -> Any:
    conn = http_conn(address)
    try:
        status, _, body = call(conn, "GET", path)
    finally:
        conn.close()
    assert status == 200, (status, body)
    return json.loads(body)


@pytest.fixture(scope="module")
def starlette() -> Iterator[ServerProcess]:
    with cli_server("starlette_app") as server:
        server.wait_ready(2)
        yield server


# ------------------------------------------------------------------ HTTP
def test_routing_query_and_json_bodies(starlette: ServerProcess) -> None:
    conn = http_conn(starlette.address)
    assert call(conn, "GET", "/items/42?q=pen")[::2] == (200, b'{"item":42,"q":"pen"}')
    assert call(conn, "GET", "/items/nope")[0] == 404
    status, headers, body = call(conn, "POST", "/json", {"a": [1, 2, {"b": None}]})
    assert status == 201 and headers["content-type"] == "application/json"
    assert json.loads(body)["got"] == {"a": [1, 2, {"b": None}]}
    # The app raises: a 500, and uvicorn closes that connection; the worker serves on.
    assert call(conn, "POST", "/json", b"{not json", {"Content-Type": "application/json"})[0] == 500
    conn.close()
    assert get_json(starlette.address, "/items/7")["item"] == 7


def test_streaming_response(starlette: ServerProcess) -> None:
    conn = http_conn(starlette.address)
    status, headers, body = call(conn, "GET", "/stream")
    assert status == 200 and headers["transfer-encoding"] == "chunked"
    assert body == b"".join(f"chunk {i}\n".encode() for i in range(5))
    conn.close()


def test_large_upload(starlette: ServerProcess) -> None:
    data = os.urandom(8 << 20)
    conn = http_conn(starlette.address, timeout=30)
    status, _, body = call(conn, "POST", "/upload", data, {"Content-Type": "application/octet-stream"})
    assert status == 200
    assert json.loads(body) == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    conn.close()


def test_keep_alive_reuses_one_connection_with_date_and_server_headers(starlette: ServerProcess) -> None:
    conn = http_conn(starlette.address)
    call(conn, "GET", "/")
    assert conn.sock is not None
    sock, local = conn.sock, conn.sock.getsockname()
    pids = set()
    for _ in range(20):
        status, headers, body = call(conn, "GET", "/")
        assert status == 200
        pids.add(json.loads(body)["pid"])
    assert conn.sock is sock and sock.getsockname() == local  # never reconnected
    assert len(pids) == 1
    assert headers["server"] == "uvicorn"
    date = email.utils.parsedate_to_datetime(headers["date"]).timestamp()
    assert abs(date - time.time()) < 5
    # Date follows the clock: the worker refreshes it every second.
    wait_for(lambda: call(conn, "GET", "/")[1]["date"] != headers["date"], 5, what="a new Date")
    conn.close()


def test_pipelined_requests_are_answered_in_order(starlette: ServerProcess) -> None:
    with connect(starlette.address) as sock:  # a 10 s timeout on every recv
        sock.sendall(b"GET /items/1 HTTP/1.1\r\nHost: t\r\n\r\nGET /items/2 HTTP/1.1\r\nHost: t\r\n\r\n")
        data = b""
        while data.count(b"HTTP/1.1 200") < 2 or not data.endswith(b"}"):
            chunk = sock.recv(65536)
            assert chunk, data
            data += chunk
    assert data.index(b'"item":1') < data.index(b'"item":2')


def test_malformed_request_gets_400_and_no_worker_dies(starlette: ServerProcess) -> None:
    workers = sorted(starlette.workers())
    for garbage in (b"GET / HTTP/1.1\r\nHost: t\r\nNo colon here\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\r\n\r\n"):
        with connect(starlette.address) as sock:
            sock.sendall(garbage)
            response = b""
            while chunk := sock.recv(65536):
                response += chunk
        assert response.startswith(b"HTTP/1.1 400"), response[:80]
    assert get_json(starlette.address, "/items/3")["item"] == 3
    assert sorted(starlette.workers()) == workers and all(pid_alive(p) for p in workers)


def test_websocket_echo(starlette: ServerProcess) -> None:
    host, _, port = starlette.address.rpartition(":")
    with ws_connect(f"ws://{host}:{port}/ws", open_timeout=10, close_timeout=5) as ws:
        assert str(ws.recv(timeout=10)).startswith("hello from ")
        for text in ("one", "two" * 1000):
            ws.send(text)
            assert ws.recv(timeout=10) == text


def test_lifespan_startup_ran_once_per_worker_before_its_first_request(starlette: ServerProcess) -> None:
    seen: dict[int, dict[str, Any]] = {}
    wait_for(lambda: seen.update({(r := get_json(starlette.address))["pid"]: r}) or len(seen) == 2, 10,
             what="answers from both workers")
    for answer in seen.values():
        assert answer["startups"] == 1  # in that worker's process
        assert answer["started_at"] < answer["now"]  # lifespan state reached the request
    startups = starlette.events("lifespan_startup")
    assert sorted(e["pid"] for e in startups) == sorted(seen)


# ------------------------------------------------------------------ health, drain
def test_cluster_health_counts_a_websocket_as_one_active_connection() -> None:
    with cli_server("starlette_app", health=True) as server:
        server.wait_ready(2)
        host, _, port = server.address.rpartition(":")

        def counts() -> tuple[int, int]:
            doc = server.cluster_health()
            return doc["connections_in_flight"], sum(w["connections_active"] for w in doc["workers"])

        with ws_connect(f"ws://{host}:{port}/ws", open_timeout=10) as ws:
            ws.recv(timeout=10)
            wait_for(lambda: counts() == (1, 1), 10, what="one connection in flight and active")
        wait_for(lambda: counts() == (0, 0), 10, what="no connection after the WebSocket closed")


@pytest.mark.parametrize("flags", [[], ["--http", "h11", "--loop", "asyncio"]], ids=["auto", "h11-asyncio"])
def test_rolling_restart_under_keep_alive_load_loses_no_request(flags: list[str]) -> None:
    with cli_server("starlette_app", *flags, health=True) as server:
        old = set(server.wait_ready(2))
        load = KeepAliveLoad(server.address, clients=4)
        try:
            load.wait_requests(200)
            server.signal(signal.SIGUSR2)
            new = set(server.wait_replaced(old, 2))
            load.wait_requests(load.ok + 200)
        finally:
            load.stop()
        assert load.failed == [], load.failed[:5]
        assert old <= load.pids.keys() and new & load.pids.keys()  # both generations answered
        # A draining worker answered with Connection: close instead of dropping the connection...
        assert load.told_to_close & old
        # ...and ran its lifespan shutdown.
        assert {e["pid"] for e in server.events("lifespan_shutdown")} >= old


class KeepAliveLoad:
    """Client threads, each sending requests on one keep-alive connection (reconnecting
    only when the server says ``Connection: close``); any exception is a failed request."""

    def __init__(self, address: str, clients: int, max_seconds: float = 60.0) -> None:
        self.address = address
        self.ok = 0
        self.failed: list[str] = []
        self.pids: dict[int, int] = {}
        self.told_to_close: set[int] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        conn = http_conn(self.address)
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            try:
                status, headers, body = call(conn, "GET", "/")
                pid = json.loads(body)["pid"]
            except Exception as exc:
                with self._lock:
                    self.failed.append(repr(exc))
                conn.close()
                continue
            with self._lock:
                self.ok += 1
                self.pids[pid] = self.pids.get(pid, 0) + 1
                if headers.get("connection") == "close":
                    self.told_to_close.add(pid)
        conn.close()

    def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        wait_for(lambda: self.ok + len(self.failed) >= count, timeout, what=f"{count} requests")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def test_drain_closes_idle_keep_alive_connections_and_websockets_with_1012() -> None:
    with cli_server("starlette_app", "--graceful-timeout", "3", health=True) as server:
        old = set(server.wait_ready(2))
        host, _, port = server.address.rpartition(":")
        idle = http_conn(server.address)
        call(idle, "GET", "/")
        with ws_connect(f"ws://{host}:{port}/ws", open_timeout=10, close_timeout=5) as ws:
            ws.recv(timeout=10)
            started = time.monotonic()
            server.signal(signal.SIGUSR2)
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=20)
            assert closed.value.rcvd is not None and closed.value.rcvd.code == 1012  # service restart
            assert time.monotonic() - started > 1.5  # not before the graceful time was (nearly) up
        assert idle.sock is not None
        idle.sock.settimeout(10)
        assert idle.sock.recv(1) == b""  # closed by the server, not reset
        server.wait_replaced(old, 2)


def test_silent_connections_close_after_client_timeout() -> None:
    with cli_server("starlette_app", "--client-timeout", "0.5", workers=1) as server:
        server.wait_ready(1)
        with connect(server.address) as silent:  # never sends its first request
            assert silent.recv(1) == b""  # closed by the server (a 10 s timeout fails the test)
        conn = http_conn(server.address)
        call(conn, "GET", "/")
        assert conn.sock is not None
        assert conn.sock.recv(1) == b""  # idle after a response: closed too
        conn.close()


def test_proxy_headers_only_when_asked() -> None:
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    with cli_server("starlette_app", "--proxy-headers", workers=1) as trusting:
        trusting.wait_ready(1)
        conn = http_conn(trusting.address)
        assert json.loads(call(conn, "GET", "/client", headers=forwarded)[2]) == {"host": "203.0.113.7",
                                                                                  "scheme": "https"}
        conn.close()


def test_proxy_headers_are_ignored_by_default(starlette: ServerProcess) -> None:
    forwarded = {"X-Forwarded-For": "203.0.113.7", "X-Forwarded-Proto": "https"}
    conn = http_conn(starlette.address)
    assert json.loads(call(conn, "GET", "/client", headers=forwarded)[2]) == {"host": "127.0.0.1", "scheme": "http"}
    conn.close()


# ------------------------------------------------------------------ boot failures
def test_a_startup_that_raises_stops_the_cli_with_the_apps_error() -> None:
    with cli_server("failing_app") as server:
        assert server.wait(30) == 3
        assert "cannot reach the database (web_apps.failing_app)" in server.log()


def test_an_ambiguous_app_is_a_boot_error_naming_the_interface_flag() -> None:
    with cli_server("ambiguous") as server:
        assert server.wait(30) == 3
        assert "--interface" in server.log()


# ------------------------------------------------------------------ WSGI
def test_flask_app_in_a_thread_pool() -> None:
    with cli_server("flask_app", "--threads", "2", workers=1) as server:
        server.wait_ready(1)
        conn = http_conn(server.address)
        status, headers, body = call(conn, "GET", "/")
        assert status == 200 and json.loads(body)["framework"] == "flask"
        status, _, body = call(conn, "POST", "/json", {"x": [1, 2]})
        assert status == 201 and json.loads(body)["got"] == {"x": [1, 2]}
        assert call(conn, "GET", "/stream")[2] == b"".join(f"chunk {i}\n".encode() for i in range(5))
        data = os.urandom(3 << 20)
        _, _, body = call(conn, "POST", "/upload", data, {"Content-Type": "application/octet-stream"})
        assert json.loads(body) == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
        assert call(conn, "GET", "/missing")[0] == 404
        conn.close()
        # Two requests at once in one worker: only two threads can both pass the barrier.
        results: list[Any] = []
        threads = [threading.Thread(target=lambda: results.append(get_json(server.address, "/barrier")))
                   for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(15)
        assert len({r["thread"] for r in results}) == 2


# ------------------------------------------------------------------ the example
def test_example_fastapi_app() -> None:
    command = [sys.executable, str(ROOT / "examples" / "fastapi_app.py"), "--bind", "127.0.0.1:0", "--workers", "2"]
    with ServerProcess(command=command) as server:
        server.wait_ready(2)
        conn = http_conn(server.address)
        assert json.loads(call(conn, "GET", "/")[2])["hello"] == "world"
        status, _, body = call(conn, "POST", "/items", {"name": "pen", "price": 2.5})
        assert status == 201 and json.loads(body) == {"name": "pen", "price_with_tax": 3.0}
        assert call(conn, "POST", "/items", {"name": "pen"})[0] == 422  # FastAPI's validation
        conn.close()
        host, _, port = server.address.rpartition(":")
        with ws_connect(f"ws://{host}:{port}/ws", open_timeout=10) as ws:
            ws.send("hi")
            assert ws.recv(timeout=10) == "echo: hi"

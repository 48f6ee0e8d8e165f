"""A fleet of dispatch servers behind a real HAProxy on loopback.

- the deploy: HAProxy health-checks each server's ``/readyz`` on its probe port, sends
  PROXY v2, and a bounded load runs through it while the servers are replaced host by host
  (SIGTERM with ``--drain-delay``, wait for the exit, start the new one, wait until
  HAProxy's runtime API says UP, next), with zero failed requests, keep-alive and a new
  connection per request both. Run with ``-s`` to see the counts (the README quotes them);
- handlers see the client's address through ``send-proxy`` (v1) and ``send-proxy-v2``;
- a server that does not trust HAProxy's address refuses its headers;
- agent-check weights follow the load, read back from HAProxy's stats socket.

Skipped when ``haproxy`` is not installed; ``.ci/run`` installs it.
"""

from __future__ import annotations

import http.client
import json
import signal
import socket
import threading
import time
from typing import Any

import pytest

from tests.haproxy import HAPROXY, HAProxy
from tests.helpers import ServerProcess, free_port, http_get, wait_for

pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")

GLOBAL = """
global
    stats socket {stats} mode 600 level admin
    maxconn 2000

defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 1s
    retries 3
    option redispatch
    retry-on all-retryable-errors
"""

DRAIN_DELAY = 1.5



class Host:
    """The ports of one dispatch server, kept across its restarts."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bind, self.probe, self.agent = (f"127.0.0.1:{free_port()}" for _ in range(3))

    def port(self, address: str) -> str:
        return address.rsplit(":", 1)[1]

    def server_line(self, proxy: str = "send-proxy-v2", checks: str = "option") -> str:
        return (f"    server {self.name} {self.bind} {proxy} check port {self.port(self.probe)} "
                f"inter 200ms fall 2 rise 2 agent-check agent-port {self.port(self.agent)} "
                f"agent-inter 300ms weight 100\n")

    def start(self, handler: str = "tests.web_apps:starlette_app", *extra: str) -> ServerProcess:
        return ServerProcess(handler, cli=[
            "--workers", "1", "--bind", self.bind, "--probe", self.probe, "--agent", self.agent,
            "--drain-delay", str(DRAIN_DELAY), "--graceful-timeout", "10", "--log-level", "info",
            "--proxy-protocol", "v2", "--proxy-allow", "127.0.0.1", *extra])


class FleetLoad:
    """Client threads sending GET / through HAProxy, bounded in count and time."""

    def __init__(self, address: str, keep_alive: bool, clients: int = 4, max_requests: int = 100_000,
                 max_seconds: float = 90.0, pause: float = 0.002) -> None:
        host, _, port = address.rpartition(":")
        self.host, self.port, self.keep_alive = host, int(port), keep_alive
        self.pause = pause  # between a client's requests: a load, not a CPU hog on 2 cores
        self.ok = 0
        self.failed: list[str] = []
        self.pids: dict[int, int] = {}
        self._budget = max_requests
        self._deadline = time.monotonic() + max_seconds
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        headers = {} if self.keep_alive else {"Connection": "close"}
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            with self._lock:
                if self._budget <= 0:
                    break
                self._budget -= 1
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
                conn.request("GET", "/", headers=headers)
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    raise ValueError(f"status {response.status}: {body[:100]!r}")
                pid = int(json.loads(body)["pid"])
                if not self.keep_alive or response.will_close:
                    conn.close()
                    conn = None
            except (OSError, ValueError, http.client.HTTPException) as exc:
                with self._lock:
                    self.failed.append(repr(exc))
                if conn is not None:
                    conn.close()
                conn = None
                continue
            with self._lock:
                self.ok += 1
                self.pids[pid] = self.pids.get(pid, 0) + 1
            time.sleep(self.pause)
        if conn is not None:
            conn.close()

    def wait_more(self, count: int, timeout: float = 30.0) -> None:
        target = self.ok + count
        wait_for(lambda: self.ok >= target or not any(t.is_alive() for t in self._threads), timeout,
                 what=f"{count} more requests")
        assert self.ok >= target, "the load ended (its budget of requests or time is spent)"

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


@pytest.mark.parametrize("keep_alive", [True, False], ids=["keep-alive", "new-connection"])
def test_deploy_host_by_host_through_haproxy_without_a_failed_request(keep_alive: bool) -> None:
    hosts = [Host("s1"), Host("s2")]
    front = f"127.0.0.1:{free_port()}"
    config = GLOBAL + f"""
frontend fe
    bind {front}
    default_backend app

backend app
    balance roundrobin
    option httpchk GET /readyz
    http-check expect status 200
""" + "".join(h.server_line() for h in hosts)
    servers = [h.start() for h in hosts]
    load: FleetLoad | None = None
    try:
        with HAProxy(config) as lb:
            for h in hosts:
                lb.wait_status("app", h.name, "UP")
            load = FleetLoad(front, keep_alive)
            load.wait_more(50)
            replaced_workers = []
            for i, h in enumerate(hosts):
                old = servers[i]
                old.signal(signal.SIGTERM)
                # HAProxy takes it out while it still serves (drain_delay), not after.
                wait_for(lambda h=h: lb.status("app", h.name) != "UP", DRAIN_DELAY, interval=0.02,
                         what=f"haproxy to take {h.name} out within the drain delay")
                assert old.proc.poll() is None
                assert old.wait(30) == 0
                old.stop()
                servers[i] = h.start()
                lb.wait_status("app", h.name, "UP", 20)
                replaced_workers += servers[i].wait_ready(1)
                load.wait_more(50)
            wait_for(lambda: all(load.pids.get(pid) for pid in replaced_workers), 20,
                     what="every new server to answer through haproxy")
            load.stop()
    finally:
        if load is not None:
            load.stop()
        for server in servers:
            server.stop()
    mode = "keep-alive" if keep_alive else "new connection per request"
    print(f"\ndeploy through HAProxy, {mode}: {load.ok + len(load.failed)} requests, "
          f"{len(load.failed)} failed")
    assert load.failed == [], load.failed[:10]


def test_handlers_see_the_client_through_send_proxy_v1_and_v2_and_untrusted_is_refused() -> None:
    trusting, distrusting = Host("s1"), Host("s2")
    fronts = {name: f"127.0.0.1:{free_port()}" for name in ("v1", "v2", "untrusted")}
    config = GLOBAL + "".join(f"""
frontend f_{name}
    bind {fronts[name]}
    default_backend b_{name}
""" for name in fronts) + f"""
backend b_v1
{trusting.server_line("send-proxy")}
backend b_v2
{trusting.server_line("send-proxy-v2")}
backend b_untrusted
    retries 1
{distrusting.server_line("send-proxy-v2")}
"""
    server = ServerProcess("tests.apps:addr_app", cli=[
        "--workers", "1", "--bind", trusting.bind, "--probe", trusting.probe, "--agent", trusting.agent,
        "--proxy-protocol", "auto", "--proxy-allow", "127.0.0.0/30"])
    refusing = ServerProcess("tests.apps:addr_app", cli=[
        "--workers", "1", "--bind", distrusting.bind, "--probe", distrusting.probe, "--agent",
        distrusting.agent, "--proxy-protocol", "v2", "--proxy-allow", "10.0.0.0/8", "--log-level", "debug"])
    try:
        with HAProxy(config) as lb:
            for backend, name in (("b_v1", "s1"), ("b_v2", "s1"), ("b_untrusted", "s2")):
                lb.wait_status(backend, name, "UP")
            for version in ("v1", "v2"):
                for _ in range(3):
                    with socket.socket() as sock:  # from 127.0.0.2, to see the address travel
                        sock.settimeout(10)
                        sock.bind(("127.0.0.2", 0))
                        sock.connect(("127.0.0.1", int(fronts[version].rsplit(":", 1)[1])))
                        port = sock.getsockname()[1]
                        sock.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                        answer = b""
                        while chunk := sock.recv(65536):
                            answer += chunk
                    assert answer.split(b" ", 2)[1] == b"200", answer
                    words = answer.split(b"\r\n\r\n", 1)[1].decode().split()
                    assert (words[3], int(words[4])) == ("127.0.0.2", port), (version, words)
            # HAProxy's headers to a server that does not trust it: refused, so HAProxy
            # answers 5xx; the same server serves a direct client without a header.
            status, _ = http_get(fronts["untrusted"])
            assert status >= 500
            status, body = http_get(distrusting.bind)
            assert status == 200 and body.split()[3] == "127.0.0.1"
    finally:
        server.stop()
        refusing.stop()


def test_agent_check_weights_follow_the_load_in_haproxy() -> None:
    host = Host("s1")
    config = GLOBAL + f"""
backend app
    balance roundrobin
{host.server_line()}
"""
    server = host.start("tests.apps:burn_app", "--threads", "2", "--proxy-protocol", "off")
    try:
        with HAProxy(config) as lb:
            lb.wait_status("app", "s1", "UP")
            wait_for(lambda: lb.weight("app", "s1") == 100, 10, what="weight 100 when idle")
            stop = time.monotonic() + 30

            def burn() -> None:
                while time.monotonic() < stop:
                    http_get(host.bind, "/burn/300")

            burners = [threading.Thread(target=burn, daemon=True) for _ in range(2)]
            for thread in burners:
                thread.start()
            try:
                weights: list[Any] = []
                wait_for(lambda: weights.append(lb.weight("app", "s1")) or weights[-1] <= 60, 20,
                         interval=0.2, what="haproxy's weight to fall under load")
            finally:
                stop = 0
                for thread in burners:
                    thread.join(10)
            wait_for(lambda: lb.weight("app", "s1") >= 90, 20, interval=0.2,
                     what="haproxy's weight to come back when idle")
            # Maintenance: the agent says drain, HAProxy shows DRAIN; and back.
            server.signal(signal.SIGWINCH)
            lb.wait_status("app", "s1", "DRAIN (agent)", 10)
            server.signal(signal.SIGWINCH)
            lb.wait_status("app", "s1", "UP", 10)
            print(f"\nagent-check weights seen in haproxy under load: {weights}")
    finally:
        server.stop()

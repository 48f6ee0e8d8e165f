"""Behind a load balancer, without one: PROXY protocol in the worker, drain_delay,
maintenance (SIGWINCH), the probe port and the agent-check port, each against a real
server, with attacks on the new ports. The same with a real HAProxy: tests/test_haproxy.py."""

from __future__ import annotations

import json
import signal
import socket
import time
from typing import Any

import pytest

from dispatch.proxy_protocol import v1_header, v2_header
from tests.helpers import ServerProcess, connect, fd_count, free_port, http_get, wait_for


def exchange(address: str, data: bytes, source: str | None = None, timeout: float = 10.0) -> bytes:
    """Send ``data`` on a new connection (from ``source``, a local address, if given) and
    read until the server closes; b"" when it closed (or reset) without answering."""
    host, _, port = address.rpartition(":")
    sock = socket.socket()
    sock.settimeout(timeout)
    try:
        if source is not None:
            sock.bind((source, 0))
        sock.connect((host, int(port)))
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
        return answer
    except ConnectionResetError:
        return b""
    finally:
        sock.close()


GET = b"GET / HTTP/1.1\r\nHost: t\r\n\r\n"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (``/proc/PID/stat``)."""
    import os

    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def client_of(answer: bytes) -> tuple[str, int]:
    """``(host, port)`` from an addr_app answer."""
    words = answer.split(b"\r\n\r\n", 1)[1].decode().split()
    return words[3], int(words[4])


def agent_line(address: str) -> str:
    with connect(address, 5) as sock:
        data = b""
        while chunk := sock.recv(100):
            data += chunk
    return data.decode()


# ------------------------------------------------------------------ PROXY protocol
@pytest.mark.parametrize("mode", ["v1", "v2", "auto"])
def test_plain_handler_sees_the_client_from_the_header(mode: str) -> None:
    with ServerProcess("tests.apps:addr_app", proxy_protocol=mode, proxy_allow="127.0.0.1/32",
                       client_timeout=1.0) as server:
        if mode in ("v1", "auto"):
            answer = exchange(server.address, v1_header(("203.0.113.9", 4242), ("10.0.0.1", 80)) + GET)
            assert client_of(answer) == ("203.0.113.9", 4242)
        if mode in ("v2", "auto"):
            answer = exchange(server.address, v2_header(("2001:db8::5", 7, 0, 0), ("::1", 80, 0, 0)) + GET)
            assert client_of(answer) == ("2001:db8::5", 7)
            # LOCAL (the balancer's own check): the connection's own address.
            host, port = client_of(exchange(server.address, v2_header(None) + GET))
            assert host == "127.0.0.1" and port > 0
        # Headers of the other version, garbage, no header at all: closed unanswered.
        other = v2_header(("1.2.3.4", 1), ("5.6.7.8", 2)) if mode == "v1" else b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
        refused = [GET, b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n" + GET, b"\r\n\r\n\x00\r\nQUIT\n\x99" + bytes(40)]
        if mode != "auto":
            refused.append(other + GET)
        for data in refused:
            assert exchange(server.address, data) == b"", data
        # The server is fine afterwards.
        assert client_of(exchange(server.address, (v1_header if mode != "v2" else v2_header)(
            ("198.51.100.1", 1), ("10.0.0.1", 80)) + GET)) == ("198.51.100.1", 1)


def test_untrusted_senders_may_not_send_a_header_but_are_served_without_one() -> None:
    with ServerProcess("tests.apps:addr_app", proxy_protocol="auto", proxy_allow="127.0.0.1/32") as server:
        spoof = v1_header(("203.0.113.9", 4242), ("10.0.0.1", 80)) + GET
        assert exchange(server.address, spoof, source="127.0.0.2") == b""
        assert exchange(server.address, v2_header(("203.0.113.9", 1), ("10.0.0.1", 80)) + GET,
                        source="127.0.0.2") == b""
        assert client_of(exchange(server.address, GET, source="127.0.0.2"))[0] == "127.0.0.2"


def test_a_stalled_half_header_is_closed_after_client_timeout_and_costs_nothing() -> None:
    # One worker with one thread: a connection waiting for its header must not hold it.
    with ServerProcess("tests.apps:addr_app", workers=1, threads=1, proxy_protocol="v2",
                       client_timeout=2.0) as server:
        header = v2_header(("203.0.113.9", 4242), ("10.0.0.1", 80))
        assert client_of(exchange(server.address, header + GET)) == ("203.0.113.9", 4242)
        worker = server.wait_ready(1)[0]
        fds = fd_count(worker)
        stalled = []
        for cut in (5, 16, 20):  # inside the signature, the head, the addresses
            sock = connect(server.address)
            sock.sendall(header[:cut])
            stalled.append(sock)
        silent = [connect(server.address) for _ in range(3)]
        # The worker keeps serving others meanwhile, and waits without spinning: bytes
        # peeked at stay readable, so a reader on the loop would fire without end.
        cpu = cpu_seconds(worker)
        asked = time.monotonic()
        assert client_of(exchange(server.address, header + GET)) == ("203.0.113.9", 4242)
        assert time.monotonic() - asked < 1.0  # not after the stalled ones' 2 s
        time.sleep(0.5)
        assert cpu_seconds(worker) - cpu < 0.25
        started = time.monotonic()
        for sock in stalled + silent:
            sock.settimeout(5)
            try:
                assert sock.recv(10) == b""  # closed by the server
            except ConnectionResetError:
                pass  # closed with the half header unread: a reset
            sock.close()
        assert time.monotonic() - started < 5
        wait_for(lambda: fd_count(worker) <= fds, 5, what="the worker's descriptors back")
        # A 4 KiB+ v2 header is refused from its head alone.
        huge = b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\xff\xff"
        assert exchange(server.address, huge) == b""


def test_web_apps_see_the_client_as_asgi_client_and_wsgi_remote_addr() -> None:
    pytest.importorskip("uvicorn")
    for app, interface in (("tests.web_apps:starlette_app", "asgi"), ("tests.web_apps:flask_app", "wsgi")):
        with ServerProcess(app, interface=interface, proxy_protocol="auto") as server:
            for header in (v1_header(("203.0.113.9", 4242), ("10.0.0.1", 80)),
                           v2_header(("2001:db8::5", 7, 0, 0), ("::1", 80, 0, 0))):
                # Keep-alive: two requests on one connection, the header only once.
                with connect(server.address) as sock:
                    sock.sendall(header + b"GET /client HTTP/1.1\r\nHost: t\r\n\r\n")
                    first = _read_response(sock)
                    sock.sendall(b"GET /client HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    second = _read_response(sock)
                expected = "203.0.113.9" if b"PROXY" in header else "2001:db8::5"
                for body in (first, second):
                    assert json.loads(body)["host"] == expected, (interface, body)


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")))
    while len(body) < length:
        body += sock.recv(65536)
    return body


# ------------------------------------------------------------------ drain_delay, maintenance, probe
def test_drain_delay_turns_readyz_503_at_once_and_serves_until_it_is_over() -> None:
    probe = f"127.0.0.1:{free_port()}"
    with ServerProcess(drain_delay=2.0, probe=probe) as server:
        server.wait_ready(2)
        assert http_get(probe, "/readyz")[0] == 200
        server.signal(signal.SIGTERM)
        wait_for(lambda: http_get(probe, "/readyz")[0] == 503, 2, what="/readyz 503")
        signalled = time.monotonic()
        served = 0
        while time.monotonic() - signalled < 1.5:  # well inside the delay
            assert http_get(server.address)[0] == 200
            served += 1
        assert served > 0 and server.proc.poll() is None
        assert server.wait(10) == 0
        assert time.monotonic() - signalled >= 1.9


def test_sigwinch_drains_and_undrains_while_serving() -> None:
    probe, agent = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with ServerProcess(probe=probe, agent=agent) as server:
        server.wait_ready(2)
        assert agent_line(agent).startswith("up ready ")
        server.signal(signal.SIGWINCH)
        wait_for(lambda: http_get(probe, "/readyz")[0] == 503, 5, what="/readyz 503")
        assert "maintenance" in http_get(probe, "/readyz")[1]
        assert agent_line(agent) == "drain\n"
        assert http_get(server.address)[0] == 200  # serving on
        assert server.workers() and len(server.cluster_health()["workers"]) == 2
        server.signal(signal.SIGWINCH)
        wait_for(lambda: http_get(probe, "/readyz")[0] == 200, 5, what="/readyz 200 again")
        assert agent_line(agent).startswith("up ready ")
        server.signal(signal.SIGTERM)
        wait_for(lambda: server.proc.poll() is not None, 20, what="exit")


def test_the_probe_port_serves_probes_only() -> None:
    probe = f"127.0.0.1:{free_port()}"
    with ServerProcess(probe=probe) as server:
        server.wait_ready(2)
        assert http_get(probe, "/healthz")[0] == 200 and http_get(probe, "/readyz")[0] == 200
        assert http_get(probe, "/cluster-health")[0] == 404 and http_get(probe, "/metrics")[0] == 404
        assert server.health is not None and http_get(server.health, "/cluster-health")[0] == 200


def test_embedding_drain_and_undrain() -> None:
    import threading

    import dispatch

    probe = f"127.0.0.1:{free_port()}"
    server = dispatch.Server("tests.apps:pid_app", workers=1, bind="127.0.0.1:0", probe=probe, log_level="warning")
    server.start()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        wait_for(lambda: http_get(probe, "/readyz")[0] == 200, 15, what="ready")
        server.drain()
        wait_for(lambda: http_get(probe, "/readyz")[0] == 503, 5, what="drained")
        assert server.draining_reason is not None
        assert http_get(server.addresses[0])[0] == 200
        server.undrain()
        wait_for(lambda: http_get(probe, "/readyz")[0] == 200, 5, what="undrained")
    finally:
        server.stop()
        thread.join(30)
    assert not thread.is_alive()


# ------------------------------------------------------------------ the agent port
def test_agent_weight_follows_the_workers_cpu() -> None:
    agent = f"127.0.0.1:{free_port()}"
    with ServerProcess("tests.apps:burn_app", workers=1, threads=2, agent=agent, timeout=5.0) as server:
        server.wait_ready(1)
        assert agent_line(agent).startswith("up ready ")

        def weight() -> int:
            return int(agent_line(agent).split()[-1].rstrip("%"))

        wait_for(lambda: weight() >= 90, 10, interval=0.3, what="a high weight when idle")
        stop = time.monotonic() + 20
        import threading

        def burn() -> None:
            while time.monotonic() < stop:
                http_get(server.address, "/burn/300")

        burners = [threading.Thread(target=burn, daemon=True) for _ in range(2)]
        for thread in burners:
            thread.start()
        try:
            wait_for(lambda: weight() <= 60, 15, interval=0.3, what="the weight to fall")
        finally:
            stop = 0
            for thread in burners:
                thread.join(10)
        wait_for(lambda: weight() >= 90, 15, interval=0.3, what="the weight to come back")


def test_agent_and_probe_ports_shrug_off_floods_idle_clients_and_garbage() -> None:
    probe, agent = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    with ServerProcess(probe=probe, agent=agent) as server:
        server.wait_ready(2)
        assert agent_line(agent).startswith("up ready")
        fds = fd_count(server.pid)
        idle = [connect(probe) for _ in range(80)] + [connect(agent) for _ in range(20)]
        for sock in idle[:40]:
            sock.sendall(b"\x00\xff garbage \r\n" * 10)
        flood: list[Any] = []
        for _ in range(300):  # connect and go away, without reading
            sock = socket.create_connection(("127.0.0.1", int(agent.rsplit(":", 1)[1])))
            sock.sendall(b"x" * 100)
            flood.append(sock)
        for sock in flood:
            sock.close()
        # Probes and the agent still answer, and the dispatching goes on.
        assert http_get(probe, "/healthz")[0] == 200
        assert agent_line(agent).startswith("up ready")
        assert http_get(server.address)[0] == 200
        for sock in idle:
            sock.close()
        wait_for(lambda: fd_count(server.pid) <= fds, 10, what="the primary's descriptors back")
        assert server.proc.poll() is None


def test_server_speaks_first_serves_untrusted_clients_at_once() -> None:
    with ServerProcess("tests.apps:banner_app", server_speaks_first=True, proxy_protocol="v1",
                       proxy_allow="127.0.0.1/32", client_timeout=5.0) as server:
        started = time.monotonic()
        # A direct client that waits for the banner, sending nothing: served at once.
        assert exchange(server.address, b"", source="127.0.0.2").split()[:3] == [b"220", b"addr", b"127.0.0.2"]
        assert time.monotonic() - started < 2
        # The balancer's header comes first, as always.
        header = v1_header(("203.0.113.9", 1), ("10.0.0.1", 80))
        assert exchange(server.address, header).split()[2:4] == [b"203.0.113.9", b"1"]


def test_coroutine_handlers_ask_dispatch_client_address() -> None:
    with ServerProcess("tests.apps:async_addr_app", proxy_protocol="auto") as server:
        answer = exchange(server.address, v2_header(("203.0.113.9", 4242), ("10.0.0.1", 80)) + GET)
        assert client_of(answer) == ("203.0.113.9", 4242)
        assert client_of(exchange(server.address, GET, source="127.0.0.2"))[0] == "127.0.0.2"


def test_websockets_see_the_client_from_the_header() -> None:
    pytest.importorskip("uvicorn")
    from websockets.sync.client import connect as ws_connect

    with ServerProcess("tests.web_apps:starlette_app", interface="asgi", proxy_protocol="v2") as server:
        host, _, port = server.address.rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=10)
        sock.sendall(v2_header(("203.0.113.77", 5555), ("10.0.0.1", 80)))
        with ws_connect(f"ws://{server.address}/ws-client", sock=sock, open_timeout=10) as ws:
            assert ws.recv(timeout=10) == "203.0.113.77"


@pytest.mark.parametrize("balance", ["shared", "reuseport"])
def test_kernel_modes_read_the_header_too(balance: str) -> None:
    with ServerProcess("tests.apps:addr_app", balance=balance, proxy_protocol="v1") as server:
        server.wait_ready(2)  # reuseport: the workers' own listeners exist once they are ready
        answer = exchange(server.address, v1_header(("203.0.113.9", 4242), ("10.0.0.1", 80)) + GET)
        assert client_of(answer) == ("203.0.113.9", 4242)


def test_sigwinch_from_a_resized_terminal_is_not_a_drain() -> None:
    # In a terminal's foreground a window resize sends SIGWINCH: that must not take the
    # server out of a load balancer. The primary runs as the foreground job of a pty.
    import fcntl
    import os
    import pty
    import subprocess
    import sys
    import termios

    from tests.helpers import ROOT, children, pid_alive

    health = f"127.0.0.1:{free_port()}"
    master, slave = pty.openpty()

    def own_terminal() -> None:  # after setsid: the pty becomes our controlling terminal
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen(
        [sys.executable, "-m", "dispatch", "tests.apps:pid_app", "--bind", "127.0.0.1:0", "--workers", "1",
         "--health", health],
        cwd=ROOT, stdin=slave, stdout=slave, stderr=subprocess.DEVNULL, start_new_session=True,
        preexec_fn=own_terminal, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    os.close(slave)
    try:
        def ready() -> bool:
            try:
                return http_get(health, "/readyz")[0] == 200
            except OSError:  # not listening yet
                return False

        wait_for(ready, 20, what="ready")
        proc.send_signal(signal.SIGWINCH)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTTIN)  # handled after the SIGWINCH: a marker we can see
        wait_for(lambda: len(children(proc.pid)) == 2, 20, what="the second worker")
        wait_for(lambda: http_get(health, "/cluster-health")[1].count('"ready"') == 2, 20,
                 what="two workers ready")
        assert http_get(health, "/readyz")[0] == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        os.close(master)
    assert not pid_alive(proc.pid)

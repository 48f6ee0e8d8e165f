"""Embedding and ecosystem: examples, hooks, sticky sessions, systemd, TLS, privileges."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from dispatch.balance import Sticky
from tests.helpers import (
    ROOT,
    ServerProcess,
    answering_pid,
    connect,
    free_port,
    listening_sockets,
    wait_for,
)

EXAMPLES = ROOT / "examples"


def _example(name: str, *args: str) -> ServerProcess:
    return ServerProcess(command=[sys.executable, str(EXAMPLES / name), "--bind", "127.0.0.1:0",
                                  "--workers", "2", *args])


def test_example_asyncio_protocol_echoes() -> None:
    with _example("asyncio_protocol.py") as server:
        server.wait_ready(2)
        with connect(server.address) as sock:
            greeting = sock.recv(100)
            assert greeting.startswith(b"echo from worker pid")
            sock.sendall(b"ping\n")
            assert sock.recv(100) == b"ping\n"


def test_example_line_service() -> None:
    with _example("line_service.py") as server:
        server.wait_ready(2)
        with connect(server.address) as sock, sock.makefile("rwb") as stream:
            assert stream.readline().startswith(b"ready, worker pid")
            stream.write(b"hello there\nquit\n")
            stream.flush()
            assert stream.readline() == b"HELLO THERE\n"
            assert stream.readline() == b"bye\n"


def _from(source_ip: str, address: str) -> str:
    host, _, port = address.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10, source_address=(source_ip, 0)) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := sock.recv(4096):
            data += chunk
    return data.split(b"\r\n\r\n", 1)[1].decode()


def test_example_sticky_sessions_keep_a_client_on_one_worker() -> None:
    with _example("sticky_sessions.py") as server:
        server.wait_ready(2)
        seen: dict[str, set[int]] = {}
        for i in range(100):
            client = f"127.0.0.{2 + i % 4}"  # four clients, all on loopback
            seen.setdefault(client, set()).add(int(_from(client, server.address).split()[2]))
        assert all(len(pids) == 1 for pids in seen.values()), seen
        assert len(set().union(*seen.values())) == 2  # new clients were spread over both workers
        # The worker remembers each client: its counter reached 25 connections.
        assert "seen 127.0.0.2 26 times" in _from("127.0.0.2", server.address)


def test_sticky_policy_unit() -> None:
    policy = Sticky(max_clients=2)
    assert policy.choose("a", [0, 1], [5, 0]) == 1  # new client: least loaded
    assert policy.choose("a", [0, 1], [0, 9]) == 1  # known client: same worker
    assert policy.choose("a", [0, 2], [0, 3]) == 0  # its worker is gone: least loaded again
    assert policy.choose("a", [0, 2], [9, 0]) == 0  # and it sticks to the new one
    policy.choose("b", [0, 1], [0, 0])
    policy.choose("c", [0, 1], [0, 0])
    # The table is bounded: "a" was forgotten, so it is new again and goes to the least
    # loaded worker instead of sticking to worker 0.
    assert policy.choose("a", [0, 2], [9, 0]) == 1


def test_example_embedded_admin_endpoints_and_hooks() -> None:
    admin_port = free_port()
    with _example("embedded_admin.py", "--admin", f"127.0.0.1:{admin_port}") as server:
        server.wait_ready(2)
        admin = f"http://127.0.0.1:{admin_port}"

        def state() -> dict:
            return json.load(urllib.request.urlopen(f"{admin}/workers", timeout=10))

        def ready_pids() -> set[int] | None:
            workers = state()["workers"]
            ready = {w["pid"] for w in workers if w["state"] == "ready"}
            return ready if len(workers) == 2 and len(ready) == 2 else None

        assert {w["pid"] for w in state()["workers"]} == set(server.workers())
        victim = server.workers()[0]
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: any(e["pid"] == victim for e in state()["exits"]), what="exit recorded")
        before = wait_for(ready_pids, what="a ready replacement")
        assert victim not in before and before == set(server.workers())
        request = urllib.request.Request(f"{admin}/reload", method="POST")
        assert json.load(urllib.request.urlopen(request, timeout=10)) == {"reload": "requested"}
        # The restart is complete when two ready workers replaced the two before it,
        # and the application's hook saw both of those exit.
        after = wait_for(lambda: (pids := ready_pids()) and not pids & before and pids,
                         timeout=30, what="two new ready workers")
        wait_for(lambda: before <= {e["pid"] for e in state()["exits"]}, what="old workers' exits")
        assert after == set(server.workers())
        assert state()["reloads"] == 1



def test_on_worker_start_runs_in_each_worker(tmp_path: Path) -> None:
    script = tmp_path / "hooks.py"
    script.write_text(
        "import os, sys, dispatch\n"
        f"out = {str(tmp_path)!r}\n"
        "def started(worker_id):\n"
        "    open(os.path.join(out, f'worker-{worker_id}-{os.getpid()}'), 'w').close()\n"
        "def starting(server):\n"
        "    open(os.path.join(out, f'primary-{os.getpid()}'), 'w').close()\n"
        "dispatch.serve('tests.apps:pid_app', workers=2, bind='127.0.0.1:0',\n"
        "               on_worker_start=started, on_starting=starting)\n"
    )
    with ServerProcess(command=[sys.executable, str(script)]) as server:
        workers = server.wait_ready(2)
        names = {p.name for p in tmp_path.iterdir()}
        assert f"primary-{server.pid}" in names
        assert {f"worker-{i}-{pid}" for i, pid in enumerate(sorted(workers))} <= names | {
            f"worker-{i}-{pid}" for i, pid in enumerate(sorted(workers, reverse=True))}
        assert sum(name.startswith("worker-") for name in names) == 2


def test_socket_activation_uses_the_inherited_listener() -> None:
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    inode = os.fstat(listener.fileno()).st_ino
    # The child moves the socket to fd 3 and names itself in LISTEN_PID, as systemd does.
    launcher = (
        "import os, sys\n"
        f"os.dup2({listener.fileno()}, 3, inheritable=True)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'dispatch', 'tests.apps:pid_app',\n"
        "         '--workers', '2', '--bind', '127.0.0.1:1'])\n"
    )
    try:
        with ServerProcess(command=[sys.executable, "-c", launcher],
                           pass_fds=(listener.fileno(),)) as server:
            listener.close()  # only the server holds it now
            server.wait_ready(2)
            # The primary listens on the very socket it was given, and bound nothing of
            # its own (127.0.0.1:1 from --bind).
            assert {i for i, _ in listening_sockets(server.pid)} == {inode}
            assert server.address == f"127.0.0.1:{port}"
            from tests.helpers import request

            assert answering_pid(request(server.address)) in server.workers()
    finally:
        listener.close()


def test_sd_notify_messages(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    sink = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sink.bind(path)
    sink.settimeout(20)
    try:
        with ServerProcess(env={"NOTIFY_SOCKET": path}) as server:
            ready = sink.recv(4096).decode()
            assert "READY=1" in ready and "STATUS=2 workers ready" in ready
            server.signal(signal.SIGUSR2)
            assert "RELOADING=1" in sink.recv(4096).decode()
            assert "READY=1" in sink.recv(4096).decode()
            server.signal(signal.SIGTERM)
            assert "STOPPING=1" in sink.recv(4096).decode()
            assert server.wait(20) == 0
    finally:
        sink.close()


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a test certificate")
    directory = tmp_path_factory.mktemp("tls")
    cert, key = str(directory / "cert.pem"), str(directory / "key.pem")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", cert,
         "-days", "1", "-subj", "/CN=localhost", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )
    return cert, key


@pytest.mark.parametrize("handler", ["tests.apps:pid_app", "tests.apps:async_pid_app"])
def test_tls_handshake_happens_in_the_worker(certificate: tuple[str, str], handler: str) -> None:
    cert, key = certificate
    with ServerProcess(handler, cli=["--workers", "2", "--bind", "127.0.0.1:0", "--certfile", cert,
                                     "--keyfile", key]) as server:
        workers = server.wait_ready(2)
        context = ssl.create_default_context(cafile=cert)
        for _ in range(4):
            with connect(server.address) as raw, context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.sendall(b"GET / HTTP/1.0\r\n\r\n")
                data = b""
                while chunk := tls.recv(4096):
                    data += chunk
            assert answering_pid(data.split(b"\r\n\r\n", 1)[1].decode()) in workers


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to change user")
def test_workers_run_as_an_unprivileged_user() -> None:
    with ServerProcess(cli=["--workers", "2", "--bind", "127.0.0.1:0", "--user", "nobody"]) as server:
        workers = server.wait_ready(2)
        for pid in workers:
            uid_line = next(line for line in open(f"/proc/{pid}/status") if line.startswith("Uid:"))
            assert uid_line.split()[1] == "65534"
        assert os.stat(f"/proc/{server.pid}").st_uid == 0


def test_process_titles() -> None:
    pytest.importorskip("setproctitle")
    with ServerProcess() as server:
        workers = server.wait_ready(2)
        titles = {open(f"/proc/{pid}/cmdline").read().strip("\0 ") for pid in workers}
        assert titles == {"dispatch: worker 0", "dispatch: worker 1"}
        assert open(f"/proc/{server.pid}/cmdline").read().startswith("dispatch: primary")


def test_worker_log_records_carry_the_worker_id() -> None:
    import logging

    from dispatch.worker_boot import _tag_log_records

    previous = logging.getLogRecordFactory()
    try:
        _tag_log_records(3)
        record = logging.getLogger("dispatch.worker").makeRecord("x", logging.INFO, "f", 1, "m", (), None)
        assert record.worker_id == 3
    finally:
        logging.setLogRecordFactory(previous)

"""The control socket and ``dispatch ctl`` against real primaries: status, scale, reload,
stop, who may connect, and what bad peers get."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from dispatch import ctl_protocol
from dispatch.ctl import status_table
from dispatch.top import Rates
from tests.helpers import (
    ROOT,
    Load,
    ServerProcess,
    as_user,
    fd_count,
    http_get,
    pid_alive,
    request,
    unprivileged_user,
    wait_for,
)

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="switching to another uid needs root")


def ctl(control: Path | str, *args: str, prefix: list[str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """``python -m dispatch ctl --control PATH ARGS``: its exit code and output."""
    command = [*(prefix or []), sys.executable, "-m", "dispatch", "ctl", "--control", str(control), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def ctl_json(control: Path | str, *args: str) -> tuple[int, dict[str, Any]]:
    done = ctl(control, "--json", *args)
    return done.returncode, json.loads(done.stdout)


def raw(path: Path | str, data: bytes, timeout: float = 10) -> dict[str, Any]:
    """Send ``data`` as it is on a new connection; the one reply line, parsed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the primary answered and closed before taking it all
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return json.loads(reply)


@pytest.fixture
def server(tmp_path: Path) -> Any:
    with ServerProcess(control=str(tmp_path / "app.ctl")) as srv:
        srv.control = tmp_path / "app.ctl"
        srv.wait_ready(2)
        yield srv


# ------------------------------------------------------------------ status
def test_status_json_matches_cluster_health_and_the_real_pids(server: ServerProcess) -> None:
    code, reply = ctl_json(server.control, "status")
    assert code == 0 and reply["ok"] is True and reply["v"] == ctl_protocol.VERSION
    status = reply["status"]
    health = server.cluster_health()
    assert status["primary_pid"] == health["primary_pid"] == server.pid
    pids = sorted(w["pid"] for w in status["workers"])
    assert pids == sorted(w["pid"] for w in health["workers"]) == sorted(server.workers())
    assert [w["id"] for w in status["workers"]] == [0, 1]
    assert all(w["state"] == "ready" and not w["stalled"] for w in status["workers"])
    assert status["workers_wanted"] == 2 and status["restarting"] is False and status["upgrading"] is False
    assert set(status["workers"][0]) == set(health["workers"][0])
    # The table says the same to a person.
    done = ctl(server.control, "status")
    assert done.returncode == 0, done.stderr
    assert f"primary {server.pid}" in done.stdout
    assert all(str(pid) in done.stdout for pid in pids)
    # Only the owner may even open it.
    assert stat.S_IMODE(os.lstat(server.control).st_mode) == 0o600


def test_scale_to_four_then_two_fewer(server: ServerProcess) -> None:
    code, reply = ctl_json(server.control, "scale", "4")
    assert code == 0 and reply["workers"] == 4 and len(reply["pids"]) == 4
    assert set(reply["pids"]) <= set(server.workers())
    assert len(server.cluster_health()["workers"]) == 4
    code, reply = ctl_json(server.control, "scale", "-2")
    assert code == 0 and reply["workers"] == 2 and len(reply["pids"]) == 2
    wait_for(lambda: sorted(server.workers()) == sorted(reply["pids"]), 15, what="two workers left")
    code, reply = ctl_json(server.control, "scale", "+0")
    assert code == 0 and reply["workers"] == 2
    done = ctl(server.control, "scale", "0")
    assert done.returncode == 1 and "out of range" in done.stderr
    assert len(server.workers()) == 2


def test_reload_under_load_replaces_every_worker_without_an_error(server: ServerProcess) -> None:
    old = set(server.workers())
    load = Load(server.address, clients=4, max_requests=20_000, max_seconds=60)
    try:
        load.wait_requests(200)
        code, reply = ctl_json(server.control, "reload")
        load.wait_requests(load.ok + len(load.failed) + 200)
    finally:
        load.stop()
    assert code == 0 and reply["outcome"] == "complete", reply
    assert len(reply["workers"]) == 2 and not set(reply["workers"]) & old
    assert load.failed == [], load.failed[:5]
    assert not any(pid_alive(p) for p in old)


def test_reload_that_fails_reports_the_abort_and_why(tmp_path: Path) -> None:
    (tmp_path / "flaky_app.py").write_text("from tests.apps import pid_app as app\n")
    control = tmp_path / "app.ctl"
    with ServerProcess("flaky_app:app", cwd=tmp_path, cli=["--bind", "127.0.0.1:0", "--workers", "2",
                                                          "--control", str(control)]) as server:
        old = server.wait_ready(2)
        (tmp_path / "flaky_app.py").write_text("raise ImportError('broken on purpose')\n")
        done = ctl(control, "reload")
        assert done.returncode == 1, done.stdout
        assert "rolling restart aborted" in done.stderr and "before it was ready" in done.stderr
        # The old workers keep serving.
        assert sorted(server.workers()) == sorted(old)
        assert int(request(server.address).split()[1]) in old


def test_stop_waits_until_the_primary_is_gone(tmp_path: Path) -> None:
    control = tmp_path / "app.ctl"
    with ServerProcess(control=str(control)) as server:
        workers = server.wait_ready(2)
        done = ctl(control, "stop")
        assert done.returncode == 0, done.stderr
        assert f"primary {server.pid} stopped (graceful)" in done.stdout
        assert server.wait(10) == 0
        assert not control.exists()
        assert not any(pid_alive(p) for p in workers)


def test_stop_fast(tmp_path: Path) -> None:
    control = tmp_path / "app.ctl"
    with ServerProcess(control=str(control)) as server:
        server.wait_ready(2)
        code, reply = ctl_json(control, "stop", "--fast")
        assert code == 0 and reply["stopping"] == "fast" and reply["stopped"] is True
        assert server.wait(10) == 0


def test_the_default_control_socket_is_beside_the_pidfile(tmp_path: Path) -> None:
    pidfile = tmp_path / "app.pid"
    with ServerProcess(cli=["--bind", "127.0.0.1:0", "--workers", "1", "--pidfile", str(pidfile)]) as server:
        server.wait_ready(1)
        assert (tmp_path / "app.ctl").exists()
        done = subprocess.run([sys.executable, "-m", "dispatch", "ctl", "--pidfile", str(pidfile), "status", "--json"],
                              capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["status"]["primary_pid"] == server.pid


def test_unreachable_primary_and_missing_target() -> None:
    done = ctl("/nonexistent/dispatch.ctl", "status")
    assert done.returncode == 3 and "/nonexistent/dispatch.ctl" in done.stderr
    done = subprocess.run([sys.executable, "-m", "dispatch", "ctl", "status"], capture_output=True, text=True,
                          timeout=30, cwd=ROOT, env={k: v for k, v in os.environ.items() if k != "DISPATCH_CONTROL"})
    assert done.returncode == 2 and "--control" in done.stderr


# ------------------------------------------------------------------ who may connect
@needs_root
def test_another_uid_is_refused() -> None:
    uid, gid = unprivileged_user()
    directory = Path(tempfile.mkdtemp(prefix="dispatch-ctl-"))
    directory.chmod(0o755)  # others may reach the socket file, so only its mode and the uid check stop them
    control = directory / "app.ctl"
    try:
        with ServerProcess(control=str(control)) as server:
            server.wait_ready(2)
            # Mode 0600: the other user cannot even connect.
            done = ctl(control, "stop", prefix=as_user(uid, gid))
            assert done.returncode == 3 and "Permission denied" in done.stderr, done.stderr
            # Even when the file lets it connect, SO_PEERCRED does not let it act.
            control.chmod(0o666)
            done = ctl(control, "stop", prefix=as_user(uid, gid))
            assert done.returncode == 1 and f"uid {uid} may not control" in done.stderr, done.stderr
            assert server.proc.poll() is None
            code, reply = ctl_json(control, "status")
            assert code == 0 and len(reply["status"]["workers"]) == 2
    finally:
        control.unlink(missing_ok=True)
        directory.rmdir()


# ------------------------------------------------------------------ bad peers
def test_garbage_and_oversized_requests_get_error_replies(server: ServerProcess) -> None:
    path = server.control
    before = fd_count(server.pid)
    cases = [
        (b"garbage\n", "not JSON"),
        (b"[1, 2]\n", "JSON object"),
        (b'{"cmd": "status"}\n', "version"),
        (b'{"v": 99, "cmd": "status"}\n', "version"),
        (b'{"v": 1}\n', '"cmd"'),
        (b'{"v": 1, "cmd": "self-destruct"}\n', "unknown command"),
        (b'{"v": 1, "cmd": "scale", "n": "lots"}\n', "not N, +N or -N"),
        (b'{"v": 1, "cmd": "reload", "timeout": -1}\n', "timeout"),
        (b"\xff\xfe\n", "not JSON"),
        (b"[" * 100_000 + b"\n", "over"),
        (b'{"v": 1, "cmd": "status"}', "no newline"),  # then EOF (shutdown below)
    ]
    for data, expected in cases[:-1]:
        reply = raw(path, data)
        assert reply["ok"] is False and expected in reply["error"], (data[:40], reply)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(cases[-1][0])
        sock.shutdown(socket.SHUT_WR)
        assert "no newline" in json.loads(sock.recv(65536))["error"]
    # 10 MB without a newline: answered after 64 KiB, the rest never read.
    reply = raw(path, b"x" * 10_000_000)
    assert reply["ok"] is False and "over 65536 bytes" in reply["error"]
    # The primary serves on, and holds no descriptor more than before.
    assert request(server.address).startswith("pid ")
    code, reply = ctl_json(path, "status")
    assert code == 0 and len(reply["status"]["workers"]) == 2
    wait_for(lambda: fd_count(server.pid) <= before, 10, what="the clients' descriptors closed")


def test_silent_and_flooding_peers_do_not_lock_the_operator_out(server: ServerProcess) -> None:
    path = str(server.control)
    before = fd_count(server.pid)
    silent = []
    try:
        for _ in range(60):  # more than the 16 slots
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            silent.append(sock)
        last_connected = time.monotonic()
        # Served while they hold their connections: a newcomer takes the oldest silent one's slot.
        for _ in range(3):
            code, reply = ctl_json(path, "status")
            assert code == 0 and reply["ok"], reply
        load = Load(server.address, clients=2, max_requests=200)
        load.wait_requests(200)
        load.stop()
        assert load.failed == []
        # A silent client is told after 5 s that it took too long, and closed.
        last = silent[-1]
        last.settimeout(15)
        reply = json.loads(last.recv(65536) or b"{}")
        assert "no complete request within 5s" in reply.get("error", ""), reply
        assert time.monotonic() - last_connected >= 4.5
    finally:
        for sock in silent:
            sock.close()
    wait_for(lambda: fd_count(server.pid) <= before, 15, what="every control client closed")


def test_a_client_that_leaves_while_waiting_is_forgotten(server: ServerProcess) -> None:
    # A reload that will wait, from a client that hangs up at once.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.control))
        sock.sendall(ctl_protocol.request("scale", n="3"))
    code, reply = ctl_json(server.control, "scale", "2")
    assert code == 0 and reply["workers"] == 2
    assert request(server.address).startswith("pid ")


# ------------------------------------------------------------------ the socket file
def test_a_stale_socket_file_is_replaced_and_a_live_one_or_a_symlink_refused(tmp_path: Path) -> None:
    control = tmp_path / "app.ctl"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(control))
    stale.close()  # a dead primary's: the file stays, nobody listens
    with ServerProcess(control=str(control)) as server:
        server.wait_ready(2)
        assert ctl(control, "status").returncode == 0
        # A second primary on the same path is refused, and the first keeps its socket.
        done = subprocess.run([sys.executable, "-m", "dispatch", "tests.apps:pid_app", "--bind", "127.0.0.1:0",
                               "--control", str(control)], capture_output=True, text=True, timeout=30, cwd=ROOT)
        assert done.returncode == 1 and "another primary is listening" in done.stderr
        assert ctl(control, "status").returncode == 0
    target = tmp_path / "victim"
    target.write_text("keep me")
    link = tmp_path / "link.ctl"
    link.symlink_to(target)
    done = subprocess.run([sys.executable, "-m", "dispatch", "tests.apps:pid_app", "--bind", "127.0.0.1:0",
                           "--control", str(link)], capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert done.returncode == 1 and str(link) in done.stderr and "not a socket" in done.stderr
    assert target.read_text() == "keep me" and link.is_symlink()


# ------------------------------------------------------------------ top
def test_top_shows_every_worker(server: ServerProcess) -> None:
    done = subprocess.run([sys.executable, "-m", "dispatch", "top", "--control", str(server.control),
                           "--iterations", "2", "--interval", "0.2"],
                          capture_output=True, text=True, timeout=30, cwd=ROOT, env=dict(os.environ, COLUMNS="160"))
    assert done.returncode == 0, done.stderr
    assert f"primary {server.pid}" in done.stdout and "conn/s" in done.stdout
    assert all(str(pid) in done.stdout for pid in server.workers())
    assert done.stdout.count(f"primary {server.pid}") == 2


# ------------------------------------------------------------------ pure parts
def test_protocol_units() -> None:
    assert ctl_protocol.default_path("/run/app.pid") == "/run/app.ctl"
    assert ctl_protocol.default_path("/run/app") == "/run/app.ctl"
    assert ctl_protocol.default_path("/run/app.x") == "/run/app.x.ctl"
    assert [ctl_protocol.parse_scale(v, 3) for v in ("4", "+2", "-2", 5, " 1 ")] == [4, 5, 1, 5, 1]
    for bad in ("-3", "0", "x", "", True, None, 1.5, "99999"):
        with pytest.raises(ctl_protocol.ProtocolError):
            ctl_protocol.parse_scale(bad, 3)
    assert ctl_protocol.parse_request(ctl_protocol.request("status").rstrip()) == {"v": 1, "cmd": "status"}
    assert ctl_protocol.parse_reply(ctl_protocol.error("no")) == {"v": 1, "ok": False, "error": "no"}


def test_status_table_and_rates() -> None:
    worker = {"id": 0, "pid": 11, "state": "ready", "stalled": False, "uptime_s": 3725.0, "memory_rss": 3 * 2**20,
              "cpu_percent": 1.25, "connections_total": 1500, "connections_active": 2, "heartbeat_age_s": 0.1,
              "restarts": 1}
    status = {"primary_pid": 10, "uptime_s": 59, "balance": "round-robin", "worker_count": 1, "workers_wanted": 1,
              "connections_total": 1500, "connections_in_flight": 2, "accepting": True, "workers": [worker]}
    table = status_table(status)
    assert "primary 10 · up 59s" in table and "1h 02m" in table and "3.0 MiB" in table and "2/1,500" in table
    rates = Rates()
    assert rates.update(status, 1.0) == (0.0, {11: 0.0})
    status = {**status, "connections_total": 1700, "workers": [{**worker, "connections_total": 1700}]}
    assert rates.update(status, 3.0) == (100.0, {11: 100.0})


def test_signal_table_has_upgrade() -> None:
    from dispatch import control

    assert control.SIGNALS[signal.SIGUSR1] == control.Upgrade()
    assert len(set(control.SIGNALS)) == len(control.SIGNALS)



def test_the_typed_client(server: ServerProcess) -> None:
    from dispatch.ctl import ControlClient

    client = ControlClient(str(server.control), timeout=60)
    assert client.status()["status"]["primary_pid"] == server.pid
    reply = client.scale("+1")
    assert reply["ok"] and reply["workers"] == 3
    reply = client.reload()
    assert reply["ok"] and reply["outcome"] == "complete" and len(reply["workers"]) == 3
    reply = client.scale(2)
    assert reply["ok"] and reply["workers"] == 2
    reply = client.drain()
    assert reply["ok"] and reply["draining"]
    assert client.status()["status"]["draining"] == reply["draining"]
    assert http_get(server.health, "/readyz")[0] == 503
    reply = client.undrain()
    assert reply["ok"] and reply["draining"] is None
    assert http_get(server.health, "/readyz")[0] == 200


# ------------------------------------------------------------------ the control server in process
def test_control_server_forgets_a_waiting_client_that_hangs_up_and_bounds_the_rest(tmp_path: Path) -> None:
    from dispatch.control_socket import ControlServer, Reply
    from dispatch.reactor import Reactor

    replies: list[Reply] = []
    reactor = Reactor()
    server = ControlServer(str(tmp_path / "c.ctl"), lambda request, reply: replies.append(reply), timeout=0.5,
                           max_clients=4)
    server.attach(reactor.register, reactor.unregister)

    def turn(seconds: float = 0.2) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            reactor.poll(0.02)
            server.tick(time.monotonic())

    try:
        listening = len(server.fds())
        # A client whose answer is owed, then leaves: its slot and descriptor go at once.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(server.path)
        sock.sendall(ctl_protocol.request("status"))
        turn()
        assert len(replies) == 1 and replies[0].open and len(server.fds()) == listening + 1
        sock.close()
        turn()
        assert not replies[0].open and len(server.fds()) == listening
        replies[0].send({"ok": True})  # too late: ignored, not an error
        # Waiting clients fill every slot: a newcomer is told the primary is busy.
        waiting = []
        for _ in range(4):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(server.path)
            s.sendall(ctl_protocol.request("status"))
            waiting.append(s)
        turn()
        newcomer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        newcomer.settimeout(5)
        newcomer.connect(server.path)
        turn()
        assert "busy" in json.loads(newcomer.recv(4096))["error"]
        newcomer.close()
        # Answered later, each gets its reply; then everything is closed.
        for reply in replies[1:]:
            reply.send({"ok": True, "late": True})
        for s in waiting:
            s.settimeout(5)
            assert json.loads(s.recv(4096))["late"] is True
            s.close()
        turn()
        assert len(server.fds()) == listening
    finally:
        server.close()
        reactor.close()
    assert not (tmp_path / "c.ctl").exists()

"""Upgrading the primary in place, with real processes: under load with a new connection per
request and with keep-alive, by ``dispatch ctl upgrade`` and by ``SIGUSR1``; a new version
that fails to import leaves the old primary serving."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dispatch import upgrade
from dispatch.reactor import Reactor
from dispatch.upgrade import Upgrader
from tests.helpers import (
    ServerProcess,
    children,
    http_get,
    listening_sockets,
    pid_alive,
    request,
    wait_for,
)
from tests.test_ctl import ctl, ctl_json
from tests.test_web import KeepAliveLoad, http_conn


class NewConnectionLoad:
    """Client threads, each request on a new connection; any exception is a failure."""

    def __init__(self, address: str, clients: int, max_seconds: float = 60.0) -> None:
        self.address = address
        self.ok = 0
        self.failed: list[str] = []
        self.pids: dict[int, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._deadline = time.monotonic() + max_seconds
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for thread in self._threads:
            thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and time.monotonic() < self._deadline:
            conn = http_conn(self.address)
            try:
                conn.request("GET", "/", headers={"Connection": "close"})
                response = conn.getresponse()
                pid = json.loads(response.read())["pid"]
                assert response.status == 200, response.status
            except Exception as exc:
                with self._lock:
                    self.failed.append(repr(exc))
                continue
            finally:
                conn.close()
            with self._lock:
                self.ok += 1
                self.pids[pid] = self.pids.get(pid, 0) + 1

    def wait_requests(self, count: int, timeout: float = 30.0) -> None:
        wait_for(lambda: self.ok + len(self.failed) >= count, timeout, what=f"{count} requests")

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)


def read_pid(pidfile: Path) -> int:
    try:
        return int(pidfile.read_text())
    except (FileNotFoundError, ValueError):
        return 0


def stop_new_primary(pid: int, workers: list[int]) -> None:
    """The new primary is not our child: stop it by pid and see it and its workers go."""
    if pid_alive(pid):
        os.kill(pid, signal.SIGTERM)
    wait_for(lambda: not pid_alive(pid) and not any(pid_alive(w) for w in workers), 30,
             what=f"new primary {pid} and its workers gone")


def test_ctl_upgrade_under_load_loses_no_request(tmp_path: Path) -> None:
    pidfile, control = tmp_path / "app.pid", tmp_path / "app.ctl"
    server = ServerProcess("tests.web_apps:starlette_app", cli=[
        "--bind", "127.0.0.1:0", "--workers", "2", "--health", "127.0.0.1:0", "--pidfile", str(pidfile),
        "--log-level", "debug"])
    new_pid, new_workers = 0, []
    try:
        server.health = wait_for(lambda: listening_sockets(server.pid)[1:2], 15, what="health")[0][1]
        old_workers = server.wait_ready(2)
        assert read_pid(pidfile) == server.pid
        fresh = NewConnectionLoad(server.address, clients=2)
        kept = KeepAliveLoad(server.address, clients=2)
        try:
            fresh.wait_requests(100)
            kept.wait_requests(300)
            code, reply = ctl_json(control, "upgrade")
            assert code == 0 and reply["old_pid"] == server.pid, reply
            new_pid = reply["new_pid"]
            assert read_pid(pidfile) == new_pid
            assert server.wait(30) == 0  # the old primary drained and left
            assert not any(pid_alive(p) for p in old_workers)
            new_workers = sorted(children(new_pid))
            fresh.wait_requests(fresh.ok + len(fresh.failed) + 300)
            kept.wait_requests(kept.ok + len(kept.failed) + 1000)
        finally:
            fresh.stop()
            kept.stop()
        print(f"\nupgrade under load: new connection per request {fresh.ok} ok, {len(fresh.failed)} failed; "
              f"keep-alive {kept.ok} ok, {len(kept.failed)} failed")
        assert fresh.failed == [] and kept.failed == [], (fresh.failed[:3], kept.failed[:3])
        # Both generations answered, and the new one still does.
        assert set(old_workers) & (fresh.pids.keys() | kept.pids.keys())
        assert set(new_workers) & fresh.pids.keys() and set(new_workers) & kept.pids.keys()
        # The same health port and control socket, now answered by the new primary.
        status, text = http_get(server.health, "/cluster-health")
        assert status == 200 and json.loads(text)["primary_pid"] == new_pid
        code, reply = ctl_json(control, "status")
        assert code == 0 and reply["status"]["primary_pid"] == new_pid
        assert sorted(w["pid"] for w in reply["status"]["workers"]) == new_workers == sorted(children(new_pid))
        # systemd was told which process is the service now.
        assert server.notify is not None and {"MAINPID": str(new_pid)} in server.notify.messages
    finally:
        server.stop()
        if new_pid:
            stop_new_primary(new_pid, new_workers)
    assert not pidfile.exists() and not control.exists()  # the new primary cleaned up after itself


def test_a_new_version_that_fails_to_import_leaves_the_old_primary_serving(tmp_path: Path) -> None:
    app = tmp_path / "upgraded_app.py"
    app.write_text("from tests.apps import pid_app as app\n")
    pidfile, control = tmp_path / "app.pid", tmp_path / "app.ctl"
    new_pid, new_workers = 0, []
    with ServerProcess("upgraded_app:app", cwd=tmp_path, cli=[
            "--bind", "127.0.0.1:0", "--workers", "2", "--pidfile", str(pidfile)]) as server:
        old_workers = server.wait_ready(2)
        app.write_text("raise ImportError('version 2 is broken')\n")
        done = ctl(control, "--json", "upgrade")
        reply = json.loads(done.stdout)
        assert done.returncode == 1 and not reply["ok"], reply
        assert "exited with code 3 before it was ready" in reply["error"] and "keeps serving" in reply["error"]
        failed = reply["new_pid"]
        assert failed and not pid_alive(failed)
        # Nothing changed for the old primary: its pidfile, workers, control socket, clients.
        assert read_pid(pidfile) == server.pid
        assert sorted(children(server.pid)) == sorted(old_workers)
        assert int(request(server.address).split()[1]) in old_workers
        code, status = ctl_json(control, "status")
        assert code == 0 and status["status"]["primary_pid"] == server.pid
        # Fixed on disk, the next upgrade goes through.
        app.write_text("from tests.apps import pid_app as app\n")
        code, reply = ctl_json(control, "upgrade")
        assert code == 0, reply
        new_pid = reply["new_pid"]
        new_workers = sorted(children(new_pid))
        assert server.wait(30) == 0
        assert read_pid(pidfile) == new_pid
        assert int(request(server.address).split()[1]) in new_workers
    stop_new_primary(new_pid, new_workers)


@pytest.mark.parametrize("balance", ["round-robin", "shared"])
def test_sigusr1_upgrades_and_keeps_unix_sockets(tmp_path: Path, balance: str) -> None:
    pidfile, sock = tmp_path / "app.pid", tmp_path / "app.sock"
    new_pid, new_workers = 0, []
    with ServerProcess(cli=["--bind", "127.0.0.1:0", "--bind", f"unix:{sock}", "--workers", "2",
                            "--pidfile", str(pidfile), "--balance", balance]) as server:
        old_workers = server.wait_ready(2)
        server.signal(signal.SIGUSR1)
        new_pid = wait_for(lambda: read_pid(pidfile) if read_pid(pidfile) != server.pid else 0, 30,
                           what="the new primary's pid in the pidfile")
        assert server.wait(30) == 0
        new_workers = sorted(children(new_pid))
        assert not set(new_workers) & set(old_workers) and len(new_workers) == 2
        for address in server.addresses:
            assert int(request(address).split()[1]) in new_workers, address
        assert sock.exists()  # the old primary left the unix socket's file to the new one
        # And the new primary upgrades in turn.
        os.kill(new_pid, signal.SIGUSR1)
        third = wait_for(lambda: read_pid(pidfile) if read_pid(pidfile) != new_pid else 0, 30,
                         what="the third primary's pid in the pidfile")
        wait_for(lambda: not pid_alive(new_pid) and not any(pid_alive(p) for p in new_workers), 30,
                 what="the second primary and its workers gone")
        new_pid, new_workers = third, sorted(children(third))
        for address in server.addresses:
            assert int(request(address).split()[1]) in new_workers, address
    stop_new_primary(new_pid, new_workers)
    assert not sock.exists() and not pidfile.exists()




def _free_address() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def test_an_upgrade_hands_over_the_probe_and_agent_ports(tmp_path: Path) -> None:
    # The new primary cannot bind them while the old one has them: it inherits them instead.
    pidfile, probe, agent = tmp_path / "app.pid", _free_address(), _free_address()
    new_pid, new_workers = 0, []
    with ServerProcess(cli=["--bind", "127.0.0.1:0", "--workers", "1", "--pidfile", str(pidfile),
                            "--probe", probe, "--agent", agent]) as server:
        server.wait_ready(1)
        assert http_get(probe, "/readyz")[0] == 200
        server.signal(signal.SIGUSR1)
        new_pid = wait_for(lambda: read_pid(pidfile) if read_pid(pidfile) != server.pid else 0, 30,
                           what="the new primary's pid in the pidfile")
        assert server.wait(30) == 0
        new_workers = sorted(children(new_pid))
        assert http_get(probe, "/readyz")[0] == 200  # the old primary is gone: the new one answers
        host, _, port = agent.rpartition(":")
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            assert b"up" in sock.recv(256)
    stop_new_primary(new_pid, new_workers)


def test_reuseport_cannot_upgrade_and_says_why(tmp_path: Path) -> None:
    control = tmp_path / "app.ctl"
    with ServerProcess(cli=["--bind", "127.0.0.1:0", "--workers", "1", "--balance", "reuseport",
                            "--control", str(control)]) as server:
        workers = server.wait_ready(1)
        done = ctl(control, "upgrade")
        assert done.returncode == 1 and "reuseport" in done.stderr
        assert server.proc.poll() is None and children(server.pid) == workers


# ------------------------------------------------------------------ the old primary's side, in process
def _upgrader(monkeypatch: pytest.MonkeyPatch, code: str, timeout: float) -> tuple[Upgrader, Reactor, dict[str, Any]]:
    """An ``Upgrader`` whose "new primary" is ``python -c code``."""
    monkeypatch.setattr(upgrade, "command_line", lambda: [sys.executable, "-c", code])
    reactor = Reactor()
    outcome: dict[str, Any] = {}
    upgrader = Upgrader(reactor.register, reactor.unregister, timeout,
                        lambda pid: outcome.update(ready=pid), lambda why: outcome.update(failed=why))
    return upgrader, reactor, outcome


def _run(reactor: Reactor, upgrader: Upgrader, outcome: dict[str, Any], timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not outcome and time.monotonic() < deadline:
        reactor.poll(0.05)
        upgrader.tick(time.monotonic())
    assert outcome, "no outcome"


def test_upgrader_hands_listeners_at_fd_3_and_waits_for_ready(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    report = tmp_path / "seen.json"
    code = (
        "import json, os, socket, sys\n"
        "fields = dict(f.split('=') for f in os.environ['DISPATCH_UPGRADE'].split(','))\n"
        "sock = socket.socket(fileno=3)\n"
        f"json.dump({{'fds': os.environ['LISTEN_FDS'], 'pid': os.environ['LISTEN_PID'] == str(os.getpid()),"
        f" 'port': sock.getsockname()[1], 'parent': int(fields['parent']) == os.getppid()}}, open({str(report)!r}, 'w'))\n"
        "os.write(int(fields['ready']), b'R')\n"
        "import time; time.sleep(30)\n"
    )
    upgrader, reactor, outcome = _upgrader(monkeypatch, code, timeout=15)
    try:
        upgrader.start([listener], None, None)
        child = upgrader.pid
        _run(reactor, upgrader, outcome)
        assert outcome == {"ready": child} and not upgrader.in_progress
        seen = json.loads(report.read_text())
        assert seen == {"fds": "1", "pid": True, "port": listener.getsockname()[1], "parent": True}
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
        reactor.close()
        listener.close()


def test_upgrader_kills_a_new_primary_that_is_not_ready_in_time(monkeypatch: pytest.MonkeyPatch) -> None:
    upgrader, reactor, outcome = _upgrader(monkeypatch, "import time; time.sleep(60)", timeout=0.5)
    try:
        upgrader.start([], None, None)
        child = upgrader.pid
        _run(reactor, upgrader, outcome)
        assert outcome == {"failed": f"new primary {child} was not ready within 0.5s; killed it"}
        assert not pid_alive(child) and upgrader.fds() == []
    finally:
        reactor.close()


def test_upgrader_reports_a_new_primary_that_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    upgrader, reactor, outcome = _upgrader(monkeypatch, "raise SystemExit(7)", timeout=15)
    try:
        upgrader.start([], None, None)
        child = upgrader.pid
        _run(reactor, upgrader, outcome)
        assert outcome == {"failed": f"new primary {child} exited with code 7 before it was ready"}
    finally:
        reactor.close()


def test_stopping_during_an_upgrade_stops_the_new_primary_too(tmp_path: Path) -> None:
    app = tmp_path / "slow_app.py"
    app.write_text("from tests.apps import pid_app as app\n")
    control = tmp_path / "app.ctl"
    with ServerProcess("slow_app:app", cwd=tmp_path, cli=[
            "--bind", "127.0.0.1:0", "--workers", "1", "--control", str(control),
            "--health", "127.0.0.1:0"]) as server:
        server.wait_ready(1)
        health = next(a for _, a in listening_sockets(server.pid) if a.startswith("127.") and a != server.address)
        app.write_text("import time\ntime.sleep(20)\nfrom tests.apps import pid_app as app\n")
        result: list[subprocess.CompletedProcess[str]] = []
        waiter = threading.Thread(target=lambda: result.append(ctl(control, "--json", "upgrade")))
        waiter.start()
        new_pid = wait_for(lambda: [p for p in children(server.pid) if _is_primary(p)], 15,
                           what="the new primary")[0]
        # While it boots, it shares the control and health sockets but answers neither: a
        # probe or an operator always reaches the primary that serves.
        for _ in range(20):
            code, reply = ctl_json(control, "status")
            assert code == 0 and reply["status"]["primary_pid"] == server.pid and reply["status"]["upgrading"]
            assert http_get(health, "/readyz")[0] == 200
        assert pid_alive(new_pid)
        assert ctl(control, "stop").returncode == 0
        waiter.join(30)
        reply = json.loads(result[0].stdout)
        assert result[0].returncode == 1 and "asked to stop" in reply["error"] and reply["new_pid"] == new_pid
        assert server.wait(30) == 0
        wait_for(lambda: not pid_alive(new_pid), 15, what="the new primary gone")


def _is_primary(pid: int) -> bool:
    try:
        return b"slow_app:app" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return False

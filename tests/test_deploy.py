"""The deploy flow: rolling restart, code reload, pidfile, scaling, with real signals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from tests.helpers import ROOT, Load, ServerProcess, answering_pid, pid_alive, request, wait_for

DRAINED = "exited with code 0"

APP_V1 = '''
import os

def app(conn, addr):
    conn.recv(65536)
    body = b"version one pid %d" % os.getpid()
    conn.sendall(b"HTTP/1.0 200 OK\\r\\nContent-Length: %d\\r\\n\\r\\n%s" % (len(body), body))
'''


def _write_app(directory: Path, source: str) -> None:
    path = directory / "deployed_app.py"
    path.write_text(source)
    # A new mtime and size, so no stale bytecode is reused.
    os.utime(path, ns=(path.stat().st_mtime_ns + 2_000_000_000,) * 2)


@pytest.mark.parametrize("mode,signum", [
    ("round-robin", signal.SIGUSR2),
    ("least-connections", signal.SIGHUP),
    ("pull", signal.SIGUSR2),
])
def test_rolling_restart_under_load_loses_nothing(mode: str, signum: int) -> None:
    with ServerProcess(workers=2, balance=mode) as server:
        old = set(server.wait_ready(2))
        load = Load(server.address, clients=6, max_requests=50_000, max_seconds=60)
        try:
            load.wait_requests(200)
            server.signal(signum)
            new = set(server.wait_replaced(old, 2))  # every worker pid changed
            done = load.ok
            wait_for(lambda: load.ok > done + 200, what="requests after the restart")
        finally:
            load.stop()
        assert load.failed == []
        assert set(server.workers()) == new
        assert server.exits() == dict.fromkeys(old, DRAINED)  # each old one drained and exited
        assert new <= set(load.pids)  # and the new ones served


def test_slow_request_on_an_old_worker_completes_across_a_restart() -> None:
    with ServerProcess(workers=2, graceful_timeout=20) as server:
        old = server.wait_ready(2)
        result: list[str] = []
        thread = threading.Thread(target=lambda: result.append(request(server.address, "/sleep/2000")))
        thread.start()
        server.wait_events("handling")  # slow request in flight
        server.signal(signal.SIGUSR2)
        thread.join(20)
        assert result, "the slow request got no answer"
        old_pid = answering_pid(result[0])
        assert old_pid in old
        server.wait_replaced(old, 2)
        assert not pid_alive(old_pid)
        assert server.exits()[old_pid] == DRAINED  # it finished the request, then exited


def test_second_reload_during_a_restart_is_queued() -> None:
    with ServerProcess(workers=2) as server:
        first = set(server.wait_ready(2))
        # A slow request keeps the first restart busy while the second signal arrives.
        slow = threading.Thread(target=request, args=(server.address, "/sleep/2000"))
        slow.start()
        server.wait_events("handling")  # slow request in flight
        server.signal(signal.SIGUSR2)
        # The first restart has started: a third worker is booting next to the two.
        wait_for(lambda: len(server.cluster_health()["workers"]) >= 3, what="the restart to start")
        server.signal(signal.SIGUSR2)
        slow.join(20)
        # Queued, not dropped: the workers of the first restart are replaced in turn, so
        # four workers drain and exit, and the two left are none of them.
        exits = server.wait_events("worker_exit", 4, timeout=40)
        last = set(server.wait_ready(2))
        assert {e["how"] for e in exits} == {DRAINED}
        second = {e["pid"] for e in exits} - first
        assert first <= {e["pid"] for e in exits} and len(second) == 2 and not last & (first | second)
        assert len(server.events("reload")) == 2
        assert answering_pid(request(server.address)) in last


def test_edited_code_is_served_after_usr2_to_the_pidfile(tmp_path: Path) -> None:
    _write_app(tmp_path, APP_V1)
    pidfile = tmp_path / "app.pid"
    with ServerProcess("deployed_app:app", cwd=tmp_path,
                       cli=["--workers", "2", "--bind", "127.0.0.1:0", "--pidfile", str(pidfile)]) as server:
        server.wait_ready(2)
        assert int(pidfile.read_text()) == server.pid
        assert request(server.address).startswith("version one")
        _write_app(tmp_path, APP_V1.replace("version one", "version two, edited"))
        os.kill(int(pidfile.read_text()), signal.SIGUSR2)
        server.wait_notified("READY", 2, timeout=30)  # READY=1 again: the restart is over
        bodies = {request(server.address).rsplit(" pid", 1)[0] for _ in range(10)}
        assert bodies == {"version two, edited"}
        server.signal(signal.SIGTERM)
        assert server.wait(20) == 0
    assert not pidfile.exists()


def test_broken_new_version_aborts_and_the_old_keeps_answering(tmp_path: Path) -> None:
    _write_app(tmp_path, APP_V1)
    with ServerProcess("deployed_app:app", cwd=tmp_path,
                       cli=["--workers", "2", "--bind", "127.0.0.1:0"]) as server:
        old = set(server.wait_ready(2))
        _write_app(tmp_path, APP_V1 + "\nraise ImportError('version three is broken')\n")
        server.signal(signal.SIGUSR2)
        server.wait_notified("RELOADING")
        server.wait_notified("READY", 2, timeout=30)  # the restart is over...
        assert set(server.workers()) == old  # ...and replaced nobody: aborted
        # Kept on the log: why a deploy was refused reaches the operator only there
        # (README: "the log says why"), and that is part of what this test is for.
        assert "version three is broken" in server.log()
        for _ in range(10):
            assert request(server.address).startswith("version one")


def test_recycling_into_broken_code_backs_off_and_retries_once_fixed(tmp_path: Path) -> None:
    _write_app(tmp_path, APP_V1)
    with ServerProcess("deployed_app:app", cwd=tmp_path, workers=1, max_requests=5) as server:
        (old,) = server.wait_ready(1)
        _write_app(tmp_path, APP_V1 + "\nraise ImportError('version three is broken')\n")
        for _ in range(5):
            assert request(server.address).startswith("version one")
        # Each failed replacement is retried after a growing wait; the old worker keeps answering.
        first, second = server.wait_events("worker_exit", 2, timeout=30)[:2]
        assert old not in (first["pid"], second["pid"])
        assert DRAINED not in (first["how"], second["how"])  # failed boots
        assert second["t"] - first["t"] >= 0.5  # the first retry waited 0.5 s
        assert old in server.workers()
        assert request(server.address).startswith("version one")
        _write_app(tmp_path, APP_V1.replace("version one", "version two"))
        (gone,) = server.wait_events("worker_exit", timeout=30, where=lambda e: e["pid"] == old)
        assert gone["how"] == DRAINED  # replaced at last, gracefully
        assert gone["t"] - second["t"] >= 1.0  # not before the second retry's 1 s wait
        assert request(server.address).startswith("version two")


def test_ttin_and_ttou_scale_the_workers() -> None:
    with ServerProcess(workers=2) as server:
        server.wait_ready(2)
        server.signal(signal.SIGTTIN)
        wait_for(lambda: len(server.workers()) == 3, what="three workers")
        server.wait_ready(3)
        for count in (2, 1):
            server.signal(signal.SIGTTOU)
            wait_for(lambda n=count: len(server.workers()) == n, what=f"{count} workers")
        (last,) = server.wait_ready(1)
        server.signal(signal.SIGTTOU)
        # Once the primary has taken the signal, and answered twice since, the request has
        # been handled: it was refused, so the last worker is neither draining nor gone.
        server.wait_signal_delivered(signal.SIGTTOU)
        for _ in range(2):
            (worker,) = server.cluster_health()["workers"]
            assert (worker["pid"], worker["state"]) == (last, "ready")
        assert server.workers() == [last]
        assert answering_pid(request(server.address)) == last
        assert len(server.exits()) == 2  # the two drained by the first two SIGTTOUs


def test_live_pidfile_is_an_error_and_stale_one_is_replaced(tmp_path: Path) -> None:
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # this test process is alive
    out = subprocess.run(
        [sys.executable, "-m", "dispatch", "tests.apps:pid_app", "--bind", "127.0.0.1:0",
         "--pidfile", str(pidfile)],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    # The CLI's error line on stderr is the behaviour here (README: "one line on stderr
    # naming it"), so it is checked as text.
    lines = out.stderr.splitlines()
    assert out.returncode == 1 and len(lines) == 1, out.stderr
    assert str(pidfile) in lines[0] and "is running" in lines[0]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    pidfile.write_text(f"{dead.pid}\n")
    with ServerProcess(cli=["--workers", "1", "--bind", "127.0.0.1:0", "--pidfile", str(pidfile)]) as server:
        server.wait_ready(1)
        assert int(pidfile.read_text()) == server.pid


def test_cli_version_and_help() -> None:
    version = subprocess.run([sys.executable, "-m", "dispatch", "--version"], capture_output=True,
                             text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("dispatch ")
    helptext = subprocess.run([sys.executable, "-m", "dispatch", "--help"], capture_output=True,
                              text=True, timeout=30).stdout
    for flag in ("--workers", "--bind", "--balance", "--threads", "--health", "--pidfile", "--timeout",
                 "--graceful-timeout", "--max-requests", "--log-level", "--preload"):
        assert flag in helptext
    # Every option has its flag, except those that are Python objects.
    import dataclasses

    from dispatch.config import Config
    python_only = {"handler", "ssl", "on_starting", "on_worker_start", "on_worker_exit", "on_reload"}
    for field in dataclasses.fields(Config):
        if field.init and field.name not in python_only:
            assert "--" + field.name.replace("_", "-") in helptext, field.name


def test_preload_imports_once_so_a_restart_keeps_the_old_code(tmp_path: Path) -> None:
    _write_app(tmp_path, APP_V1)
    with ServerProcess("deployed_app:app", cwd=tmp_path,
                       cli=["--workers", "2", "--bind", "127.0.0.1:0", "--preload"]) as server:
        old = set(server.wait_ready(2))
        _write_app(tmp_path, APP_V1.replace("version one", "version two, edited"))
        server.signal(signal.SIGUSR2)
        server.wait_notified("READY", 2, timeout=30)  # READY=1 again: the restart is over
        assert not set(server.workers()) & old  # every worker was replaced...
        assert {request(server.address).rsplit(" pid", 1)[0] for _ in range(6)} == {"version one"}

"""The dispatcher with real primaries, workers, sockets and signals."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

import dispatch
from tests.helpers import (
    ROOT,
    Load,
    ServerProcess,
    answering_pid,
    fd_count,
    pid_alive,
    request,
    wait_for,
)

MODES = ["round-robin", "least-connections", "pull", "reuseport", "shared"]


def _many(address: str, count: int, clients: int = 8, path: str = "/") -> list[str]:
    with ThreadPoolExecutor(clients) as pool:
        return list(pool.map(lambda _: request(address, path), range(count)))


@pytest.mark.parametrize("mode", MODES)
def test_every_request_answered_in_each_mode(mode: str) -> None:
    with ServerProcess(balance=mode) as server:
        server.wait_ready(2)
        bodies = _many(server.address, 400)
        assert len(bodies) == 400
        pids = {answering_pid(b) for b in bodies}
        assert pids <= set(server.workers())
        if mode in ("round-robin", "least-connections", "pull"):
            assert len(pids) == 2  # user-space modes use every worker


@pytest.mark.parametrize("mode", ["round-robin", "pull", "shared"])
def test_async_handler(mode: str) -> None:
    with ServerProcess("tests.apps:async_pid_app", balance=mode, graceful_timeout=60) as server:
        workers = server.wait_ready(2)
        bodies = _many(server.address, 1000, clients=32)
        assert all(b.endswith("async") for b in bodies)
        # Every connection task ran to its end, so the drain finds nothing in flight: the
        # workers exit at once, not after the 60 s graceful_timeout (beyond this 30 s wait).
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
        assert server.exits() == dict.fromkeys(workers, "exited with code 0")


@pytest.mark.parametrize("skip_busy, most_off", [(False, 0.01), (True, 0.1)])
def test_round_robin_splits_evenly_between_two_workers(skip_busy: bool, most_off: float) -> None:
    # Plain round-robin alternates batch by batch: even to a connection or two. With skip_busy
    # (the default) a worker that has not read its last connection yet is passed over, which
    # on two cores shared with the clients moves a few percent, more on a loaded machine.
    with ServerProcess(balance="round-robin", skip_busy=skip_busy) as server:
        server.wait_ready(2)
        counts: dict[int, int] = {}
        for body in _many(server.address, 2000, clients=4):
            pid = answering_pid(body)
            counts[pid] = counts.get(pid, 0) + 1
        assert len(counts) == 2
        assert abs(min(counts.values()) / 2000 - 0.5) < most_off, counts


def test_four_workers_on_a_small_machine_all_serve() -> None:
    with ServerProcess(workers=4) as server:
        server.wait_ready(4)
        pids = {answering_pid(b) for b in _many(server.address, 200)}
        assert pids == set(server.workers()) and len(pids) == 4


def test_threads_run_plain_handlers_concurrently() -> None:
    with ServerProcess(workers=1, threads=4) as server:
        server.wait_ready(1)
        results: list[str] = []
        threads = [
            threading.Thread(target=lambda: results.append(request(server.address, "/sleep/2000")))
            for _ in range(3)
        ]
        for t in threads:
            t.start()
        server.wait_events("handling", 3)
        # One worker with four threads answers a fast request while three slow ones run.
        results.append(request(server.address, "/"))
        assert len(results) == 1
        assert server.events("handled") == []
        for t in threads:
            t.join(10)
        assert len(results) == 4


def test_handler_exception_is_logged_and_closes_only_that_connection() -> None:
    with ServerProcess("tests.apps:raising_app", workers=1) as server:
        (worker,) = server.wait_ready(1)
        with pytest.raises(ConnectionError):
            request(server.address, "/raise")
        assert answering_pid(request(server.address, "/")) == worker  # the same worker goes on
        assert server.exits() == {}
        # Kept on the log: "an exception in a handler is logged with its traceback" is
        # the behaviour under test, and the log is the only place it goes.
        wait_for(lambda: "boom from the handler" in server.log(), what="traceback in log")
        assert "Traceback" in server.log()


def test_unix_and_ipv6_addresses() -> None:
    path = f"/tmp/dispatch-test-{os.getpid()}.sock"
    binds = [f"unix:{path}"]
    if socket.has_ipv6:
        binds.append("[::1]:0")
    with ServerProcess(bind=binds) as server:
        server.wait_ready(2)
        for address in server.addresses:
            assert "pid" in request(address)
    assert not os.path.exists(path)  # removed on exit


def test_descriptors_return_to_baseline_after_many_connections() -> None:
    with ServerProcess(balance="least-connections") as server:
        workers = server.wait_ready(2)
        _many(server.address, 200)
        before = {pid: fd_count(pid) for pid in [server.pid, *workers]}
        _many(server.address, 20_000, clients=8)
        wait_for(lambda: {pid: fd_count(pid) for pid in before} == before, timeout=15,
                 what=f"fd counts back to {before}")
        assert set(server.workers()) == set(workers)  # no worker was replaced on the way


def test_truncated_fd_message_closes_what_arrived() -> None:
    from dispatch import fdpass

    left, right = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    with left, right:
        files = [os.open("/dev/null", os.O_RDONLY) for _ in range(10)]
        baseline = fd_count(os.getpid())
        assert fdpass.send_fds(left, files, b"x")
        for fd in files:
            os.close(fd)
        data, fds, flags = fdpass.recv_fds(right, 16, maxfds=3)
        assert data == b"x" and fds == [] and flags & fdpass.CTRUNC
        assert fd_count(os.getpid()) == baseline - 10


def test_rlimit_truncation_never_leaks(tmp_path) -> None:
    """The kernel drops what does not fit under RLIMIT_NOFILE; we close the rest."""
    script = tmp_path / "rlimit.py"
    script.write_text(
        "import os, resource, socket\n"
        "from dispatch import fdpass\n"
        "a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)\n"
        "files = [os.open('/dev/null', os.O_RDONLY) for _ in range(40)]\n"
        "fdpass.send_fds(a, files, b'x')\n"
        "for fd in files: os.close(fd)\n"
        "before = len(os.listdir('/proc/self/fd'))\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (before + 10, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))\n"
        "data, fds, flags = fdpass.recv_fds(b, 16)\n"
        "after = len(os.listdir('/proc/self/fd'))\n"
        "print(bool(flags & fdpass.CTRUNC), len(fds), after - before)\n"
    )
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "0", "0"]


def test_bad_arguments_raise_before_anything_starts() -> None:
    with pytest.raises(ValueError, match="workers"):
        dispatch.Server("tests.apps:pid_app", workers=0)
    with pytest.raises(TypeError, match="threads"):
        dispatch.Server("tests.apps:pid_app", threads="2")
    with pytest.raises(ValueError, match="balance"):
        dispatch.Server("tests.apps:pid_app", balance="random")
    with pytest.raises(ValueError, match="bind"):
        dispatch.Server("tests.apps:pid_app", bind="nonsense")
    with pytest.raises(ValueError, match="module:attr"):
        dispatch.Server("no_colon_here")


def test_bind_error_is_one_line_and_leaves_no_process() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = subprocess.run(
            [sys.executable, "-m", "dispatch", "tests.apps:pid_app", "--bind", f"127.0.0.1:{port}"],
            cwd=ROOT, capture_output=True, text=True, timeout=30,
        )
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], out.stderr


def test_bind_error_in_second_address_releases_the_first() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "dispatch", "tests.apps:pid_app", "--bind", "127.0.0.1:0",
         "--bind", "unix:/nonexistent-dir/x.sock"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert out.returncode == 1
    assert "unix:/nonexistent-dir/x.sock" in out.stderr


def test_sigterm_lets_the_request_in_flight_finish() -> None:
    with ServerProcess(graceful_timeout=20) as server:
        workers = server.wait_ready(2)
        result: list[str] = []
        thread = threading.Thread(target=lambda: result.append(request(server.address, "/sleep/1500")))
        thread.start()
        server.wait_events("handling")
        server.signal(signal.SIGTERM)
        thread.join(15)
        assert result and answering_pid(result[0]) in workers
        assert server.wait(15) == 0
        assert not any(pid_alive(p) for p in workers)


def test_workers_die_with_a_killed_primary() -> None:
    server = ServerProcess(workers=3)
    try:
        workers = server.wait_ready(3)
        server.signal(signal.SIGKILL)
        server.wait(10)
        wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=10, what="workers gone")
    finally:
        server.stop()


def test_sigint_stops_cleanly_with_exit_zero() -> None:
    with ServerProcess() as server:
        workers = server.wait_ready(2)
        load = Load(server.address, clients=2, max_requests=200)
        load.wait_requests(50)
        server.signal(signal.SIGINT)
        assert server.wait(20) == 0
        load.stop()
        assert not any(pid_alive(p) for p in workers)


@pytest.mark.parametrize("mode", ["round-robin", "reuseport"])
def test_max_connections_bounds_an_async_worker(mode: str) -> None:
    with ServerProcess("tests.apps:async_pid_app", workers=1, max_connections=2, balance=mode) as server:
        server.wait_ready(1)
        results: list[str] = []
        threads = [threading.Thread(target=lambda: results.append(request(server.address, "/sleep/1500")))
                   for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(15)
        assert len(results) == 3  # every one is served, none lost
        started = sorted(e["t"] for e in server.events("handling"))
        finished = sorted(e["t"] for e in server.events("handled"))
        assert len(started) == len(finished) == 3
        # Two ran at once; the third started only once one of them had finished.
        assert started[1] < finished[0] <= started[2]


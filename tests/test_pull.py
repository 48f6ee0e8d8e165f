"""balance="pull" with real processes: one queue every worker reads, nothing lost."""

from __future__ import annotations

import os
import signal
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor

from tests.helpers import (
    Load,
    ServerProcess,
    answering_pid,
    as_user,
    fd_count,
    pid_alive,
    request,
    unprivileged_user,
    wait_for,
)
from tests.test_attacks import (
    _answers,
    _close_all,
    _open_idle,
    _settled_fd_count,
    needs_root,
    needs_tools,
)
from tests.test_busy_workers import SLOW, _burning, _fast_requests_during_a_burn

KILLED = "was killed by signal 9 (SIGKILL)"


def test_a_blocked_loop_takes_nothing_from_the_queue() -> None:
    # No skipping or taking back is involved: the burning worker does not read, so
    # every quick request is read by the other one as soon as it is queued.
    waited, burning, skipped, reclaimed = _fast_requests_during_a_burn("pull")
    assert [s for s in waited if s > SLOW] == [], waited
    assert set(skipped.values()) == {0} and set(reclaimed.values()) == {0}


def test_killed_worker_loses_only_what_it_was_handling() -> None:
    # One thread per worker and 16 clients: 14 connections at a time wait in the
    # queue, which a killed worker never holds: each kill costs the one request it ran.
    kills = 4
    victims = []
    with ServerProcess(workers=2, threads=1, balance="pull") as server:
        server.wait_ready(2)
        load = Load(server.address, clients=16, path="/sleep/40", max_requests=5000, max_seconds=60)
        try:
            load.wait_requests(40)
            for _ in range(kills):
                victim = server.workers()[0]
                os.kill(victim, signal.SIGKILL)
                victims.append(victim)
                wait_for(lambda v=victim: len(server.workers()) == 2 and v not in server.workers(),
                         timeout=10, what="replacement worker")
                server.wait_ready(2)
                served = load.ok
                load.wait_requests(served + len(load.failed) + 20)
        finally:
            load.stop()
        assert server.exits() == dict.fromkeys(victims, KILLED)
        assert server.cluster_health()["balance"] == "pull"
    assert len(load.failed) <= kills, load.failed
    assert load.ok > 100


def test_health_counts_what_each_worker_finished() -> None:
    with ServerProcess(workers=2, balance="pull") as server:
        workers = server.wait_ready(2)
        with ThreadPoolExecutor(8) as pool:
            pids = [answering_pid(b) for b in pool.map(lambda _: request(server.address), range(200))]
        assert set(pids) == set(workers)

        def counted() -> dict[int, int] | None:
            health = server.cluster_health()
            by_pid = {w["pid"]: w["connections_total"] for w in health["workers"]}
            return by_pid if health["connections_in_flight"] == 0 and sum(by_pid.values()) == 200 else None

        by_pid = wait_for(counted, timeout=10, what="every connection reported done")
        assert by_pid == {pid: pids.count(pid) for pid in workers}
        assert server.cluster_health()["connections_total"] == 200


def test_graceful_stop_serves_what_waits_in_the_queue() -> None:
    # Both loops blocked by burns: quick requests wait in the queue when SIGTERM comes.
    # Each worker reads what it can start before it drains, so all are answered.
    with ServerProcess("dispatch.demo:app", workers=2, balance="pull", graceful_timeout=20) as server:
        workers = server.wait_ready(2)
        with ThreadPoolExecutor(10) as pool:
            burns = [pool.submit(request, server.address, "/burn?ms=1500", 20)]
            first = wait_for(lambda: _burning(workers), timeout=10, what="a worker burning")
            burns.append(pool.submit(request, server.address, "/burn?ms=1500", 20))
            wait_for(lambda: _burning([w for w in workers if w != first]), timeout=10,
                     what="the other worker burning")
            fast = _queue_then_stop(server, pool, 6)
            answers = [f.result(timeout=20) for f in fast + burns]
        assert server.wait(20) == 0
        assert "accepted connections that no worker took" not in server.log()
    assert all("worker pid" in a for a in answers[:6]), answers


def test_graceful_stop_serves_the_queue_after_the_requests_in_hand() -> None:
    # One thread per worker, each busy with a slow request, four more in the queue: the
    # workers have no room when they are asked to stop, and read the queue to its end
    # as their threads come free.
    with ServerProcess(workers=2, threads=1, balance="pull", graceful_timeout=20) as server:
        server.wait_ready(2)
        with ThreadPoolExecutor(6) as pool:
            # One at a time: a worker whose thread is free may also take a connection that has
            # not sent its request yet (its idle pool), so two sent at once can land on one worker.
            slow = []
            for started in (1, 2):
                slow.append(pool.submit(request, server.address, "/sleep/800", 20))
                handling = server.wait_events("handling", started)
            assert len({e["pid"] for e in handling}) == 2  # each worker's one thread is busy
            fast = _queue_then_stop(server, pool, 4)
            answers = [f.result(timeout=20) for f in slow + fast]
        assert server.wait(20) == 0
        assert "accepted connections that no worker took" not in server.log()
    assert all(a.startswith("pid ") for a in answers), answers


def _queue_then_stop(server: ServerProcess, pool: ThreadPoolExecutor, count: int) -> list[Future[str]]:
    """``count`` quick requests, once all of them wait in the queue: SIGTERM."""
    fast = [pool.submit(request, server.address, "/", 20) for _ in range(count)]
    wait_for(lambda: server.cluster_health()["connections_in_flight"] == count, timeout=5,
             what=f"{count} connections in the queue")
    server.signal(signal.SIGTERM)
    return fast


def test_recycling_by_max_requests_drops_nothing() -> None:
    with ServerProcess(workers=2, balance="pull", max_requests=60, max_requests_jitter=20) as server:
        server.wait_ready(2)
        load = Load(server.address, clients=4, max_requests=600, max_seconds=60)
        load.wait_requests(600, timeout=60)
        load.stop()
        assert load.failed == []
        assert len(load.pids) > 2  # workers were replaced along the way
        exits = server.wait_events("worker_exit")
        assert {e["how"] for e in exits} == {"exited with code 0"}


def test_stalled_worker_leaves_the_queue_to_the_others() -> None:
    # A stopped worker (SIGSTOP) reads nothing: every request goes to the other one,
    # long before the stall is noticed, and none waits for the stopped one.
    with ServerProcess(workers=2, balance="pull", timeout=30) as server:
        workers = server.wait_ready(2)
        os.kill(workers[0], signal.SIGSTOP)
        try:
            began = time.monotonic()
            with ThreadPoolExecutor(4) as pool:
                pids = [answering_pid(b) for b in pool.map(lambda _: request(server.address), range(40))]
            took = time.monotonic() - began
        finally:
            os.kill(workers[0], signal.SIGCONT)
        assert set(pids) == {workers[1]}
        assert took < 5, took


def test_a_full_queue_is_backpressure_and_loses_nothing() -> None:
    # One worker with one thread, busy for a second, and 400 clients: more than the queue
    # holds (a few hundred messages). The primary stops accepting when it says EAGAIN,
    # the rest wait in the listen backlog, and every one is answered.
    with ServerProcess(workers=1, threads=1, balance="pull") as server:
        server.wait_ready(1)
        host, _, port = server.address.rpartition(":")
        with ThreadPoolExecutor(1) as pool:
            slow = pool.submit(request, server.address, "/sleep/1500", 20)
            server.wait_events("handling")
            clients = []
            for _ in range(400):
                sock = socket.create_connection((host, int(port)), timeout=20)
                sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
                clients.append(sock)
            wait_for(lambda: server.metrics()["dispatch_accept_backpressure_total"] >= 1, timeout=10,
                     what="the queue to say EAGAIN")
            answers = [_read_all(sock) for sock in clients]
            assert slow.result(timeout=20).startswith("pid ")
        assert all(a.startswith(b"HTTP/1.") and b"pid " in a for a in answers)
        assert server.cluster_health()["primary_pid"] == server.pid


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    with sock:
        while chunk := sock.recv(4096):
            data += chunk
    return data


@needs_root
@needs_tools
def test_idle_connections_past_the_fd_limit_do_not_crash_a_non_root_primary() -> None:
    # Idle clients fill the workers' descriptor tables (they wait for first bytes on the
    # loop), then the queue: the workers stop reading, the primary stops accepting.
    uid, gid = unprivileged_user()
    wrapper = ["prlimit", "--nofile=256:256", *as_user(uid, gid)]
    with ServerProcess("tests.apps:pid_app", workers=2, balance="pull", wrapper=wrapper) as server:
        workers = server.wait_ready(2)
        baseline = fd_count(server.pid)
        idle = _open_idle(server.address, 1200)
        try:
            wait_for(lambda: _held_back(server) >= 1, 10, what="the queue to fill or the budget to run out")
            assert server.cluster_health()["primary_pid"] == server.pid
            assert sorted(server.workers()) == sorted(workers), "no worker may be replaced"
        finally:
            _close_all(idle)
        wait_for(lambda: _answers(server.address), 20, what="an answer after the idle clients left")
        assert pid_alive(server.pid)
        assert sorted(server.workers()) == sorted(workers)
        assert _settled_fd_count(server.pid, baseline) <= baseline


def _held_back(server: ServerProcess) -> float:
    """Times the primary stopped accepting: the queue was full, or its in-flight budget spent."""
    metrics = server.metrics()
    return metrics["dispatch_accept_backpressure_total"] + metrics["dispatch_inflight_full_total"]

"""The attacks by name, each with what it does and what a sound server does."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.targets.abuse_command import USER
from benchmarks.workloads.abuse.base import Context, Row
from benchmarks.workloads.abuse.connections import (
    client_resets,
    fd_flood_nonroot,
    health_pool,
    idle_plain,
    worker_emfile,
)
from benchmarks.workloads.abuse.misuse import (
    bad_policy,
    channel_flood,
    fake_done,
    fork_fail,
    listen_fds_udp,
    pidfile_symlink,
)


@dataclass(frozen=True)
class Entry:
    run: Callable[[Context], Row]
    what: str
    expected: str


ATTACKS: dict[str, Entry] = {
    "fd-flood-nonroot": Entry(
        fd_flood_nonroot,
        f"server as user {USER} under prlimit --nofile=1024:1024, 4 workers, coroutine handler; "
        "1,800 idle TCP connections held 5 s, then closed",
        "the primary stays up and serves again once they close"),
    "idle-plain": Entry(
        idle_plain,
        "plain handler, 2 workers, threads=1; 2 connections that send nothing, then 5 s of requests",
        "normal requests are still served"),
    "idle-plain-trickle": Entry(
        lambda ctx: idle_plain(ctx, slow=True),
        "as idle-plain, but the 2 connections trickle one byte a second of a head that never ends",
        "normal requests are still served"),
    "worker-emfile": Entry(
        worker_emfile,
        "whole server under prlimit --nofile=256, coroutine handler, 2 workers; 600 idle connections "
        "held 5 s, enough to run the workers out of descriptors if the primary passes them all; "
        "then how long until it serves again",
        "heartbeats survive; it serves again at once"),
    "fork-fail": Entry(
        fork_fail,
        f"server as user {USER} under prlimit --nproc one above the tasks it needs; "
        "SIGUSR2, 3 × SIGTTIN, SIGUSR2",
        "the primary survives, the old workers keep serving"),
    "bad-policy-out-of-range": Entry(
        lambda ctx: bad_policy(ctx, "out-of-range"),
        "a ConnectionPolicy whose choose() returns an index past the last worker; 5 s of requests",
        "falls back to a valid worker and keeps serving"),
    "bad-policy-bad-shares": Entry(
        lambda ctx: bad_policy(ctx, "bad-shares"),
        "a batch Policy whose assign() shares sum to one more than the batch; 5 s of requests",
        "falls back and keeps serving"),
    "listen-fds-udp": Entry(
        listen_fds_udp,
        "LISTEN_PID/LISTEN_FDS hand the CLI a UDP socket at fd 3; then 20 datagrams to it",
        "refuses to start with a clear error; no spin"),
    "client-resets": Entry(
        client_resets,
        "plain handler, threads=4; 500 connections that send a request and close with SO_LINGER 0 (RST)",
        "no ERROR traceback per reset"),
    "channel-flood": Entry(
        channel_flood,
        "a plain handler thread writes valid Heartbeat messages on its worker's control channel for 5 s",
        "the primary keeps dispatching other connections"),
    "fake-done": Entry(
        fake_done,
        "least-connections; a handler reports Done(1000000) on its control channel, then 5 s of requests",
        "the primary does not trust a count above what it sent; the load stays spread"),
    "health-idle-pool": Entry(
        health_pool,
        "70 idle clients on the health port (its limit is 64), reconnecting when cut, for 12 s; "
        "GET /healthz every 0.2 s",
        "/healthz stays 200"),
    "health-slowloris": Entry(
        lambda ctx: health_pool(ctx, slow=True),
        "as health-idle-pool, but each client trickles one byte of a head every 0.5 s",
        "/healthz stays 200"),
    "pidfile-symlink": Entry(
        pidfile_symlink,
        "symlinks planted at `{pidfile}.{pid}.tmp` for the next 200 pids, pointing to a victim file; "
        "the server (as root) starts with that pidfile",
        "the victim is untouched"),
}


"""Attacks through connections: idle and trickling clients (plain handler, a descriptor
limit, as an unprivileged user), client resets, and pools on the health port."""

from __future__ import annotations

import threading
import time
from collections import Counter

from benchmarks.measurement.probes import HOST, Probe
from benchmarks.targets.abuse import Target
from benchmarks.workloads.abuse.base import (
    Context,
    Row,
    heartbeat_ages,
    held,
    hold,
    launch,
    measure,
    serves_again,
)
from benchmarks.workloads.abuse.clients import (
    close_all,
    hog_health,
    open_idle,
    reset_burst,
    trickle,
)


def fd_flood_nonroot(ctx: Context) -> Row:
    row = Row("fd-flood-nonroot")
    user = ctx.user()
    if user.reason:
        row.outcome = "skipped"
        row.notes.append(user.reason)
        return row
    if user.note:
        row.notes.append(user.note)
    options = {"handler": "dispatch.demo:stream_app", "workers": 4}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        socks, connected = open_idle(target.port, 1800, 8.0)
        try:
            probe.start()  # measures the hold, not the seconds it took to open them
            row.notes.append(f"{connected} of 1800 idle connections established")
            hold(target, 5.0)
            row.notes.append(held(target))
        finally:
            close_all(socks)

    with launch(row, ctx, options, user, ["--nofile=1024:1024"]) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def idle_plain(ctx: Context, slow: bool = False) -> Row:
    row = Row("idle-plain-trickle" if slow else "idle-plain")
    options = {"handler": "dispatch.demo:sync_app", "workers": 2, "threads": 1}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        socks, connected = open_idle(target.port, 2, 2.0)
        stop = threading.Event()
        dripper = threading.Thread(target=trickle, args=(socks, stop, 1.0, 10.0), daemon=True)
        try:
            if slow:
                dripper.start()
            time.sleep(0.5)  # they reach the workers first
            probe.start()
            hold(target, 5.0)
        finally:
            stop.set()
            if slow:
                dripper.join(timeout=3)
            close_all(socks)
        row.notes.append(f"{connected} {'trickling' if slow else 'idle'} connections, then 5 s of requests")

    with launch(row, ctx, options) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def worker_emfile(ctx: Context) -> Row:
    row = Row("worker-emfile")
    options = {"handler": "dispatch.demo:stream_app", "workers": 2, "health": f"{HOST}:0"}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        socks, connected = open_idle(target.port, 600, 6.0)
        try:
            probe.start()
            hold(target, 5.0)
            where = held(target)
        finally:
            close_all(socks)
        probe.finish()
        row.notes.append(f"server under prlimit --nofile=256; {connected} of 600 idle connections; {where}")
        row.notes.append(serves_again(target, 12.0))
        row.notes.append(heartbeat_ages(target))

    with launch(row, ctx, options, limits=["--nofile=256:256"]) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def client_resets(ctx: Context) -> Row:
    row = Row("client-resets")
    options = {"handler": "dispatch.demo:sync_app", "workers": 2, "threads": 4}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        probe.start()
        sent, failed = reset_burst(target.port, 500, 15.0)
        hold(target, 1.0)  # let the workers meet the resets
        row.notes.append(f"{sent} request+RST connections ({failed} could not connect)")

    with launch(row, ctx, options) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def health_pool(ctx: Context, slow: bool = False) -> Row:
    row = Row("health-slowloris" if slow else "health-idle-pool")
    options = {"handler": "dispatch.demo:stream_app", "workers": 2, "health": f"{HOST}:0"}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        stats: Counter[str] = Counter()
        stop = threading.Event()
        pool = threading.Thread(target=hog_health, args=(target.health_port, 70, slow, stop, 14.0, stats),
                                daemon=True)
        pool.start()
        try:
            time.sleep(0.5)  # the pool is in place
            probe.start()
            hold(target, 12.0)
        finally:
            stop.set()
            pool.join(timeout=5)
        row.notes.append(f"70 {'trickling' if slow else 'idle'} health clients for 12 s: "
                         f"{stats['cut']} cut and reconnected, {stats['503']} told 503, "
                         f"{stats['refused']} connects failed; during/after count GET /healthz every 0.2 s")

    with launch(row, ctx, options) as target:
        if target is not None:
            measure(row, target, attack, path="/healthz", port=target.health_port, interval=0.2, clients=1)
    return row


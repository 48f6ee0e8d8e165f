"""Attacks from inside or around the server: a process limit, broken balancing policies,
a UDP socket handed over by socket activation, handlers that misuse their worker's control
channel, and symlinks planted where the pidfile goes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.measurement.logs import last_error, log_notes
from benchmarks.measurement.probes import HOST, Probe, fetch
from benchmarks.measurement.proc import cpu_percent, fd_count, uid_tasks
from benchmarks.targets.abuse import Target, describe_exit
from benchmarks.targets.abuse_command import GRACEFUL, USER, server_env
from benchmarks.workloads.abuse.base import (
    SETTLE_SECONDS,
    Context,
    Row,
    hold,
    launch,
    measure,
    rolling_restart,
)
from benchmarks.workloads.abuse.clients import flood_request


def fork_fail(ctx: Context) -> Row:
    row = Row("fork-fail")
    user = ctx.user()
    if user.reason:
        row.outcome = "skipped"
        row.notes.append(user.reason)
        return row
    if user.note:
        row.notes.append(user.note)
    workers = 2
    options = {"handler": "dispatch.demo:stream_app", "workers": workers, "boot_timeout": 5}
    # RLIMIT_NPROC counts every task of the uid: what it runs already, the primary, one thread
    # per worker with a coroutine handler; one more allows a single fork beyond that.
    others = uid_tasks(user.uid)
    limit = others + 1 + workers + 1

    def attack(target: Target, row: Row, probe: Probe) -> None:
        row.notes.append(f"RLIMIT_NPROC {limit}; {USER} had {uid_tasks(user.uid)} tasks once ready")
        probe.start()
        first = rolling_restart(target, 6.0)
        for _ in range(3):
            if target.alive():
                os.kill(target.pid, signal.SIGTTIN)
            hold(target, 1.0)
        second = rolling_restart(target, 6.0)
        row.notes.append(f"SIGUSR2: {first}; 3 × SIGTTIN; SIGUSR2: {second}; "
                         f"{len(target.workers())} workers at the end")

    with launch(row, ctx, options, user, [f"--nproc={limit}:{limit}"]) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def bad_policy(ctx: Context, policy: str) -> Row:
    row = Row(f"bad-policy-{policy}")
    options = {"handler": "dispatch.demo:stream_app", "workers": 2, "policy": policy}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        probe.start()
        hold(target, 5.0)

    with launch(row, ctx, options, probe=False) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def listen_fds_udp(ctx: Context) -> Row:
    row = Row("listen-fds-udp")
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind((HOST, 0))
    udp_port = udp.getsockname()[1]
    # As systemd does: the socket at fd 3, LISTEN_PID naming the process that runs dispatch.
    launcher = (
        "import os, sys\n"
        f"os.dup2({udp.fileno()}, 3, inheritable=True)\n"
        "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()))\n"
        "os.execv(sys.executable, [sys.executable, '-m', 'dispatch', 'dispatch.demo:app', '--workers', '2',\n"
        f"         '--bind', '{HOST}:1', '--log-level', 'info', '--graceful-timeout', '{GRACEFUL}'])\n"
    )
    target = Target(row.attack, [sys.executable, "-c", launcher], server_env(), ctx.args.logs,
                    pass_fds=(udp.fileno(),))
    try:
        udp.close()  # only the server holds it now
        started = wait_started(target, 8.0)
        if not started:
            code = target.proc.poll()
            row.outcome = f"refused to start ({describe_exit(code)})" if code is not None else "no answer in 8 s"
            last = last_error(target.log())
            row.notes.append(f"log: `{last}`" if last else "nothing in the log")
            return row
        udp_spin(row, target, udp_port)
    finally:
        target.stop()
    return row


def wait_started(target: Target, seconds: float) -> bool:
    """The CLI logged its listening line (True) or exited (False)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and target.alive():
        if "listening on" in target.log():
            return True
        time.sleep(0.05)
    return False


def udp_spin(row: Row, target: Target, udp_port: int) -> None:
    """Started on a UDP socket: what does a datagram do to the primary's loop?"""
    hold(target, 1.0)
    fds_before = fd_count(target.pid)
    offset = target.log_size()
    idle_cpu = cpu_percent(target.pid, 2.0)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        for _ in range(20):
            sender.sendto(b"hello", (HOST, udp_port))
    busy_cpu = cpu_percent(target.pid, 3.0)
    text = target.log(offset)
    hold(target, SETTLE_SECONDS)
    code = target.proc.poll()
    row.fds = (fds_before, fd_count(target.pid) if code is None else None)
    row.outcome = "started anyway; " + ("alive" if code is None else f"**died** ({describe_exit(code)})")
    row.notes.append("no TCP listener: nothing to request")
    row.notes.append(f"primary CPU {idle_cpu:.0f}% before, {busy_cpu:.0f}% in the 3 s after 20 datagrams; "
                     f"log grew {len(text.encode()) / 1024:.0f} KiB")
    row.notes += log_notes(text, died=code is not None)


def channel_flood(ctx: Context) -> Row:
    row = Row("channel-flood")
    options = {"handler": "benchmarks.targets.abuse_apps:flood_app", "workers": 2, "threads": 2}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        answer: list[str] = []
        flooder = threading.Thread(target=lambda: answer.append(flood_request(target.port)), daemon=True)
        probe.start()
        flooder.start()
        flooder.join(timeout=15)
        row.notes.append("a handler thread writes valid Heartbeats on its own control channel for 5 s: "
                         + (answer[0] if answer else "no answer in 15 s"))

    with launch(row, ctx, options) as target:
        if target is not None:
            measure(row, target, attack)
    return row


def fake_done(ctx: Context) -> Row:
    row = Row("fake-done")
    options = {"handler": "benchmarks.targets.abuse_apps:fake_done_app", "workers": 2, "threads": 2,
               "balance": "least-connections"}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        try:
            faker = fetch(target.port, "/fake-done")[1].decode()
        except (OSError, ValueError, IndexError) as exc:
            row.notes.append(f"/fake-done failed ({exc.__class__.__name__})")
            return
        probe.start()
        hold(target, 5.0)
        probe.finish()
        share = probe.bodies.get(faker.encode(), 0) / probe.ok if probe.ok else 0.0
        row.notes.append(f"{faker} reported Done(1000000) on its channel; least-connections then gave it "
                         f"{share:.0%} of the requests ({len(probe.bodies)} workers answered)")

    with launch(row, ctx, options) as target:
        if target is not None:
            measure(row, target, attack, clients=4)
    return row


def pidfile_symlink(ctx: Context) -> Row:
    row = Row("pidfile-symlink")
    tmp = Path(tempfile.mkdtemp(prefix="dispatch-abuse-"))
    victim = tmp / "victim.txt"
    victim.write_text("precious\n")
    pidfile = tmp / "app.pid"
    # The primary writes "{pidfile}.{its pid}.tmp" first: plant that name for the next 200 pids.
    last = int(Path("/proc/sys/kernel/ns_last_pid").read_text())
    planted = range(last + 1, last + 201)
    for pid in planted:
        os.symlink(victim, f"{pidfile}.{pid}.tmp")
    options = {"handler": "dispatch.demo:stream_app", "workers": 2, "pidfile": str(pidfile)}

    def attack(target: Target, row: Row, probe: Probe) -> None:
        probe.start()
        content = victim.read_text()
        where = "in" if target.pid in planted else "outside"
        link = "a symlink to the victim" if pidfile.is_symlink() else "a plain file"
        verdict = "**overwritten** with " + repr(content) if content != "precious\n" else "untouched"
        row.notes.append(f"primary pid {target.pid}, {where} the planted range {last + 1}..{last + 200}; "
                         f"victim file {verdict}; the pidfile is {link}")
        hold(target, 3.0)

    try:
        with launch(row, ctx, options) as target:
            if target is not None:
                measure(row, target, attack)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # removes the links, never follows them
    return row


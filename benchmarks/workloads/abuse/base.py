"""What every attack shares: its result row, starting its server, measuring service during
and after the attack and the primary's descriptors once it settled, and a few waits.

Each attack starts its own server (a subprocess listening on 127.0.0.1 on a free
port; no traffic goes anywhere else), sends normal requests while the attack
runs and for 5 s after it, lets the server settle, counts the primary's open
descriptors, and stops it. Nothing is asserted: an attack that crashes or stalls
the server is a row saying so.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from benchmarks.measurement.logs import last_error, log_notes
from benchmarks.measurement.probes import Probe, fetch, request_ok, run_probe
from benchmarks.measurement.proc import accept_queue, fd_count
from benchmarks.targets.abuse import Target, describe_exit
from benchmarks.targets.abuse_command import UserEnv, prepare_user, runner_command

AFTER_SECONDS = 5.0
SETTLE_SECONDS = 3.0
START_DEADLINE = 15.0
STARTED = re.compile(r"started pid (\d+)")
RESTART_DONE = "rolling restart complete"
RESTART_ABORTED = "rolling restart aborted"


# ====================================================================== one result
@dataclass
class Row:
    attack: str
    outcome: str = ""
    during: tuple[int, int] | None = None  # requests answered 200 / attempted
    after: tuple[int, int] | None = None
    fds: tuple[int | None, int | None] = (None, None)
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0


@dataclass
class Context:
    args: argparse.Namespace
    _user: UserEnv | None = None

    def user(self) -> UserEnv:
        if self._user is None:
            self._user = prepare_user()
        return self._user


Attack = Callable[[Target, Row, Probe], None]


# ====================================================================== starting
@contextlib.contextmanager
def launch(row: Row, ctx: Context, options: dict, user: UserEnv | None = None,
           limits: list[str] = (), probe: bool = True) -> Iterator[Target | None]:
    """A ready server, or None with the reason in ``row``; stopped on the way out.
    ``probe=False``: ready from the log alone, when the first request is the attack."""
    command, env = runner_command({**ctx.args.server_options, **options}, user, list(limits))
    target = Target(row.attack, command, env, ctx.args.logs)
    try:
        deadline = time.monotonic() + START_DEADLINE
        if (target.read_json(deadline) is None
                or not target.wait_ready(options.get("workers", 2), deadline, probe)):
            not_started(row, target)
            yield None
        else:
            yield target
    finally:
        target.stop()


def not_started(row: Row, target: Target) -> None:
    code = target.proc.poll()
    row.outcome = "did not start" + (f" ({describe_exit(code)})" if code is not None else f" in {START_DEADLINE:g}s")
    last = last_error(target.log())
    if last:
        row.notes.append(f"log: `{last}`")


# ====================================================================== measuring
def measure(row: Row, target: Target, attack: Attack, path: str = "/", port: int = 0,
            interval: float = 0.0, clients: int = 2) -> None:
    """Run ``attack`` (which starts the probe once it is in place), then the 5 s after,
    then count the primary's descriptors once it settled."""
    port = port or target.port
    fds_before = fd_count(target.pid)
    offset = target.log_size()
    seen_before = set(target.seen) | set(target.workers())
    probe = Probe(port, path, clients, interval)
    try:
        attack(target, row, probe)
    finally:
        row.during = probe.finish()
    if target.alive():
        row.after = run_probe(port, path, AFTER_SECONDS, clients, interval)
        hold(target, SETTLE_SECONDS)
    text = target.log(offset)
    fds_after = fd_count(target.pid) if target.alive() else None
    row.fds = (fds_before, fds_after)
    started = {int(p) for p in STARTED.findall(text)} | (set(target.seen) - seen_before)
    code = target.proc.poll()
    state = "alive" if code is None else f"**died** ({describe_exit(code)})"
    row.outcome = f"{state}; {len(started)} workers replaced"
    row.notes += log_notes(text, died=code is not None)


def hold(target: Target, seconds: float) -> None:
    """Wait ``seconds``, less if the primary exits."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and target.alive():
        time.sleep(0.1)


def held(target: Target) -> str:
    """Where the connections are at the end of an idle flood."""
    fds = [fd_count(pid) or 0 for pid in target.workers()]
    queue = accept_queue(target.port)
    return (f"at the end of the hold {'?' if queue is None else queue} waiting in the listen backlog, "
            f"workers' open fds {'+'.join(map(str, fds)) or 'none'}")


def serves_again(target: Target, seconds: float) -> str:
    """How long after the attack until a request is answered again."""
    t0 = time.monotonic()
    while time.monotonic() < t0 + seconds and target.alive():
        if request_ok(target.port, "/", 1.0):
            return f"serves again {time.monotonic() - t0:.1f} s after the connections closed"
        time.sleep(0.2)
    return f"not serving {seconds:g} s after the connections closed"


def heartbeat_ages(target: Target) -> str:
    try:
        status, body = fetch(target.health_port, "/cluster-health")
        ages = [w.get("heartbeat_age_s") for w in json.loads(body)["workers"]]
    except (OSError, ValueError, KeyError, IndexError) as exc:
        return f"/cluster-health unanswered ({exc.__class__.__name__})"
    return "heartbeat ages after: " + ", ".join("?" if a is None else f"{a:.1f} s" for a in ages)


def rolling_restart(target: Target, seconds: float) -> str:
    """SIGUSR2, then wait for the primary to say how the restart ended."""
    if not target.alive():
        return "primary already gone"
    offset = target.log_size()
    os.kill(target.pid, signal.SIGUSR2)
    t0 = time.monotonic()
    while time.monotonic() < t0 + seconds:
        text = target.log(offset)
        if RESTART_DONE in text:
            return f"complete in {time.monotonic() - t0:.1f} s"
        if RESTART_ABORTED in text:
            return "aborted"
        if not target.alive():
            return "primary exited"
        time.sleep(0.05)
    return f"no outcome in {seconds:g} s"


"""One dispatch primary under attack, in a subprocess of its own session, with its workers;
stopped by pid (also at exit, whatever happened: ``stop_all``)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import select
import signal
import subprocess
import threading
import time
from pathlib import Path

from benchmarks.measurement.logs import log_text, trim_log
from benchmarks.measurement.probes import request_ok
from benchmarks.measurement.proc import children, group_members, start_time
from benchmarks.paths import ROOT
from benchmarks.targets.servers import kill_leftovers

STOP_DEADLINE = 8.0  # SIGTERM, then SIGKILL
READY = re.compile(r"\(pid (\d+)\) ready")

_LIVE: list[Target] = []  # started and not yet stopped: stopped again at exit, whatever happened


def describe_exit(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {-code} ({signal.Signals(-code).name})"
        return f"signal {-code}"
    return f"exit {code}"


class Target:
    """One dispatch primary in a subprocess, with its workers; stopped by pid."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], logs: Path,
                 pass_fds: tuple[int, ...] = ()) -> None:
        self.log_path = logs / f"abuse-{name}.log"
        self.log_file = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=self.log_file, pass_fds=pass_fds,
                                     start_new_session=True)  # Ctrl-C reaches us, not them
        _LIVE.append(self)
        self.pid = self.proc.pid
        self.started_at = start_time(self.pid)
        self.port = 0
        self.health_port = 0
        self.seen: dict[int, int | None] = {}  # every worker pid seen -> its start time
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()

    def _sample(self) -> None:
        # Workers are remembered so that any left behind can be killed by pid and start time.
        while not self._stop.wait(0.1):
            for kid in children(self.pid):
                self.seen.setdefault(kid, start_time(kid))

    def read_json(self, deadline: float) -> dict | None:
        """The runner's one line about itself, or None if it exited or said nothing in time."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        line = b""
        while not line.endswith(b"\n"):
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                return None
            byte = os.read(fd, 1)
            if not byte:
                return None
            line += byte
        info = json.loads(line)
        self.pid = int(info["pid"])
        self.port = int(info["addresses"][0].rpartition(":")[2])
        if info.get("health"):
            self.health_port = int(info["health"].rpartition(":")[2])
        return info

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self, offset: int = 0) -> str:
        return log_text(self.log_path, offset)

    def log_size(self) -> int:
        return self.log_path.stat().st_size

    def workers(self) -> list[int]:
        return children(self.pid)

    def wait_ready(self, workers: int, deadline: float, probe: bool = True) -> bool:
        """``workers`` workers said ready and (if ``probe``) one request was answered."""
        while time.monotonic() < deadline and self.alive():
            live = set(self.workers())
            ready = {int(p) for p in READY.findall(self.log())} & live
            if len(ready) >= workers and (not probe or request_ok(self.port, "/", 1.0)):
                return True
            time.sleep(0.1)
        return False

    def stop(self) -> None:
        """SIGTERM, SIGKILL after STOP_DEADLINE; then any worker left behind, by pid and start time."""
        self._stop.set()
        self._sampler.join(timeout=2)
        with contextlib.suppress(OSError):
            for kid in children(self.pid):
                self.seen.setdefault(kid, start_time(kid))
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.proc.wait(timeout=5)
        # A worker forked just before the primary died can escape the sampler: its process
        # group (the primary's pid, from start_new_session) still names it.
        for pid in group_members(self.proc.pid, self.started_at):
            self.seen.setdefault(pid, start_time(pid))
        kill_leftovers(self.seen)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.log_file.close()
        trim_log(self.log_path)  # a spinning server can write megabytes a second
        if self in _LIVE:
            _LIVE.remove(self)


def stop_all() -> None:
    """Stop every Target not stopped yet (on the way out of the command, whatever happened)."""
    for target in list(_LIVE):
        target.stop()

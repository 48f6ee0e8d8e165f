"""Per-process numbers from /proc: CPU ticks, start time, children, RSS, descriptors.

Every function takes a pid and returns None (or an empty result) when the process is
gone: the processes measured here are other programs' and can exit at any time.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

CLK_TCK = os.sysconf("SC_CLK_TCK")
MEMORY_SAMPLE_S = 0.2  # RSS sampling period during a wrk run


def proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat from field 3 (state) on, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of one process, in clock ticks."""
    fields = proc_stat(pid)
    if fields is None:
        return None
    return int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)


def cpu_split(pid: int) -> tuple[int, int] | None:
    """(utime, stime) of one process, in clock ticks: user-space and kernel time apart."""
    fields = proc_stat(pid)
    if fields is None:
        return None
    return int(fields[11]), int(fields[12])


def cpu_percent(pid: int, seconds: float) -> float:
    """CPU use of ``pid`` over the next ``seconds``, in percent of one core."""
    before = cpu_ticks(pid)
    time.sleep(seconds)
    after = cpu_ticks(pid)
    if before is None or after is None:
        return float("nan")
    return 100.0 * (after - before) / CLK_TCK / seconds


def start_time(pid: int) -> int | None:
    fields = proc_stat(pid)
    return int(fields[19]) if fields else None  # field 22: identifies the process


def children(pid: int) -> list[int]:
    """The workers: children of ``pid``, without multiprocessing's resource tracker (uvicorn's spawn)."""
    out: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(p) for p in f.read().split()]
    return sorted(p for p in out if b"resource_tracker" not in cmdline(p))


def cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def zombies(pids: list[int]) -> int:
    """How many of ``pids`` are zombies (exited, not reaped)."""
    return sum(1 for pid in pids if (proc_stat(pid) or [""])[0] == "Z")


def fd_count(pid: int) -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def uid_tasks(uid: int) -> int:
    """Processes and threads whose real uid is ``uid``: what RLIMIT_NPROC counts."""
    total = 0
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = dict(line.split(":", 1) for line in Path(f"/proc/{name}/status").read_text().splitlines())
            if int(fields["Uid"].split()[0]) == uid:
                total += int(fields["Threads"].strip())
    return total


def group_members(pgid: int, not_before: int | None) -> list[int]:
    """Processes in process group ``pgid`` started no earlier than its leader was."""
    found = []
    for name in os.listdir("/proc"):
        fields = proc_stat(int(name)) if name.isdigit() else None
        if fields and int(fields[2]) == pgid and not_before is not None and int(fields[19]) >= not_before:
            found.append(int(name))
    return found


def accept_queue(port: int) -> int | None:
    """Connections waiting in the listen backlog of 127.0.0.1:``port`` (never accepted yet)."""
    with contextlib.suppress(OSError), open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, state, queues = fields[1], fields[3], fields[4]
            if state == "0A" and int(local.split(":")[1], 16) == port:
                return int(queues.split(":")[1], 16)  # rx_queue of a listener: its accept queue
    return None


def rss_bytes(pid: int) -> int | None:
    """VmRSS from /proc/PID/status, or None if the process is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


class MemorySampler:
    """Samples the RSS of the primary and of its workers every MEMORY_SAMPLE_S in a thread.

    Peak of the primary, and peak over samples of the workers' summed RSS (children
    re-read at every sample, so a worker started during the run counts too).
    """

    def __init__(self, pid: int, with_workers: bool) -> None:
        self.pid, self.with_workers = pid, with_workers
        self.primary_peak = 0
        self.workers_peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        self.primary_peak = max(self.primary_peak, rss_bytes(self.pid) or 0)
        if self.with_workers:
            self.workers_peak = max(self.workers_peak, sum(rss_bytes(k) or 0 for k in children(self.pid)))
        self.samples += 1

    def _run(self) -> None:
        while True:
            self._sample()
            if self._stop.wait(MEMORY_SAMPLE_S):
                return

    def __enter__(self) -> MemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


def system_busy_ticks() -> int:
    """CPU ticks all CPUs spent busy since boot (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal

"""Worker processes as the primary sees them: forking one, killing, reaping, describing an exit."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Sequence

from dispatch import _fdpass, protocol
from dispatch.config import Config
from dispatch.lifecycle import Phase, WorkerState
from dispatch.worker_boot import worker_main

log = logging.getLogger("dispatch")


class WorkerHandle:
    """One worker process: its pid, pidfd, channel, and what the primary passed to it.

    Its place in the lifecycle (phase, last heard from, stalled) is the
    supervisor's ``WorkerState``, read through ``life``, never copied.
    """

    __slots__ = (
        "worker_id", "pid", "pidfd", "channel", "worker_end", "fd", "life", "sent", "done",
        "full", "drain_unsent", "report", "started_at", "request_limit", "capacity",
        "max_batch", "out_of_credit", "skipped_busy", "reclaimed", "taken_back", "unread_since", "unread_seen",
        "progress", "slot",
    )

    def __init__(self, worker_id: int, pid: int, pidfd: int, channel: socket.socket,
                 worker_end: socket.socket, request_limit: int) -> None:
        self.worker_id = worker_id
        self.pid = pid
        self.pidfd = pidfd
        self.channel = channel  # the primary's end
        self.worker_end = worker_end  # kept open so unread connections can be taken back
        self.fd = channel.fileno()
        self.life = WorkerState(worker_id, pid, time.monotonic())  # the supervisor's, once spawned
        self.sent = 0  # connections passed to it
        self.done = 0  # connections it reported finished
        self.full = False  # its channel said EAGAIN
        self.drain_unsent = False  # Drain waits for room in the channel
        self.report: protocol.Heartbeat | None = None
        self.started_at = time.time()
        self.request_limit = request_limit  # the supervisor's threshold, checked on the hot path
        self.capacity = 0  # most connections outstanding (sent - done); 0: no limit; from Ready
        self.max_batch = _fdpass.SCM_MAX_FD  # descriptors per message
        self.out_of_credit = False  # holds ``capacity`` connections: gets nothing until Done
        self.skipped_busy = 0  # batches it was passed over for: it had not read the last ones
        self.reclaimed = 0  # connections taken back unread while it was not reading (reclaim_after)
        self.taken_back = 0  # all taken back while it lived (reclaimed, or stalled): no longer in sent
        self.unread_since = 0.0  # since when its channel holds messages it has not read; 0: none
        self.unread_seen = 0  # its unread bytes when the dispatcher last looked
        self.progress = 0  # the dispatcher's stamp of its last Done: higher is more recent
        self.slot = -1  # its place among the dispatcher's targets (-1: not a target)

    @property
    def state(self) -> Phase:
        return self.life.state

    @property
    def stalled(self) -> bool:
        """Silent too long: gets nothing until it speaks again."""
        return self.life.stalled

    @property
    def last_seen(self) -> float:
        """When it was last heard from (``time.monotonic()``)."""
        return self.life.last_seen

    @property
    def outstanding(self) -> int:
        """Connections passed to it and not yet reported done."""
        return self.sent - self.done

    def set_capacity(self, capacity: int, max_batch: int) -> None:
        self.capacity = capacity
        self.max_batch = max(1, min(max_batch, capacity or max_batch, _fdpass.SCM_MAX_FD))

    def close(self) -> None:
        """Close the pidfd and both ends of the channel (after it exited)."""
        with contextlib.suppress(OSError):
            os.close(self.pidfd)
        self.channel.close()
        self.worker_end.close()


def fork_worker(config: Config, worker_id: int, inherited: Sequence[int],
                listeners: list[socket.socket], family: int = 0) -> WorkerHandle:
    """Fork one worker; on failure (``OSError``) nothing is left open and no child behind.

    ``inherited`` are the primary's descriptors the child closes at once;
    ``listeners`` are the ones it keeps (kernel balancing modes); ``family`` is the
    address family of every connection it will get (0: they differ).
    """
    primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        primary_end.setblocking(False)
        worker_end.setblocking(False)
        for handler in logging.getLogger().handlers + log.handlers:
            handler.flush()  # or the child would write the same buffered lines again
        pid = os.fork()
        if pid == 0:
            worker_main(config, worker_id, worker_end, listeners, [*inherited, primary_end.fileno()], family)
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            # A child we cannot watch must not live: kill and reap it now (it is
            # freshly forked, so this wait is short).
            kill(pid)
            os.waitpid(pid, 0)
            raise
    except BaseException:
        primary_end.close()
        worker_end.close()
        raise
    return WorkerHandle(worker_id, pid, pidfd, primary_end, worker_end, 0)


def kill(pid: int) -> None:
    """SIGKILL ``pid``; one already gone is fine."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def reap(pid: int) -> int | None:
    """The wait status of an exited child, or None if it cannot be reaped yet.

    One reaped elsewhere reads as status 0 (how it ended is unknown).
    """
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return 0
    return None if reaped == 0 else status


def describe_exit(status: int) -> str:
    """``exited with code N`` or ``was killed by signal N (NAME)``."""
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"was killed by signal {signum} ({name})"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"

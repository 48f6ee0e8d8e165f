"""``balance="pull"``: one queue that every worker reads, instead of a channel each.

The primary still accepts (so limits, PROXY checks and the in-flight budget
still apply), but it puts each connection, one per message, into a single
``SOCK_SEQPACKET`` socket pair whose reading end every worker holds. A worker
reads from it only while its loop runs and it has room, so a connection is
taken by a worker that is reading *now*: one whose loop is blocked by a long
request takes nothing, and the queue is never behind a worker that will not
read it. That is the shared listener's pull, without giving up what the
primary does.

What it costs: the primary no longer knows which worker holds a connection
until that worker reports it done, and every reading worker is woken for
each message (the one that reads first takes it; the others find nothing).

Nothing is lost: a message is read whole by one worker or stays in the queue,
and the primary keeps its own reference to the reading end, so what a dead,
hung or draining worker never read is taken by the others, and what is left
at shutdown is closed here. The queue's unread messages are counted exactly
from the reading end (``FIONREAD``: each message is one descriptor and the
same few bytes), which is all the in-flight budget needs: descriptors a worker
has read are in its own table, bounded by its own room.
"""

from __future__ import annotations

import contextlib
import fcntl
import socket
import struct
import termios
import time

from dispatch import _fdpass, protocol, supervisor
from dispatch.balance import ConnectionPolicy, Policy
from dispatch.counters import Counters
from dispatch.dispatcher import Dispatcher
from dispatch.logs import FailureLog
from dispatch.processes import WorkerHandle
from dispatch.reactor import OUT, Reactor

#: Bytes of one queue message (an ``Fds`` message for one descriptor).
MESSAGE_SIZE = len(protocol.encode_fds(1))
#: Send-buffer bytes one queued message takes, rounded up (768 measured with one descriptor).
MESSAGE_COST = 1024
#: How soon to look at the queue again while the in-flight budget is spent: workers
#: read it without telling us, so only looking shows that there is room again.
RECHECK_AFTER = 0.002
_INT = struct.Struct("i")


class SharedQueue:
    """The socket pair: the primary sends on ``sender``; workers (and the primary, to
    empty it at the end) read ``reader``."""

    def __init__(self) -> None:
        self.sender, self.reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sender.setblocking(False)
        self.reader.setblocking(False)

    def unread(self) -> int:
        """Connections in the queue that no worker has read yet."""
        data = fcntl.ioctl(self.reader.fileno(), termios.FIONREAD, b"\0\0\0\0")
        return int(_INT.unpack(data)[0]) // MESSAGE_SIZE

    def room(self) -> int:
        """About how many more messages fit before the queue says EAGAIN (never more)."""
        try:
            free = self.sender.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - _fdpass.unread_bytes(
                self.sender.fileno())
        except OSError:
            return 0
        return max(0, free // MESSAGE_COST)

    def close(self) -> None:
        self.sender.close()
        self.reader.close()


class PullDispatcher(Dispatcher):
    """A ``Dispatcher`` whose one target is the shared queue.

    The queue stands in the target list as a handle of its own (never in
    ``workers``): the Passer sends to it one descriptor per message, its
    ``sent - done`` is what waits unread, and its channel saying ``EAGAIN`` is
    backpressure as with any worker. Real workers' handles count what they
    finished (``done``); ``sent`` follows it, since who took what is known only then.
    """

    #: Nothing comes back on the queue: it is watched for room only.
    CHANNEL_EVENTS = 0

    def __init__(self, policy: Policy | ConnectionPolicy, workers: dict[int, WorkerHandle],
                 reactor: Reactor, counters: Counters, failures: FailureLog, accept_batch: int,
                 backlog: int, skip_busy: bool = False, reclaim_after: float = 0.0,
                 one_per_message_below: int = 0) -> None:
        # No worker has a channel of its own to be skipped, reclaimed from or sent one at a time.
        super().__init__(policy, workers, reactor, counters, failures, accept_batch, backlog)
        self.queue = SharedQueue()
        self.target = WorkerHandle(-1, 0, -1, self.queue.sender, self.queue.reader, 0)
        self.target.set_capacity(0, 1)  # one per message: a worker takes one connection per read
        self.reactor.register(self.queue.sender.fileno(), 0, self._on_queue_event)
        self._retry_send = False  # a send failed (not EAGAIN): try again on the next tick

    # ------------------------------------------------------------ what workers inherit
    def worker_sockets(self) -> list[socket.socket]:
        return [self.queue.reader]

    def own_fds(self) -> list[int]:
        return [self.queue.sender.fileno()]

    # ------------------------------------------------------------ who can take more
    def rebuild_targets(self) -> None:
        """The queue, while some worker is ready to read it and it has room."""
        reading = any(w.state == supervisor.READY and not w.stalled for w in self.workers.values())
        self.targets = [self.target] if reading and not self.target.full else []
        if self._passer is not None:
            self._load_passer()
        self.update_accepting()

    def update_accepting(self) -> None:
        """As for any dispatcher, with the queue's count fresh when the budget looks spent
        (workers read it without telling us); while it stays spent, look again soon."""
        if self.outstanding >= self.budget:
            self._count_taken()
        super().update_accepting()
        if not self.accepting and self.targets and self.outstanding >= self.budget and not self.stopping:
            self.reclaim_due = time.monotonic() + RECHECK_AFTER

    def _count_taken(self) -> None:
        """What workers read since we last looked leaves the in-flight count."""
        target = self.target
        try:
            unread = self.queue.unread()
        except OSError:
            return
        taken = target.sent - target.done - unread
        if taken > 0:
            target.done += taken
            self.outstanding -= taken

    def in_flight(self) -> int:
        """Connections in the queue: what workers took is theirs until they report it done."""
        self._count_taken()
        return self.outstanding

    def reclaim(self, now: float) -> int:
        """Not a reclaim here (nothing waits where one worker alone could read it): the
        budget was spent, so look at what the workers read since."""
        self.reclaim_due = 0.0
        self.update_accepting()
        if self.pending and self.targets:
            self.dispatch_pending()
        return 0

    def tick(self, now: float, reserve: int) -> None:
        self._count_taken()
        if self._retry_send and not self.stopping:
            self._retry_send = False
            self.target.full = False
            self.rebuild_targets()
        super().tick(now, reserve)

    def stop_accepting(self) -> None:
        """Take from the backlog no more than the queue has room for: what is left there is
        served by a new primary after an upgrade (it shares the listeners), where taking it
        only to close it would lose it."""
        self._count_taken()
        self.budget = min(self.budget, self.outstanding + self.queue.room())
        super().stop_accepting()

    # ------------------------------------------------------------ what workers say
    def on_done(self, worker: WorkerHandle, count: int) -> None:
        """A worker finished ``count`` it took from the queue. Nothing to give back to
        the budget (it counts the queue only); ``max_requests`` counts them."""
        if count <= 0:
            return
        worker.sent += count
        worker.done += count
        if worker.request_limit and worker.done >= worker.request_limit:
            worker.request_limit = 0
            self.over_limit.append(worker)
        if not self.accepting:
            self.update_accepting()
        if self.pending and self.targets:
            self.dispatch_pending()

    # ------------------------------------------------------------ the queue's channel
    def _on_queue_event(self, events: int) -> None:
        if events & OUT:
            self.channel_writable(self.target)

    def channel_writable(self, worker: WorkerHandle) -> None:
        if worker is not self.target:
            return  # workers' channels carry no connections here
        if self.stopping:
            self.reactor.modify(worker.fd, self.CHANNEL_EVENTS)
            return  # sealed: nothing more goes in
        super().channel_writable(worker)

    def channel_broken(self, worker: WorkerHandle, why: str) -> None:
        if worker is self.target:
            # Not a broken worker: a send that failed (ENOBUFS under memory pressure...). Stop
            # sending rather than spin, and try again on the next tick.
            self.failures.error("queue send", "cannot put connections in the shared queue: %s; "
                                "trying again shortly", why, exc_info=False)
            worker.full = True
            self._retry_send = True
            self.rebuild_targets()
            return
        super().channel_broken(worker, why)

    # ------------------------------------------------------------ workers that leave
    def worker_stalled(self, worker: WorkerHandle) -> int:
        """A silent worker reads nothing, so the others take what waits: nothing to move."""
        self.rebuild_targets()
        return 0

    def worker_exited(self, worker: WorkerHandle) -> int:
        """What it took died with it (as in every mode); what it never read is still in
        the queue for the others."""
        worker.slot = -1
        self.rebuild_targets()
        if self.pending:
            self.dispatch_pending()
        return 0

    @property
    def dispatched_total(self) -> int:
        return self.target.sent

    # ------------------------------------------------------------ the end
    def seal(self) -> None:
        """Shut the queue for writing: workers read what it holds, then end-of-file, and so
        know that the primary is stopping and that they should serve it all before leaving
        (a restart's Drain comes with the queue open: they leave it to the others)."""
        self.target.full = True
        self.targets = []
        with contextlib.suppress(OSError):
            self.queue.sender.shutdown(socket.SHUT_WR)

    def release(self) -> int:
        """Close what waits in the primary and in the queue, and the queue itself."""
        self.stopping = True
        closed = self.close_pending()
        if self.queue.reader.fileno() >= 0:
            taken, lost = self.take_back(self.target)
            closed += taken + lost
            self.reactor.unregister(self.target.fd)
            self.queue.close()
        return closed


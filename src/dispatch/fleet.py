"""The workers the primary runs: forking them, reading their channels, draining, reaping.

Each worker is registered in the reactor twice: its control channel (messages
from it: Ready, Heartbeat, Done) and its pidfd (readable when it exits). What
the messages and exits mean for its life is the supervisor's to decide; the
fleet feeds them to it and hands the resulting actions to ``apply``.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import Callable

from dispatch import _fdpass, protocol, supervisor
from dispatch.config import Config
from dispatch.counters import Counters
from dispatch.dispatcher import Dispatcher
from dispatch.lifecycle import IllegalTransition
from dispatch.processes import WorkerHandle, describe_exit, fork_worker, kill, reap
from dispatch.reactor import ERR, IN, OUT, Reactor

log = logging.getLogger("dispatch")

# Messages read from one channel per wakeup: a worker flooding its channel must not
# starve the listeners and the other workers.
MESSAGES_PER_PASS = 64

Apply = Callable[[list[supervisor.Action]], None]


class Fleet:
    """Worker processes by pid (``workers``, shared with the dispatcher and the views)."""

    def __init__(self, config: Config, sup: supervisor.Supervisor, reactor: Reactor,
                 workers: dict[int, WorkerHandle], counters: Counters, apply: Apply,
                 inherited: Callable[[], list[int]], listeners: list[socket.socket],
                 on_ready: Callable[[], None], on_exit: Callable[[int, int, str], None]) -> None:
        self.config = config
        self.supervisor = sup
        self.reactor = reactor
        self.workers = workers
        self.counters = counters
        self.dispatcher: Dispatcher | None = None  # user-space modes
        self._apply = apply
        self._inherited = inherited
        self._listeners = listeners  # passed to workers in kernel modes
        self._on_ready = on_ready
        self._on_exit_hook = on_exit
        self._last_pid: dict[int, int] = {}

    # ------------------------------------------------------------ actions
    def spawn(self, worker_id: int, replaces: int | None) -> None:
        """Carry out a ``Spawn``; a fork that fails is a failed boot, never a crash."""
        # What it keeps besides its channel: the kernel modes' listeners; in the user-space
        # modes what the dispatcher shares (pull: the queue), else nothing.
        listeners = self.dispatcher.worker_sockets() if self.dispatcher is not None else self._listeners
        try:
            worker = fork_worker(self.config, worker_id, self._inherited_fds(), listeners,
                                 connection_family(self._listeners))
        except OSError as exc:
            self.counters.spawn_errors += 1
            log.error("worker %d: cannot start a process: %s", worker_id, exc)
            self._apply(self.supervisor.spawn_failed(worker_id, replaces, time.monotonic(), str(exc)))
            return
        self.workers[worker.pid] = worker
        self.reactor.register(worker.fd, IN, functools.partial(self._on_channel, worker))
        self.reactor.register(worker.pidfd, IN, functools.partial(self._on_exit, worker))
        worker.life = self.supervisor.spawned(worker_id, worker.pid, time.monotonic(), replaces)
        worker.request_limit = worker.life.request_limit
        previous = self._last_pid.get(worker_id)
        self._last_pid[worker_id] = worker.pid
        if replaces is not None:
            log.info("worker %d: started pid %d to take over from pid %d", worker_id, worker.pid, replaces)
        elif previous is not None and previous not in self.workers:
            log.info("worker %d: started pid %d, replacing pid %d", worker_id, worker.pid, previous)
        else:
            log.info("worker %d: started pid %d", worker_id, worker.pid)

    def _inherited_fds(self) -> list[int]:
        """Our descriptors a new worker must close at once (a child holding a copy of a
        connection or a channel would keep it open)."""
        fds = self._inherited()
        for w in self.workers.values():
            fds += [w.fd, w.worker_end.fileno(), w.pidfd]
        if self.dispatcher is not None:
            fds += self.dispatcher.pending
        return fds

    def drain(self, pid: int) -> None:
        """Stop sending to ``pid`` first, then ask it (behind everything already sent) to
        finish and exit."""
        worker = self.workers.get(pid)
        if worker is None:
            return
        if self.dispatcher is not None:
            self.dispatcher.rebuild_targets()
        self._send_drain(worker)

    def _send_drain(self, worker: WorkerHandle) -> None:
        try:
            worker.channel.send(protocol.encode(protocol.Drain()))
            worker.drain_unsent = False
        except BlockingIOError:
            worker.drain_unsent = True  # sent when the channel has room
            self.reactor.modify(worker.fd, IN | OUT)
        except OSError as exc:
            log.warning("worker %d (pid %d): cannot send drain: %s", worker.worker_id, worker.pid, exc)
            kill(worker.pid)

    def stall_or_resume(self, action: supervisor.Stall | supervisor.Resume) -> None:
        """A worker silent for ``stall_after`` gets no new connections, and the ones waiting
        unread in its channel go to the others, long before ``timeout`` kills it. Its
        channel is a SEQPACKET socket: each message, with its descriptors, is read whole by
        one side or the other, so nothing is served twice. When it speaks, it is back."""
        worker = self.workers.get(action.pid)
        dispatcher = self.dispatcher
        if worker is None or dispatcher is None:
            return
        if isinstance(action, supervisor.Stall):
            self.counters.stalls += 1
            taken = dispatcher.worker_stalled(worker)
            log.warning("worker %d (pid %d) silent for %.1fs: no new connections until it speaks "
                        "again; %d connections it had not read go to other workers",
                        worker.worker_id, worker.pid, action.silent, taken)
        else:
            log.info("worker %d (pid %d) speaks again; passing it connections again",
                     worker.worker_id, worker.pid)
            dispatcher.rebuild_targets()
        if dispatcher.pending:
            dispatcher.dispatch_pending()

    # ------------------------------------------------------------ events
    def _on_channel(self, worker: WorkerHandle, events: int) -> None:
        if events & OUT:
            self._channel_writable(worker)
        if not events & (IN | ERR):
            return
        now = time.monotonic()
        done = 0  # Done counts of this pass, credited once at its end
        recv = _fdpass.recv_message
        fd = worker.fd
        done_count = protocol.done_count
        try:
            for _ in range(MESSAGES_PER_PASS):  # the rest waits for the next pass (level-triggered)
                try:
                    data = recv(fd)
                except OSError:  # the pidfd will tell
                    return
                if not data:  # None: all read; b"": end of stream
                    return
                count = done_count(data)
                if count is not None:
                    done += count
                    continue
                if not self._on_datagram(worker, data, now):
                    return
        finally:
            if done and self.workers.get(worker.pid) is worker:
                self._on_done(worker, done, now)

    def _on_datagram(self, worker: WorkerHandle, data: bytes, now: float) -> bool:
        """One message from ``worker`` other than a plain Done; False when its channel must
        not be read any further now (it broke the protocol, or is gone)."""
        try:
            message = protocol.decode_from(data, protocol.TO_PRIMARY)
        except protocol.ProtocolError as exc:
            self._channel_broken(worker, f"it broke the protocol ({exc})")
            return False
        self._on_message(worker, message, now)
        return self.workers.get(worker.pid) is worker  # replaced or gone while handling it

    def poll(self, epfd: int, timeout: float) -> list[tuple[int, int]] | None:
        """The reactor's wait through the dispatcher's fast path (``Dispatcher.poll``), with
        what it read from the targets' channels handled here: who reported Done is alive,
        and any other message it read is handled before the rest of that channel."""
        dispatcher = self.dispatcher
        events = dispatcher.poll(epfd, timeout) if dispatcher is not None else None
        if events is None or dispatcher is None:
            return events
        if dispatcher.reported or dispatcher.strays:
            now = time.monotonic()
            # Each on its own, as each channel's callback would be: the run already took these
            # messages out of their channels, so one that fails must not lose the others.
            for worker in dispatcher.reported:
                self._guarded(self._heard_from, worker, now)
            for worker, data in dispatcher.strays:
                if self.workers.get(worker.pid) is worker:
                    self._guarded(self._on_datagram, worker, data, now)
        if dispatcher.wait_failed is not None:
            failed, dispatcher.wait_failed = dispatcher.wait_failed, None
            raise failed
        return events

    def _heard_from(self, worker: WorkerHandle, now: float) -> None:
        self._apply(self.supervisor.heard_from(worker.pid, now))

    def _guarded(self, handle: Callable[..., object], *args: object) -> None:
        try:
            handle(*args)
        except Exception:
            log.error("handling a message read by the fast path failed", exc_info=True)

    def _on_done(self, worker: WorkerHandle, count: int, now: float) -> None:
        self._apply(self.supervisor.heard_from(worker.pid, now))
        if self.dispatcher is not None:
            self.dispatcher.on_done(worker, count)

    def _on_message(self, worker: WorkerHandle, message: protocol.Message, now: float) -> None:
        if isinstance(message, protocol.Done):  # decode_from's answer when done_count refused it
            self._on_done(worker, message.count, now)
        elif isinstance(message, protocol.Heartbeat):
            worker.report = message
            self._apply(self.supervisor.heartbeat(worker.pid, now, message.total, message.rss))
        elif isinstance(message, protocol.Ready):
            self._apply(self.supervisor.heard_from(worker.pid, now))
            try:
                actions = self.supervisor.ready(worker.pid, now)
            except IllegalTransition as exc:
                self._channel_broken(worker, f"it broke the protocol ({exc})")
                return
            if worker.state == supervisor.READY:
                worker.set_capacity(message.capacity, message.max_batch)
                log.info("worker %d (pid %d) ready", worker.worker_id, worker.pid)
            self._apply(actions)
            self._on_ready()

    def _channel_broken(self, worker: WorkerHandle, why: str) -> None:
        if self.dispatcher is not None:
            self.dispatcher.channel_broken(worker, why)
        else:
            log.error("worker %d (pid %d): %s; replacing it", worker.worker_id, worker.pid, why)
            self.reactor.unregister(worker.fd)
            kill(worker.pid)

    def _channel_writable(self, worker: WorkerHandle) -> None:
        if worker.drain_unsent:
            self.reactor.modify(worker.fd, IN)
            worker.full = False
            self._send_drain(worker)
        elif self.dispatcher is not None:
            self.dispatcher.channel_writable(worker)

    def _on_exit(self, worker: WorkerHandle, events: int = 0) -> None:
        status = reap(worker.pid)
        if status is None:
            return  # not reapable yet; the pidfd stays readable and we come back
        how = describe_exit(status)
        self.reactor.unregister(worker.pidfd)
        self.reactor.unregister(worker.fd)
        del self.workers[worker.pid]
        salvaged = self.dispatcher.worker_exited(worker) if self.dispatcher is not None else 0
        worker.close()
        expected = self.supervisor.expected_exit(worker.pid, status == 0)
        extra = f"; {salvaged} connections it had not read go to other workers" if salvaged else ""
        log.log(logging.INFO if expected else logging.WARNING, "worker %d (pid %d) %s%s",
                worker.worker_id, worker.pid, how, extra)
        self._on_exit_hook(worker.worker_id, worker.pid, how)
        self._apply(self.supervisor.exited(worker.pid, time.monotonic(), how, os.WIFSIGNALED(status)))
        if self.dispatcher is not None and self.dispatcher.pending:
            self.dispatcher.dispatch_pending()

    # ------------------------------------------------------------ teardown
    def release(self) -> None:
        """Kill and reap every worker and close what the primary holds of it."""
        for worker in list(self.workers.values()):
            kill(worker.pid)
        for worker in list(self.workers.values()):
            try:
                os.waitpid(worker.pid, 0)
            except ChildProcessError:
                pass
            worker.close()
        self.workers.clear()


def connection_family(listeners: list[socket.socket]) -> int:
    """The address family of every connection these listeners accept; 0 when they differ."""
    families = {sock.family for sock in listeners}
    return int(families.pop()) if len(families) == 1 else 0

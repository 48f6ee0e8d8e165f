"""The hot path: accept connections in batches and pass them to workers.

It decides which workers can take connections now (ready, not stalled, their
channel not full, credits left), splits each accepted batch with the balancing
policy, sends one ``SCM_RIGHTS`` message per worker, and stops accepting when
nobody can take more (the kernel's listen backlog holds the rest). It also
takes back the connections a dead or stalled worker never read.

Every worker gets at most its free credits (``capacity - outstanding``), and
all workers together at most the in-flight budget: the kernel caps a sender's
in-flight ``SCM_RIGHTS`` descriptors at its ``RLIMIT_NOFILE`` (``ETOOMANYREFS``),
and taking back a dead worker's unread ones needs that much room in our table.
"""

from __future__ import annotations

import array
import contextlib
import errno
import os
import resource
import socket
import time
from collections.abc import Callable

from dispatch import _fdpass, protocol, supervisor
from dispatch.balance import (
    ConnectionPolicy,
    GuardedPolicy,
    LeastConnections,
    Policy,
    Pull,
    RoundRobin,
)
from dispatch.counters import Counters
from dispatch.limits import descriptors_free
from dispatch.logs import FailureLog
from dispatch.processes import WorkerHandle, kill
from dispatch.reactor import IN, OUT, Reactor, WaitFailed

_FDS_MESSAGES = [protocol.encode_fds(n) for n in range(_fdpass.SCM_MAX_FD + 1)]
# Descriptors kept free in the primary's own table, beyond the accept batch, for
# spawning (a socketpair and a pidfd per worker) and the like.
FD_RESERVE = 32
# Backoff of accepting after an accept error: doubles from the first to the last.
ACCEPT_BACKOFF = (0.05, 1.0)
# skip_busy, policies that weigh loads (least-connections, sticky, a user's with needs_loads):
# what a worker was sent less than this long ago is not yet a sign that its loop is blocked
# (it may still be waking up, or be waiting for the CPU the primary holds). Passed over for
# it, an idle-looking worker whose loop is in fact blocked got the connection. Round-robin
# keeps the strict rule: it cannot take back what it gives a loop that blocks meanwhile.
FRESH_UNREAD = 0.00025


class Dispatcher:
    """Passes accepted connections to ``workers`` (the primary's dict, by pid)."""

    #: What the primary waits for on a target's channel besides room: workers' reports.
    CHANNEL_EVENTS = IN

    def __init__(self, policy: Policy | ConnectionPolicy, workers: dict[int, WorkerHandle],
                 reactor: Reactor, counters: Counters, failures: FailureLog, accept_batch: int,
                 backlog: int, skip_busy: bool = True, reclaim_after: float = 0.0,
                 one_per_message_below: int = 0) -> None:
        self.workers = workers
        self.policy = GuardedPolicy(policy, self._policy_failed)
        self.reactor = reactor
        self.counters = counters
        self.failures = failures
        self.backlog = backlog
        self.skip_busy = skip_busy
        # 0: connections wait for the worker they were given to. Only policies that weigh
        # fresh loads (least-connections) take back: they can move connections without
        # unbalancing a burst of keep-alive ones (round-robin's workers report completions
        # in batches, so its loads are stale), and a per-connection policy's choice (sticky)
        # is the point, not only who is free.
        fresh = self.policy.needs_loads and not self.policy.per_connection
        self.reclaim_after = reclaim_after if fresh else 0.0
        self.reclaim_due = 0.0  # when to look at unread channels again (reclaim); 0: nothing waits
        self.one_per_message_below = one_per_message_below
        # Our own batch policies run in C (the Passer); a user's policy, and sticky, here.
        kind = {RoundRobin: _fdpass.ROUND_ROBIN, Pull: _fdpass.ROUND_ROBIN,
                LeastConnections: _fdpass.LEAST_CONNECTIONS}.get(type(self.policy.policy))
        self.targets: list[WorkerHandle] = []  # who can take a connection now
        self.pending: array.array[int] = array.array("i")  # accepted or taken back, not yet passed on
        self.accepting = False
        self.stopping = False  # no more accepting; taken-back connections are closed
        self.outstanding = 0  # passed to workers, not yet reported done
        self.budget = 0  # how many may be outstanding
        self.retired_sent = 0  # connections passed to workers that have exited
        self._dispatched_high = 0  # the most dispatched_total has said
        self._progress = 0  # stamps each Done (WorkerHandle.progress): who finished last
        self.over_limit: list[WorkerHandle] = []  # past max_requests: recycle on the tick
        self._accept_batch = accept_batch
        self._accept_buf = array.array("i", bytes(4 * accept_batch))
        self._accept_limit = accept_batch  # lowered when descriptors are scarce
        self._accept_resume_at = 0.0
        self._accept_failures = 0  # in a row: the backoff grows with them
        self._listen_fds = array.array("i")  # an array: the Passer's run reads it as is
        # What the last fast-path run read from the targets' channels, for the fleet: who
        # reported Done, and the messages that were not a Done (``poll``).
        self.reported: list[WorkerHandle] = []
        self.strays: list[tuple[WorkerHandle, bytes]] = []
        # When the server's loop wants control back whatever reclaim wants (its tick);
        # 0: the poll's timeout says. The fast path watches unread channels itself till then.
        self.tick_due = 0.0
        self.wait_failed: WaitFailed | None = None  # the last run's epoll_wait failed: raised by the fleet's poll
        self._fresh_unread = FRESH_UNREAD if self.policy.needs_loads else 0.0
        self._passer = None if kind is None else _fdpass.Passer(kind, _FDS_MESSAGES, self._accept_buf,
                                                                one_per_message_below,
                                                                int(self._fresh_unread * 1e9))
        if self._passer is not None:
            self._passer.read_done(protocol.DONE_PREFIX)

    # ------------------------------------------------------------ listeners
    def add_listener(self, sock: socket.socket) -> None:
        """Accept on ``sock`` too: at once if the others are accepting, else when they do."""
        fd = sock.fileno()
        self._listen_fds.append(fd)
        self.reactor.register(fd, IN if self.accepting else 0, self._make_acceptor(fd))

    def _make_acceptor(self, listen_fd: int) -> Callable[[int], None]:
        accept_batch = _fdpass.accept_batch
        buf = self._accept_buf

        def on_listener_readable(events: int) -> None:
            room = self.budget - self.outstanding
            # Our own policies, with somewhere to pass to: accept and pass in one call to C.
            passer = self._passer if self.targets and room > 0 else None
            try:
                if passer is not None:
                    count = passer.accept_and_pass(listen_fd, self._accept_limit, room, self.skip_busy,
                                                   self._reclaim_ns())
                else:
                    count = accept_batch(listen_fd, buf, self._accept_limit)
            except OSError as exc:
                self._accept_failed(exc)
                return
            self._accept_failures = 0
            if not count:
                return
            if passer is not None:
                left_at = passer.passed
                if not self._settle(left_at, count - left_at):
                    self._keep(buf, left_at, count - left_at)
                    return
            else:
                left_at = 0
            self._keep(buf, *self.dispatch(buf, left_at, count - left_at))

        return on_listener_readable

    def _keep(self, buf: array.array[int], start: int, count: int) -> None:
        """Accepted connections no worker took now: they wait in ``pending``."""
        if count:
            self.pending.extend(buf[start : start + count])
            self.update_accepting()

    def _accept_failed(self, exc: OSError) -> None:
        """Any accept error: the listener may stay readable, so back off instead of
        spinning, longer each time it fails again."""
        self.counters.accept_errors += 1
        self._accept_failures += 1
        first, most = ACCEPT_BACKOFF
        delay = min(most, first * 2 ** (self._accept_failures - 1))
        self.failures.error(f"accept {exc.errno}", "accept failed: %s; pausing accepts for %gs",
                            exc, delay, exc_info=False)
        self._accept_resume_at = time.monotonic() + delay
        self._set_accepting(False)

    def update_accepting(self) -> None:
        """Accept only while some worker can take connections and nothing is waiting."""
        want = (
            bool(self.targets) and not self.pending and not self._accept_resume_at
            and not self.stopping and self.outstanding < self.budget
        )
        if want != self.accepting:
            self._set_accepting(want)

    def _set_accepting(self, on: bool) -> None:
        self.accepting = on
        for fd in self._listen_fds:
            self.reactor.modify(fd, IN if on else 0)

    def stop_accepting(self) -> None:
        """Accept no more: take what already completed its handshake (bounded by the
        backlog and the budget) so it is served, not reset, and let go of the listeners."""
        self.stopping = True
        self._set_accepting(False)
        for fd in self._listen_fds:
            for _ in range(max(1, self.backlog // len(self._accept_buf))):
                room = self.budget - self.outstanding - len(self.pending)
                if room <= 0:
                    break
                try:
                    count = _fdpass.accept_batch(fd, self._accept_buf, min(room, len(self._accept_buf)))
                except OSError:
                    break
                if not count:
                    break
                self.pending.extend(self._accept_buf[:count])
            self.reactor.unregister(fd)
        del self._listen_fds[:]

    # ------------------------------------------------------------ the periodic part
    def tick(self, now: float, reserve: int) -> None:
        """Resume accepting after a backoff, retry what waits, and recompute the budget
        (``reserve``: descriptors to keep free beyond ours, e.g. for health clients)."""
        self.update_budget(reserve)
        if self._accept_resume_at and now >= self._accept_resume_at:
            self._accept_resume_at = 0.0
            self.update_accepting()
        if self.pending and self.targets:
            self.dispatch_pending()

    def update_budget(self, reserve: int) -> None:
        """How many descriptors may be in flight, from the room left in our table."""
        free = descriptors_free(reserve + FD_RESERVE + 3 * len(self.workers), len(self.pending))
        if free is None:
            return  # EMFILE right now: keep the last estimate
        self._accept_limit = max(1, min(self._accept_batch, free // 4))
        was_full = self.outstanding >= self.budget
        self.budget = max(0, free - self._accept_limit)
        if self.budget < max(1, len(self.workers)):
            self.failures.error("budget", "RLIMIT_NOFILE %d leaves room for %d connections in flight "
                                "to %d workers; raise the limit", resource.getrlimit(resource.RLIMIT_NOFILE)[0],
                                self.budget, len(self.workers), exc_info=False)
        if was_full and self.outstanding < self.budget:
            self.rebuild_targets()

    # ------------------------------------------------------------ passing
    def dispatch(self, buf: array.array[int], start: int, count: int) -> tuple[int, int]:
        """Pass ``buf[start:start+count]`` to workers; returns what is left (start, count)."""
        if self._passer is not None:
            return self._dispatch_passer(buf, start, count)
        if self.policy.per_connection:
            return self._dispatch_each(buf, start, count)
        send = _fdpass.send_fds
        messages = _FDS_MESSAGES
        dontwait = _fdpass.DONTWAIT
        now = time.monotonic() if self.reclaim_after and len(self.targets) > 1 else 0.0
        while count and self.targets:
            room = self.budget - self.outstanding
            if room <= 0:
                self._inflight_full()
                break
            unchanged = self.targets
            targets = self.targets
            if self.skip_busy and len(targets) > 1:
                targets = self._reading(targets)
            batch = count if count <= room else room
            loads = [w.sent - w.done for w in targets] if self.policy.needs_loads else ()
            shares = self.policy.assign(batch, loads, len(targets))
            credit_spent = False
            for worker, share in zip(targets, shares, strict=True):
                if worker.capacity:
                    free = worker.capacity - worker.sent + worker.done
                    if share >= free:
                        share = free
                        credit_spent = True
                max_batch = worker.max_batch
                below = self.one_per_message_below
                while share > 0:
                    # A worker that holds little takes its connections one per message, so
                    # one per loop pass: the rest wait unread, where skip_busy and reclaim
                    # can still move them if a request blocks its loop.
                    limit = 1 if below and worker.sent - worker.done < below else max_batch
                    chunk = share if share <= limit else limit
                    try:
                        sent = send(worker.fd, buf, start, chunk, messages[chunk], dontwait, True)
                    except OSError as exc:
                        if exc.errno == errno.ETOOMANYREFS:
                            self._inflight_full(exc)
                            return start, count
                        self.channel_broken(worker, f"cannot pass connections: {exc}")
                        break
                    if not sent:
                        self._backpressure(worker)
                        break
                    self._sent_to(worker, chunk, now)
                    if not worker.unread_since:  # not watched for reclaim: dated for _reading
                        worker.unread_since = time.monotonic()
                    self.outstanding += chunk
                    start += chunk
                    count -= chunk
                    share -= chunk
            if credit_spent:
                self.rebuild_targets()
            elif self.targets is unchanged and self.outstanding < self.budget:
                break  # nothing changed and nothing is left to try this time
        return start, count

    def _dispatch_passer(self, buf: array.array[int], start: int, count: int) -> tuple[int, int]:
        """Our own policies: the Passer picks, splits and sends in C; here only the
        bookkeeping of the workers that got something, and what stopped it short."""
        passer = self._passer
        assert passer is not None
        while count and self.targets:
            room = self.budget - self.outstanding
            if room <= 0:
                self._inflight_full()
                break
            passed = passer.pass_batch(buf, start, count if count <= room else room, self.skip_busy,
                                       self._reclaim_ns())
            start += passed
            count -= passed
            if not self._settle(passed, count):
                break
        return start, count

    def _settle(self, passed: int, left: int) -> bool:
        """The bookkeeping of one pass of the Passer (``passed`` went, ``left`` did not);
        True if what is left may be tried again now."""
        targets = self.targets
        self._credit_run(targets)
        return self._after_pass(targets, passed, left)

    def _after_pass(self, targets: list[WorkerHandle], passed: int, left: int) -> bool:
        """What stopped the Passer's last pass (``passed`` went, ``left`` did not), once its
        sends are credited; True if what is left may be tried again now."""
        passer = self._passer
        assert passer is not None
        status = passer.status
        if status == _fdpass.PASSED:
            # All that had room went; if the in-flight budget ran out, the next try stops accepting.
            return bool(left) and self.outstanding >= self.budget
        if status == _fdpass.OUT_OF_CREDIT:
            self.rebuild_targets()
            return bool(passed) or self.targets != targets  # nothing moved, nothing changed: never spin
        worker = targets[passer.slot]
        if status == _fdpass.CHANNEL_FULL:
            self._backpressure(worker)
            return True
        if passer.error == errno.ETOOMANYREFS:
            self._inflight_full(OSError(passer.error, os.strerror(passer.error)))
            return False
        self.channel_broken(worker, f"cannot pass connections: {os.strerror(passer.error)}")
        return True

    # ------------------------------------------------------------ the listeners' fast path
    def poll(self, epfd: int, timeout: float) -> list[tuple[int, int]] | None:
        """Wait for events as the reactor would (``epfd`` is its epoll), the listeners'
        handled in C (``Passer.run``) pass after pass while nothing else happens; returns
        the other events for the reactor's callbacks, or None when the fast path does not
        apply now (no Passer, not accepting, something pending): then the reactor polls."""
        passer = self._passer
        room = self.budget - self.outstanding
        if passer is None or not self.accepting or room <= 0 or not self.targets or self.pending:
            return None
        targets = self.targets
        reclaim_ns = self._reclaim_ns()
        if self.tick_due:
            timeout = max(0.0, self.tick_due - time.monotonic())
        events: list[tuple[int, int]] = passer.run(epfd, self._listen_fds, timeout, room,
                                                   self._accept_limit, self.skip_busy, reclaim_ns,
                                                   self._progress, int(self.reclaim_due * 1e9))
        if passer.run_passes:
            self._accept_failures = 0
            self._credit_run(targets)
        self.reported = self._credit_done(targets) if passer.heard_any else []
        if passer.all_behind:
            self._all_behind(passer.all_behind / 1e9, passer.watch_due / 1e9)
        self.strays = self._strays(targets) if passer.strays else []
        if passer.run_error:
            self._accept_failed(OSError(passer.run_error, os.strerror(passer.run_error)))
        elif passer.unsettled:
            buf = self._accept_buf
            start, left = passer.passed, passer.accepted - passer.passed
            if self._after_pass(targets, start, left):
                start, left = self.dispatch(buf, start, left)
            self._keep(buf, start, left)
        if passer.wait_error:
            self.wait_failed = WaitFailed(passer.wait_error, os.strerror(passer.wait_error))
        return events

    def _all_behind(self, when: float, next_look: float) -> None:
        """The run looked at the unread channels ``when`` in our place and found every
        target behind, so reclaim could have taken nothing: the watches it would have
        called stuck start over from then, as reclaim re-arms them, and the next look is
        ``next_look`` (a watch that was not due yet is looked at then, not sooner)."""
        for worker in self.workers.values():
            if worker.unread_since and when - worker.unread_since >= self.reclaim_after:
                worker.unread_since = when
        self.reclaim_due = next_look

    def _credit_done(self, targets: list[WorkerHandle]) -> list[WorkerHandle]:
        """The Done messages a run read, on the workers' counters (the Passer's loads and
        stamps have them already); returns who sent them (alive, even if the count was
        more than it held and credited nothing, as the callback hears it)."""
        passer = self._passer
        assert passer is not None
        reported = []
        for slot, worker in enumerate(targets):
            count = passer.run_done(slot)
            if count:
                worker.done += count
                worker.progress = passer.progress_of(slot)
            if passer.run_heard(slot):
                reported.append(worker)
        self.outstanding -= passer.run_freed
        self._progress = passer.stamp
        return reported

    def _strays(self, targets: list[WorkerHandle]) -> list[tuple[WorkerHandle, bytes]]:
        """The messages a run read that were not a Done, with who sent them."""
        passer = self._passer
        assert passer is not None
        by_fd = {worker.fd: worker for worker in targets}
        return [(by_fd[fd], data) for fd, data in passer.strays if fd in by_fd]

    def _reclaim_ns(self) -> int:
        """reclaim_after for the Passer, which dates what it sends for reclaim's watch:
        0 when there is no other target to take back to."""
        return int(self.reclaim_after * 1e9) if len(self.targets) > 1 else 0

    def _credit_run(self, targets: list[WorkerHandle]) -> None:
        """What the Passer's last run (or single pass) did, on the workers' counters: sends,
        skips, who was seen reading, and reclaim's watches from each first send."""
        passer = self._passer
        assert passer is not None
        self.outstanding += passer.run_passed
        watch = bool(self.reclaim_after) and len(targets) > 1
        for slot, worker in enumerate(targets):
            skips = passer.run_skips(slot)
            if skips:
                worker.skipped_busy += skips
                self.counters.skipped_busy += skips
            seen, first_send = passer.run_seen(slot)
            if seen:
                worker.unread_since = 0.0  # it read everything: watched afresh from its next send
            if watch and first_send and not worker.unread_since:
                self._watch_unread(worker, first_send / 1e9)
            given = passer.run_given(slot)
            if given:
                self._sent_to(worker, given, 0.0)

    def _sent_to(self, worker: WorkerHandle, count: int, now: float) -> None:
        """``count`` more went to ``worker``: watched for reading (``now``: 0 when not), and
        noted once it reaches its ``max_requests``."""
        worker.sent += count
        if now and not worker.unread_since:
            self._watch_unread(worker, now)
        if worker.request_limit and worker.sent >= worker.request_limit:
            worker.request_limit = 0  # noted once; recycled on the next tick
            self.over_limit.append(worker)

    def _dispatch_each(self, buf: array.array[int], start: int, count: int) -> tuple[int, int]:
        """The per-connection path: the policy sees each client's address."""
        while count and self.targets:
            if self.outstanding >= self.budget:
                self._inflight_full()
                break
            targets = self.targets
            if self.skip_busy and len(targets) > 1:
                targets = self._reading(targets)
            ids = [w.worker_id for w in targets]
            loads = [w.sent - w.done for w in targets]
            worker = targets[self.policy.choose(_client_host(buf[start]), ids, loads)]
            try:
                sent = _fdpass.send_fds(worker.fd, buf, start, 1, _FDS_MESSAGES[1], _fdpass.DONTWAIT, True)
            except OSError as exc:
                if exc.errno == errno.ETOOMANYREFS:
                    self._inflight_full(exc)
                    break
                self.channel_broken(worker, f"cannot pass connections: {exc}")
                continue
            if not sent:
                self._backpressure(worker)
                continue
            worker.sent += 1
            if not worker.unread_since:
                worker.unread_since = time.monotonic()
            self.outstanding += 1
            start += 1
            count -= 1
            if worker.request_limit and worker.sent >= worker.request_limit:
                worker.request_limit = 0
                self.over_limit.append(worker)
            if worker.capacity and worker.sent - worker.done >= worker.capacity:
                self.rebuild_targets()
        return start, count

    def _reading(self, targets: list[WorkerHandle]) -> list[WorkerHandle]:
        """The targets that have read everything passed to them, when some have not:
        connections go only to workers whose loop is taking them now (a pull model,
        read from the channel's unread bytes: no message, no lag). When all are
        behind, all stay targets and credits bound each one."""
        unread = _fdpass.unread_bytes
        now = time.monotonic()
        reading: list[WorkerHandle] = []
        behind: list[WorkerHandle] = []
        for worker in targets:
            try:
                queued = unread(worker.fd) > 0
            except OSError:
                queued = False  # cannot tell: treat it as reading; a broken channel shows on send
            if not queued:
                worker.unread_since = 0.0  # read everything: what it gets next is watched afresh
                reading.append(worker)
            elif worker.unread_since and now - worker.unread_since < self._fresh_unread:
                reading.append(worker)  # sent too recently to tell (as the Passer does)
            else:
                behind.append(worker)
        if not reading or not behind:
            return targets
        for worker in behind:
            worker.skipped_busy += 1
        self.counters.skipped_busy += len(behind)
        return reading

    def dispatch_pending(self) -> None:
        start, _ = self.dispatch(self.pending, 0, len(self.pending))
        del self.pending[:start]
        self.update_accepting()

    def _policy_failed(self, what: str) -> None:
        self.counters.policy_errors += 1
        name = type(self.policy.policy).__name__
        self.failures.error(f"policy {what.split(' ', 1)[0]}", "balancing policy %s %s; using "
                            "round-robin for this batch", name, what, exc_info=False)

    # ------------------------------------------------------------ who can take more
    def rebuild_targets(self) -> None:
        targets = []
        for w in self.workers.values():
            w.out_of_credit = bool(w.capacity) and w.sent - w.done >= w.capacity
            if w.state == supervisor.READY and not w.full and not w.stalled and not w.out_of_credit:
                targets.append(w)
        targets.sort(key=lambda w: w.worker_id)
        self.targets = targets
        if self._passer is not None:
            self._load_passer()
        self.update_accepting()

    def _load_passer(self) -> None:
        """The targets into the Passer's arrays (slot i is targets[i]), after any change."""
        passer = self._passer
        assert passer is not None
        for worker in self.workers.values():
            worker.slot = -1
        for slot, worker in enumerate(self.targets):
            worker.slot = slot
        targets = self.targets
        passer.set_targets([w.fd for w in targets], [w.sent - w.done for w in targets],
                           [w.capacity for w in targets], [w.max_batch for w in targets],
                           [w.progress for w in targets])

    def on_done(self, worker: WorkerHandle, count: int) -> None:
        """Credits come back; never more than were sent (a lying worker skews nothing)."""
        count = min(count, worker.sent - worker.done)
        if count <= 0:
            return
        worker.done += count
        self.outstanding -= count
        self._progress += 1
        worker.progress = self._progress
        if self._passer is not None:
            self._passer.done(worker.slot, count, self._progress)
        if worker.out_of_credit:
            self.rebuild_targets()
        elif not self.accepting:
            self.update_accepting()  # the in-flight budget may have room again
        if self.pending and self.targets:
            self.dispatch_pending()

    def _backpressure(self, worker: WorkerHandle) -> None:
        """The worker's channel is full: skip it until it drains (EPOLLOUT)."""
        worker.full = True
        self.counters.backpressure += 1
        self.reactor.modify(worker.fd, self.CHANNEL_EVENTS | OUT)
        self.rebuild_targets()

    def channel_writable(self, worker: WorkerHandle) -> None:
        """Room again in a channel that said EAGAIN."""
        self.reactor.modify(worker.fd, self.CHANNEL_EVENTS)
        worker.full = False
        self.rebuild_targets()
        if self.pending:
            self.dispatch_pending()

    def _inflight_full(self, exc: OSError | None = None) -> None:
        """No more descriptors may be in flight now: stop accepting until workers report
        connections done. ETOOMANYREFS (the kernel's own count, which other processes of
        the same user share) is our budget running out: backpressure, never a reason to
        replace a worker."""
        self.counters.inflight_full += 1
        if exc is not None:
            # Trust the kernel over our estimate until the next tick recomputes it.
            self.budget = min(self.budget, self.outstanding)
            self.failures.error("inflight", "passing connections: %s; %d in flight; accepting "
                                "again as workers finish some", exc, self.outstanding, exc_info=False)
        self.update_accepting()

    def channel_broken(self, worker: WorkerHandle, why: str) -> None:
        """A channel we cannot send on (or that broke the protocol): no more connections
        to that worker, and it is replaced (its pidfd reports the exit)."""
        self.failures.logger.error("worker %d (pid %d): %s; replacing it", worker.worker_id,
                                   worker.pid, why)
        worker.full = True
        self.reactor.unregister(worker.fd)
        self.rebuild_targets()
        kill(worker.pid)

    # ------------------------------------------------------------ taking back
    def take_back(self, worker: WorkerHandle, limit: int | None = None) -> tuple[int, int]:
        """Connections still unread in a worker's channel (dead, stalled, or not reading):
        keep them for the others (or close them when stopping), whole messages until at
        least ``limit`` came back. Returns (taken, lost): lost are the ones the kernel
        dropped on the way back because our descriptor table was full."""
        taken = lost = 0
        fd = worker.worker_end.fileno()
        while limit is None or taken + lost < limit:
            try:
                got = _fdpass.recv_fds(fd, 64, flags=_fdpass.DONTWAIT)
            except OSError:
                break
            if got is None or not got[0]:
                break
            data, fds, flags = got
            missing = _fds_count(data) - len(fds)
            if missing > 0 or flags & _fdpass.CTRUNC:
                lost += max(missing, 0)
                self.failures.error("take back", "%d connections taken back from worker %d were dropped "
                                    "in transit: no room in our descriptor table (RLIMIT_NOFILE)",
                                    max(missing, 0), worker.worker_id, exc_info=False)
            if self.stopping:
                _fdpass.close_fds(array.array("i", fds))
                continue
            self.pending.extend(fds)
            taken += len(fds)
        return taken, lost

    def _came_back(self, worker: WorkerHandle, count: int) -> None:
        """``count`` connections passed to a live worker are no longer its own (taken
        back, or lost on the way back): its credits and place under max_requests too."""
        worker.sent -= count
        worker.taken_back += count
        self.outstanding -= count
        limit = worker.life.request_limit
        if not worker.request_limit and limit and worker.sent < limit:
            worker.request_limit = limit  # not over its max_requests after all
            if worker in self.over_limit:
                self.over_limit.remove(worker)

    def worker_stalled(self, worker: WorkerHandle) -> int:
        """A silent worker: its unread connections go to the others."""
        taken, lost = self.take_back(worker)
        self.counters.salvaged += taken
        self._came_back(worker, taken + lost)
        self.rebuild_targets()
        return taken

    def worker_exited(self, worker: WorkerHandle) -> int:
        """A worker is gone: what it handled died with it, what it never read comes back."""
        worker.slot = -1
        self.outstanding -= worker.sent - worker.done
        salvaged, _lost = self.take_back(worker)  # lost ones died with it, like its others
        self.counters.salvaged += salvaged
        self.retired_sent += worker.sent - salvaged
        self.rebuild_targets()
        if self.pending:
            self.dispatch_pending()
        return salvaged

    # ------------------------------------------------------------ reclaiming
    def _watch_unread(self, worker: WorkerHandle, now: float) -> None:
        """``worker`` was just given something to read: look again ``reclaim_after`` later."""
        worker.unread_since = now
        due = now + self.reclaim_after
        if not self.reclaim_due or due < self.reclaim_due:
            self.reclaim_due = due

    def reclaim(self, now: float) -> int:
        """Take back what a worker left unread for ``reclaim_after`` while another worker
        read everything, and pass it to the readers: a push balancer cannot know that a
        loop blocked right after it was given connections, but its channel shows it.
        Messages are read whole (SEQPACKET), so each connection is either taken by the
        worker or taken back here, never both. Returns how many were taken back."""
        self.reclaim_due = 0.0
        if self.stopping or not self.reclaim_after:
            return 0  # taken back now they would be closed; or this policy keeps its choice
        stuck: list[WorkerHandle] = []
        for worker in self.workers.values():
            if not worker.unread_since:
                continue
            if worker.state != supervisor.READY or worker.stalled:
                worker.unread_since = 0.0  # draining or stalled: not ours to move
                continue
            queued = _unread_or_zero(worker.fd)
            if not queued:
                worker.unread_since = 0.0
                worker.unread_seen = 0
                continue
            if queued < worker.unread_seen:
                worker.unread_since = now  # it read some since we last looked: not stuck yet
            worker.unread_seen = queued
            if now - worker.unread_since >= self.reclaim_after:
                stuck.append(worker)
            else:
                self._watch_unread(worker, worker.unread_since)
        if not stuck:
            return 0
        room, least = self._readers_room()
        if room == 0:
            # Everyone is behind (that is load, not one blocked loop) or the readers have
            # no credit left: moving connections would only move the queue. Look again later.
            for worker in stuck:
                self._watch_unread(worker, now)
            return 0
        taken = 0
        for worker in stuck:
            # Never more than evens it with the least-loaded reader: a worker busy starting a
            # burst of keep-alive connections must not hand them all to the other one.
            share = (worker.sent - worker.done - least + 1) // 2
            limit = share if room is None or share < room else room
            if limit <= 0:
                self._watch_unread(worker, now)
                continue
            got, lost = self.take_back(worker, limit)
            self._came_back(worker, got + lost)
            worker.reclaimed += got
            taken += got
            if room is not None:
                room -= got
            worker.unread_seen = 0
            if _unread_or_zero(worker.fd):
                self._watch_unread(worker, now)  # more than the readers could take
                continue
            worker.unread_since = 0.0
            if got + lost:
                # An empty Fds message in its place: skip_busy passes the worker over until
                # its loop reads it, so what was taken back is not given straight back.
                with contextlib.suppress(OSError):
                    worker.channel.send(_FDS_MESSAGES[0])
        self.counters.reclaimed += taken
        self.rebuild_targets()
        if self.pending:
            self.dispatch_pending()
        return taken

    def _readers_room(self) -> tuple[int | None, int]:
        """How many connections the targets that have read everything can take now (None:
        no limit of their own; 0 when none has), and the fewest any of them holds."""
        room: int | None = 0
        least: int | None = None
        for worker in self.targets:
            if _unread_or_zero(worker.fd):
                continue
            load = worker.sent - worker.done
            least = load if least is None or load < least else least
            if not worker.capacity:
                room = None  # no limit of its own (the in-flight budget is unchanged by a move)
            elif room is not None:
                room += max(0, worker.capacity - load)
        if least is None:
            return 0, 0
        return room, least

    def forget_unread(self) -> None:
        """Stop watching every channel (after a failure in ``reclaim``): sends start anew."""
        self.reclaim_due = 0.0
        for worker in self.workers.values():
            worker.unread_since = 0.0
            worker.unread_seen = 0

    @property
    def dispatched_total(self) -> int:
        """Connections passed to workers, each counted once: one taken back (from a dead,
        stalled or blocked worker) and passed again is not counted twice, and the count
        never goes down while such a one waits to be passed again (a Prometheus counter)."""
        now = self.retired_sent + sum(w.sent for w in self.workers.values())
        if now > self._dispatched_high:
            self._dispatched_high = now
        return self._dispatched_high

    def in_flight(self) -> int:
        """Connections passed on and not yet reported done."""
        return self.outstanding

    def worker_sockets(self) -> list[socket.socket]:
        """Sockets of ours that every worker keeps (none: each has its own channel)."""
        return []

    def own_fds(self) -> list[int]:
        """Descriptors of ours that a new worker must close."""
        return []

    def seal(self) -> None:
        """Stopping: everything accepted has been passed on or closed; nothing more will be."""

    def release(self) -> int:
        """At the very end: close every connection still held here; returns how many."""
        return self.close_pending()

    def close_pending(self) -> int:
        """Close what no worker can take any more (at shutdown); returns how many."""
        count = len(self.pending)
        if count:
            _fdpass.close_fds(self.pending)
            del self.pending[:]
        return count


def _fds_count(datagram: bytes) -> int:
    """Descriptors an ``Fds`` message announced (0 for anything else)."""
    try:
        message = protocol.decode(datagram)
    except protocol.ProtocolError:
        return 0
    return message.count if isinstance(message, protocol.Fds) else 0


def _unread_or_zero(fd: int) -> int:
    """Bytes a worker has not read from its channel (``_reading`` inlines this on the hot path)."""
    try:
        return _fdpass.unread_bytes(fd)
    except OSError:
        return 0  # cannot tell: a broken channel shows when we send


def _client_host(fd: int) -> str | None:
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        return None
    try:
        peer = sock.getpeername()
        return peer[0] if isinstance(peer, tuple) else None
    except OSError:
        return None
    finally:
        sock.detach()

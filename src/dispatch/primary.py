"""The primary: owns the listeners, accepts, passes descriptors, supervises workers.

One thread, one epoll loop. Registered in it: the listeners (user-space
modes), each worker's control channel, each worker's pidfd (readable when it
exits: no SIGCHLD races), a wakeup pipe for signals and ``stop()``, and the
health server's sockets. Decisions about which workers should exist come
from the pure ``Supervisor``; this module only carries them out.
"""

from __future__ import annotations

import array
import contextlib
import errno
import logging
import os
import random
import resource
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from dispatch import _fdpass, protocol, supervisor
from dispatch.balance import ConnectionPolicy, Policy, RoundRobin, make_policy
from dispatch.config import Config
from dispatch.listeners import bind, bound_name, remove_unix_path
from dispatch.pidfile import Pidfile
from dispatch.systemd import Notifier, listen_sockets
from dispatch.worker import worker_main

log = logging.getLogger("dispatch")

_IN = select.EPOLLIN
_OUT = select.EPOLLOUT
_FDS_MESSAGES = [protocol.encode_fds(n) for n in range(_fdpass.SCM_MAX_FD + 1)]
_TICK = 0.1  # seconds between supervisor ticks
# A worker younger than this is not recycled for memory: a max_memory below a fresh
# worker's size must not turn into a restart storm.
_MEMORY_GRACE = 5.0
# Messages read from one channel per wakeup: a worker flooding its channel must not
# starve the listeners and the other workers.
_MESSAGES_PER_PASS = 64
# Descriptors kept free in the primary's own table, beyond the accept batch, for
# spawning (a socketpair and a pidfd per worker), health clients and the like.
_FD_RESERVE = 32
# Backoff of accepting after an accept error: doubles from the first to the last.
_ACCEPT_BACKOFF = (0.05, 1.0)
# How often the same kind of failure is logged again (seconds).
_LOG_EVERY = 10.0


class BootError(RuntimeError):
    """Workers kept failing to boot and none ever became ready."""

    exit_code = supervisor.EXIT_BOOT_FAILURE


class WorkerHandle:
    """The primary's view of one worker process."""

    __slots__ = (
        "worker_id", "pid", "pidfd", "channel", "worker_end", "fd", "state", "sent", "done",
        "full", "drain_unsent", "report", "last_seen", "started_at", "started_mono",
        "request_limit", "capacity", "max_batch", "stalled", "out_of_credit",
    )

    def __init__(self, worker_id: int, pid: int, pidfd: int, channel: socket.socket,
                 worker_end: socket.socket, request_limit: int) -> None:
        self.worker_id = worker_id
        self.pid = pid
        self.pidfd = pidfd
        self.channel = channel  # the primary's end
        self.worker_end = worker_end  # kept open so unread connections can be taken back
        self.fd = channel.fileno()
        self.state = supervisor.BOOTING
        self.sent = 0  # connections passed to it
        self.done = 0  # connections it reported finished (least-connections)
        self.full = False  # its channel said EAGAIN
        self.drain_unsent = False  # Drain waits for room in the channel
        self.report: protocol.Heartbeat | None = None
        self.started_at = time.time()
        self.started_mono = self.last_seen = time.monotonic()
        self.request_limit = request_limit
        self.capacity = 0  # most connections outstanding (sent - done); 0: no limit; from Ready
        self.max_batch = _fdpass.SCM_MAX_FD  # descriptors per message
        self.stalled = False  # silent too long: gets nothing until it speaks again
        self.out_of_credit = False  # holds ``capacity`` connections: gets nothing until Done

    @property
    def outstanding(self) -> int:
        """Connections passed to it and not yet reported done."""
        return self.sent - self.done

    def set_capacity(self, capacity: int, max_batch: int) -> None:
        self.capacity = capacity
        self.max_batch = max(1, min(max_batch, capacity or max_batch, _fdpass.SCM_MAX_FD))


class Server:
    """A dispatch server as an object: ``start()``, ``serve_forever()``, ``stop()``.

    ``serve()`` is this with signal handlers installed. Embedders may call
    ``start()`` to bind (``addresses`` then lists what was bound, port 0
    resolved) and fork the workers, and ``serve_forever()`` to run the loop
    until ``stop()``, a signal, or a boot failure; it returns the exit code.
    """

    def __init__(self, handler: Any, **options: Any) -> None:
        self.config = Config(handler, **options)
        self._policy: Policy | ConnectionPolicy | None = None
        if self.config.user_space:
            balance = self.config.balance
            self._policy = make_policy(balance) if isinstance(balance, str) else balance
        self._needs_loads = bool(self._policy is not None and self._policy.needs_loads)
        # Policies that look at each client address take the slower, per-connection path.
        self._per_connection = isinstance(self._policy, ConnectionPolicy) and not isinstance(self._policy, Policy)
        self._fallback = RoundRobin()  # answers in place of a policy that gave a bad answer
        self._policy_failures: dict[str, float] = {}  # kind -> when it was last logged
        self.supervisor = self._new_supervisor()
        self.listeners: list[socket.socket] = []
        self.workers: dict[int, WorkerHandle] = {}  # by pid
        self.started_at = time.time()
        self.stats = {
            "salvaged": 0, "backpressure": 0, "accept_errors": 0, "stalls": 0,
            "inflight_full": 0, "policy_errors": 0, "spawn_errors": 0, "tick_errors": 0,
        }
        self._retired_sent = 0  # connections passed to workers that have exited
        self._over_limit: list[WorkerHandle] = []  # workers past max_requests, to recycle
        self._targets: list[WorkerHandle] = []
        self._accept_buf = array.array("i", bytes(4 * self.config.accept_batch))
        self._accept_limit = self.config.accept_batch  # lowered when descriptors are scarce
        self._pending = array.array("i")  # accepted or taken back, not yet passed on
        self._accepting = False
        self._accept_resume_at = 0.0
        self._accept_failures = 0  # in a row: the backoff grows with them
        # Descriptors in flight to workers (sent, not yet reported done) and how many the
        # primary may have: the kernel caps a sender's in-flight SCM_RIGHTS descriptors at
        # its RLIMIT_NOFILE (ETOOMANYREFS), and taking back a dead worker's unread ones
        # needs that much room in the primary's own table.
        self._outstanding = 0
        self._inflight_budget = 0
        self._last_logged: dict[str, float] = {}
        self._epoll: select.epoll | None = None
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._wake_r = self._wake_w = -1
        self._requests: list[tuple[str, int]] = []
        self._running = False
        self._exit_code = 0
        self._last_pid: dict[int, int] = {}
        self._stop_requested = 0
        self._pidfile: Pidfile | None = None
        self._saved_signals: dict[int, Any] = {}
        self.health: Any = None
        self._notifier = Notifier()
        self._announced_ready = False
        self._announced_reloading = False

    # ================================================================ setup
    @property
    def addresses(self) -> list[str]:
        """The addresses actually bound, in the order given."""
        return [bound_name(sock) for sock in self.listeners]

    def start(self, install_signal_handlers: bool = False) -> None:
        """Bind every address, then fork the workers.

        All or nothing: if anything fails (an address cannot be bound, raising
        ``BindError``; the pidfile; ``preload`` or the ``on_starting`` hook
        raising), everything done so far is undone and the error propagates, so
        ``start()`` may be called again. ``install_signal_handlers`` needs the
        main thread.
        """
        if self._epoll is not None:
            raise RuntimeError("server already started")
        try:
            self._start(install_signal_handlers)
        except BaseException:
            self._release()
            self._epoll = None
            self.listeners = []
            self.health = None
            self._pidfile = None
            self.supervisor = self._new_supervisor()
            raise

    def _start(self, install_signal_handlers: bool) -> None:
        fd_limit_level, fd_limit_note = raise_fd_limit()
        reserve = self.config.balance == "reuseport"
        self.listeners = listen_sockets()
        if self.listeners and reserve:
            raise ValueError("balance='reuseport' cannot use sockets passed by systemd")
        if self.listeners:
            log.info("using %d listening sockets passed by systemd instead of binding", len(self.listeners))
        else:
            for address in self.config.addresses:
                self.listeners.append(bind(address, self.config.backlog, reserve_only=reserve))
        if self.config.health_address is not None:
            from dispatch.health import HealthServer

            self.health = HealthServer(self, self.config.health_address)
        if self.config.pidfile:
            pidfile = Pidfile(self.config.pidfile)
            pidfile.create()
            self._pidfile = pidfile
        self._epoll = select.epoll()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._register(self._wake_r, _IN, self._on_wakeup)
        if install_signal_handlers:
            self.install_signal_handlers()
        if self.config.user_space:
            for sock in self.listeners:
                self._register(sock.fileno(), 0, self._make_acceptor(sock.fileno()))
        if self.health is not None:
            self.health.attach(self._register, self._unregister)
        if self.config.preload:
            from dispatch.worker import load_handler

            self.config = _replace_handler(self.config, load_handler(self.config.handler))
        self._update_inflight_budget()
        log.info("dispatch primary %d listening on %s (balance=%s, workers=%d)", os.getpid(),
                 ",".join(self.addresses), self._balance_name(), self.config.workers)
        log.log(fd_limit_level, fd_limit_note)  # after binding: a bind error stays one line
        _set_process_title("dispatch: primary")
        if self.config.on_starting is not None:
            self.config.on_starting(self)
        self._apply(self.supervisor.start(time.monotonic()))

    def _new_supervisor(self) -> supervisor.Supervisor:
        return supervisor.Supervisor(
            workers=self.config.workers,
            timeout=self.config.timeout,
            boot_timeout=self.config.boot_timeout,
            graceful_timeout=self.config.graceful_timeout,
            restart_batch=self.config.restart_batch,
        )

    @property
    def restarts_by_cause(self) -> dict[str, int]:
        """Workers replaced so far, by cause (exit, signal, timeout, recycle, spawn)."""
        return self.supervisor.restarts_by_cause

    def _balance_name(self) -> str:
        balance = self.config.balance
        return balance if isinstance(balance, str) else type(balance).__name__

    # ================================================================ control
    def stop(self, graceful: bool = True) -> None:
        """Ask the loop to stop; safe from a signal handler or another thread."""
        self._request("stop" if graceful else "quit")

    def reload(self) -> None:
        """Ask for a rolling restart of every worker."""
        self._request("reload")

    def scale(self, delta: int) -> None:
        """Ask for ``delta`` more (or, negative, fewer) workers; never below one."""
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"scale() needs an int, not {type(delta).__name__}")
        if delta:
            self._request("scale", delta)

    def _request(self, what: str, arg: int = 0) -> None:
        self._requests.append((what, arg))
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def install_signal_handlers(self) -> None:
        """The signals operators know: TERM/INT stop, QUIT fast, HUP/USR2 reload, TTIN/TTOU scale."""
        names = {
            signal.SIGTERM: ("stop", 0), signal.SIGINT: ("stop", 0), signal.SIGQUIT: ("quit", 0),
            signal.SIGHUP: ("reload", 0), signal.SIGUSR2: ("reload", 0),
            signal.SIGTTIN: ("scale", 1), signal.SIGTTOU: ("scale", -1),
        }

        def on_signal(signum: int, frame: object) -> None:
            self._requests.append(names[signum])

        for signum in names:
            self._saved_signals[signum] = signal.signal(signum, on_signal)
        self._saved_signals[0] = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)

    def _restore_signal_handlers(self) -> None:
        if not self._saved_signals:
            return
        wakeup = self._saved_signals.pop(0)
        signal.set_wakeup_fd(wakeup)
        for signum, previous in self._saved_signals.items():
            signal.signal(signum, previous)
        self._saved_signals.clear()

    def _on_wakeup(self, events: int) -> None:
        with contextlib.suppress(BlockingIOError):
            os.read(self._wake_r, 4096)
        now = time.monotonic()
        while self._requests:
            what, arg = self._requests.pop(0)
            if what == "stop":
                self._stop_requested += 1
                if self._stop_requested > 1:
                    log.warning("second stop request: stopping now")
                    self._shutdown(now, graceful=False)
                else:
                    log.info("graceful shutdown: no new connections, waiting up to %gs for in-flight ones",
                             self.config.graceful_timeout)
                    self._shutdown(now, graceful=True)
            elif what == "quit":
                log.info("fast shutdown")
                self._shutdown(now, graceful=False)
            elif what == "reload":
                self._run_hook("on_reload", self)
                if not self.supervisor.restarting:
                    self._notifier.reloading()
                    self._announced_reloading = True
                self._apply(self.supervisor.reload(now))
            elif what == "scale":
                self._apply(self.supervisor.scale(arg, now))

    def _shutdown(self, now: float, graceful: bool) -> None:
        self._notifier.notify(STOPPING=1)
        self._stop_accepting()
        if self._pending and self._targets:
            self._dispatch_pending()  # before Drain, so workers read them first
        if self._pending:
            log.warning("closing %d accepted connections no worker could take", len(self._pending))
            _fdpass.close_fds(self._pending)
            del self._pending[:]
        self._apply(self.supervisor.shutdown(now, graceful))

    # ================================================================ loop
    def serve_forever(self) -> int:
        """Run until stopped; returns the exit code (0, or 3 after boot failures)."""
        if self._epoll is None:
            self.start()
        assert self._epoll is not None
        self._running = True
        poll = self._epoll.poll
        callbacks = self._callbacks
        next_tick = time.monotonic() + _TICK
        try:
            while self._running:
                for fd, events in poll(_TICK):
                    callback = callbacks.get(fd)
                    if callback is not None:
                        try:
                            callback(events)
                        except Exception:
                            # A bug in one handler must not take every worker down with it.
                            self._log_failure("event", "an event handler of the primary failed")
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + _TICK
                    self._tick(now)
        finally:
            self._cleanup()
        return self._exit_code

    def _tick(self, now: float) -> None:
        """The periodic work; each step survives the failure of another."""
        for step in self._tick_steps:
            try:
                step(now)
            except Exception:
                self.stats["tick_errors"] += 1
                self._log_failure(step.__name__, f"periodic task {step.__name__} failed")

    @property
    def _tick_steps(self) -> tuple[Callable[[float], None], ...]:
        return (self._supervise, self._check_stalls, self._recycle_over_limit, self._announce,
                self._tick_health, self._resume_accepting, self._update_inflight_budget)

    def _supervise(self, now: float) -> None:
        self._apply(self.supervisor.tick(now))

    def _announce(self, now: float) -> None:
        if self._announced_reloading and not self.supervisor.restarting:
            self._announced_reloading = False
            self._notify_ready()

    def _tick_health(self, now: float) -> None:
        if self.health is not None:
            self.health.tick(now)

    def _resume_accepting(self, now: float) -> None:
        if self._accept_resume_at and now >= self._accept_resume_at:
            self._accept_resume_at = 0.0
            self._update_accepting()
        if self._pending and self._targets:
            self._dispatch_pending()

    def _log_failure(self, kind: str, message: str, *args: Any, exc_info: bool = True) -> None:
        """Log an error, with its traceback, at most once per ``_LOG_EVERY`` per kind."""
        now = time.monotonic()
        last = self._last_logged.get(kind)
        if last is not None and now - last < _LOG_EVERY:
            return
        self._last_logged[kind] = now
        log.error(message, *args, exc_info=exc_info)

    # ================================================================ hot path
    def _make_acceptor(self, listen_fd: int) -> Callable[[int], None]:
        accept_batch = _fdpass.accept_batch
        buf = self._accept_buf

        def on_listener_readable(events: int) -> None:
            try:
                count = accept_batch(listen_fd, buf, self._accept_limit)
            except OSError as exc:
                self._accept_failed(exc)
                return
            self._accept_failures = 0
            if count:
                left_at, left = self._dispatch(buf, 0, count)
                if left:
                    self._pending.extend(buf[left_at : left_at + left])
                    self._update_accepting()

        return on_listener_readable

    def _dispatch(self, buf: array.array, start: int, count: int) -> tuple[int, int]:
        """Pass ``buf[start:start+count]`` to workers; returns what is left (start, count).

        A worker gets at most its free credits (``capacity - outstanding``), and all
        workers together at most the in-flight budget; what nobody can take now is
        left to the caller, which stops accepting until credits come back.
        """
        if self._per_connection:
            return self._dispatch_each(buf, start, count)
        send = _fdpass.send_fds
        messages = _FDS_MESSAGES
        dontwait = _fdpass.DONTWAIT
        while count and self._targets:
            room = self._inflight_budget - self._outstanding
            if room <= 0:
                self._inflight_full()
                break
            targets = self._targets
            batch = count if count <= room else room
            loads = [w.sent - w.done for w in targets] if self._needs_loads else ()
            shares = self._assign(batch, loads, len(targets))
            credit_spent = False
            for worker, share in zip(targets, shares, strict=True):
                if worker.capacity:
                    free = worker.capacity - worker.sent + worker.done
                    if share >= free:
                        share = free
                        credit_spent = True
                limit = worker.max_batch
                while share > 0:
                    chunk = share if share <= limit else limit
                    try:
                        sent = send(worker.fd, buf, start, chunk, messages[chunk], dontwait, True)
                    except OSError as exc:
                        if exc.errno == errno.ETOOMANYREFS:
                            self._inflight_full(exc)
                            return start, count
                        self._channel_broken(worker, exc)
                        break
                    if not sent:
                        self._backpressure(worker)
                        break
                    worker.sent += chunk
                    self._outstanding += chunk
                    if worker.request_limit and worker.sent >= worker.request_limit:
                        worker.request_limit = 0  # noted once; recycled on the next tick
                        self._over_limit.append(worker)
                    start += chunk
                    count -= chunk
                    share -= chunk
            if credit_spent:
                self._rebuild_targets()
            elif self._targets is targets and self._outstanding < self._inflight_budget:
                break  # nothing changed and nothing is left to try this time
        return start, count

    def _assign(self, count: int, loads: Any, workers: int) -> list[int]:
        """The policy's split of a batch, checked; a bad answer falls back to round-robin."""
        try:
            shares = self._policy.assign(count, loads, workers)  # type: ignore[union-attr]
        except Exception as exc:
            self._policy_failed(f"raised {type(exc).__name__}: {exc}")
        else:
            if _valid_shares(shares, count, workers):
                return shares
            self._policy_failed(f"assigned {str(shares)[:80]} for {count} connections over {workers} workers")
        return self._fallback.assign(count, (), workers)

    def _choose(self, client: str | None, targets: list[WorkerHandle]) -> int:
        """The per-connection policy's pick, checked like ``_assign``."""
        ids = [w.worker_id for w in targets]
        loads = [w.sent - w.done for w in targets]
        try:
            index = self._policy.choose(client, ids, loads)  # type: ignore[union-attr]
        except Exception as exc:
            self._policy_failed(f"raised {type(exc).__name__}: {exc}")
        else:
            if type(index) is int and 0 <= index < len(targets):
                return index
            self._policy_failed(f"chose {str(index)[:40]} among {len(targets)} workers")
        return self._fallback.assign(1, (), len(targets)).index(1)

    def _policy_failed(self, what: str) -> None:
        self.stats["policy_errors"] += 1
        kind = what.split(" ", 1)[0]
        self._log_failure(f"policy {kind}", "balancing policy %s %s; using round-robin for this batch",
                          self._balance_name(), what, exc_info=False)

    def _dispatch_each(self, buf: array.array, start: int, count: int) -> tuple[int, int]:
        """The per-connection path: the policy sees each client's address."""
        while count and self._targets:
            if self._outstanding >= self._inflight_budget:
                self._inflight_full()
                break
            targets = self._targets
            worker = targets[self._choose(_client_host(buf[start]), targets)]
            try:
                sent = _fdpass.send_fds(worker.fd, buf, start, 1, _FDS_MESSAGES[1], _fdpass.DONTWAIT, True)
            except OSError as exc:
                if exc.errno == errno.ETOOMANYREFS:
                    self._inflight_full(exc)
                    break
                self._channel_broken(worker, exc)
                continue
            if not sent:
                self._backpressure(worker)
                continue
            worker.sent += 1
            self._outstanding += 1
            start += 1
            count -= 1
            if worker.request_limit and worker.sent >= worker.request_limit:
                worker.request_limit = 0
                self._over_limit.append(worker)
            if worker.capacity and worker.sent - worker.done >= worker.capacity:
                self._rebuild_targets()
        return start, count

    def _recycle_over_limit(self, now: float) -> None:
        # On the tick, not in _dispatch: a fork there would copy the batch still in hand.
        over, self._over_limit = self._over_limit, []
        for worker in over:
            if worker.pid in self.workers:
                self._recycle(worker, now, f"passed {worker.sent} connections (max_requests {self.config.max_requests})")

    def _dispatch_pending(self) -> None:
        start, left = self._dispatch(self._pending, 0, len(self._pending))
        del self._pending[:start]
        self._update_accepting()

    def _backpressure(self, worker: WorkerHandle) -> None:
        """The worker's channel is full: skip it until it drains (EPOLLOUT)."""
        worker.full = True
        self.stats["backpressure"] += 1
        self._modify(worker.fd, _IN | _OUT)
        self._rebuild_targets()

    def _inflight_full(self, exc: OSError | None = None) -> None:
        """No more descriptors may be in flight now: stop accepting until workers report
        connections done. ETOOMANYREFS (the kernel's own count, which other processes of
        the same user share) is the same thing as our budget running out: backpressure,
        never a reason to replace a worker."""
        self.stats["inflight_full"] += 1
        if exc is not None:
            # Trust the kernel over our estimate until the next tick recomputes it.
            self._inflight_budget = min(self._inflight_budget, self._outstanding)
            self._log_failure("inflight", "passing connections: %s; %d in flight; accepting "
                              "again as workers finish some", exc, self._outstanding, exc_info=False)
        self._update_accepting()

    def _update_inflight_budget(self, now: float = 0.0) -> None:
        """Recompute how many descriptors may be in flight, from the room in our table."""
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        if soft == resource.RLIM_INFINITY:
            soft = 1 << 20
        try:
            in_table = len(os.listdir("/proc/self/fd")) - len(self._pending)
        except OSError:
            return  # EMFILE right now: keep the last estimate
        reserve = _FD_RESERVE + 3 * len(self.workers)
        if self.health is not None:
            reserve += self.health.max_clients
        free = max(0, soft - in_table - reserve)
        self._accept_limit = max(1, min(self.config.accept_batch, free // 4))
        was_full = self._outstanding >= self._inflight_budget
        self._inflight_budget = max(0, free - self._accept_limit)
        if was_full and self._outstanding < self._inflight_budget:
            self._rebuild_targets()

    def _channel_broken(self, worker: WorkerHandle, exc: OSError) -> None:
        log.error("worker %d (pid %d): cannot pass connections: %s; replacing it",
                  worker.worker_id, worker.pid, exc)
        worker.full = True
        self._unregister(worker.fd)
        self._rebuild_targets()
        self._kill(worker.pid, "exit")

    def _accept_failed(self, exc: OSError) -> None:
        """Any accept error: the listener may stay readable, so back off instead of
        spinning, longer each time it fails again."""
        self.stats["accept_errors"] += 1
        self._accept_failures += 1
        first, most = _ACCEPT_BACKOFF
        delay = min(most, first * 2 ** (self._accept_failures - 1))
        self._log_failure(f"accept {exc.errno}", "accept failed: %s; pausing accepts for %gs",
                          exc, delay, exc_info=False)
        self._accept_resume_at = time.monotonic() + delay
        self._set_accepting(False)

    def _update_accepting(self) -> None:
        """Accept only while some worker can take connections and nothing is waiting."""
        want = (
            bool(self._targets) and not self._pending and not self._accept_resume_at
            and not self.supervisor.stopping and self._outstanding < self._inflight_budget
        )
        if want != self._accepting:
            self._set_accepting(want)

    def _set_accepting(self, on: bool) -> None:
        self._accepting = on
        if not self.config.user_space:
            return
        for sock in self.listeners:
            if sock.fileno() >= 0:
                self._modify(sock.fileno(), _IN if on else 0)

    def _stop_accepting(self) -> None:
        if self._accepting:
            self._set_accepting(False)
        if self.config.user_space:
            self._accept_backlog()
        for sock in self.listeners:
            if sock.fileno() >= 0 and self.config.user_space:
                self._unregister(sock.fileno())
        self._close_listeners()

    def _accept_backlog(self) -> None:
        """Take the connections that completed their handshake before we stopped: they are
        served, not reset. Bounded: at most one backlog's worth per listener, and no more
        than the in-flight budget leaves room for."""
        for sock in self.listeners:
            for _ in range(max(1, self.config.backlog // len(self._accept_buf))):
                room = self._inflight_budget - self._outstanding - len(self._pending)
                if room <= 0:
                    return
                try:
                    count = _fdpass.accept_batch(sock.fileno(), self._accept_buf, min(room, len(self._accept_buf)))
                except OSError:
                    break
                if not count:
                    break
                self._pending.extend(self._accept_buf[:count])

    def _check_stalls(self, now: float) -> None:
        """A ready worker silent for ``stall_after`` seconds gets no new connections, and
        the ones waiting unread in its channel go to the others, long before ``timeout``
        kills it. Its channel is a SEQPACKET socket: each message, with its descriptors,
        is read whole by one side or the other, so nothing is served twice."""
        if not self.config.user_space:
            return
        limit = self.config.stall_after
        for worker in list(self.workers.values()):
            silent = now - worker.last_seen
            if worker.stalled or worker.state != supervisor.READY or silent <= limit:
                continue
            worker.stalled = True
            self.stats["stalls"] += 1
            taken = self._take_back(worker)
            worker.sent -= taken
            self._outstanding -= taken
            log.warning("worker %d (pid %d) silent for %.1fs: no new connections until it speaks "
                        "again; %d connections it had not read go to other workers",
                        worker.worker_id, worker.pid, silent, taken)
            self._rebuild_targets()
        if self._pending:
            self._dispatch_pending()

    def _rebuild_targets(self) -> None:
        targets = []
        for w in self.workers.values():
            w.out_of_credit = bool(w.capacity) and w.sent - w.done >= w.capacity
            if w.state == supervisor.READY and not w.full and not w.stalled and not w.out_of_credit:
                targets.append(w)
        targets.sort(key=lambda w: w.worker_id)
        self._targets = targets
        self._update_accepting()

    @property
    def dispatched_total(self) -> int:
        """Connections passed to workers (one taken back from a dead worker counts once)."""
        return self._retired_sent + sum(w.sent for w in self.workers.values())

    # ================================================================ workers
    def _spawn(self, worker_id: int, replaces: int | None) -> None:
        """Carry out a ``Spawn``; a fork that fails is a failed boot, never a crash."""
        try:
            worker = self._fork_worker(worker_id)
        except OSError as exc:
            self.stats["spawn_errors"] += 1
            log.error("worker %d: cannot start a process: %s", worker_id, exc)
            self._apply(self.supervisor.spawn_failed(worker_id, replaces, time.monotonic(), str(exc)))
            return
        self.workers[worker.pid] = worker
        self._register(worker.fd, _IN, lambda events, w=worker: self._on_channel(w, events))
        self._register(worker.pidfd, _IN, lambda events, w=worker: self._on_exit(w))
        self.supervisor.spawned(worker_id, worker.pid, time.monotonic(), replaces)
        previous = self._last_pid.get(worker_id)
        self._last_pid[worker_id] = worker.pid
        if replaces is not None:
            log.info("worker %d: started pid %d to take over from pid %d", worker_id, worker.pid, replaces)
        elif previous is not None and previous not in self.workers:
            log.info("worker %d: started pid %d, replacing pid %d", worker_id, worker.pid, previous)
        else:
            log.info("worker %d: started pid %d", worker_id, worker.pid)

    def _fork_worker(self, worker_id: int) -> WorkerHandle:
        """Fork one worker; on failure nothing is left open and no child is left behind."""
        primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            primary_end.setblocking(False)
            worker_end.setblocking(False)
            inherited = [self._epoll.fileno(), self._wake_r, self._wake_w, primary_end.fileno()]  # type: ignore[union-attr]
            for w in self.workers.values():
                inherited += [w.fd, w.worker_end.fileno(), w.pidfd]
            if self.config.user_space:
                inherited += [s.fileno() for s in self.listeners]
            inherited += self._pending  # a child holding a copy would keep those connections open
            if self.health is not None:
                inherited += self.health.fds()
            inherited += self._notifier.fds()
            listeners = [] if self.config.user_space else self.listeners
            for handler in logging.getLogger().handlers + log.handlers:
                handler.flush()
            pid = os.fork()
            if pid == 0:
                worker_main(self.config, worker_id, worker_end, listeners, inherited)
            try:
                pidfd = os.pidfd_open(pid)
            except OSError:
                # A child we cannot watch must not live: kill and reap it now (it is
                # freshly forked, so this wait is short).
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise
        except BaseException:
            primary_end.close()
            worker_end.close()
            raise
        limit = 0
        if self.config.max_requests:
            limit = self.config.max_requests + random.randint(0, self.config.max_requests_jitter)
        return WorkerHandle(worker_id, pid, pidfd, primary_end, worker_end, limit)

    def _on_channel(self, worker: WorkerHandle, events: int) -> None:
        if events & _OUT:
            self._channel_writable(worker)
        if not events & (_IN | select.EPOLLERR | select.EPOLLHUP):
            return
        now = time.monotonic()
        for _ in range(_MESSAGES_PER_PASS):  # the rest waits for the next pass (level-triggered)
            if self.workers.get(worker.pid) is not worker:
                return  # replaced or gone while handling a message
            try:
                got = _fdpass.recv_fds(worker.fd, 64, 0)
            except OSError:
                return
            if got is None or not got[0]:
                return
            try:
                message = protocol.decode_from(got[0], protocol.TO_PRIMARY)
            except protocol.ProtocolError as exc:
                self._channel_broken(worker, OSError(errno.EPROTO, f"it broke the protocol ({exc})"))
                return
            worker.last_seen = now
            if worker.stalled:
                worker.stalled = False
                log.info("worker %d (pid %d) speaks again; passing it connections again",
                         worker.worker_id, worker.pid)
                self._rebuild_targets()
                if self._pending:
                    self._dispatch_pending()
            if isinstance(message, protocol.Done):
                self._on_done(worker, message.count)
            elif isinstance(message, protocol.Heartbeat):
                worker.report = message
                self.supervisor.heartbeat(worker.pid, now)
                self._check_recycle(worker, message, now)
            elif isinstance(message, protocol.Ready):
                if worker.state == supervisor.BOOTING:  # a stray Ready changes nothing
                    worker.set_capacity(message.capacity, message.max_batch)
                    self._on_ready(worker, now)

    def _on_done(self, worker: WorkerHandle, count: int) -> None:
        """Credits come back; never more than were sent (a lying worker skews nothing)."""
        count = min(count, worker.sent - worker.done)
        if count <= 0:
            return
        worker.done += count
        self._outstanding -= count
        if worker.out_of_credit:
            self._rebuild_targets()
        elif not self._accepting:
            self._update_accepting()  # the in-flight budget may have room again
        if self._pending and self._targets:
            self._dispatch_pending()

    def _on_ready(self, worker: WorkerHandle, now: float) -> None:
        worker.state = supervisor.READY
        log.info("worker %d (pid %d) ready", worker.worker_id, worker.pid)
        self._apply(self.supervisor.ready(worker.pid, now))
        self._rebuild_targets()
        if not self._announced_ready and len(self._targets) >= self.config.workers:
            self._announced_ready = True
            self._notify_ready()
        if self._pending:
            self._dispatch_pending()

    def _run_hook(self, name: str, *args: Any) -> None:
        """A failing hook is logged; it never takes the primary down."""
        hook = getattr(self.config, name)
        if hook is not None:
            try:
                hook(*args)
            except Exception:
                log.exception("%s hook failed", name)

    def _notify_ready(self) -> None:
        ready = sum(1 for w in self.workers.values() if w.state == supervisor.READY)
        self._notifier.notify(READY=1, STATUS=f"{ready} workers ready, balance={self._balance_name()}")

    def _channel_writable(self, worker: WorkerHandle) -> None:
        self._modify(worker.fd, _IN)
        worker.full = False
        if worker.drain_unsent:
            self._send_drain(worker)
            return
        self._rebuild_targets()
        if self._pending:
            self._dispatch_pending()

    def _check_recycle(self, worker: WorkerHandle, report: protocol.Heartbeat, now: float) -> None:
        """Kernel modes count connections in heartbeats; memory is checked in every mode."""
        if worker.request_limit and report.total >= worker.request_limit:
            worker.request_limit = 0
            self._recycle(worker, now, f"handled {report.total} connections (max_requests {self.config.max_requests})")
        elif (self.config.max_memory and report.rss > self.config.max_memory
              and now - worker.started_mono >= _MEMORY_GRACE):
            self._recycle(worker, now, f"resident memory {report.rss} bytes is over max_memory {self.config.max_memory}")

    def _recycle(self, worker: WorkerHandle, now: float, why: str) -> None:
        self._apply(self.supervisor.recycle(worker.pid, now, why))

    def _on_exit(self, worker: WorkerHandle) -> None:
        try:
            pid, status = os.waitpid(worker.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = worker.pid, 0  # reaped elsewhere: how it ended is unknown
        if pid == 0:
            return  # not reapable yet; the pidfd stays readable and we come back
        how = _describe_exit(status)
        self._unregister(worker.pidfd)
        os.close(worker.pidfd)
        self._unregister(worker.fd)
        del self.workers[worker.pid]
        self._outstanding -= worker.sent - worker.done  # handled ones died, unread ones come back
        salvaged = self._take_back(worker)
        self._retired_sent += worker.sent - salvaged
        worker.channel.close()
        worker.worker_end.close()
        self._rebuild_targets()
        if self._pending:
            self._dispatch_pending()
        expected = worker.state == supervisor.DRAINING and status == 0
        level = logging.INFO if expected else logging.WARNING
        extra = f"; {salvaged} connections it had not read go to other workers" if salvaged else ""
        log.log(level, "worker %d (pid %d) %s%s", worker.worker_id, worker.pid, how, extra)
        self._run_hook("on_worker_exit", worker.worker_id, worker.pid, how)
        self._apply(self.supervisor.exited(worker.pid, time.monotonic(), how, os.WIFSIGNALED(status)))
        if self._pending:
            self._dispatch_pending()

    def _take_back(self, worker: WorkerHandle) -> int:
        """Connections still unread in a dead or stalled worker's channel: keep them for
        the others."""
        taken = 0
        while True:
            try:
                got = _fdpass.recv_fds(worker.worker_end.fileno(), 64)
            except OSError:
                break
            if got is None or not got[0]:
                break
            fds = got[1]
            if fds:
                if self.supervisor.stopping:
                    for fd in fds:
                        os.close(fd)
                    continue
                self._pending.extend(fds)
                taken += len(fds)
        self.stats["salvaged"] += taken
        return taken

    # ================================================================ actions
    def _apply(self, actions: list[supervisor.Action]) -> None:
        for action in actions:
            if isinstance(action, supervisor.Spawn):
                if not self.supervisor.stopping:  # a failed spawn before it may have given up
                    self._spawn(action.worker_id, action.replaces)
            elif isinstance(action, supervisor.Drain):
                worker = self.workers.get(action.pid)
                if worker is not None:
                    worker.state = supervisor.DRAINING
                    self._rebuild_targets()  # stop sending before asking it to drain
                    self._send_drain(worker)
            elif isinstance(action, supervisor.Kill):
                self._kill(action.pid, action.cause)
            elif isinstance(action, supervisor.Log):
                log.log(action.level, action.message)
            elif isinstance(action, supervisor.Stop):
                self._running = False
                self._exit_code = action.code

    def _send_drain(self, worker: WorkerHandle) -> None:
        try:
            worker.channel.send(protocol.encode(protocol.Drain()))
            worker.drain_unsent = False
        except BlockingIOError:
            worker.drain_unsent = True  # sent when the channel has room
            self._modify(worker.fd, _IN | _OUT)
        except OSError as exc:
            log.warning("worker %d (pid %d): cannot send drain: %s", worker.worker_id, worker.pid, exc)
            self._kill(worker.pid, "exit")

    def _kill(self, pid: int, cause: str) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)

    # ================================================================ epoll
    def _register(self, fd: int, events: int, callback: Callable[[int], None]) -> None:
        self._epoll.register(fd, events)  # type: ignore[union-attr]
        self._callbacks[fd] = callback

    def _unregister(self, fd: int) -> None:
        if self._callbacks.pop(fd, None) is not None:
            with contextlib.suppress(OSError, ValueError):
                self._epoll.unregister(fd)  # type: ignore[union-attr]

    def _modify(self, fd: int, events: int) -> None:
        """Change what we wait for on ``fd``; one that is no longer registered (closed or
        unregistered on an error path) is ignored, as trio does."""
        if fd not in self._callbacks:
            return
        try:
            self._epoll.modify(fd, events)  # type: ignore[union-attr]
        except (FileNotFoundError, ValueError):
            self._callbacks.pop(fd, None)
        except OSError as exc:
            if exc.errno != errno.EBADF:
                raise
            self._callbacks.pop(fd, None)

    # ================================================================ teardown
    def _close_listeners(self) -> None:
        for sock in self.listeners:
            remove_unix_path(sock)
            sock.close()

    def _cleanup(self) -> None:
        self._release()
        if self._exit_code:
            log.critical("dispatch primary %d stopped with exit code %d", os.getpid(), self._exit_code)
        else:
            log.info("dispatch primary %d stopped", os.getpid())

    def _release(self) -> None:
        """Kill and reap every worker, close everything we opened, restore the signals."""
        for worker in list(self.workers.values()):
            self._kill(worker.pid, "shutdown")
        for worker in list(self.workers.values()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)
            os.close(worker.pidfd)
            worker.channel.close()
            worker.worker_end.close()
        self.workers.clear()
        self._targets = []
        self._outstanding = 0
        if self._pending:
            _fdpass.close_fds(self._pending)
            del self._pending[:]
        self._close_listeners()
        if self.health is not None:
            self.health.close()
        if self._pidfile is not None:
            self._pidfile.remove()
        self._notifier.close()
        if self._epoll is not None:
            self._epoll.close()
        self._restore_signal_handlers()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._wake_r = self._wake_w = -1
        self._callbacks.clear()


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"was killed by signal {signum} ({name})"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def _valid_shares(shares: Any, count: int, workers: int) -> bool:
    """A batch policy's answer: one non-negative int per worker, summing to ``count``."""
    if not isinstance(shares, list | tuple) or len(shares) != workers:
        return False
    total = 0
    for share in shares:
        if type(share) is not int or share < 0:
            return False
        total += share
    return total == count


def raise_fd_limit() -> tuple[int, str]:
    """Raise the soft RLIMIT_NOFILE to the hard one: every connection is a descriptor,
    in the primary's table or in flight to a worker. Workers inherit it. Returns the
    log level and line that say what was done."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        try:
            with open("/proc/sys/fs/nr_open") as f:
                target = int(f.read())
        except (OSError, ValueError):
            target = 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (OSError, ValueError) as exc:
            return logging.WARNING, f"RLIMIT_NOFILE: cannot raise the soft limit {soft} to {target}: {exc}"
        return logging.INFO, f"RLIMIT_NOFILE: raised the soft limit from {soft} to the hard limit {target}"
    shown = "unlimited" if hard == resource.RLIM_INFINITY else hard
    return logging.INFO, f"RLIMIT_NOFILE: soft limit {soft}, hard limit {shown}"


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


def _set_process_title(title: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


def _replace_handler(config: Config, handler: Any) -> Config:
    import dataclasses

    return dataclasses.replace(config, handler=handler, preload=False)

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
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

from dispatch import _fdpass, protocol, supervisor
from dispatch.balance import ConnectionPolicy, Policy, make_policy
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


class BootError(RuntimeError):
    """Workers kept failing to boot and none ever became ready."""

    exit_code = supervisor.EXIT_BOOT_FAILURE


class WorkerHandle:
    """The primary's view of one worker process."""

    __slots__ = (
        "worker_id", "pid", "pidfd", "channel", "worker_end", "fd", "state", "sent", "done",
        "full", "drain_unsent", "report", "last_seen", "started_at", "request_limit", "max_batch",
        "stalled",
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
        self.last_seen = time.monotonic()
        self.request_limit = request_limit
        self.max_batch = _fdpass.SCM_MAX_FD  # descriptors per message; the worker says in Ready
        self.stalled = False  # silent too long: gets nothing until it speaks again


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
        self.supervisor = supervisor.Supervisor(
            workers=self.config.workers,
            timeout=self.config.timeout,
            boot_timeout=self.config.boot_timeout,
            graceful_timeout=self.config.graceful_timeout,
            restart_batch=self.config.restart_batch,
        )
        self.listeners: list[socket.socket] = []
        self.workers: dict[int, WorkerHandle] = {}  # by pid
        self.started_at = time.time()
        self.stats = {"salvaged": 0, "backpressure": 0, "accept_errors": 0, "stalls": 0}
        self._retired_sent = 0  # connections passed to workers that have exited
        self._over_limit: list[WorkerHandle] = []  # workers past max_requests, to recycle
        self.restarts_by_cause: dict[str, int] = {}
        self._targets: list[WorkerHandle] = []
        self._accept_buf = array.array("i", bytes(4 * self.config.accept_batch))
        self._pending = array.array("i")  # accepted or taken back, not yet passed on
        self._accepting = False
        self._accept_resume_at = 0.0
        self._epoll: select.epoll | None = None
        self._callbacks: dict[int, Callable[[int], None]] = {}
        self._wake_r = self._wake_w = -1
        self._requests: list[str] = []
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

        Raises ``BindError`` (and leaves nothing bound) if an address cannot be
        bound. ``install_signal_handlers`` needs the main thread.
        """
        if self._epoll is not None:
            raise RuntimeError("server already started")
        reserve = self.config.balance == "reuseport"
        try:
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
                self._pidfile = Pidfile(self.config.pidfile)
                self._pidfile.create()
        except BaseException:
            self._close_listeners()
            if self.health is not None:
                self.health.close()
            raise
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
        log.info("dispatch primary %d listening on %s (balance=%s, workers=%d)", os.getpid(),
                 ",".join(self.addresses), self._balance_name(), self.config.workers)
        _set_process_title("dispatch: primary")
        if self.config.on_starting is not None:
            self.config.on_starting(self)
        self._apply(self.supervisor.start(time.monotonic()))

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
        """Ask for ``delta`` more (or fewer) workers."""
        self._request("ttin" if delta > 0 else "ttou")

    def _request(self, what: str) -> None:
        self._requests.append(what)
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"\0")

    def install_signal_handlers(self) -> None:
        """The signals operators know: TERM/INT stop, QUIT fast, HUP/USR2 reload, TTIN/TTOU scale."""
        names = {
            signal.SIGTERM: "stop", signal.SIGINT: "stop", signal.SIGQUIT: "quit",
            signal.SIGHUP: "reload", signal.SIGUSR2: "reload",
            signal.SIGTTIN: "ttin", signal.SIGTTOU: "ttou",
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
            what = self._requests.pop(0)
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
            elif what in ("ttin", "ttou"):
                self._apply(self.supervisor.scale(1 if what == "ttin" else -1, now))

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
                        callback(events)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + _TICK
                    self._tick(now)
        finally:
            self._cleanup()
        return self._exit_code

    def _tick(self, now: float) -> None:
        self._apply(self.supervisor.tick(now))
        if self.config.user_space:
            self._check_stalls(now)
        if self._over_limit:
            # Here, not in _dispatch: a fork there would copy the batch still in hand.
            self._recycle_over_limit()
        if self._announced_reloading and not self.supervisor.restarting:
            self._announced_reloading = False
            self._notify_ready()
        if self.health is not None:
            self.health.tick(now)
        if self._accept_resume_at and now >= self._accept_resume_at:
            self._accept_resume_at = 0.0
            self._update_accepting()

    # ================================================================ hot path
    def _make_acceptor(self, listen_fd: int) -> Callable[[int], None]:
        accept_batch = _fdpass.accept_batch
        buf = self._accept_buf

        def on_listener_readable(events: int) -> None:
            try:
                count = accept_batch(listen_fd, buf)
            except OSError as exc:
                self._accept_failed(exc)
                return
            if count:
                left_at, left = self._dispatch(buf, 0, count)
                if left:
                    self._pending.extend(buf[left_at : left_at + left])
                    self._update_accepting()

        return on_listener_readable

    def _dispatch(self, buf: array.array, start: int, count: int) -> tuple[int, int]:
        """Pass ``buf[start:start+count]`` to workers; returns what is left (start, count)."""
        if self._per_connection:
            return self._dispatch_each(buf, start, count)
        send = _fdpass.send_fds
        messages = _FDS_MESSAGES
        dontwait = _fdpass.DONTWAIT
        while count and self._targets:
            targets = self._targets
            loads = [w.sent - w.done for w in targets] if self._needs_loads else ()
            shares = self._policy.assign(count, loads, len(targets))  # type: ignore[union-attr]
            if sum(shares) != count:
                raise ValueError(f"balancing policy assigned {sum(shares)} of {count} connections")
            for worker, share in zip(targets, shares, strict=True):
                limit = worker.max_batch
                while share:
                    chunk = share if share <= limit else limit
                    try:
                        sent = send(worker.fd, buf, start, chunk, messages[chunk], dontwait, True)
                    except OSError as exc:
                        self._channel_broken(worker, exc)
                        break
                    if not sent:
                        self._backpressure(worker)
                        break
                    worker.sent += chunk
                    if worker.request_limit and worker.sent >= worker.request_limit:
                        worker.request_limit = 0  # noted once; recycled on the next tick
                        self._over_limit.append(worker)
                    start += chunk
                    count -= chunk
                    share -= chunk
        return start, count

    def _dispatch_each(self, buf: array.array, start: int, count: int) -> tuple[int, int]:
        """The per-connection path: the policy sees each client's address."""
        policy: ConnectionPolicy = self._policy  # type: ignore[assignment]
        while count and self._targets:
            ids = [w.worker_id for w in self._targets]
            loads = [w.sent - w.done for w in self._targets]
            worker = self._targets[policy.choose(_client_host(buf[start]), ids, loads)]
            try:
                sent = _fdpass.send_fds(worker.fd, buf, start, 1, _FDS_MESSAGES[1], _fdpass.DONTWAIT, True)
            except OSError as exc:
                self._channel_broken(worker, exc)
                continue
            if not sent:
                self._backpressure(worker)
                continue
            worker.sent += 1
            start += 1
            count -= 1
        return start, count

    def _recycle_over_limit(self) -> None:
        over, self._over_limit = self._over_limit, []
        now = time.monotonic()
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
        self._epoll.modify(worker.fd, _IN | _OUT)  # type: ignore[union-attr]
        self._rebuild_targets()

    def _channel_broken(self, worker: WorkerHandle, exc: OSError) -> None:
        log.error("worker %d (pid %d): cannot pass connections: %s; replacing it",
                  worker.worker_id, worker.pid, exc)
        worker.full = True
        self._rebuild_targets()
        self._kill(worker.pid, "exit")

    def _accept_failed(self, exc: OSError) -> None:
        self.stats["accept_errors"] += 1
        if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
            # The listener stays readable; pause instead of spinning.
            log.error("accept failed: %s; pausing accepts for 0.1s", exc)
            self._accept_resume_at = time.monotonic() + 0.1
            self._set_accepting(False)
        else:
            log.error("accept failed: %s", exc)

    def _update_accepting(self) -> None:
        """Accept only while some worker can take connections and nothing is waiting."""
        want = (
            bool(self._targets) and not self._pending and not self._accept_resume_at
            and not self.supervisor.stopping
        )
        if want != self._accepting:
            self._set_accepting(want)

    def _set_accepting(self, on: bool) -> None:
        self._accepting = on
        if not self.config.user_space:
            return
        for sock in self.listeners:
            if sock.fileno() >= 0:
                self._epoll.modify(sock.fileno(), _IN if on else 0)  # type: ignore[union-attr]

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
        served, not reset. Bounded: at most one backlog's worth per listener."""
        for sock in self.listeners:
            for _ in range(max(1, self.config.backlog // len(self._accept_buf))):
                try:
                    count = _fdpass.accept_batch(sock.fileno(), self._accept_buf)
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
        limit = self.config.stall_after
        for worker in list(self.workers.values()):
            silent = now - worker.last_seen
            if worker.stalled or worker.state != supervisor.READY or silent <= limit:
                continue
            worker.stalled = True
            self.stats["stalls"] += 1
            taken = self._take_back(worker)
            worker.sent -= taken
            log.warning("worker %d (pid %d) silent for %.1fs: no new connections until it speaks "
                        "again; %d connections it had not read go to other workers",
                        worker.worker_id, worker.pid, silent, taken)
            self._rebuild_targets()
        if self._pending:
            self._dispatch_pending()

    def _rebuild_targets(self) -> None:
        self._targets = [
            w for w in self.workers.values()
            if w.state == supervisor.READY and not w.full and not w.stalled
        ]
        self._targets.sort(key=lambda w: w.worker_id)
        self._update_accepting()

    @property
    def dispatched_total(self) -> int:
        """Connections passed to workers (one taken back from a dead worker counts once)."""
        return self._retired_sent + sum(w.sent for w in self.workers.values())

    # ================================================================ workers
    def _spawn(self, worker_id: int, replaces: int | None) -> None:
        primary_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
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
        pidfd = os.pidfd_open(pid)
        limit = 0
        if self.config.max_requests:
            limit = self.config.max_requests + random.randint(0, self.config.max_requests_jitter)
        worker = WorkerHandle(worker_id, pid, pidfd, primary_end, worker_end, limit)
        self.workers[pid] = worker
        self._register(worker.fd, _IN, lambda events, w=worker: self._on_channel(w, events))
        self._register(pidfd, _IN, lambda events, w=worker: self._on_exit(w))
        self.supervisor.spawned(worker_id, pid, time.monotonic(), replaces)
        previous = self._last_pid.get(worker_id)
        self._last_pid[worker_id] = pid
        if replaces is not None:
            log.info("worker %d: started pid %d to take over from pid %d", worker_id, pid, replaces)
        elif previous is not None and previous not in self.workers:
            log.info("worker %d: started pid %d, replacing pid %d", worker_id, pid, previous)
        else:
            log.info("worker %d: started pid %d", worker_id, pid)

    def _on_channel(self, worker: WorkerHandle, events: int) -> None:
        if events & _OUT:
            self._channel_writable(worker)
        if not events & (_IN | select.EPOLLERR | select.EPOLLHUP):
            return
        now = time.monotonic()
        while True:
            try:
                got = _fdpass.recv_fds(worker.fd, 64, 0)
            except OSError:
                return
            if got is None or not got[0]:
                return
            try:
                message = protocol.decode_from(got[0], protocol.TO_PRIMARY)
            except protocol.ProtocolError as exc:
                log.error("worker %d (pid %d) broke the protocol (%s); replacing it",
                          worker.worker_id, worker.pid, exc)
                self._unregister(worker.fd)
                self._kill(worker.pid, "exit")
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
                worker.done += message.count
            elif isinstance(message, protocol.Heartbeat):
                worker.report = message
                self.supervisor.heartbeat(worker.pid, now)
                self._check_recycle(worker, message, now)
            elif isinstance(message, protocol.Ready):
                worker.max_batch = max(1, min(message.max_batch, _fdpass.SCM_MAX_FD))
                self._on_ready(worker, now)

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
        self._epoll.modify(worker.fd, _IN)  # type: ignore[union-attr]
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
              and time.time() - worker.started_at >= _MEMORY_GRACE):
            self._recycle(worker, now, f"resident memory {report.rss} bytes is over max_memory {self.config.max_memory}")

    def _recycle(self, worker: WorkerHandle, now: float, why: str) -> None:
        self._apply(self.supervisor.recycle(worker.pid, now, why))

    def _on_exit(self, worker: WorkerHandle) -> None:
        try:
            _, status = os.waitpid(worker.pid, os.WNOHANG)
        except ChildProcessError:
            status = 0
        how = _describe_exit(status)
        self._unregister(worker.pidfd)
        os.close(worker.pidfd)
        self._unregister(worker.fd)
        del self.workers[worker.pid]
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
        if not expected and not self.supervisor.stopping:
            cause = self.supervisor.by_pid.get(worker.pid)
            kill_cause = cause.kill_cause if cause else None
            self._count_restart(kill_cause or ("signal" if os.WIFSIGNALED(status) else "exit"))
        self._run_hook("on_worker_exit", worker.worker_id, worker.pid, how)
        self._apply(self.supervisor.exited(worker.pid, time.monotonic(), how))
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

    def _count_restart(self, cause: str) -> None:
        self.restarts_by_cause[cause] = self.restarts_by_cause.get(cause, 0) + 1

    # ================================================================ actions
    def _apply(self, actions: list[supervisor.Action]) -> None:
        for action in actions:
            if isinstance(action, supervisor.Spawn):
                if action.cause:
                    self._count_restart(action.cause)
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
            self._epoll.modify(worker.fd, _IN | _OUT)  # type: ignore[union-attr]
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

    # ================================================================ teardown
    def _close_listeners(self) -> None:
        for sock in self.listeners:
            remove_unix_path(sock)
            sock.close()

    def _cleanup(self) -> None:
        for worker in list(self.workers.values()):
            self._kill(worker.pid, "shutdown")
        for worker in list(self.workers.values()):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(worker.pid, 0)
            os.close(worker.pidfd)
            worker.channel.close()
            worker.worker_end.close()
        self.workers.clear()
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
            with contextlib.suppress(OSError):
                os.close(fd)
        self._callbacks.clear()
        if self._exit_code:
            log.critical("dispatch primary %d stopped with exit code %d", os.getpid(), self._exit_code)
        else:
            log.info("dispatch primary %d stopped", os.getpid())


def _describe_exit(status: int) -> str:
    if os.WIFSIGNALED(status):
        signum = os.WTERMSIG(status)
        try:
            name = signal.Signals(signum).name
        except ValueError:
            name = str(signum)
        return f"was killed by signal {signum} ({name})"
    return f"exited with code {os.waitstatus_to_exitcode(status)}"


def _client_host(fd: int) -> str | None:
    sock = socket.socket(fileno=fd)
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

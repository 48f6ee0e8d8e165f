"""The primary: starts everything, then reacts to events by driving the pieces.

One thread, one epoll loop (``Reactor``). Registered in it: the listeners
(user-space modes, handled by the ``Dispatcher``), each worker's control
channel and pidfd (readable when it exits: no SIGCHLD races), the wakeup pipe
for signals and control calls, and the health server's sockets. Which workers
should exist is decided by the pure ``Supervisor``; this module carries out its
actions and feeds it what happened.
"""

from __future__ import annotations

import logging
import os
import resource
import socket
import time
from typing import Any

from dispatch import control, protocol, supervisor
from dispatch.balance import make_policy
from dispatch.config import Config
from dispatch.counters import Counters
from dispatch.dispatcher import Dispatcher
from dispatch.lifecycle import IllegalTransition
from dispatch.listeners import bind, bound_name, remove_unix_path
from dispatch.pidfile import Pidfile
from dispatch.processes import WorkerHandle, describe_exit, fork_worker, kill, reap
from dispatch.reactor import ERR, IN, OUT, FailureLog, Reactor
from dispatch.systemd import Notifier, listen_sockets

log = logging.getLogger("dispatch")

_TICK = 0.1  # seconds between supervisor ticks
# Messages read from one channel per wakeup: a worker flooding its channel must not
# starve the listeners and the other workers.
_MESSAGES_PER_PASS = 64


class BootError(RuntimeError):
    """Workers kept failing to boot and none ever became ready."""

    exit_code = supervisor.EXIT_BOOT_FAILURE


class Server:
    """A dispatch server as an object: ``start()``, ``serve_forever()``, ``stop()``.

    ``serve()`` is this with signal handlers installed. Embedders may call
    ``start()`` to bind (``addresses`` then lists what was bound, port 0
    resolved) and fork the workers, and ``serve_forever()`` to run the loop
    until ``stop()``, a signal, or a boot failure; it returns the exit code.
    """

    def __init__(self, handler: Any, **options: Any) -> None:
        self.config = Config(handler, **options)
        self.supervisor = self._new_supervisor()
        self.listeners: list[socket.socket] = []
        self.workers: dict[int, WorkerHandle] = {}  # by pid
        self.started_at = time.time()
        self.counters = Counters()
        self.health: Any = None
        self._failures = FailureLog(log)
        self._reactor: Reactor | None = None
        self._dispatcher: Dispatcher | None = None
        self._early_requests: list[control.Request] = []  # made before start()
        self._running = False
        self._exit_code = 0
        self._last_pid: dict[int, int] = {}
        self._stop_requested = 0
        self._pidfile: Pidfile | None = None
        self._notifier = Notifier()
        self._announced_ready = False
        self._announced_reloading = False

    # ================================================================ what others read
    @property
    def addresses(self) -> list[str]:
        """The addresses actually bound, in the order given."""
        return [bound_name(sock) for sock in self.listeners]

    @property
    def restarts_by_cause(self) -> dict[str, int]:
        """Workers replaced so far, by cause (exit, signal, timeout, recycle, spawn)."""
        return self.supervisor.restarts_by_cause

    @property
    def dispatched_total(self) -> int:
        """Connections passed to workers (one taken back from a dead worker counts once)."""
        return self._dispatcher.dispatched_total if self._dispatcher else 0

    @property
    def accepting(self) -> bool:
        """True while the primary accepts new connections (user-space modes)."""
        return self._dispatcher.accepting if self._dispatcher else False

    @property
    def pending_count(self) -> int:
        """Connections accepted (or taken back) and not yet passed to a worker."""
        return len(self._dispatcher.pending) if self._dispatcher else 0

    @property
    def in_flight(self) -> int:
        """Connections passed to workers and not yet reported done."""
        return self._dispatcher.outstanding if self._dispatcher else 0

    # ================================================================ setup
    def start(self, install_signal_handlers: bool = False) -> None:
        """Bind every address, then fork the workers.

        All or nothing: if anything fails (an address cannot be bound, raising
        ``BindError``; the pidfile; ``preload`` or the ``on_starting`` hook
        raising), everything done so far is undone and the error propagates, so
        ``start()`` may be called again. ``install_signal_handlers`` needs the
        main thread.
        """
        if self._reactor is not None:
            raise RuntimeError("server already started")
        try:
            self._start(install_signal_handlers)
        except BaseException:
            self._release()
            self._reactor = None
            self._dispatcher = None
            self.listeners = []
            self.health = None
            self._pidfile = None
            self.supervisor = self._new_supervisor()
            raise

    def _start(self, install_signal_handlers: bool) -> None:
        fd_limit_level, fd_limit_note = raise_fd_limit()
        self._bind()
        self._reactor = reactor = Reactor(self._failures)
        reactor.on_requests(self._on_requests)
        if install_signal_handlers:
            self.install_signal_handlers()
        if self.config.user_space:
            balance = self.config.balance
            policy = make_policy(balance) if isinstance(balance, str) else balance
            self._dispatcher = Dispatcher(policy, self.workers, reactor, self.counters, self._failures,
                                          self.config.accept_batch, self.config.backlog)
            for sock in self.listeners:
                self._dispatcher.add_listener(sock)
            self._dispatcher.update_budget(self._fd_reserve())
        if self.health is not None:
            self.health.attach(reactor.register, reactor.unregister)
        if self.config.preload:
            from dispatch.worker import load_handler

            self.config = _replace_handler(self.config, load_handler(self.config.handler))
        log.info("dispatch primary %d listening on %s (balance=%s, workers=%d)", os.getpid(),
                 ",".join(self.addresses), self._balance_name(), self.config.workers)
        log.log(fd_limit_level, fd_limit_note)  # after binding: a bind error stays one line
        _set_process_title("dispatch: primary")
        if self.config.on_starting is not None:
            self.config.on_starting(self)
        for request in self._early_requests:
            reactor.request(request)
        self._early_requests.clear()
        self._apply(self.supervisor.start(time.monotonic()))

    def _bind(self) -> None:
        """The listeners (or systemd's), the health endpoint and the pidfile."""
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

    def _new_supervisor(self) -> supervisor.Supervisor:
        return supervisor.Supervisor(
            workers=self.config.workers,
            timeout=self.config.timeout,
            boot_timeout=self.config.boot_timeout,
            graceful_timeout=self.config.graceful_timeout,
            restart_batch=self.config.restart_batch,
            # Only the user-space modes can pass a silent worker over.
            stall_after=self.config.stall_after if self.config.user_space else None,
            max_requests=self.config.max_requests,
            max_requests_jitter=self.config.max_requests_jitter,
            max_memory=self.config.max_memory,
        )

    def _balance_name(self) -> str:
        balance = self.config.balance
        return balance if isinstance(balance, str) else type(balance).__name__

    # ================================================================ control
    def stop(self, graceful: bool = True) -> None:
        """Ask the loop to stop; safe from a signal handler or another thread."""
        self._request(control.Stop(graceful))

    def reload(self) -> None:
        """Ask for a rolling restart of every worker."""
        self._request(control.Reload())

    def scale(self, delta: int) -> None:
        """Ask for ``delta`` more (or, negative, fewer) workers; never below one."""
        if isinstance(delta, bool) or not isinstance(delta, int):
            raise TypeError(f"scale() needs an int, not {type(delta).__name__}")
        if delta:
            self._request(control.Scale(delta))

    def _request(self, request: control.Request) -> None:
        if self._reactor is None:
            self._early_requests.append(request)
        else:
            self._reactor.request(request)

    def install_signal_handlers(self) -> None:
        """The signals operators know: TERM/INT stop, QUIT fast, HUP/USR2 reload, TTIN/TTOU scale."""
        if self._reactor is None:
            raise RuntimeError("install_signal_handlers() needs a started server")
        self._reactor.install_signal_handlers(control.SIGNALS)

    def _on_requests(self, requests: list[object]) -> None:
        now = time.monotonic()
        for request in requests:
            if isinstance(request, control.Stop):
                self._stop_requested += 1
                if not request.graceful:
                    log.info("fast shutdown")
                    self._shutdown(now, graceful=False)
                elif self._stop_requested > 1:
                    log.warning("second stop request: stopping now")
                    self._shutdown(now, graceful=False)
                else:
                    log.info("graceful shutdown: no new connections, waiting up to %gs for in-flight ones",
                             self.config.graceful_timeout)
                    self._shutdown(now, graceful=True)
            elif isinstance(request, control.Reload):
                self._run_hook("on_reload", self)
                if not self.supervisor.restarting:
                    self._notifier.reloading()
                    self._announced_reloading = True
                self._apply(self.supervisor.reload(now))
            elif isinstance(request, control.Scale):
                self._apply(self.supervisor.scale(request.delta, now))

    def _shutdown(self, now: float, graceful: bool) -> None:
        self._notifier.notify(STOPPING=1)
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.stop_accepting()
            if dispatcher.pending and dispatcher.targets:
                dispatcher.dispatch_pending()  # before Drain, so workers read them first
            closed = dispatcher.close_pending()
            if closed:
                log.warning("closing %d accepted connections no worker could take", closed)
        self._close_listeners()
        self._apply(self.supervisor.shutdown(now, graceful))

    # ================================================================ loop
    def serve_forever(self) -> int:
        """Run until stopped; returns the exit code (0, or 3 after boot failures)."""
        if self._reactor is None:
            self.start()
        assert self._reactor is not None
        self._running = True
        poll = self._reactor.poll
        next_tick = time.monotonic() + _TICK
        try:
            while self._running:
                poll(_TICK)
                now = time.monotonic()
                if now >= next_tick:
                    next_tick = now + _TICK
                    self._tick(now)
        finally:
            self._cleanup()
        return self._exit_code

    def _tick(self, now: float) -> None:
        """The periodic work; each step survives the failure of another."""
        for step in (self._supervise, self._recycle_over_limit, self._announce,
                     self._tick_health, self._tick_dispatcher):
            try:
                step(now)
            except Exception:
                self.counters.tick_errors += 1
                self._failures.error(step.__name__, "periodic task %s failed", step.__name__)

    def _supervise(self, now: float) -> None:
        self._apply(self.supervisor.tick(now))

    def _announce(self, now: float) -> None:
        if self._announced_reloading and not self.supervisor.restarting:
            self._announced_reloading = False
            self._notify_ready()

    def _tick_health(self, now: float) -> None:
        if self.health is not None:
            self.health.tick(now)

    def _tick_dispatcher(self, now: float) -> None:
        if self._dispatcher is not None:
            self._dispatcher.tick(now, self._fd_reserve())

    def _fd_reserve(self) -> int:
        """Descriptors kept free for others than connections: health clients."""
        return self.health.max_clients if self.health is not None else 0

    def _recycle_over_limit(self, now: float) -> None:
        # On the tick, not while dispatching: a fork there would copy the batch in hand.
        if self._dispatcher is None or not self._dispatcher.over_limit:
            return
        over, self._dispatcher.over_limit = self._dispatcher.over_limit, []
        for worker in over:
            self._apply(self.supervisor.passed(worker.pid, worker.sent, now))

    # ================================================================ workers
    def _spawn(self, worker_id: int, replaces: int | None) -> None:
        """Carry out a ``Spawn``; a fork that fails is a failed boot, never a crash."""
        assert self._reactor is not None
        listeners = [] if self.config.user_space else self.listeners
        try:
            worker = fork_worker(self.config, worker_id, self._inherited_fds(), listeners)
        except OSError as exc:
            self.counters.spawn_errors += 1
            log.error("worker %d: cannot start a process: %s", worker_id, exc)
            self._apply(self.supervisor.spawn_failed(worker_id, replaces, time.monotonic(), str(exc)))
            return
        self.workers[worker.pid] = worker
        self._reactor.register(worker.fd, IN, lambda events, w=worker: self._on_channel(w, events))
        self._reactor.register(worker.pidfd, IN, lambda events, w=worker: self._on_exit(w))
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
        assert self._reactor is not None
        fds = self._reactor.fds()
        for w in self.workers.values():
            fds += [w.fd, w.worker_end.fileno(), w.pidfd]
        if self._dispatcher is not None:
            fds += [s.fileno() for s in self.listeners]
            fds += self._dispatcher.pending
        if self.health is not None:
            fds += self.health.fds()
        fds += self._notifier.fds()
        return fds

    def _on_channel(self, worker: WorkerHandle, events: int) -> None:
        if events & OUT:
            self._channel_writable(worker)
        if not events & (IN | ERR):
            return
        now = time.monotonic()
        for _ in range(_MESSAGES_PER_PASS):  # the rest waits for the next pass (level-triggered)
            if self.workers.get(worker.pid) is not worker:
                return  # replaced or gone while handling a message
            try:
                data = worker.channel.recv(64)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            if not data:
                return
            try:
                message = protocol.decode_from(data, protocol.TO_PRIMARY)
            except protocol.ProtocolError as exc:
                self._channel_broken(worker, f"it broke the protocol ({exc})")
                return
            self._on_message(worker, message, now)

    def _on_message(self, worker: WorkerHandle, message: protocol.Message, now: float) -> None:
        if isinstance(message, protocol.Done):
            self._apply(self.supervisor.heard_from(worker.pid, now))
            if self._dispatcher is not None:
                self._dispatcher.on_done(worker, message.count)
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
        if self._dispatcher is not None:
            self._dispatcher.channel_broken(worker, why)
        else:
            log.error("worker %d (pid %d): %s; replacing it", worker.worker_id, worker.pid, why)
            assert self._reactor is not None
            self._reactor.unregister(worker.fd)
            kill(worker.pid)

    def _on_ready(self) -> None:
        ready = sum(1 for w in self.workers.values() if w.state == supervisor.READY)
        if not self._announced_ready and ready >= self.config.workers:
            self._announced_ready = True
            self._notify_ready()
        if self._dispatcher is not None:
            self._dispatcher.rebuild_targets()
            if self._dispatcher.pending:
                self._dispatcher.dispatch_pending()

    def _channel_writable(self, worker: WorkerHandle) -> None:
        if worker.drain_unsent:
            assert self._reactor is not None
            self._reactor.modify(worker.fd, IN)
            worker.full = False
            self._send_drain(worker)
        elif self._dispatcher is not None:
            self._dispatcher.channel_writable(worker)

    def _on_exit(self, worker: WorkerHandle) -> None:
        status = reap(worker.pid)
        if status is None:
            return  # not reapable yet; the pidfd stays readable and we come back
        assert self._reactor is not None
        how = describe_exit(status)
        self._reactor.unregister(worker.pidfd)
        self._reactor.unregister(worker.fd)
        del self.workers[worker.pid]
        salvaged = self._dispatcher.worker_exited(worker) if self._dispatcher is not None else 0
        worker.close()
        expected = self.supervisor.expected_exit(worker.pid, status == 0)
        level = logging.INFO if expected else logging.WARNING
        extra = f"; {salvaged} connections it had not read go to other workers" if salvaged else ""
        log.log(level, "worker %d (pid %d) %s%s", worker.worker_id, worker.pid, how, extra)
        self._run_hook("on_worker_exit", worker.worker_id, worker.pid, how)
        self._apply(self.supervisor.exited(worker.pid, time.monotonic(), how, os.WIFSIGNALED(status)))
        if self._dispatcher is not None and self._dispatcher.pending:
            self._dispatcher.dispatch_pending()

    # ================================================================ actions
    def _apply(self, actions: list[supervisor.Action]) -> None:
        for action in actions:
            if isinstance(action, supervisor.Spawn):
                if not self.supervisor.stopping:  # a failed spawn before it may have given up
                    self._spawn(action.worker_id, action.replaces)
            elif isinstance(action, supervisor.Drain):
                worker = self.workers.get(action.pid)
                if worker is not None:
                    if self._dispatcher is not None:
                        self._dispatcher.rebuild_targets()  # stop sending before asking it to drain
                    self._send_drain(worker)
            elif isinstance(action, supervisor.Kill):
                kill(action.pid)
            elif isinstance(action, supervisor.Stall | supervisor.Resume):
                self._stall_or_resume(action)
            elif isinstance(action, supervisor.Log):
                log.log(action.level, action.message)
            elif isinstance(action, supervisor.Stop):
                self._running = False
                self._exit_code = action.code

    def _stall_or_resume(self, action: supervisor.Stall | supervisor.Resume) -> None:
        """A worker silent for ``stall_after`` gets no new connections, and the ones waiting
        unread in its channel go to the others, long before ``timeout`` kills it. Its
        channel is a SEQPACKET socket: each message, with its descriptors, is read whole by
        one side or the other, so nothing is served twice. When it speaks, it is back."""
        worker = self.workers.get(action.pid)
        if worker is None or self._dispatcher is None:
            return
        if isinstance(action, supervisor.Stall):
            self.counters.stalls += 1
            taken = self._dispatcher.worker_stalled(worker)
            log.warning("worker %d (pid %d) silent for %.1fs: no new connections until it speaks "
                        "again; %d connections it had not read go to other workers",
                        worker.worker_id, worker.pid, action.silent, taken)
        else:
            log.info("worker %d (pid %d) speaks again; passing it connections again",
                     worker.worker_id, worker.pid)
            self._dispatcher.rebuild_targets()
        if self._dispatcher.pending:
            self._dispatcher.dispatch_pending()

    def _send_drain(self, worker: WorkerHandle) -> None:
        try:
            worker.channel.send(protocol.encode(protocol.Drain()))
            worker.drain_unsent = False
        except BlockingIOError:
            worker.drain_unsent = True  # sent when the channel has room
            assert self._reactor is not None
            self._reactor.modify(worker.fd, IN | OUT)
        except OSError as exc:
            log.warning("worker %d (pid %d): cannot send drain: %s", worker.worker_id, worker.pid, exc)
            kill(worker.pid)

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
            kill(worker.pid)
        for worker in list(self.workers.values()):
            try:
                os.waitpid(worker.pid, 0)
            except ChildProcessError:
                pass
            worker.close()
        self.workers.clear()
        if self._dispatcher is not None:
            self._dispatcher.close_pending()
            self._dispatcher.targets = []
        self._close_listeners()
        if self.health is not None:
            self.health.close()
        if self._pidfile is not None:
            self._pidfile.remove()
        self._notifier.close()
        if self._reactor is not None:
            self._reactor.close()


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


def _set_process_title(title: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)


def _replace_handler(config: Config, handler: Any) -> Config:
    import dataclasses

    return dataclasses.replace(config, handler=handler, preload=False)


__all__ = ["BootError", "Server", "WorkerHandle", "raise_fd_limit"]

"""The primary: starts everything, then reacts to events by driving the pieces.

One thread, one epoll loop (``Reactor``). The pieces it drives:

- ``Endpoints``: listeners, the health endpoint, the pidfile;
- ``Dispatcher``: the hot path, accepting and passing connections (user-space modes);
- ``Fleet``: the worker processes, their channels and exits;
- ``Supervisor``: the pure state machine deciding which workers should exist;
- ``Commands`` (the control socket's) and ``Upgrader``/``Successor`` (upgrading the primary).

This module starts them, turns control requests (signals, ``stop()``,
``reload()``, ``scale()``) into supervisor calls, runs the periodic work, and
carries out the supervisor's actions.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import TYPE_CHECKING, Any

from dispatch import control, scheduling, supervisor
from dispatch.balance import ConnectionPolicy
from dispatch.commands import Commands, Status
from dispatch.config import Config, Handler
from dispatch.counters import Counters
from dispatch.dispatcher import Dispatcher
from dispatch.drain import DrainState
from dispatch.endpoints import Endpoints
from dispatch.fleet import Fleet
from dispatch.limits import raise_fd_limit
from dispatch.load import LoadMeter
from dispatch.logs import FailureLog
from dispatch.options import Options
from dispatch.processes import WorkerHandle, kill
from dispatch.pull import PullDispatcher
from dispatch.reactor import Reactor
from dispatch.systemd import Notifier, Readiness
from dispatch.upgrade import Successor, Upgrader

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from dispatch.agent import Status as AgentStatus

log = logging.getLogger("dispatch")

_TICK = 0.1  # seconds between supervisor ticks


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

    def __init__(self, handler: Handler, **options: Unpack[Options]) -> None:
        self.config = Config(handler, **options)
        self.supervisor = self._new_supervisor()
        self.workers: dict[int, WorkerHandle] = {}  # by pid
        self.started_at = time.time()
        self.counters = Counters()
        self._endpoints = Endpoints()
        self._failures = FailureLog(log)
        self._reactor: Reactor | None = None
        self._dispatcher: Dispatcher | None = None
        self._fleet: Fleet | None = None
        self._early_requests: list[control.Request] = []  # made before start()
        self._running = False
        self._exit_code = 0
        self._stop_requested = 0
        self._notifier = Notifier()
        self._readiness = Readiness(self._notifier, self._balance_name())
        self._drain = DrainState()
        self._load = LoadMeter()
        self._commands = Commands(self)
        self._successor: Successor | None = None  # set when an upgrade started us
        self._upgrader: Upgrader | None = None

    # ================================================================ what others read
    @property
    def listeners(self) -> list[Any]:
        return self._endpoints.listeners

    @property
    def health(self) -> Any:
        """The ``HealthServer`` (``health.address``), or None without ``health=``."""
        return self._endpoints.health

    @property
    def addresses(self) -> list[str]:
        """The addresses actually bound, in the order given (port 0 resolved)."""
        return self._endpoints.addresses

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
        """True while new connections are taken off the listeners: by the primary in the
        user-space modes, by the workers themselves in the kernel modes (until shutdown)."""
        if self._dispatcher is not None:
            return self._dispatcher.accepting
        return self._reactor is not None and not self.supervisor.stopping

    @property
    def pending_count(self) -> int:
        """Connections accepted (or taken back) and not yet passed to a worker."""
        return len(self._dispatcher.pending) if self._dispatcher else 0

    @property
    def in_flight(self) -> int:
        """Connections passed to workers and not yet reported done (pull: waiting in the queue)."""
        return self._dispatcher.in_flight() if self._dispatcher else 0

    @property
    def draining_reason(self) -> str | None:
        """Why ``/readyz`` says 503 while serving on: ``drain_delay`` or maintenance."""
        return self._drain.reason

    @property
    def load(self) -> float | None:
        """The ready workers' mean load, 0 to 1 (``dispatch.load``); None when none is ready."""
        return self._load.load(self.workers)

    def agent_status(self) -> AgentStatus:
        """What the agent-check port reports (``dispatch.agent.Status``)."""
        from dispatch.agent import Status as AgentStatus

        return AgentStatus(self.supervisor.stopping or self._drain.delaying, self._drain.maintenance, self.load)

    @property
    def upgrading(self) -> bool:
        """A new primary was started by an upgrade and is not ready yet."""
        return self._upgrader is not None and self._upgrader.in_progress

    @property
    def control_path(self) -> str | None:
        """The control socket's path, or None without one."""
        return self._endpoints.control.path if self._endpoints.control is not None else None

    def status(self) -> Status:
        """What ``dispatch ctl status`` shows: ``/cluster-health``'s document and
        ``workers_wanted``, ``restarting``, ``last_reload``, ``stopping``, ``upgrading``."""
        return self._commands.status()

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
            self._reactor = self._dispatcher = self._fleet = None
            self._endpoints = Endpoints()
            self.supervisor = self._new_supervisor()
            raise

    def _start(self, install_signal_handlers: bool) -> None:
        fd_limit_level, fd_limit_note = raise_fd_limit()
        self._successor = Successor.from_environment()
        self._endpoints.open(self.config, self, self._commands.handle, self._successor)
        self._reactor = reactor = Reactor(self._failures)
        reactor.on_requests(self._on_requests)
        if install_signal_handlers:
            reactor.install_signal_handlers(control.SIGNALS)
        self._fleet = Fleet(self.config, self.supervisor, reactor, self.workers, self.counters,
                            self._apply, self._inherited_fds, self.listeners, self._on_ready,
                            lambda *args: self._run_hook("on_worker_exit", *args))
        if self.config.policy is not None:  # a user-space mode
            kind = PullDispatcher if self.config.pulls else Dispatcher
            self._dispatcher = kind(self.config.policy, self.workers, reactor, self.counters, self._failures,
                                          self.config.accept_batch, self.config.backlog,
                                          self.config.skip_busy,
                                          self.config.reclaim_after if self.config.skip_busy else 0.0,
                                          self.config.one_per_message_below)
            self._fleet.dispatcher = self._dispatcher
            reactor.set_poller(self._fleet.poll)  # the listeners and Done messages are read in C
            if self._successor is None:  # a successor accepts once it has told the old primary
                for sock in self.listeners:
                    self._dispatcher.add_listener(sock)
            self._dispatcher.update_budget(self._fd_reserve())
        if self._successor is None:  # a successor serves them once it has told the old primary
            self._attach_servers()
        # The new primary imports, binds nothing and boots its workers in this time.
        self._upgrader = Upgrader(reactor.register, reactor.unregister, self.config.boot_timeout + 10,
                                  self._upgrade_ready, self._upgrade_failed)
        if self.config.preload:
            from dispatch.handlers import load_handler

            handler = load_handler(self.config.handler)
            self.config = dataclasses.replace(self.config, handler=handler, preload=False)
            self._fleet.config = self.config
        log.info("dispatch primary %d listening on %s (balance=%s, workers=%d)", os.getpid(),
                 ",".join(self.addresses), self._balance_name(), self.config.workers)
        log.log(fd_limit_level, fd_limit_note)  # after binding: a bind error stays one line
        if self.config.proxy_protocol != "off" and isinstance(self.config.policy, ConnectionPolicy):
            log.warning("balance=%s picks workers by the address the primary sees, the proxy's: "
                        "with proxy_protocol every connection of one proxy goes to one worker",
                        self._balance_name())
        _set_process_title("dispatch: primary")
        if self.config.on_starting is not None:
            self.config.on_starting(self)
        for request in self._early_requests:
            reactor.request(request)
        self._early_requests.clear()
        self._apply(self.supervisor.start(time.monotonic()))

    def _attach_servers(self) -> None:
        """Serve health, probe, agent and control requests from our loop."""
        assert self._reactor is not None
        for side in self._endpoints.servers():
            side.attach(self._reactor.register, self._reactor.unregister)

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

    def _inherited_fds(self) -> list[int]:
        """The primary's own descriptors a new worker closes at once."""
        assert self._reactor is not None
        fds = self._reactor.fds() + self._endpoints.fds() + self._notifier.fds()
        fds += self._upgrader.fds() if self._upgrader is not None else []
        fds += self._successor.fds() if self._successor is not None else []
        if self.config.user_space:
            fds += [s.fileno() for s in self.listeners]
        if self._dispatcher is not None:
            fds += self._dispatcher.own_fds()
        return fds

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

    def drain(self) -> None:
        """Say "not ready" (``/readyz`` 503, agent ``drain``) and serve on; ``undrain()`` ends it."""
        self._request(control.Maintenance(True))

    def undrain(self) -> None:
        """End ``drain()``: ready again."""
        self._request(control.Maintenance(False))

    def upgrade(self) -> None:
        """Start a new primary from the same command line and hand it the sockets once it
        is ready (``SIGUSR1``, ``dispatch ctl upgrade``); if it fails, this one serves on."""
        self._request(control.Upgrade())

    def control_now(self, request: control.Request) -> None:
        """Carry out ``request`` at once; only from the loop (the control socket's commands)."""
        self._on_requests([request])

    def _request(self, request: control.Request) -> None:
        if self._reactor is None:
            self._early_requests.append(request)
        else:
            self._reactor.request(request)

    def install_signal_handlers(self) -> None:
        """The signals operators know: TERM/INT stop, QUIT fast, HUP/USR2 reload, TTIN/TTOU scale,
        USR1 drain or undrain."""
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
                elif not self._drain.delay_stop(now, self.config.drain_delay):
                    log.info("graceful shutdown: not ready from now on; serving for %gs more, then draining",
                             self.config.drain_delay)
                else:
                    log.info("graceful shutdown: no new connections, waiting up to %gs for in-flight ones",
                             self.config.graceful_timeout)
                    self._shutdown(now, graceful=True)
            elif isinstance(request, control.Reload):
                self._run_hook("on_reload", self)
                if not self.supervisor.restarting:
                    self._readiness.reload_started()
                self._apply(self.supervisor.reload(now))
            elif isinstance(request, control.Scale):
                self._apply(self.supervisor.scale(request.delta, now))
            elif isinstance(request, control.Maintenance):
                if request.on is None and control.resized_terminal():
                    log.info("SIGWINCH ignored: in a terminal's foreground it is a resize, not a drain "
                             "request (use dispatch ctl drain, or run in the background)")
                    continue
                on = self._drain.set_maintenance(request.on)
                log.info("%s", "drained: /readyz says 503, serving on" if on else "undrained: ready again")
            elif isinstance(request, control.Upgrade):
                why = self.start_upgrade()
                if why:
                    log.warning("upgrade refused: %s", why)

    # ================================================================ upgrade
    def start_upgrade(self) -> str:
        """Start a new primary (see ``dispatch.upgrade``); why not, or "" when started or
        already in progress (its outcome is logged and told to ``ctl upgrade``)."""
        if self._upgrader is None:
            return "the server is not started"
        if self.supervisor.stopping:
            return "the primary is shutting down"
        if self._upgrader.in_progress:
            return ""
        if self.config.balance == "reuseport":
            return "balance=reuseport: the workers' own listeners cannot be handed over; restart instead"
        if self._successor is not None and not self._successor.reported:
            return "this primary is still taking over from the previous one"
        health = self.health.listener if self.health is not None else None
        ctl = self._endpoints.control.listener if self._endpoints.control is not None else None
        try:
            self._upgrader.start(self.listeners, health, ctl, **self._endpoints.side_listeners())
        except OSError as exc:
            return f"cannot start a new primary: {exc}"
        return ""

    def _upgrade_ready(self, new_pid: int) -> None:
        log.info("upgrade: new primary %d serves; this one stops accepting and drains", new_pid)
        self._notifier.notify(MAINPID=new_pid)
        self._commands.upgrade_done(os.getpid(), new_pid)
        self._endpoints.handed_over()
        self._stop_requested += 1
        self._shutdown(time.monotonic(), graceful=True, notify=False)

    def _upgrade_failed(self, why: str) -> None:
        log.error("upgrade failed: %s; this primary keeps serving", why)
        if self._endpoints.pidfile is not None:
            try:
                self._endpoints.pidfile.claim()  # the new primary wrote its pid there
            except Exception as exc:
                log.error("%s", exc)
        self._commands.upgrade_failed(why, self._upgrader.failed_pid if self._upgrader else 0)

    def _shutdown(self, now: float, graceful: bool, notify: bool = True) -> None:
        if notify:  # not after an upgrade: the service goes on, in the new primary
            self._notifier.notify(STOPPING=1)
        if self._upgrader is not None and self._upgrader.in_progress:
            # Asked to stop mid-upgrade: the half-started new primary goes too.
            pid = self._upgrader.pid
            self._upgrader.abandon()
            self._commands.upgrade_failed(f"this primary was asked to stop; stopped new primary {pid}", pid)
        dispatcher = self._dispatcher
        if dispatcher is not None:
            dispatcher.stop_accepting()
            if dispatcher.pending and dispatcher.targets:
                dispatcher.dispatch_pending()  # before Drain, so workers read them first
            closed = dispatcher.close_pending()
            if closed:
                log.warning("closing %d accepted connections no worker could take", closed)
            dispatcher.seal()
        self._endpoints.close_listeners()
        self._apply(self.supervisor.shutdown(now, graceful))

    # ================================================================ loop
    def serve_forever(self) -> int:
        """Run until stopped; returns the exit code (0, or 3 after boot failures)."""
        if self._reactor is None:
            self.start()
        assert self._reactor is not None
        self._running = True
        poll = self._reactor.poll
        monotonic = time.monotonic
        now = monotonic()
        next_tick = now + _TICK
        previous = scheduling.run_realtime(self.config.primary_realtime)  # this thread only
        try:
            # The hot loop: one clock read per pass. It wakes for the tick, or sooner when
            # the dispatcher wants to look at unread channels (reclaim_after).
            while self._running:
                dispatcher = self._dispatcher
                due = dispatcher.reclaim_due if dispatcher is not None else 0.0
                wake = due if due and due < next_tick else next_tick
                if dispatcher is not None:
                    dispatcher.tick_due = next_tick  # its fast path watches reclaim itself till then
                poll(wake - now if wake > now else 0.0)
                now = monotonic()
                if due and now >= due:
                    self._reclaim(now)
                if now >= next_tick:
                    next_tick = now + _TICK
                    self._tick(now)
        finally:
            scheduling.restore(previous)
            self._release()
            if self._exit_code:
                log.critical("dispatch primary %d stopped with exit code %d", os.getpid(), self._exit_code)
            else:
                log.info("dispatch primary %d stopped", os.getpid())
        return self._exit_code

    def _reclaim(self, now: float) -> None:
        dispatcher = self._dispatcher
        if dispatcher is None or not dispatcher.reclaim_due or now < dispatcher.reclaim_due:
            return  # re-armed later (or cleared) by what ran during the poll
        try:
            dispatcher.reclaim(now)
        except Exception:
            dispatcher.forget_unread()
            self._failures.error("reclaim", "taking back unread connections failed", exc_info=True)

    def _tick(self, now: float) -> None:
        """The periodic work; each step survives the failure of another."""
        for step in (self._supervise, self._recycle_over_limit, self._tick_endpoints, self._drain_delay_over):
            try:
                step(now)
            except Exception:
                self.counters.tick_errors += 1
                self._failures.error(step.__name__, "periodic task %s failed", step.__name__, exc_info=True)

    def _supervise(self, now: float) -> None:
        self._apply(self.supervisor.tick(now))
        self._readiness.tick(self.supervisor.restarting, self._ready_count())

    def _recycle_over_limit(self, now: float) -> None:
        # On the tick, not while dispatching: a fork there would copy the batch in hand.
        if self._dispatcher is not None and self._dispatcher.over_limit:
            over, self._dispatcher.over_limit = self._dispatcher.over_limit, []
            for worker in over:
                self._apply(self.supervisor.passed(worker.pid, worker.sent, now))

    def _drain_delay_over(self, now: float) -> None:
        if self._drain.due(now) and not self.supervisor.stopping:
            log.info("drain delay over: no new connections, waiting up to %gs for in-flight ones",
                     self.config.graceful_timeout)
            self._shutdown(now, graceful=True)

    def _tick_endpoints(self, now: float) -> None:
        for side in self._endpoints.servers():
            side.tick(now)
        if self._endpoints.agent is not None:
            self._load.sample(self.workers.values(), now)
        self._commands.tick(now)
        if self._upgrader is not None:
            self._upgrader.tick(now)
        if self._dispatcher is not None:
            self._dispatcher.tick(now, self._fd_reserve())

    def _fd_reserve(self) -> int:
        """Descriptors kept free for others than connections: health, probe and control
        clients, and an upgrade's pipe and pidfd."""
        control = self._endpoints.control
        return (sum(s.max_clients for s in (self.health, self._endpoints.probe) if s is not None)
                + (control.max_clients + 2 if control is not None else 0))

    # ================================================================ readiness
    def _on_ready(self) -> None:
        self._readiness.workers_ready(self._ready_count(), self.config.workers)
        successor = self._successor
        if successor is not None and not successor.reported and self._ready_count() >= self.config.workers:
            # Not before: a new primary that fails, or is killed, must not take a connection with
            # it, nor answer a probe (/readyz would say 503) or an operator (ctl stop) meant for
            # the primary that serves.
            if self._dispatcher is not None:
                for sock in self.listeners:
                    self._dispatcher.add_listener(sock)
            self._attach_servers()
            successor.report_ready()
            self._endpoints.taken_over()
        if self._dispatcher is not None:
            self._dispatcher.rebuild_targets()
            if self._dispatcher.pending:
                self._dispatcher.dispatch_pending()

    def _ready_count(self) -> int:
        return sum(1 for w in self.workers.values() if w.state == supervisor.READY)

    # ================================================================ actions
    def _apply(self, actions: list[supervisor.Action]) -> None:
        fleet = self._fleet
        for action in actions:
            if isinstance(action, supervisor.Spawn):
                if fleet is not None and not self.supervisor.stopping:  # a failed spawn may have given up
                    fleet.spawn(action.worker_id, action.replaces)
            elif isinstance(action, supervisor.Drain):
                if fleet is not None:
                    fleet.drain(action.pid)
            elif isinstance(action, supervisor.Kill):
                kill(action.pid)
            elif isinstance(action, supervisor.Stall | supervisor.Resume):
                if fleet is not None:
                    fleet.stall_or_resume(action)
            elif isinstance(action, supervisor.Log):
                log.log(action.level, action.message)
            elif isinstance(action, supervisor.Stop):
                self._running = False
                self._exit_code = action.code

    def _run_hook(self, name: str, *args: Any) -> None:
        """A failing hook is logged; it never takes the primary down."""
        hook = getattr(self.config, name)
        if hook is not None:
            try:
                hook(*args)
            except Exception:
                log.exception("%s hook failed", name)

    # ================================================================ teardown
    def _release(self) -> None:
        """Kill and reap every worker, close everything we opened, restore the signals."""
        if self._upgrader is not None:
            self._upgrader.abandon()
        if self._successor is not None:
            self._successor.close()
        if self._fleet is not None:
            self._fleet.release()
        if self._dispatcher is not None:
            closed = self._dispatcher.release()
            if closed:
                log.warning("closed %d accepted connections that no worker took before it stopped", closed)
            self._dispatcher.targets = []
        self._endpoints.close()
        self._notifier.close()
        if self._reactor is not None:
            self._reactor.close()


def _set_process_title(title: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)

"""The worker's event loop: take connections, run the handler, report on the channel.

A worker is forked by the primary (``dispatch.worker_boot.worker_main``) and
runs one asyncio loop with three parts, each decided once when it boots:

- a *source* of connections (``dispatch.sources``): descriptors on its control
  channel (user-space balancing) or a listener it accepts on itself (kernel
  balancing);
- a *runner* for the handler (``dispatch.runners``, chosen by
  ``dispatch.handlers.runner_for``): threads, coroutine streams, a protocol, or
  a web app (whose lifespan startup runs before ``Ready``, and shutdown after
  the last connection of a graceful stop);
- this class, which ties them together: it sizes its capacity to its
  descriptor table and advertises it in ``Ready``, resumes the source when a
  connection finishes, reports finished connections (``Done``, the primary's
  credits) once per loop pass, heartbeats, and drains.

In user-space modes the source pauses while the runner has no room, so
connections the worker could not start yet stay in the channel. The primary
keeps its own reference to the worker's end of the channel, and takes back
whatever is still unread there if the worker dies.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from typing import Any

import psutil

from dispatch import _fdpass, loops, protocol, proxy_gate
from dispatch.config import Config
from dispatch.handlers import runner_for
from dispatch.interfaces import interface_of
from dispatch.limits import descriptors_free
from dispatch.logs import FailureLog
from dispatch.runners import Runner, StartupFailed
from dispatch.sources import ChannelSource, ListenerSource, Source

log = logging.getLogger("dispatch.worker")

#: Exit codes a worker uses, so the primary's log can say what happened.
EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BOOT_ERROR = 3

#: Most finished connections a worker keeps unreported when the policy does not weigh
#: loads (round-robin, sticky): fewer messages, credits still back within a heartbeat.
REPORT_BATCH = 32
# Descriptors kept for the handler's own files and sockets: connections never use them.
_FD_RESERVE = 64
# How often the same kind of failure is logged again (seconds).


class Worker:
    """One worker's event loop. ``run()`` returns the process exit code."""

    def __init__(
        self,
        config: Config,
        worker_id: int,
        channel: socket.socket,
        listeners: list[socket.socket],
        handler: Callable[..., Any],
        family: int = 0,
    ) -> None:
        self.config = config
        self.family = family  # of every connection (0: listeners of several families)
        self.worker_id = worker_id
        self.channel = channel
        self._listeners = listeners  # kernel modes; the listener source owns them once it runs
        self.handler = handler
        self.user_space = config.user_space
        self._reuseport = not self.user_space and config.balance == "reuseport"
        self._pulls = config.pulls
        # Decided once, at boot: never per connection. Raises CannotServe (a boot error).
        self.interface = interface_of(handler, config.interface)
        self._make_runner = runner_for(handler, self.interface)
        self._uvloop = loops.wants_uvloop(config.loop, self.interface)
        self.capacity = 0  # connections held at once, set in _main (fd headroom known then)
        self.max_batch = _fdpass.SCM_MAX_FD
        self.total = 0
        self.draining = False
        self._fast_stop = False  # SIGQUIT: no graceful end, no application shutdown
        self._drain_deadline = 0.0  # loop time when a draining worker's graceful time is up
        self.unreported_done = 0
        # Done is sent once per loop pass when the policy weighs loads (they must be fresh);
        # else once this many have finished (a share of the credits), or at the heartbeat.
        self._report_every = 1
        self._flush_scheduled = False
        self._rss = 0
        self._failures = FailureLog(log)
        self._process = psutil.Process()
        self.runner: Runner
        self.source: Source  # where connections come from
        self._control: ChannelSource | None = None  # kernel modes: the channel, requests only
        self._loop: asyncio.AbstractEventLoop
        self._finished: asyncio.Future[int]

    @property
    def active(self) -> int:
        """Connections in hand: started and not yet finished."""
        return self.runner.active

    # ------------------------------------------------------------- running
    def run(self) -> int:
        """Serve until drained or stopped (``SIGTERM``/``SIGQUIT``); return the exit code."""
        return loops.run(self._main(), self._uvloop)

    async def _main(self) -> int:
        """Build the runner and sources on the running loop, start the application, say
        ``Ready``, wait for the end, stop the application."""
        self._loop = loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        self.runner = proxy_gate.make_runner(self._make_runner, loop, self.handler, self.config,
                                             self.worker_id, self._completed, self.family)
        try:
            await self.runner.startup()
        except StartupFailed as exc:  # the application logged its own error
            log.error("worker %d (pid %d) cannot boot: %s", self.worker_id, os.getpid(), exc)
            self.runner.close()
            return EXIT_BOOT_ERROR
        except Exception:
            log.exception("worker %d (pid %d) cannot boot: the application's startup raised",
                          self.worker_id, os.getpid())
            self.runner.close()
            return EXIT_BOOT_ERROR
        self.channel.setblocking(False)
        def reader(sock: socket.socket, connections: bool) -> ChannelSource:
            """A channel or the shared queue; ``connections``: the runner's source, which
            takes only what it has room for."""
            return ChannelSource(loop, sock, self.runner, worker_id=self.worker_id, lost=self._lost,
                                 drain=self.begin_drain, pause_when_full=connections,
                                 one_per_pass_below=self.config.one_per_message_below if connections else 0)

        if self.user_space and not self._pulls:  # connections come on the channel
            self.source = reader(self.channel, True)
        else:  # the channel carries the primary's requests only
            self._control = reader(self.channel, False)
            if self._pulls:  # the shared queue, the one socket the primary let us keep
                queue = self._listeners[0]
                queue.setblocking(False)
                self.source = reader(queue, True)
            else:
                self.source = ListenerSource(loop, self._listeners, self.runner, worker_id=self.worker_id,
                                             reuseport=self._reuseport, backlog=self.config.backlog,
                                             log_error=self._failures.error)
        loop.add_signal_handler(signal.SIGTERM, self.begin_drain, "SIGTERM")
        loop.add_signal_handler(signal.SIGQUIT, self._stop_fast)
        # Sized after the listeners exist: they take descriptors too.
        self.capacity, self.max_batch = self.runner.limits(max(1, descriptors_free(_FD_RESERVE) or 1))
        if not self.config.needs_loads:
            self._report_every = max(1, min(self.capacity // 8, REPORT_BATCH))
        if self._control is not None:
            self._control.resume()
        self.source.resume()
        self._send(protocol.Ready(self.capacity, self.max_batch))
        self._heartbeat()
        try:
            code = await self._finished
            if self.draining and not self._fast_stop:
                await self._shutdown_application()
            return code
        finally:
            self.runner.close()

    async def _shutdown_application(self) -> None:
        """The runner's shutdown (a web app's lifespan), within what is left of the graceful time."""
        left = max(0.1, self._drain_deadline - self._loop.time())
        try:
            await asyncio.wait_for(self.runner.shutdown(), left)
        except asyncio.TimeoutError:
            log.warning("worker %d: the application's shutdown took longer than the graceful time left (%.1fs)",
                        self.worker_id, left)
        except Exception:
            log.exception("worker %d: the application's shutdown raised", self.worker_id)

    # ------------------------------------------------------- finished work
    def _completed(self) -> None:
        """The runner finished a connection: count it, credit it, make room for the next."""
        self.total += 1
        if self.user_space:
            self.unreported_done += 1
            if self.unreported_done >= self._report_every:
                self._schedule_flush()
        if self.source.paused and not self.source.closed and self.runner.room() > 0:
            self.source.resume()  # draining too, while it reads the sealed queue to its end
        if self.draining:
            self._maybe_finish()

    def _lost(self, count: int) -> None:
        # Descriptors dropped in transit: their credits come back, or the primary
        # would count them forever.
        self.unreported_done += count
        self._schedule_flush()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush_done)

    def _flush_done(self) -> None:
        # One message per loop iteration, however many connections finished.
        self._flush_scheduled = False
        if self.unreported_done and self._send(protocol.Done(self.unreported_done)):
            self.unreported_done = 0

    # ------------------------------------------------------- control channel
    def _send(self, message: protocol.Message) -> bool:
        try:
            self.channel.send(protocol.encode(message))
        except BlockingIOError:
            return False  # the primary is busy; the next report carries the news
        except OSError as exc:
            if not self.draining:
                self.begin_drain(f"the control channel failed: {exc}")
            return False
        return True

    def _heartbeat(self) -> None:
        """Report, then reschedule — whatever the report raised (EMFILE on /proc, say):
        a worker whose heartbeat chain ended would be killed as hung."""
        if self._finished.done():
            return
        try:
            try:
                self._rss = self._process.memory_info().rss
            except (OSError, psutil.Error) as exc:
                self._failures.error("rss", "worker %d: cannot read its memory use: %s", self.worker_id, exc)
            cpu = os.times()
            self._send(protocol.Heartbeat(self.runner.active, self.total, self._rss,
                                          int((cpu.user + cpu.system) * 1000)))
            self._flush_done()
        except Exception:
            self._failures.error("heartbeat", "worker %d: heartbeat failed", self.worker_id, exc_info=True)
        finally:
            self._loop.call_later(self.config.heartbeat_interval, self._heartbeat)

    # --------------------------------------------------------------- stop
    def begin_drain(self, why: str) -> None:
        """Take no new connections, finish the ones in hand, then exit 0."""
        if self.draining:
            self._maybe_finish()  # the sealed queue's end, read after the Drain
            return
        self.draining = True
        log.info("worker %d (pid %d) draining: %s; %d connections in flight",
                 self.worker_id, os.getpid(), why, self.runner.active)
        if not (self._pulls and isinstance(self.source, ChannelSource) and self.source.sealed()):
            # A restart, a recycle, a scale-down: what waits in a shared queue is the others'
            # (the replacement is ready first). A stopping primary sealed the queue: serve it
            # to its end with the others.
            self.source.close()
        if self._control is not None:
            self._control.close()
        self._drain_deadline = self._loop.time() + self.config.graceful_timeout
        self._loop.call_later(self.config.graceful_timeout, self._finish, EXIT_OK)
        self.runner.drain(self.config.graceful_timeout)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.runner.active == 0 and self.source.closed:
            self._flush_done()
            self._finish(EXIT_OK)

    def _stop_fast(self) -> None:
        """SIGQUIT: exit now; connections in hand are cut."""
        self._fast_stop = True
        self._finish(EXIT_OK)

    def _finish(self, code: int) -> None:
        if not self._finished.done():
            self._finished.set_result(code)



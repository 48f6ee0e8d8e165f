"""The worker process: take connections, run the handler, report on the channel.

A worker is forked by the primary and runs an asyncio loop. Connections arrive
either as descriptors on its control channel (user-space balancing) or from a
listener it accepts on itself (kernel balancing). Plain handlers run in a pool
of ``threads`` threads; coroutine handlers run on the loop.

In user-space modes a worker with plain handlers reads its channel only while
it has an idle thread, so connections it could not start yet stay in the
channel. The primary keeps its own reference to the worker's end of the
channel, and takes back whatever is still unread there if the worker dies.
"""

from __future__ import annotations

import array
import asyncio
import collections
import importlib
import inspect
import logging
import os
import resource
import signal
import socket
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, NoReturn

import psutil

from dispatch import _fdpass, protocol
from dispatch.config import Config, Handler
from dispatch.privileges import (
    PrivilegeError,
    die_with_primary,
    drop_privileges,
    primary_pid,
    user_name,
)

log = logging.getLogger("dispatch.worker")

#: Exit codes a worker uses, so the primary's log can say what happened.
EXIT_OK = 0
EXIT_CRASH = 1
EXIT_BOOT_ERROR = 3

# Descriptors kept for the handler's own files and sockets: connections never use them.
_FD_RESERVE = 64
# Most plain-handler connections waiting, on the loop, for their first bytes.
_IDLE_POOL = 1024

_PRIMARY_SIGNALS = (signal.SIGHUP, signal.SIGUSR2, signal.SIGTTIN, signal.SIGTTOU)


class HandlerImportError(ImportError):
    """The handler's import string could not be resolved in the worker."""


def load_handler(handler: Handler) -> Callable[..., Any]:
    """Resolve ``"package.module:attr"`` to the object, or return ``handler`` as is."""
    if not isinstance(handler, str):
        return handler
    module_name, _, attr_path = handler.partition(":")
    module = importlib.import_module(module_name)
    target: Any = module
    for part in attr_path.split("."):
        try:
            target = getattr(target, part)
        except AttributeError:
            raise HandlerImportError(f"module {module_name!r} has no attribute {attr_path!r}") from None
    if not callable(target):
        raise HandlerImportError(f"{handler!r} is not callable")
    return target


def is_async_handler(handler: Callable[..., Any]) -> bool:
    return inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
        getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
    )


class AsyncioProtocol:
    """Serve connections with an ``asyncio.Protocol`` factory on the worker's loop.

    ``dispatch.serve(AsyncioProtocol(MyProtocol), ...)``: each connection is
    handed to ``loop.connect_accepted_socket(MyProtocol, sock)``, so a custom
    protocol (or an existing asyncio server's protocol class) runs unchanged.
    """

    def __init__(self, factory: Callable[[], asyncio.BaseProtocol]) -> None:
        if not callable(factory):
            raise TypeError("AsyncioProtocol needs a protocol factory")
        self.factory = factory

    def __call__(self) -> asyncio.BaseProtocol:
        return self.factory()


def worker_main(
    config: Config,
    worker_id: int,
    channel: socket.socket,
    listeners: list[socket.socket],
    inherited_fds: list[int],
) -> NoReturn:
    """Run a worker in a freshly forked child; never returns."""
    code = EXIT_CRASH
    try:
        primary = primary_pid(channel)
        _reset_process(worker_id, inherited_fds, primary)
        _drop_privileges(config, primary)
        if config.on_worker_start is not None:
            config.on_worker_start(worker_id)
        try:
            handler = load_handler(config.handler)
        except BaseException:
            log.exception("worker %d (pid %d) cannot load handler %r", worker_id, os.getpid(), config.handler)
            code = EXIT_BOOT_ERROR
        else:
            code = Worker(config, worker_id, channel, listeners, handler).run()
    except PrivilegeError as exc:  # never serve as anyone but the configured user
        log.critical("worker %d (pid %d) cannot drop privileges: %s", worker_id, os.getpid(), exc)
        code = EXIT_BOOT_ERROR
    except BaseException:
        log.exception("worker %d (pid %d) crashed", worker_id, os.getpid())
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _reset_process(worker_id: int, inherited_fds: list[int], primary: int) -> None:
    """Undo what the fork copied from the primary that a worker must not keep."""
    signal.set_wakeup_fd(-1)  # the primary's wakeup pipe
    for signum in _PRIMARY_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the primary coordinates the stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    if not die_with_primary(primary):  # the primary died before the kernel was asked
        os._exit(EXIT_CRASH)
    for fd in inherited_fds:
        try:
            os.close(fd)
        except OSError:
            pass
    _tag_log_records(worker_id)
    try:
        from setproctitle import setproctitle
    except ImportError:
        pass
    else:
        setproctitle(f"dispatch: worker {worker_id}")


def _tag_log_records(worker_id: int) -> None:
    """Every log record made in this worker carries ``record.worker_id``."""
    make_record = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        record.worker_id = worker_id
        return record

    logging.setLogRecordFactory(factory)


def _drop_privileges(config: Config, primary: int) -> None:
    """Bound as root in the primary; handle connections as ``user``/``group``."""
    if config.uid is None and config.gid is None:
        return
    drop_privileges(config.uid, config.gid, user_name(config.uid))
    if not die_with_primary(primary):  # the switch cleared PR_SET_PDEATHSIG: set it again
        os._exit(EXIT_CRASH)


class Worker:
    """One worker's event loop. ``run()`` returns the process exit code."""

    def __init__(
        self,
        config: Config,
        worker_id: int,
        channel: socket.socket,
        listeners: list[socket.socket],
        handler: Callable[..., Any],
    ) -> None:
        self.config = config
        self.worker_id = worker_id
        self.channel = channel
        self.listeners = listeners
        self.handler = handler
        self.is_protocol = isinstance(handler, AsyncioProtocol)
        self.is_async = self.is_protocol or is_async_handler(handler)
        self.user_space = config.user_space
        self.client_timeout = config.client_timeout
        # Plain handlers: a connection that has sent nothing waits on the loop, not in a
        # thread, so idle clients cannot take every thread.
        self.await_first_bytes = (
            not self.is_async and self.client_timeout > 0 and not config.server_speaks_first
        )
        self.capacity = 0  # connections held at once, set in _main (fd headroom known then)
        self.max_batch = _fdpass.SCM_MAX_FD
        self.active = 0  # connections in hand: waiting, queued or running
        self.total = 0
        self.dropped = 0
        self.draining = False
        self.unreported_done = 0
        self._running = 0  # plain handlers: connections in a thread
        self._waiting: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}  # no bytes yet
        self._queued: collections.deque[socket.socket] = collections.deque()  # bytes, no thread
        self._idle_pool = 0  # most connections in _waiting
        self._flush_scheduled = False
        self._paused = False
        self._exit_code = EXIT_OK
        self._rss = 0
        self._last_error_log: dict[str, float] = {}
        self._accept_buf = array.array("i", bytes(4 * 64))
        self._process = psutil.Process()
        self._executor: ThreadPoolExecutor | None = None
        self._tasks: set[asyncio.Task[None]] = set()  # the loop keeps only weak references
        self._loop: asyncio.AbstractEventLoop
        self._finished: asyncio.Future[int]

    # ------------------------------------------------------------- running
    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        self._loop = loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        if not self.is_async:
            self._executor = ThreadPoolExecutor(self.config.threads, thread_name_prefix="dispatch-handler")
        loop.add_signal_handler(signal.SIGTERM, self.begin_drain, "SIGTERM")
        loop.add_signal_handler(signal.SIGQUIT, self._finish, EXIT_OK)
        self.channel.setblocking(False)
        if not self.user_space and self.config.balance == "reuseport":
            self.listeners = [_reuseport_listener(sock, self.config.backlog) for sock in self.listeners]
        for sock in self.listeners:
            sock.setblocking(False)
        self._size_capacity()
        if not self.user_space:
            loop.add_reader(self.channel.fileno(), self._on_channel)  # control only
        self._resume()
        self._send(protocol.Ready(self.capacity, self.max_batch))
        self._heartbeat()
        try:
            return await self._finished
        finally:
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)

    def _size_capacity(self) -> None:
        """How many connections this worker holds at once, within its descriptor table.

        The primary never has more than ``capacity`` outstanding to it, so the kernel
        never has to drop descriptors in transit because our table is full.
        """
        headroom = max(1, _fd_headroom())
        if self.is_async:
            self.capacity = min(self.config.max_connections or headroom, headroom)
            self.max_batch = min(self.capacity, _fdpass.SCM_MAX_FD)
            return
        threads = self.config.threads
        self._idle_pool = max(0, min(_IDLE_POOL, headroom - threads)) if self.await_first_bytes else 0
        self.capacity = min(threads + self._idle_pool, headroom) or 1
        self.max_batch = max(1, min(threads, _fdpass.SCM_MAX_FD))

    # ------------------------------------------------------- taking work
    def _room(self) -> int:
        """Connections this worker can take now."""
        if self.draining:
            return 0
        if self.is_async:
            return self.capacity - self.active
        free_threads = self.config.threads - self._running - len(self._queued)
        return min(free_threads, self._idle_pool - len(self._waiting)) if self._idle_pool else free_threads

    def _resume(self) -> None:
        """Take connections again: from the channel (user-space) or the listeners (kernel)."""
        self._paused = False
        if self.user_space:
            self._loop.add_reader(self.channel.fileno(), self._on_channel)
        else:
            for sock in self.listeners:
                self._loop.add_reader(sock.fileno(), self._on_accept, sock)

    def _resume_if_idle(self) -> None:
        if self._paused and self._room() > 0:
            self._resume()

    def _pause(self) -> None:
        self._paused = True
        if self.user_space:
            self._loop.remove_reader(self.channel.fileno())
        else:
            for sock in self.listeners:
                self._loop.remove_reader(sock.fileno())

    def _on_channel(self) -> None:
        # In user-space modes connections wait in the channel until there is room.
        while True:
            got = _fdpass.recv_fds(self.channel.fileno(), 64)
            if got is None:
                return
            data, fds, flags = got
            if not data:
                self.begin_drain("the primary closed the channel")
                return
            try:
                message = protocol.decode_from(data, protocol.TO_WORKER)
            except protocol.ProtocolError as exc:
                for fd in fds:
                    os.close(fd)
                log.error("worker %d: bad message from the primary: %s", self.worker_id, exc)
                continue
            if isinstance(message, protocol.Fds):
                if flags & _fdpass.CTRUNC or len(fds) != message.count:
                    lost = message.count - len(fds)
                    self.dropped += lost
                    log.error("worker %d: %d descriptors were dropped in transit (RLIMIT_NOFILE?)", self.worker_id, lost)
                    # Their credits come back, or the primary would count them forever.
                    self.unreported_done += lost
                    self._schedule_flush()
                for fd in fds:
                    self._start(fd)
                if self.user_space and self._room() <= 0:
                    self._pause()
                    return
            elif isinstance(message, protocol.Drain):
                self.begin_drain("asked by the primary")
                return

    def _on_accept(self, sock: socket.socket) -> None:
        limit = min(self._room(), 64)
        if limit <= 0:
            self._pause()
            return
        try:
            count = _fdpass.accept_batch(sock.fileno(), self._accept_buf, limit)
        except OSError as exc:
            # EMFILE and the like: the listener stays readable, so back off instead of spinning.
            self._log_error("accept", "worker %d: accept failed: %s; pausing accepts for 0.1s", self.worker_id, exc)
            if not self._paused:
                self._pause()
                self._loop.call_later(0.1, self._resume_if_idle)
            return
        for i in range(count):
            self._start(self._accept_buf[i])
        if self._room() <= 0 and not self._paused:
            self._pause()

    # ---------------------------------------------------- running handlers
    def _start(self, fd: int) -> None:
        self.active += 1
        if self.is_async:
            serve = self._serve_protocol if self.is_protocol else self._serve_async
            task = self._loop.create_task(serve(fd))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        conn = socket.socket(fileno=fd)
        if self.await_first_bytes and not _has_input(conn):
            self._wait_for_bytes(conn)
        else:
            self._run_in_thread(conn)

    def _wait_for_bytes(self, conn: socket.socket) -> None:
        """Watch a silent connection on the loop, for at most ``client_timeout``."""
        fd = conn.fileno()
        timer = self._loop.call_later(self.client_timeout, self._silent_too_long, conn)
        self._waiting[fd] = (conn, timer)
        self._loop.add_reader(fd, self._bytes_arrived, conn)

    def _stop_waiting(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        _, timer = self._waiting.pop(fd)
        timer.cancel()
        self._loop.remove_reader(fd)

    def _bytes_arrived(self, conn: socket.socket) -> None:
        self._stop_waiting(conn)
        if self._running < self.config.threads:
            self._run_in_thread(conn)
        else:
            self._queued.append(conn)

    def _silent_too_long(self, conn: socket.socket) -> None:
        self._stop_waiting(conn)
        log.debug("worker %d: closing a connection from %s that sent nothing in %gs",
                  self.worker_id, _peer(conn), self.client_timeout)
        conn.close()
        self._completed()

    def _run_in_thread(self, conn: socket.socket) -> None:
        assert self._executor is not None
        self._running += 1
        future = self._executor.submit(self._serve_sync, conn)
        future.add_done_callback(self._completed_in_thread)

    def _serve_sync(self, conn: socket.socket) -> None:
        addr: Any = None
        try:
            # A stalled client frees its thread after client_timeout in any blocking call.
            conn.settimeout(self.client_timeout or None)
            addr = _peer(conn)
            if self.config.ssl is not None:
                conn = self.config.ssl.wrap_socket(conn, server_side=True)  # handshake here, in the worker
            self.handler(conn, addr)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("worker %d: connection from %s ended: %s", self.worker_id, addr, exc or type(exc).__name__)
        except Exception:
            log.exception("worker %d: handler raised for connection from %s", self.worker_id, addr)
        finally:
            conn.close()

    def _completed_in_thread(self, future: Future[None]) -> None:
        try:
            self._loop.call_soon_threadsafe(self._thread_finished)
        except RuntimeError:  # the loop is closed: the worker is exiting
            pass

    def _thread_finished(self) -> None:
        self._running -= 1
        if self._queued:
            self._run_in_thread(self._queued.popleft())
        self._completed()

    async def _serve_async(self, fd: int) -> None:
        addr: Any = None
        try:
            sock = socket.socket(fileno=fd)
            addr = _peer(sock)
            reader = asyncio.StreamReader(loop=self._loop)
            stream_protocol = asyncio.StreamReaderProtocol(reader, loop=self._loop)
            transport, _ = await self._loop.connect_accepted_socket(
                lambda: stream_protocol, sock, ssl=self.config.ssl
            )
            writer = asyncio.StreamWriter(transport, stream_protocol, reader, self._loop)
            try:
                await self.handler(reader, writer)
            except (ConnectionError, TimeoutError) as exc:
                log.debug("worker %d: connection from %s ended: %s", self.worker_id, addr, exc or type(exc).__name__)
            except Exception:
                log.exception("worker %d: handler raised for connection from %s", self.worker_id, addr)
            finally:
                writer.close()
                try:
                    await writer.wait_closed()
                except (OSError, asyncio.CancelledError):
                    pass
        except OSError as exc:
            log.debug("worker %d: connection from %s failed: %s", self.worker_id, addr, exc)
        finally:
            self._completed()

    async def _serve_protocol(self, fd: int) -> None:
        """A user protocol owns the connection; it is complete when the transport closes."""
        completed = False

        def complete() -> None:
            nonlocal completed
            if not completed:
                completed = True
                self._completed()

        def factory() -> asyncio.BaseProtocol:
            protocol_ = self.handler()
            connection_lost = protocol_.connection_lost

            def lost(exc: Exception | None) -> None:
                try:
                    connection_lost(exc)
                finally:
                    complete()

            protocol_.connection_lost = lost  # type: ignore[method-assign]
            return protocol_

        try:
            await self._loop.connect_accepted_socket(factory, socket.socket(fileno=fd), ssl=self.config.ssl)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("worker %d: connection failed before the protocol started: %s", self.worker_id, exc)
            complete()
        except Exception:
            log.exception("worker %d: could not start the protocol for a connection", self.worker_id)
            complete()

    def _completed(self) -> None:
        self.active -= 1
        self.total += 1
        if self.user_space:
            self.unreported_done += 1
            self._schedule_flush()
        if self.draining:
            self._maybe_finish()
        elif self._paused and self._room() > 0:
            self._resume()

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
                self._log_error("rss", "worker %d: cannot read its memory use: %s", self.worker_id, exc)
            cpu = os.times()
            self._send(protocol.Heartbeat(self.active, self.total, self._rss, int((cpu.user + cpu.system) * 1000)))
            self._flush_done()
        except Exception:
            self._log_error("heartbeat", "worker %d: heartbeat failed", self.worker_id, exc_info=True)
        finally:
            self._loop.call_later(self.config.heartbeat_interval, self._heartbeat)

    def _log_error(self, kind: str, message: str, *args: Any, exc_info: bool = False) -> None:
        """Log at most once every 10 s per kind: a failure that repeats must not flood."""
        now = self._loop.time()
        if now - self._last_error_log.get(kind, -1e9) >= 10.0:
            self._last_error_log[kind] = now
            log.error(message, *args, exc_info=exc_info)

    # --------------------------------------------------------------- stop
    def begin_drain(self, why: str) -> None:
        """Take no new connections, finish the ones in hand, then exit 0."""
        if self.draining:
            return
        self.draining = True
        log.info("worker %d (pid %d) draining: %s; %d connections in flight", self.worker_id, os.getpid(), why, self.active)
        if not self._paused:
            self._pause()
        if not self.user_space:
            self._loop.remove_reader(self.channel.fileno())
            for sock in self.listeners:
                sock.close()
        self._loop.call_later(self.config.graceful_timeout, self._finish, EXIT_OK)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self.active == 0:
            self._flush_done()
            self._finish(EXIT_OK)

    def _finish(self, code: int) -> None:
        if not self._finished.done():
            self._finished.set_result(code)


def _fd_headroom() -> int:
    """Descriptors this process may still open, less a reserve for the handler's own."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = soft // 2
    return soft - in_use - _FD_RESERVE


def _has_input(conn: socket.socket) -> bool:
    """True if ``conn`` has bytes (or EOF, or an error) to read now."""
    try:
        conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # a reset: the handler's first recv will say so
    return True


def _peer(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None


def _reuseport_listener(reserved: socket.socket, backlog: int) -> socket.socket:
    """This worker's own SO_REUSEPORT listener on the address the primary reserved."""
    address = reserved.getsockname()
    sock = socket.socket(reserved.family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if reserved.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
    sock.bind(address)
    sock.listen(backlog)
    reserved.close()
    return sock

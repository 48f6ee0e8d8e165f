"""Plain handlers ``handler(conn, addr)`` in a pool of ``threads`` threads.

A thread is the scarce thing here, so a connection gets one only when it can
use it at once:

- a connection that has sent nothing waits on the loop, not in a thread, for
  at most ``client_timeout`` seconds (its *first-bytes wait*), then is closed;
  at most an idle pool's worth (1,024, within the descriptor table) wait so;
- a connection with bytes and no free thread waits in a queue, and takes the
  next thread that frees up;
- in the thread, the socket has a timeout of ``client_timeout`` in every
  blocking call, so a client that stalls mid-request frees its thread.

``server_speaks_first`` (or ``client_timeout=0``) skips the first-bytes wait:
the handler gets the connection at once.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from dispatch import _fdpass
from dispatch.config import Config
from dispatch.runners import Done, NoLifespan, adopt, log, peer

#: Most connections waiting, on the loop, for their first bytes.
IDLE_POOL = 1024


class ThreadRunner(NoLifespan):
    """Runs a plain handler in threads; connections without bytes wait on the loop."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        handler: Callable[..., Any],
        config: Config,
        worker_id: int,
        done: Done,
        family: int = 0,
    ) -> None:
        self.active = 0  # connections in hand: waiting, queued or running
        self._family = family
        self._loop = loop
        self._handler = handler
        self._worker_id = worker_id
        self._done = done
        self._threads = config.threads
        self._timeout = config.client_timeout
        self._ssl = config.ssl
        # An idle client must not hold a thread: wait for its first bytes on the loop.
        self.await_first_bytes = config.client_timeout > 0 and not config.server_speaks_first
        self._idle_pool = 0  # most connections in _waiting, set by limits()
        self._running = 0  # connections in a thread
        self._waiting: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}  # no bytes yet
        self._queued: collections.deque[socket.socket] = collections.deque()  # bytes, no thread
        self._executor = ThreadPoolExecutor(config.threads, thread_name_prefix="dispatch-handler")

    def limits(self, headroom: int) -> tuple[int, int]:
        """``threads`` plus the idle pool, within ``headroom``; batches of ``threads``."""
        threads = self._threads
        self._idle_pool = max(0, min(IDLE_POOL, headroom - threads)) if self.await_first_bytes else 0
        capacity = min(threads + self._idle_pool, headroom) or 1
        return capacity, max(1, min(threads, _fdpass.SCM_MAX_FD))

    def room(self) -> int:
        """Threads not taken (queued connections will take some), and no more than the
        idle pool's free places: any connection started may have to wait for bytes."""
        free_threads = self._threads - self._running - len(self._queued)
        return min(free_threads, self._idle_pool - len(self._waiting)) if self._idle_pool else free_threads

    def start(self, fd: int) -> None:
        """To a thread if it has bytes already (or the wait is off), else wait on the loop."""
        self.active += 1
        conn = adopt(fd, self._family)
        if self.await_first_bytes and not _has_input(conn):
            self._wait_for_bytes(conn)
        else:
            self._run_in_thread(conn)

    def close(self) -> None:
        """Stop the pool without waiting: a handler still running dies with the process."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------ first-bytes wait
    def _wait_for_bytes(self, conn: socket.socket) -> None:
        """Watch a silent connection on the loop, for at most ``client_timeout``."""
        fd = conn.fileno()
        timer = self._loop.call_later(self._timeout, self._silent_too_long, conn)
        self._waiting[fd] = (conn, timer)
        self._loop.add_reader(fd, self._bytes_arrived, conn)

    def _stop_waiting(self, conn: socket.socket) -> None:
        fd = conn.fileno()
        _, timer = self._waiting.pop(fd)
        timer.cancel()
        self._loop.remove_reader(fd)

    def _bytes_arrived(self, conn: socket.socket) -> None:
        self._stop_waiting(conn)
        if self._running < self._threads:
            self._run_in_thread(conn)
        else:
            self._queued.append(conn)

    def _silent_too_long(self, conn: socket.socket) -> None:
        self._stop_waiting(conn)
        log.debug("worker %d: closing a connection from %s that sent nothing in %gs",
                  self._worker_id, peer(conn), self._timeout)
        conn.close()
        self.active -= 1
        self._done()

    # ------------------------------------------------------------- threads
    def _run_in_thread(self, conn: socket.socket) -> None:
        self._running += 1
        future = self._executor.submit(self._serve_sync, conn)
        future.add_done_callback(self._completed_in_thread)

    def _serve_sync(self, conn: socket.socket) -> None:
        """In a pool thread: the handler, with a socket timeout, TLS handshake first if asked."""
        addr: Any = None
        try:
            # A stalled client frees its thread after client_timeout in any blocking call.
            conn.settimeout(self._timeout or None)
            addr = peer(conn)
            if self._ssl is not None:
                conn = self._ssl.wrap_socket(conn, server_side=True)  # handshake here, in the worker
            self._handler(conn, addr)
        except (ConnectionError, TimeoutError) as exc:
            log.debug("worker %d: connection from %s ended: %s", self._worker_id, addr, exc or type(exc).__name__)
        except Exception:
            log.exception("worker %d: handler raised for connection from %s", self._worker_id, addr)
        finally:
            conn.close()

    def _completed_in_thread(self, future: Future[None]) -> None:
        # In the pool thread: hand the news to the loop.
        try:
            self._loop.call_soon_threadsafe(self._thread_finished)
        except RuntimeError:  # the loop is closed: the worker is exiting
            pass

    def _thread_finished(self) -> None:
        self._running -= 1
        if self._queued:
            self._run_in_thread(self._queued.popleft())
        self.active -= 1
        self._done()


def _has_input(conn: socket.socket) -> bool:
    """True if ``conn`` has bytes (or EOF, or an error) to read now."""
    try:
        conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # a reset: the handler's first recv will say so
    return True

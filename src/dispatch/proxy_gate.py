"""The worker's PROXY protocol gate: read the header on the loop, then hand the connection on.

With ``proxy_protocol`` on, the worker's runner is wrapped in a :class:`ProxyGate`.
Each new connection waits on the event loop (never in a thread) until its first bytes
tell what it is, for at most ``client_timeout`` seconds (5 when that is off):

- from a trusted sender (``proxy_allow``; unix-socket peers are trusted: file
  permissions decide who connects), a header must come: it is consumed, exactly its
  bytes, and the connection goes to the runner with the client's real address recorded
  (:mod:`dispatch.peers`); no header, a malformed one, or one of a version not asked
  for closes the connection;
- from anyone else, a header closes the connection (a client must not name its own
  address); any other bytes are left unread and the connection is served as it is
  (at once with ``server_speaks_first``: such a client waits for the server's banner).

Every refusal is one debug line. The header is read with ``MSG_PEEK`` and then
consumed exactly, so the application's bytes after it are never touched.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable
from typing import Any

from dispatch import peers, proxy_protocol
from dispatch.config import Config
from dispatch.runners import Done, Runner, RunnerFactory, adopt
from dispatch.values import parse_networks, trusted

log = logging.getLogger("dispatch.worker")

#: How long a header may take when ``client_timeout`` is 0 (off): there is no "forever" here.
DEFAULT_TIMEOUT = 5.0

VERSIONS = {"v1": (1,), "v2": (2,), "auto": (1, 2)}


#: Seconds before looking again at a header that arrived in part. Peeked bytes stay
#: readable, so a reader on the loop would fire at once, again and again: a half header
#: would spin the worker until its deadline.
RECHECK = 0.02

_WAIT, _PARTIAL, _DONE = range(3)  # what one look at a connection found


class _Waiting:
    __slots__ = ("sock", "fd", "timer", "trusted", "peer", "watching", "recheck")

    def __init__(self, sock: socket.socket, timer: asyncio.TimerHandle, is_trusted: bool, peer: object) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.timer = timer
        self.trusted = is_trusted
        self.peer = peer
        self.watching = False  # a reader on the loop
        self.recheck: asyncio.TimerHandle | None = None


class ProxyGate:
    """A ``Runner`` in front of the real one: connections reach it once their header is read.

    It builds the real runner with its own ``done``, so ``active`` counts every
    connection in hand, waiting here or in the runner: the worker's credits, heartbeats
    and drain see them like any other. A header that completes goes to the runner at once,
    which queues it if it has no thread free.
    """

    def __init__(self, make_runner: RunnerFactory, loop: asyncio.AbstractEventLoop,
                 handler: Callable[..., Any], config: Config, worker_id: int, done: Done,
                 family: int = 0) -> None:
        self.active = 0  # connections in hand: waiting here, or in the runner
        self.runner = make_runner(loop, handler, config, worker_id, self._finished, family)
        self._family = family
        self._loop = loop
        self._worker_id = worker_id
        self._done = done
        self._versions = VERSIONS[config.proxy_protocol]
        self._networks = parse_networks(config.proxy_allow, "proxy_allow")
        self._timeout = config.client_timeout or DEFAULT_TIMEOUT
        self._server_speaks_first = config.server_speaks_first
        self._waiting: dict[int, _Waiting] = {}
        self._capacity = 0  # set by limits(), before the first connection
        self.refused = 0

    # ------------------------------------------------------------ the Runner interface
    def limits(self, headroom: int) -> tuple[int, int]:
        self._capacity, max_batch = self.runner.limits(headroom)
        return self._capacity, max_batch

    def room(self) -> int:
        """What the runner has room for, within the capacity the worker advertised.

        Connections waiting here for a header do not take the runner's room (a thread, for
        plain handlers): like clients that have sent nothing yet, a stalled header must not
        keep the next connection out. The capacity (the primary's credits) bounds them.
        """
        return min(self.runner.room(), self._capacity - self.active)

    def start(self, fd: int) -> None:
        self.active += 1
        sock = adopt(fd, self._family)
        sock.setblocking(False)
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        if peer is None:  # reset before we looked: nothing to serve
            sock.close()
            self._finished()
            return
        is_trusted = trusted(peer, self._networks)
        if not is_trusted and self._server_speaks_first:
            # Its client waits for our banner: nothing to look at. Whatever it sends later,
            # a PROXY header included, is the handler's data, never an address.
            sock.detach()
            peers.record(fd, None)
            self.runner.start(fd)
            return
        waiting = _Waiting(sock, self._loop.call_later(self._timeout, self._expired, fd), is_trusted, peer)
        self._waiting[fd] = waiting
        self._look(waiting)

    def close(self) -> None:
        for waiting in list(self._waiting.values()):
            self._drop(waiting)
        self.runner.close()

    async def startup(self) -> None:
        await self.runner.startup()

    def drain(self, graceful_timeout: float) -> None:
        # Connections waiting for a header finish (or time out) on their own.
        self.runner.drain(graceful_timeout)

    async def shutdown(self) -> None:
        await self.runner.shutdown()

    # ------------------------------------------------------------ reading the header
    def _look_again(self, fd: int) -> None:
        waiting = self._waiting.get(fd)
        if waiting is not None:
            waiting.recheck = None
            self._look(waiting)

    def _look(self, waiting: _Waiting) -> None:
        """Read what arrived; then wait for bytes on the loop, or look again shortly when
        part of a header is there (``RECHECK``)."""
        found = self._read(waiting)
        if found == _DONE:
            return
        if found == _PARTIAL:
            if waiting.watching:
                self._loop.remove_reader(waiting.fd)
                waiting.watching = False
            waiting.recheck = self._loop.call_later(RECHECK, self._look_again, waiting.fd)
        elif not waiting.watching:
            self._loop.add_reader(waiting.fd, self._look_again, waiting.fd)
            waiting.watching = True

    def _read(self, waiting: _Waiting) -> int:
        """One look: ``_DONE`` when the connection left the gate (passed or refused),
        ``_PARTIAL`` when the start of a header is there, ``_WAIT`` when nothing is."""
        try:
            data = waiting.sock.recv(proxy_protocol.MAX_LENGTH, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return _WAIT
        except OSError as exc:
            return self._refuse(waiting, f"read failed: {exc}")
        if not data:
            return self._refuse(waiting, "closed before sending anything")
        if not waiting.trusted:
            kind = proxy_protocol.detect(data)
            if kind is None:
                return _PARTIAL
            if kind:
                return self._refuse(waiting, "a PROXY header from a sender not in proxy_allow")
            self._pass(waiting, None)
            return _DONE
        try:
            header = proxy_protocol.parse(data, self._versions)
        except proxy_protocol.ProxyProtocolError as exc:
            return self._refuse(waiting, str(exc))
        if header is None:
            if len(data) >= proxy_protocol.MAX_LENGTH:  # cannot happen with a valid header
                return self._refuse(waiting, "header too long")
            return _PARTIAL
        try:
            consumed = waiting.sock.recv(header.length)
        except OSError as exc:
            return self._refuse(waiting, f"read failed: {exc}")
        if len(consumed) != header.length:  # the kernel gave less than it showed: give up
            return self._refuse(waiting, "short read of the header")
        self._pass(waiting, header.source)
        return _DONE

    def _pass(self, waiting: _Waiting, source: proxy_protocol.Address | None) -> None:
        fd = waiting.sock.fileno()
        self._forget(waiting)
        peers.record(fd, source)
        waiting.sock.detach()
        self.runner.start(fd)

    def _refuse(self, waiting: _Waiting, why: str) -> int:
        self.refused += 1
        log.debug("worker %d: closing a connection from %s: %s", self._worker_id, waiting.peer, why)
        self._drop(waiting)
        return _DONE

    def _expired(self, fd: int) -> None:
        waiting = self._waiting.get(fd)
        if waiting is not None:
            self._refuse(waiting, f"no complete PROXY header within {self._timeout:g}s"
                         if waiting.trusted else f"sent nothing telling within {self._timeout:g}s")

    def _forget(self, waiting: _Waiting) -> None:
        # Before the runner sees the descriptor: it may watch it on the loop itself.
        if waiting.watching:
            self._loop.remove_reader(waiting.fd)
            waiting.watching = False
        if waiting.recheck is not None:
            waiting.recheck.cancel()
        waiting.timer.cancel()
        self._waiting.pop(waiting.fd, None)

    def _drop(self, waiting: _Waiting) -> None:
        fd = waiting.sock.fileno()
        self._forget(waiting)
        peers.record(fd, None)
        waiting.sock.close()
        self._finished()

    def _finished(self) -> None:
        """A connection is over: refused here, or done in the runner."""
        self.active -= 1
        self._done()


def make_runner(make: RunnerFactory, loop: asyncio.AbstractEventLoop, handler: Callable[..., Any],
                config: Config, worker_id: int, done: Done, family: int = 0) -> Runner:
    """The runner ``make`` builds, behind a gate when ``config.proxy_protocol`` is on."""
    if config.proxy_protocol == "off":
        return make(loop, handler, config, worker_id, done, family)
    return ProxyGate(make, loop, handler, config, worker_id, done, family)

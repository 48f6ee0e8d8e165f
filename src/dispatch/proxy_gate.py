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
  address); any other bytes are left unread and the connection is served as it is.

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
from dispatch.runners import Done, Runner, RunnerFactory
from dispatch.values import parse_networks, trusted

log = logging.getLogger("dispatch.worker")

#: How long a header may take when ``client_timeout`` is 0 (off): there is no "forever" here.
DEFAULT_TIMEOUT = 5.0

VERSIONS = {"v1": (1,), "v2": (2,), "auto": (1, 2)}


class _Waiting:
    __slots__ = ("sock", "timer", "trusted", "peer")

    def __init__(self, sock: socket.socket, timer: asyncio.TimerHandle, is_trusted: bool, peer: object) -> None:
        self.sock = sock
        self.timer = timer
        self.trusted = is_trusted
        self.peer = peer


class ProxyGate:
    """A ``Runner`` in front of the real one: connections reach it once their header is read.

    It builds the real runner with its own ``done``, so ``active`` counts every
    connection in hand, waiting here or in the runner: the worker's credits, heartbeats
    and drain see them like any other.
    """

    def __init__(self, make_runner: RunnerFactory, loop: asyncio.AbstractEventLoop,
                 handler: Callable[..., Any], config: Config, worker_id: int, done: Done) -> None:
        self.active = 0  # connections in hand: waiting here, or in the runner
        self.runner = make_runner(loop, handler, config, worker_id, self._finished)
        self._loop = loop
        self._worker_id = worker_id
        self._done = done
        self._versions = VERSIONS[config.proxy_protocol]
        self._networks = parse_networks(config.proxy_allow, "proxy_allow")
        self._timeout = config.client_timeout or DEFAULT_TIMEOUT
        self._waiting: dict[int, _Waiting] = {}
        self.refused = 0

    # ------------------------------------------------------------ the Runner interface
    def limits(self, headroom: int) -> tuple[int, int]:
        return self.runner.limits(headroom)

    def room(self) -> int:
        return self.runner.room() - len(self._waiting)

    def start(self, fd: int) -> None:
        self.active += 1
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)
        try:
            peer = sock.getpeername()
        except OSError:
            peer = None
        if peer is None:  # reset before we looked: nothing to serve
            sock.close()
            self._finished()
            return
        waiting = _Waiting(sock, self._loop.call_later(self._timeout, self._expired, fd), trusted(peer, self._networks), peer)
        self._waiting[fd] = waiting
        if not self._read(waiting):
            self._loop.add_reader(fd, self._on_readable, fd)

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
    def _on_readable(self, fd: int) -> None:
        waiting = self._waiting.get(fd)
        if waiting is not None:
            self._read(waiting)

    def _read(self, waiting: _Waiting) -> bool:
        """Look at what arrived; True when the connection left the gate (passed or refused)."""
        try:
            data = waiting.sock.recv(proxy_protocol.MAX_LENGTH, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return False
        except OSError as exc:
            return self._refuse(waiting, f"read failed: {exc}")
        if not data:
            return self._refuse(waiting, "closed before sending anything")
        if not waiting.trusted:
            kind = proxy_protocol.detect(data)
            if kind is None:
                return False
            if kind:
                return self._refuse(waiting, "a PROXY header from a sender not in proxy_allow")
            self._pass(waiting, None)
            return True
        try:
            header = proxy_protocol.parse(data, self._versions)
        except proxy_protocol.ProxyProtocolError as exc:
            return self._refuse(waiting, str(exc))
        if header is None:
            if len(data) >= proxy_protocol.MAX_LENGTH:  # cannot happen with a valid header
                return self._refuse(waiting, "header too long")
            return False
        try:
            consumed = waiting.sock.recv(header.length)
        except OSError as exc:
            return self._refuse(waiting, f"read failed: {exc}")
        if len(consumed) != header.length:  # the kernel gave less than it showed: give up
            return self._refuse(waiting, "short read of the header")
        self._pass(waiting, header.source)
        return True

    def _pass(self, waiting: _Waiting, source: proxy_protocol.Address | None) -> None:
        fd = waiting.sock.fileno()
        self._forget(waiting)
        peers.record(fd, source)
        waiting.sock.detach()
        self.runner.start(fd)

    def _refuse(self, waiting: _Waiting, why: str) -> bool:
        self.refused += 1
        log.debug("worker %d: closing a connection from %s: %s", self._worker_id, waiting.peer, why)
        self._drop(waiting)
        return True

    def _expired(self, fd: int) -> None:
        waiting = self._waiting.get(fd)
        if waiting is not None:
            self._refuse(waiting, f"no complete PROXY header within {self._timeout:g}s"
                         if waiting.trusted else f"sent nothing telling within {self._timeout:g}s")

    def _forget(self, waiting: _Waiting) -> None:
        # Before the runner sees the descriptor: it may watch it on the loop itself.
        fd = waiting.sock.fileno()
        self._loop.remove_reader(fd)
        waiting.timer.cancel()
        self._waiting.pop(fd, None)

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
                config: Config, worker_id: int, done: Done) -> Runner:
    """The runner ``make`` builds, behind a gate when ``config.proxy_protocol`` is on."""
    if config.proxy_protocol == "off":
        return make(loop, handler, config, worker_id, done)
    return ProxyGate(make, loop, handler, config, worker_id, done)

"""A small HTTP server that lives in its owner's epoll loop, with every cost bounded.

It lives inside the primary's one loop, not in a thread: the owner hands it
``register``/``unregister`` and it never blocks. That loop also dispatches
every connection, so a client must never cost it a wait. Hence the rules:

- one request per connection, then ``Connection: close``;
- the request head is at most ``max_head`` bytes (431 beyond);
- a client has ``timeout`` seconds in all to send its head and read the
  answer, enforced by ``tick(now)`` (which the primary calls every 0.1 s) and,
  should nobody call it, whenever the client table is full;
- at most ``max_clients`` at once; when the table is full, a newcomer takes
  the slot of the oldest client still reading its head (so a crowd of silent
  clients cannot keep a liveness probe out), and gets a 503 only when every
  slot is busy writing an answer;
- reads and writes are non-blocking; an answer that does not fit in the socket
  buffer is finished on ``EPOLLOUT``.

It knows paths and the functions that answer them, nothing of what they
describe: the health views are in :mod:`dispatch.health.views` and
:mod:`dispatch.health.metrics`.
"""

from __future__ import annotations

import contextlib
import logging
import select
import socket
import time
from collections.abc import Callable, Mapping

from dispatch.config import Address
from dispatch.health.http import HTTPError, head_end, parse_request_line, strip_body, text
from dispatch.listeners import bind, bound_name
from dispatch.side_server import Callback, SideServer

log = logging.getLogger("dispatch.health")

#: A route answers with a complete response (see ``dispatch.health.http.render``).
Route = Callable[[], bytes]



class _Client:
    """One connection: reading its head, then writing its answer."""

    __slots__ = ("sock", "fd", "deadline", "inbuf", "out", "writing")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.deadline = deadline
        self.inbuf = bytearray()
        self.out: memoryview | None = None  # the answer still to send, once there is one
        self.writing = False  # registered for EPOLLOUT instead of EPOLLIN


class HTTPServer(SideServer):
    """Answers ``GET``/``HEAD`` for ``routes`` on ``address``, from its owner's loop.

    Binds and listens at once (``BindError`` names the address); serves once
    ``attach()`` has put its sockets into the owner's epoll loop.
    """

    kind = "health endpoint"

    def __init__(self, address: Address, routes: Mapping[str, Route], *, timeout: float = 5.0,
                 max_clients: int = 64, max_head: int = 8192, backlog: int = 128,
                 listener: socket.socket | None = None) -> None:
        self.routes = routes
        self.timeout = timeout
        self.max_clients = max_clients
        self.max_head = max_head
        super().__init__(listener if listener is not None else bind(address, backlog))
        self._address = bound_name(self.listener)
        self._clients: dict[int, _Client] = {}  # in accept order: oldest first
        self.refused = 0  # clients turned away because every slot was writing an answer
        self.evicted = 0  # clients closed before their request to make room for a newcomer

    @property
    def address(self) -> str:
        """What was bound, ``HOST:PORT`` (port 0 resolved)."""
        return self._address

    @property
    def writing(self) -> int:
        """Clients whose answer did not fit the socket buffer, finishing on ``EPOLLOUT``."""
        return sum(c.writing for c in self._clients.values())

    def __str__(self) -> str:
        return self._address

    # ------------------------------------------------------------ the owner's API
    def fds(self) -> list[int]:
        """Every descriptor this owns (a forked worker closes them)."""
        fds = [c.fd for c in self._clients.values()]
        if self.listener.fileno() >= 0:
            fds.insert(0, self.listener.fileno())
        return fds

    def tick(self, now: float) -> None:
        """Drop clients past their deadline; resume accepting after a pause.

        ``now`` is ``time.monotonic()``.
        """
        for client in [c for c in self._clients.values() if now >= c.deadline]:
            self._drop(client)
        self._resume_accepting(now)

    def close(self) -> None:
        """Close every client and the listener. Safe to call twice."""
        for client in list(self._clients.values()):
            self._drop(client)
        self.stop_listening()

    def handle(self, head: bytes) -> bytes:
        """The complete response to one request head."""
        try:
            method, path = parse_request_line(head)
        except HTTPError as exc:
            return text(exc.status, exc.reason)
        route = self.routes.get(path)
        if route is None:
            response = text(404, f"no such path; try {', '.join(self.routes)}")
        elif method not in ("GET", "HEAD"):
            response = text(405, f"{method} is not allowed here", headers=(("Allow", "GET, HEAD"),))
        else:
            try:
                response = route()
            except Exception:
                log.exception("health endpoint: %s failed", path)
                response = text(500, "internal error; see the primary's log")
        return strip_body(response) if method == "HEAD" else response

    def _accepted(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        now = time.monotonic()
        if len(self._clients) >= self.max_clients:
            self.tick(now)  # sweep expired clients even if the owner never calls tick()
        if len(self._clients) >= self.max_clients and not self._make_room():
            self.refused += 1
            with contextlib.suppress(OSError):
                sock.send(text(503, "too many health clients"), socket.MSG_NOSIGNAL)
            _discard_input(sock)
            sock.close()
            return
        client = _Client(sock, now + self.timeout)
        self._clients[client.fd] = client
        assert self._register is not None
        self._register(client.fd, select.EPOLLIN, self._callback(client))

    def _make_room(self) -> bool:
        """Free a slot by closing the oldest client still reading its head.

        Clients that never finish a request must not starve the ones that do;
        the oldest has had the longest to speak. Each candidate gets a last
        read first, so a request already waiting in its socket is answered,
        not cut. Clients writing an answer are kept. False if no slot was freed.
        """
        for client in [c for c in self._clients.values() if c.out is None]:
            self._on_client(client, select.EPOLLIN)
            if self._clients.get(client.fd) is client and client.out is None:
                self.evicted += 1
                self._drop(client)
            if len(self._clients) < self.max_clients:
                return True
        return False

    # ------------------------------------------------------------ one client
    def _callback(self, client: _Client) -> Callback:
        return lambda events: self._on_client(client, events)

    def _on_client(self, client: _Client, events: int) -> None:
        if self._clients.get(client.fd) is not client:
            return  # a stale event for a client already dropped
        try:
            if client.out is not None:
                self._write(client)
            else:
                self._read(client)
        except Exception:
            # Whatever went wrong, it must not leave the primary's loop.
            log.exception("health endpoint: error serving a client; dropping it")
            self._drop(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(self.max_head + 1 - len(client.inbuf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:  # the client stopped sending before the blank line
            if client.inbuf:
                self._answer(client, text(400, "incomplete request head"))
            else:
                self._drop(client)
            return
        client.inbuf += data
        end = head_end(client.inbuf)
        if 0 <= end <= self.max_head:
            self._answer(client, self.handle(bytes(client.inbuf[:end])))
        elif len(client.inbuf) > self.max_head:
            self._answer(client, text(431, f"request head over {self.max_head} bytes"))

    def _answer(self, client: _Client, response: bytes) -> None:
        client.inbuf = bytearray()
        client.out = memoryview(response)
        self._write(client)

    def _write(self, client: _Client) -> None:
        assert client.out is not None
        try:
            sent = client.sock.send(client.out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(client)
            return
        client.out = client.out[sent:]
        if client.out:
            if not client.writing:  # finish on EPOLLOUT
                assert self._register is not None and self._unregister is not None
                self._unregister(client.fd)
                self._register(client.fd, select.EPOLLOUT, self._callback(client))
                client.writing = True
            return
        self._drop(client, discard_input=True)

    def _drop(self, client: _Client, discard_input: bool = False) -> None:
        if self._clients.pop(client.fd, None) is None:
            return
        if self._unregister is not None:
            self._unregister(client.fd)
        if discard_input:
            _discard_input(client.sock)
        client.sock.close()


def _discard_input(sock: socket.socket) -> None:
    """Read (bounded) what a client already sent, before closing after an answer.

    Unread input makes close() send RST, which can destroy the answer before
    the client reads it.
    """
    with contextlib.suppress(OSError):
        for _ in range(4):
            if not sock.recv(65536):
                break

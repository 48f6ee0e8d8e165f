"""The primary's control socket: a unix socket in its epoll loop, every cost bounded.

Like the health server it never blocks the loop that dispatches connections:

- the peer's uid (``SO_PEERCRED``) must be ours or root; the socket file is
  created with mode 0600, so others normally cannot even connect;
- one request line of at most ``MAX_REQUEST`` bytes, read within ``timeout``
  seconds; longer or later is an error reply, then the connection closes;
- at most ``max_clients`` at once; a newcomer takes the slot of the oldest client
  still sending its request, and is told the primary is busy only when every
  slot waits for an answer (a reload in progress, say);
- an answer may come later (``Reply.send`` from the command's code, when a
  rolling restart ends); meanwhile the client is watched only for hang-up.

It knows nothing of the commands: ``handle(request, reply)`` does (``commands.py``).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import stat
import struct
import time
from collections.abc import Callable
from typing import Any

from dispatch import ctl_protocol
from dispatch.listeners import BindError
from dispatch.side_server import SideServer

log = logging.getLogger("dispatch")


_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ControlError(BindError):
    """The control socket cannot be created; the message names the path."""


class Reply:
    """The one answer a client gets; ``send()`` now or later (a second call is ignored)."""

    def __init__(self, server: ControlServer, client: _Client) -> None:
        self._server, self._client = server, client
        self.peer_pid = client.peer_pid

    @property
    def open(self) -> bool:
        """The client is still there and has no answer yet."""
        return self._server.waiting(self._client)

    def send(self, message: dict[str, Any]) -> None:
        self._server.answer(self._client, ctl_protocol.encode(message))


Handler = Callable[[dict[str, Any], Reply], None]


class _Client:
    __slots__ = ("sock", "fd", "deadline", "inbuf", "out", "state", "peer_pid")

    def __init__(self, sock: socket.socket, deadline: float, peer_pid: int) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.deadline = deadline
        self.inbuf = bytearray()
        self.out = memoryview(b"")
        self.state = "reading"  # then "waiting" (for its answer), then "writing"
        self.peer_pid = peer_pid


class ControlServer(SideServer):
    """Serves control requests on the unix socket ``path`` from its owner's loop.

    Binds at once (``ControlError`` names the path), or takes ``listener``, a
    socket inherited from the primary it replaces. ``attach()`` starts serving.
    """

    kind = "control socket"

    def __init__(self, path: str, handle: Handler, *, listener: socket.socket | None = None,
                 timeout: float = 5.0, max_clients: int = 16) -> None:
        self.path = os.path.abspath(path)
        self.handle = handle
        self.timeout = timeout
        self.max_clients = max_clients
        super().__init__(listener if listener is not None else _bind(self.path))
        self._clients: dict[int, _Client] = {}  # oldest first
        #: Remove the socket file on close: False once another primary has taken it over.
        self.owns_path = listener is None
        self.refused = 0  # peers of another uid
        self.rejected = 0  # bad requests answered with an error

    # ------------------------------------------------------------ the owner's API
    def fds(self) -> list[int]:
        fds = [c.fd for c in self._clients.values()]
        if self.listener.fileno() >= 0:
            fds.insert(0, self.listener.fileno())
        return fds

    def tick(self, now: float) -> None:
        """Drop clients past their deadline (``now`` is ``time.monotonic()``)."""
        for client in [c for c in self._clients.values() if now >= c.deadline]:
            if client.state == "reading":
                self.rejected += 1
                self.answer(client, ctl_protocol.error(f"no complete request within {self.timeout:g}s"))
            else:
                self._drop(client)
        self._resume_accepting(now)

    def close(self) -> None:
        """Close every client and the listener; remove the file if it is still ours. Safe twice."""
        for client in list(self._clients.values()):
            self._drop(client)
        if self.owns_path and self.listener.fileno() >= 0:
            with contextlib.suppress(OSError):
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
        self.owns_path = False
        self.stop_listening()

    def waiting(self, client: _Client) -> bool:
        return self._clients.get(client.fd) is client and client.state in ("reading", "waiting")

    def answer(self, client: _Client, data: bytes) -> None:
        if not self.waiting(client):
            return
        client.state, client.out = "writing", memoryview(data)
        client.deadline = time.monotonic() + self.timeout
        self._write(client)

    def _accepted(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        try:
            pid, uid, _ = _PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size))
        except (OSError, struct.error):
            sock.close()  # no credentials, no service
            return
        if uid not in (0, os.geteuid()):
            self.refused += 1
            log.warning("control socket: refused pid %d of uid %d (only uid %d or root may control this primary)",
                        pid, uid, os.geteuid())
            _send_and_close(sock, ctl_protocol.error(f"permission denied: uid {uid} may not control this primary"))
            return
        if len(self._clients) >= self.max_clients:
            self.tick(time.monotonic())
        if len(self._clients) >= self.max_clients and not self._make_room():
            _send_and_close(sock, ctl_protocol.error("busy: too many control clients; try again"))
            return
        client = _Client(sock, time.monotonic() + self.timeout, pid)
        self._clients[client.fd] = client
        assert self._register is not None
        self._register(client.fd, select.EPOLLIN, lambda events: self._on_client(client, events))

    def _make_room(self) -> bool:
        """Close the oldest client still sending its request (after a last read)."""
        for client in [c for c in self._clients.values() if c.state == "reading"]:
            self._on_client(client, select.EPOLLIN)
            if self._clients.get(client.fd) is client and client.state == "reading":
                self.answer(client, ctl_protocol.error("busy: dropped to make room for another client"))
                self._drop(client)
            if len(self._clients) < self.max_clients:
                return True
        return False

    # ------------------------------------------------------------ one client
    def _on_client(self, client: _Client, events: int) -> None:
        if self._clients.get(client.fd) is not client:
            return
        try:
            if client.state == "reading":
                self._read(client)
            elif client.state == "writing":
                self._write(client)
            else:  # waiting for its answer: registered for hang-up only
                self._drop(client)
        except Exception:
            log.exception("control socket: error serving a client; dropping it")
            self._drop(client)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(ctl_protocol.MAX_REQUEST + 1 - len(client.inbuf))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(client)
            return
        if not data:
            if client.inbuf:
                self.rejected += 1
                self.answer(client, ctl_protocol.error("the request has no newline at its end"))
            else:
                self._drop(client)
            return
        client.inbuf += data
        end = client.inbuf.find(b"\n")
        if end < 0 and len(client.inbuf) <= ctl_protocol.MAX_REQUEST:
            return
        if end < 0 or end > ctl_protocol.MAX_REQUEST:
            self.rejected += 1
            self.answer(client, ctl_protocol.error(f"request over {ctl_protocol.MAX_REQUEST} bytes"))
            return
        try:
            request = ctl_protocol.parse_request(bytes(client.inbuf[:end]))
        except ctl_protocol.ProtocolError as exc:
            self.rejected += 1
            self.answer(client, ctl_protocol.error(str(exc)))
            return
        client.inbuf = bytearray()
        client.state = "waiting"
        client.deadline = float("inf")  # the command sets its own deadline, if it waits
        assert self._unregister is not None and self._register is not None
        self._unregister(client.fd)
        self._register(client.fd, 0, lambda events: self._on_client(client, events))  # hang-up only
        try:
            self.handle(request, Reply(self, client))
        except ctl_protocol.ProtocolError as exc:
            self.rejected += 1
            self.answer(client, ctl_protocol.error(str(exc)))
        except Exception as exc:
            log.exception("control socket: command %r failed", request.get("cmd"))
            self.answer(client, ctl_protocol.error(f"internal error: {exc}"))

    def _write(self, client: _Client) -> None:
        try:
            sent = client.sock.send(client.out, socket.MSG_NOSIGNAL)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._drop(client)
            return
        client.out = client.out[sent:]
        if client.out:
            assert self._unregister is not None and self._register is not None
            self._unregister(client.fd)
            self._register(client.fd, select.EPOLLOUT, lambda events: self._on_client(client, events))
            return
        self._drop(client)

    def _drop(self, client: _Client) -> None:
        if self._clients.pop(client.fd, None) is None:
            return
        if self._unregister is not None:
            self._unregister(client.fd)
        client.sock.close()


def _send_and_close(sock: socket.socket, data: bytes) -> None:
    with contextlib.suppress(OSError):
        sock.send(data, socket.MSG_NOSIGNAL)
    sock.close()


def _bind(path: str) -> socket.socket:
    """A listening unix socket at ``path``, mode 0600. A socket file nobody listens on
    (a dead primary's) is replaced; a live one, a symlink or any other file is an error."""
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o177)  # the file is created 0600: no window with looser rights
    try:
        sock.bind(path)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise ControlError(exc.errno, f"cannot create control socket {path}: {exc.strerror or exc}") from None
    finally:
        os.umask(old_umask)
    return sock


def _remove_stale(path: str) -> None:
    try:
        mode = os.lstat(path).st_mode  # lstat: a symlink is refused, never followed
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ControlError(exc.errno, f"cannot create control socket {path}: {exc.strerror or exc}") from None
    if not stat.S_ISSOCK(mode):
        raise ControlError(errno.EEXIST, f"cannot create control socket {path}: a file that is not a socket is there")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    try:
        err = probe.connect_ex(path)
    finally:
        probe.close()
    if err == errno.ECONNREFUSED:
        try:
            os.unlink(path)  # a dead primary's
        except OSError as exc:
            raise ControlError(exc.errno, f"cannot remove the stale control socket {path}: {exc.strerror or exc}") from None
    elif err in (0, errno.EAGAIN, errno.EINPROGRESS):
        raise ControlError(errno.EADDRINUSE, f"cannot create control socket {path}: another primary is listening there")
    elif err == errno.EACCES:
        raise ControlError(errno.EACCES, f"cannot create control socket {path}: a socket of another user is there")

"""One ``Config`` object: every option of the server, checked before anything forks."""

from __future__ import annotations

import grp
import os
import pwd
import socket
import ssl as _ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dispatch.balance import MODES, USER_MODES, ConnectionPolicy, Policy

Handler = Callable[..., Any] | str

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class Address:
    """One address to listen on, parsed from ``HOST:PORT``, ``[V6]:PORT`` or ``unix:PATH``."""

    family: int
    host: str  # the path for AF_UNIX
    port: int = 0

    @classmethod
    def parse(cls, text: str) -> Address:
        if not isinstance(text, str):
            raise TypeError(f"bind address must be a string, not {type(text).__name__}")
        if text.startswith("unix:"):
            path = text[len("unix:") :]
            if not path:
                raise ValueError(f"bind address {text!r} has an empty path")
            return cls(socket.AF_UNIX, path)
        host, sep, port_text = text.rpartition(":")
        if not sep or not (port_text.isascii() and port_text.isdigit()):
            raise ValueError(f"bind address {text!r} is not HOST:PORT, [IPV6]:PORT or unix:PATH")
        port = int(port_text)
        if port > 65535:
            raise ValueError(f"bind address {text!r}: port {port} is out of range")
        if host.startswith("[") and host.endswith("]"):
            if len(host) == 2:
                raise ValueError(f"bind address {text!r} has an empty IPv6 host")
            return cls(socket.AF_INET6, host[1:-1], port)
        if ":" in host:
            raise ValueError(f"bind address {text!r}: write IPv6 hosts in brackets, [::1]:PORT")
        return cls(socket.AF_INET, host or "0.0.0.0", port)

    def __str__(self) -> str:
        if self.family == socket.AF_UNIX:
            return f"unix:{self.host}"
        if self.family == socket.AF_INET6:
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, not {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _positive_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return float(value)


def _non_negative_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number of seconds, 0 or more; got {value}")
    return float(value)


def _check_import_string(text: str) -> None:
    module, sep, attr = text.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"handler import string {text!r} must look like 'package.module:attr'")


@dataclass(frozen=True)
class Config:
    """Everything ``serve()``/``Server`` take; the CLI maps onto it flag for flag.

    Validation happens here, in the constructor, so that a bad argument raises
    ``TypeError``/``ValueError`` before any socket is bound or process forked.
    """

    handler: Handler
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    bind: Sequence[str] | str = "127.0.0.1:8000"
    balance: str | Policy | ConnectionPolicy = "round-robin"
    threads: int = 1
    max_connections: int = 0
    client_timeout: float = 5.0
    server_speaks_first: bool = False
    backlog: int = 2048
    timeout: float = 30.0
    graceful_timeout: float = 30.0
    boot_timeout: float = 30.0
    max_requests: int = 0
    max_requests_jitter: int = 0
    max_memory: int = 0
    restart_batch: int = 1
    health: str | None = None
    pidfile: str | None = None
    preload: bool = False
    log_level: str = "info"
    accept_batch: int = 256
    ssl: _ssl.SSLContext | None = None
    user: str | int | None = None
    group: str | int | None = None
    on_starting: Callable[[Any], None] | None = None
    on_worker_start: Callable[[int], None] | None = None
    on_worker_exit: Callable[[int, int, str], None] | None = None
    on_reload: Callable[[Any], None] | None = None

    def __post_init__(self) -> None:
        if isinstance(self.handler, str):
            _check_import_string(self.handler)
        elif not callable(self.handler):
            raise TypeError(f"handler must be callable or 'module:attr', not {self.handler!r}")
        _positive_int("workers", self.workers)
        _positive_int("threads", self.threads)
        _positive_int("max_connections", self.max_connections, 0)
        _positive_int("backlog", self.backlog)
        _positive_int("restart_batch", self.restart_batch)
        _positive_int("accept_batch", self.accept_batch)
        if self.accept_batch > 4096:
            raise ValueError(f"accept_batch must be at most 4096, got {self.accept_batch}")
        _positive_int("max_requests", self.max_requests, 0)
        _positive_int("max_requests_jitter", self.max_requests_jitter, 0)
        _positive_int("max_memory", self.max_memory, 0)
        for name in ("timeout", "graceful_timeout", "boot_timeout"):
            _positive_float(name, getattr(self, name))
        _non_negative_float("client_timeout", self.client_timeout)
        if not isinstance(self.server_speaks_first, bool):
            raise TypeError("server_speaks_first must be True or False")
        if isinstance(self.balance, str):
            if self.balance not in MODES:
                raise ValueError(f"balance must be one of {', '.join(MODES)}; got {self.balance!r}")
        elif not isinstance(self.balance, (Policy, ConnectionPolicy)):
            raise TypeError(
                "balance must be a mode name, or a policy with needs_loads and assign() or choose()"
            )
        binds = [self.bind] if isinstance(self.bind, str) else list(self.bind)
        if not binds:
            raise ValueError("bind needs at least one address")
        addresses = tuple(Address.parse(text) for text in binds)
        if self.balance == "reuseport" and any(a.family == socket.AF_UNIX for a in addresses):
            raise ValueError("balance='reuseport' needs TCP addresses; unix sockets have no SO_REUSEPORT")
        object.__setattr__(self, "addresses", addresses)
        if self.health is not None:
            text = self.health
            if isinstance(text, str) and (text.isdigit() or text.startswith(":")):
                text = f"127.0.0.1:{text.lstrip(':')}"  # it exposes internals: loopback unless told
            health = Address.parse(text)
            if health.family == socket.AF_UNIX:
                raise ValueError("health must be HOST:PORT")
            object.__setattr__(self, "health_address", health)
        if not isinstance(self.log_level, str) or self.log_level.lower() not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
        if self.preload and not isinstance(self.handler, str):
            raise ValueError("preload applies to an import-string handler")
        if self.ssl is not None and not isinstance(self.ssl, _ssl.SSLContext):
            raise TypeError(f"ssl must be an ssl.SSLContext, not {type(self.ssl).__name__}")
        for hook in ("on_starting", "on_worker_start", "on_worker_exit", "on_reload"):
            if getattr(self, hook) is not None and not callable(getattr(self, hook)):
                raise TypeError(f"{hook} must be callable")
        object.__setattr__(self, "uid", _lookup_user(self.user))
        object.__setattr__(self, "gid", _lookup_group(self.group, self.user))

    addresses: tuple[Address, ...] = field(init=False, repr=False, default=())
    health_address: Address | None = field(init=False, repr=False, default=None)
    uid: int | None = field(init=False, repr=False, default=None)
    gid: int | None = field(init=False, repr=False, default=None)

    @property
    def user_space(self) -> bool:
        """True when the primary accepts and passes descriptors itself."""
        return not isinstance(self.balance, str) or self.balance in USER_MODES

    @property
    def heartbeat_interval(self) -> float:
        """How often workers report: often enough that a report is never stale for long."""
        return min(1.0, self.timeout / 4)

    @property
    def stall_after(self) -> float:
        """Silence after which a worker gets no new connections: 2.5 missed reports, well
        before ``timeout`` kills it."""
        return 2.5 * self.heartbeat_interval


def _lookup_user(user: str | int | None) -> int | None:
    """A uid from a uid, a numeric string (a uid: useradd refuses all-digit names) or a name."""
    if user is None:
        return None
    if isinstance(user, str) and user.isascii() and user.isdigit():
        user = int(user)
    if isinstance(user, int) and not isinstance(user, bool):
        if not 0 <= user < 2**32 - 1:  # (uid_t)-1 tells setresuid() "leave it unchanged"
            raise ValueError(f"user {user} is out of range")
        return user
    if not isinstance(user, str):
        raise TypeError(f"user must be a name or uid, not {type(user).__name__}")
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        raise ValueError(f"user {user!r} does not exist") from None


def _lookup_group(group: str | int | None, user: str | int | None) -> int | None:
    """A gid from a gid, a numeric string or a name; by default the user's own group."""
    if group is None:
        uid = _lookup_user(user)
        if uid is None:
            return None
        try:
            return pwd.getpwuid(uid).pw_gid
        except KeyError:
            # No guess: a gid opens files as a uid does, and the usual fallback 65534 is
            # also the overflow gid that NFS and user namespaces give unmapped owners.
            raise ValueError(f"user {uid} has no passwd entry; pass group= too") from None
    if isinstance(group, str) and group.isascii() and group.isdigit():
        group = int(group)
    if isinstance(group, int) and not isinstance(group, bool):
        if not 0 <= group < 2**32 - 1:  # (gid_t)-1 tells setresgid() "leave it unchanged"
            raise ValueError(f"group {group} is out of range")
        return group
    if not isinstance(group, str):
        raise TypeError(f"group must be a name or gid, not {type(group).__name__}")
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ValueError(f"group {group!r} does not exist") from None

"""Every option of ``serve()``/``Server``/``Config``, declared once.

Each ``Option`` holds the default, the check, the CLI flag and the help text. ``Config``
validates with the checks and takes its defaults from here, the CLI builds its parser from the
flags, and the README's options table is ``markdown_table()``: adding an option means one
declaration here, a typed field in ``Config`` and in ``Options`` (a test keeps the three in
step), and the code that uses it.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any, TypedDict

from dispatch.balance import MODES, ConnectionPolicy, Policy

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

#: A check gets the option's name and the given value; it raises TypeError/ValueError naming both.
Check = Callable[[str, Any], None]


# ------------------------------------------------------------------ values
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


def parse_binds(bind: str | Sequence[str]) -> tuple[Address, ...]:
    """The addresses of ``bind``: one string or a non-empty list of them."""
    texts = [bind] if isinstance(bind, str) else list(bind)
    if not texts:
        raise ValueError("bind needs at least one address")
    return tuple(Address.parse(text) for text in texts)


def parse_health(health: str | None) -> Address | None:
    """The health endpoint's address; a bare ``PORT`` or ``:PORT`` means loopback."""
    if health is None:
        return None
    if isinstance(health, str) and (health.isdigit() or health.startswith(":")):
        health = f"127.0.0.1:{health.lstrip(':')}"  # it exposes internals: loopback unless told
    address = Address.parse(health)
    if address.family == socket.AF_UNIX:
        raise ValueError("health must be HOST:PORT")
    return address


def lookup_user(user: str | int | None) -> int | None:
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


def lookup_group(group: str | int | None, user: str | int | None) -> int | None:
    """A gid from a gid, a numeric string or a name; by default the user's own group."""
    if group is None:
        uid = lookup_user(user)
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


# ------------------------------------------------------------------ checks
def _int(minimum: int, maximum: int | None = None) -> Check:
    def check(name: str, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, not {type(value).__name__}")
        if value < minimum:
            raise ValueError(f"{name} must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise ValueError(f"{name} must be at most {maximum}, got {value}")

    return check


def _number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, not {type(value).__name__}")


def _seconds(name: str, value: Any) -> None:
    _number(name, value)
    if not value > 0:  # also refuses NaN
        raise ValueError(f"{name} must be positive, got {value}")


def _seconds_or_off(name: str, value: Any) -> None:
    _number(name, value)
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"{name} must be a finite number of seconds, 0 or more; got {value}")


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, not {type(value).__name__}")


def _callable(name: str, value: Any) -> None:
    if value is not None and not callable(value):
        raise TypeError(f"{name} must be callable, not {type(value).__name__}")


def _balance(name: str, value: Any) -> None:
    if isinstance(value, str):
        if value not in MODES:
            raise ValueError(f"{name} must be one of {', '.join(MODES)}; got {value!r}")
    elif not isinstance(value, (Policy, ConnectionPolicy)):
        raise TypeError(
            f"{name} must be a mode name, or a policy with needs_loads and assign() or choose()"
        )


def _log_level(name: str, value: Any) -> None:
    if not isinstance(value, str) or value.lower() not in LOG_LEVELS:
        raise ValueError(f"{name} must be one of {', '.join(LOG_LEVELS)}; got {value!r}")


def _path(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path, not {type(value).__name__}")


def _ssl(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, SSLContext):
        raise TypeError(f"{name} must be an ssl.SSLContext, not {type(value).__name__}")


def _bind(name: str, value: Any) -> None:
    parse_binds(value)


def _health(name: str, value: Any) -> None:
    parse_health(value)


def _user(name: str, value: Any) -> None:
    lookup_user(value)


def _group(name: str, value: Any) -> None:
    if value is not None:  # None means the user's own group: Config checks that pair
        lookup_group(value, None)


# ------------------------------------------------------------ declarations
@dataclass(frozen=True)
class Option:
    """One option: default, check, CLI flag and help, in one place."""

    name: str
    default: Any
    check: Check
    #: Markdown: the README table's "meaning", and the CLI's help (its first sentence).
    help: str
    #: argparse settings (type, choices, action, metavar); None: no flag (a Python object).
    cli: Mapping[str, Any] | None = field(default_factory=dict)
    short: str | None = None  # a short flag besides --name
    cli_help: str | None = None  # when the first sentence does not read well in a terminal
    shown_default: str | None = None  # the README's default column, when the value says too little

    @property
    def flags(self) -> tuple[str, ...]:
        if self.cli is None:
            return ()
        flag = "--" + self.name.replace("_", "-")
        return (self.short, flag) if self.short else (flag,)

    def markdown_default(self) -> str:
        if self.shown_default is not None:
            return self.shown_default
        if isinstance(self.default, str):
            return f'`"{self.default}"`'
        return "none" if self.default is None else format_value(self.default)


def format_value(value: object) -> str:
    """A default as the README and --help show it: 30, not 30.0."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _hook(name: str, text: str) -> Option:
    return Option(name, None, _callable, text, cli=None)


OPTIONS: tuple[Option, ...] = (
    Option("workers", os.cpu_count() or 1, _int(1), "worker processes",
           cli={"type": int}, short="-w", shown_default="`os.cpu_count()`"),
    Option("bind", "127.0.0.1:8000", _bind,
           '`"HOST:PORT"`, `"[::1]:PORT"`, `"unix:/path"`, or a list (CLI: repeat `--bind`). '
           "Port 0 picks a free port; `Server.addresses` tells which",
           cli={"action": "append", "metavar": "ADDRESS"}, short="-b",
           cli_help="HOST:PORT, [IPV6]:PORT or unix:PATH; repeat for more"),
    Option("balance", "round-robin", _balance,
           ", ".join(f"`{mode}`" for mode in MODES) + " (below), or a policy object",
           cli={"choices": MODES}, cli_help="how connections reach workers"),
    Option("threads", 1, _int(1),
           "threads per worker for plain handlers: the most connections such a worker runs at once",
           cli={"type": int}),
    Option("max_connections", 0, _int(0),
           "most connections a worker with a coroutine or protocol handler holds at once. The "
           "primary never has more than that outstanding to the worker (credits: below); the rest "
           "wait in the primary or the listen backlog, where a worker that dies does not lose "
           "them; keep it above the number of keep-alive clients you expect per worker",
           cli={"type": int}, shown_default="0 (no limit but the worker's descriptor table)"),
    Option("client_timeout", 5.0, _seconds_or_off,
           "seconds a client may stay silent: before its first bytes (plain handlers wait for "
           "them on the worker's loop, not in a thread; such a connection is closed after this "
           "long), and in each blocking `recv`/`send` of a plain handler (the socket's timeout). "
           "0 turns both off",
           cli={"type": float}, cli_help="seconds a client may stay silent: before its first "
           "bytes, and in each blocking call of a plain handler; 0 turns both off"),
    Option("server_speaks_first", False, _bool,
           "give plain handlers their connection at once, before the client has sent anything "
           "(SMTP, FTP, banner protocols); the socket timeout still applies",
           cli={"action": "store_true"}),
    Option("backlog", 2048, _int(1),
           "listen backlog: where connections wait when every worker is busy", cli={"type": int}),
    Option("timeout", 30.0, _seconds,
           "seconds without a heartbeat before a worker is killed (`SIGKILL`) and replaced",
           cli={"type": float}),
    Option("graceful_timeout", 30.0, _seconds,
           "seconds a draining worker may take to finish its connections before it is killed",
           cli={"type": float}),
    Option("boot_timeout", 30.0, _seconds,
           "seconds a new worker may take to import the handler and say ready",
           cli={"type": float}),
    Option("max_requests", 0, _int(0), "recycle a worker after this many connections",
           cli={"type": int}, shown_default="0 (off)"),
    Option("max_requests_jitter", 0, _int(0),
           "add a random 0..N to each worker's `max_requests`, so they don't all recycle at once",
           cli={"type": int}),
    Option("max_memory", 0, _int(0),
           "recycle a worker whose resident memory (psutil RSS) exceeds this many bytes (checked "
           "at heartbeats, once the worker is 5 s old)",
           cli={"type": int}, shown_default="0 (off)"),
    Option("restart_batch", 1, _int(1),
           "workers replaced at the same time in a rolling restart", cli={"type": int}),
    Option("health", None, _health,
           '`"HOST:PORT"` for the health and metrics endpoints; a bare `"PORT"` or `":PORT"` '
           "means `127.0.0.1:PORT` (they expose internals)",
           cli={"metavar": "HOST:PORT"}, shown_default="off"),
    Option("pidfile", None, _path,
           "write the primary's pid here after binding; removed on exit. Written under a fresh "
           "random name in its directory (`O_EXCL`, never following a symlink) and renamed into "
           "place; a symlink, directory or special file at the path is refused; any failure is "
           "one line naming the path",
           cli={"metavar": "PATH"}),
    Option("preload", False, _bool,
           "import an import-string handler once in the primary: faster forks, but a rolling "
           "restart then runs the old code",
           cli={"action": "store_true"}),
    Option("log_level", "info", _log_level,
           ", ".join(f"`{level}`" for level in LOG_LEVELS) + " for the `dispatch` logger",
           cli={"choices": LOG_LEVELS}),
    Option("accept_batch", 256, _int(1, 4096),
           "most connections accepted per wakeup of the primary", cli={"type": int}),
    Option("ssl", None, _ssl,
           "an `ssl.SSLContext`; the TLS handshake runs in the worker, never in the primary "
           "(CLI: `--certfile`, `--keyfile`)",
           cli=None),
    Option("user", None, _user,
           "run workers as this user (name or id; a numeric string is an id); the primary binds "
           "first, so it can bind port 80 as root. Workers get exactly the user's supplementary "
           "groups (none for a uid without a passwd entry, which then needs `group`), set the gid "
           "before the uid, and read every id back: a worker that cannot prove the switch exits "
           "without serving"),
    Option("group", None, _group,
           "run workers as this group (name or id; a numeric string is an id); by default the "
           "user's own group"),
    _hook("on_starting", "hook `f(server)` in the primary, after binding, before the first fork"),
    _hook("on_worker_start", "hook `f(worker_id)` in each new worker, after fork, before the "
          "handler is imported (gunicorn's `post_fork`)"),
    _hook("on_worker_exit", "hook `f(worker_id, pid, how)` in the primary when a worker has exited"),
    _hook("on_reload", "hook `f(server)` in the primary when a rolling restart is requested"),
)

BY_NAME: Mapping[str, Option] = {option.name: option for option in OPTIONS}


def default(name: str) -> Any:
    """The declared default of option ``name`` (``Config``'s fields take theirs from here)."""
    return BY_NAME[name].default


class Options(TypedDict, total=False):
    """The keyword options of ``serve()``/``Server``: ``**options: Unpack[Options]``."""

    workers: int
    bind: str | Sequence[str]
    balance: str | Policy | ConnectionPolicy
    threads: int
    max_connections: int
    client_timeout: float
    server_speaks_first: bool
    backlog: int
    timeout: float
    graceful_timeout: float
    boot_timeout: float
    max_requests: int
    max_requests_jitter: int
    max_memory: int
    restart_batch: int
    health: str | None
    pidfile: str | None
    preload: bool
    log_level: str
    accept_batch: int
    ssl: SSLContext | None
    user: str | int | None
    group: str | int | None
    on_starting: Callable[[Any], None] | None
    on_worker_start: Callable[[int], None] | None
    on_worker_exit: Callable[[int, int, str], None] | None
    on_reload: Callable[[Any], None] | None


def markdown_table() -> str:
    """The README's options table, generated so that it cannot drift from the declarations."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    rows += [f"| `{o.name}` | {o.markdown_default()} | {o.help} |" for o in OPTIONS]
    return "\n".join(rows) + "\n"

"""Every option of ``serve()``/``Server``/``Config``, declared once.

Each ``Option`` holds the default, the check, the CLI flag and the help text. ``Config``
validates with the checks and takes its defaults from here, the CLI builds its parser from the
flags, and the README's options table is ``markdown_table()``: adding an option means one
declaration here, a typed field in ``Config`` and in ``Options`` (a test keeps the three in
step), and the code that uses it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from ssl import SSLContext
from typing import Any, TypedDict

from dispatch.balance import MODES, ConnectionPolicy, Policy

# Re-exported: the parsers of values, here since Config and callers import them from here.
from dispatch.values import Address as Address
from dispatch.values import lookup_group as lookup_group
from dispatch.values import lookup_user as lookup_user
from dispatch.values import parse_binds as parse_binds
from dispatch.values import parse_health as parse_health
from dispatch.values import parse_networks as parse_networks

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
#: What the handler is: detected in each worker after it is imported, unless given.
INTERFACES = ("auto", "asgi", "wsgi", "handler")
#: The worker's event loop, and the HTTP parser of web apps, spelled as uvicorn spells them.
LOOPS = ("auto", "asyncio", "uvloop")
HTTP_PARSERS = ("auto", "httptools", "h11")
#: Which PROXY protocol headers the workers read (``auto``: either version).
PROXY_PROTOCOLS = ("off", "v1", "v2", "auto")

#: A check gets the option's name and the given value; it raises TypeError/ValueError naming both.
Check = Callable[[str, Any], None]


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


def _choice(choices: Sequence[str]) -> Check:
    def check(name: str, value: Any) -> None:
        if value not in choices:
            raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")

    return check


def _text(name: str, value: Any) -> None:
    if value is not None and not isinstance(value, str):
        raise TypeError(f"{name} must be a string, not {type(value).__name__}")


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


def _tcp_address(name: str, value: Any) -> None:
    parse_health(value, name)


def _networks(name: str, value: Any) -> None:
    parse_networks(value, name)


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
           "threads per worker for plain handlers (the most connections such a worker runs at once) "
           "and for WSGI apps (the most requests it runs at once)",
           cli={"type": int}),
    Option("max_connections", 0, _int(0),
           "most connections a worker with a coroutine or protocol handler, or a web app, holds at "
           "once (a WebSocket is one). The "
           "primary never has more than that outstanding to the worker (credits: below); the rest "
           "wait in the primary or the listen backlog, where a worker that dies does not lose "
           "them; keep it above the number of keep-alive clients you expect per worker",
           cli={"type": int}, shown_default="0 (no limit but the worker's descriptor table)"),
    Option("client_timeout", 5.0, _seconds_or_off,
           "seconds a client may stay silent: before its first bytes (plain handlers wait for "
           "them on the worker's loop, not in a thread; such a connection is closed after this "
           "long), and in each blocking `recv`/`send` of a plain handler (the socket's timeout). "
           "For web apps: before the first request, and between requests on a keep-alive "
           "connection. 0 turns them off",
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
    Option("drain_delay", 0.0, _seconds_or_off,
           "seconds a graceful stop keeps accepting and serving after `/readyz` turned 503, so "
           "that load balancers see it and stop sending first (what a Kubernetes `preStop: "
           "sleep` does); then it drains as usual. A second stop signal stops at once",
           cli={"type": float}, cli_help="seconds a graceful stop keeps serving after /readyz "
           "turned 503, before it drains"),
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
    Option("probe", None, _tcp_address,
           '`"HOST:PORT"` serving only `/healthz` and `/readyz`, for a load balancer or '
           "Kubernetes, while `/cluster-health` and `/metrics` stay on `health`; a bare "
           '`"PORT"` means `127.0.0.1:PORT`',
           cli={"metavar": "HOST:PORT"}, shown_default="off"),
    Option("agent", None, _tcp_address,
           '`"HOST:PORT"` answering HAProxy\'s `agent-check`: `up` with a weight from the '
           "workers' load (`100%` idle, lower as they fill; never below `1%`), `drain` while "
           "not ready or drained (`SIGWINCH`, `dispatch ctl drain`), `maint` once stopping (Running a fleet, below)",
           cli={"metavar": "HOST:PORT"}, shown_default="off",
           cli_help="HOST:PORT answering HAProxy's agent-check with state and a load weight"),
    Option("pidfile", None, _path,
           "write the primary's pid here after binding; removed on exit. Written under a fresh "
           "random name in its directory (`O_EXCL`, never following a symlink) and renamed into "
           "place; a symlink, directory or special file at the path is refused; any failure is "
           "one line naming the path",
           cli={"metavar": "PATH"}),
    Option("control", None, _path,
           "unix socket for `dispatch ctl` and `dispatch top` (Operating, below): created mode "
           "0600, and only a peer of the primary's uid or root is served (`SO_PEERCRED`)",
           cli={"metavar": "PATH"}, shown_default="beside the pidfile (`app.pid`: `app.ctl`); "
           "none without one", cli_help="unix socket for dispatch ctl and dispatch top"),
    Option("preload", False, _bool,
           "import an import-string handler once in the primary: faster forks, but a rolling "
           "restart then runs the old code",
           cli={"action": "store_true"}),
    Option("log_level", "info", _log_level,
           ", ".join(f"`{level}`" for level in LOG_LEVELS) + " for the `dispatch` logger",
           cli={"choices": LOG_LEVELS}),
    Option("accept_batch", 256, _int(1, 4096),
           "most connections accepted per wakeup of the primary", cli={"type": int}),
    Option("skip_busy", True, _bool,
           "user-space modes: pass over a worker that has not read what it was already given "
           "(its channel holds unread connections, seen with `SIOCOUTQ`; with least-connections and "
           "sticky, only those sent 0.25 ms ago or more) while another worker is reading, so a "
           "connection never waits behind a blocked event loop; "
           "`/cluster-health` counts the skips per worker",
           cli={"action": argparse.BooleanOptionalAction}, cli_help="pass over workers that have not "
           "read what they were given (--no-skip-busy: plain push)"),
    Option("reclaim_after", 0.001, _seconds_or_off,
           "least-connections (policies that weigh fresh loads), with `skip_busy`: seconds a worker may leave "
           "connections unread in its channel while another worker has read everything; then the "
           "primary takes them back (it holds the worker's end of the channel too) and passes "
           "them to a worker that is reading. A connection given to a worker just before its "
           "loop blocks waits this long (the poll timer rounds it up to whole milliseconds), not the whole block. 0: never (they wait for the "
           "worker, or for `stall_after`). Never more than evens the two workers' loads; round-robin "
           "(stale loads: its workers report in batches) and sticky keep their choice",
           cli={"type": float, "metavar": "SECONDS"},
           cli_help="seconds before connections a worker has not read go to one that is reading (0: never)"),
    Option("one_per_message_below", 0, _int(0, 1_000_000),
           "user-space modes: a worker holding fewer than this many connections gets new ones "
           "one per channel message, so it starts one per loop pass and the rest wait unread, "
           "where `skip_busy` and `reclaim_after` can still move them if its loop blocks. Lower "
           "tail latency at moderate load, more messages and loop passes per connection at "
           "saturation (Benchmarks, below); 0: whole batches",
           cli={"type": int, "metavar": "N"}, shown_default="0 (off)",
           cli_help="a worker holding fewer than N connections gets them one per message (0: off)"),
    Option("worker_nice", 0, _int(0, 19),
           "workers lower their own scheduling priority by this much (`nice`) when they start, so "
           "that when every core is busy the primary, which every new connection passes through, "
           "gets a CPU before them (as nginx's `worker_priority`). Lowers the tail latency of "
           "least-connections next to CPU-bound requests on a machine the server has to itself "
           "(Benchmarks, below); on a shared machine the workers also yield to every other program "
           "running at the default priority. Needs no privilege; 0: unchanged",
           cli={"type": int, "metavar": "N"}, shown_default="0 (unchanged)",
           cli_help="workers run this much nicer than the primary (0-19; 0: unchanged)"),
    Option("worker_affinity", False, _bool,
           "pin each worker to one CPU: worker N runs only on the Nth of the CPUs the server may "
           "use (its affinity mask, which a container's cpuset or `taskset` sets), wrapping around "
           "when there are more workers than CPUs; replacements take their slot's CPU (as nginx's "
           "`worker_cpu_affinity auto`). Without it the kernel may queue an idle worker behind a "
           "busy one on the same core while the other core runs something else; with it, a worker "
           "whose loop a CPU-heavy request holds never delays another one. Lowers least-connections' "
           "tail latency next to CPU-bound requests on a machine the server has to itself "
           "(Benchmarks, below); a worker cannot move away from a core that other programs keep "
           "busy. A failure is logged and the worker serves unpinned",
           cli={"action": argparse.BooleanOptionalAction},
           cli_help="pin worker N to the Nth CPU the server may use"),
    Option("primary_realtime", 0, _int(0, 99),
           "run the primary's loop under `SCHED_FIFO` at this priority (1-99), so that it runs the "
           "moment a connection arrives, ahead of the workers and of every other ordinary process, "
           "however busy the cores are; the workers (forked with `SCHED_RESET_ON_FORK`) keep the "
           "ordinary policy. Needs `CAP_SYS_NICE` or `RLIMIT_RTPRIO`; refused, it is logged and "
           "the primary runs as before. The kernel's real-time throttling bounds what it can take "
           "(95% of a CPU by default). Lowers the tail latency at moderate load (with `pull`, below "
           "the shared listener's) and costs a fifth to a third of the peak connection rate "
           "(Balance modes, below); 0: off",
           cli={"type": int, "metavar": "PRIORITY"}, shown_default="0 (off)",
           cli_help="run the primary under SCHED_FIFO at this priority (1-99; 0: off)"),
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
    Option("interface", "auto", _choice(INTERFACES),
           "what the handler is: `asgi` (FastAPI, Starlette...), `wsgi` (Flask, Django...), "
           "`handler` (the shapes above), or `auto`: each worker looks at the imported object "
           "(Web apps, below) and refuses to boot, naming this option, when it cannot tell",
           cli={"choices": INTERFACES}, cli_help="asgi, wsgi, handler, or auto: detected in "
           "each worker"),
    Option("loop", "auto", _choice(LOOPS),
           "the worker's event loop: `auto` is uvloop for web apps when it is installed, "
           "asyncio otherwise; `uvloop` applies to every handler",
           cli={"choices": LOOPS}, cli_help="the worker's event loop (auto: uvloop for web apps "
           "if installed)"),
    Option("http", "auto", _choice(HTTP_PARSERS),
           "HTTP parser of web apps: `auto` is httptools when it is installed, h11 otherwise",
           cli={"choices": HTTP_PARSERS}),
    Option("proxy_headers", False, _bool,
           "web apps: trust `X-Forwarded-For` and `X-Forwarded-Proto` from the addresses in "
           "`forwarded_allow_ips` for the client's address and scheme (uvicorn's semantics)",
           cli={"action": "store_true"}, cli_help="web apps: trust X-Forwarded-For/-Proto from "
           "--forwarded-allow-ips"),
    Option("forwarded_allow_ips", None, _text,
           "web apps: comma-separated addresses or networks trusted with `proxy_headers`, or "
           '`"*"`; by default `$FORWARDED_ALLOW_IPS` or `127.0.0.1,::1`',
           cli={"metavar": "IPS"}),
    Option("access_log", False, _bool,
           "web apps: log one line per request (uvicorn's `uvicorn.access` logger)",
           cli={"action": "store_true"}),
    Option("proxy_protocol", "off", _choice(PROXY_PROTOCOLS),
           "read a PROXY protocol header (`v1`, `v2`, or `auto`: either) from each connection "
           "of a sender in `proxy_allow`, in the worker, before the handler sees it: `addr`, "
           "ASGI `client` and WSGI `REMOTE_ADDR` are then the real client. A sender in "
           "`proxy_allow` without a valid header, or a header from anyone else, is closed "
           "(a debug line); the header must arrive within `client_timeout` (5 s when that is 0)",
           cli={"choices": PROXY_PROTOCOLS}, cli_help="read PROXY protocol headers from "
           "--proxy-allow senders (v1, v2, auto: either)"),
    Option("proxy_allow", "127.0.0.1,::1", _networks,
           "comma-separated addresses or networks (CIDR) allowed to send PROXY headers, or "
           '`"*"`; peers on unix sockets always are',
           cli={"metavar": "CIDRS"}),
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
    drain_delay: float
    boot_timeout: float
    max_requests: int
    max_requests_jitter: int
    max_memory: int
    restart_batch: int
    health: str | None
    probe: str | None
    agent: str | None
    pidfile: str | None
    control: str | None
    preload: bool
    log_level: str
    accept_batch: int
    skip_busy: bool
    reclaim_after: float
    one_per_message_below: int
    worker_nice: int
    worker_affinity: bool
    primary_realtime: int
    ssl: SSLContext | None
    user: str | int | None
    group: str | int | None
    interface: str
    loop: str
    http: str
    proxy_headers: bool
    forwarded_allow_ips: str | None
    access_log: bool
    proxy_protocol: str
    proxy_allow: str | None
    on_starting: Callable[[Any], None] | None
    on_worker_start: Callable[[int], None] | None
    on_worker_exit: Callable[[int, int, str], None] | None
    on_reload: Callable[[Any], None] | None


def markdown_table() -> str:
    """The README's options table, generated so that it cannot drift from the declarations."""
    rows = ["| option | default | meaning |", "|---|---|---|"]
    rows += [f"| `{o.name}` | {o.markdown_default()} | {o.help} |" for o in OPTIONS]
    return "\n".join(rows) + "\n"

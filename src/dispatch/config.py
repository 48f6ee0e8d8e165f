"""One ``Config`` object: every option of the server, checked before anything forks.

The options are declared in ``dispatch.options`` (default, check, CLI flag, help). ``Config``
holds their values as typed attributes, runs their checks, checks the combinations no single
option can see, and derives once what the rest of the code reads: addresses, ids, the policy.
"""

from __future__ import annotations

import os
import socket
import ssl as _ssl
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dispatch.balance import USER_MODES, ConnectionPolicy, Policy, Pull, make_policy
from dispatch.ctl_protocol import default_path
from dispatch.options import (
    OPTIONS,
    Address,
    default,
    lookup_group,
    lookup_user,
    parse_binds,
    parse_health,
)

__all__ = ["Address", "Config", "Handler"]

Handler = Callable[..., Any] | str


@dataclass(frozen=True)
class Config:
    """Everything ``serve()``/``Server`` take; the CLI maps onto it flag for flag.

    Validation happens here, in the constructor, so that a bad argument raises
    ``TypeError``/``ValueError`` before any socket is bound or process forked.
    The fields are the options of ``dispatch.options``, in its order, with its defaults.
    """

    handler: Handler
    workers: int = default("workers")
    bind: str | Sequence[str] = default("bind")
    balance: str | Policy | ConnectionPolicy = default("balance")
    threads: int = default("threads")
    max_connections: int = default("max_connections")
    client_timeout: float = default("client_timeout")
    server_speaks_first: bool = default("server_speaks_first")
    backlog: int = default("backlog")
    timeout: float = default("timeout")
    graceful_timeout: float = default("graceful_timeout")
    drain_delay: float = default("drain_delay")
    boot_timeout: float = default("boot_timeout")
    max_requests: int = default("max_requests")
    max_requests_jitter: int = default("max_requests_jitter")
    max_memory: int = default("max_memory")
    restart_batch: int = default("restart_batch")
    health: str | None = default("health")
    probe: str | None = default("probe")
    agent: str | None = default("agent")
    pidfile: str | None = default("pidfile")
    control: str | None = default("control")
    preload: bool = default("preload")
    log_level: str = default("log_level")
    accept_batch: int = default("accept_batch")
    skip_busy: bool = default("skip_busy")
    reclaim_after: float = default("reclaim_after")
    one_per_message_below: int = default("one_per_message_below")
    worker_nice: int = default("worker_nice")
    worker_affinity: bool = default("worker_affinity")
    primary_realtime: int = default("primary_realtime")
    ssl: _ssl.SSLContext | None = default("ssl")
    user: str | int | None = default("user")
    group: str | int | None = default("group")
    interface: str = default("interface")
    loop: str = default("loop")
    http: str = default("http")
    proxy_headers: bool = default("proxy_headers")
    forwarded_allow_ips: str | None = default("forwarded_allow_ips")
    access_log: bool = default("access_log")
    proxy_protocol: str = default("proxy_protocol")
    proxy_allow: str | None = default("proxy_allow")
    on_starting: Callable[[Any], None] | None = default("on_starting")
    on_worker_start: Callable[[int], None] | None = default("on_worker_start")
    on_worker_exit: Callable[[int, int, str], None] | None = default("on_worker_exit")
    on_reload: Callable[[Any], None] | None = default("on_reload")

    # Derived in __post_init__, not arguments (dataclasses.replace computes them afresh).
    addresses: tuple[Address, ...] = field(init=False, repr=False, default=())
    health_address: Address | None = field(init=False, repr=False, default=None)
    probe_address: Address | None = field(init=False, repr=False, default=None)
    agent_address: Address | None = field(init=False, repr=False, default=None)
    uid: int | None = field(init=False, repr=False, default=None)
    gid: int | None = field(init=False, repr=False, default=None)
    #: The policy object in user-space modes (a fresh one for a mode name), None in kernel modes.
    policy: Policy | ConnectionPolicy | None = field(
        init=False, repr=False, compare=False, default=None
    )

    def __post_init__(self) -> None:
        _check_handler(self.handler)
        for option in OPTIONS:
            option.check(option.name, getattr(self, option.name))
        # What no single option's check can see.
        if self.preload and not isinstance(self.handler, str):
            raise ValueError("preload applies to an import-string handler")
        addresses = parse_binds(self.bind)
        if self.balance == "reuseport" and any(a.family == socket.AF_UNIX for a in addresses):
            raise ValueError("balance='reuseport' needs TCP addresses; unix sockets have no SO_REUSEPORT")
        policy: Policy | ConnectionPolicy | None
        if isinstance(self.balance, str):
            policy = make_policy(self.balance) if self.balance in USER_MODES else None
        else:
            policy = self.balance
        derived = {
            "addresses": addresses,
            "health_address": parse_health(self.health),
            "probe_address": parse_health(self.probe, "probe"),
            "agent_address": parse_health(self.agent, "agent"),
            "uid": lookup_user(self.user),
            "gid": lookup_group(self.group, self.user),  # the user's group unless told
            "policy": policy,
        }
        for name, value in derived.items():
            object.__setattr__(self, name, value)  # frozen: the one place it is set

    @property
    def control_path(self) -> str | None:
        """Where the control socket is: ``control``, or beside the pidfile, or nowhere."""
        if self.control is not None:
            return os.fspath(self.control)
        return default_path(os.fspath(self.pidfile)) if self.pidfile else None

    @property
    def needs_loads(self) -> bool:
        """True when the policy balances on each worker's load (completions)."""
        return self.policy is not None and bool(self.policy.needs_loads)

    @property
    def pulls(self) -> bool:
        """True when workers take connections from one shared queue (``balance="pull"``)."""
        return isinstance(self.policy, Pull)

    @property
    def user_space(self) -> bool:
        """True when the primary accepts and passes descriptors itself."""
        return self.policy is not None

    @property
    def heartbeat_interval(self) -> float:
        """How often workers report: often enough that a report is never stale for long."""
        return min(1.0, self.timeout / 4)

    @property
    def stall_after(self) -> float:
        """Silence after which a worker gets no new connections: 2.5 missed reports, well
        before ``timeout`` kills it."""
        return 2.5 * self.heartbeat_interval


def _check_handler(handler: object) -> None:
    """The handler is not an option: a callable, or an import string ``package.module:attr``."""
    if isinstance(handler, str):
        module, sep, attr = handler.partition(":")
        if not sep or not module or not attr:
            raise ValueError(f"handler import string {handler!r} must look like 'package.module:attr'")
    elif not callable(handler):
        raise TypeError(f"handler must be callable or 'module:attr', not {handler!r}")

"""The values of options that name things outside Python: addresses, networks, users, groups.

Parsed here, once, so that ``Config`` can check them before anything is bound or forked;
``dispatch.options`` re-exports them.
"""

from __future__ import annotations

import grp
import ipaddress
import pwd
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


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


def parse_health(health: str | None, name: str = "health") -> Address | None:
    """The health endpoint's address (or the probe's, the agent's: ``name``); a bare
    ``PORT`` or ``:PORT`` means loopback."""
    if health is None:
        return None
    if isinstance(health, str) and (health.isdigit() or health.startswith(":")):
        health = f"127.0.0.1:{health.lstrip(':')}"  # it exposes internals: loopback unless told
    address = Address.parse(health)
    if address.family == socket.AF_UNIX:
        raise ValueError(f"{name} must be HOST:PORT")
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


def parse_networks(text: str | None, name: str = "proxy_allow") -> tuple[Network, ...]:
    """Trusted senders from ``"127.0.0.1, 10.0.0.0/8, ::1"``; ``"*"`` is everyone.

    Raises ``ValueError`` naming the entry that is not an address or network.
    """
    if text is None:
        return ()
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a string, not {type(text).__name__}")
    networks: list[Network] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if item == "*":
            networks += [ipaddress.ip_network("0.0.0.0/0"), ipaddress.ip_network("::/0")]
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{name}: {item!r} is not an address or network") from None
    return tuple(networks)


def trusted(peer: object, networks: Iterable[Network]) -> bool:
    """Whether a peer (``getpeername()``) may send a header; unix peers may."""
    if not isinstance(peer, tuple):
        return isinstance(peer, (str, bytes))  # AF_UNIX: a path, or '' unnamed
    try:
        address = ipaddress.ip_address(peer[0])
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack listener's view of an IPv4 client
    return any(address in network for network in networks)

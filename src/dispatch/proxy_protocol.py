"""The PROXY protocol, versions 1 and 2, sans I/O: bytes in, a header (or a verdict) out.

A load balancer that terminates TCP (HAProxy ``send-proxy``/``send-proxy-v2``, AWS NLB,
Envoy) writes one header before the client's first byte, naming the client's address.
This module reads that header from the bytes at the start of a connection and says how
many of them it took; the sockets live in :mod:`dispatch.proxy_gate`.

Strict, as the specification asks of receivers (haproxy.org, ``proxy-protocol.txt``):

- v1: ``PROXY TCP4|TCP6 SRC DST SPORT DPORT\\r\\n``, single spaces, at most 107 bytes,
  IPv4 in dotted quads, IPv6 without a zone, ports in decimal without leading
  zeros; ``PROXY UNKNOWN ...\\r\\n`` keeps the connection's own addresses;
- v2: the 12-byte signature, version 2, command ``LOCAL`` (the balancer's own health
  check: keep the connection's addresses) or ``PROXY``, family and transport among the
  defined values, and an address block long enough for its family. TLVs after the
  addresses are skipped, not interpreted. ``MAX_V2_LENGTH`` bounds the whole header.

Anything else raises :class:`ProxyProtocolError`. ``parse`` returns ``None`` while the
bytes are a correct but incomplete header, so the caller reads more (with a deadline).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass

#: The v2 signature: 12 bytes that no v1 header or HTTP request can start with.
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_SIGNATURE = b"PROXY "
#: The longest v1 header, CRLF included (the specification's bound).
V1_MAX_LENGTH = 107
#: The longest v2 header we take (16-byte head plus addresses and TLVs). The protocol
#: allows 65,551; balancers send well under 1 KiB; more is a client wasting our memory.
MAX_V2_LENGTH = 4096
#: Bytes a caller should peek to see any header whole (v1, or v2 up to ``MAX_V2_LENGTH``).
MAX_LENGTH = max(V1_MAX_LENGTH, MAX_V2_LENGTH)

#: Address: ``(host, port)`` for IPv4, ``(host, port, 0, 0)`` for IPv6, as ``getpeername``.
Address = tuple[str, int] | tuple[str, int, int, int]

_V2_HEAD = struct.Struct("!12sBBH")
_V2_FAMILIES = {0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32}  # (family << 4) | transport


class ProxyProtocolError(ValueError):
    """Bytes that are not a valid PROXY header (of an accepted version)."""


@dataclass(frozen=True)
class Header:
    """A complete header: its ``version``, its ``length`` in bytes (what to consume), and
    the client's ``source`` and the ``destination`` it connected to — both None when the
    header says to keep the connection's own addresses (v1 ``UNKNOWN``, v2 ``LOCAL``,
    ``AF_UNSPEC`` or ``AF_UNIX``)."""

    version: int
    length: int
    source: Address | None = None
    destination: Address | None = None


def detect(data: bytes) -> int | None:
    """Which header ``data`` starts with: 1 or 2, 0 for none, None when too few bytes tell."""
    for version, signature in ((2, V2_SIGNATURE), (1, V1_SIGNATURE)):
        n = min(len(data), len(signature))
        if data[:n] == signature[:n]:
            return version if len(data) >= len(signature) else None
    return 0


def parse(data: bytes, versions: tuple[int, ...] = (1, 2)) -> Header | None:
    """The header at the start of ``data``, or None if it is not complete yet.

    Raises ``ProxyProtocolError`` when ``data`` does not start with a header of one of
    ``versions``, or the header is malformed. Bytes after the header are not looked at.
    """
    version = detect(data)
    if version is None:
        return None
    if version == 0:
        raise ProxyProtocolError("no PROXY protocol header")
    if version not in versions:
        raise ProxyProtocolError(f"a PROXY v{version} header where v{'/v'.join(map(str, versions))} is expected")
    return _parse_v1(data) if version == 1 else _parse_v2(data)


# ------------------------------------------------------------------ v1
def _parse_v1(data: bytes) -> Header | None:
    end = data.find(b"\r\n", 0, V1_MAX_LENGTH)
    if end < 0:
        if len(data) >= V1_MAX_LENGTH or b"\n" in data[:V1_MAX_LENGTH]:
            raise ProxyProtocolError("v1 header without CRLF within 107 bytes")
        return None
    line = data[:end]
    length = end + 2
    if not all(0x20 <= b < 0x7F for b in line):
        raise ProxyProtocolError("v1 header with control or non-ASCII bytes")
    parts = line.decode("ascii").split(" ")
    if parts[1:2] == ["UNKNOWN"]:
        return Header(1, length)
    if len(parts) != 6:
        raise ProxyProtocolError("v1 header does not have 6 fields")
    _, proto, src, dst, sport, dport = parts
    if proto == "TCP4":
        family = 4
    elif proto == "TCP6":
        family = 6
    else:
        raise ProxyProtocolError(f"v1 header with protocol {proto[:8]!r}")
    return Header(1, length, _v1_address(src, _v1_port(sport), family),
                  _v1_address(dst, _v1_port(dport), family))


def _v1_port(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or (len(text) > 1 and text[0] == "0") or len(text) > 5:
        raise ProxyProtocolError(f"v1 header with port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1 header with port {port}")
    return port


def _v1_address(text: str, port: int, family: int) -> Address:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyProtocolError(f"v1 header with address {text[:40]!r}") from None
    # IPv4 in dotted quads only (ipaddress refuses leading zeros); IPv6 without a zone.
    if address.version != family or (family == 4 and str(address) != text) or "%" in text:
        raise ProxyProtocolError(f"v1 header with address {text[:40]!r} (not IPv{family})")
    return (str(address), port) if family == 4 else (str(address), port, 0, 0)


# ------------------------------------------------------------------ v2
def _parse_v2(data: bytes) -> Header | None:
    if len(data) < _V2_HEAD.size:
        return None
    _, version_command, family, size = _V2_HEAD.unpack_from(data)
    if version_command >> 4 != 2:
        raise ProxyProtocolError(f"v2 header with version {version_command >> 4}")
    command = version_command & 0x0F
    if command not in (0, 1):
        raise ProxyProtocolError(f"v2 header with command {command}")
    if family not in _V2_FAMILIES:
        raise ProxyProtocolError(f"v2 header with family/transport 0x{family:02x}")
    length = _V2_HEAD.size + size
    if length > MAX_V2_LENGTH:
        raise ProxyProtocolError(f"v2 header of {length} bytes (more than {MAX_V2_LENGTH})")
    if family & 0x0F == 0x02:
        raise ProxyProtocolError("v2 header for a datagram (UDP) stream")
    block = data[_V2_HEAD.size:length]
    needed = {0x10: 12, 0x20: 36, 0x30: 216}.get(family & 0xF0, 0)
    if size < needed:
        raise ProxyProtocolError(f"v2 header: {size} bytes of addresses, family 0x{family:02x} needs {needed}")
    if len(data) < length:
        return None
    if command == 0 or family & 0xF0 not in (0x10, 0x20):
        return Header(2, length)  # LOCAL, AF_UNSPEC or AF_UNIX: the connection's own addresses
    if family & 0xF0 == 0x10:
        src, dst, sport, dport = struct.unpack_from("!4s4sHH", block)
        return Header(2, length, (socket.inet_ntop(socket.AF_INET, src), sport),
                      (socket.inet_ntop(socket.AF_INET, dst), dport))
    src, dst, sport, dport = struct.unpack_from("!16s16sHH", block)
    return Header(2, length, (str(ipaddress.IPv6Address(src)), sport, 0, 0),
                  (str(ipaddress.IPv6Address(dst)), dport, 0, 0))


# ------------------------------------------------------------------ building (tests, clients)
def v1_header(source: Address | None, destination: Address | None = None) -> bytes:
    """A v1 header for ``source`` → ``destination`` (``UNKNOWN`` when ``source`` is None)."""
    if source is None or destination is None:
        return b"PROXY UNKNOWN\r\n"
    proto = "TCP6" if ":" in source[0] else "TCP4"
    return f"PROXY {proto} {source[0]} {destination[0]} {source[1]} {destination[1]}\r\n".encode()


def v2_header(source: Address | None, destination: Address | None = None, tlvs: bytes = b"") -> bytes:
    """A v2 ``PROXY`` header for ``source`` → ``destination`` (a ``LOCAL`` one when None)."""
    if source is None or destination is None:
        return _V2_HEAD.pack(V2_SIGNATURE, 0x20, 0x00, len(tlvs)) + tlvs
    six = ":" in source[0]
    family = socket.AF_INET6 if six else socket.AF_INET
    block = (socket.inet_pton(family, source[0]) + socket.inet_pton(family, destination[0])
             + struct.pack("!HH", source[1], destination[1]) + tlvs)
    return _V2_HEAD.pack(V2_SIGNATURE, 0x21, 0x21 if six else 0x11, len(block)) + block

"""The control channel's messages: a pure codec, no sockets.

Primary and worker talk over one ``AF_UNIX``/``SOCK_SEQPACKET`` socket pair.
Each datagram is exactly one message, so the codec works on whole datagrams:
``encode(message) -> bytes`` and ``decode(bytes) -> message``. Descriptors ride
as ``SCM_RIGHTS`` on ``Fds`` messages; the message says how many were sent so
that the receiver can tell a truncated batch from a complete one.

Wire format, all integers big-endian::

    byte 0    protocol version (VERSION)
    byte 1    message type
    bytes 2.. the type's fixed-size body (see each class)

A datagram that is empty, has another version, an unknown type, or a body of
the wrong size raises ``ProtocolError``; nothing else can come out of
``decode``.
"""

from __future__ import annotations

import struct
from dataclasses import astuple, dataclass
from typing import ClassVar

VERSION = 2  # 2: Ready carries a capacity (credits), Done is always sent


class ProtocolError(ValueError):
    """A datagram on the control channel that is not a valid message."""


@dataclass(frozen=True)
class Fds:
    """Primary -> worker: ``count`` connections ride on this message.

    ``count`` 0 carries nothing: the primary leaves one where it took connections
    back (reclaim), and sees from its channel when the worker has read it.
    """

    TYPE: ClassVar[int] = 1
    BODY: ClassVar[struct.Struct] = struct.Struct("!H")
    count: int


@dataclass(frozen=True)
class Drain:
    """Primary -> worker: finish what you hold, take nothing new, then exit 0."""

    TYPE: ClassVar[int] = 2
    BODY: ClassVar[struct.Struct] = struct.Struct("")


@dataclass(frozen=True)
class Ready:
    """Worker -> primary: booted (handler imported, listener bound) and serving.

    ``capacity`` is the most connections the worker may hold at once: passed to
    it and not yet reported ``Done`` (0: no limit of its own). The primary never
    has more than that outstanding to the worker, so a connection the worker
    cannot start yet waits where a dead worker does not lose it: in the
    primary or in the listen backlog. ``max_batch`` is the most descriptors
    it wants in one message (its thread count for plain handlers, at most
    SCM_MAX_FD).
    """

    TYPE: ClassVar[int] = 3
    BODY: ClassVar[struct.Struct] = struct.Struct("!IH")
    capacity: int = 0
    max_batch: int = 253


@dataclass(frozen=True)
class Heartbeat:
    """Worker -> primary: alive, with a health report.

    ``active`` connections being handled now, ``total`` handled since start,
    ``rss`` resident memory in bytes, ``cpu_ms`` user+system CPU time used.
    """

    TYPE: ClassVar[int] = 4
    BODY: ClassVar[struct.Struct] = struct.Struct("!IQQQ")
    active: int
    total: int
    rss: int
    cpu_ms: int


@dataclass(frozen=True)
class Done:
    """Worker -> primary: ``count`` more connections finished (user-space modes).

    It returns credits: the primary counts each worker's outstanding
    connections (sent minus done) against its ``capacity`` and against the
    descriptors it may have in flight at all.
    """

    TYPE: ClassVar[int] = 5
    BODY: ClassVar[struct.Struct] = struct.Struct("!I")
    count: int


Message = Fds | Drain | Ready | Heartbeat | Done

_TYPES: dict[int, type[Message]] = {cls.TYPE: cls for cls in (Fds, Drain, Ready, Heartbeat, Done)}
_HEADER = struct.Struct("!BB")

#: What each side may legitimately receive.
TO_WORKER = (Fds, Drain)
TO_PRIMARY = (Ready, Heartbeat, Done)


def encode(message: Message) -> bytes:
    """Encode one message as one datagram."""
    cls = type(message)
    if cls not in _TYPES.values():
        raise TypeError(f"not a control message: {message!r}")
    try:
        body = cls.BODY.pack(*astuple(message))
    except struct.error as exc:
        raise ValueError(f"cannot encode {message!r}: {exc}") from None
    return _HEADER.pack(VERSION, cls.TYPE) + body


def decode(datagram: bytes) -> Message:
    """Decode one datagram, or raise ``ProtocolError`` saying what is wrong."""
    if len(datagram) < _HEADER.size:
        raise ProtocolError(f"datagram of {len(datagram)} bytes is shorter than the header")
    version, type_code = _HEADER.unpack_from(datagram)
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, expected {VERSION}")
    cls = _TYPES.get(type_code)
    if cls is None:
        raise ProtocolError(f"unknown message type {type_code}")
    body = datagram[_HEADER.size :]
    if len(body) != cls.BODY.size:
        raise ProtocolError(f"{cls.__name__} body is {len(body)} bytes, expected {cls.BODY.size}")
    message: Message = cls(*cls.BODY.unpack(body))
    return message


def decode_from(datagram: bytes, allowed: tuple[type, ...]) -> Message:
    """Decode, and refuse a valid message that this side must never receive."""
    message = decode(datagram)
    if not isinstance(message, allowed):
        raise ProtocolError(f"unexpected {type(message).__name__} message in this direction")
    return message


#: The bytes a Done starts with; a 32-bit big-endian count follows (read in C by the primary).
DONE_PREFIX = _HEADER.pack(VERSION, Done.TYPE)
_DONE_SIZE = _HEADER.size + Done.BODY.size
_DONE_COUNT = struct.Struct("!I")


def done_count(datagram: bytes) -> int | None:
    """The count of a well-formed ``Done`` datagram, else None (then ``decode`` it).

    The primary's most frequent message, read without building an object.
    """
    if len(datagram) == _DONE_SIZE and datagram.startswith(DONE_PREFIX):
        count: int = _DONE_COUNT.unpack_from(datagram, _HEADER.size)[0]
        return count
    return None


# Encoded once: the hot path sends these bytes as they are.
_FDS_CACHE = [encode(Fds(n)) for n in range(254)]


def encode_fds(count: int) -> bytes:
    """The ``Fds`` datagram for ``count`` descriptors (cached, for the hot path)."""
    if not 0 <= count < len(_FDS_CACHE):
        raise ValueError(f"an Fds message carries 0..{len(_FDS_CACHE) - 1} descriptors, not {count}")
    return _FDS_CACHE[count]

"""The control-channel codec: pure bytes in, messages out."""

from __future__ import annotations

import dataclasses
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dispatch import protocol
from dispatch.protocol import (
    TO_PRIMARY,
    TO_WORKER,
    VERSION,
    Done,
    Drain,
    Fds,
    Heartbeat,
    ProtocolError,
    Ready,
    decode,
    decode_from,
    encode,
    encode_fds,
)

ALL_TYPES = (Fds, Drain, Ready, Heartbeat, Done)
_UNSIGNED = {"B": 8, "H": 16, "I": 32, "Q": 64}


def fields_of(cls: type) -> st.SearchStrategy[protocol.Message]:
    """Any message of ``cls``, each field anywhere in its struct range."""
    codes = cls.BODY.format.lstrip("!")
    return st.builds(cls, *(st.integers(0, 2 ** _UNSIGNED[c] - 1) for c in codes))


messages = st.one_of([fields_of(cls) for cls in ALL_TYPES])


@given(messages)
def test_roundtrip(message: protocol.Message) -> None:
    datagram = encode(message)
    assert datagram[0] == VERSION
    assert datagram[1] == type(message).TYPE
    assert len(datagram) == 2 + type(message).BODY.size
    assert decode(datagram) == message


def test_fields_cover_the_whole_body() -> None:
    # Every byte of a body is a field, so fields_of() draws every message.
    for cls in ALL_TYPES:
        assert len(cls.BODY.format.lstrip("!")) == len(dataclasses.fields(cls))


def test_type_codes_are_distinct() -> None:
    assert len({cls.TYPE for cls in ALL_TYPES}) == len(ALL_TYPES)


def test_directions_partition_the_types() -> None:
    assert set(TO_WORKER) | set(TO_PRIMARY) == set(ALL_TYPES)
    assert not set(TO_WORKER) & set(TO_PRIMARY)


# Mostly garbage, plus datagrams with a valid version and a near-valid type so
# that the later checks (type, body size) are reached too.
datagrams = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda t, body: bytes([VERSION, t]) + body, st.integers(0, 7), st.binary(max_size=40)),
)


@given(datagrams)
def test_decode_any_bytes_gives_a_message_or_protocol_error(data: bytes) -> None:
    try:
        message = decode(data)
    except ProtocolError:
        return
    assert isinstance(message, ALL_TYPES)
    assert encode(message) == data  # a valid datagram has exactly one encoding


@given(messages, st.binary(min_size=1, max_size=8))
def test_decode_refuses_trailing_bytes(message: protocol.Message, extra: bytes) -> None:
    with pytest.raises(ProtocolError, match="body is"):
        decode(encode(message) + extra)


@given(fields_of(Heartbeat))
def test_decode_refuses_truncated_body(message: Heartbeat) -> None:
    data = encode(message)
    for cut in range(2, len(data)):
        with pytest.raises(ProtocolError, match=r"Heartbeat body is \d+ bytes, expected 28"):
            decode(data[:cut])


@pytest.mark.parametrize("data", [b"", b"\x01"])
def test_shorter_than_header(data: bytes) -> None:
    with pytest.raises(ProtocolError, match="shorter than the header"):
        decode(data)


@pytest.mark.parametrize("version", [0, VERSION + 1, 255])
def test_wrong_version(version: int) -> None:
    data = bytes([version]) + encode(Ready())[1:]
    with pytest.raises(ProtocolError, match=f"protocol version {version}, expected {VERSION}"):
        decode(data)


@pytest.mark.parametrize("type_code", [0, 6, 255])
def test_unknown_type(type_code: int) -> None:
    with pytest.raises(ProtocolError, match=f"unknown message type {type_code}"):
        decode(bytes([VERSION, type_code]))


def test_protocol_error_is_a_value_error() -> None:
    # Callers that only know ValueError still catch it.
    assert issubclass(ProtocolError, ValueError)


@pytest.mark.parametrize("message", [Fds(3), Drain()])
def test_primary_refuses_messages_meant_for_workers(message: protocol.Message) -> None:
    with pytest.raises(ProtocolError, match=f"unexpected {type(message).__name__} message"):
        decode_from(encode(message), TO_PRIMARY)


@pytest.mark.parametrize("message", [Ready(), Heartbeat(1, 2, 3, 4), Done(5)])
def test_worker_refuses_messages_meant_for_primary(message: protocol.Message) -> None:
    with pytest.raises(ProtocolError, match=f"unexpected {type(message).__name__} message"):
        decode_from(encode(message), TO_WORKER)


@given(messages)
def test_decode_from_accepts_the_right_direction(message: protocol.Message) -> None:
    allowed = TO_WORKER if isinstance(message, TO_WORKER) else TO_PRIMARY
    assert decode_from(encode(message), allowed) == message


def test_decode_from_still_reports_garbage() -> None:
    with pytest.raises(ProtocolError, match="protocol version"):
        decode_from(b"\x07\x01", TO_WORKER)


@pytest.mark.parametrize("count", range(254))
def test_encode_fds_matches_encode(count: int) -> None:
    assert encode_fds(count) == encode(Fds(count))


@pytest.mark.parametrize("count", [-1, 254])
def test_encode_fds_refuses_counts_outside_the_cache(count: int) -> None:
    # -1 once indexed the cache from the end and sent a 253-fd header.
    with pytest.raises(ValueError, match=f"0..253 descriptors, not {count}"):
        encode_fds(count)


@pytest.mark.parametrize(
    "message",
    [
        Fds(-1),
        Fds(2**16),
        Done(-1),
        Done(2**32),
        Heartbeat(2**32, 0, 0, 0),
        Heartbeat(0, 2**64, 0, 0),
        Heartbeat(0, 0, -1, 0),
        Heartbeat(0, 0, 0, 2**64),
        Fds("3"),  # type: ignore[arg-type]
        Done(1.5),  # type: ignore[arg-type]
    ],
)
def test_out_of_range_fields_raise_value_error(message: protocol.Message) -> None:
    with pytest.raises(ValueError, match="cannot encode"):
        encode(message)


def test_encode_refuses_non_messages() -> None:
    with pytest.raises(TypeError, match="not a control message"):
        encode(struct.Struct("!H"))  # type: ignore[arg-type]

"""The PROXY protocol codec (``dispatch.proxy_protocol``): the specification's examples,
every malformation we can name, and fuzzing: any bytes give a header, "more", or an error,
never anything else, and never a header longer than the bytes."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dispatch.proxy_protocol import (
    MAX_LENGTH,
    MAX_V2_LENGTH,
    V2_SIGNATURE,
    Header,
    ProxyProtocolError,
    detect,
    parse,
    v1_header,
    v2_header,
)
from dispatch.values import parse_networks, trusted


# ------------------------------------------------------------------ v1
def test_v1_tcp4_and_what_follows_is_not_taken() -> None:
    data = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\nGET / HTTP/1.1\r\n"
    header = parse(data)
    assert header == Header(1, 46, ("192.0.2.10", 56324), ("198.51.100.1", 443))
    assert data[header.length:].startswith(b"GET /")


def test_v1_tcp6_gives_a_getpeername_shaped_address() -> None:
    header = parse(b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n")
    assert header is not None and header.source == ("2001:db8::1", 1, 0, 0)
    assert header.destination == ("::1", 65535, 0, 0)


def test_v1_unknown_keeps_the_connection_addresses() -> None:
    assert parse(b"PROXY UNKNOWN\r\n") == Header(1, 15)
    assert parse(b"PROXY UNKNOWN ffff::1 ffff::2 1 2\r\n") == Header(1, 35)


@pytest.mark.parametrize("line", [
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",            # LF alone
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",            # a field missing
    b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n",         # two spaces
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",         # leading zero
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 65536\r\n",      # port out of range
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 001.2.3.4 5.6.7.8 1 2\r\n",        # not a dotted quad
    b"PROXY TCP4 ::1 ::1 1 2\r\n",                  # family mismatch
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",         # zone
    b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\x00\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \xff2\r\n",
    b"PROXY " + b"A" * 120,                         # no CRLF within 107 bytes
])
def test_v1_malformed_is_refused(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(line)


def test_v1_incomplete_asks_for_more() -> None:
    full = b"PROXY TCP4 192.0.2.10 198.51.100.1 56324 443\r\n"
    for cut in range(len(full)):
        assert parse(full[:cut]) is None, cut
    assert parse(full) is not None


# ------------------------------------------------------------------ v2
def test_v2_ipv4_with_tlvs_skipped() -> None:
    tlv = b"\x04\x00\x03abc"  # PP2_TYPE_NOOP
    data = v2_header(("203.0.113.7", 40000), ("10.0.0.1", 8080), tlv) + b"payload"
    header = parse(data)
    assert header == Header(2, 16 + 12 + len(tlv), ("203.0.113.7", 40000), ("10.0.0.1", 8080))
    assert data[header.length:] == b"payload"


def test_v2_ipv6() -> None:
    header = parse(v2_header(("2001:db8::7", 1234, 0, 0), ("::1", 80, 0, 0)))
    assert header is not None and header.source == ("2001:db8::7", 1234, 0, 0)


def test_v2_local_unspec_and_unix_keep_the_connection_addresses() -> None:
    assert parse(v2_header(None)) == Header(2, 16)
    unix = struct.pack("!12sBBH", V2_SIGNATURE, 0x21, 0x31, 216) + bytes(216)
    assert parse(unix) == Header(2, 16 + 216)
    unspec = struct.pack("!12sBBH", V2_SIGNATURE, 0x21, 0x00, 0)
    assert parse(unspec) == Header(2, 16)


@pytest.mark.parametrize("head", [
    struct.pack("!12sBBH", V2_SIGNATURE, 0x11, 0x11, 12),   # version 1 in a v2 head
    struct.pack("!12sBBH", V2_SIGNATURE, 0x22, 0x11, 12),   # command 2
    struct.pack("!12sBBH", V2_SIGNATURE, 0x21, 0x41, 12),   # family 4
    struct.pack("!12sBBH", V2_SIGNATURE, 0x21, 0x13, 12),   # transport 3
    struct.pack("!12sBBH", V2_SIGNATURE, 0x21, 0x12, 12),   # UDP on a TCP server
    struct.pack("!12sBBH", V2_SIGNATURE, 0x21, 0x11, 11),   # too short for IPv4
    struct.pack("!12sBBH", V2_SIGNATURE, 0x21, 0x21, 35),   # too short for IPv6
    struct.pack("!12sBBH", V2_SIGNATURE, 0x21, 0x11, MAX_V2_LENGTH),  # over our bound
])
def test_v2_malformed_is_refused_from_its_head_alone(head: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(head)  # without waiting for the address block


def test_v2_incomplete_asks_for_more() -> None:
    full = v2_header(("203.0.113.7", 40000), ("10.0.0.1", 8080))
    for cut in range(len(full)):
        assert parse(full[:cut]) is None, cut


# ------------------------------------------------------------------ versions and detection
def test_versions_not_asked_for_are_refused() -> None:
    with pytest.raises(ProxyProtocolError):
        parse(v1_header(("1.2.3.4", 1), ("5.6.7.8", 2)), versions=(2,))
    with pytest.raises(ProxyProtocolError):
        parse(v2_header(("1.2.3.4", 1), ("5.6.7.8", 2)), versions=(1,))


def test_detect() -> None:
    assert detect(b"") is None and detect(b"PRO") is None and detect(b"\r\n\r\n") is None
    assert detect(b"GET / HTTP/1.1\r\n") == 0 and detect(b"PROX!") == 0 and detect(b"\r\n\r\nX") == 0
    assert detect(b"PROXY ") == 1 and detect(V2_SIGNATURE) == 2


def test_plain_requests_are_not_headers() -> None:
    with pytest.raises(ProxyProtocolError):
        parse(b"GET / HTTP/1.1\r\n\r\n")


# ------------------------------------------------------------------ fuzzing
@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_give_a_header_more_or_an_error(data: bytes) -> None:
    try:
        header = parse(data)
    except ProxyProtocolError:
        return
    assert header is None or 0 < header.length <= len(data)


_prefixes = st.sampled_from([b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE,
                             V2_SIGNATURE + b"\x21\x11", V2_SIGNATURE + b"\x21\x21\x00\x24"])


@settings(max_examples=3000, deadline=None)
@given(_prefixes, st.binary(max_size=260))
def test_fuzz_near_valid_headers(prefix: bytes, rest: bytes) -> None:
    data = prefix + rest
    try:
        header = parse(data)
    except ProxyProtocolError:
        return
    if header is None:
        assert len(data) < MAX_LENGTH  # "more" only while a header could still fit
        return
    assert 0 < header.length <= len(data)
    if header.version == 1:
        assert data[header.length - 2:header.length] == b"\r\n" and header.length <= 107


_ipv4 = st.ip_addresses(v=4).map(str)
_ipv6 = st.ip_addresses(v=6).map(str)
_port = st.integers(0, 65535)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.tuples(_ipv4, _ipv4), st.tuples(_ipv6, _ipv6)), _port, _port,
       st.sampled_from([1, 2]), st.binary(max_size=40))
def test_round_trip(hosts: tuple[str, str], sport: int, dport: int, version: int, after: bytes) -> None:
    six = ":" in hosts[0]
    src = (hosts[0], sport, 0, 0) if six else (hosts[0], sport)
    dst = (hosts[1], dport, 0, 0) if six else (hosts[1], dport)
    raw = (v1_header if version == 1 else v2_header)(src, dst)
    header = parse(raw + after)
    assert header is not None
    assert (header.version, header.length) == (version, len(raw))
    assert header.source == src and header.destination == dst


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([v1_header(("1.2.3.4", 5), ("6.7.8.9", 10)),
                        v2_header(("2001:db8::1", 5, 0, 0), ("::1", 10, 0, 0))]),
       st.integers(0, 60), st.integers(0, 255))
def test_a_flipped_byte_never_yields_a_header_longer_than_the_data(raw: bytes, index: int, value: int) -> None:
    data = bytearray(raw)
    data[index % len(data)] = value
    try:
        header = parse(bytes(data))
    except ProxyProtocolError:
        return
    assert header is None or header.length <= len(data)


# ------------------------------------------------------------------ who may send one
def test_trusted_senders() -> None:
    networks = parse_networks("127.0.0.1, 10.0.0.0/8,::1")
    assert trusted(("127.0.0.1", 1), networks) and trusted(("10.2.3.4", 1), networks)
    assert trusted(("::1", 1, 0, 0), networks) and trusted(("::ffff:10.0.0.9", 1, 0, 0), networks)
    assert not trusted(("127.0.0.2", 1), networks) and not trusted(("11.0.0.1", 1), networks)
    assert trusted("", networks) and trusted("/run/app.sock", networks)  # unix peers
    assert trusted(("8.8.8.8", 1), parse_networks("*")) and not trusted(("8.8.8.8", 1), ())
    with pytest.raises(ValueError, match="'nonsense'"):
        parse_networks("127.0.0.1,nonsense")

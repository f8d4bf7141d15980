"""PROXY protocol v1/v2 headers (HAProxy doc/proxy-protocol.txt): parsed incrementally, garbage refused early."""

from __future__ import annotations

import contextlib
import ipaddress
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.errors import BadProxyHeader
from lb.http.proxy_header import (
    MAX_V2_LENGTH,
    PP2_TYPE_CRC32C,
    V1_MAX,
    V1_PREFIX,
    V2_SIGNATURE,
    Command,
    Family,
    ProxyHeader,
    crc32c,
    parse_proxy_header,
)

REQUEST = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def v2(command: int = 1, family: int = 0x11, block: bytes = b"", *, length: int | None = None) -> bytes:
    size = len(block) if length is None else length
    return V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack("!H", size) + block


def v2_tcp4(src: str = "203.0.113.7", dst: str = "10.0.0.1", sport: int = 51234, dport: int = 443) -> bytes:
    block = ipaddress.IPv4Address(src).packed + ipaddress.IPv4Address(dst).packed + struct.pack("!HH", sport, dport)
    return v2(1, 0x11, block)


def v2_tcp6(src: str = "2001:db8::7", dst: str = "2001:db8::1", sport: int = 1, dport: int = 65535) -> bytes:
    block = ipaddress.IPv6Address(src).packed + ipaddress.IPv6Address(dst).packed + struct.pack("!HH", sport, dport)
    return v2(1, 0x21, block)


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


V1_LONGEST = b"PROXY UNKNOWN " + b"ffff:" * 7 + b"ffff " + b"ffff:" * 7 + b"ffff 65535 65535\r\n"

VALID = {
    "v1 TCP4": (
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        ProxyHeader(1, Command.PROXY, Family.TCP4, ("192.168.0.1", 56324), ("192.168.0.11", 443), 47),
    ),
    "v1 TCP4 extremes": (
        b"PROXY TCP4 255.255.255.255 0.0.0.0 65535 0\r\n",
        ProxyHeader(1, Command.PROXY, Family.TCP4, ("255.255.255.255", 65535), ("0.0.0.0", 0), 44),
    ),
    "v1 TCP6": (
        b"PROXY TCP6 2001:DB8::7 ::1 1 2\r\n",
        ProxyHeader(1, Command.PROXY, Family.TCP6, ("2001:db8::7", 1), ("::1", 2), 32),
    ),
    "v1 UNKNOWN short": (b"PROXY UNKNOWN\r\n", ProxyHeader(1, Command.PROXY, Family.UNKNOWN, None, None, 15)),
    "v1 UNKNOWN with addresses": (
        b"PROXY UNKNOWN 1.2.3.4 5.6.7.8 1 2\r\n",
        ProxyHeader(1, Command.PROXY, Family.UNKNOWN, None, None, 35),
    ),
    "v1 longest (107 bytes)": (V1_LONGEST, ProxyHeader(1, Command.PROXY, Family.UNKNOWN, None, None, V1_MAX)),
    # Spec §2.1: after UNKNOWN anything up to the CRLF is ignored (HAProxy takes it too).
    "v1 UNKNOWN with anything": (
        b"PROXY UNKNOWN ffff:: x 1 2\r\n",
        ProxyHeader(1, Command.PROXY, Family.UNKNOWN, None, None, 28),
    ),
    "v2 TCP4": (
        v2_tcp4(),
        ProxyHeader(2, Command.PROXY, Family.TCP4, ("203.0.113.7", 51234), ("10.0.0.1", 443), 28),
    ),
    "v2 TCP6": (
        v2_tcp6(),
        ProxyHeader(2, Command.PROXY, Family.TCP6, ("2001:db8::7", 1), ("2001:db8::1", 65535), 52),
    ),
    "v2 UDP4": (
        v2(1, 0x12, bytes(4) + bytes(4) + b"\x00\x01\x00\x02"),
        ProxyHeader(2, Command.PROXY, Family.UDP4, ("0.0.0.0", 1), ("0.0.0.0", 2), 28),
    ),
    "v2 LOCAL no block": (v2(0, 0x00), ProxyHeader(2, Command.LOCAL, Family.UNKNOWN, None, None, 16)),
    "v2 LOCAL skips its block": (
        v2(0, 0x11, bytes(12)),
        ProxyHeader(2, Command.LOCAL, Family.UNKNOWN, None, None, 28),
    ),
    "v2 UNSPEC": (v2(1, 0x00, b"junk"), ProxyHeader(2, Command.PROXY, Family.UNKNOWN, None, None, 20)),
    "v2 UNIX": (v2(1, 0x31, bytes(216)), ProxyHeader(2, Command.PROXY, Family.UNIX, None, None, 232)),
    "v2 UNIX datagram": (v2(1, 0x32, bytes(216)), ProxyHeader(2, Command.PROXY, Family.UNIX, None, None, 232)),
    "v2 TCP6 IPv4-mapped both ends": (
        v2_tcp6("::ffff:198.51.100.9", "::ffff:10.0.0.1", 1, 2),
        ProxyHeader(2, Command.PROXY, Family.TCP6, ("198.51.100.9", 1), ("10.0.0.1", 2), 52),
    ),
    "v2 TCP4 with an empty TLV last": (
        v2(1, 0x11, bytes(12) + tlv(0xEA, b"")),
        ProxyHeader(2, Command.PROXY, Family.TCP4, ("0.0.0.0", 0), ("0.0.0.0", 0), 31, ((0xEA, b""),)),
    ),
    "v2 TCP4 with TLVs": (
        v2(1, 0x11, bytes([1, 2, 3, 4, 5, 6, 7, 8, 0, 80, 0, 81]) + tlv(0x01, b"h2") + tlv(0xEA, b"vpce-1")),
        ProxyHeader(
            2,
            Command.PROXY,
            Family.TCP4,
            ("1.2.3.4", 80),
            ("5.6.7.8", 81),
            16 + 12 + 5 + 9,
            ((0x01, b"h2"), (0xEA, b"vpce-1")),
        ),
    ),
}


@pytest.mark.parametrize(("raw", "expected"), VALID.values(), ids=VALID.keys())
def test_valid_headers(raw: bytes, expected: ProxyHeader) -> None:
    """Each valid header parses to its addresses and length; the client's bytes after it are not taken."""
    assert parse_proxy_header(raw + REQUEST) == expected
    assert parse_proxy_header(bytearray(raw)) == expected
    assert expected.consumed == len(raw)


@pytest.mark.parametrize(("raw", "expected"), VALID.values(), ids=VALID.keys())
def test_every_prefix_waits(raw: bytes, expected: ProxyHeader) -> None:
    """Any proper prefix of a valid header asks for more bytes (None), never errs."""
    for cut in range(len(raw)):
        assert parse_proxy_header(raw[:cut]) is None, cut


def test_client_ip() -> None:
    """`client_ip` is the source address, or None when the peer stands (LOCAL, UNKNOWN)."""
    assert parse_proxy_header(v2_tcp4()).client_ip == "203.0.113.7"  # type: ignore[union-attr]
    assert parse_proxy_header(v2(0, 0x00)).client_ip is None  # type: ignore[union-attr]
    assert parse_proxy_header(b"PROXY UNKNOWN\r\n").client_ip is None  # type: ignore[union-attr]


INVALID = {
    "plain HTTP": REQUEST,
    "TLS ClientHello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",
    "lower-case proxy": b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "PROXY without space": b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "PROXX": b"PROXX TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 TCP5": b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 UDP4": b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 leading zero in address": b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    "v1 leading zero in port": b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    "v1 port too large": b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    "v1 six-digit port": b"PROXY TCP4 1.2.3.4 5.6.7.8 100000 2\r\n",
    "v1 negative port": b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    "v1 IPv6 under TCP4": b"PROXY TCP4 ::1 ::1 1 2\r\n",
    "v1 IPv4 under TCP6": b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 octet 256": b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    "v1 three octets": b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
    "v1 missing port": b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    "v1 extra field": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    "v1 double space": b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 trailing space": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
    "v1 bare LF": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    "v1 bare CR": b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX\r\n",
    "v1 tab": b"PROXY TCP4\t1.2.3.4 5.6.7.8 1 2\r\n",
    "v1 NUL": b"PROXY TCP4 1.2.3.4\x00 5.6.7.8 1 2\r\n",
    "v1 scoped IPv6": b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",
    "v1 no CRLF in 107 bytes": b"PROXY UNKNOWN " + b"1" * 93,
    "v1 longest plus one": V1_LONGEST[:-2] + b"f\r\n",
    "v1 empty protocol": b"PROXY \r\n",
    "v1 UNKNOWN run into a tab": b"PROXY UNKNOWN\tx\r\n",
    "v1 UNKNOWNX": b"PROXY UNKNOWNX 1 2\r\n",
    "v1 UNKNOWN past 107 bytes": b"PROXY UNKNOWN " + b"x" * 92 + b"\r\n",
    "v2 bad signature": b"\r\n\r\n\x00\r\nQUIX\n\x21\x11\x00\x0c" + bytes(12),
    "v2 version 1": V2_SIGNATURE + b"\x11\x11\x00\x00",
    "v2 version 3": V2_SIGNATURE + b"\x31\x11\x00\x00",
    "v2 command 2": V2_SIGNATURE + b"\x22\x11\x00\x00",
    "v2 family 4": v2(1, 0x41, bytes(12)),
    "v2 protocol 3": v2(1, 0x13, bytes(12)),
    "v2 TCP4 block too short": v2(1, 0x11, bytes(11)),
    "v2 TCP6 block too short": v2(1, 0x21, bytes(35)),
    "v2 UNIX block too short": v2(1, 0x31, bytes(215)),
    "v2 truncated TLV header": v2(1, 0x11, bytes(12) + b"\x01\x00"),
    "v2 TLV past the end": v2(1, 0x11, bytes(12) + b"\x01\x00\x05abc"),
    "v2 length over the cap": v2(1, 0x11, length=MAX_V2_LENGTH + 1),
    "v2 maximal length": v2(1, 0x11, length=0xFFFF),
}


@pytest.mark.parametrize("raw", INVALID.values(), ids=INVALID.keys())
def test_invalid_headers_are_refused(raw: bytes) -> None:
    """Anything that is not exactly a PROXY header raises BadProxyHeader (the connection is closed)."""
    with pytest.raises(BadProxyHeader):
        parse_proxy_header(raw + REQUEST)


@pytest.mark.parametrize(
    "raw",
    [
        b"G",  # HTTP
        b"\x16",  # TLS
        b"PROXY\t",
        b"PROXY TCP4 1.2.3.4\n",
        b"PX",
        b"PROXY TCP4 1\r2",  # a CR not followed by LF
        b"\r\n\r\n\x00\r\nQUIT\n\x10",  # v2 signature, version 1
        b"\r\n\r\n\x00\r\nQUIT\n\x23",  # v2 signature, command 3
        b"\r\n\r\n\x01",
    ],
)
def test_garbage_is_refused_before_it_is_complete(raw: bytes) -> None:
    """A header that cannot become valid is refused at once, not after a timeout."""
    with pytest.raises(BadProxyHeader):
        parse_proxy_header(raw)


def test_v2_length_is_refused_before_the_block_arrives() -> None:
    """A v2 length over the cap is refused from the 16 fixed bytes alone: nothing is buffered for it."""
    with pytest.raises(BadProxyHeader, match="exceeds"):
        parse_proxy_header(v2(1, 0x11, length=60000))
    assert parse_proxy_header(v2(1, 0x11, length=MAX_V2_LENGTH)) is None
    with pytest.raises(BadProxyHeader):
        parse_proxy_header(v2(1, 0x11, length=100), max_v2_length=99)


def test_empty_input_waits() -> None:
    """No bytes yet: wait."""
    assert parse_proxy_header(b"") is None


@settings(max_examples=300, deadline=None)
@given(
    src=st.ip_addresses(v=4),
    dst=st.ip_addresses(v=4),
    sport=st.integers(0, 65535),
    dport=st.integers(0, 65535),
    tail=st.binary(max_size=30),
)
def test_v1_and_v2_tcp4_round_trip(
    src: ipaddress.IPv4Address, dst: ipaddress.IPv4Address, sport: int, dport: int, tail: bytes
) -> None:
    """Any IPv4 pair and ports come back unchanged from v1 and v2, whatever follows the header."""
    line = f"PROXY TCP4 {src} {dst} {sport} {dport}\r\n".encode()
    for raw in (line, v2_tcp4(str(src), str(dst), sport, dport)):
        header = parse_proxy_header(raw + tail)
        assert header is not None
        assert (header.source, header.destination) == ((str(src), sport), (str(dst), dport))
        assert header.consumed == len(raw)


@settings(max_examples=200, deadline=None)
@given(src=st.ip_addresses(v=6), dst=st.ip_addresses(v=6), sport=st.integers(0, 65535))
def test_v1_and_v2_tcp6_round_trip(src: ipaddress.IPv6Address, dst: ipaddress.IPv6Address, sport: int) -> None:
    """Any IPv6 pair comes back in its compressed form from v1 (any spelling) and v2; an IPv4-mapped one as IPv4."""
    expected = str(src.ipv4_mapped or src)
    for text in (str(src), src.exploded, src.exploded.upper()):
        header = parse_proxy_header(f"PROXY TCP6 {text} {dst} {sport} 1\r\n".encode())
        assert header is not None
        assert header.source == (expected, sport)
    header = parse_proxy_header(v2_tcp6(str(src), str(dst), sport, 1))
    assert header is not None
    assert header.source == (expected, sport)


def test_an_ipv4_mapped_source_is_the_ipv4_client() -> None:
    """`::ffff:198.51.100.9` is 198.51.100.9: one client in logs, rate limits and `balance: source`."""
    for raw in (b"PROXY TCP6 ::ffff:198.51.100.9 ::1 1 2\r\n", v2_tcp6("::ffff:198.51.100.9", "::1", 1, 2)):
        header = parse_proxy_header(raw)
        assert header is not None and header.client_ip == "198.51.100.9"


# Headers as senders write them (v1 lines, v2 blocks with TLVs and a right CRC32c), so the hostile inputs
# below are mostly one mutation away from a header, on either side of the line between parsed and refused.
_V1_LINES = st.one_of(
    st.builds(lambda s, d, p, q: f"PROXY TCP4 {s} {d} {p} {q}\r\n".encode(), st.ip_addresses(v=4),
              st.ip_addresses(v=4), st.integers(0, 65535), st.integers(0, 65535)),
    st.builds(lambda s, d, p, q: f"PROXY TCP6 {s} {d} {p} {q}\r\n".encode(), st.ip_addresses(v=6),
              st.ip_addresses(v=6), st.integers(0, 65535), st.integers(0, 65535)),
    st.binary(max_size=20).filter(lambda b: b"\r\n" not in b).map(lambda b: b"PROXY UNKNOWN " + b + b"\r\n"),
    st.just(b"PROXY UNKNOWN\r\n"),
)


@st.composite
def _v2_headers(draw: st.DrawFn) -> bytes:
    family = draw(st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32]))
    size = {0x11: 12, 0x12: 12, 0x21: 36, 0x22: 36, 0x31: 216, 0x32: 216}.get(family, draw(st.integers(0, 8)))
    block = draw(st.binary(min_size=size, max_size=size))
    block += b"".join(draw(st.lists(st.builds(tlv, st.sampled_from([0x01, 0x02, 0x04, 0x05, 0x20, 0xEA]),
                                              st.binary(max_size=8)), max_size=3)))
    command = draw(st.sampled_from([0, 1]))
    if draw(st.booleans()):  # a CRC32c TLV, as `send-proxy-v2-options crc32c` adds it
        zeroed = v2(command, family, block + bytes((PP2_TYPE_CRC32C, 0, 4)) + bytes(4))
        return zeroed[:-4] + struct.pack("!I", crc32c(zeroed))
    return v2(command, family, block)


@st.composite
def _one_mutation(draw: st.DrawFn, header: bytes) -> bytes:
    """`header` with at most one change: a byte replaced, dropped or repeated, a cut, or the v2 length moved."""
    at = draw(st.integers(0, len(header) - 1))
    kind = draw(st.sampled_from(["none", "replace", "drop", "repeat", "cut", "length"]))
    if kind == "replace":
        byte = draw(st.sampled_from(b" \r\n\x00:.0f9") | st.integers(0, 255))
        return header[:at] + bytes((byte,)) + header[at + 1 :]
    if kind == "drop":
        return header[:at] + header[at + 1 :]
    if kind == "repeat":
        return header[: at + 1] + header[at:]
    if kind == "cut":
        return header[:at]
    if kind == "length" and header.startswith(V2_SIGNATURE):
        length = int.from_bytes(header[14:16], "big") + draw(st.integers(-40, 40) | st.integers(0, 0xFFFF))
        return header[:14] + struct.pack("!H", length % 0x10000) + header[16:]
    return header


_NEAR_HEADERS = (_V1_LINES | _v2_headers()).flatmap(_one_mutation)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])  # 2 loaded cores
@given(raw=st.one_of(st.binary(max_size=300), st.binary(max_size=120).map(lambda b: b"PROXY " + b),
                     _NEAR_HEADERS, _NEAR_HEADERS, _NEAR_HEADERS),
       tail=st.sampled_from([b"", REQUEST, b"\x16\x03\x01"]))
def test_arbitrary_bytes_wait_parse_or_raise_bad_proxy_header(raw: bytes, tail: bytes) -> None:
    """Hostile bytes give None, a header within the bytes given, or BadProxyHeader; nothing else. A header
    is the same whatever follows it, and each of its proper prefixes waits for more (None)."""
    try:
        header = parse_proxy_header(raw + tail)
    except BadProxyHeader:
        return
    if header is not None:
        assert 0 < header.consumed <= len(raw + tail)
        exact = (raw + tail)[: header.consumed]
        assert parse_proxy_header(exact) == header
        for cut in range(header.consumed):
            assert parse_proxy_header(exact[:cut]) is None, cut


@settings(max_examples=300, deadline=None)
@given(
    raw=st.one_of(
        st.binary(max_size=40).map(lambda b: V2_SIGNATURE + b),
        st.binary(min_size=V1_MAX, max_size=V1_MAX + 20).map(lambda b: b"PROXY " + b),
        # A v2 start the parser takes (version 2, a known command and family) and any length, near the cap
        # or not; a v1 start in the characters a line may hold, so only its length can refuse it.
        st.builds(lambda c, f, n, b: V2_SIGNATURE + bytes((0x20 | c, f)) + struct.pack("!H", n) + b,
                  st.sampled_from([0, 1]), st.sampled_from([0x00, 0x11, 0x12, 0x21, 0x22, 0x31, 0x32]),
                  st.integers(MAX_V2_LENGTH - 8, MAX_V2_LENGTH + 8) | st.integers(0, 0xFFFF), st.binary(max_size=40)),
        st.text(st.sampled_from("PROXYTCPUNKWN46 0123456789abcdefABCDEF.:"), max_size=V1_MAX + 20)
        .map(lambda t: b"PROXY " + t.encode()),
        st.binary(max_size=V1_MAX + 20).filter(lambda b: b"\r\n" not in b).map(lambda b: b"PROXY UNKNOWN " + b),
    )
)
def test_waiting_is_bounded(raw: bytes) -> None:
    """Past 107 bytes (v1) or 16 + cap (v2), the parser never asks for more: memory stays bounded."""
    padded = raw + (b"1" if raw.startswith(V1_PREFIX) else b"\x00") * (V1_MAX + 16 + MAX_V2_LENGTH)
    with contextlib.suppress(BadProxyHeader):
        assert parse_proxy_header(padded) is not None


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, 60), which=st.sampled_from(sorted(VALID)))
def test_more_bytes_never_change_an_answer(cut: int, which: str) -> None:
    """Feeding a header in two reads gives the same result as in one."""
    raw, expected = VALID[which]
    first = parse_proxy_header(raw[:cut])
    if cut < len(raw):
        assert first is None
    assert parse_proxy_header(raw[:cut] + raw[cut:] + REQUEST) == expected


def test_crc32c_is_castagnolis() -> None:
    """The check value of CRC-32C (iSCSI, RFC 3720 B.4) and an empty input."""
    assert crc32c(b"123456789") == 0xE3069283
    assert crc32c(b"") == 0


def _with_crc(corrupt: bool = False) -> bytes:
    """A v2 TCP4 header with a PP2_TYPE_CRC32C TLV, as HAProxy's `send-proxy-v2-options crc32c` sends it."""
    block = ipaddress.IPv4Address("203.0.113.7").packed + ipaddress.IPv4Address("10.0.0.1").packed
    block += struct.pack("!HH", 51234, 443) + bytes((PP2_TYPE_CRC32C, 0, 4)) + bytes(4)
    zeroed = v2(1, 0x11, block)
    header = zeroed[:-4] + struct.pack("!I", crc32c(zeroed))
    return header[:16] + bytes((header[16] ^ 1,)) + header[17:] if corrupt else header  # a bit of the source


def _crc_filled(zeroed: bytes, at: int) -> bytes:
    """`zeroed` with the CRC32c of itself written over its 4 zero bytes at `at`."""
    return zeroed[:at] + struct.pack("!I", crc32c(zeroed)) + zeroed[at + 4 :]


_CRC_TLV = bytes((PP2_TYPE_CRC32C, 0, 4))
# A CRC32c TLV that a checksum alone would pass: a second one holding the right value; one of 5 bytes
# whose first 4 are the right value.
_CRC_REPEATED = _crc_filled(
    v2(1, 0x11, bytes(12) + _CRC_TLV + b"\x01\x02\x03\x04" + _CRC_TLV + bytes(4)), 16 + 12 + 7 + 3
)
_CRC_FIVE_BYTES = _crc_filled(v2(1, 0x11, bytes(12) + bytes((PP2_TYPE_CRC32C, 0, 5)) + bytes(5)), 16 + 12 + 3)


def test_a_v2_header_with_a_right_crc32c_is_accepted() -> None:
    header = parse_proxy_header(_with_crc())
    assert header is not None and header.source == ("203.0.113.7", 51234)


@pytest.mark.parametrize(
    "raw",
    [
        _with_crc(corrupt=True),
        v2(1, 0x11, bytes(12) + bytes((PP2_TYPE_CRC32C, 0, 2)) + bytes(2)),  # not 4 bytes
        v2(1, 0x11, bytes(12) + (bytes((PP2_TYPE_CRC32C, 0, 4)) + bytes(4)) * 2),
        _CRC_REPEATED,
        _CRC_FIVE_BYTES,
    ],
    ids=["corrupted", "short", "repeated", "repeated, the second right", "five bytes, four of them right"],
)
def test_a_v2_header_failing_its_crc32c_is_refused(raw: bytes) -> None:
    """A corrupted header would give a wrong client address: the connection is dropped (spec §2.2.5)."""
    with pytest.raises(BadProxyHeader):
        parse_proxy_header(raw)


@pytest.mark.parametrize(("family", "client"), [(0x11, "10.0.0.1"), (0x12, None), (0x21, "fd00::1"), (0x22, None)])
def test_only_a_tcp_family_names_the_client(family: int, client: str | None) -> None:
    """A UDP4/UDP6 header on a TCP connection: its source is parsed, but the peer stands as the client, as
    HAProxy has it (a datagram's endpoints say nothing of who holds this connection)."""
    v6 = family >> 4 == 2
    src = ipaddress.ip_address("fd00::1" if v6 else "10.0.0.1").packed
    dst = ipaddress.ip_address("fd00::2" if v6 else "10.0.0.2").packed
    header = parse_proxy_header(v2(1, family, src + dst + b"\x00\x01\x00\x02"))
    assert header is not None and header.source is not None
    assert header.client_ip == client

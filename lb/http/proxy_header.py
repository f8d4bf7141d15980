"""The PROXY protocol header (v1 text, v2 binary) an L4 balancer puts before the client's bytes.  [pure]

Per HAProxy's doc/proxy-protocol.txt.  `parse_proxy_header` is incremental:
feed it what has arrived so far; it answers None until the header is
complete, then a `ProxyHeader` with the addresses and how many bytes it took
(everything after them is the client's own stream, e.g. the TLS ClientHello
or the HTTP request).  Anything that is not exactly a header raises
`BadProxyHeader` as early as the bytes allow, and the caller closes the
connection without an answer (spec §2.1: "must be discarded and cause the
receiver to abort the connection").

Bounded: a v1 line is at most 107 bytes with its CRLF; a v2 header is 16 bytes
plus its declared length, refused beyond `max_v2_length` (TLVs included) before
any of it is awaited.

LOCAL (v2), UNKNOWN (v1), and the families we do not route by (AF_UNSPEC,
AF_UNIX) carry no usable client address: `source` is None and the caller uses
the socket's peer, as the spec says.  What it leaves to others: whether a
listener expects the header (`listeners[].proxy_protocol`), the timer for it
(`timeouts.handshake`), and which address to believe (`lb.http.client_address`).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

import google_crc32c

from lb.errors import BadProxyHeader
from lb.http.client_address import unmapped

V1_PREFIX = b"PROXY "
V1_MAX = 107  # "PROXY UNKNOWN ffff:...:ffff ffff:...:ffff 65535 65535\r\n" (spec §2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16  # signature, version/command, family/protocol, length
# Cloud balancers add a few TLVs (AWS VPC endpoint id, Azure link id); 2 KiB leaves room for
# those and for SSL TLVs while a hostile length (up to 64 KiB) is refused before it is buffered.
MAX_V2_LENGTH = 2048
PP2_TYPE_CRC32C = 0x03  # a TLV carrying the header's CRC32c, checked when present

_V1_CHARS = frozenset(b"PROXYTCPUNKWN46 0123456789abcdefABCDEF.:\r")
_DIGITS = frozenset(b"0123456789")


class Command(StrEnum):
    PROXY = "proxy"  # relayed on behalf of a client: the addresses are the client's
    LOCAL = "local"  # the balancer's own connection (health check): use the peer


class Family(StrEnum):
    TCP4 = "TCP4"
    TCP6 = "TCP6"
    UDP4 = "UDP4"
    UDP6 = "UDP6"
    UNIX = "UNIX"
    UNKNOWN = "UNKNOWN"  # v1 UNKNOWN, v2 AF_UNSPEC


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    """A complete PROXY header.

    `source`/`destination` are (ip, port), or None when the header carries no usable
    address (LOCAL, UNKNOWN, UNSPEC, UNIX): then the connection's own peer stands.
    """

    version: int  # 1 or 2
    command: Command
    family: Family
    source: tuple[str, int] | None
    destination: tuple[str, int] | None
    consumed: int  # header bytes to drop from the front of the stream
    tlvs: tuple[tuple[int, bytes], ...] = ()  # v2 type-length-value extensions, in order

    @property
    def client_address(self) -> tuple[str, int] | None:
        """The client's (ip, port) from the header, or None: use the socket's peer.

        None for a UDP family too: a datagram's endpoints say nothing of who holds this TCP connection,
        and HAProxy, whose specification this is, takes a client address from TCP4 and TCP6 alone.
        """
        if self.source is None or (self.family is not Family.TCP4 and self.family is not Family.TCP6):
            return None
        return self.source

    @property
    def client_ip(self) -> str | None:
        """`client_address`'s ip, or None."""
        address = self.client_address
        return None if address is None else address[0]


def parse_proxy_header(buf: bytes | bytearray, *, max_v2_length: int = MAX_V2_LENGTH) -> ProxyHeader | None:
    """Parse the PROXY header at the start of `buf`, v1 or v2, whichever it is.

    Args:
        buf: the connection's first bytes, as many as have arrived.
        max_v2_length: the largest v2 address + TLV block accepted.

    Returns:
        The header, or None if `buf` is a valid beginning of one that needs more bytes.

    Raises:
        BadProxyHeader: `buf` does not start with a valid header (close the connection).
    """
    if not buf:
        return None
    if buf[0] == V2_SIGNATURE[0]:
        return _parse_v2(bytes(buf[: V2_FIXED + max_v2_length]), max_v2_length)
    if buf[0] == V1_PREFIX[0]:
        return _parse_v1(bytes(buf[:V1_MAX]))
    raise BadProxyHeader("connection does not start with a PROXY protocol header")


# -- v1 ----------------------------------------------------------------------------------------


_V1_UNKNOWN: Final = b"PROXY UNKNOWN"


def _parse_v1(buf: bytes) -> ProxyHeader | None:
    prefix = buf[: len(V1_PREFIX)]
    if prefix != V1_PREFIX[: len(prefix)]:
        raise BadProxyHeader("connection does not start with a PROXY protocol header")
    end = buf.find(b"\r\n")
    # Spec §2.1: after UNKNOWN the receiver must ignore anything presented before the CRLF (HAProxy
    # takes any bytes there), so the character check is for the other forms only.
    unknown = buf.startswith(_V1_UNKNOWN) and buf[len(_V1_UNKNOWN) : len(_V1_UNKNOWN) + 1] in (b"", b" ", b"\r")
    if end < 0:
        # Fail as soon as the bytes cannot become a header: no slow-drip of garbage.
        if not unknown and (not _V1_CHARS.issuperset(buf) or b"\r" in buf[:-1]):
            raise BadProxyHeader("invalid character in PROXY v1 header")
        if len(buf) >= V1_MAX:
            raise BadProxyHeader(f"PROXY v1 header without CRLF in its first {V1_MAX} bytes")
        return None
    consumed = end + 2
    if consumed > V1_MAX:
        raise BadProxyHeader(f"PROXY v1 header longer than {V1_MAX} bytes")
    if unknown:
        return ProxyHeader(1, Command.PROXY, Family.UNKNOWN, None, None, consumed)
    line = buf[:end]
    if not _V1_CHARS.issuperset(line) or b"\r" in line:
        raise BadProxyHeader("invalid character in PROXY v1 header")
    parts = line.split(b" ")
    if len(parts) != 6:
        raise BadProxyHeader("PROXY v1 header needs protocol, two addresses and two ports")
    _, proto, src, dst, sport, dport = parts
    if proto == b"TCP4":
        family, version = Family.TCP4, 4
    elif proto == b"TCP6":
        family, version = Family.TCP6, 6
    else:
        raise BadProxyHeader("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN")
    source = (_v1_address(src, version), _v1_port(sport))
    destination = (_v1_address(dst, version), _v1_port(dport))
    return ProxyHeader(1, Command.PROXY, family, source, destination, consumed)


def _v1_address(raw: bytes, version: int) -> str:
    text = raw.decode("ascii")
    try:
        # ipaddress refuses leading zeros in IPv4 (spec: "Heading zeroes are not permitted").
        address = ipaddress.IPv4Address(text) if version == 4 else ipaddress.IPv6Address(text)
    except ValueError:
        raise BadProxyHeader(f"invalid IPv{version} address {text!r} in PROXY v1 header") from None
    return str(unmapped(address))  # one spelling per client


def _v1_port(raw: bytes) -> int:
    if not raw or not _DIGITS.issuperset(raw) or (len(raw) > 1 and raw[0] == 0x30) or len(raw) > 5:
        raise BadProxyHeader(f"invalid port {raw.decode('ascii')!r} in PROXY v1 header")
    port = int(raw)
    if port > 65535:
        raise BadProxyHeader(f"port {port} out of range in PROXY v1 header")
    return port


# -- v2 ----------------------------------------------------------------------------------------

# family/protocol byte -> (family, address block length); spec §2.2.
_V2_FAMILIES = {
    0x11: (Family.TCP4, 12),
    0x12: (Family.UDP4, 12),
    0x21: (Family.TCP6, 36),
    0x22: (Family.UDP6, 36),
    0x31: (Family.UNIX, 216),
    0x32: (Family.UNIX, 216),
}


def _parse_v2(buf: bytes, max_length: int) -> ProxyHeader | None:
    signature = buf[: len(V2_SIGNATURE)]
    if signature != V2_SIGNATURE[: len(signature)]:
        raise BadProxyHeader("connection does not start with a PROXY protocol header")
    if len(buf) < V2_FIXED:
        if len(buf) > len(V2_SIGNATURE):
            _v2_command(buf[12])
        return None
    command = _v2_command(buf[12])
    family_byte = buf[13]
    if family_byte >> 4 > 3 or family_byte & 0x0F > 2:
        raise BadProxyHeader(f"unknown address family/protocol 0x{family_byte:02x} in PROXY v2 header")
    length = int.from_bytes(buf[14:16], "big")
    if length > max_length:
        raise BadProxyHeader(f"PROXY v2 header of {V2_FIXED + length} bytes exceeds {V2_FIXED + max_length}")
    consumed = V2_FIXED + length
    if len(buf) < consumed:
        return None
    block = buf[V2_FIXED:consumed]
    known = _V2_FAMILIES.get(family_byte)
    if command is Command.LOCAL or known is None:
        # LOCAL and AF_UNSPEC: the spec says ignore the block (but skip `length` bytes).
        return ProxyHeader(2, command, Family.UNKNOWN, None, None, consumed)
    family, size = known
    if length < size:
        raise BadProxyHeader(f"PROXY v2 address block of {length} bytes, {family} needs {size}")
    tlvs, crc_at = _tlvs(block, size)
    if crc_at is not None:
        _check_crc32c(bytes(buf[:consumed]), V2_FIXED + crc_at)
    if family is Family.UNIX:
        return ProxyHeader(2, command, family, None, None, consumed, tlvs)
    half = (size - 4) // 2
    src = ipaddress.ip_address(block[:half])
    dst = ipaddress.ip_address(block[half : 2 * half])
    sport = int.from_bytes(block[2 * half : 2 * half + 2], "big")
    dport = int.from_bytes(block[2 * half + 2 : size], "big")
    source, destination = (str(unmapped(src)), sport), (str(unmapped(dst)), dport)
    return ProxyHeader(2, command, family, source, destination, consumed, tlvs)


def _check_crc32c(header: bytes, at: int) -> None:
    """The spec (§2.2.5): a receiver that supports PP2_TYPE_CRC32C computes the CRC32c of the whole
    header with that TLV's value (4 bytes at `at`) zeroed, and drops the connection when it
    differs: a header corrupted on its way would otherwise give a wrong client address."""
    zeroed = header[:at] + bytes(4) + header[at + 4 :]
    if crc32c(zeroed) != int.from_bytes(header[at : at + 4], "big"):
        raise BadProxyHeader("PROXY v2 header fails its CRC32c checksum")


# google-crc32c falls back to pure Python (with a RuntimeWarning) where no wheel fits and no compiler
# built its extension: lb.config.advice says so when a listener reads PROXY headers.
CRC32C_IN_C = google_crc32c.implementation == "c"


def crc32c(data: bytes) -> int:
    """CRC32c (Castagnoli, RFC 4960 appendix B) of `data`.

    google-crc32c's C (SSE4.2 where the CPU has it): ~0.2 µs for a 2 KiB header, where a
    table-driven Python loop took ~200-275 µs, which let any peer of a `proxy_protocol` listener
    buy a handshake's worth of our CPU per connection with one header.
    """
    checksum: int = google_crc32c.value(data)
    return checksum


def _v2_command(byte: int) -> Command:
    if byte >> 4 != 2:
        raise BadProxyHeader(f"PROXY v2 header with version {byte >> 4}, expected 2")
    if byte & 0x0F == 0:
        return Command.LOCAL
    if byte & 0x0F == 1:
        return Command.PROXY
    raise BadProxyHeader(f"unknown PROXY v2 command {byte & 0x0F}")


def _tlvs(block: bytes, start: int) -> tuple[tuple[tuple[int, bytes], ...], int | None]:
    """The TLVs after the addresses, and where in `block` a CRC32c TLV's value is (None: no such TLV).

    A TLV running past the block is refused (as HAProxy does), and so is more than one CRC32c.
    """
    out: list[tuple[int, bytes]] = []
    crc_at = None
    index = start
    while index < len(block):
        if index + 3 > len(block):
            raise BadProxyHeader("truncated TLV in PROXY v2 header")
        size = int.from_bytes(block[index + 1 : index + 3], "big")
        if index + 3 + size > len(block):
            raise BadProxyHeader("TLV longer than the PROXY v2 header")
        if block[index] == PP2_TYPE_CRC32C:
            if size != 4 or crc_at is not None:
                raise BadProxyHeader("PROXY v2 header with a malformed or repeated CRC32c TLV")
            crc_at = index + 3
        out.append((block[index], block[index + 3 : index + 3 + size]))
        index += 3 + size
    return tuple(out), crc_at

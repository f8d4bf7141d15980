"""The bytes the benchmark puts on the wire: handshake heads and RFC 6455 frames.  [pure]

The load generator sends pre-built masked frames (one fixed mask key: the proxies
under test never look at it, and a fixed key lets the echo server precompute) and
counts echoed bytes instead of parsing every message, so it needs the exact size
of each echoed frame (`server_frame_size`).  The echo server's frame loop
(`echo_frames`) lives here too, so both halves can be checked without a socket.

Only what the benchmark needs: no extensions, no fragmentation bookkeeping (a
fragment is echoed as a fragment), no UTF-8 validation.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from dataclasses import dataclass

WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
BENCH_MASK = b"\x37\xfa\x21\x3d"  # fixed client mask key (RFC 6455 §5.3 wants it random; a benchmark may not)
BENCH_KEY = base64.b64encode(b"ws-affinity-lb-b").decode()  # any 16 bytes, base64 (RFC 6455 §4.1)

OP_CONTINUATION = 0x0
OP_TEXT = 0x1
OP_BINARY = 0x2
OP_CLOSE = 0x8
OP_PING = 0x9
OP_PONG = 0xA

HEAD_END = b"\r\n\r\n"
_U16 = struct.Struct(">H")
_U64 = struct.Struct(">Q")
_MASK_CACHE_LIMIT = 4096


def accept_key(key: str) -> str:
    """Sec-WebSocket-Accept for a Sec-WebSocket-Key (RFC 6455 §4.2.2 step 5.4)."""
    digest = hashlib.sha1((key + WS_GUID).encode("ascii")).digest()
    return base64.b64encode(digest).decode("ascii")


def frame_header(length: int, opcode: int, *, masked: bool, fin: bool = True) -> bytes:
    """The header of one frame with a `length`-byte payload, without the mask key (RFC 6455 §5.2)."""
    first = (0x80 if fin else 0) | opcode
    mask_bit = 0x80 if masked else 0
    if length < 126:
        return bytes((first, mask_bit | length))
    if length < 65536:
        return bytes((first, mask_bit | 126)) + _U16.pack(length)
    return bytes((first, mask_bit | 127)) + _U64.pack(length)


def client_frame(payload: bytes, opcode: int = OP_BINARY, mask: bytes = BENCH_MASK) -> bytes:
    """A complete masked client-to-server frame."""
    return frame_header(len(payload), opcode, masked=True) + mask + apply_mask(payload, mask)


def server_frame(payload: bytes, opcode: int = OP_TEXT) -> bytes:
    """A complete unmasked server-to-client frame."""
    return frame_header(len(payload), opcode, masked=False) + payload


def server_frame_size(payload_length: int) -> int:
    """Bytes on the wire of an unmasked frame carrying `payload_length` bytes: what one echo costs."""
    return len(frame_header(payload_length, OP_BINARY, masked=False)) + payload_length


def hello_message(server_id: str) -> bytes:
    """The echo server's first message on every WebSocket: `{"type":"hello","server_id":ID}`."""
    return json.dumps({"type": "hello", "server_id": server_id}, separators=(",", ":")).encode()


class Unmasker:
    """XORs payloads with a 4-byte mask key, one big-integer XOR per payload.

    The repeated key as an integer is cached per (key, length): the benchmark's
    fixed key and few sizes make that a dictionary hit after the first frame.
    """

    __slots__ = ("_cache",)

    def __init__(self) -> None:
        self._cache: dict[tuple[bytes, int], int] = {}

    def unmask(self, payload: bytes | bytearray | memoryview, mask: bytes) -> bytes:
        n = len(payload)
        if n == 0:
            return b""
        cache_key = (mask, n)
        stream = self._cache.get(cache_key)
        if stream is None:
            if len(self._cache) >= _MASK_CACHE_LIMIT:
                self._cache.clear()
            stream = int.from_bytes((mask * (n // 4 + 1))[:n], "little")
            self._cache[cache_key] = stream
        return (int.from_bytes(payload, "little") ^ stream).to_bytes(n, "little")


_DEFAULT_UNMASKER = Unmasker()


def apply_mask(payload: bytes, mask: bytes) -> bytes:
    """Mask or unmask `payload` with `mask` (the operation is its own inverse, RFC 6455 §5.3)."""
    return _DEFAULT_UNMASKER.unmask(payload, mask)


@dataclass(frozen=True, slots=True)
class Echo:
    """What the echo server does with the bytes it has so far."""

    reply: bytes    # frames to send back, unmasked
    consumed: int   # bytes of input used (complete frames only)
    close: bool     # a close frame arrived: after the reply, hang up


def echo_frames(data: bytes | bytearray, unmasker: Unmasker) -> Echo:
    """Answer every complete client frame in `data`: data frames echoed, ping ponged, close returned.

    A frame from the client must be masked (RFC 6455 §5.1); an unmasked one is
    echoed as is, since the benchmark has no one to complain to.
    """
    out: list[bytes] = []
    n = len(data)
    i = 0
    view = memoryview(data)
    try:
        while n - i >= 2:
            first = data[i]
            second = data[i + 1]
            length = second & 0x7F
            header = 2
            if length == 126:
                if n - i < 4:
                    break
                length = _U16.unpack_from(data, i + 2)[0]
                header = 4
            elif length == 127:
                if n - i < 10:
                    break
                length = _U64.unpack_from(data, i + 2)[0]
                header = 10
            masked = second & 0x80
            start = i + header + (4 if masked else 0)
            end = start + length
            if end > n:
                break
            payload = view[start:end]
            body = unmasker.unmask(payload, bytes(view[i + header : start])) if masked else bytes(payload)
            opcode = first & 0x0F
            if opcode == OP_PONG:
                i = end
                continue
            if opcode == OP_PING:
                out.append(frame_header(length, OP_PONG, masked=False) + body)
                i = end
                continue
            # Same first byte (FIN, opcode), mask bit cleared, same extended length (RFC 6455 §5.2).
            out.append(bytes((first, second & 0x7F)) + bytes(view[i + 2 : i + header]) + body)
            i = end
            if opcode == OP_CLOSE:
                return Echo(b"".join(out), i, True)
    finally:
        view.release()
    return Echo(b"".join(out), i, False)


def client_request(host: str, path: str = "/ws", cookie: str | None = None, key: str = BENCH_KEY) -> bytes:
    """A WebSocket upgrade request head (RFC 6455 §4.1), optionally carrying a `Cookie`."""
    lines = [
        f"GET {path} HTTP/1.1",
        f"Host: {host}",
        "Upgrade: websocket",
        "Connection: Upgrade",
        f"Sec-WebSocket-Key: {key}",
        "Sec-WebSocket-Version: 13",
    ]
    if cookie:
        lines.append(f"Cookie: {cookie}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def status_code(head: bytes) -> int:
    """The status code of a response head (`HTTP/1.1 101 Switching Protocols`), or 0 if unreadable."""
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return 0
    return int(parts[1])


def set_cookies(head: bytes) -> list[str]:
    """The `name=value` part of every Set-Cookie header in a response head (RFC 6265 §4.1)."""
    cookies: list[str] = []
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep and name.strip().lower() == b"set-cookie":
            pair = value.strip().split(b";", 1)[0].strip()
            if pair:
                cookies.append(pair.decode("latin-1"))
    return cookies


def first_frame(data: bytes | bytearray, offset: int = 0) -> tuple[int, bytes] | None:
    """(frame size, payload) of the frame at `data[offset:]`, or None if incomplete (payload left masked)."""
    available = len(data) - offset
    if available < 2:
        return None
    second = data[offset + 1]
    length = second & 0x7F
    header = 2
    if length == 126:
        if available < 4:
            return None
        length = _U16.unpack_from(data, offset + 2)[0]
        header = 4
    elif length == 127:
        if available < 10:
            return None
        length = _U64.unpack_from(data, offset + 2)[0]
        header = 10
    if second & 0x80:
        header += 4
    if available < header + length:
        return None
    start = offset + header
    return header + length, bytes(data[start : start + length])

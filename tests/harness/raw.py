"""Raw sockets: hostile bytes in and the status line back (`raw_exchange`), and `RawWs`, a WebSocket
client of hand-made frames (fragmentation, ping, close codes and reasons).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import secrets
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from tests.harness import HOST, UNIT, WS_GUID


@dataclass
class RawResponse:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes

    def get(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


def parse_head(raw: bytes) -> RawResponse:
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    assert version.startswith("HTTP/1."), f"not an HTTP status line: {lines[0]!r}"
    headers = []
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers.append((name.strip(), value.strip()))
    return RawResponse(int(code), reason, headers, b"")


async def open_raw(
    port: int, *, source_ip: str | None = None, host: str = HOST, within: float = 5 * UNIT
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(host, port, local_addr=(source_ip, 0) if source_ip else None, limit=2**20),
        within,
    )


async def close_raw(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(OSError, asyncio.TimeoutError):
        await asyncio.wait_for(writer.wait_closed(), 2 * UNIT)


async def read_response(reader: asyncio.StreamReader, *, within: float = 5 * UNIT, body: bool = True) -> RawResponse:
    """Read one response head (and its body by Content-Length, or to EOF when it has none)."""
    async with asyncio.timeout(within):
        raw = await reader.readuntil(b"\r\n\r\n")
        response = parse_head(raw[:-4])
        if body and response.status != 101:
            length = response.get("Content-Length")
            if length is not None:
                response.body = await reader.readexactly(int(length))
            elif response.status not in (204, 304):
                response.body = await reader.read(2**20)
    return response


async def raw_exchange(
    port: int, data: bytes, *, within: float = 5 * UNIT, source_ip: str | None = None
) -> RawResponse | None:
    """Send raw bytes, read the answer; None when the connection closes without any."""
    reader, writer = await open_raw(port, source_ip=source_ip)
    try:
        writer.write(data)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        try:
            return await read_response(reader, within=within)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
    finally:
        await close_raw(writer)


async def wait_closed_by_peer(reader: asyncio.StreamReader, within: float) -> bytes:
    """Read until EOF (or reset); returns what came before it. Fails if the peer keeps it open."""
    received = bytearray()
    async with asyncio.timeout(within):
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


def ws_key() -> str:
    return base64.b64encode(secrets.token_bytes(16)).decode()


def upgrade_request(
    path: str = "/ws",
    *,
    host: str = HOST,
    key: str | None = "auto",
    version: str | None = "13",
    extra: Sequence[tuple[str, str]] = (),
    method: str = "GET",
) -> bytes:
    """A WebSocket upgrade head; pass key/version None to leave the header out."""
    headers = [("Host", host), ("Upgrade", "websocket"), ("Connection", "Upgrade")]
    if key is not None:
        headers.append(("Sec-WebSocket-Key", ws_key() if key == "auto" else key))
    if version is not None:
        headers.append(("Sec-WebSocket-Version", version))
    headers.extend(extra)
    lines = [f"{method} {path} HTTP/1.1", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def encode_frame(
    opcode: int, payload: bytes, *, fin: bool = True, mask: bool = True, key: bytes | None = None
) -> bytes:
    """One RFC 6455 §5.2 frame; clients mask, servers don't.  A masked frame's key is random unless
    `key` (4 bytes) is given, for bytes that are the same at every run."""
    head = bytearray([(0x80 if fin else 0) | opcode])
    mask_bit = 0x80 if mask else 0
    if len(payload) < 126:
        head.append(mask_bit | len(payload))
    elif len(payload) < 2**16:
        head.append(mask_bit | 126)
        head += struct.pack("!H", len(payload))
    else:
        head.append(mask_bit | 127)
        head += struct.pack("!Q", len(payload))
    if not mask:
        return bytes(head) + payload
    key = secrets.token_bytes(4) if key is None else key
    masked = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
    return bytes(head) + key + masked


@dataclass(frozen=True)
class Frame:
    fin: bool
    opcode: int
    payload: bytes


OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def close_payload(code: int, reason: str = "") -> bytes:
    return struct.pack("!H", code) + reason.encode()


class RawWs:
    """A WebSocket client made by hand: exact frames on the wire, every frame seen on the way back."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, response: RawResponse) -> None:
        self.reader = reader
        self.writer = writer
        self.response = response

    @classmethod
    @contextlib.asynccontextmanager
    async def connect(
        cls, port: int, path: str = "/ws", *, extra: Sequence[tuple[str, str]] = (), within: float = 5 * UNIT
    ) -> AsyncIterator[RawWs]:
        reader, writer = await open_raw(port)
        try:
            key = ws_key()
            writer.write(upgrade_request(path, host=f"{HOST}:{port}", key=key, extra=extra))
            await writer.drain()
            response = await read_response(reader, within=within)
            assert response.status == 101, f"expected 101, got {response.status} {response.body[:200]!r}"
            expected = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
            assert response.get("Sec-WebSocket-Accept") == expected, "bad Sec-WebSocket-Accept"
            yield cls(reader, writer, response)
        finally:
            await close_raw(writer)

    async def send(self, opcode: int, payload: bytes, *, fin: bool = True) -> None:
        self.writer.write(encode_frame(opcode, payload, fin=fin))
        await self.writer.drain()

    async def recv_frame(self, within: float = 5 * UNIT) -> Frame:
        async with asyncio.timeout(within):
            head = await self.reader.readexactly(2)
            length = head[1] & 0x7F
            if length == 126:
                length = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif length == 127:
                length = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            key = await self.reader.readexactly(4) if head[1] & 0x80 else b""
            payload = await self.reader.readexactly(length)
        if key:
            payload = bytes(b ^ key[i % 4] for i, b in enumerate(payload))
        return Frame(bool(head[0] & 0x80), head[0] & 0x0F, payload)

    async def recv_message(self, within: float = 5 * UNIT) -> tuple[int, bytes, list[Frame]]:
        """The next data message, reassembled; also returns the control frames seen meanwhile."""
        controls: list[Frame] = []
        opcode = None
        data = bytearray()
        while True:
            frame = await self.recv_frame(within)
            if frame.opcode >= 0x8:
                controls.append(frame)
                if frame.opcode == OP_CLOSE:
                    raise AssertionError(f"closed while waiting for a message: {frame}")
                continue
            if opcode is None:
                opcode = frame.opcode
            data += frame.payload
            if frame.fin:
                return opcode, bytes(data), controls

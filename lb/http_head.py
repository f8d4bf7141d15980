"""HTTP/1.1 message heads: find, parse strictly, and render.  [pure]

Only the head is parsed; bodies and everything after a 101 are relayed as
bytes by others.  The grammar is RFC 9112's, applied strictly because a
balancer that is lenient where its backend is strict (or the reverse) is how
request smuggling starts: bare CR or LF, obs-fold, whitespace before a colon,
control characters in values and conflicting framing headers are all rejected.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from lb.errors import BadRequest, HeadersTooLarge

HEAD_END = b"\r\n\r\n"

# RFC 9110 §5.6.2 tchar; header names and methods must consist of these.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# RFC 9110 §5.5 field-value: VCHAR, obs-text, SP and HTAB.
_FIELD_VALUE = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100)) + b" \t"
# What a head may hold at all: field-value bytes plus the CRLFs between lines.
_LINE_BYTES = _FIELD_VALUE + b"\r\n"
# RFC 9112 §3.2: request-target has no whitespace or control characters.
_TARGET = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100))


@dataclass(frozen=True, slots=True)
class Head:
    """A parsed request or response head; header names keep their case and order."""

    start_line: tuple[str, str, str]  # (method, target, version) or (version, status, reason)
    headers: tuple[tuple[str, str], ...]
    _index: dict[str, list[str]] = field(repr=False, compare=False)

    def get(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        values = self._index.get(name.lower())
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        return self._index.get(name.lower(), [])

    def has_token(self, name: str, token: str) -> bool:
        """Whether the comma-separated header `name` lists `token` (case-insensitive)."""
        wanted = token.lower()
        return any(
            part.strip().lower() == wanted for value in self.get_all(name) for part in value.split(",")
        )


@dataclass(frozen=True, slots=True)
class RequestHead:
    method: str
    target: str
    version: str
    head: Head

    @property
    def path(self) -> str:
        """The path of the target, without the query (absolute-form reduced to its path)."""
        target = self.target
        if not target.startswith("/"):
            # absolute-form: the path starts after the authority, which ends at / ? or #.
            start = target.find("://") + 3 if "://" in target else 0
            end = len(target)
            for mark in "/?#":
                found = target.find(mark, start)
                if 0 <= found < end:
                    end = found
            target = target[end:] if target[end : end + 1] == "/" else "/"
        query = target.find("?")
        return target if query < 0 else target[:query]


@dataclass(frozen=True, slots=True)
class ResponseHead:
    version: str
    status: int
    reason: str
    head: Head


def find_head_end(buffer: bytes | bytearray, limit: int) -> int:
    """Return the length of the complete head at the start of `buffer`, or -1 if incomplete.

    Raises:
        HeadersTooLarge: the head is (or will be) longer than `limit` bytes.
    """
    end = buffer.find(HEAD_END, 0, limit + len(HEAD_END))
    if end < 0:
        if len(buffer) >= limit:
            raise HeadersTooLarge(f"request head exceeds {limit} bytes")
        return -1
    if end + len(HEAD_END) > limit:
        raise HeadersTooLarge(f"request head exceeds {limit} bytes")
    return end + len(HEAD_END)


def _split_lines(raw: bytes) -> list[bytes]:
    """The head's lines, once the whole head is known to hold only CRLF line ends and no controls.

    Three counts and one translate over the whole head (all in C) instead of a check per line.
    """
    if not raw.endswith(HEAD_END):
        raise BadRequest("incomplete head")
    body = raw[: -len(HEAD_END)]
    crlf = body.count(b"\r\n")
    # RFC 9112 §2.2: a bare CR or LF is not a line ending here.
    if body.count(b"\r") != crlf or body.count(b"\n") != crlf:
        raise BadRequest("bare CR or LF in head")
    if body.translate(None, _LINE_BYTES):
        raise BadRequest("control character in head")
    return body.split(b"\r\n")


def _parse_fields(start_line: tuple[str, str, str], lines: list[bytes]) -> Head:
    headers: list[tuple[str, str]] = []
    index: dict[str, list[str]] = {}
    for line in lines:
        if line[:1] in (b" ", b"\t"):
            raise BadRequest("obsolete line folding in header")  # RFC 9112 §5.2
        name, colon, value = line.partition(b":")
        if not colon or not name or name.translate(None, _TCHAR):
            raise BadRequest("malformed header line")
        value = value.strip(b" \t")  # control characters were refused for the whole head
        text_name = name.decode("ascii")
        text_value = value.decode("latin-1")
        headers.append((text_name, text_value))
        index.setdefault(text_name.lower(), []).append(text_value)
    return Head(start_line=start_line, headers=tuple(headers), _index=index)


def _check_framing(head: Head) -> None:
    """Reject the framing ambiguities that enable smuggling (RFC 9112 §6.1, §6.3)."""
    lengths = head.get_all("content-length")
    encodings = head.get_all("transfer-encoding")
    if lengths and encodings:
        raise BadRequest("both Content-Length and Transfer-Encoding")
    if lengths:
        values = {part.strip() for value in lengths for part in value.split(",")}
        only = next(iter(values))
        if len(values) != 1 or not (only.isascii() and only.isdigit()):
            raise BadRequest("invalid Content-Length")
    if encodings:
        codings = [part.strip().lower() for value in encodings for part in value.split(",")]
        if codings[-1] != "chunked":
            raise BadRequest("Transfer-Encoding must end with chunked")


def parse_request_head(raw: bytes) -> RequestHead:
    """Parse a complete request head (including the final blank line).

    Raises:
        BadRequest: anything RFC 9112 does not allow, with a short reason.
    """
    lines = _split_lines(raw)
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not method or method.translate(None, _TCHAR):
        raise BadRequest("malformed method")
    if not target or target.translate(None, _TARGET):
        raise BadRequest("malformed request target")
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise BadRequest("unsupported HTTP version")
    text_target = target.decode("latin-1")
    origin_or_absolute = text_target.startswith(("/", "http://", "https://"))
    if not origin_or_absolute and not (method == b"OPTIONS" and text_target == "*"):
        raise BadRequest("unsupported request target form")
    start = (method.decode("ascii"), text_target, version.decode("ascii"))
    head = _parse_fields(start, lines[1:])
    hosts = head.get_all("host")
    if version == b"HTTP/1.1" and len(hosts) != 1:
        raise BadRequest("HTTP/1.1 request needs exactly one Host header")  # RFC 9112 §3.2
    _check_framing(head)
    return RequestHead(method=start[0], target=start[1], version=start[2], head=head)


def parse_response_head(raw: bytes) -> ResponseHead:
    """Parse a complete response head from a backend.

    Raises:
        BadRequest: a malformed answer (the caller turns it into 502).
    """
    lines = _split_lines(raw)
    version, _, rest = lines[0].partition(b" ")
    status, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(status) != 3 or not status.isdigit():
        raise BadRequest("malformed status line")
    start = (version.decode("ascii"), status.decode("ascii"), reason.decode("latin-1"))
    head = _parse_fields(start, lines[1:])
    _check_framing(head)
    return ResponseHead(version=start[0], status=int(start[1]), reason=start[2], head=head)


def render_head(start_line: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """Serialize a head; values were validated on the way in or are our own."""
    lines = [start_line]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

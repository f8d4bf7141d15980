"""Frozen reference: lb/http/head.py as it was before the one-pass parser (commit fe65345).

The reference of tests/unit/test_http_head_reference.py, which checks on generated and
hostile heads that lb.http.head accepts, refuses (same exception class and message) and
returns exactly what this per-line parser does.  Do not edit it to follow lb/http/head.py:
a change of behaviour there must show up as a failure of that test.  (The design notes are
in lb/http/head.py's docstring.)

One deliberate change since, made in both: list values (Content-Length, Transfer-Encoding,
Connection/Upgrade tokens) are trimmed of SP and HTAB only (RFC 9110 OWS), not by a bare
`str.strip()`, which also took NBSP and NEL off a latin-1 value: `chunked\x85` read as chunked
here while a backend reads another coding (a CL/TE desync).  test_http_head_rfc9112 holds it.
A second one: an absolute-form target whose authority differs from Host replaces the Host
(RFC 9112 §3.2.2: the received Host MUST be ignored), where both refused it with a 400.
A third: the proxy claims a backend believes (lb.http.head.PROXY_CLAIMS: `True-Client-IP`,
`X-Forwarded-Ssl`, `X-Forwarded-Client-Cert`, ...) are protected too, so a name with `_` for
one of them is dropped as one for `X-Real-IP` was.  A fourth: less common spellings of those
claims (`Client-IP`, `X-Forwarded`, `Forwarded-For`, `X-Remote-IP`, ...) joined them.
A fifth: a higher minor version of HTTP/1 (`HTTP/1.2`..`HTTP/1.9`) in a request or status line is
read as HTTP/1.1 (RFC 9110 §2.5), where both refused it (a 400, a 502).  A sixth: empty list
elements in Transfer-Encoding (`,chunked`, `chunked,`, an empty line) count for nothing and are
left out of the head (RFC 9110 §5.6.1.2), where both refused them (400, or 501 naming coding '').
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from lb.errors import (
    BadFraming,
    BadHost,
    BadRequest,
    HeadersTooLarge,
    HttpVersionNotSupported,
    UnsupportedTransferCoding,
)

HEAD_END = b"\r\n\r\n"

# RFC 9110 §5.6.2 tchar; header names and methods must consist of these.
_TCHAR = b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
# RFC 9110 §5.5 field-value: VCHAR, obs-text, SP and HTAB.
_FIELD_VALUE = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100)) + b" \t"
# What a head may hold at all: field-value bytes plus the CRLFs between lines.
_LINE_BYTES = _FIELD_VALUE + b"\r\n"
# RFC 9112 §3.2: request-target is URI syntax (RFC 3986 §2: ASCII only), no whitespace or controls.
# Raw bytes >= 0x80 are refused as HAProxy and llhttp do: a backend might read them otherwise.
_TARGET = bytes(range(0x21, 0x7F))
# RFC 3986 §3.2.2 reg-name / IPv4address / IP-literal, then an optional port.
_HOST = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?\Z")
# RFC 9110 §8.6: 1*DIGIT; 18 digits stay below 2**63 in every parser behind us.
_MAX_LENGTH_DIGITS = 18

# Header names (lower case, `-` form) that we set, strip, or frame the body by.  A client's
# name that differs only by `_` for `-` is dropped: CGI/WSGI backends read both as one.
PROTECTED_HEADERS = frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-forwarded-port",
        "x-forwarded-prefix",
        "x-real-ip",
        "forwarded",
        # The third change (the docstring): the other proxy claims.
        "x-forwarded-server",
        "x-forwarded-uri",
        "x-forwarded-method",
        "x-forwarded-ssl",
        "x-forwarded-scheme",
        "front-end-https",
        "x-url-scheme",
        "x-client-ip",
        "true-client-ip",
        "x-cluster-client-ip",
        "cf-connecting-ip",
        "fastly-client-ip",
        "x-original-forwarded-for",
        # The fourth change (the docstring): less common spellings of the same claims.
        "client-ip",
        "x-forwarded",
        "forwarded-for",
        "x-forwarded-protocol",
        "x-remote-ip",
        "x-remote-addr",
        "x-originating-ip",
        "x-proxyuser-ip",
        "akamai-client-ip",
        "x-appengine-user-ip",
        "x-forwarded-client-cert",
        "x-forwarded-tls-client-cert",
        "x-forwarded-tls-client-cert-info",
        "x-ssl-client-cert",
        "ssl-client-cert",
        "x-original-url",
        "x-rewrite-url",
        "x-original-host",
        "remote-user",
        "x-remote-user",
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-preferred-username",
        "x-auth-request-user",
        "x-auth-request-email",
        "x-request-id",
        "x-lb-affinity",  # the default `affinity.header`; pass another via `protected=`
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "upgrade",
        # The handshake's own, which the 101 is checked against: a gateway that read a client's
        # `Sec_WebSocket_Key` as the key would answer a wrong Accept, which blames the gateway.
        "sec-websocket-key",
        "sec-websocket-version",
        "sec-websocket-protocol",
        "sec-websocket-extensions",
        "cookie",  # we route by it and strip ours from it: a `Cookie` trailer would carry it past us
    }
)


def protected_headers(affinity_header: str) -> frozenset[str]:
    """PROTECTED_HEADERS plus the configured `affinity.header`: compute once per configuration."""
    return PROTECTED_HEADERS | {affinity_header.lower()}


@dataclass(slots=True)  # not frozen, never mutated: a frozen __init__ costs ~1 µs, and this is built per request
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
        values = self._index.get(name.lower())
        if not values:
            return False
        wanted = token.lower()
        for value in values:
            if "," not in value:  # the common case (`Upgrade: websocket`): no split, no generator
                if value.strip(" \t").lower() == wanted:
                    return True
            elif any(part.strip(" \t").lower() == wanted for part in value.split(",")):
                return True
        return False


@dataclass(slots=True)  # not frozen, never mutated: a frozen __init__ costs ~1 µs, and this is built per request
class RequestHead:
    method: str
    target: str  # origin-form (an absolute-form target is rewritten; see `absolute_target`)
    version: str
    head: Head
    absolute_target: str | None = None  # the target as received, when it was absolute-form
    dropped: tuple[str, ...] = ()  # header names dropped as aliases of ours (`X_Forwarded_For`)

    @property
    def content_length(self) -> int | None:
        """The body length from Content-Length, or None (no such header: chunked or no body)."""
        value = self.head.get("content-length")
        return None if value is None else int(value)

    @property
    def chunked(self) -> bool:
        """Whether the body is chunked (the parser admits `chunked` alone and only that)."""
        return bool(self.head.get_all("transfer-encoding"))

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


@dataclass(slots=True)  # not frozen, never mutated: a frozen __init__ costs ~1 µs, and this is built per request
class ResponseHead:
    version: str
    status: int
    reason: str
    head: Head


def find_head_end(buffer: bytes | bytearray, limit: int, start: int = 0) -> int:
    """Return the length of the complete head at the start of `buffer`, or -1 if incomplete.

    Args:
        buffer: the bytes received so far, the head first.
        limit: the largest head accepted, in bytes.
        start: how many leading bytes an earlier call already searched without finding the end
            (pass `len(buffer)` as it was when that call returned -1).  The search resumes
            3 bytes before it, so a CRLFCRLF split across reads is still found, and a slow
            client feeding a head byte by byte costs O(n), not O(n^2).  Passing a value
            already reduced by 3 is harmless.

    Raises:
        HeadersTooLarge: the head is (or will be) longer than `limit` bytes.
    """
    end = buffer.find(HEAD_END, max(0, start - (len(HEAD_END) - 1)), limit + len(HEAD_END))
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


def _drop_aliases(head: Head, protected: frozenset[str]) -> tuple[Head, tuple[str, ...]]:
    """Leave out names that equal a protected one once `_` reads as `-`; return them too.

    CGI, WSGI and others fold `X_Forwarded_For` and `X-Forwarded-For` into one variable, so a
    client's alias would stand in for (or beside) the value we set.
    """
    headers: list[tuple[str, str]] = []
    dropped: list[str] = []
    for name, value in head.headers:
        if "_" in name:
            alias = name.lower().replace("_", "-")
            if alias in protected or alias.startswith("x-forwarded-"):
                dropped.append(name)
                continue
        headers.append((name, value))
    if not dropped:
        return head, ()
    index: dict[str, list[str]] = {}
    for name, value in headers:
        index.setdefault(name.lower(), []).append(value)
    return Head(start_line=head.start_line, headers=tuple(headers), _index=index), tuple(dropped)


def _check_framing(head: Head, version: str, *, request: bool) -> Head:
    """Reject the framing ambiguities that enable smuggling (RFC 9112 §6.1, §6.3, §7.1); the head
    without Transfer-Encoding's empty list elements.

    Raises:
        BadFraming: ambiguous or invalid framing (a backend's answer: the caller's 502).
        UnsupportedTransferCoding: a request with a coding other than chunked before it.
    """
    lengths = head.get_all("content-length")
    encodings = head.get_all("transfer-encoding")
    if not lengths and not encodings:
        return head
    if lengths and encodings:
        raise BadFraming("both Content-Length and Transfer-Encoding")
    if lengths:
        # RFC 9110 §8.6 lets us reject or merge equal repeats.  A client's are rejected (see the
        # module docstring); a backend's equal ones are accepted, as before, and framed by the value.
        if request and (len(lengths) != 1 or "," in lengths[0]):
            raise BadFraming("repeated Content-Length")
        values = {part.strip(" \t") for value in lengths for part in value.split(",")}
        only = next(iter(values))
        if len(values) != 1 or not (only.isascii() and only.isdigit()):
            raise BadFraming("invalid Content-Length")
        if len(only) > _MAX_LENGTH_DIGITS:
            raise BadFraming("Content-Length too large")
        return head
    if version == "HTTP/1.0":
        raise BadFraming("Transfer-Encoding in an HTTP/1.0 message")  # RFC 9112 §6.1: faulty framing
    kept: list[tuple[str, str]] = []
    for name, value in head.headers:
        if name.lower() != "transfer-encoding":
            kept.append((name, value))
            continue
        elements = [part.strip(" \t") for part in value.split(",")]
        if "" not in elements:
            kept.append((name, value))
        elif any(elements):
            kept.append((name, ", ".join(e for e in elements if e)))
    if kept != list(head.headers):
        index: dict[str, list[str]] = {}
        for name, value in kept:
            index.setdefault(name.lower(), []).append(value)
        head = Head(start_line=head.start_line, headers=tuple(kept), _index=index)
    codings = [part.strip(" \t").lower() for value in head.get_all("transfer-encoding") for part in value.split(",")]
    if not codings or codings[-1] != "chunked":
        raise BadFraming("Transfer-Encoding must end with chunked")  # RFC 9112 §6.3
    if codings.count("chunked") > 1:
        raise BadFraming("chunked applied more than once")  # RFC 9112 §7.1
    if request and len(codings) > 1:
        # A backend may answer `gzip, chunked`: we relay its bytes and only de-chunk to find the end.
        raise UnsupportedTransferCoding(f"unsupported transfer coding {codings[0]!r}")
    return head


def _rewrite_absolute_form(start: tuple[str, str, str], head: Head) -> tuple[str, Head]:
    """Origin-form for an absolute-form target, with Host taken from its authority (RFC 9112 §3.2.2).

    A Host that names another authority is replaced, not refused: the RFC says the received Host
    MUST be ignored for the target's (HAProxy refuses it with a 400 instead).

    Raises:
        BadHost: the authority is empty, has userinfo, or is malformed.
    """
    target = start[1]
    rest = target.partition("://")[2]
    end = len(rest)
    for mark in "/?#":
        found = rest.find(mark)
        if 0 <= found < end:
            end = found
    authority, tail = rest[:end], rest[end:]
    if not authority or "@" in authority:
        raise BadHost("absolute-form target needs a host and no userinfo")
    if not _HOST.match(authority):
        raise BadHost("malformed authority in request target")
    hosts = head.get_all("host")
    origin = tail if tail.startswith("/") else "/" + tail
    headers = [(name, authority) if name.lower() == "host" else (name, value) for name, value in head.headers]
    if not hosts:
        headers.append(("Host", authority))
    index = dict(head._index)
    index["host"] = [authority]
    return origin, Head(start_line=(start[0], origin, start[2]), headers=tuple(headers), _index=index)


def parse_request_head(raw: bytes, *, protected: frozenset[str] = PROTECTED_HEADERS) -> RequestHead:
    """Parse a complete request head (including the final blank line).

    Args:
        raw: the head, up to and including the blank line.
        protected: lower-case header names whose `_`-for-`-` spellings are dropped (every
            `x-forwarded-*` is always covered); pass `protected_headers(affinity.header)` when the
            affinity header is not the default.

    Raises:
        BadRequest: anything RFC 9112 does not allow, with a short reason (BadFraming, BadHost).
        UnsupportedTransferCoding: a transfer coding other than chunked (501).
    """
    lines = _split_lines(raw)
    parts = lines[0].split(b" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not method or method.translate(None, _TCHAR):
        raise BadRequest("malformed method")
    if b"#" in target:
        raise BadRequest("fragment in request target")
    if not target or target.translate(None, _TARGET):
        raise BadRequest("malformed request target")
    if len(version) == 8 and version[:7] == b"HTTP/1." and version[7:8] in b"23456789":
        version = b"HTTP/1.1"
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        if len(version) == 8 and version[:5] == b"HTTP/" and version[5:6] in b"23456789" and version[6:7] == b"." \
                and version[7:8].isdigit():
            raise HttpVersionNotSupported("HTTP version not supported")
        raise BadRequest("unsupported HTTP version")
    text_target = target.decode("latin-1")
    # RFC 3986 §3.1: the scheme is case-insensitive.
    origin_or_absolute = text_target[0] == "/" or text_target[:8].lower().startswith(("http://", "https://"))
    if not origin_or_absolute and not (method == b"OPTIONS" and text_target == "*"):
        raise BadRequest("unsupported request target form")
    start = (method.decode("ascii"), text_target, version.decode("ascii"))
    head = _parse_fields(start, lines[1:])
    dropped: tuple[str, ...] = ()
    if b"_" in raw and "_" in "".join(head._index):
        head, dropped = _drop_aliases(head, protected)
    hosts = head.get_all("host")
    # RFC 9112 §3.2: exactly one Host on HTTP/1.1; more than one is a 400 on any version.
    if len(hosts) > 1:
        raise BadHost("more than one Host header")
    if version == b"HTTP/1.1" and not hosts:
        raise BadHost("HTTP/1.1 request needs a Host header")
    if hosts and not _HOST.match(hosts[0]):
        raise BadHost("malformed Host header")
    head = _check_framing(head, start[2], request=True)
    absolute = None
    if text_target[:1] not in ("/", "*"):
        absolute = text_target
        text_target, head = _rewrite_absolute_form(start, head)
    return RequestHead(
        method=start[0],
        target=text_target,
        version=start[2],
        head=head,
        absolute_target=absolute,
        dropped=dropped,
    )


def parse_response_head(raw: bytes) -> ResponseHead:
    """Parse a complete response head from a backend.

    Raises:
        BadRequest: a malformed answer (the caller turns it into 502).
    """
    lines = _split_lines(raw)
    version, _, rest = lines[0].partition(b" ")
    status, _, reason = rest.partition(b" ")
    if len(version) == 8 and version[:7] == b"HTTP/1." and version[7:8] in b"23456789":
        version = b"HTTP/1.1"
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(status) != 3 or not status.isdigit():
        raise BadRequest("malformed status line")
    if not b"100" <= status <= b"599":
        # RFC 9110 §15: status codes are 100..599; `000` must be a 502, never relayed.
        raise BadRequest(f"status code {status.decode('ascii')} out of range")
    start = (version.decode("ascii"), status.decode("ascii"), reason.decode("latin-1"))
    head = _parse_fields(start, lines[1:])
    head = _check_framing(head, start[0], request=False)
    return ResponseHead(version=start[0], status=int(start[1]), reason=start[2], head=head)


def render_head(start_line: str, headers: Iterable[tuple[str, str]]) -> bytes:
    """Serialize a head; values were validated on the way in or are our own."""
    lines = [start_line]
    lines.extend(f"{name}: {value}" for name, value in headers)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

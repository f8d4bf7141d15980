"""HTTP/1.1 message heads: find, parse strictly, and render.  [pure]

Only the head is parsed; bodies and everything after a 101 are relayed as
bytes by others.  The grammar is RFC 9112's, applied strictly because a
balancer that is lenient where its backend is strict (or the reverse) is how
request smuggling starts: bare CR or LF, obs-fold, whitespace before a colon,
control characters in values and conflicting framing headers are all rejected.

Decisions where RFC 9112/9110 leave a choice (each one closes a smuggling or
spoofing gap; HAProxy, Envoy, nginx and llhttp are the references):

- Content-Length: one field line with one value.  Repeats are rejected even
  when equal (`5, 5` or two lines): RFC 9110 §8.6 allows rejecting or merging;
  llhttp (Node) rejects, and a balancer must be at least as strict as the
  strictest backend it may front, or one of them frames the body differently.
  Values over 18 digits are rejected (no 64-bit parser overflows behind us).
  A backend's equal repeats are accepted (its answer is framed by the value).
- Transfer-Encoding: only `chunked`, once, last, and only on HTTP/1.1 (a
  backend may put other codings before it: we relay, not decode, them).
  Empty list elements (`,chunked`, `chunked,`) are ignored, as RFC 9110
  §5.6.1.2 says a recipient MUST, and left out of what we send on (parsers
  behind us disagree on them: llhttp refuses `chunked,`, HAProxy 2.6 answers
  `,chunked` 422, Go anything but `chunked`).
  HTTP/1.0 with TE, `chunked` twice, or a final coding other than chunked is a
  400 (RFC 9112 §6.1, §6.3, §7.1); another coding before `chunked`
  (`identity, chunked`, `gzip, chunked`) is a 501 (RFC 9112 §6.1; h11 and Envoy
  do the same): we cannot decode it and will not pass it on undecoded.
- Version: `HTTP/1.0` and `HTTP/1.1`; a higher minor one (`HTTP/1.2`..`HTTP/1.9`, a request's or
  an answer's) is read, and sent on, as HTTP/1.1 (RFC 9110 §2.5; HAProxy does the same, llhttp
  refuses it, so a backend must never see it); `HTTP/2.0` and later on an HTTP/1 connection is a
  505 (RFC 9110 §15.6.6), anything else (`HTTP/1.10`, `http/1.1`) a 400.
- Host: exactly one on HTTP/1.1, at most one on HTTP/1.0, and a valid
  `uri-host [":" port]` (RFC 9112 §3.2).
- Absolute-form target (`GET http://a.example/x`): rewritten to origin-form
  with Host set from its authority, a Host naming another one replaced (RFC
  9112 §3.2.2: the received Host is ignored for the target's).  Userinfo in
  it is refused.
- Header names with `_` that read as one of ours once `_` becomes `-`
  (`X_Forwarded_For`, `X-Real_IP`, `Content_Length`, the affinity header...):
  dropped, not refused, as nginx does by default and Envoy's DROP_HEADER
  does.  CGI/WSGI backends fold `_` and `-` together, so forwarding one would
  let a client spoof what we set; refusing would break clients over a header
  they likely never meant.  The configuration's own names (`affinity.header`,
  a pool's `hash_key` header) are passed in `protected`.  The dropped names
  are kept in `RequestHead.dropped` (the connection logs them at DEBUG).

How a head is read: a well-formed head (nearly every one) by its grammar alone,
in one pass over its bytes by lb/http/_scan.c when it is built (`_read`), else by
one regex match for the start line and one findall for all field lines over the
head decoded once as latin-1; any other head again by the plain checks, the
whole head's bytes first, then line by line, which name its fault.  The
readings must agree on every head: tests/unit/test_http_head_reference.py holds
this module to a frozen copy of the per-line parser it was before
(tests/unit/_head_reference.py), results and exception messages alike,
tests/unit/test_http_head_scan.py holds the C pass to the regex one, and
`python -m bench.head_parse` times this module against the reference.  The C
pass halves the parse of a WebSocket upgrade's request and of its 101 (2.3 and
1.3 µs against 4.4 and 2.6 with the regex reading, both compiled, timeit).

Why our own parser and not httptools (llhttp) or h11: measured with timeit on
a typical 12-header WebSocket upgrade head (2-core box, CPython 3.11), ours
took ~13 µs with every check above (~0.6x that since the one-pass reading),
h11 ~29 µs, and httptools ~3 µs for the raw callbacks alone.  On top of those
callbacks we would still need the rules above (llhttp accepts TE on HTTP/1.0,
`identity, chunked`, repeated Host on HTTP/1.0, raw non-ASCII targets...) and to
build the same `Head`: that hybrid measured ~0.7x of the per-line parser, less
than the one-pass reading saves, and its per-header callbacks into Python cost
more than our C pass's whole head.  So llhttp stays the oracle:
tests/unit/test_http_head_differential.py checks that whatever we accept, it
reads alike (method, target, fields, body length).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final, TypeAlias, cast

from lb import built_in_c
from lb.errors import (
    BadFraming,
    BadGateway,
    BadHost,
    BadRequest,
    HeadersTooLarge,
    HttpVersionNotSupported,
    UnsupportedMethod,
    UnsupportedTransferCoding,
)

HEAD_END: Final = b"\r\n\r\n"

# RFC 9110 §5.6.2 tchar: header names and methods are tokens (chunked trailers' names too:
# lb.http.framing reads them with this class).
TCHAR: Final = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN: Final = re.compile(TCHAR + "+")
_BARE_LF: Final = re.compile(rb"(?<!\r)\n")  # RFC 9112 §2.2 allows recipients to take it as a line end; we refuse
# RFC 9110 §5.5 field-value: VCHAR, obs-text, SP and HTAB.
_FIELD_VALUE: Final = bytes(range(0x21, 0x7F)) + bytes(range(0x80, 0x100)) + b" \t"
# What a head may hold at all: field-value bytes plus the CRLFs between lines.
_LINE_BYTES: Final = _FIELD_VALUE + b"\r\n"
# RFC 9112 §3.2: request-target is URI syntax (RFC 3986 §2: ASCII only), no whitespace or controls.
# Raw bytes >= 0x80 are refused as HAProxy and llhttp do: a backend might read them otherwise.
_TARGET_CHAR = r"[\x21\x22\x24-\x7e]"  # and no `#`: a fragment is no part of a request-target
_TARGET: Final = re.compile(_TARGET_CHAR + "+")
_VERSIONS: Final = ("HTTP/1.1", "HTTP/1.0")
_OTHER_MAJOR: Final = re.compile(r"HTTP/[2-9]\.[0-9]")  # HTTP/2.0 on an HTTP/1 connection: 505
# RFC 9110 §2.5: a higher minor version of HTTP/1 is read as the highest we implement, HTTP/1.1 (as
# HAProxy, nginx and Apache do; llhttp refuses it), and sent on as HTTP/1.1, our own version.  Only
# the checks' reading takes it: the fast readings stop at anything but 1.0 and 1.1.
_HIGHER_MINOR: Final = re.compile(r"HTTP/1\.[2-9]")
# The fast path's grammar (see `_read_well_formed`): each line exactly as the checks below accept
# it, control characters and bare CR or LF excluded.  Possessive quantifiers and atomic groups: a
# failing line costs one pass, never a backtracking search (the head comes from the client).  A
# repeated group is made possessive by an atomic group (`(?>(?:...)*)`), never by `*+`: before 3.11.5,
# Python's possessive repeat of a group could match what the plain repeat does not (gh-106052,
# gh-100061), and Debian bookworm's python3, which the container image runs, is 3.11.2.
_VALUE_CHAR = r"[\x21-\x7e\x80-\xff]"
# Origin-form and absolute-form targets only: `OPTIONS *` is left to the checks.
_REQUEST_LINE: Final = re.compile(rf"({TCHAR}++) ((?:/|[Hh][Tt][Tt][Pp][Ss]?://){_TARGET_CHAR}*+) (HTTP/1\.[01])")
_STATUS_LINE: Final = re.compile(r"(HTTP/1\.[01]) ([1-5][0-9][0-9])(?: ([\t\x20-\x7e\x80-\xff]*+))?")
# A field line between the LF before it and its CRLF: the name, and the value without the SP/HTAB
# around it (RFC 9112 §5).  Starting at the LF lets a search skip to the next line in one C scan.
_FIELD_LINE: Final = re.compile(
    rf"\n({TCHAR}++):[ \t]*+({_VALUE_CHAR}*+(?>(?:[ \t]++{_VALUE_CHAR}++)*))[ \t]*+\r(?=\n)"
)
# A head as read: the start line's three parts, then each field's name and value.
_Read: TypeAlias = tuple[tuple[str, ...], list[tuple[str, str]]]
# RFC 3986 §3.2.2 reg-name / IPv4address / IP-literal, then an optional port.
_HOST: Final = re.compile(r"(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9\-._~!$&'()*+,;=%]*)(?::[0-9]*)?\Z")
# RFC 9110 §8.6: 1*DIGIT; 18 digits stay below 2**63 in every parser behind us.
_MAX_LENGTH_DIGITS: Final = 18

# Claims about the client, its connection or the chain of proxies that we do not set, and that backends
# and their frameworks believe: only a peer in `trusted_proxies` may pass them on (lb.http.forwarding).
# From anyone else, `True-Client-IP: 6.6.6.6` would be the client's address to a backend that reads it,
# `X-Forwarded-Ssl: on` its scheme (Rack), `X-Forwarded-Client-Cert` its identity (Envoy's XFCC), and
# `X-Original-URL` its path (Symfony, IIS: past a path-based access rule).  Traefik drops the
# X-Forwarded-* ones it sets; the rest are those a CDN or front proxy adds.
PROXY_CLAIMS: Final = frozenset(
    {
        "forwarded",
        "x-real-ip",
        "x-forwarded-port",
        "x-forwarded-prefix",
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
        # Less common spellings of the same claims, read by some frameworks and snippets (Rails' Client-IP,
        # PHP's HTTP_CLIENT_IP, Microsoft's X-Originating-IP).
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
        # Who the client is, as an authenticating proxy in front says (oauth2-proxy, Apache's REMOTE_USER):
        # a backend that believes them lets a client name itself.
        "remote-user",
        "x-remote-user",
        "x-forwarded-user",
        "x-forwarded-email",
        "x-forwarded-groups",
        "x-forwarded-preferred-username",
        "x-auth-request-user",
        "x-auth-request-email",
    }
)
# Header names (lower case, `-` form) that we set, strip, or frame the body by.  A client's
# name that differs only by `_` for `-` is dropped: CGI/WSGI backends read both as one.
PROTECTED_HEADERS: Final = PROXY_CLAIMS | frozenset(
    {
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "x-request-id",
        "x-lb-affinity",  # reserved even while `affinity.header` is off (its default); another via `protected=`
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


def is_host(value: str) -> bool:
    """Whether `value` is a valid Host: `uri-host [":" port]` (RFC 9112 §3.2)."""
    # Nearly every request names one of a few hosts: the answer for each is remembered (a dictionary
    # lookup, where the pattern costs about 2,500 instructions a request).  Bounded: only names a
    # DNS name and port could be, and a full table starts afresh (random hosts cost what they did).
    known = _hosts_seen.get(value)
    if known is not None:
        return known
    valid = _HOST.match(value) is not None
    if len(value) <= _MAX_HOST_REMEMBERED:
        if len(_hosts_seen) >= _MAX_HOSTS_REMEMBERED:
            _hosts_seen.clear()
        _hosts_seen[value] = valid
    return valid


_hosts_seen: Final[dict[str, bool]] = {}
_MAX_HOSTS_REMEMBERED: Final = 1024
_MAX_HOST_REMEMBERED: Final = 261  # a DNS name (253), `:` and a port


def _lowered(name: str) -> str:
    """`name.lower()`, remembered: the names a Head is asked for are our literals and the config's,
    so each is lowered once, where `str.lower` made a new string (and hashed it for the lookup)
    on every call: 28 calls and about 5,000 instructions a handshake.  Bounded all the same."""
    lowered = _names_lowered.get(name)
    if lowered is None:
        lowered = name.lower()
        if len(_names_lowered) < _MAX_NAMES_REMEMBERED:
            _names_lowered[name] = lowered
    return lowered


_names_lowered: Final[dict[str, str]] = {}
_MAX_NAMES_REMEMBERED: Final = 256

# The header names lb.http._scan knows (as browsers and gateways spell them, and in lower case) to their
# lower case, interned by it; empty when it is not built (or LB_PURE_PYTHON=1).
KNOWN_LOWERED: Final = cast("dict[str, str] | None", built_in_c("lb.http._scan", "known_lowered")) or {}


def field_name_lowered(name: str) -> str:
    """`name.lower()` for a field name a client or backend sent.  A name the C reader knows is one lookup
    whose hash is known, not a new str, hashed again for the set it is looked up in: some 400
    instructions a field, five or more a handshake (`python -m bench.instructions_live`: 2,200 fewer).
    Any other is lowered as it comes, never remembered (`_lowered` remembers ours: a client's names
    would fill it)."""
    return KNOWN_LOWERED.get(name) or name.lower()


def protected_headers(affinity_header: str | None, routing_headers: Iterable[str] = ()) -> frozenset[str]:
    """PROTECTED_HEADERS plus the configured `affinity.header` (if any) and the headers pools route by
    (`hash_key: header:NAME`): compute once per configuration (`ProxyContext.protected`)."""
    ours = () if affinity_header is None else (affinity_header,)
    return PROTECTED_HEADERS | {name.lower() for name in (*ours, *routing_headers)}


@dataclass(slots=True, init=False)  # not frozen (~1 µs); own __init__: see lb.proxy.actions.Action
class Head:
    """A parsed request or response head; header names keep their case and order."""

    start_line: tuple[str, str, str]  # (method, target, version) or (version, status, reason)
    headers: tuple[tuple[str, str], ...]
    _index: dict[str, list[str]] = field(repr=False, compare=False)

    def __init__(
        self, start_line: tuple[str, str, str], headers: tuple[tuple[str, str], ...], _index: dict[str, list[str]]
    ) -> None:
        self.start_line = start_line
        self.headers = headers
        self._index = _index

    @property
    def index(self) -> dict[str, list[str]]:
        """Each lower-case name to its values, in order: the head's own, to read and never to change
        (lb/ws/_plain.c judges an upgrade from it)."""
        return self._index

    def get(self, name: str) -> str | None:
        """The first value of header `name` (case-insensitive), or None."""
        values = self._index.get(_lowered(name))
        return values[0] if values else None

    def get_all(self, name: str) -> list[str]:
        values = self._index.get(_lowered(name))
        # A new empty list only for a name that is not there: `.get(name, [])` made one on every call.
        return values if values is not None else []

    def has_any(self, names: frozenset[str]) -> bool:
        """Whether any header is named in `names` (lower case).  The fewer are looked up in the other: a
        request's two framing names in its fields, not its fields in them (`isdisjoint` goes through the
        dict's, a method call and a lookup each, some 900 instructions more a handshake)."""
        index = self._index
        if len(names) > len(index):
            return not names.isdisjoint(index)
        return any(name in index for name in names)

    def has_token(self, name: str, token: str) -> bool:
        """Whether the comma-separated header `name` lists `token` (case-insensitive)."""
        values = self._index.get(_lowered(name))
        if not values:
            return False
        wanted = _lowered(token)
        for value in values:
            if "," not in value:  # the common case (`Upgrade: websocket`): no split, no generator
                if value.strip(" \t").lower() == wanted:
                    return True
            elif any(part.strip(" \t").lower() == wanted for part in value.split(",")):
                return True
        return False


@dataclass(slots=True, init=False)  # not frozen (~1 µs); own __init__: see lb.proxy.actions.Action
class RequestHead:
    method: str
    target: str  # origin-form (an absolute-form target is rewritten; see `absolute_target`)
    version: str
    head: Head
    absolute_target: str | None  # the target as received, when it was absolute-form
    dropped: tuple[str, ...]  # header names dropped as aliases of ours (`X_Forwarded_For`)
    # `path`, once read: every request is routed by it and logged with it (`target` is set only here).
    _path: str | None = field(repr=False, compare=False)

    def __init__(
        self, method: str, target: str, version: str, head: Head, absolute_target: str | None = None,
        dropped: tuple[str, ...] = (),
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.head = head
        self.absolute_target = absolute_target
        self.dropped = dropped
        self._path = None

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
        known = self._path
        if known is None:
            known = self._path = self._path_of_target()
        return known

    def _path_of_target(self) -> str:
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

    @property
    def logged_path(self) -> str:
        """The path the access log names: `path`, but `*` for `OPTIONS *` (asterisk-form, which `path`
        reads as `/` for routing), so that the log says what the request line said."""
        target = self.target
        return "*" if target == "*" else self.path


@dataclass(slots=True, init=False)  # not frozen (~1 µs); own __init__: see lb.proxy.actions.Action
class ResponseHead:
    version: str
    status: int
    reason: str
    head: Head

    def __init__(self, version: str, status: int, reason: str, head: Head) -> None:
        self.version = version
        self.status = status
        self.reason = reason
        self.head = head


def has_bare_lf(buffer: bytes | bytearray, start: int) -> bool:
    """Whether an LF without its CR comes at or after `start`: a head holding one never ends in CRLFCRLF."""
    return _BARE_LF.search(buffer, start) is not None


# The first bytes of a request: a method's token and SP, or the start of one, or the first half of
# an empty line that may come before it (RFC 9112 §2.2, §3).
_REQUEST_START: Final = re.compile(rb"(?:" + TCHAR.encode() + rb"++(?: |\Z)|\r?\Z)")
# Bytes past which the start of a head is not checked again: any method's token and its SP.
REQUEST_START_BYTES: Final = 32


def could_start_request(buffer: bytes | bytearray) -> bool:
    """Whether an incomplete head can still become a request line.

    What cannot (a TLS ClientHello on a plain port, a WebSocket frame after a refused upgrade,
    binary noise) is answered 400 at once, as HAProxy does at the first bad byte of a method,
    instead of waiting out `timeouts.handshake` for a line end.
    """
    return _REQUEST_START.match(buffer) is not None


def check_request_line(line: bytes | bytearray) -> None:
    """Refuse a request line, whole while its head is not, that no head starting with it could make valid.

    HTTP/0.9's `GET /` ends at its CRLF and its client then waits for an answer: read only as part of a
    head, it got none, just the close at `timeouts.handshake`.  HAProxy answers it 400 at once; so does
    this, for any line `parse_request_head` would refuse (a version, method or target no field line
    can mend), with the status it would give.  Called once per head, when its first CRLF has come.

    Args:
        line: the request line, without its CRLF.

    Raises:
        BadRequest: as `parse_request_head` would for a head beginning with this line.
        HttpVersionNotSupported: HTTP/2 or later (505).
    """
    _check_line_bytes(bytes(line) + HEAD_END)  # the whole head's byte checks, as if the line were all of it
    _read_request_line(line.decode("latin-1"))


def _head_end_in_python(buffer: bytes | bytearray, start: int, stop: int) -> int:
    return buffer.find(HEAD_END, start, stop)


# Where the first CRLFCRLF in buffer[start:stop] begins, or -1: lb.http._scan's search (a memchr for
# each LF), or (not built, or LB_PURE_PYTHON=1) bytes.find.  A test holds the two equal.
_head_end: Final = (
    cast("Callable[[bytes | bytearray, int, int], int] | None", built_in_c("lb.http._scan", "head_end"))
    or _head_end_in_python
)


def is_whole_head(data: bytes, limit: int) -> bool:
    """Whether `data` is one complete request head and nothing after it, of at most `limit` bytes, not
    beginning with a CR: what `find_head_end(data, limit)` would find ending at `len(data)`, raising
    nothing, with no blank line's CRLF before it for the caller to skip.  False leaves it to them."""
    end = _head_end(data, 0, limit + len(HEAD_END))
    return end >= 0 and end + len(HEAD_END) == len(data) and len(data) <= limit and data[0] != 13  # CR


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
        BadRequest: a bare LF, so the head would never end in CRLFCRLF (refused now, not at the
            handshake timeout); checked only while the head is incomplete, over the new bytes.
    """
    resume = max(0, start - (len(HEAD_END) - 1))
    end = _head_end(buffer, resume, limit + len(HEAD_END))
    if end < 0:
        if len(buffer) >= limit:
            raise HeadersTooLarge(f"request head exceeds {limit} bytes")
        if has_bare_lf(buffer, resume):
            raise BadRequest("bare LF in the request head")
        return -1
    if end + len(HEAD_END) > limit:
        raise HeadersTooLarge(f"request head exceeds {limit} bytes")
    return end + len(HEAD_END)


def _read_well_formed(text: str, start_line: re.Pattern[str]) -> _Read | None:
    """The start line's parts and the (name, value) fields of a well-formed head, or None.

    The fast path: one match, one findall and two C string scans for a head that passes every
    check of `_read_strictly`: ~2.5 µs less than those checks on a WebSocket upgrade's head.
    None (any head with a fault) sends the caller to `_read_strictly`, which names the fault.
    Why matching is enough: the start line holds no CR or LF and ends at the first CRLF, the
    head ends with CRLFCRLF, and each field found runs from an LF to the CR just before the next
    LF, with no CR or LF between.  The last two LFs (those of CRLFCRLF) can begin no field; so if
    there are as many fields as the other LFs, each of those begins one, and the fields cover all
    from the start line's LF to the blank line: nothing is left unchecked.
    """
    if not text.endswith("\r\n\r\n"):
        return None
    line_end = text.find("\r\n")
    matched = start_line.fullmatch(text, 0, line_end)
    if matched is None:
        return None
    fields = _FIELD_LINE.findall(text, line_end + 1)
    if len(fields) != text.count("\n") - 2:
        return None
    return matched.groups(""), fields


def _check_line_bytes(raw: bytes) -> None:
    """Refuse a head with anything but CRLF line ends and field-value bytes (RFC 9112 §2.2, §5.5).

    Three counts and one translate over the whole head, all in C.
    """
    if not raw.endswith(HEAD_END):
        raise BadRequest("incomplete head")
    crlf = raw.count(b"\r\n")
    if raw.count(b"\r") != crlf or raw.count(b"\n") != crlf:
        raise BadRequest("bare CR or LF in head")
    if raw.translate(None, _LINE_BYTES):
        raise BadRequest("control character in head")


def _read_request_line(line: str) -> tuple[str, str, str]:
    """Method, target and version, checked one by one, then the target's form.

    The reading `_REQUEST_LINE` abbreviates (it leaves `OPTIONS *` to this one).

    Raises:
        BadRequest: naming the first part at fault.
    """
    parts = line.split(" ")
    if len(parts) != 3:
        raise BadRequest("malformed request line")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest("malformed method")
    if "#" in target:
        # RFC 9112 §3.2: no fragment in a request-target (a client keeps it); what a backend would
        # make of one is its own guess, so it is refused, as HAProxy does.
        raise BadRequest("fragment in request target")
    if not _TARGET.fullmatch(target):
        raise BadRequest("malformed request target")
    if version not in _VERSIONS:
        if _HIGHER_MINOR.fullmatch(version):
            version = "HTTP/1.1"
        elif _OTHER_MAJOR.fullmatch(version):
            raise HttpVersionNotSupported(f"HTTP version {version[5]} is not supported")
        else:
            raise BadRequest("unsupported HTTP version")
    # RFC 3986 §3.1: the scheme is case-insensitive.
    origin_or_absolute = target[0] == "/" or target[:8].lower().startswith(("http://", "https://"))
    if not origin_or_absolute and not (method == "OPTIONS" and target == "*"):
        raise BadRequest("unsupported request target form")
    return method, target, version


def _read_status_line(line: str) -> tuple[str, str, str]:
    """Version, status code and reason, checked one by one: the reading `_STATUS_LINE` abbreviates.

    Raises:
        BadRequest: a malformed status line or a code outside 100..599.
    """
    version, _, rest = line.partition(" ")
    status, _, reason = rest.partition(" ")
    if _HIGHER_MINOR.fullmatch(version):
        version = "HTTP/1.1"  # RFC 9110 §2.5, as a request's
    # isascii: str.isdigit() also takes `²` and other digits that bytes.isdigit() never did.
    if version not in _VERSIONS or len(status) != 3 or not (status.isascii() and status.isdigit()):
        raise BadRequest("malformed status line")
    if not "100" <= status <= "599":
        # RFC 9110 §15: status codes are 100..599; `000` must be a 502, never relayed.
        raise BadRequest(f"status code {status} out of range")
    return version, status, reason


def _read_field_lines(lines: list[str]) -> list[tuple[str, str]]:
    """Name and value of each field line, checked line by line: the reading `_FIELD_LINE` abbreviates.

    Raises:
        BadRequest: naming the fault of the first bad line.
    """
    fields: list[tuple[str, str]] = []
    for line in lines:
        if line[:1] in (" ", "\t"):
            raise BadRequest("obsolete line folding in header")  # RFC 9112 §5.2
        name, colon, value = line.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise BadRequest("malformed header line")
        fields.append((name, value.strip(" \t")))  # control characters were refused for the whole head
    return fields


def _read_strictly(raw: bytes, text: str, read_start_line: Callable[[str], tuple[str, str, str]]) -> _Read:
    """The start line's parts and the fields, each check in turn: the reading the fast path abbreviates.

    Raises:
        BadRequest: naming the first fault, the whole head's bytes first, then line by line.
    """
    _check_line_bytes(raw)
    lines = text[: -len(HEAD_END)].split("\r\n")
    return read_start_line(lines[0]), _read_field_lines(lines[1:])


def _head(start_line: tuple[str, str, str], fields: list[tuple[str, str]]) -> Head:
    """A Head of the fields as read, indexed by lower-case name."""
    index: dict[str, list[str]] = {}
    for name, value in fields:
        index.setdefault(name.lower(), []).append(value)
    return Head(start_line, tuple(fields), index)


# What lb.http._scan.read_head returns for a well-formed head: Head's three parts, ready to use.
_Scanned: TypeAlias = tuple[tuple[str, str, str], tuple[tuple[str, str], ...], dict[str, list[str]]]


# lb.http._scan's one-pass reading, or None (not built, or LB_PURE_PYTHON=1): the regex reading below.
_SCAN: Final = cast("Callable[[bytes, bool], _Scanned | None] | None", built_in_c("lb.http._scan", "read_head"))


def _read(
    raw: bytes, request: bool, start_line: re.Pattern[str], read_start_line: Callable[[str], tuple[str, str, str]]
) -> Head:
    """The head as read: a well-formed one by C's one pass (or, without it, by `_read_well_formed`),
    any other by `_read_strictly`, which names its fault.

    Raises:
        BadRequest: as `_read_strictly`.
    """
    if _SCAN is not None:
        scanned = _SCAN(raw, request)
        if scanned is not None:  # the Python reading below would find the same (a test holds them equal)
            start, fields, index = scanned
            return Head(start, fields, index)
    text = raw.decode("latin-1")  # every byte is one character: offsets and checks carry over
    read = (_SCAN is None and _read_well_formed(text, start_line)) or _read_strictly(raw, text, read_start_line)
    (first, second, third), read_fields = read
    return _head((first, second, third), read_fields)


def dropped_as_alias(name: str, protected: frozenset[str]) -> bool:
    """Whether a request's parse leaves out header `name` (`_drop_aliases`): with `_` read as `-` it is a
    protected name (`protected_headers`) or an `x-forwarded-*` one.  The configuration asks it too: a
    name it routes by must not be one (lb.config.sections)."""
    alias = name.lower().replace("_", "-")
    return alias != name.lower() and (alias in protected or alias.startswith("x-forwarded-"))


def _drop_aliases(head: Head, protected: frozenset[str]) -> tuple[Head, tuple[str, ...]]:
    """Leave out names that equal a protected one once `_` reads as `-`; return them too.

    CGI, WSGI and others fold `X_Forwarded_For` and `X-Forwarded-For` into one variable, so a
    client's alias would stand in for (or beside) the value we set.
    """
    headers: list[tuple[str, str]] = []
    dropped: list[str] = []
    for name, value in head.headers:
        if "_" in name and dropped_as_alias(name, protected):
            dropped.append(name)
            continue
        headers.append((name, value))
    if not dropped:
        return head, ()
    return _head(head.start_line, headers), tuple(dropped)


def _check_framing(head: Head, version: str, *, request: bool) -> Head:
    """Reject the framing ambiguities that enable smuggling (RFC 9112 §6.1, §6.3, §7.1); return `head`,
    or, when its Transfer-Encoding holds empty list elements, a copy without them (`_without_empty_codings`).

    Raises:
        BadFraming: ambiguous or invalid framing (a backend's answer: the caller's 502).
        UnsupportedTransferCoding: a request with a coding other than chunked before it.
    """
    index = head._index
    if "content-length" not in index and "transfer-encoding" not in index:
        return head  # the common case (every WebSocket upgrade): two lookups, no lists
    lengths = head.get_all("content-length")
    encodings = head.get_all("transfer-encoding")
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
    codings = [part.strip(" \t").lower() for value in encodings for part in value.split(",")]
    if "" in codings:
        # RFC 9110 §5.6.1.2: a recipient MUST ignore empty list elements (`,chunked`, `chunked,`, a
        # blank line merged in), so they count for nothing here; and they go on without them, since the
        # parsers behind us disagree on them (llhttp refuses `chunked,`, HAProxy 2.6 `,chunked`, Go
        # anything but `chunked` alone): a backend reads the framing we read, or none.
        codings = [coding for coding in codings if coding]
        head = _without_empty_codings(head)
    if not codings or codings[-1] != "chunked":
        raise BadFraming("Transfer-Encoding must end with chunked")  # RFC 9112 §6.3
    if codings.count("chunked") > 1:
        raise BadFraming("chunked applied more than once")  # RFC 9112 §7.1
    if request and len(codings) > 1:
        # A backend may answer `gzip, chunked`: we relay its bytes and only de-chunk to find the end.
        raise UnsupportedTransferCoding(f"unsupported transfer coding {codings[0]!r}")
    return head


def _without_empty_codings(head: Head) -> Head:
    """`head` with each Transfer-Encoding line's empty list elements left out (`, chunked` reads
    `chunked`), and a line of nothing but those left out whole."""
    headers: list[tuple[str, str]] = []
    for name, value in head.headers:
        if name.lower() == "transfer-encoding":
            value = ", ".join(part for part in (part.strip(" \t") for part in value.split(",")) if part)
            if not value:
                continue
        headers.append((name, value))
    return _head(head.start_line, headers)


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
    if not is_host(authority):
        raise BadHost("malformed authority in request target")
    hosts = head.get_all("host")
    origin = tail if tail.startswith("/") else "/" + tail
    headers = [(name, authority) if name.lower() == "host" else (name, value) for name, value in head.headers]
    if not hosts:
        headers.append(("Host", authority))
    index = dict(head._index)
    index["host"] = [authority]
    return origin, Head(start_line=(start[0], origin, start[2]), headers=tuple(headers), _index=index)


_UNDERSCORE: Final = ord("_")


def _any_underscored_in_python(index: dict[str, list[str]]) -> bool:
    return any("_" in name for name in index)


# Whether a header name (a key of a head's index) has a `_`: lb.http._scan's memchr a name, or (not
# built, or LB_PURE_PYTHON=1) `in` a name.  `"".join(index)` copied them into a list, then a str (2,300
# instructions a handshake that sends a cookie); a loop of `in` compiled takes 1,600, the C about 700.  A
# test holds the two equal.
_any_underscored: Final = (
    cast("Callable[[dict[str, list[str]]], bool] | None", built_in_c("lb.http._scan", "any_underscored"))
    or _any_underscored_in_python
)


def parse_request_head(raw: bytes, *, protected: frozenset[str] = PROTECTED_HEADERS) -> RequestHead:
    """Parse a complete request head (including the final blank line).

    Args:
        raw: the head, up to and including the blank line.
        protected: lower-case header names whose `_`-for-`-` spellings are dropped (every
            `x-forwarded-*` is always covered); a configuration's own are `ProxyContext.protected`.

    Raises:
        BadRequest: anything RFC 9112 does not allow, with a short reason (BadFraming, BadHost).
        UnsupportedTransferCoding: a transfer coding other than chunked (501).
        UnsupportedMethod: CONNECT (501).
    """
    head = _read(raw, True, _REQUEST_LINE, _read_request_line)
    start = head.start_line
    method, target, version = start
    if method == "CONNECT":
        # Whatever its target: origin- and absolute-form ones are malformed (RFC 9112 §3.2.3), yet a
        # backend's 2xx to one would still open a tunnel that llhttp and h11 read as such.
        raise UnsupportedMethod("CONNECT is not proxied")
    dropped: tuple[str, ...] = ()
    # The byte as an int: `bytes in bytes` first tries the needle as an int and raises and clears
    # a TypeError before it searches (about 2,000 instructions); an int is one memchr.  A returning
    # client's cookie nearly always holds one, so the names are then looked at one by one.
    if _UNDERSCORE in raw and _any_underscored(head._index):
        head, dropped = _drop_aliases(head, protected)
    hosts = head._index.get("host")  # not .get("host", []): a list made for every request
    # RFC 9112 §3.2: exactly one Host on HTTP/1.1; more than one is a 400 on any version.
    if not hosts:
        if version == "HTTP/1.1":
            raise BadHost("HTTP/1.1 request needs a Host header")
    elif len(hosts) > 1:
        raise BadHost("more than one Host header")
    elif not is_host(hosts[0]):
        raise BadHost("malformed Host header")
    head = _check_framing(head, version, request=True)
    absolute = None
    first = target[0]
    if first != "/" and first != "*":
        absolute = target
        target, head = _rewrite_absolute_form(start, head)
    return RequestHead(method, target, version, head, absolute, dropped)


def parse_response_head(raw: bytes) -> ResponseHead:
    """Parse a complete response head from a backend.

    Raises:
        BadRequest: a malformed answer (the caller turns it into 502).
    """
    head = _read(raw, False, _STATUS_LINE, _read_status_line)
    version, status, reason = head.start_line
    head = _check_framing(head, version, request=False)
    return ResponseHead(version, int(status), reason, head)


def take_answer_head(buffer: bytearray, scanned: int, limit: int) -> ResponseHead | None:
    """The next complete answer head at the start of a backend's `buffer`, taken off it; None until whole.

    The proxy and the health checks both read a backend's answers with it (the proxy through its two
    halves, `take_answer_bytes` and `parse_response_head`), so a backend is judged one way: what every
    handshake would get a 502 for fails a check too.

    Raises:
        HeadersTooLarge, BadGateway: as `take_answer_bytes`.
        BadRequest: a malformed head, a status outside 100-599 included (`parse_response_head`).
    """
    raw = take_answer_bytes(buffer, scanned, limit)
    return None if raw is None else parse_response_head(raw)  # which refuses a status outside 100-599 too


def answer_head_length(data: bytes, limit: int) -> int:
    """The length of the complete answer head at the start of `data`, its blank line with it, or -1 (none
    whole): what `take_answer_bytes` takes off a buffer that holds only `data`, when it takes one."""
    end = _head_end(data, 0, limit)
    return end + len(HEAD_END) if end >= 0 else -1


def take_answer_bytes(buffer: bytearray, scanned: int, limit: int) -> bytes | None:
    """The bytes of the next complete answer head at the start of a backend's `buffer` (up to and with
    its blank line), taken off it; None until whole.

    Args:
        scanned: `len(buffer)` as it was when the last call returned None (0 after a head):
            the search resumes there, so a head trickled byte by byte costs O(n), not O(n^2).
        limit: the largest head accepted, in bytes.

    Raises:
        HeadersTooLarge: no end of head within `limit` bytes.
        BadGateway: not an HTTP/1.x head (an SSH banner, an HTTP/2 preface, bare-LF lines),
            said as soon as it shows rather than after a wait for an end that never comes.
    """
    resume = max(0, scanned - (len(HEAD_END) - 1))
    end = _head_end(buffer, resume, limit)
    if end < 0:
        if len(buffer) >= limit:
            raise HeadersTooLarge(f"answer head exceeds {limit} bytes")
        if not buffer.startswith(b"HTTP/"[: len(buffer)]) or has_bare_lf(buffer, resume):
            raise BadGateway("not an HTTP/1.x head")
        return None
    raw = bytes(buffer[: end + len(HEAD_END)])
    del buffer[: end + len(HEAD_END)]
    return raw


def render_head(start_line: str, headers: Sequence[tuple[str, str]]) -> bytes:
    """Serialize a head; values were validated on the way in or are our own.

    Raises:
        UnicodeEncodeError: a character past latin-1 (none arrives from the wire).
    """
    if _RENDER is not None:
        rendered = _RENDER(start_line, headers)
        if rendered is not None:  # the Python rendering below would make the same (a test holds them equal)
            return rendered
    return _render_in_python(start_line, headers)


def _render_in_python(start_line: str, headers: Sequence[tuple[str, str]]) -> bytes:
    lines = [start_line]
    lines.extend([f"{name}: {value}" for name, value in headers])
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


# lb.http._render's one pass, or None (not built, or LB_PURE_PYTHON=1): the Python rendering above.
_RENDER: Final = cast(
    "Callable[[str, Sequence[tuple[str, str]]], bytes | None] | None", built_in_c("lb.http._render", "render_head")
)

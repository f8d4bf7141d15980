"""Differential test: lb.http.head behaves exactly as its frozen reference, _head_reference.

The head parser is tuned for speed; this pins its behaviour to the plain per-line parser it
replaced.  For every head, generated or hostile, both must return the same thing (method,
target, version, header names, values and order, the lower-case index, dropped aliases, the
absolute-form target) or raise the same exception class with the same message: a 400's
reason is logged, and a different class would be a different answer (400, 501, 502).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import _head_reference as reference
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.http import head as current

_PROTECTED = (current.PROTECTED_HEADERS, current.protected_headers("X-Sticky"))

_CONTROLS = [bytes([code]) for code in (*range(0x20), 0x7F)]
# The bytes and words that parsing decisions hang on, so that generated heads hit them often.
_PIECES = [
    b"\r",
    b"\n",
    b"\r\n",
    b"\r\n\r\n",
    b" ",
    b"\t",
    b":",
    b": ",
    b"_",
    b"-",
    b",",
    b"/",
    b"*",
    b"0",
    b"5",
    b"18446744073709551616",
    b"a",
    b"Z",
    b"chunked",
    b"gzip",
    b"Content-Length",
    b"Transfer-Encoding",
    b"Host",
    b"X_Forwarded_For",
    b"X-Sticky",
    b"http://",
    b"HTTP/1.1",
    b"HTTP/1.0",
    b"\xe9",
    b"\xb2",  # a digit to str.isdigit() once decoded, not to bytes.isdigit()
    *_CONTROLS,
    b"\x7f",
    b"\x80",
    b"\xff",
]
_FUZZ = st.lists(st.sampled_from(_PIECES) | st.binary(max_size=2), max_size=12).map(b"".join)

_NAMES = st.sampled_from(
    [
        b"Host",
        b"host",
        b"HOST",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Content_Length",
        b"transfer_encoding",
        b"X_Forwarded_For",
        b"X-Forwarded-For",
        b"x_forwarded_anything",
        b"X_Sticky",
        b"Upgrade",
        b"Connection",
        b"Sec-WebSocket-Key",
        b"X",
        b"!#$%&'*+-.^_`|~09AZaz",
        b"",
        b" Host",
        b"Host ",
        b"\tX",
    ]
)
_VALUE_LIST = [
    b"",
    b" ",
    b"a",
    b"a.example",
    b"a.example:80",
    b"[::1]:8080",
    b"chunked",
    b"gzip, chunked",
    b"CHUNKED",
    b"chunked, chunked",
    b",chunked",
    b"chunked, ,",
    b", ,",
    b"5",
    b" 5 ",
    b"5, 5",
    b"007",
    b"+5",
    b"1234567890123456789",
    b"caf\xe9",
    b"\t1\t",
    b"websocket",
    b"Upgrade",
    b"keep-alive, Upgrade",
    b"a b  c",
]
_VALUES = st.sampled_from(_VALUE_LIST)
_LISTED_FIELD = st.tuples(_NAMES, st.sampled_from([b":", b": ", b":\t", b" :"]), _VALUES).map(b"".join)
_FIELD = st.one_of(
    _LISTED_FIELD,
    st.tuples(_NAMES | _FUZZ, st.just(b":"), _VALUES | _FUZZ).map(b"".join),
    _FUZZ,
)
_LINE_END = st.sampled_from([b"\r\n"] * 12 + [b"\n", b"\r", b"\r\r\n", b"\n\r"])
_ENDING = st.sampled_from([b"\r\n"] * 8 + [b"", b"\r\n\r\n", b"\n", b"\r\n "])


def _head(
    start_lines: st.SearchStrategy[bytes],
    fields: st.SearchStrategy[bytes] = _FIELD,
    line_ends: st.SearchStrategy[bytes] = _LINE_END,
    endings: st.SearchStrategy[bytes] = _ENDING,
) -> st.SearchStrategy[bytes]:
    """A start line, fields and the blank line, each piece drawn from its strategy."""
    lines = st.lists(st.tuples(fields, line_ends).map(b"".join), max_size=8).map(b"".join)
    return st.tuples(start_lines, line_ends, lines, endings).map(b"".join)


def _near_valid(start_lines: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Heads with CRLF line ends, mostly one Host and well-formed fields: many are accepted."""
    host = st.sampled_from([b"Host: a.example\r\n"] * 4 + [b"", b"host:a.example:80\r\nHost: b\r\n"])
    plain_name = st.sampled_from([b"Upgrade", b"Connection", b"X-Sticky", b"X_Sticky", b"x_other", b"Cookie"])
    # One stray byte (a control, a bare CR or LF, obs-text) in an otherwise good value, at times.
    stray = st.sampled_from([b"", b"", b"", b"\r", b"\n", b"\x7f", b"\x80", b"\xff", *_CONTROLS])
    value = st.tuples(_VALUES, stray, _VALUES).map(b"".join)
    plain_field = st.tuples(plain_name, st.sampled_from([b":", b": ", b":\t "]), value).map(b"".join)
    fields = st.lists(st.tuples(plain_field | _LISTED_FIELD, st.just(b"\r\n")).map(b"".join), max_size=6)
    return st.tuples(start_lines, st.just(b"\r\n"), host, fields.map(b"".join), st.just(b"\r\n")).map(b"".join)


def _well_formed(start_lines: st.SearchStrategy[bytes]) -> st.SearchStrategy[bytes]:
    """Heads every byte of which is well formed (a good start line, CRLF line ends, token names,
    field-value bytes only), so that what decides is the meaning: one Host or two, the framing
    values, the names we protect.  Both parsers read these, and accept about half."""
    plain = [b"Upgrade", b"Connection", b"X-Sticky", b"Cookie", b"Sec-WebSocket-Key", b"!#$%&'*+-.^_`|~09AZaz"]
    framing = [b"Host", b"host", b"Content-Length", b"Transfer-Encoding", b"Content_Length", b"X_Sticky",
               b"X_Forwarded_For"]
    name = st.sampled_from(plain * 5 + framing)  # a name that decides, one field in five
    value = st.sampled_from(_VALUE_LIST)
    field = st.tuples(name, st.sampled_from([b":", b": ", b":\t", b":  "]), value, st.just(b"\r\n")).map(b"".join)
    host = st.sampled_from([b"Host: a.example\r\n"] * 5 + [b""])
    return st.tuples(start_lines, st.just(b"\r\n"), host, st.lists(field, max_size=4).map(b"".join),
                     st.just(b"\r\n")).map(b"".join)


_LISTED_REQUEST_LINES = st.sampled_from(
    [
        b"GET / HTTP/1.1",
        b"POST /x?y HTTP/1.1",
        b"GET / HTTP/1.0",
        b"OPTIONS * HTTP/1.1",
        b"GET * HTTP/1.1",
        b"GET http://a.example/x HTTP/1.1",
        b"GET HTTPS://A.example:443?q HTTP/1.1",
        b"GET http://u@a/ HTTP/1.1",
        b"GET http:// HTTP/1.1",
        b"GET http://a.example HTTP/1.0",
        b"CONNECT a:443 HTTP/1.1",
        b"get /a#b HTTP/1.1",
        b"GET / HTTP/1.2",
        b"GET  / HTTP/1.1",
        b"GET /\xe9 HTTP/1.1",
        b"G(T / HTTP/1.1",
        b"GET / HTTP/1.1 ",
        b"GET /\x01 HTTP/1.1",
        b"GET /a\tb HTTP/1.1",
        b"GET\x0b/ HTTP/1.1",
        b"GET / HTTP/1.1\x00",
        b"OPTIONS / HTTP/1.1",
        b"OPTIONS http://a.example HTTP/1.1",
        b"GET hTtPs://a.example:443/ HTTP/1.1",
        b"GET httpx://a.example/ HTTP/1.1",
    ]
)
_REQUEST_LINES = st.one_of(
    _LISTED_REQUEST_LINES,
    st.tuples(st.sampled_from([b"GET", b"PURGE", b"G_T", b""]) | _FUZZ, st.just(b" "), _FUZZ).map(b"".join),
    _FUZZ,
)
_LISTED_STATUS_LINES = st.sampled_from(
    [
        b"HTTP/1.1 101 Switching Protocols",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.0 599",
        b"HTTP/1.1 600 x",
        b"HTTP/1.1 099 x",
        b"HTTP/1.1 000 x",
        b"HTTP/1.1 101 ",
        b"HTTP/1.1 1011 x",
        b"HTTP/1.1 10 x",
        b"HTTP/1.2 200 OK",
        b"HTTP/1.1 2\xb20 OK",
        b"HTTP/1.1 200 caf\xe9 \t",
        b"HTTP/1.1  200 OK",
        b"http/1.1 200 OK",
        b"HTTP/1.1 200 O\x01K",
        b"HTTP/1.1 200 \x7f",
        b"HTTP/1.1 200 O\rK",
        b"HTTP/1.1 200\tOK",
    ]
)
# Start lines of well-formed bytes (the meaning refuses status 600).
_WELL_FORMED_REQUEST_LINES = st.sampled_from(
    [
        b"GET / HTTP/1.1",
        b"GET /ws?token=a.b HTTP/1.1",
        b"POST /x?y HTTP/1.1",
        b"GET / HTTP/1.0",
        b"PURGE /a/b?c=d&e HTTP/1.0",
        b"get /a HTTP/1.1",
        b"OPTIONS * HTTP/1.1",
        b"GET http://a.example/x HTTP/1.1",
        b"GET HTTPS://A.example:443?q HTTP/1.1",
        b"GET http://u@a/ HTTP/1.1",
        b"GET http:// HTTP/1.1",
    ]
)
_WELL_FORMED_STATUS_LINES = st.sampled_from(
    [
        b"HTTP/1.1 101 Switching Protocols",
        b"HTTP/1.1 200 OK",
        b"HTTP/1.1 204 No Content",
        b"HTTP/1.1 304 Not Modified",
        b"HTTP/1.1 100 Continue",
        b"HTTP/1.0 599",
        b"HTTP/1.1 101 ",
        b"HTTP/1.1 200 caf\xe9 \t",
        b"HTTP/1.1 600 x",
    ]
)
_STATUS_LINES = st.one_of(
    _LISTED_STATUS_LINES,
    st.tuples(st.sampled_from([b"HTTP/1.1 ", b"HTTP/1.0 "]), _FUZZ).map(b"".join),
    _FUZZ,
)


def _outcome(parse: Callable[[], object]) -> object:
    """What a parse returned, as plain values, or the class name and message of what it raised."""
    try:
        parsed = parse()
    except Exception as exc:  # any exception: an IndexError in one must be one in the other
        return type(exc).__name__, type(exc).__module__, str(exc)
    head = parsed.head  # type: ignore[attr-defined]
    return (
        type(parsed).__name__,
        # What a head says, not what it remembers (RequestHead._path: its path, once read).
        [getattr(parsed, field.name) for field in dataclasses.fields(parsed)  # type: ignore[arg-type]
         if field.name != "head" and not field.name.startswith("_")],
        head.start_line,
        head.headers,
        head._index,
        list(head._index),
    )


def assert_request_alike(raw: bytes) -> None:
    """Both parsers read `raw` as a request alike, with the default and a configured affinity header."""
    for protected in _PROTECTED:
        mine = _outcome(lambda: current.parse_request_head(raw, protected=protected))  # noqa: B023
        theirs = _outcome(lambda: reference.parse_request_head(raw, protected=protected))  # noqa: B023
        assert mine == theirs, raw


def assert_response_alike(raw: bytes) -> None:
    """Both parsers read `raw` as a response alike."""
    assert _outcome(lambda: current.parse_response_head(raw)) == _outcome(lambda: reference.parse_response_head(raw))


_WEBSOCKET_REQUEST = (
    b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
)
_WEBSOCKET_RESPONSE = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
)


@pytest.mark.parametrize(
    "raw",
    [
        _WEBSOCKET_REQUEST,
        _WEBSOCKET_REQUEST.replace(b"Host", b"host", 1) + b"X: 1\r\n\r\n",  # a blank line inside
        _WEBSOCKET_REQUEST.replace(b"Upgrade: ", b"Upgrade:  \t", 1).replace(b"13", b"13 \t"),
        _WEBSOCKET_REQUEST.replace(b"\r\n\r\n", b"\r\nHost: b\r\n\r\n"),
        _WEBSOCKET_REQUEST.replace(b"\r\n\r\n", b"\r\nX-Forwarded_For: 1.2.3.4\r\nx_sticky: b\r\n\r\n"),
        _WEBSOCKET_REQUEST.replace(b"Connection: ", b" Connection: "),
        _WEBSOCKET_REQUEST.replace(b"Connection: ", b"Connection : "),
        _WEBSOCKET_REQUEST.replace(b"Connection: ", b"Connection\r\n: "),
        _WEBSOCKET_REQUEST.replace(b"Connection: ", b"Conn\x00ection: "),
        _WEBSOCKET_REQUEST.replace(b"/ws", b"http://127.0.0.1:8080/ws"),
        _WEBSOCKET_REQUEST.replace(b"/ws", b"/w\xe9"),
        _WEBSOCKET_REQUEST.replace(b"GET", b"G\xe9T"),
        _WEBSOCKET_REQUEST.replace(b"Upgrade: websocket", b"Content-Length: 5\r\nContent-Length: 5"),
        _WEBSOCKET_REQUEST.replace(b"Upgrade: websocket", b"Transfer-Encoding: gzip\r\ntransfer-encoding: chunked"),
        _WEBSOCKET_REQUEST[:-2],
        b"GET / HTTP/1.0\r\n\r\n",
    ],
)
def test_known_request_heads_read_alike(raw: bytes) -> None:
    assert_request_alike(raw)


@pytest.mark.parametrize(
    "raw",
    [
        _WEBSOCKET_RESPONSE,
        _WEBSOCKET_RESPONSE.replace(b"101 Switching Protocols", b"101"),
        _WEBSOCKET_RESPONSE.replace(b"101", b"1\xb21"),
        _WEBSOCKET_RESPONSE.replace(b"101", b"601"),
        _WEBSOCKET_RESPONSE.replace(b"Upgrade: websocket", b"Content-Length: 5, 5\r\nContent-Length: 5"),
        _WEBSOCKET_RESPONSE.replace(b"Upgrade: websocket", b"Transfer-Encoding: gzip, chunked"),
        b"HTTP/1.0 200 OK\r\n\r\n",
    ],
)
def test_known_response_heads_read_alike(raw: bytes) -> None:
    assert_response_alike(raw)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
# _well_formed called twice: two strategy objects (st.one_of keeps one copy of an object), half the heads.
@given(st.one_of(_well_formed(_WELL_FORMED_REQUEST_LINES), _well_formed(_WELL_FORMED_REQUEST_LINES),
                 _near_valid(_LISTED_REQUEST_LINES), _head(_REQUEST_LINES)))
def test_generated_request_heads_read_alike(raw: bytes) -> None:
    assert_request_alike(raw)


@settings(max_examples=800, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_well_formed(_WELL_FORMED_STATUS_LINES) | _near_valid(_LISTED_STATUS_LINES) | _head(_STATUS_LINES))
def test_generated_response_heads_read_alike(raw: bytes) -> None:
    assert_response_alike(raw)


@settings(max_examples=800, deadline=None)
@given(_FUZZ, st.booleans())
def test_arbitrary_bytes_read_alike(raw: bytes, complete: bool) -> None:
    """Any bytes at all, with or without the final blank line, as request and as response."""
    raw += current.HEAD_END if complete else b""
    assert_request_alike(raw)
    assert_response_alike(raw)

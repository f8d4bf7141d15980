"""Request and response heads: found within the size limit, parsed strictly, rendered back."""

from __future__ import annotations

import contextlib
import re

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from lb.errors import BadRequest, HeadersTooLarge, HttpVersionNotSupported, RequestRejected, UnsupportedMethod
from lb.http.head import (
    HEAD_END,
    answer_head_length,
    check_request_line,
    find_head_end,
    is_whole_head,
    parse_request_head,
    parse_response_head,
    render_head,
    take_answer_bytes,
    take_answer_head,
)

GOOD_GET = (
    b"GET /ws/chat?room=1&x=/y HTTP/1.1\r\n"
    b"Host: lb.example:8080\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Upgrade: websocket\r\n"
    b"Cookie: a=1\r\n"
    b"cookie: b=2\r\n"
    b"X-Empty:\r\n"
    b"X-Padded: \t value with  spaces \t\r\n"
    b"\r\n"
)


# -- find_head_end ----------------------------------------------------------


@pytest.mark.parametrize(
    "buffer",
    [b"", b"GET / HTTP/1.1\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n", b"GET / HTTP/1.1\r\nHost: a\r\n\r"],
)
def test_find_head_end_incomplete(buffer: bytes) -> None:
    """A head without its blank line yet is reported as incomplete (-1)."""
    assert find_head_end(buffer, 1024) == -1


def test_find_head_end_returns_head_length_and_ignores_body() -> None:
    """The returned length covers the head up to and including the blank line, not what follows."""
    head = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\n"
    assert find_head_end(head + b"body", 1024) == len(head)
    assert find_head_end(bytearray(head), 1024) == len(head)


def test_find_head_end_exact_limit_is_accepted() -> None:
    """A head of exactly `limit` bytes fits."""
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert find_head_end(head, len(head)) == len(head)
    assert find_head_end(head + b"trailing bytes", len(head)) == len(head)


def test_find_head_end_one_byte_over_limit() -> None:
    """A complete head one byte longer than the limit is too large (431)."""
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    with pytest.raises(HeadersTooLarge) as info:
        find_head_end(head, len(head) - 1)
    assert info.value.status == 431


def test_find_head_end_incomplete_at_limit_is_too_large() -> None:
    """An incomplete head that already fills the limit can only end up too large."""
    with pytest.raises(HeadersTooLarge):
        find_head_end(b"GET / HTTP/1.1\r\nX: " + b"a" * 100, 50)


def test_find_head_end_incomplete_below_limit_waits() -> None:
    """An incomplete head one byte short of the limit still waits for more."""
    buffer = b"GET / HTTP/1.1\r\nX: aaaa"
    assert find_head_end(buffer, len(buffer) + 1) == -1


def test_a_bare_lf_head_is_refused_before_it_could_end() -> None:
    """`GET / HTTP/1.1\\nHost: x\\n\\n` never ends in CRLFCRLF: a 400 now, not silence until the timeout."""
    with pytest.raises(BadRequest, match="bare LF"):
        find_head_end(b"GET / HTTP/1.1\nHost: x\n\n", 4096)
    with pytest.raises(BadRequest):
        find_head_end(b"GET / HTTP/1.1\r\nHost: x\nX", 4096, start=17)  # found among the new bytes
    assert find_head_end(b"GET / HTTP/1.1\r\nHost: x\r", 4096) == -1  # a CR whose LF is still to come


def _headish() -> st.SearchStrategy[bytes]:
    """Buffers made of the pieces a head end is found among (CRLFs, bare LFs and CRs, field text, an
    end): random bytes hold a CRLFCRLF in none of 200 examples, these in most.  A function: st.one_of
    keeps one of each strategy object, so `_HEADISH | _HEADISH` drew them one time in two, not two in three."""
    return st.lists(st.sampled_from([b"\r\n", b"\r\n", b"\n", b"\r", b"Host: a", b"GET / HTTP/1.1", HEAD_END])
                    | st.binary(max_size=6), max_size=30).map(b"".join)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(max_size=200) | _headish() | _headish(), limit=st.integers(min_value=1, max_value=300))
def test_find_head_end_agrees_with_a_plain_search(body: bytes, limit: int) -> None:
    """Any buffer gives the first head end within the limit, -1, HeadersTooLarge, or (incomplete,
    with a bare LF that would keep it from ever ending) BadRequest, never more."""
    end = body.find(HEAD_END)
    try:
        result = find_head_end(body, limit)
    except HeadersTooLarge:
        assert (end < 0 and len(body) >= limit) or end + 4 > limit
        return
    except BadRequest:
        assert end < 0 and len(body) < limit and re.search(rb"(?<!\r)\n", body)
        return
    if result == -1:
        assert end < 0 and len(body) < limit and b"\n" not in body.replace(b"\r\n", b"")
    else:
        assert result == end + 4 <= limit


@settings(max_examples=300, deadline=None)
@given(body=_headish() | _headish() | st.binary(max_size=40), limit=st.integers(min_value=1, max_value=120))
@example(body=b"GET / HTTP/1.1\r\n\r\n", limit=17)  # its blank line ends a byte past the limit
@example(body=b"GET / HTTP/1.1\r\n\r\n", limit=18)
def test_a_whole_head_is_one_find_head_end_finds_ending_at_the_end(body: bytes, limit: int) -> None:
    """is_whole_head says yes exactly where find_head_end finds a head that ends with the buffer, and
    the buffer does not begin with a CR (a blank line's CRLF, which the caller skips first)."""
    try:
        whole = find_head_end(body, limit) == len(body) and not body.startswith(b"\r")
    except RequestRejected:
        whole = False
    assert is_whole_head(body, limit) is whole


@settings(max_examples=300, deadline=None)
@given(data=_headish() | _headish() | st.binary(max_size=40), limit=st.integers(min_value=1, max_value=120))
@example(data=b"HTTP/1.1 101 x\r\n\r\n", limit=14)  # its blank line begins at the limit: none whole
@example(data=b"HTTP/1.1 101 x\r\n\r\n", limit=15)
def test_an_answer_head_taken_from_a_read_is_the_one_take_answer_bytes_takes(data: bytes, limit: int) -> None:
    """answer_head_length finds a head exactly where take_answer_bytes, given only `data`, takes one."""
    length = answer_head_length(data, limit)
    buffer = bytearray(data)
    try:
        taken = take_answer_bytes(buffer, 0, limit)
    except RequestRejected:
        taken = None
    assert (data[:length] if length >= 0 else None) == taken


# -- parse_request_head -----------------------------------------------------


def test_parse_good_get() -> None:
    """A well-formed GET yields method, target, version and headers in their order and case."""
    request = parse_request_head(GOOD_GET)
    assert (request.method, request.target, request.version) == ("GET", "/ws/chat?room=1&x=/y", "HTTP/1.1")
    assert request.head.start_line == ("GET", "/ws/chat?room=1&x=/y", "HTTP/1.1")
    assert request.head.headers == (
        ("Host", "lb.example:8080"),
        ("Connection", "keep-alive, Upgrade"),
        ("Upgrade", "websocket"),
        ("Cookie", "a=1"),
        ("cookie", "b=2"),
        ("X-Empty", ""),
        ("X-Padded", "value with  spaces"),
    )


def test_header_lookup_is_case_insensitive() -> None:
    """get, get_all and has_token ignore the case of names (and has_token of tokens)."""
    head = parse_request_head(GOOD_GET).head
    assert head.get("HOST") == head.get("host") == "lb.example:8080"
    assert head.get("COOKIE") == "a=1"
    assert head.get_all("Cookie") == ["a=1", "b=2"]
    assert head.get("x-missing") is None
    assert head.get_all("x-missing") == []
    assert head.has_token("connection", "upgrade")
    assert head.has_token("CONNECTION", "Keep-Alive")
    assert head.has_token("Upgrade", "WebSocket")
    assert not head.has_token("connection", "close")
    assert not head.has_token("x-missing", "anything")


def test_query_is_stripped_from_path() -> None:
    """`.path` is the target without its query; `.target` keeps it."""
    request = parse_request_head(GOOD_GET)
    assert request.path == "/ws/chat"
    assert request.target == "/ws/chat?room=1&x=/y"


@pytest.mark.parametrize(
    ("target", "path"),
    [
        ("http://example.com/a/b?q=1", "/a/b"),
        ("https://example.com:443/ws", "/ws"),
        ("http://example.com", "/"),
        ("http://example.com/", "/"),
        ("/plain?", "/plain"),
    ],
)
def test_absolute_form_is_reduced_to_its_path(target: str, path: str) -> None:
    """An absolute-form target routes by its path, without authority or query."""
    raw = f"GET {target} HTTP/1.1\r\nHost: example.com\r\n\r\n".encode()
    assert parse_request_head(raw).path == path


def test_absolute_form_without_path_ignores_slashes_in_query() -> None:
    """`http://host?next=/admin` has the empty path "/", not "/admin" (RFC 3986 §3.3)."""
    raw = b"GET http://example.com?next=/admin HTTP/1.1\r\nHost: example.com\r\n\r\n"
    assert parse_request_head(raw).path == "/"


def test_options_asterisk_and_http10_without_host() -> None:
    """OPTIONS * is accepted, and HTTP/1.0 needs no Host header."""
    assert parse_request_head(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n").target == "*"
    request = parse_request_head(b"GET / HTTP/1.0\r\n\r\n")
    assert request.version == "HTTP/1.0"
    assert request.head.headers == ()


@pytest.mark.parametrize(
    "raw",
    [
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 00005\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: CHUNKED\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: \t chunked \r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-Latin: caf\xe9\r\n\r\n",
    ],
)
def test_acceptable_framing_and_values(raw: bytes) -> None:
    """One decimal Content-Length, TE `chunked` in any case and obs-text values are allowed."""
    parse_request_head(raw)


BAD_REQUEST_HEADS = {
    "bare LF ending a line": b"GET / HTTP/1.1\nHost: a\r\n\r\n",
    "bare LF in a value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\nb\r\n\r\n",
    "bare CR in a value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n",
    "bare CR in the request line": b"GET /\r HTTP/1.1\r\nHost: a\r\n\r\n",
    "obs-fold with space": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n continued\r\n\r\n",
    "obs-fold with tab": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n\tcontinued\r\n\r\n",
    "space before colon": b"GET / HTTP/1.1\r\nHost : a\r\n\r\n",
    "tab before colon": b"GET / HTTP/1.1\r\nHost\t: a\r\n\r\n",
    "empty header name": b"GET / HTTP/1.1\r\nHost: a\r\n: value\r\n\r\n",
    "header line without colon": b"GET / HTTP/1.1\r\nHost: a\r\nNoColon\r\n\r\n",
    "NUL in value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x00b\r\n\r\n",
    "DEL in value": b"GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n",
    "escape in value": b"GET / HTTP/1.1\r\nHost: a\r\nX: \x1b[31m\r\n\r\n",
    "non-token char in name": b"GET / HTTP/1.1\r\nHost: a\r\nX(y): 1\r\n\r\n",
    "non-ASCII name": b"GET / HTTP/1.1\r\nHost: a\r\nX\xe9: 1\r\n\r\n",
    "bad method chars": b"GE(T / HTTP/1.1\r\nHost: a\r\n\r\n",
    "non-ASCII method": b"G\xc9T / HTTP/1.1\r\nHost: a\r\n\r\n",
    "empty method": b" / HTTP/1.1\r\nHost: a\r\n\r\n",
    "4-part request line": b"GET / HTTP/1.1 extra\r\nHost: a\r\n\r\n",
    "2-part request line": b"GET /\r\nHost: a\r\n\r\n",
    "double space in request line": b"GET  / HTTP/1.1\r\nHost: a\r\n\r\n",
    "tab separator": b"GET\t/ HTTP/1.1\r\nHost: a\r\n\r\n",
    "control char in target": b"GET /\x01 HTTP/1.1\r\nHost: a\r\n\r\n",
    "relative target": b"GET index.html HTTP/1.1\r\nHost: a\r\n\r\n",
    "asterisk on GET": b"GET * HTTP/1.1\r\nHost: a\r\n\r\n",
    "HTTP/0.9": b"GET / HTTP/0.9\r\nHost: a\r\n\r\n",
    "fragment in target": b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n",
    "fragment in absolute target": b"GET http://a/b#c HTTP/1.1\r\nHost: a\r\n\r\n",
    "lowercase version": b"GET / http/1.1\r\nHost: a\r\n\r\n",
    "missing Host on 1.1": b"GET / HTTP/1.1\r\nX: a\r\n\r\n",
    "two Host headers": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "two equal Host headers": b"GET / HTTP/1.1\r\nHost: a\r\nhost: a\r\n\r\n",
    "CL and TE": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
    "conflicting CL headers": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
    "conflicting CL list": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n",
    "negative CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n",
    "signed CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n",
    "hex CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x3\r\n\r\n",
    "empty CL": b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length:\r\n\r\n",
    "TE not ending in chunked": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
    "TE identity": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: identity\r\n\r\n",
    "empty TE": b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding:\r\n\r\n",
    "empty head": b"\r\n\r\n",
    "missing final blank line": b"GET / HTTP/1.1\r\nHost: a\r\n",
    "blank line inside head": b"GET / HTTP/1.1\r\n\r\nHost: a\r\n\r\n",
}


@pytest.mark.parametrize("raw", BAD_REQUEST_HEADS.values(), ids=BAD_REQUEST_HEADS.keys())
def test_bad_request_heads_are_rejected(raw: bytes) -> None:
    """Anything RFC 9112 forbids (smuggling ambiguities included) is a 400, never a guess."""
    with pytest.raises(BadRequest) as info:
        parse_request_head(raw)
    assert info.value.status == 400


@pytest.mark.parametrize("version", ["HTTP/2.0", "HTTP/3.0", "HTTP/2.1"])
def test_another_major_version_is_a_505(version: str) -> None:
    """RFC 9110 §15.6.6: the major version is not supported (not a malformed request)."""
    with pytest.raises(HttpVersionNotSupported) as info:
        parse_request_head(f"GET / {version}\r\nHost: a\r\n\r\n".encode())
    assert info.value.status == 505


@pytest.mark.parametrize("version", ["HTTP/1.2", "HTTP/1.9"])
def test_a_higher_minor_version_is_read_as_http11(version: str) -> None:
    """RFC 9110 §2.5: processed as the highest minor version we implement, with its rules (Host, TE)."""
    request = parse_request_head(f"POST / {version}\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".encode())
    assert (request.version, request.head.start_line[2], request.chunked) == ("HTTP/1.1", "HTTP/1.1", True)
    with pytest.raises(BadRequest, match="needs a Host"):
        parse_request_head(f"GET / {version}\r\n\r\n".encode())
    response = parse_response_head(f"{version} 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n".encode())
    assert (response.version, response.status) == ("HTTP/1.1", 101)


@pytest.mark.parametrize("version", ["HTTP/1.10", "HTTP/1.a", "http/1.2", "HTTP/1.2 "])
def test_a_malformed_version_is_still_a_400(version: str) -> None:
    """RFC 9112 §2.3: HTTP-version is `HTTP/` DIGIT `.` DIGIT, case-sensitive."""
    with pytest.raises(BadRequest) as info:
        parse_request_head(f"GET / {version}\r\nHost: a\r\n\r\n".encode())
    assert info.value.status == 400
    with pytest.raises(BadRequest):
        parse_response_head(f"{version} 200 OK\r\n\r\n".encode())


def test_non_ascii_digit_content_length_is_rejected() -> None:
    """Content-Length is 1*DIGIT in ASCII (RFC 9110 §8.6); a superscript two is a 400."""
    with pytest.raises(BadRequest):
        parse_request_head(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: \xb2\r\n\r\n")


@st.composite
def _field_sections(draw: st.DrawFn) -> bytes:
    """Plain field lines with, half the time, one more among them: a framing line, a broken line, a
    value of random bytes (most of which a value may hold) or a line of them.  Random bytes alone
    make a request head in none of 300 examples, and a field section in none of 200."""
    lines = draw(st.lists(st.sampled_from([b"X: 1", b"Accept: */*", b"X-Empty:", b"Cookie: a=1; b=2"]), max_size=4))
    if draw(st.booleans()):
        extra = st.sampled_from([b"Content-Length: 2", b"Transfer-Encoding: chunked", b"Host: b", b"Host : a",
                                 b" folded", b"NoColon", b"X-Lengths: 1, 2"])
        extra |= st.binary(max_size=8).map(lambda value: b"X-Fuzz: " + value) | st.binary(max_size=8)
        lines.insert(draw(st.integers(0, len(lines))), draw(extra))
    return b"\r\n".join(lines)


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300) | st.tuples(
    st.sampled_from([b"GET / HTTP/1.1\r\nHost: a", b"POST /a?b HTTP/1.0", b"OPTIONS * HTTP/1.1\r\nHost: h:1",
                     b"GET http://h/x HTTP/1.1\r\nHost: a"]),
    _field_sections(),
).map(lambda parts: b"\r\n".join(filter(None, parts))))
def test_arbitrary_bytes_only_raise_bad_request(raw: bytes) -> None:
    """Hostile bytes ending in a blank line parse or raise a RequestRejected, nothing else."""
    with contextlib.suppress(RequestRejected):
        parse_request_head(raw + HEAD_END)


_HEAD_ALPHABET = st.sampled_from(
    [
        b"GET",
        b"POST",
        b" ",
        b"/",
        b"\r\n",
        b"\r",
        b"\n",
        b":",
        b"\t",
        b"HTTP/1.1",
        b"HTTP/1.0",
        b"Host",
        b"Content-Length",
        b"Transfer-Encoding",
        b"chunked",
        b",",
        b"0",
        b"7",
        b"\x00",
        b"\xb2",
        b"a",
        b"*",
    ]
)


_FIELD_LINES = st.sampled_from([
    b"Accept: */*", b"X-Padded: \t a  b \t", b"Cookie: a=1", b"X-Empty:", b"X-Latin: caf\xe9", b"Upgrade: websocket",
    b"Connection: keep-alive, Upgrade", b"X_Custom: 1",
])
# Bytes the parser's checks turn on: separators, line ends, the colon, list commas, digits, controls.
_HEAD_EDIT_BYTES = st.sampled_from(b" \t\r\n:,;/*?#@0a_\x00\x7f\xb2\xe9")


@st.composite
def _near_valid_heads(draw: st.DrawFn) -> tuple[bytes, tuple[str, str] | None]:
    """A valid request head (without its final CRLFCRLF) and, four times in five, one change to it: a
    byte replaced, dropped or inserted, or a line repeated. With it, unchanged, its method and version."""
    method = draw(st.sampled_from([b"GET", b"POST", b"HEAD", b"OPTIONS", b"DELETE"]))
    targets = [b"/", b"/a/b?c=d&e=/f", b"http://h.example:8080/x?y", b"http://h", *([b"*"] * (method == b"OPTIONS"))]
    version = draw(st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    lines = draw(st.lists(_FIELD_LINES, max_size=4))
    if version == b"HTTP/1.1" or draw(st.booleans()):
        host = draw(st.sampled_from([b"a", b"lb.example:8080", b"[::1]:80", b"10.0.0.1"]))
        lines.insert(draw(st.integers(0, len(lines))), b"Host: " + host)
    if draw(st.booleans()):
        framing = [b"Content-Length: 7", b"Content-Length: 0", b"Transfer-Encoding: chunked"]  # not on 1.0
        framing = framing[: 2 + (version == b"HTTP/1.1")]
        lines.insert(draw(st.integers(0, len(lines))), draw(st.sampled_from(framing)))
    lines.insert(0, b" ".join([method, draw(st.sampled_from(targets)), version]))
    raw = b"\r\n".join(lines)
    edit = draw(st.sampled_from(["none", "replace", "drop", "insert", "repeat"]))
    if edit == "none":
        return raw, (method.decode(), version.decode())
    if edit == "repeat":
        return raw + b"\r\n" + draw(st.sampled_from(lines[1:] or lines)), None
    at = draw(st.integers(0, len(raw) - 1))
    byte = bytes([draw(_HEAD_EDIT_BYTES | st.integers(0, 255))])
    return raw[:at] + (b"" if edit == "drop" else byte) + raw[at + (edit != "insert") :], None


@settings(max_examples=300, deadline=None)
@given(
    head=_near_valid_heads() | _near_valid_heads()
    | st.lists(_HEAD_ALPHABET, max_size=40).map(lambda parts: (b"".join(parts), None)),  # none parses
)
def test_near_valid_heads_only_raise_bad_request(head: tuple[bytes, tuple[str, str] | None]) -> None:
    """Heads assembled from HTTP fragments, or valid heads with one change, parse or raise a
    RequestRejected, and parsed ones are coherent; an unchanged valid head parses to its method and version."""
    raw, unchanged = head
    try:
        request = parse_request_head(raw + HEAD_END)
    except RequestRejected:
        assert unchanged is None
        return
    assert request.version in ("HTTP/1.1", "HTTP/1.0")
    assert unchanged in (None, (request.method, request.version))
    assert request.path.startswith("/")
    for name, value in request.head.headers:
        assert name and value == value.strip(" \t")


# -- parse_response_head ----------------------------------------------------


def test_parse_good_response() -> None:
    """A 101 answer yields version, status, reason and headers."""
    raw = (
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n"
    )
    response = parse_response_head(raw)
    assert (response.version, response.status, response.reason) == ("HTTP/1.1", 101, "Switching Protocols")
    assert response.head.get_all("set-cookie") == ["a=1", "b=2"]
    assert response.head.has_token("connection", "upgrade")


@pytest.mark.parametrize(
    ("raw", "status", "reason"),
    [
        (b"HTTP/1.0 200 OK\r\n\r\n", 200, "OK"),
        (b"HTTP/1.1 404 \r\n\r\n", 404, ""),
        (b"HTTP/1.1 204\r\n\r\n", 204, ""),
        (b"HTTP/1.1 500 Very Bad  Error\r\n\r\n", 500, "Very Bad  Error"),
    ],
)
def test_response_status_line_forms(raw: bytes, status: int, reason: str) -> None:
    """The reason phrase may be empty or contain spaces; the status is an int."""
    response = parse_response_head(raw)
    assert (response.status, response.reason) == (status, reason)


BAD_RESPONSE_HEADS = {
    "HTTP/2": b"HTTP/2 200 OK\r\n\r\n",
    "two-digit status": b"HTTP/1.1 20 OK\r\n\r\n",
    "four-digit status": b"HTTP/1.1 2000 OK\r\n\r\n",
    "letters in status": b"HTTP/1.1 2x0 OK\r\n\r\n",
    "no status": b"HTTP/1.1\r\n\r\n",
    "bare LF": b"HTTP/1.1 200 OK\nX: a\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
    "space before colon": b"HTTP/1.1 200 OK\r\nX : a\r\n\r\n",
    "CL and TE": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    "conflicting CL": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    "control char in value": b"HTTP/1.1 200 OK\r\nX: \x01\r\n\r\n",
}


@pytest.mark.parametrize("raw", BAD_RESPONSE_HEADS.values(), ids=BAD_RESPONSE_HEADS.keys())
def test_bad_response_heads_are_rejected(raw: bytes) -> None:
    """A malformed backend answer raises BadRequest (the listener turns it into 502)."""
    with pytest.raises(BadRequest):
        parse_response_head(raw)


@pytest.mark.parametrize("digit", [b"\xb2", b"\xb3", b"\xb9"], ids=["superscript 2", "superscript 3", "superscript 1"])
def test_non_ascii_digit_content_length_in_response_is_rejected(digit: bytes) -> None:
    """A backend's non-ASCII Content-Length is a malformed answer (502), not a framing crash later."""
    with pytest.raises(BadRequest):
        parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: " + digit + b"\r\n\r\n")


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=200) | _field_sections())
def test_arbitrary_response_bytes_only_raise_bad_request(raw: bytes) -> None:
    """Hostile backend bytes ending in a blank line parse or raise BadRequest, nothing else."""
    with contextlib.suppress(BadRequest):
        parse_response_head(b"HTTP/1.1 200 OK\r\n" + raw + HEAD_END)


# -- render_head ------------------------------------------------------------


def test_render_head_shape() -> None:
    """render_head writes the start line, `Name: value` lines and the blank line, in order."""
    assert render_head("GET / HTTP/1.1", [("Host", "a"), ("X", "1")]) == (b"GET / HTTP/1.1\r\nHost: a\r\nX: 1\r\n\r\n")
    assert render_head("HTTP/1.1 204 No Content", []) == b"HTTP/1.1 204 No Content\r\n\r\n"


def test_render_head_round_trip() -> None:
    """Rendering a parsed request head gives back a head that parses to the same values."""
    request = parse_request_head(GOOD_GET)
    rendered = render_head(" ".join(request.head.start_line), request.head.headers)
    again = parse_request_head(rendered)
    assert again.head.start_line == request.head.start_line
    assert again.head.headers == request.head.headers


def test_render_head_round_trip_keeps_latin1_values() -> None:
    """obs-text bytes survive parse and render unchanged."""
    raw = b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9\r\n\r\n"
    response = parse_response_head(raw)
    assert render_head("HTTP/1.1 200 OK", response.head.headers) == raw


_TOKEN = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-!#$%&'*+.^_`|~", min_size=1, max_size=12
)
_VALUE = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"), max_size=20
).map(lambda v: v.strip(" \t"))


@settings(max_examples=200, deadline=None)
@given(headers=st.lists(st.tuples(_TOKEN, _VALUE), max_size=8))
def test_render_then_parse_round_trip(headers: list[tuple[str, str]]) -> None:
    """Any valid header list renders to bytes that parse back to the same list."""
    names = {name.lower() for name, _ in headers}
    if names & {"host", "content-length", "transfer-encoding"}:
        return
    rendered = render_head("GET /x HTTP/1.1", [("Host", "a"), *headers])
    assert parse_request_head(rendered).head.headers == (("Host", "a"), *headers)


def test_an_answer_head_trickled_byte_by_byte_is_taken_whole_and_the_rest_stays() -> None:
    """The one reader of a backend's answer heads (the proxy and the health checks)."""
    wire = b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    buffer, scanned, taken = bytearray(), 0, []
    for byte in wire:
        buffer.append(byte)
        while (not taken or taken[-1] < 200) and (response := take_answer_head(buffer, scanned, 4096)):
            taken.append(response.status)  # until the final answer: its body follows, not a head
            scanned = 0
        scanned = len(buffer)
    assert taken == [103, 200] and bytes(buffer) == b"ok"


@pytest.mark.parametrize(
    ("wire", "error"),
    [
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not an HTTP/1.x head"),
        (b"HTTP/1.1 200 OK\nContent-Length: 0\n", "not an HTTP/1.x head"),
        (b"HTTP/1.1 000 Zero\r\n\r\n", "status code 000"),
        (b"HTTP/1.1 200 OK\r\nX: " + b"a" * 5000, "answer head exceeds 4096 bytes"),
        (b"HTTP 200 OK\r\n", "not an HTTP/1.x head"),
    ],
    ids=["banner", "bare-lf", "status-000", "too-large", "no-slash"],
)
def test_an_answer_that_is_not_http_says_so_at_once(wire: bytes, error: str) -> None:
    with pytest.raises(RequestRejected, match=error):
        take_answer_head(bytearray(wire), 0, 4096)


def test_an_answer_head_of_exactly_the_limit_is_taken_and_one_that_fills_it_unfinished_is_too_large() -> None:
    """A backend's head of `limit` bytes fits; an unfinished one that fills the limit can only grow past it."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"
    buffer = bytearray(head + b"next")
    assert take_answer_bytes(buffer, 0, len(head)) == head and buffer == b"next"
    assert take_answer_bytes(bytearray(head[:-1]), 0, len(head)) is None
    with pytest.raises(HeadersTooLarge, match=f"answer head exceeds {len(head) - 1} bytes"):
        take_answer_bytes(bytearray(head[:-1]), 0, len(head) - 1)


@pytest.mark.parametrize("target", ["/", "/a/x", "http://evil.example/admin"])
def test_connect_is_501_whatever_its_target(target: str) -> None:
    """CONNECT asks for a tunnel to a host of the client's choice (RFC 9110 §9.3.6): not ours to open.
    Its origin- and absolute-form targets parsed, and went to a backend as an ordinary request."""
    with pytest.raises(UnsupportedMethod) as info:
        parse_request_head(f"CONNECT {target} HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\n".encode())
    assert info.value.status == 501


# -- check_request_line: a whole request line in a head that is not ------------------------------

def _mostly(good: list[bytes], bad: list[bytes]) -> st.SearchStrategy[bytes]:
    """One part of a request line: a good one four times in five, so that whole good lines come often.
    Four strategies, not one four times: st.one_of keeps one of each, which made it one time in two."""
    return st.one_of(*[st.sampled_from(good) for _ in range(4)], st.sampled_from(bad))


_METHODS = _mostly([b"GET", b"OPTIONS", b"get", b"CONNECT"], [b"G\x00T", b"G@T", b""])
_SEPARATORS = _mostly([b" "], [b"", b"  ", b"\t", b"\r"])
_TARGETS = _mostly(
    [b"/", b"/a?b=%41", b"*", b"http://h/x", b"HTTPS://h"], [b"h:443", b"/a#f", b"/\x7f", b"/\xe9", b"/\x00", b"", b"x"]
)
_VERSIONS = _mostly([b"HTTP/1.1", b"HTTP/1.0"], [b"HTTP/2.0", b"HTTP/1.2", b"http/1.1", b"HTTP/", b""])
_TAILS = _mostly([b""], [b" ", b" x", b"\x00", b"\r"])


@settings(max_examples=500, deadline=None)
@given(parts=st.tuples(_METHODS, _SEPARATORS, _TARGETS, _SEPARATORS, _VERSIONS, _TAILS))
def test_a_request_line_refused_early_is_one_the_whole_head_is_refused_for(parts: tuple[bytes, ...]) -> None:
    """What the early check refuses, the parse of a head beginning with that line refuses too, with the
    same status; what it passes, that parse does not refuse for its line: refusing it before the head
    ends changes when the client hears, never what."""
    line = b"".join(parts)
    head = line + b"\r\nHost: a\r\n\r\n"
    try:
        check_request_line(line)
    except RequestRejected as early:
        with pytest.raises(RequestRejected) as whole:
            parse_request_head(head)
        assert type(whole.value) is type(early) and whole.value.status == early.status
    else:
        # CONNECT's 501 waits for the whole head, whatever its line.
        with contextlib.suppress(UnsupportedMethod):
            parse_request_head(head)


@pytest.mark.parametrize(
    ("line", "status"),
    [(b"GET /", 400), (b"GET / ", 400), (b"GET", 400), (b"GET / HTTP/1.1 x", 400), (b"GET /a#f HTTP/1.1", 400),
     (b"GET / HTTP/2.0", 505), (b"GET / FOO/1.1", 400), (b"GET /\x00 HTTP/1.1", 400), (b"GET /\rx HTTP/1.1", 400)],
)
def test_a_request_line_no_head_can_mend_is_refused_alone(line: bytes, status: int) -> None:
    """HTTP/0.9's `GET /` (whose client sends nothing more), and any other line whose head cannot parse."""
    with pytest.raises(RequestRejected) as info:
        check_request_line(line)
    assert info.value.status == status


@pytest.mark.parametrize(
    "line",
    [b"GET / HTTP/1.1", b"GET /a HTTP/1.0", b"OPTIONS * HTTP/1.0", b"POST http://h/x HTTP/1.1", b"CONNECT /x HTTP/1.1"],
)
def test_a_request_line_a_head_can_follow_passes(line: bytes) -> None:
    check_request_line(line)



_SOME_NAMES = st.sampled_from(["host", "upgrade", "connection", "content-length", "transfer-encoding", "x-a", "cookie"])
_VALID = {"content-length": "0", "transfer-encoding": "chunked"}


@given(fields=st.lists(_SOME_NAMES, unique=True, max_size=6), names=st.frozensets(_SOME_NAMES, max_size=7))
@settings(max_examples=300, deadline=None)
def test_has_any_answers_as_the_sets_meet(fields: list[str], names: frozenset[str]) -> None:
    """Whichever side it looks up in the other (the fewer names, or the head's fewer fields)."""
    if "content-length" in fields and "transfer-encoding" in fields:
        fields.remove("content-length")
    lines = "".join(f"{name}: {_VALID.get(name, 'v')}\r\n" for name in fields if name != "host")
    head = parse_request_head(f"POST / HTTP/1.1\r\nHost: a\r\n{lines}\r\n".encode()).head
    assert head.has_any(names) == bool(names & set(head.index))

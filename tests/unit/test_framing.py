"""Where a relayed response body ends (RFC 9112 §6.3), found exactly whatever the read sizes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.http.framing import MAX_CHUNK_LINE, MAX_TRAILERS, BodyFramer, request_framer, response_framer
from lb.http.head import parse_request_head, parse_response_head, protected_headers

AFTER = b"HTTP/1.1 200 OK\r\n"  # bytes that follow the body and must not be counted

CHUNKED = (
    b"5;name=value\r\nhello\r\n"
    b'0A ; quoted="a b;c"\r\n0123456789\r\n'
    b"1\r\n\n\r\n"  # a payload byte that looks like a line end
    b"000;last\r\n"
    b"X-Checksum: 123\r\nX-Empty:\r\n"
    b"\r\n"
)


def feed_all(framer: BodyFramer, pieces: list[bytes]) -> int | None:
    """Feed `pieces` in order; the body's end as an offset in their concatenation, or None."""
    offset = 0
    for piece in pieces:
        used = framer.feed(piece)
        if used is not None:
            assert 0 <= used <= len(piece)
            assert framer.done
            return offset + used
        assert not framer.done
        offset += len(piece)
    return None


def split_at(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(cut, len(data)) for cut in cuts})
    bounds = [0, *points, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


# -- Content-Length ---------------------------------------------------------


def test_content_length_split_across_feeds() -> None:
    """A Content-Length body ends after exactly that many bytes, however they are split."""
    framer = BodyFramer(length=10, chunked=False)
    assert framer.feed(b"abc") is None
    assert framer.feed(b"") is None
    assert framer.feed(b"def") is None
    assert not framer.done
    assert framer.feed(b"ghij" + AFTER) == 4
    assert framer.done
    assert framer.feed(b"more") == 0


def test_content_length_in_one_feed() -> None:
    """A whole body plus what follows in one read ends at the length."""
    assert feed_all(BodyFramer(length=5, chunked=False), [b"hello" + AFTER]) == 5


def test_zero_length_body_is_done_at_once() -> None:
    """Content-Length: 0 is complete before any byte arrives."""
    framer = BodyFramer(length=0, chunked=False)
    assert framer.done
    assert framer.feed(AFTER) == 0


@pytest.mark.parametrize(
    ("raw", "method"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n", "HEAD"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", "HEAD"),
        (b"HTTP/1.1 204 No Content\r\n\r\n", "GET"),
        (b"HTTP/1.1 204 No Content\r\nContent-Length: 10\r\n\r\n", "GET"),
        (b"HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n", "GET"),
        (b"HTTP/1.1 304 Not Modified\r\nTransfer-Encoding: chunked\r\n\r\n", "GET"),
        (b"HTTP/1.1 100 Continue\r\n\r\n", "POST"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", "GET"),
    ],
    ids=["HEAD with CL", "HEAD with TE", "204", "204 with CL", "304 with CL", "304 with TE", "100", "CL 0"],
)
def test_bodiless_responses(raw: bytes, method: str) -> None:
    """HEAD answers, 1xx, 204 and 304 have no body whatever their framing headers say."""
    framer = response_framer(parse_response_head(raw), request_method=method)
    assert framer.done
    assert framer.feed(AFTER) == 0


def test_response_framer_uses_content_length() -> None:
    """A Content-Length answer (repeated equal values allowed) ends after that many bytes."""
    raw = b"HTTP/1.1 200 OK\r\nContent-Length: 3, 3\r\n\r\n"
    framer = response_framer(parse_response_head(raw), request_method="GET")
    assert feed_all(framer, [b"ab", b"c" + AFTER]) == 3


def test_response_framer_prefers_chunked() -> None:
    """Transfer-Encoding: chunked frames the body."""
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
    framer = response_framer(parse_response_head(raw), request_method="GET")
    assert feed_all(framer, [CHUNKED + AFTER]) == len(CHUNKED)


def test_until_eof_body_never_ends() -> None:
    """Without Content-Length or chunked, the body runs until the backend closes: feed returns None."""
    framer = response_framer(parse_response_head(b"HTTP/1.1 200 OK\r\n\r\n"), request_method="GET")
    for piece in (b"", CHUNKED, b"0\r\n\r\n", AFTER):
        assert framer.feed(piece) is None
    assert not framer.done
    assert BodyFramer(length=None, chunked=False).feed(b"x") is None


# -- chunked ----------------------------------------------------------------


def test_chunked_whole() -> None:
    """A chunked body with extensions and trailers ends right after its final blank line."""
    assert feed_all(BodyFramer(length=None, chunked=True), [CHUNKED + AFTER]) == len(CHUNKED)


def test_chunked_one_byte_at_a_time() -> None:
    """Fed one byte at a time, the body ends on exactly its last byte."""
    data = CHUNKED + AFTER
    framer = BodyFramer(length=None, chunked=True)
    for index in range(len(data)):
        used = framer.feed(data[index : index + 1])
        if index < len(CHUNKED) - 1:
            assert used is None, index
        else:
            assert used == 1
            assert index == len(CHUNKED) - 1
            break
    assert framer.done


@pytest.mark.parametrize("cut", range(1, len(CHUNKED) + len(AFTER)))
def test_chunked_split_at_every_boundary(cut: int) -> None:
    """Split in two at any byte, the body still ends at the same place."""
    data = CHUNKED + AFTER
    assert feed_all(BodyFramer(length=None, chunked=True), [data[:cut], data[cut:]]) == len(CHUNKED)


@pytest.mark.parametrize(
    "body",
    [
        b"0\r\n\r\n",
        b"0;ext\r\n\r\n",
        b"0\r\nTrailer: x\r\n\r\n",
        b"1\r\na\r\n0\r\n\r\n",
        b"F\r\n" + b"x" * 15 + b"\r\n0\r\n\r\n",
        b"000000000000001\r\nx\r\n0\r\n\r\n",  # 15 digits is the limit (below 2**60)
        b"1\t;tab\r\nx\r\n0\r\n\r\n",
        b"1 \t ; a=b\r\nx\r\n0\r\n\r\n",
        b'1;a="q;\\"\x80" ; b = c;d\r\nx\r\n0\r\n\r\n',
        b"1  \r\nx\r\n0\r\n\r\n",
        b"1;a=b \t\r\nx\r\n0\r\n\r\n",
        b"0\r\nA: 1\r\nB:\r\n\r\n",
    ],
    ids=["empty", "last-chunk ext", "trailer", "one chunk", "uppercase hex", "15 digits", "tab before ext",
         "spaces before ext", "quoted and spaced extensions", "spaces then line end (servers send it)",
         "spaces after an extension", "trailers"],
)
def test_chunked_forms(body: bytes) -> None:
    """Valid chunked bodies end exactly after their final CRLF."""
    assert feed_all(BodyFramer(length=None, chunked=True), [body + AFTER]) == len(body)


MALFORMED_CHUNKED = {
    "no size": b"\r\n",
    "non-hex size": b"g\r\n",
    "negative size": b"-5\r\n",
    "0x prefix": b"0x5\r\n",
    "leading space": b" 5\r\n",
    "extension without size": b";ext\r\n",
    "bare LF after size": b"5\nhello\r\n",
    "CR without LF after size": b"5\rhello",
    "16 hex digits": b"0000000000000001\r\n",
    "ffff... past 2**63": b"ffffffffffffffff\r\n",
    "junk after the size": b"5 junk\r\nhello\r\n",
    "space then junk after the size": b"5 \tx;a\r\n",
    "trailer without a colon": b"0\r\nnot a field\r\n",
    "folded trailer": b"0\r\nA: 1\r\n  more\r\n",
    "data longer than size": b"5\r\nhelloX\r\n",
    "CR then junk after data": b"5\r\nhello\rX",
    "bare LF after data": b"5\r\nhello\n0\r\n\r\n",
    "CR then junk in trailer": b"0\r\nX: 1\rY",
    "CR then junk at end": b"0\r\n\rX",
    "bare LF in extension": b"5;a\n0\r\n",
    "NUL in extension": b"5;a\x00b\r\n",
    "DEL in extension": b"5;a\x7f\r\n",
    "endless extension": b"5;" + b"a" * MAX_CHUNK_LINE + b"\r\n",
    # RFC 9112 §7.1.1's grammar: `;` name [`=` token or quoted-string], BWS before `;` and `=` (and,
    # let through, before the CRLF).
    "extension without a name": b"1;\r\nx\r\n0\r\n\r\n",
    "extension value missing": b"1;a=\r\nx\r\n0\r\n\r\n",
    "space in an extension value": b"1;a=b c\r\nx\r\n0\r\n\r\n",
    "unclosed quoted value": b'1;a="b\r\nx\r\n0\r\n\r\n',
    "escaped closing quote": b'1;a="\\"\r\nx\r\n0\r\n\r\n',
    "bare LF in trailer": b"0\r\nX: 1\n\r\n",
    "NUL in trailer": b"0\r\nX: \x00\r\n",
    "endless trailers": b"0\r\n" + b"X: 1\r\n" * (MAX_TRAILERS // 4 + 1),
    "endless trailer line": b"0\r\nX: " + b"v" * MAX_TRAILERS + b"\r\n",
    "space before a trailer's colon": b"0\r\nX-A : c\r\n",
    "tab before a trailer's colon": b"0\r\nX-A\t: c\r\n",
    "trailer without a name": b"0\r\n:x\r\n",
    "trailer name not a token": b"0\r\nX(A): c\r\n",
    "CR inside a trailer name": b"0\r\nX\rA: c\r\n",
    "CR before any digit": b"5\r\nhello\r\n\r",
    "CR alone": b"\r",
    "blank size line": b" \r\n",
    "tab as the size line": b"\t\r\n",
}


@pytest.mark.parametrize("body", MALFORMED_CHUNKED.values(), ids=MALFORMED_CHUNKED.keys())
def test_malformed_chunked_raises(body: bytes) -> None:
    """Broken chunked encoding raises ValueError, whole or byte by byte."""
    with pytest.raises(ValueError):
        BodyFramer(length=None, chunked=True).feed(body + b"\r\n\r\n")
    framer = BodyFramer(length=None, chunked=True)
    with pytest.raises(ValueError):  # from whichever byte is bad
        for byte in body + b"\r\n\r\n":
            framer.feed(bytes([byte]))


@pytest.mark.parametrize("first", [b"\r", b"\n", b";", b" ", b"\t"], ids=["CR", "LF", "semicolon", "space", "tab"])
def test_a_size_line_is_refused_at_a_first_byte_no_size_begins_with(first: bytes) -> None:
    """A chunk-size line starts with a hex digit: any other first byte raises there, not at the line's end."""
    with pytest.raises(ValueError, match="malformed chunk size"):
        BodyFramer(length=None, chunked=True).feed(first)
    framer = BodyFramer(length=None, chunked=True)
    assert framer.feed(b"1\r\nx\r\n") is None
    with pytest.raises(ValueError, match="malformed chunk size"):
        framer.feed(first)


@pytest.mark.parametrize(
    "name", ["X-Forwarded-For", "x_forwarded_for", "X-Forwarded-Anything", "x_forwarded_anything", "Trailer",
             "Content-Length", "Transfer-Encoding", "Host", "X-Real-IP", "Forwarded", "X-LB-Affinity",
             "X-Game-Affinity", "Proxy-Connection", "Keep_Alive", "TE", "Connection", "Upgrade", "Cookie",
             "Sec-WebSocket-Key", "sec_websocket_protocol"],
)
def test_a_request_trailer_named_like_a_protected_header_is_refused(name: str) -> None:
    """A backend that merges trailers into the head must not find ours (or framing) there: refused,
    whole, and byte by byte from the colon on, as the head parser drops such names."""
    protected = protected_headers("X-Game-Affinity")
    body = b"0\r\nA: 1\r\n" + name.encode() + b": 1.2.3.4\r\n\r\n"
    head = parse_request_head(b"POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n")
    with pytest.raises(ValueError, match="not allowed"):
        request_framer(head, protected=protected).feed(body)
    framer = request_framer(head, protected=protected)
    colon = body.index(b":", body.index(name.encode()))
    for index, byte in enumerate(body):
        if index < colon:
            assert framer.feed(bytes([byte])) is None
        else:
            with pytest.raises(ValueError, match="not allowed"):
                framer.feed(bytes([byte]))
            break
    # A response's trailers go to a client, which reads none of them as ours: only the grammar holds.
    response = parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
    assert response_framer(response, request_method="GET").feed(body) == len(body)


def test_trailers_within_the_limit_pass_however_split() -> None:
    """A trailer section just under MAX_TRAILERS passes whole and byte by byte; counted alike both ways."""
    line = b"X-Checksum: " + b"a" * 50 + b"\r\n"
    body = b"0\r\n" + line * ((MAX_TRAILERS - 2) // len(line)) + b"\r\n"
    assert feed_all(BodyFramer(length=None, chunked=True), [body + AFTER]) == len(body)
    assert feed_all(BodyFramer(length=None, chunked=True), [bytes([b]) for b in body + AFTER]) == len(body)


_EXT = st.sampled_from([b"", b";a", b";a=b", b' ; name="q;v"', b";x=1;y"])
_TRAILER = st.sampled_from([b"X: 1\r\n", b"Checksum: abc\r\n", b"E:\r\n"])


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    parts = []
    for payload in draw(st.lists(st.binary(min_size=1, max_size=40), max_size=6)):
        size = f"{len(payload):x}".encode()
        if draw(st.booleans()):
            size = size.upper()
        parts.append(b"0" * draw(st.integers(0, 3)) + size + draw(_EXT) + b"\r\n" + payload + b"\r\n")
    parts.append(b"0" + draw(_EXT) + b"\r\n")
    parts.extend(draw(st.lists(_TRAILER, max_size=3)))
    parts.append(b"\r\n")
    return b"".join(parts)


@settings(max_examples=300, deadline=None)
@given(body=chunked_bodies(), after=st.binary(max_size=20), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_chunked_end_is_exact_under_random_splits(body: bytes, after: bytes, cuts: list[int]) -> None:
    """Any chunked body split anywhere ends exactly at its last byte, never before or after."""
    assert feed_all(BodyFramer(length=None, chunked=True), split_at(body + after, cuts)) == len(body)


@settings(max_examples=200, deadline=None)
@given(length=st.integers(0, 200), extra=st.binary(max_size=50), cuts=st.lists(st.integers(0, 300), max_size=8))
def test_content_length_end_is_exact_under_random_splits(length: int, extra: bytes, cuts: list[int]) -> None:
    """A Content-Length body split anywhere ends exactly after `length` bytes."""
    framer = BodyFramer(length=length, chunked=False)
    if length == 0:
        assert framer.done
        return
    assert feed_all(framer, split_at(b"x" * length + extra, cuts)) == length


# Bytes a chunked body's checks turn on: line ends, the size's digits and its end, extension and trailer syntax.
_EDIT_BYTES = st.sampled_from(b"\r\n;:= \t\"\\0aFg-\x00\x7f\x80")


@st.composite
def near_chunked(draw: st.DrawFn) -> tuple[bytes, int | str | None]:
    """A chunked body and the bytes after it, with at most one change (a byte replaced, dropped or
    inserted, or the data cut short); and what it must give: the body's end when the change (if any)
    falls after it, "wait" when it was cut inside the body, None when no answer is known."""
    body = draw(chunked_bodies())
    data = body + draw(st.binary(max_size=20))
    edit = draw(st.sampled_from(["none", "replace", "drop", "insert", "cut"]))
    at = draw(st.integers(0, len(data) - 1))
    if edit == "none":
        return data, len(body)
    if edit == "cut":
        return data[:at], "wait" if at < len(body) else len(body)
    byte = bytes([draw(_EDIT_BYTES | st.integers(0, 255))])
    changed = data[:at] + (b"" if edit == "drop" else byte) + data[at + (edit != "insert") :]
    return changed, len(body) if at >= len(body) else None


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=200) | near_chunked(), cuts=st.lists(st.integers(0, 200), max_size=6))
def test_hostile_chunked_only_raises_value_error(data: bytes | tuple[bytes, int | str | None], cuts: list[int]) -> None:
    """Arbitrary bytes give an end inside the data, None, or ValueError, nothing else; a valid body
    changed only after its end still ends there, and one cut short waits for more."""
    data, expected = data if isinstance(data, tuple) else (data, None)
    try:
        end = feed_all(BodyFramer(length=None, chunked=True), split_at(data, cuts))
    except ValueError:
        assert expected is None
        return
    assert end is None or 0 < end <= len(data)
    if expected is not None:
        assert end == (None if expected == "wait" else expected)


def _outcome(pieces: list[bytes], forbidden: frozenset[str] = frozenset()) -> int | str | None:
    """The body's end, None if it goes on, or "error"."""
    try:
        return feed_all(BodyFramer(length=None, chunked=True, forbidden_trailers=forbidden), pieces)
    except ValueError:
        return "error"


_chunk_lines = st.builds(
    lambda size, ws, ext, data_ok: (
        f"{size:x}".encode() + ws + ext + b"\r\n" + b"d" * size + (b"\r\n" if data_ok else b"\rX")
    ),
    st.integers(0, 40),
    st.sampled_from([b"", b" ", b"\t ", b"  x"]),
    st.sampled_from([b"", b";a", b";a=b;c", b"; q=\"v\"", b";\x7f", b";\x00", b";" + b"e" * (MAX_CHUNK_LINE - 4)]),
    st.booleans(),
)


_good_chunk_lines = st.builds(
    lambda size, ws, ext: f"{size:x}".encode() + ws + ext + b"\r\n" + b"d" * size + b"\r\n",
    st.integers(0, 40), st.sampled_from([b"", b" ", b"\t "]), st.sampled_from([b"", b";a", b";a=b;c", b"; q=\"v\""]),
)


@st.composite
def _size_lines(draw: st.DrawFn) -> list[bytes]:
    """Valid chunks, half the time with one line that may be flawed put among them: with a flaw
    allowed in every line, four in five bodies were refused."""
    lines = draw(st.lists(_good_chunk_lines, max_size=6))
    if draw(st.booleans()):
        lines.insert(draw(st.integers(0, len(lines))), draw(_chunk_lines | st.binary(max_size=12)))
    return lines


@settings(max_examples=400, deadline=None)
@given(
    lines=_size_lines() | st.lists(_chunk_lines | st.binary(max_size=12), max_size=6),
    cuts=st.lists(st.integers(0, 400) | st.integers(0, 8200), min_size=1, max_size=4),
)
def test_whole_lines_and_byte_loop_read_alike(lines: list[bytes], cuts: list[int]) -> None:
    """The one-match read of a whole size line says what the byte loop says: same end, same errors,
    however the reads split it (a split line always goes through the byte loop)."""
    body = b"".join(lines) + b"0\r\n\r\nNEXT"
    whole = _outcome([body])
    pieces, last = [], 0
    for cut in sorted({c for c in cuts if c < len(body)}):
        pieces.append(body[last:cut])
        last = cut
    pieces.append(body[last:])
    assert _outcome(pieces) == whole
    if len(body) <= 400:
        assert _outcome([bytes([b]) for b in body]) == whole


_trailer_lines = st.sampled_from([
    b"X: 1\r\n", b"Checksum: a b\tc\r\n", b"E:\r\n", b"X-A : c\r\n", b":x\r\n", b" folded\r\n",
    b"A:\x00\r\n", b"A: b\rc\r\n", b"A: b\n", b"Host: x\r\n", b"x_forwarded_for: 1\r\n", b"A\r\n",
    b"V: " + b"v" * (MAX_TRAILERS // 3) + b"\r\n", b"\xff: 1\r\n", b"A: \xff\x80\r\n",
])


@settings(max_examples=400, deadline=None)
@given(
    lines=st.lists(_trailer_lines | st.binary(max_size=8), max_size=6),
    cuts=st.lists(st.integers(0, 200) | st.integers(0, 70000), min_size=1, max_size=4),
    forbid=st.booleans(),
)
def test_whole_trailer_lines_and_the_loop_read_alike(lines: list[bytes], cuts: list[int], forbid: bool) -> None:
    """The one-match read of whole trailer lines says what the loop says for the same lines split
    across reads: the same end, the same errors, the same count against MAX_TRAILERS."""
    forbidden = protected_headers("x-lb-affinity") if forbid else frozenset()
    body = b"0\r\n" + b"".join(lines) + b"\r\nNEXT"
    whole = _outcome([body], forbidden)
    pieces, last = [], 0
    for cut in sorted({c for c in cuts if c < len(body)}):
        pieces.append(body[last:cut])
        last = cut
    pieces.append(body[last:])
    assert _outcome(pieces, forbidden) == whole
    if len(body) <= 400:
        assert _outcome([bytes([b]) for b in body], forbidden) == whole


def test_every_bodiless_message_shares_one_framer_that_nothing_changes() -> None:
    """A GET (every WebSocket handshake) and a 204 get the one done framer: no allocation per request,
    and feeding it, whatever the bytes, leaves it done for the next message."""
    get = parse_request_head(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
    framer = request_framer(get)
    assert framer is request_framer(get)
    assert framer is response_framer(parse_response_head(b"HTTP/1.1 204 No Content\r\n\r\n"), request_method="GET")
    for data in (b"", b"0\r\n\r\n", AFTER, b"\r"):
        assert framer.feed(data) == 0 and framer.done and not framer.until_eof

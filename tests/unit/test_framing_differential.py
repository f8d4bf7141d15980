"""Differential test: a chunked request body our framer accepts, llhttp (Node's parser, via httptools) reads alike.

The balancer sends a backend the head and then exactly the body bytes `BodyFramer.feed` counts,
on a connection of its own (lb.proxy.connection opens one per request).  Were the backend's
parser to end that body earlier, the rest of what we sent would be a request we never routed
(request smuggling); later, and it would wait for bytes that never come.  So for every body our
request framer accepts after `HEAD`, llhttp must complete the message on the same byte, with
the same payload and the same trailer fields, and then read `NEXT` as the next request (target
`/next`, and no other).  Every body goes to both parsers whole and split into reads; our
framer must give the same answer either way.

What we accept is also read here by a reference reader: RFC 9112 §7.1 as written, plus the
leniencies below.  We may be stricter than llhttp (it takes chunk sizes of 16 hex digits and
more, and trailer fields we protect, such as Host); we must never accept what it ends elsewhere.

Differences accepted and bounded:

- Chunk extensions are read by RFC 9112 §7.1.1's grammar (`;` name [`=` token or quoted-string],
  up to MAX_CHUNK_LINE), BWS included, and blanks before the CRLF are let through (servers send
  `5 \\r\\n`); llhttp refuses both (`5 ;a`, `5; a`, `5;a = b`, `5  `) unless
  `lenient_spaces_after_chunk_size` is set.  No line we accept holds a CR, LF or NUL, so every
  parser ends it at the same CRLF or refuses it: the difference can refuse a body, never move its
  end.  llhttp must then refuse inside that size line, which is what is checked.  Whatever else
  the grammar refuses (`5;`, `5;a b`, `5;a="x`, `5;a=\\x80`), we refuse too.

llhttp reads a `Proxy-Connection` trailer field as `Connection` (as http_parser did), so
`Proxy-Connection: close` would make it refuse what follows the message: our request framer
refuses that trailer, as it refuses every hop-by-hop name and every name we set or frame by.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lb.http.framing import MAX_CHUNK_LINE, MAX_TRAILERS, request_framer
from lb.http.head import parse_request_head

httptools = pytest.importorskip("httptools", reason="httptools (llhttp) is the oracle: pip install -e '.[dev]'")

HEAD = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
NEXT = b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n"
REQUEST = parse_request_head(HEAD)

# RFC 9110 §5.6.2 token, §5.6.4 quoted-string, §5.5 field-value bytes.
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = rb'"(?:[\t \x21\x23-\x5b\x5d-\x7e\x80-\xff]|\\[\t \x21-\x7e\x80-\xff])*"'
_FIELD_BYTE = rb"[\t\x20-\x7e\x80-\xff]"
# RFC 9112 §7.1.1: chunk-size [ chunk-ext ] CRLF, chunk-ext = *( BWS ";" BWS name [ BWS "=" BWS value ] ).
_RFC_SIZE_LINE = re.compile(
    rb"[0-9A-Fa-f]+(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*\r\n" % (_TOKEN, _TOKEN, _QUOTED)
)
# The same without BWS: what llhttp reads with its default settings.
_STRICT_SIZE_LINE = re.compile(rb"[0-9A-Fa-f]+(?:;%s(?:=(?:%s|%s))?)*\r\n" % (_TOKEN, _TOKEN, _QUOTED))
# What we accept: the RFC's lines with at most 15 hex digits, blanks before the CRLF let through;
# MAX_CHUNK_LINE is not modelled.
_OUR_SIZE_LINE = re.compile(
    rb"([0-9A-Fa-f]{1,15})(?:[ \t]*;[ \t]*%s(?:[ \t]*=[ \t]*(?:%s|%s))?)*[ \t]*\r\n" % (_TOKEN, _TOKEN, _QUOTED)
)
# RFC 9112 §5, §7.1.2: field-name ":" OWS field-value OWS CRLF.
_FIELD_LINE = re.compile(rb"(%s):[ \t]*(%s*?)[ \t]*\r\n" % (_TOKEN, _FIELD_BYTE))


def _split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    """`data` cut at `cuts` (out-of-range cuts ignored), as reads."""
    bounds = [0, *sorted({cut for cut in cuts if 0 < cut < len(data)}), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def _our_end(pieces: Sequence[bytes]) -> int | str | None:
    """Where our request framer ends the body in the joined `pieces`: an offset, None, or "refused"."""
    framer = request_framer(REQUEST)
    offset = 0
    try:
        for piece in pieces:
            used = framer.feed(piece)
            if used is not None:
                return offset + used
            offset += len(piece)
    except ValueError:
        return "refused"
    return None


@dataclass
class _Reading:
    """A chunked body as the reference reader sees it."""

    end: int
    payload: bytes
    trailers: list[tuple[bytes, bytes]]
    size_lines: list[tuple[int, int]]  # [start, stop) of each chunk-size line, its CRLF included


def _read(body: bytes) -> _Reading | None:
    """`body` read by RFC 9112 §7.1 with our leniencies; None if it does not hold a whole chunked body."""
    at, payload, lines = 0, bytearray(), []
    while True:
        line = _OUR_SIZE_LINE.match(body, at)
        if line is None:
            return None
        lines.append((at, line.end()))
        size, at = int(line.group(1), 16), line.end()
        if not size:
            break
        if body[at + size : at + size + 2] != b"\r\n":
            return None
        payload += body[at : at + size]
        at += size + 2
    trailers = []
    while (field_line := _FIELD_LINE.match(body, at)) is not None:
        trailers.append((field_line.group(1), field_line.group(2)))
        at = field_line.end()
    if body[at : at + 2] != b"\r\n":
        return None
    return _Reading(at + 2, bytes(payload), trailers, lines)


@dataclass
class _Message:
    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    head_done: bool = False
    complete: bool = False


@dataclass
class _Recorder:
    """httptools callbacks, recorded per message; fields after the head are trailers."""

    messages: list[_Message] = field(default_factory=list)

    def on_message_begin(self) -> None:
        self.messages.append(_Message())

    def on_url(self, url: bytes) -> None:
        self.messages[-1].url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        message = self.messages[-1]
        (message.trailers if message.head_done else message.headers).append((name, value))

    def on_headers_complete(self) -> None:
        self.messages[-1].head_done = True

    def on_body(self, body: bytes) -> None:
        self.messages[-1].body += body

    def on_message_complete(self) -> None:
        self.messages[-1].complete = True


@dataclass
class _Llhttp:
    """What llhttp made of `HEAD` then some data, with offsets into that data."""

    messages: list[_Message]
    completed_in: int | None  # end of the read in which the first message completed
    error: str | None = None
    error_in: tuple[int, int] | None = None  # the read it raised in


def _llhttp(data: bytes, cuts: Iterable[int]) -> _Llhttp:
    """Feed llhttp `HEAD`, then `data` in reads cut at `cuts`."""
    recorder = _Recorder()
    parser = httptools.HttpRequestParser(recorder)
    parser.feed_data(HEAD)
    offset, completed_in = 0, None
    for piece in _split(data, cuts):
        try:
            parser.feed_data(piece)
        except httptools.HttpParserError as exc:
            return _Llhttp(recorder.messages, completed_in, str(exc), (offset, offset + len(piece)))
        offset += len(piece)
        if completed_in is None and recorder.messages[0].complete:
            completed_in = offset
    return _Llhttp(recorder.messages, completed_in)


def assert_llhttp_agrees(body: bytes, cuts: Iterable[int] = ()) -> None:
    """If our framer accepts `body` (then `NEXT`), whole and in reads cut at `cuts`, llhttp reads it alike."""
    cuts = list(cuts)
    data = body + NEXT
    ours = _our_end([data])
    assert _our_end(_split(data, cuts)) == ours, f"whole and split reads end apart: {body!r}"
    if not isinstance(ours, int):
        return
    accepted = data[:ours]
    reading = _read(accepted)
    assert reading is not None, f"we accept what RFC 9112 §7.1 and our leniencies do not: {accepted!r}"
    assert reading.end == len(accepted), f"we end the body at {ours}, the RFC at {reading.end}: {accepted!r}"
    end = len(accepted)
    theirs = _llhttp(accepted + NEXT, [*cuts, end - 1, end])
    if theirs.error is not None or theirs.completed_in != end:
        theirs = _llhttp(accepted + NEXT, range(len(accepted) + len(NEXT)))  # byte by byte: exact offsets
    ended = f"llhttp ends the body at {theirs.completed_in}, we at {end}: {accepted!r}"
    assert theirs.completed_in is None or theirs.completed_in >= end, ended  # the rest would be a request
    if theirs.error is not None:
        assert theirs.error_in is not None
        at = theirs.error_in[0]
        assert at < end, f"llhttp refuses the request after a body we accept ({theirs.error}): {accepted!r}"
        lines = [accepted[start:stop] for start, stop in reading.size_lines if start <= at < stop]
        assert lines, f"llhttp refuses byte {at} of a body we accept ({theirs.error}): {accepted!r}"
        # Only an extension outside the RFC's grammar, or the BWS it allows and llhttp does not.
        assert not _STRICT_SIZE_LINE.fullmatch(lines[0]), (
            f"llhttp refuses a size line its grammar allows ({theirs.error}): {accepted!r}"
        )
        return
    first = theirs.messages[0]
    assert theirs.completed_in == end, ended
    assert bytes(first.body) == reading.payload, f"llhttp reads another payload: {accepted!r}"
    assert first.headers == [(b"Host", b"a"), (b"Transfer-Encoding", b"chunked")]
    # llhttp keeps a value's trailing whitespace, which RFC 9112 §5 says is not part of it.
    trailers = [(name, value.strip(b" \t")) for name, value in first.trailers]
    assert trailers == reading.trailers, f"llhttp reads other trailer fields: {accepted!r}"
    assert [message.url for message in theirs.messages] == [b"/", b"/next"], f"not one next request: {accepted!r}"
    assert all(message.complete for message in theirs.messages)


def _cuts_everywhere(body: bytes) -> list[list[int]]:
    """Whole, byte by byte, and in two reads at every point (short bodies); a few reads otherwise."""
    size = len(body) + len(NEXT)
    if len(body) > 300:
        return [[], [1, 2, len(body) // 3, len(body) // 2, len(body) - 3, len(body) - 1]]
    return [[], list(range(1, size)), *([cut] for cut in range(1, size))]


def chunk(size_line: bytes, data: bytes = b"hello") -> bytes:
    """A chunk with `size_line` (CRLF added) and `data`, then the last chunk and no trailer."""
    return size_line + b"\r\n" + data + b"\r\n0\r\n\r\n"


_TRAILER_LINE = b"X-Checksum: " + b"a" * 50 + b"\r\n"

# Hostile bodies (PortSwigger's "HTTP Desync Attacks", RFC 9112 §11.2, the llhttp and
# Node advisories on chunk extensions, CVE-2024-22019): each is refused by us, or read by
# llhttp exactly as by us.
HOSTILE_BODIES = {
    # -- the last chunk
    "empty body": b"0\r\n\r\n",
    "last chunk 000": b"000\r\n\r\n",
    "last chunk with extension": b"0;a=b\r\n\r\n",
    "last chunk with whitespace": b"0 \r\n\r\n",
    "last chunk bare LF": b"0\n\r\n",
    "blank line bare LF": b"0\r\n\n",
    "blank line CR then junk": b"0\r\n\rX",
    "last chunk CR CR LF": b"0\r\r\n\r\n",
    "no blank line": b"0\r\n",
    "blank line twice": b"0\r\n\r\n\r\n",
    "blank line with a space": b"0\r\n \r\n",
    # -- chunk sizes
    "one chunk": chunk(b"5"),
    "leading zeros": chunk(b"0005"),
    "15 hex digits": chunk(b"000000000000005"),
    "16 hex digits": chunk(b"0000000000000005"),
    "16 f digits": b"ffffffffffffffff\r\n",
    "lower and upper hex": b"a\r\n0123456789\r\nA\r\n0123456789\r\n0\r\n\r\n",
    "0x prefix": chunk(b"0x5"),
    "plus sign": chunk(b"+5"),
    "minus sign": chunk(b"-5"),
    "space before the size": chunk(b" 5"),
    "no size": b"\r\nhello\r\n0\r\n\r\n",
    "size line of whitespace": chunk(b"5  "),
    "tab then line end": chunk(b"5\t"),
    "whitespace then junk": chunk(b"5 x"),
    "space between digits": chunk(b"5 5"),
    "CR without LF after size": b"5\rhello\r\n0\r\n\r\n",
    "bare LF after size": b"5\nhello\r\n0\r\n\r\n",
    "CR at a size line's start": b"5\r\nhello\r\n\r\n0\r\n\r\n",
    # -- extensions
    "space before ;": chunk(b"5 ;a"),
    "tab before ;": chunk(b"5\t;a"),
    "space after ;": chunk(b"5; a"),
    "spaces around =": chunk(b"5;a = b"),
    "empty extension": chunk(b"5;"),
    "extension without a name": chunk(b"5;=b"),
    "extension with an empty value": chunk(b"5;a="),
    "two extensions": chunk(b"5;a=b;c"),
    "space inside a name": chunk(b"5;a b"),
    "quoted value": chunk(b'5;a="b c"'),
    "quoted value holding ;": chunk(b'5;a="x;y"'),
    "quoted-pair": chunk(b'5;a="\\"x"'),
    "unterminated quote": chunk(b'5;a="x'),
    "quoted-pair before CRLF": chunk(b'5;a="\\'),
    "junk after a quoted value": chunk(b'5;a="b"c'),
    "obs-text quoted": chunk(b'5;a="\x80\xff"'),
    "obs-text in a token": chunk(b"5;a=\x80"),
    "quoted CR LF": b'5;a="\r\n"\r\nhello\r\n0\r\n\r\n',
    "bare CR in an extension": b"5;a\rb\r\nhello\r\n0\r\n\r\n",
    "bare LF in an extension": b"5;a\nb\r\nhello\r\n0\r\n\r\n",
    "NUL in an extension": chunk(b"5;a\x00"),
    "DEL in an extension": chunk(b"5;a\x7f"),
    "VT in an extension": chunk(b"5;a\x0bb"),
    # MAX_CHUNK_LINE is a size line's length without its CRLF.
    "extension at the limit": chunk(b"1;" + b"e" * (MAX_CHUNK_LINE - 2), b"x"),
    "extension past the limit": chunk(b"1;" + b"e" * (MAX_CHUNK_LINE - 1), b"x"),
    "quoted extension at the limit": chunk(b'1;q="' + b"v" * (MAX_CHUNK_LINE - 6) + b'"', b"x"),
    "whitespace at the limit": chunk(b"1" + b" " * (MAX_CHUNK_LINE - 3) + b";a", b"x"),
    # -- chunk data
    "data longer than the size": b"5\r\nhelloX\r\n0\r\n\r\n",
    "data shorter than the size": b"5\r\nhell\r\n0\r\n\r\n",
    "data holding CR LF": b"7\r\nhello\r\n\r\n0\r\n\r\n",
    "data holding a last chunk": b"a\r\n0\r\n\r\nGET /\r\n0\r\n\r\n",
    "data then CR and junk": b"5\r\nhello\rX",
    "data then bare LF": b"5\r\nhello\n0\r\n\r\n",
    "data without CRLF": b"5\r\nhello0\r\n\r\n",
    # -- trailers
    "trailer": b"0\r\nX: 1\r\n\r\n",
    "trailers": b"0\r\nA: 1\r\nB:\r\nC:  spaced \t\r\n\r\n",
    "obs-text trailer": b"0\r\nX: caf\xe9\r\n\r\n",
    "trailer with inner whitespace": b"0\r\nX: a \t b\r\n\r\n",
    "space before a trailer's colon": b"0\r\nX : 1\r\n\r\n",
    "tab before a trailer's colon": b"0\r\nX\t: 1\r\n\r\n",
    "obs-fold trailer": b"0\r\nX: 1\r\n  2\r\n\r\n",
    "trailer without a name": b"0\r\n: 1\r\n\r\n",
    "trailer name with (": b"0\r\nX(1): 1\r\n\r\n",
    "trailer name with /": b"0\r\nX/Y: 1\r\n\r\n",
    "obs-text trailer name": b"0\r\n\xff: 1\r\n\r\n",
    "trailer without a colon": b"0\r\nX\r\n\r\n",
    "bare CR in a trailer": b"0\r\nX: 1\r2\r\n\r\n",
    "bare LF in a trailer": b"0\r\nX: 1\n\r\n",
    "NUL in a trailer": b"0\r\nX: \x00\r\n\r\n",
    "DEL in a trailer": b"0\r\nX: \x7f\r\n\r\n",
    "Host trailer": b"0\r\nHost: evil\r\n\r\n",
    "Content-Length trailer": b"0\r\nContent-Length: 5\r\n\r\n",
    "Transfer-Encoding trailer": b"0\r\nTransfer-Encoding: chunked\r\n\r\n",
    "Connection trailer": b"0\r\nConnection: close\r\n\r\n",
    "Upgrade trailer": b"0\r\nUpgrade: websocket\r\n\r\n",
    "Proxy-Connection trailer": b"0\r\nProxy-Connection: close\r\n\r\n",
    "Keep-Alive trailer": b"0\r\nKeep-Alive: timeout=1\r\n\r\n",
    "X_Forwarded_For trailer": b"0\r\nX_Forwarded_For: 6.6.6.6\r\n\r\n",
    "Cookie trailer": b"0\r\nCookie: LB_AFFINITY=forged\r\n\r\n",
    "Sec-WebSocket-Key trailer": b"0\r\nSec-WebSocket-Key: AAAAAAAAAAAAAAAAAAAAAA==\r\n\r\n",
    "X-Forwarded-Anything trailer": b"0\r\nX-Forwarded-Anything: 1\r\n\r\n",
    "trailers at the limit": b"0\r\n" + _TRAILER_LINE * ((MAX_TRAILERS - 2) // len(_TRAILER_LINE)) + b"\r\n",
    "trailers past the limit": b"0\r\n" + _TRAILER_LINE * (MAX_TRAILERS // len(_TRAILER_LINE) + 1) + b"\r\n",
    "trailer line at the limit": b"0\r\nX: " + b"v" * (MAX_TRAILERS - 7) + b"\r\n\r\n",
    "trailer line past the limit": b"0\r\nX: " + b"v" * (MAX_TRAILERS - 6) + b"\r\n\r\n",
}


@pytest.mark.parametrize("body", HOSTILE_BODIES.values(), ids=HOSTILE_BODIES.keys())
def test_hostile_bodies_are_refused_or_read_alike(body: bytes) -> None:
    """Each hostile body is refused by us, or read by llhttp exactly as we read it, whole and in any reads."""
    for cuts in _cuts_everywhere(body):
        assert_llhttp_agrees(body, cuts)


def test_corpus_covers_accepted_refused_and_limits() -> None:
    """The corpus exercises every side: bodies we forward, bodies we refuse, each limit from both sides."""
    outcomes = {name: isinstance(_our_end([body + NEXT]), int) for name, body in HOSTILE_BODIES.items()}
    assert set(outcomes.values()) == {True, False}
    for limit in ("extension", "trailers", "trailer line"):
        assert outcomes[f"{limit} at the limit"] and not outcomes[f"{limit} past the limit"]


# Size lines we accept that llhttp refuses, and whether RFC 9112 §7.1.1 allows them (its BWS), or
# not (blanks before the CRLF, which servers send).
LLHTTP_REFUSES = {
    "BWS before ;": (b"5 ;a", True),
    "BWS after ;": (b"5; a", True),
    "BWS around =": (b"5;a = b", True),
    "whitespace before CRLF": (b"5  ", False),
    "whitespace after an extension": (b"5;a=b \t", False),
}
# Size lines outside the RFC's grammar: refused by us, however the body is split.
RFC_REFUSES = {
    "empty extension": b"5;",
    "no name": b"5;=b",
    "no value": b"5;a=",
    "space inside a name": b"5;a b",
    "unterminated quote": b'5;a="x',
    "quote with an escaped end": b'5;a="\\"',
    "obs-text in a token": b"5;a=\x80",
    "junk after a quoted value": b'5;a="b"c',
    "a quoted name": b'5;"a"',
    "empty last extension": b"5;a=b;",
}


@pytest.mark.parametrize(("line", "rfc_allows"), LLHTTP_REFUSES.values(), ids=LLHTTP_REFUSES.keys())
def test_size_lines_llhttp_refuses_are_bounded(line: bytes, rfc_allows: bool) -> None:
    """A size line we accept and llhttp refuses holds blanks (the RFC's BWS, or before the CRLF);
    llhttp refuses inside it."""
    assert bool(_RFC_SIZE_LINE.fullmatch(line + b"\r\n")) == rfc_allows
    body = chunk(line)
    assert _our_end([body + NEXT]) == len(body)
    assert_llhttp_agrees(body)


@pytest.mark.parametrize("line", RFC_REFUSES.values(), ids=RFC_REFUSES.keys())
def test_size_lines_outside_the_grammar_are_refused_whole_and_split(line: bytes) -> None:
    """An extension the RFC's grammar refuses is refused, in one read or byte by byte, before its line's CR
    goes on: a parser that read it otherwise (an unclosed quote past the CRLF) could end the chunk elsewhere."""
    assert not _RFC_SIZE_LINE.fullmatch(line + b"\r\n")
    body = chunk(line)
    assert _our_end([body + NEXT]) == "refused"
    assert _our_end([bytes([byte]) for byte in body + NEXT]) == "refused"
    assert _our_end([line, b"\r"]) == "refused"  # at its CR: no part of the line's end is passed on


# Extensions and trailers by kind: ones llhttp reads too, ones only we read (the module
# docstring's differences), ones we refuse.  A body draws from the first, the first two, or all.
_EXTENSIONS = {
    "strict": [b"", b";a", b";a=b", b';q="v;w"', b";x=1;y", b';a="\\"\x80"', b";" + b"e" * (MAX_CHUNK_LINE - 20)],
    "lenient": [b" ;a", b"\t;a", b"; a", b";a = b", b"  ", b";a=b\t"],
    "hostile": [b";\x7f", b";\x00", b";a\rb", b";a\nb", b" x", b"x", b";" + b"e" * MAX_CHUNK_LINE, b";",
                b";a b", b';a="x', b";a=\x80", b';a="b"c'],
}
_TRAILERS = {
    "strict": [b"X: 1\r\n", b"Checksum: a b\tc \r\n", b"E:\r\n", b"X: caf\xe9\r\n", b"Keep-Alive: 1\r\n",
               b"x-a:\t\"q\" \r\n"],
    "lenient": [b"Proxy-Connection: close\r\n"],
    "hostile": [b"Host: x\r\n", b"X_Forwarded_For: 1\r\n", b"Content-Length: 5\r\n", b"X-A : c\r\n", b" fold\r\n",
                b":x\r\n", b"A\r\n", b"A: b\rc\r\n", b"A: b\n", b"A:\x00\r\n"],
}
_KINDS = {"strict": ["strict"], "lenient": ["strict", "lenient"], "hostile": ["strict", "lenient", "hostile"]}
_PAYLOADS = st.binary(min_size=1, max_size=24) | st.sampled_from([b"\r\n", b"0\r\n\r\n", NEXT])
_HOSTILE_BYTES = st.sampled_from(
    [b"\r", b"\n", b"\r\n", b"\x00", b" ", b"\t", b";", b"=", b'"', b"\\", b":", b"0", b"f", b"\x7f", b"\x80",
     b"\r\n\r\n", b"0\r\n\r\n", b"X: 1\r\n"]
)


@st.composite
def chunked_bodies(draw: st.DrawFn) -> bytes:
    """Chunked bodies with padded sizes, extensions and trailers of a drawn kind; hostile ones also
    get up to two byte edits."""
    kind = draw(st.sampled_from(sorted(_KINDS)))
    extensions = st.sampled_from([line for k in _KINDS[kind] for line in _EXTENSIONS[k]])
    trailers = st.sampled_from([line for k in _KINDS[kind] for line in _TRAILERS[k]])
    parts = []
    for payload in draw(st.lists(_PAYLOADS, max_size=5)):
        size = f"{len(payload):x}".encode()
        if draw(st.booleans()):
            size = size.upper()
        parts.append(b"0" * draw(st.integers(0, 15)) + size + draw(extensions) + b"\r\n" + payload + b"\r\n")
    parts.append(b"0" * draw(st.integers(1, 3)) + draw(extensions) + b"\r\n")
    parts.extend(draw(st.lists(trailers, max_size=3)))
    parts.append(b"\r\n")
    body = bytearray(b"".join(parts))
    for _ in range(draw(st.integers(0, 2)) if kind == "hostile" else 0):
        at = draw(st.integers(0, len(body)))
        edit = draw(st.sampled_from(["insert", "replace", "delete"]))
        if edit == "delete":
            del body[at : at + 1]
        else:
            body[at : at + (edit == "replace")] = draw(_HOSTILE_BYTES)
    return bytes(body)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=chunked_bodies(), cuts=st.lists(st.integers(1, 200), max_size=6))
@example(body=b"5;a=b\r\nhello\r\n0\r\nX: 1\r\n\r\n", cuts=[3, 9])
@example(body=b"0\r\nProxy-Connection: close\r\n\r\n", cuts=[])
def test_generated_bodies_are_refused_or_read_alike(body: bytes, cuts: list[int]) -> None:
    """Generated chunked bodies, valid and hostile, are refused by us or read by llhttp exactly as we read them."""
    assert_llhttp_agrees(body, cuts)


_ARBITRARY = st.binary(max_size=40) | st.lists(
    st.sampled_from([b"0", b"5", b"a", b"F", b";", b"=", b'"', b"\\", b" ", b"\t", b"\r", b"\n", b"\r\n", b"\x00",
                     b"\x80", b"\x7f", b":", b"X", b"hello"]),
    max_size=20,
).map(b"".join)
# Where the arbitrary bytes go: each position's framing around them.
_PLACES = {
    "whole body": lambda raw: raw,
    "after the size": lambda raw: b"5" + raw + b"\r\nhello\r\n0\r\n\r\n",
    "extension": lambda raw: b"5;" + raw + b"\r\nhello\r\n0\r\n\r\n",
    "chunk data": lambda raw: b"%x\r\n%s\r\n0\r\n\r\n" % (len(raw), raw),
    "after the data": lambda raw: b"5\r\nhello" + raw + b"0\r\n\r\n",
    "trailer section": lambda raw: b"0\r\n" + raw + b"\r\n",
    "trailer value": lambda raw: b"0\r\nX:" + raw + b"\r\n\r\n",
}


@settings(max_examples=400, deadline=None)
@given(place=st.sampled_from(sorted(_PLACES)), raw=_ARBITRARY, cuts=st.lists(st.integers(1, 120), max_size=6))
@example(place="chunk data", raw=b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n\r\n", cuts=[])
def test_arbitrary_bytes_are_refused_or_read_alike(place: str, raw: bytes, cuts: list[int]) -> None:
    """Arbitrary bytes anywhere in a chunked body: refused by us, or read alike by llhttp."""
    assert_llhttp_agrees(_PLACES[place](raw), cuts)

"""Differential test: whatever our head parser accepts, llhttp (Node's parser, via httptools) reads the same way.

Two parsers that disagree about a request are how smuggling works: the balancer
routes one request, the backend reads two.  So for every head we accept, llhttp
must see the same method, target, header fields and body length (or the same
head end, for an upgrade, after which both hand the bytes over).  We may be
stricter than llhttp (it accepts `Transfer-Encoding` on HTTP/1.0, for one); we
must never accept what it reads differently.

What we change on purpose is accounted for: an absolute-form target is
compared as received (we rewrite it to origin-form and set Host from it), and
header names we drop as `_` aliases of ours are left out of llhttp's list.
A higher minor version (`HTTP/1.2`, which llhttp refuses) we read as HTTP/1.1
and send on as such (RFC 9110 §2.5), and Transfer-Encoding's empty list
elements (`chunked,`, which llhttp refuses) we ignore and send on without
(RFC 9110 §5.6.1.2): llhttp is given those lines as we send them.
llhttp keeps trailing whitespace in a value, which RFC 9112 §5 says is not
part of it, so its values are compared stripped.

One divergence is accepted and bounded: llhttp knows a fixed list of methods,
while RFC 9110 §9.1 lets a method be any token and a proxy forward it (HAProxy
does).  Request framing does not depend on the method (RFC 9112 §6.3), so for
a method llhttp does not know, the same bytes with `POST` in its place are
compared instead: everything that frames the request is still checked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from lb.errors import RequestRejected
from lb.http.head import HEAD_END, RequestHead, parse_request_head

httptools = pytest.importorskip("httptools", reason="httptools (llhttp) is the oracle: pip install -e '.[dev]'")


@dataclass
class _Recorder:
    """httptools callbacks, recorded."""

    url: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: int = 0
    complete: bool = False

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body += len(body)

    def on_message_complete(self) -> None:
        self.complete = True


def _body_for(request: RequestHead) -> tuple[bytes, int]:
    """A body matching the request's framing, and its payload length."""
    if request.chunked:
        return b"5\r\nhello\r\n3\r\nabc\r\n0\r\n\r\n", 8
    length = request.content_length or 0
    return b"x" * length, length


def _llhttp(raw: bytes) -> tuple[_Recorder, object, int | None]:
    """Feed `raw` to llhttp: what it recorded, the parser, and the offset of an upgrade (or None)."""
    recorder = _Recorder()
    parser = httptools.HttpRequestParser(recorder)
    try:
        parser.feed_data(raw)
    except httptools.HttpParserUpgrade as upgrade:
        return recorder, parser, upgrade.args[0]
    return recorder, parser, None


def assert_llhttp_agrees(raw: bytes) -> None:
    """If we accept `raw` (a head), llhttp parses it, with a body of the length we read, the same way."""
    try:
        ours = parse_request_head(raw)
    except RequestRejected:
        return
    body, payload = _body_for(ours)
    method = ours.method
    raw = _as_sent_on(raw, ours)
    fed = raw
    try:
        try:
            recorder, parser, upgraded_at = _llhttp(raw + body)
        except httptools.HttpParserInvalidMethodError:
            # See the module docstring: same bytes, a method llhttp knows.
            method = "POST"
            fed = b"POST" + raw[len(ours.method) :]
            recorder, parser, upgraded_at = _llhttp(fed + body)
    except httptools.HttpParserError as exc:  # pragma: no cover - the failure this test exists for
        pytest.fail(f"we accept a head llhttp refuses ({exc}): {raw!r}")
    assert parser.get_method().decode("ascii") == method  # type: ignore[attr-defined]
    assert parser.get_http_version() == ours.version.removeprefix("HTTP/")  # type: ignore[attr-defined]
    assert recorder.url.decode("latin-1") == (ours.absolute_target or ours.target)
    theirs = [
        (name.decode("latin-1"), value.decode("latin-1").strip(" \t"))
        for name, value in recorder.headers
        if name.decode("latin-1") not in ours.dropped
    ]
    mine = list(ours.head.headers)
    if ours.absolute_target is not None:  # Host is ours to set from the target: compare the rest
        theirs = [pair for pair in theirs if pair[0].lower() != "host"]
        mine = [pair for pair in mine if pair[0].lower() != "host"]
    assert mine == theirs
    if upgraded_at is not None:
        # llhttp hands over right after the head, as we do after the 101.
        assert upgraded_at == len(fed)
    else:
        assert recorder.complete, f"llhttp did not find the end of the message: {raw!r}"
        assert recorder.body == payload


def _as_sent_on(raw: bytes, ours: RequestHead) -> bytes:
    """`raw` with the changes we make on purpose to the lines a backend reads: the version we send on
    (HTTP/1.2 goes as HTTP/1.1) and Transfer-Encoding lines without their empty list elements, and without
    the whitespace around the value, as every value is sent (llhttp refuses a tab after `chunked`, which
    no backend of ours receives)."""
    start, *fields = raw[: -len(HEAD_END)].split(b"\r\n")
    if not start.endswith(ours.version.encode()):
        start = start[: -len(ours.version)] + ours.version.encode()
    lines = [start]
    for line in fields:
        name, _, value = line.partition(b":")
        elements = [part.strip(b" \t") for part in value.split(b",")]
        if name.lower() == b"transfer-encoding" and b"" in elements:
            if not any(elements):
                continue
            line = name + b": " + b", ".join(element for element in elements if element)
        elif name.lower() == b"transfer-encoding":
            line = name + b": " + value.strip(b" \t")
        lines.append(line)
    return b"\r\n".join(lines) + HEAD_END


def head(*lines: bytes, start: bytes = b"GET / HTTP/1.1") -> bytes:
    return b"\r\n".join([start, *lines]) + HEAD_END


# Hostile heads from smuggling write-ups (PortSwigger, "HTTP Desync Attacks"; RFC 9112 §11.2) and
# from our own rejection table: each must be refused, or read by llhttp exactly as by us.
HOSTILE_CORPUS = {
    "plain upgrade": head(
        b"Host: a",
        b"Upgrade: websocket",
        b"Connection: Upgrade",
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
        b"Sec-WebSocket-Version: 13",
    ),
    "post with length": head(b"Host: a", b"Content-Length: 11", start=b"POST /x HTTP/1.1"),
    "post chunked": head(b"Host: a", b"Transfer-Encoding: chunked", start=b"POST /x HTTP/1.1"),
    "CL.TE": head(b"Host: a", b"Content-Length: 6", b"Transfer-Encoding: chunked", start=b"POST / HTTP/1.1"),
    "TE.CL": head(b"Host: a", b"Transfer-Encoding: chunked", b"Content-Length: 3", start=b"POST / HTTP/1.1"),
    "TE space before colon": head(b"Host: a", b"Transfer-Encoding : chunked", start=b"POST / HTTP/1.1"),
    "TE tab value": head(b"Host: a", b"Transfer-Encoding:\tchunked", start=b"POST / HTTP/1.1"),
    "TE tab after": head(b"Host: a", b"Transfer-Encoding: chunked\t", start=b"POST / HTTP/1.1"),  # hypothesis's
    "TE xchunked": head(b"Host: a", b"Transfer-Encoding: xchunked", start=b"POST / HTTP/1.1"),
    "TE chunked-false": head(b"Host: a", b"Transfer-Encoding: chunked-false", start=b"POST / HTTP/1.1"),
    "TE quoted": head(b"Host: a", b'Transfer-Encoding: "chunked"', start=b"POST / HTTP/1.1"),
    "TE obs-fold": head(b"Host: a", b"Transfer-Encoding:", b" chunked", start=b"POST / HTTP/1.1"),
    "TE identity, chunked": head(b"Host: a", b"Transfer-Encoding: identity, chunked", start=b"POST / HTTP/1.1"),
    "TE chunked twice": head(b"Host: a", b"Transfer-Encoding: chunked, chunked", start=b"POST / HTTP/1.1"),
    "TE empty element first": head(b"Host: a", b"Transfer-Encoding: ,chunked", start=b"POST / HTTP/1.1"),
    "TE empty element last": head(b"Host: a", b"Transfer-Encoding: chunked, ,", start=b"POST / HTTP/1.1"),
    "TE empty line": head(b"Host: a", b"Transfer-Encoding:", b"Transfer-Encoding: chunked", start=b"POST / HTTP/1.1"),
    "TE on 1.0": head(b"Transfer-Encoding: chunked", start=b"POST / HTTP/1.0"),
    "TE CHUNKED upper": head(b"Host: a", b"Transfer-Encoding: CHUNKED", start=b"POST / HTTP/1.1"),
    "TE with NUL": head(b"Host: a", b"Transfer-Encoding: chunked\x00", start=b"POST / HTTP/1.1"),
    "TE vertical tab": head(b"Host: a", b"Transfer-Encoding:\x0bchunked", start=b"POST / HTTP/1.1"),
    "CL equal twice": head(b"Host: a", b"Content-Length: 3", b"Content-Length: 3", start=b"POST / HTTP/1.1"),
    "CL list": head(b"Host: a", b"Content-Length: 3, 3", start=b"POST / HTTP/1.1"),
    "CL plus": head(b"Host: a", b"Content-Length: +3", start=b"POST / HTTP/1.1"),
    "CL leading zeros": head(b"Host: a", b"Content-Length: 0003", start=b"POST / HTTP/1.1"),
    "CL trailing space": head(b"Host: a", b"Content-Length: 3 ", start=b"POST / HTTP/1.1"),
    "CL huge": head(b"Host: a", b"Content-Length: 18446744073709551616", start=b"POST / HTTP/1.1"),
    "CL on GET": head(b"Host: a", b"Content-Length: 4"),
    "CL on upgrade": head(b"Host: a", b"Upgrade: websocket", b"Connection: Upgrade", b"Content-Length: 4"),
    "bare LF": b"GET / HTTP/1.1\nHost: a\n\n",
    "bare CR": head(b"Host: a", b"X: 1\r2"),
    "NUL in value": head(b"Host: a", b"X: a\x00b"),
    "obs-text value": head(b"Host: a", b"X: caf\xe9"),
    "empty value": head(b"Host: a", b"X:"),
    "value with inner spaces": head(b"Host: a", b"X:  a  b \t"),
    "two Host": head(b"Host: a", b"Host: b"),
    "two Host 1.0": head(b"Host: a", b"Host: b", start=b"GET / HTTP/1.0"),
    "absolute-form": head(b"Host: a.example", start=b"GET http://a.example/x?y HTTP/1.1"),
    "absolute-form other host": head(b"Host: a.example", start=b"GET http://b.example/x HTTP/1.1"),
    "absolute-form userinfo": head(b"Host: b.example", start=b"GET http://a.example@b.example/ HTTP/1.1"),
    "absolute-form no path": head(b"Host: a.example", start=b"GET http://a.example HTTP/1.1"),
    "XFF alias": head(b"Host: a", b"X_Forwarded_For: 6.6.6.6", b"X-Forwarded-For: 1.1.1.1"),
    "CL alias": head(b"Host: a", b"Content_Length: 5", b"Transfer-Encoding: chunked", start=b"POST / HTTP/1.1"),
    "fragment": head(b"Host: a", start=b"GET /a#b HTTP/1.1"),
    "percent and query": head(b"Host: a", start=b"GET /%2e%2e/?a=%00&b=/c HTTP/1.1"),
    "OPTIONS *": head(b"Host: a", start=b"OPTIONS * HTTP/1.1"),
    "CONNECT authority": head(b"Host: a:443", start=b"CONNECT a:443 HTTP/1.1"),
    "HTTP/1.0 keep-alive": head(b"Connection: keep-alive", start=b"GET / HTTP/1.0"),
    "lower-case method": head(b"Host: a", start=b"get / HTTP/1.1"),
    "custom method": head(b"Host: a", start=b"PURGE / HTTP/1.1"),
    "unknown token method": head(b"Host: a", start=b"FOO-BAR / HTTP/1.1"),
    "space in target": head(b"Host: a", start=b"GET /a b HTTP/1.1"),
    "HTTP/1.2": head(b"Host: a", start=b"GET / HTTP/1.2"),
    "tab in request line": head(b"Host: a", start=b"GET\t/ HTTP/1.1"),
    "header name with space": head(b"Host: a", b"X Y: 1"),
    "header name with slash": head(b"Host: a", b"X/Y: 1"),
    "Connection: upgrade without Upgrade": head(b"Host: a", b"Connection: upgrade"),
    "Upgrade without Connection": head(b"Host: a", b"Upgrade: websocket"),
    "Expect 100-continue": head(b"Host: a", b"Expect: 100-continue", b"Content-Length: 2", start=b"PUT / HTTP/1.1"),
}


@pytest.mark.parametrize("raw", HOSTILE_CORPUS.values(), ids=HOSTILE_CORPUS.keys())
def test_hostile_corpus_is_refused_or_read_alike(raw: bytes) -> None:
    """Each hostile head is refused by us, or read by llhttp exactly as we read it."""
    assert_llhttp_agrees(raw)


def test_corpus_covers_accepted_and_refused_heads() -> None:
    """The corpus exercises both sides: some heads we forward, some we refuse."""
    outcomes = set()
    for raw in HOSTILE_CORPUS.values():
        try:
            parse_request_head(raw)
            outcomes.add("accepted")
        except RequestRejected:
            outcomes.add("refused")
    assert outcomes == {"accepted", "refused"}


_METHODS = st.sampled_from([b"GET", b"POST", b"PUT", b"OPTIONS", b"DELETE", b"PATCH", b"HEAD", b"get", b"X"])
_TARGET_CHARS = st.sampled_from(list(b"abc/?=&%#;:@!$'()*+,-._~09\x80\xff"))
_TARGETS = st.one_of(
    st.lists(_TARGET_CHARS, max_size=20).map(lambda chars: b"/" + bytes(chars)),
    st.sampled_from([b"*", b"http://a.example/x", b"http://a.example", b"https://a.example:443/p?q", b"/"]),
)
_NAMES = st.sampled_from(
    [
        b"Host",
        b"host",
        b"Content-Length",
        b"Transfer-Encoding",
        b"Connection",
        b"Upgrade",
        b"X-Forwarded-For",
        b"X_Forwarded_For",
        b"X_Real_IP",
        b"Content_Length",
        b"Cookie",
        b"X-A",
        b"x_app",
        b"!#$%&'*+-.^_`|~",
    ]
)
_VALUES = st.one_of(
    st.sampled_from(
        [
            b"a.example",
            b"0",
            b"5",
            b"5, 5",
            b"chunked",
            b"gzip, chunked",
            b", chunked",
            b"chunked,",
            b"identity",
            b"Upgrade",
            b"websocket",
            b"",
            b" padded\t",
            b"a=1; b=2",
            b"caf\xe9",
        ]
    ),
    st.binary(max_size=12),
)


# Field lines we accept together: any of these, and at most one that frames a body.
_ORDINARY = [
    (b"Accept", b"*/*"),
    (b"User-Agent", b"probe/1.0"),
    (b"Sec-WebSocket-Key", b"dGhlIHNhbXBsZSBub25jZQ=="),
    (b"Sec-WebSocket-Version", b"13"),
    (b"Connection", b"Upgrade"),
    (b"Connection", b"keep-alive"),
    (b"Upgrade", b"websocket"),
    (b"Cookie", b"a=1; b=2"),
    (b"X-Forwarded-For", b"192.0.2.1"),
    (b"X-A", b" padded\t"),
    (b"x_app", b"caf\xe9"),
    (b"!#$%&'*+-.^_`|~", b""),
]
_FRAMING = [None, (b"Content-Length", b"5"), (b"Content-Length", b"0"), (b"Transfer-Encoding", b"chunked")]
# Fields we read (all but `gzip, chunked`, refused 501, accept on their own): whether the head is accepted
# turns on how they combine.
_FITTING = st.sampled_from([*_ORDINARY, *_FRAMING[1:], (b"Transfer-Encoding", b"gzip, chunked")])
_UPGRADE = [(b"Connection", b"Upgrade"), (b"Upgrade", b"websocket")]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=_METHODS,
    target=_TARGETS,
    version=st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]),
    headers=st.lists(_FITTING, max_size=4).map(lambda fields: [*fields, *_UPGRADE])
    | st.lists(_FITTING, max_size=6)
    | st.lists(st.tuples(_NAMES, _VALUES), max_size=8),
    with_host=st.sampled_from([True, True, True, False]),
)
@example(method=b"GET", target=b"/", version=b"HTTP/1.1", headers=[(b"Content-Length", b"5")], with_host=True)
@example(method=b"POST", target=b"/", version=b"HTTP/1.1", headers=[(b"Transfer-Encoding", b"chunked")], with_host=True)
def test_generated_heads_are_refused_or_read_alike(
    method: bytes, target: bytes, version: bytes, headers: list[tuple[bytes, bytes]], with_host: bool
) -> None:
    """Generated heads, valid and near-valid, are refused by us or read by llhttp exactly as we read them."""
    lines = [b"Host: a.example"] if with_host else []
    lines.extend(name + b": " + value for name, value in headers)
    assert_llhttp_agrees(head(*lines, start=b" ".join([method, target, version])))


# Pieces of field lines for the fields after Host, and the bytes the line rules turn on.
_FIELD_PIECES = st.sampled_from(
    [b"X", b"a", b"5", b"_", b":", b": ", b" ", b"\t", b",", b"\x80", b"\r\nX: ", b"\r\nContent-Length: ",
     b"\r\nTransfer-Encoding: ", b"chunked", b"\r\nConnection: Upgrade\r\nUpgrade: websocket", b"\r\nHost: "]
)
_LINE_BREAKERS = st.sampled_from([b"\r", b"\n", b"\r\n", b"\r\n ", b"\x00", b"\x7f", b"\r\n\r\n"])




@st.composite
def _fields_with_one_change(draw: st.DrawFn) -> bytes:
    """Field lines we accept, then at most one hostile change: bytes the line rules turn on put in, put in
    place of others, or bytes taken out, anywhere (in a name, a value, the line ends)."""
    fields = draw(st.lists(st.sampled_from(_ORDINARY), min_size=1, max_size=4))
    framing = draw(st.sampled_from(_FRAMING))
    if framing is not None:
        fields.insert(draw(st.integers(0, len(fields))), framing)
    raw = b"\r\n".join(name + b": " + value for name, value in fields)
    change = draw(st.sampled_from(["none", "insert", "replace", "delete"]))
    if change == "none":
        return raw
    at = draw(st.integers(0, len(raw)))
    if change == "delete":
        return raw[:at] + raw[at + draw(st.integers(1, 3)) :]
    piece = draw(_FIELD_PIECES | _LINE_BREAKERS | st.binary(min_size=1, max_size=3))
    return raw[:at] + piece + raw[at + (len(piece) if change == "replace" else 0) :]


# Random bytes and random pieces are almost all refused (the comparison with llhttp was reached in 17% of
# examples): five in eight examples are fields we accept with at most one hostile change.
_RAW_KINDS = [
    _fields_with_one_change(),
    st.binary(max_size=200),
    st.lists(_FIELD_PIECES | _LINE_BREAKERS, max_size=16).map(b"".join),
    st.lists(_FIELD_PIECES, max_size=16).map(lambda pieces: b"X: " + b"".join(pieces)),
]


@settings(max_examples=300, deadline=None)
@given(raw=st.sampled_from([0, 0, 0, 0, 0, 1, 2, 3]).flatmap(lambda kind: _RAW_KINDS[kind]))
def test_arbitrary_bytes_are_refused_or_read_alike(raw: bytes) -> None:
    """Arbitrary bytes ending in a blank line: refused by us, or read alike by llhttp."""
    assert_llhttp_agrees(b"GET / HTTP/1.1\r\nHost: a\r\n" + raw + HEAD_END)

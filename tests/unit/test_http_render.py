"""Differential test: lb.http._render (C) writes a head exactly as lb.http.head's Python rendering does.

The C pass handles exactly-str pieces of one byte per character in an exact list or tuple of exact
(name, value) tuples, and answers None for anything else, which the Python rendering then writes
(or refuses: a character past latin-1 is a UnicodeEncodeError).
"""

from __future__ import annotations

import enum
import os
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import pure_python_requested
from lb.http import head as current

NOT_BUILT = "lb/http/_render.c is not built (make native needs a C compiler)"
render = pytest.importorskip("lb.http._render", reason=NOT_BUILT)

_latin1 = st.text(st.characters(max_codepoint=0xFF), max_size=40)
_any = st.text(max_size=20)
_pair = st.tuples(_latin1, _latin1) | st.tuples(_any, _any)


def _python(start: str, fields: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> bytes | type[Exception]:
    try:
        return current._render_in_python(start, fields)
    except UnicodeEncodeError:
        return UnicodeEncodeError


def _rendered(start: str, fields: list[tuple[str, str]] | tuple[tuple[str, str], ...]) -> bytes | type[Exception]:
    try:
        return current.render_head(start, fields)
    except UnicodeEncodeError:
        return UnicodeEncodeError


@settings(max_examples=1200, deadline=None)
@given(start=_latin1 | _any, fields=st.lists(_pair, max_size=12), as_tuple=st.booleans())
def test_any_head_renders_alike(start: str, fields: list[tuple[str, str]], as_tuple: bool) -> None:
    given_fields = tuple(fields) if as_tuple else fields
    expected = _python(start, given_fields)
    assert _rendered(start, given_fields) == expected
    fast = render.render_head(start, given_fields)
    assert fast is None or fast == expected
    if all(max(map(ord, piece), default=0) < 256 for piece in (start, *(p for pair in fields for p in pair))):
        assert fast == expected  # every latin-1 head is the C pass's


def test_a_real_handshake_head_is_the_c_pass_s() -> None:
    fields = [("Host", "lb.example"), ("Upgrade", "websocket"), ("Connection", "Upgrade"), ("X-Name", "caf\xe9")]
    expected = (b"GET /ws HTTP/1.1\r\nHost: lb.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"X-Name: caf\xe9\r\n\r\n")
    assert render.render_head("GET /ws HTTP/1.1", fields) == expected
    assert render.render_head("HTTP/1.1 204 ", []) == b"HTTP/1.1 204 \r\n\r\n"


class _Name(str, enum.Enum):  # noqa: UP042 - a mixed-in str Enum formats as `_Name.HOST`, not its value
    HOST = "Host"


class _Pair(tuple[str, str]):
    pass


@pytest.mark.parametrize(
    ("start", "fields"),
    [
        ("GET / HTTP/1.1", [("Host", "\u0100")]),         # past latin-1: Python raises
        ("GET / \u20ac HTTP/1.1", []),
        ("GET / HTTP/1.1", [(_Name.HOST, "h")]),           # a str subclass may format otherwise
        ("GET / HTTP/1.1", [_Pair(("Host", "h"))]),        # a tuple subclass
        ("GET / HTTP/1.1", [("Host", "h", "x")]),          # not a pair
        ("GET / HTTP/1.1", [("Host", 1)]),                 # not a str
        ("GET / HTTP/1.1", iter([("Host", "h")])),         # not a list or tuple
        (b"GET / HTTP/1.1", []),                           # not a str
    ],
)
def test_anything_else_is_left_to_python(start: object, fields: object) -> None:
    assert render.render_head(start, fields) is None


def test_the_c_pass_is_used_when_built_and_set_aside_by_lb_pure_python() -> None:
    if pure_python_requested():
        pytest.skip("LB_PURE_PYTHON=1: the Python rendering runs")
    assert current._RENDER is render.render_head
    with pytest.raises(TypeError):
        render.render_head("x")  # type: ignore[call-arg]
    probe = "import lb.http.head as h; print(h._RENDER is None)"
    env = {**os.environ, "LB_PURE_PYTHON": "1"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True", done.stderr


# -- forward_request: the forwarded request, its client's fields filtered as they are copied ---------------

# Names as clients spell them: known to lb.http._scan in any case, unknown ones, and ones not ASCII
# (never a token: the C pass leaves those to Python).
_names = st.sampled_from([
    "Host", "host", "Cookie", "cookie", "COOKIE", "Connection", "Upgrade", "X-Forwarded-For", "x-forwarded-for",
    "Sec-WebSocket-Key", "User-Agent", "Keep-Alive", "TE", "X-Real-IP", "X-Custom", "x-custom", "X-CUSTOM", "A",
    "\xd1ame", "Na\u0100e",
]) | st.from_regex(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,12}", fullmatch=True)
_values = st.text(st.characters(max_codepoint=0xFF, exclude_categories=["Cs"]), max_size=20) | st.just("caf\u0100")
_dropped = st.frozensets(st.sampled_from([
    "host", "cookie", "connection", "upgrade", "x-forwarded-for", "keep-alive", "te", "x-real-ip", "x-custom", "a",
    "user-agent", "\xf1ame",
]))


def _rewrites(kind: int) -> object:
    """None, or a Cookie rewrite: dropping every value, appending to it, or giving one past latin-1."""
    return [None, lambda value: None, lambda value: value + "; b=1", lambda value: "x\u0100",
            lambda value: value if "=" in value else None][kind]


@settings(max_examples=1500, deadline=None)
@given(
    method=st.sampled_from(["GET", "POST", "M\xe9", "G\u0100T"]),
    target=st.sampled_from(["/", "/ws?x=1", "/caf\xe9"]),
    version=st.sampled_from(["HTTP/1.1", "HTTP/1.0"]),
    fields=st.lists(st.tuples(_names, _values), max_size=70),
    dropped=_dropped,
    rewrite=st.integers(0, 4),
    added=st.lists(st.tuples(st.sampled_from(["X-Forwarded-For", "Host"]), _values), max_size=4),
    websocket=st.booleans(),
)
def test_the_c_forwarded_request_is_the_python_one(
    method: str, target: str, version: str, fields: list[tuple[str, str]], dropped: frozenset[str], rewrite: int,
    added: list[tuple[str, str]], websocket: bool,
) -> None:
    """Whatever lb.http._render.forward_request writes, lb.http.forwarding.forwarded_in_python writes the same
    bytes; it leaves to Python only what is not one byte a character or a name not ASCII."""
    from lb.http import forwarding

    rewrite_cookie = _rewrites(rewrite)
    tail = forwarding._UPGRADE_FIELDS if websocket else forwarding._CLOSE_FIELDS
    headers, added_pairs = tuple(fields), tuple(added)
    fast = render.forward_request(method, target, version, headers, dropped, current.KNOWN_LOWERED, rewrite_cookie,
                                  added_pairs, tail)
    try:
        expected: bytes | type[Exception] = forwarding.forwarded_in_python(
            method, target, version, headers, dropped, rewrite_cookie, None, added_pairs, tail)
    except UnicodeEncodeError:
        expected = UnicodeEncodeError
    assert fast is None or fast == expected
    pieces = [method, target, *(piece for pair in (*fields, *added) for piece in pair)]
    if all(max(map(ord, piece), default=0) < 256 for piece in pieces) and all(name.isascii() for name, _ in fields) \
            and rewrite != 3:
        assert fast == expected  # every such head is the C pass's


def test_the_c_forwarded_request_of_a_handshake() -> None:
    fields = (("Host", "lb.example"), ("Upgrade", "websocket"), ("Connection", "Upgrade"),
              ("Cookie", "a=1; lb=T"), ("X-Forwarded-For", "6.6.6.6"), ("Sec-WebSocket-Key", "k"))
    dropped = frozenset({"connection", "upgrade", "x-forwarded-for"})
    rendered = render.forward_request("GET", "/ws", "HTTP/1.1", fields, dropped, current.KNOWN_LOWERED,
                                      lambda value: "a=1", [("X-Forwarded-For", "127.0.0.9")],
                                      (("Connection", "Upgrade"), ("Upgrade", "websocket")))
    assert rendered == (b"GET /ws HTTP/1.1\r\nHost: lb.example\r\nCookie: a=1\r\nSec-WebSocket-Key: k\r\n"
                        b"X-Forwarded-For: 127.0.0.9\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")


class _DropsAll(frozenset[str]):
    def __contains__(self, name: object) -> bool:
        return True


class _ClearsOnCompare:
    """A name in `dropped` whose comparison empties the fields being read (a lookup runs Python)."""

    def __init__(self, name: str, fields: list[tuple[str, str]]) -> None:
        self.name, self.fields = name, fields

    def __hash__(self) -> int:
        return hash(self.name)

    def __eq__(self, other: object) -> bool:
        self.fields.clear()
        return False


def test_forward_request_leaves_what_it_cannot_read_as_python_would_to_python() -> None:
    """A set whose `in` is its own, a table of lower-case names that are not str: None (Python renders);
    a field list emptied by a comparison while it is read: the fields it had, each held while read."""
    fields = [("A", "b")]
    assert render.forward_request("GET", "/", "HTTP/1.1", fields, _DropsAll(), current.KNOWN_LOWERED, None, [],
                                  ()) is None
    assert render.forward_request("GET", "/", "HTTP/1.1", fields, frozenset(), {"A": 1}, lambda v: v, [],
                                  ()) is None
    hostile = [("X-" + "ab", "v" + "1"), ("Y", "2")]
    dropped = frozenset({_ClearsOnCompare("x-ab", hostile)})
    rendered = render.forward_request("GET", "/", "HTTP/1.1", hostile, dropped, {}, None, [], ())
    assert rendered is None or rendered.startswith(b"GET / HTTP/1.1\r\nX-ab: v1\r\n")

"""Differential test: lb.http._scan (C) reads a head exactly as lb.http.head's regex reading does.

`parse_request_head` and `parse_response_head` take the C reading when it is built and the regex
one (`_read_well_formed`, then `_head`) when it is not; both hand a head with any fault to the
same per-line checks.  So the two must agree on every input: the same start line, fields and
index (its key order too), the same str type for every piece, and None for the same heads.
test_http_head_reference.py holds the whole parse, C reading included, to the frozen reference.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_http_head_reference import (
    _FUZZ,
    _LISTED_REQUEST_LINES,
    _LISTED_STATUS_LINES,
    _REQUEST_LINES,
    _STATUS_LINES,
    _WEBSOCKET_REQUEST,
    _WEBSOCKET_RESPONSE,
    _WELL_FORMED_REQUEST_LINES,
    _WELL_FORMED_STATUS_LINES,
    _head,
    _near_valid,
    _well_formed,
)

from lb import pure_python_requested
from lb.http import head as current

scan = pytest.importorskip("lb.http._scan", reason="lb/http/_scan.c is not built (make native needs a C compiler)")


def regex_reading(raw: bytes, request: bool) -> object:
    text = raw.decode("latin-1")
    read = current._read_well_formed(text, current._REQUEST_LINE if request else current._STATUS_LINE)
    if read is None:
        return None
    (first, second, third), fields = read
    head = current._head((first, second, third), fields)
    return head.start_line, head.headers, head._index, list(head._index)


def c_reading(raw: bytes, request: bool) -> object:
    read = scan.read_head(raw, request)
    if read is None:
        return None
    start, fields, index = read
    pieces = [*start, *(text for pair in fields for text in pair), *index]
    pieces += [value for values in index.values() for value in values]
    assert all(type(piece) is str for piece in pieces), read
    assert type(start) is tuple and type(fields) is tuple and all(type(pair) is tuple for pair in fields)
    assert type(index) is dict and all(type(values) is list for values in index.values())
    return start, fields, index, list(index)


def assert_read_alike(raw: bytes) -> None:
    for request in (True, False):
        assert c_reading(raw, request) == regex_reading(raw, request), (raw, request)


@pytest.mark.parametrize(
    "raw",
    [
        _WEBSOCKET_REQUEST,
        _WEBSOCKET_RESPONSE,
        _WEBSOCKET_RESPONSE.replace(b"101 Switching Protocols", b"101"),
        _WEBSOCKET_RESPONSE.replace(b"101 Switching Protocols", b"101 "),
        _WEBSOCKET_REQUEST.replace(b"Upgrade: ", b"Upgrade:  \t").replace(b"13", b"1 \t 3 \t"),
        _WEBSOCKET_REQUEST.replace(b"Upgrade: websocket", b"Upgrade:"),
        _WEBSOCKET_REQUEST.replace(b"Upgrade: websocket", b"X: caf\xe9 \x80\xff"),
        _WEBSOCKET_REQUEST.replace(b"Host", b"HOST", 1) + b"host: b\r\n\r\n",  # a blank line inside
        _WEBSOCKET_REQUEST.replace(b"\r\n\r\n", b"\r\nhost: b\r\nHOST: c\r\n\r\n"),
        _WEBSOCKET_REQUEST.replace(b"/ws", b"HtTpS://a.example:8080/ws?x=1"),
        _WEBSOCKET_REQUEST.replace(b"/ws", b"http://"),
        _WEBSOCKET_REQUEST.replace(b"/ws", b"http:/"),
        _WEBSOCKET_REQUEST.replace(b"/ws", b"https:/x"),
        _WEBSOCKET_REQUEST.replace(b"/ws", b"*"),
        _WEBSOCKET_REQUEST.replace(b"/ws", b"/a#b"),
        _WEBSOCKET_REQUEST.replace(b"\r\n\r\n", b"\r\n\r"),
        _WEBSOCKET_REQUEST.replace(b"\r\n", b"\n", 1),
        _WEBSOCKET_REQUEST.replace(b"Upgrade: websocket\r\n", b"Upgrade: web\rsocket\r\n"),
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\n",
        b"HTTP/1.1 200\r\n\r\n",
        b"\r\n\r\n",
        b"",
        b"GET",
        b"HTTP/1.1 200 OK\r\nA:\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n:a\r\n\r\n",
        # The C reading sizes its fields by the LFs it counts: a bare LF late in the head (fields already
        # read), one in a value, and more names than its index is sized for.
        _WEBSOCKET_REQUEST.replace(b"\r\nSec-WebSocket-Version", b"\nSec-WebSocket-Version"),
        _WEBSOCKET_REQUEST.replace(b"Upgrade: websocket", b"Upgrade: web\nsocket"),
        _WEBSOCKET_REQUEST.replace(b"\r\n\r\n", b"".join(b"\r\nX-%d: %d" % (i, i) for i in range(40)) + b"\r\n\r\n"),
    ],
)
def test_known_heads_read_alike(raw: bytes) -> None:
    assert_read_alike(raw)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_head(_REQUEST_LINES) | _near_valid(_LISTED_REQUEST_LINES) | _well_formed(_WELL_FORMED_REQUEST_LINES)
       | _head(_STATUS_LINES) | _near_valid(_LISTED_STATUS_LINES) | _well_formed(_WELL_FORMED_STATUS_LINES))
def test_generated_heads_read_alike(raw: bytes) -> None:
    assert_read_alike(raw)


@settings(max_examples=800, deadline=None)
@given(_FUZZ, st.booleans())
def test_arbitrary_bytes_read_alike(raw: bytes, complete: bool) -> None:
    assert_read_alike(raw + (current.HEAD_END if complete else b""))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, len(_WEBSOCKET_REQUEST) - 1))
def test_any_bytes_spliced_into_a_good_head_read_alike(noise: bytes, at: int) -> None:
    assert_read_alike(_WEBSOCKET_REQUEST[:at] + noise + _WEBSOCKET_REQUEST[at:])


@pytest.mark.parametrize(
    "raw",
    [
        _WEBSOCKET_REQUEST.replace(b"Upgrade: websocket", b"X: " + b"\xff \t" * 100_000),
        _WEBSOCKET_REQUEST.replace(b"Upgrade: websocket", b"X-" * 100_000 + b": a"),
        _WEBSOCKET_REQUEST.replace(b"/ws", b"/" + b"w" * 200_000),
        _WEBSOCKET_REQUEST.replace(b"Upgrade: websocket\r\n", b"Host: a\r\n" * 20_000),
        b"HTTP/1.1 200 " + b"\x80" * 200_000 + b"\r\n\r\n",
        _WEBSOCKET_REQUEST.replace(b"Upgrade: websocket", b"X: " + b"\x00" * 1000),
    ],
    ids=["long-value", "long-name", "long-target", "many-fields", "long-reason", "nul-value"],
)
def test_long_heads_read_alike(raw: bytes) -> None:
    """Far past any head limit (the parser is handed at most `max_header_bytes`): still the same reading."""
    assert_read_alike(raw)


@pytest.mark.parametrize("lines", [b"\n", b"x\r\n", b"x: y\n"], ids=["bare-lfs", "no-colon", "bare-lf-ends"])
def test_a_head_of_many_lines_refused_at_its_first_costs_nothing_of_their_number(lines: bytes) -> None:
    """The C reading sizes its fields by the LFs it counts, up to a bound: 16 KiB of lines the grammar
    refuses at the first one must not make a tuple of thousands of slots (132 KB, and a pass over
    every LF) before it is refused."""
    raw = b"GET / HTTP/1.1\r\n" + lines * (16_000 // len(lines)) + b"\r\n\r\n"
    tracemalloc.start()
    try:
        assert scan.read_head(raw, True) is None
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4096, peak


def test_only_bytes_are_read_here() -> None:
    """Another bytes-like object is left to the Python reading; a wrong call is a TypeError."""
    assert scan.read_head(bytearray(_WEBSOCKET_REQUEST), True) is None
    assert scan.read_head(memoryview(_WEBSOCKET_REQUEST), True) is None
    with pytest.raises(TypeError):
        scan.read_head(_WEBSOCKET_REQUEST)  # type: ignore[call-arg]


@pytest.mark.skipif(pure_python_requested(), reason="LB_PURE_PYTHON=1: the parser is asked to leave the C reading")
def test_the_parser_takes_the_c_reading_unless_pure_python_is_asked_for() -> None:
    assert current._SCAN is scan.read_head
    probe = "import lb.http.head as h; print(h._SCAN is None)"
    env = {**os.environ, "LB_PURE_PYTHON": "1"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True", done.stderr


# head_end is bytes.find(b"\r\n\r\n", start, stop): buffers of CR, LF and another byte (every near
# miss: CRLFCR, LFCRLF, CRLFCRLF split by the window), and indices anywhere, negative and past the end.
@settings(max_examples=2000, deadline=None)
@given(
    data=st.binary(max_size=64).map(lambda raw: bytes(b"\r\nx"[byte % 3] for byte in raw)),
    start=st.integers(-80, 80),
    stop=st.integers(-80, 80),
    kind=st.sampled_from([bytes, bytearray]),
)
def test_head_end_is_find_of_crlfcrlf(data: bytes, start: int, stop: int, kind: type) -> None:
    buffer = kind(data)
    assert scan.head_end(buffer, start, stop) == buffer.find(b"\r\n\r\n", start, stop)
    assert current._head_end_in_python(buffer, start, stop) == buffer.find(b"\r\n\r\n", start, stop)


@settings(max_examples=500, deadline=None)
@given(names=st.lists(st.text(st.sampled_from("_-ax\u00e9\u0101\U0001f600"), max_size=6), max_size=6))
def test_any_underscored_is_in_of_each_name(names: list[str]) -> None:
    """What parse_request_head asked before (`"_" in "".join(index)`), for names of one, two and four
    bytes a character, and str subclasses."""
    index: dict[str, list[str]] = {name: [] for name in names}
    expected = "_" in "".join(index)
    assert scan.any_underscored(index) is expected
    assert current._any_underscored_in_python(index) is expected
    subclassed: dict[str, list[str]] = {_Name(name): [] for name in names}
    assert scan.any_underscored(subclassed) is expected


class _Name(str):
    pass


def test_any_underscored_takes_a_dict_of_str_only() -> None:
    for other in ([], {b"_": []}, {1: []}, {"a": [], 2: []}):
        with pytest.raises(TypeError):
            scan.any_underscored(other)  # type: ignore[arg-type]


def test_head_end_takes_exact_bytes_and_bytearray_only() -> None:
    assert scan.head_end(b"GET / HTTP/1.1\r\n\r\n", 0, 1 << 62) == 14
    for other in (memoryview(b"\r\n\r\n"), "\r\n\r\n", None):
        with pytest.raises(TypeError):
            scan.head_end(other, 0, 4)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        scan.head_end(b"\r\n\r\n", 0)  # type: ignore[call-arg]
    for start, stop in ((0, 1 << 70), (-(1 << 70), 4), (1 << 70, 4)):  # clamped, as find clamps them
        assert scan.head_end(b"\r\n\r\n", start, stop) == b"\r\n\r\n".find(b"\r\n\r\n", start, stop)
    with pytest.raises(TypeError):
        scan.head_end(b"\r\n\r\n", 0, 4.0)  # type: ignore[arg-type]


def test_known_lowered_maps_each_name_to_its_lower_case() -> None:
    # lb.http.forwarding takes these for name.lower(): a wrong entry would keep or drop the wrong field.
    assert len(scan.known_lowered) >= 2 * 30
    for name, lowered in scan.known_lowered.items():
        assert lowered == name.lower() and scan.known_lowered[lowered] is lowered
    head = current.parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: k\r\n\r\n")
    for name, _ in head.head.headers:
        assert scan.known_lowered[name] is scan.known_lowered[name.lower()]  # the parser's names are its keys
    for name in ("Host", "host", "HOST", "X-Odd-Name", "N\u00c9"):  # known, known in lower case, others
        assert current.field_name_lowered(name) == name.lower()

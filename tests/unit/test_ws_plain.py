"""Differential test: lb.ws._plain (C) says yes to a handshake's head only where the ordinary path passes it as it is.

`plain_upgrade(method, version, index)` lets the connection skip `check_upgrade`: whenever it says yes to
a request head that `parse_request_head` accepts (given as it read it), `is_websocket_upgrade` and
`check_upgrade` must pass it.
`plain_switch(raw, key)` lets the connection skip reading a 101 into objects: whenever it says yes,
the ordinary path (`parse_response_head`, `switch_fault`, `negotiation_fault`, insert mode's
Set-Cookie check, `render_client_response`) must accept the head, whatever the client offered, and
write exactly `raw` with our fields before its last CRLF.  Either may say no to heads the ordinary
path takes (they are then checked the ordinary way); both must say yes to what browsers and
gateways send.
"""

from __future__ import annotations

import base64
import hashlib
import platform
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.errors import BadHandshake, RequestRejected, UnsupportedVersion
from lb.http.cookies import sets_cookie
from lb.http.forwarding import render_client_response
from lb.http.head import HEAD_END, parse_request_head, parse_response_head, render_head
from lb.ws.upgrade import accept_value, check_upgrade, is_websocket_upgrade, negotiation_fault, switch_fault

switch = pytest.importorskip("lb.ws._plain", reason="lb/ws/_plain.c is not built (make native needs a C compiler)")

KEY = "dGhlIHNhbXBsZSBub25jZQ=="
ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # RFC 6455 §1.3's example
COOKIE = "LB_AFFINITY"
OFFERS = (
    b"",
    b"Sec-WebSocket-Protocol: chat, superchat\r\n",
    b"Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n",
)


def request(key: str = KEY, offers: bytes = b"") -> bytes:
    return (f"GET /ws HTTP/1.1\r\nHost: lb.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n").encode() + offers + b"\r\n"


def ordinary(raw: bytes, key: str, offers: bytes, set_cookies: list[str], extra: list[tuple[str, str]]) -> bytes | None:
    """What the client gets from the ordinary path in insert mode, or None where it would not pass the 101 as it is
    (refused, not a 101, or our cookie's Set-Cookie to take out)."""
    try:
        response = parse_response_head(raw)
    except RequestRejected:
        return None
    upgrade = parse_request_head(request(key, offers))
    if response.status != 101 or switch_fault(upgrade, response) or negotiation_fault(upgrade, response):
        return None
    if sets_cookie(response, COOKIE):
        return None
    return render_client_response(response, switching=True, set_cookies=set_cookies, extra=extra)


def assert_plain_means_unchanged(raw: bytes, key: str = KEY) -> None:
    if not switch.plain_switch(raw, key):
        return
    body = raw[: -len(HEAD_END)].decode("latin-1")
    for offers in OFFERS:
        assert ordinary(raw, key, offers, [], []) == raw
        fields = [("Set-Cookie", f"{COOKIE}=t0k3n; Path=/; HttpOnly"), ("X-LB-Affinity", "t0k3n")]
        assert ordinary(raw, key, offers, [fields[0][1]], fields[1:]) == render_head(body, fields)


_GATEWAY_101S = [
    # websockets (legacy and new servers), aiohttp, a Go gorilla/websocket, Node's ws, our demo gateway
    "HTTP/1.1 101 Switching Protocols\r\nDate: Fri, 04 Dec 2026 18:00:00 GMT\r\nUpgrade: websocket\r\n"
    "Connection: Upgrade\r\nSec-WebSocket-Accept: {a}\r\nServer: Python/3.11 websockets/12.0\r\n\r\n",
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\nSec-WebSocket-Accept: {a}\r\n"
    "Date: Fri, 04 Dec 2026 18:00:00 GMT\r\nServer: Python/3.11 aiohttp/3.9.5\r\n\r\n",
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Accept: {a}\r\n\r\n",
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: WebSocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {a}\r\n"
    "X-Gateway: gw-1\r\nX-Empty: \r\n\r\n",
    "HTTP/1.1 101 \r\nsec-websocket-accept: {a}\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n",
]


@pytest.mark.parametrize("template", _GATEWAY_101S)
def test_what_gateways_send_passes_as_it_came(template: str) -> None:
    raw = template.format(a=ACCEPT).encode("latin-1")
    assert switch.plain_switch(raw, KEY)
    assert_plain_means_unchanged(raw)


_PLAIN = (
    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {a}\r\n"
)


@pytest.mark.parametrize("tail", [
    "Set-Cookie: LB_AFFINITY=x\r\n",  # insert mode takes it out
    "Set-Cookie: session=1\r\n",  # another cookie: passed, but judged by the ordinary path
    "Sec-WebSocket-Protocol: chat\r\n",  # judged against the client's offer
    "Sec-WebSocket-Extensions: permessage-deflate\r\n",
    "Keep-Alive: timeout=5\r\n", "Proxy-Connection: keep-alive\r\n", "TE: trailers\r\n", "Trailer: x\r\n",
    "Proxy-Authorization: Basic eA==\r\n", "Content-Length: 0\r\n", "Transfer-Encoding: chunked\r\n",
    "Upgrade: websocket\r\n", "Connection: Upgrade\r\n", "Sec-WebSocket-Accept: {a}\r\n",  # a second one
    "X-Spaced:  two\r\n", "X-Spaced:tight\r\n", "X-Spaced: trailing \r\n", "X-Spaced: tab\t\r\n",
    "X-Bare: lf\n", "X Name: v\r\n", ": v\r\n", "X-Ctl: \x00\r\n", " X-Fold: v\r\n",
])
def test_anything_the_ordinary_path_changes_or_judges_is_left_to_it(tail: str) -> None:
    raw = (_PLAIN + tail + "\r\n").format(a=ACCEPT).encode("latin-1")
    assert not switch.plain_switch(raw, KEY)


@pytest.mark.parametrize("raw", [
    _PLAIN.replace("HTTP/1.1", "HTTP/1.0") + "\r\n",  # rendered again as HTTP/1.1
    _PLAIN.replace(" Switching Protocols", "") + "\r\n",  # rendered again with the reason's space
    _PLAIN.replace("101", "200") + "\r\n",
    _PLAIN.replace("Upgrade: websocket", "Upgrade: h2c, websocket") + "\r\n",
    _PLAIN.replace("Connection: Upgrade", "Connection: keep-alive, Upgrade") + "\r\n",
    _PLAIN.replace("Connection: Upgrade", "Connection: UPGRADE") + "\r\n",
    _PLAIN.replace("{a}", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo") + "\r\n",
    _PLAIN.replace("{a}", "S3pPLMBiTxaQ9kYGzzhZRbK+xOo=") + "\r\n",
    _PLAIN.replace("Upgrade: websocket\r\n", "") + "\r\n",
    _PLAIN.replace("Connection: Upgrade\r\n", "") + "\r\n",
    _PLAIN.replace("Sec-WebSocket-Accept: {a}\r\n", "") + "\r\n",
    _PLAIN,  # no end
    _PLAIN + "\r\nmore",  # not one head
    "",
])
def test_a_head_that_is_no_plain_switch_is_refused(raw: str) -> None:
    assert not switch.plain_switch(raw.format(a=ACCEPT).encode("latin-1"), KEY)


def test_only_exact_bytes_and_an_ascii_key() -> None:
    raw = (_PLAIN + "\r\n").format(a=ACCEPT).encode()
    assert switch.plain_switch(raw, KEY)
    assert not switch.plain_switch(bytearray(raw), KEY)
    assert not switch.plain_switch(memoryview(raw), KEY)  # type: ignore[arg-type]
    assert not switch.plain_switch(raw, KEY[:-1] + "\xe9")
    assert not switch.plain_switch(raw, "another key")
    assert switch.accept(KEY + "\u20ac") is None
    assert switch.accept(b"key") is None  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        switch.plain_switch(raw)  # type: ignore[call-arg]


@settings(max_examples=400, deadline=None)
@given(key=st.text(st.characters(max_codepoint=0x7F), max_size=200))
def test_accept_is_sha1_and_base64_of_the_key_and_the_guid(key: str) -> None:
    digest = hashlib.sha1(key.encode("ascii") + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    expected = base64.b64encode(digest).decode()
    assert switch.accept(key) == expected == accept_value(key)
    assert switch.accept_portable(key) == expected  # what a CPU without SHA extensions answers


@pytest.mark.parametrize("length", range(200))
def test_both_sha1s_agree_with_hashlib_over_every_padding(length: int) -> None:
    # The GUID is 36 bytes: keys of 0 to 199 bytes end their last block at every offset, and take one to
    # four blocks, with the length in a block of its own or beside the data.
    key = "".join(chr(33 + (7 * i + length) % 94) for i in range(length))
    expected = base64.b64encode(hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()).decode()
    assert switch.accept(key) == switch.accept_portable(key) == expected


def test_the_sha_extensions_are_used_where_the_cpu_has_them() -> None:
    assert switch.accept_portable(KEY) == switch.accept(KEY) == ACCEPT
    flags = Path("/proc/cpuinfo").read_text().split() if Path("/proc/cpuinfo").exists() else []
    if not flags or platform.machine() != "x86_64":
        pytest.skip("reads /proc/cpuinfo of an x86-64 Linux")
    if "sha_ni" in flags and "sse4_1" in flags and "ssse3" in flags:
        # One way only: a kernel booted with clearcpuid=sha_ni hides the flag here while CPUID still has it.
        assert switch.sha_extensions()


# Hostile heads: the fields a 101 is judged by, in every spelling and near miss, among others.
_NAMES = st.sampled_from([
    "Upgrade", "upgrade", "UPGRADE", "Upgrade ", "Upgrade_", "Connection", "connection", "Sec-WebSocket-Accept",
    "sec-websocket-accept", "Sec-WebSocket-Protocol", "Sec-WebSocket-Extensions", "Set-Cookie", "set-cookie",
    "Keep-Alive", "Proxy-Connection", "TE", "Trailer", "Content-Length", "Transfer-Encoding",
    "Proxy-Authorization", "Server", "X-A", "Date", "x^y", "",
]) | st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1, max_size=8)
_VALUES = st.sampled_from([
    "websocket", "WebSocket", "websocket ", " websocket", "h2c, websocket", "websocket, h2c", "Upgrade", "upgrade",
    "UPGRADE", "keep-alive, Upgrade", "close", ACCEPT, ACCEPT.lower(), ACCEPT[:-1], "", " ", "\t", "a b",
    "LB_AFFINITY=x", "chat", "permessage-deflate", "0", "chunked", "caf\xe9", "\x00", "\x7f", "\xa0",
]) | st.text(st.characters(max_codepoint=0xFF), max_size=12)
_HOSTILE_FIELD = st.tuples(_NAMES, st.sampled_from([": ", ":", ":  ", ":\t", " : "]), _VALUES,
                          st.sampled_from(["\r\n", "\n", "\r", " \r\n"]))
# And fields as gateways write them (`name: value`, no whitespace around the value), where most heads pass.
_TCHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_WRITTEN_FIELD = st.tuples(
    # No `:` in a name: `0: ` written as `0: : 0` is the field `0` with the value `: 0`, a plain one, which
    # the oracle below would judge by the name it was given.
    st.text(st.sampled_from(_TCHARS), min_size=1, max_size=10) | _NAMES.filter(lambda name: ":" not in name),
    st.just(": "),
    st.text(st.characters(min_codepoint=0x21, max_codepoint=0xFF).filter(lambda c: c != "\x7f"), max_size=12)
    | _VALUES, st.just("\r\n"),
)
# Three written fields to one hostile: `st.one_of` keeps one copy of a strategy object it is given twice,
# so `_WRITTEN_FIELD | _WRITTEN_FIELD` is no weight; copies by `.map` are other objects.
_FIELD = st.one_of(*(_WRITTEN_FIELD.map(tuple) for _ in range(3)), _HOSTILE_FIELD)
_STATUS = st.just("HTTP/1.1 101 Switching Protocols") | st.sampled_from([
    "HTTP/1.1 101 Switching Protocols", "HTTP/1.1 101 ", "HTTP/1.1 101", "HTTP/1.0 101 Switching Protocols",
    "HTTP/1.1 101 \xe9t\xe9", "HTTP/1.1 101 a\tb", "HTTP/1.1 101  two", "HTTP/1.1 200 OK", "HTTP/1.1 100 Continue",
    "http/1.1 101 x", "HTTP/1.1 1010 x", "HTTP/1.1 101 \x00",
])


_JUDGED = {"upgrade", "connection", "sec-websocket-accept", "sec-websocket-protocol", "sec-websocket-extensions",
           "set-cookie", "keep-alive", "proxy-connection", "te", "trailer", "content-length", "transfer-encoding",
           "proxy-authorization"}

# Fields no check looks at, as gateways write them: with the three a switch needs, a head that passes as it came.
_BENIGN_FIELD = st.tuples(
    st.text(st.sampled_from(_TCHARS), min_size=1, max_size=10).filter(lambda name: name.lower() not in _JUDGED),
    st.just(": "), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12), st.just("\r\n"),
)
# One byte of a head replaced, dropped or repeated (the position taken modulo the head's length).
_BYTE_MUTATION = st.tuples(st.integers(0, 400), st.sampled_from(["replace", "drop", "repeat"]),
                           st.sampled_from(b" \t:,\r\n\x00_-=aAzZ0") | st.integers(0, 255))
# The one thing a head does otherwise than a plain one ("none": it is plain), so that most heads are plain or
# a step from it; "any" is a free mix of hostile fields, start lines and missing fields.
_DEVIATIONS = ["none", "none", "none", "none", "start", "drop", "field", "byte", "any", "any"]


def mutate(raw: bytes, mutation: tuple[int, str, int]) -> bytes:
    if not raw:
        return raw
    at, kind, byte = mutation
    at %= len(raw)
    if kind == "replace":
        return raw[:at] + bytes((byte,)) + raw[at + 1 :]
    return raw[:at] + raw[at + 1 :] if kind == "drop" else raw[: at + 1] + raw[at:]


def _required(key: str) -> list[tuple[str, str, str, str]]:
    return [("Upgrade", ": ", "websocket", "\r\n"), ("Connection", ": ", "Upgrade", "\r\n"),
            ("Sec-WebSocket-Accept", ": ", accept_value(key), "\r\n")]


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deviation=st.sampled_from(_DEVIATIONS), status=_STATUS, benign=st.lists(_BENIGN_FIELD, max_size=5),
       fields=st.lists(_FIELD, max_size=6), required=st.integers(0, 3), order=st.randoms(),
       key=st.sampled_from([KEY, "x3JJHMbDL1EzLkh9GBhXDw==", ""]), answers=st.sampled_from([KEY, "other"]),
       mutation=_BYTE_MUTATION)
def test_a_plain_switch_is_what_the_ordinary_path_passes_unchanged(
    deviation: str, status: str, benign: list[tuple[str, str, str, str]], fields: list[tuple[str, str, str, str]],
    required: int, order: object, key: str, answers: str, mutation: tuple[int, str, int],
) -> None:
    # A 101 with the three fields a switch needs among fields no check reads, or that with one thing changed
    # (its status line, a field dropped, a hostile field, a byte), or anything: about half are plain.
    if deviation != "any":
        answers = KEY
    if deviation not in ("start", "any"):
        status = "HTTP/1.1 101 Switching Protocols"
    needed = _required(key if answers == KEY else answers)
    if deviation == "drop" or (deviation == "any" and not required):
        del needed[required % 3]
    lines = benign + (fields if deviation == "any" else fields[:1] if deviation == "field" else []) + needed
    order.shuffle(lines)  # type: ignore[attr-defined]
    text = status + "\r\n" + "".join(name + colon + value + end for name, colon, value, end in lines) + "\r\n"
    raw = text.encode("latin-1")
    if deviation == "byte":
        raw = mutate(raw, mutation)
    end = raw.find(HEAD_END)
    head = raw[: end + len(HEAD_END)] if end >= 0 else raw  # what the connection hands it: the first head
    assert_plain_means_unchanged(head, key)
    if deviation == "none":
        assert switch.plain_switch(head, key)  # the canonical 101 with fields no check reads, in any order


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fields=st.lists(_WRITTEN_FIELD, max_size=8), order=st.randoms(),
       reason=st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF).filter(lambda c: c != "\x7f"), max_size=20))
def test_every_written_101_that_says_nothing_judged_is_plain(
    fields: list[tuple[str, str, str, str]], order: object, reason: str
) -> None:
    """The other way: a 101 with the three fields a switch needs, the rest as gateways write them, none of
    them judged or taken out, passes as it came (so the fast path is the common path, not a rare one)."""
    lines = fields + _required(KEY)
    order.shuffle(lines)  # type: ignore[attr-defined]
    raw = (f"HTTP/1.1 101 {reason}\r\n" + "".join(n + c + v + e for n, c, v, e in lines) + "\r\n").encode("latin-1")
    judged = any(name.lower() in _JUDGED for name, _, _, _ in fields)
    written = all(name and not name.strip(_TCHARS) and value == value.strip(" \t") and all(
        c == "\t" or " " <= c <= "~" or c >= "\x80" for c in value) for name, _, value, _ in fields)
    assert switch.plain_switch(raw, KEY) == (written and not judged)
    assert_plain_means_unchanged(raw)


# -- The upgrade request ---------------------------------------------------------------------------------------


def plain_upgrade(raw: bytes) -> bool:
    """What the connection asks lb.ws._plain of a head the parser accepted (one it refuses: no)."""
    try:
        parsed = parse_request_head(raw)
    except RequestRejected:
        return False
    return switch.plain_upgrade(parsed.method, parsed.version, parsed.head.index)


def passes_check_upgrade(raw: bytes) -> bool | None:
    """Whether the ordinary path takes `raw` for a WebSocket upgrade that check_upgrade passes (None: unparsed)."""
    try:
        parsed = parse_request_head(raw)
    except RequestRejected:
        return None
    if not is_websocket_upgrade(parsed):
        return False
    try:
        check_upgrade(parsed)
    except (BadHandshake, UnsupportedVersion):
        return False
    return True


_BROWSER_UPGRADES = [
    # Chrome, Firefox (its Connection lists keep-alive), Safari, python websockets, Go's gorilla
    "GET /ws HTTP/1.1\r\nHost: lb.example\r\nConnection: Upgrade\r\nPragma: no-cache\r\nCache-Control: no-cache\r\n"
    "User-Agent: Mozilla/5.0 Chrome/120.0\r\nUpgrade: websocket\r\nOrigin: https://lb.example\r\n"
    "Sec-WebSocket-Version: 13\r\nAccept-Encoding: gzip, deflate, br\r\nAccept-Language: en-US,en;q=0.9\r\n"
    "Cookie: LB_AFFINITY=abc; other=1\r\nSec-WebSocket-Key: {k}\r\n"
    "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\r\n",
    "GET /ws?room=1 HTTP/1.1\r\nHost: lb.example:8080\r\nUser-Agent: Mozilla/5.0 Firefox/121.0\r\nAccept: */*\r\n"
    "Sec-WebSocket-Version: 13\r\nOrigin: https://lb.example\r\nSec-WebSocket-Extensions: permessage-deflate\r\n"
    "Sec-WebSocket-Key: {k}\r\nConnection: keep-alive, Upgrade\r\nSec-Fetch-Dest: websocket\r\n"
    "Sec-Fetch-Mode: websocket\r\nSec-Fetch-Site: same-origin\r\nPragma: no-cache\r\nUpgrade: websocket\r\n\r\n",
    "GET /ws HTTP/1.1\r\nHost: lb.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {k}\r\n"
    "Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: chat\r\n\r\n",
    "GET /ws HTTP/1.1\r\nhost: lb.example\r\nupgrade: WebSocket\r\nconnection: upgrade\r\nsec-websocket-key: {k}\r\n"
    "sec-websocket-version: 13\r\n\r\n",
    "GET /ws HTTP/1.1\r\nHost: lb.example\r\nUpgrade:websocket\r\nConnection:\t Upgrade \r\n"
    "Sec-WebSocket-Key:  {k} \r\nSec-WebSocket-Version: 13\t\r\n\r\n",
]


@pytest.mark.parametrize("template", _BROWSER_UPGRADES)
def test_what_browsers_send_is_a_plain_upgrade(template: str) -> None:
    raw = template.format(k=KEY).encode("latin-1")
    assert passes_check_upgrade(raw) is True
    assert plain_upgrade(raw)


_UPGRADE = ("GET /ws HTTP/1.1\r\nHost: lb.example\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n")


@pytest.mark.parametrize("raw", [
    _UPGRADE.replace("GET", "POST") + "\r\n",
    _UPGRADE.replace("HTTP/1.1", "HTTP/1.0") + "\r\n",
    _UPGRADE + "Content-Length: 0\r\n\r\n",  # passes the ordinary path, which reads the length
    _UPGRADE + "Content-Length: 5\r\n\r\n",
    _UPGRADE + "Transfer-Encoding: chunked\r\n\r\n",
    _UPGRADE + "Transfer-Encoding: ,chunked\r\n\r\n",  # a body all the same (RFC 9110 §5.6.1.2)
    _UPGRADE.replace("Upgrade: websocket", "Upgrade: h2c") + "\r\n",
    _UPGRADE.replace("Upgrade: websocket", "Upgrade_: websocket") + "\r\n",
    _UPGRADE.replace("Connection: Upgrade", "Connection: close") + "\r\n",
    _UPGRADE.replace("Connection: Upgrade", "Connection: upgraded") + "\r\n",
    _UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ=") + "\r\n",
    _UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZ-==") + "\r\n",
    _UPGRADE.replace("dGhlIHNhbXBsZSBub25jZQ==", "dGhlIHNhbXBsZSBub25jZQ==, x") + "\r\n",
    _UPGRADE + "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",  # a second key
    _UPGRADE.replace("Sec-WebSocket-Key", "Sec_WebSocket_Key") + "\r\n",  # the parser drops an alias
    _UPGRADE.replace("13", "8") + "\r\n",
    _UPGRADE.replace("13", "13, 13") + "\r\n",
    _UPGRADE + "Sec-WebSocket-Version: 13\r\n\r\n",
    _UPGRADE.replace("Sec-WebSocket-Version: 13\r\n", "") + "\r\n",
    _UPGRADE,  # no end
    "GET / HTTP/1.1\r\n\r\n",
    _UPGRADE.replace("GET /ws", "GET") + "\r\n",  # no target (the parser refuses it too: helper s44h1)
    "",
])
def test_anything_check_upgrade_refuses_or_reads_further_is_left_to_it(raw: str) -> None:
    assert not plain_upgrade(raw.encode("latin-1"))


def test_only_a_head_as_the_parser_makes_it_is_read() -> None:
    """Exact str and dict, lists of str as the parser's: anything else is left to the ordinary path."""
    index = parse_request_head((_UPGRADE + "\r\n").encode()).head.index
    assert switch.plain_upgrade("GET", "HTTP/1.1", index)

    class Text(str):
        pass

    for method, version, fields in [
        (Text("GET"), "HTTP/1.1", index), ("GET", Text("HTTP/1.1"), index), ("GET", "HTTP/1.1", dict(index).items()),
        ("GET", "HTTP/1.1", {**index, "upgrade": ("websocket",)}),
        ("GET", "HTTP/1.1", {**index, "upgrade": [b"websocket"]}),
        ("GET", "HTTP/1.1", {**index, "upgrade": ["websocket\u0100"]}),  # not latin-1: no parser's value
        ("GET", "HTTP/1.1", {**index, "sec-websocket-key": [KEY, KEY]}),
        ("GET", "HTTP/1.1", {**index, "content-length": []}),  # named at all: a body's framing
    ]:
        assert not switch.plain_upgrade(method, version, fields)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        switch.plain_upgrade("GET", "HTTP/1.1")  # type: ignore[call-arg]

    hostile: dict[str, list[str]] = {}

    class Clearing(str):
        """A key that meets the lookup of `connection` (its hash) and empties the dict when compared."""

        def __hash__(self) -> int:
            return hash("connection")

        def __eq__(self, other: object) -> bool:
            hostile.clear()
            return False

    hostile.update(index)
    del hostile["connection"]
    hostile[Clearing("x")] = ["upgrade"]
    assert not switch.plain_upgrade("GET", "HTTP/1.1", hostile)  # the upgrade's values were read before

    compared: list[str] = []

    class Raising(str):
        """A key met by the lookup of `content-length`, whose comparison raises."""

        def __hash__(self) -> int:
            return hash("content-length")

        def __eq__(self, other: object) -> bool:
            compared.append("content-length")
            raise RuntimeError("hostile")

    class Counted(str):
        """A key met by the lookup of `transfer-encoding`, which must not be compared with an error set."""

        def __hash__(self) -> int:
            return hash("transfer-encoding")

        def __eq__(self, other: object) -> bool:
            compared.append("transfer-encoding")
            return False

    raising: dict[str, list[str]] = {**index, Raising("a"): ["1"], Counted("b"): ["chunked"]}
    with pytest.raises(RuntimeError):  # the error itself, not a SystemError for a lookup made with it set
        switch.plain_upgrade("GET", "HTTP/1.1", raising)
    assert compared == ["content-length"]


_REQUEST_NAMES = st.sampled_from([
    "Upgrade", "upgrade", "UPGRADE", "Upgrade_", "Connection", "connection", "Sec-WebSocket-Key", "sec-websocket-key",
    "Sec_WebSocket_Key", "Sec-WebSocket-Version", "sec-websocket-version", "Content-Length", "Transfer-Encoding",
    "Content_Length", "Host", "Cookie", "X-A", "Sec-WebSocket-Protocol",
]) | st.text(st.sampled_from(_TCHARS), min_size=1, max_size=8)
_REQUEST_VALUES = st.sampled_from([
    "websocket", "WebSocket", " websocket ", "h2c, websocket", "websocket,", ",websocket", "web socket", "Upgrade",
    "upgrade", "keep-alive, Upgrade", "keep-alive,Upgrade", "Upgrade, close", "close", KEY, " " + KEY, KEY + "\t",
    KEY[:-1], KEY.replace("Z", "-"), "13", " 13", "13 ", "013", "8", "0", "chunked", "chunked,", ", chunked", "",
    "lb.example", "\xe9",
]) | st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF).filter(lambda c: c != "\x7f"), max_size=12)
_REQUEST_FIELD = st.tuples(_REQUEST_NAMES, st.sampled_from([": ", ":", ":  ", ":\t"]), _REQUEST_VALUES,
                           st.sampled_from(["\r\n", "\r\n", "\r\n", " \r\n", "\t\r\n"]))
_UPGRADE_FIELDS = [("Host", ": ", "lb.example", "\r\n"), ("Upgrade", ": ", "websocket", "\r\n"),
                   ("Connection", ": ", "Upgrade", "\r\n"), ("Sec-WebSocket-Key", ": ", KEY, "\r\n"),
                   ("Sec-WebSocket-Version", ": ", "13", "\r\n")]


_REQUEST_JUDGED = {"upgrade", "connection", "sec-websocket-key", "sec-websocket-version", "content-length",
                   "transfer-encoding", "host"}
_BENIGN_REQUEST_FIELD = st.tuples(
    st.text(st.sampled_from(_TCHARS), min_size=1, max_size=10).filter(lambda name: name.lower() not in _REQUEST_JUDGED),
    st.just(": "), st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12), st.just("\r\n"),
)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deviation=st.sampled_from(_DEVIATIONS),
       start=st.sampled_from(["GET /ws HTTP/1.1", "GET /ws HTTP/1.1", "GET http://lb.example/ws HTTP/1.1",
                              "GET /ws HTTP/1.0", "HEAD /ws HTTP/1.1", "POST /ws HTTP/1.1", "GET /ws  HTTP/1.1"]),
       benign=st.lists(_BENIGN_REQUEST_FIELD, max_size=5), fields=st.lists(_REQUEST_FIELD, max_size=6),
       keep=st.lists(st.booleans(), min_size=5, max_size=5), order=st.randoms(), mutation=_BYTE_MUTATION)
def test_a_plain_upgrade_passes_check_upgrade(
    deviation: str, start: str, benign: list[tuple[str, str, str, str]], fields: list[tuple[str, str, str, str]],
    keep: list[bool], order: object, mutation: tuple[int, str, int],
) -> None:
    # Every field an upgrade needs among fields no check reads, or that with one thing changed (the request
    # line, a field dropped, a hostile field, a byte), or anything: about half pass the ordinary path.
    if deviation not in ("start", "any"):
        start = "GET /ws HTTP/1.1"
    if deviation == "drop":
        keep = [index != 1 + keep.count(True) % 4 for index in range(5)]
    elif deviation != "any":
        keep = [True] * 5
    hostile = fields if deviation == "any" else fields[:1] if deviation == "field" else []
    lines = benign + hostile + [field for field, kept in zip(_UPGRADE_FIELDS, keep, strict=True)
                                if kept or field[0] == "Host"]
    order.shuffle(lines)  # type: ignore[attr-defined]
    raw = (start + "\r\n" + "".join(n + c + v + e for n, c, v, e in lines) + "\r\n").encode("latin-1")
    if deviation == "byte":
        raw = mutate(raw, mutation)
    ordinary = passes_check_upgrade(raw)
    if deviation == "none":
        assert ordinary and plain_upgrade(raw)  # what browsers send, with fields no check reads
    if ordinary is None:
        return  # the parser refused it: the connection never asks
    if plain_upgrade(raw):
        assert ordinary
    if deviation != "byte" and start == "GET /ws HTTP/1.1" and all(keep) and ordinary and not any(
            name.lower() in ("content-length", "transfer-encoding") for name, _, _, _ in hostile):
        assert plain_upgrade(raw)  # every upgrade the checks pass, less those with a body's framing


@pytest.mark.parametrize("key", [" " + KEY, KEY + "\t", "\t" + KEY + " "])
def test_the_key_is_read_without_the_whitespace_around_it_as_switch_fault_reads_it(key: str) -> None:
    """The connection passes the parser's key (no whitespace around it); given one with some, C reads it as
    switch_fault does (helper s44h1's finding: it hashed the key as given)."""
    for accept_for, plain in ((KEY, True), (key, False)):
        raw = (_PLAIN.format(a=accept_value(accept_for)) + "\r\n").encode()
        assert switch.plain_switch(raw, key) is plain
        assert_plain_means_unchanged(raw, key)

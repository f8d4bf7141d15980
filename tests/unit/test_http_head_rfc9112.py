"""RFC 9112 hardening of the head parser: framing, Host, absolute-form, `_` aliases, incremental search."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.errors import (
    BadFraming,
    BadHost,
    BadRequest,
    HeadersTooLarge,
    RequestRejected,
    UnsupportedTransferCoding,
)
from lb.http.head import (
    HEAD_END,
    PROTECTED_HEADERS,
    find_head_end,
    parse_request_head,
    parse_response_head,
    protected_headers,
)


def request(*lines: str, start: str = "POST / HTTP/1.1") -> bytes:
    return ("\r\n".join([start, *lines]) + "\r\n\r\n").encode("latin-1")


# -- framing (RFC 9112 §6) ----------------------------------------------------

REJECTED_FRAMING: dict[str, tuple[bytes, type[RequestRejected], int]] = {
    "TE on HTTP/1.0": (request("Transfer-Encoding: chunked", start="POST / HTTP/1.0"), BadFraming, 400),
    "TE on HTTP/1.0 with CL": (
        request("Transfer-Encoding: chunked", "Content-Length: 3", start="POST / HTTP/1.0"),
        BadFraming,
        400,
    ),
    "chunked twice in one line": (request("Host: a", "Transfer-Encoding: chunked, chunked"), BadFraming, 400),
    "chunked twice in two lines": (
        request("Host: a", "Transfer-Encoding: chunked", "Transfer-Encoding: chunked"),
        BadFraming,
        400,
    ),
    "final coding gzip": (request("Host: a", "Transfer-Encoding: chunked, gzip"), BadFraming, 400),
    "only gzip": (request("Host: a", "Transfer-Encoding: gzip"), BadFraming, 400),
    "only identity": (request("Host: a", "Transfer-Encoding: identity"), BadFraming, 400),
    "TE of empty elements only": (request("Host: a", "Transfer-Encoding: , ,"), BadFraming, 400),
    "TE empty": (request("Host: a", "Transfer-Encoding:"), BadFraming, 400),
    "gzip, empty, chunked": (request("Host: a", "Transfer-Encoding: gzip,,chunked"), UnsupportedTransferCoding, 501),
    "identity, chunked": (request("Host: a", "Transfer-Encoding: identity, chunked"), UnsupportedTransferCoding, 501),
    "gzip, chunked": (request("Host: a", "Transfer-Encoding: gzip, chunked"), UnsupportedTransferCoding, 501),
    "gzip then chunked lines": (
        request("Host: a", "Transfer-Encoding: gzip", "Transfer-Encoding: chunked"),
        UnsupportedTransferCoding,
        501,
    ),
    "equal CL lines": (request("Host: a", "Content-Length: 5", "Content-Length: 5"), BadFraming, 400),
    "equal CL list": (request("Host: a", "Content-Length: 5, 5"), BadFraming, 400),
    "equal CL list no space": (request("Host: a", "Content-Length: 5,5"), BadFraming, 400),
    "CL with inner space": (request("Host: a", "Content-Length: 5 5"), BadFraming, 400),
    "CL beyond 64 bits": (request("Host: a", "Content-Length: 99999999999999999999"), BadFraming, 400),
    "CL 19 digits": (request("Host: a", "Content-Length: 1000000000000000000"), BadFraming, 400),
    "CL and TE": (request("Host: a", "Content-Length: 0", "Transfer-Encoding: chunked"), BadFraming, 400),
}


@pytest.mark.parametrize(("raw", "error", "status"), REJECTED_FRAMING.values(), ids=REJECTED_FRAMING.keys())
def test_ambiguous_framing_is_rejected(raw: bytes, error: type[RequestRejected], status: int) -> None:
    """Framing RFC 9112 calls faulty is a 400; a coding we cannot decode before chunked is a 501."""
    with pytest.raises(error) as info:
        parse_request_head(raw)
    assert info.value.status == status


def test_largest_content_length_is_accepted() -> None:
    """18 digits fit every 64-bit parser behind us, so they are accepted and exposed as an int."""
    parsed = parse_request_head(request("Host: a", "Content-Length: 999999999999999999"))
    assert parsed.content_length == 999_999_999_999_999_999
    assert not parsed.chunked


def test_body_framing_is_exposed() -> None:
    """`content_length` and `chunked` say how the body is framed; neither means no body."""
    assert parse_request_head(request("Host: a", "Transfer-Encoding: Chunked")).chunked
    assert parse_request_head(request("Host: a", "Transfer-Encoding: chunked")).content_length is None
    plain = parse_request_head(request("Host: a", start="GET / HTTP/1.1"))
    assert plain.content_length is None
    assert not plain.chunked


@pytest.mark.parametrize(
    ("values", "sent"),
    [
        (["chunked,"], ["chunked"]),
        ([",chunked"], ["chunked"]),
        ([" , chunked , "], ["chunked"]),
        (["", "chunked"], ["chunked"]),
        (["Chunked", ","], ["Chunked"]),
    ],
)
def test_empty_transfer_coding_elements_count_for_nothing_and_are_left_out(values: list[str], sent: list[str]) -> None:
    """RFC 9110 §5.6.1.2: a recipient MUST ignore empty list elements.  They are left out of the head
    we send on, since backends read them apart (llhttp refuses `chunked,`, HAProxy 2.6 `,chunked`)."""
    parsed = parse_request_head(request("Host: a", *(f"Transfer-Encoding: {value}" for value in values)))
    assert parsed.chunked and parsed.head.get_all("transfer-encoding") == sent
    assert [value for name, value in parsed.head.headers if name == "Transfer-Encoding"] == sent
    answer = parse_response_head(f"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip,, {', '.join(values)}\r\n\r\n".encode())
    assert answer.head.get_all("transfer-encoding") == ["gzip, " + ", ".join(sent)]


@pytest.mark.parametrize(
    "raw",
    [
        b"HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
    ],
)
def test_response_framing_faults_are_bad_requests(raw: bytes) -> None:
    """A backend's faulty framing is a BadRequest (the caller's 502), never a 501 meant for clients."""
    with pytest.raises(BadRequest):
        parse_response_head(raw)


@pytest.mark.parametrize("status", [b"000", b"099", b"600", b"999"])
def test_response_status_out_of_range_is_refused(status: bytes) -> None:
    """A status outside 100..599 (RFC 9110 §15), such as `000`, is malformed: a 502, not relayed."""
    with pytest.raises(BadRequest, match="out of range"):
        parse_response_head(b"HTTP/1.1 " + status + b" Zero\r\n\r\n")


@pytest.mark.parametrize("status", [100, 101, 199, 200, 404, 599])
def test_response_status_in_range_is_accepted(status: int) -> None:
    """Every code from 100 to 599 is accepted, registered or not."""
    assert parse_response_head(f"HTTP/1.1 {status} X\r\n\r\n".encode()).status == status


def test_backend_codings_before_chunked_and_equal_lengths_pass() -> None:
    """A backend's `gzip, chunked` and equal repeated Content-Lengths are relayed (RFC 9110 §8.6 merge)."""
    assert parse_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").status == 200
    parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n")


# -- Host (RFC 9112 §3.2) -----------------------------------------------------

BAD_HOSTS = {
    "two Host on HTTP/1.0": request("Host: a", "Host: b", start="GET / HTTP/1.0"),
    "two equal Host on HTTP/1.0": request("Host: a", "Host: a", start="GET / HTTP/1.0"),
    "Host with a path": request("Host: a/b", start="GET / HTTP/1.1"),
    "Host with userinfo": request("Host: u@a", start="GET / HTTP/1.1"),
    "Host with a space": request("Host: a b", start="GET / HTTP/1.1"),
    "Host with a letter port": request("Host: a:8o", start="GET / HTTP/1.1"),
    "Host with a comma list": request("Host: a, b", start="GET / HTTP/1.1"),
    "missing Host on HTTP/1.1": request("X: 1", start="GET / HTTP/1.1"),
}


@pytest.mark.parametrize("raw", BAD_HOSTS.values(), ids=BAD_HOSTS.keys())
def test_bad_host_is_rejected(raw: bytes) -> None:
    """Missing (1.1), repeated (any version) or invalid Host is a 400."""
    with pytest.raises(BadHost) as info:
        parse_request_head(raw)
    assert info.value.status == 400


@pytest.mark.parametrize("host", ["a.example", "a.example:8080", "127.0.0.1:1", "[::1]:8080", "[::1]", "", "xn--e1a"])
def test_valid_hosts_are_accepted(host: str) -> None:
    """reg-name, IPv4, IP-literal, with or without port, and the empty Host are valid (RFC 9110 §7.2)."""
    assert parse_request_head(request(f"Host: {host}", start="GET / HTTP/1.1")).head.get("host") == host


# -- absolute-form (RFC 9112 §3.2.2) ------------------------------------------


@pytest.mark.parametrize(
    ("target", "host", "origin", "new_host"),
    [
        ("http://a.example/x?y=1", "a.example", "/x?y=1", "a.example"),
        ("http://A.Example/x", "a.example", "/x", "A.Example"),
        ("http://a.example:80/x", "a.example", "/x", "a.example:80"),
        ("http://a.example/x", "a.example:80", "/x", "a.example"),
        ("https://a.example:443/", "a.example", "/", "a.example:443"),
        ("http://a.example:8080", "a.example:8080", "/", "a.example:8080"),
        ("http://a.example?next=/admin", "a.example", "/?next=/admin", "a.example"),
        ("HTTP://a.example/x", "a.example", "/x", "a.example"),
        ("http://[::1]:9000/ws", "[::1]:9000", "/ws", "[::1]:9000"),
    ],
)
def test_absolute_form_is_rewritten_to_origin_form(target: str, host: str, origin: str, new_host: str) -> None:
    """The target becomes origin-form and Host is taken from the authority; the original is kept."""
    parsed = parse_request_head(request(f"Host: {host}", "X: 1", start=f"GET {target} HTTP/1.1"))
    assert parsed.target == origin
    assert parsed.absolute_target == target
    assert parsed.head.get_all("host") == [new_host]
    assert [name for name, _ in parsed.head.headers] == ["Host", "X"]  # Host keeps its place
    assert parsed.head.start_line[1] == origin


def test_absolute_form_on_http10_without_host_gains_host() -> None:
    """An HTTP/1.0 absolute-form request without Host gets one from its authority."""
    parsed = parse_request_head(request(start="GET http://a.example:81/p HTTP/1.0"))
    assert parsed.target == "/p"
    assert parsed.head.headers == (("Host", "a.example:81"),)


def test_origin_form_is_left_alone() -> None:
    """An origin-form request has no absolute_target and keeps its Host."""
    parsed = parse_request_head(request("Host: a", start="GET /x HTTP/1.1"))
    assert parsed.absolute_target is None
    assert parsed.target == "/x"


BAD_ABSOLUTE = {
    "userinfo": ("http://user@a.example/x", "a.example"),
    "userinfo spoof": ("http://a.example@evil.example/x", "a.example"),
    "empty authority": ("http:///x", "a.example"),
    "authority with space-like junk": ('http://a.exa"mple/x', "a.example"),
}


@pytest.mark.parametrize(("target", "host"), BAD_ABSOLUTE.values(), ids=BAD_ABSOLUTE.keys())
def test_absolute_form_without_a_usable_authority_is_rejected(target: str, host: str) -> None:
    """An absolute-form target must name a host, without userinfo: else 400."""
    with pytest.raises(BadHost) as info:
        parse_request_head(request(f"Host: {host}", start=f"GET {target} HTTP/1.1"))
    assert info.value.status == 400


OTHER_AUTHORITY = {
    "other host": ("http://good.example/x?q=1", "evil.example", "good.example", "/x?q=1"),
    "other port": ("http://a.example:8080/x", "a.example", "a.example:8080", "/x"),
    "default port of the other scheme": ("https://a.example:80/x", "a.example", "a.example:80", "/x"),
    "no path": ("http://good.example", "evil.example", "good.example", "/"),
}


@pytest.mark.parametrize(("target", "host", "authority", "origin"), OTHER_AUTHORITY.values(),
                         ids=OTHER_AUTHORITY.keys())
def test_absolute_form_replaces_a_host_that_names_another_authority(
    target: str, host: str, authority: str, origin: str
) -> None:
    """RFC 9112 §3.2.2: the received Host is ignored for the target's authority, and the request goes
    on in origin-form: a backend sees one host, never two that disagree."""
    parsed = parse_request_head(request(f"Host: {host}", start=f"GET {target} HTTP/1.1"))
    assert parsed.target == origin
    assert parsed.head.get_all("host") == [authority]
    assert [value for name, value in parsed.head.headers if name.lower() == "host"] == [authority]


# -- `_` aliases of our headers -----------------------------------------------

ALIASES = [
    "X_Forwarded_For",
    "X-Forwarded_For",
    "x_forwarded_proto",
    "X_FORWARDED_HOST",
    "X_Forwarded_Anything",
    "X_Real_IP",
    "X-Real_Ip",
    "X_Request_Id",
    "X_LB_Affinity",
    "Content_Length",
    "Transfer_Encoding",
    "Sec_WebSocket_Version",
    "Sec-WebSocket_Extensions",
    "Host_",
]


@pytest.mark.parametrize("name", ALIASES)
def test_underscore_aliases_of_our_headers_are_dropped(name: str) -> None:
    """A name that reads as one of ours once `_` is `-` is dropped (and reported), the rest kept."""
    if name == "Host_":  # not an alias: `host-` is not `host`
        parsed = parse_request_head(request("Host: a", f"{name}: 1", start="GET / HTTP/1.1"))
        assert parsed.dropped == ()
        return
    parsed = parse_request_head(request("Host: a", f"{name}: 6.6.6.6", "X-Keep: 1", start="GET / HTTP/1.1"))
    assert parsed.dropped == (name,)
    assert parsed.head.headers == (("Host", "a"), ("X-Keep", "1"))
    assert parsed.head.get(name) is None
    assert parsed.content_length is None


def test_dropped_content_length_alias_does_not_frame() -> None:
    """`Content_Length` next to a real Transfer-Encoding is not a CL+TE conflict: the alias is gone."""
    parsed = parse_request_head(request("Host: a", "Content_Length: 5", "Transfer-Encoding: chunked"))
    assert parsed.chunked
    assert parsed.dropped == ("Content_Length",)


def test_other_underscore_names_pass() -> None:
    """Underscores elsewhere (names of the application's own) are forwarded untouched."""
    parsed = parse_request_head(request("Host: a", "X_App_Token: t", "Cookie: LB_AFFINITY=v", start="GET / HTTP/1.1"))
    assert parsed.dropped == ()
    assert parsed.head.get("x_app_token") == "t"


def test_configured_affinity_header_is_protected() -> None:
    """A non-default affinity header is protected when passed in `protected`."""
    raw = request("Host: a", "X_Sticky: forged", start="GET / HTTP/1.1")
    assert parse_request_head(raw).dropped == ()
    parsed = parse_request_head(raw, protected=protected_headers("X-Sticky"))
    assert parsed.dropped == ("X_Sticky",)
    assert protected_headers("X-Sticky") == PROTECTED_HEADERS | {"x-sticky"}


def test_every_required_name_is_protected() -> None:
    """The brief's list: X-Forwarded-*, X-Real-IP, Forwarded, X-Request-Id and the affinity header."""
    assert {"x-forwarded-for", "x-real-ip", "forwarded", "x-request-id", "x-lb-affinity"} <= PROTECTED_HEADERS


# -- incremental head search ----------------------------------------------------


# Heads of line ends (CRLF, bare LF and CR) and field text as well as random bytes: these hold the
# bare LF that is refused, or a CR an end may follow, where random bytes seldom do.
_HEAD_PIECES = st.sampled_from([b"\r\n", b"\n", b"\r", b"\r\n\r", b"Host: a", b"GET / HTTP/1.1"])
_HEAD_PIECES |= st.binary(max_size=6)


@st.composite
def _reads(draw: st.DrawFn) -> tuple[bytes, list[int], bytes]:
    """A head without its end, where the reads are cut (one at least, half the time one inside the
    end), and what follows the end."""
    head = draw(st.binary(max_size=60) | st.lists(_HEAD_PIECES, max_size=12).map(b"".join))
    head = head.replace(b"\r\n\r\n", b"")
    cuts = draw(st.lists(st.integers(min_value=0, max_value=70), min_size=1, max_size=6))
    if draw(st.booleans()):
        cuts.append(len(head) + draw(st.integers(1, 3)))
    return head, cuts, draw(st.binary(max_size=10))


@settings(max_examples=200, deadline=None)
@given(reads=_reads())
def test_incremental_search_finds_the_end_wherever_reads_split_it(reads: tuple[bytes, list[int], bytes]) -> None:
    """Searching each read from the previous length finds the same end as one whole search.

    Or, when a bare LF comes before the end, refuses the head (BadRequest) as soon as a read holds
    it and no end yet: a head that may never end in CRLFCRLF is not waited for.
    """
    head, cuts, tail = reads
    whole = head + HEAD_END + tail
    expected = find_head_end(whole, 1000)
    buffer = bytearray()
    searched = 0
    found = -1
    for cut in [*sorted(cuts), len(whole)]:
        if cut <= len(buffer):
            continue
        buffer += whole[len(buffer) : cut]
        try:
            found = find_head_end(buffer, 1000, searched)
        except BadRequest:
            assert re.search(rb"(?<!\r)\n", bytes(buffer)) and bytes(buffer).find(HEAD_END) < 0
            return
        if found >= 0:
            break
        searched = len(buffer)
    assert found == expected


def test_incremental_search_with_caller_already_backing_off() -> None:
    """A caller that passes `len - 3` itself still finds a split end."""
    buffer = bytearray(b"GET / HTTP/1.1\r\nHost: a\r\n\r")
    assert find_head_end(buffer, 100, 0) == -1
    searched = len(buffer) - 3
    buffer += b"\n"
    assert find_head_end(buffer, 100, searched) == len(buffer)


def test_incremental_search_keeps_the_limit() -> None:
    """The size limit holds whatever `start` is."""
    with pytest.raises(HeadersTooLarge):
        find_head_end(b"x" * 100, 100, 97)
    with pytest.raises(HeadersTooLarge):
        find_head_end(b"x" * 98 + HEAD_END, 100, 98)


@pytest.mark.parametrize(
    "field",
    [
        b"Transfer-Encoding: chunked\x85",
        b"Transfer-Encoding: \xa0chunked",
        b"Content-Length: 5\xa0",
        b"Content-Length: \x855",
        b"Transfer-Encoding: gzip,\xa0chunked",
    ],
)
def test_framing_values_are_trimmed_of_space_and_tab_only(field: bytes) -> None:
    """NBSP (0xA0) and NEL (0x85) are not OWS: `chunked\\x85` is not chunked, `5\\xa0` is not a length.

    A bare str.strip() took them off, so we framed a body a backend may read differently (llhttp refuses).
    """
    with pytest.raises(BadFraming):
        parse_request_head(b"POST / HTTP/1.1\r\nHost: a\r\n" + field + b"\r\n\r\n")
    with pytest.raises(BadFraming):
        parse_response_head(b"HTTP/1.1 200 OK\r\n" + field + b"\r\n\r\n")


def test_connection_tokens_are_trimmed_of_space_and_tab_only() -> None:
    """`Connection: close\\xa0` does not ask to close, and `Upgrade: websocket\\x85` is no WebSocket upgrade."""
    request = parse_request_head(
        b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close\xa0, Upgrade\r\nUpgrade: websocket\x85\r\n\r\n"
    )
    assert not request.head.has_token("connection", "close")
    assert request.head.has_token("connection", "upgrade")
    assert not request.head.has_token("upgrade", "websocket")


# -- Host answers remembered ----------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(st.lists(st.text(st.characters(max_codepoint=0x7F), max_size=12) | st.sampled_from(["a:80", "[::1]:8", "a b"]),
                max_size=20))
def test_a_remembered_host_answer_is_the_patterns_asked_twice(hosts: list[str]) -> None:
    from lb.http import head

    for value in hosts + hosts:
        assert head.is_host(value) is (head._HOST.match(value) is not None)


def test_the_hosts_remembered_are_bounded_in_number_and_length() -> None:
    from lb.http import head

    for n in range(3 * head._MAX_HOSTS_REMEMBERED):
        assert head.is_host(f"h{n}.example:8080")
        assert len(head._hosts_seen) <= head._MAX_HOSTS_REMEMBERED
    long = "a" * (head._MAX_HOST_REMEMBERED + 1)
    assert head.is_host(long) and long not in head._hosts_seen


# -- Header names asked for, lowered once --------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["Host", "HOST", "host", "Sec-WebSocket-Key", "x-a", "X-A", "Cookie", "İ", "ß"]),
                min_size=1, max_size=8),
       st.sampled_from(["websocket", "WebSocket", "UPGRADE", "upgrade"]))
def test_names_and_tokens_are_matched_case_insensitively_asked_any_number_of_times(
    names: list[str], token: str
) -> None:
    raw = (b"GET / HTTP/1.1\r\nHost: a\r\nSec-WebSocket-Key: k\r\nX-A: 1\r\nX-A: 2\r\nCookie: c=1\r\n"
           b"Connection: keep-alive, Upgrade\r\nUpgrade: WebSocket\r\n\r\n")
    request = parse_request_head(raw)
    expected = {"host": ["a"], "sec-websocket-key": ["k"], "x-a": ["1", "2"], "cookie": ["c=1"]}
    for name in names + names:
        assert request.head.get_all(name) == expected.get(name.lower(), [])
        assert request.head.get(name) == (expected.get(name.lower()) or [None])[0]
    assert request.head.has_token("connection", token) is (token.lower() == "upgrade")
    assert request.head.has_token("Upgrade", token) is (token.lower() == "websocket")


def test_the_names_lowered_are_bounded() -> None:
    from lb.http import head

    request = parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nX-7: seven\r\n\r\n")
    for n in range(3 * head._MAX_NAMES_REMEMBERED):
        assert request.head.get(f"X-{n}") == ("seven" if n == 7 else None)
        assert len(head._names_lowered) <= head._MAX_NAMES_REMEMBERED

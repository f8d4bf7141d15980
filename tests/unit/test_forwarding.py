"""Heads rebuilt across the balancer: hop-by-hop rules, X-Forwarded-*, cookies, our own error answers."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.http import forwarding
from lb.http.client_address import TrustedProxies, forwarded_for
from lb.http.forwarding import (
    is_form_name,
    render_client_response,
    render_forwarded_request,
    render_interim,
    render_refusal,
)
from lb.http.head import PROXY_CLAIMS, RequestHead, ResponseHead, parse_request_head, parse_response_head


def request(*headers: str, start: str = "GET /ws?x=1 HTTP/1.1") -> RequestHead:
    return parse_request_head(("\r\n".join([start, *headers]) + "\r\n\r\n").encode("latin-1"))


def forwarded(
    req: RequestHead,
    *,
    client_ip: str = "203.0.113.7",
    proto: str = "https",
    websocket: bool = False,
    rewrite_cookie: Callable[[str], str | None] | None = None,
) -> RequestHead:
    """Forward `req` and parse the result with our own strict parser (so it is valid HTTP/1.1 too)."""
    raw = render_forwarded_request(
        req, forwarded_for=client_ip, proto=proto, websocket=websocket, rewrite_cookie=rewrite_cookie
    )
    return parse_request_head(raw)


def names(req: RequestHead) -> list[str]:
    return [name.lower() for name, _ in req.head.headers]


def test_request_line_and_end_to_end_headers_pass_unchanged() -> None:
    """Method, target and end-to-end headers reach the backend as sent, in order."""
    out = forwarded(request("Host: lb.example", "Accept: */*", "X-Custom: a,  b", "Origin: https://app"))
    assert out.head.start_line == ("GET", "/ws?x=1", "HTTP/1.1")
    assert out.head.headers[:4] == (
        ("Host", "lb.example"),
        ("Accept", "*/*"),
        ("X-Custom", "a,  b"),
        ("Origin", "https://app"),
    )


def test_hop_by_hop_headers_are_removed() -> None:
    """Connection, Keep-Alive, Proxy-*, TE and Upgrade from the client do not reach the backend; Trailer,
    end-to-end (RFC 9110 §6.6.2), does."""
    out = forwarded(
        request(
            "Host: a",
            "Keep-Alive: timeout=5",
            "Proxy-Connection: keep-alive",
            "TE: trailers",
            "Trailer: X-Sum",
            "Upgrade: h2c",
            "Proxy-Authorization: Basic eDp5",
            "Connection: keep-alive",
            "Accept: */*",
        )
    )
    # Named here, not read from HOP_BY_HOP: a name left out of that set would leave this test passing.
    assert not set(names(out)) & {"keep-alive", "proxy-connection", "te", "upgrade", "proxy-authorization"}
    assert out.head.get_all("connection") == ["close"]
    assert out.head.get("accept") == "*/*"
    assert out.head.get("trailer") == "X-Sum"


def test_the_websocket_handshake_headers_cannot_be_made_hop_by_hop() -> None:
    """They were checked here; listed in Connection, they would reach the backend missing (its 400)."""
    out = forwarded(
        request("Host: a", "Upgrade: websocket", "Connection: Upgrade, Sec-WebSocket-Key, Sec-WebSocket-Version",
                "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"),
        websocket=True,
    )
    assert out.head.get("sec-websocket-key") == "dGhlIHNhbXBsZSBub25jZQ=="
    assert out.head.get("sec-websocket-version") == "13"


def test_headers_listed_in_connection_are_removed() -> None:
    """Names the client lists in Connection are hop-by-hop too (RFC 9110 §7.6.1)."""
    out = forwarded(request("Host: a", "Connection: X-Secret, keep-alive", "x-secret: 1", "X-Kept: 2"))
    assert "x-secret" not in names(out)
    assert out.head.get("x-kept") == "2"


@pytest.mark.parametrize("lines", [
    ("Connection: Upgrade", "Connection: X-Secret"),  # each line alone lists something: two lines are read
    ("Connection: keep-alive, Upgrade", "Connection: x-secret"),
    ("Connection: Upgrade, X-Secret",),
    ("Connection: upgrade,X-SECRET",),
])
def test_headers_listed_in_any_connection_line_are_removed(lines: tuple[str, ...]) -> None:
    """A Connection value a browser sends, with a name of the client's beside it or on a line of its own."""
    out = forwarded(request("Host: a", "Upgrade: websocket", *lines, "X-Secret: 1", "X-Kept: 2"))
    assert "x-secret" not in names(out)
    assert out.head.get("x-kept") == "2"


def test_transfer_encoding_travels_with_the_body() -> None:
    """Transfer-Encoding is kept: the body is relayed as it came."""
    out = forwarded(request("Host: a", "Transfer-Encoding: chunked", start="POST /up HTTP/1.1"))
    assert out.head.get("transfer-encoding") == "chunked"


def test_x_forwarded_for_from_an_untrusted_peer_is_replaced() -> None:
    """A client's own X-Forwarded-For chain is never passed on from an untrusted peer (SPEC part 2)."""
    req = request("Host: a", "X-Forwarded-For: 198.51.100.1", "x-forwarded-for: 10.0.0.1, 10.0.0.2")
    value = forwarded_for("203.0.113.7", req.head.get_all("x-forwarded-for"), TrustedProxies())
    out = forwarded(req, client_ip=value)
    assert out.head.get_all("x-forwarded-for") == ["203.0.113.7"]


def test_x_forwarded_for_from_a_trusted_peer_keeps_the_chain() -> None:
    """A trusted proxy's chain is kept and the proxy's own address appended, as each hop does."""
    req = request("Host: a", "X-Forwarded-For: 198.51.100.1", "x-forwarded-for: 10.0.0.1, 10.0.0.2")
    trusted = TrustedProxies.parse(["203.0.113.0/24"])
    value = forwarded_for("203.0.113.7", req.head.get_all("x-forwarded-for"), trusted)
    out = forwarded(req, client_ip=value)
    assert out.head.get_all("x-forwarded-for") == ["198.51.100.1, 10.0.0.1, 10.0.0.2, 203.0.113.7"]


def test_x_forwarded_for_without_chain_is_the_client_ip() -> None:
    """Without a prior chain, X-Forwarded-For is the client IP alone."""
    out = forwarded(request("Host: a"), client_ip="2001:db8::1")
    assert out.head.get_all("x-forwarded-for") == ["2001:db8::1"]


@pytest.mark.parametrize("proto", ["http", "https"])
def test_proto_and_host_are_set(proto: str) -> None:
    """X-Forwarded-Proto is the listener's scheme and X-Forwarded-Host the client's Host."""
    out = forwarded(request("Host: lb.example:8443"), proto=proto)
    assert out.head.get_all("x-forwarded-proto") == [proto]
    assert out.head.get_all("x-forwarded-host") == ["lb.example:8443"]
    assert out.head.get_all("host") == ["lb.example:8443"]


def test_client_sent_forwarded_proto_and_host_are_replaced() -> None:
    """A client cannot choose X-Forwarded-Proto or X-Forwarded-Host: ours replace theirs."""
    out = forwarded(
        request(
            "Host: real.example",
            "X-Forwarded-Proto: https",
            "X-Forwarded-Host: evil.example",
            "x-forwarded-host: evil2.example",
        ),
        proto="http",
    )
    assert out.head.get_all("x-forwarded-proto") == ["http"]
    assert out.head.get_all("x-forwarded-host") == ["real.example"]


def test_websocket_keeps_the_upgrade() -> None:
    """A WebSocket handshake is forwarded with exactly Connection: Upgrade and Upgrade: websocket."""
    out = forwarded(
        request(
            "Host: a",
            "Connection: keep-alive, Upgrade",
            "Upgrade: WebSocket",
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==",
            "Sec-WebSocket-Version: 13",
            "Sec-WebSocket-Protocol: chat, superchat",
            "Sec-WebSocket-Extensions: permessage-deflate",
        ),
        websocket=True,
    )
    assert out.head.get_all("connection") == ["Upgrade"]
    assert out.head.get_all("upgrade") == ["websocket"]
    assert out.head.get("sec-websocket-key") == "dGhlIHNhbXBsZSBub25jZQ=="
    assert out.head.get("sec-websocket-version") == "13"
    assert out.head.get("sec-websocket-protocol") == "chat, superchat"
    assert out.head.get("sec-websocket-extensions") == "permessage-deflate"


def test_plain_request_asks_backend_to_close() -> None:
    """A plain HTTP request is forwarded with Connection: close and no Upgrade."""
    out = forwarded(request("Host: a", "Connection: keep-alive", "Upgrade: websocket"), websocket=False)
    assert out.head.get_all("connection") == ["close"]
    assert out.head.get_all("upgrade") == []


@pytest.mark.parametrize("version", ["HTTP/1.0", "HTTP/1.1"])
def test_the_backend_receives_the_clients_version(version: str) -> None:
    """So it answers an HTTP/1.0 client as one: no chunked body, no 1xx (RFC 9112 §6.1, RFC 9110 §15.2)."""
    out = forwarded(request("Host: a", start=f"GET / {version}"))
    assert out.version == version


def test_http10_without_host_is_forwarded_with_a_host() -> None:
    """An HTTP/1.0 request without Host reaches the backend with one (RFC 9112 §3.2), for its routing."""
    out = forwarded(request(start="GET / HTTP/1.0"))
    assert out.version == "HTTP/1.0"
    assert len(out.head.get_all("host")) == 1
    assert out.head.get_all("x-forwarded-host") == []


def test_cookie_rewrite_callback_is_applied_per_header() -> None:
    """Each Cookie header goes through the rewrite callback; other headers do not."""
    seen: list[str] = []

    def rewrite(value: str) -> str | None:
        seen.append(value)
        return value.upper()

    out = forwarded(request("Host: a", "Cookie: a=1", "X-Other: b=2", "cookie: c=3"), rewrite_cookie=rewrite)
    assert seen == ["a=1", "c=3"]
    assert out.head.get_all("cookie") == ["A=1", "C=3"]
    assert out.head.get("x-other") == "b=2"


def test_cookie_rewrite_returning_none_drops_the_header() -> None:
    """A rewrite callback answering None removes that Cookie header entirely."""
    out = forwarded(
        request("Host: a", "Cookie: LB_AFFINITY=t", "Cookie: app=1"),
        rewrite_cookie=lambda value: None if value.startswith("LB_AFFINITY") else value,
    )
    assert out.head.get_all("cookie") == ["app=1"]


def test_no_rewrite_callback_keeps_cookies() -> None:
    """Without a callback, Cookie headers pass unchanged."""
    out = forwarded(request("Host: a", "Cookie: LB_AFFINITY=t; app=1"))
    assert out.head.get_all("cookie") == ["LB_AFFINITY=t; app=1"]


# -- responses --------------------------------------------------------------

SWITCHING = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n"
    b"Set-Cookie: app=1\r\n\r\n"
)


def test_switching_response_keeps_backend_headers_and_adds_cookie() -> None:
    """The 101 reaches the client with all the backend's headers, then our Set-Cookie."""
    out = render_client_response(
        parse_response_head(SWITCHING), switching=True, set_cookies=["LB_AFFINITY=tok; Path=/"], extra=[]
    )
    assert out == SWITCHING[:-2] + b"Set-Cookie: LB_AFFINITY=tok; Path=/\r\n\r\n"


def test_switching_response_without_cookie_is_unchanged() -> None:
    """A 101 with no cookie to issue is the backend's answer byte for byte."""
    out = render_client_response(parse_response_head(SWITCHING), switching=True, set_cookies=[], extra=[])
    assert out == SWITCHING


def test_other_response_strips_hop_by_hop_and_closes() -> None:
    """A non-101 answer loses hop-by-hop headers and says Connection: close; the backend's cookies stay."""
    raw = (
        b"HTTP/1.1 403 Forbidden\r\nConnection: keep-alive, X-Hop\r\nKeep-Alive: timeout=5\r\n"
        b"X-Hop: 1\r\nUpgrade: websocket\r\nSet-Cookie: app=1\r\nContent-Length: 6\r\n"
        b"Transfer-Encoding-Not: x\r\n\r\n"
    )
    out = parse_response_head(
        render_client_response(parse_response_head(raw), switching=False, set_cookies=["LB=t"], extra=[("X-E", "1")])
    )
    assert (out.status, out.reason) == (403, "Forbidden")
    assert out.head.headers == (
        ("Set-Cookie", "app=1"),
        ("Content-Length", "6"),
        ("Transfer-Encoding-Not", "x"),
        ("Connection", "close"),
        ("Cache-Control", "private"),  # with our cookie, no shared cache may keep it
        ("Set-Cookie", "LB=t"),
        ("X-E", "1"),
    )


def test_refused_upgrade_with_101_like_headers_is_not_switching() -> None:
    """A 101 rendered as not switching (plain request) still loses Upgrade and closes."""
    out = parse_response_head(
        render_client_response(parse_response_head(SWITCHING), switching=False, set_cookies=[], extra=[])
    )
    assert out.head.get_all("connection") == ["close"]
    assert out.head.get_all("upgrade") == []


def test_empty_reason_phrase_round_trips() -> None:
    """A backend answer without a reason phrase reaches the client with its status intact."""
    out = render_client_response(
        parse_response_head(b"HTTP/1.1 204\r\n\r\n"), switching=False, set_cookies=[], extra=[]
    )
    parsed = parse_response_head(out)
    assert (parsed.status, parsed.reason) == (204, "")
    assert parsed.head.headers == (("Connection", "close"),)


@pytest.mark.parametrize(
    "name", [
        "X_Forwarded_For", "x_forwarded_proto", "X-Forwarded_Host", "Transfer_Encoding", "Content_Length",
        "Sec_WebSocket_Key", "Sec-WebSocket_Protocol",
    ]
)
def test_underscore_aliases_of_our_headers_are_dropped(name: str) -> None:
    """CGI-style backends read `_` as `-`: a client's X_Forwarded_For would forge the real one."""
    out = forwarded(request("Host: a", f"{name}: 6.6.6.6", "X_Other_Thing: kept"))
    assert name.lower() not in names(out)
    assert "x_other_thing" in names(out)
    assert out.head.get_all("x-forwarded-for") == ["203.0.113.7"]


def test_absolute_form_goes_out_in_origin_form_with_host_from_its_authority() -> None:
    out = forwarded(request("Host: game.example", start="GET http://game.example/ws?x=1 HTTP/1.1"))
    assert out.target == "/ws?x=1"
    assert out.head.get_all("host") == ["game.example"]
    assert out.head.get("x-forwarded-host") == "game.example"


def test_refusal_names_status_reason_and_request_id_only() -> None:
    out = render_refusal(502, "Bad Gateway", "abc123", {})
    head, _, body = out.partition(b"\r\n\r\n")
    parsed = parse_response_head(head + b"\r\n\r\n")
    assert (parsed.status, parsed.head.get("x-request-id"), parsed.head.get("connection")) == (502, "abc123", "close")
    assert body == b"502 Bad Gateway\nrequest id: abc123\n"
    assert parsed.head.get("content-length") == str(len(body))


def test_a_refusal_that_offers_an_upgrade_lists_it_in_connection() -> None:
    """A 426 carries Upgrade: websocket, and a sender of Upgrade lists it in Connection (RFC 9110 §7.8)."""
    out = render_refusal(426, "Upgrade Required", "abc123", {"Sec-WebSocket-Version": "13", "Upgrade": "websocket"})
    parsed = parse_response_head(out.partition(b"\r\n\r\n")[0] + b"\r\n\r\n")
    assert parsed.head.get_all("connection") == ["Upgrade, close"]
    assert (parsed.head.get("upgrade"), parsed.head.get("sec-websocket-version")) == ("websocket", "13")


def test_an_empty_reason_keeps_the_status_lines_second_space() -> None:
    """RFC 9112 §4: `HTTP/1.1 200 ` with an empty reason is valid; `HTTP/1.1 200` is not."""
    response = parse_response_head(b"HTTP/1.1 200 \r\nContent-Length: 0\r\n\r\n")
    out = render_client_response(response, switching=False, set_cookies=[], extra=[])
    assert out.startswith(b"HTTP/1.1 200 \r\n")


@pytest.mark.parametrize("trusted_peer", [False, True])
def test_proxy_claims_pass_only_from_a_trusted_peer(trusted_peer: bool) -> None:
    """Forwarded, X-Real-IP, X-Forwarded-Port/-Prefix, True-Client-IP, X-Forwarded-Ssl, X-Forwarded-Client-Cert
    and the rest say who the client is or how it came, and backends believe them: spoofable."""
    claims = ["Forwarded: for=6.6.6.6", "X-Real-IP: 6.6.6.6", "X-Forwarded-Port: 1", "X-Forwarded-Prefix: /evil"]
    claims += [f"{name.title()}: 6.6.6.6" for name in sorted(PROXY_CLAIMS - {"forwarded", "x-real-ip",
                                                                         "x-forwarded-port", "x-forwarded-prefix"})]
    assert len(claims) == len(PROXY_CLAIMS)
    # Named here too, so that one taken out of the set fails this test.
    assert {"true-client-ip", "cf-connecting-ip", "x-forwarded-ssl", "x-forwarded-client-cert", "x-original-url",
            "x-forwarded-user", "remote-user", "x-forwarded-server", "client-ip", "x-forwarded", "forwarded-for",
            "x-remote-addr"} <= PROXY_CLAIMS
    raw = render_forwarded_request(
        request("Host: a", *claims, "X-Request-Id: r1"), forwarded_for="203.0.113.7", proto="http",
        websocket=False, trusted_peer=trusted_peer,
    )
    out = parse_request_head(raw)
    for claim in claims:
        name, _, value = claim.partition(": ")
        assert out.head.get(name) == (value if trusted_peer else None)
    assert out.head.get("x-request-id") == "r1" and out.head.get("x-forwarded-for") == "203.0.113.7"


@pytest.mark.parametrize("status", [100, 103, 204])
@pytest.mark.parametrize("framing", ["Transfer-Encoding: chunked", "Content-Length: 5"])
def test_bodyless_answers_lose_framing_headers(status: int, framing: str) -> None:
    """1xx and 204 have no body (RFC 9112 §6.1-6.2): a length or coding on one would desync the client."""
    response = parse_response_head(f"HTTP/1.1 {status} X\r\n{framing}\r\nX-Kept: 1\r\n\r\n".encode())
    out = parse_response_head(
        render_interim(response, "LB") if status < 200
        else render_client_response(response, switching=False, set_cookies=[], extra=[], keep_alive=True)
    )
    assert out.head.get_all("transfer-encoding") == [] and out.head.get_all("content-length") == []
    assert out.head.get("x-kept") == "1"


def test_a_switch_keeps_only_the_switch_of_the_backends_hop_by_hop_headers() -> None:
    """A 101's Keep-Alive, Connection-listed names and framing speak of the backend's connection to us."""
    raw = (
        b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade, Keep-Alive, X-Hop, Sec-WebSocket-Protocol\r\n"
        b"Keep-Alive: timeout=5\r\nUpgrade: websocket\r\nX-Hop: 1\r\nContent-Length: 0\r\n"
        b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\nSec-WebSocket-Protocol: chat\r\n"
        b"Set-Cookie: app=1\r\nConnection: close\r\n\r\n"
    )
    out = parse_response_head(
        render_client_response(parse_response_head(raw), switching=True, set_cookies=["LB=t"], extra=[])
    )
    assert out.head.headers == (
        ("Connection", "Upgrade"),
        ("Upgrade", "websocket"),
        ("Sec-WebSocket-Accept", "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
        ("Sec-WebSocket-Protocol", "chat"),  # the handshake's own headers cannot be made hop-by-hop
        ("Set-Cookie", "app=1"),
        ("Set-Cookie", "LB=t"),
    )


def test_an_interim_answer_loses_the_backends_hop_by_hop_headers() -> None:
    """103 Early Hints keeps its Link headers; its Connection and what that lists are the backend's."""
    raw = b"HTTP/1.1 103 Early Hints\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nLink: </a.css>\r\n\r\n"
    out = parse_response_head(render_interim(parse_response_head(raw), "LB"))
    assert (out.status, out.reason, out.head.headers) == (103, "Early Hints", (("Link", "</a.css>"),))


@pytest.mark.parametrize(
    ("claims", "proto", "host"),
    [
        (["X-Forwarded-Proto: https", "X-Forwarded-Host: game.example:443"], "https", "game.example:443"),
        (["X-Forwarded-Proto: HTTPS, http", "X-Forwarded-Host: a.example, b.example"], "https", "a.example"),
        (["X-Forwarded-Proto: gopher", "X-Forwarded-Host: bad host"], "http", "lb.internal"),  # not valid: ours
        (["X-Forwarded-Proto: ", "X-Forwarded-Host: ,x"], "http", "lb.internal"),
        (["X-Forwarded-Proto: https\t, http", "X-Forwarded-Host: a.example , b.example"], "https", "a.example"),
        (["X-Forwarded-Proto: https", "X-Forwarded-Proto: http", "X-Forwarded-Host: a.example",
          "X-Forwarded-Host: b.example"], "https", "a.example"),  # the first line is the client's side
        ([], "http", "lb.internal"),
    ],
    ids=["plain", "lists", "invalid", "empty", "blanks before the comma", "two lines", "none"],
)
def test_a_trusted_proxys_scheme_and_host_stand(claims: list[str], proto: str, host: str) -> None:
    """Behind a TLS-terminating front in trusted_proxies, the backend hears https and the host the client
    asked for, as it hears that proxy's X-Forwarded-Port; an invalid claim is replaced by ours."""
    req = request("Host: lb.internal", *claims)
    raw = render_forwarded_request(req, forwarded_for="203.0.113.7", proto="http", websocket=False, trusted_peer=True)
    out = parse_request_head(raw)
    assert (out.head.get_all("x-forwarded-proto"), out.head.get_all("x-forwarded-host")) == ([proto], [host])
    assert out.head.get("host") == "lb.internal"


def test_an_untrusted_peers_scheme_and_host_are_replaced() -> None:
    req = request("Host: lb.internal", "X-Forwarded-Proto: https", "X-Forwarded-Host: evil.example")
    out = parse_request_head(render_forwarded_request(req, forwarded_for="203.0.113.7", proto="http", websocket=False))
    assert (out.head.get_all("x-forwarded-proto"), out.head.get_all("x-forwarded-host")) == (["http"], ["lb.internal"])


def test_an_http_1_0_request_without_host_still_gets_one_behind_a_trusted_proxy() -> None:
    req = request("X-Forwarded-Host: game.example", start="GET /x HTTP/1.0")
    raw = render_forwarded_request(
        req, forwarded_for="203.0.113.7", proto="http", websocket=False, backend_host="10.0.0.5:9001",
        trusted_peer=True,
    )
    out = parse_request_head(raw)
    assert (out.head.get("host"), out.head.get("x-forwarded-host")) == ("10.0.0.5:9001", "game.example")


def relayed(raw: bytes) -> ResponseHead:
    """A backend's answer as the client gets it (no cookie of ours)."""
    answer = render_client_response(parse_response_head(raw), switching=False, set_cookies=[], extra=[])
    return parse_response_head(answer)


@pytest.mark.parametrize(
    "lengths",
    [b"Content-Length: 2, 2\r\n", b"Content-Length: 2\r\nContent-Length: 2\r\n", b"Content-Length: 2 ,2\r\n"],
)
def test_equal_content_lengths_go_out_as_one(lengths: bytes) -> None:
    """RFC 9110 §8.6: taken as one value, and sent on as one (Node's and aiohttp's clients refuse the list)."""
    raw = b"HTTP/1.1 200 OK\r\nX-A: 1\r\n" + lengths + b"X-B: 2\r\n\r\n"
    out = relayed(raw)
    assert out.head.headers == (("X-A", "1"), ("Content-Length", "2"), ("X-B", "2"), ("Connection", "close"))


def test_a_chunked_answer_keeps_its_trailer_announcement_and_a_204_loses_it() -> None:
    raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTrailer: X-Checksum\r\n\r\n"
    out = relayed(raw)
    assert out.head.get("trailer") == "X-Checksum"
    empty = b"HTTP/1.1 204 No Content\r\nTrailer: X-Checksum\r\n\r\n"
    out = relayed(empty)
    assert out.head.get("trailer") is None


@pytest.mark.parametrize(
    ("cache_control", "added"),
    [
        (None, True),
        ("public, max-age=3600", True),
        ("max-age=60, s-maxage=600", True),
        ("no-cache", True),  # stored, then revalidated: our cookie would still be served from it
        ("Private", False),
        ('private="Set-Cookie"', True),  # storable without Set-Cookie, but with X-LB-Affinity
        ("max-age=0, no-store", False),
    ],
)
def test_an_answer_carrying_our_cookie_is_kept_from_shared_caches(cache_control: str | None, added: bool) -> None:
    """HAProxy's `cookie ... insert nocache`: a CDN must not hand one token to every user."""
    extra = f"Cache-Control: {cache_control}\r\n" if cache_control else ""
    raw = f"HTTP/1.1 200 OK\r\n{extra}Content-Length: 0\r\n\r\n".encode()
    response = parse_response_head(raw)
    out = parse_response_head(render_client_response(response, switching=False, set_cookies=["LB=t"], extra=[]))
    said = out.head.get_all("cache-control")
    assert said == ([cache_control] if cache_control else []) + (["private"] if added else [])
    assert relayed(raw).head.get_all("cache-control") == ([cache_control] if cache_control else [])  # no cookie


def test_a_backend_cookie_sealed_in_rewrite_mode_is_kept_from_shared_caches_too() -> None:
    raw = b"HTTP/1.1 200 OK\r\nCache-Control: public, max-age=600\r\nSet-Cookie: SID=abc\r\nContent-Length: 0\r\n\r\n"
    out = parse_response_head(render_client_response(
        parse_response_head(raw), switching=False, set_cookies=[], extra=[("X-LB-Affinity", "t")],
        rewrite_set_cookie=lambda value: "SID=sealed",
    ))
    assert out.head.get_all("cache-control") == ["public, max-age=600", "private"]
    assert out.head.get("set-cookie") == "SID=sealed"


def test_a_switch_carrying_our_cookie_is_not_marked_private() -> None:
    out = render_client_response(parse_response_head(SWITCHING), switching=True, set_cookies=["LB=t"], extra=[])
    assert b"Cache-Control" not in out


_FORM_PIECES = st.sampled_from(
    ["lb_affinity", "lb", "_", "%5F", "%5f", "%6C", "+", " ", "%", "%2", "%C3%A9", "a", "%FF"]
)


_NAMES = ["lb_affinity", "uid", "a b", "é"]


@st.composite
def _keys_and_names(draw: st.DrawFn) -> tuple[str, str]:
    """A name, and a key: pieces at random, or one spelling the name (each character as itself,
    %XX of its UTF-8 bytes in either case, or + for a space), as it is or with a piece more or a
    character less."""
    name = draw(st.sampled_from(_NAMES))
    edit = draw(st.sampled_from(["random", "random", "none", "none", "none", "add", "drop"]))
    if edit == "random":
        return draw(st.lists(_FORM_PIECES, max_size=8).map("".join)), name
    key = ""
    for character in name:
        spellings = [character, "".join(f"%{byte:02X}" for byte in character.encode())]
        spellings += [spellings[1].lower()] + (["+"] if character == " " else [])
        key += draw(st.sampled_from(spellings))
    at = draw(st.integers(0, len(key) - 1))
    if edit == "add":
        return key[:at] + draw(_FORM_PIECES) + key[at:], name
    return (key[:at] + key[at + 1 :] if edit == "drop" else key), name


@given(_keys_and_names())
def test_a_query_key_is_the_name_exactly_when_it_decodes_to_it(key_and_name: tuple[str, str]) -> None:
    """The length bound that spares a hostile query its decodes never changes the answer."""
    from urllib.parse import unquote_plus

    key, name = key_and_name
    assert is_form_name(key, name) == (unquote_plus(key, errors="surrogateescape") == name)


@pytest.mark.parametrize("connection", ["Upgrade", "upgrade", "keep-alive, Upgrade"])
@pytest.mark.parametrize("trusted_peer", [False, True])
@pytest.mark.parametrize("extra", [frozenset(), frozenset({"x-lb-affinity"})])
def test_the_connection_values_taken_as_read_list_only_what_is_dropped_anyway(
    connection: str, trusted_peer: bool, extra: frozenset[str]
) -> None:
    """render_forwarded_request skips reading these Connection values (a field line alone): what they list
    must be dropped anyway."""
    assert connection in forwarding._ONLY_HOP_BY_HOP_LISTED
    raw = f"GET / HTTP/1.1\r\nHost: a\r\nConnection: {connection}\r\n\r\n".encode()
    listed = forwarding._connection_listed(parse_request_head(raw).head)
    assert listed and listed <= forwarding._request_drop(extra, trusted_peer)
    assert forwarding._request_drop(extra, trusted_peer) is forwarding._request_drop(extra, trusted_peer)  # made once


@pytest.mark.parametrize("name", ["True_Client_IP", "X_Forwarded_Ssl", "X-Forwarded_Client_Cert", "X_Original_URL"])
def test_a_proxy_claim_spelled_with_underscores_is_dropped_even_from_a_trusted_peer(name: str) -> None:
    """CGI and WSGI backends read `True_Client_IP` as `True-Client-IP`: a client's name that stands for a
    proxy claim is dropped, as one for X-Real-IP is, whoever sent it."""
    raw = render_forwarded_request(
        parse_request_head(f"GET / HTTP/1.1\r\nHost: a\r\n{name}: 6.6.6.6\r\n\r\n".encode()),
        forwarded_for="203.0.113.7", proto="http", websocket=False, trusted_peer=True,
    )
    assert b"6.6.6.6" not in raw

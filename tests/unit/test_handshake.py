"""WebSocket upgrade checks answered by the balancer before any backend is touched (RFC 6455 §4.2.1)."""

from __future__ import annotations

import base64
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.errors import BadHandshake, UnsupportedVersion
from lb.http.head import RequestHead, ResponseHead, parse_request_head, parse_response_head
from lb.ws.upgrade import check_upgrade, is_websocket_key, is_websocket_upgrade, negotiation_fault, switch_fault

KEY = "dGhlIHNhbXBsZSBub25jZQ=="  # RFC 6455 §1.3's sample nonce: 16 bytes


def upgrade(
    *,
    method: str = "GET",
    version: str = "HTTP/1.1",
    connection: str | None = "Upgrade",
    keys: tuple[str, ...] = (KEY,),
    versions: tuple[str, ...] = ("13",),
    extra: tuple[str, ...] = (),
) -> RequestHead:
    lines = [f"{method} /ws {version}", "Host: lb.example", "Upgrade: websocket"]
    if connection is not None:
        lines.append(f"Connection: {connection}")
    lines += [f"Sec-WebSocket-Key: {key}" for key in keys]
    lines += [f"Sec-WebSocket-Version: {v}" for v in versions]
    lines += extra
    return parse_request_head(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


@pytest.mark.parametrize(
    "request_head",
    [
        upgrade(),
        upgrade(connection="keep-alive, Upgrade"),
        upgrade(connection="UPGRADE"),
        upgrade(keys=("AAAAAAAAAAAAAAAAAAAAAA==",)),
        upgrade(extra=("Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Extensions: permessage-deflate")),
    ],
    ids=["plain", "connection list", "connection case", "zero nonce", "protocol and extensions"],
)
def test_good_upgrade_passes(request_head: RequestHead) -> None:
    """A well-formed RFC 6455 opening handshake is accepted."""
    assert is_websocket_upgrade(request_head)
    check_upgrade(request_head)


@pytest.mark.parametrize(
    "keys",
    [
        (),
        ("not base64!",),
        ("dGhlIHNhbXBsZSBub25jZQ",),  # missing padding
        ("dGhlIHNhbXBsZQ==",),  # 10 bytes
        ("dGhlIHNhbXBsZSBub25jZSEh",),  # 18 bytes
        ("dGhlIHNhbXBs ZSBub25jZQ==",),  # space inside
        ("dGhlIHNhbXBsZSBub25jZQ==,dGhlIHNhbXBsZSBub25jZQ==",),
        ("",),
        (KEY, KEY),
        (KEY, "AAAAAAAAAAAAAAAAAAAAAA=="),
    ],
    ids=[
        "missing",
        "not base64",
        "no padding",
        "short",
        "long",
        "inner space",
        "comma list",
        "empty",
        "duplicate same",
        "duplicate different",
    ],
)
def test_missing_bad_or_duplicate_key_is_400(keys: tuple[str, ...]) -> None:
    """A missing, malformed or repeated Sec-WebSocket-Key is a 400 from the balancer."""
    with pytest.raises(BadHandshake) as info:
        check_upgrade(upgrade(keys=keys))
    assert info.value.status == 400


def test_missing_key_message() -> None:
    """The 400 for an absent key says so."""
    with pytest.raises(BadHandshake, match="missing Sec-WebSocket-Key"):
        check_upgrade(upgrade(keys=()))


@pytest.mark.parametrize(
    "versions",
    [("8",), ("12",), ("14",), ("13, 8",), ("abc",), ("",)],
    ids=["8", "12", "14", "list", "text", "empty"],
)
def test_other_version_is_426_with_version_13(versions: tuple[str, ...]) -> None:
    """Sec-WebSocket-Version other than exactly 13 is a 426 naming version 13 (RFC 6455 §4.2.2)."""
    with pytest.raises(UnsupportedVersion) as info:
        check_upgrade(upgrade(versions=versions))
    assert info.value.status == 426
    assert info.value.headers == {"Sec-WebSocket-Version": "13", "Upgrade": "websocket"}


@pytest.mark.parametrize("versions", [("13", "13"), ("13", "8")], ids=["13 twice", "13 and 8"])
def test_repeated_version_is_400(versions: tuple[str, ...]) -> None:
    """Sec-WebSocket-Version on two lines is malformed (RFC 6455 §11.3.5), a 400: a 426 naming 13 would
    tell a client that sent 13 to send 13."""
    with pytest.raises(BadHandshake, match="duplicate Sec-WebSocket-Version") as info:
        check_upgrade(upgrade(versions=versions))
    assert info.value.status == 400


def test_missing_version_is_400() -> None:
    """An upgrade without Sec-WebSocket-Version is malformed (400), not a version mismatch."""
    with pytest.raises(BadHandshake, match="missing Sec-WebSocket-Version"):
        check_upgrade(upgrade(versions=()))


@pytest.mark.parametrize(
    "request_head",
    [
        upgrade(method="POST"),
        upgrade(method="HEAD"),
        upgrade(version="HTTP/1.0"),
        upgrade(connection=None),
        upgrade(connection="keep-alive"),
        upgrade(connection="upgraded"),
    ],
    ids=["POST", "HEAD", "HTTP/1.0", "no Connection", "Connection without upgrade", "upgrade as substring"],
)
def test_wrong_method_version_or_connection_is_400(request_head: RequestHead) -> None:
    """An upgrade must be a GET over HTTP/1.1 whose Connection lists Upgrade."""
    with pytest.raises(BadHandshake) as info:
        check_upgrade(request_head)
    assert info.value.status == 400


def test_plain_request_is_not_an_upgrade() -> None:
    """Without `Upgrade: websocket` a request is plain HTTP."""
    plain = parse_request_head(b"GET /whoami HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
    assert not is_websocket_upgrade(plain)
    assert is_websocket_upgrade(parse_request_head(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: h2c, WebSocket\r\n\r\n"))


_KEY_PATTERN = re.compile(r"[A-Za-z0-9+/]{22}==")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


@settings(max_examples=1500)
@given(st.text(alphabet=_B64 + "=-_ .\x00é", min_size=20, max_size=26) | st.text(max_size=30)
       | st.binary(min_size=16, max_size=16).map(lambda raw: base64.b64encode(raw).decode("ascii")))
def test_a_key_is_valid_exactly_when_the_pattern_says(key: str) -> None:
    """RFC 6455 §4.1's 16 bytes in base64: 22 characters of the alphabet and `==`, nothing else."""
    assert is_websocket_key(key) is (_KEY_PATTERN.fullmatch(key) is not None)


@pytest.mark.parametrize("code", range(0x100))
def test_each_character_in_each_place_of_a_key(code: int) -> None:
    valid = "dGhlIHNhbXBsZSBub25jZQ=="
    for place in range(24):
        key = valid[:place] + chr(code) + valid[place + 1 :]
        assert is_websocket_key(key) is (_KEY_PATTERN.fullmatch(key) is not None)


# -- the backend's 101: what the client would fail (RFC 6455 §4.1), so a failed backend ---------------

ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # for KEY (RFC 6455 §1.3)


def switch(*extra: str, upgrade_value: str = "websocket") -> ResponseHead:
    lines = ["HTTP/1.1 101 Switching Protocols", f"Upgrade: {upgrade_value}", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {ACCEPT}", *extra]
    return parse_response_head(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


@pytest.mark.parametrize(("offered", "answer"), [
    ((), switch()),
    ((), switch(upgrade_value="WebSocket")),
    (("Sec-WebSocket-Protocol: chat, superchat",), switch("Sec-WebSocket-Protocol: superchat")),
    (("Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Protocol: v2"), switch("Sec-WebSocket-Protocol: v2")),
    (("Sec-WebSocket-Protocol: chat",), switch()),  # the server may pick none
    (("Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits",),
     switch("Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover")),
    (("Sec-WebSocket-Extensions: permessage-deflate",), switch()),
    (('Sec-WebSocket-Extensions: x-a; p="1,2", x-b',), switch("Sec-WebSocket-Extensions: X-B, x-a")),
    (("Sec-WebSocket-Extensions: x-a",), switch('Sec-WebSocket-Extensions: x-a; p="1\\",2"')),
], ids=["plain", "upgrade-case", "protocol-picked", "protocol-second-line", "protocol-none", "deflate",
        "extension-none", "extensions-quoted-comma", "extension-escaped-quote"])
def test_a_101_the_client_accepts_has_no_fault(offered: tuple[str, ...], answer: ResponseHead) -> None:
    request = upgrade(extra=offered)
    assert switch_fault(request, answer) is None and negotiation_fault(request, answer) is None


@pytest.mark.parametrize(("offered", "answer", "fault"), [
    ((), switch(upgrade_value="h2c, websocket"), "Upgrade other than websocket"),
    ((), switch("Upgrade: h2c"), "Upgrade other than websocket"),
    ((), switch("Sec-WebSocket-Protocol: evilproto"), "Sec-WebSocket-Protocol"),
    (("Sec-WebSocket-Protocol: chat",), switch("Sec-WebSocket-Protocol: Chat"), "Sec-WebSocket-Protocol"),
    (("Sec-WebSocket-Protocol: chat, v2",), switch("Sec-WebSocket-Protocol: chat, v2"), "Sec-WebSocket-Protocol"),
    (("Sec-WebSocket-Protocol: chat",), switch("Sec-WebSocket-Protocol: chat", "Sec-WebSocket-Protocol: chat"),
     "Sec-WebSocket-Protocol"),
    ((), switch("Sec-WebSocket-Protocol: "), "Sec-WebSocket-Protocol"),
    ((), switch("Sec-WebSocket-Extensions: permessage-deflate"), "Sec-WebSocket-Extensions"),
    (("Sec-WebSocket-Extensions: permessage-deflate",), switch("Sec-WebSocket-Extensions: x-bogus"),
     "Sec-WebSocket-Extensions"),
    (('Sec-WebSocket-Extensions: x-a; p="1,x-b"',), switch("Sec-WebSocket-Extensions: x-b"),
     "Sec-WebSocket-Extensions"),
    (("Sec-WebSocket-Extensions: x-a",), switch('Sec-WebSocket-Extensions: x-a; p="open'), "Sec-WebSocket-Extensions"),
    (("Sec-WebSocket-Extensions: x-a",), switch("Sec-WebSocket-Extensions: ; p=1"), "Sec-WebSocket-Extensions"),
], ids=["upgrade-list", "upgrade-second-line", "protocol-not-offered", "protocol-other-case", "protocol-list",
        "protocol-twice", "protocol-empty", "extension-not-offered", "extension-other", "extension-only-inside-quotes",
        "extension-open-quote", "extension-no-name"])
def test_a_101_the_client_must_fail_is_a_fault(offered: tuple[str, ...], answer: ResponseHead, fault: str) -> None:
    """Upgrade is the backend's fault whatever the client sent; a subprotocol or an extension depends on
    what this client offered (`negotiation_fault`: no health verdict)."""
    request = upgrade(extra=offered)
    found = switch_fault(request, answer) if fault.startswith("Upgrade") else negotiation_fault(request, answer)
    assert found is not None and fault in found
    if not fault.startswith("Upgrade"):
        assert switch_fault(request, answer) is None


@pytest.mark.parametrize(
    "extra", [("Content-Length: 5",), ("Transfer-Encoding: chunked",)], ids=["Content-Length", "chunked"]
)
def test_an_upgrade_with_a_body_is_400(extra: tuple[str, ...]) -> None:
    """No WebSocket client sends a body with its handshake; a gateway library (websockets) hangs up on
    one, which passive health would count against the gateway: two such handshakes per gateway took a
    pool `down` (s40c F03)."""
    with pytest.raises(BadHandshake) as info:
        check_upgrade(upgrade(extra=extra))
    assert info.value.status == 400


def test_an_upgrade_with_an_empty_body_is_an_upgrade() -> None:
    check_upgrade(upgrade(extra=("Content-Length: 0",)))

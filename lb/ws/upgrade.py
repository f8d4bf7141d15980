"""Checks on a WebSocket upgrade request, answered before any backend is touched.  [pure]"""

from __future__ import annotations

import binascii
import hashlib
from collections.abc import Callable
from typing import Final, cast

from lb import built_in_c
from lb.errors import BadHandshake, UnsupportedVersion
from lb.http.head import RequestHead, ResponseHead

# RFC 6455 §4.1: the key is a base64-encoded 16-byte value, so exactly 22 base64 characters and `==`
# (what b64decode(validate=True) accepts at that length; no decode per handshake).
_KEY_CHARS: Final = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
_GUID: Final = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
_WEBSOCKET: Final = ["websocket"]  # the spellings every gateway sends on a 101 (switch_fault)
_UPGRADE: Final = ["Upgrade"]


def is_websocket_upgrade(request: RequestHead) -> bool:
    """Whether the request asks to switch to the WebSocket protocol."""
    return request.head.has_token("upgrade", "websocket")


def is_websocket_key(key: str) -> bool:
    """Whether `key` is 22 base64 characters and `==` (the pattern `[A-Za-z0-9+/]{22}==`).

    By `str.strip`, which leaves nothing of 22 characters all in the alphabet: a quarter of the
    instructions of a regex match, once per handshake."""
    return len(key) == 24 and key[22:] == "==" and not key[:22].strip(_KEY_CHARS)


def check_upgrade(request: RequestHead) -> None:
    """Validate a WebSocket opening handshake (RFC 6455 §4.2.1).

    Raises:
        BadHandshake: a malformed upgrade (the connection core answers 400), a repeated Sec-WebSocket-Version
            too, and one that carries a body.
        UnsupportedVersion: Sec-WebSocket-Version is not 13 (426, RFC 6455 §4.2.2).
    """
    if request.method != "GET":
        raise BadHandshake("WebSocket upgrade must use GET")
    if request.version != "HTTP/1.1":
        raise BadHandshake("WebSocket upgrade needs HTTP/1.1")
    if request.chunked or request.content_length:
        # No WebSocket client sends a body with its opening handshake, and gateway libraries
        # (websockets) hang up on one: forwarded, it would let any client fail the backend's
        # handshake, and a few of them would take the pool `down` by passive health.
        raise BadHandshake("WebSocket upgrade with a request body")
    if not request.head.has_token("connection", "upgrade"):
        raise BadHandshake("Connection header must include Upgrade")
    keys = request.head.get_all("sec-websocket-key")
    if len(keys) != 1:
        raise BadHandshake("missing Sec-WebSocket-Key header" if not keys else "duplicate Sec-WebSocket-Key")
    if not is_websocket_key(keys[0].strip(" \t")):
        raise BadHandshake("invalid Sec-WebSocket-Key")
    versions = request.head.get_all("sec-websocket-version")
    if len(versions) != 1:
        # RFC 6455 §11.3.5: never more than once.  Malformed (400), not a version we lack: a 426
        # naming 13 would answer a client that sent 13 twice to send 13.
        raise BadHandshake("duplicate Sec-WebSocket-Version" if versions else "missing Sec-WebSocket-Version header")
    if versions[0].strip(" \t") != "13":
        raise UnsupportedVersion("unsupported Sec-WebSocket-Version")


def accept_value(key: str) -> str:
    """The Sec-WebSocket-Accept that answers Sec-WebSocket-Key `key` (RFC 6455 §4.2.2, step 5.4)."""
    return _b2a_base64(_sha1(key.encode("ascii") + _GUID).digest(), newline=False).decode("ascii")


# lb/ws/_plain.c's checks of an upgrade request (whether it passes `check_upgrade`) and of a backend's 101
# (whether the client may have it as it came, passing every check below), or None (not built, or
# LB_PURE_PYTHON=1): every head is then checked here.  No Python twins: they only ever save work that
# the checks here do anyway.
PLAIN_UPGRADE: Final = cast("Callable[[str, str, dict[str, list[str]]], bool] | None",
                            built_in_c("lb.ws._plain", "plain_upgrade"))
PLAIN_SWITCH: Final = cast("Callable[[bytes, str], bool] | None", built_in_c("lb.ws._plain", "plain_switch"))

# Bound once: compiled, `hashlib.sha1` is a module attribute looked up on every call.
_sha1: Final = hashlib.sha1
_b2a_base64: Final = binascii.b2a_base64


def switch_fault(request: RequestHead, response: ResponseHead) -> str | None:
    """What is wrong with a backend's 101 to the upgrade `request` whatever the client offered, or None
    (`negotiation_fault` checks the rest).

    The client checks the same (RFC 6455 §4.1): a gateway whose 101 it rejects is a broken
    gateway, and must be treated as one (502, another backend, passive health), not pinned to.
    """
    head = response.head
    accepts = head.get_all("sec-websocket-accept")
    key = request.head.get("sec-websocket-key")
    if len(accepts) != 1 or key is None or accepts[0].strip(" \t") != accept_value(key.strip(" \t")):
        return "101 with a missing or wrong Sec-WebSocket-Accept"
    # The spelling every gateway sends is compared as a whole first.  Upgrade must name websocket
    # and nothing else (§4.1 step 2: `h2c, websocket` fails); Connection must list Upgrade.
    upgrades = head.get_all("upgrade")
    if upgrades != _WEBSOCKET and not (len(upgrades) == 1 and upgrades[0].strip(" \t").lower() == "websocket"):
        return "101 without Upgrade: websocket" if not upgrades else "101 with an Upgrade other than websocket"
    if head.get_all("connection") != _UPGRADE and not head.has_token("connection", "upgrade"):
        return "101 without Connection: Upgrade"
    return None


def negotiation_fault(request: RequestHead, response: ResponseHead) -> str | None:
    """What of a backend's 101 the client that sent `request` must fail (RFC 6455 §4.1 steps 5-6): a
    subprotocol or an extension it did not offer; None when there is none.

    Unlike `switch_fault`, this depends on what the client offered: a gateway that always names
    `graphql-ws` is right for clients that offer it.  So such a 101 is this client's 502 only, with
    no health verdict: counted against the backend, a few clients offering nothing took every
    gateway of a pool down.
    """
    head = response.head
    chosen = head.get_all("sec-websocket-protocol")
    if chosen and (len(chosen) != 1 or chosen[0].strip(" \t") not in _offered_protocols(request)):
        return "101 with a Sec-WebSocket-Protocol the client did not offer"
    extensions = head.get_all("sec-websocket-extensions")
    if extensions:
        used = _extension_names(extensions)
        if used is None or not used <= (_extension_names(request.head.get_all("sec-websocket-extensions")) or set()):
            return "101 with a Sec-WebSocket-Extensions the client did not offer"
    return None


def _offered_protocols(request: RequestHead) -> set[str]:
    """The subprotocols the client offered (§4.1 step 6: the server picks one of them, as written)."""
    values = request.head.get_all("sec-websocket-protocol")
    return {name for name in (part.strip(" \t") for value in values for part in value.split(",")) if name}


def _extension_names(values: list[str]) -> set[str] | None:
    """The extension names in Sec-WebSocket-Extensions values (RFC 6455 §9.1), lower case; None if an
    element has no name or a quote is left open."""
    names: set[str] = set()
    for value in values:
        # Only a quoted parameter value can hold a comma that separates nothing: without a quote (every
        # browser's `permessage-deflate; client_max_window_bits`), a plain split.
        elements = value.split(",") if '"' not in value else _split_outside_quotes(value)
        if elements is None:
            return None
        for element in elements:
            name = element.partition(";")[0].strip(" \t").lower()
            if name:
                names.add(name)
            elif element.strip(" \t"):
                return None  # `; p=1`: parameters of nothing
    return names


def _split_outside_quotes(value: str) -> list[str] | None:
    """`value` split at the commas outside quoted strings (RFC 9110 §5.6.4, with backslash escapes);
    None if a quote is left open."""
    elements: list[str] = []
    start = 0
    quoted = escaped = False
    for i, char in enumerate(value):
        if quoted:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                quoted = False
        elif char == '"':
            quoted = True
        elif char == ",":
            elements.append(value[start:i])
            start = i + 1
    if quoted:
        return None
    elements.append(value[start:])
    return elements

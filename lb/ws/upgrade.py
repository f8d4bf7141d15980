"""Checks on a WebSocket upgrade request, answered before any backend is touched.  [pure]"""

from __future__ import annotations

import re

from lb.errors import BadHandshake, UnsupportedVersion
from lb.http.head import RequestHead

# RFC 6455 §4.1: the key is a base64-encoded 16-byte value, so exactly 22 base64 characters and `==`
# (what b64decode(validate=True) accepts at that length; one regex instead of a decode per handshake).
_KEY = re.compile(r"[A-Za-z0-9+/]{22}==")


def is_websocket_upgrade(request: RequestHead) -> bool:
    """Whether the request asks to switch to the WebSocket protocol."""
    return request.head.has_token("upgrade", "websocket")


def check_upgrade(request: RequestHead) -> None:
    """Validate a WebSocket opening handshake (RFC 6455 §4.2.1).

    Raises:
        BadHandshake: a malformed upgrade (the listener answers 400).
        UnsupportedVersion: Sec-WebSocket-Version is not 13 (426, RFC 6455 §4.2.2).
    """
    if request.method != "GET":
        raise BadHandshake("WebSocket upgrade must use GET")
    if request.version != "HTTP/1.1":
        raise BadHandshake("WebSocket upgrade needs HTTP/1.1")
    if not request.head.has_token("connection", "upgrade"):
        raise BadHandshake("Connection header must include Upgrade")
    keys = request.head.get_all("sec-websocket-key")
    if len(keys) != 1:
        raise BadHandshake("missing Sec-WebSocket-Key header" if not keys else "duplicate Sec-WebSocket-Key")
    if not _KEY.fullmatch(keys[0].strip(" \t")):
        raise BadHandshake("invalid Sec-WebSocket-Key")
    versions = request.head.get_all("sec-websocket-version")
    if not versions:
        raise BadHandshake("missing Sec-WebSocket-Version header")
    if len(versions) != 1 or versions[0].strip(" \t") != "13":
        raise UnsupportedVersion("unsupported Sec-WebSocket-Version")

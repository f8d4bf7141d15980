"""Clients of the balancer: aiohttp WebSocket and HTTP clients (with an optional source address and
cookie), the affinity cookie as the client keeps it, the admin API's reads (`status`, `wait_for_state`),
and distinct loopback client addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from tests.harness import COOKIE, UNIT
from tests.harness.processes import Balancer

# ---------------------------------------------------------------------------------------------------
# aiohttp clients


def handshake_headers(ws: aiohttp.ClientWebSocketResponse) -> CIMultiDictProxy[str]:
    """The 101 response's headers.

    aiohttp 3.15 adds the public `ClientWebSocketResponse.response` (aio-libs/aiohttp#12903);
    before that the response is only reachable as `_response`.
    """
    response = getattr(ws, "response", None) or ws._response
    return response.headers


class _TrackingConnector(aiohttp.TCPConnector):
    """Remembers every connection it made, so the session can wait until each is really closed.

    aiohttp closes a released TLS connection without waiting for its asynchronous shutdown
    (aio-libs/aiohttp#1925); a test's event loop may then end first and leak the socket, which
    `filterwarnings = error` turns into a failure of whatever test runs next.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.made: list[Any] = []

    async def _create_connection(self, *args: Any, **kwargs: Any) -> Any:
        protocol = await super()._create_connection(*args, **kwargs)
        self.made.append(protocol)
        return protocol


@contextlib.asynccontextmanager
async def client_session(*, source_ip: str | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    """A session with no cookie jar (the test holds cookies itself) bound to `source_ip` if given."""
    connector = _TrackingConnector(local_addr=(source_ip, 0) if source_ip else None, force_close=True)
    try:
        async with aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar()) as session:
            yield session
    finally:
        closing = [closed for protocol in connector.made if (closed := protocol.closed) is not None]
        if closing:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 1 * UNIT)
            for protocol in connector.made:
                if protocol.closed is not None:  # TLS peer never finished the shutdown
                    protocol.abort()


def cookie_header(cookie: str | Mapping[str, str]) -> str:
    if isinstance(cookie, str):
        return cookie if "=" in cookie else f"{COOKIE}={cookie}"
    return "; ".join(f"{k}={v}" for k, v in cookie.items())


@contextlib.asynccontextmanager
async def ws_connect(
    url: str,
    *,
    cookie: str | Mapping[str, str] | None = None,
    source_ip: str | None = None,
    headers: Mapping[str, str] | None = None,
    within: float = 5 * UNIT,
    **kwargs: Any,
) -> AsyncIterator[tuple[aiohttp.ClientWebSocketResponse, CIMultiDictProxy[str]]]:
    """Open a WebSocket through aiohttp; yields the ws and the 101 response headers.

    `cookie` is a token (sent as `LB_AFFINITY=<token>`), a full Cookie header value, or a mapping.
    Extra keyword arguments go to `ClientSession.ws_connect` (protocols, compress, ssl, ...).
    """
    request_headers = dict(headers or {})
    if cookie is not None:
        request_headers["Cookie"] = cookie_header(cookie)
    async with client_session(source_ip=source_ip) as session:
        ws = await asyncio.wait_for(
            session.ws_connect(
                url,
                headers=request_headers,
                timeout=aiohttp.ClientWSTimeout(ws_receive=within, ws_close=within),
                **kwargs,
            ),
            within,
        )
        try:
            yield ws, handshake_headers(ws)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(ws.close(), within)


async def recv_json(ws: aiohttp.ClientWebSocketResponse, within: float = 5 * UNIT) -> dict[str, Any]:
    msg = await asyncio.wait_for(ws.receive(), within)
    assert msg.type is aiohttp.WSMsgType.TEXT, f"expected a text message, got {msg.type!r} {msg.data!r}"
    data = json.loads(msg.data)
    assert isinstance(data, dict)
    return data


async def recv_hello(ws: aiohttp.ClientWebSocketResponse, within: float = 5 * UNIT) -> dict[str, Any]:
    hello = await recv_json(ws, within)
    assert hello.get("type") == "hello", hello
    return hello


async def assert_echo(ws: aiohttp.ClientWebSocketResponse, payload: str | bytes, within: float = 5 * UNIT) -> None:
    if isinstance(payload, str):
        await ws.send_str(payload)
    else:
        await ws.send_bytes(payload)
    msg = await asyncio.wait_for(ws.receive(), within)
    expected = aiohttp.WSMsgType.TEXT if isinstance(payload, str) else aiohttp.WSMsgType.BINARY
    assert msg.type is expected, f"expected {expected!r} echo, got {msg.type!r} {str(msg.data)[:200]!r}"
    assert msg.data == payload, "echo differs from what was sent"


@dataclass
class Visit:
    """What one WebSocket connection through the balancer showed."""

    server_id: str
    hello: dict[str, Any]
    headers: CIMultiDictProxy[str]
    cookie: SetCookie | None  # our affinity Set-Cookie on the 101, if any


async def visit(url: str, **kwargs: Any) -> Visit:
    """Connect, read the hello, check one echo, close."""
    async with ws_connect(url, **kwargs) as (ws, headers):
        hello = await recv_hello(ws)
        await assert_echo(ws, "ping-" + secrets.token_hex(4))
    return Visit(hello["server_id"], hello, headers, affinity_cookie(headers))


@contextlib.asynccontextmanager
async def tunnel(url: str, *, hello: bool = True, **kwargs: Any) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    """A live tunnel for 'other connections are untouched' checks; echo-checked on entry.

    `hello=False` for the spy backend, which only echoes.
    """
    async with ws_connect(url, **kwargs) as (ws, _):
        if hello:
            await recv_hello(ws)
        await assert_echo(ws, "before")
        yield ws


async def http_get_async(
    url: str, *, cookie: str | Mapping[str, str] | None = None, source_ip: str | None = None, **kwargs: Any
) -> tuple[int, CIMultiDictProxy[str], bytes]:
    headers = dict(kwargs.pop("headers", None) or {})
    if cookie is not None:
        headers["Cookie"] = cookie_header(cookie)
    async with client_session(source_ip=source_ip) as session:
        async with asyncio.timeout(5 * UNIT):
            async with session.get(url, headers=headers, allow_redirects=False, **kwargs) as response:
                return response.status, response.headers, await response.read()


# ---------------------------------------------------------------------------------------------------
# cookies


@dataclass(frozen=True)
class SetCookie:
    name: str
    value: str
    attrs: tuple[str, ...]  # as sent, e.g. ("Path=/", "Max-Age=3600", "HttpOnly", "SameSite=Lax")

    @property
    def attr_names(self) -> set[str]:
        return {a.split("=", 1)[0].strip().lower() for a in self.attrs}

    def normalized_attrs(self) -> set[str]:
        """Attributes with case-folded names (RFC 6265 §5.2: names are case-insensitive)."""
        out = set()
        for attr in self.attrs:
            name, eq, value = attr.partition("=")
            out.add(f"{name.strip().lower()}{eq}{value.strip()}")
        return out


def set_cookies(
    headers: CIMultiDictProxy[str] | CIMultiDict[str] | Iterable[tuple[str, str]],
) -> list[SetCookie]:
    items = headers.items() if hasattr(headers, "items") else headers
    out = []
    for name, value in items:
        if name.lower() != "set-cookie":
            continue
        first, *attrs = [part.strip() for part in value.split(";")]
        cname, _, cvalue = first.partition("=")
        out.append(SetCookie(cname.strip(), cvalue.strip(), tuple(a for a in attrs if a)))
    return out


def affinity_cookie(headers: Any, name: str = COOKIE) -> SetCookie | None:
    found = [c for c in set_cookies(headers) if c.name == name]
    assert len(found) <= 1, f"more than one {name} Set-Cookie: {found}"
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------------
# admin


async def status(balancer: Balancer) -> dict[str, Any]:
    """GET /status on the admin listener, as JSON."""
    code, _, body = await http_get_async(balancer.admin_url("/status"))
    assert code == 200, f"/status answered {code}: {body[:200]!r}"
    data = json.loads(body)
    assert isinstance(data, dict)
    return data


def find_backend(status_json: Mapping[str, Any], pool: str, backend_id: str) -> dict[str, Any]:
    for backend in status_json["pools"][pool]["backends"]:
        if backend["id"] == backend_id:
            return dict(backend)
    raise AssertionError(f"no backend {backend_id} in pool {pool}: {status_json}")


async def wait_for_state(balancer: Balancer, pool: str, backend_id: str, state: str, within: float = 5 * UNIT) -> float:
    """Poll /status until the backend shows `state`; returns the seconds it took."""
    start = time.monotonic()
    last: Any = None
    while True:
        with contextlib.suppress(aiohttp.ClientError, OSError, ValueError):
            last = find_backend(await status(balancer), pool, backend_id)["state"]
            if last == state:
                return time.monotonic() - start
        if time.monotonic() - start > within:
            raise AssertionError(f"{pool}/{backend_id} is {last!r}, not {state!r} after {within}s")
        await asyncio.sleep(0.05)


# ---------------------------------------------------------------------------------------------------
# misc


def source_ips(n: int, *, start: int = 2) -> list[str]:
    """n distinct loopback addresses (all of 127.0.0.0/8 reaches lo on Linux)."""
    return [f"127.0.{k // 250}.{k % 250 + 1}" for k in range(start - 1, start - 1 + n)]

"""TLS listener with a certificate from `lb certs`; `secure: auto` puts Secure on TLS listeners only.

One module stack: `lb certs --out DIR`, 2 gateways, a balancer with a plain and a TLS listener.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from tests.harness import COOKIE, UNIT
from tests.harness.clients import client_session, http_get_async, visit
from tests.harness.ops import launched
from tests.harness.processes import STEADY_HEALTH, Balancer, lb_certs, lb_config
from tests.harness.raw import close_raw, open_raw, wait_closed_by_peer


@dataclass
class TlsStack:
    balancer: Balancer
    ca: Path


@pytest.fixture(scope="module")
def tls_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsStack]:
    with launched(tmp_path_factory, "tls") as launcher:
        certs = lb_certs(launcher.workdir / "certs")
        gateways = launcher.gateways(2)
        config = lb_config(
            pools={"gateways": gateways},
            routes={"/ws": "gateways", "/whoami": "gateways"},
            tls=(certs / "server.crt", certs / "server.key"),
            health=STEADY_HEALTH,
        )
        balancer = launcher.balancer(config, name="tls")
        balancer.wait_states({("gateways", g.id): "up" for g in gateways})
        yield TlsStack(balancer, certs / "ca.crt")


def _context(ca: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca))


async def test_wss_through_tls_listener(tls_stack: TlsStack) -> None:
    """A wss:// client that trusts the dev CA connects, echoes, and the backend sees proto https."""
    lb = tls_stack.balancer
    result = await visit(lb.ws_url(tls=True), ssl=_context(tls_stack.ca))
    assert result.hello["forwarded_proto"] == "https"
    assert result.hello["forwarded_host"] == f"127.0.0.1:{lb.tls_port}"
    assert result.hello["forwarded_for"] == "127.0.0.1"


@pytest.mark.parametrize("first", ["backend", "client"])
async def test_a_tls_tunnel_ends_quietly_whoever_closes_first(tls_stack: TlsStack, first: str) -> None:
    """The client's close_notify may come after the tunnel has ended (the backend closed first): no
    ERROR and no traceback in the log, whichever side starts the close handshake."""
    lb = tls_stack.balancer
    mark = lb.log_lines()
    async with (
        aiohttp.ClientSession() as session,
        session.ws_connect(lb.ws_url(tls=True), ssl=_context(tls_stack.ca), autoclose=False) as ws,
    ):
        await ws.receive_json(timeout=5 * UNIT)  # hello
        if first == "backend":
            await ws.send_str(json.dumps({"type": "close", "code": 4000, "reason": "bye"}))
            message = await ws.receive(timeout=5 * UNIT)
            assert message.type is aiohttp.WSMsgType.CLOSE, message
        await ws.close()
    await asyncio.sleep(0.5)  # the TLS shutdown's last callbacks
    logged = "\n".join(lb.log_text().splitlines()[mark:])
    assert "Traceback" not in logged and " ERROR " not in logged, logged[-2000:]


async def test_localhost_name_is_in_certificate(tls_stack: TlsStack) -> None:
    """`lb certs` covers localhost as well as 127.0.0.1 by default."""
    lb = tls_stack.balancer
    result = await visit(lb.ws_url(tls=True, host="localhost"), ssl=_context(tls_stack.ca))
    assert result.hello["forwarded_proto"] == "https"


async def test_secure_attribute_only_on_tls_listener(tls_stack: TlsStack) -> None:
    """secure: auto → Secure on the TLS listener's cookie, not on the plain listener's."""
    lb = tls_stack.balancer
    secure = await visit(lb.ws_url(tls=True), ssl=_context(tls_stack.ca))
    plain = await visit(lb.ws_url())
    assert secure.cookie is not None and plain.cookie is not None
    assert secure.cookie.normalized_attrs() == {
        "path=/",
        "max-age=3600",
        "httponly",
        "samesite=Lax",
        "secure",
    }
    assert plain.cookie.normalized_attrs() == {"path=/", "max-age=3600", "httponly", "samesite=Lax"}


async def test_cookie_sticks_across_tls_and_plain(tls_stack: TlsStack) -> None:
    """The token names the backend, not the listener: it pins on both listeners."""
    lb = tls_stack.balancer
    first = await visit(lb.ws_url(tls=True), ssl=_context(tls_stack.ca))
    assert first.cookie is not None
    for _ in range(3):
        assert (await visit(lb.ws_url(), cookie=first.cookie.value)).server_id == first.server_id
        again = await visit(lb.ws_url(tls=True), cookie=first.cookie.value, ssl=_context(tls_stack.ca))
        assert again.server_id == first.server_id


async def test_https_whoami_gets_secure_cookie(tls_stack: TlsStack) -> None:
    """Plain HTTP over TLS gets the cookie too, with Secure."""
    lb = tls_stack.balancer
    code, headers, _ = await http_get_async(lb.http_url(tls=True), ssl=_context(tls_stack.ca))
    assert code == 200
    cookies = [v for k, v in headers.items() if k.lower() == "set-cookie" and v.startswith(f"{COOKIE}=")]
    assert len(cookies) == 1 and "secure" in cookies[0].lower()


async def test_untrusted_client_and_plaintext_do_not_disturb_listener(tls_stack: TlsStack) -> None:
    """A failed TLS handshake or plaintext on the TLS port costs nothing: the next client is served."""
    lb = tls_stack.balancer
    assert lb.tls_port is not None
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        async with client_session() as session, asyncio.timeout(5 * UNIT):
            await session.get(lb.http_url(tls=True), ssl=ssl.create_default_context())
    reader, writer = await open_raw(lb.tls_port)
    try:
        writer.write(b"GET /whoami HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        await wait_closed_by_peer(reader, 5 * UNIT)
    finally:
        await close_raw(writer)
    result = await visit(lb.ws_url(tls=True), ssl=_context(tls_stack.ca))
    assert result.hello["forwarded_proto"] == "https"
    tls_stack.balancer.assert_alive()

"""The client's address: X-Forwarded-For is believed only from `trusted_proxies` (SPEC part 2).

From a trusted peer, the client is the right-most untrusted hop of its X-Forwarded-For: that address is
what the gateway sees first in the chain, what the access log names and what `balance: source` hashes.
From anyone else, a client's own X-Forwarded-For is replaced by its real address, never passed on.
"""

from __future__ import annotations

import json

import pytest

from tests.harness.clients import visit
from tests.harness.processes import Balancer, Gateway, Launcher, lb_config

POOL = "gateways"
TRUSTED = "127.0.0.2"  # stands in for an L7 proxy in front of the balancer
CLIENT = "127.0.0.3"


@pytest.fixture
def balancer(launcher: Launcher) -> Balancer:
    gateways: list[Gateway] = launcher.gateways(1)
    config = lb_config(pools={POOL: gateways}, overrides={"logging": {"format": "json"}})
    config["trusted_proxies"] = [f"{TRUSTED}/32"]
    return launcher.balancer(config)


async def test_a_spoofed_x_forwarded_for_from_an_untrusted_client_is_replaced(balancer: Balancer) -> None:
    """An untrusted client's X-Forwarded-For never reaches the gateway: it sees the client's own address."""
    seen = await visit(balancer.ws_url(), source_ip=CLIENT, headers={"X-Forwarded-For": "6.6.6.6"})
    assert seen.hello["forwarded_for"] == CLIENT


async def test_a_trusted_proxy_s_chain_is_kept_and_its_client_is_believed(balancer: Balancer) -> None:
    """From a trusted proxy, the chain goes on (plus the proxy) and the log names the real client."""
    seen = await visit(balancer.ws_url(), source_ip=TRUSTED, headers={"X-Forwarded-For": "6.6.6.6, 203.0.113.9"})
    assert seen.hello["forwarded_for"] == f"6.6.6.6, 203.0.113.9, {TRUSTED}"
    requests = [
        event for event in map(json.loads, filter(None, balancer.log_text().splitlines()))
        if event.get("event") == "request" and event.get("status") == 101
    ]
    assert requests and requests[-1]["client"] == "203.0.113.9", requests

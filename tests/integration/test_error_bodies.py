"""The balancer's own error answers give nothing away (SPEC part 2, issue 8).

Each is a status, a fixed reason and a request id that the access log also carries: no pool, backend,
address, path or other client input, which would be an attacker's map of what stands behind us.
"""

from __future__ import annotations

import json
import re

import pytest

from tests.harness import HOST
from tests.harness.processes import Balancer, DeadBackend, Launcher, lb_config
from tests.harness.raw import raw_exchange, upgrade_request

POOL = "secret-pool-7"
BACKEND = DeadBackend("gw-hidden-42")
MARK = "probe-x9z"  # client input that must never be echoed


@pytest.fixture
def balancer(launcher: Launcher) -> Balancer:
    config = lb_config(
        pools={POOL: [BACKEND]},
        routes={f"/{MARK}-routed": POOL},
        overrides={"logging": {"format": "json"}, "limits": {"max_header_bytes": 2048}},
    )
    return launcher.balancer(config)


CASES = {
    "no route (404)": upgrade_request(f"/{MARK}-nowhere"),
    "bad handshake (400)": upgrade_request(f"/{MARK}-routed", key=f"{MARK}"),
    "wrong version (426)": upgrade_request(f"/{MARK}-routed", version=f"{MARK}"),
    "head too large (431)": upgrade_request(f"/{MARK}-routed", extra=[("X-Pad", MARK * 400)]),
    "backend unreachable (502/503)": upgrade_request(f"/{MARK}-routed"),
    "malformed request (400)": f"GET /{MARK} HTTP/1.1\r\nHost: a\r\nHost: {MARK}\r\n\r\n".encode(),
}


@pytest.mark.parametrize("request_bytes", CASES.values(), ids=CASES.keys())
async def test_an_error_answer_names_nothing_internal_and_echoes_nothing(
    balancer: Balancer, request_bytes: bytes
) -> None:
    """Status, fixed reason, request id; nothing of the pool, backend, address or request."""
    answer = await raw_exchange(balancer.port, request_bytes)  # type: ignore[arg-type]
    assert answer is not None and 400 <= answer.status < 600
    text = (" ".join(f"{k}: {v}" for k, v in answer.headers) + answer.reason + answer.body.decode("latin-1")).lower()
    for secret in (POOL, BACKEND.id, BACKEND.address, str(BACKEND.port), MARK, HOST):
        assert secret.lower() not in text, (secret, text)
    request_id = answer.get("x-request-id")
    assert request_id and re.fullmatch(r"[0-9a-f]+", request_id), answer.headers
    assert request_id in answer.body.decode(), answer.body
    logged = [json.loads(line) for line in balancer.log_text().splitlines() if request_id in line]
    assert any(event.get("request_id") == request_id for event in logged), "the log line carries the same id"

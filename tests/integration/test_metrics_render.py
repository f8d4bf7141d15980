"""/metrics at a few hundred backends, rendered a slice at a time (`lb.control.exposition`), is the text
`generate_latest` gives for the same registry, and a valid exposition (promtool, else prometheus_client's parser)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lb.config.load import load_config
from lb.control.balancer import Balancer

BACKENDS = 300
# Lines that move by themselves between two renders (this process's CPU time, memory, descriptors).
MOVING = re.compile(rb"^process_.*\n", re.MULTILINE)


def _config(backends: int) -> str:
    """Backends on 127.255.x.y:9, where nothing listens; their health is checked hourly (once at start)."""
    listed = "\n".join(
        f'      - {{id: gw-{i}, address: "127.255.{i // 250}.{i % 250 + 1}:9"}}' for i in range(backends)
    )
    return f"""
listeners: [{{bind: "127.0.0.1:0"}}]
admin: {{bind: "127.0.0.1:0"}}
affinity: {{secret_keys: ["{'k' * 43}"]}}
pools:
  p:
    health_check: {{type: tcp, interval: 1h}}
    backends:
{listed}
routes: [{{path_prefix: /, pool: p}}]
"""


async def _get(address: tuple[str, int], path: str) -> bytes:
    reader, writer = await asyncio.open_connection(*address)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: lb\r\nConnection: close\r\n\r\n".encode())
        answer = await asyncio.wait_for(reader.read(), 30.0)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    return body


def _check_exposition(body: bytes) -> None:
    promtool = shutil.which("promtool")
    if promtool is not None:
        done = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
        # promtool also lints (help text style, counter names); only a parse error fails the format.
        assert b"error while linting" not in done.stderr and b"parse" not in done.stderr.lower(), done.stderr[:2000]
    families = {family.name: family for family in text_string_to_metric_families(body.decode())}
    connect = families["lb_backend_connect_duration_seconds"]
    assert len({sample.labels["backend"] for sample in connect.samples}) == BACKENDS


async def test_metrics_body_is_what_generate_latest_gives_for_the_same_registry(tmp_path: Path) -> None:
    """GET /metrics serves what prometheus_client's generate_latest renders for the same registry, and promtool parses
    it."""
    config_path = tmp_path / "lb.yaml"
    config_path.write_text(_config(BACKENDS))
    balancer = Balancer(load_config(config_path), config_path)
    await balancer.start()
    try:
        observations = balancer.ctx.observations
        for i in range(BACKENDS):  # series that are not all zero, in every per-backend family
            observations.observe_connect("p", f"gw-{i}", 0.0001 * (i % 40))
            observations.count_backend_error("p", f"gw-{i}", "refused")
        # The first health checks (refused) all answered: no counter moves between the scrapes and `whole`.
        for _ in range(300):
            if sum(observations.health_checks.values()) >= BACKENDS:
                break
            await asyncio.sleep(0.05)
        assert sum(observations.health_checks.values()) == BACKENDS
        assert balancer.admin_address is not None
        scrapes = await asyncio.gather(*(_get(balancer.admin_address, "/metrics") for _ in range(3)))
        whole = generate_latest(balancer.registry)
        for body in scrapes:
            assert MOVING.sub(b"", body) == MOVING.sub(b"", whole)
        assert body.count(b"\n") > 19 * BACKENDS
        _check_exposition(scrapes[0])
    finally:
        await balancer.stop()

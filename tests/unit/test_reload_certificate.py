"""A kept TLS listener's certificate on reload: files that turn unloadable between the check and the swap."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from support_balancer import in_process_config

from lb.config import sections
from lb.config.load import load_config
from lb.control.balancer import Balancer
from lb.devcerts import write_dev_certs


def test_a_certificate_unloadable_at_the_swap_keeps_the_old_one_and_completes_the_reload(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    certs = write_dev_certs(tmp_path / "certs", ["127.0.0.1"])
    config_path = tmp_path / "lb.yaml"
    config_path.write_text(in_process_config(f"""
  - bind: 127.0.0.1:0
    tls: {{cert: {certs.server_cert}, key: {certs.server_key}}}
"""))

    async def scenario() -> None:
        balancer = Balancer(load_config(config_path), config_path)
        await balancer.start()
        try:
            # load_config's check saw good files; by the swap the key has become garbage.
            monkeypatch.setattr(sections, "server_ssl_context", lambda tls: None)
            await asyncio.to_thread(certs.server_key.write_text, "not a key\n")
            with caplog.at_level(logging.ERROR, logger="lb.control.balancer"):
                assert await balancer.reload()
            assert "keeps its previous certificate" in caplog.text
            assert all(listening.server.is_serving() for listening in balancer._listening)
        finally:
            await balancer.stop()

    asyncio.run(scenario())

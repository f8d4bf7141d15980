"""Log lines spell an IPv6 listener's and admin API's address as the rest of the product does: `[::1]:8080`.
(`::1:8080` is itself an IPv6 address: a log parser, or an operator grepping for `[::1]:8080`, misread it.)"""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import pytest

from lb.config.load import load_config
from lb.control.balancer import Balancer
from tests.harness.in_process import in_process_config


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback (::1) on this host")
def test_ipv6_listener_and_admin_addresses_are_bracketed_in_the_log(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config_path = tmp_path / "lb.yaml"
    config_path.write_text(in_process_config('  - bind: "[::1]:0"').replace('bind: "127.0.0.1:0"', 'bind: "[::1]:0"'))

    async def scenario() -> None:
        balancer = Balancer(load_config(config_path), config_path)
        with caplog.at_level(logging.INFO, logger="lb.control"):
            await balancer.start()
        try:
            [listening] = balancer._listening
            assert balancer.admin_address is not None
            assert f"listening on [::1]:{listening.address[1]} (backlog" in caplog.text
            assert f"admin API on [::1]:{balancer.admin_address[1]}" in caplog.text
        finally:
            await balancer.stop()

    asyncio.run(scenario())

"""The benchmark's handshake windows in turns (`bench.loadgen.run_handshakes` with `Spec.turns`).

Two real echo gateways (`bench.echo_server`) stand for two proxies: each turn's handshakes must reach
its own gateway only, each turn must get its share of the window's time, and a cookie check must
follow each turn's first server, not another turn's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from bench import loadgen
from bench.echo_server import EchoProtocol, EchoServer
from bench.loadgen import Spec, Turn


@pytest.fixture
async def gateways() -> AsyncIterator[dict[str, tuple[str, int]]]:
    loop = asyncio.get_running_loop()
    servers = {}
    for name in ("gw-a", "gw-b"):
        state = EchoServer(name)
        servers[name] = await loop.create_server(lambda state=state: EchoProtocol(state), "127.0.0.1", 0)
    try:
        yield {name: server.sockets[0].getsockname()[:2] for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.close()
            await server.wait_closed()


def _spec(turns: tuple[Turn, ...], targets: tuple[tuple[str, int], ...] = ()) -> Spec:
    return Spec("handshake", targets, connections=4, warmup=0.2, window=0.8, check_cookie=True, turns=turns,
                phase=0.1)


async def test_each_turn_reaches_its_own_proxy_for_its_share_of_the_window(
    gateways: dict[str, tuple[str, int]],
) -> None:
    turns = (Turn("a", (gateways["gw-a"],)), Turn("b", (gateways["gw-b"],)))
    spec = Spec.from_json(_spec(turns).to_json())
    assert spec.turns == turns  # what the runner sends is what the load generator reads

    result = await loadgen.run_handshakes(spec)

    assert set(result) == {"turns"}
    by_turn = result["turns"]
    assert set(by_turn) == {"a", "b"}
    for name in ("a", "b"):
        one = by_turn[name]
        assert one["count"] > 20, f"turn {name} made too few handshakes: {one}"
        # Its share: half of a window of 2 x 0.8 s, in phases of 0.1 s (the sleeps' slack aside).
        assert 0.7 < one["elapsed"] < 1.2, one
        assert one["rate"] == pytest.approx(one["count"] / one["elapsed"])
        # Each turn's check follows its own first server: a second turn through another gateway is
        # no change of server (the echo gateways set no cookie, so none is counted as issued).
        assert one["server_changes"] == 0 and one["cookies_issued"] == 0
        assert set(one["cpu_busy"]) and all(0.0 <= share <= 1.0 for share in one["cpu_busy"].values())
    json.dumps(result)  # what the runner reads back


async def test_without_turns_a_window_is_one_result(gateways: dict[str, tuple[str, int]]) -> None:
    """bench.split and bench.ab measure one target a window, as before turns."""
    result = await loadgen.run_handshakes(_spec((), (gateways["gw-a"],)))
    assert "turns" not in result
    assert result["count"] > 20 and 0.7 < result["elapsed"] < 1.2 and result["server_changes"] == 0


@pytest.mark.parametrize("scenario", ["echo", "stream"])
async def test_echo_and_stream_take_turns_over_connections_open_to_each(
    gateways: dict[str, tuple[str, int]], scenario: str,
) -> None:
    turns = (Turn("a", (gateways["gw-a"],)), Turn("b", (gateways["gw-b"],)))
    spec = Spec(scenario, (), connections=3, payload=64, warmup=0.2, window=0.8, turns=turns, phase=0.1)
    result = await loadgen.run_echo(spec)
    assert set(result) == {"turns"} and set(result["turns"]) == {"a", "b"}
    for name, one in result["turns"].items():
        assert one["opened"] == 3 and one["count"] > 20, f"turn {name}: {one}"
        assert 0.7 < one["elapsed"] < 1.2 and one["bytes"] == one["count"] * 64
        assert "server_changes" not in one  # a handshake's counts only

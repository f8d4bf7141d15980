"""A small reconnect storm (issue 11): 300 players on 3 gateways, one gateway SIGKILLed.

Every player that was on it reconnects at once with its cookie and is back on a survivor;
none is lost, and no player on the other gateways is disturbed.  (The large storm, side by
side with HAProxy and direct, lives in `make bench`: bench/storm.py.)
"""

from __future__ import annotations

import asyncio
import time

from bench.storm import Fleet
from tests.harness import UNIT
from tests.harness.processes import Launcher, lb_config

PLAYERS = 300


async def test_small_storm_every_player_is_back_on_a_survivor(launcher: Launcher) -> None:
    """All clients of a killed gateway are re-established on survivors with new cookies; none lost."""
    gateways = await asyncio.to_thread(launcher.gateways, 3)
    lb = await asyncio.to_thread(launcher.balancer, lb_config(pools={"gateways": gateways}))
    listen = ("127.0.0.1", int(lb.config["listeners"][0]["bind"].rpartition(":")[2]))
    fleet = Fleet(PLAYERS, lambda _client: listen)
    try:
        await fleet.open(within=60 * UNIT)
        victims = fleet.on("gw-1")
        assert len(victims) > PLAYERS // 6, "least_conn spreads the players over the gateways"
        old_cookies = {c.index: dict(c.cookies) for c in victims}
        others = [c for c in fleet.clients if c.server_id != "gw-1"]
        killed_at = time.monotonic()
        await asyncio.to_thread(gateways[0].kill)
        assert await fleet.wait_back(victims, killed_at, "gw-1", within=20 * UNIT), (
            f"{sum(not c.connected for c in victims)} of {len(victims)} players not back"
        )
        assert {c.server_id for c in victims} <= {"gw-2", "gw-3"}
        assert all(c.reconnects == 1 for c in victims)
        assert all(c.cookies != old_cookies[c.index] for c in victims), "a redispatch replaces the cookie"
        assert all(c.connected and c.reconnects == 0 for c in others), "nobody else was cut"
        assert all(c.connected for c in fleet.clients)
    finally:
        await fleet.close()
    lb.assert_alive()

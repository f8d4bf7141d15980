"""With `workers: N` only the owner resolves: the `discovered` message (lb.control.ipc) carries each set
to the workers, whose `DiscoveryManager(follower=True)` applies it and runs no lookup, and whose
control channel (lb.control.workers.ControlChannel) checks what it is sent.  No socket, no process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lb.config.model import BackendConfig, DiscoveryConfig, PoolConfig
from lb.control import discovery
from lb.control.ipc import decode, discovered_backends, discovered_message, encode
from lb.control.workers import ControlChannel

SET = (BackendConfig("gw-1", "10.0.0.1", 9000, weight=3), BackendConfig("gw-2", "fd00::2", 9001))
DISCOVERED = PoolConfig("gateways", (), discovery=DiscoveryConfig("gw.svc", max_backends=4))
STATIC = PoolConfig("static", (BackendConfig("s-1", "10.0.0.9", 9000),))


def _follower() -> tuple[discovery.DiscoveryManager, list[tuple[str, tuple[BackendConfig, ...]]]]:
    applied: list[tuple[str, tuple[BackendConfig, ...]]] = []
    manager = discovery.DiscoveryManager(lambda pool, backends: applied.append((pool, backends)), follower=True)
    return manager, applied


def test_a_set_goes_to_the_worker_as_it_was_found() -> None:
    message = decode(encode(discovered_message("gateways", SET))[4:])
    assert message["op"] == "discovered" and message["pool"] == "gateways"
    assert discovered_backends(message, max_backends=4) == SET
    assert discovered_backends(decode(encode(discovered_message("gateways", ()))[4:]), 4) == ()


@pytest.mark.parametrize(
    ("backends", "says"),
    [
        ("gw-1", "must be a list"),
        ([["gw-1", "10.0.0.1", 9000]], r"\[id, host, port, weight\]"),
        ([{"id": "gw-1"}], r"\[id, host, port, weight\]"),
        ([["gw/1", "10.0.0.1", 9000, 1]], "backend id"),
        ([["..", "10.0.0.1", 9000, 1]], "backend id"),
        ([[7, "10.0.0.1", 9000, 1]], "backend id"),
        ([["gw-1", "gw-1.gw.svc", 9000, 1]], "does not appear to be an IPv4 or IPv6 address"),
        ([["gw-1", ["10.0.0.1"], 9000, 1]], "host must be a string"),
        ([["gw-1", "10.0.0.1", 0, 1]], "port"),
        ([["gw-1", "10.0.0.1", 65536, 1]], "port"),
        ([["gw-1", "10.0.0.1", True, 1]], "port"),
        ([["gw-1", "10.0.0.1", "9000", 1]], "port"),
        ([["gw-1", "10.0.0.1", 9000, 0]], "weight"),
        ([["gw-1", "10.0.0.1", 9000, 257]], "weight"),
        ([["gw-1", "10.0.0.1", 9000, 1.5]], "weight"),
        ([["gw-1", "10.0.0.1", 9000, 1], ["gw-1", "10.0.0.2", 9000, 1]], "listed twice"),
        ([[f"gw-{i}", "10.0.0.1", 9000 + i, 1] for i in range(5)], "more than max_backends=4"),
    ],
)
def test_what_a_worker_is_sent_is_checked_before_it_routes_by_it(backends: Any, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        discovered_backends({"op": "discovered", "pool": "gateways", "backends": backends}, max_backends=4)


async def test_a_follower_runs_no_lookup_and_applies_each_set_that_changed(monkeypatch: pytest.MonkeyPatch) -> None:
    async def lookup(*_: Any) -> Any:
        raise AssertionError("a follower looked a name up")

    monkeypatch.setattr(discovery, "lookup", lookup)
    manager, applied = _follower()
    manager.start({"gateways": DISCOVERED})
    await asyncio.sleep(0)
    assert manager.status("gateways") is None  # no loop: the owner's /status shows its own
    manager.follow("gateways", SET)
    manager.follow("gateways", SET)  # the same set again: nothing to do
    manager.follow("gateways", SET[:1])
    assert applied == [("gateways", SET), ("gateways", SET[:1])]
    assert manager.known("gateways") == SET[:1]
    assert manager.with_discovered(DISCOVERED).backends == SET[:1]
    # A reload that takes the pool's discovery away forgets its set, as the owner forgets its loop.
    manager.start({"gateways": PoolConfig("gateways", (BackendConfig("s-1", "10.0.0.9", 9000),))})
    assert manager.known("gateways") == ()
    await manager.stop()


async def test_a_follower_listens_once_its_owner_has_sent_every_set(monkeypatch: pytest.MonkeyPatch) -> None:
    manager, _ = _follower()
    manager.start({"gateways": DISCOVERED})
    waiting = asyncio.ensure_future(manager.first_lookups())
    await asyncio.sleep(0.01)
    assert not waiting.done() and not manager.settled()
    manager.owner_sent_all()
    await asyncio.wait_for(waiting, 1.0)
    assert manager.settled()
    # Bounded as the owner's own first lookups are: an owner that never says so cannot hold a worker back.
    monkeypatch.setattr(discovery, "FIRST_LOOKUPS_WAIT", 0.05)
    silent, _ = _follower()
    await asyncio.wait_for(silent.first_lookups(), 1.0)
    assert not silent.settled()


async def test_the_control_channel_follows_each_set_and_refuses_bad_ones() -> None:
    manager, applied = _follower()
    manager.start({"gateways": DISCOVERED, "static": STATIC})
    balancer = SimpleNamespace(config=SimpleNamespace(pools={"gateways": DISCOVERED, "static": STATIC}),
                               discovery=manager, ctx=SimpleNamespace(pools={}))
    channel = ControlChannel(balancer, -1)  # type: ignore[arg-type]
    await channel._handle(discovered_message("gateways", SET))
    assert applied == [("gateways", SET)]
    with pytest.raises(ValueError, match="more than max_backends=4"):
        await channel._handle(discovered_message("gateways", SET * 3))
    assert manager.known("gateways") == SET  # the set it had stays
    assert not manager.settled()
    await channel._handle({"op": "states", "pools": {}})  # a new worker's first states follow its sets
    assert manager.settled()


async def test_a_set_sent_before_the_reload_that_makes_its_pool_discovered_is_kept_for_it() -> None:
    """The owner's first lookup for a pool its reload made discovered can end before it sends the reload:
    the worker keeps the set, and its reload takes it (`with_discovered`), as the owner's pool has it."""
    manager, _ = _follower()
    manager.start({"static": STATIC})
    balancer = SimpleNamespace(config=SimpleNamespace(pools={"static": STATIC}), discovery=manager,
                               ctx=SimpleNamespace(pools={}))
    channel = ControlChannel(balancer, -1)  # type: ignore[arg-type]
    await channel._handle(discovered_message("gateways", SET))  # no such pool here yet
    with pytest.raises(ValueError, match="more than max_backends=10000"):
        await channel._handle(discovered_message("gateways", SET * 5001))  # bounded all the same
    assert manager.with_discovered(DISCOVERED).backends == SET  # the reload's new pool
    manager.start({"gateways": DISCOVERED})  # after the reload's swap: nothing it runs is forgotten
    assert manager.known("gateways") == SET


async def test_a_set_naming_a_static_backend_leaves_the_static_one_in_place(tmp_path: Path) -> None:
    """A static backend wins over DNS (as `with_discovered` has it): a set that names its id, as a worker
    may be sent one before the reload that made it static, does not put a second `s-1` in the pool."""
    from lb.config.load import load_config
    from lb.control.balancer import Balancer

    path = tmp_path / "lb.yaml"
    path.write_text(f"""
listeners: [{{bind: "127.0.0.1:0"}}]
affinity: {{secret_keys: ["{'k' * 43}"]}}
pools:
  p:
    backends: [{{id: s-1, address: "127.0.0.1:9"}}]
    discovery: {{dns: gw.svc, nameservers: ["127.0.0.1:9"]}}
    health_check: {{type: tcp, interval: 1h}}
routes: [{{path_prefix: /, pool: p}}]
""")
    balancer = Balancer(load_config(path), path)
    balancer.update_discovered("p", (BackendConfig("s-1", "10.0.0.1", 9000), BackendConfig("d-1", "10.0.0.2", 9000)))
    backends = balancer.ctx.pools["p"].backends
    assert list(backends) == ["s-1", "d-1"]
    assert backends["s-1"].config.address == "127.0.0.1:9"


async def test_a_set_for_a_pool_not_discovered_here_changes_nothing(tmp_path: Path) -> None:
    """A worker may be sent a pool's set before the reload that makes the pool discovered: its static
    pool of the same name is not merged with it meanwhile."""
    from lb.config.load import load_config
    from lb.control.balancer import Balancer

    path = tmp_path / "lb.yaml"
    path.write_text(f"""
listeners: [{{bind: "127.0.0.1:0"}}]
affinity: {{secret_keys: ["{'k' * 43}"]}}
pools:
  p:
    backends: [{{id: s-1, address: "127.0.0.1:9"}}]
    health_check: {{type: tcp, interval: 1h}}
routes: [{{path_prefix: /, pool: p}}]
""")
    balancer = Balancer(load_config(path), path)
    pool = balancer.ctx.pools["p"]
    balancer.update_discovered("p", (BackendConfig("d-1", "10.0.0.2", 9000),))
    balancer.update_discovered("q", (BackendConfig("d-1", "10.0.0.2", 9000),))
    assert balancer.ctx.pools["p"] is pool and list(pool.backends) == ["s-1"]

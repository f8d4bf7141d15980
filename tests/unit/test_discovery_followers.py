"""With `workers: N` only the owner resolves: the `discovered` message (lb.control.ipc) carries each set
to the workers, whose `DiscoveryManager(follower=True)` applies it and runs no lookup, and whose
control channel (lb.control.worker_channel.ControlChannel) checks what it is sent.  No socket, no process."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from lb.config.model import BackendConfig, DiscoveryConfig, PoolConfig
from lb.control import discovery
from lb.control.dns_backends import from_addresses
from lb.control.ipc import decode, discovered_backends, discovered_message, encode
from lb.control.worker_channel import ControlChannel

SET = (BackendConfig("gw-1", "10.0.0.1", 9000, weight=3), BackendConfig("gw-2", "fd00::2", 9001))
DISCOVERED = PoolConfig("gateways", (), discovery=DiscoveryConfig("gw.svc", max_backends=4))
STATIC = PoolConfig("static", (BackendConfig("s-1", "10.0.0.9", 9000),))


def _follower() -> tuple[discovery.DiscoveryManager, list[tuple[str, tuple[BackendConfig, ...]]]]:
    applied: list[tuple[str, tuple[BackendConfig, ...]]] = []
    manager = discovery.DiscoveryManager(lambda pool, backends: applied.append((pool, backends)), follower=True)
    return manager, applied


def _sent(pool: str, backends: tuple[BackendConfig, ...]) -> dict[str, Any]:
    return decode(encode(discovered_message(pool, backends))[4:])


def test_a_set_goes_to_the_worker_as_it_was_found() -> None:
    message = _sent("gateways", SET)
    assert message["op"] == "discovered" and message["pool"] == "gateways"
    assert discovered_backends(message, max_backends=4) == SET
    assert discovered_backends(_sent("gateways", ()), 4) == ()


def test_an_a_or_aaaa_answers_ids_pass_as_discovery_made_them() -> None:
    """`type: a` names a backend `ip:port`, `[ip]:port` for IPv6: brackets no configured id may hold.  A
    worker refusing them refused the whole set, and served 503 while its owner showed the pool up."""
    found = from_addresses(["fd00::1", "10.0.0.1"], port=8080, max_backends=4).backends
    assert {b.id for b in found} == {"[fd00::1]:8080", "10.0.0.1:8080"}
    assert discovered_backends(_sent("gateways", found), 4) == found
    with pytest.raises(ValueError, match="backend id"):  # brackets only as that backend's own address
        discovered_backends(_sent("gateways", (BackendConfig("[fd00::1]:8080", "fd00::2", 8080),)), 4)


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
    assert not waiting.done()
    manager.owner_sent_all()
    await asyncio.wait_for(waiting, 1.0)
    # Bounded as the owner's own first lookups are: an owner that never says so cannot hold a worker back.
    monkeypatch.setattr(discovery, "FIRST_LOOKUPS_WAIT", 0.05)
    silent, _ = _follower()
    await asyncio.wait_for(silent.first_lookups(), 1.0)


async def test_the_control_channel_follows_each_set_and_refuses_bad_ones() -> None:
    manager, applied = _follower()
    manager.start({"gateways": DISCOVERED, "static": STATIC})
    balancer = SimpleNamespace(config=SimpleNamespace(pools={"gateways": DISCOVERED, "static": STATIC}),
                               discovery=manager, ctx=SimpleNamespace(pools={}))
    channel = ControlChannel(balancer, -1)  # type: ignore[arg-type]
    await channel._handle(discovered_message("gateways", SET))
    assert applied == [("gateways", SET)]
    # More than the pool's own max_backends (a reload lowered it after the owner's answer): taken.
    larger = tuple(BackendConfig(f"gw-{i}", "10.0.0.1", 9000 + i) for i in range(6))
    await channel._handle(discovered_message("gateways", larger))
    assert manager.known("gateways") == larger
    with pytest.raises(ValueError, match="listed twice"):
        await channel._handle(discovered_message("gateways", SET * 2))
    assert manager.known("gateways") == larger  # the set it had stays
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(manager.first_lookups(), 0.05)
    await channel._handle({"op": "states", "pools": {}})  # a new worker's first states follow its sets
    await asyncio.wait_for(manager.first_lookups(), 1.0)


async def test_a_set_sent_before_the_reload_that_makes_its_pool_discovered_is_kept_for_it() -> None:
    """The owner's first lookup for a pool its reload made discovered can end before it sends the reload:
    the worker keeps the set, and its reload takes it (`with_discovered`), as the owner's pool has it."""
    manager, _ = _follower()
    manager.start({"static": STATIC})
    balancer = SimpleNamespace(config=SimpleNamespace(pools={"static": STATIC}), discovery=manager,
                               ctx=SimpleNamespace(pools={}))
    channel = ControlChannel(balancer, -1)  # type: ignore[arg-type]
    await channel._handle(discovered_message("gateways", SET))  # no such pool here yet
    many = [[f"gw-{i}", "10.0.0.1", 9000, 1] for i in range(10_001)]
    with pytest.raises(ValueError, match="more than max_backends=10000"):  # bounded all the same
        await channel._handle({"op": "discovered", "pool": "gateways", "backends": many})
    assert manager.with_discovered(DISCOVERED).backends == SET  # the reload's new pool
    manager.start({"gateways": DISCOVERED})  # after the reload's swap: nothing it runs is forgotten
    assert manager.known("gateways") == SET


def _balancer(tmp_path: Path, *, discovered: bool) -> Any:
    """A balancer (not started) with pool `p` of static backend `s-1`, discovered too or not."""
    from lb.config.load import load_config
    from lb.control.balancer import Balancer

    discovery = '    discovery: {dns: gw.svc, nameservers: ["127.0.0.1:9"]}\n' if discovered else ""
    path = tmp_path / "lb.yaml"
    path.write_text(f"""
listeners: [{{bind: "127.0.0.1:0"}}]
affinity: {{secret_keys: ["{'k' * 43}"]}}
pools:
  p:
    backends: [{{id: s-1, address: "127.0.0.1:9"}}]
{discovery}    health_check: {{type: tcp, interval: 1h}}
routes: [{{path_prefix: /, pool: p}}]
""")
    return Balancer(load_config(path), path)


async def test_a_set_naming_a_static_backend_leaves_the_static_one_in_place(tmp_path: Path) -> None:
    """A static backend wins over DNS (as `with_discovered` has it): a set that names its id, as a worker
    may be sent one before the reload that made it static, does not put a second `s-1` in the pool."""
    balancer = _balancer(tmp_path, discovered=True)
    balancer.update_discovered("p", (BackendConfig("s-1", "10.0.0.1", 9000), BackendConfig("d-1", "10.0.0.2", 9000)))
    backends = balancer.ctx.pools["p"].backends
    assert list(backends) == ["s-1", "d-1"]
    assert backends["s-1"].config.address == "127.0.0.1:9"


async def test_a_set_for_a_pool_not_discovered_here_changes_nothing(tmp_path: Path) -> None:
    """A worker may be sent a pool's set before the reload that makes the pool discovered: its static
    pool of the same name is not merged with it meanwhile."""
    balancer = _balancer(tmp_path, discovered=False)
    pool = balancer.ctx.pools["p"]
    balancer.update_discovered("p", (BackendConfig("d-1", "10.0.0.2", 9000),))
    balancer.update_discovered("q", (BackendConfig("d-1", "10.0.0.2", 9000),))
    assert balancer.ctx.pools["p"] is pool and list(pool.backends) == ["s-1"]


def test_a_set_a_worker_could_not_be_sent_goes_again_before_its_next_states() -> None:
    """A worker not reading its control socket misses a set (each a whole one): it is not killed for it
    (its tunnels would go), and every set goes to it again, before the next states it takes."""
    from unittest import mock

    from lb.config.load import ConfigSource
    from lb.control import ipc
    from lb.control.ipc import LENGTH
    from lb.control.workers import MAX_PENDING_BYTES, WorkerSupervisor
    from lb.state.pool import PoolState
    from lb.state.series import SeriesRetention

    manager, _ = _follower()
    manager._followed["gateways"] = SET  # the owner's set (the owner's own manager holds it in its loop)
    pools = {"gateways": PoolState(config=DISCOVERED), "static": PoolState(config=STATIC)}
    balancer = SimpleNamespace(ctx=SimpleNamespace(pools=pools), discovery=manager, series=SeriesRetention(),
                               config=SimpleNamespace(pools={"gateways": DISCOVERED, "static": STATIC}))
    supervisor = WorkerSupervisor(balancer, 1, config_path=mock.sentinel.path,  # type: ignore[arg-type]
                                  config_source=ConfigSource(""))
    written: list[bytes] = []
    backlog = [MAX_PENDING_BYTES + 1]
    writer = SimpleNamespace(is_closing=lambda: False, write=written.append,
                             transport=SimpleNamespace(get_write_buffer_size=lambda: backlog[0]))
    process = SimpleNamespace(returncode=None, kill=mock.Mock())
    supervisor._workers[0] = SimpleNamespace(writer=writer, process=process, killed=False,  # type: ignore[assignment]
                                             sets_dropped=False, name="worker 0")
    supervisor.discovered("gateways", SET)
    supervisor.broadcast(ipc.states_message(pools))  # still full: dropped too, the sets still owed
    assert written == [] and not process.kill.called
    backlog[0] = 0
    supervisor.broadcast(ipc.states_message(pools))
    sent = [decode(frame[LENGTH.size:]) for frame in written]
    assert [m["op"] for m in sent] == ["discovered", "states"]
    assert discovered_backends(sent[0], 4) == SET
    supervisor.broadcast(ipc.states_message(pools))  # owed no more
    assert [decode(frame[LENGTH.size:])["op"] for frame in written[2:]] == ["states"]

"""A reload that changes a pool's discovery (`lb.control.discovery.DiscoveryManager.start`): the new loop
takes over the set the pool holds and the counters /metrics exports.  The lookup itself is replaced; no
socket."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from lb.config.model import BackendConfig, DiscoveryConfig, DiscoveryType, PoolConfig
from lb.control import discovery
from lb.control.dns_backends import Discovered

OLD_NAME_BACKENDS = (BackendConfig("gw-0", "10.0.0.1", 9000), BackendConfig("gw-1", "10.0.0.2", 9000))


def _pool(dns: str, kind: DiscoveryType = DiscoveryType.SRV) -> PoolConfig:
    port = 9000 if kind is DiscoveryType.A else None
    config = DiscoveryConfig(dns, type=kind, port=port, nameservers=(("127.0.0.1", 53),))
    return PoolConfig("gateways", (), discovery=config)


@pytest.fixture
def answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """`old.svc` answers with two backends; any other name fails."""

    async def lookup(config: DiscoveryConfig, *_: Any) -> tuple[Discovered, float]:
        if config.dns == "old.svc" and config.type is DiscoveryType.SRV:
            return Discovered(OLD_NAME_BACKENDS, ()), 5.0
        raise discovery.DiscoveryError(f"{config.dns}: NXDOMAIN")

    monkeypatch.setattr(discovery, "lookup", lookup)


@pytest.mark.usefixtures("answers")
@pytest.mark.parametrize("new", [_pool("new.svc"), _pool("old.svc", DiscoveryType.A)], ids=["name", "type"])
async def test_a_new_name_that_fails_keeps_the_old_names_set_and_the_counters_go_on(
    new: PoolConfig, caplog: pytest.LogCaptureFixture
) -> None:
    """The pool still routes to the old name's backends until the new name answers: /status says so,
    and lb_discovery_lookups_total / lb_discovery_errors_total go on from where they were (they went
    back to 0, and /status said `backends: 0` while two were in use)."""
    applied: list[tuple[str, tuple[BackendConfig, ...]]] = []
    manager = discovery.DiscoveryManager(lambda pool, backends: applied.append((pool, backends)))
    manager.start({"gateways": _pool("old.svc")})
    await manager.first_lookups()
    assert applied == [("gateways", OLD_NAME_BACKENDS)]
    before = manager.status("gateways")
    assert before is not None and before["lookups"] == 1 and before["last_ok"] is not None
    try:
        with caplog.at_level(logging.WARNING, logger="lb.control.discovery"):
            manager.start({"gateways": new})
            await manager.first_lookups()
        after = manager.status("gateways")
        assert after is not None
        assert (after["dns"], after["type"]) == (new.discovery.dns, new.discovery.type.value)  # type: ignore[union-attr]
        assert (after["lookups"], after["errors"], after["backends"]) == (2, 1, 2)
        assert after["last_ok"] is None and "NXDOMAIN" in (after["last_error"] or "")
        assert manager.known("gateways") == OLD_NAME_BACKENDS
        assert manager.with_discovered(new).backends == OLD_NAME_BACKENDS
        assert applied == [("gateways", OLD_NAME_BACKENDS)]  # nothing taken away
        assert "keeping the last known 2 backend(s)" in caplog.text
    finally:
        await manager.stop()


@pytest.mark.usefixtures("answers")
async def test_the_same_name_looked_up_anew_keeps_its_record() -> None:
    """A reload that changes only the interval: the loop's record (last_ok, counts) carries on whole."""
    manager = discovery.DiscoveryManager(lambda *_: None)
    manager.start({"gateways": _pool("old.svc")})
    await manager.first_lookups()
    before = manager.status("gateways")
    try:
        pool = _pool("old.svc")
        assert pool.discovery is not None
        faster = PoolConfig("gateways", (), discovery=DiscoveryConfig(
            "old.svc", nameservers=pool.discovery.nameservers, interval=pool.discovery.interval * 2))
        manager.start({"gateways": faster})
        after = manager.status("gateways")
        assert before is not None and after is not None and after["last_ok"] == before["last_ok"]
        assert after["lookups"] >= before["lookups"] and manager.known("gateways") == OLD_NAME_BACKENDS
    finally:
        await manager.stop()


async def test_a_new_names_first_lookup_takes_no_stand_ins_from_the_old_names_set(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The old name's set stays in use until the new name answers, but it does not stand in for what the new
    name's answer leaves unsaid (type a's IPv6 backends after a failed AAAA query, an SRV target whose lookup
    failed): the old name's backends became members of the new name's set."""
    given: list[tuple[str, tuple[BackendConfig, ...]]] = []

    async def lookup(config: DiscoveryConfig, _resolver: Any, _reserved: Any, known: tuple[BackendConfig, ...],
                     *_: Any) -> tuple[Discovered, float]:
        given.append((config.dns, known))
        return Discovered(OLD_NAME_BACKENDS if config.dns == "old.svc" else OLD_NAME_BACKENDS[:1], ()), 5.0

    monkeypatch.setattr(discovery, "lookup", lookup)
    manager = discovery.DiscoveryManager(lambda pool, backends: None)
    manager.start({"gateways": _pool("old.svc")})
    await manager.first_lookups()
    try:
        manager.start({"gateways": _pool("new.svc")})
        await manager.first_lookups()
        (loop,) = manager._loops.values()
        await loop.resolve_once()  # the new name's second lookup: its own first answer stands in now
    finally:
        await manager.stop()
    assert given == [("old.svc", ()), ("new.svc", ()), ("new.svc", OLD_NAME_BACKENDS[:1])]


async def test_a_second_reload_before_the_new_name_answered_still_takes_no_stand_ins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Reloaded to a new name that has not answered yet, then reloaded again under that name (its interval
    changed): the set held is still the old name's, and still stands in for nothing."""
    given: list[tuple[str, tuple[BackendConfig, ...]]] = []

    async def lookup(config: DiscoveryConfig, _resolver: Any, _reserved: Any, known: tuple[BackendConfig, ...],
                     *_: Any) -> tuple[Discovered, float]:
        given.append((config.dns, known))
        if config.dns == "old.svc":
            return Discovered(OLD_NAME_BACKENDS, ()), 5.0
        raise discovery.DiscoveryError(f"{config.dns}: no answer")

    monkeypatch.setattr(discovery, "lookup", lookup)
    manager = discovery.DiscoveryManager(lambda pool, backends: None)
    manager.start({"gateways": _pool("old.svc")})
    await manager.first_lookups()
    new = _pool("new.svc")
    assert new.discovery is not None
    slower = PoolConfig("gateways", (), discovery=DiscoveryConfig(
        "new.svc", nameservers=new.discovery.nameservers, interval=new.discovery.interval * 2))
    try:
        manager.start({"gateways": new})
        await manager.first_lookups()
        manager.start({"gateways": slower})
        await manager.first_lookups()
        assert manager.known("gateways") == OLD_NAME_BACKENDS
    finally:
        await manager.stop()
    assert given == [("old.svc", ()), ("new.svc", ()), ("new.svc", ())]

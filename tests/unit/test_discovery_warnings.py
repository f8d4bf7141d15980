"""What the discovery loop (`lb.control.discovery.Discoverer`) says about records it leaves out: once per
change of the answer, not at every interval.  The lookup itself is replaced; no socket."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lb.config.model import BackendConfig, DiscoveryConfig, PoolConfig
from lb.control import discovery
from lb.control.dns_backends import Discovered


def _looked_up(monkeypatch: pytest.MonkeyPatch, answers: list[Discovered]) -> discovery.Discoverer:
    """A discovery loop of pool `gateways` after one lookup per answer, each answer as `lookup` returned it."""
    remaining = list(answers)

    async def lookup(*_: Any) -> tuple[Discovered, float]:
        return remaining.pop(0), 5.0

    monkeypatch.setattr(discovery, "lookup", lookup)
    pool = PoolConfig("gateways", (), discovery=DiscoveryConfig("gateway.svc", nameservers=(("127.0.0.1", 53),)))
    loop = discovery.Discoverer(pool, lambda *_: None)

    async def each() -> None:
        for _ in answers:
            await loop.resolve_once()

    asyncio.run(each())
    return loop


def test_records_left_out_are_warned_of_once_per_change(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    answers = [
        Discovered((BackendConfig("gw-0", "10.0.0.1", 9000),), ("target '-x.svc': first label is not valid",)),
    ] * 3 + [Discovered((BackendConfig("gw-0", "10.0.0.1", 9000),), ("target '127.0.0.1': an IP address",))]
    with caplog.at_level("WARNING", logger="lb.control.discovery"):
        loop = _looked_up(monkeypatch, answers)
    said = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert said == [
        "discovery for pool gateways skipped target '-x.svc': first label is not valid",
        "discovery for pool gateways skipped target '127.0.0.1': an IP address",
    ]
    assert loop.status.skipped == 1 and loop.status.lookups == 4


def test_a_lookup_that_skipped_every_record_counts_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """/status's `skipped` is this lookup's count, also when nothing in it was usable (a lookup error
    that lists them): it was left at the count of the last lookup that gave backends."""
    loop = _looked_up(monkeypatch, [
        Discovered((BackendConfig("gw-0", "10.0.0.1", 9000),), ()),
        Discovered((), ("target '-x.svc': first label is not valid", "target '-y.svc': first label is not valid")),
    ])
    assert loop.status.skipped == 2 and loop.status.errors == 1
    assert loop.status.last_error is not None and "no usable backend" in loop.status.last_error


async def test_a_lookup_without_a_thread_to_run_on_fails_as_a_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    """Out of threads (a cgroup's pids.max): the pool keeps its last answer with a lookup error, as for a
    nameserver that does not answer, not an unexpected-failure traceback at every interval."""
    import threading

    import dns.resolver

    from lb.config.model import DiscoveryType

    def no_thread(self: threading.Thread) -> None:
        raise RuntimeError("can't start new thread")

    monkeypatch.setattr(threading.Thread, "start", no_thread)
    config = DiscoveryConfig(dns="gw.example", type=DiscoveryType.A, port=9000)
    resolver = discovery.ThreadedResolver(dns.resolver.Resolver(configure=False))
    with pytest.raises(discovery.DiscoveryError, match="no thread for the DNS query"):
        await discovery.lookup(config, resolver)

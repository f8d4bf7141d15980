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


def test_the_line_of_a_changed_set_is_one_write_a_pipe_takes_whole(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """DNS names the ids (a target's first label: up to 63 characters), and one answer can add, remove and
    change 20 of them at once: the line that says so stays under PIPE_BUF (4 KiB) in either format, as an
    access line does, so that with `workers: N` on a shared pipe no other process's line lands inside it."""
    from lb.config.model import LogFormat
    from lb.log import JsonFormatter, PlainFormatter

    def ids(prefix: str) -> list[str]:
        return [f"{prefix}{n:02d}".ljust(63, "x") for n in range(20)]

    changed, removed, added = ids("c"), ids("r"), ids("a")
    before = Discovered(tuple(BackendConfig(i, "10.0.0.1", 9000) for i in changed + removed))
    after = Discovered(tuple(BackendConfig(i, "10.0.0.2", 9000) for i in changed + added))
    name = ".".join(["n" * 63] * 3 + ["s" * 61])  # 253 characters: the longest name DNS has
    with caplog.at_level("INFO", logger="lb.control.discovery"):
        remaining = [before, after]

        async def lookup(*_: Any) -> tuple[Discovered, float]:
            return remaining.pop(0), 5.0

        monkeypatch.setattr(discovery, "lookup", lookup)
        pool = PoolConfig("gateways", (), discovery=DiscoveryConfig(name, nameservers=(("127.0.0.1", 53),)))
        loop = discovery.Discoverer(pool, lambda *_: None)

        async def both() -> None:
            await loop.resolve_once()
            await loop.resolve_once()

        asyncio.run(both())
    record = [r for r in caplog.records if "; added" in r.getMessage()][-1]
    message = record.getMessage()
    assert added[0] in message and removed[0] in message and changed[0] in message and " more" in message
    formatters = ((LogFormat.PLAIN, PlainFormatter("worker-12")), (LogFormat.JSON, JsonFormatter("worker-12")))
    for log_format, formatter in formatters:
        line = (formatter.format(record) + "\n").encode()
        assert len(line) <= 4096, f"{log_format.value}: {len(line)} bytes"


@pytest.mark.parametrize(("count", "more"), [(10, None), (11, "skipped 1 more record(s)")])
def test_ten_skipped_records_are_each_said_and_more_are_counted(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, count: int, more: str | None
) -> None:
    """Up to ten reasons are logged one a line; past ten, one line counts the rest."""
    reasons = tuple(f"target 'x{i}.svc': first label is not valid" for i in range(count))
    with caplog.at_level("WARNING", logger="lb.control.discovery"):
        _looked_up(monkeypatch, [Discovered((BackendConfig("gw-0", "10.0.0.1", 9000),), reasons)])
    said = [record.getMessage() for record in caplog.records if "skipped" in record.getMessage()]
    assert len(said) == (10 if more is None else 11)
    assert not [line for line in said if "more record(s)" in line] if more is None else said[-1].endswith(more)

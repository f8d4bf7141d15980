"""SRV targets whose own A/AAAA lookup fails (`lb.control.discovery`): a failure keeps the target's last known
backend and is reported as an error; a definite "no address" drops it; a failure of the whole lookup is
reported as before.  The resolver is a script of answers and exceptions; no socket."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Iterator
from typing import Any, cast

import dns.exception
import dns.message
import dns.name
import dns.rdataclass
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from lb.config.model import BackendConfig, DiscoveryConfig, DiscoveryType, PoolConfig
from lb.control import discovery

SERVICE = "gw.test"
GW1, GW2 = f"gw-1.{SERVICE}.", f"gw-2.{SERVICE}."
BOTH = (BackendConfig("gw-1", "127.0.0.1", 28102), BackendConfig("gw-2", "127.0.0.2", 28103))
CONFIG = DiscoveryConfig(SERVICE, nameservers=(("127.0.0.1", 53),), timeout=0.3)


def answer(name: str, rdtype: str, *texts: str) -> dns.resolver.Answer:
    """A real dnspython answer holding these records (no additional section)."""
    query = dns.message.make_query(name, rdtype)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(name, 5, "IN", rdtype, *texts))
    parsed = dns.message.from_wire(response.to_wire())  # as it comes off the wire (and indexed)
    assert isinstance(parsed, dns.message.QueryMessage)
    return dns.resolver.Answer(dns.name.from_text(name), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN, parsed)


class ScriptedResolver:
    """Answers (name, rdtype) from `script`: an Answer, or an exception to raise.  Records every query."""

    hosts = None  # configured nameservers: no hosts file is read

    def __init__(self) -> None:
        self.script: dict[tuple[str, str], dns.resolver.Answer | BaseException] = {}
        self.queries: list[tuple[str, str]] = []

    def healthy(self) -> ScriptedResolver:
        """SRV gw-1:28102 and gw-2:28103, both with an A record and no AAAA."""
        self.script = {
            (SERVICE, "SRV"): answer(SERVICE + ".", "SRV", f"10 50 28102 {GW1}", f"10 50 28103 {GW2}"),
            (GW1, "A"): answer(GW1, "A", "127.0.0.1"),
            (GW2, "A"): answer(GW2, "A", "127.0.0.2"),
            (GW1, "AAAA"): dns.resolver.NoAnswer(),
            (GW2, "AAAA"): dns.resolver.NoAnswer(),
        }
        return self

    async def resolve(self, name: str, rdtype: str, *, search: bool | None = None) -> dns.resolver.Answer:
        self.queries.append((name, rdtype))
        outcome = self.script.get((name, rdtype), dns.resolver.NXDOMAIN())
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


def run_lookup(resolver: ScriptedResolver, known: tuple[BackendConfig, ...] = BOTH,
               config: DiscoveryConfig = CONFIG) -> discovery.Discovered:
    fake: Any = resolver
    args = (known,) if known else ()  # without: the call as it was before `known`
    found, _ = asyncio.run(discovery.lookup(config, fake, frozenset(), *args))
    return found


# What a nameserver that gives no answer looks like to dnspython, and what /status then says.
FAILURES = [
    pytest.param(dns.resolver.LifetimeTimeout(timeout=0.3, errors=[]), "no answer within 0.3s", id="timeout"),
    pytest.param(dns.resolver.NoNameservers(), "no nameserver answered (All nameservers failed to answer the query.)",
                 id="servfail-refused"),
    pytest.param(dns.exception.FormError(), "DNS message is malformed.", id="malformed"),
    pytest.param(OSError(errno.ENETUNREACH, "Network is unreachable"), "Network is unreachable", id="network"),
]


@pytest.mark.parametrize(("failure", "cause"), FAILURES)
def test_a_target_whose_lookup_fails_keeps_its_last_known_backend(failure: BaseException, cause: str) -> None:
    """No answer for gw-2's A query: gw-2 stays as last known (same address), and the failure names it and why."""
    resolver = ScriptedResolver().healthy()
    resolver.script[(GW2, "A")] = failure
    found = run_lookup(resolver)
    assert found.backends == BOTH
    assert found.skipped == ()
    assert found.failed == (f"target 'gw-2.{SERVICE}': address lookup failed ({cause}); kept gw-2 at 127.0.0.2:28103",)
    assert (GW2, "AAAA") not in resolver.queries  # an AAAA answer could not decide the address without the A one


@pytest.mark.parametrize(("failure", "cause"), FAILURES)
def test_a_failed_aaaa_query_without_an_a_address_leaves_the_address_unknown(
    failure: BaseException, cause: str
) -> None:
    resolver = ScriptedResolver().healthy()
    resolver.script[(GW2, "A")] = dns.resolver.NoAnswer()
    resolver.script[(GW2, "AAAA")] = failure
    found = run_lookup(resolver)
    assert found.backends == BOTH
    assert found.failed == (f"target 'gw-2.{SERVICE}': address lookup failed ({cause}); kept gw-2 at 127.0.0.2:28103",)


def test_a_target_with_an_a_address_is_not_asked_for_aaaa() -> None:
    """An SRV target gets one address, IPv4 first: once A has answered, an AAAA query could change nothing
    (it doubled the queries, and the time a lookup of many targets takes within its budget)."""
    resolver = ScriptedResolver().healthy()
    found = run_lookup(resolver)
    assert found.backends == BOTH
    assert [query for query in resolver.queries if query[1] == "AAAA"] == []


def test_a_target_without_an_a_address_is_asked_for_aaaa() -> None:
    resolver = ScriptedResolver().healthy()
    resolver.script[(GW2, "A")] = dns.resolver.NoAnswer()
    resolver.script[(GW2, "AAAA")] = answer(GW2, "AAAA", "::1")
    found = run_lookup(resolver)
    assert [(b.id, b.host) for b in found.backends] == [("gw-1", "127.0.0.1"), ("gw-2", "::1")]
    assert (GW2, "AAAA") in resolver.queries and (GW1, "AAAA") not in resolver.queries


def test_an_a_address_decides_whatever_aaaa_does() -> None:
    """IPv4 is picked first, so a failed AAAA query after an A answer is not a failure (and gw-2's move shows)."""
    resolver = ScriptedResolver().healthy()
    resolver.script[(GW2, "A")] = answer(GW2, "A", "127.0.0.9")
    resolver.script[(GW2, "AAAA")] = dns.exception.Timeout()
    found = run_lookup(resolver)
    assert [(b.id, b.host) for b in found.backends] == [("gw-1", "127.0.0.1"), ("gw-2", "127.0.0.9")]
    assert found.failed == ()


@pytest.mark.parametrize(
    "no_address",
    [
        pytest.param({(GW2, "A"): dns.resolver.NXDOMAIN()}, id="nxdomain"),
        pytest.param({(GW2, "A"): dns.resolver.NoAnswer(), (GW2, "AAAA"): dns.resolver.NoAnswer()}, id="no-records"),
    ],
)
def test_a_target_dns_says_has_no_address_is_dropped(no_address: dict[tuple[str, str], BaseException]) -> None:
    """A definite answer (NXDOMAIN, NOERROR with no A/AAAA) is DNS saying the target is gone: it leaves."""
    resolver = ScriptedResolver().healthy()
    resolver.script.update(no_address)
    found = run_lookup(resolver)
    assert found.backends == BOTH[:1]
    assert found.skipped == (f"target 'gw-2.{SERVICE}': no A/AAAA address",)
    assert found.failed == ()


def test_a_never_seen_target_whose_lookup_fails_waits_for_the_next_lookup() -> None:
    resolver = ScriptedResolver().healthy()
    resolver.script[(GW2, "A")] = dns.resolver.NoNameservers()
    found = run_lookup(resolver, known=BOTH[:1])
    assert found.backends == BOTH[:1]
    assert found.failed[0].endswith("not added until it resolves")


A_CONFIG = DiscoveryConfig(SERVICE, type=DiscoveryType.A, port=9000, nameservers=(("127.0.0.1", 53),), timeout=0.3)
DUAL = (BackendConfig("127.0.0.1:9000", "127.0.0.1", 9000), BackendConfig("[::1]:9000", "::1", 9000))


@pytest.mark.parametrize("failure", [dns.resolver.NoNameservers(), dns.exception.Timeout(), dns.resolver.NXDOMAIN()])
def test_type_a_keeps_its_ipv6_backends_when_the_aaaa_query_fails_after_an_a_answer(failure: BaseException) -> None:
    """Every A and AAAA address is a backend of its own: a lost AAAA answer is not DNS saying the IPv6 ones
    left (they were dropped, their clients redispatched, and the lookup called a success)."""
    resolver = ScriptedResolver()
    resolver.script = {(SERVICE, "A"): answer(SERVICE + ".", "A", "127.0.0.2"), (SERVICE, "AAAA"): failure}
    found = run_lookup(resolver, known=DUAL, config=A_CONFIG)
    assert [b.id for b in found.backends] == ["127.0.0.2:9000", "[::1]:9000"]
    assert len(found.failed) == 1 and found.failed[0].startswith("AAAA query: ")
    assert found.failed[0].endswith("its last known 1 IPv6 backend(s) kept")


def test_type_a_with_no_ipv6_backend_to_keep_takes_a_failed_aaaa_query_as_no_error() -> None:
    """An IPv4-only name behind a resolver that fails every AAAA query: the A answer is the whole set, and the
    lookup a good one (else `last_ok` never moved and `LbDiscoveryStale` fired for good)."""
    resolver = ScriptedResolver()
    resolver.script = {(SERVICE, "A"): answer(SERVICE + ".", "A", "127.0.0.1"),
                       (SERVICE, "AAAA"): dns.resolver.NoNameservers()}
    found = run_lookup(resolver, known=DUAL[:1], config=A_CONFIG)
    assert (found.backends, found.failed) == (DUAL[:1], ())


def test_type_a_takes_a_definite_aaaa_answer_as_it_comes() -> None:
    resolver = ScriptedResolver()
    resolver.script = {(SERVICE, "A"): answer(SERVICE + ".", "A", "127.0.0.1"),
                       (SERVICE, "AAAA"): dns.resolver.NoAnswer()}
    found = run_lookup(resolver, known=DUAL, config=A_CONFIG)
    assert (found.backends, found.failed) == (DUAL[:1], ())
    resolver.script[(SERVICE, "AAAA")] = answer(SERVICE + ".", "AAAA", "::2")
    found = run_lookup(resolver, known=DUAL, config=A_CONFIG)
    assert [b.id for b in found.backends] == ["127.0.0.1:9000", "[::2]:9000"]


def test_a_failure_says_what_each_nameserver_did_truncated_answers_and_tcp_included() -> None:
    """dnspython's own text for a truncated UDP answer is empty ("answered ;"): a firewall that drops TCP/53,
    the usual cause, could not be told from the message."""
    errors = [("Do53:10.0.0.10@53", False, 53, dns.message.Truncated(), None),
              ("Do53:10.0.0.10@53", True, 53, EOFError(), None)]
    cause = discovery._cause(dns.resolver.NoNameservers(request=dns.message.make_query(SERVICE, "SRV"), errors=errors),
                             0.3)
    assert cause == ("no nameserver answered (Do53:10.0.0.10@53: truncated answer (too large for UDP; asked again "
                     "over TCP); Do53:10.0.0.10@53 over TCP: closed the connection without an answer)")
    timeout = dns.resolver.LifetimeTimeout(timeout=0.3, errors=[("Do53:10.0.0.11@53", False, 53, "SERVFAIL", None)])
    assert discovery._cause(timeout, 0.3) == "no answer within 0.3s (Do53:10.0.0.11@53: answered SERVFAIL)"


@pytest.mark.parametrize(
    ("failure", "message"),
    [
        (dns.resolver.NXDOMAIN(), f"{SERVICE}: no such name (NXDOMAIN)"),
        (dns.resolver.NoAnswer(), f"{SERVICE}: empty answer"),
        (dns.resolver.NoNameservers(),
         f"{SERVICE}: no nameserver answered (All nameservers failed to answer the query.)"),
        (dns.resolver.LifetimeTimeout(timeout=0.3, errors=[]), f"{SERVICE}: no answer within 0.3s"),
        (dns.exception.FormError(), f"{SERVICE}: DNS message is malformed."),
        (dns.exception.DNSException(), f"{SERVICE}: Abstract base class shared by all dnspython exceptions."),
        (OSError(errno.ENETUNREACH, "Network is unreachable"), f"{SERVICE}: Network is unreachable"),
        (OSError("no thread for the DNS query"), f"{SERVICE}: no thread for the DNS query"),
    ],
)
@pytest.mark.parametrize("kind", [DiscoveryType.SRV, DiscoveryType.A])
def test_a_failed_whole_lookup_is_reported_as_before(
    failure: BaseException, message: str, kind: DiscoveryType
) -> None:
    """The SRV query (or type a's A query) failing fails the lookup with the same messages as ever."""
    resolver = ScriptedResolver()
    resolver.script = {(SERVICE, "SRV"): failure, (SERVICE, "A"): failure, (SERVICE, "AAAA"): dns.resolver.NoAnswer()}
    config = DiscoveryConfig(SERVICE, type=kind, port=9000, nameservers=(("127.0.0.1", 53),), timeout=0.3)
    with pytest.raises(discovery.DiscoveryError) as info:
        run_lookup(resolver, known=(), config=config)
    assert str(info.value) == message


# ----------------------------------------------------------------------------- the loop


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[ScriptedResolver]:
    resolver = ScriptedResolver().healthy()
    monkeypatch.setattr(discovery, "make_resolver", lambda _config: resolver)
    yield resolver


def test_one_failed_target_lookup_keeps_the_backend_and_shows_the_error(
    scripted: ScriptedResolver, caplog: pytest.LogCaptureFixture
) -> None:
    """One timeout for gw-2's A query: nothing is applied (no removal), /status shows an error naming gw-2 and
    the cause, last_ok stays; the log says the cause, not "no A/AAAA address"; the next answer clears it."""
    applied: list[tuple[str, ...]] = []
    pool = PoolConfig("gateways", (), discovery=CONFIG)
    loop = discovery.Discoverer(pool, lambda _pool, backends: applied.append(tuple(b.id for b in backends)))

    async def three_lookups() -> list[dict[str, Any]]:
        seen = []
        await loop.resolve_once()
        seen.append(loop.status.document())
        scripted.script[(GW2, "A")] = dns.resolver.LifetimeTimeout(timeout=0.3, errors=[])
        await loop.resolve_once()
        seen.append(loop.status.document())
        scripted.script[(GW2, "A")] = answer(GW2, "A", "127.0.0.2")
        await loop.resolve_once()
        seen.append(loop.status.document())
        return seen

    with caplog.at_level("INFO", logger="lb.control.discovery"):
        first, failed, again = asyncio.run(three_lookups())
    assert applied == [("gw-1", "gw-2")]
    assert loop.known == BOTH
    assert first["last_error"] is None and first["errors"] == 0
    assert failed["errors"] == 1 and failed["backends"] == 2 and failed["skipped"] == 0
    assert failed["last_error"] == (
        f"{SERVICE}: target 'gw-2.{SERVICE}': address lookup failed (no answer within 0.3s); "
        "kept gw-2 at 127.0.0.2:28103"
    )
    assert failed["last_ok"] == first["last_ok"] and failed["last_error_at"] is not None
    assert again["last_error"] is None and again["errors"] == 1 and again["last_ok"] > first["last_ok"]
    said = [record.getMessage() for record in caplog.records]
    assert f"discovery for pool gateways: {failed['last_error']}" in said
    assert not [line for line in said if "no A/AAAA address" in line or "removed gw-2" in line], said


def resolve_twice(loop: discovery.Discoverer, scripted: ScriptedResolver, key: tuple[str, str],
                  then: dns.resolver.Answer | BaseException) -> None:
    """One lookup as scripted, then one with `key` answering `then`."""

    async def twice() -> None:
        await loop.resolve_once()
        scripted.script[key] = then
        await loop.resolve_once()

    asyncio.run(twice())


def test_a_definite_no_address_still_removes_the_backend(
    scripted: ScriptedResolver, caplog: pytest.LogCaptureFixture
) -> None:
    """NXDOMAIN for gw-2's address: gw-2 leaves the set as before, with the "no A/AAAA address" warning."""
    applied: list[tuple[str, ...]] = []
    pool = PoolConfig("gateways", (), discovery=CONFIG)
    loop = discovery.Discoverer(pool, lambda _pool, backends: applied.append(tuple(b.id for b in backends)))

    with caplog.at_level("INFO", logger="lb.control.discovery"):
        resolve_twice(loop, scripted, (GW2, "A"), dns.resolver.NXDOMAIN())
    assert applied == [("gw-1", "gw-2"), ("gw-1",)]
    assert loop.status.last_error is None and loop.status.errors == 0 and loop.status.skipped == 1
    said = "\n".join(record.getMessage() for record in caplog.records)
    assert f"skipped target 'gw-2.{SERVICE}': no A/AAAA address" in said and "removed gw-2" in said


def test_every_target_failing_with_none_known_is_a_failed_lookup(scripted: ScriptedResolver) -> None:
    """No backend at all (first lookup, every target without an answer): a failed lookup naming the cause."""
    scripted.script[(GW1, "A")] = dns.exception.Timeout()
    scripted.script[(GW2, "A")] = dns.exception.Timeout()
    applied: list[Any] = []
    loop = discovery.Discoverer(PoolConfig("gateways", (), discovery=CONFIG), lambda *args: applied.append(args))
    asyncio.run(loop.resolve_once())
    assert applied == [] and loop.status.errors == 1 and loop.status.last_ok is None
    assert loop.status.last_error is not None
    assert loop.status.last_error.startswith(f"{SERVICE}: no usable backend in the answer: target 'gw-1.{SERVICE}': "
                                             "address lookup failed (no answer within 0.3s)")


def test_a_failed_whole_lookup_keeps_the_set_as_before(
    scripted: ScriptedResolver, caplog: pytest.LogCaptureFixture
) -> None:
    applied: list[Any] = []
    loop = discovery.Discoverer(PoolConfig("gateways", (), discovery=CONFIG), lambda *args: applied.append(args))

    with caplog.at_level("WARNING", logger="lb.control.discovery"):
        resolve_twice(loop, scripted, (SERVICE, "SRV"), dns.resolver.NoNameservers())
    assert len(applied) == 1 and loop.known == BOTH
    message = f"{SERVICE}: no nameserver answered (All nameservers failed to answer the query.)"
    assert loop.status.last_error == message and loop.status.errors == 1
    assert [r.getMessage() for r in caplog.records] == [
        f"discovery for pool gateways: {message}; keeping the last known 2 backend(s)"
    ]


def test_type_a_whose_a_query_fails_keeps_its_set_rather_than_take_the_aaaa_answer() -> None:
    """`type: a`: an A query without an answer leaves the IPv4 addresses unknown; the AAAA answer cannot
    decide (an A address would win), so the lookup fails and the last known set stays.  Before, the
    set was swapped for the AAAA addresses: every pinned client redispatched for one lost packet."""
    resolver = ScriptedResolver()
    resolver.script = {
        ("gw.test", "A"): dns.resolver.LifetimeTimeout(timeout=0.3, errors=[]),
        ("gw.test", "AAAA"): answer("gw.test.", "AAAA", "::1"),
    }
    config = DiscoveryConfig(SERVICE, type=DiscoveryType.A, port=9000, nameservers=(("127.0.0.1", 53),), timeout=0.3)
    with pytest.raises(discovery.DiscoveryError, match=r"no answer within 0\.3s"):
        run_lookup(resolver, config=config)
    assert resolver.queries == [("gw.test", "A")]  # AAAA could not decide: not asked


class SlowResolver(ScriptedResolver):
    """Every query answered after `delay` seconds of `clock`, the test loop's own (well within the timeout):
    a wave of `_TARGET_LOOKUPS` target queries, made at once, takes `delay` in all."""

    def __init__(self, delay: float, clock: list[float]) -> None:
        super().__init__()
        self.delay = delay
        self.clock = clock

    async def resolve(self, name: str, rdtype: str, *, search: bool | None = None) -> dns.resolver.Answer:
        self.clock[0] += self.delay if rdtype == "SRV" else self.delay / discovery._TARGET_LOOKUPS
        await asyncio.sleep(0)  # the loop runs, and fires a budget this clock has passed
        return await super().resolve(name, rdtype, search=search)


def test_many_targets_from_a_slow_nameserver_are_all_looked_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """80 SRV targets without an additional section, each A query answered in 0.15s of a 0.2s timeout: five waves
    of target lookups (0.9s with the SRV query), past the fixed 3 x timeout a lookup had, which gave up every
    lookup so that the pool never learned its backends.  The budget now grows with the waves the answer needs.
    Timed on the loop's clock, which only the queries move: the same on a loaded machine as on an idle one."""
    targets = [f"gw-{i}.{SERVICE}." for i in range(80)]
    clock = [0.0]
    resolver = SlowResolver(0.15, clock)
    resolver.script = {(SERVICE, "SRV"): answer(SERVICE + ".", "SRV", *(f"10 50 28102 {t}" for t in targets))}
    for i, target in enumerate(targets):
        resolver.script[(target, "A")] = answer(target, "A", f"127.0.1.{i + 1}")
    monkeypatch.setattr(discovery, "make_resolver", lambda _config: resolver)
    config = DiscoveryConfig(SERVICE, nameservers=(("127.0.0.1", 53),), timeout=0.2)
    applied: list[int] = []
    loop = discovery.Discoverer(PoolConfig("gateways", (), discovery=config),
                                lambda _pool, backends: applied.append(len(backends)))
    event_loop = asyncio.new_event_loop()
    event_loop.time = lambda: clock[0]  # type: ignore[method-assign]
    try:
        event_loop.run_until_complete(loop.resolve_once())
    finally:
        event_loop.close()
    assert clock[0] > discovery.LOOKUP_BUDGET * config.timeout  # the old budget would have given it up
    assert loop.status.last_error is None
    assert applied == [80] and loop.status.backends == 80


def test_the_target_lookups_budget_counts_waves() -> None:
    assert discovery.target_lookups_budget(1, 2.0) == 4.0
    assert discovery.target_lookups_budget(16, 2.0) == 4.0
    assert discovery.target_lookups_budget(17, 2.0) == 8.0
    assert discovery.target_lookups_budget(256, 2.0) == 64.0


def test_records_that_can_never_be_backends_are_not_looked_up_nor_counted_against_max_backends() -> None:
    """Target ".", an IP address and a bad label sort before gw-1 and gw-2: with max_backends 2 both still join,
    and no query is made for the junk."""
    resolver = ScriptedResolver().healthy()
    resolver.script[(SERVICE, "SRV")] = answer(
        SERVICE + ".", "SRV", "10 50 28100 .", "10 50 28100 127.0.0.1.", f"10 50 28100 -x.{SERVICE}.",
        f"10 50 28102 {GW1}", f"10 50 28103 {GW2}",
    )
    config = DiscoveryConfig(SERVICE, nameservers=(("127.0.0.1", 53),), timeout=0.3, max_backends=2)
    found = run_lookup(resolver, known=(), config=config)
    assert found.backends == BOTH and found.truncated == 0 and len(found.skipped) == 3
    assert {name for name, _ in resolver.queries} == {SERVICE, GW1, GW2}


def test_errors_that_change_at_every_lookup_log_a_line_a_minute_and_the_recovery_once(
    scripted: ScriptedResolver, caplog: pytest.LogCaptureFixture
) -> None:
    """REFUSED, then SERVFAIL, then a timeout... (or a nameserver that fails every other lookup) logged a
    warning at every lookup: 17,000 lines a day per pool at the default interval.  Now the first, then one
    a minute with the count of the others; a good lookup after a warning says so, once."""
    loop = discovery.Discoverer(PoolConfig("gateways", (), discovery=CONFIG), lambda *args: None)
    errors = [dns.resolver.NoNameservers(), dns.resolver.LifetimeTimeout(timeout=0.3, errors=[])]

    async def lookups() -> None:
        await loop.resolve_once()  # a good one first
        for i in range(10):
            scripted.script[(SERVICE, "SRV")] = errors[i % 2]
            await loop.resolve_once()
        scripted.healthy()
        await loop.resolve_once()
        for i in range(4):  # failing every other lookup
            scripted.script[(SERVICE, "SRV")] = errors[i % 2]
            await loop.resolve_once()
            scripted.healthy()
            await loop.resolve_once()

    with caplog.at_level("INFO", logger="lb.control.discovery"):
        asyncio.run(lookups())
    lines = [r.getMessage() for r in caplog.records if "discovery for pool" in r.getMessage()]
    assert loop.status.errors == 14
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"discovery for pool gateways: {SERVICE}: no nameserver answered")
    assert lines[1] == f"discovery for pool gateways: recovered, {SERVICE} answers again after 10 failed lookup(s)"


def test_an_outage_that_begins_within_a_minute_of_the_last_line_is_still_logged(
    scripted: ScriptedResolver, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same error at every lookup is said once; held back by the minute since the last line, it is
    said when the minute has passed, not never."""
    clock = [1000.0]
    monkeypatch.setattr(discovery.Throttle, "due", _due_at(clock))
    loop = discovery.Discoverer(PoolConfig("gateways", (), discovery=CONFIG), lambda *args: None)

    async def lookups() -> None:
        await loop.resolve_once()
        scripted.script[(SERVICE, "SRV")] = dns.resolver.NoNameservers()
        await loop.resolve_once()  # said
        scripted.healthy()
        await loop.resolve_once()  # recovered: said
        scripted.script[(SERVICE, "SRV")] = dns.resolver.LifetimeTimeout(timeout=0.3, errors=[])
        for _ in range(3):
            clock[0] += 10.0
            await loop.resolve_once()  # within the minute: held back
        clock[0] += 60.0
        await loop.resolve_once()  # the same error, the minute passed: said
        await loop.resolve_once()  # and not again

    with caplog.at_level("INFO", logger="lb.control.discovery"):
        asyncio.run(lookups())
    lines = [r.getMessage() for r in caplog.records if "discovery for pool" in r.getMessage()]
    assert len(lines) == 3, lines
    assert "no answer within 0.3s" in lines[2] and "(3 other error(s) since the last line" in lines[2]


def _due_at(clock: list[float]) -> Any:
    real = discovery.Throttle.due

    def due(self: discovery.Throttle, now: float | None = None) -> int | None:
        return real(self, clock[0])

    return due


def test_only_a_target_that_names_its_backend_is_looked_up_and_its_id_stays_its_own() -> None:
    """`gw-0` is a static backend's id and `gw-1` is named under two domains: only `gw-1.gw.test` (first
    by name) is asked for its address.  It has none: gw-1 is left out, not taken over by the other
    domain's record (instances whose lookups failed differently pointed gw-1 at different pods)."""
    other = f"gw-1.other.{SERVICE}."
    resolver = ScriptedResolver()
    resolver.script = {
        (SERVICE, "SRV"): answer(SERVICE + ".", "SRV", f"10 50 9000 gw-0.{SERVICE}.", f"10 50 9000 {GW1}",
                                 f"10 50 9000 {other}", f"10 50 9000 {GW2}"),
        (GW2, "A"): answer(GW2, "A", "127.0.0.2"),
        (other, "A"): answer(other, "A", "127.0.0.3"),
    }
    found, _ = asyncio.run(discovery.lookup(CONFIG, cast(Any, resolver), frozenset({"gw-0"})))
    assert [(b.id, b.host) for b in found.backends] == [("gw-2", "127.0.0.2")]
    asked = {name for name, _ in resolver.queries if name != SERVICE}
    assert asked == {GW1, GW2}, asked  # neither gw-0's record nor the other gw-1's
    assert f"target 'gw-1.other.{SERVICE}': id gw-1 is already taken" in found.skipped


def answer_with(name: str, rdtype: str, ttl: int, texts: tuple[str, ...],
                additional: tuple[tuple[str, str, int, str], ...] = ()) -> dns.resolver.Answer:
    """A real dnspython answer with TTL `ttl`, and (name, rdtype, ttl, text) records in its additional section."""
    query = dns.message.make_query(name, rdtype)
    response = dns.message.make_response(query)
    response.answer.append(dns.rrset.from_text(name, ttl, "IN", rdtype, *texts))
    for extra_name, extra_type, extra_ttl, text in additional:
        response.additional.append(dns.rrset.from_text(extra_name, extra_ttl, "IN", extra_type, text))
    parsed = dns.message.from_wire(response.to_wire())
    assert isinstance(parsed, dns.message.QueryMessage)
    return dns.resolver.Answer(dns.name.from_text(name), dns.rdatatype.from_text(rdtype), dns.rdataclass.IN, parsed)


def _ttl_of(resolver: ScriptedResolver) -> float | None:
    fake: Any = resolver
    _, ttl = asyncio.run(discovery.lookup(CONFIG, fake, frozenset()))
    return ttl


def test_an_srv_lookup_s_ttl_is_the_smallest_of_its_answers() -> None:
    """The next lookup comes when the first record of the answer expires: the smallest TTL of the SRV
    answer, the addresses in its additional section (A and AAAA both) and the targets' own lookups."""
    srv = (f"10 50 28102 {GW1}", f"10 50 28103 {GW2}")
    resolver = ScriptedResolver().healthy()
    resolver.script[(SERVICE, "SRV")] = answer_with(SERVICE + ".", "SRV", 60, srv)
    resolver.script[(GW1, "A")] = answer_with(GW1, "A", 7, ("127.0.0.1",))
    resolver.script[(GW2, "A")] = answer_with(GW2, "A", 30, ("127.0.0.2",))
    assert _ttl_of(resolver) == 7.0
    additional = ((GW1, "A", 40, "127.0.0.1"), (GW2, "AAAA", 3, "fd00::2"))
    resolver = ScriptedResolver()
    resolver.script = {(SERVICE, "SRV"): answer_with(SERVICE + ".", "SRV", 60, srv, additional)}
    fake: Any = resolver
    found, ttl = asyncio.run(discovery.lookup(CONFIG, fake, frozenset()))
    assert ttl == 3.0
    assert [(b.id, b.host) for b in found.backends] == [("gw-1", "127.0.0.1"), ("gw-2", "fd00::2")]
    assert resolver.queries == [(SERVICE, "SRV")], "the additional section's addresses, A and AAAA, were enough"


def test_records_cut_at_max_backends_are_counted_in_the_lookup_and_in_status(scripted: ScriptedResolver) -> None:
    """An answer of two records under `max_backends: 1`: one backend, one record counted as cut, and /status's
    `skipped` counts it."""
    config = DiscoveryConfig(SERVICE, nameservers=(("127.0.0.1", 53),), timeout=0.3, max_backends=1)
    fake: Any = scripted
    found, _ = asyncio.run(discovery.lookup(config, fake, frozenset()))
    assert ([b.id for b in found.backends], found.truncated) == (["gw-1"], 1)
    loop = discovery.Discoverer(PoolConfig("gateways", (), discovery=config), lambda *_: None)
    asyncio.run(loop.resolve_once())
    assert loop.status.skipped == 1


def test_more_than_three_failed_targets_are_summed_up(scripted: ScriptedResolver) -> None:
    """/status names three failed targets and counts the rest."""
    names = [f"gw-{i}.{SERVICE}." for i in range(1, 6)]
    scripted.script = {(SERVICE, "SRV"): answer(SERVICE + ".", "SRV", *(f"10 50 28102 {name}" for name in names))}
    scripted.script[(names[0], "A")] = answer(names[0], "A", "127.0.0.1")
    for name in names[1:]:
        scripted.script[(name, "A")] = dns.resolver.LifetimeTimeout(timeout=0.3, errors=[])
    loop = discovery.Discoverer(PoolConfig("gateways", (), discovery=CONFIG), lambda *_: None)
    asyncio.run(loop.resolve_once())
    assert loop.status.last_error is not None and loop.status.last_error.endswith("; and 1 more target(s)")
    assert loop.status.last_error.count("address lookup failed") == 3


def test_a_failure_names_four_nameservers_and_counts_the_rest() -> None:
    errors = [(f"Do53:10.0.0.{i}@53", False, 53, "SERVFAIL", None) for i in range(6)]
    cause = discovery._cause(dns.resolver.LifetimeTimeout(timeout=0.3, errors=errors), 0.3)
    assert cause.count("answered SERVFAIL") == 4 and cause.endswith("; and 2 more)")


async def test_the_loop_retries_a_failed_lookup_soon_and_goes_back_to_its_interval_once_it_answers(
    scripted: ScriptedResolver, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """interval 30 s: after a failed lookup the next comes in 1 s; after the one that answers, no longer on
    the retry schedule: at the answer's TTL (5 s, shorter than the interval)."""
    config = DiscoveryConfig(SERVICE, nameservers=(("127.0.0.1", 53),), timeout=0.3, interval=30.0)
    loop = discovery.Discoverer(PoolConfig("gateways", (), discovery=config), lambda *_: None)
    healthy = dict(scripted.script)
    scripted.script = {(SERVICE, "SRV"): dns.resolver.LifetimeTimeout(timeout=0.3, errors=[])}
    sleeps: list[float] = []

    class Enough(Exception):
        pass

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        scripted.script = healthy
        if len(sleeps) == 2:
            raise Enough

    monkeypatch.setattr(asyncio, "sleep", sleep)
    with pytest.raises(Enough):
        await loop._run()
    assert sleeps == [1.0, 5.0]

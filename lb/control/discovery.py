"""DNS discovery (`pools.X.discovery`): one lookup loop per pool, feeding the balancer's pool merge.

What it owns: resolving (dnspython's resolver, with the configured
nameservers or the system's, on threads: see `ThreadedResolver`),
the loop and its timing, the last known set of
each pool, the pool's `discovery` object in /status and the lb_discovery_*
metrics.  What it leaves to others: what an answer means (`lb.control.dns_backends`,
pure) and what a new set does to the pool (`Balancer.update_discovered`, the
same merge a reload uses: kept backends keep their state and counts, added ones
are health-checked, removed ones take no new client while their tunnels stay).

A failed lookup, or an empty answer, keeps the last known set: a DNS outage
must never empty a pool.  Both count as errors and show in /status as
`last_error`.  The same holds per SRV target: when the SRV answer came but a
target's own A/AAAA lookup failed (timeout, SERVFAIL or REFUSED from every
nameserver, a malformed answer, a network error), DNS said nothing about that
target, so its last known backend stays as it was and its cookie holders stay
pinned; one never seen is added once it resolves.  Dropping it instead made one
lost UDP packet redispatch every client of a gateway that was fine.  The rest
of the answer still applies (a target gone from the SRV answer leaves), and the
lookup counts as an error (`last_error` names the target and the cause,
`last_ok` does not move: the set is not all fresh).  A definite answer that a
target has no address (NXDOMAIN, or NOERROR without A/AAAA records) is DNS
saying the pod is gone, and drops it ("no A/AAAA address"): an answer, not a
failure.  (`lb.control.dns_backends.from_srv` applies the rule;
`_addresses` tells an answer from a failure.)

An address no gateway can listen at (`0.0.0.0`, multicast) is skipped, and so is one that reaches
the balancer's own listener (`lb.config.backend_address`): a name that resolves to the balancer
itself (its own Service, a typo) would send every request back to it as a new one.

With `workers: N`, the owner alone resolves, and sends each set it applies to its workers
(lb.control.ipc's `discovered`); a worker's manager follows (`follower=True`): it runs no loop,
and applies what it is sent.  Each process resolving on its own, answers that differ from one
query to the next (a round-robin nameserver, a headless Service's subset) left the workers with
different sets for good, and the same client went to different gateways.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import functools
import logging
import math
import socket
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

import dns.exception
import dns.message
import dns.nameserver
import dns.rcode
import dns.rdatatype
import dns.resolver
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from lb.config.backend_address import NO_LISTENERS, IPAddress, OwnListeners
from lb.config.model import BackendConfig, DiscoveryConfig, DiscoveryType, ListenerConfig, PoolConfig
from lb.control.daemon_thread import in_daemon_thread
from lb.control.dns_backends import (
    Discovered,
    SrvRecord,
    claimants,
    cut_srv,
    diff,
    from_addresses,
    from_srv,
    next_lookup_in,
    retry_lookup_in,
)
from lb.control.hosts_file import HostsFile
from lb.log import Throttle
from lb.state.series import REMOVED_POOLS_KEPT

log = logging.getLogger(__name__)

# At most this many target lookups at once for one SRV answer (those not in the additional section).
_TARGET_LOOKUPS = 16
# A whole lookup may take this many `timeout`s, and two more for each wave of `_TARGET_LOOKUPS` target
# lookups its SRV answer needs (A, then AAAA only for a target without an A address).
LOOKUP_BUDGET = 3
# How long a process that serves waits for its first lookups before it listens (DiscoveryManager.first_lookups).
FIRST_LOOKUPS_WAIT = 5.0

Apply = Callable[[str, tuple[BackendConfig, ...]], None]
Extend = Callable[[float], None]  # gives the lookup under way this many more seconds


class DiscoveryError(Exception):
    """A lookup that yields no usable backend; the message is what /status shows as `last_error`."""


@dataclass(slots=True)
class DiscoveryStatus:
    """One pool's discovery as /status shows it.  Mutated only on the event loop thread."""

    dns: str
    type: str
    last_ok: float | None = None  # wall-clock time of the last lookup that gave backends, every target resolved
    last_error: str | None = None  # None once a lookup succeeds again
    last_error_at: float | None = None
    errors: int = 0  # failed or empty lookups, and those with a target's address lookup failed, ever
    lookups: int = 0
    backends: int = 0  # in the last known set
    skipped: int = 0  # records left out of the last answer (invalid, duplicate, truncated)

    def document(self) -> dict[str, Any]:
        return {
            "dns": self.dns,
            "type": self.type,
            "last_ok": self.last_ok,
            "last_error": self.last_error,
            "last_error_at": self.last_error_at,
            "errors": self.errors,
            "lookups": self.lookups,
            "backends": self.backends,
            "skipped": self.skipped,
        }


class ThreadedResolver:
    """dnspython's resolver, each query on a thread of its own: the event loop never parses an answer.

    A DNS answer may hold 64 KiB of records (over TCP), and dnspython parses about 20 A or 10 SRV
    records a millisecond here: its async resolver parsed a 3,000-record answer in one 130-200 ms
    block of the loop, every `interval`, during which no connection moved.  On a thread the parse
    shares the GIL with the loop, which gets it back within the interpreter's switch interval (5 ms).
    Daemon threads, not an executor: a query waiting out its `timeout` must neither hold up a
    reload's parse (the loop's default executor) nor delay the process's exit (an executor's
    threads are joined at exit).  At most `_TARGET_LOOKUPS` run at once per lookup; a lookup given up
    (its budget passed, a reload) leaves its queries to end within the resolver's lifetime.
    """

    def __init__(self, resolver: dns.resolver.Resolver, hosts: HostsFile | None = None) -> None:
        self.sync = resolver
        # The system resolver's: a name /etc/hosts lists is answered from it, and DNS is not asked.
        self.hosts = hosts
        # The same resolver without EDNS0, for a nameserver that does not speak it (`_resolve`).
        self._plain = copy.copy(resolver)
        self._plain.use_edns(False)
        self.edns_refused_by: str | None = None  # once one has: every query goes without EDNS0
        self._told_edns_refused = False

    async def resolve(self, name: str, rdtype: str, *, search: bool | None = None) -> dns.resolver.Answer:
        """`dns.resolver.Resolver.resolve` on a thread; cancelling returns at once (the query itself
        ends within the resolver's lifetime).

        A resolver that searches (the system's) tries its search list only for a name with fewer dots
        than ndots, as README says.  dnspython also tries it after a name with as many has failed: the
        deploy example's `_ws._tcp.gateway.game.svc.cluster.local` (5 dots, a pod's ndots), its Service
        not there yet, cost a query per search domain at each lookup, and a host's search domain that
        did not answer in time turned /status's "no such name (NXDOMAIN)" into "no answer within 1s"
        (glibc also tries the list after such a name; musl does not).
        """
        if search is None and self.sync.use_search_by_default:
            ndots = 1 if self.sync.ndots is None else self.sync.ndots
            search = name.count(".") < ndots
        try:
            return await in_daemon_thread(functools.partial(self._resolve, name, rdtype, search), name=f"dns {name}")
        except RuntimeError as exc:  # out of threads (a cgroup's pids.max): a failed lookup, not a bug
            raise OSError(f"no thread for the DNS query: {exc}") from exc
        finally:
            if self.edns_refused_by is not None and not self._told_edns_refused:  # whether the retry worked or not
                self._told_edns_refused = True
                log.warning("discovery: nameserver %s does not speak EDNS0 (it answered FORMERR or NOTIMP); asked "
                            "without it from now on: answers past 512 bytes come over TCP/53", self.edns_refused_by)

    def _resolve(self, name: str, rdtype: str, search: bool | None) -> dns.resolver.Answer:
        """The answer, on this thread.

        RFC 6891 (7): a nameserver that does not know EDNS0 answers its OPT record with FORMERR (some
        with NOTIMP), and the asker should ask again without it.  dnspython does not: every lookup
        against such a server failed once EDNS0 was on.  The query is asked again, with what is left
        of its lifetime, and every query after it goes without EDNS0 (to every nameserver: one of
        a list that does not speak it, beside one that does not answer, failed every query; a
        reload makes a new resolver, which offers EDNS0 again).  Also when the query ran out of
        time after the refusal: the next one goes without.
        """
        if self.edns_refused_by is not None:
            return self._plain.resolve(name, rdtype, search=search)
        started = time.monotonic()
        try:
            return self.sync.resolve(name, rdtype, search=search)
        except (dns.resolver.NoNameservers, dns.resolver.LifetimeTimeout) as exc:
            refused_by = edns_refused_by(exc)
            if refused_by is None:
                raise
            self.edns_refused_by = refused_by
            left = self.sync.lifetime - (time.monotonic() - started)
            if left <= 0:
                raise
        return self._plain.resolve(name, rdtype, search=search, lifetime=left)


def edns_refused_by(exc: dns.exception.DNSException) -> str | None:
    """The first nameserver that answered a query's EDNS0 as one that does not speak it: FORMERR or
    NOTIMP with no OPT record of its own (one that speaks EDNS0 sends OPT even in an error), else None."""
    for server, _tcp, _port, _error, answer in exc.kwargs.get("errors") or ():
        if (isinstance(answer, dns.message.Message) and answer.edns < 0
                and answer.rcode() in (dns.rcode.FORMERR, dns.rcode.NOTIMP)):
            return str(server)
    return None


def make_resolver(config: DiscoveryConfig) -> ThreadedResolver:
    """A resolver for the configured nameservers (host:port), or the system's (/etc/hosts, then the
    nameservers of /etc/resolv.conf, as the C library's `hosts: files dns`)."""
    if not config.nameservers:
        try:
            resolver = dns.resolver.Resolver(filename=RESOLV_CONF)
            # A name with fewer dots than `options ndots` (1 unless set; Kubernetes sets 5) is tried
            # with each `search` domain first, as the C library does (and only such a name: see
            # `ThreadedResolver.resolve`): dnspython does not unless told, and `dns: _ws._tcp.gateway`
            # in a pod, which `getent`, `nslookup` and every client there find under its namespace's
            # domain, was NXDOMAIN at every lookup.  A name ending in `.` is asked as written.
            resolver.use_search_by_default = True
        except dns.resolver.NoResolverConfiguration:
            # No /etc/resolv.conf (a scratch container): every lookup fails, shown in /status.
            log.warning("discovery for %s: no system resolver configuration (/etc/resolv.conf); only names "
                        "/etc/hosts lists are found; set nameservers", config.dns)
            resolver = dns.resolver.Resolver(configure=False)
    else:
        resolver = dns.resolver.Resolver(configure=False)
        resolver.nameservers = [dns.nameserver.Do53Nameserver(host, port) for host, port in config.nameservers]
    # `timeout` bounds one query over all the nameservers; each gets its share of it.  With a whole
    # `timeout` each, a first nameserver that never answers (a host gone, a firewall dropping) took
    # all of it, and the next ones in the list were never asked: every lookup failed.
    resolver.lifetime = config.timeout
    resolver.timeout = config.timeout / max(1, len(resolver.nameservers))
    # EDNS0, offering EDNS_PAYLOAD bytes over UDP (11 to 15 pods of a headless Service, with their
    # addresses): without it an answer past 512 bytes (about 5) came truncated and was asked again over
    # TCP/53, which many NetworkPolicies and firewalls do not let through.  Larger answers still go over TCP.
    resolver.use_edns(0, 0, EDNS_PAYLOAD)
    return ThreadedResolver(resolver, None if config.nameservers else SYSTEM_HOSTS)


# The system resolver's configuration (nameservers, and the search list a short name is tried with).
RESOLV_CONF = "/etc/resolv.conf"

# /etc/hosts, read once for every pool of the system resolver (each change parsed once, not once a pool).
SYSTEM_HOSTS: Final = HostsFile()


# The UDP answer size offered: the largest that needs no IP fragment on common paths (DNS Flag Day 2020,
# and what BIND, Unbound and CoreDNS use).
EDNS_PAYLOAD = 1232


def is_local_address(ip: IPAddress) -> bool:
    """Whether `ip` is one of this host's addresses, which a wildcard listener accepts on.

    Asked of the kernel's routing: a UDP socket connected to a local address takes that address as
    its own (the local table's `src`); to any other, the outgoing interface's.  No packet is sent,
    and unlike a trial bind it holds with `ip_nonlocal_bind` set (where every bind succeeds, and
    every gateway on the listener's port would have looked like the balancer itself).  Asked anew at
    every lookup (four system calls, and only of an answer's addresses on a wildcard listener's port):
    a host's addresses change (DHCP, a floating address), and one remembered would go on skipping a
    gateway given an address the host has since let go.
    """
    if ip.is_loopback:
        return True
    try:
        with socket.socket(socket.AF_INET if ip.version == 4 else socket.AF_INET6, socket.SOCK_DGRAM) as probe:
            probe.connect((str(ip), 9))
            return bool(probe.getsockname()[0] == str(ip))
    except OSError:  # no route: not an address of ours
        return False


async def lookup(
    config: DiscoveryConfig,
    resolver: ThreadedResolver,
    reserved_ids: frozenset[str] = frozenset(),
    known: tuple[BackendConfig, ...] = (),
    extend: Extend | None = None,
    own: OwnListeners = NO_LISTENERS,
) -> tuple[Discovered, float | None]:
    """Resolve once: the backends the name yields now, and the smallest TTL seen.

    `known` (the last known set) stands in for an SRV target whose own address lookup failed
    (listed in `Discovered.failed`).  `extend`, if given, is called with the time the SRV answer's
    target lookups may take (`target_lookups_budget`), before they start.  An address that reaches
    one of `own` is skipped.

    Raises:
        DiscoveryError: the lookup failed, or the answer holds no usable backend.
    """
    try:
        if config.type is DiscoveryType.SRV:
            return await _lookup_srv(config, resolver, reserved_ids, known, extend, own)
        return await _lookup_addresses(config, resolver, reserved_ids, known, own)
    except (dns.exception.DNSException, OSError) as exc:
        raise DiscoveryError(f"{config.dns}: {_cause(exc, config.timeout)}") from None


def _cause(exc: BaseException, timeout: float) -> str:
    """Why a query failed, in the words /status shows (after the name)."""
    if isinstance(exc, dns.resolver.NXDOMAIN):
        return "no such name (NXDOMAIN)"
    if isinstance(exc, dns.resolver.NoAnswer):
        return "empty answer"
    if isinstance(exc, dns.resolver.NoNameservers):  # every nameserver said SERVFAIL, REFUSED, ...
        return f"no nameserver answered ({_attempts(exc) or _first_line(exc)})"
    if isinstance(exc, dns.exception.Timeout):
        attempts = _attempts(exc)
        return f"no answer within {timeout:g}s" + (f" ({attempts})" if attempts else "")
    if isinstance(exc, dns.exception.DNSException):
        return _first_line(exc) or type(exc).__name__
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}"
    return type(exc).__name__


def _attempts(exc: dns.exception.DNSException) -> str:
    """What each nameserver did, from the trace dnspython keeps (`errors`: server, over TCP, port, error, answer).

    Its own text said nothing of a truncated answer ("Server Do53:10.0.0.10@53 answered ;" then the
    TCP retry's "answered EOF"), where a firewall that lets UDP/53 through and drops TCP/53 is the
    usual cause, and one an operator can only fix once told.
    """
    errors = exc.kwargs.get("errors") or []
    said = [f"{server}{' over TCP' if tcp else ''}: {_attempt_error(error)}"
            for server, tcp, _port, error, _answer in errors[:4]]
    return "; ".join(said) + (f"; and {len(errors) - 4} more" if len(errors) > 4 else "")


def _attempt_error(error: object) -> str:
    if isinstance(error, dns.message.Truncated):
        return "truncated answer (too large for UDP; asked again over TCP)"
    if isinstance(error, EOFError):
        return "closed the connection without an answer"
    if isinstance(error, str):  # an answer's rcode
        return f"answered {error}"
    text = str(error)
    return text.splitlines()[0][:120] if text else type(error).__name__


async def _lookup_srv(
    config: DiscoveryConfig, resolver: ThreadedResolver, reserved_ids: frozenset[str],
    known: tuple[BackendConfig, ...], extend: Extend | None = None, own: OwnListeners = NO_LISTENERS,
) -> tuple[Discovered, float | None]:
    answer = await resolver.resolve(config.dns, "SRV")
    ttls = [float(answer.rrset.ttl)] if answer.rrset is not None else []
    records = [
        SrvRecord(target=rdata.target.to_text(), port=rdata.port, weight=rdata.weight, priority=rdata.priority)
        for rdata in answer
    ]
    # Cut before any per-target lookup: a hostile answer must not buy thousands of queries.  Records that
    # can never be a backend are kept to say why they are skipped, and never looked up.
    records, truncated = cut_srv(records, config.max_backends, reserved_ids)
    addresses: dict[str, list[str]] = {}
    # Servers (CoreDNS among them) put the targets' addresses in the additional section.
    for rrset in answer.response.additional:
        if rrset.rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
            name = rrset.name.to_text().lower().rstrip(".")
            addresses.setdefault(name, []).extend(rdata.address for rdata in rrset)
            ttls.append(float(rrset.ttl))
    # Only the records that name their backend (`claimants`): a target whose id is taken is never one.
    claiming = {r.target.lower().rstrip(".") for r, claims in zip(records, claimants(records, reserved_ids),
                                                                   strict=True) if claims}
    missing = sorted(claiming - set(addresses))
    if extend is not None and missing:
        extend(target_lookups_budget(len(missing), config.timeout))
    gate = asyncio.Semaphore(_TARGET_LOOKUPS)
    failed: dict[str, str] = {}  # target -> why its address lookup failed

    async def resolve_target(target: str) -> None:
        try:
            async with gate:
                found, ttl, _ = await _addresses(resolver, target + ".", a_decides=True)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return  # DNS answered: no address (`from_srv` drops the target)
        except (dns.exception.DNSException, OSError) as exc:
            failed[target] = _cause(exc, config.timeout)  # no answer: its last known backend stays
            return
        addresses[target] = found
        if ttl is not None:
            ttls.append(ttl)

    await asyncio.gather(*(resolve_target(t) for t in missing))
    discovered = from_srv(records, addresses, max_backends=config.max_backends, reserved_ids=reserved_ids,
                          failed=failed, known=known, own=own)
    discovered = replace(discovered, truncated=discovered.truncated + truncated)
    return discovered, min(ttls) if ttls else None


async def _lookup_addresses(
    config: DiscoveryConfig, resolver: ThreadedResolver, reserved_ids: frozenset[str],
    known: tuple[BackendConfig, ...] = (), own: OwnListeners = NO_LISTENERS,
) -> tuple[Discovered, float | None]:
    """`type: a`: a backend per A and AAAA address.  A failed AAAA query after an A answer keeps the
    last known IPv6 backends and is reported as an error, as a failed SRV target's lookup is: taking
    the A answer alone dropped every IPv6 backend (and redispatched its clients) at each lost packet,
    and called the lookup a success."""
    found, ttl, aaaa_failed = await _addresses(resolver, config.dns)
    failed: tuple[str, ...] = ()
    kept = [b.host for b in known if ":" in b.host] if aaaa_failed is not None else []
    if aaaa_failed is not None and kept:  # none to keep: the A answer is the set, as for a name with no AAAA
        found += kept
        failed = (f"AAAA query: {_cause(aaaa_failed, config.timeout)}; its last known {len(kept)} IPv6 backend(s) "
                  "kept",)
    assert config.port is not None  # lb.config.sections requires it for type a
    discovered = from_addresses(found, port=config.port, max_backends=config.max_backends, reserved_ids=reserved_ids,
                                own=own)
    return replace(discovered, failed=failed), ttl


async def _addresses(
    resolver: ThreadedResolver, name: str, *, a_decides: bool = False
) -> tuple[list[str], float | None, BaseException | None]:
    """The A and AAAA addresses of `name` (a `type: a` name, or an SRV target), their smallest TTL, and
    how the AAAA query failed after an A answer (None: it did not).

    With `a_decides` (an SRV target, which gets one address of them, IPv4 first: `pick_address`) an
    A answer with addresses decides alone, and AAAA is not asked at all: its answer could change
    nothing, and asking it doubled each target's queries and the time a lookup of many targets takes
    within its budget.  Without an A address, a failed query leaves the addresses unknown, and that
    failure is raised: a failed A query is not followed by AAAA, whose answer could not decide (an A
    address would have won) and would swap an IPv4 set for an IPv6 one.

    Raises:
        dns.resolver.NXDOMAIN, dns.resolver.NoAnswer: DNS answered that `name` has no address.
        dns.exception.DNSException, OSError: a query got no answer (timeout, SERVFAIL or REFUSED from
            every nameserver, a malformed answer, a network error): DNS said nothing about `name`.
    """
    listed = resolver.hosts.addresses(name) if resolver.hosts is not None else ()
    if listed:  # the system resolver answers from /etc/hosts first, with no TTL: asked again each interval
        ipv4 = [address for address in listed if ":" not in address]
        return (ipv4 if a_decides and ipv4 else list(listed)), None, None
    found: list[str] = []
    ttls: list[float] = []
    for rdtype in ("A", "AAAA"):
        try:
            # The resolver's own rule: the system's applies its search list to a `type: a` name with
            # fewer dots than ndots; an SRV target comes absolute (`target + "."`), as DNS wrote it.
            answer = await resolver.resolve(name, rdtype)
        except dns.resolver.NoAnswer:
            continue
        except (dns.exception.DNSException, OSError) as exc:  # NXDOMAIN included: the name does not exist
            if found:  # the A answer stands; the caller decides what the IPv6 addresses are meanwhile
                return found, min(ttls) if ttls else None, exc
            raise
        found.extend(rdata.address for rdata in answer)
        if answer.rrset is not None:
            ttls.append(float(answer.rrset.ttl))
        if found and a_decides:
            break
    if not found:
        raise dns.resolver.NoAnswer
    return found, min(ttls) if ttls else None, None


def target_lookups_budget(targets: int, timeout: float) -> float:
    """The time `targets` SRV targets' address lookups may take: two `timeout`s (A, then AAAA for a target
    without an A address) per wave of `_TARGET_LOOKUPS` run at once.

    A whole lookup's budget was a fixed LOOKUP_BUDGET `timeout`s: 256 targets from a nameserver that
    answered each query in 450 ms (well within `timeout`) took 16 waves, past it, and every lookup was
    given up: the pool never learned its backends.  Each query is bounded by `timeout` on its own (the
    resolver's lifetime), so this is the lookup's own bound, not a guess.
    """
    return 2 * math.ceil(targets / _TARGET_LOOKUPS) * timeout


# At most one line a minute of lookup errors per pool (their count is in /status and the metrics).
ERROR_LINE_INTERVAL: Final = 60.0


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""


class Discoverer:
    """The lookup loop of one pool: resolve, diff, apply on change, sleep, again."""

    def __init__(self, pool: PoolConfig, apply: Apply, own: OwnListeners = NO_LISTENERS) -> None:
        assert pool.discovery is not None
        self.pool = pool.name
        self.own = own  # the balancer's listeners, which no backend may be (a reload sets it anew)
        self.config = pool.discovery
        self._reserved = frozenset(b.id for b in pool.backends)
        self._apply = apply
        self.known: tuple[BackendConfig, ...] = ()
        # Whether `known` came from this name's own answers (not a previous name's, `adopt`): only then may
        # it stand in for what a failed query did not say (an SRV target's address, type a's IPv6 ones).
        self._known_is_ours = True
        self.status = DiscoveryStatus(dns=self.config.dns, type=self.config.type.value)
        self._task: asyncio.Task[None] | None = None
        self._resolver = make_resolver(self.config)
        self._skipped_said: tuple[tuple[str, ...], int] = ((), 0)  # what _report_skipped last logged
        # Errors that differ from one lookup to the next (REFUSED, then SERVFAIL; a nameserver that fails
        # every other lookup) logged a line each: one a minute at most, with how many were left unsaid.
        self._error_lines = Throttle(ERROR_LINE_INTERVAL)
        self._failing = 0  # lookups failed since the last good one
        self._said_failing = False  # a warning of them was logged: the recovery is logged too
        self.first_done = asyncio.Event()  # the first lookup has ended, with an answer or not

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"discovery {self.pool}")

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def wait_stopped(self) -> None:
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    def adopt(self, previous: Discoverer) -> None:
        """Take over the last known set of the pool's previous loop (a reload), and its record when it
        looked up the same name the same way.  Under a new name (or type) the pool still holds the old
        one's backends until the new one answers: they are this loop's last known set, which a failed
        lookup keeps and the first answer replaces; its record starts afresh, but for its counts of
        lookups and errors, which are counters (`lb_discovery_*_total`) and never go backwards."""
        self.known = previous.known
        if (previous.config.dns, previous.config.type) == (self.config.dns, self.config.type):
            self.status = previous.status
            self._known_is_ours = previous._known_is_ours
            return
        self._known_is_ours = False
        self.count_on(previous.status.lookups, previous.status.errors)
        self.status.backends = len(self.known)

    def count_on(self, lookups: int, errors: int) -> None:
        """Start this loop's lookup and error counts where an earlier loop of the pool left them."""
        self.status.lookups, self.status.errors = lookups, errors

    async def _run(self) -> None:
        while True:
            ttl = await self.resolve_once()
            self.first_done.set()
            # A lookup that failed, wholly or for some targets, is tried again sooner.
            failing = self._failing
            await asyncio.sleep(retry_lookup_in(self.config.interval, failing) if failing
                                else next_lookup_in(self.config.interval, ttl))

    async def resolve_once(self) -> float | None:
        """One lookup; applies a changed set, records errors; returns the answer's TTL (None on error)."""
        status = self.status
        status.lookups += 1
        allowed = LOOKUP_BUDGET * self.config.timeout
        try:
            # Each query is bounded by `timeout`; the whole lookup by a few of them, and by the waves of
            # target lookups its SRV answer needs (`target_lookups_budget`), once that answer is in.
            async with asyncio.timeout(allowed) as budget:

                def extend(seconds: float) -> None:
                    nonlocal allowed
                    when = budget.when()
                    if when is not None:
                        allowed += seconds
                        budget.reschedule(when + seconds)

                stand_ins = self.known if self._known_is_ours else ()
                discovered, ttl = await lookup(self.config, self._resolver, self._reserved, stand_ins, extend, self.own)
            # Counted at every lookup, this one's too when nothing in it was usable: else /status kept
            # the count of the last lookup that gave backends beside an error that lists the skipped.
            status.skipped = len(discovered.skipped) + discovered.truncated
            if not discovered.backends:
                reasons = "; ".join((discovered.failed + discovered.skipped)[:3])
                raise DiscoveryError(f"{self.config.dns}: no usable backend in the answer{': ' if reasons else ''}"
                                     f"{reasons}")
        except DiscoveryError as exc:
            self._failed(str(exc))
            return None
        except TimeoutError:
            self._failed(f"{self.config.dns}: lookup not complete within {allowed:g}s")
            return None
        except Exception as exc:  # a bug in a DNS library must not end discovery for good
            log.error("discovery for pool %s failed unexpectedly", self.pool, exc_info=True)
            self._failed(f"{self.config.dns}: internal error ({type(exc).__name__})")
            return None
        self._report_skipped(discovered)
        if discovered.failed:
            self._targets_failed(discovered.failed)
        else:
            status.last_ok, status.last_error, status.last_error_at = time.time(), None, None
            if self._said_failing:
                log.info("discovery for pool %s: recovered, %s answers again after %d failed lookup(s)",
                         self.pool, self.config.dns, self._failing)
            self._failing, self._said_failing = 0, False
        self._known_is_ours = True  # from here on, whether or not it changed
        changes = diff(self.known, discovered.backends)
        if changes:
            log.info(
                "discovery %s (%s): %d backend(s); added %s, removed %s, changed %s",
                self.pool, self.config.dns, len(discovered.backends),
                _ids(changes.added), _ids(changes.removed), _ids(changes.changed),
            )
            self.known = discovered.backends
            status.backends = len(self.known)
            self._apply(self.pool, self.known)
        return ttl

    def _failed(self, message: str, *, kept_all: bool = True) -> None:
        """A lookup error: counted, shown in /status, logged once per change of the message.  `kept_all`:
        the whole last known set stays (False: the rest of the answer was applied, `_targets_failed`)."""
        status = self.status
        status.errors += 1
        self._failing += 1
        # Not only a changed error: one that went unsaid (held back by the minute since the last
        # line) is said once the minute has passed, or an outage that began then was never logged.
        if message != status.last_error or not self._said_failing:
            unsaid = self._error_lines.due()
            if unsaid is not None:
                kept = f"; keeping the last known {len(self.known)} backend(s)" if kept_all else ""
                more = f" ({unsaid} other error(s) since the last line: /status has each)" if unsaid else ""
                log.warning("discovery for pool %s: %s%s%s", self.pool, message, kept, more)
                self._said_failing = True
        status.last_error, status.last_error_at = message, time.time()

    def _targets_failed(self, failed: tuple[str, ...]) -> None:
        """Some targets' address lookups failed (kept as last known, or not added yet): an error, with
        the rest of the answer applied."""
        more = f"; and {len(failed) - 3} more target(s)" if len(failed) > 3 else ""
        self._failed(f"{self.config.dns}: {'; '.join(failed[:3])}{more}", kept_all=False)

    def _report_skipped(self, discovered: Discovered) -> None:
        """Warn of records left out, once per change: the same answer every interval is not news
        (`/status` and the metrics still count them at every lookup)."""
        said = (discovered.skipped, discovered.truncated)
        if said == self._skipped_said:
            return
        self._skipped_said = said
        for reason in discovered.skipped[:10]:
            log.warning("discovery for pool %s skipped %s", self.pool, reason)
        if len(discovered.skipped) > 10:
            log.warning("discovery for pool %s skipped %d more record(s)", self.pool, len(discovered.skipped) - 10)
        if discovered.truncated:
            log.warning("discovery for pool %s: answer cut to max_backends=%d (%d record(s) dropped)",
                        self.pool, self.config.max_backends, discovered.truncated)


# What the line of a changed set names of each list (added, removed, changed): ids are DNS labels of up to 63
# characters, and 20 of them in each list, with a 253-character name, made a line of 4.3 KB; a line must stay one
# write that a pipe takes whole (4 KiB: with `workers: N` the processes share stderr, lb.access_log says more).
_IDS_SHOWN: Final = 20
_IDS_CHARACTERS: Final = 800


def _ids(backends: tuple[BackendConfig, ...]) -> str:
    if not backends:
        return "none"
    shown: list[str] = []
    length = 0
    for backend in backends[:_IDS_SHOWN]:
        length += len(backend.id) + 2
        if shown and length > _IDS_CHARACTERS:
            break
        shown.append(backend.id)
    return ", ".join(shown) + (f" and {len(backends) - len(shown)} more" if len(backends) > len(shown) else "")


class DiscoveryManager:
    """Every pool's discovery loop, kept across reloads when a pool's discovery config is unchanged.

    A follower (a worker of `workers: N`) runs no loop: it applies the sets its owner sends (`follow`),
    and its first "lookups" are the owner's sets sent at its start (`owner_sent_all`).
    """

    def __init__(self, apply: Apply, registry: CollectorRegistry | None = None, *, follower: bool = False) -> None:
        self._apply = apply
        self._loops: dict[str, Discoverer] = {}
        self.follower = follower
        self._followed: dict[str, tuple[BackendConfig, ...]] = {}  # a follower's sets, by pool
        self._owner_sent_all = asyncio.Event()
        # The lookups and errors counted for each pool whose discovery a reload dropped: should a later
        # reload bring it back, lb_discovery_*_total go on from there rather than from 0.
        self._counted: dict[str, tuple[int, int]] = {}
        if registry is not None:
            registry.register(DiscoveryCollector(lambda: self._loops))

    def start(self, pools: Mapping[str, PoolConfig], listeners: Sequence[ListenerConfig] = ()) -> None:
        """Start loops for pools with discovery; keep unchanged ones; stop those no longer configured.
        `listeners`: the balancer's own, at which no discovered backend may be.  A follower only forgets
        the sets of pools no longer discovered (as the owner forgets them with their loops)."""
        if self.follower:
            for name in [name for name in self._followed if name not in pools or pools[name].discovery is None]:
                del self._followed[name]
            return
        own = OwnListeners.of(listeners, is_local_address)
        wanted = {name: pool for name, pool in pools.items() if pool.discovery is not None}
        for name in list(self._loops):
            loop = self._loops[name]
            pool = wanted.get(name)
            if pool is not None and pool.discovery == loop.config and frozenset(
                b.id for b in pool.backends
            ) == loop._reserved:
                loop.own = own  # from its next lookup on
                continue
            loop.stop()
            del self._loops[name]
            if pool is not None:
                replacement = Discoverer(pool, self._apply, own)
                replacement.adopt(loop)
                self._loops[name] = replacement
                replacement.start()
            else:
                self._counted[name] = (loop.status.lookups, loop.status.errors)
                while len(self._counted) > REMOVED_POOLS_KEPT:  # as the pools' own series (lb.state.series)
                    del self._counted[next(iter(self._counted))]
        for name, pool in wanted.items():
            if name not in self._loops:
                self._loops[name] = Discoverer(pool, self._apply, own)
                self._loops[name].count_on(*self._counted.pop(name, (0, 0)))
                self._loops[name].start()

    async def first_lookups(self) -> None:
        """Wait until every loop's first lookup has ended (answered, failed or timed out), or for a
        follower until its owner has sent every set it holds; for FIRST_LOOKUPS_WAIT at most.

        A process that serves clients waits for this before it listens, and the owner of workers
        before it starts them: a pool made by discovery alone would otherwise answer 503 until then
        (a worker the kernel hands connections while the owner already shows the pool up).  Bounded
        apart from the lookups' own budgets (3 x `timeout`, and two more per wave of an SRV answer's
        target lookups, which no key caps beyond max_backends): a nameserver down or slow at start
        must not keep the balancer from starting (a worker from its owner's WORKER_READY).  Lookups
        not done by then go on, and apply when done.
        """
        # Each first lookup ends within its own budget; the cap is for budgets longer than it.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FIRST_LOOKUPS_WAIT):
                if self.follower:
                    await self._owner_sent_all.wait()  # the owner's own first lookups came before
                for loop in list(self._loops.values()):
                    await loop.first_done.wait()

    def follow(self, pool: str, backends: tuple[BackendConfig, ...]) -> None:
        """A follower's owner says DNS gave `pool` this set: applied as a loop of its own would apply it,
        when it changed (`apply` leaves alone a pool not discovered here: its reload, on its way, takes
        the set from `with_discovered`)."""
        if diff(self._followed.get(pool, ()), backends):
            self._followed[pool] = backends
            self._apply(pool, backends)

    def owner_sent_all(self) -> None:
        """A follower has been sent every set its owner knows at its start: it may listen."""
        self._owner_sent_all.set()

    async def stop(self) -> None:
        loops, self._loops = list(self._loops.values()), {}
        for loop in loops:
            loop.stop()
        for loop in loops:
            await loop.wait_stopped()

    def known(self, pool: str) -> tuple[BackendConfig, ...]:
        if self.follower:
            return self._followed.get(pool, ())
        loop = self._loops.get(pool)
        return loop.known if loop is not None else ()

    def with_discovered(self, pool: PoolConfig) -> PoolConfig:
        """`pool` with its last known discovered backends added after the static ones."""
        return add_discovered(pool, self.known(pool.name)) if pool.discovery is not None else pool

    def status(self, pool: str) -> dict[str, Any] | None:
        loop = self._loops.get(pool)
        return loop.status.document() if loop is not None else None


def add_discovered(pool: PoolConfig, found: Sequence[BackendConfig]) -> PoolConfig:
    """`pool` with `found` added after its static backends, but for any whose id a static one has:
    a static backend wins over DNS, as in `lookup` (a set made before a reload made it static may
    still name it)."""
    static_ids = {b.id for b in pool.backends}
    found = tuple(b for b in found if b.id not in static_ids)
    return replace(pool, backends=pool.backends + found) if found else pool


class DiscoveryCollector(Collector):
    """lb_discovery_* read at scrape time, like `lb.control.metrics.LbCollector`."""

    def __init__(self, get_loops: Callable[[], Mapping[str, Discoverer]]) -> None:
        self._get_loops = get_loops

    def collect(self) -> Iterator[Metric]:
        errors = CounterMetricFamily(
            "lb_discovery_errors", "DNS discovery lookups that failed or gave no backend.", labels=["pool"]
        )
        lookups = CounterMetricFamily("lb_discovery_lookups", "DNS discovery lookups.", labels=["pool"])
        backends = GaugeMetricFamily(
            "lb_discovery_backends", "Backends in the last known discovered set.", labels=["pool"]
        )
        last_ok = GaugeMetricFamily(
            "lb_discovery_last_success_timestamp_seconds",
            "Unix time of the last lookup that gave backends (0: never).", labels=["pool"],
        )
        # /status said how many records an answer left out; nothing an alert could read did.
        skipped = GaugeMetricFamily(
            "lb_discovery_skipped_records",
            "Records of the last answer left out: unusable (bad name or port, duplicate, id taken) or past "
            "max_backends.", labels=["pool"],
        )
        for name, loop in sorted(self._get_loops().items()):
            status = loop.status
            errors.add_metric([name], status.errors)
            lookups.add_metric([name], status.lookups)
            backends.add_metric([name], status.backends)
            last_ok.add_metric([name], status.last_ok or 0.0)
            skipped.add_metric([name], status.skipped)
        yield errors
        yield lookups
        yield backends
        yield last_ok
        yield skipped


"""DNS answers → backends, and what changed since the last answer.  [pure]

`lb.control.discovery` does the lookups (dnspython, asyncio, the clock); this module
decides what they mean, so every rule here is tested without a socket:

- SRV (`type: srv`, the Kubernetes headless-Service way): one backend per
  record; its id is the first label of the target
  (`gw-0.gateway.game.svc.cluster.local.` → `gw-0`), a pod's stable name, so a
  cookie keeps naming the same pod when the pod moves to another IP or the DNS
  order changes (HAProxy's `server-template` names slots instead, and cookies
  land on the wrong pod when the order changes).  The address comes from the
  target's A/AAAA records, the port from the record.  SRV priorities are not
  tiers here: every record is a backend (Kubernetes gives them all the same).
- A/AAAA (`type: a`): one backend per address, id `ip:port`, port from config.
- Hostile answers: at most `max_backends` backends (the rest are dropped and
  counted); a target whose first label is not a valid id, or that collides with
  another backend's id, is skipped with a reason the caller logs.
- A target whose own address lookup failed (timeout, SERVFAIL or REFUSED, a
  malformed answer, a network error: the caller decides, see
  `lb.control.discovery`) is not a target without an address.  DNS said nothing
  about it, so it keeps its last known backend (same id and address; the port
  and weight as this answer's record says), and its cookie holders stay pinned (SPEC part 2: "A failed
  or empty lookup keeps the last known set", which holds per target as it does
  for the whole answer).  One never seen before is left out until it resolves.
  Either way the failure is reported (`Discovered.failed`) for /status and the
  metrics.  A definite answer that the target has no address (NXDOMAIN, or
  NOERROR without A/AAAA records) is DNS saying the pod is gone: the target is
  skipped ("no A/AAAA address") and its backend leaves the set.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lb.access_log import shortened
from lb.config.backend_address import NO_LISTENERS, OwnListeners, as_ipv4, not_a_host, own_listener_reason
from lb.config.model import BackendConfig, host_port

# Backend weights in the config file run 1..256.
MAX_WEIGHT = 256


@dataclass(frozen=True, slots=True)
class SrvRecord:
    """One SRV answer (RFC 2782): target host name and port, with weight and priority."""

    target: str
    port: int
    weight: int = 0
    priority: int = 0


@dataclass(frozen=True, slots=True)
class Discovered:
    """What one answer yields: the backends, and what was left out and why."""

    backends: tuple[BackendConfig, ...]
    skipped: tuple[str, ...] = ()  # one human-readable reason per record left out
    truncated: int = 0  # records beyond max_backends, dropped unread
    # One reason per target whose address lookup failed (kept as last known, or not added yet): the
    # answer is incomplete, and the caller reports it as an error.
    failed: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class BackendDiff:
    """How a new set differs from the last one, by id."""

    added: tuple[BackendConfig, ...] = ()
    removed: tuple[BackendConfig, ...] = ()
    changed: tuple[BackendConfig, ...] = field(default=())  # same id, new address or weight

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.changed)


# A host name's label (RFC 1123: no hyphen first or last), with `_` let through as resolvers do: a
# subset of the config file's id rule (ids appear in admin URLs and metric labels).
_LABEL_RE = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9])?")


def srv_id(target: str) -> str | None:
    """The backend id of an SRV target: its first label, or None if that is not a host name's label,
    or if the target is an IP address (RFC 2782 wants a name; `127.0.0.1.` would be backend `127`,
    and every other address of 127/8 would collide with it).

    Args:
        target: the record's target, e.g. `gw-0.gateway.game.svc.cluster.local.`.
    """
    label = target.split(".", 1)[0]
    if not _LABEL_RE.fullmatch(label):
        return None
    # Only an IPv4 address has a first label that passes (all digits; an IPv6 one has a `:`): the address
    # parse, which costs an exception for every name, is left for those (every record is checked).
    return None if label.isdigit() and _is_address(target.rstrip(".")) else label


def _is_address(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def could_be_backend(record: SrvRecord) -> bool:
    """Whether `record` can become a backend whatever its target resolves to: its target names an id
    (`srv_id`) and its port is in 1..65535.  Target `.` (RFC 2782: "decidedly not available"), an IP
    address, a label that is no host name's, port 0: none ever can."""
    return 1 <= record.port <= 65535 and srv_id(record.target.lower().rstrip(".")) is not None


# Records that can never be backends kept to say why (the rest are counted as cut): each is a reason in
# `Discovered.skipped` at every lookup, and a 64 KiB answer holds thousands of records with target `.`.
MAX_UNUSABLE_KEPT = 64


def cut_srv(
    records: Sequence[SrvRecord], max_backends: int, reserved_ids: Iterable[str] = ()
) -> tuple[list[SrvRecord], int]:
    """The records of an SRV answer to read, and how many were cut: at most `max_backends` of those that
    could be backends (`could_be_backend`, with an id neither in `reserved_ids` nor an earlier record's;
    the first by target and port, so every instance keeps the same), and `MAX_UNUSABLE_KEPT` of those
    that could not (read only to say why they are skipped: no backend).  A record repeated (one
    target and port) is read once, with its highest weight.

    Records that can never be a backend are not counted against `max_backends`: cut first, they took
    the places of valid records that sort after them (three junk records and `max_backends: 3` left a
    pool with no backend while the answer named three valid targets).  They have a bound of their own,
    and so do repeated records and ids: made unique after the cut, they took places too (a target
    named as a static backend, or `gw-1` under two domains, left a pool one backend short).
    """
    # Repeated with other weights, the highest is read, whatever the answer's order (instances agree).
    by_weight = sorted(records, key=lambda r: (r.weight, r.priority, r.target))
    unique = {(r.target.lower().rstrip("."), r.port): r for r in by_weight}
    taken = set(reserved_ids)
    kept: list[SrvRecord] = []
    usable = junk = cut = 0
    for record in sorted(unique.values(), key=lambda r: (r.target.lower(), r.port)):
        backend_id = srv_id(record.target.lower().rstrip(".")) if could_be_backend(record) else None
        if backend_id is None or backend_id in taken:  # never a backend, or one skipped as "already taken"
            if junk < MAX_UNUSABLE_KEPT:
                kept.append(record)
                junk += 1
            else:
                cut += 1
        elif usable < max_backends:
            kept.append(record)
            usable += 1
            taken.add(backend_id)
        else:
            cut += 1
    return kept, cut


def claimants(records: Sequence[SrvRecord], reserved_ids: Iterable[str] = ()) -> list[bool]:
    """For each record in order (as `cut_srv` keeps them): whether it is the one that names its backend,
    that is, it could be one (`could_be_backend`) and no static backend and no record before it has its
    id.  Only those are looked up and weighed, and an id stays its claimant's whatever its lookup
    gives: a later `gw-1` under another domain does not take over when the first one has no address
    (instances whose lookups failed differently pointed gw-1 at different pods)."""
    taken = set(reserved_ids)
    claims = []
    for record in records:
        backend_id = srv_id(record.target.lower().rstrip(".")) if could_be_backend(record) else None
        claims.append(backend_id is not None and backend_id not in taken)
        if backend_id is not None:
            taken.add(backend_id)
    return claims


def pick_address(addresses: Iterable[str]) -> str | None:
    """One address for a target with several: IPv4 first, then the lowest, so every instance agrees.
    An IPv4-mapped address counts as IPv4; one no gateway can listen at is passed over (`not_a_host`)."""
    parsed = []
    for text in addresses:
        try:
            ip = as_ipv4(ipaddress.ip_address(text))
        except ValueError:
            continue
        if not_a_host(ip) is None:
            parsed.append(ip)
    if not parsed:
        return None
    return str(min(parsed, key=lambda ip: (ip.version, ip)))


def srv_weights(records: Sequence[SrvRecord]) -> list[int]:
    """Backend weights for SRV records: all 1 when the records agree, else the SRV weights as proportions.

    Kubernetes gives every record of a headless Service the same weight; a
    hand-written zone that differs means it: weights up to 256 are taken as
    they are (0 is 1), and larger ones (SRV's run to 65,535) are scaled so the
    largest is 256, keeping their ratios (RFC 2782: a record's share is its
    weight over the sum).  Clamped instead, 1000 and 3000 were 256 and 256.
    """
    if len({r.weight for r in records}) <= 1:
        return [1] * len(records)
    largest = max(r.weight for r in records)
    if largest <= MAX_WEIGHT:
        return [max(1, r.weight) for r in records]
    return [max(1, round(r.weight * MAX_WEIGHT / largest)) for r in records]


def from_srv(
    records: Sequence[SrvRecord],
    addresses: Mapping[str, Sequence[str]],
    *,
    max_backends: int,
    reserved_ids: Iterable[str] = (),
    failed: Mapping[str, str] | None = None,
    known: Iterable[BackendConfig] = (),
    own: OwnListeners = NO_LISTENERS,
) -> Discovered:
    """Backends from SRV records.

    Args:
        records: the SRV answer, in any order (the result does not depend on it).
        addresses: target name (lower case, with or without the trailing dot) → its A/AAAA addresses.
        max_backends: keep at most this many backends; the rest are counted in `truncated`.
        reserved_ids: ids already taken (the pool's static backends win over DNS).
        failed: target name (lower case, without the trailing dot) → why its address lookup failed
            ("no answer within 2s"); such a target keeps its backend from `known`, if it has one.
        known: the last known set (what the previous answers gave).
        own: the balancer's own listeners: a target at one of them is skipped (a request loop).

    Returns:
        The backends sorted by id, why any record was left out, and which targets' lookups failed.
    """
    reserved = set(reserved_ids)
    failures = dict(failed or {})
    last_known = {b.id: b for b in known}
    kept, truncated = cut_srv(records, max_backends, reserved)
    claims = claimants(kept, reserved)
    weights = srv_weights([record for record, claims_id in zip(kept, claims, strict=True) if claims_id])
    weights.reverse()  # popped in the order of the records that name their backend
    backends: dict[str, BackendConfig] = {}
    skipped: list[str] = []
    not_resolved: list[str] = []
    for record, claims_id in zip(kept, claims, strict=True):
        weight = weights.pop() if claims_id else 1
        target = record.target.lower().rstrip(".")
        backend_id = srv_id(target)
        if backend_id is None:
            if not target:  # RFC 2782: "the service is decidedly not available at this domain"
                # Said as the record has it: it read "target '': first label is not a valid backend id".
                skipped.append("target '.': the service is not offered here (RFC 2782)")
                continue
            why = "an IP address, not a host name" if _is_address(target) else "first label is not a valid backend id"
            skipped.append(f"target {_short(target)!r}: {why}")
            continue
        if not could_be_backend(record):  # a valid id on a port out of range: never a backend, never looked up
            skipped.append(f"target {_short(target)!r}: port {record.port} out of range")
            continue
        if not claims_id:  # a static backend's id, or an earlier record's (`claimants`)
            skipped.append(f"target {_short(target)!r}: id {backend_id} is already taken")
            continue
        cause = failures.get(target)
        if cause is not None:
            # No answer is not "no address": keep what the last answer said (module docstring).
            previous = last_known.get(backend_id)
            if previous is None:
                not_resolved.append(f"target {_short(target)!r}: address lookup failed ({cause}); "
                                    "not added until it resolves")
            else:
                # The address as last known; the port and weight as this answer's record says.
                held = BackendConfig(id=backend_id, host=previous.host, port=record.port, weight=weight)
                backends[backend_id] = held
                not_resolved.append(f"target {_short(target)!r}: address lookup failed ({cause}); "
                                    f"kept {backend_id} at {held.address}")
            continue
        found = addresses.get(target, ()) or addresses.get(target + ".", ())
        address = pick_address(found)
        if address is None:
            skipped.append(f"target {_short(target)!r}: no {'usable ' if found else ''}A/AAAA address")
            continue
        bind = own.reached_by(address, record.port)
        if bind is not None:
            skipped.append(f"target {_short(target)!r}: {host_port(address, record.port)} {own_listener_reason(bind)}")
            continue
        backends[backend_id] = BackendConfig(id=backend_id, host=address, port=record.port, weight=weight)
    return Discovered(
        tuple(sorted(backends.values(), key=lambda b: b.id)), tuple(skipped), truncated, tuple(not_resolved)
    )


def from_addresses(
    addresses: Iterable[str], *, port: int, max_backends: int, reserved_ids: Iterable[str] = (),
    own: OwnListeners = NO_LISTENERS,
) -> Discovered:
    """Backends from A/AAAA records: one per distinct address, id `ip:port` (`[ip]:port` for IPv6).

    Args:
        addresses: IPv4 and IPv6 addresses as text, in any order.  An IPv4-mapped IPv6 address is
            its IPv4 address (one backend for a pod's A and mapped AAAA records).
        port: the port every backend listens on (`discovery.port`).
        max_backends: keep at most this many (lowest addresses first, so every instance keeps the same).
        reserved_ids: ids already taken by static backends.
        own: the balancer's own listeners: an address that reaches one of them is skipped (a request loop).
    """
    reserved = set(reserved_ids)
    parsed: set[ipaddress.IPv4Address | ipaddress.IPv6Address] = set()
    skipped: list[str] = []
    unusable: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}  # one reason per address
    for text in addresses:
        try:
            ip = as_ipv4(ipaddress.ip_address(text))
        except ValueError:
            skipped.append(f"address {_short(text)!r} is not an IP address")
            continue
        why = not_a_host(ip)
        if why is None:
            bind = own.reached_by(str(ip), port)
            why = None if bind is None else f"{host_port(str(ip), port)} {own_listener_reason(bind)}"
        if why is None:
            parsed.add(ip)
        else:
            unusable[ip] = f"address {why}"
    skipped += unusable.values()
    ordered = sorted(parsed, key=lambda ip: (ip.version, ip))
    truncated = max(0, len(ordered) - max_backends)
    backends: list[BackendConfig] = []
    for ip in ordered[:max_backends]:
        backend_id = host_port(str(ip), port)  # `[fd00::1]:8080`: `fd00::1:8080` reads as another address
        if backend_id in reserved:
            skipped.append(f"address {ip}: id {backend_id} is already taken")
            continue
        backends.append(BackendConfig(id=backend_id, host=str(ip), port=port))
    return Discovered(tuple(backends), tuple(skipped), truncated)


def diff(old: Iterable[BackendConfig], new: Iterable[BackendConfig]) -> BackendDiff:
    """What changed between two sets of backends, by id.

    Returns:
        Added and removed backends, and those whose address or weight changed (the new config).
    """
    before = {b.id: b for b in old}
    after = {b.id: b for b in new}
    return BackendDiff(
        added=tuple(b for i, b in after.items() if i not in before),
        removed=tuple(b for i, b in before.items() if i not in after),
        changed=tuple(b for i, b in after.items() if i in before and before[i] != b),
    )


def next_lookup_in(interval: float, ttl: float | None) -> float:
    """Seconds until the next lookup: `interval`, sooner if the answer's TTL says it expires sooner.

    A TTL longer than the interval does not delay the next lookup: the operator
    asked to notice changes within `interval`.  A tiny TTL is floored at 1 s
    (or the interval, if shorter) so a zero-TTL zone cannot make us hammer it.
    """
    if ttl is None or ttl >= interval:
        return interval
    return max(min(1.0, interval), ttl)


def retry_lookup_in(interval: float, failing: int) -> float:
    """Seconds until the next lookup after `failing` (1 or more) lookups in a row failed: 1, 2, 4 ... s,
    never more than `interval`.

    A failed lookup keeps the last known set, but at start there is none: with the whole `interval`
    before the next try, one SERVFAIL or one lost packet left a ready balancer with an empty pool
    (503 for every client) for 5 s, or for a minute where the interval was raised to spare the DNS.
    Resolvers and HAProxy (`timeout retry 1s`) retry within about a second; backing off spares a DNS
    server that is down.
    """
    return min(interval, 2.0 ** min(max(failing, 1) - 1, 16))


def _short(text: str, limit: int = 80) -> str:
    """Hostile names go into log lines: keep them short."""
    return shortened(text, limit)

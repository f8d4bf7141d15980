"""Messages between the owner process and its workers (`workers: N`).  [pure]

Framing: each message is a 4-byte big-endian length and that many bytes of
JSON (an object with an "op").  Lengths are bounded by `MAX_MESSAGE_BYTES`; a
message beyond it, or one that does not parse, is logged and skipped by the
reader (`read_messages` in `lb.control.ipc_stream`), never fatal: the length prefix says
where the next message starts, so one bad message cannot desynchronise the
stream or grow a buffer without bound (JSON lines could do both).

The owner runs health checks and the admin API and holds the authoritative
backend states; workers accept clients and relay.  Owner → worker:

    {"op": "config", "text", "files"}                first, once: the owner's running `ConfigSource`
    {"op": "discovered", "pool", "backends": [[id, host, port, weight], ...]}
                                                     DNS gave `pool` this set (the owner alone resolves):
                                                     at each change, and to a new worker after "config"
    {"op": "states", "pools": {pool: {id: {"healthy", "admin", "migrating", "ramp_from", "reason"}}}}
    {"op": "reload", "text", "files", "reload"}      apply this `ConfigSource` (the owner has just applied
                                                     it); "reload": its number, counted by the owner
    {"op": "close_tunnels", "pool", "backend", "rate"}   a drain migration's share of this worker
    {"op": "stop_migration", "pool", "backend"}      an operator acted again (enable, a new drain): stop
    {"op": "report", "seq"}                          send a stats report now, carrying this seq (a scrape,
                                                     or a fence after a reload or DNS change: lb.state.retired)

Worker → owner:

    {"op": "ready"}                                  its listeners are bound
    {"op": "failure", "pool", "backend", "detail"}   its handshakes took a backend down (passive health)
    {"op": "reload_failed", "reload"}                it could not apply that reload (the owner logs and counts it)
    {"op": "stats", ...}                             counters and listening addresses, every second, for
                                                     /status and /metrics; "seq": the last `report` asked
    {"op": "alive", "seq"}                           instead of a message too large to send (still heard from)

Counters are cumulative per worker process; the owner keeps the latest
report of every worker pid it has seen, live or dead, so a restart never
makes a Prometheus counter go backwards (keyed by pid, not slot: a late
report from a dead worker cannot overwrite its successor's).

Limits (`split_limits`): `limits.max_connections`, each backend's
`max_connections` and the per-IP handshake rate are per instance, so each of
N workers enforces its share; the shares add up to exactly the configured
number, which therefore holds whatever N is.

Only the owner resolves DNS discovery (`discovered`): each process resolving on its own, answers
that differ per query (a round-robin nameserver, a headless Service's subset, a pod in and out of
readiness) left the workers with different sets for good, and two workers sent the same client to
different gateways.  A worker is sent each pool's set before the states that name its backends.

Only the owner reads the config file and the `${file:PATH}` files it names.  A
worker parses the `ConfigSource` its owner runs (at spawn, and with each
reload): the text and the content the owner substituted for each `${file:PATH}`,
never the files: a file rewritten between the owner's read and a worker's, or
since the owner's last reload, cannot make a worker run something else than
what /status shows (two workers sealing cookies with different keys lost every
other client's affinity).  The files' contents are secrets: they travel only
over the socketpair, and no message about them quotes them.  So do the TLS
certificates and keys the owner read (base64): a worker restarted after they
changed on disk, or broke, serves the owner's pair (it crash-looped on broken
files).  A worker that still fails a reload (a port it alone cannot bind) says
so (`reload_failed`).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import ipaddress
import json
import struct
from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal, TypeVar

from lb.config.checker import Bad
from lb.config.load import ConfigSource
from lb.config.model import BackendConfig, Config, host_port
from lb.config.scalars import identifier
from lb.errors import ConfigError, Problem
from lb.state.context import ProxyContext, Stats
from lb.state.histogram import Histogram
from lb.state.observations import Observations
from lb.state.pool import AdminAction, BackendStatus, PoolState
from lb.state.tally import Tally

LENGTH = struct.Struct(">I")
# A states message is ~150 bytes per backend: 16 MiB carries ~100,000 backends.
MAX_MESSAGE_BYTES = 16 * 1024 * 1024
READ_CHUNK = 1024 * 1024  # read_frame asks for at most this much at a time


class MessageTooLarge(ValueError):
    """A frame announced more than MAX_MESSAGE_BYTES; the reader skips it."""

    def __init__(self, size: int) -> None:
        super().__init__(f"control message of {size} bytes exceeds the limit of {MAX_MESSAGE_BYTES} bytes")
        self.size = size


def encode(message: dict[str, Any]) -> bytes:
    """One frame: length prefix and JSON.  Raises MessageTooLarge rather than send what no reader takes."""
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(len(body))
    return LENGTH.pack(len(body)) + body


def frame_length(prefix: bytes) -> int:
    """The body length a 4-byte prefix announces; raises MessageTooLarge beyond the limit."""
    (size,) = LENGTH.unpack(prefix)
    if size > MAX_MESSAGE_BYTES:
        raise MessageTooLarge(size)
    return int(size)


def decode(body: bytes) -> dict[str, Any]:
    """Raises ValueError for anything but a JSON object with an "op"."""
    try:
        message = json.loads(body)
    except RecursionError:
        raise ValueError("control message nested too deeply") from None
    if not isinstance(message, dict) or not isinstance(message.get("op"), str):
        raise ValueError("control message must be a JSON object with an op")
    return message


def read_frame(recv: Callable[[int], bytes]) -> dict[str, Any]:
    """One message from a blocking byte stream, reading no byte past its end.

    What a new worker reads first, before the asyncio reader that takes over the same
    stream (`read_messages` in `lb.control.ipc_stream`): that reader must start at the next frame.

    Args:
        recv: returns at most the number of bytes asked for, b"" at the end of the stream
            (`socket.recv`).

    Returns:
        The decoded message.

    Raises:
        MessageTooLarge: the frame announces more than MAX_MESSAGE_BYTES (its body is not read).
        EOFError: the stream ends inside the frame.
        ValueError: the body is not a message (`decode`).
    """
    prefix = _read_exactly(recv, LENGTH.size)
    return decode(_read_exactly(recv, frame_length(prefix)))


def _read_exactly(recv: Callable[[int], bytes], size: int) -> bytes:
    chunks: list[bytes] = []
    remaining = size
    while remaining:
        chunk = recv(min(remaining, READ_CHUNK))
        if not chunk:
            raise EOFError(f"control stream ended {remaining} bytes short of a {size}-byte read")
        chunks.append(chunk)
        remaining -= len(chunk)
    return b"".join(chunks)


def config_message(op: Literal["config", "reload"], source: ConfigSource) -> dict[str, Any]:
    """The owner's config for its workers: op "config" at a worker's start, "reload" after a reload.

    The whole `ConfigSource`, `${file:PATH}` contents and the TLS files (base64) included: a worker
    parses exactly what the owner parsed, and reads none of those files itself.
    """
    tls = {path: base64.b64encode(data).decode("ascii") for path, data in source.tls_files.items()}
    return {"op": op, "text": source.text, "files": dict(source.files), "tls": tls}


def config_source(message: dict[str, Any]) -> ConfigSource:
    """The `ConfigSource` a "config" or "reload" message carries.

    Raises:
        ValueError: the text is not a string, or the files not an object of strings (the error names the
            path, never a content: they are secrets).
    """
    text, files, tls = message.get("text"), message.get("files", {}), message.get("tls", {})
    if not isinstance(text, str):
        raise ValueError(f"text must be a string, got {type(text).__name__}")
    for key, found in (("files", files), ("tls", tls)):
        if not isinstance(found, dict):
            raise ValueError(f"{key} must be an object, got {type(found).__name__}")
        for path, content in found.items():
            if not isinstance(content, str):
                raise ValueError(f"{key}[{path!r}] must be a string, got {type(content).__name__}")
    tls_files: dict[str, bytes] = {}
    for path, content in tls.items():
        try:
            tls_files[path] = base64.b64decode(content, validate=True)
        except binascii.Error:
            raise ValueError(f"tls[{path!r}] is not base64") from None
    return ConfigSource(text, files, tls_files)


def check_config_handover(source: ConfigSource) -> None:
    """Raise ConfigError if `source` cannot reach the workers in one control message.

    The owner checks before it applies anything, at start and on reload, so it never runs a
    configuration its workers cannot get (both messages have the same size).  A YAML file within
    `MAX_CONFIG_BYTES` at most triples in JSON, which the limit holds: this is the backstop should
    either limit change (or many `${file:PATH}` of up to 64 KiB each add up).
    """
    try:
        encode(config_message("reload", source))
    except MessageTooLarge as exc:
        raise ConfigError([Problem("", f"too large to hand to the workers: {exc}")]) from exc


# -- limits: one instance's numbers, shared by N workers ----------------------------


def share(total: int, index: int, count: int) -> int:
    """Worker `index`'s part of `total` over `count` workers: the parts add up to `total` exactly."""
    return total // count + (1 if index < total % count else 0)


def split_limits(config: Config, index: int, count: int) -> Config:
    """The config worker `index` of `count` enforces: its share of every per-instance limit.

    A share of 0 (a limit smaller than the number of workers) means that worker refuses: the
    configured number is a promise to the backends, so it is never exceeded.
    """
    if count <= 1:
        return config
    limits = config.limits
    limits = dataclasses.replace(
        limits,
        max_connections=share(limits.max_connections, index, count),
        handshake_rate_per_ip=limits.handshake_rate_per_ip / count,
        handshake_burst_per_ip=max(1, share(limits.burst_per_ip, index, count)),
    )
    pools = {
        name: dataclasses.replace(
            pool,
            backends=tuple(
                b if b.max_connections is None
                else dataclasses.replace(b, max_connections=share(b.max_connections, index, count))
                for b in pool.backends
            ),
        )
        for name, pool in config.pools.items()
    }
    return dataclasses.replace(config, limits=limits, pools=pools)


# -- discovered backends: owner → workers -------------------------------------------


def discovered_message(pool: str, backends: Sequence[BackendConfig]) -> dict[str, Any]:
    """The set DNS gave `pool` (lb.control.discovery), as the owner sends it to its workers."""
    return {"op": "discovered", "pool": pool, "backends": [[b.id, b.host, b.port, b.weight] for b in backends]}


def discovered_backends(message: dict[str, Any], max_backends: int) -> tuple[BackendConfig, ...]:
    """The backends of a `discovered` message, each checked as discovery makes them (an id, an IP
    address, a port, an SRV weight), and at most `max_backends`: a bound on what a bug could make a
    worker hold, not the pool's own `discovery.max_backends` (the owner cut its answer to that, and a
    reload may change it between the owner's set and the worker's config).

    Raises:
        ValueError: any entry is not one, an id is repeated, or there are too many (the worker keeps
            the set it had: a bug must not empty a pool).
    """
    entries = message["backends"]
    if not isinstance(entries, list):
        raise ValueError("backends must be a list")
    if len(entries) > max_backends:
        raise ValueError(f"{len(entries)} backends, more than max_backends={max_backends}")
    backends: dict[str, BackendConfig] = {}
    for entry in entries:
        if not isinstance(entry, list) or len(entry) != 4:
            raise ValueError("a backend must be [id, host, port, weight]")
        backend_id, host, port, weight = entry
        if not isinstance(host, str):
            raise ValueError("a backend's host must be a string")
        ipaddress.ip_address(host)  # ValueError for anything but an address (kept as the owner wrote it)
        if type(port) is not int or not 1 <= port <= 65535:
            raise ValueError(f"backend at {host}: port must be 1..65535")
        # As discovery names them: an SRV target's first label (the config's rule for an id), or an
        # A/AAAA answer's `host:port` (`[fd00::1]:8080`: brackets, which no configured id may hold).
        if backend_id != host_port(host, port):
            try:
                backend_id = identifier(backend_id)
            except Bad as exc:
                raise ValueError(f"backend id: {exc}") from None
        if type(weight) is not int or not 1 <= weight <= 256:
            raise ValueError(f"backend {backend_id}: weight must be 1..256")
        if backend_id in backends:
            raise ValueError(f"backend {backend_id} is listed twice")
        backends[backend_id] = BackendConfig(id=backend_id, host=host, port=port, weight=weight)
    return tuple(backends.values())


# -- backend states: owner → workers ----------------------------------------------


def states_message(pools: dict[str, PoolState]) -> dict[str, Any]:
    return {
        "op": "states",
        "pools": {
            pool.name: {
                backend.id: {
                    "healthy": backend.healthy,
                    "admin": backend.admin.value,
                    "migrating": backend.migrating,
                    "ramp_from": backend.ramp_from,
                    "reason": backend.reason,
                    "changed_at": backend.changed_at,  # wall clock: redispatch_grace reads it in the worker
                    "requested_drain": backend.requested_drain,
                }
                for backend in pool.backends.values()
            }
            for pool in pools.values()
        },
    }


def apply_states(pools: dict[str, PoolState], message: dict[str, Any]) -> None:
    """Take the owner's view of every backend this worker also knows."""
    for pool_name, backends in message.get("pools", {}).items():
        pool = pools.get(pool_name)
        if pool is None:
            continue
        for backend_id, state in backends.items():
            backend = pool.get(backend_id)
            if backend is None:
                continue
            healthy = bool(state["healthy"])
            if healthy and not backend.healthy:
                backend.handshake_failures = 0  # back up: its failed handshakes are counted afresh
            backend.healthy = healthy
            backend.admin = AdminAction(state["admin"])
            backend.migrating = bool(state["migrating"])
            backend.ramp_from = state["ramp_from"]
            backend.reason = str(state["reason"])
            backend.changed_at = float(state["changed_at"])
            backend.requested_drain = bool(state.get("requested_drain", False))


# -- counters: workers → owner -------------------------------------------------------


K = TypeVar("K", bound=Hashable)
Keep = Callable[[str, str], bool]  # (pool, backend) → whether its series are kept (lb.state.series)
KeepPool = Callable[[str], bool]  # pool → whether its per-pool series are kept (lb.state.series)
RetiredBackends = Iterable[tuple[str, BackendStatus]]  # backends gone from their pool whose tunnels still run


def stats_message(
    ctx: ProxyContext, retired: RetiredBackends = (), listeners: Sequence[tuple[str, int]] = ()
) -> dict[str, Any]:
    """A worker's report; `retired`: its backends removed from their pool (reload, DNS) whose tunnels
    still run, whose connections count on at the owner until they end; `listeners`: the addresses it
    listens on now (the owner binds none, and its /status names them)."""
    stats = ctx.stats
    bytes_in, bytes_out = ctx.bytes_relayed()
    backends: dict[str, dict[str, list[int]]] = {
        pool.name: {
            b.id: [b.connections] for b in pool.backends.values()  # a gauge; the counts are in `decisions`
        }
        for pool in ctx.pools.values()
    }
    for pool_name, b in retired:
        backends.setdefault(pool_name, {})[b.id] = [b.connections]
    return {
        "op": "stats",
        "backends": backends,
        "handshakes": [[*key, count] for key, count in stats.handshakes.items()],
        "decisions": [[*key, count] for key, count in stats.decisions.items()],
        # Per pool, over every backend this worker ever counted, forgotten ones too (lb.state.series).
        "pool_decisions": [[*key, count] for key, count in stats.pool_decisions().items()],
        "invalid_tokens": dict(stats.invalid_tokens),
        "unsealed_cookies": dict(stats.unsealed_cookies),
        "rejected": {str(status): count for status, count in stats.rejected.items()},
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "tunnels_closed": stats.tunnels_closed,
        "tls_failures": stats.tls_failures,
        "shed": stats.shed,
        "balancer_closes": [[*key, count] for key, count in stats.balancer_closes.items()],
        "tunnels": len(ctx.tunnels),
        "clients": ctx.client_connections(),
        "observations": ctx.observations.snapshot(),
        "listeners": [[host, port] for host, port in listeners],
    }


@dataclass(slots=True)
class _Totals:
    """Cumulative counters of one report, in summable form."""

    backends: Counter[tuple[str, str]] = field(default_factory=Counter)  # pool, id → live connections (a gauge)
    stats: Stats = field(default_factory=Stats)
    tunnels: int = 0
    clients: int = 0  # client connections (handshakes in flight and tunnels): a gauge
    observations: Observations = field(default_factory=Observations)
    # (pool, result) → decisions over every backend the worker ever counted: monotonic per worker, so
    # the owner's lb_affinity_decisions_total holds when a backend's own series are forgotten.
    pool_decisions: Tally[tuple[str, str]] = field(default_factory=Tally)

    @classmethod
    def of(cls, report: dict[str, Any]) -> _Totals:
        totals = cls()
        for pool, backends in report.get("backends", {}).items():
            for backend_id, (connections,) in backends.items():
                totals.backends[(pool, backend_id)] = int(connections)
        stats = totals.stats
        stats.handshakes.update({(p, b, o): int(n) for p, b, o, n in report.get("handshakes", [])})
        stats.decisions.update({(p, b, r): int(n) for p, b, r, n in report.get("decisions", [])})
        totals.pool_decisions.update({(p, r): int(n) for p, r, n in report.get("pool_decisions", [])})
        stats.invalid_tokens.update({str(k): int(n) for k, n in report.get("invalid_tokens", {}).items()})
        stats.unsealed_cookies.update({str(k): int(n) for k, n in report.get("unsealed_cookies", {}).items()})
        stats.rejected.update({int(k): int(n) for k, n in report.get("rejected", {}).items()})
        stats.closed_bytes_in = int(report.get("bytes_in", 0))
        stats.closed_bytes_out = int(report.get("bytes_out", 0))
        stats.tunnels_closed = int(report.get("tunnels_closed", 0))
        stats.tls_failures = int(report.get("tls_failures", 0))
        stats.shed = int(report.get("shed", 0))
        stats.balancer_closes.update({(c, w): int(n) for c, w, n in report.get("balancer_closes", [])})
        totals.tunnels = int(report.get("tunnels", 0))
        totals.clients = int(report.get("clients", 0))
        totals.observations = Observations.from_snapshot(report.get("observations"))
        return totals

    def add(self, other: _Totals, *, counters_only: bool = False) -> None:
        if not counters_only:  # live connections: a gauge, which a dead worker no longer has
            self.backends.update(other.backends)
        mine, theirs = self.stats, other.stats
        mine.handshakes.update(theirs.handshakes)
        mine.decisions.update(theirs.decisions)
        mine.invalid_tokens.update(theirs.invalid_tokens)
        mine.unsealed_cookies.update(theirs.unsealed_cookies)
        mine.rejected.update(theirs.rejected)
        mine.closed_bytes_in += theirs.closed_bytes_in
        mine.closed_bytes_out += theirs.closed_bytes_out
        mine.tunnels_closed += theirs.tunnels_closed
        mine.tls_failures += theirs.tls_failures
        mine.shed += theirs.shed
        mine.balancer_closes.update(theirs.balancer_closes)
        self.observations.merge(other.observations)
        self.pool_decisions.update(other.pool_decisions)
        if not counters_only:
            self.tunnels += other.tunnels
            self.clients += other.clients

    def forget(self, keep: Keep, keep_pool: KeepPool | None = None) -> None:
        """Drop the per-backend counters of every (pool, backend) `keep` refuses, and the per-pool ones of
        every pool `keep_pool` refuses (lb.state.series)."""
        self.stats.forget(keep, keep_pool)
        self.observations.forget(keep, keep_pool)
        if keep_pool is not None:
            for counted in [counted for counted in self.pool_decisions if not keep_pool(counted[0])]:
                del self.pool_decisions[counted]

    def carry(self, before: _Totals, carried: _Totals) -> None:
        """Move into `carried` the counts `before` (this worker's previous report) held that this report
        no longer does, or holds less of.

        A worker forgets a departed backend's series on its own schedule (when its tunnels end,
        lb.state.series) and counts it from 0 should it come back; the owner may still keep that
        backend (its own tunnels, or its own schedule).  Its sum must not go back with the worker's: what the
        worker last reported stays, and what it counts from then on is added.  A lower count (forgotten
        and counted again between two reports) is a restart from 0 too.
        """
        _carry_counts(before.stats.handshakes, self.stats.handshakes, carried.stats.handshakes)
        _carry_counts(before.stats.decisions, self.stats.decisions, carried.stats.decisions)
        _carry_counts(before.observations.backend_errors, self.observations.backend_errors,
                      carried.observations.backend_errors)
        _carry_counts(before.observations.health_checks, self.observations.health_checks,
                      carried.observations.health_checks)
        _carry_histograms(before.observations.connect, self.observations.connect, carried.observations.connect)
        # Per pool too: a worker forgets a removed pool on its own schedule (it may hold no tunnel of it
        # while another worker does, and the owner keeps it), and its share must stay in the owner's sum.
        _carry_counts(before.pool_decisions, self.pool_decisions, carried.pool_decisions)
        _carry_counts(before.stats.unsealed_cookies, self.stats.unsealed_cookies, carried.stats.unsealed_cookies)
        _carry_histograms(before.observations.handshake, self.observations.handshake, carried.observations.handshake)


def _carry_counts(earlier: Mapping[K, int], now: Mapping[K, int], kept: Tally[K]) -> None:
    """Into `kept`, each count of `earlier` (a worker's previous report) that `now` holds less of."""
    for key, count in earlier.items():
        if now.get(key, 0) < count:
            kept[key] += count


def _carry_histograms(earlier: Mapping[K, Histogram], now: Mapping[K, Histogram], kept: dict[K, Histogram]) -> None:
    """As `_carry_counts`, for histograms (their counts compared)."""
    for key, histogram in earlier.items():
        current = now.get(key)
        if current is None or current.count < histogram.count:
            kept.setdefault(key, Histogram()).merge(histogram)


WORKER_EXIT: Final = "worker_exit"  # lb_tunnel_closes' cause for the tunnels a dead worker held


class StatsAggregate:
    """The owner's sum of what its workers report, keyed by worker pid.

    Per-backend series are kept only for the backends `keep` accepts: the owner's own
    `lb.state.series.SeriesRetention`, so that the sum is bounded as the owner's pools are, however
    many backends the workers have seen; `forget` applies it again after it changed.
    """

    def __init__(self, keep: Keep = lambda pool, backend: True, keep_pool: KeepPool | None = None) -> None:
        self._keep = keep
        self._keep_pool = keep_pool
        self._latest: dict[int, _Totals] = {}
        # Per pid: counts it reported and then no longer did (it forgot those series; see `_Totals.carry`).
        self._carried: dict[int, _Totals] = {}
        self._dead: set[int] = set()
        self._departed = _Totals()  # counters of workers dead and folded (see compact)
        self._shown_sums: dict[tuple[str, ...], float] = {}  # each histogram's sum as last applied

    def update(self, pid: int, report: dict[str, Any]) -> None:
        """The latest cumulative report of worker `pid` (late reports of dead workers included)."""
        totals = _Totals.of(report)
        totals.forget(self._keep, self._keep_pool)  # series the owner does not keep are not stored (bounded)
        before = self._latest.get(pid)
        if before is not None:
            totals.carry(before, self._carried.setdefault(pid, _Totals()))
        self._latest[pid] = totals

    def forget(self) -> None:
        """Drop every per-backend series `keep` no longer accepts (the owner's retention changed)."""
        for totals in [*self._latest.values(), *self._carried.values(), self._departed]:
            totals.forget(self._keep, self._keep_pool)

    def retire(self, pid: int) -> None:
        """Worker `pid` exited: its counters stay in every sum, its gauges leave them."""
        self._dead.add(pid)

    def compact(self, pid: int) -> None:
        """Fold a dead worker whose reader has ended (no report can come) into one departed total.

        The tunnels its last report held open ended with it (the kernel closed their sockets): they
        count as closed, as the balancer's closes with cause `worker_exit` at TCP level.  Only now,
        not at `retire`: a late report could still say fewer were open, and a counter must not go back.
        """
        totals = self._latest.pop(pid, None)
        carried = self._carried.pop(pid, None)
        self._dead.discard(pid)
        for counted in (totals, carried):
            if counted is not None:
                self._departed.add(counted, counters_only=True)
        if totals is not None and totals.tunnels > 0:
            self._departed.stats.tunnels_closed += totals.tunnels
            self._departed.stats.balancer_closes[(WORKER_EXIT, "tcp")] += totals.tunnels

    def apply_to(self, ctx: ProxyContext, retired: RetiredBackends = ()) -> int:
        """Write the sums into the owner's counters (read by /status and /metrics); returns live tunnels.

        `retired`: the owner's removed backends, whose connections only the workers' reports can bring
        down (to 0 once no worker reports them)."""
        total = _Totals()
        total.add(self._departed)
        for pid, totals in self._latest.items():
            total.add(totals, counters_only=pid in self._dead)
        for carried in self._carried.values():
            total.add(carried, counters_only=True)
        # The pool's decisions: the workers' own per-pool sums, which count forgotten backends too;
        # whatever of them no kept series holds is the forgotten part (Stats.pool_decisions).
        total.stats.forgotten_decisions = Tally()
        held = total.stats.pool_decisions()
        for key, count in total.pool_decisions.items():
            if count > held[key]:
                total.stats.forgotten_decisions[key] = count - held[key]
        for pool in ctx.pools.values():
            for b in pool.backends.values():
                b.connections = total.backends[(pool.name, b.id)]
        for pool_name, b in retired:
            b.connections = total.backends[(pool_name, b.id)]
        ctx.stats = total.stats
        ctx.worker_clients = total.clients
        self._never_less(total.observations)
        ctx.observations.from_workers = total.observations
        return total.tunnels

    def _never_less(self, observations: Observations) -> None:
        """Keep each histogram's sum from going below what was last applied.

        A dead worker's sums are folded into `_departed`, and the floats are then added in another
        order: a sum can come out an ulp lower (0.013000000000000001, then 0.013), which Prometheus
        takes for a counter reset (a false spike in rate()).  A series forgotten and counted again
        starts afresh: only the histograms applied now are remembered.
        """
        shown: dict[tuple[str, ...], float] = {}
        keyed = [*((("handshake", pool), h) for pool, h in observations.handshake.items()),
                 *((("connect", *key), h) for key, h in observations.connect.items())]
        for key, histogram in keyed:
            histogram.total = max(histogram.total, self._shown_sums.get(key, 0.0))
            shown[key] = histogram.total
        self._shown_sums = shown

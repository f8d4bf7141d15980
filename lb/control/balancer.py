"""The running balancer: builds listeners, admin and health checks; starts, reloads and stops them.

Start binds everything (admin first, so /readyz answers 503 while the rest
starts; then the listeners) before serving; a bind that fails closes what was
bound and raises `BindError` (lb.control.listening), which `lb.control.process`
turns into one line naming the address and exit code 2.

`Balancer.stop()` is idempotent (SPEC part 2, rolling updates): /readyz
answers 503 at once while the listeners keep serving for
`timeouts.shutdown_delay` (so an L4 balancer or Kubernetes can deregister
us) → stop accepting (handshakes in flight get 503, /healthz answers 503) →
live tunnels get a WebSocket close 1001 spread evenly over
`timeouts.shutdown_grace`, so their clients do not reconnect as one herd →
whatever is left at its end is closed → stop health checks and admin.

`Balancer.reload()` (SIGHUP) is one transaction, and reloads run one at a
time (a burst of SIGHUPs coalesces into at most one pending reload).  The
new state is built first: config parsed, new listeners bound, TLS loaded,
admin bound if it moved.  If anything fails, what was built is closed and
the running config stays entirely, with one log event saying why.  Then it
is swapped in one synchronous block (no await in between), so a connection
that reads `ProxyContext` at accept always sees one consistent snapshot.
Backends keep their health and counts by id, including a backend that a
reload removed and a later one brought back while its tunnels still ran;
health checkers follow the new pools, never duplicated (a kept backend keeps
its probe loop and schedule; an added or moved one, and every backend of a
pool whose checks changed, is probed at once).  A listener whose kind changes
at the same address (TLS or `proxy_protocol` turned on or off) is a new
listener that takes over the running socket (a second descriptor on it), so
the reload needs no free port and loses nothing queued in its backlog.

A `proxy_protocol` or TLS listener is a `lb.proxy.preamble.AcceptingServer`
instead of an `asyncio.Server`: it reads the PROXY header before TLS and HTTP,
and holds each TLS handshake as a task of its own.  So is a plain listener on
asyncio's own loop, whose accept spins after EMFILE (`lb.control.listening.bind_listener` says how).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import socket
import ssl
import time
from collections.abc import Mapping
from dataclasses import replace
from enum import StrEnum
from pathlib import Path

from aiohttp import web

from lb.affinity.codec import TokenCodec
from lb.compiled import compiled_state
from lb.config.advice import advice, reload_advice
from lb.config.load import ConfigSource, load_config_source
from lb.config.model import AdminConfig, BackendConfig, Config, ListenerConfig, PoolConfig, host_port
from lb.control.admin import make_admin_app, report_unlogged_errors
from lb.control.daemon_thread import in_daemon_thread
from lb.control.discovery import DiscoveryManager, add_discovered
from lb.control.health import FirstProbes, HealthChecker, LoopLag
from lb.control.ipc import check_config_handover, split_limits
from lb.control.listening import (
    BindError,
    Listening,
    bind_admin,
    bind_listener,
    claim,
    dup_sockets,
    match_listeners,
    release,
    start_serving,
)
from lb.control.memory import ReleasePolicy, collection_paused, release_free_memory
from lb.control.metrics import ReloadResults, WorkerCounts, make_registry
from lb.control.migration import DEFAULT_MIGRATION_RATE, log_failed, migrate
from lb.control.state_lines import StateLines
from lb.control.tunnel_closing import TunnelClosing
from lb.control.worker_channel import ControlChannel
from lb.control.workers import REPORT_WAIT, WorkerSupervisor
from lb.descriptors import descriptor_limit
from lb.errors import LOCAL_ERRNOS, ConfigError
from lb.http.client_address import TrustedProxies
from lb.http.proxy_header import CRC32C_IN_C
from lb.http.routing import sort_routes
from lb.log import setup_logging
from lb.log_stream import report_dropped_lines
from lb.proxy.deadlines import sleep_reading_first
from lb.proxy.preamble import AcceptingServer
from lb.proxy.server import (
    abort_in_flight,
    accept_errors,
    stop_in_flight,
    wall_offset,
)
from lb.proxy.tunnel import CLOSE_LINGER, GOING_AWAY, idle_sweep_interval
from lb.state.context import ProxyContext, configured_protected
from lb.state.operator_states import OperatorStates
from lb.state.pool import AdminAction, BackendState, BackendStatus, PoolState, StateChange, reason_in_force
from lb.state.ratelimit import RateLimiter
from lb.state.retired import RetiredBackends
from lb.state.series import SeriesRetention, departed_kept

log = logging.getLogger(__name__)
# The idle sweep's looks are `idle_sweep_interval` apart, which divides `idle` into whole parts; a look
# may come a little before its time as time.monotonic() sees it (the loop reads its clock once per turn,
# uvloop rounds timers to the ms, and the parts' sum may fall short of `idle` in floating point), and
# a silence that short of `idle` by this share of a look still counts, rather than wait a whole look.
_LOOK_SLACK = 0.01

MAX_LOGGED_PROBLEMS = 20  # of a failed reload, in its one log line
# Seconds a stop keeps accepting (each connection then answered 503) before it closes its listeners, so that
# the connections already in their queues are answered, not reset.
ACCEPT_QUEUE_DRAIN = 0.05
# Seconds between two sweeps of the per-IP rate limiter's refilled buckets: O(addresses) each, 17-28 ms of
# the event loop at 100,000 (a flood from that many), so not every second.
RATE_SWEEP_EVERY = 10


class Role(StrEnum):
    SINGLE = "single"  # workers: 1 — one process does everything
    OWNER = "owner"    # workers: N — health, admin, states; starts the workers
    WORKER = "worker"  # accepts and relays; states come from the owner


def _back_reason(status: BackendStatus, cause: str) -> str:
    """The reason /status shows for a backend a reload or DNS names again while its tunnels kept it: the one
    in force (`reason_in_force`).  It said "added back by DNS" whatever its state: `draining` or `disabled` by
    an operator's word that it kept (as one with no tunnel left is told, `OperatorStates.restore`), or `down`."""
    if status.admin is AdminAction.ENABLE:
        return reason_in_force(status, f"added back by {cause}")
    absent = "it was out of DNS" if cause == "DNS" else "a reload had removed it"
    return reason_in_force(status, f"operator: {status.admin.value} (kept while {absent})")


class Balancer:
    def __init__(
        self, config: Config, config_path: Path | None = None, *, role: Role = Role.SINGLE, control_fd: int = -1,
        share: tuple[int, int] = (0, 1), config_source: ConfigSource | None = None,
    ) -> None:
        """`config_source`: what `config` was parsed from, which the owner of workers hands to them."""
        self.config_path = config_path
        self.role = role
        # What only a restart changes (the process tree and its event loop), as this process started.
        self._started_with = (config.workers, config.workers_auto, config.runtime.event_loop)
        self.ctx = ProxyContext.build(config, self.record_backend_failure, wall_offset=wall_offset())
        started = time.time()
        for pool in self.ctx.pools.values():
            for backend in pool.backends.values():
                backend.changed_at = started  # /status: "initial state" since when
        self.reloads = ReloadResults()
        # workers: N — worker `index` of `count` enforces its share of the per-instance limits.
        self._share = share
        # Whose per-backend series this process keeps: its pools' backends and the last to leave them
        # (lb.state.series); the owner of `workers: N` filters its workers' reports by it too.
        self.series = SeriesRetention()
        self.registry = make_registry(
            lambda: self.ctx, lambda: self.reloads,
            (lambda: self._supervisor.pids() if self._supervisor is not None else []) if role is Role.OWNER else None,
            retired=self.retired_backends, departed=self._departed_series,
            workers=self._worker_counts if role is Role.OWNER else None,
        )
        # /readyz: True once every listener is open, False again from SIGTERM on.
        self.ready = False
        # Set by `serve`'s SIGTERM handler, which may run while we start: such a start is never ready.
        self.stop_asked = False
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_reading = False  # a reload's file is being read and checked (on a thread)
        self._reload_pending = False
        self._listening: list[Listening] = []
        # Its listeners' addresses, claimed (`listening.claim`): a single process's, or an owner's for its workers.
        self._held: dict[tuple[str, int], list[socket.socket]] = {}
        self._state_lines = StateLines()  # how many of a backend's state changes get a line of their own
        self._admin: web.AppRunner | None = None
        self.admin_address: tuple[str, int] | None = None
        self._no_admin: BindError | None = None  # the default admin address, taken: said once all is bound
        self._checkers: list[HealthChecker] = []
        self._first_probes = FirstProbes()  # every pool's new probe loops, paced together
        self._loop_lag = LoopLag()  # what every check's timeout does not count (the balancer's own stalls)
        # DNS discovery: the owner (or a single process) resolves; a worker follows the sets its owner sends.
        self.discovery = DiscoveryManager(self.update_discovered, self.registry, follower=role is Role.WORKER)
        self._migrations: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._reporter: asyncio.Task[None] | None = None
        # The removed backends the series retention last counted present (their tunnels then still ran).
        self._retired_in_series: frozenset[tuple[str, str]] = frozenset()
        self._stopping: asyncio.Task[None] | None = None
        self._stop_called = asyncio.Event()
        self._closing = TunnelClosing(self.ctx, share)
        self._stop_repeated = False
        self._serving_until: float | None = None  # time.monotonic() when a stop's shutdown_delay runs out
        # Backends removed by a reload or DNS that still carry tunnels, shown in /status until they end
        # (the owner of workers keeps each one until its workers' reports say so: lb.state.retired).
        self._retired = RetiredBackends()
        # An operator's drain or disable of a discovered backend outlives its absences from DNS.
        self._operator_states = OperatorStates()
        self._supervisor: WorkerSupervisor | None = None
        self._control: ControlChannel | None = None
        if role is Role.OWNER:
            if config_path is None or config_source is None:
                raise ValueError("workers need the configuration file and its source")
            self._supervisor = WorkerSupervisor(self, config.workers, config_path, config_source)
        elif role is Role.WORKER:
            self._control = ControlChannel(self, control_fd)
        self._forget_departed_series()

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def listen_addresses(self) -> list[tuple[str, int]]:
        """Where this instance listens: its own listeners, or with `workers: N` its workers' (the owner binds none)."""
        if self._supervisor is not None:
            return self._supervisor.listen_addresses()
        return [listening.address for listening in self._listening]

    # -- start -------------------------------------------------------------

    def retired_backends(self) -> list[tuple[str, BackendStatus]]:
        """(pool, backend) removed by a reload or DNS whose tunnels still run; forgets those that ended."""
        return [(name, b) for name, b in self.retired_counted() if b.connections > 0]

    def retired_counted(self) -> list[tuple[str, BackendStatus]]:
        """(pool, backend) removed whose connections are still counted: those with tunnels, and with
        `workers: N` also those whose count the workers' reports have not told yet (at 0 until they do)."""
        settled = self._supervisor.settled_reports() if self._supervisor is not None else math.inf
        self._retired.prune(settled)
        return list(self._retired)

    def find_backend(self, pool: str, backend_id: str) -> BackendStatus | None:
        """The pool's backend `backend_id`, else the one of that id a reload or DNS removed from it whose
        tunnels still run: an operator's drain goes on closing those (`close_tunnels` in a worker)."""
        state = self.ctx.pools.get(pool)
        backend = state.get(backend_id) if state is not None else None
        if backend is None:
            self.retired_counted()  # forgets those whose tunnels have ended
            backend = self._retired.find(pool, backend_id)
        return backend

    def is_removed_with_tunnels(self, pool: str, backend_id: str) -> bool:
        """Whether `backend_id` is one a reload or DNS removed from `pool` whose tunnels still run (as
        /status lists it, `removed`)."""
        return any(name == pool and b.id == backend_id for name, b in self.retired_backends())

    def live_tunnels(self) -> int:
        return self._supervisor.live_tunnels if self._supervisor is not None else len(self.ctx.tunnels)

    async def start(self) -> None:
        """Bind everything, then serve.  Raises BindError with nothing left bound."""
        try:
            await self._start()
        except BaseException:  # BindError, or cancelled on the way: leave nothing listening
            await self._close_bound()
            await self.discovery.stop()
            raise
        self.ready = self._stopping is None and not self.stop_asked  # told to stop while starting: never ready

    async def _start(self) -> None:
        if self._control is not None:
            await self._control.start()
        if self.role is not Role.WORKER:
            # First, so that /readyz answers 503 (and /livez 200) while discovery's first lookups
            # run and the listeners bind; a failure below closes it again, leaving nothing listening.
            bound = await self._bind_admin(self.config.admin)
            if bound is not None:
                self._admin, self.admin_address = bound
        if self.role is not Role.OWNER:
            if self.role is Role.SINGLE:  # a worker's are its owner's
                # Claimed and probed before discovery's first lookups, as the owner of `workers: N`
                # does: a port in use fails the start before those lookups log a line, so the failure
                # stays one line (and takes no DNS round trips).
                for listener in self.config.listeners:
                    self._held[(listener.host, listener.port)] = claim(listener, probe=True)
            # Discovered backends before the first client: a process the kernel hands connections
            # as soon as it listens would answer them 503 until its first lookups end.
            self.discovery.start(self.config.pools, self.config.listeners)
            await self.discovery.first_lookups()
            if self._stopping is not None:
                return  # told to stop while waiting (a worker's owner going away): bind nothing
            for listener in self.config.listeners:
                self._listening.append(await self._bind(listener))
        else:
            # The workers bind with SO_REUSEPORT; a port held by someone else would only show as
            # workers dying one after the other.  Probe each address once, here, to fail fast, and
            # claim it for the workers from then on.
            for listener in self.config.listeners:
                self._held[(listener.host, listener.port)] = claim(listener, probe=True)
        # Everything is bound: from here on nothing can fail for want of an address.
        for listening in self._listening:
            listening.announce()
        if self.admin_address is not None:  # said here, not at its bind: a failed start is one line
            log.info("admin API on %s", host_port(*self.admin_address))
        self._say_no_admin()  # likewise
        if self.role is not Role.WORKER:  # workers run the same files
            log.info("data plane: %s", compiled_state().describe())
        self._advise()
        if self.role is not Role.OWNER:
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle_tunnels())
        self._reporter = asyncio.get_running_loop().create_task(self._each_second())
        if self.role is not Role.WORKER:
            self._start_health_checks()
        if self.role is Role.OWNER:
            # A serving process started its loops before binding.  The owner's first answers, before any
            # worker starts: each is sent them first, and listens only then (`first_lookups`).
            self.discovery.start(self.config.pools, self.config.listeners)
            await self.discovery.first_lookups()
            if self._stopping is not None or self.stop_asked:
                return  # told to stop while waiting: start no worker
        if self._supervisor is not None:
            await self._supervisor.start()
        if self._control is not None:
            self._control.report_ready()

    async def _bind_admin(self, admin: AdminConfig) -> tuple[web.AppRunner, tuple[str, int]] | None:
        """The admin API bound at `admin`'s address; None if that address is the default one and taken
        (`_say_no_admin` says so: at a start, once everything is bound, so that a listener address in
        use is still the one line SPEC part 2 asks for).

        Without `admin.bind` the API takes 127.0.0.1:9000, and a second instance on the host, started
        with no admin section as the first one was (two instances sharing keys, a test rig), found it
        taken and did not start at all.  The data plane does not need the API: that instance runs
        without one, and says so.  An address the operator wrote is theirs to fix: exit 2, as before.

        Raises:
            BindError: an address the operator wrote cannot be had.
        """
        try:
            return await bind_admin(make_admin_app(self), admin)
        except BindError as exc:
            if admin.bind_given:
                raise
            self._no_admin = exc
            return None

    def _say_no_admin(self) -> None:
        """The WARNING for a default admin address that was taken (`_bind_admin`), once."""
        exc, self._no_admin = self._no_admin, None
        if exc is not None:
            log.warning("%s; no admin.bind is configured, so this instance runs without its admin API "
                        "(no /status, /metrics or /readyz): give admin.bind to have one", exc)

    def _release_claims(self) -> None:
        """Give up the claims on the listeners' addresses (`claim`): from now on they are not ours."""
        release(self._held)
        self._held = {}

    async def _close_bound(self) -> None:
        for listening in self._listening:
            listening.server.close()
        self._listening = []
        self._release_claims()
        if self._admin is not None:
            await self._admin.cleanup()
            self._admin = None
        await self._stop_health_checks()

    async def _bind(self, listener: ListenerConfig, *, adopt: list[socket.socket] | None = None) -> Listening:
        # Workers each bind every listener (SO_REUSEPORT); the kernel spreads connections over them.
        return await bind_listener(self.ctx, listener, reuse_port=self.role is Role.WORKER, adopt=adopt)

    def _start_health_checks(self) -> None:
        """One checker per pool; the caller has stopped the previous ones (never two loops per backend)."""
        assert not self._checkers, "health checkers must be stopped before new ones start"
        for pool in self.ctx.pools.values():
            self._start_checker(pool)

    def _start_checker(self, pool: PoolState) -> None:
        checker = HealthChecker(
            pool, self._on_state_change, self.ctx.observations, self._first_probes, self._loop_lag
        )
        checker.start()
        self._checkers.append(checker)

    async def _follow_health_checks(self, previous: Config) -> None:
        """After a reload's swap: a pool whose `health_check` is unchanged keeps its checker, which follows
        the new pool (`HealthChecker.retarget`: added backends, and those whose address changed, are
        probed at once; the others keep their loops and their schedule); any other pool gets a new one.

        Replacing every checker made a reload probe every backend at once: 3,000 backends were 3,000
        tasks cancelled, 3,000 made and 3,000 connects in one turn of the event loop, a stall of
        100-300 ms after each SIGHUP (and a burst of probes at every backend), for a file that
        changed one line.
        """
        pools = self.ctx.pools
        kept: list[HealthChecker] = []
        stopped: list[HealthChecker] = []
        for checker in list(self._checkers):
            pool = pools.get(checker.pool_name)
            before = previous.pools.get(checker.pool_name)
            if pool is not None and before is not None and before.health_check == pool.config.health_check:
                checker.retarget(pool)
                kept.append(checker)
                # A pool at a time: a reload that renames thousands of backends cancels and starts that many
                # loops, some 15-45 ms a thousand; the swap is done, and a checker that still probes the
                # pool as it was for one more turn records into backends it shares with the new one.
                await asyncio.sleep(0)
            else:
                stopped.append(checker)
        self._checkers = kept
        for checker in stopped:
            await checker.stop()
        followed = {checker.pool_name for checker in kept}
        for name, pool in pools.items():
            if name not in followed:
                self._start_checker(pool)

    async def _stop_health_checks(self) -> None:
        checkers, self._checkers = self._checkers, []
        for checker in checkers:
            await checker.stop()

    # -- state ---------------------------------------------------------------

    def _on_state_change(self, change: StateChange) -> None:
        unlogged = self._state_lines.take((change.pool, change.backend), time.monotonic())
        if unlogged is not None:
            level = logging.WARNING if change.new is BackendState.DOWN else logging.INFO
            log.log(level, "backend %s/%s is %s (was %s): %s%s",
                    change.pool, change.backend, change.new.value, change.old.value, change.reason,
                    f" ({unlogged} change(s) before this one not logged one by one: flapping)" if unlogged else "")
        if self._supervisor is not None:
            self._supervisor.states_changed()

    def record_backend_failure(self, pool: str, backend_id: str, detail: str) -> None:
        """A backend failed a handshake here (passive health): `fall` in a row take it down.

        A worker counts its own handshakes (only it sees their answers, which start the count
        again) and tells the owner when they took the backend down; the owner decides for everyone.
        """
        state = self._pool_holding(pool, backend_id)
        change = state.record_handshake_failure(backend_id, time.time(), detail) if state is not None else None
        if change is None:
            return
        if self._control is not None:
            self._control.report_failure(pool, backend_id, change.reason)
        else:
            self._on_state_change(change)

    def take_down(self, pool: str, backend_id: str, reason: str) -> None:
        """A worker's handshakes took this backend down (passive health): so it is, for every worker."""
        state = self._pool_holding(pool, backend_id)
        change = state.take_down(backend_id, time.time(), reason) if state is not None else None
        if change is not None:
            self._on_state_change(change)

    def _pool_holding(self, pool: str, backend_id: str) -> PoolState | None:
        """The pool's state if it still holds `backend_id` (a reload or DNS answer may have removed it since)."""
        state = self.ctx.pools.get(pool)
        return state if state is not None and state.get(backend_id) is not None else None

    def apply_admin(
        self, pool: str, backend_id: str, action: AdminAction, *, close_after: float | None = None,
        rate: float | None = None,
    ) -> BackendState:
        """An operator's drain, disable or enable; with `rate`, also close its tunnels gradually (1012).

        A backend removed from its pool whose tunnels still run (`is_removed_with_tunnels`) takes no
        client whatever its state: a drain or disable of it only closes its tunnels, if asked (not enable).
        """
        key = (pool, backend_id)
        previous = self._migrations.pop(key, None)
        if previous is not None:
            previous.cancel()
        if self._supervisor is not None:
            # Any operator action ends the running migration everywhere, not just in the owner.
            self._supervisor.stop_migration(pool, backend_id)
        state_pool = self.ctx.pools.get(pool)
        in_pool = state_pool.get(backend_id) if state_pool is not None else None
        removed = in_pool is None
        if state_pool is not None and in_pool is not None:
            backend = in_pool
            change = state_pool.apply_admin(backend_id, action, time.time())
            if change is not None:
                self._on_state_change(change)
        else:
            found = self.find_backend(pool, backend_id)
            if found is None or action is AdminAction.ENABLE:
                raise KeyError(f"{pool}/{backend_id} is not in its pool (removed backends are drained or disabled)")
            backend = found
            # The operator's word stays on it, as on one drained before it left: should a reload or DNS
            # bring it back (as itself while its tunnels run, or anew), it is back drained or disabled,
            # as answered, not `up` with a migration that turns its own cookie holders away.
            backend.admin = action
            backend.reason = f"{backend.reason.partition('; operator: ')[0]}; operator: {action.value}"
            self._operator_states.remember(pool, backend)
        if action is not AdminAction.ENABLE and (close_after is not None or rate is not None):
            # The backend itself, not its id: a reload or DNS answer that removes it before `close_after`
            # has run out leaves its tunnels running (lb.state.retired), and the operator asked for them
            # to be closed.  Looked up again by id, it was gone, and the closes with it.
            delay, pace = close_after or 0.0, rate or DEFAULT_MIGRATION_RATE
            task = asyncio.get_running_loop().create_task(
                self._supervisor.migrate(pool, backend, delay, pace)
                if self._supervisor is not None
                else migrate(self.ctx, pool, backend, delay, pace)
            )
            self._migrations[key] = task
            task.add_done_callback(functools.partial(self._migration_done, key))
        return BackendState.DISABLED if removed else backend.state  # as /status shows a removed one

    async def states_applied(self) -> None:
        """With `workers: N`, until every worker runs the backends' states as this process holds them (at
        most `REPORT_WAIT`; one stopped or stuck applies them when it runs again).  At once otherwise."""
        if self._supervisor is not None and not await self._supervisor.states_applied():
            log.warning("a worker has not applied the backends' new states within %gs: it will once it runs "
                        "again (it is stopped, its event loop is stuck, or it is still applying a reload)",
                        REPORT_WAIT)

    def _migration_done(self, key: tuple[str, str], task: asyncio.Task[None]) -> None:
        # Held here until done, a task that raised would never have its exception reported by asyncio:
        # the operator's closes lost with no word (lb.control.migration.log_failed says it).
        log_failed(*key, task)
        if self._migrations.get(key) is task:
            del self._migrations[key]

    async def _sweep_idle_tunnels(self) -> None:
        """Close tunnels that moved no byte for `timeouts.idle` (off when 0; `idle_sweep_interval` says
        how late).  A reload that changes `idle` starts this again (`_swap`): its sleep is the old one's."""
        idle = self.config.timeouts.idle
        if idle <= 0:
            return
        interval = idle_sweep_interval(idle)
        while True:
            await sleep_reading_first(interval)  # a client that spoke in a stall is not idle
            now = time.monotonic()
            for tunnel in list(self.ctx.tunnels):
                moved = tunnel.bytes_in + tunnel.bytes_out
                seen, since = tunnel.idle_mark
                if moved != seen:
                    tunnel.idle_mark = (moved, now)
                elif now - since >= idle - _LOOK_SLACK * interval:
                    tunnel.close_gracefully(GOING_AWAY, "idle timeout", cause="idle")

    async def _each_second(self) -> None:
        """Follow a step of the wall clock (`ProxyContext.wall_offset`: tokens, /lookup), and let go of
        the series of removed backends whose last tunnel has ended.  A serving process also logs the
        summaries of 429s and 503s whose interval has passed (`RateLimitSummary`), sweeps the per-IP
        buckets, and gives back the heap a burst of connections freed (`lb.control.memory`)."""
        policy = ReleasePolicy()
        serving = self.role is not Role.OWNER
        for second in itertools.count(1):
            await asyncio.sleep(1.0)
            self.ctx.wall_offset = wall_offset()
            # A removed backend whose last tunnel has ended has left its pool, and counts under the
            # departed bound from then on; recomputed only at a DNS change or a reload, its series stayed
            # past the bound for good after a rollout of gateways holding long tunnels.
            if self._retired_in_series.difference((name, b.id) for name, b in self.retired_backends()):
                self._forget_departed_series()
            report_dropped_lines()
            report_unlogged_errors(time.monotonic())
            self._report_unlogged_state_changes()
            if not serving:
                continue
            self._probe_descriptors()
            self._report_refusals_now()
            if second % RATE_SWEEP_EVERY == 0:
                self.ctx.rate_limiter.sweep(time.monotonic())  # the data plane's clock, which `check` was given
            if policy.due(self.ctx.own_connections(), time.monotonic(), peak=self.ctx.take_peak()):
                release_free_memory()

    def _probe_descriptors(self) -> None:
        """Say that connections are being dropped for want of descriptors where no accept error says it.

        uvloop's plain listeners (`loop.create_server`) accept in libuv, which meets EMFILE or ENFILE by
        closing a descriptor it keeps in reserve, accepting and closing the waiting connections, and
        taking the reserve back: every new client is reset, and nothing reaches us to log (out of
        descriptors, a balancer said nothing at all, unless a health check happened to fail for the
        same want).  So, with such a listener, one socket a second is opened and closed: when that fails
        as libuv's accept would, `accept_errors` reports it (one line per interval, with our own
        listeners' failures).  About 2 µs a second; AcceptingServer's listeners report their own.
        """
        plain = next(
            (item.server for item in self._listening if not isinstance(item.server, AcceptingServer)), None
        )
        if plain is None or not plain.sockets:
            return
        try:
            socket.socket(plain.sockets[0].family, socket.SOCK_STREAM).close()
        except OSError as exc:
            if exc.errno in LOCAL_ERRNOS:  # anything else says nothing of descriptors: not this report's
                accept_errors.report(exc, "accept connections")

    def _report_unlogged_state_changes(self) -> None:
        """The state changes of flapping backends that were counted rather than logged (`StateLines`), with
        the state each is in now."""
        for (pool, backend_id), count in self._state_lines.due(time.monotonic()):
            state = self.ctx.pools.get(pool)
            backend = state.get(backend_id) if state is not None else None
            now = f"is {backend.state.value}: {backend.reason}" if backend is not None else "has left its pool"
            log.info("backend %s/%s %s (%d state change(s) not logged one by one: flapping)",
                     pool, backend_id, now, count)

    def _report_refusals_now(self, *, final: bool = False) -> None:
        now = time.monotonic()  # the data plane's clock (lb.proxy.server), which `note` was given
        for summary in (self.ctx.rate_limited_log, self.ctx.over_limit_log):
            summary.tick(now, final=final)

    def update_discovered(self, pool: str, backends: tuple[BackendConfig, ...]) -> None:
        """DNS discovery found a new set for `pool`: merge it the way a reload does.

        Kept backends keep their state and counts; added ones are health-checked
        (they start `up`, like a reload-added one); removed ones take no new
        client, their cookie holders are redispatched, their tunnels stay.
        """
        old = self.ctx.pools.get(pool)
        static = self.config.pools.get(pool)
        if old is None or static is None or static.discovery is None:
            return  # not (or no longer, or not yet) a discovered pool here: a worker's set may come first
        merged = self._merge_pool(add_discovered(static, backends), old, cause="DNS")
        for backend in old.backends.values():
            if merged.backends.get(backend.id) is not backend:
                self._operator_states.remember(pool, backend)
        self.ctx.pools[pool] = merged
        self._operator_states.keep_absent(self.ctx.pools)
        self._retire({pool: old}, self.ctx.pools, "removed from DNS")
        self._forget_departed_series()
        for checker in self._checkers:
            if checker.pool_name == pool:
                checker.retarget(merged)
        if self._supervisor is not None:
            # The set before the next states push that names its backends (a worker skips states of
            # backends it does not know, until the push after); a report answering the fence is made after
            # the worker applied the set.
            self._supervisor.discovered(pool, backends)
            self._supervisor.states_changed()
            self._retired.fence(self._supervisor.fence())

    # -- reload --------------------------------------------------------------

    def request_reload(self) -> None:
        """SIGHUP: reload now, or once more after the running reload (a burst coalesces into one)."""
        if self._stopping is not None:
            log.warning("reload ignored: shutting down")
            return
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_pending = True
            return
        self._reload_task = asyncio.get_running_loop().create_task(self._reload_loop())

    async def _reload_loop(self) -> None:
        while True:
            self._reload_pending = False
            await self.reload()
            if not self._reload_pending or self._stopping is not None:
                return

    def _advise(self) -> None:
        """Settings that work as written but defeat their purpose (lb.config.advice), once per process tree."""
        if self.role is not Role.WORKER:
            for sentence in advice(self.config, crc32c_in_c=CRC32C_IN_C, descriptors=descriptor_limit()):
                log.warning("%s", sentence)

    async def reload(self, source: ConfigSource | None = None) -> bool:
        """Apply a new config whole; keep the running config entirely if anything fails.

        Args:
            source: None re-reads the config file and its `${file:PATH}` files (SIGHUP: the single
                process, the owner of workers); a worker gets the source its owner has just applied,
                and reads none of those files.
        """
        if self.config_path is None:
            log.error("reload failed: no configuration file to read")
            self.reloads.failed()
            return False
        try:
            # In a thread: a large file takes seconds to parse and check, and the event loop keeps
            # relaying meanwhile (it shares the GIL with the parse, but is no longer frozen by it).
            # A daemon thread: a SIGTERM meanwhile exits without waiting for the check to end.
            self._reload_reading = True
            try:
                applied, config = await in_daemon_thread(functools.partial(self._read_config, source), name="reload")
            finally:
                self._reload_reading = False
            if self._stopping is not None:
                # SIGTERM came during the parse: nothing new is bound or sent to stopping workers.
                log.warning("reload abandoned: shutting down")
                self.reloads.failed()
                return False
            if self._supervisor is not None:
                check_config_handover(applied)  # before anything is applied: the workers must get it too
        except ConfigError as exc:
            # A root problem has no path.  One line, and a bounded one: `lb validate` lists them all.
            shown = "; ".join(str(problem) for problem in exc.problems[:MAX_LOGGED_PROBLEMS])
            more = len(exc.problems) - MAX_LOGGED_PROBLEMS
            if more > 0:
                shown += f"; and {more} more (`lb validate --config {self.config_path}` lists them all)"
            log.error("reload failed, keeping the running configuration: %s", shown)
            self.reloads.failed()
            return False
        except Exception:  # a fault of ours in reading it: said now and counted, not when the task is collected
            log.exception("reload failed, keeping the running configuration: reading it raised")
            self.reloads.failed()
            return False
        restart_only = self._restart_only_changes(config)
        config = self._as_running(config)
        running = self.config
        try:
            await self.apply(config)
        except BindError as exc:
            log.error("reload failed, keeping the running configuration: %s", exc)
            self.reloads.failed()
            return False
        self.reloads.succeeded()
        log.info("reloaded configuration from %s", self.config_path)
        self._advise()
        if self.role is not Role.WORKER:
            for sentence in reload_advice(running, config):
                log.warning("%s", sentence)
        for setting in restart_only:
            log.warning("%s: the reload applied everything else; this takes a restart", setting)
        if self._supervisor is not None:
            self._supervisor.reloaded(applied)
            self._supervisor.states_changed()
            # After the reload message: a worker handles its messages in order, so a report that answers
            # this fence was made once it ran the new pools, with the removed backends' tunnels counted.
            self._retired.fence(self._supervisor.fence())
        return True

    def _restart_only_changes(self, config: Config) -> list[str]:
        """Settings of `config` that a reload cannot apply, each with what runs instead (a worker's
        owner says so for the tree)."""
        if self.role is Role.WORKER:
            return []
        workers, auto, event_loop = self._started_with
        changed = []
        if (config.workers, config.workers_auto) != (workers, auto):
            # `auto` and the number it comes to are kept as written too (config_hash): a switch between them
            # is said, as it leaves this replica's hash apart from one started on the new file.
            written = "auto" if config.workers_auto else str(config.workers)
            running = f"auto, {workers}" if auto else str(workers)
            changed.append(f"workers: {written} (running: {running})")
        if config.runtime.event_loop is not event_loop:
            changed.append(f"runtime.event_loop: {config.runtime.event_loop.value} (running: {event_loop.value})")
        return changed

    def _as_running(self, config: Config) -> Config:
        """`config` with what only a restart changes (`workers`, `runtime.event_loop`) as this process runs
        it: /status, the advice and `config_hash` (LbConfigDrift) then describe the configuration in
        effect.  With the file's values, a replica reloaded to `workers: 2` while running one process
        hashed alike a replica started with two, and the drift between them went unseen."""
        workers, auto, event_loop = self._started_with
        if (config.workers, config.workers_auto, config.runtime.event_loop) == self._started_with:
            return config
        runtime = replace(config.runtime, event_loop=event_loop)
        return replace(config, workers=workers, workers_auto=auto, runtime=runtime)

    def _read_config(self, source: ConfigSource | None) -> tuple[ConfigSource, Config]:
        """The config to reload to, and its source (None: read from the files now).  Runs in a thread,
        without cyclic garbage collection (`collection_paused` says why)."""
        assert self.config_path is not None
        with collection_paused():
            config, applied = load_config_source(self.config_path, source=source)
            return applied, split_limits(config, *self._share)

    async def apply(self, config: Config) -> None:
        """Swap in `config` without closing a live tunnel; raises BindError having changed nothing."""
        # 1. Build: everything that can fail happens here, before the running state is touched.
        new_listening: list[Listening] = []
        kept: list[tuple[Listening, ListenerConfig]] = []
        new_admin: tuple[web.AppRunner, tuple[str, int]] | None = None
        new_held: dict[tuple[str, int], list[socket.socket]] = {}
        try:
            if self.role is not Role.OWNER:
                # A kept TLS listener's files were loaded by load_config (a bad one failed the reload there).
                kept, wanted = match_listeners(self._listening, config.listeners)
                kept_ids = {id(listening) for listening, _ in kept}
                for listener in wanted:
                    # Same address, other kind (TLS or PROXY protocol turned on or off): the new
                    # listener takes over the running socket, so nothing has to bind a busy port and
                    # connections waiting in its queue are not lost.  It starts accepting at the swap.
                    replaced = next(
                        (item for item in self._listening if id(item) not in kept_ids
                         and (item.config.host, item.config.port) == (listener.host, listener.port)),
                        None,
                    )
                    if replaced is None:
                        if self.role is Role.SINGLE:
                            new_held[(listener.host, listener.port)] = claim(listener, probe=False)
                        new_listening.append(await self._bind(listener))
                    else:
                        adopted = dup_sockets(replaced.server.sockets)
                        new_listening.append(await self._bind(listener, adopt=adopted))
            else:
                for listener in config.listeners:
                    if (listener.host, listener.port) not in self._held:  # ours are claimed, for our workers
                        new_held[(listener.host, listener.port)] = claim(listener, probe=True)
            if self.role is not Role.WORKER and (self._admin is None or (config.admin.host, config.admin.port) != (
                self.config.admin.host, self.config.admin.port
            )):
                # Also when the API is not running (its default address was taken at the start): the
                # reload that writes admin.bind, which the start's warning asks for, binds it even at
                # the default address, and one without it tries that address again.
                new_admin = await self._bind_admin(config.admin)
        except (BindError, OSError, ssl.SSLError) as exc:
            for listening in new_listening:
                listening.server.close()
            release(new_held)
            self._no_admin = None  # the reload failed: nothing of it is said but that
            if new_admin is not None:
                await new_admin[0].cleanup()
            if isinstance(exc, BindError):
                raise
            raise BindError("TLS", "a reloaded listener", exc) from exc
        # 2. Swap: one synchronous block, so every connection sees the old state or the new one.
        previous = self.config
        self._swap(config, kept, new_listening)
        # The claims follow the listeners (a removed one's workers close theirs as they apply it).
        addresses = {(listener.host, listener.port) for listener in config.listeners}
        release({key: held for key, held in self._held.items() if key not in addresses})
        self._held = {key: held for key, held in self._held.items() if key in addresses} | new_held
        old_admin = None
        if new_admin is not None:
            old_admin, (self._admin, self.admin_address) = self._admin, new_admin
            log.info("admin API %s %s", "on" if old_admin is None else "moved to", host_port(*self.admin_address))
        self._say_no_admin()
        # 3. Update the health checkers (reloads are serialized: never two sets) and release the old admin.
        setup_logging(config.logging)
        if self.role is not Role.WORKER:
            await self._follow_health_checks(previous)
        self.discovery.start(self.config.pools, self.config.listeners)  # DNS discovery loops (lb.control.discovery)
        if old_admin is not None:
            await old_admin.cleanup()

    def _swap(
        self, config: Config, kept: list[tuple[Listening, ListenerConfig]], new_listening: list[Listening]
    ) -> None:
        """Install the new state.  No await in here: this is the reload's atomic step."""
        ctx = self.ctx
        old_pools = ctx.pools
        pools = {
            name: self._merge_pool(self.discovery.with_discovered(pool), old_pools.get(name))
            for name, pool in config.pools.items()
        }
        self._retire(old_pools, pools, "removed by reload")
        self._operator_states.keep_absent(pools)
        rate_limiter = ctx.rate_limiter
        if config.limits != ctx.config.limits:
            rate_limiter = RateLimiter(config.limits.handshake_rate_per_ip, config.limits.burst_per_ip)
        ctx.pools = pools
        ctx.codec = TokenCodec(config.affinity.secret_keys, config.affinity.max_age, config.affinity.token_version)
        ctx.routes = sort_routes(config.routes)
        ctx.protected = configured_protected(config)
        ctx.trusted_proxies = TrustedProxies(config.trusted_proxies)
        ctx.rate_limiter = rate_limiter
        idle_before = ctx.config.timeouts.idle
        ctx.config = config
        if self._sweeper is not None and config.timeouts.idle != idle_before:
            self._sweeper.cancel()
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle_tunnels())
        self._forget_departed_series()
        if self.role is Role.OWNER:
            return
        kept_ids = {id(listening) for listening, _ in kept}
        for listening in self._listening:
            if id(listening) not in kept_ids:
                listening.server.close()
                log.info("stopped listening on %s", host_port(*listening.address))
        for listening, listener in kept:
            listening.follow(listener)
        for listening in new_listening:
            if not listening.server.is_serving():  # took over a replaced listener's socket
                start_serving(listening.server)
            listening.announce()
        self._listening = [listening for listening, _ in kept] + new_listening

    def _retire(self, old_pools: Mapping[str, PoolState], new_pools: Mapping[str, PoolState], reason: str) -> None:
        """Backends of `old_pools` that `new_pools` no longer hold keep counting while their tunnels run
        (`retired_backends`); one that is back (`_merge_pool` reuses it) is itself again, not also removed.

        The owner of workers keeps every one provisionally (lb.state.retired): its count is as of the
        workers' last reports, and a backend whose tunnels all opened since then would be dropped at 0
        while they run.  The caller fences them once the change has reached the workers.
        """
        self._retired.drop_back(new_pools)
        provisional = self.role is Role.OWNER
        for name, old in old_pools.items():
            now = new_pools.get(name)
            for backend in old.backends.values():
                if now is None or now.backends.get(backend.id) is not backend:
                    backend.reason = reason
                    backend.changed_at = time.time()
                    self._retired.retire(name, backend, provisional=provisional)

    def _departed_series(self) -> list[tuple[str, str]]:
        """The departed backends /metrics shows: those the series retention keeps, and a removed one whose
        last tunnel has ended since the retention last counted it present (`_each_second` recounts).
        Until then it was in neither, and a scrape within that second missed its series (Prometheus
        marks such a series stale: one gap in a counter that never went away)."""
        retired = self._retired_in_series
        return [*self.series.departed_everywhere(), *retired] if retired else self.series.departed_everywhere()

    def _forget_departed_series(self) -> None:
        """After the pools changed (start, DNS, reload): keep the series of the backends they hold, of
        those removed whose tunnels still run, and of the last `departed_kept` to leave each pool;
        forget the others everywhere this process holds them (lb.state.series).

        Without this, every backend id DNS ever named kept its series for the process's life: a
        churning answer grew /metrics and the heap without bound.
        """
        present: dict[str, set[str]] = {name: set(pool.backends) for name, pool in self.ctx.pools.items()}
        # Their lb_backend_* still show (lb.control.metrics).  Those the owner keeps only until its workers'
        # reports tell (lb.state.retired) are departed until then: counted present, 8 backends a DNS answer
        # removed kept their series on top of the departed ones' bound until the next change.
        retired = self.retired_backends()
        for name, backend in retired:
            present.setdefault(name, set()).add(backend.id)
        self._retired_in_series = frozenset((name, backend.id) for name, backend in retired)
        # The configured pools (static backends only): a pool's state holds its discovered ones too.
        bounds = {name: departed_kept(pool) for name, pool in self.config.pools.items()}
        forgotten = self.series.update(present, bounds)
        keep = self.series.holds
        self.ctx.stats.forget(keep, self.series.holds_pool)
        self.ctx.observations.forget(keep, self.series.holds_pool)
        if self._supervisor is not None:
            self._supervisor.forget_series()
        if forgotten:
            log.debug("metric series of %d departed backend(s) forgotten, the oldest to leave: %s",
                      len(forgotten), ", ".join(f"{pool}/{backend}" for pool, backend in forgotten[:5]))

    def _merge_pool(self, config: PoolConfig, old: PoolState | None, cause: str = "reload") -> PoolState:
        """`config`'s backends with their states: a kept one's, a removed one's still running tunnels
        (`_retired`), or a new one's.  A backend that joins a pool already there (a reload or a DNS answer
        adds it, or names one it had removed) ramps up over `slow_start` as one back up does: at full
        weight from its first second, `least_conn` sent it every new client until it held as many as the
        others (HAProxy ramps a server added at run time, too).  The backends a pool starts with take their
        full weight (at start, with discovery's first answers before the balancer listens; a new pool's):
        all ramping together, none would take fewer than the others.  A DNS answer after that, a new pool's
        first one too, joins a pool already serving, so what it adds ramps."""
        backends: dict[str, BackendStatus] = {}
        # Only once serving: discovery's first answers, applied while the balancer starts (before its first
        # client), are its starting set, which takes its full weight as a static one does.
        joined = time.time() if old is not None and self.ready else None
        # A backend removed by an earlier reload whose tunnels still run comes back as itself: one backend,
        # one connection count (least_conn must see its live tunnels).  Looked up by id: a scan of the
        # retired list per backend was 9 million steps when a reload brought back 3,000 that one had
        # removed with their tunnels (the first listed, should an id be there twice).
        retired = self._retired.of_pool(config.name)
        for backend_config in config.backends:
            status = old.backends.get(backend_config.id) if old is not None else None
            if status is None:
                status = retired.get(backend_config.id)
                if status is not None:
                    status.reason = _back_reason(status, cause)
                    status.changed_at = time.time()
                    status.ramp_from = joined
            if status is None:
                status = BackendStatus(config=backend_config, changed_at=time.time(), ramp_from=joined)
                restored = cause == "DNS" and self._operator_states.restore(config.name, status) is not None
                if restored and self.role is not Role.WORKER:  # said once, by the owner: workers follow its sets
                    log.info("discovery: %s/%s is back in DNS, still %s as an operator said", config.name,
                             status.id, status.state.value)
            else:
                status.config = backend_config  # address or weight may have changed; state stays
            backends[backend_config.id] = status
        return PoolState(config=config, backends=backends)

    # -- stop ----------------------------------------------------------------

    def stop(self) -> asyncio.Task[None]:
        """Begin the shutdown once; every call returns the same task to await."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop())
            self._stop_called.set()
        return self._stopping

    def hurry(self) -> None:
        """A second Ctrl-C while stopping: stop now, as servers run at a terminal do (uvicorn, compose).

        What is left of `shutdown_delay` is skipped, the live tunnels get their 1001 together rather
        than spread over what is left of `shutdown_grace`, and a handshake in flight gets its 503 (an
        answer still streaming is cut). Workers are told the same way (SIGINT: they are in a session
        of their own, so only their owner sends it).
        """
        if (not self.stop_asked and self._stopping is None) or self._closing.hurried.is_set():
            return
        self._closing.hurried.set()
        log.warning("stopping now (SIGINT during the stop): live tunnels get 1001 at once, handshakes in flight 503")
        if self._supervisor is not None:
            self._supervisor.hurry()

    def stop_repeated(self) -> None:
        """Another SIGTERM or SIGQUIT while stopping: said once (a supervisor that repeats its signal
        must not fill the log), so that an operator at a terminal knows how to stop now."""
        if not self._stop_repeated:
            self._stop_repeated = True
            log.info("already stopping; a SIGINT (Ctrl-C) stops at once")

    @property
    def shutting_down(self) -> bool:
        """From the stop signal on (one taken while starting too, as /readyz says)."""
        return self._stopping is not None or self.stop_asked

    async def stopped(self) -> None:
        """Returns once `stop()` has been called, by whoever."""
        await self._stop_called.wait()

    def not_ready(self) -> str | None:
        """Why /readyz answers 503 ("starting", "shutting down", "no worker serving"), or None: ready.

        The owner of workers listens through them: with none serving (all dead and being restarted,
        or all stopped or stuck: `WorkerSupervisor.serving_workers`), no client would get an answer.
        """
        if self._stopping is not None or self.stop_asked:
            return "shutting down"
        if not self.ready:
            return "starting"
        if self._no_worker_serving():
            return "no worker serving"
        return None

    async def fresh_counts(self) -> None:
        """The workers' counters as of now, for /metrics and /status (`WorkerSupervisor.fresh_counts`);
        a process without workers counts in place."""
        if self._supervisor is not None:
            await self._supervisor.fresh_counts()

    def workers_serving(self) -> tuple[int, int] | None:
        """(how many of the owner's workers serve now, how many it runs); None without workers."""
        if self._supervisor is None:
            return None
        return self._supervisor.serving_workers(asyncio.get_running_loop().time()), self._supervisor.count

    def _worker_counts(self) -> WorkerCounts:
        serving, count = self.workers_serving() or (0, self.config.workers)
        return WorkerCounts(count, serving, self._supervisor.restarts if self._supervisor is not None else 0)

    def _no_worker_serving(self) -> bool:
        workers = self.workers_serving()
        return workers is not None and workers[0] == 0

    @property
    def serving(self) -> bool:
        """Accepting connections: from start until SIGTERM's `shutdown_delay` has run out (/healthz).

        The owner of workers accepts nothing itself: it serves while one of its workers does
        (`not_ready`), and its workers stop accepting when the same delay has run out, so that
        is when it stops saying it serves too.
        """
        if self._stopping is None:
            return self.ready and not self._no_worker_serving()
        return self.ctx.accepting and (self._serving_until is None or time.monotonic() < self._serving_until)

    async def _stop(self) -> None:
        timeouts = self.config.timeouts
        self.ready = False
        if self._reload_task is not None and not self._reload_task.done() and not self._reload_reading:
            # Let a reload in progress finish its swap: stopping half-way would leave its pieces running.
            # One still reading its file is not waited for (README: the exit does not wait for a large
            # file's check): it abandons once the read ends, and the delay and grace start now.
            await asyncio.wait([self._reload_task], timeout=5.0)
        for task in self._migrations.values():
            task.cancel()
        if self._control is not None:
            self._control.stop_migrations()  # a worker's shares of the owner's drains
        # From here the delay runs (here too in each worker, told to stop just below): until then, serving,
        # with every answer asking its keep-alive client to go (to the instances still ready).
        self._serving_until = time.monotonic() + timeouts.shutdown_delay
        self.ctx.deregistering = True
        if self._supervisor is not None:
            # Each worker runs the same delay and spread for its own tunnels.
            log.info("shutting down: /readyz answers 503; stopping the workers")
            # They stop accepting as the delay ends, and the claim with them: another `lb run` may take
            # the address over while they drain their tunnels, as with one process.
            released = asyncio.get_running_loop().call_later(timeouts.shutdown_delay, self._release_claims)
            await self._supervisor.stop(
                timeouts.shutdown_delay
                + max(timeouts.shutdown_grace + CLOSE_LINGER, timeouts.backend_connect + 1.0)
                + 5.0
            )
            released.cancel()
            self._release_claims()  # sooner, if the workers are gone sooner
        elif timeouts.shutdown_delay > 0:
            log.info("shutting down: /readyz answers 503; still serving for %gs", timeouts.shutdown_delay)
            await self._closing.unless_hurried(timeouts.shutdown_delay)
            if self._closing.hurried.is_set():
                self._serving_until = time.monotonic()  # /healthz: no longer serving from here
        log.info("shutting down: no longer accepting connections")
        self.ctx.accepting = False
        spread_until = asyncio.get_running_loop().time() + timeouts.shutdown_grace
        self.ctx.spread_until = spread_until  # tunnels that join from now on close within it too
        if self._listening:
            # Connections the kernel has queued are reset when their listening socket closes, with no
            # answer: a few turns of the loop accept them first, and each gets its 503 as its head comes.
            await asyncio.sleep(ACCEPT_QUEUE_DRAIN)
        for listening in self._listening:
            listening.server.close()
        self._release_claims()
        # Handshakes in flight (TLS handshakes and PROXY headers still arriving included): 503 if not yet
        # at a backend, else their answer completes.  Live tunnels get their 1001s meanwhile: a silent
        # connection waiting out its handshake deadline must not hold up the spread.
        handshakes = asyncio.get_running_loop().create_task(stop_in_flight(
            self.ctx,
            # As long as the tunnels get (or a backend's time to answer, if longer): a client that opened a
            # TLS connection and sent nothing must not hold the stop past what deployments budget for it.
            max(timeouts.shutdown_grace, timeouts.backend_connect + 1.0),
            pending=lambda: sum(
                listening.server.pending for listening in self._listening
                if isinstance(listening.server, AcceptingServer)
            ),
            streaming_within=timeouts.shutdown_grace,
            hurried=self._closing.hurried.is_set,
        ))
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None  # and no reload that races this stop starts another (_swap)
        if self._reporter is not None:
            self._reporter.cancel()
            self._report_refusals_now(final=True)  # what the last interval counted, before the process goes
        await self._closing.spread(timeouts.shutdown_grace)
        await handshakes
        for listening in self._listening:
            if isinstance(listening.server, AcceptingServer):
                listening.server.abort_pending()  # silent TLS or PROXY starts: not waited for any longer
        # Upgrades that completed after SIGTERM: each got its 1001 at a random moment of the window
        # left when it joined (at once past it).  Until the window ends, then what is left is closed.
        await self._closing.end(spread_until)
        abort_in_flight(self.ctx)  # answers still streaming: cut, and logged
        await self._stop_health_checks()
        await self.discovery.stop()
        if self._admin is not None:
            await self._admin.cleanup()
        report_unlogged_errors(time.monotonic(), final=True)  # the last of a flood of wrong tokens
        if self._control is not None:
            await self._control.stop()
        for listening in self._listening:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listening.server.wait_closed(), 1.0)
        log.info("stopped")

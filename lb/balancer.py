"""The running balancer: builds listeners, admin and health checks; starts, reloads and stops them.

`Balancer.stop()` is idempotent and follows websockets' `Server.close()`:
stop accepting (handshakes in flight get 503, /healthz answers 503) → wait up
to `timeouts.shutdown_grace` for live tunnels to end → send what is left a
WebSocket close 1001 and give clients a moment to answer it → close the rest
→ stop health checks and admin.

`Balancer.reload()` (SIGHUP) re-reads the config; an invalid one is logged and
ignored.  A valid one is swapped in whole without closing a live tunnel:
backends keep their health and counts by id, removed backends keep their
tunnels until they end, listeners are opened and closed by difference.

`run()` wires SIGTERM/SIGINT to `stop` and SIGHUP to `reload`, and picks the
event loop (uvloop when installed and `runtime.event_loop` allows).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from aiohttp import web

from lb.admin import make_admin_app
from lb.affinity_token import TokenCodec
from lb.config import Config, EventLoop, ListenerConfig, PoolConfig
from lb.config_load import load_config
from lb.context import ProxyContext
from lb.errors import ConfigError
from lb.health import HealthChecker
from lb.listener import client_factory, install_accept_error_filter, stop_in_flight
from lb.log import setup_logging
from lb.metrics import make_registry
from lb.migration import DEFAULT_MIGRATION_RATE, migrate
from lb.pool import AdminAction, BackendState, BackendStatus, PoolState, StateChange
from lb.ratelimit import RateLimiter
from lb.routing import sort_routes
from lb.tls import server_ssl_context
from lb.tunnel import CLOSE_LINGER
from lb.workers import ControlChannel, WorkerSupervisor

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Listening:
    config: ListenerConfig
    server: asyncio.Server
    ssl_context: ssl.SSLContext | None
    address: tuple[str, int] = field(default=("", 0))


class Role(StrEnum):
    SINGLE = "single"  # workers: 1 — one process does everything
    OWNER = "owner"    # workers: N — health, admin, states; starts the workers
    WORKER = "worker"  # accepts and relays; states come from the owner


class Balancer:
    def __init__(
        self, config: Config, config_path: Path | None = None, *, role: Role = Role.SINGLE, control_fd: int = -1
    ) -> None:
        self.config_path = config_path
        self.role = role
        self.ctx = ProxyContext.build(config, self.record_backend_failure)
        self.registry = make_registry(lambda: self.ctx)
        self._listening: list[_Listening] = []
        self._admin: web.AppRunner | None = None
        self.admin_address: tuple[str, int] | None = None
        self._checkers: list[HealthChecker] = []
        self._migrations: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._sweeper: asyncio.Task[None] | None = None
        self._stopping: asyncio.Task[None] | None = None
        self._stop_called = asyncio.Event()
        # Backends removed by a reload that still carry tunnels, shown in /status until they end.
        self._retired: list[tuple[str, BackendStatus]] = []
        self._supervisor: WorkerSupervisor | None = None
        self._control: ControlChannel | None = None
        if role is Role.OWNER:
            if config_path is None:
                raise ValueError("workers need the configuration file (they read it themselves)")
            self._supervisor = WorkerSupervisor(self, config.workers, config_path)
        elif role is Role.WORKER:
            self._control = ControlChannel(self, control_fd)

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def listen_addresses(self) -> list[tuple[str, int]]:
        return [listening.address for listening in self._listening]

    # -- start -------------------------------------------------------------

    def retired_backends(self) -> list[tuple[str, BackendStatus]]:
        """(pool, backend) removed by a reload whose tunnels still run; forgets those that ended."""
        self._retired = [(name, b) for name, b in self._retired if b.connections > 0]
        return self._retired

    def live_tunnels(self) -> int:
        return self._supervisor.live_tunnels if self._supervisor is not None else len(self.ctx.tunnels)

    async def start(self) -> None:
        if self._control is not None:
            await self._control.start()
        if self.role is not Role.OWNER:
            for listener in self.config.listeners:
                await self._listen(listener)
            self._sweeper = asyncio.get_running_loop().create_task(self._sweep_idle_tunnels())
        if self.role is not Role.WORKER:
            self._start_health_checks()
        if self._supervisor is not None:
            await self._supervisor.start()
        if self._control is not None:
            self._control.report_ready()
        if self.role is not Role.WORKER:
            # Last, so that /healthz answering means the listeners (or every worker's) are up.
            await self._start_admin()

    async def _listen(self, listener: ListenerConfig) -> None:
        ssl_context = server_ssl_context(listener.tls) if listener.tls else None
        tls = ssl_context is not None
        loop = asyncio.get_running_loop()
        install_accept_error_filter(loop)
        server = await loop.create_server(
            client_factory(self.ctx, tls),
            listener.host,
            listener.port,
            ssl=ssl_context,
            # A stalled TLS handshake is closed on time (the connection counts from accept).
            ssl_handshake_timeout=self.config.timeouts.handshake if tls else None,
            backlog=1024,
            reuse_address=True,
            # Workers each bind every listener; the kernel spreads connections over them.
            reuse_port=self.role is Role.WORKER,
        )
        host, port = server.sockets[0].getsockname()[:2]
        self._listening.append(_Listening(listener, server, ssl_context, (host, port)))
        log.info("listening on %s:%d%s", host, port, " (TLS)" if tls else "")

    async def _start_admin(self) -> None:
        admin = self.config.admin
        self._admin = web.AppRunner(make_admin_app(self), access_log=None, handle_signals=False)
        await self._admin.setup()
        await web.TCPSite(self._admin, admin.host, admin.port, reuse_address=True).start()
        host, port = self._admin.addresses[0][:2]
        self.admin_address = (host, port)
        log.info("admin API on %s:%d", host, port)

    def _start_health_checks(self) -> None:
        for pool in self.ctx.pools.values():
            checker = HealthChecker(pool, self._on_state_change)
            checker.start()
            self._checkers.append(checker)

    async def _stop_health_checks(self) -> None:
        checkers, self._checkers = self._checkers, []
        for checker in checkers:
            await checker.stop()

    # -- state ---------------------------------------------------------------

    def _on_state_change(self, change: StateChange) -> None:
        level = logging.WARNING if change.new is BackendState.DOWN else logging.INFO
        log.log(level, "backend %s/%s is %s (was %s): %s",
                change.pool, change.backend, change.new.value, change.old.value, change.reason)
        if self._supervisor is not None:
            self._supervisor.states_changed()

    def record_backend_failure(self, pool: str, backend_id: str, detail: str) -> None:
        """A backend failed a handshake: counts as a failed health check (passive health)."""
        state = self.ctx.pools.get(pool)
        if state is None or state.get(backend_id) is None:
            return  # removed by a reload meanwhile
        change = state.record_probe(backend_id, False, time.time(), detail)
        if self._control is not None:
            self._control.report_failure(pool, backend_id, detail)  # the owner decides for everyone
        elif change is not None:
            self._on_state_change(change)

    def apply_admin(
        self, pool: str, backend_id: str, action: AdminAction, *, close_after: float | None = None,
        rate: float | None = None,
    ) -> BackendState:
        """An operator's drain, disable or enable; with `rate`, also close its tunnels gradually (1012)."""
        key = (pool, backend_id)
        previous = self._migrations.pop(key, None)
        if previous is not None:
            previous.cancel()
        state_pool = self.ctx.pools[pool]
        change = state_pool.apply_admin(backend_id, action, time.time())
        if change is not None:
            self._on_state_change(change)
        if action is not AdminAction.ENABLE and (close_after is not None or rate is not None):
            backend = state_pool.backends[backend_id]
            delay, pace = close_after or 0.0, rate or DEFAULT_MIGRATION_RATE
            task = asyncio.get_running_loop().create_task(
                self._supervisor.migrate(pool, backend_id, delay, pace)
                if self._supervisor is not None
                else migrate(self.ctx, pool, backend, delay, pace)
            )
            self._migrations[key] = task
        return state_pool.backends[backend_id].state

    async def _sweep_idle_tunnels(self) -> None:
        """Close tunnels that moved no byte for `timeouts.idle` (off when 0)."""
        while True:
            idle = self.config.timeouts.idle
            await asyncio.sleep(idle / 2 if idle > 0 else 1.0)
            if idle <= 0:
                continue
            now = time.monotonic()
            for tunnel in list(self.ctx.tunnels):
                moved = tunnel.bytes_in + tunnel.bytes_out
                seen, since = tunnel.idle_mark
                if moved != seen:
                    tunnel.idle_mark = (moved, now)
                elif now - since >= idle:
                    tunnel.close_gracefully(1001, "idle timeout")

    # -- reload --------------------------------------------------------------

    async def reload(self) -> bool:
        """Re-read the config file and apply it; keep the running config if it is invalid."""
        if self.config_path is None:
            log.error("reload: no configuration file to read")
            return False
        try:
            config = load_config(self.config_path)
        except ConfigError as exc:
            log.error("reload failed, keeping the running configuration:\n%s", exc)
            return False
        try:
            await self.apply(config)
        except OSError as exc:
            log.error("reload failed to bind a listener, keeping the others: %s", exc)
            return False
        log.info("reloaded configuration from %s", self.config_path)
        if self._supervisor is not None:
            if config.workers != self._supervisor.count:
                log.warning("workers: %d needs a restart to take effect", config.workers)
            self._supervisor.broadcast({"op": "reload"})
            self._supervisor.states_changed()
        return True

    async def apply(self, config: Config) -> None:
        """Swap in `config` without closing a live tunnel."""
        ctx = self.ctx
        old_pools = ctx.pools
        ctx.pools = {name: self._merge_pool(pool, old_pools.get(name)) for name, pool in config.pools.items()}
        for name, old in old_pools.items():
            kept = ctx.pools.get(name)
            for backend in old.backends.values():
                if kept is None or kept.backends.get(backend.id) is not backend:
                    backend.reason = "removed by reload"
                    if backend.connections:
                        self._retired.append((name, backend))
        ctx.codec = TokenCodec(config.affinity.secret_keys, config.affinity.max_age)
        ctx.routes = sort_routes(config.routes)
        if config.limits != ctx.config.limits:
            ctx.rate_limiter = RateLimiter(config.limits.handshake_rate_per_ip, config.limits.handshake_burst_per_ip)
        old_config, ctx.config = ctx.config, config
        setup_logging(config.logging)
        if self.role is not Role.WORKER:
            await self._stop_health_checks()
            self._start_health_checks()
        if self.role is not Role.OWNER:
            await self._apply_listeners(config)
        if self.role is not Role.WORKER and (
            config.admin.host != old_config.admin.host or config.admin.port != old_config.admin.port
        ):
            if self._admin is not None:
                await self._admin.cleanup()
            await self._start_admin()

    @staticmethod
    def _merge_pool(config: PoolConfig, old: PoolState | None) -> PoolState:
        backends: dict[str, BackendStatus] = {}
        for backend_config in config.backends:
            status = old.backends.get(backend_config.id) if old is not None else None
            if status is None:
                status = BackendStatus(config=backend_config)
            else:
                status.config = backend_config  # address or weight may have changed; state stays
            backends[backend_config.id] = status
        return PoolState(config=config, backends=backends)

    async def _apply_listeners(self, config: Config) -> None:
        wanted = list(config.listeners)
        keep: list[_Listening] = []
        for listening in self._listening:
            same_bind = next(
                (w for w in wanted if (w.host, w.port) == (listening.config.host, listening.config.port)), None
            )
            if same_bind is not None and (same_bind.tls is None) == (listening.ssl_context is None):
                wanted.remove(same_bind)
                if same_bind.tls is not None and listening.ssl_context is not None:
                    # New handshakes use the new certificate; established sessions are untouched.
                    listening.ssl_context.load_cert_chain(same_bind.tls.cert, same_bind.tls.key)
                listening.config = same_bind
                keep.append(listening)
            else:
                listening.server.close()
                log.info("stopped listening on %s:%d", *listening.address)
        self._listening = keep
        for listener in wanted:
            await self._listen(listener)

    # -- stop ----------------------------------------------------------------

    def stop(self) -> asyncio.Task[None]:
        """Begin the shutdown once; every call returns the same task to await."""
        if self._stopping is None:
            self._stopping = asyncio.get_running_loop().create_task(self._stop())
            self._stop_called.set()
        return self._stopping

    async def stopped(self) -> None:
        """Returns once `stop()` has been called, by whoever."""
        await self._stop_called.wait()

    async def _stop(self) -> None:
        log.info("shutting down: no longer accepting connections")
        self.ctx.accepting = False
        for listening in self._listening:
            listening.server.close()
        # Handshakes in flight: 503 if not yet at a backend, else their answer completes.
        await stop_in_flight(self.ctx, self.config.timeouts.backend_connect + 1.0)
        for task in [*self._migrations.values(), *([self._sweeper] if self._sweeper else [])]:
            task.cancel()
        grace = self.config.timeouts.shutdown_grace
        if self._supervisor is not None:
            await self._supervisor.stop(grace + CLOSE_LINGER + 5.0)
        if self.ctx.tunnels:
            log.info("waiting up to %gs for %d live tunnel(s)", grace, len(self.ctx.tunnels))
            await self.ctx.wait_tunnels_closed(grace)
        if self.ctx.tunnels:
            log.info("closing %d live tunnel(s) with 1001", len(self.ctx.tunnels))
            for tunnel in list(self.ctx.tunnels):
                tunnel.close_gracefully(1001, "balancer shutting down")
            await self.ctx.wait_tunnels_closed(CLOSE_LINGER + 0.5)
            for tunnel in list(self.ctx.tunnels):
                tunnel.close()
        await self._stop_health_checks()
        if self._admin is not None:
            await self._admin.cleanup()
        if self._control is not None:
            await self._control.stop()
        for listening in self._listening:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(listening.server.wait_closed(), 1.0)
        log.info("stopped")


async def serve(config: Config, config_path: Path | None, role: Role, control_fd: int = -1) -> int:
    balancer = Balancer(config, config_path, role=role, control_fd=control_fd)
    await balancer.start()
    loop = asyncio.get_running_loop()
    stop_requested = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = loop.create_task(balancer.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop_requested.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    signalled = loop.create_task(stop_requested.wait())
    # A worker also stops when its owner goes away (balancer.stop() called from the control channel).
    stopped = loop.create_task(balancer.stopped())
    await asyncio.wait([signalled, stopped], return_when=asyncio.FIRST_COMPLETED)
    signalled.cancel()
    stopped.cancel()
    await balancer.stop()
    return 0


def _loop_runner(choice: EventLoop) -> Callable[[Coroutine[Any, Any, int]], int]:
    if choice is not EventLoop.ASYNCIO:
        try:
            import uvloop
        except ImportError:
            if choice is EventLoop.UVLOOP:
                raise
        else:
            return uvloop.run
    return asyncio.run


def run(config: Config, config_path: Path | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    setup_logging(config.logging)
    role = Role.OWNER if config.workers > 1 else Role.SINGLE
    return _loop_runner(config.runtime.event_loop)(serve(config, config_path, role))


def run_worker(config: Config, config_path: Path, control_fd: int, index: int) -> int:
    """One of `workers: N` processes, started by the owner."""
    setup_logging(config.logging, process=f"worker-{index}")
    return _loop_runner(config.runtime.event_loop)(serve(config, config_path, Role.WORKER, control_fd))

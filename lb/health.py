"""Active health checks: one probe loop per backend, results recorded in the pool.

HTTP checks GET `health_check.path` and want a 2xx or 3xx within
`health_check.timeout`; TCP checks want the connection accepted.  Each probe
opens a fresh connection, so a dead backend cannot hide behind a pooled one.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from lb.config import HealthCheckType
from lb.observations import Observations
from lb.pool import BackendStatus, PoolState, StateChange

log = logging.getLogger(__name__)


class HealthChecker:
    """Probes every backend of one pool on its interval until stopped."""

    def __init__(
        self, pool: PoolState, on_change: Callable[[StateChange], None], observations: Observations | None = None
    ) -> None:
        self._pool = pool
        self._observations = observations or Observations()  # lb_health_checks_total
        self._on_change = on_change
        self._session: aiohttp.ClientSession | None = None
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        check = self._pool.config.health_check
        if check.type is HealthCheckType.HTTP:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(force_close=True, limit=0),
                timeout=aiohttp.ClientTimeout(total=check.timeout),
                headers={"User-Agent": "ws-affinity-lb health check"},
            )
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._probe_loop(backend), name=f"health {self._pool.name}/{backend.id}")
            for backend in self._pool.backends.values()
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _probe_loop(self, backend: BackendStatus) -> None:
        interval = self._pool.config.health_check.interval
        while True:
            started = time.monotonic()
            ok, detail = await self.probe(backend)
            self._observations.count_health_check(self._pool.name, backend.id, ok)
            change = self._pool.record_probe(backend.id, ok, time.time(), detail)
            if change is not None:
                self._on_change(change)
            await asyncio.sleep(max(0.0, interval - (time.monotonic() - started)))

    async def probe(self, backend: BackendStatus) -> tuple[bool, str]:
        """One check: (passed, what was seen)."""
        check = self._pool.config.health_check
        config = backend.config
        try:
            if check.type is HealthCheckType.TCP:
                async with asyncio.timeout(check.timeout):
                    _, writer = await asyncio.open_connection(config.host, config.port)
                writer.close()
                return True, "connected"
            assert self._session is not None
            async with self._session.get(f"http://{config.address}{check.path}", allow_redirects=False) as reply:
                await reply.read()
                if 200 <= reply.status < 400:
                    return True, f"HTTP {reply.status}"
                return False, f"HTTP {reply.status}"
        except TimeoutError:
            return False, f"no answer within {check.timeout:g}s"
        except (aiohttp.ClientError, OSError) as exc:
            return False, str(exc) or type(exc).__name__

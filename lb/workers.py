"""`workers: N`: an owner process and N worker processes sharing the listeners.

The owner runs health checks, the admin API and drain migrations, and holds
the backend states; it starts N workers (`python -m lb worker ...`), each of
which binds every listener with SO_REUSEPORT so the kernel spreads clients
over them, and relays.  They talk over a socketpair in `control` messages:
the owner pushes backend states (on every change and every second), reloads
and migration shares; workers report passive health failures and counters.
A worker that dies is restarted; its clients reconnect with their tokens, and
every worker opens every token, so they reach the same backends.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lb.control import StatsAggregate, apply_states, decode, encode, states_message, stats_message
from lb.migration import migrate, start_migrating

if TYPE_CHECKING:
    from lb.balancer import Balancer

log = logging.getLogger(__name__)

WORKER_READY = 15.0  # seconds a new worker may take to bind its listeners
RESTART_DELAY = 0.5  # seconds before a dead worker is replaced (no tight crash loop)
STATES_EVERY = 1.0  # seconds between full state pushes (covers anything a worker missed)
STATS_EVERY = 1.0


@dataclass(slots=True)
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    ready: asyncio.Future[None]
    tasks: tuple[asyncio.Task[None], ...] = ()


class WorkerSupervisor:
    """The owner's side: start, feed, watch and restart the workers."""

    def __init__(self, balancer: Balancer, count: int, config_path: Path) -> None:
        self._balancer = balancer
        self.count = count
        self._config_path = config_path
        self._workers: dict[int, _Worker] = {}
        self._stats = StatsAggregate()
        self._stopping = False
        self._pusher: asyncio.Task[None] | None = None
        self.live_tunnels = 0

    async def start(self) -> None:
        """Start the workers; returns once every one listens (so /healthz means serving)."""
        for index in range(self.count):
            await self._spawn(index)
        for index in range(self.count):
            # A worker that dies before it is ready is restarted by its watcher; wait for that one too.
            deadline = asyncio.get_running_loop().time() + WORKER_READY
            while not self._workers[index].ready.done():
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"worker {index} did not start listening in {WORKER_READY:g}s")
                await asyncio.wait([self._workers[index].ready], timeout=0.1)
        self._pusher = asyncio.get_running_loop().create_task(self._push_states())

    async def _spawn(self, index: int) -> None:
        ours, theirs = socket.socketpair()
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lb", "worker",
                "--config", str(self._config_path),
                "--control-fd", str(theirs.fileno()),
                "--index", str(index),
                pass_fds=(theirs.fileno(),),
                # Terminal signals reach the owner only; it stops the workers in order.
                start_new_session=True,
            )
        finally:
            theirs.close()
        reader, writer = await asyncio.open_connection(sock=ours)
        worker = _Worker(index, process, writer, asyncio.get_running_loop().create_future())
        self._workers[index] = worker
        loop = asyncio.get_running_loop()
        worker.tasks = (loop.create_task(self._read(worker, reader)), loop.create_task(self._watch(worker)))
        self._send(worker, states_message(self._balancer.ctx.pools))
        log.info("worker %d started (pid %d)", index, process.pid)

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                message = decode(line)
            except ValueError:
                log.error("worker %d sent a malformed control message", worker.index)
                continue
            if message["op"] == "ready":
                if not worker.ready.done():
                    worker.ready.set_result(None)
            elif message["op"] == "stats":
                self._stats.update(worker.index, message)
                self.live_tunnels = self._stats.apply_to(self._balancer.ctx)
            elif message["op"] == "failure":
                self._balancer.record_backend_failure(message["pool"], message["backend"], message["detail"])

    async def _watch(self, worker: _Worker) -> None:
        code = await worker.process.wait()
        self._stats.retire(worker.index)
        if self._stopping:
            return
        log.warning("worker %d (pid %d) exited with %s; restarting it", worker.index, worker.process.pid, code)
        await asyncio.sleep(RESTART_DELAY)
        if not self._stopping:
            await self._spawn(worker.index)

    async def _push_states(self) -> None:
        while True:
            await asyncio.sleep(STATES_EVERY)
            self.broadcast(states_message(self._balancer.ctx.pools))

    def _send(self, worker: _Worker, message: dict[str, Any]) -> None:
        if not worker.writer.is_closing():
            worker.writer.write(encode(message))

    def broadcast(self, message: dict[str, Any]) -> None:
        for worker in self._workers.values():
            self._send(worker, message)

    def states_changed(self) -> None:
        self.broadcast(states_message(self._balancer.ctx.pools))

    async def migrate(self, pool: str, backend_id: str, close_after: float, rate: float) -> None:
        """The owner's half of a drain migration: each worker closes its share at rate / N."""
        await asyncio.sleep(close_after)
        start_migrating(pool, self._balancer.ctx.pools[pool].backends[backend_id], rate)
        self.states_changed()
        share = rate / max(1, len(self._workers))
        self.broadcast({"op": "close_tunnels", "pool": pool, "backend": backend_id, "rate": share})

    async def stop(self, within: float) -> None:
        """SIGTERM every worker (each closes its tunnels gracefully), wait, then kill stragglers."""
        self._stopping = True
        if self._pusher is not None:
            self._pusher.cancel()
        for worker in self._workers.values():
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        waits = [worker.process.wait() for worker in self._workers.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), within)
        except TimeoutError:
            for worker in self._workers.values():
                if worker.process.returncode is None:
                    log.warning("worker %d did not stop in time; killing it", worker.index)
                    worker.process.kill()
            await asyncio.gather(*(worker.process.wait() for worker in self._workers.values()))
        for worker in self._workers.values():
            worker.writer.close()
            for task in worker.tasks:
                task.cancel()


class ControlChannel:
    """A worker's side: apply the owner's states, report failures and counters."""

    def __init__(self, balancer: Balancer, fd: int) -> None:
        self._balancer = balancer
        self._fd = fd
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[Any]] = []

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=socket.socket(fileno=self._fd))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read(reader)), loop.create_task(self._report())]

    def report_ready(self) -> None:
        self._send({"op": "ready"})

    def report_failure(self, pool: str, backend: str, detail: str) -> None:
        self._send({"op": "failure", "pool": pool, "backend": backend, "detail": detail})

    def _send(self, message: dict[str, Any]) -> None:
        if self._writer is not None and not self._writer.is_closing():
            self._writer.write(encode(message))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        ctx = self._balancer.ctx
        while line := await reader.readline():
            try:
                message = decode(line)
            except ValueError:
                log.error("the owner sent a malformed control message")
                continue
            op = message["op"]
            if op == "states":
                apply_states(ctx.pools, message)
            elif op == "reload":
                await self._balancer.reload()
            elif op == "close_tunnels":
                pool = ctx.pools.get(message["pool"])
                backend = pool.backends.get(message["backend"]) if pool is not None else None
                if backend is not None:
                    task = asyncio.get_running_loop().create_task(
                        migrate(ctx, message["pool"], backend, 0.0, float(message["rate"]))
                    )
                    self._tasks.append(task)
        # The owner is gone: a worker must not outlive it.
        log.warning("owner process went away; stopping")
        self._balancer.stop()

    async def _report(self) -> None:
        while True:
            self._send(stats_message(self._balancer.ctx))
            await asyncio.sleep(STATS_EVERY)

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._writer is not None:
            self._send(stats_message(self._balancer.ctx))
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()
            self._writer.close()

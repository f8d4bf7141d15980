"""A worker's side of `workers: N`: its configuration, its owner's word, its reports.  [asyncio shell]

- `receive_config`: a new worker's first read, before its event loop starts: the owner's running
  `ConfigSource` (the worker reads none of the files it names).
- `ControlChannel`: from then on, the owner's states, discovered sets, reloads and drain shares are
  applied here, and this worker's passive-health failures and counters go back every second.
- `watch_owner`: a worker never outlives its owner (`PR_SET_PDEATHSIG`, and EOF on the channel).

The owner's side is `lb.control.workers`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import socket
import sys
import time
from typing import TYPE_CHECKING, Any, Protocol

from lb.config.load import ConfigSource
from lb.config.sections import MAX_DISCOVERED_BACKENDS
from lb.control.ipc import (
    MessageTooLarge,
    apply_states,
    config_source,
    discovered_backends,
    encode,
    read_frame,
    stats_message,
)
from lb.control.ipc_stream import MAX_PENDING_BYTES, TooLargeReports, read_messages
from lb.control.migration import log_failed, migrate
from lb.control.workers import STATS_EVERY, WORKER_READY

if TYPE_CHECKING:
    from lb.control.discovery import DiscoveryManager
    from lb.state.context import ProxyContext
    from lb.state.pool import BackendStatus

log = logging.getLogger(__name__)

CONFIG_WAIT = WORKER_READY  # seconds a new worker waits for its owner's config
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class WorkerBalancer(Protocol):
    """What a worker's `ControlChannel` uses of its balancer (`lb.control.balancer.Balancer`): where the
    owner's states, sets and reloads go, what it reports back, and the stop when the owner goes away."""

    @property
    def ctx(self) -> ProxyContext:
        """The running pools (the owner's states apply to them) and counters (reported to the owner)."""

    @property
    def discovery(self) -> DiscoveryManager:
        """The follower that applies the owner's discovered sets."""

    @property
    def listen_addresses(self) -> list[tuple[str, int]]:
        """Where this worker listens, in its reports."""

    def retired_backends(self) -> list[tuple[str, BackendStatus]]:
        """(pool, backend) removed whose tunnels still run here, in its reports."""

    def find_backend(self, pool: str, backend_id: str) -> BackendStatus | None:
        """The backend whose tunnels the owner's drain closes, in its pool or removed with tunnels."""

    async def reload(self, source: ConfigSource | None = None) -> bool:
        """Apply the owner's source; False if this worker cannot."""

    def stop(self) -> asyncio.Task[None]:
        """Begin the shutdown (the owner went away)."""


def watch_owner(owner_pid: int) -> None:
    """Ask the kernel for SIGCONT when the owner dies (Linux), and stop at once if it already has.

    The owner's death closes the control channel, and its EOF stops the worker gracefully (`_read`);
    what the worker may need first is to run at all.  A worker stopped (SIGSTOP, Ctrl-Z in a debugger)
    when its owner was SIGKILLed (the OOM killer) held a SIGTERM it could not act on, and with it the
    listening sockets, for ever: a new `lb run` on those addresses failed with 'address in use' until
    someone found the stopped orphan.  Resumed, it reads the EOF and stops as a running worker does.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGCONT, 0, 0, 0)
    # The owner may have died before prctl took effect: then we were re-parented already.  SIGTERM's
    # default action first: lb.startup_signals holds it while we start, and an orphan must not bind.
    if owner_pid > 0 and os.getppid() != owner_pid:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)


def receive_config(fd: int, timeout: float = CONFIG_WAIT) -> ConfigSource:
    """A new worker's first read: the owner's running `ConfigSource`, from the control socket `fd`.

    Blocking, before the event loop starts, and it reads that one frame and no byte more: the
    `ControlChannel` that later wraps the same descriptor reads on from the next message.  `fd`
    stays open.

    Raises:
        TimeoutError: no whole frame within `timeout` seconds.
        OSError, EOFError: the socket failed, or the owner closed it first.
        ValueError: the frame is too large, not a message, or not the config (text and files as strings).
    """
    deadline = time.monotonic() + timeout
    sock = socket.socket(fileno=fd)

    def recv(size: int) -> bytes:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no configuration from the owner within {timeout:g}s")
        sock.settimeout(left)
        try:
            return sock.recv(size)
        except TimeoutError:
            raise TimeoutError(f"no configuration from the owner within {timeout:g}s") from None

    try:
        message = read_frame(recv)
    finally:
        sock.setblocking(True)
        sock.detach()  # the descriptor is the ControlChannel's next
    if message["op"] != "config":
        raise ValueError(f"expected the owner's configuration first, got a {message['op']!r} message")
    return config_source(message)


class ControlChannel:
    """A worker's side: apply the owner's states, report failures and counters."""

    def __init__(self, balancer: WorkerBalancer, fd: int) -> None:
        self._balancer = balancer
        self._fd = fd
        self._writer: asyncio.StreamWriter | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._migrations: dict[tuple[str, str], asyncio.Task[None]] = {}
        self._too_large = TooLargeReports()
        self._seq = 0  # the owner's last `report` seq: every stats message carries it

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=socket.socket(fileno=self._fd))
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._read(reader)), loop.create_task(self._report())]

    def report_ready(self) -> None:
        self._send({"op": "ready"})
        self._send(self._stats_message())  # the listeners just bound, for /status now rather than a report later

    def report_failure(self, pool: str, backend: str, detail: str) -> None:
        """This worker's handshakes took the backend down (`detail`: the reason /status will show)."""
        self._send({"op": "failure", "pool": pool, "backend": backend, "detail": detail})

    def _send(self, message: dict[str, Any]) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        if writer.transport.get_write_buffer_size() > MAX_PENDING_BYTES:
            return  # the owner is not reading; it will get the next cumulative report
        try:
            writer.write(encode(message))
        except MessageTooLarge as exc:
            self._too_large.say(message["op"], exc)
            # The owner hears from us through these (its watchdog kills a silent worker): a stats
            # report grown past the frame limit must not make this one silent.
            writer.write(encode({"op": "alive", "seq": self._seq}))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        async for message in read_messages(reader, "the owner"):
            try:
                await self._handle(message)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                log.error("the owner sent a bad %r message, skipped: %s", message.get("op"), exc)
        # The owner is gone: a worker must not outlive it.
        log.warning("owner process went away; stopping")
        self._balancer.stop()

    async def _handle(self, message: dict[str, Any]) -> None:
        ctx = self._balancer.ctx
        op = message["op"]
        if op == "states":
            apply_states(ctx.pools, message)
            self._balancer.discovery.owner_sent_all()  # a new worker's first states follow its sets
        elif op == "discovered":
            # Kept even for a pool not discovered here yet: the owner's first lookup for a pool its reload
            # added can end before the reload is sent, and the reload here takes the set then.
            self._balancer.discovery.follow(str(message["pool"]), discovered_backends(message, MAX_DISCOVERED_BACKENDS))
        elif op == "reload":
            # The owner's source, `${file:PATH}` contents included: this worker reads none of those files.
            if not await self._balancer.reload(config_source(message)):
                self._send({"op": "reload_failed", "reload": message.get("reload")})
        elif op == "close_tunnels":
            key = (str(message["pool"]), str(message["backend"]))
            rate = float(message["rate"])
            if not rate > 0:
                raise ValueError(f"rate must be above 0, got {rate!r}")
            if ctx.deregistering:
                return  # sent just before our SIGTERM: the shutdown's 1001s are this worker's closes now
            self._stop_migration(key)
            # Also one a reload or DNS removed from the pool since the drain: its tunnels still run here.
            backend = self._balancer.find_backend(*key)
            if backend is not None:
                task = asyncio.get_running_loop().create_task(migrate(ctx, key[0], backend, 0.0, rate))
                self._migrations[key] = task
                task.add_done_callback(lambda done: self._forget(key, done))
        elif op == "stop_migration":
            self._stop_migration((str(message["pool"]), str(message["backend"])))
        elif op == "report":
            self._seq = max(self._seq, int(message["seq"]))
            self._send(self._stats_message())
        else:
            raise ValueError(f"unknown op {op!r}")

    def stop_migrations(self) -> None:
        """SIGTERM: this worker's drains stop as the owner's do, each saying what it did (`migrate`), and
        the shutdown's 1001s over `shutdown_grace` close what is left.  Without this a worker went on
        asking its tunnels for 1012s at the drain's rate through the whole shutdown."""
        for task in self._migrations.values():
            task.cancel()

    def _stop_migration(self, key: tuple[str, str]) -> None:
        task = self._migrations.pop(key, None)
        if task is not None:
            task.cancel()
            log.info("migration of %s/%s stopped by the owner", *key)

    def _forget(self, key: tuple[str, str], done: asyncio.Task[None]) -> None:
        log_failed(*key, done)
        if self._migrations.get(key) is done:
            del self._migrations[key]

    async def _report(self) -> None:
        while True:
            self._send(self._stats_message())
            await asyncio.sleep(STATS_EVERY)

    def _stats_message(self) -> dict[str, Any]:
        balancer = self._balancer
        return {**stats_message(balancer.ctx, balancer.retired_backends(), balancer.listen_addresses), "seq": self._seq}

    async def stop(self) -> None:
        for task in [*self._tasks, *self._migrations.values()]:
            task.cancel()
        if self._writer is not None:
            self._send(self._stats_message())
            with contextlib.suppress(ConnectionError):
                await self._writer.drain()
            self._writer.close()

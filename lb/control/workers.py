"""`workers: N`: an owner process and N worker processes sharing the listeners; the owner's side.  [asyncio shell]

The owner runs health checks, the admin API and drain migrations, and holds
the backend states; it starts N workers (`python -m lb worker ...`), each of
which binds every listener with SO_REUSEPORT so the kernel spreads clients
over them, and relays.  They talk over a socketpair in `lb.control.ipc` messages:
the owner pushes backend states (once per turn of its event loop that changed any,
and every second), reloads and migration shares; workers report passive health
failures and counters.
A worker that dies is restarted; its clients reconnect with their tokens, and
every worker opens every token, so they reach the same backends.

Only the owner reads the config file and the `${file:PATH}` and TLS files it names.  A
worker's first message is the owner's running `ConfigSource` (the text and the
content of every `${file:PATH}` and certificate and key it used; `worker_channel.receive_config` reads it before the
event loop starts), and a reload message carries the source the owner has just
applied: a worker started at boot, restarted after a crash or told to reload
runs what the owner runs, whatever the files hold by then.  A worker that still
fails a reload the owner applied (a port it alone cannot bind) is an instance not
running one configuration: the owner logs it naming the worker and counts it in
`lb_config_reloads_total{result="failure"}`.

A worker never outlives its owner: it stops when the control socket reaches
EOF, and the kernel sends it SIGCONT if the owner dies however it dies, so that
one stopped then runs to read that EOF (`PR_SET_PDEATHSIG`, set by
`worker_channel.watch_owner`).  Every migration the owner starts
reaches every worker, and so does its end: any later operator action on that
backend (enable, another drain, disable) stops the workers' closes too.

A worker's side is `lb.control.worker_channel`; the stream between them `lb.control.ipc_stream`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import site
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import lb
from lb.config.load import ConfigSource
from lb.config.model import BackendConfig
from lb.control.ipc import (
    StatsAggregate,
    config_message,
    discovered_message,
    states_message,
)
from lb.control.ipc_stream import MAX_PENDING_BYTES, TooLargeReports, encode_or_report, read_messages
from lb.control.migration import start_migrating
from lb.log_stream import restore_after_spawn, stderr_for_child

if TYPE_CHECKING:
    from lb.config.model import Config
    from lb.control.discovery import DiscoveryManager
    from lb.control.metrics import ReloadResults
    from lb.state.context import ProxyContext
    from lb.state.pool import BackendStatus
    from lb.state.series import SeriesRetention

log = logging.getLogger(__name__)


class OwnerBalancer(Protocol):
    """What the owner's `WorkerSupervisor` uses of its balancer (`lb.control.balancer.Balancer`): the states
    and discovered sets it pushes, and where the workers' reports and failures go."""

    @property
    def ctx(self) -> ProxyContext:
        """The running pools (their states go to the workers; the workers' counts are summed into them)."""

    @property
    def config(self) -> Config:
        """The running config: which pools are discovered."""

    @property
    def discovery(self) -> DiscoveryManager:
        """Each discovered pool's known set, sent to a new worker."""

    @property
    def reloads(self) -> ReloadResults:
        """Where a worker's failed reload is counted."""

    @property
    def series(self) -> SeriesRetention:
        """Whose per-backend series the owner keeps, which filters the workers' reports."""

    def retired_counted(self) -> list[tuple[str, BackendStatus]]:
        """(pool, backend) removed whose connections are still counted."""

    def take_down(self, pool: str, backend_id: str, reason: str) -> None:
        """A worker's handshakes took the backend down."""


WORKER_READY = 15.0  # seconds a new worker may take to bind its listeners (the owner's discovered sets,
# sent right after its config, included: lb.control.discovery.FIRST_LOOKUPS_WAIT, 5 s at most); a first
# one that takes longer fails the start, a restarted one is killed and started again
RESTART_DELAY = 0.5  # seconds before a dead worker is replaced (no tight crash loop)
MAX_RESTART_DELAY = 10.0  # a worker that keeps dying young waits twice as long each time, up to this
STABLE_AFTER = 5.0  # a worker that listened and lived this long resets the delay
STATES_EVERY = 1.0  # seconds between full state pushes (covers anything a worker missed)
STATS_EVERY = 1.0
# A ready worker from which the owner has read nothing for this long (ten of its stats reports) is
# stopped (SIGSTOP) or stuck (its event loop blocked): it takes its share of new clients and answers
# none.  Killed, so that it is restarted; one a check, never all at once.
UNRESPONSIVE_AFTER = 10.0
# A ready worker from which the owner has read nothing for this long no longer counts as serving
# (/readyz and /healthz answer 503 once none does).  Every worker reports its counters each
# STATS_EVERY, so three missed reports: one or two late ones are a busy event loop, not a stopped
# one, and must not make a healthy instance flap out of its load balancer; three seconds is still
# well inside UNRESPONSIVE_AFTER, so that whoever routes to us stops sending clients that would hang
# for the seven seconds before the watchdog kills and restarts the worker.
SERVING_SILENCE = 3 * STATS_EVERY
# The owner's own look for silent workers (every STATES_EVERY) came this late: its event loop was
# stopped or blocked, and the silence it measured is its own (`_kill_unresponsive`).
OWNER_LATE = 3 * STATES_EVERY
# The owner re-sums its workers' reports at most this often.  Summing on every report cost N sums of
# N reports per second (64 workers of 1000 backends: over 3 s of owner CPU each second).
SUM_STATS_EVERY = 0.25
# How long /metrics and /status wait for the workers' answers to `report` (`WorkerSupervisor.fresh_counts`):
# a worker answers in a turn of its loop; one stopped or stuck is read from its last report after this.
REPORT_WAIT = 1.0
# Seconds between two looks at whether every worker has applied an operator's state change.
STATES_LOOK = 0.002
# Rounds of `report` start at most this often, however often /status is asked (it needs no token): each
# round costs every worker a report built on its data-plane loop, and the owner a sum of them all.  A
# request that comes sooner waits for the next round rather than take an older one's counts.
REPORT_ROUND_GAP = SUM_STATS_EVERY


def _worker_env() -> dict[str, str]:
    """The owner's environment; `lb` run from a source tree goes on PYTHONPATH so the worker finds it too.

    Installed (site-packages), `lb` is on the worker's path already, and PYTHONPATH is left alone: an
    entry there would come before the standard library.
    """
    env = dict(os.environ)
    if _LB_ROOT not in _SITE_DIRS:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_LB_ROOT, env.get("PYTHONPATH")]))
    return env


_LB_ROOT = str(Path(lb.__file__).resolve().parent.parent)
_SITE_DIRS = {str(Path(path).resolve()) for path in [*site.getsitepackages(), site.getusersitepackages()]}


# What the owner sends that a worker must not miss (lb.control.ipc's protocol); the rest is resent: the
# states each second, the discovered sets (each a whole set) before the first states it takes again.
_MUST_ARRIVE = frozenset({"config", "reload", "close_tunnels", "stop_migration"})


@dataclass(slots=True)
class _Worker:
    index: int
    process: asyncio.subprocess.Process
    writer: asyncio.StreamWriter
    ready: asyncio.Future[None]
    tasks: tuple[asyncio.Task[None], ...] = ()
    started_at: float = 0.0
    restart_delay: float = RESTART_DELAY
    heard_at: float = 0.0  # event loop time of its last message
    ready_by: float = 0.0  # event loop time by which it must be ready, or be killed (`_kill_unresponsive`)
    killed: bool = False  # by the owner (`_write`, `_kill_unresponsive`): once, and it serves no more
    sets_dropped: bool = False  # a `discovered` set was not sent (`_write`): every set goes before its next states
    listeners: tuple[tuple[str, int], ...] = ()  # where it listens, as its last report said
    answered: int = 0  # the highest `report` seq its stats have answered
    # Removed backends (lb.state.retired): the `report` seq when it started (it runs the owner's pools of
    # then, and has no tunnel to a backend removed before), the highest its stats reports carried, and
    # that of those in the owner's last sum.
    since: int = 0
    reported: int = 0
    summed: int = 0

    @property
    def name(self) -> str:
        return f"worker {self.index} (pid {self.process.pid})"

    def serving(self, now: float, *, judge_silence: bool = True) -> bool:
        """Accepting and answering clients, as far as the owner can tell (`worker_serves`)."""
        silent = now - self.heard_at if judge_silence else 0.0
        exited = self.killed or self.process.returncode is not None
        return worker_serves(ready=self.ready.done(), exited=exited, silent=silent)


def restart_delay(*, lived: float, served: bool, own: float) -> float:
    """Seconds before a dead worker is replaced: RESTART_DELAY after one that listened and lived
    STABLE_AFTER, else its `own` delay (twice its predecessor's, up to MAX_RESTART_DELAY: no tight crash
    loop).

    Listened, not only lived: one killed for never listening (`_kill_unresponsive`) lived 15 s, and a
    start that keeps sticking would be retried every 16 s for ever, an ERROR and a WARNING each time.
    """
    return RESTART_DELAY if served and lived >= STABLE_AFTER else own


def worker_serves(*, ready: bool, exited: bool, silent: float) -> bool:
    """Whether a worker serves: it has bound its listeners, has not exited, and was heard from within
    SERVING_SILENCE (a stopped worker, or one whose event loop is stuck, holds its listeners and answers
    nobody).

    Args:
        ready: it has reported its listeners bound.
        exited: its process has ended, or the owner has killed it (it is being restarted).
        silent: seconds since the owner last read a message from it.
    """
    return ready and not exited and silent <= SERVING_SILENCE


class WorkerSupervisor:
    """The owner's side: start, feed, watch and restart the workers."""

    def __init__(self, balancer: OwnerBalancer, count: int, config_path: Path, config_source: ConfigSource) -> None:
        self._balancer = balancer
        self.count = count
        self.restarts = 0  # workers replaced after they died (lb_worker_restarts_total)
        self._config_path = config_path  # workers resolve relative paths in the text against its directory
        # What the owner runs, and every worker with it: a restarted worker gets this, never the files.
        self._config_source = config_source
        self._reloads_sent = 0  # the number of the last `reload` message: a worker's failure names its own
        self._workers: dict[int, _Worker] = {}
        # fresh_counts: the round under way (shared by the requests that come meanwhile), the `report`
        # seq it asked with, the workers asked, and a future done once all of them have answered.
        self._round: asyncio.Future[None] | None = None
        self._round_started = -math.inf
        self._report_seq = 0
        self._asked: list[_Worker] = []
        self._reported: asyncio.Future[None] | None = None
        # The owner's retention (lb.state.series).
        self._stats = StatsAggregate(balancer.series.holds, balancer.series.holds_pool)
        self._stopping = False
        self._hurried = False  # a second Ctrl-C at the owner (hurry)
        self._pusher: asyncio.Task[None] | None = None
        self._sum_stats: asyncio.TimerHandle | None = None  # a re-sum is due
        self._push_states_soon: asyncio.Handle | None = None  # a states push is due (`states_changed`)
        self._checked_at = 0.0  # event loop time of the last look for silent workers (from start())
        self._too_large = TooLargeReports()
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
        self._checked_at = asyncio.get_running_loop().time()
        self._pusher = asyncio.get_running_loop().create_task(self._push_states())

    async def _spawn(self, index: int, restart_delay: float = RESTART_DELAY) -> None:
        ours, theirs = socket.socketpair()
        stderr = stderr_for_child()  # the worker's own description of our stderr (libuv blocks its stdio)
        try:
            process = await asyncio.create_subprocess_exec(
                # -P: not the working directory first on sys.path, where a stray dns.py or yaml.py
                # would be imported in place of ours; the owner's own `lb` stays found (_worker_env).
                sys.executable, "-P", "-m", "lb", "worker",
                "--config", str(self._config_path),
                "--control-fd", str(theirs.fileno()),
                "--index", str(index),
                "--count", str(self.count),
                "--owner-pid", str(os.getpid()),
                pass_fds=(theirs.fileno(),),
                env=_worker_env(),
                # Terminal signals reach the owner only; it stops the workers in order.
                start_new_session=True,
                stderr=stderr,
            )
        finally:
            theirs.close()
            if stderr is not None:
                os.close(stderr)
            restore_after_spawn()
        reader, writer = await asyncio.open_connection(sock=ours)
        if self._stopping:
            # The stop began while this worker (a restart's) was being started: it has signalled and is
            # waiting for the workers it knew, not this one, which would start, listen and outlive its owner.
            writer.close()  # its channel's EOF stops it too, if it already holds SIGTERM
            with contextlib.suppress(ProcessLookupError):  # it has ended already
                process.send_signal(signal.SIGTERM)
            await process.wait()
            return
        loop = asyncio.get_running_loop()
        worker = _Worker(index, process, writer, loop.create_future(), started_at=loop.time(),
                         restart_delay=restart_delay, heard_at=loop.time(), ready_by=loop.time() + WORKER_READY,
                         since=self._report_seq)
        self._workers[index] = worker
        worker.tasks = (loop.create_task(self._read(worker, reader)), loop.create_task(self._watch(worker)))
        # First, before any other message: the config the worker runs (`receive_config`), the owner's
        # running source with the `${file:PATH}` contents it used, never re-read: a Secret rotated since
        # the last SIGHUP must not give a restarted worker other keys than its siblings.
        self._send(worker, config_message("config", self._config_source))
        # Then every set DNS gave (only the owner resolves), before the states that name their backends:
        # the worker listens once the first states have come (ControlChannel), so its first client finds them.
        self._send_sets(worker)
        self._send(worker, states_message(self._balancer.ctx.pools))
        log.info("worker %d started (pid %d)", index, process.pid)

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        pid = worker.process.pid
        async for message in read_messages(reader, worker.name):
            try:
                self._handle(worker, pid, message)
            except (AttributeError, KeyError, TypeError, ValueError) as exc:
                log.error("%s sent a bad %r message, skipped: %s", worker.name, message.get("op"), exc)

    def _handle(self, worker: _Worker, pid: int, message: dict[str, Any]) -> None:
        worker.heard_at = asyncio.get_running_loop().time()
        op = message["op"]
        if op == "ready":
            if not worker.ready.done():
                worker.ready.set_result(None)
        elif op == "stats":
            self._stats.update(pid, message)
            worker.reported = max(worker.reported, int(message.get("seq", 0)))
            worker.listeners = tuple((str(host), int(port)) for host, port in message.get("listeners", ()))
            self._answered(worker, message)
            if self._sum_stats is None:
                self._sum_stats = asyncio.get_running_loop().call_later(SUM_STATS_EVERY, self._apply_stats)
        elif op == "alive":
            self._answered(worker, message)  # its report could not be sent (too large): all it has to say
        elif op == "reload_failed":
            # The owner's reload succeeded, so this is local to the worker (a port it alone cannot bind, a
            # TLS file it alone reads).  The instance now runs two configurations until the next reload:
            # counted as a failed reload, so that LbConfigReloadFailed fires, not as the owner's success.
            # Of the latest reload only does it make the last one failed: a late report of an earlier one
            # (the owner has applied another since) left lb_config_last_reload_successful at 0 for good.
            self._balancer.reloads.failed(latest=message.get("reload") == self._reloads_sent)
            log.error("%s could not apply the reload and keeps its previous configuration", worker.name)
        elif op == "failure":
            self._balancer.take_down(str(message["pool"]), str(message["backend"]), str(message["detail"]))
        else:
            raise ValueError(f"unknown op {op!r}")

    def _apply_stats(self) -> None:
        if self._sum_stats is not None:
            self._sum_stats.cancel()
        self._sum_stats = None
        # Which removed backends to count is decided on the previous sum's counts and the reports it held
        # (`settled_reports`), before this sum moves either: deciding on this sum's reports with the
        # previous counts would forget a backend whose tunnels only this sum tells.
        retired = self._balancer.retired_counted()
        self.live_tunnels = self._stats.apply_to(self._balancer.ctx, retired)
        for worker in self._workers.values():
            worker.summed = worker.reported

    def fence(self) -> int:
        """Ask every worker for a report now; returns its seq.  A report carrying it was made after every
        message sent to that worker before this one (a worker handles them in order): after a reload, with
        its tunnels to the backends it removed counted under them (lb.state.retired)."""
        self._report_seq += 1
        for worker in self._workers.values():
            self._send(worker, {"op": "report", "seq": self._report_seq})
        return self._report_seq

    def settled_reports(self) -> float:
        """The `report` seq up to which every worker's counts are in the last sum (`math.inf` with none
        running): a fence at or below it has settled.  A worker started since a fence has settled it (it
        never ran the pools of before); one that has exited holds no tunnel."""
        running = [max(w.summed, w.since) for w in self._workers.values() if w.process.returncode is None]
        return min(running, default=math.inf)

    async def fresh_counts(self) -> None:
        """Have every serving worker report its counters now, and sum them, before /metrics or /status
        reads them: a handshake a client has just made is counted there, not up to two seconds later
        (a report a second, summed a quarter second after).  Waits at most REPORT_WAIT for the answers
        (one stopped or stuck is read from its last report); requests that come meanwhile share the
        round, and a round starts REPORT_ROUND_GAP after the last one at the soonest."""
        if self._round is None:
            self._round = asyncio.ensure_future(self._ask_reports())
        await asyncio.shield(self._round)

    async def _ask_reports(self) -> None:
        try:
            loop = asyncio.get_running_loop()
            soonest = self._round_started + REPORT_ROUND_GAP
            if loop.time() < soonest:
                await asyncio.sleep(soonest - loop.time())
            self._round_started = now = loop.time()
            self._report_seq += 1
            self._asked = [w for w in self._workers.values() if w.serving(now)]
            self._reported = loop.create_future()
            for worker in self._asked:
                self._send(worker, {"op": "report", "seq": self._report_seq})
            self._check_answers()
            await asyncio.wait([self._reported], timeout=REPORT_WAIT)
            self._apply_stats()
        finally:
            self._round = self._reported = None
            self._asked = []

    def _answered(self, worker: _Worker, message: dict[str, Any]) -> None:
        worker.answered = max(worker.answered, int(message.get("seq", 0)))
        self._check_answers()

    def _check_answers(self) -> None:
        """Ends the round's wait once every worker asked has answered it, or exited (`_watch`)."""
        reported = self._reported
        if reported is not None and not reported.done() and _all_answered(self._asked, self._report_seq):
            reported.set_result(None)

    async def _watch(self, worker: _Worker) -> None:
        code = await worker.process.wait()
        pid = worker.process.pid
        self._check_answers()  # a round of `report` waits for it no more
        self._stats.retire(pid)
        self._apply_stats()  # at once: its tunnels are gone now
        # Its last report may still be in the socket: read to EOF, then fold its counters away.
        with contextlib.suppress(Exception):  # a reader that failed must not stop the restart
            await asyncio.wait_for(asyncio.shield(worker.tasks[0]), 1.0)
        self._stats.compact(pid)
        if self._stopping:
            if code != 0 and not worker.killed:
                # Not the owner's kill of a straggler (said where it is done): the operator hears that
                # this worker's tunnels ended without their 1001s.  One restarted just before the stop
                # that had not listened yet had none: the stop's SIGTERM came while its interpreter
                # started (some 30 ms, before lb.startup_signals holds it), and that ends it, harmlessly.
                if worker.ready.done():
                    log.warning("%s exited with %s while stopping; its tunnels were cut", worker.name, code)
                else:
                    log.info("%s exited with %s while stopping, before it listened: it had no client",
                             worker.name, code)
            return
        lived = asyncio.get_running_loop().time() - worker.started_at
        delay = restart_delay(lived=lived, served=worker.ready.done(), own=worker.restart_delay)
        log.warning("%s exited with %s after %.1fs; restarting it in %gs", worker.name, code, lived, delay)
        self.restarts += 1  # lb_worker_restarts_total
        await asyncio.sleep(delay)
        if not self._stopping:
            await self._spawn(worker.index, min(2 * delay, MAX_RESTART_DELAY))

    def forget_series(self) -> None:
        """The owner's series retention changed: drop what it no longer keeps from the workers' sum."""
        self._stats.forget()

    def serving_workers(self, now: float) -> int:
        """How many workers serve at event loop time `now` (/readyz, /healthz and /status).

        As in `_kill_unresponsive`: if the owner's own look for silent workers is overdue, its event
        loop was stopped or blocked and its workers' messages are still unread, so their silence says
        nothing of them; then a worker serves if it is ready and running.
        """
        judge_silence = now - self._checked_at <= OWNER_LATE
        return sum(1 for w in self._workers.values() if w.serving(now, judge_silence=judge_silence))

    def listen_addresses(self) -> list[tuple[str, int]]:
        """Where the running workers listen (each address once), as they last reported: the owner binds none."""
        running = (w for w in self._workers.values() if not w.killed and w.process.returncode is None)
        return list(dict.fromkeys(address for worker in running for address in worker.listeners))

    def pids(self) -> list[int]:
        """Live worker processes (for process_* metrics)."""
        return [w.process.pid for w in self._workers.values() if w.process.returncode is None]

    async def _push_states(self) -> None:
        while True:
            await asyncio.sleep(STATES_EVERY)
            self.broadcast(states_message(self._balancer.ctx.pools))
            self._kill_unresponsive()

    def _kill_unresponsive(self) -> None:
        """Kill a ready worker silent for UNRESPONSIVE_AFTER, or a restarted one not ready WORKER_READY
        after it started (one a check); its watcher restarts it.

        If this look comes late, the owner itself was stopped or blocked (Ctrl-Z, a frozen cgroup, a
        paused VM): its workers' messages are still unread, and their silence is the owner's.  The
        clocks restart instead.
        """
        now = asyncio.get_running_loop().time()
        late = now - self._checked_at > OWNER_LATE
        self._checked_at = now
        if late or self._stopping:
            for worker in self._workers.values():
                worker.heard_at = now
                worker.ready_by = max(worker.ready_by, now + WORKER_READY)
            return
        for worker in self._workers.values():
            if worker.killed or worker.process.returncode is not None:
                continue  # its watcher has it
            if worker.ready.done():
                silent = now - worker.heard_at
                if silent <= UNRESPONSIVE_AFTER:
                    continue
                log.error("%s has sent nothing for %.0fs (stopped, or its event loop is stuck); killing it",
                          worker.name, silent)
            elif now > worker.ready_by:
                # The first workers' bound is start()'s; a restart's was none, and one stopped or stuck
                # before it listened held its share of the instance's workers for good.
                log.error("%s has not started listening in %gs (stopped, or stuck starting); killing it",
                          worker.name, WORKER_READY)
            else:
                continue
            worker.process.kill()
            worker.killed = True
            return

    def _send(self, worker: _Worker, message: dict[str, Any]) -> None:
        frame = encode_or_report(message, self._too_large)
        if frame is not None:
            self._write(worker, message["op"], frame)

    def _send_sets(self, worker: _Worker) -> None:
        """Every pool's discovered set, as the owner holds it now."""
        discovery = self._balancer.discovery
        for name, pool in self._balancer.config.pools.items():
            if pool.discovery is not None:
                self._send(worker, discovered_message(name, discovery.known(name)))

    def _write(self, worker: _Worker, op: str, frame: bytes) -> None:
        if worker.writer.is_closing():
            return
        if op == "states" and worker.sets_dropped:
            worker.sets_dropped = False
            self._send_sets(worker)  # each a whole set, the newest: what was dropped is sent again first
        if worker.writer.transport.get_write_buffer_size() > MAX_PENDING_BYTES:
            worker.sets_dropped |= op == "discovered"
            # A `states` push is sent again whole every second: dropping one loses nothing.  Dropping
            # the others is not enough: a lost reload would leave it on another configuration than
            # /status shows, for good.  Restarted, it gets the owner's running text first.  Not while
            # stopping: its clients get their 1001s from it, and the stop ends it anyway.
            if op in _MUST_ARRIVE and not self._stopping and not worker.killed and worker.process.returncode is None:
                log.error("%s is not reading its control socket (a %r message would be dropped); killing it",
                          worker.name, op)
                worker.killed = True
                worker.process.kill()
            return
        worker.writer.write(frame)

    def broadcast(self, message: dict[str, Any]) -> None:
        if message["op"] != "states":
            # A states push that is due goes first: the workers see the changes in the order they were made
            # (a migration's `close_tunnels` after the state that started it).
            self._flush_states()
        elif self._push_states_soon is not None:
            # This table is the newest: the push due this turn would encode and send the same one again.
            self._push_states_soon.cancel()
            self._push_states_soon = None
        frame = encode_or_report(message, self._too_large)  # once for every worker: a reload carries the whole config
        if frame is not None:
            for worker in self._workers.values():
                self._write(worker, message["op"], frame)

    def reloaded(self, source: ConfigSource) -> None:
        """The owner now runs the config from `source`: running workers apply it, and new ones start with it."""
        self._config_source = source
        self._reloads_sent += 1
        self.broadcast({**config_message("reload", source), "reload": self._reloads_sent})

    def discovered(self, pool: str, backends: tuple[BackendConfig, ...]) -> None:
        """DNS gave `pool` a new set: every worker applies it (workers do not resolve)."""
        self.broadcast(discovered_message(pool, backends))

    def states_changed(self) -> None:
        """Push every backend's state to the workers once this turn of the event loop is over.

        A states message carries the whole table, so changes made in one turn (a reload, a DNS answer, a
        burst of health verdicts: 3,000 backends going down together) go out as one message.  Pushed at
        each change, they cost the owner a table per change: 3,000 verdicts encoded 3,000 tables of 3,000
        backends, and its event loop (admin, health checks) stood still for tens of seconds.
        """
        if self._push_states_soon is None:
            self._push_states_soon = asyncio.get_running_loop().call_soon(self._flush_states)

    async def states_applied(self, within: float = REPORT_WAIT) -> bool:
        """Push the backends' states now and wait, at most `within`, until every running worker has
        applied them (it answers a `report` sent after them: it handles messages in order).  An operator's
        `disable` answered before that let a worker route a handshake to the backend after the 200.
        False if one has not answered in time (stopped, or its event loop stuck): it applies them when
        it runs again, after the connections that queued for it meanwhile (or it was busy applying a
        reload, and applies them right after)."""
        self._push_states_now()
        seq = self.fence()
        asked = list(self._workers.values())  # one (re)started meanwhile begins with the states as they are
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not _all_answered(asked, seq):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(STATES_LOOK)
        return True

    def _flush_states(self) -> None:
        if self._push_states_soon is not None:
            self._push_states_now()

    def _push_states_now(self) -> None:
        if self._push_states_soon is not None:
            self._push_states_soon.cancel()
            self._push_states_soon = None
        self.broadcast(states_message(self._balancer.ctx.pools))

    async def migrate(self, pool: str, backend: BackendStatus, close_after: float, rate: float) -> None:
        """The owner's half of a drain migration: each worker closes its share at rate / N.

        `backend` is the object drained, which a reload or DNS answer may have removed from its pool
        meanwhile: its tunnels still run in the workers, and are closed as asked (they look it up among
        their removed backends too).
        """
        await asyncio.sleep(close_after)
        start_migrating(pool, backend, rate)
        self.states_changed()
        share = rate / max(1, len(self._workers))
        self.broadcast({"op": "close_tunnels", "pool": pool, "backend": backend.id, "rate": share})

    def stop_migration(self, pool: str, backend_id: str) -> None:
        """An operator acted on the backend again: every worker stops closing its tunnels."""
        self.broadcast({"op": "stop_migration", "pool": pool, "backend": backend_id})

    def hurry(self) -> None:
        """A second Ctrl-C at the owner: every worker stops now too (`Balancer.hurry`); one not yet told to
        stop is told when `stop` comes."""
        self._hurried = True
        if self._stopping:
            self._signal_workers(signal.SIGINT)

    def _signal_workers(self, signum: int) -> None:
        for worker in self._workers.values():
            if worker.process.returncode is None:
                worker.process.send_signal(signum)

    async def stop(self, within: float) -> None:
        """SIGTERM every worker (each closes its tunnels gracefully), wait, then kill stragglers."""
        self._stopping = True
        if self._pusher is not None:
            self._pusher.cancel()
        self._flush_states()  # a change made just before the stop still reaches the workers
        # A stopped worker (SIGSTOP, Ctrl-Z in a debugger) would hold its SIGTERM, and its listening socket
        # the kernel still queues new clients to, until the kill at the end of `within`; resumed, it stops
        # as the others do and its tunnels are closed gracefully.
        self._signal_workers(signal.SIGCONT)
        self._signal_workers(signal.SIGTERM)
        if self._hurried:
            self._signal_workers(signal.SIGINT)
        waits = [worker.process.wait() for worker in self._workers.values()]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), within)
        except TimeoutError:
            for worker in self._workers.values():
                if worker.process.returncode is None:
                    log.warning("worker %d did not stop in time; killing it", worker.index)
                    worker.killed = True
                    worker.process.kill()
            await asyncio.gather(*(worker.process.wait() for worker in self._workers.values()))
        for worker in self._workers.values():
            worker.writer.close()
            for task in worker.tasks:
                task.cancel()


def _all_answered(asked: list[_Worker], seq: int) -> bool:
    """Whether every worker of `asked` has answered the `report` of `seq`, or has exited or been killed
    (it will answer nothing, and one restarted begins with what it was asked to have)."""
    return all(w.answered >= seq or w.killed or w.process.returncode is not None for w in asked)

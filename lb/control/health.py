"""Active health checks: one probe loop per backend, results recorded in the pool.

HTTP checks GET `health_check.path` and want a 2xx or 3xx within
`health_check.timeout` (`expect: success`, what a written `health_check`
wants), or any complete HTTP answer (`expect: any`: the implied check of a pool
that writes none, as HAProxy, Envoy and Traefik check nothing they were not
asked to: a gateway without `/health` that answers it 404 is alive, not down);
TCP checks want the connection accepted.  Either way a refused or reset
connect, silence past the timeout and an answer that is not HTTP fail.  Each
probe opens a fresh connection, so a dead backend cannot hide behind a pooled
one.

The answer's head is read with the data path's own parser (`lb.http.head`), not
an HTTP client's: a backend whose answers the proxy refuses (a bare LF, a folded
header, ambiguous framing) fails its checks too, instead of passing them while
every handshake it gets is a 502, and flapping between the two verdicts.  Only
the head is read, up to the same 64 KiB; the body never is.

A backend can also ask for a state (HAProxy's agent-check, done simply): an
HTTP health answer with `X-Backend-State: draining` passes whatever its status
and puts it in `draining` for as long as its answers say so; `up` or no header
gives it back.  Every balancer instance reads the same answer, so a gateway
drains itself across all replicas with no shared state and no fan-out of admin
calls.  An operator's `disable` still wins (`lb.state.pool` combines the two).

The probed set follows the pool: `retarget` (after DNS discovery merged a new
set, or a reload) starts loops for new backends and stops those of removed
ones, leaving the others' loops and counters alone; a kept backend whose
address changed gets a new loop, probed at once, as a new one is.  "At once"
is paced for thousands (`FirstProbes`): a start, a reload or a DNS answer that
brings 3,000 backends makes their first probes in slices, not in one turn of
the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from lb.access_log import shortened
from lb.config.model import HealthCheckExpect, HealthCheckType
from lb.errors import LOCAL_ERRNOS, BadGateway, HeadersTooLarge, RequestRejected
from lb.http.head import ResponseHead, take_answer_head
from lb.http.header_values import header_text
from lb.log import Throttle
from lb.proxy.connection import MAX_INTERIM, MAX_RESPONSE_HEAD
from lb.state.observations import Observations
from lb.state.pool import BackendStatus, PoolState, StateChange

log = logging.getLogger(__name__)

STATE_HEADER = "X-Backend-State"
# What a backend may ask for; HAProxy's agent-check says "drain", so that spelling is understood too.
_DRAIN_VALUES = frozenset(("draining", "drain"))
_UP_VALUES = frozenset(("up", "ready", ""))


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One check: passed or not, what was seen, and the state the backend asked for (None: not asked)."""

    ok: bool
    detail: str
    requested: str | None = None  # "draining" or "up"; None when no HTTP answer came (or TCP checks)
    local: bool = False  # not a check at all: the balancer itself ran out of descriptors or memory


def requested_state(header: str | None) -> str | None:
    """Map an `X-Backend-State` field value to "draining" or "up"; an unknown value counts as "up".

    The value may be a list (`up, draining`), which is what repeated lines of the field are (RFC 9110
    §5.3): any `draining` in it wins, whatever the order.  A gateway that asks to drain is not sent new
    players because something in front of it added a line of its own; read by its first line alone, the
    same two lines drained the backend in one order and not in the other.

    Returns:
        "draining", or "up" (also for a missing header: no header returns the backend to normal).
    """
    if any(value.lower() in _DRAIN_VALUES for value in _state_values(header)):
        return "draining"
    return "up"


def _state_values(header: str | None) -> list[str]:
    """The list's elements as sent, less the SP and HTAB around them (RFC 9110 OWS): not `str.strip()`,
    which takes NBSP and NEL too, bytes 0xA0 and 0x85 that end UTF-8 characters (`à` is C3 A0)."""
    return [value.strip(" \t") for value in (header or "").split(",")]


class FirstProbes:
    """Lets new probe loops make their first probe `at_once` at a time, `gap` seconds apart, in order.

    A loop's first probe used to start at once, so a pool of 3,000 backends (at start, or added by a
    reload or a DNS answer) made 3,000 connects in one turn of the event loop, and took their 3,000
    verdicts in another: 300-400 ms in which no handshake and no admin request was answered.  Let
    through in slices, a turn holds at most `at_once` of them; the last of 3,000 is probed some 0.6 s
    after the first, and the loops keep that spread over their interval.  The next slice goes `gap`
    after the last one went, as the event loop runs: a loop that fell behind lets one slice through,
    not the several that fell due meanwhile (slices given out by the clock ahead of time piled up so,
    each turn as long as the one before).  One for the balancer: every pool's checker shares it.
    """

    __slots__ = ("_opener", "_waiting", "at_once", "gap")

    def __init__(self, at_once: int = 50, gap: float = 0.01) -> None:
        self.at_once = at_once
        self.gap = gap
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._opener: asyncio.Task[None] | None = None

    async def turn(self) -> None:
        """Return when the calling probe loop may make its first probe."""
        loop = asyncio.get_running_loop()
        if self._opener is None or self._opener.done():  # nothing is being let through now: start it
            self._opener = loop.create_task(self._open(), name="health: first probes")
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiting.append(waiter)
        await waiter

    async def _open(self) -> None:
        while True:
            let_through = 0
            while self._waiting and let_through < self.at_once:
                waiter = self._waiting.popleft()
                if not waiter.done():  # done: its probe loop was cancelled while it waited
                    waiter.set_result(None)
                    let_through += 1
            if not self._waiting:
                return
            await asyncio.sleep(self.gap)


class LoopLag:
    """How late the event loop has run its timers, as a clock that moves only while the loop lags.

    A timer every `period` notes how late it ran, and `lagged()` is the sum, with what the tick now due
    is late by: a stall shows from the first callback after it, whichever of them runs first.  It runs
    while a check holds it (`hold`/`release`), so a balancer with nothing in flight keeps no timer.
    One for the balancer: every pool's checker shares it.
    """

    __slots__ = ("_due", "_handle", "_lagged", "_users", "period")

    def __init__(self, period: float = 0.05) -> None:
        self.period = period
        self._lagged = 0.0
        self._due = 0.0
        self._users = 0
        self._handle: asyncio.TimerHandle | None = None

    def lagged(self) -> float:
        """Seconds the loop has run late since this clock began (only the times it was held count)."""
        if self._handle is None:
            return self._lagged
        return self._lagged + max(0.0, asyncio.get_running_loop().time() - self._due)

    def hold(self) -> None:
        """A check is in flight: the clock runs (its timer starts if nobody held it)."""
        self._users += 1
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._due = loop.time() + self.period
            self._handle = loop.call_at(self._due, self._tick)

    def release(self) -> None:
        """That check has ended (once per `hold`)."""
        self._users -= 1  # the next tick stops the clock if nobody holds it then

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._lagged += max(0.0, now - self._due)
        if self._users <= 0:
            self._handle = None
            return
        self._due = now + self.period
        self._handle = loop.call_at(self._due, self._tick)


@contextlib.asynccontextmanager
async def _within(seconds: float, lag: LoopLag) -> AsyncIterator[None]:
    """Raise TimeoutError in the block once it has had `seconds` of the event loop's time.

    A check's timeout is the backend's time to answer, not the balancer's: stopped (a paused VM or
    container, a CPU-starved or SIGSTOPped process) or held by a long turn of its own loop (thousands
    of checks due at once after such a stall), the balancer reads an answer that came in time only
    past the deadline by the clock; as `asyncio.timeout` it failed the check, and with `fall: 1` took
    down every backend it was checking then.  HAProxy and Envoy judge a check by the time it actually
    ran.  The time the loop ran late meanwhile (`LoopLag`) is not counted: the deadline moves by it.
    A backend that is really silent still fails: the check ends once it has had `seconds` of the
    loop's time, which on a loop lagging for good comes later by the clock, never not at all.
    """
    loop = asyncio.get_running_loop()
    lag.hold()
    start, lagged = loop.time(), lag.lagged()
    judge: asyncio.TimerHandle | None = None
    try:
        async with asyncio.timeout(None) as limit:

            def due() -> None:
                nonlocal judge
                had = loop.time() - start - (lag.lagged() - lagged)
                if had >= seconds - 0.001:  # uvloop's clock is in milliseconds: no 1 ms wait more
                    judge = None
                    limit.reschedule(loop.time())
                else:
                    judge = loop.call_at(loop.time() + seconds - had, due)

            judge = loop.call_at(start + seconds, due)
            yield
    finally:
        if judge is not None:
            judge.cancel()
        lag.release()


class HealthChecker:
    """Probes every backend of one pool on its interval until stopped."""

    def __init__(
        self, pool: PoolState, on_change: Callable[[StateChange], None], observations: Observations | None = None,
        first_probes: FirstProbes | None = None, lag: LoopLag | None = None,
    ) -> None:
        self._pool = pool
        self._first_probes = first_probes or FirstProbes()  # shared with the other pools' checkers, if given
        self._lag = lag or LoopLag()  # likewise
        self._observations = observations or Observations()  # lb_health_checks_total
        self._on_change = on_change
        # backend id → (its state, the (host, port) its loop was started for, the loop)
        self._tasks: dict[str, tuple[BackendStatus, tuple[str, int], asyncio.Task[None]]] = {}
        self._unknown_values: set[str] = set()
        self._unknown_said = Throttle(60.0)  # once the set is full: one line a minute, with a count

    @property
    def pool_name(self) -> str:
        return self._pool.name

    def start(self) -> None:
        self.retarget(self._pool)

    def retarget(self, pool: PoolState) -> None:
        """Probe `pool`'s backends from now on: new ones get a loop, removed ones lose theirs, and one whose
        address changed a new one (its next verdict is about where it is now, at once)."""
        self._pool = pool
        loop = asyncio.get_running_loop()
        for backend_id, (backend, address, task) in list(self._tasks.items()):
            if pool.backends.get(backend_id) is not backend or (backend.config.host, backend.config.port) != address:
                task.cancel()
                del self._tasks[backend_id]
        for backend in pool.backends.values():
            if backend.id not in self._tasks:
                task = loop.create_task(self._probe_loop(backend), name=f"health {pool.name}/{backend.id}")
                self._tasks[backend.id] = (backend, (backend.config.host, backend.config.port), task)

    async def stop(self) -> None:
        tasks = [task for _, _, task in self._tasks.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks = {}

    async def _probe_loop(self, backend: BackendStatus) -> None:
        interval = self._pool.config.health_check.interval
        await self._first_probes.turn()  # with the other new loops' first probes, a slice at a time
        while True:
            started = time.monotonic()
            try:
                result = await self.check(backend)
            except Exception:
                # A bug in the check must not end this backend's checks for good, silently.
                if _check_bugs.due() is not None:
                    log.error("health check of %s/%s failed in the balancer", self._pool.name, backend.id,
                              exc_info=True)
                await asyncio.sleep(interval)
                continue
            pool = self._pool
            if pool.backends.get(backend.id) is not backend:
                return  # removed from the pool while the probe ran
            if result.local:
                # Our own shortage says nothing of the backend: marked down for it, every backend
                # of every pool would go down together, and stay down for `rise` checks after.
                suppressed = _local_errors.due()
                if suppressed is not None:
                    log.warning("health check of %s/%s not made: %s; the balancer is short of its own resources, "
                                "states are kept (%d more like it since the last report)",
                                pool.name, backend.id, result.detail, suppressed)
                await asyncio.sleep(interval)
                continue
            self._observations.count_health_check(pool.name, backend.id, result.ok)
            change = pool.record_probe(backend.id, result.ok, time.time(), result.detail)
            if change is not None:
                self._on_change(change)
            if result.requested is not None:
                change = pool.record_requested_state(backend.id, result.requested == "draining", time.time())
                if change is not None:
                    self._on_change(change)
            # Lateness is the sleep's, not the check's: a check that outlasted its interval (a silent
            # backend, `timeout` >= `interval`) was not bunched with others by a stall.
            wake_at = max(started + interval, time.monotonic())
            await asyncio.sleep(max(0.0, wake_at - time.monotonic()))
            late = time.monotonic() - wake_at
            if late > _LATE:
                # Woken late: the loop was stalled (stopped, starved, a long turn), and every probe that
                # fell due meanwhile woke in this same turn.  Let through together, they would stay
                # together for good, each interval one turn of thousands of connects and verdicts (a
                # 1.5 s stop of 3,510 checked backends: a 100-180 ms block every second after it, from
                # 15 ms).  Each waits a random part of its lateness (of its interval at most), which
                # spreads them again as widely as the stall had bunched them.  Not the first probes'
                # slices: they let `at_once` through a turn, and on a loop whose every turn is long
                # (30 ms) every wake is late, so 3,000 backends checked each second were checked once
                # every five.
                await asyncio.sleep(random.uniform(0.0, min(late, interval)))

    async def probe(self, backend: BackendStatus) -> tuple[bool, str]:
        """One check: (passed, what was seen)."""
        result = await self.check(backend)
        return result.ok, result.detail

    async def check(self, backend: BackendStatus) -> ProbeResult:
        """One check, with the state the backend asked for in its answer."""
        check = self._pool.config.health_check
        config = backend.config
        try:
            async with _within(check.timeout, self._lag):
                reader, writer = await asyncio.open_connection(config.host, config.port)
                try:
                    if check.type is HealthCheckType.TCP:
                        return ProbeResult(True, "connected")
                    writer.write(_probe_request(check.path, config.address))
                    response = await _read_answer(reader)
                finally:
                    # The status line and headers are the answer: the body is never read, so one that is
                    # huge, or announced and never sent, or endless, neither fills memory nor fails the
                    # check by timing out; abort drops it without waiting to drain anything.
                    writer.transport.abort()
            lines = response.head.get_all(STATE_HEADER)
            header = ", ".join(lines) if lines else None  # one field value (RFC 9110 §5.3)
            self._note_unknown(backend, header)
            requested = requested_state(header)
            # An answer that asks to drain passes whatever its status: the backend is alive, speaks HTTP
            # and says what it wants (SPEC: the header "puts the backend in draining").  A gateway whose
            # /health is also its readiness fails it (503) while it drains, so that Kubernetes stops
            # sending it new connections; taken down for that, it would have its players redispatched away from
            # their sessions, which is what draining exists to spare (HAProxy's `disable-on-404`
            # likewise reads a failing status as drain).  Any other failing answer still fails; one
            # that says `up` or nothing fails as its status says.
            passed = (
                check.expect is HealthCheckExpect.ANY or 200 <= response.status < 400 or requested == "draining"
            )
            return ProbeResult(passed, f"HTTP {response.status}", requested)
        except TimeoutError:
            return ProbeResult(False, f"no answer within {check.timeout:g}s")
        except HeadersTooLarge:
            return ProbeResult(False, "answer head too large")
        except asyncio.IncompleteReadError as exc:
            return ProbeResult(False, "not a valid HTTP answer" if exc.partial else "closed without answering")
        except RequestRejected:
            # Never the backend's bytes: /status and the dashboard show a fixed summary.
            return ProbeResult(False, "not a valid HTTP answer")
        except OSError as exc:
            return ProbeResult(False, _short(str(exc) or type(exc).__name__), local=exc.errno in LOCAL_ERRNOS)

    def _note_unknown(self, backend: BackendStatus, header: str | None) -> None:
        for value in _state_values(header):
            lowered = value.lower()
            if lowered not in _DRAIN_VALUES and lowered not in _UP_VALUES and lowered not in self._unknown_values:
                self._say_unknown(backend, value)
                return  # one line per answer at most

    def _say_unknown(self, backend: BackendStatus, value: str) -> None:
        if len(self._unknown_values) < 32:  # a backend cycling through junk values must not grow this forever
            self._unknown_values.add(value.lower())
            more = ""
        else:  # nor write a line at every check
            suppressed = self._unknown_said.due()
            if suppressed is None:
                return
            more = f" ({suppressed} more unknown value(s) since the last report)" if suppressed else ""
        # The value as the text its bytes spell in UTF-8 (`drainé`, not the latin-1 reading `drainÃ©`);
        # bytes that are not UTF-8 show as `\udcXX` escapes in the repr.
        log.warning("backend %s/%s sent %s: %r, which is neither draining nor up: it does not ask to drain%s",
                    self._pool.name, backend.id, STATE_HEADER, shortened(header_text(value), 40), more)


# A probe woken later than this after its time waits a random part of its lateness: a stall made it due
# with the others that fell due meanwhile.  An ordinary turn wakes it well within this.
_LATE = 0.02
_local_errors = Throttle()  # checks not made for want of our own descriptors or memory
_check_bugs = Throttle()  # a check that raised: logged with its traceback, once per interval


def _probe_request(path: str, address: str) -> bytes:
    return (
        f"GET {path} HTTP/1.1\r\nHost: {address}\r\nUser-Agent: ws-affinity-lb health check\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")


async def _read_answer(reader: asyncio.StreamReader) -> ResponseHead:
    """The final answer's head, found and parsed as the proxy does a backend's; interim (1xx) heads skipped.

    Raises:
        HeadersTooLarge: no end of head within MAX_RESPONSE_HEAD bytes.
        asyncio.IncompleteReadError: the connection ended first.
        RequestRejected: what `take_answer_head` refuses, an unasked-for 101, or more interim
            answers than the proxy takes.
    """
    buffer = bytearray()
    scanned = 0
    interim = 0
    while True:
        response = take_answer_head(buffer, scanned, MAX_RESPONSE_HEAD)
        if response is None:
            scanned = len(buffer)
            chunk = await reader.read(65536)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(buffer), None)
            buffer += chunk
            continue
        scanned = 0
        if response.status >= 200:
            return response
        if response.status == 101:
            raise BadGateway("switched protocols without being asked to")
        interim += 1
        if interim > MAX_INTERIM:
            raise BadGateway("too many interim answers")


def _short(text: str, limit: int = 160) -> str:
    """A detail for /status: one line, bounded (an exception's text can be long)."""
    return shortened(" ".join(text.split()), limit)

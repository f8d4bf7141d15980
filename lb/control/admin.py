"""The admin API on its own address: health, readiness, /status, /metrics, and bearer-protected operator actions.

    GET  /livez                                     200 while the process serves requests
    GET  /readyz                                    200 once listeners are open; 503 before and from SIGTERM on,
                                                    and while no worker serves (workers: N); the body says why
    GET  /healthz                                   200 while serving (accepting): 503 before, once a stop ends it,
                                                    and while no worker serves
    GET  /status                                    pools, backends, states with reasons, counters
    GET  /metrics                                   Prometheus text exposition
    GET  /  and  GET /lookup?token=T                the operator's console (lb.control.console)
    POST /pools/{pool}/backends/{id}/{action}       drain | disable | enable (Authorization: Bearer)

Input is checked as strictly as the config is: an unknown parameter
(`close_afer`; the probes and /metrics ignore query strings), a malformed value or body, or JSON nested deeper than any
real request is a 400 whose log line names the problem.  A middleware turns anything
else that escapes a handler into a bare 500 with the traceback in the log
only: no admin request can make the API leak internals or die.  Error
bodies hold a fixed reason and a request id; the log line with that id says
what was asked for and which input was at fault (SPEC: no client input in
a body).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, cast
from urllib.parse import parse_qsl

from aiohttp import HttpVersion11, hdrs, web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse
from aiohttp.web_server import Server
from prometheus_client import CONTENT_TYPE_LATEST

from lb.access_log import LineBucket, plain_value, shortened
from lb.config.durations import parse_duration
from lb.control.admin_connections import AdminConnections, address_key
from lb.control.exposition import Scrapes
from lb.control.migration import DEFAULT_MIGRATION_RATE
from lb.control.status_document import status_text
from lb.log import Throttle
from lb.proxy.tunnel import send_queue
from lb.state.pool import AdminAction, BackendState, BackendStatus

if TYPE_CHECKING:
    from enum import StrEnum

    from lb.control.discovery import DiscoveryManager
    from lb.control.exposition import SlicedRegistry
    from lb.state.context import ProxyContext

log = logging.getLogger(__name__)


class Administered(Protocol):
    """What the admin API, its route lookup (`lb.control.admin_route`) and the console use of the running
    balancer (`lb.control.balancer.Balancer`): what /status, /metrics and the probes show, and the
    operator's actions.  Starting, reloading and stopping it are not the admin API's to reach."""

    @property
    def ctx(self) -> ProxyContext:
        """The running pools, config and counters."""

    @property
    def registry(self) -> SlicedRegistry:
        """What /metrics renders."""

    @property
    def discovery(self) -> DiscoveryManager:
        """Each discovered pool's `discovery` object in /status."""

    @property
    def role(self) -> StrEnum:
        """single, owner or worker: /status's `role`."""

    @property
    def listen_addresses(self) -> list[tuple[str, int]]:
        """/status's `listeners`."""

    @property
    def serving(self) -> bool:
        """/healthz: accepting connections."""

    @property
    def shutting_down(self) -> bool:
        """From the stop signal on."""

    def not_ready(self) -> str | None:
        """Why /readyz answers 503, or None."""

    def workers_serving(self) -> tuple[int, int] | None:
        """(serving, count) of the owner's workers; None without workers."""

    def live_tunnels(self) -> int:
        """/status's `tunnels`."""

    def retired_backends(self) -> list[tuple[str, BackendStatus]]:
        """(pool, backend) removed by a reload or DNS whose tunnels still run."""

    def find_backend(self, pool: str, backend_id: str) -> BackendStatus | None:
        """The backend an operator's action names, in its pool or removed with tunnels."""

    def is_removed_with_tunnels(self, pool: str, backend_id: str) -> bool:
        """Whether the backend is one /status lists as `removed`."""

    def apply_admin(
        self, pool: str, backend_id: str, action: AdminAction, *, close_after: float | None = None,
        rate: float | None = None,
    ) -> BackendState:
        """An operator's drain, disable or enable; the state /status then shows."""

    async def fresh_counts(self) -> None:
        """Until the counters are as of now (the workers' too)."""

    async def states_applied(self) -> None:
        """Until every worker runs the backends' states as this process holds them."""


BALANCER: web.AppKey[Administered] = web.AppKey("balancer")
SCRAPES: web.AppKey[Scrapes] = web.AppKey("scrapes")
# /status renders one at a time (each begun after its request arrived: never an answer older than its question).
STATUS_RENDER: web.AppKey[asyncio.Lock] = web.AppKey("status_render", asyncio.Lock)

# An action's parameters, in the query string or a JSON body; anything else is refused.
ACTION_PARAMS = frozenset({"close_after", "rate"})
MAX_BODY_BYTES = 4096  # an action body is a few dozen bytes
BODY_TIMEOUT = 2.0  # seconds to receive it whole
IDLE_TIMEOUT = 15.0  # seconds an admin connection may sit without a complete request (the dashboard polls every 1 s)
# Seconds a body answered before it was read (401, 413) is still read and dropped before the connection
# closes, so that the client reads the answer rather than a reset.  aiohttp's default, 10 s, read
# gigabytes of a flood on the event loop that the data plane shares (echoes went from 1 to 13 ms).
LINGER = 0.5
MAX_JSON_DEPTH = 4  # {"close_after": "30s"} is depth 1; deeper is not a request we understand
MAX_RATE = 100_000.0
# One tunnel every 100 s, the dashboard's own least: slower, a drain's closes would outlast the backend
# (after `close_after` it takes not even its cookie holders, so a rate near 0 is a disable that never
# empties it).  A drain that closes nothing is a drain without `rate` and `close_after`.
MIN_RATE = 0.01


class AdminInputError(ValueError):
    """A request the admin API refuses with 400.

    The message is a fixed reason, the body's; `detail` names what the client sent (a
    parameter's name, a content type) and goes to the log line only (SPEC: error bodies
    name no client input).
    """

    def __init__(self, reason: str, detail: object = None) -> None:
        super().__init__(reason)
        self.detail = None if detail is None else _name(detail)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# Bytes of answers sent to admin clients and not yet taken by them, over every admin connection.  A client
# that asks for /status and never reads left its whole answer (2 MB at 5,000 backends) queued on its
# connection, and 500 of them (17 addresses, under the per-address share) held 800 MB.  Past this, room is
# made before a large answer is rendered (`make_room`).  The probes' answers are a few bytes, and are
# never held up (a failing probe restarts or takes out a healthy balancer).
MAX_UNREAD_ANSWER_BYTES = 32 * 1024 * 1024
# Seconds an answer's unread bytes may stay where they are before its connection counts as stalled.
UNREAD_STALL = 1.0
_PROBES = frozenset({"/livez", "/readyz", "/healthz"})


class LargeAnswer(web.Response):
    """An answer of up to megabytes (/status, /metrics, the dashboard), let go of once it is written.

    aiohttp keeps the last answer of a keep-alive connection (its request loop's variable) until the
    next request comes or the connection closes: 500 idle connections that had each asked for /status
    of 5,000 backends held 2 MB each, 1 GB in all, for the 15 s they may stay idle."""

    async def write_eof(self, data: bytes = b"") -> None:
        try:
            await super().write_eof(data)
        finally:
            self._body = None
            self._compressed_body = None


def _unacknowledged(transport: asyncio.Transport, held: int) -> int:
    """Bytes of `transport`'s answers its client has not acknowledged: those held above the socket
    (`held`) and those the kernel has sent or holds unsent (SIOCOUTQ).  Only a client that reads makes
    this go down, and it goes down as it reads: the transport's own buffer moves only when the kernel
    takes a third of its send buffer at once, so a client reading 150 KB/s looked still for 1.5 s.
    Where the kernel cannot be asked (closed meanwhile, not TCP), what is held above the socket."""
    return held + (send_queue(transport) or 0)


def make_room(request: web.Request) -> web.Response | None:
    """Before a large answer: None when the admin port's unread answers are within MAX_UNREAD_ANSWER_BYTES,
    or are once the stalled connections holding the most have been cut; else the 503 to answer with.

    Cut, not waited for: a client that reads nothing never gives its bytes back (aiohttp waits on it
    without a deadline), and refusing everyone else instead let 20 such connections keep /status and
    /metrics at 503 for good, for Prometheus and the operator too.  Stalled: what its client has not
    acknowledged has not gone down for UNREAD_STALL (`_unacknowledged`).  A client still reading is
    left to finish; when cutting the stalled ones would not make room, none is cut, and the asker gets
    a 503 (Retry-After).  Asked as a request comes (the middleware, for every GET but the probes) and
    again once a large answer's turn to render has come (/status, /metrics, the dashboard): requests
    sent together all passed the first while the first answers were being made.
    """
    server = getattr(request.protocol, "_manager", None)
    if not isinstance(server, _AdminServer):
        return None
    now = time.monotonic()
    held = {transport: transport.get_write_buffer_size() for transport in server.transports.values()}
    owed = {transport: _unacknowledged(transport, size) for transport, size in held.items() if size}
    server.unread_since = {
        transport: since if (since := server.unread_since.get(transport)) is not None and left >= since[0]
        else (left, now)
        for transport, left in owed.items()
    }
    total = sum(held.values())
    if total <= MAX_UNREAD_ANSWER_BYTES:
        return None
    own = request.transport
    stalled = sorted(((held[transport], transport) for transport in owed
                      if transport is not own and now - server.unread_since[transport][1] >= UNREAD_STALL),
                     key=lambda item: -item[0])
    if total - sum(size for size, _ in stalled) > MAX_UNREAD_ANSWER_BYTES:
        # Clients still reading hold the rest: cutting the stalled ones would not make room.
        return _error(503, "busy: answers sent earlier are still being read", headers={"Retry-After": "1"})
    cut = 0
    for size, transport in stalled:
        if total <= MAX_UNREAD_ANSWER_BYTES:
            break
        transport.abort()
        total -= size
        cut += 1
    suppressed = _stalled_cuts.due()
    if suppressed is not None:
        log.warning("admin API: %d connection(s) that left answers unread cut, the admin port's unread answers "
                    "being past %d MiB (%d more since the last line)", cut,
                    MAX_UNREAD_ANSWER_BYTES // (1024 * 1024), suppressed)
    return None


@web.middleware
async def _answer_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """HTTP errors keep their status with a JSON body; anything else is a bug: logged, bare 500.

    Every error answer gets a log line carrying its request id (SPEC), with what the body
    leaves out: the method and path asked for, and the input at fault.
    """
    detail = None
    response: web.StreamResponse
    try:
        busy = make_room(request) if request.method in ("GET", "HEAD") and request.path not in _PROBES else None
        response = busy if busy is not None else await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = _error(exc.status, exc.reason or "error", headers={
            k: v for k, v in exc.headers.items() if k in ("Allow", "WWW-Authenticate")
        })
    except AdminInputError as exc:
        response, detail = _error(400, str(exc)), exc.detail
    except Exception:
        request_id = new_request_id()
        log.exception("admin API: 500 %s %s request_id=%s", request.method, _path(request), request_id,
                      extra=_fields(request, 500, request_id))
        return _error(500, "internal error", request_id=request_id)
    if isinstance(response, _ErrorAnswer):  # one of ours (_error), not a /readyz 503
        _log_error(request, response, detail)
    return response


def _log_error(request: BaseRequest, response: _ErrorAnswer, detail: str | None) -> None:
    """One line per error answer while `_error_lines` lasts; past it counted by status, and the count said
    as the bucket refills (`report_unlogged_errors`), before any line after it.  A refused token is a
    WARNING: failed logins are what an operator looks for.  Anyone who reaches the port could otherwise
    write a line per request: wrong tokens from 20 connections wrote 11,000 WARNING lines a second."""
    now = time.monotonic()
    report_unlogged_errors(now)
    if not _error_lines.take(now):
        _unlogged_errors[response.status] = _unlogged_errors.get(response.status, 0) + 1
        return
    level = logging.WARNING if response.status == 401 else logging.INFO
    log.log(
        level, "admin API: %d %s %s: %s%s request_id=%s client=%s", response.status, request.method, _path(request),
        response.fixed_reason, f" ({detail})" if detail else "", response.request_id, request.remote or "-",
        extra=_fields(request, response.status, response.request_id),
    )


def report_unlogged_errors(now: float, *, final: bool = False) -> None:
    """Say how many error answers were counted, not logged, once the bucket has a line for it (before the
    next error's line, and every second from the balancer, so that the last of a flood of wrong tokens
    is said when it stops), or at once (`final`: the process is stopping).  The line is one of the
    bucket's too: a flood writes 16 lines a second at most."""
    if _unlogged_errors and (final or _error_lines.take(now)):
        log.warning("admin API: %d error answer(s) not logged one by one (past %d lines a second, per process): %s",
                    sum(_unlogged_errors.values()), int(_error_lines.per_second),
                    ", ".join(f"{status}: {count}" for status, count in sorted(_unlogged_errors.items())))
        _unlogged_errors.clear()


def _fields(request: BaseRequest, status: int, request_id: str) -> dict[str, object]:
    """The line's fields of their own in `logging.format: json` (as an access line has them), so that a
    query on `request_id` finds an admin error as it finds a data-plane one."""
    return {"access": {  # raw values, as an access line's: JSON escapes what the plain line quotes
        "request_id": request_id, "status": status, "method": request.method, "path": _cut_path(request),
        "client": request.remote or "-",
    }}


def _path(request: BaseRequest) -> str:
    """The path asked for, as a plain log line can hold it: quoted when it is not plain visible ASCII."""
    return plain_value(_cut_path(request))


def _cut_path(request: BaseRequest) -> str:
    """The path asked for, cut at 200 characters."""
    path = request.rel_url.raw_path
    return shortened(path, 200)


def make_admin_app(balancer: Administered) -> web.Application:
    # client_max_size: aiohttp answers 413 itself beyond it, before any handler reads the body.
    app = web.Application(middlewares=[_answer_errors], client_max_size=MAX_BODY_BYTES)
    app[BALANCER] = balancer
    app[SCRAPES] = Scrapes(lambda: balancer.registry.collect_slices(), before=balancer.fresh_counts)
    app[STATUS_RENDER] = asyncio.Lock()
    app.router.add_get("/livez", livez)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/pools/{pool}/backends/{backend}/{action}", backend_action)
    # GET /pools/{pool}/route?key=K (balance: source|hash), in its own module.
    from lb.control.admin_route import add_route_endpoint

    add_route_endpoint(app)

    # The operator's console: GET / (dashboard) and GET /lookup (imported here: it imports this module).
    from lb.control.console import add_console_routes

    add_console_routes(app)
    return app


def key_values(request: web.Request) -> list[str]:
    """The `key` parameter's values as the data plane reads a request's hash key (`lb.affinity.carriers`):
    percent-escapes decoded to bytes, and bytes that are not UTF-8 kept as surrogate escapes, so that
    `key=%E9` names the key a header's byte 0xE9 does.  yarl's `request.query` turns them into U+FFFD,
    which no request hashes as: /route then named another backend than the one the client reached."""
    pairs = parse_qsl(request.rel_url.raw_query_string, keep_blank_values=True, errors="surrogateescape")
    return [value for name, value in pairs if name == "key"]


def refuse_parameters(request: web.Request, allowed: frozenset[str] = frozenset()) -> None:
    """Raise AdminInputError for a query parameter the endpoint does not take (a typo is not ignored),
    or one given twice (which of two tokens or keys was meant is not ours to guess)."""
    unknown = sorted(set(request.query) - allowed)
    if unknown:
        raise AdminInputError("unknown parameter", unknown[0])
    _query_once(request)


def _query_once(request: web.Request) -> dict[str, Any]:
    """The query string's parameters; AdminInputError for one given twice."""
    repeated = sorted(key for key in set(request.query) if len(request.query.getall(key)) > 1)
    if repeated:
        raise AdminInputError("parameter given twice", repeated[0])
    return dict(request.query)


# The probes and /metrics take no parameter and ignore any query string, as a typo there changes nothing:
# probes that add one (a cache-buster, a check's own marker) or a Prometheus job's `params:` would see a
# 400 from a healthy balancer, and take it out of service or alert.  Every other endpoint refuses them.


async def livez(request: web.Request) -> web.Response:
    """The event loop answers: the process is alive (a restart would not help it otherwise)."""
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """SPEC part 2: 200 once the listeners are open, 503 before and from SIGTERM on; with workers, 503
    too while none of them serves (the owner's listeners are theirs).  The body says why."""
    reason = request.app[BALANCER].not_ready()
    if reason is not None:
        return web.json_response({"status": "not ready", "reason": reason}, status=503)
    return web.json_response({"status": "ok"})


async def healthz(request: web.Request) -> web.Response:
    """SPEC part 1: 200 while the balancer serves.  So 503 while starting, and once a stop has closed
    the listeners, and while no worker serves; during SIGTERM's `shutdown_delay` it still serves (200),
    while /readyz says 503 to whoever routes to us."""
    balancer = request.app[BALANCER]
    if not balancer.serving:
        state = "shutting down" if balancer.shutting_down else (balancer.not_ready() or "starting")
        return web.json_response({"status": state}, status=503)
    return web.json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    refuse_parameters(request)
    balancer = request.app[BALANCER]
    await balancer.fresh_counts()  # with workers: what they count now, not up to two seconds ago (rounds shared)
    # One render at a time: two would share the loop's time between them and the data plane.
    async with request.app[STATUS_RENDER]:
        busy = make_room(request)
        if busy is not None:
            return busy
        text = await status_text(balancer)
    return LargeAnswer(text=text, content_type="application/json")


async def metrics(request: web.Request) -> web.Response:
    # Rendered a slice at a time between the loop's other work (lb.control.exposition).
    body = await request.app[SCRAPES].body()
    busy = make_room(request)  # scrapes that waited on one render are all answered when it is done
    if busy is not None:
        return busy
    return LargeAnswer(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# The 401s' fixed reasons: with no token configured, asking for one would send the operator looking for it.
WRONG_TOKEN = "missing or wrong bearer token"
NO_TOKEN_CONFIGURED = "admin actions are off: the balancer has no admin.token configured"


def _refused(request: web.Request, token: str | None) -> web.Response | None:
    """The 401 for a request that may not act (no token configured, or not this one), or None: it may."""
    if token is None:
        return _error(401, NO_TOKEN_CONFIGURED, headers={"WWW-Authenticate": "Bearer"})
    if not _authorized(request, token):
        return _error(401, WRONG_TOKEN, headers={"WWW-Authenticate": "Bearer"})
    return None


def _authorized(request: web.Request, token: str) -> bool:
    credentials = request.headers.getall("Authorization", [])
    if len(credentials) != 1:
        return False  # two: which one a proxy in front checked, or logged, is anyone's guess
    scheme, _, presented = credentials[0].partition(" ")
    # Constant-time: the comparison must not tell an attacker how much of the token matched.  aiohttp
    # decodes header bytes that are not UTF-8 as surrogates: surrogateescape gives back the bytes sent
    # (a plain encode() raised, and any client could fill the log with 500 tracebacks).
    presented_bytes = presented.strip().encode("utf-8", "surrogateescape")
    return scheme.lower() == "bearer" and hmac.compare_digest(presented_bytes, token.encode())


async def backend_action(request: web.Request) -> web.Response:
    """POST /pools/{pool}/backends/{id}/{drain|disable|enable}[?close_after=30s&rate=5].

    `close_after` and `rate` (also accepted as a JSON body) ask for migration:
    after the delay, the backend's tunnels are closed with 1012 at that rate.
    """
    balancer = request.app[BALANCER]
    if (refused := _refused(request, balancer.ctx.config.admin.token)) is not None:
        return refused
    try:
        action = AdminAction(request.match_info["action"])
    except ValueError:
        return _error(404, "action must be drain, disable or enable")
    pool_name, backend_id = request.match_info["pool"], request.match_info["backend"]
    if balancer.find_backend(pool_name, backend_id) is None:  # said before the body is waited for
        return _error(404, "unknown pool or backend")
    close_after, rate = await _migration_params(request)
    if action is AdminAction.ENABLE and (close_after is not None or rate is not None):
        raise AdminInputError("close_after and rate apply to drain and disable, not enable")
    # Decided after the body, with no wait from here to the action: a reload, a DNS answer or a last tunnel
    # ending while the body came would otherwise change the answer under it (a 500 from apply_admin).
    pool = balancer.ctx.pools.get(pool_name)
    removed = pool is None or pool.get(backend_id) is None
    # One a reload or DNS removed, shown in /status while its tunnels run, is the operator's to close.
    if removed and not balancer.is_removed_with_tunnels(pool_name, backend_id):
        return _error(404, "unknown pool or backend")
    if removed and action is AdminAction.ENABLE:
        return _error(409, "the backend was removed from its pool: a reload or DNS answer that names it again "
                           "brings it back")
    state = balancer.apply_admin(pool_name, backend_id, action, close_after=close_after, rate=rate)
    # SPEC: disabled, "nothing new reaches it": with workers, from the answer on, in every worker.
    await balancer.states_applied()
    answer: dict[str, Any] = {"pool": pool_name, "id": backend_id, "state": state.value}
    if removed:
        answer["removed"] = True
    if close_after is not None or rate is not None:
        answer["close_after"] = close_after or 0.0
        answer["rate"] = rate or DEFAULT_MIGRATION_RATE
    return web.json_response(answer)


def _error(
    status: int, message: str, headers: dict[str, str] | None = None, *, request_id: str | None = None
) -> web.Response:
    """A JSON error: the status, a fixed reason, and a request id that the log line carries too.

    The id is also in `X-Request-Id`, as on the proxy's own answers; `message` must never hold
    anything the client sent.
    """
    return _ErrorAnswer(status, message, request_id or new_request_id(), headers)


class _ErrorAnswer(web.Response):
    """An error answer of ours, which keeps its reason and id for the middleware's log line."""

    def __init__(self, status: int, reason: str, request_id: str, headers: dict[str, str] | None) -> None:
        super().__init__(
            text=json.dumps({"error": reason, "request_id": request_id}), content_type="application/json",
            status=status, headers={**(headers or {}), "X-Request-Id": request_id},
        )
        self.fixed_reason = reason
        self.request_id = request_id


def new_request_id() -> str:
    """16 hex digits: enough to find one answer in the log, nothing derived from the request."""
    return secrets.token_hex(8)


class AdminRunner(web.AppRunner):
    """An AppRunner whose connections answer unparseable requests like every other admin error.

    aiohttp answers a request it cannot parse (a 1 MB `/lookup?token=`, a 100 KB header) before
    any middleware runs: `text/plain` quoting the start of the input, and an ERROR log line with a
    traceback for each one.  Here such a request gets our JSON error with a fixed reason and a
    request id, and one debug line; the status is aiohttp's.  So does an `Expect` other than
    100-continue (a 417), which aiohttp also answers before any middleware, quoting the value.
    A connection that sends no complete request within `IDLE_TIMEOUT` is closed, and the rest of
    a body refused unread is read for `LINGER` at most.
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        # aiohttp's own default is an hour.  This bounds an idle keep-alive connection and, as aiohttp
        # starts the same timer when a connection opens, a request head that never completes (slowloris).
        kwargs.setdefault("keepalive_timeout", IDLE_TIMEOUT)
        kwargs.setdefault("lingering_time", LINGER)
        super().__init__(app, **kwargs)

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        if type(server) is Server:  # aiohttp's own: swap in the subclass that adds __call__ below
            server.__class__ = _AdminServer
            cast(_AdminServer, server).admitted = AdminConnections()
            cast(_AdminServer, server).transports = {}
            cast(_AdminServer, server).unread_since = {}
        else:
            log.warning("admin API: aiohttp's server is a %s: admin connections are not capped", type(server))
        # Around the application, not in it: aiohttp meets `Expect` after routing and before any middleware,
        # and its default refuses all but 100-continue with a text/plain 417 quoting the value.  Its own hook,
        # a route's `expect_handler=`, would not reach a path no route matches: a 404 or 405 takes a
        # SystemRoute with the default handler.
        server.request_handler = _expectations_first(server.request_handler)
        return server


_Handle = Callable[[BaseRequest], Awaitable[StreamResponse]]


def _expectations_first(handle: _Handle) -> _Handle:
    """`handle`, after refusing an expectation we cannot meet with our JSON 417 (and its log line)."""

    async def handle_expectations_first(request: BaseRequest) -> StreamResponse:
        unmet = _unmet_expectation(request)
        if unmet is None:
            return await handle(request)  # 100-continue, if asked, is aiohttp's: sent once the route is known
        answer = _ErrorAnswer(417, "Expect: only 100-continue is supported", new_request_id(), None)
        _log_error(request, answer, unmet)
        return answer

    return handle_expectations_first


def _unmet_expectation(request: BaseRequest) -> str | None:
    """The `Expect` value of `request` other than 100-continue, as a log line names it; None if there is none.

    RFC 9110 §10.1.1: 100-continue is the one expectation defined, and a server may answer any other
    with 417.  As aiohttp does, an HTTP/1.0 request's `Expect` is ignored (§10.1.1: "MUST ignore" a
    100-continue there) and an empty one is none; unlike aiohttp, every `Expect` line counts, not the first.
    """
    if request.version != HttpVersion11:
        return None
    for value in request.headers.getall(hdrs.EXPECT, ()):
        if value and value.lower() != "100-continue":
            return _name(value)
    return None


class _AdminServer(Server):
    # Who gets a connection (lb.control.admin_connections), and each counted one's transport (aiohttp sets
    # a handler's to None when it gives up on a keep-alive, while the socket stays open until its buffer
    # drains: a peer that reads nothing would keep it for good): set as the class is swapped in.
    admitted: AdminConnections
    transports: dict[RequestHandler, asyncio.Transport]
    # Each connection holding unread answer bytes: the fewest it has held, and since when (`make_room`).
    unread_since: dict[asyncio.Transport, tuple[int, float]]

    def __call__(self) -> RequestHandler:
        handler = super().__call__()
        if type(handler) is RequestHandler:  # same slots, one method more: a safe class swap
            handler.__class__ = _AdminRequestHandler
        return handler


# The kernel's send buffer of an admin connection, at most (Linux doubles it for its bookkeeping).  Left to
# grow (to 4 MB here), each connection whose client reads nothing took in a whole large answer, out of
# sight of MAX_UNREAD_ANSWER_BYTES: 500 of them, a gigabyte of kernel memory.  Past this, what is
# unread waits in the transport, where the budget counts it.  256 KiB (512 in the kernel's count) carries
# 10 MB of /metrics in 2 s over a 100 ms round trip, within Prometheus's default 10 s scrape timeout.
ADMIN_SEND_BUFFER = 256 * 1024


def _limit_send_buffer(transport: asyncio.BaseTransport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, ADMIN_SEND_BUFFER)


class _AdminRequestHandler(RequestHandler):
    __slots__ = ()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        server = self._manager
        assert isinstance(server, _AdminServer)
        host = _peer_host(transport)
        refused, evicted = server.admitted.admit(self, address_key(host), _idle)
        if refused is None:
            server.transports[self] = cast(asyncio.Transport, transport)
            _limit_send_buffer(transport)
        evicted_transport = server.transports.pop(evicted, None) if isinstance(evicted, RequestHandler) else None
        if evicted_transport is not None:
            evicted_from = _peer_host(evicted_transport) or "-"
            evicted_transport.abort()
            suppressed = _evictions.due()
            if suppressed is not None:
                log.warning("admin API: %d admin connections open: one from %s closed for one from %s "
                            "(%d more since the last line)", server.admitted.limit, evicted_from, host or "-",
                            suppressed)
        if refused is None:
            return
        cast(asyncio.Transport, transport).abort()  # aiohttp's connection_lost then unregisters it
        suppressed = _refusals.due()
        if suppressed is not None:
            log.warning("admin API: connection from %s closed as accepted: %s (%d more since the last line)",
                        host or "-", refused, suppressed)

    def connection_lost(self, exc: BaseException | None) -> None:
        server = self._manager
        if isinstance(server, _AdminServer):
            server.admitted.remove(self)  # at once (the server lists it until its task ends)
            server.transports.pop(self, None)
        super().connection_lost(exc)

    def handle_error(
        self, request: BaseRequest, status: int = 500, exc: BaseException | None = None, message: str | None = None
    ) -> StreamResponse:
        if request.writer.output_size > 0:  # aiohttp's rule: an answer is on its way, nothing more to send
            return super().handle_error(request, status, exc, message)
        if isinstance(exc, LineTooLong):
            reason = "request line or header too long"
        elif status < 500:
            reason = "malformed request"
        else:
            reason = "timeout" if status == 504 else "internal error"
        request_id = new_request_id()
        answer = _error(status, reason, request_id=request_id)
        if status >= 500:
            log.error("admin API: %d %s request_id=%s", status, reason, request_id, exc_info=exc)
        else:  # the request could not be read: no method or path to name
            log.info("admin API: %d %s (%s) request_id=%s", status, reason, type(exc).__name__, request_id)
        answer.force_close()
        return answer


_refusals = Throttle()
_stalled_cuts = Throttle()
# Error answers' lines (`_log_error`): one by one while the bucket lasts, then counted by status.
_error_lines = LineBucket()
_unlogged_errors: dict[int, int] = {}
_evictions = Throttle()  # a line of their own: a refused flood's lines must not hide that others took places


def _peer_host(transport: asyncio.BaseTransport) -> str | None:
    peer = transport.get_extra_info("peername")
    return str(peer[0]) if isinstance(peer, tuple) and peer else None


def _idle(handler: object) -> bool:
    """No request of this connection is in progress (aiohttp's own flag; a version without it: never idle,
    so that a new connection is refused rather than one cut)."""
    return not getattr(handler, "_request_in_progress", True)


def _depth(value: object, limit: int) -> int:
    """Nesting depth of a parsed JSON value, stopping once past `limit` (no recursion)."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > limit:
                return deepest
            stack.extend((child, depth) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _parse_body(raw: bytes) -> dict[str, Any]:
    # A cheap bound before the parser: json.loads recurses once per bracket and would hit
    # RecursionError (a 500) on a few thousand of them.
    if raw.count(b"[") + raw.count(b"{") > 64:
        raise AdminInputError(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        body = json.loads(raw, object_pairs_hook=_once_each)
    except _RepeatedKey as repeated:
        raise AdminInputError("body: key given twice", repeated.key) from None
    except (ValueError, RecursionError):
        raise AdminInputError("body: not valid JSON") from None
    if not isinstance(body, dict):
        raise AdminInputError("body: expected a JSON object")
    if _depth(body, MAX_JSON_DEPTH) > MAX_JSON_DEPTH:
        raise AdminInputError(f"body: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return body


class _RepeatedKey(Exception):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _once_each(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all distinct: `{"rate": 1, "rate": 2}` is refused, as the config
    refuses a key given twice and the query string a parameter given twice (json.loads keeps the last)."""
    found: dict[str, Any] = {}
    for key, value in pairs:
        if key in found:
            raise _RepeatedKey(key)
        found[key] = value
    return found


# A number as an operator types it: ASCII digits and one point.  float() alone also takes `1_000`,
# a full-width 5 (any Unicode digit), `1e3`, `inf` and surrounding Unicode spaces.
_DECIMAL = re.compile(r"[0-9]+(?:\.[0-9]+)?|\.[0-9]+")


def _name(key: object) -> str:
    text = str(key)
    return repr(shortened(text, 40))


# For other admin route modules (lb.control.console): the same bearer check and error body.
refused = _refused
error_response = _error


async def _migration_params(request: web.Request) -> tuple[float | None, float | None]:
    """close_after and rate from the query string and/or a JSON body; raises AdminInputError."""
    params = _query_once(request)
    declared = request.content_length
    if declared is not None and declared > MAX_BODY_BYTES:
        # Refused on what it says: aiohttp's own 413 comes only once that much has arrived, and a
        # client that declares 100 GB and sends a few bytes got a 408 after BODY_TIMEOUT instead.
        raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY_BYTES, actual_size=declared)
    if request.can_read_body:
        try:
            # A body of a few dozen bytes arrives in one packet; one that trickles holds a handler for nothing.
            async with asyncio.timeout(BODY_TIMEOUT):
                raw = await request.read()
        except TimeoutError:
            raise web.HTTPRequestTimeout(reason="body not complete in time") from None
        if raw.strip():
            if request.content_type not in ("application/json", "application/octet-stream", ""):
                raise AdminInputError("body: expected application/json", request.content_type)
            for key, value in _parse_body(raw).items():
                if key in params:
                    raise AdminInputError("parameter given in both query and body", key)
                params[key] = value
    unknown = sorted(set(params) - ACTION_PARAMS)
    if unknown:
        raise AdminInputError(f"unknown parameter; expected {' or '.join(sorted(ACTION_PARAMS))}", unknown[0])
    close_after = rate = None
    if params.get("close_after") is not None:
        value = params["close_after"]
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise AdminInputError("close_after: expected a duration like 30s or 500ms")
        try:
            close_after = parse_duration(value)
        except (ValueError, TypeError, OverflowError):
            raise AdminInputError("close_after: expected a duration like 30s or 500ms") from None
        if not 0 <= close_after <= 86_400:
            raise AdminInputError("close_after: expected a duration between 0s and 24h")
    if params.get("rate") is not None:
        value = params["rate"]
        try:
            if isinstance(value, bool) or not isinstance(value, str | int | float):
                raise ValueError
            if isinstance(value, str) and not _DECIMAL.fullmatch(value):
                raise ValueError
            rate = float(value)
        except (ValueError, OverflowError):
            raise AdminInputError(f"rate: expected connections per second, a number from {MIN_RATE:g}") from None
        if not MIN_RATE <= rate <= MAX_RATE:  # also refuses nan and inf
            raise AdminInputError(f"rate: expected connections per second from {MIN_RATE:g} to {MAX_RATE:g}")
    return close_after, rate

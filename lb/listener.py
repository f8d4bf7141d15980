"""The client side of a handshake: read the head, route, decide, connect upstream, hand off to a tunnel.

One `ClientConnection` protocol per accepted connection.  Reading the head is
callback-driven (no task per connection while idle); once the head is
complete, one task runs `_dispatch`, which is where every rejection is
answered:

    head → route → check upgrade → rate limit → affinity decision → backend connect (retry) → answer → tunnel

`RequestRejected` errors carry their status; a `BackendConnectError` is
retried on another backend; anything else is a bug: logged with its
traceback, and the client gets a bare 500.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import math
import os
import time
from typing import cast

from lb.access_log import log_request
from lb.affinity import Decision, decide
from lb.affinity_http import (
    TokenLookup,
    balance_key,
    find_token,
    join_pins,
    plan_forward,
    rewrite_response_cookies,
)
from lb.affinity_token import NONCE_BYTES, SESSION_BYTES, Claim
from lb.balancing import HASHED_METHODS
from lb.config import AffinityMode, SecureMode
from lb.context import ProxyContext
from lb.cookies import render_set_cookie
from lb.errors import (
    BackendConnectError,
    BadGateway,
    BadRequest,
    NoHealthyBackend,
    NoRoute,
    RequestRejected,
    TooManyRequests,
)
from lb.forwarding import render_client_response, render_error, render_forwarded_request
from lb.framing import response_framer
from lb.handshake import check_upgrade, is_websocket_upgrade
from lb.http_head import RequestHead, ResponseHead, find_head_end, parse_request_head
from lb.observations import error_kind
from lb.pool import PoolState
from lb.routing import match_route
from lb.tunnel import Tunnel
from lb.upstream import UpstreamProtocol, connect

log = logging.getLogger(__name__)

# Bytes a client may send behind its head before we stop reading until the backend is connected.
PENDING_BODY_LIMIT = 65536
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS"})


def token_digest(token: str) -> str:
    """What logs may say about a token (never the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "_balance_key", "_buffer", "_client_ip", "_ctx", "_forward", "_task", "_timer", "_tls", "_transport",
    )

    def __init__(self, ctx: ProxyContext, tls: bool) -> None:
        self._ctx = ctx
        self._tls = tls
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._forward: asyncio.Transport | None = None  # the backend, while its answer is awaited
        self._client_ip = "-"
        self._balance_key: str | None = None  # balance: source|hash, for the first choice and retries

    # -- asyncio callbacks -------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        if peer:
            self._client_ip = peer[0]
        ctx = self._ctx
        ctx.handshaking += 1
        if ctx.handshaking + len(ctx.tunnels) > ctx.config.limits.max_connections:
            self._reject(NoHealthyBackend("too many connections"))
            return
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(ctx.config.timeouts.handshake, self._head_timeout)

    def data_received(self, data: bytes) -> None:
        if self._forward is not None:
            self._forward.write(data)
            return
        self._buffer += data
        if self._task is None:
            self._read_head()
        elif len(self._buffer) > PENDING_BODY_LIMIT and self._transport is not None:
            self._transport.pause_reading()

    def eof_received(self) -> bool | None:
        self._abort()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._abort()

    # -- head --------------------------------------------------------------

    def _read_head(self) -> None:
        limit = self._ctx.config.limits.max_header_bytes
        try:
            end = find_head_end(self._buffer, limit)
            if end < 0:
                return
            request = parse_request_head(bytes(self._buffer[:end]))
        except RequestRejected as exc:
            self._cancel_timer()
            self._reject(exc)
            return
        self._cancel_timer()
        del self._buffer[:end]
        self._task = asyncio.get_running_loop().create_task(self._dispatch(request))

    def _head_timeout(self) -> None:
        # timeouts.handshake: a head that does not arrive in time (slowloris) just ends.
        log.debug("closing %s: request head not complete in time", self._client_ip)
        self._timer = None
        if self._transport is not None:
            self._transport.abort()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _abort(self) -> None:
        """The client connection ends before (or instead of) becoming a tunnel."""
        self._cancel_timer()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._transport is not None:
            self._release()
            if not self._transport.is_closing():
                self._transport.close()
            self._transport = None

    def _release(self) -> None:
        """Stop counting this connection as a handshake in progress (once)."""
        self._ctx.handshaking -= 1

    # -- answers -----------------------------------------------------------

    def _reject(self, exc: RequestRejected, request: RequestHead | None = None) -> None:
        self._ctx.stats.rejected[exc.status] += 1
        log_request(
            client=self._client_ip,
            method=request.method if request else "-",
            path=request.path if request else "-",
            status=exc.status,
            reason=str(exc).replace(" ", "_"),
        )
        self._answer(render_error(exc.status, exc.reason_phrase, str(exc), exc.headers))

    def _answer(self, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(data)
            transport.close()

    # -- dispatch ----------------------------------------------------------

    async def _dispatch(self, request: RequestHead) -> None:
        try:
            await self._proxy(request)
        except RequestRejected as exc:
            self._reject(exc, request)
        except asyncio.CancelledError:
            pass  # the client went away; its transport is already closing
        except Exception:
            log.error("internal error handling %s %s", request.method, request.path, exc_info=True)
            self._ctx.stats.rejected[500] += 1
            self._answer(render_error(500, "Internal Server Error", "internal error", {}))

    async def _proxy(self, request: RequestHead) -> None:
        ctx = self._ctx
        if not ctx.accepting:
            raise NoHealthyBackend("balancer is shutting down")
        route = match_route(ctx.routes, request.path)
        if route is None:
            raise NoRoute(f"no route for path {request.path}")
        websocket = is_websocket_upgrade(request)
        if websocket:
            check_upgrade(request)
        wait = ctx.rate_limiter.check(self._client_ip, time.monotonic())
        if wait:
            raise TooManyRequests("too many handshakes from this address", retry_after=math.ceil(wait))
        pool = ctx.pools[route.pool]
        affinity = ctx.config.affinity
        now = time.time()
        lookup = find_token(request, affinity, ctx.codec, now, pool=pool.name)
        self._balance_key = balance_key(request, pool.config, self._client_ip)
        for token, reason in lookup.rejected.items():
            ctx.stats.invalid_tokens[reason] += 1
            log.debug("ignoring affinity token %s from %s: %s", token_digest(token), self._client_ip, reason)
        claim = lookup.claim
        decision = decide(
            claim.backend_id if claim else None,
            pool,
            session=claim.session if claim else None,
            token_invalid=bool(lookup.rejected),
            refresh=(
                claim is not None
                and affinity.mode is AffinityMode.INSERT
                and now - claim.issued_at > affinity.max_age / 2
            ),
            now=now,
            grace=affinity.redispatch_grace,
            balance_key=self._balance_key,
        )
        if claim is not None and decision.reason == "invalid":
            ctx.stats.invalid_tokens["unknown_backend"] += 1
        retriable = websocket or (request.method in _IDEMPOTENT and not _has_body(request))
        upstream, response, decision = await self._open(request, websocket, pool, lookup, decision, retriable)
        try:
            await self._answer_and_join(request, websocket, pool, decision, upstream, response, lookup, now)
        except BaseException:
            # Not handed to a tunnel: this request ends here, and so does its backend connection.
            self._forward = None
            decision.backend.connections -= 1
            if upstream.transport is not None:
                upstream.transport.abort()
            raise

    def _forwarded_head(
        self, request: RequestHead, websocket: bool, lookup: TokenLookup, decision: Decision
    ) -> bytes:
        claim = lookup.claim
        plan = plan_forward(
            request,
            self._ctx.config.affinity,
            lookup,
            to_claimed=claim is not None and decision.backend.id == claim.backend_id,
        )
        return render_forwarded_request(
            request,
            client_ip=self._client_ip,
            proto="https" if self._tls else "http",
            websocket=websocket,
            rewrite_cookie=plan.rewrite_cookie,
            drop=plan.drop,
            target=plan.target,
            add=plan.add,
            backend_host=decision.backend.config.address,
        )

    async def _open(
        self,
        request: RequestHead,
        websocket: bool,
        pool: PoolState,
        lookup: TokenLookup,
        decision: Decision,
        retriable: bool,
    ) -> tuple[UpstreamProtocol, ResponseHead, Decision]:
        """Connect to the decided backend and get its answer's head; on failure try the next backend."""
        ctx = self._ctx
        claim = lookup.claim
        tried: list[str] = []
        while True:
            backend = decision.backend
            backend.connections += 1  # in-flight handshakes count for least_conn
            try:
                forwarded = self._forwarded_head(request, websocket, lookup, decision)
                started = time.monotonic()
                upstream, response = await self._connect_one(decision, forwarded)
                ctx.observations.observe_connect(pool.name, backend.id, time.monotonic() - started)
                return upstream, response, decision
            except BaseException as exc:
                backend.connections -= 1
                if not isinstance(exc, BackendConnectError):
                    raise
                ctx.stats.handshakes[(pool.name, backend.id, "connect_failed")] += 1
                ctx.observations.count_backend_error(pool.name, backend.id, error_kind(exc.__cause__))
                log.warning("%s", exc)
                # A backend that fails a handshake counts as a failed health check (passive health).
                ctx.on_backend_failure(pool.name, backend.id, f"handshake failed: {exc.cause}")
                if exc.request_sent and not retriable:
                    raise BadGateway(f"backend {backend.id} failed after the request was sent") from None
                tried.append(backend.id)
            try:
                # The same choice again without the failed ones: a pinned client goes
                # where every instance would send it, a new client is balanced.
                retry = decide(
                    claim.backend_id if claim else None,
                    pool,
                    session=claim.session if claim else None,
                    exclude=tried,
                    now=time.time(),
                    balance_key=self._balance_key,
                )
            except NoHealthyBackend:
                raise BadGateway("no backend could be reached") from None
            reason = decision.reason if decision.reason != "hit" else "redispatch"
            decision = Decision(
                backend=retry.backend, reason=reason, issue_cookie=retry.issue_cookie or pool.config.sticky
            )

    async def _connect_one(self, decision: Decision, forwarded: bytes) -> tuple[UpstreamProtocol, ResponseHead]:
        """One attempt: TCP connect, send the head (and any body so far), read the answer's head."""
        client = self._transport
        if client is None:
            raise asyncio.CancelledError
        backend = decision.backend.config
        timeout = self._ctx.config.timeouts.backend_connect
        upstream: UpstreamProtocol | None = None
        try:
            async with asyncio.timeout(timeout):
                upstream = await connect(backend, client)
                assert upstream.transport is not None
                upstream.transport.write(forwarded)
                if self._buffer:
                    upstream.transport.write(bytes(self._buffer))
                    self._buffer.clear()
                    client.resume_reading()
                self._forward = upstream.transport  # the request body streams from here on
                response = await upstream.read_head()
        except BaseException as exc:  # also cancellation: the client left mid-handshake
            self._forward = None
            if upstream is not None and upstream.transport is not None:
                upstream.transport.abort()
            if not isinstance(exc, (TimeoutError, ConnectionError, BadRequest)):
                raise
            cause = f"no answer within {timeout:g}s" if isinstance(exc, TimeoutError) else str(exc)
            raise BackendConnectError(
                backend.id, backend.address, cause, request_sent=upstream is not None
            ) from exc
        return upstream, response

    async def _answer_and_join(
        self,
        request: RequestHead,
        websocket: bool,
        pool: PoolState,
        decision: Decision,
        upstream: UpstreamProtocol,
        response: ResponseHead,
        lookup: TokenLookup,
        now: float,
    ) -> None:
        ctx = self._ctx
        client, server = self._transport, upstream.transport
        if client is None or server is None:
            raise asyncio.CancelledError
        while 100 <= response.status < 200 and response.status != 101:
            # Interim answers (100 Continue) go to the client as they are.
            client.write(render_client_response(response, switching=True, set_cookies=[], extra=[]))
            async with asyncio.timeout(ctx.config.timeouts.backend_connect):
                response = await upstream.read_head()
        switching = websocket and response.status == 101
        client.write(self._client_head(response, switching, decision, lookup, now, pool.name))
        ctx.observations.observe_handshake(pool.name, time.time() - now)
        self._count(pool, decision, "switched" if switching else ("refused" if websocket else "answered"))
        log_request(
            client=self._client_ip, method=request.method, path=request.path, pool=pool.name,
            backend=decision.backend.id, affinity=decision.reason, status=response.status,
        )
        framer = None if switching else response_framer(response, request_method=request.method)
        to_server = bytes(self._buffer)
        self._buffer.clear()
        self._forward = None
        self._release()
        self._transport = None  # the tunnel owns both transports from here on
        Tunnel.join(
            ctx, decision.backend, client, server,
            client_ip=self._client_ip, pool=pool.name,
            to_server=to_server, to_client=upstream.take_buffer(), framer=framer,
            server_closed=upstream.closed,
        )

    def _client_head(
        self,
        response: ResponseHead,
        switching: bool,
        decision: Decision,
        lookup: TokenLookup,
        now: float,
        pool: str,
    ) -> bytes:
        """The backend's answer plus the affinity token, as the mode wants it."""
        affinity = self._ctx.config.affinity
        claim = lookup.claim
        session = claim.session if claim is not None else os.urandom(SESSION_BYTES)

        def seal(app_value: str | None) -> str:
            return self._ctx.codec.seal(
                Claim(
                    backend_id=decision.backend.id, issued_at=int(now), session=session,
                    app_value=app_value, pool=pool,
                ),
                os.urandom(NONCE_BYTES),
            )

        def unsealed(app_value: str) -> None:
            self._ctx.stats.unsealed_cookies[pool] += 1
            log.warning(
                "backend %s set a %d-byte %s cookie, too large to seal: passed to the client unsealed "
                "(no affinity for it)", decision.backend.id, len(app_value), affinity.cookie,
            )

        if affinity.mode is AffinityMode.REWRITE:
            pool_config = self._ctx.pools[pool].config
            if pool_config.balance in HASHED_METHODS and not pool_config.sticky:
                return render_client_response(response, switching=switching, set_cookies=[], extra=[])
            rewrite, token = rewrite_response_cookies(
                response, affinity, seal, others=lookup.others, on_unsealed=unsealed
            )
            extra = [(affinity.header, token)] if token else []
            return render_client_response(
                response, switching=switching, set_cookies=[], extra=extra, rewrite_set_cookie=rewrite
            )
        if not decision.issue_cookie:
            return render_client_response(response, switching=switching, set_cookies=[], extra=[])
        token = join_pins(lookup.others, seal(None))
        secure = affinity.secure is SecureMode.ALWAYS or (affinity.secure is SecureMode.AUTO and self._tls)
        cookie = render_set_cookie(
            affinity.cookie, token, max_age=int(affinity.max_age), same_site=affinity.same_site,
            http_only=affinity.http_only, secure=secure,
        )
        return render_client_response(
            response, switching=switching, set_cookies=[cookie], extra=[(affinity.header, token)]
        )

    def _count(self, pool: PoolState, decision: Decision, outcome: str) -> None:
        backend = decision.backend
        backend.handshakes += 1
        if decision.reason == "hit":
            backend.affinity_hits += 1
        elif decision.reason == "redispatch":
            backend.redispatches += 1
        stats = self._ctx.stats
        stats.handshakes[(pool.name, backend.id, outcome)] += 1
        stats.decisions[(pool.name, decision.reason)] += 1


def _has_body(request: RequestHead) -> bool:
    head = request.head
    return bool(head.get_all("transfer-encoding")) or (head.get("content-length") or "0") != "0"

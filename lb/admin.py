"""The admin API on its own address: /healthz, /status, /metrics, and bearer-protected operator actions.

    GET  /healthz                                   200 while serving, 503 once shutting down
    GET  /status                                    pools, backends, states with reasons, counters
    GET  /metrics                                   Prometheus text exposition
    GET  /  and  GET /lookup?token=T                the operator's console (lb.console)
    POST /pools/{pool}/backends/{id}/{action}       drain | disable | enable (Authorization: Bearer)
"""

from __future__ import annotations

import hmac
import time
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from lb.durations import parse_duration
from lb.migration import DEFAULT_MIGRATION_RATE
from lb.pool import AdminAction, BackendStatus

if TYPE_CHECKING:
    from lb.balancer import Balancer

BALANCER: web.AppKey[Balancer] = web.AppKey("balancer")


def make_admin_app(balancer: Balancer) -> web.Application:
    app = web.Application()
    app[BALANCER] = balancer
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/status", status)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/pools/{pool}/backends/{backend}/{action}", backend_action)
    # The operator's console: GET / (dashboard) and GET /lookup (imported here: it imports this module).
    from lb.console import add_console_routes

    add_console_routes(app)
    return app


async def healthz(request: web.Request) -> web.Response:
    if not request.app[BALANCER].ctx.accepting:
        return web.json_response({"status": "shutting down"}, status=503)
    return web.json_response({"status": "ok"})


async def status(request: web.Request) -> web.Response:
    return web.json_response(status_document(request.app[BALANCER]))


def status_document(balancer: Balancer) -> dict[str, Any]:
    ctx = balancer.ctx
    pools: dict[str, Any] = {
        pool.name: {
            "balance": pool.config.balance.value,
            "slow_start": pool.config.slow_start,
            "backends": [_backend_document(b) for b in pool.backends.values()],
        }
        for pool in ctx.pools.values()
    }
    # Backends a reload removed stay visible while their last tunnels run.
    for name, backend in balancer.retired_backends():
        entry = pools.setdefault(name, {"balance": None, "backends": []})
        entry["backends"].append({**_backend_document(backend), "state": "removed"})
    return {
        "pools": pools,
        "tunnels": balancer.live_tunnels(),
        "role": balancer.role.value,
        "listeners": [f"{host}:{port}" for host, port in balancer.listen_addresses],
        "accepting": ctx.accepting,
        "time": time.time(),
    }


def _backend_document(b: BackendStatus) -> dict[str, Any]:
    return {
        "id": b.id,
        "address": b.config.address,
        "weight": b.config.weight,
        "effective_weight": b.weight,
        "state": b.state.value,
        "reason": b.reason,
        "connections": b.connections,
        "max_connections": b.config.max_connections,
        "handshakes": b.handshakes,
        "affinity_hits": b.affinity_hits,
        "redispatches": b.redispatches,
        "health": {"passing": b.healthy, "successes": b.successes, "failures": b.failures},
        "migrating": b.migrating,
        "changed_at": b.changed_at or None,
    }


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[BALANCER].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def _authorized(request: web.Request, token: str | None) -> bool:
    if token is None:
        return False
    scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
    # Constant-time: the comparison must not tell an attacker how much of the token matched.
    return scheme.lower() == "bearer" and hmac.compare_digest(presented.strip().encode(), token.encode())


async def backend_action(request: web.Request) -> web.Response:
    """POST /pools/{pool}/backends/{id}/{drain|disable|enable}[?close_after=30s&rate=5].

    `close_after` and `rate` (also accepted as a JSON body) ask for migration:
    after the delay, the backend's tunnels are closed with 1012 at that rate.
    """
    balancer = request.app[BALANCER]
    if not _authorized(request, balancer.ctx.config.admin.token):
        return _error(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})
    try:
        action = AdminAction(request.match_info["action"])
    except ValueError:
        return _error(404, "action must be drain, disable or enable")
    pool = balancer.ctx.pools.get(request.match_info["pool"])
    backend_id = request.match_info["backend"]
    if pool is None or pool.get(backend_id) is None:
        return _error(404, "unknown pool or backend")
    try:
        close_after, rate = await _migration_params(request)
    except ValueError as exc:
        return _error(400, str(exc))
    state = balancer.apply_admin(pool.name, backend_id, action, close_after=close_after, rate=rate)
    answer: dict[str, Any] = {"pool": pool.name, "id": backend_id, "state": state.value}
    if close_after is not None or rate is not None:
        answer["close_after"] = close_after or 0.0
        answer["rate"] = rate or DEFAULT_MIGRATION_RATE
    return web.json_response(answer)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


# For other admin route modules (lb.console): the same bearer check and error body.
authorized = _authorized
error_response = _error


async def _migration_params(request: web.Request) -> tuple[float | None, float | None]:
    params: dict[str, Any] = dict(request.query)
    if request.can_read_body and request.content_type == "application/json":
        try:
            body = await request.json()
        except ValueError:
            raise ValueError("body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ValueError("body must be a JSON object")
        params.update(body)
    close_after = rate = None
    if params.get("close_after") is not None:
        try:
            close_after = parse_duration(params["close_after"])
        except (ValueError, TypeError) as exc:
            raise ValueError(f"close_after: {exc}") from None
    if params.get("rate") is not None:
        try:
            rate = float(params["rate"])
        except (ValueError, TypeError):
            rate = -1.0
        if not 0 < rate <= 100_000:
            raise ValueError(f"rate: expected connections per second above 0, got {params['rate']!r}")
    return close_after, rate

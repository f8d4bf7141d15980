"""`GET /pools/{pool}/route?key=K`: where a new client with key K goes now, in a source or hash pool.

A push dispatcher asks any balancer instance which gateway holds a user, with
no user→gateway table to keep in sync: the answer is a pure function of the
key, the backends taking new clients and their weights (`route_for_key`), so
every instance with the same config and health view gives the same one.

For `balance: source` the key is a client IP address; for `balance: hash`
it is the `hash_key` value (the user id).  Error bodies carry a fixed reason
only: never the pool, a backend, or the key.
"""

from __future__ import annotations

import time

from aiohttp import web

from lb.affinity.balancing import BadKey, admin_key
from lb.affinity.decision import route_for_key
from lb.config.model import HASHED_METHODS
from lb.control.admin import BALANCER, error_response, key_values, refuse_parameters

MAX_KEY_CHARS = 4096
_ONE_KEY = "expected exactly one non-empty key parameter"
_TAKES = frozenset({"key"})


def add_route_endpoint(app: web.Application) -> None:
    """Register the handler on the admin application."""
    app.router.add_get("/pools/{pool}/route", pool_route)


async def pool_route(request: web.Request) -> web.Response:
    """200 `{"backend": ID}`; 400 not a source/hash pool or bad key; 404 unknown pool; 503 no backend."""
    pool = request.app[BALANCER].ctx.pools.get(request.match_info["pool"])
    if pool is None:
        return _error(404, "unknown pool")
    if pool.config.balance not in HASHED_METHODS:
        return _error(400, "route lookup needs a pool with balance: source or hash")
    refuse_parameters(request, _TAKES)  # as every endpoint: "unknown parameter", named in the log line
    keys = key_values(request)
    if len(keys) != 1 or not keys[0]:
        return _error(400, _ONE_KEY)
    if len(keys[0]) > MAX_KEY_CHARS:
        return _error(400, "key too long")
    try:
        key = admin_key(pool.config.balance, keys[0])  # as a request's key is read
    except BadKey as exc:
        return _error(400, str(exc))
    backend = route_for_key(pool, key, time.time())
    if backend is None:
        return _error(503, "no backend takes new clients", headers={"Retry-After": "1"})
    return web.json_response({"backend": backend.id})

_error = error_response  # the admin API's one JSON error shape (reason and request id)

"""The operator's console on the admin port: the live dashboard (`GET /`) and session lookup (`GET /lookup`).

    GET /                    one self-contained HTML page (no external asset, for closed networks):
                             every pool and backend, live from /status every second, with
                             drain / disable / enable buttons that post to the admin API
    GET /lookup?token=T      bearer; which backend holds this session now (`lb.control.lookup`)
                             [&pool=P to pick the pool when several have a backend of that id]

The page is read once at import; its inline script and style are allowed by
hash in a Content-Security-Policy, so nothing else can run on the admin origin.
What the page does with /status is in `dashboard.html` itself.  The admin API
(`lb.control.admin`) owns the app, authorization and the other endpoints; this module
only adds its two routes (`add_console_routes`).
"""

from __future__ import annotations

import base64
import hashlib
import html
import re
import time
from collections.abc import Mapping
from importlib import resources
from typing import Any

from aiohttp import web

from lb.affinity.balancing import BadKey
from lb.control.admin import (
    BALANCER,
    STATUS_RENDER,
    LargeAnswer,
    error_response,
    key_values,
    make_room,
    refuse_parameters,
    refused,
)
from lb.control.admin_route import MAX_KEY_CHARS
from lb.control.lookup import lookup_token
from lb.control.status_document import backends_per_pool, status_document
from lb.ctl import shown_discovery_value

LOOKUP_PARAMS = frozenset({"token", "pool", "key"})
MAX_TOKEN_PARAM = 4096  # longer than any token we issue (lb.affinity.codec.MAX_TOKEN_CHARS)


SNAPSHOT_MARK = "<!--SNAPSHOT-->"


def _load_page() -> tuple[str, str]:
    page = resources.files(__package__).joinpath("dashboard.html").read_text(encoding="utf-8")

    def digest(body: str) -> str:
        return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"

    scripts = " ".join(digest(m) for m in re.findall(r"<script>(.*?)</script>", page, re.S))
    styles = " ".join(digest(m) for m in re.findall(r"<style>(.*?)</style>", page, re.S))
    policy = (
        f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; "
        "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )
    if SNAPSHOT_MARK not in page:
        raise RuntimeError(f"dashboard.html lost its {SNAPSHOT_MARK} marker")
    return page, policy


_PAGE, _POLICY = _load_page()


def add_console_routes(app: web.Application) -> None:
    """Register GET / and GET /lookup on the admin app."""
    app.router.add_get("/", dashboard)
    app.router.add_get("/lookup", lookup)


# Backends the page's snapshot lists, at most, over all pools; its live table, from /status, lists every one.
# Listed whole, 5,000 backends made a page of 760 KB in 30 ms of the event loop, unasked for by token:
# six clients asking in a loop held every handshake up by 170 ms.  Up to this many the page is about
# 100 KB and 3 ms, and renders wait their turn (/status's lock), one at a time.
SNAPSHOT_BACKENDS = 500


async def dashboard(request: web.Request) -> web.Response:
    # A page for people, not an API: a query string a browser, a bookmark or a link adds is ignored
    # (every JSON endpoint refuses unknown parameters; this page takes none and acts on nothing).
    balancer = request.app[BALANCER]
    async with request.app[STATUS_RENDER]:
        busy = make_room(request)
        if busy is not None:
            return busy
        snapshot = render_snapshot(status_document(balancer, SNAPSHOT_BACKENDS), backends_per_pool(balancer))
    return LargeAnswer(
        body=_PAGE.replace(SNAPSHOT_MARK, snapshot, 1).encode(),
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": _POLICY,
            # The buttons act on the balancer: never inside someone else's frame (clickjacking).
            "X-Frame-Options": "DENY",
            "X-Content-Type-Options": "nosniff",
            "Referrer-Policy": "no-referrer",
            "Cache-Control": "no-store",
        },
    )


async def lookup(request: web.Request) -> web.Response:
    """GET /lookup?token=T[&pool=P][&key=K]: 200 with the answer (valid or not), 400 without a token or
    with a key the pool cannot hash, 401 without bearer, 404 for a `pool` the configuration does not
    have (as /pools/{pool}/... answers)."""
    balancer = request.app[BALANCER]
    ctx = balancer.ctx
    if (refusal := refused(request, ctx.config.admin.token)) is not None:
        return refusal
    refuse_parameters(request, LOOKUP_PARAMS)
    token = request.query.get("token", "")
    if not token:
        return error_response(400, "token: query parameter is required (/lookup?token=...)")
    pool = request.query.get("pool")
    if pool == "":
        return error_response(400, "pool: empty (leave the parameter out to search every pool)")
    if pool is not None and pool not in ctx.pools:
        return error_response(404, "unknown pool")
    keys = key_values(request)  # one at most (refuse_parameters)
    key = keys[0] if keys else None
    if key == "":
        return error_response(400, "key: empty (leave the parameter out when the client has none)")
    if key is not None and len(key) > MAX_KEY_CHARS:
        return error_response(400, "key too long")
    if len(token) > MAX_TOKEN_PARAM:
        return web.json_response({"valid": False, "reason": "malformed"})
    affinity = ctx.config.affinity
    try:
        answer = lookup_token(
            token,
            ctx.codec,
            ctx.pools,
            now=time.time(),
            max_age=affinity.max_age,
            grace=affinity.redispatch_grace,
            pool=pool,
            key=key,
        )
    except BadKey as exc:  # a key the token's pool cannot hash: a fixed reason, never the key
        return error_response(400, str(exc))
    return web.json_response(answer)


_SNAPSHOT_COLUMNS = (
    ("backend", "id"), ("address", "address"), ("state", "state"), ("reason", "reason"),
    ("tunnels", "connections"), ("handshakes", "handshakes"), ("sticky hits", "affinity_hits"),
    ("redispatches", "redispatches"),
)


def render_snapshot(document: dict[str, Any], backends: Mapping[str, int] | None = None) -> str:
    """The /status document as plain HTML tables: what the page shows before its script has run, or without it.

    `backends`: how many each pool has, where the document lists fewer (`SNAPSHOT_BACKENDS`); the
    table then says how many more there are.  Everything from the document is escaped: backend ids,
    reasons and discovery errors come from configuration, DNS and backends' answers.
    """
    out = ['<div id="snapshot" class="snapshot">']
    for pool_name, pool in document.get("pools", {}).items():
        out.append(f"<h2>{html.escape(str(pool_name))}</h2>")
        discovery = pool.get("discovery")
        if isinstance(discovery, dict):
            parts = ", ".join(f"{html.escape(str(k))}: {html.escape(shown_discovery_value(str(k), v))}"
                              for k, v in discovery.items())
            out.append(f"<p>discovery: {parts}</p>")
        # Eight columns are wider than a phone: the table scrolls in its own box, not the page.
        out.append('<div class="wide"><table><tr>' + "".join(f"<th>{title}</th>" for title, _ in _SNAPSHOT_COLUMNS)
                   + "</tr>")
        listed = pool.get("backends", [])
        for backend in listed:
            # /status keeps SPEC's four states (a removed backend is `disabled`, `removed: true`); the page
            # says `removed`, as its live table and `lb ctl status` do.
            shown = {**backend, "state": "removed"} if backend.get("removed") is True else backend
            cells = "".join(f"<td>{html.escape(str(shown.get(key, '')))}</td>" for _, key in _SNAPSHOT_COLUMNS)
            out.append(f'<tr data-state="{html.escape(str(shown.get("state", "")))}">{cells}</tr>')
        out.append("</table></div>")
        more = (backends or {}).get(str(pool_name), len(listed)) - len(listed)
        if more > 0:
            out.append(f"<p>and {more} more backend{'s' if more > 1 else ''} (/status lists every one)</p>")
    out.append("</div>")
    return "\n".join(out)


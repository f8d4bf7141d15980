"""The demo gateway's aiohttp application: `/ws`, `/health`, `/whoami`, `/whoami/details`, `POST /drain`
and `POST /undrain`.

It owns what a backend behind the balancer shows to tests and to the demo:
which server answered (`server_id`), which cookies and `X-Forwarded-*` headers
reached it, and an echo that returns every WebSocket message and close frame
unchanged.  With `app_cookie` it plays a gateway that sets its own session
cookie (the balancer's rewrite mode).  Process start-up, flags and signals
belong to `backends_demo.__main__`.

Draining itself: `POST /drain` makes `/health` answer (still 200)
`{"status": "draining", ...}` with the header `X-Backend-State: draining`,
which balancers read as "no new clients, keep the cookie holders"; `POST
/undrain` returns it to `ok`.  A Kubernetes preStop hook calls `/drain`, so a
rolling update empties each gateway gently across every balancer replica.
With `close_spread` (`--close-spread SECONDS`), shutdown closes the players
still connected with 1012 (Service Restart) spread evenly over that window
(one every SECONDS/N, the last at its end, as the balancer's own shutdown
spreads its 1001s), after the gateway has stopped listening: each reconnects at
the gateway's pace, finds it gone, and is redispatched by the balancer.  Every
close the gateway starts, shutdown's included, waits for the client's close
frame (up to `CLOSE_ANSWER_WAIT`) before it closes TCP (RFC 6455 §7.1.1).

WebSocket behaviour on `/ws`:

- the first message is one text frame, the JSON `hello` (see `describe_request`);
- every later text or binary message is sent back unchanged;
- a close frame from the client is answered with the same code and reason;
- the text message `{"type": "close", "code": N, "reason": "..."}` makes the
  gateway close first, with that code and reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import secrets
from typing import Any

from aiohttp import WSCloseCode, WSMsgType, web

# Subprotocols the gateway accepts, so negotiation through the balancer can be tested.
SUBPROTOCOLS = ("chat", "superchat")
# Room for the 16 MiB messages the pass-through tests send, plus headroom.
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The largest request head the balancer forwards (the top of `limits.max_header_bytes`); a header
# line is at least 4 bytes (`a:` and CRLF), hence the count.
MAX_HEAD_BYTES = 1024 * 1024
# Seconds a close the gateway starts waits for the client's close frame before it closes TCP.
CLOSE_ANSWER_WAIT = 2.0

SERVER_ID = web.AppKey("server_id", str)
APP_COOKIE: web.AppKey[str | None] = web.AppKey("app_cookie")
PLAYERS: web.AppKey[dict[_Player, None]] = web.AppKey("players")  # live WebSockets, oldest first
DRAINING: web.AppKey[list[bool]] = web.AppKey("draining")  # one mutable cell: apps freeze their mapping
CLOSE_SPREAD = web.AppKey("close_spread", float)
STATE_HEADER = "X-Backend-State"

# Close codes an endpoint may put in a close frame (RFC 6455 §7.4.1, §7.4.2).
_SENDABLE_CLOSE_CODES = frozenset((*range(1000, 1004), *range(1007, 1015), *range(3000, 5000)))


def make_app(server_id: str, app_cookie: str | None = None, close_spread: float = 0.0) -> web.Application:
    """Build the gateway application.

    Args:
        server_id: the id every answer reports (`gw-1`).
        app_cookie: if set, the name of a session cookie the gateway plants on
            `/ws`, `/whoami` and `/whoami/details` answers to requests that do not carry it.
        close_spread: seconds over which shutdown closes live WebSockets with
            1012, one after another; 0 closes them all at once with 1001.

    Returns:
        The application, ready for `web.run_app` or an `AppRunner`.
    """
    # Heads as large as the balancer lets through (`limits.max_header_bytes`, at most 1 MiB): aiohttp's
    # own limits (8,190 bytes a line, 128 headers) refused heads the balancer had passed.
    app = web.Application(handler_args={
        "max_line_size": MAX_HEAD_BYTES, "max_field_size": MAX_HEAD_BYTES, "max_headers": MAX_HEAD_BYTES // 4,
    })
    app[SERVER_ID] = server_id
    app[APP_COOKIE] = app_cookie
    app[PLAYERS] = {}
    app[DRAINING] = [False]
    app[CLOSE_SPREAD] = close_spread
    app.router.add_get("/ws", handle_ws)
    app.router.add_get("/health", handle_health)
    app.router.add_post("/drain", handle_drain)
    app.router.add_post("/undrain", handle_undrain)
    app.router.add_get("/whoami", handle_whoami)
    app.router.add_get("/whoami/details", handle_whoami_details)
    app.on_shutdown.append(_close_left_players)
    return app


def describe_request(request: web.Request, app_cookie_set: str | None) -> dict[str, Any]:
    """What the gateway reports about a request in `hello` and `/whoami/details`.

    `peer` is the TCP peer address (the balancer, or the client when connected
    directly); `app_cookie` is the value of the app cookie the request carried;
    `app_cookie_set` is the value this response sets (both null without one).
    """
    name = request.app[APP_COOKIE]
    return {
        "server_id": request.app[SERVER_ID],
        "forwarded_for": request.headers.get("X-Forwarded-For"),
        "forwarded_proto": request.headers.get("X-Forwarded-Proto"),
        "forwarded_host": request.headers.get("X-Forwarded-Host"),
        "peer": request.remote,
        "cookies": sorted(request.cookies),
        "app_cookie": request.cookies.get(name) if name else None,
        "app_cookie_set": app_cookie_set,
    }


def _plant_app_cookie(request: web.Request, response: web.StreamResponse) -> str | None:
    """Set the app cookie on `response` unless the request carries it; return the value set."""
    name = request.app[APP_COOKIE]
    if name is None or name in request.cookies:
        return None
    value = secrets.token_urlsafe(16)  # a fresh session id
    response.set_cookie(name, value, path="/", httponly=True)
    return value


async def handle_health(request: web.Request) -> web.Response:
    draining = request.app[DRAINING][0]
    return web.json_response(
        {"status": "draining" if draining else "ok", "server_id": request.app[SERVER_ID]},
        headers={STATE_HEADER: "draining" if draining else "up"},
    )


async def handle_drain(request: web.Request) -> web.Response:
    """Ask every balancer for no new clients (through /health); live sockets stay."""
    if (refused := _not_from_this_host(request)) is not None:
        return refused
    request.app[DRAINING][0] = True
    return web.json_response({"status": "draining", "server_id": request.app[SERVER_ID]})


async def handle_undrain(request: web.Request) -> web.Response:
    if (refused := _not_from_this_host(request)) is not None:
        return refused
    request.app[DRAINING][0] = False
    return web.json_response({"status": "ok", "server_id": request.app[SERVER_ID]})


# Headers a proxy adds to what it forwards (ours always sets X-Forwarded-For).
_FORWARDED = ("X-Forwarded-For", "Forwarded", "X-Real-IP")


def _not_from_this_host(request: web.Request) -> web.Response | None:
    """A 403 for a drain or undrain not asked from this host itself, or None.

    The route that reaches `/ws` reaches these paths too: through the balancer, any player could drain
    every gateway (each new player then gets a 503), or undo a rolling update's drain with the cookie
    of a gateway on its way out.  The preStop hook asks on loopback, directly.
    """
    try:
        local = ipaddress.ip_address(request.remote or "").is_loopback
    except ValueError:
        local = False
    if local and not any(name in request.headers for name in _FORWARDED):
        return None
    return web.json_response({"error": "drain and undrain are asked from the gateway's own host, not through a proxy"},
                             status=403)


async def handle_whoami(request: web.Request) -> web.Response:
    """`{"server_id": ID}` and nothing else, as the product's contract gives it (plain-HTTP affinity)."""
    response = web.json_response({"server_id": request.app[SERVER_ID]})
    _plant_app_cookie(request, response)
    return response


async def handle_whoami_details(request: web.Request) -> web.Response:
    """Everything `hello` says of the request (`describe_request`), for plain HTTP."""
    response = web.Response(content_type="application/json")
    planted = _plant_app_cookie(request, response)
    response.text = json.dumps(describe_request(request, planted))
    return response


class _Player:
    """One live WebSocket on `/ws`, and how shutdown asks its handler to close it.

    Shutdown does not call `ws.close()` itself: from another task, while the handler waits in
    `receive()`, aiohttp sends the close frame and closes TCP at once, so a client not reading at
    that moment (or answering the close then) saw 1006 instead of the code.  It sets `stop` and
    interrupts the handler's `receive()`; the handler then closes, and waits for the client's close
    frame (up to `CLOSE_ANSWER_WAIT`) before TCP goes.
    """

    __slots__ = ("echo", "finished", "receiving", "stop", "ws")

    def __init__(self, ws: web.WebSocketResponse) -> None:
        self.ws = ws
        self.echo: asyncio.Task[None] | None = None
        self.receiving = False  # the echo task waits in receive(), where cancelling it loses nothing
        self.stop: tuple[int, bytes] | None = None  # the close shutdown asked for
        self.finished = asyncio.Event()  # the handler is done with the socket

    def shut_down(self, code: int, reason: bytes) -> None:
        if self.stop is not None or self.ws.closed:
            return
        self.stop = (code, reason)
        if self.receiving and self.echo is not None:
            self.echo.cancel()  # mid-send, the echo loop sees `stop` once the send is done


async def handle_ws(request: web.Request) -> web.WebSocketResponse:
    ws = web.WebSocketResponse(
        protocols=SUBPROTOCOLS,
        compress=True,
        max_msg_size=MAX_MESSAGE_BYTES,
        autoclose=False,  # we answer close frames ourselves, echoing code and reason
        timeout=CLOSE_ANSWER_WAIT,  # how long a close we start waits for the client's close frame
    )
    # Headers set before prepare() go out on the 101 response.
    planted = _plant_app_cookie(request, ws)
    await ws.prepare(request)
    player = _Player(ws)
    players = request.app[PLAYERS]
    players[player] = None
    try:
        await ws.send_str(json.dumps({"type": "hello", **describe_request(request, planted)}))
        player.echo = asyncio.create_task(_echo(player))
        await player.echo
        if player.stop is not None and not ws.closed:
            await ws.close(code=player.stop[0], message=player.stop[1])
    except ConnectionError:
        pass  # the client went away mid-send (a reset, a phone off the network): nothing to report
    finally:
        players.pop(player, None)
        if not ws.closed:
            await ws.close()
        player.finished.set()
    return ws


async def _echo(player: _Player) -> None:
    ws = player.ws
    while player.stop is None:
        player.receiving = True
        try:
            msg = await ws.receive()
        except asyncio.CancelledError:
            if player.stop is None:
                raise
            if (task := asyncio.current_task()) is not None:
                task.uncancel()  # shutdown's cancel: handle_ws closes with `stop`
            return
        finally:
            player.receiving = False
        if msg.type is WSMsgType.TEXT:
            command = _close_command(msg.data)
            if command is None:
                await ws.send_str(msg.data)
            else:
                await ws.close(code=command[0], message=command[1].encode())
                return
        elif msg.type is WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
        elif msg.type is WSMsgType.CLOSE:
            code = msg.data if msg.data in _SENDABLE_CLOSE_CODES else WSCloseCode.OK
            await ws.close(code=code, message=(msg.extra or "").encode())
            return
        else:  # CLOSING, CLOSED, ERROR: the connection is gone
            return


def _close_command(text: str) -> tuple[int, str] | None:
    """Parse `{"type": "close", "code": N, "reason": "..."}`; None for any other text."""
    if not text.startswith("{"):
        return None
    try:
        data = json.loads(text)
    except ValueError:
        return None
    if (
        not isinstance(data, dict)
        or data.get("type") != "close"
        or not set(data) <= {"type", "code", "reason"}
        or not isinstance(data.get("code"), int)
        or not isinstance(data.get("reason", ""), str)
    ):
        return None
    return data["code"], data.get("reason", "")


async def close_players(app: web.Application) -> None:
    """Close the live WebSockets: all at once with 1001, or with 1012 over `close_spread`.

    Spread as the balancer spreads its own 1001s: one every spread/N, oldest first, the last at the
    end of the window.  Returns once every handler is done, or a little after the last close could
    have had its answer.  `python -m backends_demo` calls this once it has stopped listening and
    before aiohttp's shutdown: from then on aiohttp drops what clients send (their close frames too).
    """
    players = list(app[PLAYERS].keys())  # a copy: handlers remove their player as they finish
    code, reason = _shutdown_close(app)
    spread = app[CLOSE_SPREAD]
    if spread <= 0 or not players:
        for player in players:
            player.shut_down(code, reason)
    else:
        # Evenly over the window, never all at once: reconnects arrive at a pace the others can take.
        loop = asyncio.get_running_loop()
        start, step = loop.time(), spread / len(players)
        for index, player in enumerate(players, 1):
            await asyncio.sleep(max(0.0, start + index * step - loop.time()))
            player.shut_down(code, reason)
    with contextlib.suppress(TimeoutError):  # a handler stuck in a send: aiohttp's shutdown ends it
        await asyncio.wait_for(asyncio.gather(*(p.finished.wait() for p in players)), CLOSE_ANSWER_WAIT + 1.0)


async def _close_left_players(app: web.Application) -> None:
    """aiohttp's shutdown (`on_shutdown`): close whoever `close_players` did not, all at once.

    Those are the players of a shutdown hurried by a second signal, or of an embedder that went
    straight to `AppRunner.cleanup()`; their close frames no longer reach us (see `close_players`), so
    each handler gives up on the answer after `CLOSE_ANSWER_WAIT`.
    """
    code, reason = _shutdown_close(app)
    for player in list(app[PLAYERS].keys()):
        player.shut_down(code, reason)


def _shutdown_close(app: web.Application) -> tuple[int, bytes]:
    if app[CLOSE_SPREAD] > 0:
        return WSCloseCode.SERVICE_RESTART, b"gateway restarting"
    return WSCloseCode.GOING_AWAY, b"server shutdown"

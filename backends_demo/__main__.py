"""`python -m backends_demo`: run one demo gateway in the foreground.

This module owns the command line and the process: flags, the listening
socket, the one-line start-up message, and a clean exit 0 on SIGTERM/SIGINT:
stop listening, close the live WebSockets (1001, or 1012 over `--close-spread`)
while their close frames can still be read, then aiohttp's shutdown.  A second
signal skips what is left of the spread.  What the gateway answers lives in
`backends_demo.app`.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import re
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from backends_demo.app import SERVER_ID, close_players, make_app

SHUTDOWN_TIMEOUT = 5.0
# A cookie name is an HTTP token (RFC 6265 §4.1.1, RFC 9110 §5.6.2), as the balancer's config takes it.
_COOKIE_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port: {text!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0 to 65535, got {port}")
    return port


def _server_id(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("the server id must not be empty")
    return text


def _cookie_name(text: str) -> str:
    if not _COOKIE_NAME.fullmatch(text):
        raise argparse.ArgumentTypeError(f"a cookie name is letters, digits and !#$%&'*+-.^_`|~, got {text!r}")
    return text


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds: {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or more seconds, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m backends_demo", description="Run one demo gateway.")
    parser.add_argument(
        "--id", required=True, dest="server_id", type=_server_id, help="server id reported to clients"
    )
    parser.add_argument("--port", required=True, type=_port, help="TCP port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--app-cookie", default=None, metavar="NAME", type=_cookie_name,
        help="plant a session cookie NAME (rewrite mode)",
    )
    parser.add_argument(
        "--close-spread", default=0.0, type=_seconds, metavar="SECONDS",
        help="on SIGTERM, close live WebSockets with 1012 spread over this many seconds (default: all at once, 1001)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    app = make_app(args.server_id, app_cookie=args.app_cookie, close_spread=args.close_spread)
    try:
        asyncio.run(serve(app, args.host, args.port))
    except OSError as exc:  # port taken, address not available
        print(f"gateway {args.server_id}: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve until SIGTERM/SIGINT, then stop listening, close the players, and shut down.

    Not `web.run_app`: its shutdown stops reading every connection before `on_shutdown` runs, so a
    close sent from there could not get the client's close frame back; the players are closed here,
    between the listener's end and aiohttp's shutdown.
    """
    loop = asyncio.get_running_loop()
    stopping, hurried = asyncio.Event(), asyncio.Event()

    def on_signal() -> None:
        (hurried if stopping.is_set() else stopping).set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        bound = runner.addresses[0][1] if port == 0 and runner.addresses else port  # --port 0: the one picked
        print(f"gateway {app[SERVER_ID]} listening on {host}:{bound}", flush=True)
        await stopping.wait()
        await site.stop()  # no new players
        closing = asyncio.create_task(close_players(app))
        hurry = asyncio.create_task(hurried.wait())
        await asyncio.wait((closing, hurry), return_when=asyncio.FIRST_COMPLETED)
        for task in (closing, hurry):
            task.cancel()
    finally:
        await runner.cleanup()  # closes, at once, whoever is left


if __name__ == "__main__":
    raise SystemExit(main())

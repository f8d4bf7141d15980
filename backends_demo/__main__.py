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
import signal
import sys
from collections.abc import Sequence

from aiohttp import web

from backends_demo.app import close_players, make_app

SHUTDOWN_TIMEOUT = 5.0


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m backends_demo", description="Run one demo gateway.")
    parser.add_argument("--id", required=True, dest="server_id", help="server id reported to clients")
    parser.add_argument("--port", required=True, type=int, help="TCP port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    parser.add_argument(
        "--app-cookie", default=None, metavar="NAME", help="plant a session cookie NAME (rewrite mode)"
    )
    parser.add_argument(
        "--close-spread", default=0.0, type=float, metavar="SECONDS",
        help="on SIGTERM, close live WebSockets with 1012 spread over this many seconds (default: all at once, 1001)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    app = make_app(args.server_id, app_cookie=args.app_cookie, close_spread=max(0.0, args.close_spread))
    banner = f"gateway {args.server_id} listening on {args.host}:{args.port}"
    try:
        asyncio.run(serve(app, args.host, args.port, banner))
    except OSError as exc:  # port taken, address not available
        print(f"gateway {args.server_id}: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def serve(app: web.Application, host: str, port: int, banner: str) -> None:
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
        print(banner, flush=True)
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

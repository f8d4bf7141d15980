"""`python -m backends_demo`: run one demo gateway in the foreground.

This module owns the command line and the process: flags, the listening
socket, the one-line start-up message, and a clean exit 0 on SIGTERM/SIGINT
(aiohttp's `run_app` turns both into a graceful shutdown; live WebSockets get
close 1001).  What the gateway answers lives in `backends_demo.app`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from aiohttp import web

from backends_demo.app import make_app

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

    def announce(*_: object) -> None:
        print(banner, flush=True)

    try:
        web.run_app(
            app,
            host=args.host,
            port=args.port,
            print=announce,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT + max(0.0, args.close_spread),
        )
    except OSError as exc:  # port taken, address not available
        print(f"gateway {args.server_id}: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

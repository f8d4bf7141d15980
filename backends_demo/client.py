"""The reconnect proof: does a client that changes IP keep reaching the same gateway?

`python -m backends_demo.client --url ws://127.0.0.1:8080/ws` plays a phone
that loses its network: attempt 0 connects from the first source IP with no
cookie and keeps whatever cookies the `101 Switching Protocols` response sets;
every reconnect binds the next source IP (127.0.0.2, 127.0.0.3, ...), sends the
kept cookies in a `Cookie` header, reads the gateway's `hello`, checks one echo
and closes cleanly.  The table shows, per attempt, the source IP, the address
the gateway saw, the server id and a short digest of each cookie (never the
cookie itself).  Exit status: 0 if every attempt reached one server id, 1 if
not, 2 if an attempt could not complete (connection, TLS, handshake, echo).

`--no-cookies` plays a client without a cookie jar (what a layer-4
balancer sees: only the address), and `--header NAME:VALUE` adds a request
header to every attempt (e.g. `X-User-Id` for a `balance: hash` pool).

This module owns the client side only.  The cookie handling is deliberately
manual (no cookie jar): the proof must show the client holds nothing but the
cookies, exactly as a native app would.  `backends_demo.stack` imports
`prove_stickiness` and `render_table` for `make demo`.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import hashlib
import ipaddress
import json
import ssl
import sys
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http.cookies import CookieError, SimpleCookie
from types import SimpleNamespace

import aiohttp
from multidict import CIMultiDictProxy
from yarl import URL

DEFAULT_RECONNECTS = 5
DEFAULT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class CookieView:
    """A kept cookie as the table shows it: its name and a digest of its value, never the value."""

    name: str
    digest: str  # sha256(value)[:8]
    fresh: bool  # set (or replaced) by this attempt's 101 response


@dataclass(frozen=True, slots=True)
class Attempt:
    """One completed connection of the proof."""

    number: int  # 0 is the first connection, 1..N the reconnects
    source_ip: str  # the local address the client bound
    seen_ip: str | None  # the client address the gateway saw: last X-Forwarded-For hop, else its TCP peer
    server_id: str
    cookies: tuple[CookieView, ...]  # cookies held after this attempt


class ProofFailed(Exception):
    """An attempt could not complete; `attempts` holds the ones that did."""

    def __init__(self, message: str, attempts: Sequence[Attempt] = ()) -> None:
        super().__init__(message)
        self.attempts = tuple(attempts)


# --- cookies (pure) -----------------------------------------------------------


def cookie_digest(value: str) -> str:
    """Short, non-reversible name for a cookie value: the first 8 hex digits of its sha256."""
    return hashlib.sha256(value.encode()).hexdigest()[:8]


def parse_set_cookie(header: str) -> tuple[str, str | None] | None:
    """Read one `Set-Cookie` header value.

    Returns:
        `(name, value)` with the value exactly as sent (quotes kept), `(name,
        None)` when the header deletes the cookie (`Max-Age` of 0 or less), or
        None when the header holds no cookie.
    """
    jar: SimpleCookie = SimpleCookie()
    try:
        jar.load(header)
        if not jar:
            # SimpleCookie drops a whole header over one attribute it does not
            # know (e.g. `Partitioned`); the name=value pair is still good.
            jar.load(header.split(";", 1)[0])
    except CookieError:
        return None
    for name, morsel in jar.items():
        max_age = str(morsel["max-age"]).strip()
        try:
            expired = max_age != "" and int(max_age) <= 0  # RFC 6265 §5.2.2
        except ValueError:
            expired = False
        return name, None if expired else morsel.coded_value
    return None


def update_jar(jar: Mapping[str, str], set_cookie_headers: Iterable[str]) -> dict[str, str]:
    """Apply a response's `Set-Cookie` headers to the kept cookies; return the new cookies."""
    updated = dict(jar)
    for header in set_cookie_headers:
        parsed = parse_set_cookie(header)
        if parsed is None:
            continue
        name, value = parsed
        if value is None:
            updated.pop(name, None)
        else:
            updated[name] = value
    return updated


def render_cookie_header(jar: Mapping[str, str]) -> str | None:
    """The `Cookie` request header for the kept cookies (RFC 6265 §5.4), or None if there are none."""
    if not jar:
        return None
    return "; ".join(f"{name}={value}" for name, value in jar.items())


def describe_cookies(before: Mapping[str, str], after: Mapping[str, str]) -> tuple[CookieView, ...]:
    """Views of the cookies held after an attempt, marking those that are new or changed."""
    return tuple(
        CookieView(name, cookie_digest(value), fresh=before.get(name) != value)
        for name, value in sorted(after.items())
    )


# --- verdict and table (pure) -------------------------------------------------


def is_sticky(attempts: Sequence[Attempt]) -> bool:
    """True when there was at least one attempt and every attempt reached the same server id."""
    return bool(attempts) and len({a.server_id for a in attempts}) == 1


def verdict(attempts: Sequence[Attempt]) -> str:
    """One line: `STICKY: all 6 attempts reached gw-2 from 6 source IPs` or `NOT STICKY: ...`."""
    if not attempts:
        return "NOT STICKY: no attempt completed"
    ips = len({a.source_ip for a in attempts})
    ip_words = f"{ips} source IP{'' if ips == 1 else 's'}"
    if is_sticky(attempts):
        return f"STICKY: all {len(attempts)} attempts reached {attempts[0].server_id} from {ip_words}"
    counts = Counter(a.server_id for a in attempts)
    spread = ", ".join(f"{server} ({n})" for server, n in sorted(counts.items()))
    first_move = next(a.number for a in attempts if a.server_id != attempts[0].server_id)
    return (
        f"NOT STICKY: {len(attempts)} attempts from {ip_words} reached {len(counts)} servers: {spread};"
        f" first moved at attempt {first_move}"
    )


def _render_cookies(cookies: Sequence[CookieView]) -> str:
    if not cookies:
        return "-"
    return ", ".join(f"{c.name} sha256:{c.digest}{' (new)' if c.fresh else ''}" for c in cookies)


def render_table(attempts: Sequence[Attempt], *, include_verdict: bool = True) -> str:
    """The proof as a text table, one row per attempt, then (by default) the verdict line."""
    header = ("attempt", "source ip", "seen as", "server", "cookies")
    rows = [
        (str(a.number), a.source_ip, a.seen_ip or "-", a.server_id, _render_cookies(a.cookies))
        for a in attempts
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header) - 1)]

    def line(row: Sequence[str]) -> str:
        cells = [cell.ljust(width) for cell, width in zip(row, widths, strict=False)]
        return "  ".join([*cells, row[-1]])

    lines = [line(header), *(line(row) for row in rows)]
    if include_verdict:
        lines.append(verdict(attempts))
    return "\n".join(lines)


# --- the proof (I/O) ----------------------------------------------------------


def default_source_ips(count: int) -> tuple[str, ...]:
    """`count` loopback addresses from 127.0.0.2 up (Linux routes all of 127.0.0.0/8 to `lo`)."""
    return tuple(f"127.0.0.{2 + i}" for i in range(max(1, min(count, 253))))


def make_ssl_context(cafile: str | None) -> ssl.SSLContext | None:
    """A verifying client context trusting `cafile`, or None for the system defaults."""
    return None if cafile is None else ssl.create_default_context(cafile=cafile)


async def prove_stickiness(
    url: str,
    reconnects: int,
    source_ips: Sequence[str],
    ssl_context: ssl.SSLContext | None,
    timeout: float,  # noqa: ASYNC109 - a budget per attempt, not for the whole call
    *,
    keep_cookies: bool = True,
    headers: Mapping[str, str] | None = None,
    first_number: int = 0,
) -> list[Attempt]:
    """Connect once and reconnect `reconnects` times, each from the next source IP, keeping cookies.

    Args:
        url: the `ws://` or `wss://` URL of the balancer (or of one gateway).
        reconnects: how many reconnects follow the first connection.
        source_ips: local addresses to bind, used in turn and cycled.
        ssl_context: for `wss://`; None uses the system trust store.
        timeout: seconds each attempt (connect, hello, echo, close) may take.
        keep_cookies: False: send no cookie ever (a layer-4 view: only the address changes).
        headers: extra request headers for every attempt.
        first_number: the number of the first attempt (a run continued through another URL).

    Returns:
        One `Attempt` per connection, in order.

    Raises:
        ProofFailed: an attempt could not complete; it carries the attempts that did.
    """
    if not source_ips:
        raise ProofFailed("no source IPs to connect from")
    attempts: list[Attempt] = []
    jar: dict[str, str] = {}
    for number in range(first_number, first_number + reconnects + 1):
        source_ip = source_ips[number % len(source_ips)]
        try:
            attempt, jar = await asyncio.wait_for(
                _connect_once(url, number, source_ip, jar, ssl_context, headers or {}), timeout
            )
            if not keep_cookies:
                jar = {}
        except ProofFailed as exc:
            raise ProofFailed(f"attempt {number} from {source_ip}: {exc}", attempts) from None
        except TimeoutError:
            raise ProofFailed(
                f"attempt {number} from {source_ip}: no complete answer within {timeout:g}s", attempts
            ) from None
        except aiohttp.WSServerHandshakeError as exc:
            raise ProofFailed(
                f"attempt {number} from {source_ip}: WebSocket handshake refused:"
                f" HTTP {exc.status} {exc.message}",
                attempts,
            ) from None
        except aiohttp.ClientConnectorError as exc:
            hint = ""
            if exc.os_error.errno == errno.EADDRNOTAVAIL:
                hint = (
                    f" ({source_ip} is not a local address here: Linux has all of 127.0.0.0/8,"
                    f" macOS needs `sudo ifconfig lo0 alias {source_ip}`)"
                )
            raise ProofFailed(
                f"attempt {number} from {source_ip}: cannot connect to {exc.host}:{exc.port}:"
                f" {exc.os_error}{hint}",
                attempts,
            ) from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise ProofFailed(
                f"attempt {number} from {source_ip}: {type(exc).__name__}: {exc}", attempts
            ) from None
        attempts.append(attempt)
    return attempts


async def _connect_once(
    url: str,
    number: int,
    source_ip: str,
    jar: Mapping[str, str],
    ssl_context: ssl.SSLContext | None,
    extra_headers: Mapping[str, str],
) -> tuple[Attempt, dict[str, str]]:
    """One attempt: handshake with the kept cookies, read hello, check an echo, close."""
    handshake_headers: list[CIMultiDictProxy[str]] = []

    async def keep_response_headers(
        _session: aiohttp.ClientSession, _ctx: SimpleNamespace, params: aiohttp.TraceRequestEndParams
    ) -> None:
        handshake_headers.append(params.response.headers)

    trace = aiohttp.TraceConfig()
    trace.on_request_end.append(keep_response_headers)
    request_headers = dict(extra_headers)
    cookie = render_cookie_header(jar)
    if cookie is not None:
        request_headers["Cookie"] = cookie

    async with (
        aiohttp.ClientSession(
            # One session (one connector) per attempt: a fresh TCP connection from `source_ip`.
            connector=aiohttp.TCPConnector(
                local_addr=(source_ip, 0), ssl=ssl_context if ssl_context is not None else True
            ),
            cookie_jar=aiohttp.DummyCookieJar(),  # cookies are kept by hand, see module docstring
            trace_configs=[trace],
        ) as session,
        session.ws_connect(url, headers=request_headers) as ws,
    ):
        sockname = ws.get_extra_info("sockname")
        bound_ip = str(sockname[0]) if sockname else source_ip
        hello = await _receive_hello(ws)
        probe = f"stickiness probe {number} from {bound_ip}"
        await ws.send_str(probe)
        echo = await ws.receive()
        if echo.type is not aiohttp.WSMsgType.TEXT or echo.data != probe:
            raise ProofFailed(f"expected the echo {probe!r}, got {echo.type.name} {echo.data!r:.80}")
        await ws.close()

    set_cookies = handshake_headers[-1].getall("Set-Cookie", []) if handshake_headers else []
    new_jar = update_jar(jar, set_cookies)
    attempt = Attempt(
        number=number,
        source_ip=bound_ip,
        seen_ip=_seen_ip(hello),
        server_id=str(hello["server_id"]),
        cookies=describe_cookies(jar, new_jar),
    )
    return attempt, new_jar


async def _receive_hello(ws: aiohttp.ClientWebSocketResponse) -> dict[str, object]:
    msg = await ws.receive()
    if msg.type is not aiohttp.WSMsgType.TEXT:
        raise ProofFailed(f"expected a text hello, got {msg.type.name} {msg.data!r:.80}")
    try:
        hello = json.loads(msg.data)
    except ValueError:
        raise ProofFailed(f"expected a JSON hello, got {msg.data!r:.80}") from None
    if (
        not isinstance(hello, dict)
        or hello.get("type") != "hello"
        or not isinstance(hello.get("server_id"), str)
    ):
        raise ProofFailed(f"expected a hello with a server_id, got {msg.data!r:.80}")
    return hello


def _seen_ip(hello: Mapping[str, object]) -> str | None:
    forwarded = hello.get("forwarded_for")
    if isinstance(forwarded, str) and forwarded.strip():
        return forwarded.split(",")[-1].strip()  # the hop our balancer appended
    peer = hello.get("peer")
    return peer if isinstance(peer, str) else None


# --- command line -------------------------------------------------------------


def _source_ip_list(text: str) -> tuple[str, ...]:
    ips = tuple(part.strip() for part in text.split(",") if part.strip())
    if not ips:
        raise argparse.ArgumentTypeError("expected IP,IP,...")
    for ip in ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an IP address: {ip!r}") from None
    return ips


def _header(text: str) -> tuple[str, str]:
    name, colon, value = text.partition(":")
    if not colon or not name.strip() or any(c in name for c in " \t\r\n") or any(c in value for c in "\r\n"):
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m backends_demo.client",
        description="Prove that reconnects from changing source IPs reach the same gateway.",
    )
    parser.add_argument("--url", required=True, help="ws:// or wss:// URL, e.g. ws://127.0.0.1:8080/ws")
    parser.add_argument(
        "--reconnects", type=int, default=DEFAULT_RECONNECTS, help="reconnects after the first connection"
    )
    parser.add_argument(
        "--source-ips",
        type=_source_ip_list,
        default=None,
        metavar="IP,IP,...",
        help="local addresses to bind in turn (default 127.0.0.2, 127.0.0.3, ...)",
    )
    parser.add_argument(
        "--cafile", default=None, help="CA certificate to trust for wss:// (e.g. certs/ca.crt)"
    )
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per attempt")
    parser.add_argument(
        "--no-cookies", action="store_true", help="never send a cookie (the layer-4 view: only the IP changes)"
    )
    parser.add_argument(
        "--header", type=_header, action="append", default=[], metavar="NAME:VALUE",
        help="a request header for every attempt, e.g. X-User-Id:player-42 (repeatable)",
    )
    args = parser.parse_args(argv)
    try:
        url = URL(args.url)
        scheme, host, _ = url.scheme, url.host, url.port  # yarl checks the port when asked for it
    except ValueError as exc:
        parser.error(f"--url is not a valid URL ({exc}): {args.url!r}")
    if scheme not in ("ws", "wss"):
        parser.error(f"--url must be ws:// or wss://, got {args.url!r}")
    if not host:
        parser.error(f"--url names no host: {args.url!r}")
    if args.reconnects < 0:
        parser.error("--reconnects must be 0 or more")
    if args.timeout <= 0:
        parser.error("--timeout must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the proof from the command line; 0 sticky, 1 not sticky, 2 an attempt failed."""
    args = parse_args(argv)
    source_ips = args.source_ips or default_source_ips(args.reconnects + 1)
    try:
        ssl_context = make_ssl_context(args.cafile)
    except (OSError, ssl.SSLError) as exc:
        print(f"error: cannot load CA file {args.cafile}: {exc}", file=sys.stderr)
        return 2
    try:
        attempts = asyncio.run(
            prove_stickiness(
                args.url, args.reconnects, source_ips, ssl_context, args.timeout,
                keep_cookies=not args.no_cookies, headers=dict(args.header),
            )
        )
    except ProofFailed as exc:
        if exc.attempts:
            print(render_table(exc.attempts, include_verdict=False))
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(render_table(attempts))
    return 0 if is_sticky(attempts) else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""`lb ctl`: the operator's command line for a running balancer, through its admin API only.

    lb ctl [--admin URL] [--token T] [--config FILE] [--timeout SECONDS] [--json] COMMAND
        status                                   table of pools and backends
        drain POOL ID [--close-after D] [--rate R]
        disable POOL ID [--close-after D] [--rate R]
        enable POOL ID
        lookup TOKEN [--pool POOL] [--key K]     which backend holds this session now (the /lookup JSON)

Where the admin URL and token come from, first found wins: `--admin`/`--token`,
then `--config FILE` (`admin.bind` and `admin.token`, `${VAR}` expanded by the same
loader `lb run` uses; only the admin section is read, so the cookie keys' variables and
the TLS files need not be there), then `LB_ADMIN_URL`/`LB_ADMIN_TOKEN` (only without
`--config`: never one source's URL with another's token), then http://127.0.0.1:9000
(the default `admin.bind`).

Exit codes, for scripts:
    0  success (for lookup: the server answered, even `"valid": false`)
    1  the call failed: the server refused (its message is printed: 401 wrong token, 404 unknown
       backend, 400 ...), or the admin API cannot be reached, is too slow, or is not the admin API
    2  usage error or unreadable --config: nothing was asked

A hostile or confused server gets no more: one call is bounded in time as a
whole (`--timeout`, default 10 s) and in size; a redirect is reported, not
followed (it would carry the token elsewhere); whatever the server says reaches
the terminal without its control characters (no escape sequences).

Owns argument parsing, the HTTP calls (urllib: a blocking CLI needs no event
loop) and the printing; what the answers mean is the admin API's business.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import math
import os
import re
import socket
import sys
import threading
import time
import unicodedata
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, TextIO

from lb.access_log import shortened
from lb.log import iso_utc

EXIT_OK = 0
# SPEC: "exit 0 on success, 1 with the server's message otherwise": every call that did not succeed,
# whether the server refused it or no usable answer came (unreachable, too slow, not the admin API).
EXIT_API_ERROR = 1
EXIT_USAGE = 2  # the command line or --config cannot be used: nothing was asked

DEFAULT_ADMIN_URL = "http://127.0.0.1:9000"
TIMEOUT = 10.0  # seconds for one admin call: the admin API answers from memory
# What one answer may weigh.  A /status backend entry is 345-500 bytes (lb.control.status_document._backend_document:
# 15 fields and a health reason, as aiohttp's json.dumps writes them), so 16 MiB carries 33,000-48,000
# backends: three pools at discovery's max_backends cap (10,000) and then some.  Memory goes with it:
# json.loads makes up to ~30 bytes of objects of each byte (`{},` is a 64-byte dict), so a hostile answer
# of empty objects costs ~450 MB; the table's rows are bounded below.
MAX_ANSWER_BYTES = 16 * 1024 * 1024
# Rows of the status table: more than MAX_ANSWER_BYTES carries of real backends, so no real answer is cut;
# a hostile one of 5.6 million `{}` backends is (drawing all of them took 4 GB and a minute).
MAX_ROWS = 50_000


class CtlError(Exception):
    """Something `lb ctl` reports on stderr and turns into its exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class Target:
    """Which admin API to talk to, and with what bearer token."""

    url: str
    token: str | None
    timeout: float = TIMEOUT  # seconds for one whole admin call


def add_ctl_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `lb ctl` and its subcommands on the `lb` parser's subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: the options may come before or after the subcommand without one erasing the other.
    common.add_argument("--admin", metavar="URL", default=argparse.SUPPRESS,
                        help=f"admin API base URL (default: admin.bind from --config, else env LB_ADMIN_URL, "
                             f"else {DEFAULT_ADMIN_URL})")
    common.add_argument("--token", metavar="T", default=argparse.SUPPRESS,
                        help="admin bearer token (default: admin.token from --config, else env LB_ADMIN_TOKEN)")
    common.add_argument("--config", metavar="FILE", type=Path, default=argparse.SUPPRESS,
                        help="read admin.bind and admin.token from this balancer configuration (wins over the env)")
    common.add_argument("--timeout", metavar="SECONDS", type=float, default=argparse.SUPPRESS,
                        help=f"give up on an admin call after this long (default {TIMEOUT:g})")
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                        help="print the API's JSON answer instead of a table")
    ctl = commands.add_parser(
        "ctl", parents=[common], help="status, drain, disable, enable, lookup through the admin API",
        description="Operate a running balancer through its admin API. Exit codes: 0 success, "
        "1 the call failed (the server's message, or why no answer came), 2 usage or --config error.",
    )
    actions = ctl.add_subparsers(title="commands", metavar="COMMAND", required=True)

    status = actions.add_parser("status", parents=[common], help="pools and backends: state, reason, counters")
    status.set_defaults(ctl=_status, sends_token=False)

    drain = actions.add_parser("drain", parents=[common], help="no new clients; cookie holders still reach it")
    _backend_arguments(drain)
    _migration_arguments(drain)
    drain.set_defaults(ctl=_action("drain"))

    # The admin API takes close_after and rate on disable as on drain (README's state table): so does ctl.
    disable = actions.add_parser("disable", parents=[common], help="nothing reaches it; cookie holders go elsewhere")
    _backend_arguments(disable)
    _migration_arguments(disable)
    disable.set_defaults(ctl=_action("disable"))

    enable = actions.add_parser("enable", parents=[common], help="back to normal (health checks decide)")
    _backend_arguments(enable)
    enable.set_defaults(ctl=_action("enable"))

    lookup = actions.add_parser("lookup", parents=[common], help="which backend holds the session of this token")
    lookup.add_argument("affinity_token", metavar="TOKEN", help="the affinity cookie's value")
    lookup.add_argument("--pool", help="the pool, when several have a backend of that id")
    lookup.add_argument(
        "--key", help="the client's key in a source or hash pool (its address, its hash_key value): there it decides"
    )
    lookup.set_defaults(ctl=_lookup)

    ctl.set_defaults(handler=run_ctl)


def _backend_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pool", metavar="POOL")
    parser.add_argument("backend", metavar="ID")


def _migration_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--close-after", metavar="D", help="then close its tunnels (1012) after this delay (30s, 5m)")
    parser.add_argument("--rate", metavar="R", type=float,
                        help="tunnels closed per second once closing starts (alone: closing starts now)")


def run_ctl(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """Run one `lb ctl` subcommand; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    command: Callable[[argparse.Namespace, Target, TextIO], None] = args.ctl
    try:
        command(args, resolve_target(args, os.environ), out)
    except CtlError as exc:
        print(f"lb ctl: {exc}", file=err)
        return exc.exit_code
    return EXIT_OK


def resolve_target(args: argparse.Namespace, environ: os._Environ[str] | dict[str, str]) -> Target:
    """The admin URL and token: flags, then --config, then LB_ADMIN_URL/LB_ADMIN_TOKEN, then the default.

    A `--config` named on the command line wins over the environment: a leftover LB_ADMIN_URL
    would otherwise take that file's token to another balancer (and drain the wrong one).
    """
    url: str | None = getattr(args, "admin", None) or None
    token: str | None = getattr(args, "token", None) or None
    # Where each came from, for a message that names what to fix.
    url_from, token_from = "--admin", "--token"
    config_path: Path | None = getattr(args, "config", None)
    if config_path is None:
        if url is None:
            url, url_from = environ.get("LB_ADMIN_URL") or None, "LB_ADMIN_URL"
        if token is None:
            token, token_from = environ.get("LB_ADMIN_TOKEN") or None, "LB_ADMIN_TOKEN"
    elif url is None or token is None:
        from lb.config.load import load_admin_config
        from lb.config.model import host_port
        from lb.errors import ConfigError

        try:
            # The admin section alone: the operator's shell need not hold the cookie keys or read the TLS key.
            # Nor need it hold the admin token for `status`, which sends none (GET /status is open).
            admin = load_admin_config(
                config_path, environ, token=token, read_token=getattr(args, "sends_token", True)
            )
        except ConfigError as exc:
            raise CtlError(f"cannot use --config {config_path}:\n{exc}", EXIT_USAGE) from None
        if url is None:
            # A wildcard bind is reached on loopback from the same host.
            host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(admin.host, admin.host)
            url, url_from = f"http://{host_port(host, admin.port)}", f"admin.bind in {config_path}"
        if token is None:
            token, token_from = admin.token, f"admin.token in {config_path}"
    if url is None:
        url, url_from = DEFAULT_ADMIN_URL, "the default admin URL"
    _check_header_text(url, url_from)
    if token is not None:
        _check_header_text(token, token_from)
        if " " in token:  # as admin.token is checked: the server reads a bearer token up to a space
            where = f"character {token.index(' ') + 1} of {len(token)}"
            raise CtlError(f"{token_from}: has a space at {where}; a token is visible ASCII only", EXIT_USAGE)
    return Target(url=_admin_url(url, url_from), token=token, timeout=_timeout(args))


def _check_header_text(value: str, source: str) -> None:
    """Refuse what http.client cannot send (a traceback that printed the whole token) or the server never matches.

    A header carries visible ASCII: a CR or LF would split it (http.client refuses it), and the admin
    API compares a token's UTF-8 bytes where http.client sends Latin-1.  The value is never echoed:
    it may be the token.

    Raises:
        CtlError: exit 2, naming `source` and where in the value the character is.
    """
    for index, character in enumerate(value):
        if " " <= character <= "~":
            continue
        where = f"character {index + 1} of {len(value)}"
        if character.isascii():  # C0 controls and DEL
            name = _CONTROL_NAMES.get(character, f"\\x{ord(character):02x}")
            hint = " (a file saved with CRLF line ends?)" if character == "\r" and index == len(value) - 1 else ""
            raise CtlError(f"{source}: has a control character, {name} at {where}{hint}", EXIT_USAGE)
        raise CtlError(f"{source}: has a character outside ASCII at {where}; use ASCII only", EXIT_USAGE)


_CONTROL_NAMES = {"\r": "CR", "\n": "LF", "\t": "TAB", "\x00": "NUL", "\x7f": "DEL"}


def _admin_url(url: str, source: str) -> str:
    """`url` as `call` uses it: http(s)://host:port (a bare host:port as admin.bind spells it gets http://).

    Raises:
        CtlError: exit 2 for a URL that is not one (a port outside 1-65535 would silently wrap in the
            socket layer: 84536 reached 19000); a user:password@ part is refused without printing it.
    """
    url = url.rstrip("/")
    if "://" not in url:
        url = "http://" + url  # host:port, as admin.bind spells it
    expected = f"{source}: expected http://host:port"
    if "@" in url.partition("://")[2].partition("/")[0]:
        # Never echoed: the part before "@" is a password.  The admin API takes a bearer token.
        raise CtlError(f"{expected}, without user:password@ (give the admin token with --token)", EXIT_USAGE)
    try:
        parsed = urllib.parse.urlsplit(url)
        port = parsed.port  # ValueError: not a number, or above 65535
    except ValueError:
        raise CtlError(f"{expected}, got {_printable(url, 200)!r}", EXIT_USAGE) from None
    # A query or fragment would be sent as part of every path (`?x=1/status`), and a space is no host's.
    if (parsed.scheme not in ("http", "https") or not parsed.hostname or port == 0 or "?" in url or "#" in url
            or any(c.isspace() for c in url)):
        raise CtlError(f"{expected}, got {_printable(url, 200)!r}", EXIT_USAGE)
    return url


def _timeout(args: argparse.Namespace) -> float:
    timeout: float = getattr(args, "timeout", TIMEOUT)
    if not 0 < timeout <= 3600:  # also refuses nan
        raise CtlError(f"--timeout: expected seconds above 0 and at most 3600, got {timeout:g}", EXIT_USAGE)
    return timeout


def call(
    target: Target, method: str, path: str, body: dict[str, Any] | None = None, *, timeout: float | None = None
) -> Any:
    """One admin API call; returns the JSON answer.

    `timeout` bounds the whole call, not each read: a server that drips its answer a byte at a
    time is given up on like one that never answers.  A redirect is not followed: it would send
    the bearer token wherever the `Location` points.

    Raises:
        CtlError: exit 1, with the server's message for an error status (or a redirect), or
            saying why no usable answer came (unreachable, not in time, not JSON).
    """
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Accept": "application/json"}
    if data is not None:
        headers["Content-Type"] = "application/json"
    if target.token:
        headers["Authorization"] = f"Bearer {target.token}"
    request = urllib.request.Request(target.url + path, data=data, headers=headers, method=method)
    timeout = target.timeout if timeout is None else timeout
    too_slow = _too_slow(target.url, timeout)
    asked = f"{method} {shown_path(path)}"
    with _Watchdog(timeout) as watchdog:
        try:
            raw = _exchange(request, asked, target.url, watchdog)
        except CtlError:
            if watchdog.fired:  # whatever broke, our shutdown at the deadline broke it
                raise too_slow from None
            raise
        if watchdog.fired:  # an answer without a length ends at our shutdown: it may be cut short
            raise too_slow
    if len(raw) > MAX_ANSWER_BYTES:
        raise CtlError(f"{asked}: answer larger than {MAX_ANSWER_BYTES} bytes", EXIT_API_ERROR)
    try:
        return parse_answer(raw)
    except ValueError:
        message = f"{asked}: the answer is not JSON (is {target.url} the admin API?)"
        raise CtlError(message, EXIT_API_ERROR) from None


def _exchange(request: urllib.request.Request, asked: str, url: str, watchdog: _Watchdog) -> bytes:
    """Send `request`; returns the answer's body (at most MAX_ANSWER_BYTES + 1 bytes) when its status is 2xx.

    `asked` is the request as messages show it ("GET /status").

    Raises:
        CtlError: the server's refusal, a redirect, no connection, or an answer that is not HTTP.
    """
    try:
        with _opener(watchdog).open(request, timeout=watchdog.remaining()) as reply:
            return _read_until(reply, MAX_ANSWER_BYTES + 1)
    except urllib.error.HTTPError as exc:
        with exc:
            try:
                raw = _read_until(exc, MAX_ANSWER_BYTES) if exc.fp is not None else b""
            except (http.client.HTTPException, OSError):
                raw = b""  # the status is the answer; a body cut short only loses its message
        if 300 <= exc.code < 400:
            where = _printable(exc.headers.get("Location", "?"), 200)
            raise CtlError(f"{asked}: HTTP {exc.code}: redirected to {where} (not followed: "
                           "give the admin API's own URL)", EXIT_API_ERROR) from None
        message = _server_message(raw) or _printable(str(exc.reason), 200)
        hint = ""
        if exc.code == 401:
            hint = (" (set admin.token in the balancer's config and reload it)" if "no admin.token" in message
                    else " (give the admin token with --token, LB_ADMIN_TOKEN or --config)")
        raise CtlError(f"{asked}: HTTP {exc.code}: {message}{hint}", EXIT_API_ERROR) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        if isinstance(reason, TimeoutError):
            raise _too_slow(url, watchdog.seconds) from None
        raise CtlError(f"cannot reach the admin API at {url}: {reason}", EXIT_API_ERROR) from None
    except http.client.IncompleteRead as exc:  # the connection ended before the body did
        if isinstance(exc, _ShortOfItsLength):
            cut = f"{len(exc.partial)} of the {len(exc.partial) + exc.owed} bytes its Content-Length announced"
        else:  # http.client's own: only a chunked body is read by pieces that raise it
            cut = "a chunked body that ends before its last chunk"
        raise CtlError(f"{asked}: the answer was cut short, {cut} (is {url} the admin API?)", EXIT_API_ERROR) from None
    except http.client.HTTPException as exc:  # a status line or a body that is not HTTP's
        message = f"{asked}: not an HTTP answer ({type(exc).__name__}; is {url} the admin API?)"
        raise CtlError(message, EXIT_API_ERROR) from None


def shown_path(path: str) -> str:
    """`path` as a message shows it: one short line, and an affinity token only as its digest.

    The query is left out: /lookup's carries the token, which may be 100 KB long and is a
    session's credential; its `lb.log.token_digest` is what the balancer's own log lines show of
    one, so the two can be matched.
    """
    path, _, query = path.partition("?")
    shown = _printable(path, 200)
    tokens = urllib.parse.parse_qs(query).get("token")
    if tokens:
        from lb.log import token_digest  # here: only a lookup's message needs it

        shown += f" (token {token_digest(tokens[0])})"
    return shown


def parse_answer(raw: bytes) -> Any:
    """An answer's JSON, as strict as RFC 8259: what Python's json accepts beyond it is refused.

    Raises:
        ValueError: not JSON; `NaN` or `Infinity` (not JSON, though json.loads takes them, and
            `--json` would print them on); a number too large for a float (1e999 would come out as
            `Infinity`); nested too deeply for the parser (it raises RecursionError).
    """
    try:
        return json.loads(raw, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def _refuse_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")  # RFC 8259 §6: "Infinity and NaN are not permitted"


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"number out of range: {text[:20]}")
    return number


def _too_slow(url: str, seconds: float) -> CtlError:
    return CtlError(f"no complete answer from the admin API at {url} within {seconds:g}s", EXIT_API_ERROR)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Every 3xx is an HTTPError for `call` to report: a redirect must not carry the bearer token."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class _Watchdog:
    """Ends one admin call at its deadline wherever it waits, by shutting its socket down from a timer.

    A socket timeout bounds each read, not the call: a status line, headers or chunk sizes dripped a
    byte at a time, or a `100 Continue` every 0.2 s, held `lb ctl` as long as the server liked, and
    those reads happen inside http.client, where no check of ours runs between them.  A shutdown
    wakes a read blocked anywhere (the head, the body, the TLS handshake) with the end of the
    stream; `fired` then tells the caller that the deadline, not the server, ended it.

    The socket is watched through a duplicate of its descriptor: TLS detaches the original one
    (`wrap_socket`), and a descriptor of our own cannot be reused by another file before we close it.
    """

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.fired = False
        self._lock = threading.Lock()
        self._socket: socket.socket | None = None
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True

    def __enter__(self) -> _Watchdog:
        self._timer.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._timer.cancel()
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def watch(self, sock: socket.socket) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
            self._socket = sock.dup()
            if self.fired:
                self._shut()

    def _fire(self) -> None:
        with self._lock:
            self.fired = True
            self._shut()

    def _shut(self) -> None:
        if self._socket is not None:
            with contextlib.suppress(OSError):  # already closed by the peer: nothing left to wake
                self._socket.shutdown(socket.SHUT_RDWR)


class _WatchedHTTPConnection(http.client.HTTPConnection):
    """Gives its socket to the call's watchdog as soon as TCP connects, before a byte is read from it."""

    watchdog: _Watchdog

    def connect(self) -> None:
        # The watchdog has no socket to shut down before TCP connects: each attempt (one per address of
        # the name) gets only the time left, where socket.create_connection gives each the whole timeout.
        self._create_connection = self._connect_by_the_deadline
        super().connect()
        self.watchdog.watch(self.sock)

    def _connect_by_the_deadline(
        self, address: tuple[str, int], timeout: object = None, source_address: tuple[str, int] | None = None
    ) -> socket.socket:
        host, port = address
        failed: OSError = TimeoutError("the deadline passed before connecting")
        for family, kind, proto, _, sockaddr in _resolve_within(host, port, self.watchdog.remaining()):
            left = self.watchdog.remaining()
            if left <= 0:
                break
            sock = socket.socket(family, kind, proto)
            try:
                sock.settimeout(left)
                if source_address is not None:
                    sock.bind(source_address)
                sock.connect(sockaddr)
            except OSError as exc:
                sock.close()
                failed = exc
                continue
            return sock
        raise failed


def _resolve_within(host: str, port: int, seconds: float) -> list[Any]:
    """`socket.getaddrinfo` for the admin host, given up after `seconds` (TimeoutError).

    The call's watchdog has no socket to shut down while a name resolves, and a resolver that does not
    answer holds getaddrinfo for its own timeouts and retries (30 s and more): so the lookup runs in a
    daemon thread that the call stops waiting for.  An address needs no lookup and none is started.
    """
    if _is_address(host):
        return socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
    answer: list[Any] = []

    def resolve() -> None:
        try:
            answer.append(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except OSError as exc:
            answer.append(exc)

    lookup = threading.Thread(target=resolve, name="lb-ctl-resolve", daemon=True)
    lookup.start()
    lookup.join(max(seconds, 0.0))
    if not answer:
        raise TimeoutError("the admin host's name did not resolve in time")
    if isinstance(answer[0], OSError):
        raise answer[0]
    return list(answer[0])


def _is_address(host: str) -> bool:
    try:
        socket.inet_pton(socket.AF_INET6 if ":" in host else socket.AF_INET, host)
    except (OSError, ValueError):
        return False
    return True


class _WatchedHTTPSConnection(http.client.HTTPSConnection, _WatchedHTTPConnection):
    """HTTPS watched from before its handshake: with these bases, `super().connect()` in
    HTTPSConnection.connect is _WatchedHTTPConnection's, which runs before the socket is wrapped."""


class _WatchedHandler(urllib.request.HTTPHandler, urllib.request.HTTPSHandler):
    """urllib's http and https openers, with connections the call's watchdog sees."""

    def __init__(self, watchdog: _Watchdog) -> None:
        super().__init__()
        self.watchdog = watchdog

    def http_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection(_WatchedHTTPConnection), req)

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        return self.do_open(self._connection(_WatchedHTTPSConnection), req)

    def _connection(self, kind: type[_WatchedHTTPConnection]) -> Callable[..., http.client.HTTPConnection]:
        def connect(host: str, **kwargs: Any) -> http.client.HTTPConnection:
            connection = kind(host, **kwargs)
            connection.watchdog = self.watchdog
            return connection

        return connect


def _opener(watchdog: _Watchdog) -> urllib.request.OpenerDirector:
    # No proxy, whatever http_proxy/https_proxy say: the admin API is ours to reach directly, and a proxy
    # would carry the bearer token elsewhere (as a followed redirect would), its CONNECT outside the deadline.
    return urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects, _WatchedHandler(watchdog))


def _read_until(reply: Any, limit: int) -> bytes:
    """Up to `limit` bytes of the answer, in pieces (the call's watchdog bounds the time).

    Raises:
        http.client.IncompleteRead: the connection ended before the body did: _ShortOfItsLength before
            its Content-Length, http.client's own before a chunked body's last chunk.
    """
    chunks: list[bytes] = []
    size = 0
    while size < limit:
        chunk = reply.read1(min(65536, limit - size)) if hasattr(reply, "read1") else reply.read(limit - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    body = b"".join(chunks)
    # http.client raises IncompleteRead for a chunked body cut short, but read1(n) and read(n) of one with
    # a Content-Length return b"" at the end of the stream as if the body were whole: 13 bytes of `{"pools":
    # {}}` announced as 4000 were a complete, empty /status.  `length` is what it still owes (None: no length).
    owed = getattr(reply, "length", None)
    if size < limit and isinstance(owed, int) and owed > 0:
        raise _ShortOfItsLength(body, owed)
    return body


class _ShortOfItsLength(http.client.IncompleteRead):
    """An answer whose connection ended `owed` bytes before its Content-Length did."""

    def __init__(self, partial: bytes, owed: int) -> None:
        super().__init__(partial, owed)
        self.owed = owed


# What a terminal must not be given from an answer: controls (Cc: C0 and C1, escape sequences), format
# characters (Cf: bidi overrides, marks and isolates, zero-width ones, a BOM), which reorder or hide what is
# shown, and the line and paragraph separators (Zl, Zp).
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Zl", "Zp"})
_TAG = re.compile(r"<[^>]{0,200}>")


def _printable(text: str, limit: int = 500) -> str:
    """`text` safe for a terminal: control and format characters (escape sequences, bidi, zero-width) become `?`."""
    text = "".join("?" if unicodedata.category(c) in _HIDDEN_CATEGORIES else c for c in text)
    return shortened(text, limit)


def _server_message(raw: bytes) -> str:
    """The server's message, on one printable line: `error` of a JSON body, else the text (HTML tags dropped)."""
    try:
        answer = parse_answer(raw)
    except ValueError:
        text = _TAG.sub(" ", raw.decode("utf-8", "replace"))
        return _printable(" ".join(text.split()), 200)
    if isinstance(answer, dict):
        message = _printable(str(answer.get("error") or answer.get("reason") or answer))
        request_id = answer.get("request_id")
        if isinstance(request_id, str) and request_id:
            # The id the balancer's log line carries: what links this failure to why (SPEC, errors).
            message += f" (request id {_printable(request_id, 64)})"
        return message
    return _printable(str(answer))


# -- subcommands ---------------------------------------------------------------------------------


def _status(args: argparse.Namespace, target: Target, out: TextIO) -> None:
    document = call(target, "GET", "/status")
    fault = _status_fault(document)
    if fault is not None:  # with --json too: a script reads the document, and is owed the same check
        raise _unexpected("/status", fault, target)
    if getattr(args, "json", False):
        _print_json(document, out, "/status", target)
        return
    try:
        out.write(render_status(document))
    except (AttributeError, TypeError, ValueError, RecursionError) as exc:  # a field the table cannot draw
        raise _unexpected("/status", type(exc).__name__, target) from None


def _unexpected(asked: str, fault: str, target: Target) -> CtlError:
    """Exit 1: a 2xx JSON answer that is not the admin API's (a proxy's, another service's)."""
    return CtlError(f"{asked}: unexpected answer ({fault}; is {target.url} the admin API?)", EXIT_API_ERROR)


def _status_fault(document: Any) -> str | None:
    """Why `document` is not a /status answer the table can draw, or None: `{"pools": {NAME: {"backends":
    [{...}, ...]}}, ...}`, each pool and backend an object (lb.control.status_document.status_document)."""
    if not isinstance(document, dict) or not isinstance(document.get("pools"), dict):
        return 'not an object with "pools"'
    for pool in document["pools"].values():
        if not isinstance(pool, dict):
            return "a pool that is not an object"
        backends = pool.get("backends", [])
        if not isinstance(backends, list) or not all(isinstance(backend, dict) for backend in backends):
            return "backends that are not a list of objects"
    return None


def _action(action: str) -> Callable[[argparse.Namespace, Target, TextIO], None]:
    def run(args: argparse.Namespace, target: Target, out: TextIO) -> None:
        body: dict[str, Any] = {}
        if getattr(args, "close_after", None) is not None:
            body["close_after"] = args.close_after
        if getattr(args, "rate", None) is not None:
            body["rate"] = args.rate
        path = "/pools/{}/backends/{}/{}".format(
            urllib.parse.quote(args.pool, safe=""), urllib.parse.quote(args.backend, safe=""), action
        )
        answer = call(target, "POST", path, body)
        # Exit 0 tells a deploy script the backend is drained: only the admin API's answer for that backend
        # says so, not any 2xx JSON (`{"message": "accepted"}` from a proxy or another service printed `: ?`).
        fault = _action_fault(answer, args.pool, args.backend)
        if fault is not None:
            raise _unexpected(f"POST {shown_path(path)}", fault, target)
        if getattr(args, "json", False):
            _print_json(answer, out, path, target)
            return
        line = f"{answer['pool']}/{answer['id']}: {answer['state']}"
        if answer.get("removed") is True:  # gone from its pool (reload, DNS): only its tunnels are left
            line += ", removed"
        close_after, rate = answer.get("close_after"), answer.get("rate", 0)
        if isinstance(close_after, int | float) and isinstance(rate, int | float):
            line += f" (tunnels close after {close_after:g}s at {rate:g}/s)"
        out.write(_printable(line) + "\n")

    return run


def _action_fault(answer: Any, pool: str, backend: str) -> str | None:
    """Why `answer` is not the admin API's answer to an action on `pool`/`backend`, or None.

    That answer is `{"pool": P, "id": ID, "state": S}`, with `close_after` and `rate` (numbers) when
    tunnels are to be closed (lb.control.admin.backend_action); P and ID are the ones asked about.
    """
    if not isinstance(answer, dict):
        return "not a JSON object"
    if not isinstance(answer.get("state"), str) or not answer["state"]:
        return 'no "state"'
    if answer.get("pool") != pool or answer.get("id") != backend:
        return "not about the backend asked for"
    for key in ("close_after", "rate"):
        if key in answer and (isinstance(answer[key], bool) or not isinstance(answer[key], int | float)):
            return f'"{key}" is not a number'
    return None


def _lookup(args: argparse.Namespace, target: Target, out: TextIO) -> None:
    """Print the /lookup answer as it is (indented JSON: readable, and what a script parses).

    `--json` changes nothing here; a token the balancer would ignore is still an answer (exit 0).
    """
    query = {"token": args.affinity_token}
    if args.pool:
        query["pool"] = args.pool
    if args.key is not None:
        query["key"] = args.key
    path = "/lookup?" + urllib.parse.urlencode(query)
    answer = call(target, "GET", path)
    fault = _lookup_fault(answer)
    if fault is not None:  # exit 0 says the printed JSON is the balancer's word on this session
        raise _unexpected(f"GET {shown_path(path)}", fault, target)
    _print_json(answer, out, "/lookup", target)


# What a valid /lookup answer holds besides `"valid": true` (lb.control.lookup): each a string, or null.
_LOOKUP_FIELDS = {"pool": (str,), "backend": (str,), "state": (str,), "routes_to": (str, type(None)),
                  "issued_at": (str,), "expires_at": (str,)}


def _lookup_fault(answer: Any) -> str | None:
    """Why `answer` is not a /lookup answer, or None: `{"valid": false, "reason": R}`, or `{"valid": true}`
    with the pool, backend, state, routes_to (null when no backend takes the client) and the times."""
    if not isinstance(answer, dict) or not isinstance(answer.get("valid"), bool):
        return 'not an object with "valid"'
    if not answer["valid"]:
        return None if isinstance(answer.get("reason"), str) else 'no "reason"'
    for key, kinds in _LOOKUP_FIELDS.items():
        if key not in answer:
            return f'no "{key}"'
        if not isinstance(answer[key], kinds):
            return f'"{key}" is not a string'
    return None


def _print_json(answer: Any, out: TextIO, path: str, target: Target) -> None:
    """`answer` as indented JSON, all of it or nothing: a document json cannot write back is an error."""
    try:
        # Whole first: json.dump writes as it goes, and would leave half a document on stdout.
        # allow_nan=False: never print NaN/Infinity, which a script's JSON parser rejects.
        text = json.dumps(answer, indent=2, allow_nan=False)
    except (ValueError, RecursionError):  # json's encoder with indent recurses in Python, one frame a level
        raise CtlError(f"{shown_path(path)}: unexpected answer (is {target.url} the admin API?)",
                       EXIT_API_ERROR) from None
    out.write(text + "\n")


# -- tables --------------------------------------------------------------------------------------

_COLUMNS = ("POOL", "BACKEND", "ADDRESS", "STATE", "TUNNELS", "HANDSHAKES", "HITS", "REDISPATCHES", "REASON")


# /status's discovery times are Unix seconds (for scripts, as --json gives them): the table says when.
_DISCOVERY_TIMES = frozenset({"last_ok", "last_error_at"})


def shown_discovery_value(key: str, value: object) -> str:
    """A discovery field as people read it (this table, and the dashboard's snapshot): its times as UTC
    ISO-8601 (`2026-12-04T00:05:10Z`); null as `never` for a time, `-` for the rest (not Python's `None`)."""
    if value is None:
        return "never" if key in _DISCOVERY_TIMES else "-"
    if key in _DISCOVERY_TIMES and isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError, OSError, ValueError):  # a time no calendar holds: as sent
            return iso_utc(value, millis=False)
    return str(value)


def render_status(document: Any) -> str:
    """/status as a table: one line per backend, then one line per pool's discovery, then totals."""
    fault = _status_fault(document)
    if fault is not None:
        raise CtlError(f"/status: unexpected answer ({fault})", EXIT_API_ERROR)
    rows: list[Sequence[str]] = []
    notes: list[str] = []
    left_out = 0  # backends past MAX_ROWS: counted, not drawn
    notes_left_out = 0  # discovery notes past MAX_ROWS, likewise
    for pool_name, pool in document["pools"].items():
        backends = pool.get("backends", [])
        room = MAX_ROWS - len(rows)
        if len(backends) > room:
            left_out += len(backends) - room
            backends = backends[:room]
        for backend in backends:
            state = "removed" if backend.get("removed") is True else str(backend.get("state", "?"))
            if backend.get("migrating"):
                state += "*"
            # Every cell through _printable: ids, reasons and discovery errors come from DNS and
            # backends' answers, and an escape sequence must not reach the operator's terminal.
            rows.append(tuple(_printable(str(cell), 200) for cell in (
                pool_name, backend.get("id", "?"), backend.get("address", ""), state,
                backend.get("connections", 0), backend.get("handshakes", 0),
                backend.get("affinity_hits", 0), backend.get("redispatches", 0),
                backend.get("reason", ""),
            )))
        discovery = pool.get("discovery")
        if isinstance(discovery, dict) and len(notes) == MAX_ROWS:
            notes_left_out += 1
        elif isinstance(discovery, dict):
            parts = ", ".join(f"{k}={shown_discovery_value(k, v)}" for k, v in discovery.items()
                              if not isinstance(v, (dict, list)))
            notes.append(_printable(f"discovery {pool_name}: {parts}"))
    widths = [max(len(column), *(len(row[i]) for row in rows)) if rows else len(column)
              for i, column in enumerate(_COLUMNS)]
    numeric = {4, 5, 6, 7}

    def line(cells: Sequence[str]) -> str:
        padded = [c.rjust(widths[i]) if i in numeric else c.ljust(widths[i]) for i, c in enumerate(cells)]
        return "  ".join(padded).rstrip()

    text = [line(_COLUMNS), *(line(row) for row in rows)]
    if left_out:
        text.append(f"... and {left_out} more backends: the table stops at {MAX_ROWS} rows (--json has them all)")
    if any(row[3].endswith("*") for row in rows):
        text.append("* migrating: its tunnels are being closed (drain with --close-after/--rate)")
    text.extend(notes)
    if notes_left_out:
        text.append(f"... and {notes_left_out} more pools' discovery notes (--json has them all)")
    accepting = "" if document.get("accepting", True) else ", NOT accepting (shutting down)"
    workers = document.get("workers")
    if isinstance(workers, dict) and workers.get("serving") == 0:
        accepting += ", NO worker serving"
    text.append(_printable(f"live tunnels: {document.get('tunnels', 0)}, role: {document.get('role', '?')}{accepting}"))
    return "\n".join(text) + "\n"

"""Access log: one line per handshake (or request) and one per closed tunnel, on logger `lb.access`.

Plain format renders `key=value` pairs (a value with a space, a quote, a control or
non-ASCII character is written as a JSON string, so client input cannot forge a field
or reach a terminal raw); with `logging.format: json` the
fields travel as the record's `access` attribute and become JSON keys.
Tokens never appear, only `sha256(token)[:8]` where one matters.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Any, ClassVar, Final, Protocol, cast

from lb import built_in_c

access: Final = logging.getLogger("lb.access")


class AccessWriter(Protocol):
    """Writes an access event directly (`lb.log.AccessLineWriter`), while `applies()`."""

    def applies(self) -> bool: ...

    def write(self, text: str, fields: dict[str, object]) -> None: ...

    # A plain event whose text is `render_fields(keys, values)`, rendered as it is written, when the
    # format is plain and `applies()`: True, and True with nothing written when `lb.access` logs nothing
    # at INFO (`access_enabled()`); False, nothing written, otherwise (the caller's ordinary path).
    def write_fields(self, keys: tuple[str, ...], values: tuple[object, ...]) -> bool: ...


class _Installed:
    """The writer `set_access_writer` installed: on an object, whose field compiled code reads directly,
    where a module global is a lookup in the module's dict (two a handshake)."""

    __slots__ = ("writer",)

    def __init__(self) -> None:
        self.writer: AccessWriter | None = None


_installed: Final = _Installed()


def access_enabled() -> bool:
    """`access.isEnabledFor(logging.INFO)`, read from the logger's own cache when it holds the answer.

    Why: isEnabledFor is interpreted Python (a frame, a try around the same dict lookup), about
    1,200 instructions a call, and a WebSocket handshake asks twice.  The cache is the one it fills
    and `setLevel` and `logging.disable` clear, so the answer is its answer; when it is
    missing (not filled yet, or a Python without it) the call itself fills it.
    """
    if access.disabled:
        return False
    cache = getattr(access, "_cache", None)
    if type(cache) is dict:
        enabled = cache.get(logging.INFO)
        if enabled is not None:
            return bool(enabled)
    return access.isEnabledFor(logging.INFO)


def set_access_writer(writer: AccessWriter | None) -> None:
    """Called by `lb.log.setup_logging`: access lines skip the logging machinery while it applies."""
    _installed.writer = writer


def _bare_in_python(text: str) -> bool:
    # Visible ASCII (0x21-0x7E), no quote, no `=`, not empty: C string methods, not a regex fullmatch
    # (half the cost; for ASCII, isprintable() leaves out the C0 controls and DEL but keeps the space).
    return bool(text) and text.isascii() and text.isprintable() and " " not in text and '"' not in text and (
        "=" not in text)


# lb._logwrite's one pass, or (not built, or LB_PURE_PYTHON=1) the same answer in Python.
_bare: Final = cast("Callable[[str], bool] | None", built_in_c("lb._logwrite", "bare")) or _bare_in_python


def _plain(text: str) -> str:
    # A plain value is printed as is: visible ASCII (0x21-0x7E), no quote, no `=`, not empty.
    # Anything else (a space that would forge a `status=200` field, an escape sequence for the
    # operator's terminal, non-ASCII) is quoted and escaped; `=` too, as logfmt writers do (go-logfmt,
    # which Loki follows: a strict reader takes `path=/a=b` for a malformed pair).  A test holds both
    # checks equal to `[!#-<>-~]+`.
    if _bare(text):
        return text
    return json.dumps(text)


def plain_value(value: object) -> str:
    """`value` for a `key=value` pair: as is when it is plain visible ASCII, else a JSON string."""
    kind = type(value)
    if kind is int or kind is float:
        return str(value)  # digits, `.`, `-`, `+`, `e`, `inf`, `nan`: always plain
    return _plain(str(value))


def render_fields(keys: tuple[str, ...], values: tuple[object, ...]) -> str:
    """The text of a line given as keys (`"event=request client="`, `" status="`) and their values:
    each key followed by its value's `plain_value` (what lb._logwrite.write_fields renders in C)."""
    return "".join([key + plain_value(value) for key, value in zip(keys, values, strict=True)])


# A line must stay one write that a pipe takes whole (PIPE_BUF, 4 KiB on Linux): with `workers: N` every
# process writes to the one stderr, and under a container runtime that is a pipe, where a longer write is
# taken in pieces between which another process's line lands (400 requests with 12 KB paths through two
# workers split 2 lines so).  The client's method and path are the only fields as long as its head
# (limits.max_header_bytes): they are cut, as the admin API's path is.  512 characters keep a JSON line
# under 4 KiB even when every one is a `"` (6 bytes: escaped in its field, and twice in the message's logfmt).
MAX_LOGGED_PATH: Final = 512
MAX_LOGGED_METHOD: Final = 64


def shortened(text: str, limit: int) -> str:
    """`text` as a log line, /status or a terminal shows outside text: whole up to `limit` characters, else
    its first `limit - 3` and `...`."""
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _emit(event: str, fields: dict[str, Any]) -> None:
    fields = {"event": event, **fields}
    text = " ".join([f"{key}={plain_value(value)}" for key, value in fields.items()])
    writer = _installed.writer
    if writer is not None and writer.applies():
        writer.write(text, fields)
    else:
        access.info("%s", text, extra={"access": fields})


def log_request(**fields: Any) -> None:
    """client, method, path, pool, backend, affinity, status (all keyword arguments)."""
    if access_enabled():
        for key, limit in (("method", MAX_LOGGED_METHOD), ("path", MAX_LOGGED_PATH)):
            if key in fields:
                fields[key] = shortened(fields[key], limit)
        _emit("request", fields)


# The two lines every WebSocket handshake logs, written by lb._logwrite from their keys and values
# (no str is made for the line, nor for any value that prints as is) instead of the generic loop
# over a dict: the same event, keys, order and quoting as `log_request(...)` /
# `log_tunnel_closed(...)` with these arguments (a test holds them equal).  The JSON format, and
# any listener besides ours, take the generic path.
_ANSWERED: Final = (
    "event=request client=", " client_port=", " method=", " path=", " pool=", " backend=", " affinity=", " status=",
    " request_id=",
)
_TUNNEL_ENDED: Final = (
    "event=tunnel_closed client=", " client_port=", " pool=", " backend=", " duration=", " bytes_in=", " bytes_out=",
    " request_id=",
)


def log_answered(
    client: str, client_port: int, method: str, path: str, pool: str, backend: str, affinity: str,
    status: int, request_id: str,
) -> None:
    """The request line of a request a backend answered (`event=request`)."""
    method, path = shortened(method, MAX_LOGGED_METHOD), shortened(path, MAX_LOGGED_PATH)
    writer = _installed.writer
    if writer is not None and writer.write_fields(
        _ANSWERED, (client, client_port, method, path, pool, backend, affinity, status, request_id)
    ):
        return
    log_request(client=client, client_port=client_port, method=method, path=path, pool=pool, backend=backend,
                affinity=affinity, status=status, request_id=request_id)


def log_tunnel_ended(
    client: str, client_port: int, pool: str, backend: str, duration: float, bytes_in: int, bytes_out: int,
    request_id: str,
) -> None:
    """The close line of a tunnel the balancer did not end itself (`event=tunnel_closed`, no cause)."""
    writer = _installed.writer
    if writer is not None and writer.write_fields(
        _TUNNEL_ENDED, (client, client_port, pool, backend, duration, bytes_in, bytes_out, request_id)
    ):
        return
    log_tunnel_closed(client=client, client_port=client_port, pool=pool, backend=backend, duration=duration,
                      bytes_in=bytes_in, bytes_out=bytes_out, request_id=request_id)


# A log's lines that a flood may still write one by one (LineBucket): this many at once after a quiet
# spell, then this many a second, some 3 KB/s of log at most.
LINES_AT_ONCE: Final = 128.0
LINES_PER_SECOND: Final = 16.0


class LineBucket:
    """Lines a flood may still write one by one: `burst` at once after a quiet spell, refilled at
    `per_second` (a token bucket).  Past it the caller counts instead of logging: every event an
    ordinary burst brings (a refused request, a wrong token) keeps its own line, and a flood writes
    `per_second` lines a second at most, not one per event (a log flood is a second denial of service).
    """

    __slots__ = ("burst", "filled_at", "lines", "per_second")

    def __init__(self, burst: float = LINES_AT_ONCE, per_second: float = LINES_PER_SECOND) -> None:
        self.burst = burst
        self.per_second = per_second
        self.lines = burst
        self.filled_at: float | None = None

    def take(self, now: float) -> bool:
        """True: write this line (one is taken from the bucket); False: count it.  `now`: the caller's
        monotonic clock."""
        if self.filled_at is None or now > self.filled_at:  # a clock stepped back refills nothing, nor its way back
            if self.filled_at is not None:
                self.lines = min(self.burst, self.lines + (now - self.filled_at) * self.per_second)
            self.filled_at = now
        if self.lines >= 1.0:
            self.lines -= 1.0
            return True
        return False

    @property
    def empty(self) -> bool:
        """No line left until the next refill: the last `take` was the last one for now."""
        return self.lines < 1.0


class RateLimitSummary:
    """Refusals a flood repeats: each logged as it happens up to a rate, past it summarised.

    A client hammering the handshake rate limit (429), or a storm beyond
    limits.max_connections (503), would otherwise turn every refusal into a log line
    (a log flood is a second denial of service).  Refusals get their own request line,
    as every answer does, while a bucket of LINES_AT_ONCE lines refilled at LINES_PER_SECOND
    lasts (so the refusals of an ordinary burst are each found by their request id at once);
    past it they are counted and reported in one `event` line once `interval` has passed
    (`tick`, every second, or the next refusal), which names the request ids of the first
    MAX_IDS it counts.  The count of every refusal is also in lb_rejected_requests_total{status}.
    """

    MAX_ADDRESSES: ClassVar[int] = 1024  # distinct addresses remembered per interval; past that only counted
    MAX_IDS: ClassVar[int] = 32  # request ids a summary names (17 bytes each: the line stays a few hundred)

    def __init__(
        self, interval: float = 10.0, *, status: int = 429, reason: str = "handshake_rate_limited",
        event: str = "rate_limited",
    ) -> None:
        self.interval = interval
        self.status = status
        self.reason = reason
        self.event = event
        self._lines = LineBucket()  # refusals still logged one by one
        self._since: float | None = None  # when the refusals being counted began
        self._count = 0
        self._addresses: dict[str, int] = {}
        self._ids: list[str] = []

    def note(
        self, client: str, now: float, request_id: str, *, client_port: int = 0, method: str = "-", path: str = "-"
    ) -> None:
        """One refusal to `client` at `now` (any monotonic-enough clock, the caller's): its own request line,
        with the fields every request line has, while the bucket lasts; else counted for the summary."""
        if self._since is not None and now - self._since >= self.interval:
            self._flush(now)
            self._since = None
        if self._lines.take(now):
            note = f"further {self.status}s summarised every {self.interval:g}s" if self._lines.empty else None
            log_request(client=client, client_port=client_port, method=method, path=path, status=self.status,
                        reason=self.reason, request_id=request_id, **({"note": note} if note else {}))
            return
        if self._since is None:
            self._since = now
        self._count += 1
        if client in self._addresses or len(self._addresses) < self.MAX_ADDRESSES:
            self._addresses[client] = self._addresses.get(client, 0) + 1
        if len(self._ids) < self.MAX_IDS:
            self._ids.append(request_id)

    def tick(self, now: float, *, final: bool = False) -> None:
        """Report what the interval counted once it has passed (`final`: now, the process is stopping),
        without waiting for another refusal."""
        if self._since is not None and (final or now - self._since >= self.interval):
            self._flush(now)
            self._since = None  # the next refusal past the bucket begins a new count

    def _flush(self, now: float) -> None:
        """Log what the interval counted, if anything (and the access log is on); then start counting afresh."""
        if self._count and self._since is not None and access_enabled():
            top = max(self._addresses.items(), key=lambda item: item[1]) if self._addresses else ("-", 0)
            _emit(self.event, {
                "count": self._count, "addresses": len(self._addresses), "top_client": top[0],
                "top_count": top[1], "seconds": round(now - self._since, 3), "request_ids": ",".join(self._ids),
            })
        self._count = 0
        self._addresses.clear()
        self._ids.clear()


def log_tunnel_closed(**fields: Any) -> None:
    """client, pool, backend, duration, bytes_in, bytes_out (all keyword arguments)."""
    if access_enabled():
        _emit("tunnel_closed", fields)

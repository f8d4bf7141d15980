"""Logging set-up: plain or JSON lines on stderr, level from the config.

Every event is exactly one line in both formats, so that a log shipper (or
`grep`) never splits one event in two: in JSON a traceback travels in the
`exception` field; in plain, line breaks inside a message or a traceback are
folded into ` | `.  Timestamps are ISO-8601 in UTC with a `Z`
(`2026-11-30T16:20:41.123Z`), whatever the host's time zone.  Numeric fields
of access events (durations, byte counts) stay numbers in JSON.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import json
import logging
import re
import sys
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Final, TextIO, cast

from lb import built_in_c
from lb.access_log import access_enabled, render_fields, set_access_writer
from lb.config.model import LogFormat, LoggingConfig
from lb.log_stream import DroppingHandler, note_dropped

if TYPE_CHECKING:
    from lb._logwrite import AccessSink

# What a line break inside one event becomes in the plain format.
LINE_FOLD = " | "


_now: Final = time.time  # a C static for compiled code (as lb.proxy.server._now)

# (second, its strftime) and (millisecond, its full text): one strftime per second and one format
# per millisecond, not per line (two access lines per handshake); each swapped as one tuple (threads may log).
_last_second: tuple[int, str] = (-1, "")
_last_milli: tuple[int, str] = (-1, "")
# `.000Z` to `.999Z`, looked up: a `:03d` format compiles to a str.format call that parses its
# template every time (about 3,000 instructions, a line's second-largest cost after the write).
_MILLI_SUFFIXES: Final = tuple([f".{milli:03d}Z" for milli in range(1000)])


def iso_utc(created: float, *, millis: bool = True) -> str:
    """`created` (epoch seconds) as ISO-8601 UTC with a Z: with milliseconds, or to the second.

    The one formatter for every timestamp we print (log lines, /lookup's issue and expiry times).
    """
    global _last_second, _last_milli
    if millis:
        milli = int(created * 1000)
        last, text = _last_milli
        if last == milli:
            return text
    seconds = milli // 1000 if millis else int(created)  # from milli: the two always agree
    second, text = _last_second
    if second != seconds:
        text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds))
        _last_second = (seconds, text)
    if not millis:
        return text + "Z"
    text += _MILLI_SUFFIXES[milli - seconds * 1000]
    _last_milli = (milli, text)
    return text


def token_digest(token: str) -> str:
    """What a line may say of an affinity token (never the token itself): the balancer's logs and
    `lb ctl`'s messages alike, so the two can be matched."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


class Throttle:
    """At most one log line per `interval` seconds for one kind of event; those between are counted.

    For events a flood can repeat (out of descriptors, garbage connections): one line per
    interval says what happened and how many more like it there were, never a line each.
    """

    __slots__ = ("interval", "last", "suppressed")

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self.last = -float("inf")
        self.suppressed = 0

    def due(self, now: float | None = None) -> int | None:
        """None: stay quiet (this event is counted); else log it now, with the count returned (then reset).

        `now`: the time by a clock of the caller's (a pure core has no clock of its own); None reads
        the monotonic clock.  One throttle, one clock.
        """
        if now is None:
            now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return None
        self.last = now
        suppressed, self.suppressed = self.suppressed, 0
        return suppressed


# Every break `str.splitlines` splits at, not LF alone: a lone CR put the rest of a message over the start of
# its line in a terminal (its time and level shown as another's), and a reader splitting on CR saw two events.
_LINE_BREAK: Final = re.compile("[\n\r\x0b\x0c\x1c-\x1e\x85\u2028\u2029]")


def _fold(text: str) -> str:
    return LINE_FOLD.join(part for part in text.splitlines() if part.strip()) if _LINE_BREAK.search(text) else text


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str = "") -> None:
        super().__init__()
        self._process = process

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_utc(record.created)

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if self._process:
            entry["process"] = self._process
        fields = getattr(record, "access", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # json.dumps escapes line breaks: one event, one line.
        return json.dumps(entry, default=str)


class PlainFormatter(logging.Formatter):
    """`TIME LEVEL [process ]logger: message`, folded onto one line."""

    def __init__(self, process: str = "") -> None:
        where = f"{process} " if process else ""
        super().__init__(f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return iso_utc(record.created)

    def format(self, record: logging.LogRecord) -> str:
        return _fold(super().format(record))


# A plain event's JSON fields: none (read only: `_line` copies from it for the JSON format alone).
_NO_FIELDS: Final[dict[str, object]] = {}


class AccessLineWriter:
    """`lb.access` events written straight to our handler's stream, exactly as its formatter would.

    Why not through `logging`: a LogRecord, a Formatter pass and the handler's dispatch cost
    about 25 µs per line, and a WebSocket handshake logs two (the request, the tunnel's close)
    in a budget of a few hundred µs.  The line is the same bytes either way (a test holds them
    equal).  Only used while logging is as `setup_logging` left it (`applies`): a test's
    `caplog`, an operator's extra handler or filter sees every event through the ordinary path.
    """

    __slots__ = ("_access", "_fd", "_flush_first", "_formatter", "_handler", "_lb", "_prefix", "_process", "_raw",
                 "_root", "_sink", "_stream", "plain")

    def __init__(self, handler: logging.StreamHandler[TextIO], log_format: LogFormat, process: str) -> None:
        self._handler = handler
        self._formatter = handler.formatter
        self.plain = log_format is not LogFormat.JSON
        self._process = process
        self._prefix = f" INFO {process} lb.access: " if process else " INFO lb.access: "
        self._root = logging.getLogger()
        self._lb = logging.getLogger("lb")
        self._access = logging.getLogger("lb.access")
        # The stream `_fd` was found for (a handler's stream may be replaced), and the file under it.
        self._stream: object = None
        self._raw: io.FileIO | None = None
        self._fd = -1
        self._flush_first = False
        # lb._logwrite.AccessSink's write_fields for `_fd`, when it can be made (see `_find_descriptor`).
        self._sink: Callable[[tuple[str, ...], tuple[object, ...]], bool | None] | None = None

    def applies(self) -> bool:
        """True while the handlers are as set up (so the direct line reaches everyone who listens,
        and nothing between the event and the handler would have changed or dropped it)."""
        handlers = self._root.handlers
        handler = self._handler
        access = self._access
        return (
            len(handlers) == 1 and handlers[0] is handler and not access.handlers and not self._lb.handlers
            and access.propagate and self._lb.propagate and not access.filters and not handler.filters
            and handler.level == logging.NOTSET and handler.formatter is self._formatter
            and handler.terminator == "\n"  # as `_find_descriptor` found it: the direct line ends so
        )

    def write(self, text: str, fields: dict[str, object]) -> None:
        """One event: `text` is its rendered `key=value` message, `fields` its JSON keys."""
        self._write(text, (), (), fields)

    def write_fields(self, keys: tuple[str, ...], values: tuple[object, ...]) -> bool:
        """One plain event, its text `render_fields(keys, values)` (rendered by lb._logwrite as it writes,
        when it does, so that no str is made for it), when the format is plain and `applies()`; also True,
        with nothing written, when `lb.access` logs nothing at INFO; False, nothing written, otherwise, for
        the caller's ordinary path.  One call for every check and the line: the two lines each handshake
        logs asked a writer typed by its protocol three times apiece, and the level once more."""
        sink = self._sink
        if sink is not None:
            # Every check below, and the lock and the write, in one call (lb/_logwrite.c says why); None
            # when anything is not exactly as the sink was made for: then the checks below decide.
            try:
                written = sink(keys, values)
            except Exception:
                self._report_failure(None, keys, values)
                return True
            if written is not None:
                if not written:
                    note_dropped()
                return True
        if not self.plain:
            return False
        if not access_enabled():
            return True
        if not self.applies():
            return False
        self._write(None, keys, values, _NO_FIELDS)
        return True

    def _write(
        self, text: str | None, keys: tuple[str, ...], values: tuple[object, ...], fields: dict[str, object]
    ) -> None:
        now = _now()
        handler = self._handler
        # The same lock the ordinary path takes (lines from other threads never interleave), taken
        # directly: Handler.acquire() is a Python-level call around it.
        lock = handler.lock
        if lock is not None:
            lock.acquire()
        try:
            stream = handler.stream
            if stream is not self._stream:
                self._find_descriptor(stream)
            raw = self._raw
            if (self.plain and raw is not None and not raw.closed and _WRITE_LINE is not None
                    and _WRITE_FIELDS is not None):
                if self._flush_first:
                    stream.flush()  # what the buffered layer holds goes first (a part line, say)
                # What the lines below would write, in one call (lb/_logwrite.c says why).
                if text is None:
                    written = _WRITE_FIELDS(self._fd, now, self._prefix, keys, values)
                else:
                    written = _WRITE_LINE(self._fd, now, self._prefix, text)
                if not written:
                    note_dropped()
            else:
                stream.write(self._line(now, render_fields(keys, values) if text is None else text, fields)
                             + handler.terminator)
                stream.flush()
        except Exception:
            self._report_failure(text, keys, values)
        finally:
            if lock is not None:
                lock.release()

    def _report_failure(self, text: str | None, keys: tuple[str, ...], values: tuple[object, ...]) -> None:
        """As StreamHandler.emit: a line that cannot be written (stderr closed, EPIPE) must never fail
        the handshake that logs; handleError reports it the way logging does.  Called in the except."""
        try:
            message = render_fields(keys, values) if text is None else text
        except Exception:  # the rendering is what failed (a value whose str() raises): name the values' types
            message = "".join(keys) + " (values not rendered: " + ", ".join(type(v).__name__ for v in values) + ")"
        self._handler.handleError(logging.makeLogRecord({"name": "lb.access", "msg": message, "levelno": logging.INFO,
                                                         "levelname": "INFO"}))

    def _line(self, now: float, text: str, fields: dict[str, object]) -> str:
        if self.plain:
            return iso_utc(now) + self._prefix + text
        entry: dict[str, object] = {"time": iso_utc(now), "level": "INFO", "logger": "lb.access", "message": text}
        if self._process:
            entry["process"] = self._process
        entry.update(fields)
        return json.dumps(entry, default=str)

    def _find_descriptor(self, stream: object) -> None:
        """The file under `stream` when a line written to its descriptor lands where and as the stream
        would put it: a text layer over the file that passes each whole line on (write-through, as
        `python -u`, PYTHONUNBUFFERED and the container image make stderr; or line-buffered, stderr's
        default), in an encoding that writes ASCII as ASCII, ending lines with `\\n`.  Anything
        else (a buffered file, a test's capture) is written through the stream."""
        self._stream, self._raw, self._fd, self._flush_first, self._sink = stream, None, -1, False, None
        if not isinstance(stream, io.TextIOWrapper) or not (stream.write_through or stream.line_buffering):
            return
        if self._handler.terminator != "\n" or codecs.lookup(stream.encoding).name not in _ASCII_AS_ASCII:
            return
        buffered = stream.buffer
        raw = buffered.raw if isinstance(buffered, io.BufferedWriter) else buffered
        if not isinstance(raw, io.FileIO) or raw.closed:
            return
        # A buffered layer under the text may hold bytes (a part line; anything written before a
        # `reconfigure(write_through=True)`): flushed before each direct line, so it goes first.
        self._raw, self._fd, self._flush_first = raw, raw.fileno(), raw is not buffered
        handler, objects = self._handler, (self._root, self._lb, self._access, self._handler)
        if (_ACCESS_SINK is not None and self.plain and handler.lock is not None
                and all(_attributes_are_its_own(obj) for obj in objects)):
            self._sink = _ACCESS_SINK(self._fd, self._prefix, self._root, self._lb, self._access, handler,
                                      self._formatter, stream, raw,
                                      stream.flush if self._flush_first else None).write_fields


def _attributes_are_its_own(obj: object) -> bool:
    """Whether `obj.name`, for each name an AccessSink reads, is what `obj.__dict__` holds: its class
    looks attributes up the usual way and defines none of those names (a property there would win
    over the instance's value).  True for logging's own Logger, RootLogger and StreamHandler."""
    kind = type(obj)
    return kind.__getattribute__ is object.__getattribute__ and not any(
        name in vars(klass) for klass in kind.__mro__ for name in _SINK_READS)


# What lb._logwrite.AccessSink reads of the loggers and the handler, each from the object's own __dict__
# (its own list, so that the two cannot disagree); empty when it is not built.
_SINK_READS: Final = cast("tuple[str, ...]", built_in_c("lb._logwrite", "SINK_READS") or ())


# Encodings in which an access line (ASCII: every value is, or is escaped to it) is its own bytes.
_ASCII_AS_ASCII: Final = frozenset({"utf-8", "ascii", "iso8859-1", "cp1252"})


# lb._logwrite's write_line and write_fields, or None (not built, or LB_PURE_PYTHON=1): lines go through
# the stream.
_WRITE_LINE: Final = cast("Callable[[int, float, str, str], bool] | None", built_in_c("lb._logwrite", "write_line"))
_WRITE_FIELDS: Final = cast("Callable[[int, float, str, tuple[str, ...], tuple[object, ...]], bool] | None",
                            built_in_c("lb._logwrite", "write_fields"))
_ACCESS_SINK: Final = cast("type[AccessSink] | None", built_in_c("lb._logwrite", "AccessSink"))


_process_name = ""


def _log_uncaught(kind: type[BaseException], value: BaseException, traceback: TracebackType | None) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
        return
    logging.getLogger("lb").critical("uncaught exception", exc_info=(kind, value, traceback))


def setup_logging(config: LoggingConfig, *, process: str | None = None) -> None:
    """Args:
    process: names the process in every line (with `workers: N`: `owner`, `worker-0`...);
        None keeps the name given before (a reload calls this again).
    """
    global _process_name
    if process is not None:
        _process_name = process
    process = _process_name
    handler = DroppingHandler(sys.stderr)
    if config.format is LogFormat.JSON:
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(PlainFormatter(process))
    # Neither format shows the caller, thread or process of a record: skip looking them up for every
    # record (the logging HOWTO's "Optimization"; the caller lookup walks the stack per line).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_access_writer(AccessLineWriter(handler, config.format, process))
    root.setLevel(config.level)
    # Warnings and a crash's traceback go through the same formatter: one event, one line.
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    # aiohttp's access log would log every admin scrape at INFO.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.getLogger("lb.access").setLevel(logging.INFO if config.access_log else logging.WARNING)

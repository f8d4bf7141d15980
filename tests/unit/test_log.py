"""Log lines: ISO-8601 UTC timestamps, one event per line in plain and JSON."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.config.model import LogFormat, LoggingConfig
from lb.log import PlainFormatter, iso_utc, setup_logging

ISO_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


class Captured:
    def __init__(self, capsys: pytest.CaptureFixture[str]) -> None:
        self._capsys = capsys

    def getvalue(self) -> str:
        return self._capsys.readouterr().err


@pytest.fixture
def captured(capsys: pytest.CaptureFixture[str]) -> Iterator[Captured]:
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook)
    yield Captured(capsys)
    root.handlers[:], root.level, sys.excepthook = saved
    logging.captureWarnings(False)


def _log_failure() -> None:
    log = logging.getLogger("lb.test")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("reload failed:\n%s", "pools.x.backends[0].id: bad\nlimits.y: bad")


def test_iso_utc_is_utc_with_z() -> None:
    """Epoch 0 is midnight UTC whatever the host's zone."""
    assert iso_utc(0.25) == "1970-01-01T00:00:00.250Z"


def test_plain_is_one_line_with_iso_timestamp(captured: Captured) -> None:
    """A multi-line message with a traceback is still one plain line."""
    setup_logging(LoggingConfig(format=LogFormat.PLAIN))
    _log_failure()
    lines = captured.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert ISO_Z.match(lines[0].split(" ", 1)[0])
    assert "limits.y: bad" in lines[0] and "RuntimeError: boom" in lines[0]


@pytest.mark.parametrize("brk", ["\r", "\x0b", "\x0c", "\x1c", "\x85", "\u2028", "\u2029", "\r\n"])
def test_plain_folds_every_line_break_not_only_lf(captured: Captured, brk: str) -> None:
    """A lone CR (or any break `splitlines` knows) in a message is folded as an LF is: a terminal would
    return to the start of the line and show the rest over the event's own time and level, and a reader
    that splits on it would see a second event.  Only LF was folded."""
    setup_logging(LoggingConfig(format=LogFormat.PLAIN))
    logging.getLogger("lb.test").warning("bad answer: %s", f"first{brk}2026-01-01T00:00:00.000Z ERROR forged")
    out = captured.getvalue()
    assert out.count("\n") == 1 and out.splitlines() == [out.rstrip("\n")], repr(out)
    assert "first | 2026-01-01T00:00:00.000Z ERROR forged" in out


def test_json_is_one_line_with_traceback_and_numbers(captured: Captured) -> None:
    """JSON: one object per line, the traceback inside it, numeric fields as numbers."""
    setup_logging(LoggingConfig(format=LogFormat.JSON))
    _log_failure()
    logging.getLogger("lb.access").info("x", extra={"access": {"duration": 1.25, "bytes_in": 3}})
    lines = captured.getvalue().splitlines()
    assert len(lines) == 2, lines
    first, second = (json.loads(line) for line in lines)
    assert ISO_Z.fullmatch(first["time"]) and "RuntimeError: boom" in first["exception"]
    assert second["duration"] == 1.25 and second["bytes_in"] == 3


def test_an_uncaught_exception_is_one_logged_line(captured: Captured) -> None:
    """A crash's traceback goes through the formatter too (sys.excepthook)."""
    setup_logging(LoggingConfig(format=LogFormat.PLAIN))
    try:
        raise ValueError("crash")
    except ValueError as exc:
        sys.excepthook(ValueError, exc, exc.__traceback__)
    lines = captured.getvalue().splitlines()
    assert len(lines) == 1 and "uncaught exception" in lines[0] and "ValueError: crash" in lines[0]


def test_plain_access_values_cannot_forge_fields_or_reach_the_terminal(captured: Captured) -> None:
    """A client-chosen path with a space, a fake field and an escape sequence is one quoted value."""
    from lb.access_log import log_request

    setup_logging(LoggingConfig(format=LogFormat.PLAIN))
    log_request(client="127.0.0.1", path="/a status=200\x1b[2J\u202e", status=404, reason="no_route")
    [line] = captured.getvalue().splitlines()
    assert "\x1b" not in line and "\u202e" not in line
    assert ' path="/a status=200\\u001b[2J\\u202e" status=404 ' in line + " ", line
    assert "client=127.0.0.1" in line and "reason=no_route" in line


@pytest.mark.parametrize("log_format", [LogFormat.PLAIN, LogFormat.JSON])
@pytest.mark.parametrize("process", ["", "worker-2"])
def test_direct_access_lines_equal_the_logging_path(captured: Captured, log_format: LogFormat, process: str) -> None:
    """Access events skip the logging machinery (speed) but print exactly what its formatter prints."""
    from lb import access_log

    setup_logging(LoggingConfig(format=log_format), process=process)
    fields = {"client": "127.0.0.9", "path": "/a b\x1b", "status": 101, "duration": 0.25, "pool": "g"}
    writer = access_log._installed.writer
    assert writer is not None and writer.applies()
    access_log.log_request(**fields)
    try:
        access_log.set_access_writer(None)  # the ordinary LogRecord → Formatter → handler path
        access_log.log_request(**fields)
    finally:
        access_log.set_access_writer(writer)
    direct, ordinary = captured.getvalue().splitlines()
    if log_format is LogFormat.JSON:
        first, second = json.loads(direct), json.loads(ordinary)
        assert ISO_Z.fullmatch(first.pop("time")) and ISO_Z.fullmatch(second.pop("time"))
        assert first == second and list(first) == list(second)
        assert first["duration"] == 0.25 and (first.get("process") == process or not process)
    else:
        assert ISO_Z.match(direct) and ISO_Z.match(ordinary)
        assert direct.split(" ", 1)[1] == ordinary.split(" ", 1)[1]


def _stderr_like(path: Path, kind: str) -> io.TextIOWrapper:
    """A stream over `path` made as Python makes stderr: `unbuffered` (python -u, PYTHONUNBUFFERED, the
    container image), `line` (the default: line-buffered), `reconfigured` (write-through over a buffer,
    as `sys.stderr.reconfigure(write_through=True)` leaves it), or `buffered` (an ordinary file)."""
    if kind == "unbuffered":
        return io.TextIOWrapper(io.FileIO(path, "w"), write_through=True)
    return io.TextIOWrapper(io.BufferedWriter(io.FileIO(path, "w")), line_buffering=kind == "line",
                            write_through=kind == "reconfigured")


def _setup_on(stream: io.TextIOWrapper, process: str = "") -> None:
    saved, sys.stderr = sys.stderr, stream
    try:
        setup_logging(LoggingConfig(format=LogFormat.PLAIN), process=process)
    finally:
        sys.stderr = saved


@pytest.mark.parametrize("kind", ["unbuffered", "line", "reconfigured", "buffered"])
@pytest.mark.parametrize("process", ["", "worker-2"])
def test_access_lines_written_to_the_descriptor_equal_the_logging_path(
    tmp_path: Path, captured: Captured, process: str, kind: str
) -> None:
    """On stderr as Python makes it (unbuffered or line-buffered), plain access lines go straight to its
    descriptor (lb/_logwrite.c when built); on a buffered file, through the stream.  Either way they
    read exactly as the logging path writes them, in order with the stream's own lines, even behind
    a part line someone wrote to the stream."""
    from lb import access_log

    with _stderr_like(tmp_path / "stderr", kind) as stream:
        _setup_on(stream, process)
        writer = access_log._installed.writer
        assert writer is not None and writer.applies()
        fields = {"client": "127.0.0.9", "path": "/a b\x1b" + "x" * 5000, "status": 101, "pool": "g"}
        access_log.log_request(**fields)  # past the C writer's stack buffer
        logging.getLogger("lb.test").warning("between")
        stream.buffer.write(b"part:")  # no newline: held back in the buffered layer, if there is one
        access_log.log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "new", 101, "r1")
        access_log.set_access_writer(None)  # the ordinary LogRecord → Formatter → handler path
        try:
            access_log.log_request(**fields)
            stream.buffer.write(b"part:")
            access_log.log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "new", 101, "r1")
        finally:
            access_log.set_access_writer(writer)
    direct, between, answered, ordinary, ordinary_answered = (tmp_path / "stderr").read_text().splitlines()
    assert "WARNING" in between and "between" in between
    for first, second in ((direct, ordinary), (answered, ordinary_answered)):
        assert ISO_Z.match(first.removeprefix("part:")) and ISO_Z.match(second.removeprefix("part:"))
        assert first.split(" ", 1)[1] == second.split(" ", 1)[1]
    assert answered.startswith("part:") and ordinary_answered.startswith("part:")
    descriptor = writer._fd >= 0  # type: ignore[attr-defined]
    assert descriptor is (kind != "buffered")


# Changes to logging an AccessSink must notice (each with its undoing), for the test below: (name, do).
_EXTRA = logging.Handler()
_OTHER_FORMATTER = logging.Formatter("custom %(message)s")
_SINK_CHANGES: list[tuple[str, Callable[[logging.Handler, io.TextIOWrapper, io.TextIOWrapper], object]]] = [
    ("handler on root", lambda h, s, o: logging.getLogger().addHandler(_EXTRA)),
    ("no handler on root", lambda h, s, o: logging.getLogger().removeHandler(_EXTRA)),
    ("handler on lb", lambda h, s, o: logging.getLogger("lb").addHandler(_EXTRA)),
    ("no handler on lb", lambda h, s, o: logging.getLogger("lb").removeHandler(_EXTRA)),
    ("handler on lb.access", lambda h, s, o: logging.getLogger("lb.access").addHandler(_EXTRA)),
    ("no handler on lb.access", lambda h, s, o: logging.getLogger("lb.access").removeHandler(_EXTRA)),
    ("lb.access does not propagate", lambda h, s, o: setattr(logging.getLogger("lb.access"), "propagate", False)),
    ("lb.access propagates", lambda h, s, o: setattr(logging.getLogger("lb.access"), "propagate", True)),
    ("lb does not propagate", lambda h, s, o: setattr(logging.getLogger("lb"), "propagate", False)),
    ("lb propagates", lambda h, s, o: setattr(logging.getLogger("lb"), "propagate", True)),
    ("filter on lb.access", lambda h, s, o: logging.getLogger("lb.access").addFilter(bool)),
    ("no filter on lb.access", lambda h, s, o: logging.getLogger("lb.access").filters.clear()),
    ("filter on the handler", lambda h, s, o: h.addFilter(bool)),
    ("no filter on the handler", lambda h, s, o: h.filters.clear()),
    ("level on the handler", lambda h, s, o: h.setLevel(logging.ERROR)),
    ("no level on the handler", lambda h, s, o: h.setLevel(logging.NOTSET)),
    ("another formatter", lambda h, s, o: h.setFormatter(_OTHER_FORMATTER)),
    ("another stream", lambda h, s, o: setattr(h, "stream", o)),
    ("the stream again", lambda h, s, o: setattr(h, "stream", s)),
    ("lb.access at WARNING", lambda h, s, o: logging.getLogger("lb.access").setLevel(logging.WARNING)),
    ("lb.access at INFO", lambda h, s, o: logging.getLogger("lb.access").setLevel(logging.INFO)),
    ("lb.access at NOTSET", lambda h, s, o: logging.getLogger("lb.access").setLevel(logging.NOTSET)),
    ("root at ERROR", lambda h, s, o: logging.getLogger().setLevel(logging.ERROR)),
    ("root at INFO", lambda h, s, o: logging.getLogger().setLevel(logging.INFO)),
    ("disable INFO", lambda h, s, o: logging.disable(logging.INFO)),
    ("disable nothing", lambda h, s, o: logging.disable(logging.NOTSET)),
    ("lb.access disabled", lambda h, s, o: setattr(logging.getLogger("lb.access"), "disabled", True)),
    ("lb.access enabled", lambda h, s, o: setattr(logging.getLogger("lb.access"), "disabled", False)),
    # Changes that no logging call makes, which a sink that remembers what it saw must notice all the same:
    # a list changed in place (no __dict__ changes), the logger's cache written, a __dict__ replaced.
    ("root's handler replaced in place", lambda h, s, o: _replace_first(logging.getLogger().handlers, h, _EXTRA)),
    ("root's handler put back in place", lambda h, s, o: _replace_first(logging.getLogger().handlers, _EXTRA, h)),
    ("lb.access's cache says no",
     lambda h, s, o: logging.getLogger("lb.access")._cache.__setitem__(logging.INFO, False)),
    ("lb.access's cache forgets", lambda h, s, o: logging.getLogger("lb.access")._cache.clear()),
    ("lb.access's __dict__ replaced", lambda h, s, o: setattr(logging.getLogger("lb.access"), "__dict__",
                                                             dict(vars(logging.getLogger("lb.access"))))),
    ("the handler's stream set in its __dict__", lambda h, s, o: vars(h).__setitem__("stream", o)),
    ("the handler ends lines otherwise", lambda h, s, o: setattr(h, "terminator", "\r\n")),
    ("the handler ends lines as its class", lambda h, s, o: vars(h).pop("terminator", None)),
]


def _replace_first(handlers: list[logging.Handler], old: logging.Handler, new: logging.Handler) -> None:
    if handlers and handlers[0] is old:
        handlers[0] = new


@pytest.mark.parametrize("kind", ["unbuffered", "line"])  # the sink flushes the buffered layer of the second first
@given(st.lists(st.sampled_from(range(len(_SINK_CHANGES))), max_size=10))
@settings(max_examples=200, deadline=None)
def test_an_access_sink_writes_only_where_the_python_checks_would(kind: str, changes: list[int]) -> None:
    """lb._logwrite.AccessSink judges `applies()` and the level in C: after any sequence of changes to the
    loggers, the handler and the level, it writes a line only where the Python checks would write one,
    says "no line due" only where lb.access logs nothing at INFO, and otherwise leaves the line to them
    (None).  As set up, it writes."""
    if not log_writer_built():
        pytest.skip(NOT_BUILT + ", or LB_PURE_PYTHON=1 sets it aside")
    from lb import access_log
    from lb.access_log import access_enabled

    keys, values = ("event=x a=",), ("y",)
    root, lb_logger, access = logging.getLogger(), logging.getLogger("lb"), logging.getLogger("lb.access")
    saved = (root.handlers[:], root.level, lb_logger.handlers[:], access.handlers[:], access.level,
             logging.root.manager.disable)
    with tempfile.TemporaryDirectory() as tmp, _stderr_like(Path(tmp) / "err", kind) as stream, \
            _stderr_like(Path(tmp) / "other", "unbuffered") as other:
        try:
            _setup_on(stream)
            writer = access_log._installed.writer
            assert writer is not None and writer.write_fields(keys, values)  # the Python path: finds the sink
            sink = writer._sink  # type: ignore[attr-defined]
            assert sink is not None, "a sink for stderr as Python makes it"
            handler = root.handlers[0]
            path = Path(tmp) / "err"
            for index in [None, *changes]:
                if index is not None:
                    _SINK_CHANGES[index][1](handler, stream, other)
                before = path.stat().st_size
                result = sink(keys, values)
                wrote = path.stat().st_size > before
                name = "as set up" if index is None else _SINK_CHANGES[index][0]
                if index is None:
                    assert result is True and wrote, name
                elif result is None:
                    assert not wrote, name
                elif wrote:
                    assert result is True and access_enabled() and writer.applies(), name
                else:
                    assert result is True and not access_enabled(), name
        finally:
            for change in ("no handler on root", "no handler on lb", "no handler on lb.access"):
                dict(_SINK_CHANGES)[change](logging.Handler(), stream, other)
            root.handlers[:], lb_logger.handlers[:], access.handlers[:] = saved[0], saved[2], saved[3]
            root.setLevel(saved[1])
            access.setLevel(saved[4])
            logging.disable(saved[5])
            access.propagate = lb_logger.propagate = True
            access.disabled = False
            access.filters.clear()


@pytest.mark.parametrize("closes_the_old", [True, False])
def test_an_access_sink_looks_at_its_stream_again_once_it_holds_the_lock(tmp_path: Path, closes_the_old: bool) -> None:
    """A thread holding the handler's lock replaces its stream, and closes the old one, whose descriptor's
    number a new file then takes (a reviewer's case), or keeps it open: the line waiting for the lock goes
    to the new stream, as the Python path sends it, never into that file nor to the old stream."""
    if not log_writer_built():
        pytest.skip(NOT_BUILT + ", or LB_PURE_PYTHON=1 sets it aside")
    from lb.log import AccessLineWriter

    raw = io.FileIO(tmp_path / "first", "w")
    stream = io.TextIOWrapper(raw, write_through=True)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PlainFormatter(""))
    root, access = logging.getLogger(), logging.getLogger("lb.access")
    saved = root.handlers[:], access.level
    root.handlers[:] = [handler]
    access.setLevel(logging.INFO)
    other = io.TextIOWrapper(io.FileIO(tmp_path / "other", "w"), write_through=True)
    try:
        writer = AccessLineWriter(handler, LogFormat.PLAIN, "")
        assert writer.write_fields(("event=first a=",), ("1",))
        assert writer._sink is not None  # type: ignore[attr-defined]
        number, holding = raw.fileno(), threading.Event()

        def replace_the_stream() -> None:
            with handler.lock:  # type: ignore[union-attr]
                holding.set()
                time.sleep(0.2)  # the line below waits for the lock meanwhile
                handler.setStream(other)
                if closes_the_old:
                    stream.close()
                    taken = os.open(tmp_path / "victim", os.O_WRONLY | os.O_CREAT, 0o600)
                    if taken != number:  # a lower number was free: put the file on the old one's number
                        os.dup2(taken, number)
                        os.close(taken)

        replacing = threading.Thread(target=replace_the_stream)
        replacing.start()
        assert holding.wait(5)
        assert writer.write_fields(("event=second a=",), ("1",))
        replacing.join(5)
        assert not replacing.is_alive()
        if closes_the_old:
            os.close(number)
            assert (tmp_path / "victim").read_text() == ""
    finally:
        root.handlers[:] = saved[0]
        access.setLevel(saved[1])
        other.close()
        stream.close()
    assert "event=second" in (tmp_path / "other").read_text()
    assert "event=second" not in (tmp_path / "first").read_text()


class _CountingLock:
    """A handler lock that is no RLock, and says how often it was taken and given back."""

    def __init__(self) -> None:
        self.inner = threading.RLock()
        self.taken = self.released = 0

    def acquire(self) -> bool:
        self.taken += 1
        return self.inner.acquire()

    def release(self) -> None:
        self.released += 1
        self.inner.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


@pytest.mark.parametrize("lock", ["its own RLock, held", "a lock of another kind"])
def test_an_access_sink_takes_its_handlers_lock_as_the_logging_path_would(tmp_path: Path, lock: str) -> None:
    """A line logged while this thread holds the handler's RLock is written, as the logging path writes
    it; a lock of another kind is taken and given back for each line, whatever threads there are."""
    if not log_writer_built():
        pytest.skip(NOT_BUILT + ", or LB_PURE_PYTHON=1 sets it aside")
    from lb.log import AccessLineWriter

    stream = io.TextIOWrapper(io.FileIO(tmp_path / "lines", "w"), write_through=True)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PlainFormatter(""))
    counting = _CountingLock()
    if lock == "a lock of another kind":
        handler.lock = counting  # type: ignore[assignment]
    root, access = logging.getLogger(), logging.getLogger("lb.access")
    saved = root.handlers[:], access.level
    root.handlers[:] = [handler]
    access.setLevel(logging.INFO)
    try:
        writer = AccessLineWriter(handler, LogFormat.PLAIN, "")
        assert writer.write_fields(("event=first a=",), ("1",))
        assert writer._sink is not None  # type: ignore[attr-defined]
        with handler.lock:  # type: ignore[union-attr]
            assert writer.write_fields(("event=second a=",), ("1",))
    finally:
        root.handlers[:] = saved[0]
        access.setLevel(saved[1])
        stream.close()
    assert [line.split(" lb.access: ", 1)[1] for line in (tmp_path / "lines").read_text().splitlines()] == [
        "event=first a=1", "event=second a=1"]
    if lock == "a lock of another kind":
        assert (counting.taken, counting.released) == (3, 3)  # the two lines' and the `with`'s


def _run_alone(script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`script` in a fresh interpreter of one thread (a test process has others), on this checkout's build."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    env.pop("LB_PURE_PYTHON", None)
    return subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=20,
                          env=env, cwd=root)


_ALONE_WITH_A_LOCK_LEFT_HELD = """
import logging, os, threading
from lb import access_log
from lb.config.model import LogFormat, LoggingConfig
from lb.log import setup_logging

setup_logging(LoggingConfig(format=LogFormat.PLAIN))
access_log.log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "new", 101, "r0")  # the first makes the sink
assert access_log._installed.writer._sink is not None
lock = logging.getLogger().handlers[0].lock
taker = threading.Thread(target=lock.acquire)  # takes the handler's RLock and ends, holding it
taker.start()
taker.join()
assert threading.active_count() == 1
access_log.log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "new", 101, "r1")
print("logged", flush=True)
os._exit(0)  # not logging's shutdown, which takes every handler's lock
"""


def test_an_access_sink_alone_in_its_process_leaves_the_rlock() -> None:
    """The only thread of a process: the sink takes no RLock, which could exclude no one.  Seen from a
    lock a thread took and ended holding, which the logging path (and a sink that took it) would wait
    for for ever; the sink writes the line."""
    if not log_writer_built():
        pytest.skip(NOT_BUILT + ", or LB_PURE_PYTHON=1 sets it aside")
    done = _run_alone(_ALONE_WITH_A_LOCK_LEFT_HELD)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "logged\n"
    assert "request_id=r1" in done.stderr


_FLUSH_STARTS_A_THREAD = """
import io, logging, os, sys, threading, time
from lb import access_log
from lb.config.model import LogFormat, LoggingConfig
from lb.log import setup_logging

path = sys.argv[1]
holding = threading.Event()
started = []

class Stream(io.TextIOWrapper):
    def flush(self):
        super().flush()
        if armed and not started:  # the second line's flush starts a thread that holds the lock a while
            started.append(threading.Thread(target=hold_and_write))
            started[0].start()
            holding.wait(5)

def hold_and_write():
    with handler.lock:
        holding.set()
        time.sleep(0.3)
        stream.write("thread line\\n")
        super(Stream, stream).flush()

armed = False
stream = Stream(io.BufferedWriter(io.FileIO(path, "w")), line_buffering=True)
sys.stderr = stream
setup_logging(LoggingConfig(format=LogFormat.PLAIN))
handler = logging.getLogger().handlers[0]
access_log.log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "new", 101, "r0")  # the first makes the sink
assert access_log._installed.writer._sink is not None
assert threading.active_count() == 1
armed = True
access_log.log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "new", 101, "r1")
started[0].join(5)
print("logged", flush=True, file=sys.__stdout__)
os._exit(0)
"""


def test_a_thread_a_streams_flush_starts_has_the_lock_waited_for(tmp_path: Path) -> None:
    """Alone when the line began, not once the stream's own flush started a thread that holds the handler's
    lock: the line waits for it, as the locked path would (a reviewer's case), and comes after its line."""
    if not log_writer_built():
        pytest.skip(NOT_BUILT + ", or LB_PURE_PYTHON=1 sets it aside")
    done = _run_alone(_FLUSH_STARTS_A_THREAD, str(tmp_path / "lines"))
    assert done.returncode == 0, done.stderr
    lines = (tmp_path / "lines").read_text().splitlines()
    assert [line.rsplit("request_id=", 1)[-1] if "request_id" in line else line for line in lines] == [
        "r0", "thread line", "r1"]


def test_an_access_sink_is_made_once() -> None:
    if not log_writer_built():
        pytest.skip(NOT_BUILT + ", or LB_PURE_PYTHON=1 sets it aside")
    from lb._logwrite import AccessSink

    with pytest.raises(TypeError):
        AccessSink.__new__(AccessSink).write_fields((), ())  # never given its objects
    handler = logging.StreamHandler(io.StringIO())
    sink = AccessSink(2, " INFO lb.access: ", logging.getLogger(), logging.getLogger("lb"),
                      logging.getLogger("lb.access"), handler, handler.formatter, handler.stream, object(), None)
    with pytest.raises(TypeError):  # a call in progress reads its fields from the object
        sink.__init__(2, " INFO lb.access: ", logging.getLogger(), logging.getLogger("lb"),  # type: ignore[misc]
                      logging.getLogger("lb.access"), handler, handler.formatter, handler.stream, object(), None)


def test_the_descriptor_is_not_used_where_it_would_write_otherwise_than_the_stream(
    tmp_path: Path, captured: Captured
) -> None:
    """A stream in an encoding that writes ASCII otherwise, a handler ending lines otherwise, and a
    stream closed but left in place (its descriptor's number may belong to another file by now)."""
    from lb import access_log

    with io.TextIOWrapper(io.FileIO(tmp_path / "utf16", "w"), encoding="utf-16", write_through=True) as stream:
        _setup_on(stream)
        access_log.log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "new", 101, "r1")
        assert access_log._installed.writer._fd == -1  # type: ignore[union-attr]
    assert (tmp_path / "utf16").read_bytes().decode("utf-16").endswith("request_id=r1\n")

    with _stderr_like(tmp_path / "crlf", "unbuffered") as stream:
        _setup_on(stream)
        logging.getLogger().handlers[0].terminator = "\r\n"  # type: ignore[attr-defined]
        access_log.log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "new", 101, "r1")
    assert (tmp_path / "crlf").read_bytes().endswith(b"request_id=r1\r\n")

    stream = _stderr_like(tmp_path / "closed", "unbuffered")
    _setup_on(stream)
    access_log.log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "first", 101, "r1")
    number = stream.fileno()
    with open(tmp_path / "other", "w") as other:  # opened first: its own number is another
        stream.close()
        os.dup2(other.fileno(), number)  # the closed stream's descriptor number now names this file
        saved, logging.raiseExceptions = logging.raiseExceptions, False
        try:
            access_log.log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "second", 101, "r2")
        finally:
            logging.raiseExceptions = saved
            os.close(number)
        other.write("mine\n")
    assert (tmp_path / "other").read_text() == "mine\n"
    assert "affinity=second" not in (tmp_path / "closed").read_text()


@pytest.mark.parametrize(
    "change",
    ["handler on lb", "lb.access does not propagate", "lb does not propagate", "filter on lb.access",
     "filter on the handler", "level on the handler", "another formatter"],
)
def test_anything_that_would_change_or_drop_an_access_event_takes_the_logging_path(
    captured: Captured, change: str
) -> None:
    from lb import access_log

    setup_logging(LoggingConfig(format=LogFormat.PLAIN))
    writer = access_log._installed.writer
    assert writer is not None and writer.applies()
    lb_logger, access = logging.getLogger("lb"), logging.getLogger("lb.access")
    handler = logging.getLogger().handlers[0]
    saved_formatter = handler.formatter
    heard: list[str] = []
    extra = logging.Handler()
    extra.emit = lambda record: heard.append(record.getMessage())  # type: ignore[method-assign]
    try:
        if change == "handler on lb":
            lb_logger.addHandler(extra)
        elif change == "lb.access does not propagate":
            access.propagate = False
        elif change == "lb does not propagate":
            lb_logger.propagate = False
        elif change == "filter on lb.access":
            access.addFilter(lambda record: False)
        elif change == "filter on the handler":
            handler.addFilter(lambda record: False)
        elif change == "level on the handler":
            handler.setLevel(logging.ERROR)
        else:
            handler.setFormatter(logging.Formatter("custom %(message)s"))
        assert not writer.applies()
        access_log.log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "new", 101, "r1")
    finally:
        lb_logger.removeHandler(extra)
        access.propagate = lb_logger.propagate = True
        access.filters.clear()
        handler.filters.clear()
        handler.setLevel(logging.NOTSET)
        handler.setFormatter(saved_formatter)
    out = captured.getvalue()
    if change == "handler on lb":
        assert heard == ["event=request client=127.0.0.9 client_port=1 method=GET path=/ pool=p backend=b "
                         "affinity=new status=101 request_id=r1"]
    elif change == "another formatter":
        assert out.startswith("custom event=request"), out
    else:
        assert "event=request" not in out, out


def test_an_access_line_to_a_descriptor_that_fails_does_not_raise(captured: Captured) -> None:
    """stderr a pipe whose reader is gone (EPIPE): the line fails, never the handshake that logs it."""
    from lb.access_log import log_answered

    read, write = os.pipe()
    os.close(read)
    stream = io.TextIOWrapper(io.FileIO(write, "w"), write_through=True)
    saved, sys.stderr = sys.stderr, stream
    try:
        setup_logging(LoggingConfig(format=LogFormat.PLAIN))
    finally:
        sys.stderr = saved
    saved_raise, logging.raiseExceptions = logging.raiseExceptions, False
    try:
        log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "new", 101, "r1")
    finally:
        logging.raiseExceptions = saved_raise
        logging.getLogger().handlers.clear()
        with contextlib.suppress(OSError):
            stream.close()


@pytest.mark.parametrize("kind", ["unbuffered", "buffered"])  # lb._logwrite's path, and the stream's
def test_an_access_line_whose_value_cannot_be_rendered_does_not_raise(tmp_path: Path, kind: str) -> None:
    """A value whose str() raises (or an int past Python's 4,300 digits) fails the line, and the
    rendering of its message for the error report failed again, out of the handler: the handshake
    that logged it with it (a reviewer's case; the typed callers pass no such value today)."""
    from lb.log import AccessLineWriter

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    stream = _stderr_like(tmp_path / "err", kind)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(PlainFormatter(""))
    writer = AccessLineWriter(handler, LogFormat.PLAIN, "")
    reported: list[logging.LogRecord] = []
    handler.handleError = reported.append  # type: ignore[method-assign]
    root, access = logging.getLogger(), logging.getLogger("lb.access")
    saved = root.handlers[:], access.level
    root.handlers[:] = [handler]  # as setup_logging leaves it: the writer applies
    access.setLevel(logging.INFO)  # a line is due (at WARNING, write_fields has nothing to write)
    try:
        assert writer.write_fields(("event=x a=",), (Unprintable(),))
        assert writer.write_fields(("event=x a=",), (10**5000,))
    finally:
        root.handlers[:] = saved[0]
    assert len(reported) == 2 and "Unprintable" in str(reported[0].msg)
    try:
        assert not writer.write_fields(("event=x a=",), ("y",))  # its handler gone: the ordinary path's to write
    finally:
        access.setLevel(saved[1])
    stream.close()


NOT_BUILT = "lb/_logwrite.c is not built (make native needs a C compiler)"


def log_writer_built() -> bool:
    from lb import log

    return log._WRITE_LINE is not None


@given(created=st.floats(0, 253402300799.999, allow_nan=False) | st.integers(0, 2**34).map(lambda n: n / 1000))
@settings(max_examples=500, deadline=None)
def test_the_c_line_writer_stamps_a_line_as_iso_utc_does(created: float) -> None:
    logwrite = pytest.importorskip("lb._logwrite", reason=NOT_BUILT)
    read, write = os.pipe()
    try:
        logwrite.write_line(write, created, " INFO lb.access: ", "event=x")
        line = os.read(read, 4096).decode()
    finally:
        os.close(read)
        os.close(write)
    assert line == iso_utc(created) + " INFO lb.access: event=x\n"


def test_the_c_line_writer_writes_all_of_a_long_line_through_a_pipe_and_reports_errors() -> None:
    logwrite = pytest.importorskip("lb._logwrite", reason=NOT_BUILT)
    read, write = os.pipe()
    text = "path=" + "y" * 300_000  # several times a pipe's capacity: write(2) takes it in parts
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read, 65536), b"")))
    reader.start()
    try:
        logwrite.write_line(write, 1.5, " ", text)
    finally:
        os.close(write)
        reader.join(10)
        os.close(read)
    assert b"".join(chunks).decode() == "1970-01-01T00:00:01.500Z " + text + "\n"
    read_only, other = os.pipe()
    try:
        with pytest.raises(OSError) as bad_fd:
            logwrite.write_line(read_only, 1.0, " ", "x")  # a pipe's read end: never written
        assert bad_fd.value.errno == errno.EBADF
    finally:
        os.close(read_only)
        os.close(other)
    for args in [(-1, 1.0, " ", "x"), (2**40, 1.0, " ", "x"), (1, float("nan"), " ", "x"), (1, -1.0, " ", "x"),
                 (1, 1e300, " ", "x")]:
        with pytest.raises(ValueError):
            logwrite.write_line(*args)
    with pytest.raises(TypeError):
        logwrite.write_line(1, 1.0, b" ", "x")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        logwrite.write_line(1, 1.0, " ")  # type: ignore[call-arg]


def test_a_line_waiting_for_room_lets_other_threads_run() -> None:
    """A write(2) to a full blocking pipe lets go of the GIL while another thread lives, as os.write does:
    here that thread is the pipe's reader, so a writer that kept the GIL would wait for ever (the alarm
    ends that wait with an error instead)."""
    logwrite = pytest.importorskip("lb._logwrite", reason=NOT_BUILT)
    read, write = os.pipe()
    os.set_blocking(write, False)
    with contextlib.suppress(BlockingIOError):
        while True:
            os.write(write, b"x" * 4096)
    os.set_blocking(write, True)
    chunks: list[bytes] = []

    def read_it_all() -> None:
        time.sleep(0.2)  # the line is waiting for room by now
        chunks.extend(iter(lambda: os.read(read, 65536), b""))

    reader = threading.Thread(target=read_it_all)
    reader.start()

    def waited_too_long(signum: int, frame: object) -> None:
        raise TimeoutError("the line's write kept the GIL: the reader never ran")

    previous = signal.signal(signal.SIGALRM, waited_too_long)
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    try:
        logwrite.write_line(write, 1.5, " ", "event=last")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.close(write)
        reader.join(10)
        os.close(read)
    assert b"".join(chunks).endswith(b"x1970-01-01T00:00:01.500Z event=last\n")


_SIGNAL_STARTS_THE_READER = """
import contextlib, os, signal, threading
import lb._logwrite as logwrite

read, write = os.pipe()
os.set_blocking(write, False)
with contextlib.suppress(BlockingIOError):
    while True:
        os.write(write, b"x" * 4096)
os.set_blocking(write, True)

def reader():
    while os.read(read, 65536):
        pass

def start_reader(signum, frame):
    signal.setitimer(signal.ITIMER_REAL, 0)
    threading.Thread(target=reader, daemon=True).start()

signal.signal(signal.SIGALRM, start_reader)
signal.setitimer(signal.ITIMER_REAL, 0.2)
assert threading.active_count() == 1
logwrite.write_line(write, 1.5, " ", "y" * 1_000_000)
print("written", flush=True)
os._exit(0)
"""


def test_a_thread_a_signal_handler_starts_during_a_write_gets_the_gil() -> None:
    """Alone when the line began, not once a handler (run between two writes of it) started the pipe's
    reader: the rest of the line lets go of the GIL, else it would wait for that reader for ever (a
    reviewer's case)."""
    pytest.importorskip("lb._logwrite", reason=NOT_BUILT)
    try:
        done = _run_alone(_SIGNAL_STARTS_THE_READER)
    except subprocess.TimeoutExpired:
        pytest.fail("the write kept the GIL after a signal handler started the pipe's reader")
    assert done.returncode == 0, done.stderr
    assert done.stdout == "written\n"


def _written_fields(keys: tuple[str, ...], values: tuple[object, ...], created: float = 1.5) -> str:
    """What lb._logwrite.write_fields writes for `keys` and `values`, read back from a pipe."""
    logwrite = pytest.importorskip("lb._logwrite", reason=NOT_BUILT)
    read, write = os.pipe()
    chunks: list[bytes] = []
    reader = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read, 65536), b"")))
    reader.start()
    try:
        assert logwrite.write_fields(write, created, " INFO lb.access: ", keys, values) is True
    finally:
        os.close(write)
        reader.join(10)
        os.close(read)
    return b"".join(chunks).decode()


class _Shown:
    """A value that is neither str, int nor float: printed as its str(), bare or quoted."""

    def __init__(self, text: str) -> None:
        self.text = text

    def __str__(self) -> str:
        return self.text


# Visible ASCII, bare unless it holds `"` or `=` (which it often does): the writer's fast path and its edge.
_visible = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=12)
_field_values = (
    st.text(st.characters(codec="utf-8"), max_size=16) | st.text(alphabet="ab =\"\x1b\u00e9", max_size=8) | _visible
    | st.integers() | st.floats() | st.booleans() | st.none() | (st.text(max_size=8) | _visible).map(_Shown)
)


@given(values=st.lists(_field_values, max_size=10), created=st.floats(0, 253402300799.999))
@settings(max_examples=500, deadline=None)
def test_the_c_field_writer_renders_each_value_as_plain_value_does(values: list[object], created: float) -> None:
    """write_fields(keys, values) writes the line lb.access_log.render_fields renders in Python: ints of any
    size, floats (inf, nan, -0.0), text bare or JSON-quoted, anything else by its str()."""
    from lb.access_log import render_fields

    keys = tuple(f" k{index}=" for index in range(len(values)))
    assert _written_fields(keys, tuple(values), created) == (
        iso_utc(created) + " INFO lb.access: " + render_fields(keys, tuple(values)) + "\n")


@given(st.integers(0, 10**12 + 5).map(lambda k: k / 1000) | st.floats(0, 2e12)
       | st.sampled_from([0.0, 999999999999.999]))
@settings(max_examples=500, deadline=None)
def test_the_c_field_writer_prints_a_float_of_milliseconds_as_repr_does(number: float) -> None:
    """A whole number of milliseconds (a tunnel's duration) is written by hand, anything else by Python's
    shortest repr: both as str() writes them, and so are the floats either side and the negated one."""
    from lb.access_log import render_fields

    values = (number, math.nextafter(number, math.inf), math.nextafter(number, -math.inf), -number)
    keys = tuple(f" k{index}=" for index in range(len(values)))
    assert render_fields(keys, values) == "".join(f"{key}{value!r}" for key, value in zip(keys, values, strict=True))
    assert _written_fields(keys, values, 0.0) == iso_utc(0.0) + " INFO lb.access: " + render_fields(keys, values) + "\n"


@pytest.mark.parametrize("number", [0, 7, -1, 10, -10, 2**63 - 1, -(2**63), 2**63, -(2**63) - 1, 10**30, True])
def test_the_c_field_writer_prints_an_int_at_every_edge_as_str_does(number: int) -> None:
    """Digits by hand within a C long long (its most negative one included), str() past it; a bool as its
    str() too (plain_value prints `True`, not `1`)."""
    assert _written_fields((" n=",), (number,)) == f"1970-01-01T00:00:01.500Z INFO lb.access:  n={number}\n"


def test_the_c_field_writer_takes_a_line_past_its_stack_buffer_and_refuses_what_it_cannot_render() -> None:
    logwrite = pytest.importorskip("lb._logwrite", reason=NOT_BUILT)
    keys, values = ("event=x path=", " status="), ("/" + "a b" * 20_000, 101)  # quoted: 60,000 and more
    line = _written_fields(keys, values)
    assert line == "1970-01-01T00:00:01.500Z INFO lb.access: event=x path=" + json.dumps(values[0]) + " status=101\n"

    class Unprintable:
        def __str__(self) -> str:
            raise RuntimeError("no text")

    read, write = os.pipe()
    try:
        for bad_keys, bad_values, error in [
            (("a=",), (), TypeError),  # one key, no value
            (["a="], ["x"], TypeError),  # lists, not tuples
            ((b"a=",), ("x",), TypeError),  # a key that is not str
            (("a=",), (Unprintable(),), RuntimeError),  # str() raised: that error, nothing written
        ]:
            with pytest.raises(error):
                logwrite.write_fields(write, 1.0, " ", bad_keys, bad_values)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            logwrite.write_fields(write, -1.0, " ", ("a=",), ("x",))
        os.set_blocking(read, False)
        with pytest.raises(BlockingIOError):
            os.read(read, 10)  # none of the refused lines was written, not even in part
    finally:
        os.close(read)
        os.close(write)


def test_an_extra_handler_still_hears_access_events(captured: Captured) -> None:
    """While anyone else listens on the root logger, access events go through logging."""
    from lb.access_log import log_request

    class Listener(logging.Handler):
        def __init__(self) -> None:
            super().__init__()
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    setup_logging(LoggingConfig(format=LogFormat.PLAIN))
    listener = Listener()
    logging.getLogger().addHandler(listener)
    log_request(client="127.0.0.9", status=101)
    assert listener.messages == ["event=request client=127.0.0.9 status=101"]
    assert "event=request client=127.0.0.9 status=101" in captured.getvalue()


def test_an_access_line_that_cannot_be_written_does_not_raise(captured: Captured) -> None:
    """A broken stderr (EPIPE) fails the log line, never the handshake that logs it, as with logging."""
    from lb.access_log import log_answered

    class Broken:
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self) -> None:
            raise BrokenPipeError(32, "Broken pipe")

    setup_logging(LoggingConfig(format=LogFormat.PLAIN))
    handler = logging.getLogger().handlers[0]
    assert isinstance(handler, logging.StreamHandler)
    saved, logging.raiseExceptions = logging.raiseExceptions, False
    handler.setStream(Broken())  # type: ignore[arg-type]
    try:
        log_answered("127.0.0.9", 1, "GET", "/", "p", "b", "new", 101, "r1")
    finally:
        logging.raiseExceptions = saved

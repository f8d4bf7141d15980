"""Access log: 429s are logged one by one up to a rate, past it summarised (issue 8), naming the first ids they
answered (SPEC part 2: an error answer's request id is in the log); the handshake lines' fast rendering."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb import access_log, pure_python_requested
from lb.access_log import RateLimitSummary


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "lb.access"]


BURST = int(access_log.LINES_AT_ONCE)
RATE = access_log.LINES_PER_SECOND


def test_an_ordinary_burst_of_429s_is_logged_one_line_each(caplog: pytest.LogCaptureFixture) -> None:
    """SPEC part 2: an error answer's request id is one the log carries.  A burst within the bucket gets a
    request line per refusal, at once (the summary named only 32 of them, 10 s later)."""
    summary = RateLimitSummary(interval=10.0)
    with caplog.at_level(logging.INFO, logger="lb.access"):
        for i in range(BURST):
            summary.note("198.51.100.1", 100.0, f"r{i}", client_port=4242, method="GET", path="/ws?x=1")
        summary.tick(200.0)
    logged = lines(caplog)
    assert len(logged) == BURST and all(f"request_id=r{i}" in line for i, line in enumerate(logged))
    # The fields every request line has (the head was read before the rate was checked).
    assert 'client_port=4242 method=GET path="/ws?x=1" status=429' in logged[0]
    assert "note=" not in logged[0] and "further 429s summarised every 10s" in logged[-1]


def test_a_flood_of_429s_is_held_to_the_bucket_then_one_summary_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    """Past the bucket, refusals are counted and reported once the interval has passed; the bucket refills at
    LINES_PER_SECOND meanwhile, so a flood logs that many lines a second, not one per refusal."""
    summary = RateLimitSummary(interval=10.0)
    flood = BURST + 1000
    with caplog.at_level(logging.INFO, logger="lb.access"):
        for i in range(flood):  # over 5 s
            summary.note("198.51.100.1" if i % 5 else "198.51.100.2", 100.0 + 5 * i / flood, f"r{i}")
        one_by_one = len(lines(caplog))
        assert BURST + 5 * RATE - 2 <= one_by_one <= BURST + 5 * RATE + 1, one_by_one
        summary.note("198.51.100.3", 111.0, "last")
    logged = lines(caplog)
    assert len(logged) == one_by_one + 2
    assert f"event=rate_limited count={flood - one_by_one} addresses=2 top_client=198.51.100.1" in logged[-2]
    assert "request_id=last" in logged[-1]


def _drain(summary: RateLimitSummary, now: float) -> None:
    """Empty the bucket of one-by-one lines at `now`."""
    for i in range(BURST):
        summary.note("198.51.100.250", now, f"d{i}")


def test_a_storm_beyond_max_connections_is_summarised_the_same_way(caplog: pytest.LogCaptureFixture) -> None:
    summary = RateLimitSummary(interval=10.0, status=503, reason="too_many_connections", event="over_max_connections")
    with caplog.at_level(logging.INFO, logger="lb.access"):
        _drain(summary, 100.0)
        assert "status=503 reason=too_many_connections request_id=d0" in lines(caplog)[0]
        for i in range(299):
            summary.note(f"198.51.100.{i % 7}", 100.0, f"r{i}")
        summary.note("198.51.100.9", 111.0, "last")
    logged = lines(caplog)[BURST:]
    assert len(logged) == 2
    assert logged[0].startswith("event=over_max_connections count=299 addresses=7 ")
    assert "status=503" in logged[1] and "request_id=last" in logged[1]


def test_a_summary_names_the_first_request_ids_it_counts(caplog: pytest.LogCaptureFixture) -> None:
    """A flood's error answers past the bucket are found in the log by their ids: the summary lists the first
    MAX_IDS."""
    summary = RateLimitSummary(interval=10.0)
    ids = [f"{i:016x}" for i in range(100)]
    with caplog.at_level(logging.INFO, logger="lb.access"):
        _drain(summary, 100.0)
        for request_id in ids:
            summary.note("198.51.100.1", 100.0, request_id)
        summary.tick(111.0)
    (summarised,) = lines(caplog)[BURST:]
    assert "count=100 " in summarised
    assert f"request_ids={','.join(ids[: RateLimitSummary.MAX_IDS])} " in summarised + " "
    assert len(summarised) < 1000


def test_a_summary_is_reported_when_its_interval_ends_not_at_the_next_refusal(caplog: pytest.LogCaptureFixture) -> None:
    """`tick` (every second, from the balancer) reports a flood that is over; the next refusal, the bucket
    refilled, is logged as it happens."""
    summary = RateLimitSummary(interval=10.0)
    with caplog.at_level(logging.INFO, logger="lb.access"):
        _drain(summary, 100.0)
        for i in range(5):
            summary.note("198.51.100.1", 100.0, f"r{i}")
        summary.tick(109.9)
        assert len(lines(caplog)) == BURST, "not before the interval has passed"
        summary.tick(110.0)
        assert len(lines(caplog)) == BURST + 1 and "count=5 " in lines(caplog)[-1]
        summary.tick(130.0)
        assert len(lines(caplog)) == BURST + 1, "said once"
        summary.note("198.51.100.2", 300.0, "next")
    assert "request_id=next" in lines(caplog)[-1] and "status=429" in lines(caplog)[-1]


def test_a_stopping_balancer_reports_what_the_interval_counted_so_far(caplog: pytest.LogCaptureFixture) -> None:
    summary = RateLimitSummary(interval=10.0)
    with caplog.at_level(logging.INFO, logger="lb.access"):
        _drain(summary, 100.0)
        summary.note("198.51.100.1", 100.0, "r1")
        summary.tick(100.01, final=True)
    assert "count=1 " in lines(caplog)[-1] and "request_ids=r1" in lines(caplog)[-1]


def test_addresses_remembered_are_bounded() -> None:
    """A flood from many addresses counts them all but remembers at most MAX_ADDRESSES."""
    summary = RateLimitSummary(interval=1e9)
    _drain(summary, 0.0)
    for i in range(5 * RateLimitSummary.MAX_ADDRESSES):
        summary.note(f"10.0.{i // 256}.{i % 256}", 0.0, "r")  # the same moment: the bucket stays empty
    assert summary._count == 5 * RateLimitSummary.MAX_ADDRESSES
    assert len(summary._addresses) == RateLimitSummary.MAX_ADDRESSES


class _Recorder:
    """An access writer that keeps what it is given (plain or JSON)."""

    def __init__(self, plain: bool) -> None:
        self.plain = plain
        self.lines: list[tuple[str, dict[str, object]]] = []

    def applies(self) -> bool:
        return True

    def write(self, text: str, fields: dict[str, object]) -> None:
        self.lines.append((text, fields))

    def write_fields(self, keys: tuple[str, ...], values: tuple[object, ...]) -> bool:
        # What lb._logwrite renders in C (tests/unit/test_log.py holds the two equal), in the plain format.
        if self.plain:
            self.lines.append((access_log.render_fields(keys, values), {}))
        return self.plain


@contextlib.contextmanager
def _recording(plain: bool) -> Iterator[_Recorder]:
    """Access events at INFO go to a fresh recorder for the block; the writer and level are restored after."""
    recorder = _Recorder(plain)
    saved = access_log._installed.writer, access_log.access.level
    access_log.set_access_writer(recorder)
    access_log.access.setLevel(logging.INFO)
    try:
        yield recorder
    finally:
        access_log.set_access_writer(saved[0])
        access_log.access.setLevel(saved[1])


# Any text, or visible ASCII (bare unless it holds `"` or `=`): of any text alone, a field was bare in about 4%
# of examples, so the two renderings were compared almost only on quoted values.
_text = st.text(st.characters(codec="utf-8"), max_size=12) | st.text(
    st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12
)


@settings(max_examples=200, deadline=None)
@given(client=_text, method=_text, path=_text, pool=_text, backend=_text, affinity=_text, request_id=_text,
       port=st.integers(0, 65535), status=st.integers(100, 599), plain=st.booleans())
def test_the_handshake_line_is_the_generic_request_line(
    client: str, method: str, path: str, pool: str, backend: str, affinity: str, request_id: str,
    port: int, status: int, plain: bool,
) -> None:
    """log_answered renders from its keys and values what log_request renders by its loop: same text, same
    fields."""
    with _recording(plain) as recorder:
        access_log.log_answered(client, port, method, path, pool, backend, affinity, status, request_id)
        access_log.log_request(client=client, client_port=port, method=method, path=path, pool=pool,
                               backend=backend, affinity=affinity, status=status, request_id=request_id)
    (fast, fast_fields), (generic, generic_fields) = recorder.lines
    assert fast == generic
    assert "\n" not in fast and "\x1b" not in fast
    if not plain:
        assert fast_fields == generic_fields


@settings(max_examples=200, deadline=None)
@given(client=_text, pool=_text, backend=_text, request_id=_text, port=st.integers(0, 65535),
       duration=st.floats(0, 1e6), sizes=st.tuples(st.integers(0, 2**40), st.integers(0, 2**40)),
       plain=st.booleans())
def test_the_tunnel_end_line_is_the_generic_close_line(
    client: str, pool: str, backend: str, request_id: str, port: int, duration: float, sizes: tuple[int, int],
    plain: bool,
) -> None:
    with _recording(plain) as recorder:
        access_log.log_tunnel_ended(client, port, pool, backend, duration, sizes[0], sizes[1], request_id)
        access_log.log_tunnel_closed(client=client, client_port=port, pool=pool, backend=backend, duration=duration,
                                     bytes_in=sizes[0], bytes_out=sizes[1], request_id=request_id)
    (fast, fast_fields), (generic, generic_fields) = recorder.lines
    assert fast == generic
    if not plain:
        assert fast_fields == generic_fields


# The rule for a bare (unquoted) value, as a pattern: both checks (C's one pass when it is built, and the
# Python string methods that stand in for it) must say what it says.
_BARE = re.compile(r'[!#-<>-~]+')


def _checks() -> list[Callable[[str], bool]]:
    try:
        from lb._logwrite import bare
    except ImportError:  # not built (no C compiler): the Python check alone, and the wiring test skips
        return [access_log._bare_in_python]
    return [access_log._bare_in_python, bare]


@given(st.text(max_size=24) | st.text(alphabet=st.characters(max_codepoint=0x80), max_size=12))
@settings(max_examples=3000)
def test_a_value_is_bare_exactly_when_it_is_visible_ascii_without_a_quote(text: str) -> None:
    """_plain's check says what `_BARE` (visible ASCII but `"` and `=`, non-empty) says, in C and in Python."""
    expected = text if _BARE.fullmatch(text) else json.dumps(text)
    assert access_log._plain(text) == expected
    for bare in _checks():
        assert bare(text) is (_BARE.fullmatch(text) is not None), bare


@pytest.mark.parametrize("char", [chr(c) for c in range(0x81)] + ["\u0100", "\U0001f600"])
def test_each_ascii_character_alone_is_bare_or_quoted_as_the_pattern_says(char: str) -> None:
    """Every ASCII character and DEL, and the first one past ASCII (and past latin-1, and past the BMP)."""
    expected = char if _BARE.fullmatch(char) else json.dumps(char)
    assert access_log._plain(char) == expected
    for bare in _checks():
        assert bare(char) is (expected == char)
        assert bare("ok" + char) is (expected == char) and bare(char + "ok") is (expected == char)


def test_the_c_check_is_used_when_built_and_set_aside_by_lb_pure_python() -> None:
    logwrite = pytest.importorskip("lb._logwrite",
                                   reason="lb/_logwrite.c is not built (make native needs a C compiler)")
    if pure_python_requested():
        pytest.skip("LB_PURE_PYTHON=1: the Python check runs")
    assert access_log._bare is logwrite.bare
    assert logwrite.bare("") is False
    with pytest.raises(TypeError):
        logwrite.bare(b"bytes")  # type: ignore[arg-type]
    probe = "import lb.access_log as a; print(a._bare is a._bare_in_python)"
    env = {**os.environ, "LB_PURE_PYTHON": "1"}
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "True", done.stderr


@contextlib.contextmanager
def _logging_restored() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in ("", "lb", "lb.access")]
    saved = [(logger.level, logger.disabled) for logger in loggers]
    saved_disable = logging.root.manager.disable
    try:
        yield
    finally:
        logging.disable(saved_disable)
        for logger, (level, disabled) in zip(loggers, saved, strict=True):
            logger.setLevel(level)
            logger.disabled = disabled


_LEVEL_CHANGES: list[tuple[str, Callable[[], object]]] = [
    ("access DEBUG", lambda: logging.getLogger("lb.access").setLevel(logging.DEBUG)),
    ("access WARNING", lambda: logging.getLogger("lb.access").setLevel(logging.WARNING)),
    ("lb WARNING", lambda: logging.getLogger("lb").setLevel(logging.WARNING)),
    ("lb INFO", lambda: logging.getLogger("lb").setLevel(logging.INFO)),
    ("root ERROR", lambda: logging.getLogger().setLevel(logging.ERROR)),
    ("root INFO", lambda: logging.getLogger().setLevel(logging.INFO)),
    ("access NOTSET", lambda: logging.getLogger("lb.access").setLevel(logging.NOTSET)),
    ("disable INFO", lambda: logging.disable(logging.INFO)),
    ("disable NOTSET", lambda: logging.disable(logging.NOTSET)),
    ("access disabled", lambda: setattr(logging.getLogger("lb.access"), "disabled", True)),
    ("access enabled", lambda: setattr(logging.getLogger("lb.access"), "disabled", False)),
]


@given(st.lists(st.sampled_from(range(len(_LEVEL_CHANGES))), max_size=12))
@settings(max_examples=300)
def test_the_access_log_is_on_exactly_when_its_logger_says_info_is(changes: list[int]) -> None:
    """access_enabled reads isEnabledFor's own cache: after any sequence of level changes, `disable`s and
    a disabled logger, before the cache is filled and after, it answers what isEnabledFor answers."""
    access = logging.getLogger("lb.access")
    with _logging_restored():
        for index in changes:
            _LEVEL_CHANGES[index][1]()
            first = access_log.access_enabled()  # the cache was cleared by most changes: the slow way
            expected = access.isEnabledFor(logging.INFO)
            assert first is expected, _LEVEL_CHANGES[index][0]
            assert access_log.access_enabled() is expected, _LEVEL_CHANGES[index][0]  # from the cache


def test_a_line_bucket_gives_its_burst_then_its_rate() -> None:
    """lb.access_log.LineBucket: `burst` lines at once after a quiet spell, then `per_second`; never more
    than `burst` saved up, and a clock that steps back takes nothing away."""
    from lb.access_log import LineBucket

    bucket = LineBucket(burst=4, per_second=2)
    assert [bucket.take(10.0) for _ in range(5)] == [True, True, True, True, False] and bucket.empty
    assert bucket.take(10.4) is False and bucket.take(10.5) is True  # 1.0 line after 0.5 s
    assert sum(bucket.take(1000.0) for _ in range(10)) == 4, "no more than the burst saved up"
    assert bucket.take(999.0) is False, "a step back of the clock refills nothing"
    assert bucket.take(1000.0) is False, "nor the time back to where it was"


PIPE_BUF = 4096  # Linux: a longer write to a pipe may be taken in pieces, another process's line between them


@pytest.mark.parametrize("path", ['"' * 16000, "/" + "x" * 16000], ids=["quotes", "plain"])
@pytest.mark.parametrize("entry", ["log_request", "log_answered"])
def test_a_request_line_fits_one_pipe_write_whatever_its_method_and_path(
    entry: str, path: str, caplog: pytest.LogCaptureFixture
) -> None:
    """One event per line with `workers: N` on a pipe: the client's method and path (as long as its head) are
    cut, so that a line, plain or JSON, is one write a pipe takes whole and no worker's line lands inside it."""
    from lb.log import JsonFormatter, PlainFormatter

    method = "M" * 6000
    client = "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff"
    with caplog.at_level(logging.INFO, logger="lb.access"):
        if entry == "log_request":
            access_log.log_request(client=client, client_port=65535, method=method, path=path, pool="p" * 64,
                                   backend="b" * 64, affinity="redispatch", status=503,
                                   reason="no_healthy_backend_in_the_pool", request_id="f" * 24)
        else:
            access_log.log_answered(client, 65535, method, path, "p" * 64, "b" * 64, "redispatch", 101, "f" * 24)
    (record,) = [r for r in caplog.records if r.name == "lb.access"]
    for formatter in (PlainFormatter("worker-63"), JsonFormatter("worker-63")):
        line = (formatter.format(record) + "\n").encode()
        assert len(line) <= PIPE_BUF, (type(formatter).__name__, len(line))
    fields = json.loads(JsonFormatter().format(record))
    assert fields["path"] == path[: access_log.MAX_LOGGED_PATH - 3] + "..."
    assert fields["method"] == method[: access_log.MAX_LOGGED_METHOD - 3] + "..."

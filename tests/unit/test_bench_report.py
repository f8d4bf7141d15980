"""Smoke tests for the benchmark's pure parts: the table, the frames, /proc parsing, the HAProxy config.

The benchmark itself never runs under `make test`; these only check that what it
prints and sends is right, with no socket and no process.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import runner
from bench.floor import HEAD_END, insert_cookie, parse_backends
from bench.haproxy import render_config
from bench.procs import CLOCK_TICKS, Pinning, cpu_busy, parse_cpu_times, parse_stat_cpu, parse_status_rss
from bench.report import Kind, Row, format_value, ratio, render_table, row_ratios, to_document
from bench.runner import Plan, Run, Target, _keep, _paired, balancer_config, floor_beside_balancer, turns_spec
from bench.wire import (
    BENCH_MASK,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    Unmasker,
    accept_key,
    apply_mask,
    client_frame,
    client_request,
    echo_frames,
    first_frame,
    server_frame,
    server_frame_size,
    set_cookies,
    status_code,
)

# -- report ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "value", "text"),
    [
        (Kind.RATE, 12345.4, "12,345"),
        (Kind.MBPS, 195.46, "195.5"),
        (Kind.CPU_US, 11.94e-6, "11.9 µs"),
        (Kind.CPU_US, 239.4e-6, "239 µs"),
        (Kind.CPU_MS, 1.094e-3, "1.09 ms"),
        (Kind.KIB, 2.84, "2.8 KiB"),
        (Kind.RATE, None, "-"),
    ],
)
def test_format_value(kind: Kind, value: float | None, text: str) -> None:
    """Each kind of measure is shown in its unit, a missing one as '-'."""
    assert format_value(kind, value) == text


def test_ratio_needs_both_values() -> None:
    """A ratio with a missing or zero denominator is absent, not an error."""
    assert ratio(1.0, 2.0) == 0.5
    assert ratio(None, 2.0) is None
    assert ratio(1.0, None) is None
    assert ratio(1.0, 0.0) is None


def test_table_columns_and_ratios() -> None:
    """The table has one line per row, aligned columns, and balancer/direct, haproxy/direct, lb/haproxy ratios."""
    rows = [
        Row("echo msg/s", Kind.RATE, direct=100_000, balancer=40_000, haproxy=50_000),
        Row("proxy CPU per echoed message", Kind.CPU_US, balancer=12e-6, haproxy=10e-6),
        Row("echo msg/s workers 2", Kind.RATE, balancer=60_000, ratio_base=40_000),
    ]
    text = render_table(rows, haproxy=True)
    lines = text.splitlines()
    assert lines[0].split() == ["scenario", "direct", "balancer", "ratio", "haproxy", "ratio", "lb/haproxy"]
    assert len(lines) == 4
    assert lines[1].split()[-6:] == ["100,000", "40,000", "0.40", "50,000", "0.50", "0.80"]
    assert lines[2].endswith("10.0 µs                 1.20")
    assert "1.50" in lines[3].split()  # workers 2 / workers 1
    assert len({len(line) for line in lines[:2]}) == 1  # right-aligned to the same width


def test_table_without_haproxy() -> None:
    """Without HAProxy the table has no HAProxy columns at all."""
    text = render_table([Row("echo msg/s", Kind.RATE, direct=2.0, balancer=1.0)], haproxy=False)
    assert "haproxy" not in text
    assert text.splitlines()[1].split()[-3:] == ["2", "1", "0.50"]


def test_json_document_carries_ratios() -> None:
    """The JSON rows hold the raw values and the same ratios as the table."""
    doc = to_document({"pinning": "x"}, [Row("r", Kind.RATE, direct=4.0, balancer=1.0, haproxy=2.0)], ["n"], {})
    row = doc["rows"][0]
    ratios = (row["ratio_balancer"], row["ratio_haproxy"], row["ratio_lb_haproxy"])
    assert row["kind"] == "rate"
    assert ratios == (0.25, 0.5, 0.5)


# -- wire ----------------------------------------------------------------------------------------------


def test_accept_key_rfc_example() -> None:
    """Sec-WebSocket-Accept matches the worked example of RFC 6455 §1.3."""
    assert accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize(("size", "header"), [(0, 2), (64, 2), (125, 2), (126, 4), (4096, 4), (65536, 10)])
def test_client_frame_layout(size: int, header: int) -> None:
    """A client frame is FIN+opcode, mask bit, the RFC 6455 §5.2 length encoding, the key, the masked payload."""
    payload = bytes(range(256)) * (size // 256) + bytes(range(size % 256))
    frame = client_frame(payload)
    assert frame[0] == 0x80 | OP_BINARY
    assert frame[1] & 0x80
    assert frame[header : header + 4] == BENCH_MASK
    assert apply_mask(frame[header + 4 :], BENCH_MASK) == payload
    assert server_frame_size(size) == header + size == len(server_frame(payload))


def test_echo_is_the_unmasked_frame() -> None:
    """The echo of a masked client frame is the same frame unmasked, exactly `server_frame_size` bytes."""
    for size in (64, 4096):
        payload = b"x" * size
        echo = echo_frames(client_frame(payload, OP_TEXT), Unmasker())
        assert echo.reply == server_frame(payload, OP_TEXT)
        assert len(echo.reply) == server_frame_size(size)
        assert not echo.close


def test_echo_keeps_a_partial_frame() -> None:
    """Bytes of an incomplete frame are left for the next read."""
    two = client_frame(b"a" * 10) + client_frame(b"b" * 300)
    echo = echo_frames(two[:-5], Unmasker())
    assert echo.reply == server_frame(b"a" * 10, OP_BINARY)
    assert echo.consumed == len(client_frame(b"a" * 10))


def test_echo_answers_ping_and_close() -> None:
    """Ping gets a pong with its payload; close is returned and ends the connection."""
    echo = echo_frames(client_frame(b"hi", OP_PING) + client_frame(b"\x03\xe8", OP_CLOSE), Unmasker())
    assert echo.reply == server_frame(b"hi", OP_PONG) + server_frame(b"\x03\xe8", OP_CLOSE)
    assert echo.close


def test_unmask_with_other_keys() -> None:
    """Any mask key works, not only the benchmark's."""
    unmasker = Unmasker()
    for key in (b"\x00\x00\x00\x00", b"\xff\x01\x02\x03"):
        masked = apply_mask(b"hello world", key)
        assert unmasker.unmask(masked, key) == b"hello world"


def test_response_head_helpers() -> None:
    """Status, Set-Cookie pairs and the first frame are read from a 101 answer."""
    head = b"HTTP/1.1 101 Switching Protocols\r\nSet-Cookie: SRV=s1; path=/\r\nset-cookie: LB=abc; HttpOnly"
    assert status_code(head) == 101
    assert set_cookies(head) == ["SRV=s1", "LB=abc"]
    data = b"xx" + server_frame(b'{"type":"hello"}') + b"rest"
    assert first_frame(data, 2) == (len(server_frame(b'{"type":"hello"}')), b'{"type":"hello"}')
    assert first_frame(data[:5], 2) is None


def test_client_request_carries_cookie() -> None:
    """The upgrade request is a complete head, with the cookie when given."""
    request = client_request("127.0.0.1:80", "/ws", cookie="SRV=s1")
    assert request.startswith(b"GET /ws HTTP/1.1\r\n")
    assert request.endswith(b"\r\nCookie: SRV=s1\r\n\r\n")


# -- /proc and haproxy ----------------------------------------------------------------------------------


def test_proc_parsers() -> None:
    """CPU seconds come from utime+stime (fields 14, 15), even with ') ' in the command name."""
    stat = "42 (odd) name) S 1 42 42 0 -1 4194304 500 0 0 0 250 50 0 0 20 0 1 0 100 1000 200"
    assert parse_stat_cpu(stat) == pytest.approx(300 / CLOCK_TICKS)
    assert parse_status_rss("Name:\tx\nVmRSS:\t  5120 kB\n") == 5120
    before = parse_cpu_times("cpu  1 1 1 1\ncpu0 10 0 10 80 0 0 0 0\n")
    after = parse_cpu_times("cpu  1 1 1 1\ncpu0 60 0 10 130 0 0 0 0\n")
    assert cpu_busy(before, after) == {"cpu0": 0.5}


def test_haproxy_config_is_equivalent() -> None:
    """The HAProxy reference uses one thread, leastconn, an inserted indirect nocache cookie and 1h tunnels."""
    text = render_config(("127.0.0.1", 8080), [("gw-1", "127.0.0.1", 9001), ("gw-2", "127.0.0.1", 9002)], 9000)
    for line in (
        "nbthread 1",
        "mode http",
        "balance leastconn",
        "cookie SRV insert indirect nocache",
        "timeout tunnel 1h",
        "bind 127.0.0.1:8080",
        "server gw-2 127.0.0.1:9002 cookie gw-2 check",
    ):
        assert line in text
    assert "http-server-close" not in text.replace('no "option http-server-close"', "")
    assert "log " not in text and "httplog" not in text  # logs nothing unless asked


def test_haproxy_logs_like_the_balancer_when_asked() -> None:
    """log=True: a line per request on stderr (HAProxy's own httplog format), in `defaults` for every proxy."""
    text = render_config(("127.0.0.1", 8080), [("gw-1", "127.0.0.1", 9001)], 9000, log=True)
    defaults = text.split("defaults\n", 1)[1].split("\n\n", 1)[0]
    assert "    log stderr format iso local0 info" in defaults.splitlines()
    assert "    option httplog" in defaults.splitlines()


# -- floor ---------------------------------------------------------------------------------------------


def test_table_floor_columns() -> None:
    """With the floor, the table ends in floor and lb/floor = balancer / floor."""
    rows = [
        Row("proxy CPU per handshake", Kind.CPU_US, balancer=300e-6, haproxy=100e-6, floor=120e-6),
        Row("echo msg/s", Kind.RATE, direct=10.0, balancer=5.0),
    ]
    lines = render_table(rows, haproxy=True, floor=True).splitlines()
    assert lines[0].split()[-2:] == ["floor", "lb/floor"]
    assert lines[1].split()[-4:] == ["3.00", "120", "µs", "2.50"]
    assert lines[2].rstrip().endswith("-")  # no floor value: no ratio either
    assert "floor" not in render_table(rows, haproxy=True)


def test_json_document_carries_floor_ratio() -> None:
    """The JSON rows hold the floor value and lb/floor."""
    doc = to_document({}, [Row("r", Kind.CPU_US, balancer=3.0, floor=2.0)], [], {})
    assert doc["rows"][0]["floor"] == 2.0
    assert doc["rows"][0]["ratio_lb_floor"] == 1.5


def test_floor_inserts_its_cookie_as_the_last_header() -> None:
    """The floor's Set-Cookie goes right before the blank line; what follows the head is untouched."""
    answer = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi"
    out = insert_cookie(answer, answer.find(HEAD_END))
    head, _, rest = out.partition(HEAD_END)
    assert head.endswith(b"\r\nSet-Cookie: FLOOR=b1; Path=/; HttpOnly")
    assert rest == b"\x81\x02hi"
    assert set_cookies(head + HEAD_END) == ["FLOOR=b1"]


def test_floor_backend_list() -> None:
    """`--backends h:p,h:p` is read in order."""
    assert parse_backends("127.0.0.1:1, 127.0.0.2:2") == [("127.0.0.1", 1), ("127.0.0.2", 2)]


def test_balancer_config_keeps_shipped_defaults() -> None:
    """The benchmark config sets only listeners, admin, affinity, routes and the pool: no limit is overridden."""
    config = balancer_config([("gw-1", "127.0.0.1", 9001)], 8080, 8081)
    assert set(config) == {"listeners", "admin", "affinity", "routes", "pools"}


# -- rounds ----------------------------------------------------------------------------------------


def test_a_cell_reads_the_round_of_median_cost_and_checks_count_every_round() -> None:
    """Three interleaved rounds: the cell is the median round by CPU per handshake (rate and CPU from
    one round), and the cookie checks sum all rounds, so a re-issue in a discarded round still shows."""
    run = Run(Plan.make(quick=False), Pinning(None, None, "none"), Path("."))
    for cpu, count, reissued in ((5.0, 10_000, 0), (1.0, 10_000, 2), (3.0, 10_000, 0)):
        _keep(run, "handshake_check", "balancer", {"proxy_cpu": cpu, "count": count, "rate": count / 5,
                                                 "cookies_issued": reissued, "server_changes": 0})
    cell = run.raw["handshake_check"]["balancer"]
    assert cell["proxy_cpu"] == 3.0 and len(cell["rounds"]) == 3
    assert cell["all_rounds"] == {"count": 30_000, "cookies_issued": 2, "server_changes": 0}
    for rate in (100.0, 300.0, 200.0):
        _keep(run, "handshake_issue", "direct", {"rate": rate, "count": int(rate)})
    assert run.raw["handshake_issue"]["direct"]["rate"] == 200.0


def test_cpu_ratios_pair_rounds_that_ran_side_by_side() -> None:
    """lb/haproxy on a CPU row is the median of per-round ratios: a noisy round of one target does not
    set the ratio against another target's quiet round."""
    run = Run(Plan.make(quick=False), Pinning(None, None, "none"), Path("."))
    for balancer, haproxy in ((16.0, 16.2), (16.5, 12.9), (13.2, 11.8)):  # µs per message, as measured
        _keep(run, "echo", "balancer", {"proxy_cpu": balancer, "count": 1_000_000})
        _keep(run, "echo", "haproxy", {"proxy_cpu": haproxy, "count": 1_000_000})
    assert _paired(run, "echo", "haproxy") == pytest.approx(13.2 / 11.8)
    assert _paired(run, "echo", "floor") is None
    row = Row("proxy CPU per echoed message", Kind.CPU_US, balancer=16.0e-6, haproxy=12.9e-6, paired_haproxy=1.12)
    assert row_ratios(row)[2] == 1.12 and "1.12" in render_table([row], haproxy=True)
    assert row_ratios(Row("x", Kind.CPU_US, balancer=2.0, haproxy=1.0))[2] == 2.0


def test_a_failed_round_keeps_the_others_paired_and_a_stalled_one_is_the_costliest() -> None:
    """A round whose load generator failed stays in its place (None), so round r still meets round r;
    a round that counted nothing sorts as the costliest, never as the cheapest."""
    run = Run(Plan.make(quick=False), Pinning(None, None, "none"), Path("."))
    for balancer, haproxy in ((None, 1.0), (2.0, 2.0), (4.0, 4.0)):
        _keep(run, "echo", "balancer", None if balancer is None else {"proxy_cpu": balancer, "count": 1})
        _keep(run, "echo", "haproxy", {"proxy_cpu": haproxy, "count": 1})
    assert _paired(run, "echo", "haproxy") == 1.0
    assert run.raw["echo"]["balancer"]["rounds"][0] is None
    for cpu, count in ((5.0, 0), (1.0, 1), (2.0, 1)):
        _keep(run, "stream", "balancer", {"proxy_cpu": cpu, "count": count})
    assert run.raw["stream"]["balancer"]["proxy_cpu"] == 2.0
    _keep(run, "idle", "floor", None)
    assert run.raw["idle"]["floor"] == {"rounds": [None]}


def test_the_floor_runs_beside_the_balancer_in_the_handshake_rounds() -> None:
    """lb/floor pairs the windows next to each other in time, with or without HAProxy; a run without
    the floor keeps its order."""
    def names(*present: str) -> list[str]:
        return [t.name for t in floor_beside_balancer([Target(name, ()) for name in present])]

    assert names("direct", "balancer", "haproxy", "floor") == ["direct", "balancer", "floor", "haproxy"]
    assert names("direct", "balancer", "floor") == ["direct", "balancer", "floor"]
    assert names("direct", "balancer", "haproxy") == ["direct", "balancer", "haproxy"]


def test_a_window_in_turns_is_kept_under_each_proxy_and_a_failed_one_as_none_for_each(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxies that took turns in one window each get that window as their round, so round r of the
    balancer still meets round r of the floor; a window whose load generator failed is None for each."""
    run = Run(Plan.make(quick=False), Pinning(None, None, "none"), Path("."))
    targets = [Target("balancer", (("127.0.0.1", 1),)), Target("floor", (("127.0.0.1", 2),))]
    spec = turns_spec(run.plan, targets, check=True)
    assert [(turn.name, turn.targets) for turn in spec.turns] == [("balancer", (("127.0.0.1", 1),)),
                                                                   ("floor", (("127.0.0.1", 2),))]
    assert spec.phase == run.plan.phase and spec.check_cookie and spec.window == run.plan.window
    windows = iter([None, {"turns": {"balancer": {"proxy_cpu": 3.0, "count": 1}, "floor": {"proxy_cpu": 2.0,
                                                                                          "count": 1}}}])
    monkeypatch.setattr(runner, "_loadgen", lambda *args: next(windows))
    monkeypatch.setattr(runner.time, "sleep", lambda seconds: None)
    for _ in range(2):
        runner._scenario(run, "handshake_check", targets, spec)
    assert run.raw["handshake_check"]["balancer"]["rounds"][0] is None
    assert run.raw["handshake_check"]["floor"]["rounds"][0] is None
    assert _paired(run, "handshake_check", "floor") == 1.5


def test_the_notes_give_each_cpu_ratio_round_by_round_in_the_order_they_ran() -> None:
    """The row shows the median; the notes show how far the rounds were from it (a round that failed in
    either column is left out, a single round needs no note)."""
    run = Run(Plan.make(quick=False), Pinning(None, None, "none"), Path("."))
    for balancer, haproxy in ((4.0, 2.0), (None, 1.0), (1.0, 2.0), (3.0, 3.0)):
        _keep(run, "echo", "balancer", None if balancer is None else {"proxy_cpu": balancer, "count": 1})
        _keep(run, "echo", "haproxy", {"proxy_cpu": haproxy, "count": 1})
    _keep(run, "stream", "balancer", {"proxy_cpu": 1.0, "count": 1})
    _keep(run, "stream", "floor", {"proxy_cpu": 1.0, "count": 1})
    runner._explain(run, haproxy=True, workers=False)
    [note] = [note for note in run.notes if note.startswith("the CPU rows' ratios round by round")]
    assert note.endswith("(the row shows their median): echo lb/haproxy 2.00 0.50 1.00")
    assert _paired(run, "echo", "haproxy") == 1.0

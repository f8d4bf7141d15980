"""Owner ↔ worker messages: length-prefixed framing, the config handed to workers, limit shares, counters
keyed by pid."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import signal
import socket
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.config.load import ConfigSource, load_config_source
from lb.config.model import AffinityConfig, BackendConfig, Config, LimitsConfig, PoolConfig, over_limit_answered
from lb.control import ipc, metrics
from lb.control import workers as workers_module
from lb.control.ipc import (
    LENGTH,
    MAX_MESSAGE_BYTES,
    MessageTooLarge,
    StatsAggregate,
    check_config_handover,
    decode,
    encode,
    frame_length,
    read_frame,
    share,
    split_limits,
)
from lb.control.ipc_stream import read_messages
from lb.control.worker_channel import receive_config
from lb.errors import ConfigError
from lb.state.context import ProxyContext
from lb.state.observations import Observations
from lb.state.pool import PoolState
from lb.state.series import SeriesRetention
from tests.harness.fake_tunnels import pool_context


def test_encode_is_length_prefixed_json() -> None:
    """4-byte big-endian length, then the JSON body."""
    frame = encode({"op": "ready"})
    (size,) = LENGTH.unpack(frame[:4])
    assert size == len(frame) - 4 and json.loads(frame[4:]) == {"op": "ready"}


def test_a_frame_beyond_the_limit_is_refused_on_both_sides() -> None:
    """The sender will not send it; a reader will not allocate it."""
    with pytest.raises(MessageTooLarge):
        frame_length(LENGTH.pack(MAX_MESSAGE_BYTES + 1))
    assert frame_length(LENGTH.pack(MAX_MESSAGE_BYTES)) == MAX_MESSAGE_BYTES


@pytest.mark.parametrize("body", [b"", b"{", b"[]", b'{"no": "op"}', b'{"op": 5}', b"[" * 5000, b"\xff"])
def test_decode_refuses_what_is_not_a_message(body: bytes) -> None:
    """Anything but a JSON object with a string op is a ValueError (never RecursionError)."""
    with pytest.raises(ValueError):
        decode(body)


def _read_all(data: bytes) -> list[dict[str, Any]]:
    async def run() -> list[dict[str, Any]]:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return [message async for message in read_messages(reader, "test")]

    return asyncio.run(run())


def test_reader_skips_bad_and_oversized_messages_and_keeps_going() -> None:
    """A malformed body and an oversized frame are skipped; the messages around them arrive."""
    oversized = MAX_MESSAGE_BYTES + 10
    data = (
        encode({"op": "a"})
        + LENGTH.pack(3) + b"{{{"
        + LENGTH.pack(oversized) + b"z" * oversized
        + encode({"op": "b"})
    )
    assert [m["op"] for m in _read_all(data)] == ["a", "b"]


def test_a_large_states_message_survives() -> None:
    """A message far past asyncio's 64 KiB line limit (hundreds of backends) is read whole."""
    pools = {"p": {f"gw-{i}": {"healthy": True, "reason": "x" * 200} for i in range(2000)}}
    messages = _read_all(encode({"op": "states", "pools": pools}))
    assert len(messages) == 1 and len(messages[0]["pools"]["p"]) == 2000


def test_states_carry_when_each_backend_changed_to_the_workers() -> None:
    """A worker routes, and redispatch_grace reads `changed_at` there: the owner's, not the worker's start."""
    config = PoolConfig("p", (BackendConfig("gw-1", "127.0.0.1", 1), BackendConfig("gw-2", "127.0.0.1", 2)))
    owner, worker = PoolState(config=config), PoolState(config=config)
    owner.backends["gw-1"].healthy = False
    owner.backends["gw-1"].changed_at = 1_700_000_000.5
    owner.backends["gw-2"].changed_at = 1_700_000_100.0
    ipc.apply_states({"p": worker}, _read_all(encode(ipc.states_message({"p": owner})))[0])
    assert (worker.backends["gw-1"].healthy, worker.backends["gw-1"].changed_at) == (False, 1_700_000_000.5)
    assert worker.backends["gw-2"].changed_at == owner.backends["gw-2"].changed_at == 1_700_000_100.0


def test_a_truncated_stream_ends_the_reader_cleanly() -> None:
    """EOF in the middle of a frame: the reader stops (the owner is gone), no exception."""
    assert [m["op"] for m in _read_all(encode({"op": "a"}) + LENGTH.pack(100) + b"{}")] == ["a"]


class _Stream:
    """A blocking byte stream for `read_frame`: `recv(n)` gives at most `n` bytes, and at most `chunk`."""

    def __init__(self, data: bytes, chunk: int) -> None:
        self.data = data
        self.chunk = chunk

    def recv(self, size: int) -> bytes:
        assert size > 0
        taken, self.data = self.data[: min(size, self.chunk)], self.data[min(size, self.chunk) :]
        return taken


CONFIG_FRAME = encode({"op": "config", "text": "listeners: []\n# é 😀 \"quoted\"\n"})
REST = encode({"op": "states", "pools": {}}) + encode({"op": "reload", "text": "x"}) + LENGTH.pack(9)


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 1 << 20])
def test_read_frame_takes_exactly_one_frame_and_leaves_the_rest(chunk: int) -> None:
    """A new worker reads its first message and not one byte past it, however the bytes arrive."""
    stream = _Stream(CONFIG_FRAME + REST, chunk)
    assert read_frame(stream.recv) == decode(CONFIG_FRAME[4:])
    assert stream.data == REST


def test_read_frame_refuses_an_oversized_frame_without_reading_its_body() -> None:
    stream = _Stream(LENGTH.pack(MAX_MESSAGE_BYTES + 1) + b"{}", 1 << 20)
    with pytest.raises(MessageTooLarge):
        read_frame(stream.recv)
    assert stream.data == b"{}"


@pytest.mark.parametrize("data", [b"", b"\0\0", CONFIG_FRAME[:-1]], ids=["nothing", "half a prefix", "short body"])
def test_read_frame_at_the_end_of_the_stream_is_eoferror(data: bytes) -> None:
    with pytest.raises(EOFError):
        read_frame(_Stream(data, 1 << 20).recv)


def test_a_new_worker_reads_its_config_then_the_control_channel_reads_on() -> None:
    """receive_config takes the owner's first frame off the socket, leaves the descriptor open, and the
    asyncio reader that wraps it next sees the following messages whole."""
    owner, worker = socket.socketpair()
    with owner:
        fd = worker.detach()
        owner.sendall(CONFIG_FRAME + encode({"op": "states", "pools": {}}))
        assert receive_config(fd, timeout=5.0) == ConfigSource(decode(CONFIG_FRAME[4:])["text"])
        os.fstat(fd)  # still open

        async def rest() -> list[dict[str, Any]]:
            reader, writer = await asyncio.open_connection(sock=socket.socket(fileno=fd))
            owner.sendall(encode({"op": "stop_migration", "pool": "p", "backend": "a"}))
            owner.shutdown(socket.SHUT_WR)
            messages = [message async for message in read_messages(reader, "the owner")]
            writer.close()
            return messages

        assert [m["op"] for m in asyncio.run(rest())] == ["states", "stop_migration"]


@pytest.mark.parametrize(
    ("sent", "error"),
    [
        (b"", TimeoutError),
        (CONFIG_FRAME[:7], TimeoutError),
        (encode({"op": "states", "pools": {}}), ValueError),
        (encode({"op": "config", "text": 5}), ValueError),
        (LENGTH.pack(MAX_MESSAGE_BYTES + 1), ValueError),
    ],
    ids=["nothing", "half a frame", "not the config first", "no text", "oversized"],
)
def test_a_new_worker_without_its_config_fails_in_time(sent: bytes, error: type[Exception]) -> None:
    """Nothing, half a frame, or another message first: an error within the timeout, never a hang."""
    owner, worker = socket.socketpair()
    with owner, worker:
        owner.sendall(sent)
        with pytest.raises(error):
            receive_config(worker.fileno(), timeout=0.2)
        os.fstat(worker.fileno())


def test_a_config_too_large_for_a_control_message_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The frame is measured as sent, escapes included (each of these characters is 6 bytes of JSON)."""
    text = "\u00e9" * 1000
    check_config_handover(ConfigSource(text))
    monkeypatch.setattr(ipc, "MAX_MESSAGE_BYTES", 5999)
    with pytest.raises(ConfigError, match="too large to hand to the workers"):
        check_config_handover(ConfigSource(text))


def test_a_yaml_config_within_its_size_limit_always_fits_a_control_message() -> None:
    """The check above is a backstop: what YAML admits (no C0 controls but tab and newlines) at most
    triples in JSON, so MAX_CONFIG_BYTES of it fits within MAX_MESSAGE_BYTES."""
    from lb.config.load import MAX_CONFIG_BYTES

    worst = "\u00a0" * (MAX_CONFIG_BYTES // 2)  # 2 bytes of UTF-8, 6 of JSON: the largest ratio
    assert len(worst.encode()) == MAX_CONFIG_BYTES
    check_config_handover(ConfigSource(worst))


OWNER_YAML = """
workers: 2
listeners: [{bind: "127.0.0.1:0"}]
admin: {bind: "127.0.0.1:0"}
affinity: {secret_keys: ["kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk"]}
pools:
  p:
    backends: BACKENDS
    health_check: {type: tcp, interval: 1h}
routes: [{path_prefix: /, pool: p}]
"""


def test_an_owner_reload_its_workers_cannot_get_fails_before_anything_is_applied(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Too large to hand over: the owner's reload fails, is counted as a failure, and changes nothing (not
    even the text a restarted worker would get)."""
    from lb.control.balancer import Balancer, Role

    path = tmp_path / "lb.yaml"
    running = OWNER_YAML.replace("BACKENDS", "[{id: a, address: '127.0.0.1:9'}]")
    path.write_text(running, encoding="utf-8")

    async def scenario() -> None:
        config, source = load_config_source(path)
        balancer = Balancer(config, path, role=Role.OWNER, config_source=source)
        grown = OWNER_YAML.replace("BACKENDS", "[{id: a, address: '127.0.0.1:9'}, {id: b, address: '127.0.0.1:10'}]")
        path.write_text(grown + "# " + "\u00e9" * 1000 + "\n", encoding="utf-8")
        monkeypatch.setattr(ipc, "MAX_MESSAGE_BYTES", 5000)
        with caplog.at_level(logging.ERROR, logger="lb.control.balancer"):
            assert not await balancer.reload()
        assert "reload failed, keeping the running configuration: too large to hand to the workers" in caplog.text
        assert balancer.reloads.counts == {"failure": 1} and not balancer.reloads.last_ok
        assert list(balancer.ctx.pools["p"].backends) == ["a"]
        assert balancer._supervisor is not None and balancer._supervisor._config_source == ConfigSource(running)

    asyncio.run(scenario())



def test_a_reload_whose_reading_raises_says_so_at_once_and_counts_a_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Anything but a ConfigError out of reading the file (a fault of ours) was left in the SIGHUP task:
    no "reload failed" line, no failure counted, a traceback only when the task was collected."""
    from lb.control.balancer import Balancer

    path = tmp_path / "lb.yaml"
    single = OWNER_YAML.replace("workers: 2", "workers: 1")
    path.write_text(single.replace("BACKENDS", "[{id: a, address: '127.0.0.1:9'}]"))

    def broken(*_: object) -> None:
        raise RuntimeError("a fault of ours")

    async def scenario() -> None:
        config, _ = load_config_source(path)
        balancer = Balancer(config, path)
        monkeypatch.setattr(balancer, "_read_config", broken)
        with caplog.at_level(logging.ERROR, logger="lb.control.balancer"):
            assert not await balancer.reload()
        assert "reload failed, keeping the running configuration" in caplog.text
        assert "RuntimeError: a fault of ours" in caplog.text
        assert balancer.reloads.counts == {"failure": 1} and not balancer.reloads.last_ok

    asyncio.run(scenario())


# A total under the count (some workers' share 0) was drawn in 2% of examples from 0-10 000 alone.
@given(total=st.integers(0, 10_000) | st.integers(0, 64), count=st.integers(1, 64))
def test_shares_add_up_to_the_total(total: int, count: int) -> None:
    """However many workers, their shares sum to exactly the configured number."""
    parts = [share(total, i, count) for i in range(count)]
    assert sum(parts) == total and max(parts) - min(parts) <= 1


def _config() -> Config:
    backends = (BackendConfig("a", "127.0.0.1", 1, max_connections=5), BackendConfig("b", "127.0.0.1", 2))
    return Config(
        listeners=(),
        affinity=AffinityConfig(secret_keys=("k" * 43,)),  # not read by split_limits
        routes=(),
        pools={"p": PoolConfig("p", backends)},
        limits=LimitsConfig(max_connections=7, handshake_rate_per_ip=10.0, handshake_burst_per_ip=3),
    )


def test_split_limits_gives_each_worker_its_share() -> None:
    """max_connections, backend max_connections and the per-IP rate are divided between the workers."""
    parts = [split_limits(_config(), i, 2) for i in range(2)]
    assert [p.limits.max_connections for p in parts] == [4, 3]
    assert [p.pools["p"].backends[0].max_connections for p in parts] == [3, 2]
    assert all(p.pools["p"].backends[1].max_connections is None for p in parts)
    assert sum(p.limits.handshake_rate_per_ip for p in parts) == 10.0
    assert split_limits(_config(), 0, 1) == _config()


def test_split_limits_shares_the_burst_the_rate_implies() -> None:
    """A rate set alone implies a burst of one second's worth, and that is what the workers share."""
    config = dataclasses.replace(_config(), limits=LimitsConfig(handshake_rate_per_ip=5.0))
    parts = [split_limits(config, i, 2) for i in range(2)]
    assert [p.limits.burst_per_ip for p in parts] == [3, 2]


@given(st.integers(min_value=0, max_value=10**6), st.integers(min_value=1, max_value=64))
def test_the_workers_answered_overflow_adds_up_to_the_instances(total: int, count: int) -> None:
    """Past `max_connections`, TLS and PROXY listeners answer a tenth more (at least 64) and close the rest as
    accepted; with workers that is the instance's overflow, shared, not each worker's (N x 64 where 64 was said)."""
    config = dataclasses.replace(_config(), workers=count, limits=LimitsConfig(max_connections=total))
    held = 0  # connections the workers hold before each sheds the next one
    for index in range(count):
        ctx = _ctx(split_limits(config, index, count))
        low, high = 0, total + 10**6  # the first count of its own connections at which it sheds
        while low < high:
            ctx.handshaking = (low + high) // 2
            low, high = (low, ctx.handshaking) if ctx.sheds() else (ctx.handshaking + 1, high)
        held += low
    # The instance's overflow, to within one connection per worker (each rounds its own share).
    assert abs(held - (total + over_limit_answered(total))) <= count


def _report(handshakes: int, tunnels: int, handshaking: int = 0) -> dict[str, Any]:
    return {
        "op": "stats",
        "backends": {"p": {"a": [tunnels]}},
        "handshakes": [["p", "a", "ok", handshakes]],
        "decisions": [["p", "a", "new", handshakes]],
        "tunnels_closed": handshakes - tunnels,
        "tunnels": tunnels,
        "clients": tunnels + handshaking,
    }


def _ctx(config: Config | None = None) -> ProxyContext:
    return pool_context(config or _config())


def test_counters_stay_monotonic_across_a_worker_death_keyed_by_pid() -> None:
    """A dead worker's counters stay; its gauges go; a late report cannot clobber its successor."""
    aggregate, ctx = StatsAggregate(), _ctx()
    aggregate.update(100, _report(handshakes=10, tunnels=4))
    aggregate.update(200, _report(handshakes=5, tunnels=1))
    assert aggregate.apply_to(ctx) == 5
    aggregate.retire(100)
    aggregate.update(300, _report(handshakes=1, tunnels=1))  # its replacement, same slot
    aggregate.update(100, _report(handshakes=11, tunnels=4))  # the dead one's last report, late
    live = aggregate.apply_to(ctx)
    assert live == 2
    assert ctx.stats.handshakes[("p", "a", "ok")] == 11 + 5 + 1
    assert ctx.pools["p"].backends["a"].connections == 2
    aggregate.compact(100)
    assert aggregate.apply_to(ctx) == 2 and ctx.stats.handshakes[("p", "a", "ok")] == 17


def test_a_dead_workers_open_tunnels_count_as_closed_once_its_last_report_is_in() -> None:
    """Its tunnels ended with it: lb_tunnels_closed_total and lb_tunnel_closes{cause="worker_exit"} count
    them, from the last report it sent (a late one included), so opened = closed + open holds again."""
    aggregate, ctx = StatsAggregate(), _ctx()
    aggregate.update(100, _report(handshakes=10, tunnels=4))  # 6 closed, 4 open
    aggregate.update(200, _report(handshakes=5, tunnels=1))
    aggregate.apply_to(ctx)
    assert ctx.stats.tunnels_closed == 6 + 4
    aggregate.retire(100)
    aggregate.update(100, _report(handshakes=11, tunnels=3))  # its last report, late: 8 closed, 3 open
    assert aggregate.apply_to(ctx) == 1
    assert ctx.stats.tunnels_closed == 8 + 4 and not ctx.stats.balancer_closes
    aggregate.compact(100)
    assert aggregate.apply_to(ctx) == 1
    assert ctx.stats.tunnels_closed == 8 + 3 + 4
    assert ctx.stats.balancer_closes == {("worker_exit", "tcp"): 3}
    aggregate.update(300, _report(handshakes=2, tunnels=2))
    aggregate.apply_to(ctx)
    assert ctx.stats.tunnels_closed == 11 + 4 + 0 and ctx.stats.balancer_closes[("worker_exit", "tcp")] == 3


def test_a_backend_one_worker_no_longer_lists_keeps_its_counts_in_the_sums() -> None:
    """Each worker applies a DNS change or a reload on its own schedule: while one of them has dropped a
    backend, the owner's sum for it must not go back.  A worker's counts live in its Stats for its whole
    life, whatever its pools hold, so its report still carries them."""
    aggregate, ctx = StatsAggregate(), _ctx()
    aggregate.update(100, _report(handshakes=10, tunnels=2))
    aggregate.update(200, _report(handshakes=5, tunnels=1))
    aggregate.apply_to(ctx)
    assert _handshakes(ctx, "a") == 15
    gone = {**_report(handshakes=10, tunnels=0), "backends": {"p": {}}}
    aggregate.update(100, gone)  # worker 100 dropped `a` from its pool
    aggregate.apply_to(ctx)
    assert _handshakes(ctx, "a") == 15
    assert ctx.pools["p"].backends["a"].connections == 1, "a gauge is what the workers say now"
    aggregate.update(100, _report(handshakes=10, tunnels=0))  # back in its pool, its counts as they were
    aggregate.apply_to(ctx)
    assert _handshakes(ctx, "a") == 15
    aggregate.update(100, _report(handshakes=12, tunnels=0))
    aggregate.apply_to(ctx)
    assert _handshakes(ctx, "a") == 17
    aggregate.retire(100)
    aggregate.compact(100)  # a worker that died while `a` was gone: its counts stay in the sums
    aggregate.apply_to(ctx)
    assert _handshakes(ctx, "a") == 17


def test_a_histogram_sum_never_goes_back_when_a_worker_dies() -> None:
    """A dead worker's sums are folded and then added in another order: 0.013000000000000001 came out
    0.013, a decrease Prometheus takes for a counter reset (a false spike in rate())."""
    def report(seconds: float) -> dict[str, Any]:
        observations = Observations()
        observations.observe_handshake("p", seconds)
        return {**_report(handshakes=1, tunnels=0), "observations": observations.snapshot()}

    aggregate, ctx = StatsAggregate(), _ctx()
    aggregate.update(1, report(0.001))
    aggregate.retire(1)
    aggregate.compact(1)
    aggregate.update(2, report(0.002))
    aggregate.update(3, report(0.010))
    aggregate.apply_to(ctx)
    assert ctx.observations.from_workers is not None
    before = ctx.observations.from_workers.handshake["p"].total
    aggregate.retire(3)
    aggregate.compact(3)  # no new observation anywhere
    aggregate.apply_to(ctx)
    assert ctx.observations.from_workers.handshake["p"].total >= before


def test_the_instances_cpu_seconds_never_go_back_when_a_worker_dies(monkeypatch: pytest.MonkeyPatch) -> None:
    """process_cpu_seconds_total over owner and workers: a dead worker's time moves into a sum of its own,
    and 2.62 came out 2.6199999999999997 (a counter reset to Prometheus)."""
    samples: dict[int | str, float] = {"self": 0.01, 101: 0.01, 102: 0.12}
    monkeypatch.setattr(
        metrics, "_process_samples",
        lambda pid: {"process_cpu_seconds_total": samples[pid]} if pid in samples else {},
    )
    collector = metrics.AllProcessesCollector(lambda: [pid for pid in (101, 102) if pid in samples])

    def shown() -> float:
        (family,) = [f for f in collector.collect() if f.name == "process_cpu_seconds"]
        return float(family.samples[0].value)

    before = shown()
    del samples[101]  # worker 101 dies; no CPU time changes anywhere
    assert shown() >= before


def _handshakes(ctx: ProxyContext, backend_id: str) -> int:
    """What /status and lb_backend_handshakes_total show for the backend (lb.state.context.Stats.backend_counts)."""
    return ctx.stats.backend_counts()[("p", backend_id)].handshakes


def test_the_owner_shows_its_workers_client_connections_as_a_gauge() -> None:
    """lb_client_connections of `workers: N`: each live worker's handshakes in flight and tunnels, summed."""
    aggregate, ctx = StatsAggregate(), _ctx()
    aggregate.update(100, _report(handshakes=10, tunnels=4, handshaking=3))
    aggregate.update(200, _report(handshakes=5, tunnels=1, handshaking=2))
    aggregate.apply_to(ctx)
    assert ctx.client_connections() == 4 + 3 + 1 + 2
    aggregate.retire(100)  # a dead worker's connections are gone
    aggregate.apply_to(ctx)
    assert ctx.client_connections() == 1 + 2


@pytest.mark.parametrize(
    "report",
    [
        {"op": "stats", "backends": []},
        {"op": "stats", "backends": {"p": {"a": "nope"}}},
        {"op": "stats", "handshakes": [["p", "a"]]},
        {"op": "stats", "rejected": {"x": 1}},
    ],
)
def test_a_malformed_stats_report_raises_a_value_type_or_attribute_error(report: dict[str, Any]) -> None:
    """What the owner's reader catches, logs and skips: nothing else escapes the aggregation."""
    with pytest.raises((AttributeError, KeyError, TypeError, ValueError)):
        StatsAggregate().update(1, report)


def test_the_owner_sums_a_burst_of_reports_once() -> None:
    """Reports of many workers within SUM_STATS_EVERY cost one sum, applied after at most that delay."""
    from types import SimpleNamespace
    from unittest import mock

    from lb.control.workers import SUM_STATS_EVERY, WorkerSupervisor

    async def scenario() -> None:
        ctx = _ctx()
        series = SeriesRetention()  # the owner keeps the series of its pools' backends (lb.state.series)
        series.update({name: list(pool.backends) for name, pool in ctx.pools.items()}, {})
        supervisor = WorkerSupervisor(
            SimpleNamespace(ctx=ctx, retired_backends=list, retired_counted=list, series=series), 3,  # type: ignore[arg-type]
            config_path=mock.sentinel.path, config_source=ConfigSource(""),
        )
        with mock.patch.object(StatsAggregate, "apply_to", autospec=True, side_effect=StatsAggregate.apply_to) as sums:
            for pid in (100, 200, 300):
                supervisor._handle(mock.Mock(answered=0, reported=0), pid, _report(handshakes=pid, tunnels=1))
            assert sums.call_count == 0 and supervisor.live_tunnels == 0
            await asyncio.sleep(SUM_STATS_EVERY * 2)
            assert sums.call_count == 1
        assert supervisor.live_tunnels == 3 and ctx.stats.handshakes[("p", "a", "ok")] == 600

    asyncio.run(scenario())


def test_backend_counts_are_read_from_the_decisions_by_backend() -> None:
    """/status and lb_backend_*_total derive a backend's handshakes, hits and redispatches from one counter."""
    ctx = _ctx()
    ctx.stats.decisions.update({
        ("p", "a", "hit"): 3, ("p", "a", "new"): 2, ("p", "a", "redispatch"): 1, ("p", "a", "invalid"): 4,
        ("q", "a", "hit"): 7,
    })
    counts = ctx.stats.backend_counts()
    a = counts[("p", "a")]
    assert (a.handshakes, a.affinity_hits, a.redispatches) == (10, 3, 1)
    assert counts[("q", "a")].handshakes == 7, "per pool: one id in two pools is two backends"


def _supervising_one(
    unsent: Any, write: Any, killed: list[bool], *, stopping: bool
) -> tuple[workers_module.WorkerSupervisor, Any]:
    """A supervisor (stopping or not) and one worker whose control socket holds `unsent()` bytes not yet
    sent; `write` takes what is written to it, and a kill is noted in `killed`."""
    from types import SimpleNamespace

    transport = SimpleNamespace(get_write_buffer_size=unsent)
    writer = SimpleNamespace(is_closing=lambda: False, transport=transport, write=write)
    process = SimpleNamespace(pid=4242, returncode=None, kill=lambda: killed.append(True))
    worker = SimpleNamespace(writer=writer, process=process, name="worker 0 (pid 4242)", killed=False,
                             sets_dropped=False)
    return _supervisor(0.0, stopping=stopping), worker


def test_a_worker_that_stops_reading_its_control_socket_is_killed_not_fed_less() -> None:
    """Past MAX_PENDING_BYTES of unsent control data, a message would be dropped; a dropped reload would
    leave the worker on another configuration than the owner's for good.  It is killed instead (its
    watcher restarts it with the owner's running text), and nothing more is queued for it."""
    from lb.control import workers

    written: list[bytes] = []
    killed: list[bool] = []
    pending = [0]
    supervisor, worker = _supervising_one(lambda: pending[0], written.append, killed, stopping=False)
    supervisor._write(worker, "states", b"frame")
    assert written == [b"frame"] and not killed
    pending[0] = workers.MAX_PENDING_BYTES + 1
    supervisor._write(worker, "states", b"again")
    assert written == [b"frame"] and not killed, "a states push is resent every second: dropped, not fatal"
    supervisor._write(worker, "reload", b"text")
    assert written == [b"frame"] and killed == [True]
    supervisor._write(worker, "close_tunnels", b"more")
    assert killed == [True], "killed once, not at every message until it is reaped"


def test_a_worker_not_reading_its_control_socket_during_a_stop_is_left_to_the_stop() -> None:
    """While stopping, its clients get their 1001s from it: nothing it would miss is worth a kill."""
    from lb.control import workers

    killed: list[bool] = []
    supervisor, worker = _supervising_one(
        lambda: workers.MAX_PENDING_BYTES + 1, lambda frame: None, killed, stopping=True
    )
    supervisor._write(worker, "reload", b"text")
    assert not killed


def test_a_worker_whose_report_is_too_large_to_send_is_still_heard_from(caplog: pytest.LogCaptureFixture) -> None:
    """A stats report past the frame limit (backend ids that churn for weeks) is not sent; an `alive`
    goes instead, so the owner's watchdog, which counts any message, does not kill the worker."""
    from types import SimpleNamespace

    from lb.control import ipc, ipc_stream, worker_channel, workers

    written: list[bytes] = []
    writer = SimpleNamespace(is_closing=lambda: False, write=written.append,
                             transport=SimpleNamespace(get_write_buffer_size=lambda: 0))
    channel = worker_channel.ControlChannel.__new__(worker_channel.ControlChannel)
    channel._writer = writer  # type: ignore[assignment]
    channel._too_large = ipc_stream.TooLargeReports()
    channel._seq = 3  # the owner's last `report`: the `alive` answers it (a round of /status waits no more)
    channel._send({"op": "stats", "padding": "x" * (ipc.MAX_MESSAGE_BYTES + 1)})
    assert len(written) == 1 and ipc.decode(written[0][ipc.LENGTH.size:]) == {"op": "alive", "seq": 3}
    assert "not sent" in caplog.text
    # The next report, a second later, is as large: an `alive` again, and no second line.
    caplog.clear()
    channel._send({"op": "stats", "padding": "x" * (ipc.MAX_MESSAGE_BYTES + 1)})
    assert len(written) == 2 and ipc.decode(written[1][ipc.LENGTH.size:]) == {"op": "alive", "seq": 3}
    assert "not sent" not in caplog.text

    heard: list[float] = []
    worker = SimpleNamespace(heard_at=0.0, answered=0)
    supervisor = workers.WorkerSupervisor.__new__(workers.WorkerSupervisor)
    supervisor._reported = None  # no round of `report` under way

    async def owner_hears() -> None:
        supervisor._handle(worker, 4242, {"op": "alive", "seq": 3})  # type: ignore[arg-type]
        heard.append(worker.heard_at)

    asyncio.run(owner_hears())
    assert heard[0] > 0
    assert worker.answered == 3


def test_a_round_of_report_is_shared_ends_when_every_worker_has_answered_or_exited_and_is_paced() -> None:
    """/status and /metrics ask the workers for fresh counts (`fresh_counts`): requests that come together
    share one round; a worker that answers or exits ends its part of the wait (not REPORT_WAIT); the next
    round starts REPORT_ROUND_GAP after the last at the soonest, so a flood of /status cannot make the
    workers report on their data-plane loops at its rate."""
    from types import SimpleNamespace

    from lb.control import workers

    sent: list[tuple[int, dict[str, Any]]] = []
    both_asked = asyncio.Event()

    def send(w: Any, message: dict[str, Any]) -> None:
        sent.append((w.index, message))
        if len(sent) == 2:
            both_asked.set()

    def worker(index: int) -> Any:
        return SimpleNamespace(index=index, answered=0, killed=False, process=SimpleNamespace(returncode=None),
                               serving=lambda now: True)

    supervisor = workers.WorkerSupervisor.__new__(workers.WorkerSupervisor)
    supervisor._workers = {0: worker(0), 1: worker(1)}
    supervisor._round, supervisor._round_started, supervisor._report_seq = None, -math.inf, 0
    supervisor._asked, supervisor._reported = [], None
    supervisor._send = send  # type: ignore[method-assign]
    sums: list[float] = []
    supervisor._apply_stats = lambda: sums.append(asyncio.get_running_loop().time())  # type: ignore[method-assign]

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        asked = [loop.create_task(supervisor.fresh_counts()) for _ in range(3)]
        for _ in range(5):  # the requests, then the round they started
            await asyncio.sleep(0)
        assert [index for index, _ in sent] == [0, 1], "one round for the three requests"
        seq = sent[0][1]["seq"]
        supervisor._answered(supervisor._workers[0], {"op": "stats", "seq": seq})
        supervisor._workers[1].process.returncode = -9  # killed before it answered
        supervisor._check_answers()  # as _watch does when it sees the exit
        await asyncio.gather(*asked)
        assert len(sums) == 1 and sums[0] - started < workers.REPORT_WAIT / 2, "not the full wait"
        sent.clear()
        both_asked.clear()
        supervisor._workers[1].process.returncode = None
        await asyncio.gather(supervisor.fresh_counts(), answer_when_asked(seq + 1))
        assert loop.time() - started >= workers.REPORT_ROUND_GAP, "the next round waits for its gap"

    async def answer_when_asked(seq: int) -> None:
        await both_asked.wait()
        for index in (0, 1):
            supervisor._answered(supervisor._workers[index], {"op": "stats", "seq": seq})

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("ready", "exited", "silent", "serves"),
    [
        (True, False, 0.0, True),
        (True, False, workers_module.SERVING_SILENCE, True),  # two reports late: a busy loop, still serving
        (True, False, workers_module.SERVING_SILENCE + 0.01, False),  # stopped or stuck
        (False, False, 0.0, False),  # its listeners are not bound yet
        (True, True, 0.0, False),  # dead (or killed), being restarted
    ],
    ids=["heard from", "at the bound", "silent past it", "not ready", "exited"],
)
def test_a_worker_serves_while_ready_running_and_heard_from(
    ready: bool, exited: bool, silent: float, serves: bool
) -> None:
    """A worker counts for the owner's /readyz only once ready, until it exits or goes silent."""
    assert workers_module.worker_serves(ready=ready, exited=exited, silent=silent) is serves


def test_the_silence_bound_is_several_reports_and_well_inside_the_watchdog() -> None:
    """Not ready after a few missed reports (not one late one), and long before the watchdog kills."""
    assert workers_module.SERVING_SILENCE >= 2 * workers_module.STATS_EVERY
    assert workers_module.SERVING_SILENCE <= workers_module.UNRESPONSIVE_AFTER / 2


def _fake_worker(*, ready: bool = True, returncode: int | None = None, heard_at: float = 0.0,
                 killed: bool = False, ready_by: float = 0.0, pid: int = 1, kills: list[int] | None = None) -> Any:
    """A worker as the supervisor holds it; its kill is noted in `kills` (by pid)."""
    from types import SimpleNamespace

    noted = kills if kills is not None else []
    process = SimpleNamespace(pid=pid, returncode=returncode, kill=lambda: noted.append(pid))
    return workers_module._Worker(0, process, None, SimpleNamespace(done=lambda: ready),  # type: ignore[arg-type]
                                  heard_at=heard_at, killed=killed, ready_by=ready_by)


def _supervisor(checked_at: float, *fakes: Any, stopping: bool = False) -> workers_module.WorkerSupervisor:
    supervisor = workers_module.WorkerSupervisor.__new__(workers_module.WorkerSupervisor)
    supervisor._workers = dict(enumerate(fakes))
    supervisor._checked_at = checked_at
    supervisor._stopping = stopping
    return supervisor


def test_serving_workers_counts_the_ready_running_and_recently_heard() -> None:
    """Of a silent, a dead, a killed, a starting and a heard-from worker, one serves; with all silent, none."""
    now = 100.0
    fresh = now - 1.0
    stale = now - workers_module.SERVING_SILENCE - 1.0
    supervisor = _supervisor(
        now - 0.5,
        _fake_worker(heard_at=stale),
        _fake_worker(heard_at=fresh, returncode=-9),
        _fake_worker(heard_at=fresh, killed=True),
        _fake_worker(heard_at=fresh, ready=False),
        _fake_worker(heard_at=fresh),
    )
    assert supervisor.serving_workers(now) == 1
    assert _supervisor(now - 0.5, _fake_worker(heard_at=stale), _fake_worker(heard_at=stale)).serving_workers(now) == 0


def test_an_owner_that_was_paused_does_not_blame_its_workers_for_its_own_silence() -> None:
    """The owner's own look is overdue (it was stopped or blocked): its workers' unread messages are not
    silence, so a ready, running worker serves, as its watchdog also spares it."""
    now = 100.0
    stale = now - workers_module.SERVING_SILENCE - 5.0
    late = _supervisor(now - workers_module.OWNER_LATE - 0.1, _fake_worker(heard_at=stale),
                       _fake_worker(heard_at=stale, returncode=1))
    assert late.serving_workers(now) == 1


def test_a_restarted_worker_not_ready_in_time_is_killed(caplog: pytest.LogCaptureFixture) -> None:
    """Only the first workers' start was bounded (start() fails past WORKER_READY): a restart's worker
    stopped or stuck before it listened (a SIGSTOP as it started, a hung mount) held its share of the
    instance for good, not ready, so never judged silent.  Past its bound it is killed, once, as a silent
    ready worker is; one still within its bound, and one the owner could not watch, are spared."""

    async def scenario() -> None:
        now = asyncio.get_running_loop().time()
        kills: list[int] = []
        starting = _fake_worker(ready=False, heard_at=now, ready_by=now + 1.0, pid=10, kills=kills)
        stuck = _fake_worker(ready=False, heard_at=now, ready_by=now - 0.1, pid=11, kills=kills)
        supervisor = _supervisor(now, starting, stuck)
        with caplog.at_level(logging.ERROR, logger="lb.control.workers"):
            supervisor._kill_unresponsive()
            supervisor._kill_unresponsive()
        assert kills == [11] and stuck.killed and not starting.killed
        assert f"worker 0 (pid 11) has not started listening in {workers_module.WORKER_READY:g}s" in caplog.text
        # The owner's own look came late (it was paused): the start's clock is its own, as the silence is.
        overdue = _fake_worker(ready=False, heard_at=now, ready_by=now - 0.1, pid=12, kills=kills)
        paused_owner = _supervisor(now - workers_module.OWNER_LATE - 0.1, overdue)
        paused_owner._kill_unresponsive()
        assert kills == [11] and overdue.ready_by >= now + workers_module.WORKER_READY

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("lived", "served", "own", "delay"),
    [(60.0, True, 8.0, workers_module.RESTART_DELAY), (1.0, True, 4.0, 4.0), (16.0, False, 2.0, 2.0),
     (workers_module.STABLE_AFTER, True, 1.0, workers_module.RESTART_DELAY)],
    ids=["served long", "died young", "never listened", "at the bound"],
)
def test_a_dead_worker_waits_its_own_delay_unless_it_served_a_while(
    lived: float, served: bool, own: float, delay: float
) -> None:
    """A worker killed for never listening lived 15 s but never served: its start keeps its growing delay."""
    assert workers_module.restart_delay(lived=lived, served=served, own=own) == delay


def test_a_config_message_carries_the_whole_source_and_back() -> None:
    """Text, `${file:PATH}` contents and TLS files (any bytes) travel together, as JSON, and come back equal."""
    source = ConfigSource("affinity: {secret_keys: ['${file:/k}']}\n", {"/k": "s\u00e9cret \"quoted\""},
                          {"/tls/server.key": b"-----BEGIN PRIVATE KEY-----\n\x00\xff\n"})
    for op in ("config", "reload"):
        message = decode(encode(ipc.config_message(op, source))[4:])  # type: ignore[arg-type]
        assert message["op"] == op and ipc.config_source(message) == source


@pytest.mark.parametrize(
    "message",
    [{"op": "reload", "text": 5}, {"op": "reload", "text": "", "files": []},
     {"op": "reload", "text": "", "files": {"/k": 5}}, {"op": "reload", "text": "", "tls": ["/c"]},
     {"op": "reload", "text": "", "tls": {"/c": 5}}, {"op": "reload", "text": "", "tls": {"/c": "not base64!"}}],
    ids=["text not a string", "files not an object", "a content not a string", "tls not an object",
         "a tls file not a string", "a tls file not base64"],
)
def test_a_malformed_config_source_is_a_value_error(message: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        ipc.config_source(message)


def test_a_config_too_large_with_its_files_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    """The handover check measures the files too: a small text naming large Secrets can outgrow a frame."""
    monkeypatch.setattr(ipc, "MAX_MESSAGE_BYTES", 5999)
    check_config_handover(ConfigSource("x: 1\n"))
    with pytest.raises(ConfigError, match="too large to hand to the workers"):
        check_config_handover(ConfigSource("x: 1\n", {"/k": "k" * 6000}))


def test_a_worker_that_fails_a_reload_the_owner_applied_is_a_counted_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The instance then runs two configurations: lb_config_reloads_total{result="failure"} goes up and
    lb_config_last_reload_successful goes to 0 (what LbConfigReloadFailed watches) and the log names the
    worker, not only the owner's success."""
    from types import SimpleNamespace
    from unittest import mock

    from lb.control.metrics import ReloadResults
    from lb.control.workers import WorkerSupervisor

    async def scenario() -> None:
        reloads = ReloadResults()
        reloads.succeeded()  # the owner's
        owner = SimpleNamespace(ctx=_ctx(), retired_backends=list, series=SeriesRetention(), reloads=reloads)
        supervisor = WorkerSupervisor(owner, 2, config_path=mock.sentinel.path,  # type: ignore[arg-type]
                                      config_source=ConfigSource(""))
        worker = SimpleNamespace(name="worker 1 (pid 4242)")
        supervisor.reloaded(ConfigSource("first"))
        supervisor.reloaded(ConfigSource("second"))
        with caplog.at_level(logging.ERROR, logger="lb.control.workers"):
            # A late report of the first: counted, but the last reload is not said to have failed (a
            # review's case: the gauge stayed 0 with every process on the second).
            supervisor._handle(worker, 4242, {"op": "reload_failed", "reload": 1})  # type: ignore[arg-type]
            assert reloads.counts == {"success": 1, "failure": 1} and reloads.last_ok
            supervisor._handle(worker, 4242, {"op": "reload_failed", "reload": 2})  # type: ignore[arg-type]
        assert reloads.counts == {"success": 1, "failure": 2} and not reloads.last_ok
        assert "worker 1 (pid 4242) could not apply the reload" in caplog.text

    asyncio.run(scenario())


def test_state_changes_of_one_turn_reach_each_worker_as_one_push_before_what_follows() -> None:
    """A burst of changes (a reload, 3,000 health verdicts at once) is one states message of the latest
    states per worker, not one whole table per change; a message sent after them still comes after it."""
    from types import SimpleNamespace
    from unittest import mock

    from lb.control.workers import WorkerSupervisor

    async def scenario() -> list[dict[str, Any]]:
        ctx = _ctx()
        supervisor = WorkerSupervisor(
            SimpleNamespace(ctx=ctx, retired_backends=list, series=SeriesRetention()), 1,  # type: ignore[arg-type]
            config_path=mock.sentinel.path, config_source=ConfigSource(""),
        )
        written: list[bytes] = []
        writer = SimpleNamespace(is_closing=lambda: False, write=written.append,
                                 transport=SimpleNamespace(get_write_buffer_size=lambda: 0))
        supervisor._workers[0] = SimpleNamespace(writer=writer, process=SimpleNamespace(returncode=None),
                                                 killed=False, sets_dropped=False)  # type: ignore[assignment]
        backend = ctx.pools["p"].backends["a"]
        for reason in ("first", "second", "third"):
            backend.reason = reason
            supervisor.states_changed()
        assert written == [], "pushed once the turn is over"
        await asyncio.sleep(0)
        backend.reason = "fourth"
        supervisor.states_changed()
        supervisor.stop_migration("p", "a")  # flushes the push that is due first
        await asyncio.sleep(0)
        backend.reason = "fifth"
        supervisor.states_changed()
        supervisor.broadcast(ipc.states_message(ctx.pools))  # the once-a-second push: the due one goes with it
        await asyncio.sleep(0)
        return [decode(frame[LENGTH.size:]) for frame in written]

    messages = asyncio.run(scenario())
    assert [m["op"] for m in messages] == ["states", "states", "stop_migration", "states"]
    assert [m["pools"]["p"]["a"]["reason"] for m in messages[:2]] == ["third", "fourth"]
    assert messages[3]["pools"]["p"]["a"]["reason"] == "fifth"


def test_a_worker_started_as_the_stop_begins_is_stopped_not_left_to_outlive_it() -> None:
    """A restart's `_spawn` awaits the process and its control socket before the worker is registered; a
    stop that began in between signalled and waited for the workers it knew, without this one, which then
    started, listened and outlived its owner.  It is stopped instead, and never registered nor fed."""
    from types import SimpleNamespace
    from unittest import mock

    signals: list[int] = []
    supervisor = workers_module.WorkerSupervisor(
        SimpleNamespace(ctx=_ctx(), retired_backends=list, retired_counted=list, series=SeriesRetention(),
                        discovery=None, config=SimpleNamespace(pools={})), 1,  # type: ignore[arg-type]
        config_path=mock.sentinel.path, config_source=ConfigSource(""),
    )

    async def exec_as_the_stop_begins(*args: Any, **kwargs: Any) -> Any:
        supervisor._stopping = True  # stop() ran while the process was being started

        async def wait() -> int:
            return -signal.SIGTERM if signals else 0

        return SimpleNamespace(pid=4243, returncode=None, send_signal=signals.append, wait=wait)

    async def scenario() -> None:
        with mock.patch.object(workers_module.asyncio, "create_subprocess_exec", exec_as_the_stop_begins):
            await supervisor._spawn(0)
        assert signals == [signal.SIGTERM]
        assert supervisor._workers == {}, "registered: nothing would wait for it or stop it"

    asyncio.run(scenario())

"""Logs and build info, read from real processes: every line starts with (or carries) an ISO-8601 UTC
timestamp, one event per line in plain and JSON, numeric durations in JSON; `lb --version`;
`lb_build_info{version, config_hash}` equal for one config, different for another;
with `workers: 2`, process_* covers every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import re
import signal
from pathlib import Path

import pytest

from tests.harness import UNIT
from tests.harness.clients import http_get_async, visit
from tests.harness.ops import reload_with, rewrite_config, signal_balancer, wait_exit, wait_until
from tests.harness.processes import Balancer, Gateway, Launcher, lb_config, run_lb

POOL = "gateways"
ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]00:?00)")


GATEWAYS = 1  # how many the module-scoped `gateways` fixture (conftest) starts


async def exercise(lb: Balancer) -> None:
    """Traffic, a failed reload and a clean stop, so the log holds every kind of line."""
    await visit(lb.ws_url())
    good = copy.deepcopy(lb.config)
    await reload_with(lb, "pools: [not, a, mapping]\n", expect="reload failed")
    rewrite_config(lb, good)
    signal_balancer(lb, signal.SIGTERM)
    assert await wait_exit(lb, 10 * UNIT) == 0


async def test_plain_lines_start_with_an_iso_utc_timestamp(launcher: Launcher, gateways: list[Gateway]) -> None:
    """Plain format: every line is one event and starts with an ISO-8601 UTC timestamp."""
    lb = launcher.balancer(lb_config(pools={POOL: gateways}, overrides={"logging": {"format": "plain"}}))
    await exercise(lb)
    lines = [line for line in lb.log_text().splitlines() if line.strip()]
    assert lines
    for line in lines:
        assert ISO_UTC.match(line.split(" ", 1)[0]), line
    failed = [line for line in lines if "reload failed" in line]
    assert len(failed) == 1 and "pools" in failed[0], failed


async def test_json_lines_parse_with_iso_time_and_numeric_durations(
    launcher: Launcher, gateways: list[Gateway]
) -> None:
    """JSON format: every line parses; `time` is ISO-8601 UTC; a closed tunnel's duration is a number."""
    lb = launcher.balancer(lb_config(pools={POOL: gateways}, overrides={"logging": {"format": "json"}}))
    await exercise(lb)
    events = [json.loads(line) for line in lb.log_text().splitlines() if line.strip()]
    assert events
    for event in events:
        assert ISO_UTC.fullmatch(event["time"]), event
    closes = [e for e in events if e.get("event") == "tunnel_closed"]
    assert closes and all(isinstance(e["duration"], int | float) for e in closes), closes
    # The handshake's request line and its tunnel's close line carry one request id (and the client port).
    requests = {e["request_id"]: e for e in events if e.get("event") == "request"}
    for close in closes:
        opened = requests.get(close["request_id"])
        assert opened is not None and opened["status"] == 101, (close, requests)
        assert opened["client_port"] == close["client_port"] > 0, (opened, close)


def test_lb_version_prints_the_version() -> None:
    """`lb --version`: the version on stdout, exit 0."""
    done = run_lb("--version")
    assert done.returncode == 0 and re.fullmatch(r"\d+\.\d+\.\d+\S*\n", done.stdout), done


async def build_info(lb: Balancer) -> tuple[str, str]:
    _, _, body = await http_get_async(lb.admin_url("/metrics"))
    match = re.search(r'^lb_build_info\{([^}]*)\} 1\.0$', body.decode(), re.MULTILINE)
    assert match, "lb_build_info missing"
    labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1)))
    return labels["version"], labels["config_hash"]


async def test_build_info_hash_tells_replicas_apart(launcher: Launcher, gateways: list[Gateway]) -> None:
    """One config hashes alike each time it runs; a changed one hashes differently (alertable drift)."""
    config = lb_config(pools={POOL: gateways})
    twin = copy.deepcopy(config)
    first = launcher.balancer(config)
    version, before = await build_info(first)
    assert version and len(before) >= 8
    twin["timeouts"]["handshake"] = "7s"
    await reload_with(first, twin)
    _, after = await build_info(first)
    assert after != before, "a changed config must change config_hash"
    await reload_with(first, config)
    assert (await build_info(first))[1] == before, "the same config must hash the same"


async def test_process_metrics_cover_every_worker(launcher: Launcher, gateways: list[Gateway]) -> None:
    """workers: 2 — resident memory per worker and CPU summed over owner and workers."""
    lb = launcher.balancer(lb_config(pools={POOL: gateways}, overrides={"workers": 2}))

    async def two_workers() -> list[str]:
        _, _, body = await http_get_async(lb.admin_url("/metrics"))
        pids = re.findall(r'^lb_worker_resident_memory_bytes\{pid="(\d+)"\} [1-9]', body.decode(), re.MULTILINE)
        return pids if len(pids) == 2 else []

    await wait_until(two_workers, within=10 * UNIT, what="two workers in lb_worker_resident_memory_bytes")
    _, _, body = await http_get_async(lb.admin_url("/metrics"))
    text = body.decode()
    rss = float(re.search(r"^process_resident_memory_bytes (\S+)$", text, re.MULTILINE).group(1))  # type: ignore[union-attr]
    workers = sum(float(v) for v in re.findall(r"^lb_worker_resident_memory_bytes\{[^}]*\} (\S+)$", text, re.MULTILINE))
    assert rss > workers > 0, (rss, workers)


class _LoggingToAFifo(Balancer):
    """stdout and stderr on a FIFO whose reader (the test) stops reading: a wedged log shipper."""

    def __init__(self, config: dict[str, object], workdir: Path) -> None:
        super().__init__(config, workdir)
        self.fifo = workdir / "log.fifo"
        os.mkfifo(self.fifo)
        self.reader = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)  # open, never read until `drain`

    def command(self) -> list[str]:
        return ["bash", "-c", 'exec "$0" "$@" >"$LOG_FIFO" 2>&1', *super().command()]

    def drain(self) -> str:
        taken = b""
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.reader, 1 << 16):
                taken += chunk
        return taken.decode(errors="replace")


@pytest.mark.parametrize("workers", [1, 2])
async def test_a_stalled_log_reader_costs_log_lines_not_the_balancer(
    launcher: Launcher, gateways: list[Gateway], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Once the pipe under stderr is full, a write(2) of the next line blocked the event loop: every client
    hung, the probes timed out and SIGTERM went unheard.  Lines are dropped instead, whole, and counted."""
    config = lb_config(pools={"gateways": gateways}, overrides={"workers": workers})
    lb = _LoggingToAFifo(config, tmp_path)
    monkeypatch.setenv("LOG_FIFO", str(lb.fifo))
    lb.launch()
    try:
        async def ready() -> bool:
            return (await http_get_async(lb.admin_url("/readyz")))[0] == 200

        await wait_until(ready, within=20 * UNIT, what="ready")
        for _ in range(400):  # ~250 bytes of access log each: more than the pipe's 64 KiB
            assert (await http_get_async(lb.http_url("/whoami")))[0] == 200
        # A line of the owner's own (SIGUSR1 is a WARNING) into the full pipe: spawning its workers, libuv had
        # made the description it shares with them blocking, and the owner stopped there for good.
        assert lb.proc is not None
        for _ in range(3):
            lb.proc.send_signal(signal.SIGUSR1)
        await asyncio.sleep(0.2)
        assert (await http_get_async(lb.admin_url("/livez")))[0] == 200
        # Every drain is kept: a count said while the pipe had room for it alone may be in this first one.
        taken = [lb.drain()]
        lines = taken[0].splitlines()
        # Whole lines only: a dropped line is dropped whole, never cut with the next glued onto it.
        assert lines and all(re.match(r"\d{4}-\d\d-\d\dT", line) for line in lines), lines[-3:]
        assert len([line for line in lines if "lb.access" in line]) < 400

        async def said() -> bool:
            taken.append(lb.drain())
            return "log line(s) dropped: stderr was full" in "".join(taken)

        await wait_until(said, within=5 * UNIT, what="the dropped lines said")
        assert lb.proc is not None
        lb.proc.send_signal(signal.SIGTERM)
        assert await wait_exit(lb, within=20 * UNIT) == 0
    finally:
        lb.stop()
        os.close(lb.reader)

"""bench.procs.free_port under parallel test processes: each keeps to its own share of the ports."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench import procs


@pytest.mark.parametrize(
    ("environ", "share"),
    [
        ({}, (0, 1)),
        ({"PYTEST_XDIST_WORKER": "gw0", "PYTEST_XDIST_WORKER_COUNT": "2"}, (0, 2)),
        ({"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": "2"}, (1, 2)),
        ({"PYTEST_XDIST_WORKER": "gw2", "PYTEST_XDIST_WORKER_COUNT": "2"}, (0, 1)),  # not a worker of this count
        ({"PYTEST_XDIST_WORKER": "master", "PYTEST_XDIST_WORKER_COUNT": "2"}, (0, 1)),
        ({"PYTEST_XDIST_WORKER": "gw1", "PYTEST_XDIST_WORKER_COUNT": ""}, (0, 1)),
    ],
)
def test_port_share_reads_the_xdist_worker(environ: dict[str, str], share: tuple[int, int]) -> None:
    assert procs.port_share(environ) == share


@pytest.mark.parametrize("worker", [0, 1, 2])
def test_free_ports_stay_in_the_workers_share_and_are_never_handed_out_twice(
    worker: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", f"gw{worker}")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "3")
    ports = [procs.free_port() for _ in range(20)]
    assert len(set(ports)) == len(ports)
    assert all((port // 2) % 3 == worker for port in ports)


def test_free_ports_are_below_the_ephemeral_range_where_there_is_room() -> None:
    """Where connect() and bind(0) draw no port from (ip_local_port_range): an outgoing connection cannot
    take a port between its hand-out and the bind of the child it was handed to."""
    below = procs._below_ephemeral()
    if below is None:
        pytest.skip("no room below this kernel's ephemeral port range (or no /proc)")
    ports = [procs.free_port() for _ in range(50)]
    assert all(port in below for port in ports)
    assert len(set(ports)) == len(ports)


@pytest.mark.parametrize(("text", "expected"), [
    ("32768\t60999\n", range(10000, 32768)),
    ("12000 60999", None),  # too little room: bind(0) as before
    ("", None),
    ("x y", None),
])
def test_the_room_below_the_ephemeral_range_is_read_from_the_kernel(
    tmp_path: Path, text: str, expected: range | None
) -> None:
    path = tmp_path / "ip_local_port_range"
    path.write_text(text)
    assert procs._below_ephemeral(path) == expected
    assert procs._below_ephemeral(tmp_path / "missing") is None

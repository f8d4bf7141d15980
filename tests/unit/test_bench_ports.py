"""bench.procs.free_port under parallel test processes: each keeps to its own share of the ports."""

from __future__ import annotations

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

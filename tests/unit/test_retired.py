"""Removed backends kept while their tunnels may run (`lb.state.retired`): one process's, and the owner's of
`workers: N`, which keeps each one until its workers' reports made after the removal have been summed."""

from __future__ import annotations

import math

import pytest

from lb.config.model import BackendConfig, PoolConfig
from lb.state.pool import BackendStatus, PoolState
from lb.state.retired import RetiredBackends


def backend(backend_id: str, connections: int = 0) -> BackendStatus:
    return BackendStatus(config=BackendConfig(backend_id, "127.0.0.1", 1), connections=connections)


@pytest.mark.parametrize(("connections", "kept"), [(0, False), (3, True)])
def test_a_process_counting_its_own_tunnels_keeps_a_removed_backend_only_while_it_has_some(
    connections: int, kept: bool
) -> None:
    """One process (or a worker): its count is exact, so a backend removed at 0 is forgotten at once."""
    retired = RetiredBackends()
    gone = backend("gw-1", connections)
    retired.retire("p", gone, provisional=False)
    retired.prune(math.inf)
    assert list(retired) == ([("p", gone)] if kept else [])
    gone.connections = 0
    retired.prune(math.inf)
    assert list(retired) == []


def test_the_owner_keeps_a_removed_backend_at_0_until_reports_after_its_fence_are_summed() -> None:
    """The owner's count at the removal is its workers' last reports: 0 says nothing until every worker has
    reported after the change reached it; then 0 is 0."""
    retired = RetiredBackends()
    gone = backend("gw-1")
    retired.retire("p", gone, provisional=True)
    retired.prune(10)  # not fenced yet: the reload has not reached the workers
    assert list(retired) == [("p", gone)]
    retired.fence(11)
    retired.prune(10)  # summed reports were all made before the fence
    assert list(retired) == [("p", gone)]
    gone.connections = 2  # the reports after it tell the tunnels
    retired.prune(11)
    assert list(retired) == [("p", gone)]
    gone.connections = 0
    retired.prune(11)
    assert list(retired) == []


def test_a_fence_applies_only_to_the_removals_made_before_it() -> None:
    """A later removal waits for its own fence: an earlier round's answers were made before it."""
    retired = RetiredBackends()
    first, second = backend("gw-1"), backend("gw-2")
    retired.retire("p", first, provisional=True)
    retired.fence(5)
    retired.retire("p", second, provisional=True)
    retired.prune(5)
    assert list(retired) == [("p", second)]
    retired.fence(6)
    retired.prune(6)
    assert list(retired) == []


def test_a_backend_brought_back_is_itself_again_not_also_removed() -> None:
    retired = RetiredBackends()
    back, other = backend("gw-1", 1), backend("gw-2", 1)
    retired.retire("p", back, provisional=False)
    retired.retire("p", other, provisional=False)
    assert retired.of_pool("p") == {"gw-1": back, "gw-2": other}
    pool = PoolState(config=PoolConfig("p", (back.config,)), backends={"gw-1": back})
    retired.drop_back({"p": pool})
    assert list(retired) == [("p", other)]


def test_find_names_the_latest_removal_of_an_id() -> None:
    """A drain's closes reach a removed backend by its id: the one last removed, of that pool only."""
    retired = RetiredBackends()
    older, newer = backend("gw-1", 1), backend("gw-1", 1)
    retired.retire("p", older, provisional=False)
    retired.retire("p", newer, provisional=False)
    assert retired.find("p", "gw-1") is newer
    assert retired.find("q", "gw-1") is None
    assert retired.find("p", "gw-2") is None

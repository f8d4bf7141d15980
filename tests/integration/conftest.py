"""Fixtures of the integration tests, wired from the harness (`tests/harness`): the processes a test
starts (`launcher`), gateways shared by one module (`gateways`), and the shared stack (`stack`, `lb`).

Nothing here imports `lb`: the fixtures run the product as an operator would.  The tests check what
SPEC.md says; a few also use the product's own modules where that is the point (a token sealed with its
codec, a configuration read by its loader, a shell function on a real socket).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import APP_COOKIE
from tests.harness.ops import launched
from tests.harness.processes import (
    SHARED_HANDSHAKE,
    SHARED_ROUTES,
    STEADY_HEALTH,
    Balancer,
    DeadBackend,
    Gateway,
    Launcher,
    Stack,
    lb_config,
    log_tail,
)


@pytest.fixture(scope="module")
def gateways(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Gateway]]:
    """Gateways `gw-1..gw-n` shared by one module whose tests leave them running; n is the module's
    `GATEWAYS` (default 2).  Each test starts its own balancer in front of them with `launcher`."""
    count = int(getattr(request.module, "GATEWAYS", 2))
    with launched(tmp_path_factory, f"{request.module.__name__}-gateways") as started:
        yield started.gateways(count)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    """Processes for one test (destructive tests: killing gateways, odd configs)."""
    with contextlib.closing(Launcher(tmp_path)) as started:
        yield started


@pytest.fixture(scope="session")
def _shared_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """3 gateways + a spy + dead backends behind one balancer, for every test that leaves it as it found it."""
    with launched(tmp_path_factory, "shared") as started:
        gateways = started.gateways(3, app_cookie=APP_COOKIE)
        spy = started.spy()
        dead = [DeadBackend("dead-1"), DeadBackend("dead-2")]
        config = lb_config(
            pools={"gateways": gateways, "dead": dead, "spy": [spy]},
            routes=SHARED_ROUTES,
            health=STEADY_HEALTH,
            overrides={"timeouts": {"handshake": f"{int(SHARED_HANDSHAKE * 1000)}ms"}},
        )
        balancer = started.balancer(config, name="shared")
        expected = {("gateways", g.id): "up" for g in gateways}
        expected |= {("dead", d.id): "down" for d in dead} | {("spy", spy.id): "up"}
        balancer.wait_states(expected)
        yield Stack(balancer=balancer, gateways=gateways, spy=spy, dead=dead)


@pytest.fixture
def stack(_shared_stack: Stack) -> Stack:
    """The shared stack, checked alive before each test so a crash shows where it happened."""
    _shared_stack.balancer.assert_alive()
    for gateway in _shared_stack.gateways:
        assert gateway.running, f"shared gateway {gateway.id} died:\n{log_tail(gateway.log_path)}"
    return _shared_stack


@pytest.fixture
def lb(stack: Stack) -> Balancer:
    return stack.balancer

"""`workers: 2`: the owner's /readyz and /healthz follow its workers, since its listeners are theirs.

With no worker serving (all SIGKILLed and not yet restarted, or all SIGSTOPped: silent to the owner),
/readyz and /healthz answer 503 saying why, /livez stays 200 and /status counts the serving workers;
with one worker still serving, the owner stays ready.  Every signal here goes to a worker of this
module's own balancer, and a stopped worker is resumed on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.harness import UNIT
from tests.harness.clients import http_get_async
from tests.harness.ops import OpsStack, both_serving, paused, started_stack, wait_until, worker_pids
from tests.harness.processes import Balancer

# The product's bound (lb.control.workers.SERVING_SILENCE): a worker silent this long no longer serves.
SERVING_SILENCE = 3.0
UNRESPONSIVE_AFTER = 10.0  # its watchdog: a worker silent this long is killed (these tests stay well inside it)


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OpsStack]:
    with started_stack(tmp_path_factory.mktemp("workers-ready"), gateways=1, overrides={"workers": 2}) as stack:
        yield stack


async def admin(lb: Balancer, path: str) -> tuple[int, dict[str, object]]:
    code, _, body = await http_get_async(lb.admin_url(path))
    return code, dict(json.loads(body))


def owner_pid(lb: Balancer) -> int:
    assert lb.proc is not None
    return lb.proc.pid


@contextlib.contextmanager
def stopped(lb: Balancer, pids: list[int]) -> Iterator[None]:
    """SIGSTOP these workers of `lb`; SIGCONT every one of them still alive on the way out."""
    owner = owner_pid(lb)
    assert set(pids) <= set(worker_pids(owner)), "not this balancer's workers"
    with paused(*pids):
        yield


async def test_every_worker_stopped_makes_readyz_and_healthz_503_until_they_resume(ops: OpsStack) -> None:
    """All workers SIGSTOPped: /readyz and /healthz 503 ("no worker serving") within a few seconds, long
    before the watchdog's 10 s; /livez 200; after SIGCONT, 200 again with the same workers."""
    lb = ops.balancer
    before = await both_serving(lb)
    assert (await admin(lb, "/readyz"))[0] == 200
    with stopped(lb, before):
        stopped_at = time.monotonic()

        async def not_ready() -> bool:
            return (await admin(lb, "/readyz"))[0] == 503

        await wait_until(not_ready, within=SERVING_SILENCE + 3 * UNIT, every=0.1, what="/readyz 503")
        assert time.monotonic() - stopped_at < UNRESPONSIVE_AFTER - 2, "too late to beat the watchdog"
        code, body = await admin(lb, "/readyz")
        assert (code, body) == (503, {"status": "not ready", "reason": "no worker serving"})
        assert await admin(lb, "/healthz") == (503, {"status": "no worker serving"})
        assert await admin(lb, "/livez") == (200, {"status": "ok"})
        code, status = await admin(lb, "/status")
        assert code == 200 and status["workers"] == {"count": 2, "serving": 0}, status.get("workers")
    # Resumed well inside the watchdog's bound: their next reports make them serving again.

    async def ready() -> bool:
        return (await admin(lb, "/readyz"))[0] == 200 and (await admin(lb, "/healthz"))[0] == 200

    await wait_until(ready, within=3 * UNIT, every=0.1, what="/readyz and /healthz 200 after SIGCONT")
    assert sorted(await both_serving(lb)) == sorted(before), "a resumed worker was replaced"
    lb.assert_alive()


async def test_one_worker_stopped_leaves_the_owner_ready(ops: OpsStack) -> None:
    """One of two workers SIGSTOPped past the silence bound: the other serves, so /readyz and /healthz stay
    200; /status counts one worker serving."""
    lb = ops.balancer
    workers = await both_serving(lb)
    with stopped(lb, workers[:1]):
        deadline = time.monotonic() + SERVING_SILENCE + 1.5 * UNIT
        codes: set[int] = set()
        while time.monotonic() < deadline:
            codes.add((await admin(lb, "/readyz"))[0])
            codes.add((await admin(lb, "/healthz"))[0])
            await asyncio.sleep(0.1)
        assert codes == {200}, codes
        code, status = await admin(lb, "/status")
        assert code == 200 and status["workers"] == {"count": 2, "serving": 1}, status.get("workers")
    assert sorted(await both_serving(lb)) == sorted(workers), "the resumed worker was replaced"


async def test_every_worker_killed_makes_readyz_503_until_their_replacements_listen(ops: OpsStack) -> None:
    """All workers SIGKILLed: /readyz answers 503 ("no worker serving") until a replacement is ready, then 200."""
    lb = ops.balancer
    owner = owner_pid(lb)
    before = await both_serving(lb)
    assert (await admin(lb, "/readyz"))[0] == 200
    for pid in before:
        os.kill(pid, signal.SIGKILL)
    answers: list[tuple[int, object]] = []
    deadline = time.monotonic() + 10 * UNIT
    while time.monotonic() < deadline:
        code, body = await admin(lb, "/readyz")
        answers.append((code, body.get("reason")))
        now = worker_pids(owner)
        if code == 200 and len(now) == 2 and not set(before) & set(now):  # both replaced, and ready
            break
        await asyncio.sleep(0.02)
    else:
        raise AssertionError(f"/readyz not back to 200 with new workers within {10 * UNIT}s: {answers[-5:]}")
    assert (503, "no worker serving") in answers, answers[:10]
    assert answers[-1] == (200, None)
    lb.assert_alive()

"""Polling for the unit tests that run a real asyncio server: wait for a condition against a deadline.

Never a bare sleep: the loop checks `predicate` every 10 ms and fails the test with a clear message
once `within` seconds (loop time) have passed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


async def wait_for(predicate: Callable[[], object], within: float = 3.0) -> None:
    """Return once `predicate()` is truthy; fail the test if it is not within `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not predicate():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)

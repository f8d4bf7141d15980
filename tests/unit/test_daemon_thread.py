"""`in_daemon_thread`: blocking work off the loop that never holds up the process's exit."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest

from lb.control.daemon_thread import in_daemon_thread


async def test_the_result_and_the_error_come_back_from_a_daemon_thread() -> None:
    def where() -> tuple[str, bool]:
        thread = threading.current_thread()
        return thread.name, thread.daemon

    assert await in_daemon_thread(where, name="probe") == ("probe", True)

    def fail() -> None:
        raise ValueError("bad file")

    with pytest.raises(ValueError, match="bad file"):
        await in_daemon_thread(fail, name="probe")


async def test_cancelling_returns_at_once() -> None:
    release = threading.Event()
    waiting = asyncio.create_task(in_daemon_thread(lambda: release.wait(10), name="probe"))
    await asyncio.sleep(0.05)
    waiting.cancel()
    started = time.monotonic()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert time.monotonic() - started < 1
    release.set()


def test_the_process_exits_without_waiting_for_the_thread() -> None:
    """A reload checking a large file when SIGTERM came held the exit until the check ended:
    `asyncio.to_thread`'s executor threads are joined when `asyncio.run` ends."""
    script = (
        "import asyncio, time\n"
        "from lb.control.daemon_thread import in_daemon_thread\n"
        "async def main():\n"
        "    try:\n"
        "        await asyncio.wait_for(in_daemon_thread(lambda: time.sleep(60), name='reload'), 0.2)\n"
        "    except TimeoutError:\n"
        "        pass\n"
        "asyncio.run(main())\n"
    )
    started = time.monotonic()
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert time.monotonic() - started < 10

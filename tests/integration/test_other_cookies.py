"""SPEC: in insert mode the affinity cookie is removed from the forwarded request and the other cookies
pass unchanged: byte for byte, their separators too, as a recording backend receives them."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest

from tests.harness import COOKIE, UNIT
from tests.harness.ops import wait_until
from tests.harness.processes import Balancer, Launcher, lb_config
from tests.harness.raw import close_raw, open_raw, read_response
from tests.harness.recording import RecordingBackend

TCP_HEALTH = {"type": "tcp", "interval": "5s", "timeout": "1s", "rise": 1, "fall": 3}


@pytest.fixture
def recorded(launcher: Launcher) -> Iterator[tuple[Balancer, RecordingBackend]]:
    backend = RecordingBackend("rec")
    try:
        yield launcher.balancer(lb_config(pools={"gateways": [backend]}, health=TCP_HEALTH)), backend
    finally:
        backend.close()


async def _cookie_line_received(lb: Balancer, backend: RecordingBackend, cookie: str | None) -> str | None:
    """Send GET / with this Cookie line; the Cookie line the backend received (None: none)."""
    assert lb.port is not None
    before = len(backend.requests())
    reader, writer = await open_raw(lb.port)
    try:
        extra = f"Cookie: {cookie}\r\n" if cookie is not None else ""
        writer.write(f"GET / HTTP/1.1\r\nHost: x\r\n{extra}Connection: close\r\n\r\n".encode())
        answer = await read_response(reader)
        assert answer.status == 200, answer
    finally:
        await close_raw(writer)
    await wait_until(lambda: len(backend.requests()) > before, within=5 * UNIT, what="the request recorded")
    head = backend.requests()[-1].split(b"\r\n\r\n", 1)[0].decode("latin-1")
    lines = [line.split(":", 1)[1].strip(" \t") for line in head.split("\r\n") if line.lower().startswith("cookie:")]
    assert len(lines) <= 1, lines
    return lines[0] if lines else None


@pytest.mark.parametrize(
    ("before", "after"),
    [("a=1;b=2;{ours}", "a=1;b=2"), ("{ours}; x=\"q w\";y=1", "x=\"q w\";y=1"), ("a=1 ;{ours};  b=2", "a=1;  b=2")],
)
async def test_the_other_cookies_reach_the_backend_byte_for_byte(
    recorded: tuple[Balancer, RecordingBackend], before: str, after: str
) -> None:
    """A removed pair goes with the separator before it (after it, when first); every other byte stays."""
    lb, backend = recorded
    assert lb.port is not None
    reader, writer = await open_raw(lb.port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        first = await read_response(reader)
    finally:
        await close_raw(writer)
    token = re.match(rf"{COOKIE}=([^;]+)", first.get("Set-Cookie") or "")
    assert token is not None, first.headers
    received = await _cookie_line_received(lb, backend, before.format(ours=f"{COOKIE}={token.group(1)}"))
    assert received == after

"""Keep-alive and pipelining towards clients: each request parsed, routed and decided on its own.

Two recording backends (`/a` → rec-a, `/b` → rec-b) keep every byte they get;
each request reaches the backend of its own path, alone on its own backend
connection, and gets its own access-log line with its own request id.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import pytest

from tests.harness import UNIT
from tests.harness.ops import wait_until
from tests.harness.processes import Launcher, lb_config
from tests.harness.raw import close_raw, open_raw, read_response
from tests.harness.recording import RecordingBackend

TCP_HEALTH = {"type": "tcp", "interval": "5s", "timeout": "1s", "rise": 1, "fall": 3}


@pytest.fixture
def two(launcher: Launcher) -> Iterator[tuple[int, RecordingBackend, RecordingBackend, object]]:
    rec_a = RecordingBackend("rec-a", answer=b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nA")
    rec_b = RecordingBackend("rec-b", answer=b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nB")
    try:
        config = lb_config(
            pools={"a": [rec_a], "b": [rec_b]},
            routes={"/a": "a", "/b": "b"},
            health=TCP_HEALTH,
            overrides={"logging": {"format": "json", "access_log": True}},
        )
        lb = launcher.balancer(config)
        assert lb.port is not None
        yield lb.port, rec_a, rec_b, lb
    finally:
        rec_a.close()
        rec_b.close()


def request(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


async def test_three_requests_on_one_connection_each_routed_by_its_own_path(two: tuple) -> None:  # type: ignore[type-arg]
    """Each request on a keep-alive connection is routed by its own path and logged with its own id."""
    port, rec_a, rec_b, lb = two
    reader, writer = await open_raw(port)
    try:
        bodies = []
        for path in ("/a/one", "/b/two", "/a/three"):
            writer.write(request(path))
            answer = await read_response(reader)
            assert answer.status == 200 and (answer.get("Connection") or "").lower() != "close"
            bodies.append(answer.body)
        assert bodies == [b"A", b"B", b"A"]
    finally:
        await close_raw(writer)
    sent_a, sent_b = rec_a.requests(), rec_b.requests()
    assert [r.split(b" ")[1] for r in sent_a] == [b"/a/one", b"/a/three"]
    assert [r.split(b" ")[1] for r in sent_b] == [b"/b/two"]
    assert all(r.count(b"\r\n\r\n") == 1 for r in sent_a + sent_b), "one request per backend connection"

    def request_ids() -> set[str]:
        return set(re.findall(r'"request_id": ?"([0-9a-f]+)"', lb.log_text()))

    await wait_until(lambda: len(request_ids()) >= 3, within=5 * UNIT, what="three access-log lines")
    text = lb.log_text()
    ids = request_ids()
    assert len(ids) == 3, f"one access-log line with its own request id per request: {text[-2000:]}"


async def test_pipelined_requests_are_answered_in_order_each_routed(two: tuple) -> None:  # type: ignore[type-arg]
    """Pipelined requests are answered in order, each sent to the pool its own path routes to."""
    port, rec_a, rec_b, _ = two
    reader, writer = await open_raw(port)
    try:
        writer.write(request("/b/1") + request("/a/2") + request("/b/3"))
        bodies = [(await read_response(reader)).body for _ in range(3)]
        assert bodies == [b"B", b"A", b"B"]
    finally:
        await close_raw(writer)
    assert [r.split(b" ")[1] for r in rec_b.requests()] == [b"/b/1", b"/b/3"]
    assert [r.split(b" ")[1] for r in rec_a.requests()] == [b"/a/2"]


async def test_bad_request_in_a_pipeline_stops_it_there(two: tuple) -> None:  # type: ignore[type-arg]
    """A bad request in a pipeline gets 400 and a close; the requests after it reach no backend."""
    port, rec_a, _, _ = two
    reader, writer = await open_raw(port)
    try:
        writer.write(request("/a/1") + b"GET /a/2 HTTP/1.1\r\nHost: x\r\nBad Header: y\r\n\r\n" + request("/a/3"))
        assert (await read_response(reader)).status == 200
        refused = await read_response(reader)
        assert refused.status == 400 and refused.get("Connection") == "close"
    finally:
        await close_raw(writer)
    await asyncio.sleep(0.1)
    assert [r.split(b" ")[1] for r in rec_a.requests()] == [b"/a/1"]


async def test_half_closed_client_gets_its_answer(two: tuple) -> None:  # type: ignore[type-arg]
    """Request, then FIN (as `nc` and some HTTP/1.0 tools do): the answer still comes, then the close."""
    port, rec_a, _, _ = two
    reader, writer = await open_raw(port)
    try:
        writer.write(request("/a/half"))
        writer.write_eof()
        answer = await read_response(reader)
        assert (answer.status, answer.body) == (200, b"A")
    finally:
        await close_raw(writer)
    assert [r.split(b" ")[1] for r in rec_a.requests()] == [b"/a/half"]


async def test_half_closed_client_gets_every_pipelined_request_answered(two: tuple) -> None:  # type: ignore[type-arg]
    """`printf 'GET…GET…GET…' | nc -N`: the requests and the FIN in one go; each request is still
    routed and answered, in order (as by HAProxy and nginx), and then the connection closes."""
    port, rec_a, rec_b, _ = two
    reader, writer = await open_raw(port)
    try:
        writer.write(request("/a/1") + request("/b/2") + request("/a/3"))
        writer.write_eof()
        answers = [await read_response(reader) for _ in range(3)]
        assert [answer.body for answer in answers] == [b"A", b"B", b"A"]
        assert (answers[-1].get("Connection") or "").lower() == "close"
        assert await asyncio.wait_for(reader.read(), 5 * UNIT) == b"", "closed after the last answer"
    finally:
        await close_raw(writer)
    assert [r.split(b" ")[1] for r in rec_a.requests()] == [b"/a/1", b"/a/3"]
    assert [r.split(b" ")[1] for r in rec_b.requests()] == [b"/b/2"]

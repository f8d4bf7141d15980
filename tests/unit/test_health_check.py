"""One health check against a real backend on 127.0.0.1 port 0: what is asked, and the verdict on each answer."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager

import pytest

from lb.config.model import (
    BackendConfig,
    HealthCheckConfig,
    HealthCheckExpect,
    HealthCheckType,
    PoolConfig,
    implied_health_check,
)
from lb.control.health import HealthChecker, ProbeResult
from lb.state.pool import PoolState


@asynccontextmanager
async def backend(chunks: Sequence[bytes], *, close: bool = True) -> AsyncIterator[tuple[int, list[bytes]]]:
    """A backend that reads the check's request, then writes `chunks` 50 ms apart (each its own read) and
    closes (or, `close=False`, keeps the connection open); yields its port and the requests it read."""
    requests: list[bytes] = []
    handlers: set[asyncio.Task[object]] = set()
    done = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        try:
            requests.append(await reader.readuntil(b"\r\n\r\n"))
            for index, chunk in enumerate(chunks):
                if index:
                    await asyncio.sleep(0.05)
                writer.write(chunk)
                await writer.drain()
            if not close:
                await done.wait()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], requests
    finally:
        server.close()
        done.set()
        await asyncio.gather(*handlers, return_exceptions=True)


async def check(
    port: int, type: HealthCheckType = HealthCheckType.HTTP, check_timeout: float = 2.0,
    expect: HealthCheckExpect = HealthCheckExpect.SUCCESS,
) -> ProbeResult:
    config = PoolConfig(
        name="p", backends=(BackendConfig("gw-1", "127.0.0.1", port),),
        health_check=HealthCheckConfig(type=type, path="/ready?deep=1", timeout=check_timeout, expect=expect),
    )
    state = PoolState(config=config)
    return await HealthChecker(state, lambda change: None).check(state.backends["gw-1"])


def answer(status: str, *fields: str) -> bytes:
    return "".join([f"HTTP/1.1 {status}\r\n", *(f"{field}\r\n" for field in fields), "\r\n"]).encode("latin-1")


async def test_the_check_asks_for_the_configured_path_of_that_backend_and_closes() -> None:
    """GET of `health_check.path` with the backend's host:port as Host, and `Connection: close`."""
    async with backend([answer("200 OK")]) as (port, requests):
        assert (await check(port)).ok
    assert requests == [
        f"GET /ready?deep=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUser-Agent: ws-affinity-lb health check\r\n"
        "Connection: close\r\n\r\n".encode()
    ]


@pytest.mark.parametrize(
    ("status", "ok"),
    [("200 OK", True), ("204 No Content", True), ("299 Whatever", True), ("301 Moved", True),
     ("399 Whatever", True), ("400 Bad Request", False), ("404 Not Found", False), ("503 Unavailable", False)],
)
async def test_2xx_and_3xx_pass_and_4xx_and_5xx_fail(status: str, ok: bool) -> None:
    """A 2xx or 3xx answer passes, 400 and above fail; the detail names the status."""
    async with backend([answer(status)]) as (port, _):
        result = await check(port)
    assert (result.ok, result.detail) == (ok, f"HTTP {status[:3]}")


@pytest.mark.parametrize(
    "status", ["200 OK", "302 Found", "401 Unauthorized", "403 Forbidden", "404 Not Found", "426 Upgrade Required",
               "500 Internal Server Error", "503 Unavailable", "599 Whatever"],
)
async def test_the_implied_check_passes_any_complete_http_answer(status: str) -> None:
    """A pool without `health_check` (`expect: any`) asks if the backend is alive and speaks HTTP: a gateway
    that answers /health 403 or 404 (it has no such path, or refuses what is not a handshake) stays up."""
    assert implied_health_check().expect is HealthCheckExpect.ANY
    async with backend([answer(status, "Content-Length: 9")]) as (port, _):
        result = await check(port, expect=HealthCheckExpect.ANY)
    assert (result.ok, result.detail) == (True, f"HTTP {status[:3]}")


async def test_the_implied_check_reads_the_requested_state_from_any_answer() -> None:
    """`X-Backend-State: draining` in the implied check's answer drains the backend, whatever the status."""
    async with backend([answer("403 Forbidden", "X-Backend-State: draining")]) as (port, _):
        assert await check(port, expect=HealthCheckExpect.ANY) == ProbeResult(True, "HTTP 403", "draining")


@pytest.mark.parametrize(
    ("chunks", "detail"),
    [([b"SSH-2.0-OpenSSH_9.6\r\n"], "not a valid HTTP answer"),
     ([b"HTTP/1.1 000 Zero\r\n\r\n"], "not a valid HTTP answer"),
     ([b"HTTP/1.1 404 Not Found\nContent-Length: 0\n\n"], "not a valid HTTP answer"),
     ([b"HTTP/1.1 404 Not Found\r\nContent-"], "not a valid HTTP answer"),
     ([answer("101 Switching Protocols") + answer("404 Not Found")], "not a valid HTTP answer"),
     ([], "closed without answering"),
     ([b"HTTP/1.1 404 Not Found\r\nX-Pad: " + b"a" * 70_000], "answer head too large")],
    ids=["not http", "status 000", "bare LF", "cut short", "unasked 101", "closed", "head too large"],
)
async def test_the_implied_check_fails_what_is_not_a_complete_http_answer(chunks: list[bytes], detail: str) -> None:
    """Any status passes, but not garbage, a malformed or oversized head, or a close before the head ends."""
    async with backend(chunks) as (port, _):
        assert await check(port, expect=HealthCheckExpect.ANY) == ProbeResult(False, detail)


async def test_the_implied_check_fails_a_silent_backend_and_a_refused_or_reset_connect() -> None:
    """Liveness still: no answer within the timeout, a closed port and a reset all fail it."""
    async with backend([], close=False) as (port, _):
        silent = await check(port, check_timeout=0.1, expect=HealthCheckExpect.ANY)
    assert silent == ProbeResult(False, "no answer within 0.1s")

    with socket.socket() as sock:  # a port just given up: nothing listens there
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    refused = await check(closed_port, expect=HealthCheckExpect.ANY)
    assert not refused.ok and refused.detail.startswith(f"[Errno {errno.ECONNREFUSED}]")

    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        # SO_LINGER 0: closing sends RST instead of FIN (a gateway that crashes on the request).
        writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    try:
        result = await check(server.sockets[0].getsockname()[1], expect=HealthCheckExpect.ANY)
    finally:
        server.close()
    assert not result.ok and result.requested is None


@pytest.mark.parametrize("status", ["403 Forbidden", "404 Not Found", "500 Internal Server Error"])
async def test_a_written_check_still_wants_2xx_or_3xx(status: str) -> None:
    """`health_check` written (here `{type: http}`, `expect: success` by default): a 4xx or 5xx fails, as before."""
    assert HealthCheckConfig(type=HealthCheckType.HTTP).expect is HealthCheckExpect.SUCCESS
    async with backend([answer(status)]) as (port, _):
        result = await check(port)
    assert (result.ok, result.detail) == (False, f"HTTP {status[:3]}")


@pytest.mark.parametrize("status", ["404 Not Found", "500 Internal Server Error", "503 Unavailable"])
async def test_a_written_check_passes_a_failing_answer_that_asks_to_drain(status: str) -> None:
    """SPEC: an answer carrying `X-Backend-State: draining` puts the backend in draining, whatever its
    status (a gateway failing its readiness while it drains is not down); with `up` it fails as its status says."""
    async with backend([answer(status, "X-Backend-State: draining")]) as (port, _):
        assert await check(port) == ProbeResult(True, f"HTTP {status[:3]}", "draining")
    async with backend([answer(status, "X-Backend-State: up")]) as (port, _):
        assert await check(port) == ProbeResult(False, f"HTTP {status[:3]}", "up")


@pytest.mark.parametrize(
    ("fields", "requested"),
    [((), "up"), (("X-Backend-State: draining",), "draining"),
     (("X-Backend-State: up", "X-Backend-State: draining"), "draining"),
     (("X-Backend-State: draining", "X-Backend-State: up"), "draining")],
    ids=["none", "draining", "draining on a second line", "draining on the first line"],
)
@pytest.mark.parametrize("status", ["200 OK", "503 Unavailable"])
async def test_the_requested_state_is_read_from_every_line_and_from_a_failing_answer_too(
    fields: tuple[str, ...], requested: str, status: str
) -> None:
    """Repeated `X-Backend-State` lines are one list, whatever the answer's status."""
    async with backend([answer(status, *fields)]) as (port, _):
        assert (await check(port)).requested == requested


@pytest.mark.parametrize("interim", [0, 1, 8])
async def test_interim_answers_are_skipped_up_to_the_proxys_limit(interim: int) -> None:
    """Up to MAX_INTERIM (8) 1xx answers before the final one, as the proxy takes them: the final one counts."""
    async with backend([answer("100 Continue") * interim + answer("200 OK")]) as (port, _):
        result = await check(port)
    assert (result.ok, result.detail) == (True, "HTTP 200")


@pytest.mark.parametrize(
    ("chunks", "detail"),
    [([answer("100 Continue") * 9 + answer("200 OK")], "not a valid HTTP answer"),
     ([answer("101 Switching Protocols") + answer("200 OK")], "not a valid HTTP answer"),
     ([b"SSH-2.0-OpenSSH_9.6\r\n"], "not a valid HTTP answer"),
     ([b"HTTP/1.1 200 OK\r\nContent-"], "not a valid HTTP answer"),
     ([], "closed without answering"),
     ([b"HTTP/1.1 200 OK\r\nX-Pad: " + b"a" * 70_000], "answer head too large")],
    ids=["nine interim", "unasked 101", "not http", "cut short", "closed", "head too large"],
)
async def test_answers_the_proxy_would_refuse_fail_the_check(chunks: list[bytes], detail: str) -> None:
    """What a handshake would get a 502 for fails the check, with a fixed detail (never the backend's bytes)."""
    async with backend(chunks) as (port, _):
        assert await check(port) == ProbeResult(False, detail)


async def test_a_final_head_after_an_interim_one_read_in_pieces_is_found() -> None:
    """An interim head split across reads, then the final one: the search for its end starts again at the
    final head (a search resumed where the interim head's read left off ran past it, waiting for more)."""
    interim = answer("100 Continue", "X-Pad: " + "a" * 200)
    async with backend([interim[:150], interim[150:] + answer("200 OK")], close=False) as (port, _):
        result = await check(port)
    assert (result.ok, result.detail) == (True, "HTTP 200")


async def test_a_tcp_check_passes_on_an_accepted_connection() -> None:
    """`type: tcp` wants the connection accepted, and reads nothing."""
    async with backend([], close=False) as (port, requests):
        assert await check(port, HealthCheckType.TCP) == ProbeResult(True, "connected")
    assert requests == []


async def test_a_backend_silent_past_the_timeout_fails() -> None:
    """A backend that accepts and never answers fails the check once `health_check.timeout` has passed."""
    loop = asyncio.get_running_loop()
    async with backend([], close=False) as (port, _):
        started = loop.time()
        assert await check(port, check_timeout=0.1) == ProbeResult(False, "no answer within 0.1s")
        assert loop.time() - started < 0.6


@contextmanager
def threaded_backend(answer_with: bytes | None) -> Iterator[tuple[int, threading.Event, threading.Event]]:
    """A backend in a thread of its own, to answer while this test's event loop is stalled; yields its
    port, `asked` (set once the check's request is in) and `go`: once that is set, it writes
    `answer_with` (None: says nothing, until the test ends)."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(5.0)
    asked, go, done = threading.Event(), threading.Event(), threading.Event()

    def serve() -> None:
        with contextlib.suppress(OSError):
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5.0)
                conn.recv(4096)
                asked.set()
                if go.wait(5.0) and answer_with is not None:
                    conn.sendall(answer_with)
                done.wait(5.0)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], asked, go
    finally:
        done.set()
        go.set()
        thread.join(5.0)
        listener.close()


async def _stall_once_asked(asked: threading.Event, go: threading.Event) -> None:
    """Let the check send its request, then stall the loop (a paused VM, a long collection) 0.6 s, while
    the backend answers."""
    assert await asyncio.to_thread(asked.wait, 5.0)
    go.set()
    time.sleep(0.6)  # noqa: ASYNC251 - the stall itself: this loop runs nothing meanwhile


async def test_a_stall_of_the_balancers_own_event_loop_is_not_the_backends_silence() -> None:
    """An answer that came in time but was read late, the loop stalled past the timeout, passes."""
    with threaded_backend(answer("200 OK")) as (port, asked, go):
        probe = asyncio.create_task(check(port, check_timeout=0.2))
        await _stall_once_asked(asked, go)
        assert await probe == ProbeResult(True, "HTTP 200", "up")


async def test_a_silent_backend_still_fails_when_the_loop_stalled_during_its_check() -> None:
    """The stall is not counted, the rest of the timeout is: a silent backend fails soon after."""
    loop = asyncio.get_running_loop()
    with threaded_backend(None) as (port, asked, go):
        probe = asyncio.create_task(check(port, check_timeout=0.2))
        await _stall_once_asked(asked, go)
        resumed = loop.time()
        assert await probe == ProbeResult(False, "no answer within 0.2s")
        assert loop.time() - resumed < 2.0  # the part of its timeout it had not had yet, not a new one


async def test_a_connect_error_s_text_is_one_bounded_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """The detail shown in /status: the error's words joined by single spaces, cut at 160 characters."""

    async def failing_connect(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ECONNREFUSED, "refused\n  by   peer " + "x" * 300)

    monkeypatch.setattr(asyncio, "open_connection", failing_connect)
    result = await check(9)
    assert not result.ok and not result.local
    assert result.detail.startswith("[Errno 111] refused by peer xxx") and len(result.detail) == 160
    assert "\n" not in result.detail

"""The admin app in process (aiohttp's test client): a real bug inside a handler is a bare 500 with the
traceback in the log only; readiness follows the balancer's flag.
"""

from __future__ import annotations

import asyncio
import json
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from lb.config.model import BackendConfig, PoolConfig
from lb.control.admin import NO_TOKEN_CONFIGURED, WRONG_TOKEN, make_admin_app
from lb.log import JsonFormatter
from lb.state.pool import PoolState
from tests.harness.polling import wait_for

TOKEN = "t" * 20


def _fake_balancer(*, ready: bool = True, serving: bool | None = None, not_ready: str | None = None) -> Any:
    pool = PoolState(config=PoolConfig("p", (BackendConfig("gw-1", "127.0.0.1", 1),)))

    def apply_admin(*_: Any, **__: Any) -> Any:
        raise RuntimeError("secret internal detail /etc/lb/keys")

    ctx = SimpleNamespace(config=SimpleNamespace(admin=SimpleNamespace(token=TOKEN)), pools={"p": pool})
    serving = ready if serving is None else serving
    reason = not_ready or (None if ready else "shutting down")
    async def fresh_counts() -> None:  # no workers: counted in place
        return None

    return SimpleNamespace(ctx=ctx, ready=ready, serving=serving, shutting_down=not ready, apply_admin=apply_admin,
                           not_ready=lambda: reason, fresh_counts=fresh_counts,
                           find_backend=lambda name, backend_id: pool.get(backend_id) if name == "p" else None)


async def _client(balancer: Any) -> TestClient[Any, Any]:
    client: TestClient[Any, Any] = TestClient(TestServer(make_admin_app(balancer)))
    await client.start_server()
    return client


async def test_a_bug_in_a_handler_is_a_bare_500_logged_with_its_traceback(caplog: pytest.LogCaptureFixture) -> None:
    """The body says nothing of the error; the log has the traceback."""
    client = await _client(_fake_balancer())
    try:
        with caplog.at_level(logging.ERROR, logger="lb.control.admin"):
            reply = await client.post("/pools/p/backends/gw-1/drain", headers={"Authorization": f"Bearer {TOKEN}"})
            body = await reply.json()
        assert reply.status == 500 and body == {"error": "internal error", "request_id": body["request_id"]}
        assert "secret" not in str(body)
        assert any(r.exc_info and "secret internal detail" in str(r.exc_info[1]) for r in caplog.records)
        # The request id in the answer finds the traceback in the log.
        assert any(body["request_id"] in r.getMessage() for r in caplog.records if r.exc_info)
    finally:
        await client.close()


async def test_in_json_logs_an_admin_error_line_has_its_request_id_as_a_field(caplog: pytest.LogCaptureFixture) -> None:
    """SPEC: the log carries an error answer's request id; in `logging.format: json` as a field of its own, as
    on an access line, so a query on the field finds admin errors (a bug's 500 too) as well."""
    client = await _client(_fake_balancer())
    try:
        with caplog.at_level(logging.INFO, logger="lb.control.admin"):
            refused = await (await client.get("/status?verbose=1")).json()
            broken = await (await client.post(
                "/pools/p/backends/gw-1/drain", headers={"Authorization": f"Bearer {TOKEN}"}
            )).json()
            unknown = await (await client.get("/a=b")).json()  # a plain line quotes it: `"/a=b"`
        lines = [json.loads(JsonFormatter().format(record)) for record in caplog.records]
        for body, status, path in (
            (refused, 400, "/status"), (broken, 500, "/pools/p/backends/gw-1/drain"), (unknown, 404, "/a=b"),
        ):
            (line,) = [line for line in lines if line.get("request_id") == body["request_id"]]
            assert (line["status"], line["path"], line["client"]) == (status, path, "127.0.0.1"), line
    finally:
        await client.close()


async def test_a_token_of_bytes_that_are_not_utf8_is_a_401_not_a_500(caplog: pytest.LogCaptureFixture) -> None:
    """Header bytes aiohttp cannot decode as UTF-8 are a wrong token like any other, with no traceback logged."""
    client = await _client(_fake_balancer())
    try:
        reader, writer = await asyncio.open_connection(client.host, client.port)
        with caplog.at_level(logging.ERROR, logger="lb.control.admin"):
            writer.write(b"POST /pools/p/backends/gw-1/drain HTTP/1.1\r\nHost: x\r\n"
                         b"Authorization: Bearer \xff\xfe\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            async with asyncio.timeout(5):
                answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401 ")
        assert not caplog.records
    finally:
        await client.close()


@pytest.mark.parametrize("path", ["/pools/p/backends/gw-1/drain", "/lookup?token=x"])
async def test_with_no_admin_token_configured_the_401_says_so_rather_than_ask_for_one(path: str) -> None:
    """"missing or wrong bearer token" sent an operator (and lb ctl's hint, and the dashboard's prompt) looking
    for a token that does not exist."""
    balancer = _fake_balancer()
    balancer.ctx.config.admin.token = None
    client = await _client(balancer)
    try:
        ask = client.post if "/pools/" in path else client.get
        for headers in ({}, {"Authorization": f"Bearer {TOKEN}"}):
            reply = await ask(path, headers=headers)
            body = await reply.json()
            assert (reply.status, body["error"]) == (401, NO_TOKEN_CONFIGURED), body
            assert reply.headers["WWW-Authenticate"] == "Bearer"
        balancer.ctx.config.admin.token = TOKEN
        reply = await ask(path)
        assert (reply.status, (await reply.json())["error"]) == (401, WRONG_TOKEN)
    finally:
        await client.close()


@pytest.mark.parametrize("order", ["right first", "wrong first"])
async def test_two_authorization_headers_are_a_401_in_either_order(order: str) -> None:
    """With the right token and a wrong one, which decides must not depend on the order: neither does."""
    client = await _client(_fake_balancer())
    try:
        tokens = [TOKEN, "wrong"] if order == "right first" else ["wrong", TOKEN]
        reader, writer = await asyncio.open_connection(client.host, client.port)
        head = b"POST /pools/p/backends/gw-1/drain HTTP/1.1\r\nHost: x\r\n"
        head += b"".join(b"Authorization: Bearer %s\r\n" % token.encode() for token in tokens)
        writer.write(head + b"Content-Length: 0\r\nConnection: close\r\n\r\n")
        async with asyncio.timeout(5):
            answer = await reader.read()
        writer.close()
        assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("ready", "serving", "readyz", "healthz"),
    [(True, True, 200, 200), (False, True, 503, 200), (False, False, 503, 503)],
    ids=["serving", "shutdown delay", "stopped accepting"],
)
async def test_readyz_healthz_and_livez_follow_the_balancer(
    ready: bool, serving: bool, readyz: int, healthz: int
) -> None:
    """/readyz follows readiness (503 from SIGTERM on), /healthz whether it serves (SPEC part 1: 200 while the
    balancer serves, so through SIGTERM's shutdown_delay too); /livez is 200 whenever the process answers."""
    client = await _client(_fake_balancer(ready=ready, serving=serving))
    try:
        assert (await client.get("/readyz")).status == readyz
        assert (await client.get("/healthz")).status == healthz
        assert (await client.get("/livez")).status == 200
    finally:
        await client.close()


async def test_with_no_worker_serving_readyz_and_healthz_are_503_saying_so_and_livez_200() -> None:
    """The owner of workers with none serving (all dead or stopped) is neither ready nor serving, and both
    bodies say why; the process itself is alive."""
    balancer = _fake_balancer(ready=True, serving=False, not_ready="no worker serving")
    balancer.shutting_down = False
    client = await _client(balancer)
    try:
        readyz = await client.get("/readyz")
        assert readyz.status == 503
        assert await readyz.json() == {"status": "not ready", "reason": "no worker serving"}
        healthz = await client.get("/healthz")
        assert healthz.status == 503 and await healthz.json() == {"status": "no worker serving"}
        assert (await client.get("/livez")).status == 200
    finally:
        await client.close()


async def test_a_request_head_that_never_completes_is_closed_by_the_admin_runner() -> None:
    """Slowloris on the admin port: a connection sending half a head is closed after the idle timeout."""
    import asyncio
    import time

    from aiohttp import web

    from lb.control.admin import IDLE_TIMEOUT, AdminRunner

    assert AdminRunner(make_admin_app(_fake_balancer()))._kwargs["keepalive_timeout"] == IDLE_TIMEOUT
    runner = AdminRunner(make_admin_app(_fake_balancer()), keepalive_timeout=0.3)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET /status HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        started = time.monotonic()
        async with asyncio.timeout(5):
            assert await reader.read() == b""
        assert time.monotonic() - started < 3
        writer.close()
    finally:
        await runner.cleanup()


def _status_balancer(backends: int) -> Any:
    """A balancer for /status: pool `p` of `backends`, pool `q`, a retired backend of `p` and one of a pool gone."""
    from lb.state.pool import AdminAction

    many = PoolState(config=PoolConfig("p", tuple(BackendConfig(f"b{i}", "127.0.0.1", 1000 + i % 60000)
                                                  for i in range(backends))))
    other = PoolState(config=PoolConfig("q", (BackendConfig("gw-1", "127.0.0.1", 1),)))
    other.apply_admin("gw-1", AdminAction.DRAIN, 1.0)
    gone = PoolState(config=PoolConfig("x", (
        BackendConfig("old", "127.0.0.1", 2),
        BackendConfig("old2", "10.0.0.1", 3))))
    ctx = SimpleNamespace(
        config=SimpleNamespace(admin=SimpleNamespace(token=TOKEN), limits=SimpleNamespace(max_connections=7)),
        pools={"p": many, "q": other}, stats=SimpleNamespace(backend_counts=dict), accepting=True,
        client_connections=lambda: 5,
    )

    async def fresh_counts() -> None:
        return None

    return SimpleNamespace(
        ctx=ctx, fresh_counts=fresh_counts, live_tunnels=lambda: 3, role=SimpleNamespace(value="single"),
        workers_serving=lambda: None, listen_addresses=[("127.0.0.1", 8080)], shutting_down=False,
        discovery=SimpleNamespace(
            status=lambda name: {"last_ok": 1.5, "last_error": "x\u0000y"} if name == "q" else None
        ),
        retired_backends=lambda: [("p", gone.backends["old"]), ("x", gone.backends["old2"])],
    )


async def test_status_answers_the_status_document() -> None:
    """/status, built a slice at a time, is the document `status_document` describes."""
    from lb.control.status_document import status_document

    balancer = _status_balancer(50)
    client = await _client(balancer)
    try:
        reply = await client.get("/status")
        answer = await reply.json()
        assert reply.status == 200 and reply.content_type == "application/json"
    finally:
        await client.close()
    expected = json.loads(json.dumps(status_document(balancer)))
    assert {**answer, "time": 0} == {**expected, "time": 0}
    assert [b["id"] for b in answer["pools"]["p"]["backends"]][-2:] == ["b49", "old"]
    assert answer["pools"]["x"]["backends"][0]["removed"] is True
    assert answer["pools"]["q"]["discovery"]["last_ok"] == 1.5


async def test_status_of_many_backends_lets_the_loop_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Built whole, /status of 40,000 backends held the event loop (and every handshake) for a few hundred ms:
    now other tasks run between its slices.  Counted in turns, with a turn's time at 0 so that every backend
    ends one: how many 2 ms slices a machine fits is not what is tested (built whole, it gave none)."""
    from lb.control import status_document as document

    monkeypatch.setattr(document, "STATUS_TURN", 0.0)
    balancer = _status_balancer(2_000)
    turns = 0

    async def count_turns() -> None:
        nonlocal turns
        while True:
            await asyncio.sleep(0)
            turns += 1

    counter = asyncio.get_running_loop().create_task(count_turns())
    await asyncio.sleep(0)  # the counter has started
    try:
        text = await document.status_text(balancer)
        counted = turns
    finally:
        counter.cancel()
    assert len(json.loads(text)["pools"]["p"]["backends"]) == 2_001
    assert counted >= 2_000, f"{counted} turns of the loop while /status of 2,000 backends was built"
    assert {**json.loads(text), "time": 0} == {**json.loads(json.dumps(document.status_document(balancer))), "time": 0}


async def test_a_backend_removed_mid_render_is_listed_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """/status lets the loop run between backends: one a reload or DNS removes meanwhile is listed once (as it was
    when the render began), not in its pool and again as removed."""
    from lb.control import status_document as document

    monkeypatch.setattr(document, "STATUS_TURN", 0.0)  # a turn after every backend
    balancer = _status_balancer(5)
    retired = balancer.retired_backends()
    balancer.retired_backends = lambda: list(retired)
    pool = balancer.ctx.pools["p"]

    async def remove() -> None:
        await asyncio.sleep(0)  # the render has listed b0 and b1
        retired.append(("p", pool.backends.pop("b0")))

    remover = asyncio.get_running_loop().create_task(remove())
    text = await document.status_text(balancer)
    await remover
    assert "b0" not in pool.backends and ("p", "b0") in [(name, b.id) for name, b in retired]
    listed = [b["id"] for b in json.loads(text)["pools"]["p"]["backends"]]
    assert sorted(listed) == ["b0", "b1", "b2", "b3", "b4", "old"], listed



async def test_the_dashboard_lists_a_bounded_snapshot_and_says_how_many_more() -> None:
    """GET / needs no token: listed whole, 5,000 backends made each page 760 KB and 30 ms of the event loop.
    Its snapshot lists SNAPSHOT_BACKENDS at most, and each pool says how many it left out."""
    from lb.control import console

    balancer = _status_balancer(console.SNAPSHOT_BACKENDS + 100)  # pool p: those, and a removed one
    client = await _client(balancer)
    try:
        reply = await client.get("/")
        page = await reply.text()
    finally:
        await client.close()
    assert reply.status == 200
    assert page.count("<tr data-state=") == console.SNAPSHOT_BACKENDS
    assert "and 101 more backends (/status lists every one)" in page  # p: 100 past the cap, and the removed one
    assert "and 1 more backend (/status" in page  # q's one and x's one, past the cap too


async def _stall(loop: asyncio.AbstractEventLoop, host: str, port: int, path: str, count: int) -> list[Any]:
    """`count` connections that each ask for `path` at once and read nothing (a 4 KiB receive buffer)."""
    import socket

    stalled = []
    for _ in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, port))
        stalled.append(sock)
    request = f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    await asyncio.gather(*(loop.sock_sendall(sock, request) for sock in stalled))
    return stalled


def _unread_answer_bytes(runner: Any) -> int:
    """What the admin port's connections hold of answers their clients have not read yet (the transports'
    buffers, which `admin.make_room` holds to MAX_UNREAD_ANSWER_BYTES)."""
    return sum(transport.get_write_buffer_size() for transport in runner.server.transports.values())


async def test_answers_nobody_reads_are_bounded_and_cut_when_room_is_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client that asks for /status and never reads leaves its answer queued on its connection.  The
    admin port's unread answers stay within MAX_UNREAD_ANSWER_BYTES (and one answer): requests that
    came together get a 503 (Retry-After) while the unread ones are fresh, and once they have stalled
    for UNREAD_STALL the next large answer cuts them and is given.  Refusing everyone instead kept
    /status and /metrics at 503 for good.  The probes answer all along."""
    import socket

    from aiohttp import web

    from lb.control import admin

    monkeypatch.setattr(admin, "MAX_UNREAD_ANSWER_BYTES", 64 * 1024)
    monkeypatch.setattr(admin, "UNREAD_STALL", 2.0)
    runner = admin.AdminRunner(make_admin_app(_status_balancer(12_000)))
    await runner.setup()
    loop = asyncio.get_running_loop()
    stalled: list[socket.socket] = []
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]

        async def ask(path: str) -> tuple[int, bytes]:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = await reader.read()
            writer.close()
            return int(answer.split(b" ", 2)[1]), answer

        status, answer = await ask("/status")
        assert status == 200
        one_answer = len(answer)  # about 4 MB: more than the kernel takes of one left unread

        def unread() -> int:
            return _unread_answer_bytes(runner)

        # Six at once: each waits for its turn to render, and must not be rendered past the budget then.
        stalled = await _stall(loop, host, port, "/status", 6)
        await wait_for(lambda: unread() > admin.MAX_UNREAD_ANSWER_BYTES, within=5)
        await asyncio.sleep(0.3)  # the other five have had their turns
        assert unread() <= admin.MAX_UNREAD_ANSWER_BYTES + one_answer
        # And the kernel holds little of it, out of the budget's sight (Linux doubles what is set).
        buffers = [transport.get_extra_info("socket").getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
                   for transport in runner.server.transports.values()]  # type: ignore[union-attr]
        assert buffers and max(buffers) <= 2 * admin.ADMIN_SEND_BUFFER, buffers
        status, answer = await ask("/status")
        assert status == 503 and b"Retry-After: 1" in answer and b"still being read" in answer
        assert (await ask("/livez"))[0] == 200
        await asyncio.sleep(admin.UNREAD_STALL)  # what is unread now has stalled
        status, _ = await ask("/")
        assert status == 200  # the stalled connection was cut to make room
        assert (await ask("/status"))[0] == 200
        assert unread() <= admin.MAX_UNREAD_ANSWER_BYTES + one_answer
        assert any(_was_cut(sock, one_answer) for sock in stalled)
    finally:
        for sock in stalled:
            sock.close()
        await runner.cleanup()


def _was_cut(sock: Any, whole: int) -> bool:
    """Whether the server cut this connection: it ends (what the kernel had of the answer read, then
    the end) before a whole answer of `whole` bytes came."""
    sock.setblocking(True)
    sock.settimeout(0.5)
    got = 0
    try:
        while chunk := sock.recv(1 << 20):
            got += len(chunk)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False  # still open: not cut
    return got < whole


async def test_a_client_still_reading_slowly_is_not_cut(monkeypatch: pytest.MonkeyPatch) -> None:
    """A client reading a large answer at 50 KB/s (an operator on a slow link) leaves the transport's buffer
    still for seconds at a time: the kernel takes from it only once a third of its send buffer is free.
    What the client has not acknowledged goes down all along, so it is not stalled and is not cut; with
    nothing stalled to cut, the asker gets a 503."""
    import socket

    from aiohttp import web

    from lb.control import admin

    monkeypatch.setattr(admin, "MAX_UNREAD_ANSWER_BYTES", 64 * 1024)
    monkeypatch.setattr(admin, "UNREAD_STALL", 0.5)
    runner = admin.AdminRunner(make_admin_app(_status_balancer(12_000)))
    await runner.setup()
    loop = asyncio.get_running_loop()
    slow = socket.socket()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.setblocking(False)
        await loop.sock_connect(slow, (host, port))
        await loop.sock_sendall(slow, b"GET /status HTTP/1.1\r\nHost: x\r\n\r\n")
        got = 0

        async def read_slowly(seconds: float) -> None:
            nonlocal got
            for _ in range(int(seconds / 0.05)):
                await asyncio.sleep(0.05)
                chunk = await asyncio.wait_for(loop.sock_recv(slow, 2500), 1.0)  # 50 KB/s
                assert chunk, "the slow reader's connection was ended"
                got += len(chunk)

        async def ask(path: str) -> bytes:
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
            answer = await reader.read()
            writer.close()
            return answer

        await read_slowly(0.5)
        assert (await ask("/status"))[:12] == b"HTTP/1.1 503"  # the slow reader's bytes are first seen here
        await read_slowly(1.5)  # longer than UNREAD_STALL: it would count as stalled, if judged by the buffer
        answer = await ask("/status")
        assert answer.startswith(b"HTTP/1.1 503") and b"still being read" in answer
        before = got
        await read_slowly(1.0)  # still served
        assert got > before
    finally:
        slow.close()
        await runner.cleanup()


async def test_scrapes_that_waited_on_one_render_are_held_to_the_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scrapes that come while /metrics renders share that render, and were all answered at once when it was
    done, past the budget (40 of 4 MB: 125 MB unread against 32).  Each is asked again then."""
    from aiohttp import web

    from lb.control import admin

    monkeypatch.setattr(admin, "MAX_UNREAD_ANSWER_BYTES", 64 * 1024)
    body = b"lb_x 1\n" * 600_000  # 4.2 MB

    class _Scrapes:
        async def body(self) -> bytes:
            await asyncio.sleep(0.2)  # every scrape below arrives meanwhile
            return body

    app = make_admin_app(_status_balancer(1))
    app[admin.SCRAPES] = _Scrapes()  # type: ignore[assignment]
    runner = admin.AdminRunner(app)
    await runner.setup()
    loop = asyncio.get_running_loop()
    stalled: list[Any] = []
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        stalled = await _stall(loop, host, port, "/metrics", 20)
        await asyncio.sleep(0.6)
        unread = _unread_answer_bytes(runner)
        assert 0 < unread <= admin.MAX_UNREAD_ANSWER_BYTES + len(body)
    finally:
        for sock in stalled:
            sock.close()
        await runner.cleanup()


async def test_a_large_answer_lets_go_of_its_body_once_written() -> None:
    """aiohttp keeps a keep-alive connection's last answer until its next request: 500 idle connections that
    had asked for /status of 5,000 backends held 1 GB.  A LargeAnswer drops its body once it is written."""
    from aiohttp.test_utils import make_mocked_request

    from lb.control.admin import LargeAnswer

    written = bytearray()

    class _Writer:
        buffer_size = output_size = 0

        async def write(self, data: bytes, **_: Any) -> None:
            written.extend(data)

        async def write_headers(self, status_line: str, headers: Any) -> None:
            return None

        async def write_eof(self, data: bytes = b"") -> None:
            written.extend(data)

        async def drain(self) -> None:
            return None

        def enable_compression(self, *_: Any, **__: Any) -> None:
            return None

        def enable_chunking(self) -> None:
            return None

    request = make_mocked_request("GET", "/status", writer=_Writer())
    answer = LargeAnswer(body=b"x" * 100_000)
    await answer.prepare(request)
    await answer.write_eof()
    assert bytes(written).endswith(b"x" * 100_000)
    assert answer.body is None

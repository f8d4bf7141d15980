"""Admin input is refused as strictly as the config: every malformed body or parameter is a 400 naming
the problem, unknown parameters (`close_afer`) are errors, and no request can produce a 500.

Uses the shared stack; every request here is refused, so the stack is left as it was found.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import select
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from tests.harness import UNIT
from tests.harness.clients import find_backend, status
from tests.harness.ops import admin_request
from tests.harness.processes import Balancer, DeadBackend, Stack, http_get, lb_config
from tests.harness.raw import open_raw, raw_exchange, read_response

PATH = "/pools/dead/backends/{id}/drain"


async def post_raw(
    lb: Balancer, path: str, *, body: bytes = b"", content_type: str = "application/json", query: str = ""
) -> tuple[int, dict[str, Any]]:
    reply = await admin_request(
        lb, "POST", path + (f"?{query}" if query else ""), data=body, headers={"Content-Type": content_type}
    )
    return reply.status, reply.body


HOSTILE: list[tuple[str, str, bytes, str, str]] = [
    # (case, query, body, content type, words the error must contain)
    ("typo in query", "close_afer=30s", b"", "application/json", "unknown parameter"),
    ("typo in body", "", b'{"close_afer": "30s"}', "application/json", "unknown parameter"),
    ("unknown extra", "close_after=1s&force=1", b"", "application/json", "unknown parameter"),
    ("bad duration", "close_after=soon", b"", "application/json", "close_after"),
    ("negative duration", "close_after=-5s", b"", "application/json", "close_after"),
    ("rate zero", "rate=0", b"", "application/json", "rate"),
    ("rate near zero", "rate=0.0000000001", b"", "application/json", "rate: expected connections per second from 0.01"),
    ("rate nan", "rate=nan", b"", "application/json", "rate"),
    ("rate inf", "rate=inf", b"", "application/json", "rate"),
    ("rate word", "rate=fast", b"", "application/json", "rate"),
    ("repeated key", "rate=1&rate=2", b"", "application/json", "twice"),
    ("query and body", "rate=1", b'{"rate": 2}', "application/json", "both"),
    ("not json", "", b"{nope", "application/json", "JSON"),
    ("json array", "", b"[1, 2]", "application/json", "object"),
    ("json string", "", b'"drain"', "application/json", "object"),
    ("deep nesting", "", b"[" * 2000 + b"]" * 2000, "application/json", "nested"),
    ("deep object", "", b'{"a":' * 600 + b"1" + b"}" * 600, "application/json", "nested"),
    ("rate as object", "", b'{"rate": {"x": 1}}', "application/json", "rate"),
    ("rate as bool", "", b'{"rate": true}', "application/json", "rate"),
    ("duration as list", "", b'{"close_after": [1]}', "application/json", "close_after"),
    ("huge number", "", b'{"rate": 1e999}', "application/json", "rate"),
    ("form body", "", b"rate=5", "application/x-www-form-urlencoded", "application/json"),
    ("invalid utf-8", "", b'{"rate": "\xff\xfe"}', "application/json", "JSON"),
    ("key twice in body", "", b'{"close_after": "1s", "close_after": "2h"}', "application/json", "twice"),
    ("rate with underscores", "rate=1_000", b"", "application/json", "rate"),
    ("rate in full-width digits", "rate=%EF%BC%95", b"", "application/json", "rate"),
    ("rate in Arabic-Indic digits", "rate=%D9%A5", b"", "application/json", "rate"),
    ("rate in exponent form", "rate=1e3", b"", "application/json", "rate"),
    ("duration after a thin space", "close_after=%E2%80%8930s", b"", "application/json", "close_after"),
    ("duration with a no-break space", "close_after=30%C2%A0s", b"", "application/json", "close_after"),
]


@pytest.mark.parametrize(
    ("query", "body", "content_type", "words"), [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE]
)
async def test_hostile_admin_input_is_a_400_naming_the_problem(
    stack: Stack, query: str, body: bytes, content_type: str, words: str
) -> None:
    """Each malformed parameter or body: 400, a JSON error that names it, and nothing applied."""
    lb = stack.balancer
    backend_id = stack.dead[0].id
    code, answer = await post_raw(lb, PATH.format(id=backend_id), body=body, content_type=content_type, query=query)
    assert code == 400, (code, answer)
    assert words in answer.get("error", ""), answer
    assert find_backend(await status(lb), "dead", backend_id)["state"] != "draining"


@pytest.mark.parametrize(
    ("query", "body", "content_type", "sent"),
    [
        ("close_afer=30s", b"", "application/json", "close_afer"),
        ("", b'{"evil<b>key": 1}', "application/json", "evil<b>key"),
        ("", b"rate=5", "application/x-www-form-urlencoded", "application/x-www-form-urlencoded"),
        ("x-injected=1&x-injected=2", b"", "application/json", "x-injected"),
    ],
    ids=["typo", "markup in a key", "content type", "repeated unknown"],
)
async def test_an_admin_error_body_holds_no_client_input_and_its_log_line_names_it(
    stack: Stack, query: str, body: bytes, content_type: str, sent: str
) -> None:
    """SPEC: error bodies name no client input, a fixed reason and a request id that the log also carries.
    The log line with that id says what was at fault."""
    lb = stack.balancer
    code, answer = await post_raw(
        lb, PATH.format(id=stack.dead[0].id), body=body, content_type=content_type, query=query
    )
    assert code == 400 and sent not in json.dumps(answer), answer
    request_id = answer["request_id"]
    line = await _log_line_with(lb, request_id)
    assert sent in line and " 400 POST /pools/dead/backends/" in line, line


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("POST", "/pools/nope/backends/x/drain", 404), ("GET", "/no/such/page", 404), ("DELETE", "/status", 405)],
)
async def test_every_admin_error_answer_is_logged_with_its_request_id(
    stack: Stack, method: str, path: str, status: int
) -> None:
    """SPEC errors: an admin error answer carries a request id (header and body) that its log line also carries."""
    reply = await admin_request(stack.balancer, method, path)
    assert reply.status == status
    headers = {name.lower(): value for name, value in reply.headers.items()}
    assert headers.get("x-request-id") == reply.body["request_id"], reply.headers
    line = await _log_line_with(stack.balancer, reply.body["request_id"])
    assert f" {status} {method} {path}: " in line, line


async def test_a_refused_token_is_a_warning_in_the_log(stack: Stack) -> None:
    """Failed logins are what an operator looks for."""
    reply = await admin_request(stack.balancer, "POST", PATH.format(id=stack.dead[0].id), token="wrong-token")
    assert reply.status == 401
    line = await _log_line_with(stack.balancer, reply.body["request_id"])
    assert "WARNING" in line and "wrong-token" not in line, line


EXPECTATION = "ZQXJ-<b>input</b>"  # client input that must never be echoed


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/status"), ("GET", "/no/such/page"), ("DELETE", "/status"), ("POST", PATH.format(id="x"))],
    ids=["a route", "no route (404)", "wrong method (405)", "an action"],
)
async def test_an_expectation_other_than_100_continue_is_a_json_417_echoing_nothing(
    stack: Stack, method: str, path: str
) -> None:
    """SPEC: an `Expect` we cannot meet is answered like every admin error: a fixed reason and a request id that
    the log line carries, with the value it names.  aiohttp's own 417 was text/plain quoting it, and logged nothing."""
    lb = stack.balancer
    request = f"{method} {path} HTTP/1.1\r\nHost: admin\r\nExpect: {EXPECTATION}\r\nContent-Length: 0\r\n\r\n"
    answer = await raw_exchange(lb.admin_port, request.encode())
    assert answer is not None and answer.status == 417, answer
    assert (answer.get("content-type") or "").startswith("application/json"), answer.headers
    assert EXPECTATION not in answer.body.decode() and "ZQXJ" not in str(answer.headers), answer
    body = json.loads(answer.body)
    assert body["error"] == "Expect: only 100-continue is supported", body
    assert answer.get("x-request-id") == body["request_id"], answer.headers
    line = await _log_line_with(lb, body["request_id"])
    assert f" 417 {method} {path}: " in line and EXPECTATION in line, line


async def test_expect_100_continue_still_gets_its_interim_answer(stack: Stack) -> None:
    """RFC 9110 §10.1.1: a client that waits for `100 Continue` before its body gets it, then the action's answer."""
    lb = stack.balancer
    body = b'{"rate": "x"}'
    reader, writer = await open_raw(lb.admin_port)
    try:
        writer.write(
            f"POST {PATH.format(id=stack.dead[0].id)} HTTP/1.1\r\nHost: admin\r\nAuthorization: Bearer {lb.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n\r\n".encode()
        )
        interim = await read_response(reader, body=False)
        assert interim.status == 100, interim
        writer.write(body)
        final = await read_response(reader)
    finally:
        writer.close()
    assert final.status == 400 and "rate" in json.loads(final.body)["error"], final  # the body was read


async def _log_line_with(lb: Balancer, request_id: str) -> str:
    for _ in range(50):
        lines = [line for line in lb.log_text().splitlines() if request_id in line]
        if lines:
            return lines[0]
        await asyncio.sleep(0.05 * UNIT)
    raise AssertionError(f"request id {request_id} is in no log line:\n{lb.logs_tail()}")


async def test_enable_with_migration_parameters_is_refused(stack: Stack) -> None:
    """close_after means nothing to enable: refused rather than silently ignored."""
    code, answer = await post_raw(
        stack.balancer, f"/pools/dead/backends/{stack.dead[0].id}/enable", query="close_after=1s"
    )
    assert code == 400 and "enable" in answer["error"], answer


async def test_oversized_body_is_refused_without_500(stack: Stack) -> None:
    """A body far beyond any action's is refused (413) before it is read whole."""
    code, _ = await post_raw(stack.balancer, PATH.format(id=stack.dead[0].id), body=b" " * 1_000_000)
    assert code == 413


def test_a_body_declared_too_large_is_413_at_once_not_408_later(stack: Stack) -> None:
    """`Content-Length: 100000000000` and a few bytes: refused on what it declares, not after BODY_TIMEOUT."""
    lb = stack.balancer
    with socket.create_connection(("127.0.0.1", lb.admin_port), timeout=5 * UNIT) as conn:
        conn.sendall(
            f"POST {PATH.format(id=stack.dead[0].id)} HTTP/1.1\r\nHost: admin\r\n"
            f"Authorization: Bearer {lb.token}\r\nContent-Type: application/json\r\n"
            "Content-Length: 100000000000\r\n\r\n{}".encode()
        )
        started = time.monotonic()
        answer = conn.recv(200)
    assert answer.startswith(b"HTTP/1.1 413 "), answer
    assert time.monotonic() - started < 1.0 * UNIT


@pytest.mark.parametrize(
    ("method", "path", "expected"),
    [
        ("GET", "/pools/dead/backends/x/drain", 405),
        ("POST", "/nowhere", 404),
        ("GET", "/" + "a" * 5000, 404),
        ("POST", "/pools/%00/backends/%ff/drain", 404),
    ],
)
async def test_odd_paths_get_json_errors_not_500(stack: Stack, method: str, path: str, expected: int) -> None:
    """Unknown routes and methods are JSON errors with their own status."""
    reply = await admin_request(stack.balancer, method, path)
    assert reply.status == expected
    assert "error" in json.loads(reply.text)


async def test_admin_errors_name_nothing_internal(stack: Stack) -> None:
    """An unknown backend's 404 names neither the pools, backends nor addresses the balancer has."""
    lb = stack.balancer
    code, answer = await post_raw(lb, "/pools/gateways/backends/nope/drain")
    assert code == 404
    text = json.dumps(answer)
    for gateway in stack.gateways:
        assert gateway.id not in text and gateway.address not in text
    assert "Traceback" not in text


async def test_status_refuses_unknown_parameters(stack: Stack) -> None:
    """A parameter an endpoint does not take is a 400 naming it, not silently ignored."""
    reply = await admin_request(stack.balancer, "GET", "/status?verbose=1", token=None)
    assert reply.status == 400
    assert "unknown parameter" in reply.body["error"]


@pytest.mark.parametrize(
    "path", ["/healthz?nocache=1712", "/livez?x", "/readyz?now=1&now=2", "/metrics?name[]=lb_build_info"]
)
async def test_probes_and_metrics_ignore_a_query_string(stack: Stack, path: str) -> None:
    """A probe's cache-buster or a Prometheus job's `params:` must not make a healthy balancer look
    failed: these endpoints take no parameter, and a query changes nothing."""
    code, _, text = await get_raw(stack.balancer, path)
    assert code == 200, text[:200]
    if path.startswith("/metrics"):
        assert "lb_build_info" in text and "lb_config_reloads_total" in text


async def get_raw(lb: Balancer, path: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    reply = await admin_request(lb, "GET", path, headers=headers)
    return reply.status, reply.content_type, reply.text


async def test_the_dashboard_a_page_for_people_ignores_its_query_string(stack: Stack) -> None:
    """A link or a bookmark may carry `?utm_source=...`: the page still shows (it takes no parameter)."""
    code, content_type, _ = await get_raw(stack.balancer, "/?utm_source=chat")
    assert (code, content_type) == (200, "text/html")


MEGABYTE = "q" * (1024 * 1024)


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        (f"/lookup?token={MEGABYTE}", {}),
        (f"/pools/gateways/route?key={MEGABYTE}", {}),
        (f"/status?{MEGABYTE}=1", {}),
        ("/status", {"X-Padding": MEGABYTE[:100_000]}),
    ],
    ids=["1MB lookup token", "1MB route key", "1MB parameter name", "100KB header"],
)
async def test_oversized_request_heads_get_a_json_error_echoing_nothing(
    stack: Stack, path: str, headers: dict[str, str]
) -> None:
    """Refused before any handler runs, yet answered like every admin error: JSON, a fixed reason, a request id."""
    lb = stack.balancer
    lines_before = lb.log_lines()
    code, content_type, text = await get_raw(lb, path, headers)
    assert 400 <= code < 500 and content_type == "application/json", (code, text[:200])
    answer = json.loads(text)
    assert answer["error"] and answer["request_id"], answer
    assert "qqqq" not in text
    assert (await get_raw(lb, "/livez"))[0] == 200
    assert "Traceback" not in "\n".join(lb.log_text().splitlines()[lines_before:])


async def test_lookup_refuses_unknown_parameters(stack: Stack) -> None:
    """/lookup with a parameter it does not know (a typo) is a 400 naming the fault, not a silent answer."""
    code, _, text = await get_raw(stack.balancer, "/lookup?token=abc&tokne=abc")
    assert code == 400 and "unknown parameter" in json.loads(text)["error"], text


async def test_lookup_refuses_an_empty_pool_rather_than_searching_every_pool(stack: Stack) -> None:
    """/lookup?pool= (empty) is a 400, not a search of every pool."""
    code, _, text = await get_raw(stack.balancer, "/lookup?token=abc&pool=")
    assert code == 400 and "pool" in json.loads(text)["error"], text


@pytest.mark.parametrize(
    "path", ["/status?verbose=1", "/nowhere", "/lookup", "/pools/nope/route?key=1", "/pools/gateways/route?key=1"]
)
async def test_every_admin_error_carries_a_request_id(stack: Stack, path: str) -> None:
    """SPEC errors: every admin error body carries a request id (the log carries it too)."""
    code, _, text = await get_raw(stack.balancer, path)
    answer = json.loads(text)
    assert code >= 400 and isinstance(answer.get("request_id"), str) and answer["request_id"], answer


async def test_a_body_that_never_completes_is_a_408_not_a_held_handler(stack: Stack) -> None:
    """Content-Length 100, 10 bytes sent, then silence: a JSON 408 within a few seconds, the state unchanged."""
    lb = stack.balancer
    backend_id = stack.dead[0].id
    host, port = lb.admin_url("").split("//", 1)[1].rstrip("/").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST {PATH.format(id=backend_id)} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {lb.token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"rate\": 1".encode()
        )
        await writer.drain()
        async with asyncio.timeout(10 * UNIT):
            head = await reader.readuntil(b"\r\n\r\n")
            body = await reader.read(4096)
    finally:
        writer.close()
    assert head.startswith(b"HTTP/1.1 408"), head
    assert json.loads(body)["request_id"]
    assert find_backend(await status(lb), "dead", backend_id)["state"] != "draining"


def _flood_refused_body(host: str, port: int, path: str) -> tuple[bytes, float]:
    """POST a 1 TiB body without a token as fast as the balancer takes it, reading what comes back;
    returns the answer and how long until the balancer closed the connection."""
    sock = socket.create_connection((host, port), timeout=5 * UNIT)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {1 << 40}\r\n\r\n".encode())
    sock.setblocking(False)
    chunk = b"x" * 65536
    answer = b""
    started = time.monotonic()
    try:
        while time.monotonic() - started < 15 * UNIT:
            readable, writable, _ = select.select([sock], [sock], [], 0.5)
            if readable:
                data = sock.recv(65536)
                if not data:
                    break
                answer += data
            if writable:
                with contextlib.suppress(BlockingIOError):
                    sock.send(chunk)
    except OSError:  # a reset, or a closed pipe: the balancer has closed
        pass
    finally:
        sock.close()
    return answer, time.monotonic() - started


async def test_a_body_refused_unread_is_not_read_for_long(stack: Stack) -> None:
    """A POST without a token (401) that keeps sending its 1 TiB body: the connection is closed within
    about half a second, not after aiohttp's 10 s of reading and dropping gigabytes on the event loop
    that the data plane shares."""
    lb = stack.balancer
    host, port = lb.admin_url("").split("//", 1)[1].rstrip("/").rsplit(":", 1)
    answer, took = await asyncio.to_thread(
        _flood_refused_body, host, int(port), PATH.format(id=stack.dead[0].id)
    )
    assert took < 3.0 * UNIT, f"the refused body was read for {took:.1f}s"
    assert answer.startswith(b"HTTP/1.1 401"), answer[:100]  # read, not lost to a reset


def _closed_as_accepted(conns: list[socket.socket]) -> list[bool]:
    """Which of these connections the balancer closed without a byte (an idle one stays open and unreadable)."""
    ready, _, _ = select.select(conns, [], [], 0)

    def closed(conn: socket.socket) -> bool:
        try:
            return conn.recv(1) == b""
        except ConnectionResetError:
            return True

    return [conn in ready and closed(conn) for conn in conns]


def test_admin_connections_are_capped_per_address_and_others_still_get_in(tmp_path: Path) -> None:
    """A flood of idle admin connections from one address took every descriptor of the process; now the
    33rd from that address is closed as accepted, and another address (the kubelet, Prometheus) still
    gets its answer.  Closing the flood frees the address again."""
    lb = Balancer(lb_config(pools={"dead": [DeadBackend("dead-1")]}), tmp_path)
    lb.launch()
    flood: list[socket.socket] = []
    try:
        lb.wait_ready()
        for _ in range(40):
            conn = socket.socket()
            conn.bind(("127.0.0.5", 0))
            conn.connect(("127.0.0.1", lb.admin_port))
            flood.append(conn)
        time.sleep(0.5 * UNIT)
        closed = _closed_as_accepted(flood)
        assert closed == [False] * 32 + [True] * 8, closed
        assert http_get(lb.admin_url("/healthz"), timeout=5 * UNIT)[0] == 200  # from 127.0.0.1
        assert "closed as accepted: 32 admin connections open from that address" in lb.log_text()
        for conn in flood:
            conn.close()
        flood.clear()
        time.sleep(0.5 * UNIT)
        again = socket.create_connection(("127.0.0.1", lb.admin_port), source_address=("127.0.0.5", 0))
        flood.append(again)
        again.sendall(b"GET /livez HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert again.recv(100).startswith(b"HTTP/1.1 200"), "the address is let in again once its flood is gone"
        lb.assert_alive()
    finally:
        for conn in flood:
            conn.close()
        lb.stop()


def test_a_flood_from_many_addresses_past_the_whole_cap_still_lets_a_probe_in(tmp_path: Path) -> None:
    """20 addresses holding 32 idle admin connections each fill the 512 of the whole cap (16 did): a
    probe from another address takes the place of a connection of an address holding the most, and
    gets its answer.  Refused, the kubelet's liveness probe failed and the pod restarted."""
    lb = Balancer(lb_config(pools={"dead": [DeadBackend("dead-1")]}), tmp_path)
    lb.launch()
    flood: list[socket.socket] = []
    try:
        lb.wait_ready()
        for index in range(20 * 32):
            conn = socket.socket()
            conn.bind((f"127.0.6.{index % 20 + 1}", 0))  # 32 from each of 20 addresses, taking turns
            conn.connect(("127.0.0.1", lb.admin_port))
            flood.append(conn)
        time.sleep(0.5 * UNIT)
        open_now = len(flood) - sum(_closed_as_accepted(flood))
        assert open_now <= 512, f"{open_now} admin connections held"
        for _ in range(3):  # and again: each probe takes a flooder's place, never another probe's
            assert http_get(lb.admin_url("/livez"), timeout=5 * UNIT)[0] == 200  # from 127.0.0.1
        assert "512 admin connections open: one from 127.0.6." in lb.log_text()
        lb.assert_alive()
    finally:
        for conn in flood:
            conn.close()
        lb.stop()

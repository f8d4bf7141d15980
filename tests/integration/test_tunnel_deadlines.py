"""Every close the balancer starts has a deadline, and a dying backend is announced.

- A client that stops reading pauses its backend's stream, so a close frame may never find a frame
  boundary: under drain (`close_after`/`rate`) and under `timeouts.idle` the tunnel is then cut at TCP
  level within a bounded time, and counted as such (`lb_tunnel_closes_total{ended_with="tcp"}`).
- A client still taking the bytes of a long frame is not a stalled reader: the close waits for the
  frame's end (within SIGTERM's `timeouts.shutdown_grace`, or that long for a drain), then goes out.
- Backend loss (issue 11): a backend that dies between frames gets its client a close 1012; one that
  dies mid-frame, a TCP close (a close frame there would corrupt the stream).
- Until then, a stalled reader (of a tunnel or of a plain answer), or a stalled upload, holds a bounded
  amount of the balancer's memory: the peer's write buffer up to its high-water mark (64 KiB) and at
  most one read behind it (`lb.proxy.reading.READ_CHUNK`, 32 KiB).  Before reads were bounded, one
  read of up to 256 KiB landed whole in that buffer: 240-310 KiB per stalled connection, for as long
  as the client stayed.  The same holds over a TLS listener, whose TLS layer buffers on its own too.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import os
import signal
import socket
import struct
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.harness import HOST, UNIT
from tests.harness.clients import assert_echo, find_backend, recv_hello, status, ws_connect
from tests.harness.ops import (
    admin_post,
    launched,
    metric,
    metrics_text,
    paused,
    reload_with,
    set_state,
    signal_balancer,
    wait_close,
    wait_exit,
    wait_until,
)
from tests.harness.processes import Balancer, Gateway, Launcher, lb_certs, lb_config
from tests.harness.raw import (
    OP_BINARY,
    OP_CLOSE,
    RawWs,
    encode_frame,
    upgrade_request,
    wait_closed_by_peer,
    ws_key,
)
from tests.harness.recording import rss_kib
from tests.harness.scripted import (
    BACKEND_CLOSE,
    LAST_WORDS,
    PARTIAL,
    SLOW_FRAME_BYTES,
    SLOW_FRAME_SECONDS,
    TCP_HEALTH,
    ScriptedBackend,
    stalled_client,
    stalled_tls_client,
    stalled_tls_tunnel_upload,
    stalled_tls_upload,
    stalled_tunnel_upload,
    stalled_upload,
    start,
)
from tests.harness.tcp import ScriptedGateway, read_head, switch_protocols

CLOSE_DEADLINE = 2.0  # the product's bound on a close frame waiting for a frame boundary
CLOSE_LINGER = 2.0  # and on a client taking the close frame once sent
IDLE = 1.0
TUNNELS = 24  # stalled at once, for the memory each holds
BOUND_KIB = 160  # per stalled tunnel: 64 KiB + 32 KiB at most; measured about 70, and about 300 before
# Under TLS the TLS layer keeps a 64 KiB write buffer and 32 KiB of records read ahead besides; measured
# about 200 per stalled tunnel (740 before its limits were set) and 8-23 per idle one (asyncio: 261 before).
TLS_BOUND_KIB = 320
TLS_IDLE_BOUND_KIB = 64
# uvloop's TLS layer reads records 256 KiB at a time into a buffer of its own and queues one such read
# before it pauses reading, whatever its limits: about 630 per stalled upload (805 before; asyncio's, 190).
UVLOOP = os.environ.get("LB_TEST_EVENT_LOOP", "auto") != "asyncio" and importlib.util.find_spec("uvloop") is not None
TLS_UPLOAD_BOUND_KIB = 768 if UVLOOP else TLS_BOUND_KIB


@pytest.fixture
def scripted() -> Iterator[ScriptedBackend]:
    backend = ScriptedBackend()
    try:
        yield backend
    finally:
        backend.close()


async def metric_value(lb: Balancer, name: str, **labels: str) -> float:
    """A labelled counter of this balancer now; 0 until its first sample appears."""
    return metric(await metrics_text(lb), name, **labels) or 0.0


async def assert_cut(lb: Balancer, backend: ScriptedBackend, cause: str, started: float, bound: float) -> None:
    """The stalled tunnel ended within `bound` seconds of `started`, counted as a TCP-level close."""
    ended = await asyncio.to_thread(backend.ended.wait, bound + 5 * UNIT)
    assert ended, f"the stalled tunnel was never closed ({cause})"
    took = backend.ended_at - started
    assert took <= bound + 1.0 * UNIT, f"{cause}: closed {took:.2f}s after it was due, bound {bound:.2f}s"

    async def counted() -> bool:
        return await metric_value(lb, "lb_tunnel_closes_total", cause=cause, ended_with="tcp") == 1

    await wait_until(counted, what=f'lb_tunnel_closes_total{{cause="{cause}",ended_with="tcp"}} == 1')
    assert find_backend(await status(lb), "scripted", backend.id)["connections"] == 0


async def test_a_stalled_reader_under_drain_is_cut_at_tcp_level(launcher: Launcher, scripted: ScriptedBackend) -> None:
    """Drain with close_after=0: a client that does not read cannot hold the tunnel past the deadline."""
    lb = start(launcher, scripted)
    sock = await stalled_client(lb)
    try:
        assert await asyncio.to_thread(scripted.stalled.wait, 10 * UNIT), "the flood never stalled"
        started = time.monotonic()
        code, body, _ = await admin_post(
            lb, f"/pools/scripted/backends/{scripted.id}/drain", params={"close_after": "0s", "rate": "100"}
        )
        assert code == 200, body
        await assert_cut(lb, scripted, "drain", started, CLOSE_DEADLINE + CLOSE_LINGER)
        # Cut with a reset: a FIN would have queued behind what the kernel holds for this client, which
        # it would keep (FIN-WAIT-1) for as long as the client reads nothing.  Read now, what had reached
        # the client's kernel comes first, then the reset, never a clean end.
        assert await read_to_the_end(sock) == "reset"
    finally:
        sock.close()
    lb.assert_alive()


async def read_to_the_end(sock: socket.socket) -> str:
    """How a connection that stopped reading ends, once read: "reset" or "eof" (within 5 s)."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(5 * UNIT):
        while True:
            try:
                if not await loop.sock_recv(sock, 1 << 16):
                    return "eof"
            except ConnectionResetError:
                return "reset"


@pytest.mark.parametrize("how", ["drain", "sigterm"])
async def test_a_client_still_reading_a_long_frame_gets_its_end_then_the_close(
    launcher: Launcher, scripted: ScriptedBackend, how: str
) -> None:
    """A drain's 1012, or SIGTERM's 1001 with shutdown_grace to spare, asked for while the client is
    reading a frame that takes longer than the close's first deadline: the client gets the whole frame,
    then the close frame, instead of a TCP cut 2 s in.

    SIGTERM's closes go one per step of the grace, the last as it ends: two younger idle tunnels put
    this one's a third of the way in (2.7 s, mid-frame), with 5 s of the grace to spare after it."""
    lb = start(launcher, scripted, shutdown_grace="8s")
    assert lb.port is not None
    async with contextlib.AsyncExitStack() as younger, RawWs.connect(lb.port, "/slow-frame") as raw:
        if how == "sigterm":
            for _ in range(2):
                await younger.enter_async_context(RawWs.connect(lb.port, "/hold"))
        slow = asyncio.create_task(raw.recv_frame(within=SLOW_FRAME_SECONDS + 5 * UNIT))
        await asyncio.sleep(0.5)  # the frame is under way
        if how == "drain":
            code, body, _ = await admin_post(
                lb, f"/pools/scripted/backends/{scripted.id}/drain", params={"close_after": "0s", "rate": "100"}
            )
            assert code == 200, body
        else:
            signal_balancer(lb, signal.SIGTERM)
        try:
            frame = await slow
        except asyncio.IncompleteReadError as exc:
            raise AssertionError(f"cut after {len(exc.partial)} of {SLOW_FRAME_BYTES} payload bytes") from exc
        assert frame.opcode == OP_BINARY and len(frame.payload) == SLOW_FRAME_BYTES
        closing = await raw.recv_frame(within=5 * UNIT)
        assert closing.opcode == OP_CLOSE, closing
        assert struct.unpack("!H", closing.payload[:2])[0] == (1012 if how == "drain" else 1001)
        await raw.send(OP_CLOSE, closing.payload[:2])
    if how == "drain":

        async def counted() -> bool:
            return await metric_value(lb, "lb_tunnel_closes_total", cause="drain", ended_with="close_frame") == 1

        await wait_until(counted, what='lb_tunnel_closes_total{cause="drain",ended_with="close_frame"} == 1')
    else:
        assert await wait_exit(lb, 15 * UNIT) == 0


async def test_a_stalled_reader_times_out_idle(launcher: Launcher, scripted: ScriptedBackend) -> None:
    """timeouts.idle fires when bytes stop moving because the client stopped reading."""
    lb = start(launcher, scripted, idle=f"{int(IDLE * 1000)}ms")
    sock = await stalled_client(lb)
    try:
        assert await asyncio.to_thread(scripted.stalled.wait, 10 * UNIT), "the flood never stalled"
        started = time.monotonic()
        # Idle is noticed within 1.5 x idle of the last byte, then the close has its deadlines.
        await assert_cut(lb, scripted, "idle", started, 1.5 * IDLE + CLOSE_DEADLINE + CLOSE_LINGER)
    finally:
        sock.close()


async def test_a_quiet_reading_client_gets_1001_on_idle(launcher: Launcher, scripted: ScriptedBackend) -> None:
    """A tunnel with no traffic but a healthy client ends with a close frame, not a TCP cut."""
    lb = start(launcher, scripted, idle=f"{int(IDLE * 1000)}ms")
    async with aiohttp.ClientSession() as session:
        assert lb.port is not None
        async with session.ws_connect(f"ws://{HOST}:{lb.port}/quiet") as ws:
            closed = await wait_close(ws, 1.5 * IDLE + 5 * UNIT)
            assert closed.code == 1001, closed

    # The client's FIN is passed on; the tunnel ends (and is counted) once the backend hangs up too.
    async def counted() -> bool:
        return await metric_value(lb, "lb_tunnel_closes_total", cause="idle", ended_with="close_frame") == 1

    await wait_until(counted, what='lb_tunnel_closes_total{cause="idle",ended_with="close_frame"} == 1')


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_a_client_that_spoke_while_the_balancer_was_stalled_is_not_idle(
    launcher: Launcher, scripted: ScriptedBackend, event_loop: str
) -> None:
    """timeouts.idle (4 s) counts the client's silence, not the balancer's: stopped (SIGSTOP, a paused VM)
    for 4.4 s, with a frame from the client 2 s into the stop, the balancer reads that frame before it
    judges the tunnel idle.  Before, the first look after the stop came ahead of the read, and the client
    got 1001 'idle timeout' 2.4 s after it last spoke."""
    lb = start(launcher, scripted, event_loop=event_loop, idle="4s")
    assert lb.port is not None and lb.proc is not None
    async with RawWs.connect(lb.port, "/quiet") as ws:
        await ws.send(OP_BINARY, b"hi")
        await asyncio.sleep(1.2)  # a look (one a second) has seen it
        with paused(lb.proc.pid):
            await asyncio.sleep(2.0)
            await ws.send(OP_BINARY, b"still here")
            await asyncio.sleep(2.4)
        with pytest.raises(TimeoutError):
            frame = await ws.recv_frame(within=1.0)
            pytest.fail(f"closed right after the stop: {frame}")
    lb.assert_alive()


async def test_a_reload_that_shortens_idle_applies_to_a_silent_tunnel_at_once(
    launcher: Launcher, scripted: ScriptedBackend
) -> None:
    """`idle: 1h`, then a reload to 1 s: the silent tunnel gets its 1001 about a second later, not when
    the sweep that the old value put to sleep for half an hour wakes up."""
    lb = start(launcher, scripted, idle="1h")
    async with aiohttp.ClientSession() as session:
        assert lb.port is not None
        async with session.ws_connect(f"ws://{HOST}:{lb.port}/quiet") as ws:
            config = {**lb.config, "timeouts": {**lb.config["timeouts"], "idle": f"{int(IDLE * 1000)}ms"}}
            await reload_with(lb, config)
            closed = await wait_close(ws, 1.5 * IDLE + 5 * UNIT)
            assert closed.code == 1001, closed


async def test_after_the_backends_close_frame_the_balancer_sends_none_of_its_own(
    launcher: Launcher, scripted: ScriptedBackend
) -> None:
    """The backend began the close handshake (1000) and waits for the client's answer when the idle
    timeout comes: nothing may follow its close frame (RFC 6455 §5.5.1), so the client gets no 1001 after
    it, only the end of the connection once the close linger is over."""
    lb = start(launcher, scripted, idle=f"{int(IDLE * 1000)}ms")
    assert lb.port is not None
    reader, writer = await asyncio.open_connection(HOST, lb.port)
    try:
        writer.write(upgrade_request("/close-first", host=f"{HOST}:{lb.port}", key=ws_key()))
        async with asyncio.timeout(1.5 * IDLE + CLOSE_LINGER + 5 * UNIT):
            await reader.readuntil(b"\r\n\r\n")
            assert await reader.readexactly(len(BACKEND_CLOSE)) == BACKEND_CLOSE
            rest = await reader.read()  # until the balancer ends the connection
        assert rest == b"", f"bytes after the backend's close frame: {rest!r}"
    finally:
        writer.close()
    # The backend ended it, not the balancer: no balancer close is counted for the idle timeout.
    for ended_with in ("close_frame", "tcp"):
        assert await metric_value(lb, "lb_tunnel_closes_total", cause="idle", ended_with=ended_with) == 0


async def test_a_backend_that_dies_between_frames_gets_the_client_a_1012(
    launcher: Launcher, scripted: ScriptedBackend
) -> None:
    """The backend closes TCP after a whole frame, without a close frame: the client sees close 1012."""
    lb = start(launcher, scripted)
    assert lb.port is not None
    async with aiohttp.ClientSession() as session, session.ws_connect(f"ws://{HOST}:{lb.port}/die") as ws:
        msg = await ws.receive(timeout=5 * UNIT)
        assert msg.type is aiohttp.WSMsgType.TEXT and msg.data == LAST_WORDS[2:].decode()
        closed = await wait_close(ws, 5 * UNIT)
        assert closed.code == 1012, closed
    assert await metric_value(lb, "lb_tunnel_closes_total", cause="backend_lost", ended_with="close_frame") == 1


POLICY_CLOSE = b"\x88\x08\x03\xf0policy"  # close 1008 "policy", unmasked (server to client)


class _CloseAndHangUp(ScriptedGateway):
    """A gateway that ends a session with its close frame and hangs up at once, without waiting for the
    client's answer: what the client sent meanwhile is unread, so its kernel resets the connection."""

    id = "closer"

    def __init__(self) -> None:
        self.switched = threading.Event()
        self.close_now = threading.Event()
        self.closed = threading.Event()
        super().__init__()

    def script(self, conn: socket.socket, head: bytes) -> None:
        switch_protocols(conn, head)
        self.switched.set()
        if not self.close_now.wait(10 * UNIT):
            return
        conn.sendall(POLICY_CLOSE)
        self.closed.set()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_a_backends_close_frame_ahead_of_its_reset_reaches_the_client(
    launcher: Launcher, event_loop: str
) -> None:
    """SPEC: close codes and reasons pass through unchanged.  A gateway that sends its close frame (1008)
    and hangs up with the client's frames unread resets the connection; when the balancer's write of the
    client's next frame meets that reset before it has read the close frame (the client's bytes came
    first, as on a busy loop), the client still gets the gateway's 1008 and reason, not a 1012 "backend
    went away".  The balancer is stopped (SIGSTOP) while both arrive, so that its loop sees them in that
    order."""
    backend = _CloseAndHangUp()
    try:
        lb = launcher.balancer(lb_config(
            pools={"p": [backend]}, health=TCP_HEALTH, overrides={"runtime": {"event_loop": event_loop}}
        ))
        assert lb.port is not None and lb.proc is not None
        async with RawWs.connect(lb.port) as ws:
            await ws.send(OP_BINARY, b"x" * 1000)  # reaches the gateway, which does not read it
            await asyncio.sleep(0.3)
            with paused(lb.proc.pid):
                await ws.send(OP_BINARY, b"y" * 1000)  # waiting for the balancer first
                await asyncio.sleep(0.2)
                backend.close_now.set()
                assert await asyncio.to_thread(backend.closed.wait, 5 * UNIT)
                await asyncio.sleep(0.3)  # the close frame, then the reset, wait behind the client's frame
            got = await wait_closed_by_peer(ws.reader, 5 * UNIT)
            assert got == POLICY_CLOSE, got
        lb.assert_alive()
    finally:
        backend.close()


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_a_backends_close_frame_from_a_stall_goes_ahead_of_the_stops_1001(
    launcher: Launcher, event_loop: str
) -> None:
    """SIGTERM with `shutdown_grace: 2s`: the lone tunnel's 1001 is due 2 s in.  The balancer is stopped
    (SIGSTOP, a paused VM) from 0.5 s to 3 s, and the gateway ends the session (1008 and its reason) at
    about 0.7 s: the client gets the gateway's close, read before the 1001 that fell due in the stall."""
    backend = _CloseAndHangUp()
    try:
        lb = launcher.balancer(lb_config(
            pools={"p": [backend]}, health=TCP_HEALTH,
            overrides={"runtime": {"event_loop": event_loop}, "timeouts": {"shutdown_grace": "2s"}},
        ))
        assert lb.port is not None and lb.proc is not None
        async with RawWs.connect(lb.port) as ws:
            signal_balancer(lb, signal.SIGTERM)
            await asyncio.sleep(0.5)
            with paused(lb.proc.pid):
                await asyncio.sleep(0.2)
                backend.close_now.set()
                assert await asyncio.to_thread(backend.closed.wait, 5 * UNIT)
                await asyncio.sleep(2.3)  # past the 1001's time
            got = await wait_closed_by_peer(ws.reader, 5 * UNIT)
            assert got == POLICY_CLOSE, got
    finally:
        backend.close()


async def test_a_backends_close_frame_from_a_stall_goes_ahead_of_a_drains_1012(launcher: Launcher) -> None:
    """A drain at one close every 2 s of a gateway's two tunnels: one client gets its 1012 at once, the
    other's is due 2 s later.  The balancer is stopped from 0.5 s to 3 s, and the gateway ends its
    sessions (1008 and its reason) at about 0.7 s: the second client gets the gateway's close, read
    before the 1012 that fell due in the stall."""
    backend = _CloseAndHangUp()
    try:
        lb = launcher.balancer(lb_config(pools={"p": [backend]}, health=TCP_HEALTH))
        assert lb.port is not None and lb.proc is not None
        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(RawWs.connect(lb.port)) for _ in range(2)]
            await set_state(lb, backend.id, "drain", pool="p", params={"close_after": "0s", "rate": "0.5"})
            firsts = [asyncio.ensure_future(ws.reader.read(65536)) for ws in clients]
            done, _ = await asyncio.wait(firsts, timeout=5 * UNIT, return_when=asyncio.FIRST_COMPLETED)
            assert len(done) == 1, "one client gets its 1012 at once"
            (first,) = done
            assert first.result().startswith(b"\x88"), first.result()  # a close frame: 1012
            await asyncio.sleep(0.5)
            with paused(lb.proc.pid):
                await asyncio.sleep(0.2)
                backend.close_now.set()
                await asyncio.sleep(2.3)  # past the second 1012's time
            (second,) = (read for read in firsts if read is not first)
            got = b""
            with contextlib.suppress(ConnectionError):
                got = await asyncio.wait_for(second, 5 * UNIT)
            got += await wait_closed_by_peer(clients[firsts.index(second)].reader, 5 * UNIT)
            assert got == POLICY_CLOSE, got
    finally:
        backend.close()


class _Streamer(ScriptedGateway):
    """A gateway that streams 1 KiB frames without pause and records what its client sends."""

    id = "streamer"

    def __init__(self) -> None:
        self.received = bytearray()
        super().__init__()

    def script(self, conn: socket.socket, head: bytes) -> None:
        switch_protocols(conn, head)
        conn.settimeout(0.01)
        deadline = time.monotonic() + 10 * UNIT
        while time.monotonic() < deadline and not self.server.stop.is_set():
            with contextlib.suppress(TimeoutError):
                conn.sendall(b"\x82\x7e\x04\x00" + b"s" * 1024)
            try:
                data = conn.recv(65536)
            except TimeoutError:
                continue
            if not data:
                break
            self.received += data


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
async def test_a_clients_close_frame_ahead_of_its_reset_reaches_the_backend(
    launcher: Launcher, event_loop: str
) -> None:
    """Both ways: a client that sends its close frame (1000 "bye") and closes at once, the gateway's frames
    unread, resets the connection; when the balancer's write of the next frame to it meets that reset
    before it has read the close frame, the gateway still gets the client's close frame (a player who
    left, not one whose connection dropped).  SIGSTOP orders the events as a busy loop would."""
    backend = _Streamer()
    try:
        lb = launcher.balancer(lb_config(
            pools={"p": [backend]}, health=TCP_HEALTH, overrides={"runtime": {"event_loop": event_loop}}
        ))
        assert lb.port is not None and lb.proc is not None
        sock = socket.create_connection((HOST, lb.port), timeout=5 * UNIT)
        try:
            sock.sendall(upgrade_request("/ws", host=f"{HOST}:{lb.port}", key=ws_key()))
            head = read_head(sock)  # the 101 alone: what follows stays unread
            assert head is not None and head.startswith(b"HTTP/1.1 101"), head
            await asyncio.sleep(0.3)  # frames stream in, and the client reads no more of them
            with paused(lb.proc.pid):
                try:
                    await asyncio.sleep(0.2)  # the gateway's next frames wait for the balancer first
                    sock.sendall(encode_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye"))
                    await asyncio.sleep(0.1)
                finally:
                    sock.close()  # with frames unread: a reset, behind the close frame
                    await asyncio.sleep(0.2)
        finally:
            sock.close()
        assert await asyncio.to_thread(backend.ended.wait, 15 * UNIT)
        received = bytes(backend.received)
        assert received[:2] == b"\x88\x85", received[:40]  # a masked close frame with 5 bytes of payload
        mask = received[2:6]
        assert bytes(b ^ mask[i % 4] for i, b in enumerate(received[6:11])) == struct.pack("!H", 1000) + b"bye"
        lb.assert_alive()
    finally:
        backend.close()


async def test_a_backend_that_hangs_up_after_the_clients_close_frame_is_an_ordinary_end(
    launcher: Launcher, scripted: ScriptedBackend
) -> None:
    """The client sends close 1000; the backend answers by closing TCP, without a close frame: the client
    gets the end of the connection, not a 1012 "backend went away", and no backend_lost is counted."""
    lb = start(launcher, scripted)
    assert lb.port is not None
    async with RawWs.connect(lb.port, "/hang-up-on-close") as raw:
        await raw.send(OP_CLOSE, struct.pack("!H", 1000) + b"user left")
        async with asyncio.timeout(5 * UNIT):
            rest = await raw.reader.read()  # until EOF
        assert rest == b"", f"after the client's close: {rest!r}"
    await asyncio.sleep(0.3)  # the tunnel's close is counted as it ends, with the connection
    for ended_with in ("close_frame", "tcp"):
        assert await metric_value(lb, "lb_tunnel_closes_total", cause="backend_lost", ended_with=ended_with) == 0
    assert find_backend(await status(lb), "scripted", scripted.id)["connections"] == 0


async def test_a_backend_that_dies_mid_frame_gets_a_tcp_close(launcher: Launcher, scripted: ScriptedBackend) -> None:
    """Mid-frame, a close frame would corrupt the stream: the client gets the partial bytes, then EOF."""
    lb = start(launcher, scripted)
    assert lb.port is not None
    reader, writer = await asyncio.open_connection(HOST, lb.port)
    try:
        writer.write(upgrade_request("/die-mid-frame", host=f"{HOST}:{lb.port}", key=ws_key()))
        async with asyncio.timeout(5 * UNIT):
            await reader.readuntil(b"\r\n\r\n")
            rest = await reader.read()  # until EOF
        assert rest == PARTIAL, rest
    finally:
        writer.close()
    assert await metric_value(lb, "lb_tunnel_closes_total", cause="backend_lost", ended_with="tcp") == 1


async def test_a_killed_gateway_gets_its_clients_a_1012(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The reconnect-storm story: SIGKILL a demo gateway; its clients get 1012, not an abnormal 1006."""
    with launched(tmp_path_factory, "killed-gateway") as launcher:
        gateway: Gateway = launcher.gateways(1, prefix="doomed")[0]
        config = lb_config(pools={"gateways": [gateway]}, overrides={"limits": {"handshake_rate_per_ip": 0}})
        lb = launcher.balancer(config)
        lb.wait_states({("gateways", gateway.id): "up"})
        async with ws_connect(lb.ws_url()) as (ws, _):
            await recv_hello(ws)
            await assert_echo(ws, "before the crash")
            gateway.kill()
            closed = await wait_close(ws, 5 * UNIT)
            assert closed.code == 1012, closed


async def settled(backend: ScriptedBackend) -> None:
    """Until the backend has sent nothing more for a while: every tunnel is stalled."""
    last, since = -1, time.monotonic()
    deadline = time.monotonic() + 20 * UNIT
    while time.monotonic() - since < 0.5:
        assert time.monotonic() < deadline, "the flood never stalled"
        if backend.frames_sent != last:
            last, since = backend.frames_sent, time.monotonic()
        await asyncio.sleep(0.05)


STALLS: dict[str, Callable[[Balancer, Path], Awaitable[socket.socket]]] = {
    "tunnel": lambda lb, ca: stalled_client(lb, "/flood"),
    "plain answer": lambda lb, ca: stalled_client(lb, "/flood-http"),
    "upload": lambda lb, ca: stalled_upload(lb),  # the other direction: to a backend that stopped reading
    "TLS tunnel": stalled_tls_client,
    "TLS upload": stalled_tls_upload,
    "TLS idle": lambda lb, ca: stalled_tls_client(lb, ca, "/hold"),  # not stalled: what any TLS tunnel holds
}
BOUNDS_KIB = {"TLS tunnel": TLS_BOUND_KIB, "TLS upload": TLS_UPLOAD_BOUND_KIB, "TLS idle": TLS_IDLE_BOUND_KIB}


@pytest.mark.parametrize("kind", list(STALLS))
async def test_stalled_connections_hold_a_bounded_amount_each(
    launcher: Launcher, scripted: ScriptedBackend, kind: str, tmp_path: Path
) -> None:
    """Each stalled connection (tunnel, upload or idle, plain or TLS) costs the balancer a bounded amount of memory."""
    certs = lb_certs(tmp_path / "certs")
    # A backend that stops reading an upload fails it after backend_connect: not while it is measured.
    lb = start(launcher, scripted, tls=(certs / "server.crt", certs / "server.key"), backend_connect="30s")
    assert lb.proc is not None
    ca = certs / "ca.crt"
    stall = STALLS[kind]
    clients: list[socket.socket] = [await stall(lb, ca)]  # the first one's allocations are not per connection
    try:
        await settled(scripted)
        before = rss_kib(lb.proc.pid)
        clients += await asyncio.gather(*(stall(lb, ca) for _ in range(TUNNELS)))
        await settled(scripted)
        per_connection = (rss_kib(lb.proc.pid) - before) / TUNNELS
        bound = BOUNDS_KIB.get(kind, BOUND_KIB)
        assert per_connection < bound, f"{per_connection:.0f} KiB of the balancer per stalled {kind}, bound {bound}"
        lb.assert_alive()
    finally:
        for sock in clients:
            sock.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0), as a phone that loses its network mid-tunnel does to us."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("end", ["client reset", "cut by a drain"])
async def test_a_tls_tunnel_that_ends_abruptly_is_released(
    launcher: Launcher, scripted: ScriptedBackend, tmp_path: Path, event_loop: str, end: str
) -> None:
    """A TLS tunnel whose client resets, or that the balancer cuts (a drain's close_after passing on a
    client that reads nothing), is gone from the counts at once and logs no traceback.  (On asyncio's
    TLS transport a second close() drops its TLS layer: the flush check then raised, and the tunnel
    kept its backend connection and its place in limits.max_connections for good.)"""
    certs = lb_certs(tmp_path / "certs")
    lb = start(launcher, scripted, tls=(certs / "server.crt", certs / "server.key"), event_loop=event_loop)
    if end == "client reset":
        sock = await stalled_tls_client(lb, certs / "ca.crt", "/hold")
        await asyncio.to_thread(_reset, sock)
    else:
        sock = await stalled_tls_client(lb, certs / "ca.crt")
        await settled(scripted)
        code, _, _ = await admin_post(
            lb, f"/pools/scripted/backends/{scripted.id}/drain", params={"close_after": "0s", "rate": "100"}
        )
        assert code == 200
    try:

        async def released() -> bool:
            data = await status(lb)
            return data["client_connections"] == 0 and find_backend(data, "scripted", scripted.id)["connections"] == 0

        await wait_until(released, what="the tunnel released", within=(CLOSE_DEADLINE + 3.0) * UNIT)
    finally:
        sock.close()
    assert "Traceback" not in lb.log_text(), lb.logs_tail(30)


async def let_go(lb: Balancer, backend: ScriptedBackend) -> bool:
    """No tunnel and no client connection left, and none counted to the scripted backend."""
    document = await status(lb)
    return (document["tunnels"], document["client_connections"]) == (0, 0) and (
        find_backend(document, "scripted", backend.id)["connections"] == 0
    )


UPLOADS: dict[str, Callable[[Balancer, Path], Awaitable[socket.socket]]] = {
    "plain": lambda lb, ca: stalled_tunnel_upload(lb),
    "TLS": stalled_tls_tunnel_upload,
}


@pytest.mark.parametrize("kind", list(UPLOADS))
async def test_a_client_that_resets_an_upload_its_gateway_stopped_reading_is_let_go(
    launcher: Launcher, scripted: ScriptedBackend, kind: str, tmp_path: Path
) -> None:
    """A gateway that stops reading a tunnel pauses its client (backpressure), and a paused client's
    RST is not read: the balancer asks the kernel about it while the pause lasts, so the tunnel, the
    client's place in limits.max_connections and the gateway's count go within seconds, not when the
    gateway reads again (with timeouts.idle at 0, never)."""
    certs = lb_certs(tmp_path / "certs")
    lb = start(launcher, scripted, tls=(certs / "server.crt", certs / "server.key"))
    client = await UPLOADS[kind](lb, certs / "ca.crt")
    try:
        assert scripted.stalled.is_set()
        document = await status(lb)
        assert (document["tunnels"], find_backend(document, "scripted", scripted.id)["connections"]) == (1, 1)
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        client.close()  # with unread data and linger 0: an RST
    await wait_until(lambda: let_go(lb, scripted), within=6 * UNIT, what="the reset client's tunnel closed")
    lb.assert_alive()


async def test_a_gateway_that_resets_behind_a_client_that_stopped_reading_is_let_go(
    launcher: Launcher, scripted: ScriptedBackend
) -> None:
    """A client that stops reading pauses its gateway (backpressure), and a paused gateway's RST is not
    read: the balancer asks the kernel about it while the pause lasts, so the tunnel, the client's place
    in limits.max_connections and the gateway's count go within seconds, not when the client reads again
    (with timeouts.idle at 0, never)."""
    lb = start(launcher, scripted)
    client = await stalled_client(lb, "/flood-then-reset")
    try:
        assert await asyncio.to_thread(scripted.ended.wait, 10 * UNIT), "the flood never stalled"
        await wait_until(lambda: let_go(lb, scripted), within=6 * UNIT, what="the reset gateway's tunnel closed")
        assert metric(await metrics_text(lb), "lb_tunnel_closes_total", cause="backend_lost", ended_with="tcp") == 1
    finally:
        client.close()
    lb.assert_alive()


def _through_balancer(launcher: Launcher, backend: ScriptedGateway) -> tuple[Balancer, socket.socket]:
    """A balancer in front of `backend` alone (health by TCP connect), and a raw client upgraded through
    it (`_upgraded`)."""
    lb = launcher.balancer(lb_config(pools={"p": [backend]}, health=TCP_HEALTH))
    assert lb.port is not None
    return lb, _upgraded(lb.port)


def _upgraded(port: int) -> socket.socket:
    """A raw client socket through the balancer on `port`, upgraded: its 101 read, nothing after it."""
    sock = socket.create_connection((HOST, port), timeout=20 * UNIT)
    try:
        sock.sendall(upgrade_request("/ws", host=f"{HOST}:{port}", key=ws_key()))
        head = read_head(sock)
        assert head is not None and head.startswith(b"HTTP/1.1 101"), head
    except BaseException:
        sock.close()
        raise
    return sock


class _SlowReader(ScriptedGateway):
    """A gateway that reads its client's frames slowly for a while (a busy game server), then fast, and
    records all of them."""

    id = "slow-reader"

    def __init__(self, slow_for: float) -> None:
        self.received = bytearray()
        self.slow_for = slow_for
        super().__init__()

    def script(self, conn: socket.socket, head: bytes) -> None:
        switch_protocols(conn, head)
        slow_until = time.monotonic() + self.slow_for
        while True:
            slow = time.monotonic() < slow_until
            data = conn.recv(2048 if slow else 65536)
            if not data:
                break
            self.received += data
            if slow and not self.server.pause(0.05):
                break


async def test_a_clients_upload_and_fin_reach_a_backend_that_reads_slowly(launcher: Launcher) -> None:
    """A client that sends a large message, its close frame and its FIN at once, to a gateway that reads
    slowly but reads: all of it reaches the gateway, FIN last.  The balancer looks at a client paused
    behind a full backend every PAUSED_PEER_LOOK (2 s), to let a wedged backend's gone client go; a backend
    that took bytes since the last look is not wedged, and its client's bytes are still on their way.  (6 MB:
    more than the kernel's buffers on the way hold, so the balancer's own stays full; uvloop, whose transport
    fills it, shows it; asyncio's did not.)"""
    backend = _SlowReader(slow_for=5.0)
    try:
        lb, sock = _through_balancer(launcher, backend)  # the 101 alone read: what follows stays unread
        try:
            message = encode_frame(OP_BINARY, b"u" * 6_000_000)
            close = encode_frame(OP_CLOSE, struct.pack("!H", 1000) + b"bye")
            await asyncio.to_thread(sock.sendall, message + close)
            sock.shutdown(socket.SHUT_WR)
            assert await asyncio.to_thread(backend.ended.wait, 30 * UNIT)
            received = bytes(backend.received)
            assert len(received) == len(message) + len(close)  # before: about 1 MB of it, then a TCP cut
            assert received[-len(close):] == close  # the close frame, last
        finally:
            sock.close()
        lb.assert_alive()
    finally:
        backend.close()


class _SlowReaderThatPings(_SlowReader):
    """A `_SlowReader` that pings its client every 200 ms, as gateways do, and says how its connection
    ended: "eof", or the error a read or a ping met."""

    id = "slow-pinger"

    def __init__(self, slow_for: float) -> None:
        self.how_it_ended = "?"
        super().__init__(slow_for)

    def script(self, conn: socket.socket, head: bytes) -> None:
        switch_protocols(conn, head)
        start = time.monotonic()
        next_ping = start
        conn.settimeout(0.05)
        while time.monotonic() < start + 30 * UNIT:
            now = time.monotonic()
            if now >= next_ping:
                next_ping = now + 0.2
                try:
                    conn.sendall(b"\x89\x00")  # a ping, empty
                except OSError as exc:
                    self.how_it_ended = f"ping: {type(exc).__name__}"
                    return
            slow = now < start + self.slow_for
            try:
                data = conn.recv(2048 if slow else 65536)
            except TimeoutError:
                continue
            except OSError as exc:
                self.how_it_ended = f"read: {type(exc).__name__}"
                return
            if not data:
                self.how_it_ended = "eof"
                return
            self.received += data
            if slow and not self.server.pause(0.05):
                return


async def test_a_message_then_a_fin_without_a_close_frame_reaches_a_slow_pinging_backend_whole(
    launcher: Launcher,
) -> None:
    """A killed app's last message and FIN (no close frame), to a gateway that reads slowly and pings:
    the gateway gets all of the message, then EOF.  Closed at the FIN with the message still queued in the
    kernel, the balancer's socket answered the next ping with a reset and the kernel dropped the rest
    (10 KB of 3 MB arrived, then ECONNRESET: the review of 1acd7b0); the FIN waits to be passed on."""
    backend = _SlowReaderThatPings(slow_for=0.5)
    try:
        lb, sock = _through_balancer(launcher, backend)
        try:
            message = encode_frame(OP_BINARY, b"u" * 3_000_000)
            await asyncio.to_thread(sock.sendall, message)
            sock.shutdown(socket.SHUT_WR)  # its FIN, and no close frame
            assert await asyncio.to_thread(backend.ended.wait, 30 * UNIT)
            assert (len(backend.received), backend.how_it_ended) == (len(message), "eof")
        finally:
            sock.close()
        lb.assert_alive()
    finally:
        backend.close()


class _Lingerer(ScriptedGateway):
    """A gateway that says hello, then keeps its connection open for `stays` seconds after its client's
    EOF, as one slow to notice would; it records when that EOF came and whether it was a reset."""

    id = "lingerer"

    def __init__(self, stays: float) -> None:
        self.stays = stays
        self.eof_at = 0.0
        self.how_it_ended = "?"
        super().__init__()

    def script(self, conn: socket.socket, head: bytes) -> None:
        switch_protocols(conn, head)
        conn.sendall(b"\x81\x05hello")
        try:
            while conn.recv(65536):
                pass
            self.how_it_ended = "eof"
        except OSError as exc:
            self.how_it_ended = f"read: {type(exc).__name__}"
        self.eof_at = time.monotonic()
        self.server.pause(self.stays)


async def test_a_hang_up_without_a_close_frame_lets_the_backend_go_at_once(launcher: Launcher) -> None:
    """A client that reads its hello and hangs up with a FIN and no close frame (a killed app; the
    benchmark's handshake client): every byte it sent has reached the gateway, so the tunnel ends at
    the FIN.  The gateway reads a clean EOF, and the balancer counts no tunnel while the gateway stays
    (before, the FIN was passed on and the tunnel waited up to CLOSE_LINGER, 2 s, for the gateway)."""
    backend = _Lingerer(stays=3.0)
    try:
        lb, sock = _through_balancer(launcher, backend)
        try:
            assert await asyncio.to_thread(sock.recv, 7) == b"\x81\x05hello"
        finally:
            sock.close()  # a FIN: nothing unread
        closed = time.monotonic()
        await wait_until(lambda: backend.eof_at > 0, within=5 * UNIT, what="the gateway's EOF")
        assert backend.how_it_ended == "eof" and backend.eof_at - closed < 1.0

        async def let_go() -> bool:
            return find_backend(await status(lb), "p", backend.id)["connections"] == 0

        await wait_until(let_go, within=1.0, what="the tunnel gone while the gateway still stays")
        assert time.monotonic() < backend.eof_at + backend.stays
        lb.assert_alive()
    finally:
        backend.close()

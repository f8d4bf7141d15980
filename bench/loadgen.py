"""The load generator: `python -m bench.loadgen --spec JSON` runs one scenario and prints one JSON line.

Scenarios (each: open the connections, warm up, then one measured window):

- `echo`      N connections ping-pong one `payload`-byte message each (one in flight per connection);
- `stream`    N connections pipeline `payload`-byte messages, `in_flight` frames outstanding each;
- `handshake` N workers loop: fresh connection, upgrade, read the hello, close; with `check_cookie`
              each worker sends back the cookie its first handshake got (and we count re-issues and
              changes of server, which should both be zero);
- with `turns`, any of those three through each turn's proxy in turn, `phase` seconds at a time
  (`in_turns` says why; echo and stream open N connections to each and rest the others'), one
  result per turn;
- `idle`      open N tunnels (through `concurrency` openers), wait `settle`, hold: RSS before/after.

Cheap per message, or the generator and not the proxy is what gets measured: raw asyncio
Protocols (uvloop when installed), frames built once, echoes counted by size (an echo of an
n-byte payload is exactly `server_frame_size(n)` bytes) without parsing, no task or queue per
message.  Proxy CPU (/proc/PID/stat) and the generator's own CPU are sampled here, right at
the edges of the measured window.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import itertools
import json
import os
import socket
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any, cast

from bench.procs import cpu_busy, cpu_seconds, cpu_times, rss_kib
from bench.wire import HEAD_END, client_frame, client_request, first_frame, server_frame_size, set_cookies, status_code

IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # linux/in.h
HANDSHAKE_TIMEOUT = 10.0
PATH = "/ws"


@dataclass(frozen=True, slots=True)
class Turn:
    """One proxy of a handshake window that takes turns (`Spec.turns`): its name, addresses and processes."""

    name: str
    targets: tuple[tuple[str, int], ...]
    proxy_pids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Spec:
    scenario: str                           # echo | stream | handshake | idle
    targets: tuple[tuple[str, int], ...]    # connections go round robin over these
    connections: int
    payload: int = 64
    warmup: float = 1.0
    window: float = 5.0
    check_cookie: bool = False
    source_ips: tuple[str, ...] = ()        # bind client sockets to these in turn (idle, handshake)
    proxy_pids: tuple[int, ...] = ()        # sampled for CPU and RSS
    load_pids: tuple[int, ...] = ()         # backends: their CPU is reported with ours
    in_flight: int = 64                     # stream: frames outstanding per connection
    batch: int = 16                         # stream: frames per write
    concurrency: int = 200                  # idle: connections being opened at once
    settle: float = 1.0                     # idle: wait before the second RSS sample
    turns: tuple[Turn, ...] = ()            # echo, stream, handshake: proxies taken in turn (`targets` unused)
    phase: float = 0.5                      # with turns: seconds of one turn at a time (more than 0)

    @classmethod
    def from_json(cls, text: str) -> Spec:
        raw: dict[str, Any] = json.loads(text)
        for key in ("source_ips", "proxy_pids", "load_pids"):
            raw[key] = tuple(raw.get(key, ()))
        raw["targets"] = _addresses(raw["targets"])
        raw["turns"] = tuple(Turn(str(t["name"]), _addresses(t["targets"]), tuple(int(pid) for pid in t["proxy_pids"]))
                             for t in raw.get("turns", ()))
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


def _addresses(pairs: Sequence[Sequence[Any]]) -> tuple[tuple[str, int], ...]:
    return tuple((str(host), int(port)) for host, port in pairs)


@dataclass(slots=True)
class Stats:
    """What goes wrong, whichever turn it is."""

    closing: bool = False      # we are hanging up ourselves: a lost connection is no error
    errors: Counter[str] = field(default_factory=Counter)


STATS = Stats()


@dataclass(slots=True)
class TurnCounts:
    """What one turn's connections came to so far (a window reads the difference at its edges)."""

    count: int = 0             # messages echoed (echo, stream) or handshakes made (begun in its phases)
    cookies_issued: int = 0    # handshakes whose 101 carried a Set-Cookie
    server_changes: int = 0    # check_cookie: a handshake that reached another server than the first


@dataclass(slots=True)
class Sample:
    """The load side's CPU and each core's, at one edge of a phase."""

    at: float
    load_cpu: float
    cpus: dict[str, tuple[int, int]]


def sample(spec: Spec) -> Sample:
    return Sample(time.monotonic(), cpu_seconds((os.getpid(), *spec.load_pids)), cpu_times())


@dataclass(slots=True)
class TurnPhases:
    """One turn's measured phases, summed: their seconds, the load side's CPU, each core's jiffies."""

    seconds: float = 0.0
    load_cpu: float = 0.0
    jiffies: dict[str, tuple[int, int]] = field(default_factory=dict)  # core: (busy, total)

    def add(self, start: Sample, end: Sample) -> None:
        self.seconds += end.at - start.at
        self.load_cpu += end.load_cpu - start.load_cpu
        for core, (busy, total) in end.cpus.items():
            busy0, total0 = start.cpus.get(core, (busy, total))
            had_busy, had_total = self.jiffies.get(core, (0, 0))
            self.jiffies[core] = (had_busy + busy - busy0, had_total + total - total0)


# -- protocols ------------------------------------------------------------------------------------


class WsClient(asyncio.Protocol):
    """Sends the upgrade, reads the 101 and the backend's hello, then hands over to `opened`."""

    __slots__ = ("buffer", "cookies", "done", "ready", "request", "server_id", "transport")

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.ready = False
        self.cookies: list[str] = []
        self.server_id = b""
        self.done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(self.request)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            STATS.errors["closed before hello" if not self.ready else "lost"] += 1
            self.done.set_result(False)
        elif self.ready and not STATS.closing and not isinstance(self, HandshakeClient):
            STATS.errors["lost during run"] += 1
        self.transport = None

    def data_received(self, data: bytes) -> None:
        # Subclasses check `ready` first and only come here during the handshake.
        self.buffer += data
        end = self.buffer.find(HEAD_END)
        if end < 0:
            return
        head = bytes(self.buffer[:end])
        status = status_code(head)
        if status != 101:
            STATS.errors[f"HTTP {status}"] += 1
            self._fail()
            return
        frame = first_frame(self.buffer, end + len(HEAD_END))
        if frame is None:
            return
        size, payload = frame
        self.cookies = set_cookies(head)
        marker = payload.find(b'"server_id":')
        self.server_id = payload[marker + 12 :].strip(b'"} ') if marker >= 0 else b""
        rest = bytes(self.buffer[end + len(HEAD_END) + size :])
        self.buffer = bytearray()
        self.ready = True
        if not self.done.done():
            self.done.set_result(True)
        self.opened(rest)

    def _fail(self) -> None:
        if not self.done.done():
            self.done.set_result(False)
        if self.transport is not None:
            self.transport.abort()

    def opened(self, rest: bytes) -> None:
        """The tunnel is up and the hello read; `rest` is what came after it."""


class EchoClient(WsClient):
    """Ping-pong: the next message goes out when the previous echo is complete (and not while it rests:
    another turn's; `wake` sends it then)."""

    __slots__ = ("counts", "frame", "frame_size", "got", "resting", "waiting")

    def __init__(self, request: bytes, payload: int, counts: TurnCounts) -> None:
        super().__init__(request)
        self.frame = client_frame(b"x" * payload)
        self.frame_size = server_frame_size(payload)
        self.got = 0
        self.counts = counts
        self.resting = False
        self.waiting = False  # resting with its echo in: the next message is owed

    def opened(self, rest: bytes) -> None:
        assert self.transport is not None
        self.got = len(rest)
        self.transport.write(self.frame)

    def data_received(self, data: bytes) -> None:
        if not self.ready:
            WsClient.data_received(self, data)
            return
        got = self.got + len(data)
        if got >= self.frame_size:
            got -= self.frame_size
            self.counts.count += 1
            if self.resting:
                self.waiting = True
            else:
                self.transport.write(self.frame)  # type: ignore[union-attr]
        self.got = got

    def rest(self) -> None:
        self.resting = True

    def wake(self) -> None:
        self.resting = False
        if self.waiting and self.transport is not None:
            self.waiting = False
            self.transport.write(self.frame)


class StreamClient(WsClient):
    """Pipelined: keeps `in_flight` frames outstanding, written `batch` at a time."""

    __slots__ = ("batch", "batch_frames", "counts", "echoed", "frame_size", "in_flight", "paused", "remainder",
                 "resting", "sent")

    def __init__(self, request: bytes, payload: int, in_flight: int, batch: int, counts: TurnCounts) -> None:
        super().__init__(request)
        self.counts = counts
        self.resting = False  # another turn's: the frames out are echoed, no more are sent
        self.batch = client_frame(b"y" * payload) * batch
        self.batch_frames = batch
        self.frame_size = server_frame_size(payload)
        self.in_flight = in_flight
        self.sent = 0
        self.echoed = 0
        self.remainder = 0
        self.paused = False

    def opened(self, rest: bytes) -> None:
        self.remainder = len(rest)
        self._fill()

    def _fill(self) -> None:
        transport = self.transport
        if transport is None:
            return
        room = self.in_flight - self.batch_frames
        while not self.paused and not self.resting and self.sent - self.echoed <= room:
            self.sent += self.batch_frames
            transport.write(self.batch)

    def data_received(self, data: bytes) -> None:
        if not self.ready:
            WsClient.data_received(self, data)
            return
        got = self.remainder + len(data)
        frames, self.remainder = divmod(got, self.frame_size)
        if frames:
            self.echoed += frames
            self.counts.count += frames
            self._fill()

    def rest(self) -> None:
        self.resting = True

    def wake(self) -> None:
        self.resting = False
        self._fill()

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        self._fill()


class HandshakeClient(WsClient):
    """One handshake: done at the hello, then hang up."""

    __slots__ = ()

    def opened(self, rest: bytes) -> None:
        if self.transport is not None:
            self.transport.close()


class IdleClient(WsClient):
    """Opens a tunnel and keeps it, ignoring anything that arrives."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        if not self.ready:
            WsClient.data_received(self, data)


# -- connecting -----------------------------------------------------------------------------------


async def open_connection(
    factory: Callable[[], WsClient], target: tuple[str, int], source_ip: str | None
) -> tuple[asyncio.Transport, WsClient]:
    """Connect from `source_ip` (port chosen at connect time, so TIME_WAIT ports are reused per peer)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if source_ip is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((source_ip, 0))
        await loop.sock_connect(sock, target)
        transport, protocol = await loop.create_connection(factory, sock=sock)
    except BaseException:
        sock.close()
        raise
    return transport, protocol


def host_header(target: tuple[str, int]) -> str:
    return f"{target[0]}:{target[1]}"


async def open_many(spec: Spec, make: Callable[[bytes], WsClient], count: int) -> list[WsClient]:
    """Open `count` tunnels round robin over the targets, `spec.concurrency` at a time."""
    requests = [client_request(host_header(t), PATH) for t in spec.targets]
    ips = itertools.cycle(spec.source_ips or (None,))
    slots = asyncio.Semaphore(max(1, spec.concurrency))
    clients: list[WsClient] = []

    async def one(i: int, source_ip: str | None) -> None:
        target = spec.targets[i % len(spec.targets)]
        async with slots:
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    _, client = await open_connection(lambda: make(requests[i % len(requests)]), target, source_ip)
                    if await client.done:
                        clients.append(client)
            except (OSError, TimeoutError) as exc:
                STATS.errors[f"connect: {type(exc).__name__}: {exc}"[:80]] += 1

    await asyncio.gather(*(one(i, next(ips)) for i in range(count)))
    return clients


def close_all(clients: Sequence[WsClient]) -> None:
    STATS.closing = True
    for client in clients:
        if client.transport is not None:
            client.transport.abort()


# -- scenarios --------------------------------------------------------------------------------------


async def in_turns(
    spec: Spec, turns: Sequence[Turn], counts: Sequence[TurnCounts], switch: Callable[[int], None]
) -> list[dict[str, Any]]:
    """`spec.warmup`, then the measured `spec.window` seconds of each turn, the turns taken one after
    another `spec.phase` seconds at a time (`switch(k)`: turn k's connections go, the others' rest):
    one result per turn.  With one turn, one window.

    Why turns: a shared machine's noise moves windows of a few seconds by 10-30 %, so two proxies
    measured in windows seconds apart differ by that as well as by what they cost; taken in turns half
    a second at a time, a neighbour's burst falls on each alike.  A turn's proxy CPU is read at the
    edges of the whole window (so what it spends finishing, in the next phase, what its connections
    began in their own is its own, and so is what it spends idle in the others'); its count is what its
    connections did, its seconds, load side and cores are those of its own phases.
    """

    async def take_turns(seconds: float, measured: list[TurnPhases] | None) -> None:
        phases = max(1, round(seconds / spec.phase)) if len(turns) > 1 else 1
        for _ in range(phases):
            for k in range(len(turns)):
                switch(k)
                start = sample(spec)
                await asyncio.sleep(seconds / phases)
                if measured is not None:
                    measured[k].add(start, sample(spec))

    def proxy_cpu() -> list[list[float]]:
        return [[cpu_seconds((pid,)) for pid in turn.proxy_pids] for turn in turns]

    await take_turns(spec.warmup / len(turns), None)
    measured = [TurnPhases() for _ in turns]
    cpu_before, counts_before = proxy_cpu(), [replace(tally) for tally in counts]
    await take_turns(spec.window, measured)
    cpu_after, counts_after = proxy_cpu(), [replace(tally) for tally in counts]
    results: list[dict[str, Any]] = []
    for k, turn in enumerate(turns):
        phases, before, after = measured[k], counts_before[k], counts_after[k]
        count = after.count - before.count
        results.append({
            "elapsed": phases.seconds,
            "count": count,
            "rate": count / phases.seconds if phases.seconds > 0 else 0.0,
            "proxy_cpu": sum(cpu_after[k]) - sum(cpu_before[k]),
            "load_cpu": phases.load_cpu,
            "proxy_cpu_by_pid": {str(pid): round(b - a, 3)
                                 for pid, a, b in zip(turn.proxy_pids, cpu_before[k], cpu_after[k], strict=True)},
            "cpu_busy": cpu_busy(dict.fromkeys(phases.jiffies, (0, 0)), phases.jiffies),
        })
        if spec.scenario == "handshake":
            results[-1].update(cookies_issued=after.cookies_issued - before.cookies_issued,
                               server_changes=after.server_changes - before.server_changes)
    return results


def _turns(spec: Spec) -> tuple[Turn, ...]:
    """The spec's turns, or its targets as the one turn of a window without turns.

    Raises:
        ValueError: two turns of one name (their results would be one), or a phase not above 0.
    """
    if len({turn.name for turn in spec.turns}) < len(spec.turns):
        raise ValueError(f"turns need names of their own: {[turn.name for turn in spec.turns]}")
    if spec.turns and not spec.phase > 0:  # `in_turns` divides the window by it (NaN is refused too)
        raise ValueError(f"a turn's phase must be more than 0 s, not {spec.phase}")
    return spec.turns or (Turn("", spec.targets, spec.proxy_pids),)


def _by_turn(spec: Spec, results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One result per turn under "turns", by name; without turns, the one result."""
    return {"turns": {turn.name: result for turn, result in zip(spec.turns, results, strict=True)}} if spec.turns \
        else dict(results[0])


def give_turn(clients: Sequence[Sequence[EchoClient | StreamClient]], k: int) -> None:
    """Turn k's connections go (each sends what it owes), every other turn's rest."""
    for j, turn_clients in enumerate(clients):
        for client in turn_clients:
            if j == k:
                client.wake()
            else:
                client.rest()


async def run_echo(spec: Spec) -> dict[str, Any]:
    turns = _turns(spec)
    counts = [TurnCounts() for _ in turns]
    clients: list[list[EchoClient | StreamClient]] = []
    payload = spec.payload
    try:
        for turn, tally in zip(turns, counts, strict=True):
            def make(request: bytes, tally: TurnCounts = tally) -> EchoClient | StreamClient:
                if spec.scenario == "echo":
                    return EchoClient(request, payload, tally)
                return StreamClient(request, payload, spec.in_flight, spec.batch, tally)

            clients.append(cast("list[EchoClient | StreamClient]",
                                await open_many(replace(spec, targets=turn.targets), make, spec.connections)))
        if any(len(opened) < spec.connections for opened in clients):
            results = [{"opened": len(opened), "count": 0, "rate": 0.0} for opened in clients]
        else:
            results = await in_turns(spec, turns, counts, functools.partial(give_turn, clients))
            for opened, result in zip(clients, results, strict=True):
                result["opened"] = len(opened)
                result["bytes"] = result["count"] * payload
    finally:
        close_all([client for turn_clients in clients for client in turn_clients])
    return _by_turn(spec, results)


async def run_handshakes(spec: Spec) -> dict[str, Any]:
    """Handshakes from `spec.connections` workers, each one after the other; with `spec.turns`, through
    each turn's proxy in its phases (`in_turns`), counted by the turn they began in."""
    turns = _turns(spec)
    counts = [TurnCounts() for _ in turns]
    ips = itertools.cycle(spec.source_ips or (None,))
    current = 0
    stop = False

    async def worker(i: int) -> None:
        targets = [turn.targets[i % len(turn.targets)] for turn in turns]
        requests = [client_request(host_header(target), PATH) for target in targets]
        first_server: list[bytes | None] = [None] * len(turns)
        while not stop:
            k = current
            try:
                async with asyncio.timeout(HANDSHAKE_TIMEOUT):
                    _, client = await open_connection(
                        functools.partial(HandshakeClient, requests[k]), targets[k], next(ips))
                    ok = await client.done
            except (OSError, TimeoutError) as exc:
                STATS.errors[f"connect: {type(exc).__name__}: {exc}"[:80]] += 1
                await asyncio.sleep(0.01)
                continue
            if not ok:
                await asyncio.sleep(0.01)
                continue
            tally = counts[k]
            tally.count += 1
            if client.cookies:
                tally.cookies_issued += 1
            if spec.check_cookie:
                if first_server[k] is None:
                    first_server[k] = client.server_id
                    if client.cookies:
                        requests[k] = client_request(host_header(targets[k]), PATH, cookie="; ".join(client.cookies))
                elif client.server_id != first_server[k]:
                    tally.server_changes += 1

    def switch(k: int) -> None:
        nonlocal current
        current = k

    workers = [asyncio.ensure_future(worker(i)) for i in range(spec.connections)]
    try:
        results = await in_turns(spec, turns, counts, switch)
    finally:
        stop = True
        for task in workers:
            task.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return _by_turn(spec, results)


async def run_idle(spec: Spec) -> dict[str, Any]:
    before = rss_kib(spec.proxy_pids)
    started = time.monotonic()
    clients = await open_many(spec, IdleClient, spec.connections)
    open_time = time.monotonic() - started
    try:
        await asyncio.sleep(spec.settle)
        after = rss_kib(spec.proxy_pids)
        still_open = sum(1 for c in clients if c.transport is not None)
    finally:
        close_all(clients)
    return {
        "opened": len(clients),
        "still_open": still_open,
        "open_seconds": open_time,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "rss_per_tunnel_kib": (after - before) / len(clients) if clients else 0.0,
    }


async def run(spec: Spec) -> dict[str, Any]:
    if spec.scenario in ("echo", "stream"):
        result = await run_echo(spec)
    elif spec.scenario == "handshake":
        result = await run_handshakes(spec)
    elif spec.scenario == "idle":
        result = await run_idle(spec)
    else:
        raise ValueError(f"unknown scenario {spec.scenario!r}")
    result["errors"] = dict(STATS.errors)
    result["event_loop"] = type(asyncio.get_running_loop()).__module__.split(".")[0]
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description="one benchmark scenario")
    parser.add_argument("--spec", required=True, help="the Spec as JSON")
    args = parser.parse_args(argv)
    spec = Spec.from_json(args.spec)
    runner: Callable[[Any], Any] = asyncio.run
    with contextlib.suppress(ImportError):
        import uvloop

        runner = uvloop.run
    result = runner(run(spec))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

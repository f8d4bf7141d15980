"""Micro-benchmark: whole WebSocket handshakes through the asyncio shell, with transports that are not sockets.

`python -m bench.handshake_shell [--n N] [--check] [--profile]` drives the real
`lb.proxy.server.ClientConnection`, its `_Upstream` and `lb.proxy.tunnel.Tunnel`
through the callbacks an event loop would make for one handshake: accept, the
client's upgrade head, backend connected, the backend's 101 with its hello
frame, the tunnel, the client hanging up and both connections lost.  The
access log is on, as shipped, writing to /dev/null, and the loop is uvloop
when installed, as shipped (the one timer per handshake is the loop's).

What it leaves out is the runtime's part of `make bench`'s `proxy CPU per
handshake` row: sockets and syscalls, the event loop, and the backend connect
(`loop.create_connection` and its task; here the backend "connects" as soon as
it is asked for).  So this is our own Python per handshake: the core
(`bench.handshake_core`) plus the shell, the tunnel and the log lines.  Unlike
the socket benchmark it is steady on a shared machine, which is what A/B
comparisons of a few µs need.  Bench code, never imported by `lb/`.
"""

from __future__ import annotations

import asyncio
import cProfile
import dataclasses
import io
import logging
import pstats
import sys
import time
from collections.abc import Generator
from typing import Any

from bench.handshake_core import SWITCH, make_context, parse_args, warmup_count
from bench.wire import client_request, hello_message, server_frame, set_cookies
from lb.log import setup_logging
from lb.proxy import server
from lb.state.context import ProxyContext


class FakeTransport:
    """Enough of asyncio.Transport for the shell and the tunnel; close reports connection_lost later."""

    __slots__ = ("closing", "peer", "protocol", "written")

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.protocol: Any = None
        self.closing = False
        self.written: list[bytes] = []

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False  # the client's EOF then ends the tunnel at once (as under TLS): one event, as before


class BenchLoop:
    """The running loop, except that a backend "connects" when the bench says so, not through a socket.

    The real shell asks its loop for the connection (`_open`): here `create_connection` builds the
    shell's own `_Upstream` through the factory it is given and keeps it, and the connect is one that
    never finishes.  What the shell asks for the loop's next turn runs when the bench says so.  (A
    stand-in loop rather than a subclass of the shell: compiled, the shell is a native class, which an
    interpreted class cannot subclass.)
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.opened: list[Any] = []
        self.soon: list[tuple[Any, tuple[Any, ...]]] = []

    def call_later(self, delay: float, callback: Any, *args: Any) -> asyncio.TimerHandle:
        return self._loop.call_later(delay, callback, *args)

    def call_soon(self, callback: Any, *args: Any) -> None:
        self.soon.append((callback, args))

    def next_turn(self) -> None:
        """Run what was asked for the loop's next turn (the connect's first step), as the loop would."""
        soon, self.soon = self.soon, []
        for callback, args in soon:
            callback(*args)

    def time(self) -> float:
        return self._loop.time()

    def create_connection(self, factory: Any, host: str, port: int) -> Generator[_NeverDone, None, None]:
        self.opened.append(factory())
        return _never_connects()


def _never_connects() -> Generator[_NeverDone, None, None]:
    """The connect of `BenchLoop`: it awaits a future that never finishes (the bench delivers
    `connection_made` itself), as the loop's coroutine awaits its connect."""
    yield _NeverDone()


class _NeverDone:
    """The future `_never_connects` awaits."""

    def add_done_callback(self, callback: Any) -> None:
        pass

    def cancel(self) -> bool:
        return True


def deliver(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """One read, as a transport hands it to the data plane's (buffered) protocols: into the protocol's
    buffer, then `buffer_updated`.  The copy into the buffer is the socket's recv_into in a real
    transport; here it is one slice assignment."""
    buffer = protocol.get_buffer(len(data))
    buffer[: len(data)] = data
    protocol.buffer_updated(len(data))


class Bench:
    """One ProxyContext, and handshakes through it."""

    def __init__(self, ctx: ProxyContext) -> None:
        self.ctx = ctx
        self.loop = BenchLoop(asyncio.get_running_loop())
        # The listener's factory, as `lb run` makes protocols (a call from here would parse keywords).
        self.factory = server.client_factory(ctx, self.loop)  # type: ignore[arg-type]

    def handshake(self, request: bytes, answer: bytes) -> bytes:
        """One handshake, accept to both connections lost; returns what the client was sent."""
        client = FakeTransport(("127.0.0.2", 40000))
        backend = FakeTransport(("127.0.0.1", 7001))
        protocol = self.factory()
        client.protocol = protocol
        protocol.connection_made(client)
        deliver(protocol, request)
        self.loop.next_turn()  # the connect's first step: it awaits a connect that never finishes
        assert len(self.loop.opened) == 1, "one backend should have been opened"
        upstream = self.loop.opened.pop()
        backend.protocol = upstream
        upstream.connection_made(backend)
        assert backend.written, "nothing was forwarded"
        deliver(upstream, answer)
        assert client.written, "the client got nothing"
        client.protocol.eof_received()  # the client hangs up: the tunnel closes both sides
        assert client.closing and backend.closing
        client.protocol.connection_lost(None)
        backend.protocol.connection_lost(None)
        return b"".join(client.written)


def run(n: int, *, check: bool, profile: bool) -> float:
    """µs per handshake over `n` handshakes (after a warm-up of n // 10)."""

    async def main() -> float:
        bench = Bench(make_context())
        answer = SWITCH + server_frame(hello_message("g1"))
        first = bench.handshake(client_request("127.0.0.1:8080"), answer)
        cookie = set_cookies(first)[0] if check else None
        request = client_request("127.0.0.1:8080", "/ws", cookie)
        for _ in range(warmup_count(n)):
            bench.handshake(request, answer)
        profiler = cProfile.Profile() if profile else None
        if profiler is not None:
            profiler.enable()
        started = time.perf_counter()
        for _ in range(n):
            bench.handshake(request, answer)
        elapsed = time.perf_counter() - started
        if profiler is not None:
            profiler.disable()
            pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(30)
        assert bench.ctx.handshaking == 0 and not bench.ctx.tunnels
        return elapsed / n * 1e6

    try:
        import uvloop  # the shipped default when installed (runtime.event_loop: auto): its timers are ours too
    except ImportError:
        return asyncio.run(main())
    return uvloop.run(main())


def main(argv: list[str] | None = None) -> int:
    args = parse_args("python -m bench.handshake_shell", __doc__.splitlines()[0], argv, shell=True)
    # The access log as shipped (on, plain), into /dev/null: its cost is ours, its output is not wanted.
    logging_config = make_context().config.logging
    if args.no_access_log:
        logging_config = dataclasses.replace(logging_config, access_log=False)
    # Opened as Python opens stderr (a write-through text layer over the raw file), so each line
    # takes the path it takes in `lb run`.
    with io.TextIOWrapper(io.FileIO("/dev/null", "w"), write_through=True) as sink:
        saved, sys.stderr = sys.stderr, sink
        try:
            setup_logging(logging_config)
        finally:
            sys.stderr = saved
        best = min(run(args.n, check=args.check, profile=args.profile) for _ in range(args.repeat))
        logging.shutdown()
    kind = "check cookie" if args.check else "issue cookie"
    log = "no log" if args.no_access_log else "log"
    print(f"core + shell + tunnel + {log}: {best:.1f} µs per handshake ({kind}, best of {args.repeat} x {args.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

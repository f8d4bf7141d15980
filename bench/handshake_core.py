"""Micro-benchmark: the pure connection core through whole WebSocket handshakes, no socket.

`python -m bench.handshake_core [--n N] [--check] [--profile]` drives one
`lb.proxy.connection.Connection` per handshake with canned bytes, the way the
shell would: start, the client's upgrade head, backend connected, the
backend's 101 (with the hello frame behind it), up to the tunnel hand-over.
It prints µs per handshake of the pure core (parse, route, decide, seal,
render, log calls).  `--check` sends the cookie the first handshake was given,
so the token is opened instead of issued.  `--profile` prints cProfile's top
functions by own time.

The configuration is the benchmark's (`bench.runner.balancer_config`: shipped
defaults plus one pool of three backends), so what is measured here is the
Python part of the `proxy CPU per handshake` row of `make bench`.  Bench code,
never imported by `lb/`.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import yaml

from bench.runner import balancer_config
from bench.wire import BENCH_KEY, accept_key, client_request, hello_message, server_frame, set_cookies
from lb.config.load import parse_config
from lb.proxy.actions import JoinTunnel, SendBackend, SendClient
from lb.proxy.connection import Connection
from lb.proxy.server import wall_offset
from lb.state.context import ProxyContext

SWITCH = (
    b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Accept: " + accept_key(BENCH_KEY).encode("ascii") + b"\r\n\r\n"
)
BACKENDS = (("g1", "127.0.0.1", 7001), ("g2", "127.0.0.1", 7002), ("g3", "127.0.0.1", 7003))


def make_context() -> ProxyContext:
    document = balancer_config(BACKENDS, 8080, 9000)
    config = parse_config(yaml.safe_dump(document), base_dir=Path("."), environ={})
    return ProxyContext.build(config, lambda pool, backend, what: None, wall_offset=wall_offset())


def handshake(ctx: ProxyContext, request: bytes, answer: bytes, now: float) -> bytes:
    """One handshake through the core; returns what the client was sent.  Asserts it reached the tunnel."""
    ctx.handshaking += 1
    conn = Connection(ctx, client_ip="127.0.0.2", tls=False)
    conn.start(now)
    conn.receive_client(request, now)
    sent = conn.backend_connected(now)
    assert type(sent[0]) is SendBackend, sent
    actions = conn.receive_backend(answer, now)
    joined = actions[-1]
    assert type(joined) is JoinTunnel, actions
    joined.backend.connections -= 1  # what the tunnel would release when it closes
    ctx.handshaking -= 1
    head = actions[0]
    assert type(head) is SendClient
    return head.data


def warmup_count(n: int) -> int:
    """Handshakes run before the timed `n` (both micro-benchmarks; bench.instructions counts them too)."""
    return max(1, n // 10)


def run(n: int, *, check: bool, profile: bool) -> float:
    """µs per handshake over `n` handshakes (after a warm-up of n // 10)."""
    ctx = make_context()
    answer = SWITCH + server_frame(hello_message("g1"))
    now = time.monotonic()  # the events' clock, as lb.proxy.server stamps them
    first = handshake(ctx, client_request("127.0.0.1:8080"), answer, now)
    cookie = set_cookies(first)[0] if check else None
    request = client_request("127.0.0.1:8080", "/ws", cookie)
    for _ in range(warmup_count(n)):
        handshake(ctx, request, answer, now)
    profiler = cProfile.Profile() if profile else None
    if profiler is not None:
        profiler.enable()
    started = time.perf_counter()
    for _ in range(n):
        handshake(ctx, request, answer, now)
    elapsed = time.perf_counter() - started
    if profiler is not None:
        profiler.disable()
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(25)
    return elapsed / n * 1e6


def parse_args(prog: str, description: str, argv: list[str] | None, *, shell: bool = False) -> argparse.Namespace:
    """The options of both handshake micro-benchmarks (this one and, with `shell`, bench.handshake_shell)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--n", type=int, default=20000, help="handshakes to time (default 20000)")
    parser.add_argument("--check", action="store_true", help="send the issued cookie back (check, not issue)")
    parser.add_argument("--profile", action="store_true", help="cProfile top functions by own time")
    parser.add_argument("--repeat", type=int, default=3, help="runs; the best is reported (default 3)")
    if shell:
        parser.add_argument("--no-access-log", action="store_true",
                            help="logging.access_log: false (the shipped default is on)")
    args = parser.parse_args(argv)
    args.n = max(1, min(args.n, 1_000_000))
    args.repeat = max(1, min(args.repeat, 20))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args("python -m bench.handshake_core", __doc__.splitlines()[0], argv)
    best = min(run(args.n, check=args.check, profile=args.profile) for _ in range(args.repeat))
    kind = "check cookie" if args.check else "issue cookie"
    print(f"pure core: {best:.1f} µs per handshake ({kind}, best of {args.repeat} x {args.n})")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Micro-benchmark: lb.http.head against another copy of it, interleaved, as a ratio.

`python -m bench.head_parse [--reference PATH] [--rounds N]` times
`parse_request_head` on the benchmark's WebSocket upgrade head, on a 15-field
browser head with cookies, and `parse_response_head` on the backend's 101, for
lb.http.head and for the module at PATH (by default tests/unit/_head_reference.py,
the parser before the one-pass reading).  The two alternate within each round,
best of 5 repeats each, because CPU speed on a shared box swings by a third
between runs: only the ratio (new/reference) is worth comparing.  Bench code,
never imported by `lb/`.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import timeit
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

from bench.handshake_core import SWITCH
from bench.wire import client_request
from lb.http import head as current

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "unit" / "_head_reference.py"
BROWSER_HEAD = (
    b"GET /chat/room/42?x=1&y=2 HTTP/1.1\r\nHost: example.com:8080\r\n"
    b"User-Agent: Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/120.0\r\n"
    b"Accept: text/html,application/xhtml+xml;q=0.9,*/*;q=0.8\r\nAccept-Language: en-US,en;q=0.5\r\n"
    b"Accept-Encoding: gzip, deflate, br\r\nSec-WebSocket-Version: 13\r\nOrigin: https://example.com\r\n"
    b"Sec-WebSocket-Extensions: permessage-deflate\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    b"Connection: keep-alive, Upgrade\r\n"
    b"Cookie: session=abcdef0123456789abcdef0123456789; theme=dark; lb_affinity=v1.abc.def; _ga=GA1.2.345\r\n"
    b"Sec-Fetch-Dest: websocket\r\nSec-Fetch-Mode: websocket\r\nPragma: no-cache\r\nUpgrade: websocket\r\n\r\n"
)
LOOPS = 20_000


def load(path: Path) -> ModuleType:
    """Import the module at `path` under its own name (a dataclass module must be in sys.modules)."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def cases(module: ModuleType) -> dict[str, Callable[[], object]]:
    protected = module.protected_headers("X-LB-Affinity")
    upgrade = client_request("127.0.0.1:8080")
    return {
        "request (upgrade)": lambda: module.parse_request_head(upgrade, protected=protected),
        "response (101)": lambda: module.parse_response_head(SWITCH),
        "request (15 fields)": lambda: module.parse_request_head(BROWSER_HEAD, protected=protected),
    }


def best_us(call: Callable[[], object]) -> float:
    return min(timeit.repeat(call, number=LOOPS, repeat=5)) / LOOPS * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, default=REFERENCE)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    reference, ours = cases(load(args.reference)), cases(current)
    for name in ours:
        before = after = float("inf")
        for _ in range(args.rounds):
            before = min(before, best_us(reference[name]))
            after = min(after, best_us(ours[name]))
        print(f"{name:20s} reference {before:6.2f} µs  ours {after:6.2f} µs  ours/reference {after / before:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

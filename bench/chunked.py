"""Micro-benchmark: CPU per MB of chunked body through the framer, by chunk shape.

`python -m bench.chunked [--mb N]` feeds `lb.http.framing.BodyFramer` N MiB (default 4) of
chunked body in 64 KiB reads, as a socket delivers it, for each shape: 1-byte chunks (the
hostile case: all framing, no data), 1-byte chunks with a 4,000-byte extension each, 64-byte
and 1 KiB chunks.  It prints process CPU per MB and per chunk.  A peer chooses the shape, so
the worst row is what a hostile uploader costs; compare it with a handshake's CPU (`make bench`).
Bench code, never imported by `lb/`.
"""

from __future__ import annotations

import argparse
import sys
import time

from lb.http.framing import BodyFramer

READ = 65536
SHAPES = {
    "1-byte chunks": b"1\r\nx\r\n",
    "1-byte chunks, 4,000-byte extension": b"1;" + b"e" * 4000 + b"\r\nx\r\n",
    "64-byte chunks": b"40\r\n" + b"x" * 64 + b"\r\n",
    "1 KiB chunks": b"400\r\n" + b"x" * 1024 + b"\r\n",
}


def cost(unit: bytes, total: int) -> tuple[float, float]:
    """CPU seconds per MB and per chunk, framing `total` bytes made of `unit` repeated."""
    body = unit * max(1, total // len(unit))
    reads = [body[i : i + READ] for i in range(0, len(body), READ)]
    framer = BodyFramer(length=None, chunked=True)
    start = time.process_time()
    for read in reads:
        framer.feed(read)
    spent = time.process_time() - start
    return spent / (len(body) / 1e6), spent / (len(body) // len(unit))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chunked", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="MiB of body per shape (default 4)")
    args = parser.parse_args(argv)
    total = int(max(0.01, min(args.mb, 256.0)) * (1 << 20))
    for name, unit in SHAPES.items():
        per_mb, per_chunk = cost(unit, total)
        print(f"{name:38} {per_mb * 1e3:8.1f} ms/MB  {per_chunk * 1e6:7.2f} µs/chunk")
    return 0


if __name__ == "__main__":
    sys.exit(main())

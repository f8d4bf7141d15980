"""Micro-benchmark: CPU per MB of chunked body through the framer, by chunk shape.

`python -m bench.chunked [--mb N]` feeds `lb.http.framing.BodyFramer` N MiB (default 4) of
chunked body in 64 KiB reads, as a socket delivers it, for each shape: 1-byte chunks (the
hostile case: all framing, no data), 1-byte chunks with a 4,000-byte extension each (whole in
a read, then split across 1,000-byte reads), 64-byte and 1 KiB chunks, and bodies that are
one 64 KiB trailer section of short lines (whole, then in 7-byte reads).  It prints process
CPU per MB and per unit (a chunk, or a trailer line).  A peer chooses the shape, so the worst
row is what a hostile uploader costs; compare it with a handshake's CPU (`make bench`).  The
framer checks trailer names as a request's does (the costlier case).
Bench code, never imported by `lb/`.
"""

from __future__ import annotations

import argparse
import sys
import time

from lb.http.framing import MAX_TRAILERS, BodyFramer
from lb.http.head import PROTECTED_HEADERS

READ = 65536
EXTENDED = b"1;" + b"e" * 4000 + b"\r\nx\r\n"
TRAILER_LINE = b"a:b\r\n"
TRAILER_LINES = (MAX_TRAILERS - 2) // len(TRAILER_LINE)
# name: (unit, bytes per read, units per body: None for one endless body)
SHAPES: dict[str, tuple[bytes, int, int | None]] = {
    "1-byte chunks": (b"1\r\nx\r\n", READ, None),
    "1-byte chunks, 4,000-byte extension": (EXTENDED, READ, None),
    "the same, split across 1,000-byte reads": (EXTENDED, 1000, None),
    "64-byte chunks": (b"40\r\n" + b"x" * 64 + b"\r\n", READ, None),
    "1 KiB chunks": (b"400\r\n" + b"x" * 1024 + b"\r\n", READ, None),
    "64 KiB trailers of 5-byte lines": (TRAILER_LINE, READ, TRAILER_LINES),
    "the same, in 7-byte reads": (TRAILER_LINE, 7, TRAILER_LINES),
}


def cost(unit: bytes, total: int, read: int = READ, per_body: int | None = None) -> tuple[float, float]:
    """CPU seconds per MB and per unit, framing `total` bytes made of `unit` repeated.

    With `per_body`, the units are trailer lines: each body is a last chunk, that many of them
    and the blank line, framed by a fresh framer.
    """
    if per_body is None:
        bodies = [unit * max(1, total // len(unit))]
    else:
        one = b"0\r\n" + unit * per_body + b"\r\n"
        bodies = [one] * max(1, total // len(one))
    size = sum(map(len, bodies))
    feeds = [[body[i : i + read] for i in range(0, len(body), read)] for body in bodies]
    start = time.process_time()
    for reads in feeds:
        framer = BodyFramer(length=None, chunked=True, forbidden_trailers=PROTECTED_HEADERS)
        for piece in reads:
            framer.feed(piece)
    spent = time.process_time() - start
    units = size // len(unit) if per_body is None else per_body * len(bodies)
    return spent / (size / 1e6), spent / units


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.chunked", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=4.0, help="MiB of body per shape (default 4)")
    args = parser.parse_args(argv)
    total = int(max(0.01, min(args.mb, 256.0)) * (1 << 20))
    for name, (unit, read, per_body) in SHAPES.items():
        per_mb, per_unit = cost(unit, total, read, per_body)
        print(f"{name:40} {per_mb * 1e3:8.1f} ms/MB  {per_unit * 1e6:7.2f} µs/unit")
    return 0


if __name__ == "__main__":
    sys.exit(main())

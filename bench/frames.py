"""Micro-benchmark: CPU per MB and per frame of the tunnel's frame tracker, by frame and read size.

`python -m bench.frames [--mb N]` feeds `lb.ws.frames.FrameBoundaries` N MiB (default 8) of
server frames, as every byte a backend sends a client passes through it (so the balancer can
put its close frame between two frames), and every byte a client sends through another (so it
knows whether the client has sent its close frame): 64-byte and 4 KiB frames in 64 KiB reads (what the
echo and stream rows of `make bench` send), 64-byte frames in 1 KiB reads, and 4 KiB frames
in reads that split every header.  Best of 5 passes, process CPU.  Bench code, never imported
by `lb/`.
"""

from __future__ import annotations

import argparse
import sys
import time

from lb.ws.frames import FrameBoundaries

# name: (payload bytes per frame, bytes per read)
SHAPES = {
    "64-byte frames, 64 KiB reads": (64, 65536),
    "64-byte frames, 1 KiB reads": (64, 1024),
    "4 KiB frames, 64 KiB reads": (4096, 65536),
    "4 KiB frames, reads splitting headers": (4096, 4099),
}


def server_frames(size: int, count: int) -> bytes:
    """`count` unmasked binary frames of `size` payload bytes."""
    if size < 126:
        head = bytes((0x82, size))
    elif size < 65536:
        head = bytes((0x82, 126)) + size.to_bytes(2, "big")
    else:
        head = bytes((0x82, 127)) + size.to_bytes(8, "big")
    return (head + b"x" * size) * count


def cost(size: int, read: int, total: int) -> tuple[float, float]:
    """CPU seconds per MB and per frame, best of 5 passes over `total` bytes of frames."""
    frame_bytes = len(server_frames(size, 1))
    count = max(1, total // frame_bytes)
    body = server_frames(size, count)
    reads = [body[i : i + read] for i in range(0, len(body), read)]
    best = float("inf")
    for _ in range(5):
        tracker = FrameBoundaries()
        start = time.process_time()
        for piece in reads:
            tracker.feed(piece)
        best = min(best, time.process_time() - start)
    return best / (len(body) / 1e6), best / count


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.frames", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=8.0, help="MiB of frames per shape (default 8)")
    args = parser.parse_args(argv)
    total = int(max(0.01, min(args.mb, 256.0)) * (1 << 20))
    for name, (size, read) in SHAPES.items():
        per_mb, per_frame = cost(size, read, total)
        print(f"{name:40} {per_mb * 1e3:8.3f} ms/MB  {per_frame * 1e9:7.0f} ns/frame")
    return 0


if __name__ == "__main__":
    sys.exit(main())

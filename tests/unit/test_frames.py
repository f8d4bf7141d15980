"""Frame boundaries on a relayed WebSocket stream, headers only (RFC 6455 §5.2), and our close frame (§5.5.1).

The balancer injects its own close frame (drain 1012, shutdown 1001) only *between* two of the backend's
frames; these tests hold `FrameBoundaries` to that over every frame length encoding (7-bit, 16-bit, 64-bit),
masked and unmasked, however the stream is split across reads.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.ws.frames import FrameBoundaries, close_frame
from tests.harness.raw import encode_frame

# Payload lengths at every edge of the three length encodings, plus a zero-length frame.
SIZES = (0, 1, 125, 126, 127, 65535, 65536, 70001)


def frame(opcode: int, payload: bytes, *, mask: bool, fin: bool = True) -> bytes:
    """One frame as a client (masked, with the same key at every run) or server (unmasked) sends it."""
    return encode_frame(opcode, payload, fin=fin, mask=mask, key=b"\x37\xfa\x21\x3d")


def hostile_payload(n: int) -> bytes:
    """Payload bytes that look like frame headers: a parser that peeks into payloads gets lost."""
    return (b"\x81\xff\x88\x7e\x82\x7f" * (n // 6 + 1))[:n]


def stream_of(sizes: Sequence[int], *, mask: bool) -> tuple[bytes, set[int]]:
    """Frames of the given payload sizes back to back; returns the bytes and every frame's end offset."""
    data = bytearray()
    ends: set[int] = set()
    for index, size in enumerate(sizes):
        opcode = (0x1, 0x2, 0x9, 0x0)[index % 4] if size <= 125 else (0x1, 0x2)[index % 2]
        data += frame(opcode, hostile_payload(size), mask=mask)
        ends.add(len(data))
    return bytes(data), ends


def chunks(data: bytes, cuts: Sequence[int]) -> Iterator[tuple[int, bytes]]:
    """(end offset, chunk) for `data` cut at the sorted offsets `cuts`."""
    start = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        if cut > start:
            yield cut, data[start:cut]
            start = cut


@pytest.mark.parametrize("mask", [False, True], ids=["server", "client"])
@pytest.mark.parametrize("size", SIZES)
def test_one_frame_fed_whole_ends_at_a_boundary(size: int, mask: bool) -> None:
    """A complete frame of any length encoding leaves the tracker at a boundary."""
    boundaries = FrameBoundaries()
    assert boundaries.at_boundary
    data = frame(0x2, hostile_payload(size), mask=mask)
    boundaries.feed(data[:-1] if data[:-1] else b"")
    if len(data) > 1:
        assert not boundaries.at_boundary, "one byte short of the frame end is not a boundary"
    boundaries.feed(data[-1:])
    assert boundaries.at_boundary


@pytest.mark.parametrize("mask", [False, True], ids=["server", "client"])
def test_byte_by_byte_boundary_exactly_at_frame_ends(mask: bool) -> None:
    """Fed one byte at a time, the tracker is at a boundary after exactly the last byte of each frame."""
    data, ends = stream_of([0, 125, 126, 0, 65535, 3, 65536, 0], mask=mask)
    boundaries = FrameBoundaries()
    wrong = []
    for offset in range(len(data)):
        boundaries.feed(data[offset : offset + 1])
        if boundaries.at_boundary != (offset + 1 in ends):
            wrong.append(offset + 1)
            if len(wrong) > 5:
                break
    assert not wrong, f"at_boundary wrong after offsets {wrong} (frame ends {sorted(ends)})"


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("mask", [False, True], ids=["server", "client"])
def test_random_splits_boundary_exactly_at_frame_ends(seed: int, mask: bool) -> None:
    """However reads split the stream (inside headers, length fields, masks, payloads), boundaries match."""
    rng = random.Random(seed)
    sizes = [rng.choice(SIZES) for _ in range(10)]
    data, ends = stream_of(sizes, mask=mask)
    # Cuts near every frame start (header splits) and some random ones in payloads.
    starts = sorted({0, *ends} - {len(data)})
    cuts = [s + rng.randint(0, 14) for s in starts] + [rng.randrange(len(data)) for _ in range(30)]
    cuts = [c for c in cuts if 0 < c < len(data)]
    boundaries = FrameBoundaries()
    for end, chunk in chunks(data, cuts):
        boundaries.feed(chunk)
        assert boundaries.at_boundary == (end in ends), f"offset {end}, sizes {sizes}, frame ends {sorted(ends)}"
    assert boundaries.at_boundary


@pytest.mark.parametrize("mask", [False, True], ids=["server", "client"])
def test_first_boundary_offsets_from_every_position(mask: bool) -> None:
    """From any position, first_boundary(rest) is the distance to the next frame end (0 when already there)."""
    data, ends = stream_of([0, 5, 125, 126, 0, 300, 65536, 2], mask=mask)
    sorted_ends = sorted(ends)
    rng = random.Random(7)
    # Every position inside the small frames and the headers; a sample of the long payload.
    positions = [p for p in range(len(data)) if p < 1000 or p > len(data) - 30]
    positions += rng.sample(range(1000, len(data) - 30), 200)
    for position in positions:
        boundaries = FrameBoundaries()
        boundaries.feed(data[:position])
        expected = 0 if position == 0 or position in ends else next(e for e in sorted_ends if e > position) - position
        got = boundaries.first_boundary(data[position:])
        assert got == expected, f"from offset {position}: got {got}, want {expected}"
        assert boundaries.at_boundary, "after returning an offset the tracker is at that boundary"


def test_first_boundary_none_when_the_chunk_ends_first() -> None:
    """No boundary in the chunk → None, all of it consumed; the next chunk gives the rest of the distance."""
    data = frame(0x2, hostile_payload(1000), mask=False) + frame(0x1, b"tail", mask=False)
    end = len(data) - len(frame(0x1, b"tail", mask=False))
    boundaries = FrameBoundaries()
    boundaries.feed(data[:10])
    assert boundaries.first_boundary(data[10:500]) is None
    assert not boundaries.at_boundary
    assert boundaries.first_boundary(data[500:]) == end - 500
    assert boundaries.at_boundary
    # From the boundary on, the remaining frame is followed normally.
    boundaries.feed(data[end:])
    assert boundaries.at_boundary


@pytest.mark.parametrize("split", range(1, 14))
def test_first_boundary_with_a_header_split_across_reads(split: int) -> None:
    """A 64-bit length with a mask key (14-byte header) split anywhere still finds the frame end."""
    data = frame(0x2, hostile_payload(65536), mask=True) + frame(0x1, b"x", mask=True)
    first_end = len(data) - len(frame(0x1, b"x", mask=True))
    boundaries = FrameBoundaries()
    assert boundaries.first_boundary(data[:split], stop=False) is None
    assert not boundaries.at_boundary
    assert boundaries.first_boundary(data[split:]) == first_end - split


def test_first_boundary_of_a_zero_length_frame_is_its_header_end() -> None:
    """An empty frame (e.g. a bare pong) ends right after its two header bytes."""
    data = frame(0xA, b"", mask=False) + frame(0x1, b"hello", mask=False)
    boundaries = FrameBoundaries()
    boundaries.feed(data[:1])
    assert boundaries.first_boundary(data[1:]) == 1


def test_first_boundary_without_stop_consumes_everything() -> None:
    data, _ = stream_of([3, 200, 0, 9], mask=False)
    boundaries = FrameBoundaries()
    assert boundaries.first_boundary(data, stop=False) is None
    assert boundaries.at_boundary


@settings(max_examples=300, deadline=None)
@given(
    frames=st.lists(st.tuples(st.sampled_from([0x0, 0x1, 0x2, 0x8, 0x9, 0xA]), st.sampled_from(SIZES[:5])),
                    min_size=1, max_size=8),
    mask=st.booleans(),
    cuts=st.lists(st.integers(0, 800), max_size=10),
    stop=st.booleans(),
)
def test_any_split_reads_like_the_stream_read_whole(
    frames: list[tuple[int, int]], mask: bool, cuts: list[int], stop: bool
) -> None:
    """Split anywhere, read with or without `stop`, the tracker is at a boundary exactly at frame ends,
    and `close_seen` says whether a close frame's header has been read (the tunnel's close check)."""
    data = b""
    header_ends: list[tuple[int, int]] = []  # (offset just past a frame's header, its opcode)
    for opcode, size in frames:
        framed = frame(opcode, hostile_payload(size), mask=mask)
        header_ends.append((len(data) + len(framed) - size, opcode))
        data += framed
    ends = {end + size for (end, _), (_, size) in zip(header_ends, frames, strict=True)}
    boundaries = FrameBoundaries()
    for end, chunk in chunks(data, [c for c in cuts if 0 < c < len(data)]):
        start, position = end - len(chunk), 0
        while position < len(chunk):
            if not stop:
                boundaries.feed(chunk)
                break
            if boundaries.at_boundary:  # first_boundary says 0 here; step into the next frame
                boundaries.feed(chunk[position : position + 1])
                position += 1
                continue
            found = boundaries.first_boundary(chunk[position:])
            if found is None:
                break
            position += found
            assert start + position in ends
        assert boundaries.at_boundary == (end in ends)
        read = [opcode for header_end, opcode in header_ends if header_end <= end]
        assert boundaries.close_seen == (0x8 in read)


@pytest.mark.parametrize("mask", [False, True], ids=["server", "client"])
@pytest.mark.parametrize("split", [None, 1, 2, 4, 5], ids=["whole", "1", "2", "4", "5"])
def test_a_close_frame_stays_seen_after_frames_that_follow_it(mask: bool, split: int | None) -> None:
    """A peer that sends a ping and a message after its close frame has still closed (RFC 6455 §5.5.1):
    `close_seen` stays set however the reads fall, so the tunnel never sends its own close after it."""
    close = frame(0x8, b"\x03\xe8bye", mask=mask)
    data = frame(0x1, b"before", mask=mask) + close + frame(0x9, b"late", mask=mask) + frame(0x1, b"x", mask=mask)
    boundaries = FrameBoundaries()
    if split is None:
        boundaries.feed(data)
    else:
        start = len(frame(0x1, b"before", mask=mask))
        boundaries.feed(data[:start])
        assert not boundaries.close_seen
        boundaries.feed(data[start : start + split])
        header = 6 if mask else 2
        assert boundaries.close_seen == (split >= header)  # once its header is whole
        for offset in range(start + split, len(data)):
            boundaries.feed(data[offset : offset + 1])
            assert boundaries.close_seen == (offset + 1 >= start + header)
    assert boundaries.close_seen and boundaries.at_boundary


@pytest.mark.parametrize(
    ("code", "reason", "expected"),
    [
        (1012, "", b"\x88\x02\x03\xf4"),
        (1001, "balancer shutting down", b"\x88\x18\x03\xe9balancer shutting down"),
        (1012, "service restart", b"\x88\x11\x03\xf4service restart"),
        (1000, "x" * 200, b"\x88\x7d\x03\xe8" + b"x" * 123),
    ],
    ids=["no reason", "shutdown", "drain", "long reason truncated"],
)
def test_close_frame_bytes(code: int, reason: str, expected: bytes) -> None:
    """An unmasked, final close frame: code big-endian, reason UTF-8, payload ≤ 125 bytes (RFC 6455 §5.5)."""
    assert close_frame(code, reason) == expected


def test_close_frame_is_a_frame_the_tracker_follows() -> None:
    boundaries = FrameBoundaries()
    data = close_frame(1001, "bye")
    boundaries.feed(data[:3])
    assert not boundaries.at_boundary
    assert boundaries.first_boundary(data[3:]) == len(data) - 3


def test_close_frame_truncation_keeps_the_reason_valid_utf8() -> None:
    """A long non-ASCII reason is cut at a character boundary, never inside one (RFC 6455 §5.5.1, §8.1:
    an invalid UTF-8 reason makes the peer fail the connection)."""
    for reason in ("é" * 100, "x" + "€" * 60, "🙂" * 40):
        frame_bytes = close_frame(1001, reason)
        payload = frame_bytes[2:]
        assert frame_bytes[1] == len(payload) <= 125
        text = payload[2:].decode("utf-8")  # raises UnicodeDecodeError when cut mid-character
        assert reason.startswith(text) and len(text.encode()) >= 120  # as much as fits

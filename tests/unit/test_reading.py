"""lb.proxy.reading: a read copied out of the one read buffer, by lb/proxy/_reading.c when built."""

from __future__ import annotations

import array

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.proxy.reading import READ_CHUNK, READ_VIEW, read_bytes

reading = pytest.importorskip("lb.proxy._reading",
                              reason="lb/proxy/_reading.c is not built (make native needs a C compiler)")


@given(data=st.binary(max_size=READ_CHUNK))
def test_a_read_comes_out_as_the_bytes_read(data: bytes) -> None:
    READ_VIEW[: len(data)] = data
    copied = read_bytes(len(data))
    assert type(copied) is bytes and copied == data
    assert reading.copy_out(READ_VIEW, len(data)) == READ_VIEW[: len(data)].tobytes()


def test_the_copy_is_its_own() -> None:
    READ_VIEW[:3] = b"abc"
    copied = read_bytes(3)
    READ_VIEW[:3] = b"xyz"  # the next read
    assert copied == b"abc"


def test_nothing_but_a_contiguous_buffer_within_its_length_is_read() -> None:
    assert reading.copy_out(READ_VIEW, 0) == b""
    assert len(reading.copy_out(READ_VIEW, READ_CHUNK)) == READ_CHUNK
    assert reading.copy_out(memoryview(array.array("i", [1])), 4) == array.array("i", [1]).tobytes()  # as bytes
    for nbytes in (-1, READ_CHUNK + 1, 2**63 - 1):
        with pytest.raises(ValueError):
            reading.copy_out(READ_VIEW, nbytes)
    with pytest.raises(OverflowError):
        reading.copy_out(READ_VIEW, 2**64)
    with pytest.raises(BufferError):
        reading.copy_out(memoryview(bytearray(8))[::2], 1)  # not contiguous
    with pytest.raises(TypeError):
        reading.copy_out("abcd", 1)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        reading.copy_out(READ_VIEW, "1")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        reading.copy_out(READ_VIEW)  # type: ignore[call-arg]
    released = memoryview(bytearray(4))
    released.release()
    with pytest.raises(ValueError):
        reading.copy_out(released, 1)

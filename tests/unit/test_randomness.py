"""lb.proxy.randomness: the system's random bytes a page at a time, none handed out twice."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.proxy import randomness
from lb.proxy.randomness import PAGE, random_bytes


def _start_afresh(patch: pytest.MonkeyPatch) -> None:
    """No page held (the module's state put back after the test)."""
    patch.setattr(randomness._current, "page", b"")
    patch.setattr(randomness._current, "drawn", 0)


@pytest.fixture
def numbered_pages(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """os.urandom as pages whose every byte position is known: page k is k repeated (mod 256); the
    sizes it was asked for are listed."""
    asked: list[int] = []
    counter = itertools.count(1)

    def urandom(count: int) -> bytes:
        asked.append(count)
        return bytes([next(counter) % 256]) * count

    monkeypatch.setattr(randomness.os, "urandom", urandom)
    _start_afresh(monkeypatch)
    yield asked


@given(counts=st.lists(st.integers(0, PAGE + 10), max_size=40))
@settings(max_examples=200, deadline=None)
def test_each_draw_is_the_next_unused_part_of_a_page_or_a_read_of_its_own(counts: list[int]) -> None:
    """Held to a model: a page is handed out front to back, a byte never twice, and a new one is read
    only when a draw does not fit in what is left of it; a draw past a page's size is a read of its own."""
    with pytest.MonkeyPatch.context() as patch:
        reads: list[bytes] = []
        system = os.urandom

        def urandom(count: int) -> bytes:
            reads.append(system(count))
            return reads[-1]

        patch.setattr(randomness.os, "urandom", urandom)
        _start_afresh(patch)
        page, used = b"", 0
        for count in counts:
            drawn = random_bytes(count)
            if count > PAGE:
                assert drawn == reads[-1] and len(drawn) == count
                continue
            if used + count > len(page):
                page, used = reads[-1], 0
                assert len(page) == PAGE
            assert drawn == page[used : used + count]
            used += count
        assert len(reads) <= len(counts)


def test_draws_cut_one_page_in_order_then_read_another(numbered_pages: list[int]) -> None:
    first, second = random_bytes(8), random_bytes(12)
    assert first == b"\x01" * 8 and second == b"\x01" * 12 and numbered_pages == [PAGE]
    rest = random_bytes(PAGE - 20)
    assert rest == b"\x01" * (PAGE - 20) and numbered_pages == [PAGE]  # the page, all of it, once
    assert random_bytes(1) == b"\x02" and numbered_pages == [PAGE, PAGE]
    assert random_bytes(PAGE + 1) == b"\x03" * (PAGE + 1) and numbered_pages == [PAGE, PAGE, PAGE + 1]
    assert random_bytes(1) == b"\x02"  # the second page goes on where it was left


def test_a_negative_count_is_refused_not_a_step_back(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(randomness.os, "urandom", lambda count: bytes(range(256)) * (count // 256))
    _start_afresh(monkeypatch)
    assert random_bytes(4) == b"\x00\x01\x02\x03"
    with pytest.raises(ValueError):
        random_bytes(-4)
    assert random_bytes(0) == b"" and random_bytes(4) == b"\x04\x05\x06\x07"


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_draws_its_parents_bytes(numbered_pages: list[int]) -> None:
    assert random_bytes(4) == b"\x01" * 4  # the parent holds the rest of page 1
    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child
        try:
            os.write(write, random_bytes(4))
        finally:
            os._exit(0)
    os.close(write)
    try:
        from_child = os.read(read, 16)
    finally:
        os.close(read)
        os.waitpid(child, 0)
    assert from_child != b"\x01" * 4  # a page of its own, not the parent's next bytes
    assert random_bytes(4) == b"\x01" * 4  # the parent goes on with its own

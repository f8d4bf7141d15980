"""lb.state.tally.add_one: `tally[key] += 1`, by lb/state/_tally.c when built."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lb.state.tally import Tally, add_one

tally_c = pytest.importorskip("lb.state._tally",
                              reason="lb/state/_tally.c is not built (make native needs a C compiler)")

_KEYS = st.tuples(st.sampled_from(["game", "chat"]), st.sampled_from(["gw-1", "gw-2"]), st.sampled_from(["new", "hit"]))


@given(st.lists(_KEYS | st.integers(-3, 3) | st.text(max_size=3), max_size=60))
def test_counts_as_counter_counts(keys: list[object]) -> None:
    tally: Tally[object] = Tally()
    plain: dict[object, int] = {}
    for key in keys:
        add_one(tally, key)
        tally_c.add_one(plain, key)
    assert tally == plain == Counter(keys)
    assert type(tally) is Tally and all(type(count) is int for count in tally.values())


def test_a_count_past_a_machine_word_or_of_another_type_adds_as_plus_does() -> None:
    tally: dict[object, int] = {"big": sys.maxsize, "bigger": 2**80, "bool": True}
    for key in tally.copy():
        tally_c.add_one(tally, key)
    assert tally == {"big": sys.maxsize + 1, "bigger": 2**80 + 1, "bool": 2}
    odd: dict[object, object] = {"float": 1.5, "text": "a"}
    tally_c.add_one(odd, "float")
    assert odd["float"] == 2.5
    with pytest.raises(TypeError):
        tally_c.add_one(odd, "text")
    assert odd["text"] == "a"


def test_a_subclass_with_item_access_of_its_own_is_counted_through_it_and_nothing_else_is_counted_in() -> None:
    """The compiled Tally and plain dicts are counted by their table; a subclass written in Python has
    item access of its own (CPython gives it the generic slots), and gets `tally[key] += 1` as written:
    its `__missing__`, and its `__setitem__` (as a test's Tally that fails on one key)."""
    class FromTen(Tally[str]):
        def __missing__(self, key: str) -> int:
            return 10

    stored: list[tuple[str, int]] = []

    class Recording(Tally[str]):
        def __setitem__(self, key: str, count: int) -> None:
            stored.append((key, count))
            super().__setitem__(key, count)

    from_ten, recording = FromTen(), Recording()
    tally_c.add_one(from_ten, "a")
    tally_c.add_one(recording, "a")
    tally_c.add_one(recording, "a")
    assert dict(from_ten) == {"a": 11} and stored == [("a", 1), ("a", 2)]
    not_dicts: tuple[object, ...] = ([], Counter, "a", None)
    for not_a_dict in not_dicts:
        with pytest.raises(TypeError):
            tally_c.add_one(not_a_dict, "a")
    with pytest.raises(TypeError):
        tally_c.add_one({}, ["unhashable"])
    with pytest.raises(TypeError):
        tally_c.add_one({})


def test_an_error_from_a_key_is_raised_and_counts_nothing() -> None:
    class Clashing:
        def __hash__(self) -> int:
            return 1

        def __eq__(self, other: object) -> bool:
            raise RuntimeError("compared")

    tally: dict[object, int] = {Clashing(): 1}
    with pytest.raises(RuntimeError, match="compared"):
        tally_c.add_one(tally, Clashing())
    assert list(tally.values()) == [1]

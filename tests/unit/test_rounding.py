"""`round_half_even` is `round` for every float: the same int, and the same errors."""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from lb.state.rounding import round_half_even

# Ties of both parities and signs, the halves next to them, and where `x - floor(x)` rounds (below 1 in
# magnitude, negative) or cannot hold a fraction at all (2**52 and up).
_EDGES = [
    0.0, -0.0, 0.5, -0.5, 1.5, -1.5, 2.5, -2.5, 3.5, 1e15 + 0.5, -(1e15 + 0.5),
    math.nextafter(0.5, 0.0), math.nextafter(0.5, 1.0), math.nextafter(-0.5, 0.0), math.nextafter(-0.5, -1.0),
    math.nextafter(2.5, 3.0), math.nextafter(-2.5, -3.0), -1e-300, -5e-324, 5e-324, 0.49999999999999994,
    -0.49999999999999994, 2.0**52 + 1, 2.0**53 - 0.5, -(2.0**52) - 0.5, 1.7976931348623157e308, -1.7976931348623157e308,
    1_764_000_000_000.5, 1_764_000_000_001.5,
]


@pytest.mark.parametrize("x", _EDGES)
def test_edges_round_as_round_does(x: float) -> None:
    assert round_half_even(x) == round(x)
    assert type(round_half_even(x)) is int


@given(st.floats(allow_nan=False, allow_infinity=False))
@example(sys.float_info.max)
def test_every_finite_float_rounds_as_round_does(x: float) -> None:
    assert round_half_even(x) == round(x)


@given(st.integers(-(2**60), 2**60), st.sampled_from([0.5, -0.5, 0.25, 0.75]))
def test_near_whole_numbers_and_ties(whole: int, fraction: float) -> None:
    x = float(whole) + fraction
    assert round_half_even(x) == round(x)


@pytest.mark.parametrize(
    ("x", "error"), [(math.nan, ValueError), (math.inf, OverflowError), (-math.inf, OverflowError)]
)
def test_what_round_refuses_is_refused_alike(x: float, error: type[Exception]) -> None:
    with pytest.raises(error):
        round(x)
    with pytest.raises(error):
        round_half_even(x)

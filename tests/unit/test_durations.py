"""Durations in configuration: 500ms, 2s, 5m, 1h, 1d, or bare seconds."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lb.config.durations import parse_duration


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("500ms", 0.5),
        ("2s", 2.0),
        ("1.5s", 1.5),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("1d", 86400.0),
        ("7d", 604800.0),
        ("0s", 0.0),
        (" 10s ", 10.0),
        ("250 ms", 0.25),
        (".5s", 0.5),
        ("3", 3.0),
        (3, 3.0),
        (0.25, 0.25),
        (0, 0.0),
    ],
)
def test_parses_units_and_bare_seconds(value: str | float, seconds: float) -> None:
    """Each unit converts to float seconds; a bare number means seconds."""
    assert parse_duration(value) == pytest.approx(seconds)
    assert isinstance(parse_duration(value), float)


@pytest.mark.parametrize(
    "value", ["abc", "", "1w", "1y", "d", "s", "1.s", "1e3s", "1 h 5", "5M", "ms500", "nan", "inf", "1,5s"]
)
def test_rejects_non_durations_with_an_example(value: str) -> None:
    """Text that is not a duration is rejected with a message that shows the accepted forms."""
    with pytest.raises(ValueError, match="expected a duration like 500ms, 2s, 5m or 1h") as info:
        parse_duration(value)
    assert repr(value) in str(info.value)


def test_message_names_the_bad_value() -> None:
    """The message quotes the offending text."""
    with pytest.raises(ValueError) as info:
        parse_duration("abc")
    assert str(info.value) == "expected a duration like 500ms, 2s, 5m or 1h, got 'abc'"


@pytest.mark.parametrize("value", ["-1s", "-500ms", "- 2m", -1, -0.5])
def test_rejects_negative_durations(value: str | float) -> None:
    """Negative durations are rejected as negative, not as unreadable."""
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration(value)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, False, "9" * 400])
def test_rejects_non_finite_and_booleans(value: str | float) -> None:
    """NaN, infinities, overflowing text and YAML booleans are not durations."""
    with pytest.raises(ValueError):
        parse_duration(value)


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["ms", "s", "m", "h", "d"]))
def test_integer_with_unit_round_trips(number: int, unit: str) -> None:
    """N<unit> is N times the unit's length in seconds."""
    factor = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert parse_duration(f"{number}{unit}") == pytest.approx(number * factor)


# What durations are written with, and the near misses (a sign, an exponent, a no-break space, another
# script's digit).
_DURATION_CHARS = st.sampled_from("0123456789.dhms \t") | st.sampled_from("-+eE,_:\u00a0\u0665\uff15")
_NUMBERS = st.integers(0, 10**6).map(str) | st.decimals(0, 10**4, places=3).map(str) | st.sampled_from([".5", "0"])


@st.composite
def _near_durations(draw: st.DrawFn) -> str:
    """A duration as operators write it (`30s`, `1h 30m`, bare seconds, blanks around), with at most one
    character replaced, dropped or repeated: about half parse, where arbitrary text never does."""
    units = draw(st.lists(st.sampled_from(["h", "m", "s", "ms", ""]), min_size=1, max_size=3).map(
        lambda us: sorted(set(us), key=["h", "m", "s", "ms", ""].index)))
    text = draw(st.sampled_from(["", " "])).join(
        draw(_NUMBERS) + draw(st.sampled_from(["", "", " "])) + unit for unit in units)
    text = draw(st.sampled_from(["", " ", "\t"])) + text + draw(st.sampled_from(["", " ", "\n"]))
    at = draw(st.integers(0, len(text) - 1))
    edit = draw(st.sampled_from(["none", "none", "replace", "drop", "repeat"]))
    if edit == "replace":
        return text[:at] + draw(_DURATION_CHARS) + text[at + 1 :]
    if edit == "drop":
        return text[:at] + text[at + 1 :]
    return text[: at + 1] + text[at:] if edit == "repeat" else text


@given(st.text(max_size=20) | st.text(_DURATION_CHARS, max_size=14) | _near_durations() | _near_durations())
def test_arbitrary_text_gives_a_float_or_value_error(text: str) -> None:
    """No input raises anything but ValueError, and results are finite and non-negative."""
    try:
        seconds = parse_duration(text)
    except ValueError:
        return
    assert math.isfinite(seconds) and seconds >= 0


@pytest.mark.parametrize("value", ["\u200930s", "30\u00a0s", "30s\u3000", "\u0665s", "\uff15m"])
def test_only_ascii_digits_and_blanks_make_a_duration(value: str) -> None:
    """A thin or no-break space, or a digit of another script, is not what an operator meant to type."""
    with pytest.raises(ValueError):
        parse_duration(value)


def test_ascii_blanks_around_a_duration_are_fine() -> None:
    assert parse_duration(" 30 s\n") == 30.0


@pytest.mark.parametrize(("value", "seconds"), [
    ("1h30m", 5400.0), ("2m30s", 150.0), ("1s500ms", 1.5), ("1h1m1s1ms", 3661.001), ("1.5h30m", 7200.0),
    ("1h0m", 3600.0), (" 1m30s ", 90.0), ("1h 30m", 5400.0), ("1 h 30 m", 5400.0), ("2m\t30s", 150.0),
    ("1d12h", 129600.0), ("1d 1s", 86401.0),
])
def test_parses_units_from_the_largest_down(value: str, seconds: float) -> None:
    """What an operator writes for 90 minutes (Go's and systemd's form), which `5400s` hides; blanks
    between the parts as `5 s` allows them within one (systemd takes `1h 30min`)."""
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "value", ["30m1h", "5s5s", "1m30", "ms1s", "1hm", "1h30", "1h 30", "1 30m", "5 m s", "5ms 1s", "1h1d", "1d1d"]
)
def test_a_compound_out_of_order_repeated_or_unitless_is_no_duration(value: str) -> None:
    with pytest.raises(ValueError, match="expected a duration like"):
        parse_duration(value)


def test_a_negative_compound_is_said_to_be_negative() -> None:
    with pytest.raises(ValueError, match="cannot be negative"):
        parse_duration("-1h30m")


@settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])  # 2 loaded cores
@given(st.lists(st.integers(0, 10_000), min_size=5, max_size=5), st.lists(st.booleans(), min_size=5, max_size=5))
def test_a_compound_is_the_sum_of_its_parts(numbers: list[int], present: list[bool]) -> None:
    units = (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 0.001))
    parts = [(n, unit) for n, (unit, _), keep in zip(numbers, units, present, strict=True) if keep]
    text = "".join(f"{n}{unit}" for n, unit in parts)
    if not parts:  # one in thirty-two: no part is no duration
        with pytest.raises(ValueError, match="expected a duration like"):
            parse_duration(text)
        return
    expected = sum(n * dict(units)[unit] for n, unit in parts)
    assert parse_duration(text) == pytest.approx(expected)

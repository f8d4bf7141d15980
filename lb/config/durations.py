"""Duration values from configuration ("500ms", "2s", "5m", "1h", "1d", "1h30m") as float seconds.  [pure]

Owns only the text → seconds conversion.  Whether a duration must be positive
for a given key (an interval of 0 is meaningless, a shutdown grace of 0 is fine)
is for `lb.config.sections` to decide.
"""

from __future__ import annotations

import math
import re

# Days too, as HAProxy and systemd read them: a cookie lifetime of a week is `7d` (`max_age`).
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}

# A decimal number and an optional unit; a bare number means seconds, so that
# "${GRACE}" expanded to "10" reads like the YAML integer 10 would.
_DURATION_RE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)[ \t]*(?P<unit>ms|s|m|h|d)?")
# Units from the largest down, each once (Go's and systemd's `1h30m`, `2m30s`, `1s500ms`): what an
# operator writes for 90 minutes, which `5400s` hides.  Each part is a number and its unit, with
# blanks allowed where a single duration allows them (`5 s`, so `1h 30m` and `1 h 30 m` too).
_PART = r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)[ \t]*"
_COMPOUND_RE = re.compile(
    rf"(?:{_PART}d[ \t]*)?(?:{_PART}h[ \t]*)?(?:{_PART}m(?!s)[ \t]*)?(?:{_PART}s[ \t]*)?(?:{_PART}ms)?"
)
_COMPOUND_UNITS = (86400.0, 3600.0, 60.0, 1.0, 0.001)
# Only ASCII blanks around it: str.strip() and `\s` also take a thin or no-break space, which
# an operator did not type on purpose and a reviewer cannot see.
_BLANKS = " \t\r\n"

_EXPECTED = "expected a duration like 500ms, 2s, 5m or 1h"


class BadDuration(ValueError):
    """Not a duration; `problem` says why without the value (which may have come from a secret)."""

    def __init__(self, problem: str, value: object) -> None:
        shown = repr(value)
        super().__init__(f"{problem}, got {shown if len(shown) <= 62 else shown[:58] + '...'}")
        self.problem = problem


def parse_duration(value: str | int | float) -> float:
    """Convert a configuration duration to seconds.

    Args:
        value: "500ms", "2s", "1.5s", "5m", "1h", "1d", units from the largest down ("1h30m", "1d12h", "2m30s",
            "1s500ms"), or a bare number of seconds (int, float, or a numeric string).

    Returns:
        The duration in seconds, always finite and >= 0.

    Raises:
        BadDuration: the value is not a duration, is negative, or is not finite (ValueError: not a
            str, int or float).
    """
    # bool is an int subclass, but `interval: true` is a mistake, not 1 second.
    if isinstance(value, bool):
        raise BadDuration(_EXPECTED, value)
    if isinstance(value, int | float):
        return _checked(float(value), value)
    if not isinstance(value, str):
        raise ValueError(f"{_EXPECTED}, got {type(value).__name__}")  # the caller's type error
    text = value.strip(_BLANKS)
    if text.startswith("-") and _is_duration(text[1:].lstrip(_BLANKS)):
        raise BadDuration("a duration cannot be negative", value)
    match = _DURATION_RE.fullmatch(text)
    if match is not None:
        return _checked(float(match["number"]) * _UNIT_SECONDS[match["unit"] or "s"], value)
    compound = _COMPOUND_RE.fullmatch(text)
    if compound is None or not text:
        raise BadDuration(_EXPECTED, value)
    parts = zip(compound.groups(), _COMPOUND_UNITS, strict=True)
    return _checked(sum(float(number) * unit for number, unit in parts if number is not None), value)


def _is_duration(text: str) -> bool:
    return _DURATION_RE.fullmatch(text) is not None or (bool(text) and _COMPOUND_RE.fullmatch(text) is not None)


def _checked(seconds: float, original: str | int | float) -> float:
    if math.isnan(seconds) or math.isinf(seconds):
        raise BadDuration(_EXPECTED, original)
    if seconds < 0:
        raise BadDuration("a duration cannot be negative", original)
    return seconds

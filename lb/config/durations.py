"""Duration values from configuration ("500ms", "2s", "5m", "1h") as float seconds.  [pure]

Owns only the text → seconds conversion.  Whether a duration must be positive
for a given key (an interval of 0 is meaningless, a shutdown grace of 0 is fine)
is for `lb.config.sections` to decide.
"""

from __future__ import annotations

import math
import re

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

# A decimal number and an optional unit; a bare number means seconds, so that
# "${GRACE}" expanded to "10" reads like the YAML integer 10 would.
_DURATION_RE = re.compile(r"(?P<number>[0-9]+(?:\.[0-9]+)?|\.[0-9]+)[ \t]*(?P<unit>ms|s|m|h)?")
# Only ASCII blanks around it: str.strip() and `\s` also take a thin or no-break space, which
# an operator did not type on purpose and a reviewer cannot see.
_BLANKS = " \t\r\n"

_EXPECTED = "expected a duration like 500ms, 2s, 5m or 1h"


def parse_duration(value: str | int | float) -> float:
    """Convert a configuration duration to seconds.

    Args:
        value: "500ms", "2s", "1.5s", "5m", "1h", or a bare number of seconds
            (int, float, or a numeric string).

    Returns:
        The duration in seconds, always finite and >= 0.

    Raises:
        ValueError: the value is not a duration, is negative, or is not finite.
    """
    # bool is an int subclass, but `interval: true` is a mistake, not 1 second.
    if isinstance(value, bool):
        raise ValueError(f"{_EXPECTED}, got {value!r}")
    if isinstance(value, int | float):
        return _checked(float(value), value)
    if not isinstance(value, str):
        raise ValueError(f"{_EXPECTED}, got {type(value).__name__}")
    text = value.strip(_BLANKS)
    if text.startswith("-") and _DURATION_RE.fullmatch(text[1:].lstrip(_BLANKS)):
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    match = _DURATION_RE.fullmatch(text)
    if match is None:
        raise ValueError(f"{_EXPECTED}, got {value!r}")
    seconds = float(match["number"]) * _UNIT_SECONDS[match["unit"] or "s"]
    return _checked(seconds, value)


def _checked(seconds: float, original: str | int | float) -> float:
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{_EXPECTED}, got {original!r}")
    if seconds < 0:
        raise ValueError(f"a duration cannot be negative, got {original!r}")
    return seconds

"""`round(x)` for a float, in compiled code without the builtin.

Compiled (mypyc), `round(x)` is a call into builtins that looks up `float.__round__`, binds it to `x`
and calls it: 636 instructions, twice a handshake (a token's issue time and a tunnel's duration, both
in milliseconds).  `round_half_even` is the same arithmetic in a few dozen, and gives the same int
for every float.
"""

from __future__ import annotations

import math


def round_half_even(x: float) -> int:
    """The int `round(x)` gives: the nearest, a tie to the even one.

    NaN raises ValueError and an infinity OverflowError, as `round` does.  `x - floor(x)` is exact
    for any `x` of magnitude 1 or more (Sterbenz), and so at every tie; below 1 in magnitude it may
    round, but only where a tie cannot be.
    """
    whole = math.floor(x)
    rest = x - whole
    if rest > 0.5 or (rest == 0.5 and whole & 1):
        return whole + 1
    return whole

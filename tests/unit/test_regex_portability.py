"""Our regular expressions read the same on every Python we run on, 3.11.0 onwards.

Before 3.11.5, a possessive repeat of a group (`(?:...)*+`, `)++`, `)?+`, `){m,n}+`) could match what
the plain repeat does not (CPython gh-106052, gh-100061): on Debian bookworm's python3 (3.11.2, the
container image's), the chunk-size line `5;` passed the extension grammar, a line a backend reads
otherwise.  An atomic group around a greedy repeat (`(?>(?:...)*)`) means the same and was right
from the start; a possessive repeat of one character class (`[ \\t]*+`) was never affected.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

LB = Path(__file__).resolve().parents[2] / "lb"
# A group's closing parenthesis, a quantifier, then the `+` that makes it possessive; looked for in a
# line without its character classes (`[()*+]` is three characters, not a group).
POSSESSIVE_GROUP = re.compile(r"\)(?:[*+?]|\{\d*(?:,\d*)?\})\+")
CHARACTER_CLASS = re.compile(r"\[\^?\]?(?:\\.|[^\]\\])*\]")


def possessive_group_in(line: str) -> bool:
    return POSSESSIVE_GROUP.search(CHARACTER_CLASS.sub("C", line)) is not None


@pytest.mark.parametrize("path", sorted(LB.rglob("*.py")), ids=lambda p: str(p.relative_to(LB)))
def test_no_group_is_repeated_possessively(path: Path) -> None:
    found = [f"{path.name}:{number}: {line.strip()}" for number, line in enumerate(path.read_text().splitlines(), 1)
             if possessive_group_in(line) and not line.lstrip().startswith("#")]
    assert not found, "write (?>(?:...)*) for (?:...)*+ (this module's docstring says why):\n" + "\n".join(found)


def test_the_guard_sees_each_form() -> None:
    for text in ("(?:a)*+", "(a)++", "(?:a)?+", "(?:a){1,3}+", "(?:a){2}+", "(?:[()*+])*+"):
        assert possessive_group_in(text), text
    for text in ("(?>(?:a)*)", "[ \\t]*+", "a++", "(?:a)*", "(?:a)+", "[()*+,]*", r"(?:\[[0-9:]+\]|[()*+]*)"):
        assert not possessive_group_in(text), text

"""Our regular expressions read the same on every Python we run on, 3.11.0 onwards.

Before 3.11.5, a possessive repeat of a group (`(?:ab)*+`, `(a|b)++`) could match what the plain
repeat does not (CPython gh-106052, gh-100061): on Debian bookworm's python3 (3.11.2, the container
image's), the chunk-size line `5;` passed the extension grammar, a line a backend reads otherwise.
An atomic group around a greedy repeat (`(?>(?:...)*)`) means the same and was right from the start;
a possessive repeat of one character or class (`[ \\t]*+`, compiled apart) was never affected.

Checked on the patterns themselves, as `re` parses them: every compiled pattern `lb` keeps at module
level (or the bound `match` of one).  `re._parser` is private but unchanged from 3.11 to 3.13.
"""

from __future__ import annotations

import importlib
import pkgutil
import re
import re._parser as sre_parse
from collections.abc import Iterator
from re._constants import ANY, IN, LITERAL, NOT_LITERAL, POSSESSIVE_REPEAT, SUBPATTERN

import pytest

import lb

ONE_CHARACTER = {LITERAL, NOT_LITERAL, ANY, IN}  # what `re` compiles to its single-character repeat


def _one_character(items: sre_parse.SubPattern) -> bool:
    if len(items) != 1:
        return False
    op, av = items[0]
    if op is SUBPATTERN:
        return av[0] is None and _one_character(av[-1])  # a non-capturing group around one character
    return op in ONE_CHARACTER


def possessive_groups(items: sre_parse.SubPattern) -> Iterator[str]:
    """The bodies of the possessive repeats in `items` that are not one character, at any depth."""
    for op, av in items:
        if op is POSSESSIVE_REPEAT and not _one_character(av[2]):
            yield str(av[2])
        for part in av if isinstance(av, tuple | list) else (av,):
            for sub in part if isinstance(part, list) else (part,):
                if isinstance(sub, sre_parse.SubPattern):
                    yield from possessive_groups(sub)


def lb_patterns() -> dict[str, re.Pattern[str] | re.Pattern[bytes]]:
    """Every compiled pattern an `lb` module keeps at module level, by module and name."""
    found: dict[str, re.Pattern[str] | re.Pattern[bytes]] = {}
    for info in pkgutil.walk_packages(lb.__path__, "lb."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for name, value in vars(module).items():
            pattern = getattr(value, "__self__", value)  # a kept `re.compile(...).match` too
            if isinstance(pattern, re.Pattern):
                found[f"{info.name}.{name}"] = pattern
    return found


def test_no_pattern_in_lb_repeats_a_group_possessively() -> None:
    patterns = lb_patterns()
    assert "lb.http.framing._size_line" in patterns and "lb.http.head._FIELD_LINE" in patterns
    assert len(patterns) > 20
    wrong = {name: bodies for name, pattern in patterns.items()
             if (bodies := list(possessive_groups(sre_parse.parse(pattern.pattern, pattern.flags))))}
    assert not wrong, "write (?>(?:...)*) for (?:...)*+ (this module's docstring says why): " + repr(wrong)


@pytest.mark.parametrize(
    "text", ["(?:ab)*+", "(a)++", "(?:ab)?+", "(?:a|bc){1,3}+", "x(?>(?:[ab]c)++)", "(?:a(?:bc)*+)"]
)
def test_the_check_finds_each_form(text: str) -> None:
    assert list(possessive_groups(sre_parse.parse(text)))


@pytest.mark.parametrize("text", ["(?>(?:ab)*)", "[ \\t]*+", "a++", "(?:a)*+", "(?:[()*+])*+", "\\)*+", "(?:ab)*"])
def test_the_check_passes_what_is_right(text: str) -> None:
    assert not list(possessive_groups(sre_parse.parse(text)))

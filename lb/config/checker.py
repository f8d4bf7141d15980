"""One validation pass: the problems it collects, and the reading of mappings, lists and keys every section shares.

Owns `Checker` (the problems found so far, each at its key path, and what the pass has read), the
marks a value may carry (`REPORTED`: its problem is already said, so it is said once; `Expanded`: it
came from a `${...}` reference, so no message shows it), how a value is named in a message, and the
helpers that read a section: a mapping of known keys (an unknown one gets a "did you mean"), a
non-empty list, a required key, scalar `Field`s parsed into a dataclass's arguments.  What each key
means is `lb.config.sections`'; what each scalar may hold, `lb.config.scalars`'.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

from lb.access_log import shortened
from lb.errors import Problem

T = TypeVar("T")
# A scalar key's parser: the raw YAML value in, the typed value out, or Bad(message).
Parser = Callable[[object], Any]


class _Reported:
    """Marks a value whose problem is already recorded (an unset `${VAR}`, a missing required key).

    Validators skip it silently, so one mistake is reported once.
    """

    def __repr__(self) -> str:
        return "<reported>"


REPORTED: Final = _Reported()


class Expanded(str):
    """A string produced by `${...}` expansion.

    Environment variables are always text, so integer and boolean fields accept
    an expanded "8080" or "true" where YAML would have given them 8080 or true.
    """

    __slots__ = ()


class Bad(Exception):
    """A value parser's complaint; becomes a Problem at the value's path."""


class Checker:
    """Collects problems during the one validation pass."""

    def __init__(self, *, base_dir: Path, cpu_count: int | None = None,
                 snapshot: Mapping[str, str] | None = None, tls_snapshot: Mapping[str, bytes] | None = None) -> None:
        self.base_dir = base_dir
        self.cpu_count = cpu_count
        # `${file:PATH}`: None reads the disk; a mapping (the owner's `ConfigSource.files`) is read instead.
        self.snapshot = snapshot
        self.files_read: dict[str, str] = {}  # absolute path → what replaced the reference (a ConfigSource's files)
        # The listeners' certificates and keys, the same way (`ConfigSource.tls_files`).
        self.tls_snapshot = tls_snapshot
        self.tls_read: dict[str, bytes] = {}
        self.problems: list[Problem] = []
        # The paths of `problems`, for `said`: a file of 30,000 bad backends asked the list itself
        # once per backend, 2 minutes of a reload's thread (and of the data plane's GIL).
        self._said: set[str] = set()
        self.nodes = 0  # values the ${...} expansion has walked (MAX_CONFIG_NODES)
        self.too_deep = False  # the expansion met a value nested past MAX_CONFIG_DEPTH (said once)
        self.too_long_path = False  # the expansion met a value whose path is past MAX_PATH_CHARS (said once)
        self.expanded_chars = 0  # characters the ${...} expansion has produced (MAX_EXPANDED_CHARS)
        self.too_large = False  # the expansion went past MAX_EXPANDED_CHARS (said once)
        self.stood_in = False  # the YAML was read with references in stand-in characters (parse_yaml)
        self.unreadable = False  # not YAML at all: nothing more to check

    def add(self, path: str, message: str) -> None:
        """A problem at `path` ("pools.gateways.backends[1].address"): `message` says what is wrong."""
        self.problems.append(Problem(path, message))
        self._said.add(path)

    def said(self, path: str) -> bool:
        """Whether a problem was added at exactly `path`."""
        return path in self._said

    def keep(self, wanted: Callable[[Problem], bool]) -> None:
        """Drop the problems found so far that are not `wanted` (and their paths from `said`)."""
        self.problems[:] = [problem for problem in self.problems if wanted(problem)]
        self._said = {problem.path for problem in self.problems}


def join_path(path: str, key: object) -> str:
    """The path of `key` inside `path` ("pools" and "gateways" → "pools.gateways"; at the top, the key)."""
    return f"{path}.{key}" if path else str(key)


def kind_of(value: object) -> str:
    """Name a value's type for "expected X, got <kind>" messages (scalars show their value)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"bool {str(value).lower()}"
    if isinstance(value, int | float):
        return f"{type(value).__name__} {value!r}"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, str):
        return "str"  # a `${VAR}`'s value too (Expanded)
    return type(value).__name__  # list, date, bytes, set, ...


def got(value: object) -> str:
    """`kind_of`, but a string written in the file itself is shown (`got str 'lots'`), as a number is:
    one from a `${VAR}` is not, since a variable may hold a secret."""
    if isinstance(value, str) and not isinstance(value, Expanded):
        return f"str {show(value)}"
    return kind_of(value)


def show(value: object) -> str:
    """Quote a value of the right type but wrong content for "got '...'" messages; a `${...}`'s is not
    quoted (a variable or a mounted file may hold a secret, and the message goes to the reload log)."""
    if isinstance(value, Expanded):
        return f"the {len(value)} characters its ${{...}} reference gave (not shown)"
    if isinstance(value, str):
        return repr(shortened(str(value), 60))
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return kind_of(value)


@dataclass(frozen=True, slots=True)
class Field:
    """One scalar key of a section: its parser, and whether it must be present."""

    key: str
    parse: Parser
    required: bool = False


def mapping_of(value: object, path: str, check: Checker, allowed: Collection[str]) -> dict[Any, object] | None:
    """The value as a mapping, after reporting every key not in `allowed`."""
    if value is REPORTED:
        return None
    if not isinstance(value, dict):
        check.add(path, f"expected a mapping, got {kind_of(value)}")
        return None
    for key in value:
        if key not in allowed:
            check.add(join_path(path, key), _unknown_key(key, allowed))
    return value


def _unknown_key(key: object, allowed: Collection[str]) -> str:
    message = f"unknown key {show(key)}"
    if isinstance(key, str):
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
    return message


def list_of(value: object, path: str, check: Checker, *, what: str) -> list[object] | None:
    """The value as a non-empty list."""
    if value is REPORTED:
        return None
    if not isinstance(value, list):
        check.add(path, f"expected a list of {what}, got {kind_of(value)}")
        return None
    if not value:
        check.add(path, f"expected at least one {what.removesuffix('s')}")
        return None
    return value


def optional_list(value: object, path: str, check: Checker, *, what: str) -> list[object] | None:
    """The value as a list, possibly empty (absent or null: empty); None: a problem, said (or said already)."""
    if value is None:
        return []
    if value is REPORTED:
        return None
    if not isinstance(value, list):
        check.add(path, f"expected a list of {what}, got {kind_of(value)}")
        return None
    return value


def value_at(
    node: Mapping[Any, object], key: str, path: str, check: Checker, *, required: bool, instead: str = ""
) -> object:
    """The value at `key`; None if absent or null (use the default); REPORTED if required and absent.
    `instead`: what else would do, said with the problem (`(a pool needs backends, a discovery, or both)`)."""
    value = node.get(key)
    if value is None and required:
        message = "expected a value, got null" if key in node else "missing required key"
        check.add(join_path(path, key), f"{message} ({instead})" if instead else message)
        return REPORTED
    return value


def parse_fields(
    node: Mapping[Any, object], path: str, check: Checker, fields: Sequence[Field]
) -> dict[str, Any] | None:
    """Parse the scalar keys of a section into constructor kwargs; None if any is invalid.

    Absent (or null) optional keys are left out, so the dataclass default applies.
    """
    kwargs, valid = parse_each_field(node, path, check, fields)
    return kwargs if valid else None


def parse_each_field(
    node: Mapping[Any, object], path: str, check: Checker, fields: Sequence[Field]
) -> tuple[dict[str, Any], bool]:
    """`parse_fields`, with the fields that parsed even when another did not (and whether all did): a
    section's checks across fields still run on those, so one bad key hides no other problem."""
    kwargs: dict[str, Any] = {}
    valid = True
    for field in fields:
        value = value_at(node, field.key, path, check, required=field.required)
        if value is None:
            continue
        if value is REPORTED:
            valid = False
            continue
        try:
            kwargs[field.key] = field.parse(value)
        except Bad as exc:
            check.add(join_path(path, field.key), str(exc))
            valid = False
    return kwargs, valid


def settled(node: Mapping[Any, object], kwargs: Mapping[str, Any], *keys: str) -> bool:
    """Whether each of `keys` parsed (`parse_each_field`) or is absent (at its default): a check across
    them then judges what the operator meant, not a value already said to be wrong."""
    return all(key in kwargs or node.get(key) is None for key in keys)


def simple_section(
    root: Mapping[Any, object], key: str, check: Checker, fields: Sequence[Field], build: Callable[..., T]
) -> T | None:
    """An optional top-level section made only of scalar fields (timeouts, limits, logging, runtime)."""
    return scalar_section(root.get(key), key, check, fields, build)


def scalar_section(
    value: object, path: str, check: Checker, fields: Sequence[Field], build: Callable[..., T]
) -> T | None:
    """An optional mapping of scalar fields at `path`; absent means all defaults."""
    if value is None:
        return build()
    kwargs = scalar_mapping(value, path, check, fields)
    return None if kwargs is None else build(**kwargs)


def scalar_mapping(value: object, path: str, check: Checker, fields: Sequence[Field]) -> dict[str, Any] | None:
    """Constructor kwargs of a mapping made only of `fields` (unknown keys reported); None if invalid."""
    node = mapping_of(value, path, check, [f.key for f in fields])
    return None if node is None else parse_fields(node, path, check, fields)

"""YAML text → ${ENV} and ${file:PATH} expansion → validation → `Config`, or `ConfigError(problems)`.

Owns the configuration file format: which keys exist, their types, defaults
and cross-checks.  Validation runs in one pass and collects every `Problem`,
keyed by its path (`pools.gateways.backends[1].address`), because
`lb validate` prints them all at once.  The dataclasses themselves live in
`lb.config.model`; durations are parsed by `lb.config.durations`.

Pure after the file read, with two deliberate exceptions: the files named by a
listener's `tls` block are checked (they exist, and the key matches the
certificate), the way `nginx -t` does, so that `lb validate` catches a broken
certificate before a deploy does; and `${file:PATH}` reads PATH (a key from a
mounted Kubernetes Secret), so every load, SIGHUP included, sees the file as it
is now and a rotated Secret takes effect without a restart.

One load's inputs are a `ConfigSource`: the main file's text and the content of
every `${file:PATH}` it substituted.  With `workers: N` the owner reads them
(`load_config_source`) and hands that source to its workers, which parse it with
no `${file:}` read of their own: a Secret rewritten between the owner's read and
a worker's cannot leave one instance sealing cookies with two sets of keys.
"""

from __future__ import annotations

import contextlib
import difflib
import errno
import ipaddress
import os
import re
import ssl
import stat
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from enum import Enum
from pathlib import Path
from typing import Any, Final, TypeVar

import yaml

from lb.config.durations import parse_duration
from lb.config.model import (
    AdminConfig,
    AffinityConfig,
    AffinityMode,
    BackendConfig,
    BalanceMethod,
    Config,
    DiscoveryConfig,
    DiscoveryType,
    EventLoop,
    HashKey,
    HashKeySource,
    HealthCheckConfig,
    HealthCheckType,
    LimitsConfig,
    ListenerConfig,
    LogFormat,
    LoggingConfig,
    PoolConfig,
    RouteConfig,
    RuntimeConfig,
    SameSite,
    SecureMode,
    TimeoutsConfig,
    TlsConfig,
)
from lb.errors import ConfigError, Problem
from lb.http.client_address import parse_network
from lb.tls import server_ssl_context, tls_files_fault

T = TypeVar("T")
E = TypeVar("E", bound=Enum)

MIN_SECRET_KEY_CHARS: Final = 32
# `${file:PATH}` holds a secret or a short value, never a document: a bigger file is a mistake.
MAX_FILE_REFERENCE_BYTES: Final = 64 * 1024
# A config file is a few kilobytes; a multi-megabyte one is a mistake (or a device) we refuse to hold.
MAX_CONFIG_BYTES: Final = 4 * 1024 * 1024
# Values (mappings, lists, scalars) in the expanded tree: a config with a thousand backends has a few thousand.
MAX_CONFIG_NODES: Final = 100_000
# Mappings and lists inside each other: a real configuration nests six deep.  The walks over the tree
# recurse, and libyaml reads a thousand levels (PyYAML's own reader stopped at about five hundred).
MAX_CONFIG_DEPTH: Final = 64


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes.

    Reload reads the config on the event loop, so nothing here may block: the file is opened
    with O_NONBLOCK (a FIFO nobody writes to would otherwise hang `open()` and the whole
    balancer), then refused unless it is a regular file (symlinks to one, as Kubernetes mounts
    Secrets, are fine).  Reading one byte past `limit` tells "too big" without reading it all.

    Raises:
        OSError: unreadable, not a regular file, or larger than `limit` (its strerror says which).
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise OSError(errno.EFBIG, f"larger than {limit} bytes")
    return data
MAX_WORKERS: Final = 64
LOG_LEVELS: Final = ("DEBUG", "INFO", "WARNING", "ERROR")


# --------------------------------------------------------------------------- entry points


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Everything one configuration was parsed from, as read at one moment: the main file's text and the
    content of every `${file:PATH}` it substituted (absolute path → the text put in its place).

    The owner of `workers: N` hands its workers this, not the file's name: given the same source, every
    process reaches the same `Config`, whatever the files hold by the time it parses.  `${NAME}` needs no
    snapshot: workers inherit the owner's environment.  `files` holds secrets: never log or show it.
    """

    text: str
    files: Mapping[str, str] = dataclass_field(default_factory=dict, repr=False)  # secrets: out of every repr


def load_config_source(
    path: str | Path, environ: Mapping[str, str] | None = None, *, source: ConfigSource | None = None
) -> tuple[Config, ConfigSource]:
    """Like `load_config`, and also the `ConfigSource` the result was parsed from.

    Args:
        path: the YAML file; relative TLS paths and `${file:PATH}` inside it resolve against its directory.
        environ: variables for `${NAME}`; `os.environ` when None.
        source: None reads the file and every `${file:PATH}` it names, now (the owner, a single process).
            Given (a worker: its owner's), exactly that is parsed: no `${file:PATH}` is read from disk, and
            one missing from `source.files` is a problem.

    Raises:
        ConfigError: a file cannot be read, or the configuration is invalid; carries every problem.
    """
    path = Path(path)
    text = read_config_text(path) if source is None else source.text
    env = os.environ if environ is None else environ
    config, files = _parse(text, base_dir=path.absolute().parent, environ=env,
                           snapshot=None if source is None else source.files)
    return config, ConfigSource(text, files)


def load_config(path: str | Path, environ: Mapping[str, str] | None = None) -> Config:
    """Read, expand and validate the configuration file at `path` and the `${file:PATH}` files it names, now.

    Args:
        path: the YAML file; relative TLS paths and `${file:PATH}` inside it resolve against its directory.
        environ: variables for `${NAME}`; `os.environ` when None.

    Returns:
        The validated configuration (`load_config_source` also returns what it was parsed from).

    Raises:
        ConfigError: the file cannot be read or is invalid; carries every problem.
    """
    return load_config_source(path, environ)[0]


def load_admin_config(
    path: str | Path, environ: Mapping[str, str] | None = None, *, token: str | None = None
) -> AdminConfig:
    """Only the `admin` section of the configuration file at `path`, expanded and checked as `lb run` would.

    For `lb ctl --config`: an operator's shell needs the admin address and token, and may well be
    unable to read the rest (the TLS key, the cookie keys' variables or files).  The file's top
    level is still checked as `lb run` checks it (not empty, a mapping, known keys, no key twice),
    so a wrong file or a typo (`admn:`) is refused rather than read as "admin on its defaults".

    `token` (`lb ctl --token`) stands in for `admin.token`, which is then not read: its variable or
    file need not be there.

    Raises:
        ConfigError: the file cannot be read, is not YAML, its top level is wrong, or its `admin`
            section is invalid.
    """
    path = Path(path)
    check = _Checker(base_dir=path.absolute().parent)
    tree = _parse_yaml(read_config_text(path), check)
    if not check.unreadable:
        # The keys YAML repeated below the other sections (in a pool, say) are `lb validate`'s to say;
        # the top level's and admin's are ours.  Every problem found after this point is ours too.
        repeated = [p for p in check.problems if "." not in p.path or p.path.startswith("admin.")]
        check.problems[:] = repeated
        root = _root(tree, check)
        if root is not None:
            node, env = root.get("admin"), os.environ if environ is None else environ
            if token is not None and isinstance(node, dict):
                node = _expand({key: value for key, value in node.items() if key != "token"}, "admin", env, check,
                               set())
                if isinstance(node, dict):
                    # After the expansion, so the flag's value is taken as it is; marked as if from a
                    # variable, so that no message ever shows it.
                    node["token"] = _Expanded(token)
            else:
                node = _expand(node, "admin", env, check, set())
            admin = _admin(node, check)
            if admin is not None and not check.problems:
                return admin
    raise ConfigError(check.problems or [Problem("", "invalid configuration")])


def read_config_text(path: Path) -> str:
    """The text of the configuration file at `path`, as `load_config` parses it.

    Raises:
        ConfigError: the file cannot be read, is not a regular file, is too large or is not UTF-8.
    """
    try:
        return read_regular_file(path, MAX_CONFIG_BYTES).decode("utf-8")
    except OSError as exc:
        raise ConfigError([Problem("", f"cannot read {path}: {exc.strerror or exc}")]) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([Problem("", f"cannot read {path}: not UTF-8 text ({exc.reason})")]) from exc


def parse_config(
    text: str, *, base_dir: Path, environ: Mapping[str, str], cpu_count: int | None = None
) -> Config:
    """Validate configuration text.

    Args:
        text: the YAML document.
        base_dir: directory that relative file paths (TLS cert/key, `${file:PATH}`) are relative to.
        environ: variables for `${NAME}` and `${NAME:-default}` in string values.
        cpu_count: what `workers: auto` means; the CPUs this process may run on when None.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: one `Problem` per mistake found, all of them.
    """
    return _parse(text, base_dir=base_dir, environ=environ, cpu_count=cpu_count)[0]


def _parse(
    text: str, *, base_dir: Path, environ: Mapping[str, str], cpu_count: int | None = None,
    snapshot: Mapping[str, str] | None = None,
) -> tuple[Config, dict[str, str]]:
    """`parse_config`, and the `${file:PATH}` contents it substituted; `snapshot`: take them from there, not disk."""
    check = _Checker(base_dir=base_dir, cpu_count=cpu_count, snapshot=snapshot)
    tree = _parse_yaml(text, check)
    if not check.unreadable:  # a repeated key is a problem, but the rest is still checked
        tree = _expand(tree, "", environ, check, active=set())
        if check.nodes > MAX_CONFIG_NODES:
            raise ConfigError(check.problems)  # the one problem that matters; the rest is cut short
        config = _config(tree, check)
        if config is not None and not check.problems:
            return config, check.files_read
    # A builder only returns None after recording why, so problems is non-empty here.
    raise ConfigError(check.problems or [Problem("", "invalid configuration")])


# --------------------------------------------------------------------------- plumbing


class _Reported:
    """Marks a value whose problem is already recorded (an unset `${VAR}`, a missing required key).

    Validators skip it silently, so one mistake is reported once.
    """

    def __repr__(self) -> str:
        return "<reported>"


_REPORTED: Final = _Reported()


class _Expanded(str):
    """A string produced by `${...}` expansion.

    Environment variables are always text, so integer and boolean fields accept
    an expanded "8080" or "true" where YAML would have given them 8080 or true.
    """

    __slots__ = ()


class _Bad(Exception):
    """A value parser's complaint; becomes a Problem at the value's path."""


class _Checker:
    """Collects problems during the one validation pass."""

    def __init__(self, *, base_dir: Path, cpu_count: int | None = None,
                 snapshot: Mapping[str, str] | None = None) -> None:
        self.base_dir = base_dir
        self.cpu_count = cpu_count
        # `${file:PATH}`: None reads the disk; a mapping (the owner's `ConfigSource.files`) is read instead.
        self.snapshot = snapshot
        self.files_read: dict[str, str] = {}  # absolute path → what replaced the reference (a ConfigSource's files)
        self.problems: list[Problem] = []
        self.nodes = 0  # values the ${...} expansion has walked (MAX_CONFIG_NODES)
        self.too_deep = False  # the expansion met a value nested past MAX_CONFIG_DEPTH (said once)
        self.stood_in = False  # the YAML was read with references in stand-in characters (_parse_yaml)
        self.unreadable = False  # not YAML at all: nothing more to check

    def add(self, path: str, message: str) -> None:
        self.problems.append(Problem(path, message))


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def _kind(value: object) -> str:
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
        return "str"  # a `${VAR}`'s value too (_Expanded)
    return type(value).__name__  # list, date, bytes, set, ...


def _got(value: object) -> str:
    """`_kind`, but a string written in the file itself is shown (`got str 'lots'`), as a number is:
    one from a `${VAR}` is not, since a variable may hold a secret."""
    if isinstance(value, str) and not isinstance(value, _Expanded):
        return f"str {_show(value)}"
    return _kind(value)


def _show(value: object) -> str:
    """Quote a value of the right type but wrong content for "got '...'" messages."""
    if isinstance(value, str):
        return repr(str(value) if len(value) <= 60 else value[:57] + "...")
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return _kind(value)


# --------------------------------------------------------------------------- YAML and ${ENV}


def _parse_yaml(text: str, check: _Checker) -> object:
    found = len(check.problems)
    try:
        return _safe_load(text, check)
    except yaml.MarkedYAMLError as exc:
        del check.problems[found:]  # repeated keys seen before the error: said once, by the reading that counts
        fault = exc
        stood_in = _stand_in(text) if "${" in text and not _STOOD_IN_RE.search(text) else text
        if stood_in != text:
            # SPEC writes `secret_keys: [${LB_COOKIE_KEY}]`, which YAML alone refuses: inside [ ] and
            # { } a brace ends a plain value.  Read again with each reference's characters standing
            # in for themselves; the expansion puts them back.  Still broken: that reading's error is
            # the one to name (one character for one, so its line and column are the file's); the
            # first only points at the `${`, which that reading got past.
            try:
                tree = _safe_load(stood_in, check)
            except yaml.MarkedYAMLError as later:
                fault = later
            except (yaml.YAMLError, ValueError, RecursionError):
                pass
            else:
                check.stood_in = True
                return tree
            del check.problems[found:]  # that reading failed too: its repeated keys are not said either
        check.add("", _yaml_message(fault, text))
    except yaml.YAMLError as exc:
        check.add("", f"invalid YAML: {exc}")
    except (ValueError, RecursionError) as exc:
        # safe_load builds dates itself: "2024-13-01" raises ValueError, not YAMLError.
        check.add("", f"invalid YAML: {exc}")
    check.unreadable = True
    return None


# libyaml's parser, where PyYAML was built with it (its wheels are): five times faster than PyYAML's
# own (a 3 MB file in 1.8 s, not 9.4 s), and a reload of a large file spends that in its thread.
# Its errors say less ("found character that cannot start any token", not which one; "did not find
# expected ',' or '}'", not what came instead), so a file it refuses is read again by PyYAML's
# parser, for the error this loader has always given.
# And where the two readers read one text differently, PyYAML's reads it, as it always has: a tab
# (libyaml takes one for a separator: `port: 8080<TAB>`), a BOM past the start (libyaml drops it),
# a tag (an empty `!` is '' to libyaml, null to PyYAML), a block scalar's header running into a
# comment (`|#`).  Cheap to look for; a file with any of them (a `!` in a comment) is only read slower.
_FAST_LOADER: Final[type[yaml.CSafeLoader] | None] = getattr(yaml, "CSafeLoader", None)
_READERS_DIFFER: Final = re.compile("[\t!]|[|>][-+0-9]*#|(?s:.)\ufeff")


def _safe_load(text: str, check: _Checker) -> object:
    """`yaml.safe_load`, in its two steps, so that the node tree is at hand for `_duplicate_keys`."""
    if _FAST_LOADER is not None and not _READERS_DIFFER.search(text):
        found = len(check.problems)
        try:
            return _load_with(_FAST_LOADER, text, check)
        except (yaml.YAMLError, ValueError, RecursionError):
            del check.problems[found:]  # its repeated keys, if it got that far: the reading below says them
    return _load_with(yaml.SafeLoader, text, check)


def _load_with(loader_class: type[yaml.SafeLoader] | type[yaml.CSafeLoader], text: str, check: _Checker) -> object:
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _duplicate_keys(node, check)  # first: constructing flattens `<<` merges into the nodes
        return loader.construct_document(node)
    finally:
        loader.dispose()


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_keys(root: yaml.Node, check: _Checker) -> None:
    """A key given twice in one mapping is a problem at its path.

    YAML loaders keep the last value without a word, so a second `token:` or a second pool of the
    same name would silently replace the first (yaml.v3, behind Traefik, refuses them too).  Keys
    merged in with `<<` are meant to be overridden and are not counted.  Each node is walked once:
    aliases share nodes, and a "billion laughs" file must not multiply the walk.
    """
    seen: set[int] = set()
    pending: list[tuple[yaml.Node, str]] = [(root, "")]
    found: list[tuple[int, str, str]] = []
    while pending:
        node, path = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_lines: dict[tuple[str, str], int] = {}  # (tag, text) of each key → its line
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    pending.append((value_node, path))
                    continue
                key_path = _join(path, key_node.value)
                line = key_node.start_mark.line + 1
                key = (key_node.tag, key_node.value)
                if key in first_lines:
                    first = first_lines[key]
                    where = f"twice on line {line}" if first == line else f"first on line {first}, again on line {line}"
                    found.append((line, key_path, f"duplicate key: {where}"))
                else:
                    first_lines[key] = line
                pending.append((value_node, key_path))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((item, f"{path}[{i}]") for i, item in enumerate(node.value))
    for _, key_path, message in sorted(found):
        check.add(key_path, message)


def _yaml_message(exc: yaml.MarkedYAMLError, text: str) -> str:
    mark = exc.problem_mark or exc.context_mark
    # The problem may quote a character of the stand-in reading (`_stand_in`): say the file's own.
    what = _STOOD_IN_RE.sub(_stood_for, exc.problem or exc.context or "syntax error")
    if mark is None:
        return f"invalid YAML: {what}"
    message = f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {what}"
    lines = text.splitlines()
    line = lines[mark.line] if mark.line < len(lines) else ""
    if "${" in line and "{" in what:
        # `[${KEY}]` is not YAML: braces are flow indicators inside [ ] and { }.
        message += '; inside [ ] or { }, quote ${...} references, e.g. ["${LB_COOKIE_KEY}"]'
    return message


# `$${` is a literal `${` (as in docker compose); a `${` that matches no form is an error.
# `${file:PATH}` is the file's content without its trailing newline (how Secrets are mounted).
_REFERENCE_RE = re.compile(
    r"\$\$\{|\$\{file:(?P<file>[^}]+)\}|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|\$\{"
)


# Plane 15's private-use characters, one for each character of a plain `${NAME}` reference, while
# YAML reads a file that needs them (`_parse_yaml`): none is a flow indicator or a space, and one
# character for one keeps YAML's line and column numbers those of the file.  Only the plain form:
# its characters mean the same to YAML in every context (no quote, escape, `: `, ` #` or line end
# in a name), so standing in for them changes nothing else in the file.  `${NAME:-default}` and
# `${file:PATH}` inside [ ] or { } still need quotes (the error says so).  A file that already holds
# such characters is not read this way: they would be taken for stand-ins.
_STAND_IN = 0xF0000
_STOOD_IN_RE = re.compile("[\U000F0000-\U000FFFFD]+")
_PLAIN_REFERENCE_RE = re.compile(r"(?<!\$)\$\{[A-Za-z_][A-Za-z0-9_]*\}")


def _stand_in(text: str) -> str:
    return _PLAIN_REFERENCE_RE.sub(lambda match: "".join([chr(_STAND_IN + ord(char)) for char in match[0]]), text)


def _stood_for(match: re.Match[str]) -> str:
    return "".join([chr(ord(char) - _STAND_IN) for char in match[0]])


def _expand(node: object, path: str, environ: Mapping[str, str], check: _Checker, active: set[int]) -> object:
    """Expand `${NAME}` in every string value (not in keys) of the parsed tree."""
    # YAML aliases can nest a few lines into billions of values ("billion laughs"): count what the
    # walk visits, and stop at a number no real configuration comes near.
    check.nodes += 1
    if check.nodes > MAX_CONFIG_NODES:
        if check.nodes == MAX_CONFIG_NODES + 1:
            check.add(path, f"the configuration expands to more than {MAX_CONFIG_NODES} values, which no "
                            "configuration needs (YAML aliases nested inside each other?)")
        return _REPORTED
    if isinstance(node, str):
        if check.stood_in:
            node = _STOOD_IN_RE.sub(_stood_for, node)
        return _expand_string(node, path, environ, check)
    if not isinstance(node, dict | list):
        return node
    # YAML aliases can also build a list that contains itself; never walk in circles.
    if id(node) in active:
        check.add(path, "a YAML alias refers to one of its own parents")
        return _REPORTED
    if len(active) >= MAX_CONFIG_DEPTH:  # `active` holds the mappings and lists this one is inside
        if not check.too_deep:
            check.too_deep = True
            check.add(path, f"mappings and lists nested more than {MAX_CONFIG_DEPTH} deep, which no configuration "
                            "needs (YAML aliases nested inside each other?)")
        return _REPORTED
    active.add(id(node))
    try:
        if isinstance(node, dict):
            if check.stood_in:  # keys are not expanded, but must read as written (in messages, say)
                node = {_STOOD_IN_RE.sub(_stood_for, k) if isinstance(k, str) else k: v for k, v in node.items()}
            return {k: _expand(item, _join(path, k), environ, check, active) for k, item in node.items()}
        return [_expand(item, f"{path}[{i}]", environ, check, active) for i, item in enumerate(node)]
    finally:
        active.discard(id(node))


def _expand_string(text: str, path: str, environ: Mapping[str, str], check: _Checker) -> object:
    if "${" not in text:
        return text
    unset: list[str] = []
    unreadable: list[str] = []
    malformed = False

    def substitute(match: re.Match[str]) -> str:
        nonlocal malformed
        if match[0] == "$${":
            return "${"
        if match["file"] is not None:
            content, problem = _read_reference(match["file"], check)
            if problem is not None:
                unreadable.append(problem)
            return content
        name, default = match["name"], match["default"]
        if name is None:
            malformed = True
            return match[0]
        value = environ.get(name)
        if default is not None and not value:  # shell semantics: unset or empty
            return default
        if value is None:
            unset.append(name)
            return ""
        return value

    result = _REFERENCE_RE.sub(substitute, text)
    for name in unset:
        check.add(path, f"environment variable {name} is not set")
    for problem in unreadable:
        check.add(path, problem)
    if malformed:
        check.add(path, f"expected ${{NAME}} or ${{NAME:-default}}, got {_show(text)}")
    return _REPORTED if unset or unreadable or malformed else _Expanded(result)


def _read_reference(name: str, check: _Checker) -> tuple[str, str | None]:
    """The text of a `${file:PATH}` reference, or a problem naming the path (never its content).

    From `check.snapshot` when there is one (a worker: what its owner read, so both substitute the same
    bytes), else from the disk; either way recorded in `check.files_read`.
    """
    path = Path(os.path.abspath(check.base_dir / Path(name.strip()).expanduser()))
    if str(path) in check.files_read:  # named twice: read once, so one load never sees two versions of it
        return check.files_read[str(path)], None
    if check.snapshot is not None:
        snapshotted = check.snapshot.get(str(path))
        if snapshotted is None:  # the same text names the same files: only a mismatched source gets here
            return "", f"file {path} is not among the files the configuration was read with"
        check.files_read[str(path)] = snapshotted
        return snapshotted, None
    content, problem = _read_reference_file(path)
    if problem is None:
        check.files_read[str(path)] = content
    return content, problem


def _read_reference_file(path: Path) -> tuple[str, str | None]:
    try:
        data = read_regular_file(path, MAX_FILE_REFERENCE_BYTES)
    except OSError as exc:
        if exc.errno == errno.EFBIG:
            return "", f"file {path} is larger than {MAX_FILE_REFERENCE_BYTES} bytes"
        return "", f"cannot read file {path}: {exc.strerror or exc}"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return "", f"file {path} is not UTF-8 text"
    # `echo key > file` and `kubectl create secret --from-file` differ by one trailing newline.
    return text.rstrip("\r\n"), None


# --------------------------------------------------------------------------- scalar parsers
# Each takes the raw YAML value and returns the typed value or raises _Bad(message).

Parser = Callable[[object], Any]


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {_kind(value)}")
    if not value:
        raise _Bad("expected a non-empty string")
    return str(value)  # a plain str, not _Expanded


def _secret(value: object) -> str:
    """Like _string, but for tokens: the message never echoes the value, even a numeric one."""
    if not isinstance(value, str):
        raise _Bad(f"expected a string, got {type(value).__name__}")
    return _string(value)


def _integer(low: int, high: int) -> Parser:
    def parse(value: object) -> int:
        if isinstance(value, _Expanded) and value.isascii() and value.isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad(f"expected an integer from {low} to {high}, got {_got(value)}")
        if not low <= value <= high:
            raise _Bad(f"expected an integer from {low} to {high}, got {value}")
        return value

    return parse


def _number(low: float, high: float) -> Parser:
    def parse(value: object) -> float:
        if isinstance(value, _Expanded):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise _Bad(f"expected a number from {low:g} to {high:g}, got {_got(value)}")
        if not low <= value <= high:
            raise _Bad(f"expected a number from {low:g} to {high:g}, got {value:g}")
        return float(value)

    return parse


def _boolean(value: object) -> bool:
    if isinstance(value, _Expanded) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise _Bad(f"expected true or false, got {_show(value)}")
    return value


def _duration(*, allow_zero: bool = False) -> Parser:
    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise _Bad(f"expected a duration like 500ms, 2s, 5m or 1h, got {_kind(value)}")
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            raise _Bad(str(exc)) from None
        if seconds == 0 and not allow_zero:
            raise _Bad(f"expected a duration greater than 0, got {_show(value)}")
        return seconds

    return parse


def _choice(options: Mapping[str, T]) -> Callable[[object], T]:
    """Case-insensitive choice; `options` maps each accepted spelling to its value."""
    by_lower = {name.lower(): value for name, value in options.items()}

    def parse(value: object) -> T:
        if isinstance(value, str) and value.lower() in by_lower:
            return by_lower[value.lower()]
        raise _Bad(f"expected one of {', '.join(options)}, got {_show(value)}")

    return parse


def _enum(enum: type[E]) -> Callable[[object], E]:
    return _choice({str(member.value): member for member in enum})


def _secure(value: object) -> SecureMode:
    # YAML reads `secure: true` as a bool; it can only mean "always" (and false "never").
    if isinstance(value, bool):
        return SecureMode.ALWAYS if value else SecureMode.NEVER
    return _enum(SecureMode)(value)


def _prefixed_path(value: object) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise _Bad(f"expected a path starting with '/', got {_show(text)}")
    return text


# What lb.http.head accepts in a request-target (RFC 9112 §3.2: visible ASCII), less `#`: a fragment
# is not sent on the wire.
_REQUEST_PATH_RE = re.compile(r"/[\x21-\x22\x24-\x7e]*")


def _request_path(value: object) -> str:
    """A path the health check sends as is: what a strict backend (and our own parser) reads."""
    text = _prefixed_path(value)
    if not _REQUEST_PATH_RE.fullmatch(text):
        raise _Bad(
            f"expected a request path of visible ASCII without '#' (percent-encode spaces and anything "
            f"else), got {_show(text)}"
        )
    return text


# RFC 6265 §4.1.1: cookie-name is an RFC 2616 token (no CTLs, spaces or separators).
_COOKIE_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


# Ids, pool names and cookie/header names travel in every token, Set-Cookie, URL and metric label:
# the affinity token carries a backend id in at most 255 bytes, and one cookie must stay far below
# the 4096 bytes browsers keep (RFC 6265 §6.1).  64 characters leaves room for all of them.
MAX_NAME_CHARS = 64


def _matching(pattern: re.Pattern[str], expected: str, *, max_chars: int = MAX_NAME_CHARS) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _string(value)
        if len(text) > max_chars:
            raise _Bad(f"expected at most {max_chars} characters, got {len(text)}")
        if not pattern.fullmatch(text):
            raise _Bad(f"expected {expected}, got {_show(text)}")
        return text

    return parse


_cookie_name = _matching(_COOKIE_NAME_RE, "a cookie name (letters, digits and !#$%&'*+-.^_`|~)")
# Header names are RFC 9110 tokens too.
_header_name = _matching(_COOKIE_NAME_RE, "a header name (letters, digits and !#$%&'*+-.^_`|~)")
# Backend ids and pool names appear in URLs (/pools/{pool}/backends/{id}/drain) and metric labels.
_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")
_id_chars = _matching(_ID_RE, "letters, digits and . _ : - only")
# The affinity token seals backend id and pool name (at most 255 bytes each); keeping both far
# below that also keeps a cookie with one pin per pool well under browsers' 4096-byte limit.
MAX_ID_CHARS = 64


def _identifier(value: object) -> str:
    text = _id_chars(value)
    if len(text) > MAX_ID_CHARS:
        raise _Bad(f"expected at most {MAX_ID_CHARS} characters, got {len(text)}")
    return text


def _hash_key(value: object) -> HashKey:
    """`header:X-User-Id`, `query:uid` or `cookie:NAME`."""
    text = _string(value)
    source, colon, name = text.partition(":")
    expected = "header:NAME, query:NAME or cookie:NAME"
    if not colon or source not in HashKeySource.__members__.values():
        raise _Bad(f"expected {expected}, got {_show(text)}")
    if not _COOKIE_NAME_RE.fullmatch(name) or len(name) > 256:
        raise _Bad(f"expected {expected} with NAME a token (letters, digits and !#$%&'*+-.^_`|~), got {_show(text)}")
    return HashKey(source=HashKeySource(source), name=name)


def default_backlog(somaxconn_path: str = "/proc/sys/net/core/somaxconn") -> int:
    """max(net.core.somaxconn, 4096): the kernel caps listen() at somaxconn anyway."""
    try:
        with open(somaxconn_path, encoding="ascii") as file:
            return max(int(file.read().strip()), 4096)
    except (OSError, ValueError):
        return 4096


_HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def _address(*, min_port: int) -> Callable[[object], tuple[str, int]]:
    """host:port with the host a name, an IPv4 literal, or an IPv6 literal in brackets."""

    def parse(value: object) -> tuple[str, int]:
        if not isinstance(value, str):
            raise _Bad(f"expected host:port, got {_kind(value)}")
        host, port = _split_host_port(value.strip())
        if host is None or port is None:
            hint = " (write IPv6 addresses as [::1]:8080)" if value.count(":") > 1 else ""
            raise _Bad(f"expected host:port{hint}, got {_show(value)}")
        if not min_port <= port <= 65535:
            raise _Bad(f"expected a port from {min_port} to 65535, got {port}")
        return host, port

    return parse


def _split_host_port(text: str) -> tuple[str | None, int | None]:
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        valid_host = bool(sep) and _is_ip(host, version=6)
    else:
        host, sep, port_text = text.rpartition(":")
        valid_host = bool(sep) and _is_host(host)
    port = int(port_text) if port_text.isascii() and port_text.isdigit() else None
    return (host if valid_host else None), port


def _is_ip(text: str, *, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _is_host(text: str) -> bool:
    if re.fullmatch(r"[0-9.]+", text):  # all digits and dots: must be an IPv4 literal
        return _is_ip(text, version=4)
    return len(text) <= 253 and _HOSTNAME_RE.fullmatch(text) is not None


def _is_loopback(host: str) -> bool:
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# --------------------------------------------------------------------------- structure helpers


@dataclass(frozen=True, slots=True)
class _Field:
    """One scalar key of a section: its parser, and whether it must be present."""

    key: str
    parse: Parser
    required: bool = False


def _mapping(value: object, path: str, check: _Checker, allowed: Collection[str]) -> dict[Any, object] | None:
    """The value as a mapping, after reporting every key not in `allowed`."""
    if value is _REPORTED:
        return None
    if not isinstance(value, dict):
        check.add(path, f"expected a mapping, got {_kind(value)}")
        return None
    for key in value:
        if key not in allowed:
            check.add(_join(path, key), _unknown_key(key, allowed))
    return value


def _unknown_key(key: object, allowed: Collection[str]) -> str:
    message = f"unknown key {_show(key)}"
    if isinstance(key, str):
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        if close:
            message += f" (did you mean {close[0]!r}?)"
    return message


def _list(value: object, path: str, check: _Checker, *, what: str) -> list[object] | None:
    """The value as a non-empty list."""
    if value is _REPORTED:
        return None
    if not isinstance(value, list):
        check.add(path, f"expected a list of {what}, got {_kind(value)}")
        return None
    if not value:
        check.add(path, f"expected at least one {what.removesuffix('s')}")
        return None
    return value


def _get(node: Mapping[Any, object], key: str, path: str, check: _Checker, *, required: bool) -> object:
    """The value at `key`; None if absent or null (use the default); _REPORTED if required and absent."""
    value = node.get(key)
    if value is None and required:
        message = "expected a value, got null" if key in node else "missing required key"
        check.add(_join(path, key), message)
        return _REPORTED
    return value


def _fields(
    node: Mapping[Any, object], path: str, check: _Checker, fields: Sequence[_Field]
) -> dict[str, Any] | None:
    """Parse the scalar keys of a section into constructor kwargs; None if any is invalid.

    Absent (or null) optional keys are left out, so the dataclass default applies.
    """
    kwargs: dict[str, Any] = {}
    valid = True
    for field in fields:
        value = _get(node, field.key, path, check, required=field.required)
        if value is None:
            continue
        if value is _REPORTED:
            valid = False
            continue
        try:
            kwargs[field.key] = field.parse(value)
        except _Bad as exc:
            check.add(_join(path, field.key), str(exc))
            valid = False
    return kwargs if valid else None


def _simple_section(
    root: Mapping[Any, object], key: str, check: _Checker, fields: Sequence[_Field], build: Callable[..., T]
) -> T | None:
    """An optional top-level section made only of scalar fields (timeouts, limits, logging, runtime)."""
    return _scalar_section(root.get(key), key, check, fields, build)


def _scalar_section(
    value: object, path: str, check: _Checker, fields: Sequence[_Field], build: Callable[..., T]
) -> T | None:
    """An optional mapping of scalar fields at `path`; absent means all defaults."""
    if value is None:
        return build()
    kwargs = _scalar_mapping(value, path, check, fields)
    return None if kwargs is None else build(**kwargs)


def _scalar_mapping(value: object, path: str, check: _Checker, fields: Sequence[_Field]) -> dict[str, Any] | None:
    """Constructor kwargs of a mapping made only of `fields` (unknown keys reported); None if invalid."""
    node = _mapping(value, path, check, [f.key for f in fields])
    return None if node is None else _fields(node, path, check, fields)


# --------------------------------------------------------------------------- sections

_TIMEOUT_FIELDS = (
    _Field("handshake", _duration()),
    _Field("backend_connect", _duration()),
    _Field("shutdown_grace", _duration(allow_zero=True)),
    _Field("shutdown_delay", _duration(allow_zero=True)),
    _Field("idle", _duration(allow_zero=True)),
    _Field("response", _duration()),
)
_LIMIT_FIELDS = (
    _Field("max_header_bytes", _integer(1024, 1024 * 1024)),
    _Field("max_connections", _integer(1, 10_000_000)),
    _Field("handshake_rate_per_ip", _number(0, 1_000_000)),
    _Field("handshake_burst_per_ip", _integer(1, 1_000_000)),
)
_LOGGING_FIELDS = (
    _Field("level", _choice({level: level for level in LOG_LEVELS})),
    _Field("format", _enum(LogFormat)),
    _Field("access_log", _boolean),
)
_RUNTIME_FIELDS = (_Field("event_loop", _enum(EventLoop)),)
_ADMIN_FIELDS = (_Field("bind", _address(min_port=0)), _Field("token", _secret))
_AFFINITY_FIELDS = (
    _Field("mode", _enum(AffinityMode)),
    _Field("cookie", _cookie_name),
    _Field("max_age", _duration()),
    _Field("same_site", _enum(SameSite)),
    _Field("http_only", _boolean),
    _Field("secure", _secure),
    _Field("header", _header_name),
    _Field("query_param", _identifier),
    _Field("redispatch_grace", _duration(allow_zero=True)),
)
_LISTENER_FIELDS = (
    _Field("bind", _address(min_port=0), required=True),
    _Field("proxy_protocol", _boolean),
    _Field("backlog", _integer(1, 1_000_000)),
)
_TLS_FIELDS = (_Field("cert", _string, required=True), _Field("key", _string, required=True))
_ROUTE_FIELDS = (_Field("path_prefix", _prefixed_path, required=True), _Field("pool", _string, required=True))
_POOL_FIELDS = (
    _Field("balance", _enum(BalanceMethod)),
    _Field("slow_start", _duration(allow_zero=True)),
    _Field("hash_key", _hash_key),
    _Field("sticky", _boolean),
)
_HEALTH_FIELDS = (
    _Field("type", _enum(HealthCheckType)),
    _Field("path", _request_path),
    _Field("interval", _duration()),
    _Field("timeout", _duration()),
    _Field("rise", _integer(1, 1000)),
    _Field("fall", _integer(1, 1000)),
)
_BACKEND_FIELDS = (
    _Field("id", _identifier, required=True),
    _Field("address", _address(min_port=1), required=True),
    _Field("weight", _integer(1, 256)),
    _Field("max_connections", _integer(1, 10_000_000)),
)
_TOP_KEYS = (
    "listeners", "admin", "affinity", "routes", "pools", "timeouts", "limits", "logging", "runtime", "workers",
    "trusted_proxies",
)
_DISCOVERY_FIELDS = (
    _Field("dns", _matching(_HOSTNAME_RE, "a DNS name"), required=True),
    _Field("type", _enum(DiscoveryType)),
    _Field("port", _integer(1, 65535)),
    _Field("interval", _duration()),
    _Field("timeout", _duration()),
    _Field("max_backends", _integer(1, 10_000)),
)


def _workers(cpu_count: int | None) -> Parser:
    """`workers: N`, or `auto`: one per CPU this process may run on (capped at MAX_WORKERS)."""
    number = _integer(1, MAX_WORKERS)

    def parse(value: object) -> int:
        if value == "auto":
            cpus = cpu_count if cpu_count is not None else _usable_cpus()
            return max(1, min(MAX_WORKERS, cpus))
        try:
            return int(number(value))
        except _Bad:
            raise _Bad(f"expected auto or an integer from 1 to {MAX_WORKERS}, got {_got(value)}") from None

    return parse


def _usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota if one is set.

    Not os.cpu_count(): a container pinned to 2 of 64 cores, or limited to 2 CPUs of quota
    (Kubernetes `resources.limits.cpu: 2`), wants 2 workers, not 64.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = _cgroup_cpu_quota(Path("/sys/fs/cgroup/cpu.max"))
    return max(1, min(cpus, quota)) if quota is not None else cpus


def _cgroup_cpu_quota(path: Path) -> int | None:
    """CPUs allowed by a cgroup v2 `cpu.max` ("200000 100000" → 2, rounded up); None without a quota."""
    try:
        quota, period = path.read_text().split()[:2]
        if quota == "max":
            return None
        return max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def _root(tree: object, check: _Checker) -> dict[Any, object] | None:
    """The file's top level: a mapping of the known sections (each unknown key reported)."""
    if tree is None:
        check.add("", "the configuration is empty; expected listeners, affinity, routes and pools")
        return None
    return _mapping(tree, "", check, _TOP_KEYS)


def _config(tree: object, check: _Checker) -> Config | None:
    root = _root(tree, check)
    if root is None:
        return None
    listeners = _listeners(_get(root, "listeners", "", check, required=True), check)
    admin = _admin(root.get("admin"), check)
    if admin is not None and listeners is not None:
        _check_admin_bind(admin, listeners, check)
    affinity = _affinity(_get(root, "affinity", "", check, required=True), check)
    # Routes are checked against the pool names present, even if a pool is otherwise invalid,
    # so problems come out in the file's usual key order (routes before pools).
    pools_value = root.get("pools")
    pool_names = {str(name) for name in pools_value} if isinstance(pools_value, dict) else None
    pool_names = pool_names or None  # no pools at all: that problem is reported under pools
    routes = _routes(_get(root, "routes", "", check, required=True), check, pool_names)
    pools = _pools(_get(root, "pools", "", check, required=True), check)
    timeouts = _simple_section(root, "timeouts", check, _TIMEOUT_FIELDS, TimeoutsConfig)
    limits = _simple_section(root, "limits", check, _LIMIT_FIELDS, LimitsConfig)
    logging = _simple_section(root, "logging", check, _LOGGING_FIELDS, LoggingConfig)
    runtime = _simple_section(root, "runtime", check, _RUNTIME_FIELDS, RuntimeConfig)
    top = _fields(root, "", check, [_Field("workers", _workers(check.cpu_count))])
    trusted_proxies = _trusted_proxies(root.get("trusted_proxies"), check)
    if (
        top is None
        or trusted_proxies is None
        or
        listeners is None
        or admin is None
        or affinity is None
        or pools is None
        or routes is None
        or timeouts is None
        or limits is None
        or logging is None
        or runtime is None
    ):
        return None
    return Config(
        listeners=listeners,
        admin=admin,
        affinity=affinity,
        routes=routes,
        pools=pools,
        timeouts=timeouts,
        limits=limits,
        logging=logging,
        runtime=runtime,
        trusted_proxies=trusted_proxies,
        workers_auto=root.get("workers") == "auto",
        **top,
    )


def _listeners(value: object, check: _Checker) -> tuple[ListenerConfig, ...] | None:
    items = _list(value, "listeners", check, what="listeners")
    if items is None:
        return None
    listeners = [_listener(item, f"listeners[{i}]", check) for i, item in enumerate(items)]
    # The first listener at each (port, bind key): one look-up per listener, whatever their number
    # (a walk over the earlier ones made a 50,000-listener file a matter of minutes).
    firsts: dict[tuple[int, _BindKey], int] = {}
    for i, listener in enumerate(listeners):
        # Port 0 (an ephemeral port, as tests use) can repeat; anything else would fail to bind,
        # and so would an address beside its family's wildcard (127.0.0.1:8080 and 0.0.0.0:8080).
        if listener is None or listener.port == 0:
            continue
        own, collides = _bind_keys(listener.host)
        first = min((firsts[listener.port, key] for key in collides if (listener.port, key) in firsts), default=None)
        for key in own:
            firsts.setdefault((listener.port, key), i)
        if first is None:
            continue
        earlier = listeners[first]
        assert earlier is not None
        if earlier.host.lower().strip("[]") == listener.host.lower().strip("[]"):
            check.add(f"listeners[{i}].bind", f"duplicate bind {listener.bind} (first at listeners[{first}])")
        else:
            check.add(f"listeners[{i}].bind", f"{listener.bind} overlaps listeners[{first}] ({earlier.bind}): "
                                              "both cannot listen")
    return None if None in listeners else tuple(lis for lis in listeners if lis is not None)


def _listener(value: object, path: str, check: _Checker) -> ListenerConfig | None:
    node = _mapping(value, path, check, ("bind", "tls", "proxy_protocol", "backlog"))
    if node is None:
        return None
    kwargs = _fields(node, path, check, _LISTENER_FIELDS)
    tls: TlsConfig | None = None
    tls_value = node.get("tls")
    if tls_value is not None:
        tls = _tls(tls_value, _join(path, "tls"), check)
        if tls is None:
            return None
    if kwargs is None:
        return None
    host, port = kwargs.pop("bind")
    kwargs["backlog"] = kwargs.get("backlog") or default_backlog()
    return ListenerConfig(host=host, port=port, tls=tls, **kwargs)


def _trusted_proxies(
    value: object, check: _Checker
) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] | None:
    """`trusted_proxies`: a list (possibly empty) of CIDRs or addresses; absent or null is empty."""
    if value is None:
        return ()
    if not isinstance(value, list):
        check.add("trusted_proxies", f"expected a list of CIDRs such as [10.0.0.0/8], got {_kind(value)}")
        return None
    networks = []
    valid = True
    for i, item in enumerate(value):
        path = f"trusted_proxies[{i}]"
        if not isinstance(item, str):
            check.add(path, f"expected a CIDR such as 10.0.0.0/8, got {_kind(item)}")
            valid = False
            continue
        try:
            networks.append(parse_network(item))
        except ValueError as exc:
            check.add(path, str(exc))
            valid = False
    return tuple(networks) if valid else None


def _tls(value: object, path: str, check: _Checker) -> TlsConfig | None:
    node = _mapping(value, path, check, ("cert", "key"))
    if node is None:
        return None
    kwargs = _fields(node, path, check, _TLS_FIELDS)
    if kwargs is None:
        return None
    files: dict[str, str] = {}
    for key in ("cert", "key"):
        # Relative to the config file, so `lb run --config deploy/lb.yaml` works from anywhere.
        resolved = Path(os.path.abspath(check.base_dir / Path(kwargs[key]).expanduser()))
        if resolved.is_file():
            files[key] = str(resolved)
        elif resolved.exists():
            check.add(_join(path, key), f"not a regular file: {resolved}")  # a directory, a device
        else:
            check.add(_join(path, key), f"file not found: {resolved}")
    if len(files) < 2:
        return None
    tls = TlsConfig(cert=files["cert"], key=files["key"])
    try:
        server_ssl_context(tls)
    except (ssl.SSLError, OSError) as exc:
        faults = tls_files_fault(tls, exc)
        for which, why in faults:
            check.add(_join(path, which), why)
        if not faults:
            check.add(path, f"cannot load the certificate and key: {exc}")
        return None
    return tls


def _admin(value: object, check: _Checker) -> AdminConfig | None:
    if value is None:
        return AdminConfig()
    node = _mapping(value, "admin", check, [f.key for f in _ADMIN_FIELDS])
    if node is None:
        return None
    kwargs = _fields(node, "admin", check, _ADMIN_FIELDS)
    if kwargs is None:
        return None
    if "bind" in kwargs:
        kwargs["host"], kwargs["port"] = kwargs.pop("bind")
    admin = AdminConfig(**kwargs)
    # The admin API can drain and disable backends; off-host it must not be open to anyone.
    if admin.token is None and not _is_loopback(admin.host):
        check.add("admin.token", "a token is required when admin listens on a non-loopback address")
        return None
    return admin


def _check_admin_bind(admin: AdminConfig, listeners: Sequence[ListenerConfig], check: _Checker) -> None:
    """The admin API on a listener's address would fail to bind at start: said by `lb validate` instead."""
    if admin.port == 0:
        return
    for i, listener in enumerate(listeners):
        if listener.port == admin.port and _overlap(admin.host, listener.host):
            check.add("admin.bind", f"{admin.bind} overlaps listeners[{i}] ({listener.bind}); the admin API needs "
                                    "an address of its own")
            return


_WILDCARDS = {"0.0.0.0": 4, "::": 6}
_BindKey = tuple[str, str | int]


def _bind_keys(host: str) -> tuple[tuple[_BindKey, ...], tuple[_BindKey, ...]]:
    """The keys a bind on `host` claims on its port, and those of other binds it collides with: the
    host itself; an address also claims its family, which its family's wildcard collides with, and
    the wildcard claims the family's wildcard, which its addresses collide with.  Tagged, so that a
    host name can never equal a family's key.

    `::` takes no IPv4 address: every socket here is IPV6_V6ONLY.  Names are compared as written
    (resolving them is the start's business).
    """
    host = host.lower().strip("[]")
    wildcard = _WILDCARDS.get(host)
    if wildcard is not None:
        return (("host", host), ("any", wildcard)), (("host", host), ("ip", wildcard))
    for version in (4, 6):
        if _is_ip(host, version=version):
            return (("host", host), ("ip", version)), (("host", host), ("any", version))
    return (("host", host),), (("host", host),)


def _overlap(one: str, other: str) -> bool:
    """Whether two binds on one port collide (`_bind_keys`, for a pair)."""
    return not set(_bind_keys(one)[0]).isdisjoint(_bind_keys(other)[1])


def _affinity(value: object, check: _Checker) -> AffinityConfig | None:
    node = _mapping(value, "affinity", check, [*(f.key for f in _AFFINITY_FIELDS), "secret_keys"])
    if node is None:
        return None
    kwargs = _fields(node, "affinity", check, _AFFINITY_FIELDS)
    keys = _secret_keys(_get(node, "secret_keys", "affinity", check, required=True), check)
    if kwargs is None or keys is None:
        return None
    affinity = AffinityConfig(secret_keys=keys, **kwargs)
    # RFC 6265bis §5.4.7: browsers drop SameSite=None cookies that lack Secure.
    if affinity.same_site is SameSite.NONE and affinity.secure is SecureMode.NEVER:
        check.add("affinity.same_site", "same_site None needs the Secure attribute, but secure is never")
        return None
    return affinity


_SHORT_KEY = f"secret key must be at least {MIN_SECRET_KEY_CHARS} characters; generate one with `lb keygen`"


def _secret_keys(value: object, check: _Checker) -> tuple[str, ...] | None:
    path = "affinity.secret_keys"
    items = _list(value, path, check, what="secret keys")
    if items is None:
        return None
    keys: list[str] = []
    for i, item in enumerate(items):
        if item is _REPORTED:
            continue
        if not isinstance(item, str):
            check.add(f"{path}[{i}]", f"expected a string, got {type(item).__name__}")  # never echo a key
        elif len(item) < MIN_SECRET_KEY_CHARS:
            check.add(f"{path}[{i}]", _SHORT_KEY)
        else:
            keys.append(str(item))
    return tuple(keys) if len(keys) == len(items) else None


def _routes(value: object, check: _Checker, pools: Collection[str] | None) -> tuple[RouteConfig, ...] | None:
    items = _list(value, "routes", check, what="routes")
    if items is None:
        return None
    routes: list[RouteConfig | None] = []
    first_at: dict[str, int] = {}
    for i, item in enumerate(items):
        route = _route(item, f"routes[{i}]", check, pools)
        routes.append(route)
        if route is None:
            continue
        first = first_at.setdefault(route.path_prefix, i)
        if first != i:
            check.add(
                f"routes[{i}].path_prefix",
                f"duplicate path_prefix {_show(route.path_prefix)} (first at routes[{first}])",
            )
    return None if None in routes else tuple(r for r in routes if r is not None)


def _route(value: object, path: str, check: _Checker, pools: Collection[str] | None) -> RouteConfig | None:
    kwargs = _scalar_mapping(value, path, check, _ROUTE_FIELDS)
    # When pools is not a non-empty mapping, an "unknown pool" here would only be noise.  Checked
    # even when another field of the route is wrong: every problem at once.
    pool = kwargs["pool"] if kwargs is not None else _unchecked_text(value, "pool", path, check)
    if pools is not None and pool is not None and pool not in pools:
        known = ", ".join(sorted(pools))
        check.add(_join(path, "pool"), f"unknown pool {_show(pool)}; defined pools: {known}")
        return None
    return None if kwargs is None else RouteConfig(**kwargs)


def _unchecked_text(value: object, key: str, path: str, check: _Checker) -> str | None:
    """The text at `key` of an entry whose other fields failed, when nothing was said of this one."""
    text = value.get(key) if isinstance(value, dict) else None
    if not isinstance(text, str) or any(problem.path == _join(path, key) for problem in check.problems):
        return None
    return text


def _pools(value: object, check: _Checker) -> dict[str, PoolConfig] | None:
    if value is _REPORTED:
        return None
    if not isinstance(value, dict):
        check.add("pools", f"expected a mapping of pool names to pools, got {_kind(value)}")
        return None
    if not value:
        check.add("pools", "expected at least one pool")
        return None
    pools: dict[str, PoolConfig] = {}
    valid = True
    for name, item in value.items():
        path = _join("pools", name)
        try:
            pool_name = _identifier(name)
        except _Bad as exc:
            check.add(path, f"invalid pool name: {exc}")
            valid = False
            continue
        pool = _pool(pool_name, item, path, check)
        if pool is None:
            valid = False
        else:
            pools[pool_name] = pool
    return pools if valid else None


def _pool(name: str, value: object, path: str, check: _Checker) -> PoolConfig | None:
    node = _mapping(value, path, check, (*(f.key for f in _POOL_FIELDS), "health_check", "backends", "discovery"))
    if node is None:
        return None
    kwargs = _fields(node, path, check, _POOL_FIELDS)
    health = _health_check(node.get("health_check"), _join(path, "health_check"), check)
    discovery: DiscoveryConfig | None = None
    discovered = node.get("discovery") is not None
    if discovered:  # a wrong discovery still lets the rest of the pool be checked: every problem at once
        discovery = _discovery(node["discovery"], _join(path, "discovery"), check)
    # A pool needs backends from somewhere: a static list, DNS, or both.
    backends_value = _get(node, "backends", path, check, required=not discovered)
    backends = () if backends_value is None else _backends(backends_value, _join(path, "backends"), check)
    if kwargs is not None:
        balance = kwargs.get("balance")
        if balance is BalanceMethod.HASH and kwargs.get("hash_key") is None:
            check.add(
                _join(path, "hash_key"), "balance: hash needs a hash_key (header:NAME, query:NAME or cookie:NAME)"
            )
            kwargs = None
        elif balance is not BalanceMethod.HASH and kwargs.get("hash_key") is not None:
            check.add(_join(path, "hash_key"), "only used with balance: hash")
            kwargs = None
        elif balance not in (BalanceMethod.SOURCE, BalanceMethod.HASH) and kwargs.get("sticky") is False:
            check.add(_join(path, "sticky"), "only used with balance: source or hash (other pools always pin)")
            kwargs = None
    if kwargs is None or health is None or backends is None or (discovered and discovery is None):
        return None
    return PoolConfig(name=name, backends=backends, health_check=health, discovery=discovery, **kwargs)


def _discovery(value: object, path: str, check: _Checker) -> DiscoveryConfig | None:
    node = _mapping(value, path, check, (*(f.key for f in _DISCOVERY_FIELDS), "nameservers"))
    if node is None:
        return None
    kwargs = _fields(node, path, check, _DISCOVERY_FIELDS)
    nameservers: list[tuple[str, int]] = []
    valid = True
    servers_value = node.get("nameservers")
    if servers_value is not None:
        servers_path = _join(path, "nameservers")
        if not isinstance(servers_value, list):
            check.add(servers_path, f"expected a list of host:port, got {_kind(servers_value)}")
            valid = False
        else:
            parse = _address(min_port=1)
            for i, item in enumerate(servers_value):
                try:
                    host, port = parse(item)
                except _Bad as exc:
                    check.add(f"{servers_path}[{i}]", str(exc))
                    valid = False
                    continue
                # dnspython talks to nameservers by address only: a name would need a resolver first.
                if not (_is_ip(host, version=4) or _is_ip(host, version=6)):
                    check.add(f"{servers_path}[{i}]", f"expected an IP address, got {_show(host)}")
                    valid = False
                    continue
                nameservers.append((host, port))
    if kwargs is not None and kwargs.get("type") is DiscoveryType.A and kwargs.get("port") is None:
        check.add(_join(path, "port"), "type a needs a port (A records carry none)")
        return None
    if kwargs is None or not valid:
        return None
    return DiscoveryConfig(nameservers=tuple(nameservers), **kwargs)


def _health_check(value: object, path: str, check: _Checker) -> HealthCheckConfig | None:
    return _scalar_section(value, path, check, _HEALTH_FIELDS, HealthCheckConfig)


def _backends(value: object, path: str, check: _Checker) -> tuple[BackendConfig, ...] | None:
    items = _list(value, path, check, what="backends")
    if items is None:
        return None
    backends = [_backend(item, f"{path}[{i}]", check) for i, item in enumerate(items)]
    first_id: dict[str, int] = {}
    first_address: dict[tuple[str, int], int] = {}
    for i, backend in enumerate(backends):
        # A repeated id is said even when another field of the entry is wrong: every problem at once.
        backend_id = backend.id if backend is not None else _unchecked_text(items[i], "id", f"{path}[{i}]", check)
        if backend_id is not None:
            first = first_id.setdefault(backend_id, i)
            if first != i:
                check.add(
                    f"{path}[{i}].id", f"duplicate backend id {_show(backend_id)} (first at {path}[{first}])"
                )
        if backend is None:
            continue
        first = first_address.setdefault((backend.host.lower(), backend.port), i)
        if first != i:
            check.add(
                f"{path}[{i}].address",
                f"duplicate backend address {backend.address} (first at {path}[{first}])",
            )
    if None in backends or len(first_id) < len(backends) or len(first_address) < len(backends):
        return None
    return tuple(b for b in backends if b is not None)


def _backend(value: object, path: str, check: _Checker) -> BackendConfig | None:
    kwargs = _scalar_mapping(value, path, check, _BACKEND_FIELDS)
    if kwargs is None:
        return None
    kwargs["host"], kwargs["port"] = kwargs.pop("address")
    return BackendConfig(**kwargs)

"""Configuration text → the tree it means: YAML read safely, then every `${...}` reference expanded.

Owns the file format below its keys: YAML read by libyaml where that reads a text as PyYAML's own
parser does, a key written twice, trees too large or too deep for a real file ("billion laughs"),
and the references `${NAME}`, `${NAME:-default}`, `${file:PATH}` and `$${`.  `read_regular_file`
never blocks for good (on a FIFO, say: every later reload would wait behind it).  Which keys the
tree may hold is `lb.config.sections`'.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Mapping
from pathlib import Path
from typing import Final, TypeGuard

import yaml

from lb.config.checker import REPORTED, Checker, Expanded, join_path, show

# `${file:PATH}` holds a secret or a short value, never a document: a bigger file is a mistake.
MAX_FILE_REFERENCE_BYTES: Final = 64 * 1024
# Values (mappings, lists, scalars) in the expanded tree: a config with a thousand backends has a few thousand.
MAX_CONFIG_NODES: Final = 100_000
# Key-value pairs `<<` merges may copy into the mappings that merge, in all (`_merged_pairs`): twice the
# values, as a mapping that overrides every key it merges copies each twice (a template's 8 keys, all
# overridden in 7,000 backends, is 112,000 copies for 56,000 values).
MAX_MERGED_PAIRS: Final = 2 * MAX_CONFIG_NODES
# Mappings and lists inside each other: a real configuration nests six deep.  The walks over the tree
# recurse, and libyaml reads a thousand levels (PyYAML's own reader stopped at about five hundred).
MAX_CONFIG_DEPTH: Final = 64
# A value's path (`pools.gateways.backends[1].address`), in characters: a real one has well under 200.  Each
# value's path is a copy of its parent's and one more key, so keys of up to MAX_KEY_CHARS nested some 60 deep
# and walked through YAML aliases (66 KB of file) cost 1.6 s of a reload building paths of 30 KB each.
MAX_PATH_CHARS: Final = 2048
# Characters the `${...}` expansion may produce in all: each expanded string is a new copy, so a value
# shared by YAML aliases (or one string naming a variable or file thousands of times) costs its size
# at every use.  A 20 KB file asked for gigabytes; a real one produces a few kilobytes.
MAX_EXPANDED_CHARS: Final = 16 * 1024 * 1024


def relative_to_config(base_dir: Path, name: str) -> Path:
    """A file named in the configuration: `~` expanded, then relative to the config file's folder.

    Raises:
        ValueError: no file can have that name (a NUL, a lone surrogate), or a `~user` with no home;
        the message says which, without the rest of the name.
    """
    if "\0" in name:
        raise ValueError("a file name cannot hold a NUL character")
    try:
        os.fsencode(name)
    except UnicodeEncodeError:
        raise ValueError("a file name cannot hold a lone surrogate (\\udxxx)") from None
    try:
        expanded = Path(name).expanduser()
    except RuntimeError:  # pathlib's word for `~nosuchuser`
        raise ValueError(f"{show(name.split('/', 1)[0])} names no user with a home directory") from None
    return Path(os.path.abspath(base_dir / expanded))


def read_regular_file(path: Path, limit: int) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes.

    A reload reads the config in a thread, and the next reload waits for it, so nothing here may
    block for good: the file is opened with O_NONBLOCK (a FIFO nobody writes to would otherwise
    hang `open()`, and with it every reload after), then refused unless it is a regular file
    (symlinks to one, as Kubernetes mounts Secrets, are fine).  Reading one byte past `limit` tells
    "too big" without reading it all.

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


def parse_yaml(text: str, check: Checker) -> object:
    """The YAML tree of `text`, `${...}` references not yet expanded.

    Refusals are problems in `check`, not exceptions: YAML that does not parse (with its line and
    column), a repeated key.  SPEC's `[${VAR}]`, which YAML alone refuses, is read again with the
    references standing in for themselves (`check.stood_in`).

    Returns:
        The tree (None for an empty text), or None with `check.unreadable` set when the text is not YAML.
    """
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


def _safe_load(text: str, check: Checker) -> object:
    """`yaml.safe_load`, in its two steps, so that the node tree is at hand for `_check_nodes`."""
    if _FAST_LOADER is not None and not _READERS_DIFFER.search(text):
        found = len(check.problems)
        try:
            return _load_with(_FAST_LOADER, text, check)
        except (yaml.YAMLError, ValueError, RecursionError):
            del check.problems[found:]  # its repeated keys, if it got that far: the reading below says them
    return _load_with(yaml.SafeLoader, text, check)


def _load_with(loader_class: type[yaml.SafeLoader] | type[yaml.CSafeLoader], text: str, check: Checker) -> object:
    loader = loader_class(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        # First: constructing flattens `<<` merges into the nodes.
        for scalar in _check_nodes(node, check):
            loader.constructed_objects[scalar] = REPORTED  # built as said, never read
        return None if check.unreadable else loader.construct_document(node)
    finally:
        loader.dispose()


_MERGE_TAG = "tag:yaml.org,2002:merge"
_INT_TAG = "tag:yaml.org,2002:int"
# An integer's characters, at most.  No setting comes near (the largest are byte counts of ten
# digits), and an integer this long in any YAML form (decimal, 0x, 0o, 0b, 1:2:3) is read and
# printed within Python's int-string limit (4,300 digits by default, never under 640).  Past it,
# a decimal one failed while read (a ValueError naming no key) and a hexadecimal one when a message
# printed it (a traceback out of `lb validate`).
MAX_INTEGER_CHARS: Final = 100
# A mapping key's characters, at most: YAML's own bound on a plain key, which only an explicit `? key`
# passes.  The longest a configuration needs is a pool name (64; a longer one is that key's problem).
# A key is copied into the path of every value below it (and of every problem there), so a key of a
# megabyte over a few aliased lists cost seconds of a reload's thread and a log line of a megabyte.
MAX_KEY_CHARS: Final = 1024


def _check_nodes(root: yaml.Node, check: Checker) -> list[yaml.ScalarNode]:
    """What the node tree shows before it is built, each a problem at its path: a key given twice,
    an integer too long (`MAX_INTEGER_CHARS`), a key too long (`MAX_KEY_CHARS`).

    YAML loaders keep the last value without a word, so a second `token:` or a second pool of the
    same name would silently replace the first (yaml.v3, behind Traefik, refuses them too).  Keys
    merged in with `<<` are meant to be overridden and are not counted.  Each node is walked once:
    aliases share nodes, and a "billion laughs" file must not multiply the walk.

    Returns:
        The values too long, for the caller to build as REPORTED (the rest is still checked).  A key
        too long (either kind) leaves the document unread (`check.unreadable`): no value can stand in
        for a key, and its problem is said at the path of its mapping, which never holds it.
    """
    seen: set[int] = set()
    pending: list[tuple[yaml.Node, str]] = [(root, "")]
    found: list[tuple[int, str, str]] = []
    too_long: list[yaml.ScalarNode] = []
    merging: list[tuple[yaml.MappingNode, str]] = []  # mappings with a `<<`, for _merged_pairs
    while pending:
        node, path = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if _too_long(node):
            found.append((node.start_mark.line + 1, path, _too_long_message(node)))
            too_long.append(node)
        elif isinstance(node, yaml.MappingNode):
            first_lines: dict[tuple[str, str], int] = {}  # (tag, text) of each key → its line
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == _MERGE_TAG:
                    if key_node.tag == _MERGE_TAG and (not merging or merging[-1][0] is not node):
                        merging.append((node, path))
                    pending.append((value_node, path))
                    continue
                line = key_node.start_mark.line + 1
                if _too_long(key_node):
                    found.append((line, path, "a key: " + _too_long_message(key_node)))
                    check.unreadable = True
                    continue
                if len(key_node.value) > MAX_KEY_CHARS:
                    found.append((line, path, f"a key of {len(key_node.value)} characters, where no key takes "
                                              f"more than {MAX_KEY_CHARS}"))
                    check.unreadable = True
                    continue
                key_path = join_path(path, key_node.value)
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
    # Every mapping that merges is built with the pairs it merges in: the work is their sum.  Counted per
    # mapping, 400 mappings each merging one of 20,000 keys (213 KB) passed, and took 7.5 s and 285 MB.
    memo: dict[int, int] = {}
    copied = 0
    for node, path in merging:
        copied += _merged_pairs(node, memo)
        if copied > MAX_MERGED_PAIRS:
            found.append((node.start_mark.line + 1, path,
                          f"`<<` merges that copy more than {MAX_MERGED_PAIRS} values, which no configuration needs "
                          "(merges of merges, a large mapping merged many times, or one merged into itself)"))
            check.unreadable = True
            break
    for _, key_path, message in sorted(found):
        check.add(key_path, message)
    return too_long


def _merge_sources(node: yaml.Node) -> list[yaml.MappingNode]:
    """The mappings a mapping's `<<` keys merge in (none for anything else), as PyYAML reads them."""
    if not isinstance(node, yaml.MappingNode):
        return []
    sources: list[yaml.MappingNode] = []
    for key_node, value_node in node.value:
        if key_node.tag == _MERGE_TAG:
            if isinstance(value_node, yaml.MappingNode):
                sources.append(value_node)
            elif isinstance(value_node, yaml.SequenceNode):
                sources.extend(item for item in value_node.value if isinstance(item, yaml.MappingNode))
    return sources


def _merged_pairs(root: yaml.MappingNode, memo: dict[int, int]) -> int:
    """How many key-value pairs building `root` copies, each merge flattened as PyYAML before 6.0.4 does:
    the merged mappings' own merges again, every time one is named, with no note of those done.

    Merges of merges grow as a power: nine levels of a mapping merged nine times over, 495 bytes,
    took 26 s and 760 MB to build, past any check on the node tree (which shares the aliased nodes).
    PyYAML 6.0.4 flattens each merged mapping once, and pyproject asks for it; counted here, a file is
    refused the same whatever PyYAML reads it.  Counts stop at MAX_MERGED_PAIRS + 1, and a mapping that
    merges itself in (PyYAML builds it as if it did not) counts as past it: no configuration needs one.
    Each mapping is counted once (`memo`).
    """
    past = MAX_MERGED_PAIRS + 1
    in_progress: set[int] = set()
    stack: list[yaml.MappingNode] = [root]
    while stack:
        node = stack[-1]
        if id(node) in memo:
            stack.pop()
            continue
        sources = _merge_sources(node)
        waiting = [source for source in sources if id(source) not in memo]
        if waiting and id(node) not in in_progress:
            in_progress.add(id(node))
            stack.extend(waiting)
            continue
        stack.pop()
        in_progress.discard(id(node))
        if any(id(source) not in memo for source in sources):  # a source still in progress: a cycle
            memo[id(node)] = past
            continue
        own = sum(1 for key_node, _ in node.value if key_node.tag != _MERGE_TAG)
        memo[id(node)] = min(past, own + sum(memo[id(source)] for source in sources))
    return memo[id(root)]


def _too_long(node: yaml.Node) -> TypeGuard[yaml.ScalarNode]:
    return isinstance(node, yaml.ScalarNode) and node.tag == _INT_TAG and len(node.value) > MAX_INTEGER_CHARS


def _too_long_message(node: yaml.ScalarNode) -> str:
    return f"integer too long: {len(node.value)} characters, where no setting takes more than {MAX_INTEGER_CHARS}"


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
# `${file:PATH}` is the file's content without the line ends at its end (CR and LF: `echo`, an editor
# on Windows, a Secret made with --from-file).
_REFERENCE_RE = re.compile(
    r"\$\$\{|\$\{file:(?P<file>[^}]+)\}|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}|\$\{"
)


# Plane 15's private-use characters, one for each character of a plain `${NAME}` reference, while
# YAML reads a file that needs them (`parse_yaml`): none is a flow indicator or a space, and one
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


def expand(node: object, path: str, environ: Mapping[str, str], check: Checker, active: set[int]) -> object:
    """Expand `${NAME}` in every string value (not in keys) of the parsed tree."""
    # YAML aliases can nest a few lines into billions of values ("billion laughs"): count what the
    # walk visits, and stop at a number no real configuration comes near.
    check.nodes += 1
    if check.nodes > MAX_CONFIG_NODES:
        if check.nodes == MAX_CONFIG_NODES + 1:
            check.add(path, f"the configuration expands to more than {MAX_CONFIG_NODES} values, which no "
                            "configuration needs (YAML aliases nested inside each other?)")
        return REPORTED
    if isinstance(node, str):
        if check.stood_in:
            node = _STOOD_IN_RE.sub(_stood_for, node)
        return _expand_string(node, path, environ, check)
    if not isinstance(node, dict | list):
        return node
    # YAML aliases can also build a list that contains itself; never walk in circles.
    if id(node) in active:
        check.add(path, "a YAML alias refers to one of its own parents")
        return REPORTED
    if len(active) >= MAX_CONFIG_DEPTH:  # `active` holds the mappings and lists this one is inside
        if not check.too_deep:
            check.too_deep = True
            check.add(path, f"mappings and lists nested more than {MAX_CONFIG_DEPTH} deep, which no configuration "
                            "needs (YAML aliases nested inside each other?)")
        return REPORTED
    if len(path) > MAX_PATH_CHARS:  # nothing below it is walked: every path there is longer still
        if not check.too_long_path:
            check.too_long_path = True
            check.add(path[:MAX_PATH_CHARS] + "...", f"a value's path is longer than {MAX_PATH_CHARS} characters, "
                                                      "which no configuration needs (long keys nested deep?)")
        return REPORTED
    walking = id(node)  # the node as parsed: a stood-in mapping below is a copy, with an id of its own
    active.add(walking)
    try:
        if isinstance(node, dict):
            if check.stood_in:  # keys are not expanded, but must read as written (in messages, say)
                node = {_STOOD_IN_RE.sub(_stood_for, k) if isinstance(k, str) else k: v for k, v in node.items()}
            return {k: expand(item, join_path(path, k), environ, check, active) for k, item in node.items()}
        return [expand(item, f"{path}[{i}]", environ, check, active) for i, item in enumerate(node)]
    finally:
        active.discard(walking)


def _expand_string(text: str, path: str, environ: Mapping[str, str], check: Checker) -> object:
    if "${" not in text:
        return text
    if check.too_large:  # said once; scanning the rest would only spend the time the budget saves
        return REPORTED
    unset: list[str] = []
    unreadable: list[str] = []
    malformed = nested = too_large = False
    # What this string may still add; the text between its references counts as it is copied too.
    budget = MAX_EXPANDED_CHARS - check.expanded_chars - len(text)

    def substitute(match: re.Match[str]) -> str:
        nonlocal too_large, budget
        if too_large:
            return ""
        piece = _substitute(match)
        budget -= len(piece)
        if budget < 0:  # never built: stop adding to it
            too_large = True
            return ""
        return piece

    def _substitute(match: re.Match[str]) -> str:
        nonlocal malformed, nested
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
        if default is not None and "${" in default:
            # `${A:-${B}}` would end at the first `}`: a literal `${B` and a stray `}`, which a secret
            # could silently become (a token printed in the file itself).  Not read as a shell would.
            nested = True
            return match[0]
        value = environ.get(name)
        if default is not None and not value:  # shell semantics: unset or empty
            return default
        if value is None:
            unset.append(name)
            return ""
        return value

    if budget < 0:
        too_large = True
        result = ""
    else:
        result = _REFERENCE_RE.sub(substitute, text)
    if too_large:
        if not check.too_large:
            check.too_large = True
            check.add(path, f"the ${{...}} references expand to more than {MAX_EXPANDED_CHARS} characters, which "
                            "no configuration needs (a value with a reference shared by YAML aliases?)")
        return REPORTED
    check.expanded_chars += len(result)
    for name in unset:
        check.add(path, f"environment variable {name} is not set")
    for problem in unreadable:
        check.add(path, problem)
    if malformed:
        check.add(path, f"expected ${{NAME}} or ${{NAME:-default}}, got {show(text)}")
    if nested:
        check.add(path, "a ${NAME:-default} default cannot hold a ${ (nesting is not supported): "
                        "give the outer variable a value, or write the default out")
    return REPORTED if unset or unreadable or malformed or nested else Expanded(result)


def _read_reference(name: str, check: Checker) -> tuple[str, str | None]:
    """The text of a `${file:PATH}` reference, or a problem naming the path (never its content).

    From `check.snapshot` when there is one (a worker: what its owner read, so both substitute the same
    bytes), else from the disk; either way recorded in `check.files_read`.
    """
    try:
        path = relative_to_config(check.base_dir, name.strip())
    except ValueError as exc:
        return "", f"cannot read file: {exc}"
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


# A PEM file is a few KiB (a chain of four is under 10); past this, whatever it is, it is not one.
MAX_TLS_FILE_BYTES = 1024 * 1024


def read_tls_file(path: Path, what: str, check: Checker) -> tuple[bytes, str | None]:
    """The bytes of a listener's certificate or key (`what`), or a problem naming the path.

    From `check.tls_snapshot` when there is one (a worker: what its owner read), else from the disk,
    once per load whoever names it; recorded in `check.tls_read` either way.
    """
    name = str(path)
    if name in check.tls_read:
        return check.tls_read[name], None
    if check.tls_snapshot is not None:
        snapshotted = check.tls_snapshot.get(name)
        if snapshotted is None:
            return b"", f"file {path} is not among the files the configuration was read with"
        check.tls_read[name] = snapshotted
        return snapshotted, None
    try:
        data = read_regular_file(path, MAX_TLS_FILE_BYTES)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return b"", f"file not found: {path}"
        if exc.errno == errno.EFBIG:
            return b"", f"{path} is larger than 1 MiB: not a PEM {what}"
        if exc.errno == errno.EINVAL or exc.errno == errno.EISDIR:
            return b"", f"not a regular file: {path}"  # a directory, a device
        return b"", f"cannot read {path}: {exc.strerror or exc}"
    check.tls_read[name] = data
    return data, None


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

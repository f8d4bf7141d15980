"""Loading a configuration: file → tree (`lb.config.document`) → `Config` (`lb.config.sections`), or `ConfigError`.

The entry points every caller uses (`lb run`, `lb validate`, `lb ctl --config`, a reload, a
worker).  Validation runs in one pass and collects every `Problem`, keyed by its path
(`pools.gateways.backends[1].address`), because `lb validate` prints them all at once: the pass
is a `lb.config.checker.Checker`, scalars are parsed by `lb.config.scalars`, and the dataclasses
built live in `lb.config.model`.

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

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Final

from lb.config.checker import Checker, Expanded
from lb.config.document import MAX_CONFIG_NODES, expand, parse_yaml, read_regular_file
from lb.config.model import AdminConfig, Config
from lb.config.sections import admin_section, build_config, root_of
from lb.errors import ConfigError, Problem

# A config file is a few kilobytes; a multi-megabyte one is a mistake (or a device) we refuse to hold.
MAX_CONFIG_BYTES: Final = 4 * 1024 * 1024


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
    # The listeners' certificates and keys (absolute path → bytes): a worker builds its TLS contexts
    # from these, not from the disk (`TlsConfig.cert_pem`).
    tls_files: Mapping[str, bytes] = dataclass_field(default_factory=dict, repr=False)


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
    config, files, tls_files = _parse(text, base_dir=path.absolute().parent, environ=env,
                                      snapshot=None if source is None else source.files,
                                      tls_snapshot=None if source is None else source.tls_files)
    return config, ConfigSource(text, files, tls_files)


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


# What stands in for admin.token when it is not read (`read_token=False`): it is never sent.
_UNREAD_TOKEN: Final = "unread-admin-token"


def load_admin_config(
    path: str | Path, environ: Mapping[str, str] | None = None, *, token: str | None = None, read_token: bool = True
) -> AdminConfig:
    """Only the `admin` section of the configuration file at `path`, expanded and checked as `lb run` would.

    For `lb ctl --config`: an operator's shell needs the admin address and token, and may well be
    unable to read the rest (the TLS key, the cookie keys' variables or files).  The file's top
    level is still checked as `lb run` checks it (not empty, a mapping, known keys, no key twice),
    so a wrong file or a typo (`admn:`) is refused rather than read as "admin on its defaults".

    `token` (`lb ctl --token`) stands in for `admin.token`, which is then not read: its variable or
    file need not be there.  Nor with `read_token=False` (`lb ctl status`, which sends none), which
    gives no token at all.

    Raises:
        ConfigError: the file cannot be read, is not YAML, its top level is wrong, or its `admin`
            section is invalid.
    """
    path = Path(path)
    check = Checker(base_dir=path.absolute().parent)
    tree = parse_yaml(read_config_text(path), check)
    if not check.unreadable:
        # The keys YAML repeated below the other sections (in a pool, say) are `lb validate`'s to say;
        # the top level's and admin's are ours.  Every problem found after this point is ours too.
        check.keep(lambda p: "." not in p.path or p.path.startswith("admin."))
        root = root_of(tree, check)
        if root is not None:
            node, env = root.get("admin"), os.environ if environ is None else environ
            stand_in = token if token is not None else None if read_token else _UNREAD_TOKEN
            if stand_in is not None and isinstance(node, dict):
                node = expand({key: value for key, value in node.items() if key != "token"}, "admin", env, check,
                               set())
                if isinstance(node, dict):
                    # After the expansion, so the flag's value is taken as it is; marked as if from a
                    # variable, so that no message ever shows it.  Unread, a stand-in still passes the
                    # check that a non-loopback admin has a token, and none is given back.
                    node["token"] = Expanded(stand_in)
            else:
                node = expand(node, "admin", env, check, set())
            admin = admin_section(node, check)
            if admin is not None and not check.problems:
                return admin if token is not None or read_token else dataclasses.replace(admin, token=None)
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
    snapshot: Mapping[str, str] | None = None, tls_snapshot: Mapping[str, bytes] | None = None,
) -> tuple[Config, dict[str, str], dict[str, bytes]]:
    """`parse_config`, and the `${file:PATH}` contents it substituted and the TLS files it read; `snapshot`
    and `tls_snapshot`: take them from there, not disk."""
    check = Checker(base_dir=base_dir, cpu_count=cpu_count, snapshot=snapshot, tls_snapshot=tls_snapshot)
    tree = parse_yaml(text, check)
    if not check.unreadable:  # a repeated key is a problem, but the rest is still checked
        tree = expand(tree, "", environ, check, active=set())
        if check.nodes > MAX_CONFIG_NODES:
            raise ConfigError(check.problems)  # the one problem that matters; the rest is cut short
        config = build_config(tree, check)
        if config is not None and not check.problems:
            return config, check.files_read, check.tls_read
    # A builder only returns None after recording why, so problems is non-empty here.
    raise ConfigError(check.problems or [Problem("", "invalid configuration")])

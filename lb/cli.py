"""The `lb` command line: run, validate, keygen, certs, ctl (`lb.ctl`).

Owns argument parsing, exit codes and what is printed.  Loading the
configuration is `lb.config.load`'s job, running the balancer `lb.control.process`'s, and
making certificates `devcerts`'.

Exit codes: 0 success, 2 bad usage or an invalid configuration, 1 any other
failure (such as an unwritable certificate directory), 130 Ctrl-C (no traceback; `lb.__main__`
then ends the process by SIGINT, as a shell expects), 141 the reader of our output went away.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import secrets
import sys
from collections.abc import Callable
from pathlib import Path

from lb import __version__, startup_signals
from lb.compiled import compiled_state, stale_message
from lb.config.advice import advice
from lb.config.load import ConfigSource, load_config_source
from lb.config.model import Config
from lb.errors import ConfigError

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2  # also what argparse uses for bad arguments
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a C tool whose reader went away
EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a C tool stopped by Ctrl-C

DEFAULT_CERT_HOSTS = "localhost,127.0.0.1"
# 32 random bytes: 256 bits of key material, 43 URL-safe characters.
KEY_BYTES = 32

# Options whose value is an opaque secret: `lb keygen` and `secrets.token_urlsafe` start one
# with "-" once in 64, which argparse would read as an option ("expected one argument").
_OPAQUE_VALUE_OPTIONS = frozenset({"--token"})
# What one of our options looks like (`-h`, `--json`, `--close-after=5m`): after `--token` it is
# that option, and the value is missing, as before.  A random token is never only lower-case
# letters and dashes.
_OPTION = re.compile(r"-[a-z]|--[a-z][a-z-]*(?:=.*)?", re.DOTALL)


def main(argv: list[str] | None = None) -> int:
    """Run one `lb` subcommand and return its exit code."""
    args = _parser().parse_args(join_opaque_values(sys.argv[1:] if argv is None else argv))
    handler: Callable[[argparse.Namespace], int] = args.handler
    try:
        code = handler(args)
        sys.stdout.flush()  # here, not at exit: a reader gone is then ours to handle
    except BrokenPipeError:
        # The reader of our output went away (`lb ctl status --json | head -c 100`): end as a C tool
        # killed by SIGPIPE does, quietly, 128 + 13.  stdout goes to /dev/null so the flush at exit
        # cannot fail again.
        with contextlib.suppress(OSError, ValueError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        # Ctrl-C in `lb ctl` (a slow admin API), `validate`, or a start before it serves: the operator
        # asked for it, so no traceback, and 128 + 2 as for a C tool.  A serving `lb run` or worker never
        # gets here: its event loop turns SIGINT into the graceful stop (exit 0).
        return EXIT_INTERRUPTED
    return code


def join_opaque_values(argv: list[str]) -> list[str]:
    """`--token VALUE` as `--token=VALUE`, so a value starting with "-" is still the value.

    Not when what follows is `--` or one of our options: that is a missing value, left for
    argparse to report.
    """
    joined: list[str] = []
    index = 0
    while index < len(argv):
        arg = argv[index]
        index += 1
        if arg == "--":
            return joined + argv[index - 1 :]
        if arg in _OPAQUE_VALUE_OPTIONS and index < len(argv):
            value = argv[index]
            if value != "--" and not _OPTION.fullmatch(value):
                arg = f"{arg}={value}"
                index += 1
        joined.append(arg)
    return joined


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lb", description="Layer-7 WebSocket load balancer with cookie session affinity."
    )
    # The version alone, as lb_build_info{version} carries it: what a script compares, with nothing to strip.
    parser.add_argument("--version", action="version", version=__version__)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND", required=True)

    run = commands.add_parser("run", help="run the balancer")
    run.add_argument("--config", required=True, type=Path, metavar="FILE", help="YAML configuration")
    run.set_defaults(handler=_run)

    validate = commands.add_parser("validate", help="check a configuration file and exit")
    validate.add_argument("--config", required=True, type=Path, metavar="FILE", help="YAML configuration")
    validate.set_defaults(handler=_validate)

    keygen = commands.add_parser("keygen", help="print a new random key for affinity.secret_keys")
    keygen.set_defaults(handler=_keygen)

    certs = commands.add_parser("certs", help="write a dev CA and a server certificate signed by it")
    certs.add_argument("--out", required=True, type=Path, metavar="DIR", help="output directory")
    certs.add_argument(
        "--hosts",
        default=DEFAULT_CERT_HOSTS,
        metavar="A,B",
        help=f"comma-separated DNS names and IP addresses (default: {DEFAULT_CERT_HOSTS})",
    )
    certs.set_defaults(handler=_certs)

    # `lb ctl`: status/drain/disable/enable/lookup through the admin API (lb.ctl; stdlib only, cheap to import).
    from lb.ctl import add_ctl_parser

    add_ctl_parser(commands)

    # Internal: started by the owner process when `workers` > 1; not for operators.
    worker = commands.add_parser("worker")
    worker.add_argument("--config", required=True, type=Path)
    worker.add_argument("--control-fd", required=True, type=int)
    worker.add_argument("--index", required=True, type=int)
    worker.add_argument("--count", type=int, default=1)
    worker.add_argument("--owner-pid", type=int, default=0)
    worker.set_defaults(handler=_worker)
    return parser


def _print_problems(error: ConfigError) -> None:
    for problem in error.problems:
        print(problem, file=sys.stderr)


def _compiled_is_stale() -> bool:
    """True (and said on stderr) when the compiled data plane no longer matches its sources (`lb.compiled`)."""
    state = compiled_state()
    if state.stale:
        print(f"lb: {stale_message(state)}", file=sys.stderr)
    return bool(state.stale)


def _load_runnable(config_path: Path) -> tuple[Config, ConfigSource]:
    """The configuration `lb run` would start with, and its source.

    With workers: N, they run this source (the text and every ${file:PATH} as read now), never the
    files themselves (lb.control.workers): it must fit in one control message.

    Raises:
        ConfigError: every problem, the workers' hand-over included.
    """
    config, source = load_config_source(config_path)
    if config.workers > 1:
        from lb.control.ipc import check_config_handover

        check_config_handover(source)
    return config, source


def _run(args: argparse.Namespace) -> int:
    startup_signals.hold()  # first: a SIGHUP while starting must not kill us (its default action)
    if _compiled_is_stale():
        return EXIT_FAILURE
    config_path: Path = args.config
    try:
        config, source = _load_runnable(config_path)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    # Imported here so that validate, keygen and certs never load the server stack.
    from lb.control.process import run

    return run(config, config_path, source)


def _worker(args: argparse.Namespace) -> int:
    startup_signals.hold(worker=True)
    # No check of the compiled build here: the owner checked it when it started, and a worker it
    # restarts later loads the same module files (a `git pull` changes sources, not the build), so
    # refusing would only lose the worker for good.
    from lb.control.worker_channel import receive_config

    # The owner's running config, never the files: they may have changed since the owner read them.
    # The source carries the text and the content of each ${file:PATH} the owner used; --config still
    # names the file, for relative paths in the text (TLS files, and the keys of that snapshot).
    try:
        source = receive_config(args.control_fd)
    except (OSError, EOFError, ValueError) as exc:
        print(f"lb worker: no configuration from the owner: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    try:
        config, _ = load_config_source(args.config, source=source)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    from lb.control.process import run_worker

    return run_worker(config, args.config, args.control_fd, args.index, args.count, args.owner_pid)


def _validate(args: argparse.Namespace) -> int:
    config_path: Path = args.config
    try:
        config, _ = _load_runnable(config_path)  # what `lb run` refuses, validate refuses too
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_USAGE
    from lb.http.proxy_header import CRC32C_IN_C  # here: the other commands need none of it

    for sentence in advice(config, crc32c_in_c=CRC32C_IN_C):
        print(f"warning: {sentence}", file=sys.stderr)
    print(f"ok: {config_path}")
    return EXIT_OK


def _keygen(args: argparse.Namespace) -> int:
    print(secrets.token_urlsafe(KEY_BYTES))
    return EXIT_OK


def _certs(args: argparse.Namespace) -> int:
    from lb.devcerts import CaFate, write_dev_certs  # cryptography is slow to import; only this command needs it

    out_dir: Path = args.out
    hosts = [host.strip() for host in str(args.hosts).split(",") if host.strip()]
    try:
        written = write_dev_certs(out_dir, hosts)
    except ValueError as exc:
        print(f"lb certs: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:
        print(f"lb certs: cannot write to {out_dir}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if written.ca is CaFate.KEPT:
        print(f"kept the CA in {written.ca_cert} (whoever trusts it trusts the new certificate)")
        print(f"wrote {written.server_cert} and {written.server_key} for {', '.join(hosts)}")
    else:
        if written.ca is CaFate.REPLACED:
            print(f"replaced the CA in {written.ca_cert}: it had under 30 days left; clients must trust the new one")
        print(f"wrote {written.ca_cert}, {written.server_cert} and {written.server_key} for {', '.join(hosts)}")
    print(f"clients trust the server with: --cafile {written.ca_cert}")
    return EXIT_OK

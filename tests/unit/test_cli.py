"""The `lb` command line: validate, keygen, certs, and run's config handling."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest

from lb.cli import main
from lb.config.load import ConfigSource
from lb.config.model import Config

COOKIE_KEY = "c" * 43

CONFIG = """
listeners:
  - bind: 127.0.0.1:0
admin:
  token: ${LB_ADMIN_TOKEN}
affinity:
  secret_keys: ["${LB_COOKIE_KEY}"]
routes:
  - {path_prefix: /, pool: gateways}
pools:
  gateways:
    backends:
      - {id: gw-1, address: 127.0.0.1:9001}
      - {id: gw-2, address: BACKEND_2}
"""


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LB_COOKIE_KEY", COOKIE_KEY)
    monkeypatch.setenv("LB_ADMIN_TOKEN", "secret-" * 4)


def write_config(tmp_path: Path, backend_2: str = "127.0.0.1:9002") -> Path:
    path = tmp_path / "lb.yaml"
    path.write_text(CONFIG.replace("BACKEND_2", backend_2), encoding="utf-8")
    return path


@pytest.mark.usefixtures("env")
def test_validate_ok(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid config: exit 0 and "ok: FILE" on stdout."""
    path = write_config(tmp_path)
    assert main(["validate", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"ok: {path}\n" and err == ""


@pytest.mark.usefixtures("env")
def test_validate_prints_advice_as_warnings_and_still_exits_0(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A valid config that defeats its purpose (no admin token: the actions answer 401) is still valid."""
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("  token: ${LB_ADMIN_TOKEN}\n", "  bind: 127.0.0.1:0\n"))
    assert main(["validate", "--config", str(path)]) == 0
    out, err = capsys.readouterr()
    assert out == f"ok: {path}\n"
    assert err.startswith("warning: admin.token is not set") and err.count("\n") == 1, err


@pytest.mark.usefixtures("env")
def test_validate_reports_each_problem_by_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An invalid config: exit 2 and one `path: message` line per problem on stderr."""
    path = write_config(tmp_path, backend_2="127.0.0.1")
    path.write_text(path.read_text(encoding="utf-8") + "timeouts: {handshake: 0s}\n", encoding="utf-8")
    assert main(["validate", "--config", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.splitlines() == [
        "pools.gateways.backends[1].address: expected host:port, got '127.0.0.1'",
        "timeouts.handshake: expected a duration greater than 0, got '0s'",
    ]


@pytest.mark.usefixtures("env")
def test_validate_refuses_what_run_cannot_hand_to_its_workers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lb run` refuses a configuration too large for one control message to its workers: so does validate."""
    from lb.control import ipc

    path = write_config(tmp_path)
    path.write_text("workers: 2\n" + path.read_text() + "# " + "x" * 6000 + "\n")
    monkeypatch.setattr(ipc, "MAX_MESSAGE_BYTES", 5000)
    assert main(["validate", "--config", str(path)]) == 2
    assert "too large to hand to the workers" in capsys.readouterr().err


def test_validate_names_unset_variables(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unset ${VAR} is reported with its key path and exits 2."""
    monkeypatch.delenv("LB_ADMIN_TOKEN", raising=False)
    monkeypatch.setenv("LB_COOKIE_KEY", COOKIE_KEY)
    assert main(["validate", "--config", str(write_config(tmp_path))]) == 2
    assert capsys.readouterr().err == "admin.token: environment variable LB_ADMIN_TOKEN is not set\n"


def test_validate_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A config file that does not exist is a problem message and exit 2, not a traceback."""
    assert main(["validate", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert capsys.readouterr().err.startswith(f"cannot read {tmp_path / 'absent.yaml'}")


def test_keygen_prints_a_43_char_urlsafe_key(capsys: pytest.CaptureFixture[str]) -> None:
    """keygen prints 32 random bytes as 43 URL-safe characters, different each time."""
    assert main(["keygen"]) == 0
    assert main(["keygen"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", first)
    assert first != second


def test_keygen_output_is_a_valid_secret_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A keygen key is accepted as affinity.secret_keys."""
    main(["keygen"])
    monkeypatch.setenv("LB_COOKIE_KEY", capsys.readouterr().out.strip())
    monkeypatch.setenv("LB_ADMIN_TOKEN", "secret-" * 4)
    assert main(["validate", "--config", str(write_config(tmp_path))]) == 0


def test_certs_writes_four_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """certs --out DIR writes ca.crt, ca.key, server.crt and server.key; keys are owner-only."""
    out = tmp_path / "certs"
    assert main(["certs", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ca.crt", "ca.key", "server.crt", "server.key"]
    for key in ("ca.key", "server.key"):
        assert stat.S_IMODE((out / key).stat().st_mode) == 0o600
    assert "localhost, 127.0.0.1" in capsys.readouterr().out


def test_certs_custom_hosts(tmp_path: Path) -> None:
    """--hosts puts the given names into the server certificate."""
    from cryptography import x509

    assert main(["certs", "--out", str(tmp_path), "--hosts", "lb.test, 10.0.0.1"]) == 0
    cert = x509.load_pem_x509_certificate((tmp_path / "server.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["lb.test"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.1"]


def test_certs_without_hosts_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty --hosts list exits 2 with a message."""
    assert main(["certs", "--out", str(tmp_path), "--hosts", ","]) == 2
    assert "at least one host" in capsys.readouterr().err


def test_run_with_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """run refuses an invalid config with exit 2 and the problems, before starting anything."""
    path = tmp_path / "lb.yaml"
    path.write_text("listeners: []\n", encoding="utf-8")
    assert main(["run", "--config", str(path)]) == 2
    assert "listeners: expected at least one listener" in capsys.readouterr().err.splitlines()


@pytest.mark.usefixtures("env")
@pytest.mark.parametrize("command", ["validate", "run"])
def test_an_integer_of_thousands_of_digits_is_named_by_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """`listeners[0].backlog: 0x<4,000 hex digits>` gave run and validate a traceback (its message printed
    it past int()'s 4,300-digit limit); now a problem at its path, exit 2, before anything starts."""
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("127.0.0.1:0\n", "127.0.0.1:0\n    backlog: 0x" + "f" * 4000 + "\n"))
    assert main([command, "--config", str(path)]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "listeners[0].backlog: integer too long: 4002 characters, where no setting takes more than 100"
    ]


@pytest.mark.usefixtures("env")
def test_run_hands_the_config_to_the_balancer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """run passes the loaded Config, its path and its source (the text) to lb.control.process.run and returns its exit
    code."""
    calls: list[tuple[Config, Path, ConfigSource]] = []

    def fake_run(config: Config, config_path: Path, config_source: ConfigSource) -> int:
        calls.append((config, config_path, config_source))
        return 7

    fake = types.ModuleType("lb.control.process")
    fake.run = fake_run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lb.control.process", fake)
    path = write_config(tmp_path)
    assert main(["run", "--config", str(path)]) == 7
    ((config, config_path, config_source),) = calls
    assert config_path == path and config.pools["gateways"].backends[1].port == 9002
    assert config_source.text == path.read_text(encoding="utf-8")


@pytest.mark.usefixtures("env")
def test_a_worker_runs_its_owners_config_text_not_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lb worker` parses the text its owner sends first on the control socket, with relative
    `${file:PATH}` against the config file's directory taken from the owner's snapshot (the file on disk
    now says something else), and leaves the next message in the socket."""
    import socket

    from lb.control.ipc import encode

    calls: list[tuple[Config, Path, int]] = []

    def fake_run_worker(config: Config, config_path: Path, control_fd: int, *args: int) -> int:
        calls.append((config, config_path, control_fd))
        return 7

    fake = types.ModuleType("lb.control.process")
    fake.run_worker = fake_run_worker  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "lb.control.process", fake)
    path = write_config(tmp_path, backend_2="127.0.0.1:9002")  # the file as it is now
    (tmp_path / "token").write_text("rewritten-since\n", encoding="utf-8")  # after the owner read it
    owners = CONFIG.replace("BACKEND_2", "127.0.0.1:9999").replace("${LB_ADMIN_TOKEN}", "${file:token}")
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    owner, worker = socket.socketpair()
    with owner, worker:
        following = encode({"op": "states", "pools": {}})
        snapshot = {str(tmp_path / "token"): "from-the-owner"}
        owner.sendall(encode({"op": "config", "text": owners, "files": snapshot}) + following)
        argv = ["worker", "--config", str(path), "--control-fd", str(worker.fileno()), "--index", "0"]
        assert main(argv) == 7
        ((config, config_path, control_fd),) = calls
        assert config.pools["gateways"].backends[1].port == 9999, "the owner's text, not the file"
        assert config.admin.token == "from-the-owner", "the owner's snapshot, not the file"
        assert (config_path, control_fd) == (path, worker.fileno())
        worker.settimeout(5.0)
        assert worker.recv(len(following) + 1) == following


@pytest.mark.parametrize("argv", [[], ["validate"], ["frobnicate"]])
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """A missing command, a missing --config or an unknown command is a usage error (exit 2)."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage: lb" in capsys.readouterr().err


def test_version_prints_the_version_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    """`lb --version` prints the version, exit 0."""
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*\n", out), out


def test_a_sighup_while_starting_is_held_not_fatal() -> None:
    """`lb run` holds SIGHUP first thing: remembered (then applied once serving), never the default death."""
    import os
    import signal

    from lb import startup_signals

    previous = {signum: signal.getsignal(signum) for signum in (*startup_signals.HELD, *startup_signals.UNUSED)}
    try:
        startup_signals.hold()
        assert startup_signals.take() is False
        os.kill(os.getpid(), signal.SIGHUP)
        assert startup_signals.take() is True
        assert startup_signals.take() is False  # taken once
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGHUP)
        startup_signals.hold()  # again (the command line's, after lb.__main__'s): what came is kept
        assert startup_signals.take(signal.SIGTERM) is True
        assert startup_signals.take() is True
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_a_worker_holds_sigint_too_and_lb_run_leaves_it_to_ctrl_c() -> None:
    """A worker's SIGINT is its owner's second Ctrl-C ("stop now"): sent while the worker started, its default
    action ended the worker with a KeyboardInterrupt traceback.  `lb run` keeps Ctrl-C's default."""
    import os
    import signal

    from lb import startup_signals

    watched = (*startup_signals.HELD, *startup_signals.UNUSED, signal.SIGINT)
    previous = {signum: signal.getsignal(signum) for signum in watched}
    try:
        startup_signals.hold()
        assert signal.getsignal(signal.SIGINT) is previous[signal.SIGINT]
        startup_signals.hold(worker=True)
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt: held
        assert startup_signals.take(signal.SIGTERM) is True
        assert startup_signals.take(signal.SIGINT) is True
        assert startup_signals.take(signal.SIGINT) is False
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def test_lb_run_holds_its_signals_before_the_command_line_is_imported(tmp_path: Path) -> None:
    """The `lb` command and `python -m lb` hold SIGHUP and SIGTERM before importing lb.cli (YAML, the config
    loader, the compiled data plane: most of a start), where their default action would end the process."""
    import tomllib

    scripts = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["lb"] == "lb.__main__:main"
    spy = (
        "import builtins, signal, sys\n"
        "real = builtins.__import__\n"
        "def spy(name, *args, **kwargs):\n"
        "    if name in ('lb.cli', 'yaml'):\n"
        "        held = [signal.getsignal(s) not in (signal.SIG_DFL, None) for s in (signal.SIGHUP, signal.SIGTERM)]\n"
        "        print(name, held, flush=True)\n"
        "    return real(name, *args, **kwargs)\n"
        "builtins.__import__ = spy\n"
        "sys.argv = ['lb', 'run', '--config', sys.argv[1]]\n"
        "from lb.__main__ import main\n"
        "raise SystemExit(main())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", spy, str(tmp_path / "missing.yaml")], capture_output=True, text=True, timeout=60,
        check=False,
    )
    assert done.returncode == 2, done.stderr  # no such file: a usage error, after the imports
    assert done.stdout.splitlines()[0] == "lb.cli [True, True]", done.stdout


def test_what_runs_before_the_hold_imports_nothing_heavy() -> None:
    """`lb run` and `lb worker` (the `lb` command, `python -m lb`) import the package and lb.startup_signals
    before `hold()`: until then a SIGHUP or SIGTERM is fatal, so neither imports importlib.metadata (the
    version, ~20 ms) nor importlib.abc (~10 ms); `lb.__version__` is read when first asked for."""
    check = (
        "import sys\n"
        "before = set(sys.modules)\n"  # what the interpreter's start (site, .pth files) loaded is not ours
        "import lb.__main__\n"
        "heavy = ('importlib.metadata', 'importlib.abc', 'typing', 'email', 'lb.cli', 'yaml', 'asyncio')\n"
        "print(sorted(name for name in heavy if name in set(sys.modules) - before))\n"
        "import lb\n"
        "print(lb.__version__ == lb.__version__ != '', 'importlib.metadata' in sys.modules)\n"
        "print(hasattr(lb, 'no_such_name'))\n"
    )
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["[]", "True True", "False"], done.stdout


def test_a_reader_that_went_away_ends_the_command_quietly_with_141(tmp_path: Path) -> None:
    """`lb ctl status --json | head -c 100`: no BrokenPipeError traceback, and 128 + SIGPIPE as a C tool."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before a byte is written
    try:
        done = subprocess.run(
            [sys.executable, "-m", "lb", "keygen"], stdout=write_end, stderr=subprocess.PIPE, timeout=30, check=False
        )
    finally:
        os.close(write_end)
    assert done.returncode == 141, done
    assert done.stderr == b"", done.stderr.decode()


def test_ctrl_c_ends_a_command_with_130_and_no_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ctrl-C while `lb ctl` waits for the admin API: exit 130, as a C tool, and nothing on stderr."""

    def interrupted(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("lb.ctl.call", interrupted)
    try:
        code = main(["ctl", "--admin", "127.0.0.1:1", "status"])
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped main(): Python prints its traceback")
    assert code == 130
    assert capsys.readouterr().err == ""

"""lb.ctl without a server: argument parsing, where the URL and token come from, the status table."""

from __future__ import annotations

import argparse
import hashlib
import http.client
import io
import json
from pathlib import Path

import pytest

from lb.cli import _parser, join_opaque_values
from lb.ctl import (
    EXIT_USAGE,
    MAX_ANSWER_BYTES,
    MAX_ROWS,
    CtlError,
    _print_json,
    _read_until,
    _server_message,
    parse_answer,
    render_status,
    resolve_target,
    run_ctl,
    shown_path,
)


def parse(*argv: str) -> argparse.Namespace:
    return _parser().parse_args(["ctl", *argv])


def test_options_before_or_after_the_subcommand() -> None:
    assert parse("--admin", "http://h:1", "status").admin == "http://h:1"
    assert parse("status", "--admin", "http://h:1").admin == "http://h:1"
    args = parse("--token", "t", "drain", "gateways", "gw-1", "--close-after", "30s", "--rate", "5")
    assert (args.token, args.pool, args.backend, args.close_after, args.rate) == ("t", "gateways", "gw-1", "30s", 5.0)


@pytest.mark.parametrize("action", ["drain", "disable"])
def test_drain_and_disable_both_ask_for_their_tunnels_to_close(action: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin API takes close_after and rate on disable as on drain (README's state table): `lb ctl disable`
    refused them as unrecognized arguments."""
    from lb import ctl

    sent: list[tuple[str, str, object]] = []

    def call(_target: object, method: str, path: str, body: object = None) -> object:
        sent.append((method, path, body))
        state = "draining" if action == "drain" else "disabled"
        return {"pool": "gateways", "id": "gw-1", "state": state, "close_after": 30.0, "rate": 5.0}

    monkeypatch.setattr(ctl, "call", call)
    out = io.StringIO()
    args = parse("--admin", "http://127.0.0.1:1", "--token", "t", action, "gateways", "gw-1", "--close-after", "30s",
                 "--rate", "5")
    assert run_ctl(args, out, io.StringIO()) == 0
    assert sent == [("POST", f"/pools/gateways/backends/gw-1/{action}", {"close_after": "30s", "rate": 5.0})]
    assert "(tunnels close after 30s at 5/s)" in out.getvalue()


def test_missing_arguments_are_usage_errors() -> None:
    with pytest.raises(SystemExit) as exc:
        parse("drain", "gateways")
    assert exc.value.code == EXIT_USAGE


def test_flags_win_over_environment_over_default() -> None:
    env = {"LB_ADMIN_URL": "http://env:1/", "LB_ADMIN_TOKEN": "env-token"}
    target = resolve_target(parse("status"), env)
    assert (target.url, target.token) == ("http://env:1", "env-token")
    target = resolve_target(parse("--admin", "flag:2", "--token", "flag", "status"), env)
    assert (target.url, target.token) == ("http://flag:2", "flag")
    assert resolve_target(parse("status"), {}).url == "http://127.0.0.1:9000"


DRAIN = ("drain", "p", "a")  # a command that sends the token


def test_config_gives_url_and_expanded_token(tmp_path: Path) -> None:
    config = tmp_path / "lb.yaml"
    config.write_text(
        "listeners: [{bind: 127.0.0.1:8080}]\n"
        "admin: {bind: 0.0.0.0:9100, token: '${CTL_UNIT_TOKEN}'}\n"
        "affinity: {secret_keys: ['${CTL_UNIT_COOKIE_KEY}']}\n"
        "routes: [{path_prefix: /, pool: p}]\n"
        "pools: {p: {backends: [{id: a, address: 127.0.0.1:9001}]}}\n"
    )
    # The cookie key is not in the operator's environment: only admin.* needs to expand.
    target = resolve_target(parse("--config", str(config), *DRAIN), {"CTL_UNIT_TOKEN": "from-config"})
    assert target.url == "http://127.0.0.1:9100" and target.token == "from-config"
    # A file named on the command line wins over the environment, for both: never one's URL with the other's token.
    environ = {"LB_ADMIN_URL": "http://other:1", "LB_ADMIN_TOKEN": "env", "CTL_UNIT_TOKEN": "x"}
    target = resolve_target(parse("--config", str(config), *DRAIN), environ)
    assert (target.url, target.token) == ("http://127.0.0.1:9100", "x")
    target = resolve_target(parse("--config", str(config), "--admin", "flag:2", *DRAIN), environ)
    assert (target.url, target.token) == ("http://flag:2", "x")
    target = resolve_target(parse("--config", str(config), "--token", "flag", *DRAIN), environ)
    assert (target.url, target.token) == ("http://127.0.0.1:9100", "flag")
    with pytest.raises(CtlError) as exc:
        resolve_target(parse("--config", str(config), *DRAIN), {})
    assert exc.value.exit_code == EXIT_USAGE and "CTL_UNIT_TOKEN" in str(exc.value)
    config.write_text(config.read_text().replace("0.0.0.0:9100", "nonsense"))
    with pytest.raises(CtlError) as exc:
        resolve_target(parse("--config", str(config), *DRAIN), {"CTL_UNIT_TOKEN": "x"})
    assert "admin.bind" in str(exc.value)


def test_a_token_flag_stands_in_for_the_files_token(tmp_path: Path) -> None:
    """With --token, admin.token is not read: its variable need not be set, and the flag's value is
    taken as written (no `${...}` expansion of it)."""
    config = tmp_path / "lb.yaml"
    config.write_text(
        "listeners: [{bind: 127.0.0.1:8080}]\n"
        "admin: {bind: 0.0.0.0:9100, token: '${CTL_UNIT_UNSET}'}\n"
        "routes: [{path_prefix: /, pool: p}]\n"
        "pools: {p: {backends: [{id: a, address: 127.0.0.1:9001}]}}\n"
    )
    target = resolve_target(parse("--config", str(config), "--token", "t-${HOME}", *DRAIN), {"HOME": "/root"})
    assert (target.url, target.token) == ("http://127.0.0.1:9100", "t-${HOME}")
    with pytest.raises(CtlError) as exc:
        resolve_target(parse("--config", str(config), *DRAIN), {})
    assert "CTL_UNIT_UNSET" in str(exc.value)


def test_config_needs_only_its_admin_section_to_be_usable(tmp_path: Path) -> None:
    """A shell that cannot read the TLS key or the cookie keys' files still drives the balancer."""
    config = tmp_path / "lb.yaml"
    config.write_text(
        "listeners:\n"
        "  - {bind: 127.0.0.1:8443, tls: {cert: /nonexistent/server.crt, key: /nonexistent/server.key}}\n"
        "admin: {bind: 127.0.0.1:9100, token: '${file:admin-token}'}\n"
        "affinity: {secret_keys: ['${file:/nonexistent/cookie-key}']}\n"
        "routes: [{path_prefix: /, pool: p}]\n"
        "pools: {p: {backends: [{id: a, address: nonsense}], backends: []}}\n"  # lb validate's to say
    )
    (tmp_path / "admin-token").write_text("from-a-file\n")
    target = resolve_target(parse("--config", str(config), *DRAIN), {})
    assert (target.url, target.token) == ("http://127.0.0.1:9100", "from-a-file")
    (tmp_path / "admin-token").unlink()
    with pytest.raises(CtlError) as exc:
        resolve_target(parse("--config", str(config), *DRAIN), {})
    assert exc.value.exit_code == EXIT_USAGE and "admin.token" in str(exc.value)


def test_status_does_not_read_the_files_token(tmp_path: Path) -> None:
    """It sends none (GET /status is open): a shell without the admin token's variable or file still reads
    the state (`lb ctl --config F status` exited 2 for want of a token it would not have sent).  The
    actions and `lookup` send it, and still need it."""
    config = tmp_path / "lb.yaml"
    config.write_text(
        "listeners: [{bind: 127.0.0.1:8080}]\n"
        "admin: {bind: 127.0.0.1:9100, token: '${CTL_UNIT_UNSET}'}\n"
        "routes: [{path_prefix: /, pool: p}]\n"
        "pools: {p: {backends: [{id: a, address: 127.0.0.1:9001}]}}\n"
    )
    target = resolve_target(parse("--config", str(config), "status"), {})
    assert (target.url, target.token) == ("http://127.0.0.1:9100", None)
    # Off loopback (the Kubernetes manifest binds 0.0.0.0), where a token is required of the file: still none read.
    config.write_text(config.read_text().replace("bind: 127.0.0.1:9100", "bind: 0.0.0.0:9100"))
    target = resolve_target(parse("--config", str(config), "status"), {})
    assert (target.url, target.token) == ("http://127.0.0.1:9100", None)
    for command in (DRAIN, ("lookup", "TOKEN")):
        with pytest.raises(CtlError) as exc:
            resolve_target(parse("--config", str(config), *command), {})
        assert exc.value.exit_code == EXIT_USAGE and "CTL_UNIT_UNSET" in str(exc.value)
    config.write_text(config.read_text().replace("0.0.0.0:9100", "nonsense"))
    with pytest.raises(CtlError) as exc:
        resolve_target(parse("--config", str(config), "status"), {})
    assert "admin.bind" in str(exc.value), "the rest of the admin section is still checked"


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("- listeners\n", "expected a mapping"),
        ("admin: [\n", "YAML"),
        ("", "empty"),
        ("# nothing\n", "empty"),
        ("admn: {bind: 127.0.0.1:9100}\n", "admn"),
        ("logging.level: debug\n", "logging.level"),  # a dotted top-level key is still unknown
        ("apiVersion: v1\nkind: ConfigMap\n", "apiVersion"),
        ("admin: {bind: 127.0.0.1:9100}\nadmin: {bind: 127.0.0.1:9200}\n", "duplicate key"),
        ("admin: {token: a, token: b}\n", "duplicate key"),
    ],
)
def test_a_file_lb_run_would_refuse_is_a_usage_error(tmp_path: Path, text: str, said: str) -> None:
    """A wrong file, or one lb run would refuse at its top level or in admin, is never read as
    "admin on its defaults" (127.0.0.1:9000, no token)."""
    config = tmp_path / "lb.yaml"
    config.write_text(text)
    with pytest.raises(CtlError) as exc:
        resolve_target(parse("--config", str(config), "status"), {})
    assert exc.value.exit_code == EXIT_USAGE and said in str(exc.value), str(exc.value)


@pytest.mark.parametrize("url", ["ftp://x", "http://127.0.0.1:9000?x=1", "http://127.0.0.1:9000/?x=1",
                                 "http://127.0.0.1:9000#top", "not a url", "http://127.0.0.1 :9000"])
def test_bad_admin_url_is_a_usage_error(url: str) -> None:
    """Nothing is asked: a query or fragment went into every path (`POST /?x=1` answered 405, and the
    message named another path), and `not a url` was exit 1, "not an HTTP answer"."""
    err = io.StringIO()
    assert run_ctl(parse("--admin", url, "status"), io.StringIO(), err) == EXIT_USAGE
    assert "expected http://host:port" in err.getvalue()


SECRET = "s3cr3t-admin-token"


def usage_error(monkeypatch: pytest.MonkeyPatch, args: argparse.Namespace, environ: dict[str, str]) -> str:
    """What run_ctl prints with only `environ`'s admin variables set, once it has returned EXIT_USAGE."""
    for name in ("LB_ADMIN_URL", "LB_ADMIN_TOKEN", "CTL_UNIT_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    err = io.StringIO()
    assert run_ctl(args, io.StringIO(), err) == EXIT_USAGE, err.getvalue()
    return err.getvalue()


@pytest.mark.parametrize(
    ("value", "said"),
    [
        (SECRET + "\r", "CR at character 19 of 19 (a file saved with CRLF line ends?)"),
        (SECRET + "\n", "LF"),
        ("a\r\nX-Injected: 1" + SECRET, "CR"),
        (SECRET + "\x00", "NUL"),
        (SECRET + "\x1b", "\\x1b"),
        (SECRET + "\u20ac", "outside ASCII"),
        (SECRET + "\u00e9", "outside ASCII"),  # Latin-1: http.client sends it, but the admin API compares UTF-8
        (SECRET[:5] + " " + SECRET[5:], "a space at character 6"),  # admin.token refuses one too
    ],
    ids=["trailing CR", "trailing LF", "CRLF inside", "NUL", "ESC", "not Latin-1", "Latin-1", "space"],
)
def test_a_token_http_cannot_carry_is_a_usage_error_that_never_echoes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str, said: str
) -> None:
    """From the flag or the environment (a CRLF env file): exit 2 naming the source, not the token.  From
    --config, the configuration's own check refuses it first (`admin.token` must be visible ASCII)."""
    cases = [
        (parse("--token", value, "status"), {}, "--token"),
        (parse("status"), {"LB_ADMIN_TOKEN": value}, "LB_ADMIN_TOKEN"),
    ]
    if "\x00" in value:
        cases = cases[:1]  # no environment variable holds a NUL
    for args, environ, source in cases:
        message = usage_error(monkeypatch, args, environ)
        assert message.startswith(f"lb ctl: {source}: has ") and said in message, message
        assert SECRET not in message and len(message.splitlines()) == 1, message
    if "\x00" not in value:
        config = tmp_path / "lb.yaml"
        config.write_text("admin: {bind: 127.0.0.1:9100, token: '${CTL_UNIT_TOKEN}'}\n")
        message = usage_error(monkeypatch, parse("--config", str(config), *DRAIN), {"CTL_UNIT_TOKEN": value})
        assert message.startswith(f"lb ctl: cannot use --config {config}:"), message
        assert "admin.token: expected visible ASCII" in message and SECRET not in message, message


@pytest.mark.parametrize(
    "url",
    [
        "http://[::1",
        "http://127.0.0.1:84536",  # would wrap to port 19000
        "http://127.0.0.1:65536",
        "http://127.0.0.1:0",
        "http://127.0.0.1:abc",
        "http://:9000",
        "ftp://127.0.0.1:9000",
        "http://127.0.0.1:9000\r",
        "http://admin:" + SECRET + "@127.0.0.1:9000",
        "admin:" + SECRET + "@127.0.0.1:9000",
        "http://" + SECRET + "@[::1",
    ],
)
def test_an_admin_url_that_is_not_http_host_port_is_a_usage_error(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    """exit 2 naming --admin or LB_ADMIN_URL, never a traceback or a wrapped port, never the password."""
    for args, environ, source in ((parse("--admin", url, "status"), {}, "--admin"),
                                  (parse("status"), {"LB_ADMIN_URL": url}, "LB_ADMIN_URL")):
        message = usage_error(monkeypatch, args, environ)
        assert message.startswith(f"lb ctl: {source}: ") and SECRET not in message, message


def test_an_admin_url_of_host_and_port_is_taken() -> None:
    for url, expected in (("127.0.0.1:9000", "http://127.0.0.1:9000"), ("https://[::1]:65535/", "https://[::1]:65535"),
                          ("http://localhost:1/admin", "http://localhost:1/admin")):
        assert resolve_target(parse("--admin", url, "status"), {}).url == expected


def test_status_table() -> None:
    document = {
        "pools": {
            "gateways": {
                "backends": [
                    {"id": "gw-1", "address": "127.0.0.1:9001", "state": "up", "reason": "initial state",
                     "connections": 12, "handshakes": 340, "affinity_hits": 200, "redispatches": 3},
                    {"id": "gw-22", "address": "127.0.0.1:9002", "state": "draining", "reason": "operator: drain",
                     "connections": 0, "handshakes": 5, "affinity_hits": 0, "redispatches": 0, "migrating": True},
                    {"id": "gw-3", "address": "127.0.0.1:9003", "state": "disabled", "removed": True,
                     "reason": "removed from DNS", "connections": 2, "handshakes": 9, "affinity_hits": 0,
                     "redispatches": 0},
                ],
                "discovery": {"last_ok": 1.0, "last_error": None},
            }
        },
        "tunnels": 12,
        "role": "single",
    }
    lines = render_status(document).splitlines()
    assert lines[0].split() == ["POOL", "BACKEND", "ADDRESS", "STATE", "TUNNELS", "HANDSHAKES", "HITS",
                                "REDISPATCHES", "REASON"]
    assert lines[1].split()[:8] == ["gateways", "gw-1", "127.0.0.1:9001", "up", "12", "340", "200", "3"]
    assert lines[2].split()[3] == "draining*"
    assert lines[3].split()[3] == "removed", "gone from the pool, its tunnels still running"
    assert lines[1].index("127.0.0.1") == lines[2].index("127.0.0.1"), "columns line up"
    assert any(line.startswith("* migrating") for line in lines)
    assert "discovery gateways: last_ok=1970-01-01T00:00:01Z, last_error=-" in lines  # a time, not seconds; no None
    assert lines[-1] == "live tunnels: 12, role: single"
    document["pools"]["gateways"]["discovery"] = {"last_ok": None, "last_error": None}
    assert "discovery gateways: last_ok=never, last_error=-" in render_status(document).splitlines()
    owner = {**document, "role": "owner", "workers": {"count": 2, "serving": 0}}
    assert render_status(owner).splitlines()[-1] == "live tunnels: 12, role: owner, NO worker serving"
    owner["workers"] = {"count": 2, "serving": 1}
    assert render_status(owner).splitlines()[-1] == "live tunnels: 12, role: owner"
    with pytest.raises(CtlError):
        render_status(["not", "a", "status"])


def test_a_token_starting_with_a_dash_is_still_the_token() -> None:
    """`lb keygen` starts one token in 64 with "-"; `--token -x` must not read as a missing value."""
    argv = join_opaque_values(["ctl", "--token", "-Ab_c", "status", "--token", "--Xq3_8aZ"])
    assert parse(*argv[1:]).token == "--Xq3_8aZ"
    assert parse(*join_opaque_values(["--token", "-Ab_c", "status"])).token == "-Ab_c"
    assert join_opaque_values(["ctl", "--", "--token", "-x"]) == ["ctl", "--", "--token", "-x"]
    for missing in (["status", "--token"], ["status", "--token", "--json"], ["--token", "--", "status"]):
        with pytest.raises(SystemExit) as exc:  # a missing value stays a usage error
            parse(*join_opaque_values(missing))
        assert exc.value.code == EXIT_USAGE, missing


DEEP = b"[" * 100_000 + b"]" * 100_000


@pytest.mark.parametrize(
    "raw",
    [
        DEEP,
        b'{"pools": ' + DEEP + b"}",
        b'{"tunnels": NaN}',
        b'{"tunnels": Infinity}',
        b'{"tunnels": -Infinity}',
        b'{"tunnels": 1e999}',
        b"{not json",
    ],
    ids=["nested arrays", "nested in an object", "NaN", "Infinity", "-Infinity", "overflowing number", "not JSON"],
)
def test_an_answer_json_would_take_beyond_rfc_8259_is_not_json(raw: bytes) -> None:
    """Deep nesting (a RecursionError in json.loads), NaN and Infinity are the "not JSON" error, never a traceback."""
    with pytest.raises(ValueError):
        parse_answer(raw)


def test_an_answer_within_rfc_8259_is_parsed() -> None:
    parsed = parse_answer(b'{"a": [1, 2.5, -0.0, 1e308, null, true, "x"]}')
    assert parsed == {"a": [1, 2.5, -0.0, 1e308, None, True, "x"]}


def test_an_error_body_nested_too_deeply_is_one_short_line() -> None:
    message = _server_message(DEEP)
    assert "\n" not in message and len(message) <= 200


def test_json_output_never_carries_nan_or_a_half_document() -> None:
    """`--json` prints standard JSON or nothing: NaN/Infinity (or what the encoder cannot nest) is an error."""
    out = io.StringIO()
    target = resolve_target(parse("status"), {})
    for answer in ({"pools": {}, "tunnels": float("nan")}, {"x": [float("inf")]}):
        with pytest.raises(CtlError):
            _print_json(answer, out, "/status", target)
    assert out.getvalue() == ""


def test_a_path_in_a_message_is_short_and_shows_a_token_only_as_its_digest() -> None:
    """A 100 KB lookup token made a 106 KB error line that printed it whole: now its sha256[:8], as the logs."""
    token = "T" * 100_000
    shown = shown_path("/lookup?token=" + token + "&pool=p")
    digest = hashlib.sha256(token.encode()).hexdigest()[:8]
    assert shown == f"/lookup (token {digest})"
    long_pool = shown_path("/pools/" + "p" * 100_000 + "/backends/b/drain")
    assert len(long_pool) <= 200 and long_pool.endswith("...")
    assert shown_path("/pools/p/backends/b/drain") == "/pools/p/backends/b/drain"


def test_a_status_of_more_backends_than_rows_draws_the_first_and_counts_the_rest() -> None:
    """The table stops at MAX_ROWS (5.6 million empty backends took 4 GB and a minute to draw)."""
    document = {"pools": {"a": {"backends": [{}] * MAX_ROWS}, "b": {"backends": [{"id": "b"}] * 1000}}}
    lines = render_status(document).splitlines()
    assert len(lines) == 1 + MAX_ROWS + 2, lines[-3:]
    assert lines[-2].startswith("... and 1000 more backends: the table stops at")
    assert lines[-1] == "live tunnels: 0, role: ?"


def test_discovery_notes_past_the_rows_are_counted_not_dropped_unsaid() -> None:
    document = {"pools": {f"p{i}": {"backends": [], "discovery": {"last_ok": 1}} for i in range(MAX_ROWS + 3)}}
    lines = render_status(document).splitlines()
    assert lines[-2] == "... and 3 more pools' discovery notes (--json has them all)"
    assert sum(line.startswith("discovery p") for line in lines) == MAX_ROWS


def test_every_backend_a_real_answer_can_carry_fits_in_the_table() -> None:
    """MAX_ROWS is above what MAX_ANSWER_BYTES carries of /status backends, as the admin API writes them."""
    from lb.config.model import BackendConfig
    from lb.control.status_document import _backend_document
    from lb.state.pool import BackendStatus

    smallest = _backend_document(BackendStatus(BackendConfig(id="b1", host="10.0.0.1", port=9001)), None)
    entry_bytes = len(json.dumps(smallest)) + 2  # aiohttp's json.dumps, and ", " between entries
    assert MAX_ANSWER_BYTES // entry_bytes <= MAX_ROWS, entry_bytes


class _Canned:
    """What http.client.HTTPResponse reads an answer from: these bytes, then the end of the stream."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self.data)


def _reply(raw: bytes) -> http.client.HTTPResponse:
    reply = http.client.HTTPResponse(_Canned(raw))  # type: ignore[arg-type]
    reply.begin()
    return reply


OK_HEAD = b"HTTP/1.1 200 OK\r\n"


@pytest.mark.parametrize(
    "raw",
    [OK_HEAD + b'Content-Length: 4000\r\n\r\n{"pools": {}}', OK_HEAD + b"Content-Length: 1\r\n\r\n",
     OK_HEAD + b'Transfer-Encoding: chunked\r\n\r\nd\r\n{"pools": {}}\r\n'],
    ids=["13 of 4000 bytes", "none of 1", "chunked without its last chunk"],
)
def test_an_answer_that_ends_before_its_body_does_is_incomplete(raw: bytes) -> None:
    """read1 returns b"" at the end of the stream as if the body were whole: the length still owed says not."""
    with pytest.raises(http.client.IncompleteRead):
        _read_until(_reply(raw), MAX_ANSWER_BYTES + 1)


@pytest.mark.parametrize(
    ("raw", "limit", "body"),
    [
        (OK_HEAD + b'Content-Length: 13\r\n\r\n{"pools": {}}', 1000, b'{"pools": {}}'),
        (OK_HEAD + b'Connection: close\r\n\r\n{"pools": {}}', 1000, b'{"pools": {}}'),  # no length: to the end
        (OK_HEAD + b'Transfer-Encoding: chunked\r\n\r\nd\r\n{"pools": {}}\r\n0\r\n\r\n', 1000, b'{"pools": {}}'),
        (OK_HEAD + b"Content-Length: 4000\r\n\r\n" + b" " * 4000, 100, b" " * 100),  # the limit, for the caller
    ],
    ids=["by length", "to the end", "chunked", "past the limit"],
)
def test_a_whole_answer_is_read_whole(raw: bytes, limit: int, body: bytes) -> None:
    assert _read_until(_reply(raw), limit) == body

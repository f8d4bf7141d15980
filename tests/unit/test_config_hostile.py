"""Configuration values that once gave a traceback, a secret in a message, or a config that validates and
then fails: each is now a problem at its key path (`lb validate` exit 2, a failed reload that says why)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from lb.config.load import parse_config
from lb.errors import ConfigError

KEY = "k" * 43
SECRET = "s3cret-" + "x" * 40


def tree(**extra: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "listeners": [{"bind": "127.0.0.1:8080"}],
        "affinity": {"secret_keys": [KEY]},
        "routes": [{"path_prefix": "/", "pool": "p"}],
        "pools": {"p": {"backends": [{"id": "a", "address": "127.0.0.1:1"}]}},
    }
    base.update(extra)
    return base


def problems(text: str, base_dir: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=base_dir, environ=environ or {})
    return {p.path: p.message for p in info.value.problems}


def tree_problems(value: dict[str, Any], base_dir: Path, environ: dict[str, str] | None = None) -> dict[str, str]:
    return problems(yaml.safe_dump(value), base_dir, environ)


# -- file names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("x" * 300 + ".crt", "File name too long"),  # the OSError is.is_file() raised
        ("~no-such-user-of-this-host/server.crt", "names no user"),  # pathlib's RuntimeError
        ("a\0b.crt", "NUL"),  # os.stat's ValueError
        ("\ud800.crt", "lone surrogate"),  # os.fsencode's UnicodeEncodeError
    ],
)
def test_a_tls_file_name_no_file_can_have_is_a_problem_at_its_path(tmp_path: Path, name: str, says: str) -> None:
    value = tree()
    value["listeners"][0]["tls"] = {"cert": name, "key": "server.key"}
    found = tree_problems(value, tmp_path)
    assert says in found["listeners[0].tls.cert"], found


@pytest.mark.parametrize(
    ("reference", "says"),
    [("~no-such-user-of-this-host/key", "names no user"), ("a\\0b", "NUL"), ("\\ud800", "lone surrogate")],
)
def test_a_file_reference_no_file_can_have_is_a_problem_at_its_path(tmp_path: Path, reference: str, says: str) -> None:
    # In double quotes, as YAML reads the escapes.
    text = yaml.safe_dump(tree()).replace(f"- {KEY}", f'- "${{file:{reference}}}"')
    found = problems(text, tmp_path)
    assert says in found["affinity.secret_keys[0]"], found


# -- what a message may show -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("logging", "level"), "${SECRET}"),
        (("timeouts", "handshake"), "${SECRET}"),
        (("listeners", 0, "bind"), "${SECRET}"),
        (("routes", 0, "path_prefix"), "${SECRET}"),
        (("pools", "p", "hash_key"), "${SECRET}"),
        (("trusted_proxies",), ["${SECRET}"]),
        (("affinity", "same_site"), "${file:secret.txt}"),
    ],
)
def test_a_value_from_a_reference_is_never_shown(tmp_path: Path, path: tuple[str | int, ...], value: object) -> None:
    """A variable or a mounted file may hold a key: a message names its length, never its text (the
    message goes to the reload's log line too)."""
    (tmp_path / "secret.txt").write_text(SECRET)
    config = tree()
    node: Any = config
    for step in path[:-1]:
        node = node.setdefault(step, {}) if isinstance(step, str) else node[step]
    node[path[-1]] = value
    found = tree_problems(config, tmp_path, {"SECRET": SECRET})
    text = "\n".join(found.values())
    assert found and "s3cret" not in text, found
    assert "not shown" in text


def test_a_long_duration_written_in_the_file_is_shown_cut_short(tmp_path: Path) -> None:
    found = tree_problems(tree(timeouts={"handshake": "9" * 5000 + "x"}), tmp_path)
    assert len(found["timeouts.handshake"]) < 200, found


# -- values that validated, then failed --------------------------------------------------------------


def test_a_secret_key_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """`LB_COOKIE_KEY=$(head -c32 /dev/urandom)`: its bytes arrive as lone surrogates; validate said ok
    and `lb run` died sealing the first token."""
    text = yaml.safe_dump(tree()).replace(KEY, "${KEY}")
    found = problems(text, tmp_path, {"KEY": "\udcff" + "k" * 43})
    assert "UTF-8" in found["affinity.secret_keys[0]"]


def test_an_admin_token_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    """With it, every POST to the admin API answered 500."""
    found = tree_problems(tree(admin={"bind": "127.0.0.1:9000", "token": "${TOKEN}"}), tmp_path,
                          {"TOKEN": "\udcfe" + "t" * 40})
    assert "UTF-8" in found["admin.token"]


@pytest.mark.parametrize("token", ["t" * 20 + "\u00e9", "t" * 20 + " t", "t" * 20 + "\r"])
def test_an_admin_token_a_header_cannot_carry_is_refused(tmp_path: Path, token: str) -> None:
    """lb ctl sends the token as Latin-1 and the admin API compares it as UTF-8: outside visible ASCII it
    could never match (a CR from a CRLF env file, say), though validate said ok."""
    found = tree_problems(tree(admin={"bind": "127.0.0.1:9000", "token": "${TOKEN}"}), tmp_path, {"TOKEN": token})
    assert "visible ASCII" in found["admin.token"]
    assert token not in found["admin.token"]


def test_an_integer_of_thousands_of_digits_is_out_of_range(tmp_path: Path) -> None:
    """int() refuses over 4,300 digits with a ValueError: that was a traceback."""
    found = tree_problems(tree(limits={"max_connections": "${N}"}), tmp_path, {"N": "9" * 5000})
    assert "5000 digits" in found["limits.max_connections"]
    assert "workers" in tree_problems(tree(workers="${N}"), tmp_path, {"N": "9" * 5000})
    value = tree()
    value["listeners"][0]["bind"] = "127.0.0.1:" + "9" * 5000
    assert "expected host:port" in tree_problems(value, tmp_path)["listeners[0].bind"]


@pytest.mark.parametrize(
    "literal", ["9" * 5000, "-" + "9" * 5000, "0x" + "f" * 4000, "0b" + "1" * 20_000, "1:" * 3000 + "1", "9" * 101],
    ids=["decimal", "negative", "hexadecimal", "binary", "sexagesimal", "just past the bound"],
)
def test_an_integer_written_with_thousands_of_digits_is_a_problem_at_its_path(tmp_path: Path, literal: str) -> None:
    """A decimal one failed as YAML was read (int()'s 4,300-digit limit: "invalid YAML", no key path), a
    hexadecimal one as its message printed it (a traceback); each is now said once, at its path, and the rest
    of the file is still checked."""
    text = yaml.safe_dump(tree(limits={"max_connections": "@"}, timeouts={"handshake": "0s"})).replace("'@'", literal)
    found = problems(text, tmp_path)
    assert found == {
        "limits.max_connections": f"integer too long: {len(literal)} characters, where no setting takes more than 100",
        "timeouts.handshake": "expected a duration greater than 0, got '0s'",
    }


@pytest.mark.parametrize(("written", "says"), [("9" * 5000, "integer too long"), ("${UNSET}", "is not set")])
def test_a_list_item_already_reported_is_said_once(tmp_path: Path, written: str, says: str) -> None:
    """An integer too long (or an unset variable) in a list of CIDRs or nameservers: said at its index, once
    (not again as "expected a CIDR ..., got _Reported")."""
    value = tree(trusted_proxies=["10.0.0.0/8", "@"])
    value["listeners"][0].update(proxy_protocol=True, proxy_protocol_from=["@"])
    value["pools"]["q"] = {"discovery": {"dns": "gw.example", "nameservers": ["127.0.0.1:53", "@"]}}
    with pytest.raises(ConfigError) as info:
        parse_config(yaml.safe_dump(value).replace("'@'", written), base_dir=tmp_path, environ={})
    found = info.value.problems
    paths = ["listeners[0].proxy_protocol_from[0]", "pools.q.discovery.nameservers[1]", "trusted_proxies[1]"]
    assert sorted(problem.path for problem in found) == paths
    assert all(says in problem.message for problem in found), found


def test_an_integer_too_long_as_a_key_is_named_by_its_mapping(tmp_path: Path) -> None:
    """No path can name it and no value stand for it: said at its mapping's path, and nothing more is read."""
    text = yaml.safe_dump(tree(limits={"max_connections": 10, "@": 1}, timeouts={"handshake": "0s"}))
    found = problems(text.replace("'@'", "? " + "9" * 5000 + "\n  "), tmp_path)
    assert found == {"limits": "a key: integer too long: 5000 characters, where no setting takes more than 100"}


def test_a_duration_has_an_upper_bound(tmp_path: Path) -> None:
    """`max_age: 99999999999999999999h` sealed tokens whose expiry no date can show; a hundred years is
    the bound (a native client may keep its cookie past a browser's 400 days)."""
    found = tree_problems(tree(affinity={"secret_keys": [KEY], "max_age": "99999999999999999999h"}), tmp_path)
    assert "at most 36500 days" in found["affinity.max_age"]
    longest = tree(affinity={"secret_keys": [KEY], "max_age": f"{36_500 * 24}h"})
    assert parse_config(yaml.safe_dump(longest), base_dir=tmp_path, environ={}).affinity.max_age == 36_500 * 86_400


@pytest.mark.parametrize("section", ["listener", "admin"])
def test_an_ipv4_mapped_bind_is_refused_with_the_address_to_write(tmp_path: Path, section: str) -> None:
    """Our IPv6 sockets are IPv6-only: `[::ffff:127.0.0.1]:8080` validated and never bound."""
    value = tree()
    if section == "listener":
        value["listeners"][0]["bind"] = "[::ffff:127.0.0.1]:8080"
        path = "listeners[0].bind"
    else:
        value["admin"] = {"bind": "[::ffff:127.0.0.1]:9000"}
        path = "admin.bind"
    assert "write 127.0.0.1:" in tree_problems(value, tmp_path)[path]


def test_an_ipv4_mapped_bind_from_a_reference_is_not_shown(tmp_path: Path) -> None:
    value = tree()
    value["listeners"][0]["bind"] = "${BIND}"
    found = tree_problems(value, tmp_path, {"BIND": "[::ffff:10.1.2.3]:8080"})
    assert "IPv4 address" in found["listeners[0].bind"] and "10.1.2.3" not in found["listeners[0].bind"]


def test_a_wrong_affinity_header_is_said_with_a_wrong_pool(tmp_path: Path) -> None:
    """Every problem at once: the header's check waited for valid pools, so it came after the fix of another."""
    value = tree(affinity={"secret_keys": [KEY], "header": "X_Forwarded_For"})
    value["pools"]["p"]["backends"][0]["address"] = "127.0.0.1"
    assert set(tree_problems(value, tmp_path)) == {"affinity.header", "pools.p.backends[0].address"}


@pytest.mark.parametrize(
    ("affinity", "expected"),
    [
        ({"secret_keys": [KEY], "header": "Cookie", "max_age": "soon"}, {"affinity.header", "affinity.max_age"}),
        ({"secret_keys": [""], "same_site": "None", "secure": "never"},
         {"affinity.secret_keys[0]", "affinity.same_site"}),
        ({"secret_keys": [KEY], "cookie": "__Host-lb", "secure": "never", "http_only": "maybe"},
         {"affinity.cookie", "affinity.http_only"}),
    ],
)
def test_a_bad_affinity_key_hides_no_problem_across_keys(
    tmp_path: Path, affinity: dict[str, object], expected: set[str]
) -> None:
    """The checks across affinity's keys run on those that parsed: one bad key is not fixed first to see the next."""
    assert set(tree_problems(tree(affinity=affinity), tmp_path)) == expected


def test_a_bad_pool_or_listener_key_hides_no_problem_across_keys(tmp_path: Path) -> None:
    """balance: hash without hash_key is said beside a wrong slow_start; proxy_protocol_from without
    proxy_protocol beside a wrong backlog."""
    value = tree()
    value["pools"]["p"].update(balance="hash", slow_start="later")
    value["listeners"][0].update(proxy_protocol_from=["10.0.0.0/8"], backlog="deep")
    assert set(tree_problems(value, tmp_path)) == {
        "pools.p.hash_key", "pools.p.slow_start", "listeners[0].proxy_protocol_from", "listeners[0].backlog",
    }


def test_a_wrong_key_is_not_judged_by_a_check_across_keys(tmp_path: Path) -> None:
    """A wrong `balance` or `hash_key` is said once, as itself, not as a mismatch between the two."""
    value = tree()
    value["pools"]["p"].update(balance="hashh", hash_key="header:X-User")
    assert set(tree_problems(value, tmp_path)) == {"pools.p.balance"}
    value["pools"]["p"].update(balance="hash", hash_key="body:x")
    assert set(tree_problems(value, tmp_path)) == {"pools.p.hash_key"}
    value = tree()
    value["listeners"][0].update(proxy_protocol_from=["10.0.0.0/8"], proxy_protocol="yes please")
    assert set(tree_problems(value, tmp_path)) == {"listeners[0].proxy_protocol"}


def test_checks_across_keys_wait_only_for_the_keys_they_read(tmp_path: Path) -> None:
    """A misspelt `mode` is not judged as insert (no false `__Host-` problem); a wrong `sticky` does not
    hide a `balance: hash` without `hash_key`."""
    value = tree(affinity={"secret_keys": [KEY], "mode": "rewrit", "cookie": "__Host-sid", "secure": "never"})
    assert set(tree_problems(value, tmp_path)) == {"affinity.mode"}
    value = tree()
    value["pools"]["p"].update(balance="hash", sticky="maybe")
    assert set(tree_problems(value, tmp_path)) == {"pools.p.hash_key", "pools.p.sticky"}


# -- the size of what ${...} references expand to ---------------------------------------------------


def _aliased(value: str, uses: int = 90_000) -> str:
    """`value` under an anchor, then lists of aliases that use it `uses` times (a few lines of YAML)."""
    lines = [f"x_s: &s {value}", "x_l1: &l1 [" + ",".join(["*s"] * 10) + "]"]
    for level in range(2, 5):
        lines.append(f"x_l{level}: &l{level} [" + ",".join([f"*l{level - 1}"] * 10) + "]")
    lines.append("x_l5: [" + ",".join(["*l4"] * (uses // 10_000)) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "environ"),
    [
        # A 100 KB value shared by 90,000 aliases: each use was expanded into a copy of its own (9 GB).
        (_aliased('"' + "A" * 100_000 + '$${"'), {}),
        (_aliased('"${BIG}"'), {"BIG": "B" * 100_000}),
        # One value naming a long variable many times: one string of gigabytes.
        ("pools: {p: {x: '" + "${BIG}" * 100_000 + "'}}\n", {"BIG": "B" * 100_000}),
    ],
    ids=["aliased-literal", "aliased-variable", "repeated-reference"],
)
def test_references_that_expand_past_the_budget_are_one_problem(
    tmp_path: Path, text: str, environ: dict[str, str]
) -> None:
    """A config whose ${...} references expand to more than any real one is a problem, not gigabytes."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path, environ=environ)
    budget = [problem for problem in info.value.problems if "expand to more than" in problem.message]
    assert len(budget) == 1, info.value.problems


def test_references_within_the_budget_expand(tmp_path: Path) -> None:
    """The budget counts what the references produce, and a large real value is well within it."""
    value = tree(admin={"token": "${TOKEN}"}, affinity={"secret_keys": ["${KEY}"] * 100})
    config = parse_config(yaml.safe_dump(value), base_dir=tmp_path, environ={"TOKEN": "t" * 60_000, "KEY": KEY})
    assert config.admin.token == "t" * 60_000


def test_a_key_too_long_is_one_short_problem_at_its_mappings_path(tmp_path: Path) -> None:
    """A megabyte key (an explicit `? key`) is refused before it is copied into the path of every value below it:
    with aliased lists below, it cost seconds and put the megabyte into the problem's path and the reload's log."""
    lines = ["x_s: &s 1", "x_l1: &l1 [" + ",".join(["*s"] * 10) + "]"]
    lines += [f"x_l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]" for i in range(2, 5)]
    text = "\n".join([*lines, "pools:", f"  ? {'K' * 1_000_000}", "  : [" + ",".join(["*l4"] * 9) + "]"]) + "\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, base_dir=tmp_path, environ={})
    assert [(p.path, p.message) for p in info.value.problems] == [
        ("pools", "a key of 1000000 characters, where no key takes more than 1024")
    ]


@pytest.mark.parametrize(("chars", "refused"), [(1024, False), (1025, True)])
def test_the_key_length_limit(tmp_path: Path, chars: int, refused: bool) -> None:
    """The limit is YAML's own for a plain key; a longer pool name is still that key's own problem below it."""
    said = problems(f"pools:\n  ? {'p' * chars}\n  : {{}}\n", tmp_path)
    assert (said.get("pools") == f"a key of {chars} characters, where no key takes more than 1024") is refused, said
    assert (f"pools.{'p' * chars}" in said) is not refused


def test_a_secret_key_given_twice_is_kept_once_in_its_first_place(tmp_path: Path) -> None:
    """Each copy of a key was tried on every token naming its key id (a forged one too); the first seals."""
    other = "o" * 43
    value = tree(affinity={"secret_keys": [KEY, other, KEY, *[other] * 1000]})
    config = parse_config(yaml.safe_dump(value), base_dir=tmp_path, environ={})
    assert config.affinity.secret_keys == (KEY, other)


def test_a_path_too_long_is_one_problem_and_nothing_below_it_is_walked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys within MAX_KEY_CHARS, nested 60 deep and walked through 1,500 aliases (66 KB of YAML), built 90,000
    paths of some 30 KB each (1.6 s of a reload): a path past MAX_PATH_CHARS is one problem, and the walk stops
    there.  Counted in the paths built, not timed."""
    from lb.config import document

    built = 0
    join_path = document.join_path

    def counting(path: str, key: object) -> str:
        nonlocal built
        built += 1
        return join_path(path, key)

    monkeypatch.setattr(document, "join_path", counting)
    inner = "1"
    for depth in range(60):
        inner = "{" + f"{depth:02d}".rjust(1024, "k") + ": " + inner + "}"
    text = f"x_m: &m {inner}\nx_l: [" + ",".join(["*m"] * 1500) + "]\n"
    said = problems(text, tmp_path)
    too_long = [(path, message) for path, message in said.items() if "path is longer" in message]
    assert len(too_long) == 1 and len(too_long[0][0]) <= document.MAX_PATH_CHARS + 3, too_long
    assert built < 5_000, built

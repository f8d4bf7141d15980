"""The reconnect proof's pure parts: cookie handling, verdict and table (no socket, no event loop)."""

from __future__ import annotations

import hashlib

import pytest

from backends_demo.client import (
    Attempt,
    CookieView,
    cookie_digest,
    default_source_ips,
    describe_cookies,
    is_sticky,
    parse_args,
    parse_set_cookie,
    render_cookie_header,
    render_table,
    update_jar,
    verdict,
)

TOKEN = "v1.AbC-dEf_0123456789xyz"


def attempt(number: int, server_id: str, source_ip: str | None = None, *cookies: CookieView) -> Attempt:
    ip = source_ip or f"127.0.0.{number + 2}"
    return Attempt(number=number, source_ip=ip, seen_ip=ip, server_id=server_id, cookies=cookies)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (f"LB_AFFINITY={TOKEN}; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax", ("LB_AFFINITY", TOKEN)),
        (
            f"LB_AFFINITY={TOKEN}; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax; Secure",
            ("LB_AFFINITY", TOKEN),
        ),
        ("SID=abc; Expires=Wed, 21 Oct 2037 07:28:00 GMT; Path=/", ("SID", "abc")),
        ('SID="quoted value"; Path=/', ("SID", '"quoted value"')),
        ("SID=abc==; Path=/", ("SID", "abc==")),
        ("SID=abc; Path=/; Partitioned", ("SID", "abc")),
        ("SID=; Max-Age=0; Path=/", ("SID", None)),
        ("SID=gone; Max-Age=-1", ("SID", None)),
        ("SID=abc; Max-Age=soon", ("SID", "abc")),
        ("", None),
        ("no pair here", None),
    ],
)
def test_parse_set_cookie(header: str, expected: tuple[str, str | None] | None) -> None:
    """A Set-Cookie header yields its name and the value exactly as sent, or a deletion."""
    assert parse_set_cookie(header) == expected


def test_update_jar_keeps_replaces_and_deletes() -> None:
    """The balancer's new cookie replaces the kept one; Max-Age=0 deletes; other cookies stay."""
    jar = {"LB_AFFINITY": "old", "SID": "s1", "gone": "x"}
    updated = update_jar(jar, ["LB_AFFINITY=new; Path=/", "gone=; Max-Age=0", "other=o; HttpOnly"])
    assert updated == {"LB_AFFINITY": "new", "SID": "s1", "other": "o"}
    assert jar == {"LB_AFFINITY": "old", "SID": "s1", "gone": "x"}  # the input is left alone


def test_update_jar_without_set_cookie_keeps_everything() -> None:
    """A response without Set-Cookie leaves the kept cookies unchanged."""
    assert update_jar({"LB_AFFINITY": TOKEN}, []) == {"LB_AFFINITY": TOKEN}


def test_render_cookie_header() -> None:
    """Kept cookies go back as one Cookie header; none means no header."""
    assert render_cookie_header({}) is None
    assert render_cookie_header({"LB_AFFINITY": TOKEN, "SID": "s1"}) == f"LB_AFFINITY={TOKEN}; SID=s1"


def test_cookie_digest_is_sha256_prefix() -> None:
    """The table shows sha256(value)[:8], never the value."""
    assert cookie_digest(TOKEN) == hashlib.sha256(TOKEN.encode()).hexdigest()[:8]
    assert len(cookie_digest("")) == 8


def test_describe_cookies_marks_new_and_changed() -> None:
    """A cookie is marked fresh when this attempt set or changed it."""
    views = describe_cookies({"A": "1", "B": "2"}, {"A": "1", "B": "3", "C": "4"})
    assert views == (
        CookieView("A", cookie_digest("1"), fresh=False),
        CookieView("B", cookie_digest("3"), fresh=True),
        CookieView("C", cookie_digest("4"), fresh=True),
    )


def test_default_source_ips() -> None:
    """Default source IPs count up from 127.0.0.2."""
    assert default_source_ips(3) == ("127.0.0.2", "127.0.0.3", "127.0.0.4")
    assert default_source_ips(0) == ("127.0.0.2",)
    assert default_source_ips(1000)[-1] == "127.0.0.254"


def test_sticky_verdict() -> None:
    """All attempts on one server id is STICKY, counting distinct source IPs."""
    attempts = [attempt(n, "gw-2") for n in range(6)]
    assert is_sticky(attempts)
    assert verdict(attempts) == "STICKY: all 6 attempts reached gw-2 from 6 source IPs"


def test_not_sticky_verdict() -> None:
    """Attempts spread over servers are NOT STICKY, with the spread and the first move."""
    attempts = [attempt(0, "gw-1"), attempt(1, "gw-1"), attempt(2, "gw-2"), attempt(3, "gw-1", "127.0.0.2")]
    assert not is_sticky(attempts)
    assert verdict(attempts) == (
        "NOT STICKY: 4 attempts from 3 source IPs reached 2 servers: gw-1 (3), gw-2 (1);"
        " first moved at attempt 2"
    )


def test_no_attempts_is_not_sticky() -> None:
    """An empty proof proves nothing."""
    assert not is_sticky([])
    assert verdict([]).startswith("NOT STICKY")


def test_render_table_shows_digests_not_cookies() -> None:
    """The table has one row per attempt with source IP, server id and cookie digest, then the verdict."""
    new = CookieView("LB_AFFINITY", cookie_digest(TOKEN), fresh=True)
    kept = CookieView("LB_AFFINITY", cookie_digest(TOKEN), fresh=False)
    table = render_table([attempt(0, "gw-3", None, new), attempt(1, "gw-3", None, kept), attempt(2, "gw-3")])
    lines = table.splitlines()
    assert lines[0].split() == ["attempt", "source", "ip", "seen", "as", "server", "cookies"]
    assert lines[1].split() == [
        "0",
        "127.0.0.2",
        "127.0.0.2",
        "gw-3",
        "LB_AFFINITY",
        f"sha256:{new.digest}",
        "(new)",
    ]
    assert lines[2].split() == ["1", "127.0.0.3", "127.0.0.3", "gw-3", "LB_AFFINITY", f"sha256:{new.digest}"]
    assert lines[3].split() == ["2", "127.0.0.4", "127.0.0.4", "gw-3", "-"]
    assert lines[4] == "STICKY: all 3 attempts reached gw-3 from 3 source IPs"
    assert TOKEN not in table
    # columns line up: every row's server id starts where the header's does
    column = lines[0].index("server")
    assert all(line[column:].startswith("gw-3") for line in lines[1:4])


def test_render_table_without_verdict() -> None:
    """A partial table (after a failure) can leave the verdict out."""
    table = render_table([attempt(0, "gw-1")], include_verdict=False)
    assert len(table.splitlines()) == 2
    assert "STICKY" not in table


@pytest.mark.parametrize(
    "url",
    ["ws://127.0.0.1:99999/ws", "ws://127.0.0.1:abc/ws", "ws://:8080/ws", "ws:/ws", "ws:///ws", "http://127.0.0.1/ws"],
)
def test_a_bad_url_is_a_usage_error(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A URL with no host or a bad port is a bad argument: one line naming --url, exit 2.  It was a traceback
    and exit 1, the client's answer for "not sticky" (found black-box: --url ws://127.0.0.1:99999/ws)."""
    with pytest.raises(SystemExit) as exited:
        parse_args(["--url", url])
    assert exited.value.code == 2
    assert "error: --url" in capsys.readouterr().err

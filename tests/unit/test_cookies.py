"""Cookie headers: our cookie is read and removed; every other cookie passes unchanged (RFC 6265)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.config.model import SameSite
from lb.http.cookies import (
    parse_set_cookie,
    read_cookie,
    reissue_set_cookie,
    render_set_cookie,
    rewrite_cookie,
    strip_cookie,
)

NAME = "LB_AFFINITY"


# -- read_cookie ------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "values"),
    [
        ([], []),
        (["a=1"], []),
        (["LB_AFFINITY=tok"], ["tok"]),
        (["a=1; LB_AFFINITY=tok; b=2"], ["tok"]),
        (["a=1", "LB_AFFINITY=tok"], ["tok"]),
        (["LB_AFFINITY=one; LB_AFFINITY=two", "LB_AFFINITY=three"], ["one", "two", "three"]),
        (['LB_AFFINITY="quoted"'], ["quoted"]),
        (['LB_AFFINITY="'], ['"']),
        (["  LB_AFFINITY  =  spaced  ;b=2"], ["spaced"]),
        (["LB_AFFINITY="], [""]),
        (["LB_AFFINITY=a=b"], ["a=b"]),
        (["LB_AFFINITY"], []),
        (["lb_affinity=lower; XLB_AFFINITY=x; LB_AFFINITYX=y"], []),
        (["a=1;;; LB_AFFINITY=t;"], ["t"]),
    ],
    ids=[
        "no header",
        "other cookie",
        "alone",
        "in the middle",
        "second header",
        "repeated names",
        "quoted",
        "lone quote",
        "spaces",
        "empty value",
        "equals in value",
        "no equals",
        "case and prefix differ",
        "stray semicolons",
    ],
)
def test_read_cookie(headers: list[str], values: list[str]) -> None:
    """Every value of the named cookie across all Cookie headers, in order; names are case-sensitive."""
    assert read_cookie(headers, NAME) == values


def _read_cookie_by_pairs(header_values: list[str], name: str) -> list[str]:
    """read_cookie as it was: every pair of every header (stripped part, then name and value), then the
    named ones, unquoted."""
    found = []
    for header in header_values:
        for part in header.split(";"):
            pair_name, eq, value = part.strip().partition("=")
            if eq and pair_name.strip() == name:
                stripped = value.strip()
                found.append(stripped[1:-1] if len(stripped) >= 2 and stripped[0] == stripped[-1] == '"' else stripped)
    return found


@settings(max_examples=1000, deadline=None)
@given(
    headers=st.lists(
        st.lists(st.sampled_from([NAME, "LB", "AFFINITY", "=", ";", " ", "\t", '"', "x", "\x0b", "\u00a0"]),
                 max_size=12).map("".join),
        max_size=3,
    )
)
def test_read_cookie_reads_as_every_pair_would(headers: list[str]) -> None:
    """Whitespace of every kind around names and values, quotes, stray `=` and `;`: the same values as
    reading every pair first."""
    assert read_cookie(headers, NAME) == _read_cookie_by_pairs(headers, NAME)


# -- strip_cookie -----------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "stripped"),
    [
        ("LB_AFFINITY=tok", None),
        ("LB_AFFINITY=tok; LB_AFFINITY=old", None),
        (" LB_AFFINITY=tok ; ", None),
        ("a=1; LB_AFFINITY=tok; b=2", "a=1; b=2"),
        ('LB_AFFINITY=tok; session=Ab+/9==; theme="dark mode"', 'session=Ab+/9==; theme="dark mode"'),
        ("a=1; b=2", "a=1; b=2"),
        ("lb_affinity=keep; LB_AFFINITY=drop", "lb_affinity=keep"),
        ("a=1; LB_AFFINITY=x; a=2", "a=1; a=2"),
        ("flag; LB_AFFINITY=x", "flag"),
        ("a= spaced value ; LB_AFFINITY=x", "a= spaced value"),
    ],
    ids=[
        "only ours",
        "ours twice",
        "ours with padding",
        "between others",
        "others byte for byte",
        "nothing to strip",
        "other case kept",
        "repeated other names",
        "valueless part kept",
        "inner spaces kept",
    ],
)
def test_strip_cookie(header: str, stripped: str | None) -> None:
    """Our cookie is removed and the others pass byte for byte; nothing left gives None."""
    assert strip_cookie(header, NAME) == stripped


# -- rewrite_cookie ---------------------------------------------------------


def test_rewrite_cookie_replaces_each_value() -> None:
    """Each value of the named cookie (unquoted) goes through `replace`; others are untouched."""
    seen: list[str] = []

    def replace(value: str) -> str:
        seen.append(value)
        return value.upper()

    header = 'a=1; sid="abc"; b=2; sid=def'
    assert rewrite_cookie(header, "sid", replace) == "a=1; sid=ABC; b=2; sid=DEF"
    assert seen == ["abc", "def"]


def test_a_value_replace_leaves_as_it_is_keeps_its_quotes() -> None:
    """Rewrite mode: the backend's own cookie that is no token of ours passes as it came (SPEC: "the
    backend always sees the value it set, unchanged"), `"legacy"` with its quotes."""
    assert rewrite_cookie('SESSIONID="legacy"; y=2', "SESSIONID", lambda v: v) == 'SESSIONID="legacy"; y=2'
    assert rewrite_cookie('x=1;  SESSIONID=plain', "SESSIONID", lambda v: v) == "x=1;  SESSIONID=plain"


def test_rewrite_cookie_none_removes_pair() -> None:
    """`replace` answering None removes that pair; None overall when nothing is left."""
    assert rewrite_cookie("sid=a; x=1; sid=b", "sid", lambda v: None if v == "a" else v) == "x=1; sid=b"
    assert rewrite_cookie("sid=a", "sid", lambda _v: None) is None


def test_rewrite_cookie_unwraps_our_token_for_the_backend() -> None:
    """In rewrite mode the backend sees the value it set, not our token."""
    tokens = {"TOKEN": "app-session-42"}
    assert rewrite_cookie("JSESSIONID=TOKEN; lang=en", "JSESSIONID", tokens.get) == (
        "JSESSIONID=app-session-42; lang=en"
    )


@pytest.mark.parametrize("header", ["a=1;b=2", "a=1\xa0", " x=1 ;;y", "flag", "a=\"q\"  ;  b=2"])
def test_a_header_without_the_cookie_passes_byte_for_byte(header: str) -> None:
    """SPEC: other cookies pass unchanged; without ours there is nothing to rewrite at all."""
    assert rewrite_cookie(header, NAME, lambda _v: None) == header
    assert strip_cookie(header, NAME) == header


def test_other_pairs_keep_their_bytes_when_ours_is_stripped() -> None:
    """SPEC: other cookies pass unchanged, their separators too (`a=1;b=2` was sent on as `a=1; b=2`)."""
    assert strip_cookie("a=1\xa0;LB_AFFINITY=t;b= 2", NAME) == "a=1\xa0;b= 2"
    assert strip_cookie("a=1;b=2;LB_AFFINITY=t", NAME) == "a=1;b=2"
    assert strip_cookie("LB_AFFINITY=t;  a=1 ;b=2 ", NAME) == "a=1 ;b=2"
    assert strip_cookie(" ; ", NAME) is None  # an empty header is still dropped


# -- render_set_cookie ------------------------------------------------------


def test_render_set_cookie_exact() -> None:
    """Our Set-Cookie is exactly `name=tok; Path=/; Max-Age=N; HttpOnly; SameSite=X` (SPEC)."""
    assert (
        render_set_cookie("LB_AFFINITY", "tok", max_age=3600, same_site=SameSite.LAX, http_only=True, secure=False)
        == "LB_AFFINITY=tok; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"
    )


def test_render_set_cookie_secure() -> None:
    """On TLS (or secure: always) the cookie ends with `; Secure`."""
    assert (
        render_set_cookie("LB_AFFINITY", "tok", max_age=3600, same_site=SameSite.LAX, http_only=True, secure=True)
        == "LB_AFFINITY=tok; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax; Secure"
    )


@pytest.mark.parametrize(
    ("same_site", "http_only", "expected"),
    [
        (SameSite.STRICT, True, "c=v; Path=/; Max-Age=60; HttpOnly; SameSite=Strict"),
        (SameSite.NONE, True, "c=v; Path=/; Max-Age=60; HttpOnly; SameSite=None"),
        (SameSite.LAX, False, "c=v; Path=/; Max-Age=60; SameSite=Lax"),
    ],
)
def test_render_set_cookie_options(same_site: SameSite, http_only: bool, expected: str) -> None:
    """SameSite follows the config and HttpOnly is left out when http_only is false."""
    assert render_set_cookie("c", "v", max_age=60, same_site=same_site, http_only=http_only, secure=False) == (expected)


# -- hostile input ----------------------------------------------------------

# RFC 6265 §4.1.1 cookie-name (token) and cookie-octet characters.
_NAME_CHARS = "!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
_OCTETS = "".join(chr(c) for c in range(0x21, 0x7F) if chr(c) not in '",;\\')
_names = st.one_of(st.just(NAME), st.just("lb_affinity"), st.text(_NAME_CHARS, min_size=1, max_size=8))
_values = st.one_of(st.text(_OCTETS, max_size=12), st.text(_OCTETS, max_size=10).map(lambda v: f'"{v}"'))


@settings(max_examples=300, deadline=None)
@given(pairs=st.lists(st.tuples(_names, _values), max_size=8), seps=st.sampled_from(["; ", ";", " ;  "]))
def test_strip_cookie_removes_ours_and_keeps_every_other_pair(pairs: list[tuple[str, str]], seps: str) -> None:
    """Stripping leaves no trace of our cookie and every other pair, in order and byte for byte."""
    header = seps.join(f"{n}={v}" for n, v in pairs)
    others = [f"{n}={v}" for n, v in pairs if n != NAME]
    result = strip_cookie(header, NAME)
    if not others:
        assert result is None
        return
    # Without ours the header is untouched; with it, the others keep their separators.
    assert result == (seps.join(others).lstrip(" \t") if len(others) < len(pairs) else header)
    assert read_cookie([result], NAME) == []


_hostile_headers = st.lists(
    st.one_of(st.text(max_size=12), _names.map(lambda n: f" {n} = x"), st.just(NAME + "=t")), max_size=8
).map(";".join)


@settings(max_examples=300, deadline=None)
@given(header=_hostile_headers)
def test_strip_cookie_on_arbitrary_text(header: str) -> None:
    """Whatever a client sends, our cookie is gone afterwards and every other cookie reads the same."""
    result = strip_cookie(header, NAME)
    kept = [] if result is None else [result]
    assert read_cookie(kept, NAME) == []
    names = {part.strip().partition("=")[0].strip() for part in header.split(";") if "=" in part}
    for other in names - {NAME}:
        assert read_cookie(kept, other) == read_cookie([header], other)


_one_pair_alphabet = st.sampled_from([NAME, "LB", "AFFINITY", "=", " ", "\t", '"', "x", "\x0b", "\u00a0", "\x1c"])


@settings(max_examples=1000, deadline=None)
@given(header=st.one_of(st.lists(_one_pair_alphabet, max_size=10).map("".join), _hostile_headers))
def test_strip_cookie_is_rewrite_cookie_removing_every_value(header: str) -> None:
    """The one-pair shortcut gives what the general rewrite does: whitespace of every kind (Python's
    `strip()` and the separators' " \t"), stray `=` and quotes, and headers of several pairs."""
    assert strip_cookie(header, NAME) == rewrite_cookie(header, NAME, lambda _value: None)


# -- reissue_set_cookie (rewrite mode): a backend's Set-Cookie is hostile input ------------------

ATTRIBUTE = st.one_of(
    st.sampled_from(["Path=/a", "path=", "Domain=x.example", "Max-Age=5", "max-age=-1", "Max-Age=99999",
                     "Max-Age=1e3", "Expires=Wed, 21 Oct 2026 07:28:00 GMT", "HttpOnly", "Secure",
                     "SameSite=Strict", "samesite=none", "SameSite=bogus", "Partitioned", "", "=", "==x"]),
    st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters=";"), max_size=20),
)


@settings(max_examples=300, deadline=None)
@given(attributes=st.lists(ATTRIBUTE, max_size=8), secure=st.booleans())
def test_a_reissued_cookie_states_each_setting_once_whatever_the_backend_wrote(
    attributes: list[str], secure: bool
) -> None:
    header = "; ".join(["SID=app", *attributes])
    out = reissue_set_cookie(
        parse_set_cookie(header), "TOKEN", max_age=60, same_site=SameSite.LAX, http_only=True, secure=secure
    )
    pair, *parts = out.split("; ")
    assert pair == "SID=TOKEN"
    names = [part.partition("=")[0].strip().lower() for part in parts]
    for restated in ("samesite", "httponly"):
        assert names.count(restated) == 1, out
    # The backend's Path when it gave a valid one, else none (the browser's default path, RFC 6265 §5.2.4).
    valid_path = parse_set_cookie(header).last("path") or ""
    assert names.count("path") == (1 if valid_path.startswith("/") else 0), out
    assert names.count("max-age") + names.count("expires") == 1, out
    assert names.count("secure") == (1 if secure or "secure" in [a.strip().lower() for a in attributes] else 0)
    max_ages = [int(part.partition("=")[2]) for part in parts if part.lower().startswith("max-age=")]
    assert all(0 < age <= 60 for age in max_ages) or parse_set_cookie(header).deletes_at(None), out


@pytest.mark.parametrize(
    ("header", "deletion"),
    [("SID=", True), ("SID=; Path=/", True), ("SID=v; Max-Age=0", True), ("SID=v; max-age=-5", True),
     ("SID=v; Max-Age=0; Max-Age=10", False), ("SID=v; Max-Age=x", False), ("SID=v", False),
     ("SID=v; Max-Age=" + "9" * 5000, False), ("SID=v; Max-Age=-" + "9" * 5000, True),
     ("SID=v; Max-Age=" + "0" * 5000, True)],
)
def test_a_deletion_is_an_empty_value_or_a_max_age_of_zero_or_less(header: str, deletion: bool) -> None:
    assert parse_set_cookie(header).deletes_at(None) is deletion


NOW = 1_800_000_000.0  # 2027-01-15 08:00:00 UTC


@pytest.mark.parametrize(
    ("header", "deletion"),
    [
        ("SID=deleted; Expires=Thu, 01 Jan 1970 00:00:00 GMT", True),
        ("SID=x; expires=Thursday, 01-Jan-70 00:00:01 GMT", True),  # RFC 850, as old frameworks write it
        ("SID=x; Expires=Fri, 15 Jan 2027 09:00:00 GMT", False),  # an hour after NOW
        ("SID=x; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=60", False),  # Max-Age wins
        ("SID=x; Expires=not a date", False),
        ("SID=x; Expires=" + "9" * 5000, False),
        ("SID=x", False),
    ],
)
def test_a_past_expires_deletes_too(header: str, deletion: bool) -> None:
    """A backend logging a user out with a date in the past: rewrite mode must not seal that value."""
    assert parse_set_cookie(header).deletes_at(NOW) is deletion
    assert parse_set_cookie(header).deletes_at(None) is False  # without a clock only what needs none


def test_a_huge_max_age_is_a_long_life_not_an_error() -> None:
    """int() refuses 4,300 digits and more: a backend's Max-Age must not fail the handshake."""
    out = reissue_set_cookie(
        parse_set_cookie("SID=v; Max-Age=" + "9" * 5000), "T", max_age=60, same_site=SameSite.LAX,
        http_only=False, secure=False,
    )
    assert out == "SID=T; Max-Age=60; SameSite=Lax"


def test_the_backends_last_samesite_is_the_one_compared() -> None:
    """Browsers read the last SameSite attribute: `Strict; None` is None, so the configured Lax stands."""
    out = reissue_set_cookie(
        parse_set_cookie("SID=v; SameSite=Strict; SameSite=None"), "T", max_age=60, same_site=SameSite.LAX,
        http_only=False, secure=True,
    )
    assert "SameSite=Lax" in out and "Strict" not in out


@pytest.mark.parametrize(
    ("attributes", "path"),
    [("", None), ("; Path=", None), ("; Path=api", None), ("; Path=/api", "/api"), ("; Path=/api; Path=x", None),
     ("; Path=x; Path=/", "/")],
    ids=["none", "empty", "relative", "kept", "last invalid", "last valid"],
)
def test_a_reissued_cookie_without_a_valid_path_gets_none(attributes: str, path: str | None) -> None:
    """Without a valid Path the browser stores the cookie at the request's default path (RFC 6265 §5.1.4,
    `/api` for `/api/login`): `Path=/` would outlive the backend's logout `SID=; Max-Age=0` from `/api/logout`."""
    out = reissue_set_cookie(
        parse_set_cookie(f"SID=app; HttpOnly{attributes}"), "T", max_age=60, same_site=SameSite.LAX,
        http_only=False, secure=False,
    )
    paths = [part for part in out.split("; ") if part.lower().startswith("path=")]
    assert paths == ([] if path is None else [f"Path={path}"]), out

"""Where the affinity token travels in HTTP (SPEC: Affinity semantics), per mode.  Pure: no socket, no loop.

In: cookie, then `affinity.header`, then `affinity.query_param`; an unusable token is treated as absent.
Out to the backend: insert mode removes every trace of the token; rewrite mode gives the backend back exactly
the value it set (only when the request goes to the backend the token names), other cookies byte for byte.
"""

from __future__ import annotations

from base64 import urlsafe_b64encode
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.affinity.carriers import (
    MAX_COOKIE_PAIR,
    MAX_SEALS,
    NO_TOKEN,
    TokenLookup,
    find_token,
    fitting_value,
    our_set_cookie,
    plan_forward,
    rewrite_response_cookies,
)
from lb.affinity.codec import NONCE_BYTES, Claim, TokenCodec
from lb.config.model import AffinityConfig, AffinityMode, SameSite
from lb.http.cookies import render_set_cookie
from lb.http.forwarding import render_forwarded_request
from lb.http.head import RequestHead, parse_request_head, parse_response_head

NOW = 1_700_000_000.0
KEYS = ("current-secret-for-tests", "previous-secret-for-tests")
CODEC = TokenCodec(KEYS, 3600)
OTHER_CODEC = TokenCodec(("somebody-elses-secret",), 3600)
SESSION = bytes(range(8))
HEADER = "X-LB-Affinity"  # the token's header is off unless named: these tests name it
INSERT = AffinityConfig(secret_keys=KEYS, header=HEADER)
REWRITE = AffinityConfig(secret_keys=KEYS, mode=AffinityMode.REWRITE, cookie="SESSIONID", header=HEADER)


def seal(
    backend: str,
    *,
    app_value: str | None = None,
    issued_at: float = NOW,
    codec: TokenCodec = CODEC,
    nonce: int = 1,
) -> str:
    claim = Claim(backend_id=backend, issued_at=int(issued_at), session=SESSION, app_value=app_value)
    return codec.seal(claim, nonce.to_bytes(NONCE_BYTES, "big"))


def tamper(token: str) -> str:
    """Flip one character inside the ciphertext (well clear of the base64 padding bits)."""
    i = len(token) // 2
    return token[:i] + ("A" if token[i] != "A" else "B") + token[i + 1 :]


def request(target: str = "/ws", *headers: tuple[str, str]) -> RequestHead:
    lines = [f"GET {target} HTTP/1.1", "Host: lb.example:8080", *(f"{k}: {v}" for k, v in headers)]
    return parse_request_head(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def forwarded(req: RequestHead, affinity: AffinityConfig, lookup: TokenLookup, *, to_claimed: bool) -> RequestHead:
    """What the backend receives, parsed back."""
    plan = plan_forward(req, affinity, lookup, to_claimed)
    raw = render_forwarded_request(
        req,
        forwarded_for="203.0.113.9",
        proto="http",
        websocket=False,
        rewrite_cookie=plan.rewrite_cookie,
        drop=plan.drop,
        target=plan.target,
        append_cookie=plan.append_cookie,
    )
    return parse_request_head(raw)


GW1 = seal("gw-1")
GW2 = seal("gw-2", nonce=2)
GW3 = seal("gw-3", nonce=3)


# -- find_token ---------------------------------------------------------------


def test_no_token_anywhere() -> None:
    lookup = find_token(request("/ws?a=1", ("Cookie", "a=1")), INSERT, CODEC, NOW)
    assert lookup.claim is None and lookup.token is None and lookup.rejected == {}


def test_every_request_without_a_token_gets_one_answer_that_nothing_changes() -> None:
    """A new client's lookup is one object for all (`NO_TOKEN`), so nothing may change it: requests with
    rejected, valid and other pools' tokens in between each get their own, and it stays empty."""
    first = find_token(request("/ws"), INSERT, CODEC, NOW, pool="game")
    assert first is NO_TOKEN
    for bad in (tamper(GW1), f"{tamper(GW1)}.{tamper(GW2)}"):  # one token alone, and a search among several
        assert find_token(request("/ws", ("Cookie", f"LB_AFFINITY={bad}")), INSERT, CODEC, NOW).rejected
    assert find_token(request("/ws", ("Cookie", f"LB_AFFINITY={GW1}.{GW1}")), INSERT, CODEC, NOW).claim is not None
    game_pin = CODEC.seal(Claim(backend_id="gw-1", issued_at=NOW, session=SESSION, pool="game"), bytes(NONCE_BYTES))
    assert find_token(request("/ws", ("Cookie", f"LB_AFFINITY={game_pin}")), INSERT, CODEC, NOW, pool="chat").others
    assert find_token(request("/other", ("Cookie", "a=1")), INSERT, CODEC, NOW) is NO_TOKEN
    assert (NO_TOKEN.claim, NO_TOKEN.token, NO_TOKEN.from_cookie, NO_TOKEN.rejected, NO_TOKEN.others,
            NO_TOKEN.cookie_sent) == (None, None, False, {}, (), False)


def test_a_query_parameter_without_a_value_is_no_token() -> None:
    """`?lb_affinity` (no `=`) carries no token: nothing is opened, so nothing is counted invalid."""
    lookup = find_token(request("/ws?lb_affinity&a=1"), INSERT, CODEC, NOW)
    assert lookup.claim is None and lookup.token is None and lookup.rejected == {}


@pytest.mark.parametrize(
    ("req", "from_cookie"),
    [
        (request("/ws", ("Cookie", f"theme=dark; LB_AFFINITY={GW1}")), True),
        (request("/ws", ("X-LB-Affinity", GW1)), False),
        (request("/ws", ("x-lb-affinity", f"  {GW1} ")), False),
        (request(f"/ws?lb_affinity={GW1}"), False),
        (request(f"/ws?room=7&lb_affinity={GW1}&x=y"), False),
        (request(f"/ws?lb%5Faffinity={GW1}"), False),
        (request(f"/ws?room=7&%6cb%5faffinity={GW1}"), False),
    ],
    ids=["cookie", "header", "header lower case, spaces", "query", "query among others",
         "query, name form-encoded", "query, name form-encoded in lower case"],
)
def test_token_found_in_each_carrier(req: RequestHead, from_cookie: bool) -> None:
    """The same token works as cookie, X-LB-Affinity header or ?lb_affinity= parameter."""
    lookup = find_token(req, INSERT, CODEC, NOW)
    assert lookup.claim is not None and lookup.claim.backend_id == "gw-1"
    assert lookup.token == GW1
    assert lookup.from_cookie is from_cookie


@pytest.mark.parametrize(
    ("cookie", "header", "query", "winner"),
    [
        (GW1, GW2, GW3, "gw-1"),
        (None, GW2, GW3, "gw-2"),
        ("garbage", GW2, GW3, "gw-2"),
        (tamper(GW1), None, GW3, "gw-3"),
        (seal("gw-1", issued_at=NOW - 7200), tamper(GW2), GW3, "gw-3"),
    ],
    ids=["cookie first", "header before query", "bad cookie, header", "bad cookie, query", "two bad, query"],
)
def test_order_is_cookie_then_header_then_query(
    cookie: str | None, header: str | None, query: str | None, winner: str
) -> None:
    """The first token that opens wins, in the order cookie → header → query parameter."""
    headers = []
    if cookie is not None:
        headers.append(("Cookie", f"LB_AFFINITY={cookie}"))
    if header is not None:
        headers.append(("X-LB-Affinity", header))
    lookup = find_token(request(f"/ws?lb_affinity={query}" if query else "/ws", *headers), INSERT, CODEC, NOW)
    assert lookup.claim is not None and lookup.claim.backend_id == winner


def test_of_several_cookie_values_the_youngest_is_used_but_the_cookie_still_comes_first() -> None:
    """A browser sends one value per cookie path, the most specific path first: the route is the last
    one issued, whatever the order (a re-issue with `Path=/` beside a backend cookie's own `Path`)."""
    old, young = seal("gw-1", issued_at=NOW - 2000), seal("gw-2", issued_at=NOW - 10, nonce=2)
    for cookie in (f"LB_AFFINITY={old}; LB_AFFINITY={young}", f"LB_AFFINITY={young}; LB_AFFINITY={old}"):
        lookup = find_token(request("/ws", ("Cookie", cookie)), INSERT, CODEC, NOW)
        assert lookup.claim is not None and lookup.claim.backend_id == "gw-2" and lookup.token == young
    # A younger token in the header or the query does not outrank the cookie's.
    lookup = find_token(request(f"/ws?lb_affinity={GW3}", ("Cookie", f"LB_AFFINITY={old}"), ("X-LB-Affinity", young)),
                        INSERT, CODEC, NOW)
    assert lookup.claim is not None and lookup.claim.backend_id == "gw-1" and lookup.from_cookie


def test_second_cookie_value_is_tried_after_a_bad_first() -> None:
    lookup = find_token(request("/ws", ("Cookie", f"LB_AFFINITY=junk; LB_AFFINITY={GW2}")), INSERT, CODEC, NOW)
    assert lookup.claim is not None and lookup.claim.backend_id == "gw-2" and lookup.from_cookie
    assert lookup.rejected == {"junk": "malformed"}


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("not-a-token", "malformed"),
        ("", "malformed"),
        ("a%2Fb", "malformed"),
        (tamper(GW1), "bad_mac"),
        (seal("gw-1", codec=OTHER_CODEC), "unknown_key"),
        (seal("gw-1", issued_at=NOW - 3601), "expired"),
    ],
    ids=["short", "empty", "percent", "tampered", "foreign key", "expired"],
)
def test_unusable_tokens_are_absent_with_a_reason(token: str, reason: str) -> None:
    """A tampered, foreign-key, expired or malformed token is treated as absent; the reason is kept for metrics."""
    for req in (
        request("/ws", ("Cookie", f"LB_AFFINITY={token}")),
        request("/ws", ("X-LB-Affinity", token)),
        request(f"/ws?lb_affinity={token}") if token else request("/ws?lb_affinity="),
    ):
        lookup = find_token(req, INSERT, CODEC, NOW)
        assert lookup.claim is None
        assert lookup.rejected == {token.strip(): reason}


def test_a_token_sealed_with_the_previous_key_still_opens() -> None:
    """Rotation: the first key seals, every configured key opens."""
    old = seal("gw-2", codec=TokenCodec(KEYS[1:], 3600))
    lookup = find_token(request("/ws", ("Cookie", f"LB_AFFINITY={old}")), INSERT, CODEC, NOW)
    assert lookup.claim is not None and lookup.claim.backend_id == "gw-2"


def test_configured_names_are_used() -> None:
    """affinity.cookie, affinity.header and affinity.query_param name the carriers."""
    custom = AffinityConfig(secret_keys=KEYS, cookie="SID", header="X-Route", query_param="r")
    for req in (
        request("/ws", ("Cookie", f"SID={GW1}")),
        request("/ws", ("X-Route", GW1)),
        request(f"/ws?r={GW1}"),
    ):
        assert find_token(req, custom, CODEC, NOW).token == GW1
    for req in (
        request("/ws", ("Cookie", f"LB_AFFINITY={GW1}")),
        request("/ws", ("X-LB-Affinity", GW1)),
        request(f"/ws?lb_affinity={GW1}"),
    ):
        assert find_token(req, custom, CODEC, NOW).claim is None


# -- plan_forward, insert mode ---------------------------------------------------------------


@pytest.mark.parametrize("to_claimed", [True, False])
def test_insert_mode_strips_every_trace_of_the_token(to_claimed: bool) -> None:
    """Cookie, header and query forms of our token never reach the backend; everything else does."""
    req = request(
        f"/ws?room=7&lb_affinity={GW1}&x=y",
        ("Cookie", f'theme=dark; LB_AFFINITY={GW1}; q="quoted"'),
        ("X-LB-Affinity", GW1),
        ("X-Other", "kept"),
    )
    lookup = find_token(req, INSERT, CODEC, NOW)
    seen = forwarded(req, INSERT, lookup, to_claimed=to_claimed)
    assert seen.target == "/ws?room=7&x=y"
    assert seen.head.get_all("cookie") == ['theme=dark; q="quoted"']
    assert seen.head.get_all("x-lb-affinity") == []
    assert seen.head.get("x-other") == "kept"
    assert all(GW1 not in value for _, value in seen.head.headers)


def test_without_a_named_header_the_token_header_is_nobodys_and_passes() -> None:
    """By default (`affinity.header` unset) a header of that name is not read for a token, and reaches the
    backend as sent, like any other; the cookie and the query parameter still carry the token."""
    default = AffinityConfig(secret_keys=KEYS)
    req = request("/ws", ("X-LB-Affinity", GW1))
    lookup = find_token(req, default, CODEC, NOW)
    assert lookup.claim is None
    assert forwarded(req, default, lookup, to_claimed=False).head.get_all("x-lb-affinity") == [GW1]
    req = request(f"/ws?lb_affinity={GW1}")
    assert find_token(req, default, CODEC, NOW).claim is not None


@pytest.mark.parametrize(("target", "sent"), [
    (f"/ws?lb_affinity={GW1}", "/ws"),
    (f"/ws?lb_affinity={GW1}&", "/ws"),
    (f"/ws?&lb_affinity={GW1}&&", "/ws"),
    (f"/ws?a=1&&lb_affinity={GW1}", "/ws?a=1&"),  # what else the client sent goes as sent
])
def test_insert_mode_leaves_no_bare_query_behind(target: str, sent: str) -> None:
    req = request(target)
    assert forwarded(req, INSERT, find_token(req, INSERT, CODEC, NOW), to_claimed=True).target == sent


def test_insert_mode_drops_a_cookie_header_left_empty() -> None:
    req = request("/ws", ("Cookie", f"LB_AFFINITY={GW1}"))
    seen = forwarded(req, INSERT, find_token(req, INSERT, CODEC, NOW), to_claimed=True)
    assert seen.head.get_all("cookie") == []


def test_insert_mode_strips_bad_tokens_too() -> None:
    """An unusable token is still ours: the backend never sees it."""
    bad = tamper(GW1)
    req = request(f"/ws?lb_affinity={bad}", ("Cookie", f"a=1; LB_AFFINITY={bad}"), ("X-LB-Affinity", bad))
    seen = forwarded(req, INSERT, find_token(req, INSERT, CODEC, NOW), to_claimed=False)
    assert seen.target == "/ws"
    assert seen.head.get_all("cookie") == ["a=1"]
    assert seen.head.get_all("x-lb-affinity") == []


@pytest.mark.parametrize("mode", [INSERT, REWRITE], ids=["insert", "rewrite"])
def test_a_form_encoded_parameter_name_is_stripped_too(mode: AffinityConfig) -> None:
    """`?lb%5Faffinity=` is `?lb_affinity=` to every framework: it never reaches the backend."""
    req = request(f"/ws?room=7&lb%5Faffinity={GW1}&q=a%20b&LB%5Faffinity=1&lb_affinity%2B=2")
    seen = forwarded(req, mode, find_token(req, mode, CODEC, NOW), to_claimed=True)
    # Other names, encoded or not, pass byte for byte (names are case-sensitive; `%2B` is a plus).
    assert seen.target == "/ws?room=7&q=a%20b&LB%5Faffinity=1&lb_affinity%2B=2"


@pytest.mark.parametrize("target", ["/ws?lb_affinityX=1&room=2", "/ws?q=a%20b&lb_affinity+=1"])
def test_insert_mode_leaves_the_target_alone_without_the_parameter(target: str) -> None:
    req = request(target)
    plan = plan_forward(req, INSERT, find_token(req, INSERT, CODEC, NOW), True)
    assert (plan.target or req.target) == target


def test_a_query_with_a_percent_but_no_parameter_of_ours_is_not_rewritten() -> None:
    """A `%` sends the query through the strip (an encoded name may be ours); keeping every pair, it
    leaves the target as it came: no new target to render."""
    req = request("/ws?q=a%20b&room=7")
    assert plan_forward(req, INSERT, find_token(req, INSERT, CODEC, NOW), True).target is None


def test_insert_mode_plans_once_per_configuration_and_strips_under_each_its_own_cookie() -> None:
    """Insert mode's plan is one object for every request under a configuration; a reload's configuration,
    with another cookie name, gets its own, which strips that name; a target with our parameter gets a
    plan of its own with the target stripped, stripping cookies as the shared one does."""
    plain = request("/ws", ("Cookie", f"a=1; LB_AFFINITY={GW1}"))
    first = plan_forward(plain, INSERT, find_token(plain, INSERT, CODEC, NOW), True)
    assert plan_forward(request("/other"), INSERT, find_token(plain, INSERT, CODEC, NOW), False) is first
    assert first.rewrite_cookie(f"a=1; LB_AFFINITY={GW1}") == "a=1"
    reloaded = AffinityConfig(secret_keys=KEYS, cookie="GAME_PIN")
    second = plan_forward(plain, reloaded, find_token(plain, reloaded, CODEC, NOW), True)
    assert second is not first
    assert second.rewrite_cookie(f"a=1; GAME_PIN={GW1}; LB_AFFINITY=x") == "a=1; LB_AFFINITY=x"
    assert second.drop == frozenset() and first.drop == frozenset({HEADER.lower()})
    queried = request(f"/ws?lb_affinity={GW1}&room=7")
    own = plan_forward(queried, reloaded, find_token(queried, reloaded, CODEC, NOW), True)
    assert own is not second and own.target == "/ws?room=7"
    assert own.rewrite_cookie(f"GAME_PIN={GW1}") is None
    assert plan_forward(plain, reloaded, find_token(plain, reloaded, CODEC, NOW), True) is second


# -- plan_forward, rewrite mode ----------------------------------------------------------------


APP = "s3ss10n-V4lue"
APP_TOKEN = seal("gw-1", app_value=APP)


def test_rewrite_mode_restores_the_app_value_to_the_claimed_backend() -> None:
    """The backend sees exactly the value it set; other cookies pass byte for byte."""
    req = request("/ws", ("Cookie", f'theme=dark;SESSIONID={APP_TOKEN}; q="x y"'))
    lookup = find_token(req, REWRITE, CODEC, NOW)
    assert lookup.claim is not None and lookup.claim.app_value == APP
    seen = forwarded(req, REWRITE, lookup, to_claimed=True)
    cookies = seen.head.get_all("cookie")
    assert cookies == [f'theme=dark;SESSIONID={APP}; q="x y"']  # the separators as the client sent them


def test_rewrite_mode_gives_a_redispatched_backend_no_session_cookie() -> None:
    """Another backend never set that session: it gets no SESSIONID and plants its own."""
    req = request("/ws", ("Cookie", f"theme=dark; SESSIONID={APP_TOKEN}"))
    seen = forwarded(req, REWRITE, find_token(req, REWRITE, CODEC, NOW), to_claimed=False)
    assert seen.head.get_all("cookie") == ["theme=dark"]


@pytest.mark.parametrize("carrier", ["header", "query"])
def test_rewrite_mode_token_in_header_or_query_becomes_the_cookie(carrier: str) -> None:
    """A native client without a cookie jar: the backend still receives its cookie."""
    target = f"/ws?lb_affinity={APP_TOKEN}" if carrier == "query" else "/ws"
    headers = [("X-LB-Affinity", APP_TOKEN)] if carrier == "header" else []
    req = request(target, *headers)
    seen = forwarded(req, REWRITE, find_token(req, REWRITE, CODEC, NOW), to_claimed=True)
    assert seen.head.get_all("cookie") == [f"SESSIONID={APP}"]
    assert seen.target == "/ws"
    assert seen.head.get_all("x-lb-affinity") == []


def test_rewrite_mode_header_token_is_appended_to_other_cookies() -> None:
    req = request("/ws", ("Cookie", "theme=dark"), ("X-LB-Affinity", APP_TOKEN))
    seen = forwarded(req, REWRITE, find_token(req, REWRITE, CODEC, NOW), to_claimed=True)
    assert seen.head.get_all("cookie") == [f"theme=dark; SESSIONID={APP}"]


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["a=1", "b=2"], ["a=1", f"b=2; SESSIONID={APP}"]),
        (["a=1", "b=2", "c=3"], ["a=1", "b=2", f"c=3; SESSIONID={APP}"]),
        # The last line held only a stale token, dropped: the pair is that line alone.
        (["a=1", f"SESSIONID={seal('gw-1', app_value='old', issued_at=NOW - 7200)}"], ["a=1", f"SESSIONID={APP}"]),
    ],
    ids=["two lines", "three lines", "last line emptied"],
)
def test_rewrite_mode_header_token_becomes_the_cookie_once_whatever_the_cookie_lines(
    lines: list[str], expected: list[str]
) -> None:
    """The backend gets its cookie once, on the last Cookie line, not once per line."""
    req = request("/ws", *[("Cookie", line) for line in lines], ("X-LB-Affinity", APP_TOKEN))
    lookup = find_token(req, REWRITE, CODEC, NOW)
    assert lookup.claim is not None and not lookup.from_cookie
    seen = forwarded(req, REWRITE, lookup, to_claimed=True)
    assert seen.head.get_all("cookie") == expected


def test_rewrite_mode_header_token_becomes_the_cookie_when_the_client_made_cookie_hop_by_hop() -> None:
    """`Connection: Cookie` drops the client's Cookie lines; the backend still gets its own value, once."""
    req = request("/ws", ("Connection", "keep-alive, Cookie"), ("Cookie", "a=1"), ("X-LB-Affinity", APP_TOKEN))
    lookup = find_token(req, REWRITE, CODEC, NOW)
    seen = forwarded(req, REWRITE, lookup, to_claimed=True)
    assert seen.head.get_all("cookie") == [f"SESSIONID={APP}"]


def test_rewrite_mode_drops_expired_tokens() -> None:
    """A token of ours that has expired is not a value the backend ever set: it is dropped."""
    stale = seal("gw-1", app_value=APP, issued_at=NOW - 7200)
    req = request("/ws", ("Cookie", f"a=1; SESSIONID={stale}; b=2"))
    lookup = find_token(req, REWRITE, CODEC, NOW)
    assert lookup.claim is None
    seen = forwarded(req, REWRITE, lookup, to_claimed=False)
    assert seen.head.get_all("cookie") == ["a=1; b=2"]


@pytest.mark.parametrize(
    "broken",
    [
        tamper(APP_TOKEN),
        APP_TOKEN + "AAAA",
        APP_TOKEN[:-4],
        seal("gw-1", app_value=APP, codec=OTHER_CODEC),
    ],
    ids=["tampered", "extended", "truncated", "foreign key"],
)
def test_rewrite_mode_treats_a_broken_token_as_absent(broken: str) -> None:
    """SPEC: a tampered or foreign-key token is treated as absent.  The backend never set it, so it gets no
    session cookie at all, and sets a fresh one (which the answer seals): not a value it would take for junk."""
    req = request("/ws", ("Cookie", f"a=1; SESSIONID={broken}; b=2"))
    lookup = find_token(req, REWRITE, CODEC, NOW)
    assert lookup.claim is None
    seen = forwarded(req, REWRITE, lookup, to_claimed=False)
    assert seen.head.get_all("cookie") == ["a=1; b=2"]


@pytest.mark.parametrize("plain", ["abc123", "Zm9vYmFy", "x" * 30, 'quoted"value', "not-a-token"])
def test_rewrite_mode_passes_a_plain_app_cookie_unchanged(plain: str) -> None:
    """A SESSIONID that is not shaped like our token (e.g. set before the balancer was there) passes as it is."""
    req = request("/ws", ("Cookie", f"SESSIONID={plain}; other=1"))
    lookup = find_token(req, REWRITE, CODEC, NOW)
    assert lookup.claim is None
    seen = forwarded(req, REWRITE, lookup, to_claimed=False)
    assert seen.head.get_all("cookie") == [f"SESSIONID={plain}; other=1"]


@pytest.mark.parametrize(
    "plain",
    ["abc123", "a.b", "eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJwbGF5ZXItMSJ9.c2lnbmF0dXJl", "y" * 5000],
    ids=["session-id", "dotted", "jwt", "too-large-to-seal"],
)
def test_rewrite_mode_counts_no_invalid_token_for_a_value_of_the_backends_own(plain: str) -> None:
    """A SESSIONID not shaped like our pins is the backend's own and passes unchanged, so it is not a token
    treated as absent: neither opened nor counted (lb_affinity_invalid_tokens_total, affinity=invalid)."""
    lookup = find_token(request("/ws", ("Cookie", f"SESSIONID={plain}")), REWRITE, CODEC, NOW)
    assert lookup.claim is None and lookup.rejected == {} and lookup.cookie_sent
    # A value of our shape that does not open is still a broken token, counted by its reason; a token
    # beside a part of another shape still routes, as before.
    broken = find_token(request("/ws", ("Cookie", f"SESSIONID={tamper(APP_TOKEN)}")), REWRITE, CODEC, NOW)
    assert broken.rejected == {tamper(APP_TOKEN): "bad_mac"}
    mixed = find_token(request("/ws", ("Cookie", f"SESSIONID={APP_TOKEN}.{plain}")), REWRITE, CODEC, NOW)
    assert mixed.token == APP_TOKEN and mixed.rejected == {}


def test_rewrite_mode_counts_junk_in_the_header_or_the_query_as_an_invalid_token() -> None:
    """Only the cookie holds the backend's own values: our header and query parameter carry nothing but tokens,
    so a value there that does not open is a token treated as absent, counted by its reason."""
    req = request("/ws?lb_affinity=abc", ("Cookie", "SESSIONID=abc123"), ("X-LB-Affinity", "junk"))
    lookup = find_token(req, REWRITE, CODEC, NOW)
    assert lookup.claim is None and lookup.rejected == {"junk": "malformed", "abc": "malformed"}


def test_of_two_cookie_values_issued_in_the_same_second_the_first_routes() -> None:
    """Only a younger value takes the place of the first: one of the same age does not."""
    first, second = seal("gw-1", nonce=1), seal("gw-2", nonce=2)
    lookup = find_token(request("/ws", ("Cookie", f"LB_AFFINITY={first}; LB_AFFINITY={second}")), INSERT, CODEC, NOW)
    assert lookup.claim is not None and lookup.claim.backend_id == "gw-1" and lookup.token == first


@pytest.mark.parametrize(
    ("others", "token", "expected"),
    [
        ((), "t" * (MAX_COOKIE_PAIR - 3), "t" * (MAX_COOKIE_PAIR - 3)),  # `LB=` and the value: 4096 bytes
        ((), "t" * (MAX_COOKIE_PAIR - 2), None),
        (("p",), "t" * (MAX_COOKIE_PAIR - 5), "p." + "t" * (MAX_COOKIE_PAIR - 5)),
        (("p",), "t" * (MAX_COOKIE_PAIR - 4), "t" * (MAX_COOKIE_PAIR - 4)),  # the other pool's pin gives way
    ],
    ids=["token fits", "token one over", "pins fit", "pins one over"],
)
def test_a_cookie_value_fits_a_browsers_4096_bytes_with_its_name_and_equals_sign(
    others: tuple[str, ...], token: str, expected: str | None
) -> None:
    """Browsers drop a cookie whose `name=value` passes 4096 bytes: other pins give way first, then the value
    passes unsealed."""
    assert fitting_value("LB", others, token) == expected


@pytest.mark.parametrize("size", [16, 32, 43])
def test_rewrite_mode_passes_a_random_app_id_shorter_than_any_token_whatever_its_first_bytes(size: int) -> None:
    """A backend's own random id of up to 43 bytes (a UUID, 32 random bytes in base64url) is never taken for
    a broken token, even when its first bytes spell our version: no token is that short."""
    plain = urlsafe_b64encode(b"\x01" + bytes(range(2, size + 1))).rstrip(b"=").decode()
    assert plain.startswith("AQ")
    req = request("/ws", ("Cookie", f"SESSIONID={plain}"))
    lookup = find_token(req, REWRITE, CODEC, NOW)
    seen = forwarded(req, REWRITE, lookup, to_claimed=False)
    assert seen.head.get_all("cookie") == [f"SESSIONID={plain}"]


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_SECOND = "QRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"  # version 1, 2 or 3 in the first byte, after an "A"
_PART = st.one_of(
    st.text(alphabet=_B64URL, max_size=100),  # mostly not shaped
    st.builds(
        lambda second, rest: "A" + second + rest, st.sampled_from(_B64URL), st.text(_B64URL, min_size=50, max_size=90)
    ),
)
# Every part shaped: our version prefix and a token's length (59 and up).
_SHAPED = st.builds(
    lambda second, rest: "A" + second + rest, st.sampled_from(_SECOND), st.text(_B64URL, min_size=57, max_size=90)
)


@settings(max_examples=400, deadline=None)
@given(parts=st.lists(_SHAPED, min_size=1, max_size=3) | st.lists(_PART, min_size=1, max_size=3))
def test_rewrite_mode_drops_a_value_only_when_every_part_is_shaped_like_a_token(parts: list[str]) -> None:
    """Decided by shape alone: our version prefix and a token's length, for every `.`-joined part (pins of
    several pools).  A value with any other part (a JWT: `eyJ...`) is the backend's own and passes."""
    value = ".".join(parts)
    req = request("/ws", ("Cookie", f"SESSIONID={value}"))
    lookup = find_token(req, REWRITE, CODEC, NOW)
    seen = forwarded(req, REWRITE, lookup, to_claimed=False)
    shaped = all(len(part) >= 59 and part[0] == "A" and part[1:2] in set(_SECOND) for part in parts)
    assert seen.head.get_all("cookie") == ([] if shaped else [f"SESSIONID={value}"])


def test_rewrite_mode_passes_a_jwt_whose_signature_looks_like_a_token() -> None:
    """A backend's own ES256 JWT: its signature segment alone may have our shape; the header never has."""
    signature = "Ag" + urlsafe_b64encode(bytes(range(7, 70))).rstrip(b"=").decode()  # 86 characters of our shape
    jwt = f"eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJwbGF5ZXItMSJ9.{signature}"
    req = request("/ws", ("Cookie", f"SESSIONID={jwt}"))
    seen = forwarded(req, REWRITE, find_token(req, REWRITE, CODEC, NOW), to_claimed=False)
    assert seen.head.get_all("cookie") == [f"SESSIONID={jwt}"]


def test_rewrite_mode_keeps_a_valid_token_for_another_pool_cookie_name_alone() -> None:
    """Only affinity.cookie is ours: an LB_AFFINITY cookie passes unchanged in rewrite mode."""
    req = request("/ws", ("Cookie", f"LB_AFFINITY={GW1}; SESSIONID={APP_TOKEN}"))
    seen = forwarded(req, REWRITE, find_token(req, REWRITE, CODEC, NOW), to_claimed=True)
    assert seen.head.get_all("cookie") == [f"LB_AFFINITY={GW1}; SESSIONID={APP}"]


# -- rewrite_response_cookies ------------------------------------------------------------------


def response(*set_cookies: str) -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade"]
    lines += [f"Set-Cookie: {value}" for value in set_cookies]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def sealer(backend: str = "gw-1") -> tuple[list[str], Callable[[str], str]]:
    sealed: list[str] = []

    def seal_value(app_value: str) -> str:
        sealed.append(app_value)
        return seal(backend, app_value=app_value, nonce=len(sealed) + 10)

    return sealed, seal_value


def test_rewrite_response_seals_the_app_cookie_with_the_affinity_settings() -> None:
    """SESSIONID=v → SESSIONID=<token> with SPEC's attributes; other Set-Cookies unchanged; the token opens to v."""
    head = parse_response_head(response("theme=dark; Path=/", "SESSIONID=abc123; Path=/; HttpOnly"))
    sealed, seal_value = sealer()
    rewrite, token = rewrite_response_cookies(head, REWRITE, seal_value)
    assert rewrite is not None and token is not None
    assert sealed == ["abc123"]
    assert rewrite("theme=dark; Path=/") == "theme=dark; Path=/"
    # SPEC: `<cookie>=<token>; Path=/; Max-Age=<max_age>; HttpOnly; SameSite=<same_site>` (Secure per `secure`).
    spec_line = f"SESSIONID={token}; Path=/; Max-Age=3600; HttpOnly; SameSite=Lax"
    assert rewrite("SESSIONID=abc123; Path=/; HttpOnly") == spec_line
    claim = CODEC.open(token, NOW)
    assert (claim.backend_id, claim.app_value) == ("gw-1", "abc123")


@pytest.mark.parametrize(
    "set_cookies",
    [(), ("theme=dark",), ("SESSIONID=; Max-Age=0; Path=/",), ("SESSIONIDX=1", "XSESSIONID=2")],
    ids=["none", "other cookie", "deletion", "similar names"],
)
def test_rewrite_response_without_an_app_value_changes_nothing(set_cookies: tuple[str, ...]) -> None:
    """No SESSIONID value set (or only deleted): no rewriter, no header token."""
    head = parse_response_head(response(*set_cookies))
    sealed, seal_value = sealer()
    assert rewrite_response_cookies(head, REWRITE, seal_value) == (None, None)
    assert sealed == []


SETTINGS = "HttpOnly; SameSite=Lax; Secure"  # REWRITE's http_only and same_site, on a TLS listener
EXPIRES = "Expires=Wed, 21 Oct 2026 07:28:00 GMT"


@pytest.mark.parametrize(
    ("app_attributes", "ours"),
    [
        ("", f"Max-Age=3600; {SETTINGS}"),  # no Path: the browser's default path, as without us
        ("; Path=/app; Domain=example.com", f"Path=/app; Domain=example.com; Max-Age=3600; {SETTINGS}"),
        ("; Max-Age=60", f"Max-Age=60; {SETTINGS}"),  # the backend's shorter life
        ("; Max-Age=86400", f"Max-Age=3600; {SETTINGS}"),  # never beyond the token's
        (f"; {EXPIRES}", f"{EXPIRES}; {SETTINGS}"),
        ("; SameSite=None; Partitioned; Priority=H", f"Max-Age=3600; {SETTINGS}; Partitioned; Priority=H"),
        ("; Path=relative; Max-Age=x", f"Max-Age=3600; {SETTINGS}"),  # ignored by browsers too
    ],
    ids=["bare", "scope kept", "shorter max-age", "longer max-age", "expires", "others kept", "invalid"],
)
def test_rewrite_response_keeps_the_apps_scope_and_gives_the_affinity_settings(app_attributes: str, ours: str) -> None:
    """Path and Domain are the application's; lifetime is at most the token's; Secure per `secure`."""
    head = parse_response_head(response(f"SESSIONID=abc{app_attributes}"))
    _, seal_value = sealer()
    rewrite, token = rewrite_response_cookies(head, REWRITE, seal_value, secure=True)
    assert rewrite is not None
    assert rewrite(f"SESSIONID=abc{app_attributes}") == f"SESSIONID={token}; {ours}"


def test_rewrite_response_never_weakens_the_apps_httponly_secure_or_samesite() -> None:
    relaxed = AffinityConfig(secret_keys=KEYS, mode=AffinityMode.REWRITE, cookie="SESSIONID", http_only=False)
    app = "SESSIONID=abc; Secure; HttpOnly; samesite=strict"
    head = parse_response_head(response(app))
    _, seal_value = sealer()
    rewrite, token = rewrite_response_cookies(head, relaxed, seal_value, secure=False)
    assert rewrite is not None
    assert rewrite(app) == f"SESSIONID={token}; Max-Age=3600; HttpOnly; SameSite=Strict; Secure"


@pytest.mark.parametrize("deletion", ["SESSIONID=gone; Max-Age=0", "SESSIONID=gone; max-age=-1; Path=/"])
def test_rewrite_response_passes_a_deletion_by_max_age_unsealed(deletion: str) -> None:
    """A backend ending its session with Max-Age <= 0 must not get a cookie that lives max_age."""
    head = parse_response_head(response(deletion))
    sealed, seal_value = sealer()
    assert rewrite_response_cookies(head, REWRITE, seal_value) == (None, None)
    assert sealed == []


def test_rewrite_response_passes_a_deletion_by_a_past_expires_unsealed() -> None:
    """`Expires=Thu, 01 Jan 1970...` logs out as Max-Age=0 does: sealed, a native client using the header
    would keep a pin and send `deleted` back as its session (a reviewer's case)."""
    head = parse_response_head(response("SESSIONID=deleted; Expires=Thu, 01 Jan 1970 00:00:00 GMT; Path=/"))
    sealed, seal_value = sealer()
    assert rewrite_response_cookies(head, REWRITE, seal_value, now=1_800_000_000.0) == (None, None)
    assert sealed == []


def test_rewrite_response_deletion_passes_beside_a_new_value() -> None:
    head = parse_response_head(response("SESSIONID=; Max-Age=0", "SESSIONID=new1"))
    _, seal_value = sealer()
    rewrite, token = rewrite_response_cookies(head, REWRITE, seal_value)
    assert rewrite is not None and token is not None
    assert rewrite("SESSIONID=; Max-Age=0") == "SESSIONID=; Max-Age=0"
    assert rewrite("SESSIONID=new1") == f"SESSIONID={token}; Max-Age=3600; HttpOnly; SameSite=Lax"


# A cookie-octet (RFC 6265 §4.1.1) value, as a backend's session id would be.
COOKIE_OCTETS = st.text(
    alphabet=st.sampled_from(sorted({chr(c) for c in range(0x21, 0x7F)} - set('",;\\'))), min_size=1, max_size=80
)


@settings(max_examples=150, deadline=None)
@given(app_value=COOKIE_OCTETS, others=st.lists(st.sampled_from(["a=1", "theme=dark", 'q="x"']), max_size=3))
def test_rewrite_round_trip_backend_sees_the_value_it_set(app_value: str, others: list[str]) -> None:
    """Backend sets v → client gets a token → client sends it back → the same backend receives exactly v."""
    head = parse_response_head(response(f"SESSIONID={app_value}; Path=/"))
    _, seal_value = sealer("gw-2")
    rewrite, _ = rewrite_response_cookies(head, REWRITE, seal_value)
    assert rewrite is not None
    client_value = rewrite(f"SESSIONID={app_value}; Path=/").partition(";")[0].partition("=")[2]
    assert client_value != app_value  # the client holds a token, not the value
    req = request("/ws", ("Cookie", "; ".join([*others, f"SESSIONID={client_value}"])))
    lookup = find_token(req, REWRITE, CODEC, NOW)
    assert lookup.claim is not None and lookup.claim.backend_id == "gw-2"
    seen = forwarded(req, REWRITE, lookup, to_claimed=True)
    assert seen.head.get_all("cookie") == ["; ".join([*others, f"SESSIONID={app_value}"])]


def test_rewrite_response_keeps_the_scope_a_browser_reads_the_last_path_and_domain() -> None:
    """RFC 6265 §5.3: of repeated Path or Domain attributes, the last one (with a value) counts."""
    app = "SESSIONID=abc; Domain=a.example; Domain=b.example; Domain=; Path=/x; Path=/y"
    rewrite, token = rewrite_response_cookies(parse_response_head(response(app)), REWRITE, sealer()[1])
    assert rewrite is not None
    assert rewrite(app) == f"SESSIONID={token}; Path=/y; Domain=b.example; Max-Age=3600; HttpOnly; SameSite=Lax"


def test_a_flood_of_session_values_in_one_answer_costs_at_most_max_seals_seals() -> None:
    """A thousand Set-Cookies for the one name: MAX_SEALS seals, the rest passed unsealed and reported."""
    values = [f"SESSIONID=v{i}; Path=/" for i in range(1000)]
    sealed, seal_value = sealer()
    reported: list[str] = []
    rewrite, _ = rewrite_response_cookies(
        parse_response_head(response(*values)), REWRITE, seal_value, on_unsealed=reported.append
    )
    assert rewrite is not None
    assert sealed == [f"v{i}" for i in range(MAX_SEALS)] and len(reported) == 1000 - MAX_SEALS
    assert rewrite(values[-1]) == values[-1]  # passed as the backend set it


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["LB_AFFINITY", "SID", "__Host-lb"]), st.floats(0.1, 1e6),
                       st.sampled_from(list(SameSite)), st.booleans(), st.booleans()), min_size=1, max_size=6),
    st.text(alphabet="AZaz09-_.", min_size=1, max_size=40),
)
def test_our_set_cookie_is_render_set_cookie_whatever_the_configuration_before_it(
    configs: list[tuple[str, float, SameSite, bool, bool]], token: str
) -> None:
    """The attributes rendered once per configuration and `secure` are those render_set_cookie writes,
    through reloads (a new configuration each) and both values of `secure`, in any order."""
    for cookie, max_age, same_site, http_only, secure in configs:
        affinity = AffinityConfig(secret_keys=KEYS, cookie=cookie, max_age=max_age, same_site=same_site,
                                  http_only=http_only)
        for each in (secure, not secure, secure):
            assert our_set_cookie(affinity, token, secure=each) == render_set_cookie(
                cookie, token, max_age=affinity.cookie_max_age, same_site=same_site, http_only=http_only, secure=each,
            )

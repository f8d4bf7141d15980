"""`balance: source|hash`, one pin per pool, and what the token can carry (SPEC part 2).  Pure: no socket.

- source hashes the client address, hash the `hash_key` value, over backends taking new clients
  (weighted rendezvous): sticky per key, spread over keys, only a leaving backend's keys move.
- The cookie wins while its backend is up or draining; a redispatch follows the hash; `sticky: false`
  makes the hash alone decide.  `route_for_key` is the /route answer and agrees with `decide`.
- A token seals its pool: a cookie carries one pin per pool, and a fresh pin keeps the others.
"""

from __future__ import annotations

import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
import yarl
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.affinity.balancing import hash_key_text, source_key
from lb.affinity.carriers import (
    MAX_OPENS,
    MAX_PINS,
    TokenLookup,
    _find_among,
    balance_key,
    find_token,
    join_pins,
    plan_forward,
    rewrite_response_cookies,
)
from lb.affinity.codec import NONCE_BYTES, Claim, TokenCodec, TokenTooLarge
from lb.affinity.decision import decide, route_for_key
from lb.config.load import parse_config
from lb.config.model import (
    AffinityConfig,
    AffinityMode,
    BackendConfig,
    BalanceMethod,
    HashKey,
    HashKeySource,
    PoolConfig,
)
from lb.config.sections import default_backlog
from lb.errors import ConfigError
from lb.http.cookies import parse_set_cookie
from lb.http.head import RequestHead, parse_request_head, parse_response_head
from lb.state.pool import AdminAction, PoolState

NOW = 1_700_000_000.0
KEYS = ("current-secret-for-tests",)
CODEC = TokenCodec(KEYS, 3600)
SESSION = bytes(range(8))
INSERT = AffinityConfig(secret_keys=KEYS)
REWRITE = AffinityConfig(secret_keys=KEYS, mode=AffinityMode.REWRITE, cookie="SESSIONID")
USER = HashKey(HashKeySource.HEADER, "X-User-Id")


def make_pool(
    n: int = 3,
    *,
    balance: BalanceMethod = BalanceMethod.HASH,
    hash_key: HashKey | None = USER,
    sticky: bool = True,
    name: str = "gateways",
    weights: tuple[int, ...] = (),
) -> PoolState:
    backends = tuple(
        BackendConfig(id=f"gw-{i + 1}", host="127.0.0.1", port=9001 + i, weight=weights[i] if weights else 1)
        for i in range(n)
    )
    return PoolState(
        config=PoolConfig(
            name=name, backends=backends, balance=balance,
            hash_key=hash_key if balance is BalanceMethod.HASH else None, sticky=sticky,
        )
    )


def request(target: str = "/ws", *headers: tuple[str, str]) -> RequestHead:
    lines = [f"GET {target} HTTP/1.1", "Host: lb.example", *(f"{k}: {v}" for k, v in headers)]
    return parse_request_head(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))


def seal(
    backend: str, pool: str | None, *, app_value: str | None = None, nonce: int = 1, issued_at: float = NOW
) -> str:
    claim = Claim(backend_id=backend, issued_at=int(issued_at), session=SESSION, app_value=app_value, pool=pool)
    return CODEC.seal(claim, nonce.to_bytes(NONCE_BYTES, "big"))


# -- choosing by key --------------------------------------------------------


def test_hash_sticks_per_key_and_spreads_over_keys() -> None:
    """One key always reaches one backend; many keys reach every backend, about evenly."""
    pool = make_pool()
    for key in ("alice", "bob", "carol"):
        first = decide(None, pool, balance_key=key, now=NOW).backend.id
        assert all(decide(None, pool, balance_key=key, now=NOW).backend.id == first for _ in range(20))
    spread = Counter(decide(None, pool, balance_key=f"user-{i}", now=NOW).backend.id for i in range(3000))
    assert set(spread) == {"gw-1", "gw-2", "gw-3"}
    assert min(spread.values()) > 800


def test_weights_shift_the_spread() -> None:
    """A backend of weight 3 takes about three times the keys of a weight-1 one."""
    pool = make_pool(2, weights=(3, 1))
    spread = Counter(decide(None, pool, balance_key=f"u{i}", now=NOW).backend.id for i in range(4000))
    assert 2.4 < spread["gw-1"] / spread["gw-2"] < 3.7


def test_a_leaving_backend_moves_only_its_own_keys() -> None:
    """Rendezvous: disabling gw-2 moves exactly the keys that were on gw-2."""
    pool = make_pool()
    before = {f"u{i}": route_for_key(pool, f"u{i}") for i in range(600)}
    pool.apply_admin("gw-2", AdminAction.DISABLE, NOW)
    for key, backend in before.items():
        assert backend is not None
        after = route_for_key(pool, key)
        assert after is not None
        assert (after.id == backend.id) == (backend.id != "gw-2")


def test_source_hashes_the_canonical_address() -> None:
    """An IPv4-mapped IPv6 address is the same client as its IPv4 form; junk is no key."""
    assert source_key("::ffff:10.0.0.7") == "10.0.0.7"
    assert source_key("2001:DB8::1") == "2001:db8::1"
    assert source_key("-") is None
    pool = make_pool(balance=BalanceMethod.SOURCE)
    key = balance_key(request(), pool.config, "::ffff:127.0.0.9")
    assert key == "127.0.0.9"
    assert decide(None, pool, balance_key=key, now=NOW).backend is route_for_key(pool, "127.0.0.9", NOW)


def test_source_key_drops_a_zone_as_the_data_plane_does() -> None:
    """`/route?key=fe80::1%eth0` (as `ss` shows a link-local client) is the client the data plane hashes
    as `fe80::1`: its peer address has no zone (`lb.http.client_address.peer_address`)."""
    assert source_key("fe80::1%eth0") == "fe80::1"
    assert source_key("[fe80::1%eth0]") == "fe80::1"


@pytest.mark.parametrize("zoned", ["203.0.113.1%eth0", "2001:db8::1%eth0", "::ffff:10.0.0.1%1"])
def test_source_key_refuses_a_zone_no_client_address_has(zoned: str) -> None:
    """Only a link-local peer comes with a zone; the data plane takes a zoned X-Forwarded-For hop for no
    address and falls back to the proxy, so `/route` hashing `203.0.113.1` named a backend its client
    never reached.  No key: `/route` answers 400."""
    assert source_key(zoned) is None


@pytest.mark.parametrize(
    ("hash_key", "req", "expected"),
    [
        (USER, request("/ws", ("X-User-Id", " alice ")), "alice"),
        (USER, request("/ws"), None),
        (USER, request("/ws", ("X-User-Id", "")), None),
        (USER, request("/ws", ("X-User-Id", "a"), ("X-User-Id", "b")), "a, b"),  # as one line would say it
        (USER, request("/ws", ("X-User-Id", "a, b")), "a, b"),
        (HashKey(HashKeySource.QUERY, "uid"), request("/ws?a=1&uid=a%40b"), "a@b"),
        (HashKey(HashKeySource.QUERY, "uid"), request("/ws?a=1"), None),
        (HashKey(HashKeySource.COOKIE, "uid"), request("/ws", ("Cookie", "x=1; uid=bob")), "bob"),
        (HashKey(HashKeySource.COOKIE, "uid"), request("/ws", ("Cookie", "x=1")), None),
    ],
)
def test_balance_key_reads_the_configured_place(hash_key: HashKey, req: RequestHead, expected: str | None) -> None:
    """header:NAME (two lines read as their one-line list), query:NAME (percent-decoded) and cookie:NAME;
    absent or empty is no key."""
    pool = make_pool(hash_key=hash_key)
    assert balance_key(req, pool.config, "127.0.0.1") == expected


def utf8_on_the_wire(text: str) -> str:
    """`text` as a client's UTF-8 bytes, as a head parsed from the wire holds them (one character a byte)."""
    return text.encode("utf-8").decode("latin-1")


def route_key(key: str) -> str:
    """The `key` of `/pools/{pool}/route?key=...` as the admin API reads it: the URL's query, decoded by yarl."""
    return yarl.URL("/pools/gateways/route").with_query(key=key).query["key"]


@pytest.mark.parametrize(
    ("hash_key", "req", "asked"),
    [
        (USER, request("/ws", ("X-User-Id", utf8_on_the_wire("Jürgen"))), "Jürgen"),
        (USER, request("/ws", ("X-User-Id", utf8_on_the_wire("çà"))), "çà"),  # à ends in 0xA0: no space to strip
        (HashKey(HashKeySource.COOKIE, "uid"), request("/ws", ("Cookie", utf8_on_the_wire("uid=Zoë"))), "Zoë"),
        (HashKey(HashKeySource.QUERY, "uid"), request("/ws?uid=x+y"), "x y"),  # URLSearchParams' space
        (HashKey(HashKeySource.QUERY, "uid"), request("/ws?uid=x%2By"), "x+y"),
        (HashKey(HashKeySource.QUERY, "uid"), request("/ws?uid=J%C3%BCrgen"), "Jürgen"),
        (HashKey(HashKeySource.QUERY, "uid"), request("/ws?uid=%20%20u1%20"), "  u1  "),
    ],
)
def test_a_request_and_route_read_one_key_alike(hash_key: HashKey, req: RequestHead, asked: str) -> None:
    """A user's key, as the client sends it and as a dispatcher asks /route for it, names one backend:
    UTF-8 headers and cookies read as UTF-8, `+` in a query is a space, the spaces around a key go."""
    pool = make_pool(hash_key=hash_key, sticky=False, n=7)
    key = balance_key(req, pool.config, "127.0.0.1")
    assert key == hash_key_text(route_key(asked))
    assert key is not None
    assert decide(None, pool, balance_key=key, now=NOW).backend is route_for_key(pool, key, NOW)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("u%69d=k1", "k1"),  # `uid=k1` to every framework
        ("%75%69%64=k1", "k1"),
        ("a=1&U%49D=x&u%69d=k1", "k1"),  # names are case-sensitive: `UID` is another parameter
        ("uid=k1&uid=k2", "k1"),  # repeated: the first, as aiohttp's query.get and URLSearchParams.get
        ("u%69d=k1&uid=k2", "k1"),
        ("uid=&uid=k2", None),  # the first is empty: no key, as /route refuses an empty one
        ("uid&uid=k2", None),  # a name without `=` has the empty value
        ("u+id=k1", None),  # `+` in a name is a space: `u id`
        ("ui%64x=k1", None),
    ],
)
def test_a_query_key_is_found_by_its_decoded_name(query: str, expected: str | None) -> None:
    """query:NAME compares the form-decoded parameter name, and the first of a repeated one counts."""
    pool = make_pool(hash_key=HashKey(HashKeySource.QUERY, "uid"), sticky=False, n=7)
    key = balance_key(request("/ws?" + query), pool.config, "127.0.0.1")
    assert key == expected
    if expected is not None:  # and it names the backend /route names for that key
        assert key == hash_key_text(route_key(expected))
        assert decide(None, pool, balance_key=key, now=NOW).backend is route_for_key(pool, key, NOW)


def _padded(keys: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Keys, half of them with spaces and tabs around (both readers take those off: `hash_key_text`).
    Unpadded, a key began or ended with a space in 1-3% of examples, and never with a tab."""
    pads = st.text(st.sampled_from(" \t"), max_size=3)
    return keys | st.tuples(pads, keys, pads).map("".join)


@settings(max_examples=200, deadline=None)
@given(_padded(st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=40)))
def test_any_key_sent_in_a_query_reads_as_route_reads_it(text: str) -> None:
    """Whatever a browser's URLSearchParams sends as `?uid=`, the request hashes what /route hears."""
    req = request("/ws?" + urllib.parse.urlencode({"uid": text}))
    pool = make_pool(hash_key=HashKey(HashKeySource.QUERY, "uid"))
    assert balance_key(req, pool.config, "127.0.0.1") == hash_key_text(route_key(text))


@settings(max_examples=200, deadline=None)
@given(_padded(st.text(st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=1, max_size=40)))
def test_any_key_sent_in_a_utf8_header_reads_as_route_reads_it(text: str) -> None:
    """Whatever UTF-8 a client puts in X-User-Id, the request hashes what /route hears for that text."""
    req = request("/ws", ("X-User-Id", utf8_on_the_wire(text)))
    assert balance_key(req, make_pool().config, "127.0.0.1") == hash_key_text(route_key(text))


def test_no_key_falls_back_to_least_conn() -> None:
    """A request without the key is balanced least_conn: the emptiest backend takes it."""
    pool = make_pool()
    pool.backends["gw-1"].connections = 5
    pool.backends["gw-3"].connections = 5
    assert decide(None, pool, now=NOW).backend.id == "gw-2"
    assert balance_key(request(), pool.config, "127.0.0.1") is None


def test_other_pools_ignore_the_key() -> None:
    """A least_conn pool does not hash, even if a key is passed."""
    pool = make_pool(balance=BalanceMethod.LEAST_CONN)
    assert balance_key(request("/ws", ("X-User-Id", "a")), pool.config, "127.0.0.1") is None
    pool.backends["gw-1"].connections = 9
    pool.backends["gw-2"].connections = 9
    assert decide(None, pool, balance_key="anything", now=NOW).backend.id == "gw-3"


# -- cookie and hash --------------------------------------------------------


def _not_hashed_to(pool: PoolState, key: str) -> str:
    target = route_for_key(pool, key)
    assert target is not None
    return next(b for b in pool.backends if b != target.id)


def test_cookie_wins_while_its_backend_is_up_or_draining() -> None:
    """A pin to a backend the hash does not pick still routes there (session state lives there)."""
    pool = make_pool()
    pinned = _not_hashed_to(pool, "alice")
    decision = decide(pinned, pool, session=SESSION, balance_key="alice", now=NOW)
    assert (decision.backend.id, decision.reason, decision.issue_cookie) == (pinned, "hit", False)
    pool.apply_admin(pinned, AdminAction.DRAIN, NOW)
    assert decide(pinned, pool, session=SESSION, balance_key="alice", now=NOW).backend.id == pinned


def test_redispatch_follows_the_hash_not_the_session() -> None:
    """A pin to a disabled backend lands where /route says, with a fresh cookie."""
    pool = make_pool(4)
    pinned = _not_hashed_to(pool, "alice")
    pool.apply_admin(pinned, AdminAction.DISABLE, NOW)
    decision = decide(pinned, pool, session=SESSION, balance_key="alice", now=NOW)
    assert decision.reason == "redispatch" and decision.issue_cookie
    assert decision.backend is route_for_key(pool, "alice", NOW)


def test_not_sticky_pool_ignores_tokens_and_issues_none() -> None:
    """sticky: false: the hash alone routes, so /route is exact for every client."""
    pool = make_pool(sticky=False)
    pinned = _not_hashed_to(pool, "alice")
    decision = decide(pinned, pool, session=SESSION, balance_key="alice", now=NOW)
    assert decision.backend is route_for_key(pool, "alice", NOW)
    assert not decision.issue_cookie


def test_route_answer_is_the_same_on_two_instances() -> None:
    """Two pool states built from one config, with the same health view, agree on every key."""
    one, two = make_pool(5), make_pool(5)
    for pool in (one, two):
        pool.apply_admin("gw-4", AdminAction.DRAIN, NOW)
    one.backends["gw-1"].connections = 100  # connection counts are per instance; they do not matter
    for i in range(300):
        a, b = route_for_key(one, f"k{i}", NOW), route_for_key(two, f"k{i}", NOW)
        assert a is not None and b is not None and a.id == b.id != "gw-4"


# -- one pin per pool -------------------------------------------------------


def test_token_seals_the_pool() -> None:
    """The pool comes back out of the token; a version-1 style claim (no pool) fits any pool."""
    claim = CODEC.open(seal("gw-1", "chat"), NOW)
    assert (claim.backend_id, claim.pool) == ("gw-1", "chat")
    assert claim.for_pool("chat") and not claim.for_pool("game")
    assert CODEC.open(seal("gw-1", None), NOW).for_pool("game")


def test_each_pool_uses_its_own_pin_and_keeps_the_others() -> None:
    """A cookie with pins for two pools: each pool reads its own; the other is kept for re-issue."""
    chat, game = seal("c-1", "chat", nonce=1), seal("g-2", "game", nonce=2)
    req = request("/ws", ("Cookie", f"LB_AFFINITY={join_pins([chat], game)}"))
    for pool, mine, other in (("chat", chat, game), ("game", game, chat)):
        lookup = find_token(req, INSERT, CODEC, NOW, pool=pool)
        assert lookup.token == mine and lookup.others == (other,) and not lookup.rejected
    fresh = seal("c-3", "chat", nonce=3)
    assert join_pins(find_token(req, INSERT, CODEC, NOW, pool="chat").others, fresh) == f"{game}.{fresh}"


def test_of_several_cookie_values_each_pools_youngest_pin_counts() -> None:
    """Two cookie values (a rewrite-mode re-issue beside the backend's own `Path`), each with pins for
    two pools: each pool routes by its youngest pin, and a re-issue keeps the other pool's youngest, not
    the pin it had before a redispatch."""
    old_chat = seal("c-1", "chat", nonce=1, issued_at=NOW - 900)
    old_game = seal("g-1", "game", nonce=2, issued_at=NOW - 900)
    new_game = seal("g-2", "game", nonce=3, issued_at=NOW - 10)  # game's client was redispatched to g-2
    for first, second in ((join_pins([old_chat], old_game), join_pins([old_chat], new_game)),
                          (join_pins([old_chat], new_game), join_pins([old_chat], old_game))):
        req = request("/ws", ("Cookie", f"LB_AFFINITY={first}; LB_AFFINITY={second}"))
        assert find_token(req, INSERT, CODEC, NOW, pool="game").token == new_game
        chat = find_token(req, INSERT, CODEC, NOW, pool="chat")
        assert chat.token == old_chat and chat.others == (new_game,)


def test_a_pin_for_another_pool_is_no_pin_here() -> None:
    """Only game's pin: a chat handshake has no token (a fresh choice), and keeps game's pin."""
    game = seal("g-2", "game")
    lookup = find_token(request("/ws", ("Cookie", f"LB_AFFINITY={game}")), INSERT, CODEC, NOW, pool="chat")
    assert lookup.claim is None and lookup.others == (game,) and not lookup.rejected


def test_single_pool_cookie_is_one_token() -> None:
    """With one pool the cookie value is exactly one token, as before pins per pool."""
    token = seal("gw-1", "gateways")
    assert join_pins((), token) == token
    assert "." not in token


def test_pins_are_bounded() -> None:
    """At most MAX_PINS pins; the oldest goes first; a cookie of many dots costs MAX_PINS opens."""
    pins = [seal("b", f"p{i}", nonce=i + 1) for i in range(MAX_PINS + 3)]
    joined = join_pins(pins[:-1], pins[-1])
    assert joined.split(".") == pins[-MAX_PINS:]
    lookup = find_token(request("/ws", ("Cookie", "LB_AFFINITY=" + "x." * 5000)), INSERT, CODEC, NOW, pool="p")
    assert len(lookup.rejected) <= MAX_PINS


def test_tokens_opened_per_request_are_bounded() -> None:
    """Many forged values (cookies, header lines, query parameters) cost MAX_OPENS opens in all."""
    forged = [seal("b", "p", nonce=i + 1)[:-4] + "AAAA" for i in range(3 * MAX_OPENS)]
    cookies = "; ".join(f"LB_AFFINITY={token}" for token in forged)
    headers = [("X-LB-Affinity", token) for token in forged]
    query = "&".join(f"lb_affinity={token}" for token in forged)
    lookup = find_token(request(f"/ws?{query}", ("Cookie", cookies), *headers), INSERT, CODEC, NOW, pool="p")
    assert lookup.claim is None and len(lookup.rejected) == MAX_OPENS


def test_rewrite_mode_restores_only_this_pools_value() -> None:
    """Rewrite mode with two pins: the backend gets its own value back, never the other pool's pin."""
    chat = seal("c-1", "chat", app_value="chat-session", nonce=1)
    game = seal("g-1", "game", app_value="game-session", nonce=2)
    req = request("/ws", ("Cookie", f"SESSIONID={chat}.{game}; other=1"))
    lookup = find_token(req, REWRITE, CODEC, NOW, pool="game")
    plan = plan_forward(req, REWRITE, lookup, to_claimed=True)
    assert plan.rewrite_cookie(f"SESSIONID={chat}.{game}; other=1") == "SESSIONID=game-session; other=1"
    lookup_other = find_token(request("/ws", ("Cookie", f"SESSIONID={chat}")), REWRITE, CODEC, NOW, pool="game")
    plan = plan_forward(req, REWRITE, lookup_other, to_claimed=False)
    assert plan.rewrite_cookie(f"SESSIONID={chat}; other=1") == "other=1"


@given(st.lists(st.text("ABCabc-_", min_size=1, max_size=6), max_size=12), st.text("XYZ", min_size=1, max_size=6))
def test_pins_join_the_newest_last_and_at_most_max_pins(others: list[str], token: str) -> None:
    joined = join_pins(others, token)
    assert joined == ".".join([*others, token][-MAX_PINS:])
    assert joined.split(".")[-1] == token and len(joined.split(".")) == min(len(others) + 1, MAX_PINS)


def _as_tuple(lookup: TokenLookup) -> tuple[object, ...]:
    return (lookup.claim, lookup.token, lookup.from_cookie, lookup.rejected, lookup.others, lookup.cookie_sent)


_ONE_TOKEN = st.one_of(
    st.builds(seal, st.sampled_from(["g-1", "c-1"]), st.sampled_from(["game", "chat", None]),
              app_value=st.none() | st.just("app"), issued_at=st.sampled_from([NOW, NOW - 7200, NOW + 3600])),
    st.builds(lambda token, cut: token[:cut] + "A" + token[cut + 1 :], st.builds(seal, st.just("g-1"), st.just("game")),
              st.integers(0, 80)),  # tampered: bad_mac or malformed
    st.text("ABCDEFabcdef0123456789-_", max_size=90),  # the backend's own value, or junk
)


@settings(max_examples=300, deadline=None)
@given(token=_ONE_TOKEN, rewrite=st.booleans(), pool=st.sampled_from(["game", "chat", None]))
def test_one_cookie_value_of_one_token_is_found_as_the_search_finds_it(
    token: str, rewrite: bool, pool: str | None
) -> None:
    """find_token's path for the common case (one cookie value, one token, no header or query) answers
    what the general search answers for the same value."""
    affinity = REWRITE if rewrite else INSERT
    req = request("/ws", ("Cookie", f"{affinity.cookie}={token}"))
    assert _as_tuple(find_token(req, affinity, CODEC, NOW, pool=pool)) == _as_tuple(
        _find_among([token], [], affinity, CODEC, NOW, pool))


# -- what the token can carry -----------------------------------------------


def test_a_value_too_large_to_seal_passes_unsealed_and_is_reported() -> None:
    """Rewrite mode: a 4,000-byte backend cookie is never replaced; the caller hears about it."""
    big = "v" * 4000
    response = parse_response_head(
        f"HTTP/1.1 101 Switching Protocols\r\nSet-Cookie: SESSIONID={big}; Path=/\r\n\r\n".encode()
    )
    with pytest.raises(TokenTooLarge):
        seal("gw-1", "gateways", app_value=big)
    reported: list[int] = []

    def sealer(value: str) -> str:
        return seal("gw-1", "gateways", app_value=value)

    rewrite, token = rewrite_response_cookies(
        response, REWRITE, sealer, on_unsealed=lambda value: reported.append(len(value))
    )
    assert (rewrite, token, reported) == (None, None, [4000])
    # The largest value that fits still round-trips.
    fits = "v" * 2900
    assert CODEC.open(seal("gw-1", "gateways", app_value=fits), NOW).app_value == fits


def _sealed_cookie(value: str, others: tuple[str, ...] = ()) -> tuple[str | None, list[int]]:
    """What the client's SESSIONID becomes for a backend's `value` (None: passed unsealed), and what was reported."""
    response = parse_response_head(f"HTTP/1.1 200 OK\r\nSet-Cookie: SESSIONID={value}\r\n\r\n".encode())
    reported: list[int] = []
    rewrite, _ = rewrite_response_cookies(
        response, REWRITE, lambda v: seal("gw-1", "gateways", app_value=v), others=others,
        on_unsealed=lambda v: reported.append(len(v)),
    )
    if rewrite is None:
        return None, reported
    return parse_set_cookie(rewrite(f"SESSIONID={value}")).value, reported


def test_a_sealed_cookie_never_passes_what_a_browser_keeps() -> None:
    """Name and value within 4096 bytes (a reviewer's 3,009-byte values became 4,097-byte cookies that
    Chromium and Firefox drop whole): past that the value passes unsealed, as the backend set it."""
    sizes = {}
    for size in range(2950, 3100, 5):
        value, reported = _sealed_cookie("v" * size)
        sizes[size] = value
        if value is None:
            assert reported == [size]
        else:
            assert len("SESSIONID=") + len(value) <= 4096
    assert sizes[2950] is not None and sizes[3095] is None


def test_other_pools_pins_give_way_before_this_pools_session() -> None:
    """Two pools' pins that together pass a browser's limit: this pool's own pin alone, rather than
    losing the session the backend just set (another pool's pin only chooses afresh next time)."""
    other = seal("c-1", "chat", app_value="c" * 1800)
    value, reported = _sealed_cookie("g" * 1800, others=(other,))
    assert value is not None and other not in value and reported == []
    small = seal("c-1", "chat", app_value="c")
    value, _ = _sealed_cookie("g" * 1800, others=(small,))
    assert value is not None and value.startswith(small + ".")


# -- config -----------------------------------------------------------------

BASE = """
listeners: [{bind: "127.0.0.1:0"}]
affinity: {secret_keys: [kkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkkk]}
routes: [{path_prefix: /, pool: p}]
pools: {p: {backends: [{id: a, address: "127.0.0.1:1"}]}}
"""


def _parse(pool_extra: dict[str, Any], listener_extra: dict[str, Any] | None = None) -> Any:
    tree = yaml.safe_load(BASE)
    tree["pools"]["p"].update(pool_extra)
    tree["listeners"][0].update(listener_extra or {})
    return parse_config(yaml.safe_dump(tree), base_dir=Path("."), environ={})


def _problems(pool_extra: dict[str, Any], listener_extra: dict[str, Any] | None = None) -> dict[str, str]:
    with pytest.raises(ConfigError) as info:
        _parse(pool_extra, listener_extra)
    return {p.path: p.message for p in info.value.problems}


def test_config_hash_and_source() -> None:
    """balance: hash with hash_key parses to a typed key; source needs none."""
    pool = _parse({"balance": "hash", "hash_key": "query:uid"}).pools["p"]
    assert (pool.balance, pool.hash_key, pool.sticky) == (BalanceMethod.HASH, HashKey(HashKeySource.QUERY, "uid"), True)
    assert _parse({"balance": "source", "sticky": False}).pools["p"].sticky is False


@pytest.mark.parametrize(
    ("extra", "path", "words"),
    [
        ({"balance": "hash"}, "pools.p.hash_key", "needs a hash_key"),
        ({"balance": "hash", "hash_key": "body:uid"}, "pools.p.hash_key", "header:NAME, query:NAME or cookie:NAME"),
        ({"balance": "hash", "hash_key": "header:"}, "pools.p.hash_key", "NAME a token"),
        ({"balance": "hash", "hash_key": "header:a b"}, "pools.p.hash_key", "NAME a token"),
        ({"balance": "least_conn", "hash_key": "header:X"}, "pools.p.hash_key", "only used with balance: hash"),
        ({"balance": "round_robin", "sticky": False}, "pools.p.sticky", "only used with balance: source or hash"),
        ({"backends": [{"id": "x" * 65, "address": "127.0.0.1:1"}]}, "pools.p.backends[0].id", "at most 64"),
    ],
)
def test_config_problems(extra: dict[str, Any], path: str, words: str) -> None:
    """What cannot work is refused at its key path, with what was expected."""
    problems = _problems(extra)
    assert list(problems) == [path] and words in problems[path]


def test_backlog_default_and_explicit(tmp_path: Path) -> None:
    """listeners[].backlog: explicit wins; default max(somaxconn, 4096)."""
    assert _parse({}, {"backlog": 512}).listeners[0].backlog == 512
    assert _parse({}).listeners[0].backlog == default_backlog() >= 4096
    (tmp_path / "big").write_text("65535\n")
    (tmp_path / "small").write_text("128\n")
    assert default_backlog(str(tmp_path / "big")) == 65535
    assert default_backlog(str(tmp_path / "small")) == 4096
    assert default_backlog(str(tmp_path / "absent")) == 4096
    assert "listeners[0].backlog" in _problems({}, {"backlog": 0})


def test_version_1_tokens_still_open_for_any_pool() -> None:
    """A token of the layout before pins per pool (no pool inside) opens, valid for every pool."""
    import struct

    from lb.affinity.codec import _derive

    key = _derive(KEYS[0], 1)
    header = struct.pack(">BH", 1, key.key_id)
    nonce = bytes(NONCE_BYTES)
    plaintext = struct.pack(">I8sB", int(NOW), SESSION, 4) + b"gw-2" + b"app"
    from base64 import urlsafe_b64encode

    token = urlsafe_b64encode(key.seal(nonce, header, plaintext)).rstrip(b"=").decode()
    claim = CODEC.open(token, NOW)
    assert (claim.backend_id, claim.pool, claim.app_value) == ("gw-2", None, "app")
    lookup = find_token(request("/ws", ("Cookie", f"LB_AFFINITY={token}")), INSERT, CODEC, NOW, pool="game")
    assert lookup.token == token


POOL_NAMES = st.from_regex(r"[a-z][a-z0-9_-]{0,20}", fullmatch=True)


@settings(max_examples=60, deadline=None)
@given(pools=st.lists(POOL_NAMES, min_size=1, max_size=MAX_PINS, unique=True))
def test_every_pool_finds_its_own_pin_among_many(pools: list[str]) -> None:
    """Whatever the pools, a cookie built pin by pin gives each pool its own pin and keeps the rest."""
    value = ""
    tokens: dict[str, str] = {}
    for n, pool in enumerate(pools):
        lookup = find_token(request("/ws", ("Cookie", f"LB_AFFINITY={value}")), INSERT, CODEC, NOW, pool=pool)
        tokens[pool] = seal(f"b{n}", pool, nonce=n + 1)
        value = join_pins(lookup.others, tokens[pool])
    for pool, token in tokens.items():
        lookup = find_token(request("/ws", ("Cookie", f"LB_AFFINITY={value}")), INSERT, CODEC, NOW, pool=pool)
        assert lookup.token == token
        assert set(lookup.others) == set(tokens.values()) - {token}

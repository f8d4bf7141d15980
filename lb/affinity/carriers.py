"""Where the affinity token travels in HTTP, per mode.  [pure]

In: the client may carry the token as a cookie (browsers), in the
`affinity.header` header (when one is named) or the `affinity.query_param` query parameter
(native clients without a cookie jar; its name read as a form, so
`lb%5Faffinity` is `lb_affinity`).  All three carry the same token and
are checked in that order; the header and query forms are removed before the
request reaches the backend.

Out, insert mode: our own cookie `affinity.cookie` (plus the header, if named) when a
token is issued; the cookie is stripped from what the backend receives.

Out, rewrite mode: the backend's own cookie `affinity.cookie` carries the
route.  Its value is sealed into the token on the way out (the Set-Cookie
keeps its Path and Domain and gets the affinity settings: lifetime, SameSite,
HttpOnly, Secure) and restored on the way in, so the backend always sees
exactly the value it set.  A token past half its life is sealed again with
the same value on the next handshake that reaches its backend, as in insert
mode (which also re-issues a token an older key opened: a key rotation).  A
cookie that is not one of our tokens passes unchanged, and so does a
backend value too large to seal (`on_unsealed` reports it: the caller logs a
WARNING and counts it).

One pin per pool: a token seals its pool, and one cookie value carries up to
MAX_PINS tokens joined by '.' (base64url has no '.'), one per pool.  A request
to pool B uses B's token; when B issues a fresh one, the other pools' tokens
from the request are kept unchanged in front of it.  With one pool the value
is one token, exactly as before.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final

from lb.affinity.balancing import hash_key_text, source_key
from lb.affinity.codec import Claim, TokenCodec, TokenTooLarge, looks_sealed
from lb.config.model import AffinityConfig, AffinityMode, BalanceMethod, HashKeySource, PoolConfig
from lb.errors import InvalidToken
from lb.http.cookies import (
    parse_set_cookie,
    read_cookie,
    reissue_set_cookie,
    render_set_cookie,
    rewrite_cookie,
    set_cookie_value,
    strip_cookie,
)
from lb.http.forwarding import form_value, query_values, strip_query_param
from lb.http.head import RequestHead, ResponseHead
from lb.http.header_values import header_text


@dataclass(slots=True, init=False)  # not frozen (~1 µs); own __init__: see lb.proxy.actions.Action
class TokenLookup:
    """The token that routes (`find_token` says which), and what was wrong with the ones that did not open.

    Never changed once `find_token` returns it: its answer for a request with no token is one object for all.
    """

    claim: Claim | None
    token: str | None
    from_cookie: bool
    rejected: dict[str, str]  # token → InvalidToken reason
    others: tuple[str, ...]  # valid pins for other pools, kept when this pool's pin is re-issued
    cookie_sent: bool  # the request carried the affinity cookie (whatever its values)

    def __init__(
        self, claim: Claim | None = None, token: str | None = None, from_cookie: bool = False,
        rejected: dict[str, str] | None = None, others: tuple[str, ...] = (), cookie_sent: bool = False,
    ) -> None:
        self.claim = claim
        self.token = token
        self.from_cookie = from_cookie
        self.rejected = {} if rejected is None else rejected
        self.others = others
        self.cookie_sent = cookie_sent


# `find_token`'s answer for a request that carries no token (a new client's): made once, where one
# made for each such request, with its empty dict, cost about 400 instructions a new client's handshake.
NO_TOKEN: Final = TokenLookup()

# Pins one cookie value carries at most (one per pool); the oldest goes first beyond it.
MAX_PINS: Final = 8
PIN_SEPARATOR: Final = "."
# Distinct session values sealed per answer at most (one seal each, an AES-GCM encryption): a
# backend answer of a thousand Set-Cookies for one name costs no more than this; the rest pass
# unsealed, as values too large to seal do.  A browser keeps one per name, path and domain.
MAX_SEALS: Final = MAX_PINS
# Tokens opened per request at most (each a decryption), wherever they come from: a duplicate
# cookie of full pins plus change.  Without it a head of many forged cookies (or header lines,
# or query parameters) cost a decryption per token: a millisecond per request of 16 KiB.
MAX_OPENS: Final = 2 * MAX_PINS


def find_token(
    request: RequestHead, affinity: AffinityConfig, codec: TokenCodec, now: float, *, pool: str | None = None
) -> TokenLookup:
    """Open the usable token: the cookie's first, else the header's, else the query parameter's.

    Among several values of the cookie, the youngest (issued last) is used, for this pool and for
    each other pool's pin kept in `others`: a browser holds one cookie per path, so a token re-issued
    with `Path=/` beside a rewrite-mode cookie with a `Path` of its own is sent after it, and taking
    the first would re-issue it on every handshake (and write the older pins back with it).

    Args:
        pool: the route's pool: only a token sealed for it (or a version-1 token, for any
            pool) is used; valid tokens for other pools are returned in `others`.
            None: the first token that opens, whatever its pool.
    """
    cookies = read_cookie(request.head.get_all("cookie"), affinity.cookie)
    header = affinity.header
    extra = [] if header is None else [value.strip() for value in request.head.get_all(header)]
    if "?" in request.target:
        extra += query_values(request.target, affinity.query_param)
    if not cookies and not extra:
        return NO_TOKEN  # a new client (every first handshake): what the loop below ends with for none
    if not extra and len(cookies) == 1 and PIN_SEPARATOR not in cookies[0]:
        return _only_token(cookies[0], affinity, codec, now, pool)  # nearly every returning client
    return _find_among(cookies, extra, affinity, codec, now, pool)


def _only_token(token: str, affinity: AffinityConfig, codec: TokenCodec, now: float, pool: str | None) -> TokenLookup:
    """What `_find_among` comes to for one cookie value of one token, and nothing else to look at, without
    its two dicts, its list and its iterator, and without hashing the token for `rejected` (about 1,500
    instructions of a returning client's handshake).  A hypothesis test holds the two to the same answers
    (`test_one_cookie_value_of_one_token_is_found_as_the_search_finds_it`)."""
    if affinity.mode is AffinityMode.REWRITE and not looks_sealed(token):
        return TokenLookup(cookie_sent=True)  # the backend's own value, passed on unchanged
    try:
        claim = codec.open(token, now)
    except InvalidToken as exc:
        return TokenLookup(rejected={token: exc.reason}, cookie_sent=True)
    if pool is None or claim.for_pool(pool):
        return TokenLookup(claim=claim, token=token, from_cookie=True, cookie_sent=True)
    return TokenLookup(others=(token,), cookie_sent=True)  # another pool's pin (for_pool: a pool of its own)


def _find_among(
    cookies: list[str], extra: list[str], affinity: AffinityConfig, codec: TokenCodec, now: float, pool: str | None
) -> TokenLookup:
    """find_token's search, over the cookie's values (`cookies`) then the header's and the query's (`extra`)."""
    rejected: dict[str, str] = {}
    others: dict[str, tuple[float, str]] = {}  # pool → (issued_at, token) of its pin, chosen as `found` is
    found: TokenLookup | None = None
    found_issued_at: float | None = None
    # Bounded: a hostile cookie of a thousand dots costs at most MAX_PINS decryptions per value,
    # and all the values together at most MAX_OPENS.
    opens = 0
    rewrite = affinity.mode is AffinityMode.REWRITE
    for index, value in enumerate(cookies + extra):
        # Rewrite mode: a part of the cookie without our shape can never open (every token has it), and
        # is the backend's own value (set before we were in front, or too large to seal), which passes
        # on unchanged (plan_forward): not a token treated as absent, so neither opened nor counted.
        owns_unshaped = rewrite and index < len(cookies)
        for token in value.split(PIN_SEPARATOR)[:MAX_PINS] if PIN_SEPARATOR in value else (value,):
            if token in rejected or (owns_unshaped and not looks_sealed(token)):
                continue
            if opens == MAX_OPENS:
                break
            opens += 1
            try:
                claim = codec.open(token, now)
            except InvalidToken as exc:
                rejected[token] = exc.reason
                continue
            from_cookie = index < len(cookies)  # the cookie's values come first
            if pool is None or claim.for_pool(pool):
                if _routes_instead(found_issued_at, claim.issued_at, from_cookie):
                    found = TokenLookup(claim=claim, token=token, from_cookie=from_cookie)
                    found_issued_at = claim.issued_at
            elif claim.pool is not None:
                held = others.get(claim.pool)
                if _routes_instead(held[0] if held is not None else None, claim.issued_at, from_cookie):
                    others[claim.pool] = (claim.issued_at, token)
    lookup = found if found is not None else TokenLookup()
    lookup.rejected = rejected
    lookup.others = tuple([pin for _, pin in others.values()])
    lookup.cookie_sent = bool(cookies)
    return lookup


def _routes_instead(held_issued_at: float | None, issued_at: float, from_cookie: bool) -> bool:
    """Whether a token issued at `issued_at` takes the place of the one held for its pool (issued at
    `held_issued_at`; None: none yet): the first found, unless a younger value of the cookie follows."""
    return held_issued_at is None or (from_cookie and issued_at > held_issued_at)


def join_pins(others: Sequence[str], token: str) -> str:
    """The cookie value: the other pools' pins, then this pool's fresh one (the newest last)."""
    if not others:
        return token  # one pool (nearly every issue): what the join makes of it, without a list and a slice
    return PIN_SEPARATOR.join([*others, token][-MAX_PINS:])


def our_set_cookie(affinity: AffinityConfig, token: str, *, secure: bool) -> str:
    """Insert mode's Set-Cookie for `token`: what `render_set_cookie` writes for it, with the attributes
    (all but the value, and the same for every token) rendered once per configuration and `secure`."""
    memo = _our_attributes[secure]
    if memo.affinity is not affinity:  # a reload's new configuration, or the first token
        name = affinity.cookie
        rendered = render_set_cookie(
            name, "", max_age=affinity.cookie_max_age, same_site=affinity.same_site,
            http_only=affinity.http_only, secure=secure,
        )
        memo.affinity, memo.attributes = affinity, rendered[len(name) + 1 :]
    # One str built, where `+` made three (each copied the token and what came before it).
    return f"{affinity.cookie}={token}{memo.attributes}"


def refreshed_copy_deletion(response: ResponseHead, affinity: AffinityConfig, *, secure: bool) -> str | None:
    """Rewrite mode: a deletion of the copy a half-life re-issue may have left, to go before the backend's
    own Set-Cookie lines when it sets or deletes its cookie at another scope (None: it does not).

    A re-issue is insert mode's line (`our_set_cookie`: host-only, `Path=/`), since the backend's own
    Path and Domain are not known then.  A backend cookie with another scope (a Path of its own, none
    given so the browser's default path, a Domain) then has that copy beside it, and what the backend
    says of its cookie reaches only its own: after a logout the copy kept routing and gave the
    backend the session back; after a new login it was re-issued in its turn, became the youngest
    value and routed the old session.  Deleted first, whatever the backend says next has the last word.
    """
    name = affinity.cookie
    seen: set[str] = set()  # a line repeated a thousand times is read once
    for value in response.head.get_all("set-cookie"):
        if value in seen or set_cookie_value(value, name) is None:
            continue
        seen.add(value)
        cookie = parse_set_cookie(value)
        domain = any(attribute == "domain" and given for attribute, given, _ in cookie.attributes)
        if domain or cookie.last("path") != "/":
            return render_set_cookie(
                name, "", max_age=0, same_site=affinity.same_site, http_only=affinity.http_only, secure=secure
            )
    return None


class _Attributes:
    """The Set-Cookie attributes last rendered for one value of `secure`, and for which configuration."""

    __slots__ = ("affinity", "attributes")

    def __init__(self) -> None:
        self.affinity: AffinityConfig | None = None
        self.attributes = ""


_our_attributes: Final = (_Attributes(), _Attributes())  # indexed by `secure`


def balance_key(request: RequestHead, pool: PoolConfig, client_ip: str) -> str | None:
    """The key a `balance: source` or `balance: hash` pool hashes; None: none (least_conn).

    Args:
        client_ip: the client address (from PROXY or trusted X-Forwarded-For when configured).
    """
    if pool.balance is BalanceMethod.SOURCE:
        return source_key(client_ip)
    if pool.balance is not BalanceMethod.HASH or pool.hash_key is None:
        return None
    # Read as `/route` reads its `key`, so that both name the same backend for the same user.
    name = pool.hash_key.name
    if pool.hash_key.source is HashKeySource.QUERY:
        # Unlike tokens, user ids may be form-encoded, as a browser's URLSearchParams writes them:
        # `uid=a%40b` is `a@b`, and `uid=a+b` is `a b` (`%2B` is a plus), as aiohttp reads `/route?key=`;
        # the name too (`u%69d=` is `uid=`), and of a repeated name the first.
        value = form_value(request.target, name) if "?" in request.target else None
        return hash_key_text(value) if value is not None else None
    if pool.hash_key.source is HashKeySource.HEADER:
        values = request.head.get_all(name)
        if len(values) > 1:
            # RFC 9110 §5.3: two field lines are one value, their comma-joined list.  Hashing the first
            # alone routed `a` and `b` by `a`, while a backend reading the last saw user `b`.
            values = [", ".join(values)]
    else:
        values = read_cookie(request.head.get_all("cookie"), name)
    return hash_key_text(header_text(values[0])) if values else None


@dataclass(slots=True, init=False)  # not frozen (~1 µs); own __init__: see lb.proxy.actions.Action
class ForwardPlan:
    """How the request head changes on its way to the backend (arguments of render_forwarded_request).

    Never changed once made: insert mode's is one for every request under a configuration (`_insert_plan`).
    """

    rewrite_cookie: Callable[[str], str | None]
    drop: frozenset[str]
    target: str | None
    append_cookie: str | None  # rewrite mode, a token from header or query: the backend's own pair

    def __init__(
        self, rewrite_cookie: Callable[[str], str | None], drop: frozenset[str], target: str | None,
        append_cookie: str | None = None,
    ) -> None:
        self.rewrite_cookie = rewrite_cookie
        self.drop = drop
        self.target = target
        self.append_cookie = append_cookie


def plan_forward(request: RequestHead, affinity: AffinityConfig, lookup: TokenLookup, to_claimed: bool) -> ForwardPlan:
    """Remove every trace of the token; in rewrite mode give the backend back its own value.

    Args:
        to_claimed: the request goes to the backend the token names (not redispatched).
    """
    name = affinity.cookie
    target = None
    if "?" in request.target:
        query = request.target.partition("?")[2]
        # A substring test spares most queries the split: a pair can be ours only if the name is in
        # the query as it is, or form-encoded (`lb%5Faffinity`; a `+` is a space, which no
        # query_param has).
        if affinity.query_param in query or "%" in query:
            stripped = strip_query_param(request.target, affinity.query_param)
            target = stripped if stripped is not request.target else None  # None: the target as it came
    if affinity.mode is AffinityMode.INSERT:
        plan = _insert_plan(affinity)
        return plan if target is None else ForwardPlan(plan.rewrite_cookie, plan.drop, target)
    drop = _header_drop(affinity.header)

    restored = lookup.claim.app_value if (lookup.claim is not None and to_claimed) else None
    ours = frozenset(lookup.others)

    def restore(value: str) -> str | None:
        parts = value.split(PIN_SEPARATOR) if PIN_SEPARATOR in value else [value]
        if lookup.token is not None and lookup.token in parts:
            return restored
        # Pins of other pools, or anything shaped like our token that did not route this
        # request (expired, tampered, sealed with a foreign key): never a value this backend
        # set, and treated as absent, so it issues a fresh session for us to seal.  Only when
        # every part is one: a value with any other part (a JWT, whose signature alone may
        # look like a token) may be the backend's own (set before we were in front, or too
        # large to seal), and passes.
        if all(part in ours or looks_sealed(part) for part in parts):
            return None
        return value

    # The token came as header or query: the backend still expects its cookie, once
    # (render_forwarded_request puts it on the last Cookie line, or a line of its own).
    restore_pair = f"{name}={restored}" if restored is not None and not lookup.from_cookie else None
    return ForwardPlan(lambda value: rewrite_cookie(value, name, restore), drop, target, restore_pair)


def _insert_plan(affinity: AffinityConfig) -> ForwardPlan:
    """Insert mode's plan for a target with nothing to strip: the same for every request under one
    configuration, so made once for it (made for each request, its closure, the closure's environment
    and the plan cost about 1,000 instructions a handshake, `python -m bench.instructions_live --profile`)."""
    memo = _insert_plans
    plan = memo.plan
    if memo.affinity is not affinity or plan is None:  # a reload's new configuration, or the first request
        name = affinity.cookie
        plan = ForwardPlan(lambda value: strip_cookie(value, name), _header_drop(affinity.header), None)
        memo.affinity, memo.plan = affinity, plan
    return plan


class _InsertPlan:
    """`_insert_plan`'s plan, and for which configuration."""

    __slots__ = ("affinity", "plan")

    def __init__(self) -> None:
        self.affinity: AffinityConfig | None = None
        self.plan: ForwardPlan | None = None


_insert_plans: Final = _InsertPlan()


@functools.lru_cache(maxsize=8)
def _header_drop(header: str | None) -> frozenset[str]:
    """The affinity header as a drop set (empty without one): one object per configuration, so the
    renderer's own cache of drop sets (keyed by it) hits without hashing a new set per request."""
    return frozenset() if header is None else frozenset({header.lower()})


# Browsers keep a cookie whose name and value together are at most 4096 bytes (RFC 6265 §6.1's
# least, Chromium's and Firefox's most) and drop a larger one whole: the session and the pin with it.
MAX_COOKIE_PAIR: Final = 4096


def fitting_value(name: str, others: Sequence[str], token: str) -> str | None:
    """The cookie value for `token`: after the other pools' pins if the cookie still fits a browser,
    else alone (those pools choose afresh next time: better than losing this pool's session), else
    None (passed unsealed)."""
    for value in (join_pins(others, token), token) if others else (token,):
        if len(name) + 1 + len(value) <= MAX_COOKIE_PAIR:
            return value
    return None


def rewrite_response_cookies(
    response: ResponseHead,
    affinity: AffinityConfig,
    seal: Callable[[str], str],
    *,
    secure: bool = False,
    others: Sequence[str] = (),
    on_unsealed: Callable[[str], None] | None = None,
    now: float | None = None,
) -> tuple[Callable[[str], str] | None, str | None]:
    """Rewrite mode: seal the backend's session cookie value into a token.

    Args:
        seal: app value → token naming the serving backend.
        secure: the Secure attribute is due (`affinity.secure` for this listener).
        others: the request's valid pins for other pools, kept in front of the new token.
        on_unsealed: called with each value not sealed (too large, or past MAX_SEALS values in
            one answer); that value passes unchanged (never replaced: the backend must get back
            what it set).
        now: wall-clock seconds, to read a past Expires as the deletion it is (None: not judged).

    Returns:
        The Set-Cookie rewriter (None when the backend set no such cookie) and the token for the header.
        The rewriter gives each sealed cookie the affinity settings (`reissue_set_cookie`).
    """
    name = affinity.cookie
    tokens: dict[str, str] = {}  # app value → its token (one seal per value)
    rewritten: dict[str, str] = {}  # Set-Cookie header value → what the client gets instead
    deletions: set[str] = set()  # read once each: a date parse per repeated line adds up
    for value in response.head.get_all("set-cookie"):
        if set_cookie_value(value, name) is None or value in rewritten or value in deletions:
            continue
        cookie = parse_set_cookie(value)
        if cookie.deletes_at(now):
            deletions.add(value)
            continue  # empty, Max-Age <= 0 or a past Expires: the backend ends its session; passed on as it is
        if cookie.value not in tokens:
            sealed = None
            if len(tokens) < MAX_SEALS:
                with contextlib.suppress(TokenTooLarge):
                    sealed = fitting_value(name, others, seal(cookie.value))
            if sealed is None:  # too large to seal, or one value too many in one answer
                if on_unsealed is not None:
                    on_unsealed(cookie.value)
                continue
            tokens[cookie.value] = sealed
        rewritten[value] = reissue_set_cookie(
            cookie, tokens[cookie.value], max_age=affinity.cookie_max_age, same_site=affinity.same_site,
            http_only=affinity.http_only, secure=secure,
        )
    if not tokens:
        return None, None

    def rewrite(header_value: str) -> str:
        return rewritten.get(header_value, header_value)

    return rewrite, list(tokens.values())[-1]

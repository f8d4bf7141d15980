"""Where the affinity token travels in HTTP, per mode.  [pure]

In: the client may carry the token as a cookie (browsers), in the
`affinity.header` header or the `affinity.query_param` query parameter
(native clients without a cookie jar).  All three carry the same token and
are checked in that order; the header and query forms are removed before the
request reaches the backend.

Out, insert mode: our own cookie `affinity.cookie` (plus the header) when a
token is issued; the cookie is stripped from what the backend receives.

Out, rewrite mode: the backend's own cookie `affinity.cookie` carries the
route.  Its value is sealed into the token on the way out (Set-Cookie keeps
its attributes) and restored on the way in, so the backend always sees
exactly the value it set.  A cookie that is not one of our tokens passes
unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from lb.affinity_token import Claim, TokenCodec
from lb.config import AffinityConfig, AffinityMode
from lb.cookies import read_cookie, rewrite_cookie, rewrite_set_cookie, set_cookie_value, strip_cookie
from lb.errors import InvalidToken
from lb.forwarding import query_values, strip_query_param
from lb.http_head import RequestHead, ResponseHead


@dataclass(frozen=True, slots=True)
class TokenLookup:
    """The first token that opened, and what was wrong with the ones that did not."""

    claim: Claim | None = None
    token: str | None = None
    from_cookie: bool = False
    rejected: dict[str, str] = field(default_factory=dict)  # token → InvalidToken reason


def find_token(request: RequestHead, affinity: AffinityConfig, codec: TokenCodec, now: float) -> TokenLookup:
    """Open the first usable token among cookie, header and query parameter."""
    cookies = read_cookie(request.head.get_all("cookie"), affinity.cookie)
    others = [value.strip() for value in request.head.get_all(affinity.header)]
    if "?" in request.target:
        others += query_values(request.target, affinity.query_param)
    rejected: dict[str, str] = {}
    for index, token in enumerate(cookies + others):
        try:
            claim = codec.open(token, now)
        except InvalidToken as exc:
            rejected[token] = exc.reason
            continue
        return TokenLookup(claim=claim, token=token, from_cookie=index < len(cookies), rejected=rejected)
    return TokenLookup(rejected=rejected)


@dataclass(frozen=True, slots=True)
class ForwardPlan:
    """How the request head changes on its way to the backend (arguments of render_forwarded_request)."""

    rewrite_cookie: Callable[[str], str | None]
    drop: frozenset[str]
    target: str | None
    add: list[tuple[str, str]]


def plan_forward(request: RequestHead, affinity: AffinityConfig, lookup: TokenLookup, to_claimed: bool) -> ForwardPlan:
    """Remove every trace of the token; in rewrite mode give the backend back its own value.

    Args:
        to_claimed: the request goes to the backend the token names (not redispatched).
    """
    name = affinity.cookie
    target = None
    if affinity.query_param in request.target.partition("?")[2]:
        target = strip_query_param(request.target, affinity.query_param)
    drop = frozenset({affinity.header.lower()})
    if affinity.mode is AffinityMode.INSERT:
        return ForwardPlan(lambda value: strip_cookie(value, name), drop, target, [])

    restored = lookup.claim.app_value if (lookup.claim is not None and to_claimed) else None

    def restore(value: str) -> str | None:
        if value == lookup.token:
            return restored
        # Only what decrypts is provably ours: an expired token is dropped (the backend
        # never set that value); anything else may be the backend's own id, and passes.
        return None if lookup.rejected.get(value) == "expired" else value

    add: list[tuple[str, str]] = []
    rewrite = lambda value: rewrite_cookie(value, name, restore)  # noqa: E731
    if restored is not None and not lookup.from_cookie:
        # The token came as header or query: the backend still expects its cookie.
        if request.head.get_all("cookie"):
            rewrite = lambda value: _append_pair(rewrite_cookie(value, name, restore), name, restored)  # noqa: E731
        else:
            add.append(("Cookie", f"{name}={restored}"))
    return ForwardPlan(rewrite, drop, target, add)


def _append_pair(header_value: str | None, name: str, value: str) -> str:
    pair = f"{name}={value}"
    return f"{header_value}; {pair}" if header_value else pair


def rewrite_response_cookies(
    response: ResponseHead, affinity: AffinityConfig, seal: Callable[[str], str]
) -> tuple[Callable[[str], str] | None, str | None]:
    """Rewrite mode: seal the backend's session cookie value into a token.

    Args:
        seal: app value → token naming the serving backend.

    Returns:
        The Set-Cookie rewriter (None when the backend set no such cookie) and the token for the header.
    """
    name = affinity.cookie
    tokens: dict[str, str] = {}
    for value in response.head.get_all("set-cookie"):
        app_value = set_cookie_value(value, name)
        # An empty value is the backend deleting its cookie: pass that on as it is.
        if app_value:
            tokens[app_value] = seal(app_value)
    if not tokens:
        return None, None

    def rewrite(header_value: str) -> str:
        return rewrite_set_cookie(header_value, name, lambda value: tokens.get(value, value))

    return rewrite, list(tokens.values())[-1]

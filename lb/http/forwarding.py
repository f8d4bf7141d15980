"""What crosses the balancer in each direction's head: hop-by-hop rules and X-Forwarded-*.  [pure]

Bodies and tunnel bytes are relayed unchanged by others; only heads are rebuilt here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Final, cast
from urllib.parse import unquote_plus

from lb import built_in_c
from lb.http.cookies import set_cookie_value
from lb.http.head import (
    KNOWN_LOWERED,
    PROXY_CLAIMS,
    Head,
    RequestHead,
    ResponseHead,
    field_name_lowered,
    is_host,
    render_head,
)

# RFC 9110 §7.6.1 plus the de-facto ones every proxy strips.  Transfer-Encoding
# stays: bodies are relayed as they come, so their framing must travel with them, and
# so does Trailer, which announces the trailer fields relayed with a chunked body
# (end-to-end in RFC 9110 §6.6.2; RFC 2616 had listed it as hop-by-hop).
HOP_BY_HOP: Final = frozenset(
    {"connection", "keep-alive", "proxy-connection", "te", "upgrade", "proxy-authorization"}
)
_FORWARDED: Final = frozenset({"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host"})
# Not on an answer without a body (1xx, 204: RFC 9112 §6.1-6.2); see render_client_response.
# Nor the announcement of a body's trailer fields.
_BODY_FRAMING: Final = frozenset({"transfer-encoding", "content-length", "trailer"})
# What a 101 loses: the hop-by-hop headers other than the switch itself (Upgrade, Connection:
# Upgrade), and body framing, which a 101 may not carry (RFC 9110 §8.6): its bytes are frames.
_NOT_ON_A_SWITCH: Final = (HOP_BY_HOP - {"connection", "upgrade"}) | _BODY_FRAMING
_NO_BODY: Final = HOP_BY_HOP | _BODY_FRAMING  # what a 1xx or a 204 loses
_ONLY_UPGRADE: Final = (["Upgrade"], ["upgrade"])  # the Connection header every gateway sends on a 101
# What browsers send as Connection on an upgrade (Firefox: keep-alive too), a field line alone: names
# only hop-by-hop ones.
_ONLY_HOP_BY_HOP_LISTED: Final = frozenset({"Upgrade", "upgrade", "keep-alive, Upgrade"})
# RFC 9110 §5.6.3 OWS: space and tab only.  A bare str.strip() would also take NBSP (0xA0) and
# NEL (0x85) off a latin-1 value, reading a token that a backend sees differently.
_OWS: Final = " \t"


# A client may not make these hop-by-hop: dropping Host breaks HTTP/1.1, dropping a
# framing header would let a body be read as the next request, and the WebSocket
# handshake's own headers were checked here (lb.ws.upgrade): the backend gets what passed.
_NEVER_CONNECTION_LISTED: Final = frozenset({
    "host", "content-length", "transfer-encoding", "sec-websocket-key", "sec-websocket-version",
    "sec-websocket-protocol", "sec-websocket-extensions", "sec-websocket-accept",
})

# What a backend never gets as the client sent it: replaced (X-Forwarded-For, -Proto, -Host: ours), or
# dropped (hop-by-hop), from any peer; and the proxy claims, dropped from a peer not trusted.  A pool may
# not hash on one (lb.config.sections): the client would pick its backend with a value no backend sees.
REPLACED_HEADERS: Final = HOP_BY_HOP | _FORWARDED
# Headers the balancer frames, routes or upgrades by, or writes itself: none may carry the affinity
# token (`affinity.header`), which is taken off every forwarded request and added to answers.
# `header: Host` left every backend without a Host, `Cookie` took every cookie off, `Upgrade`
# gave the 101 a second Upgrade that clients refuse (lb.config.sections refuses these names).
BALANCER_HEADERS: Final = (
    HOP_BY_HOP | _BODY_FRAMING | _FORWARDED | PROXY_CLAIMS | _NEVER_CONNECTION_LISTED
    | frozenset({"cookie", "set-cookie", "expect", "x-request-id"})
)


def _connection_listed(head: Head) -> set[str]:
    """Header names the sender declared hop-by-hop in its Connection header(s)."""
    listed = {part.strip(_OWS).lower() for value in head.get_all("connection") for part in value.split(",")}
    return listed - _NEVER_CONNECTION_LISTED if listed else listed


def _end_to_end(head: Head, extra_drop: frozenset[str]) -> list[tuple[str, str]]:
    listed = _connection_listed(head) - extra_drop - HOP_BY_HOP
    drop = extra_drop | listed if listed else extra_drop
    return [(name, value) for name, value in head.headers if name.lower() not in drop]


def render_forwarded_request(
    request: RequestHead,
    *,
    forwarded_for: str,
    proto: str,
    websocket: bool,
    rewrite_cookie: Callable[[str], str | None] | None = None,
    drop: frozenset[str] = frozenset(),
    target: str | None = None,
    append_cookie: str | None = None,
    backend_host: str = "localhost",
    trusted_peer: bool = False,
) -> bytes:
    """The request head the backend receives.

    Args:
        request: the client's head.
        forwarded_for: the whole X-Forwarded-For value (`lb.http.client_address.forwarded_for`): the
            client's chain only when its peer is a trusted proxy, else the peer alone.
        proto: "http" or "https", for X-Forwarded-Proto.
        websocket: keep the upgrade (Connection: Upgrade); otherwise ask the backend to close after answering.
        rewrite_cookie: applied to each Cookie header value; None drops that header.
        drop: more header names (lower case) to remove, e.g. the affinity token header.
        target: the request target to send instead of the client's.
        append_cookie: a `name=value` pair the backend must get once (rewrite mode, the token sent
            as header or query): on the client's last Cookie line, or where that line was dropped,
            or on a line of its own after the client's headers.
        backend_host: the Host to send when the client (HTTP/1.0) sent none.
        trusted_peer: the peer is a trusted proxy, whose Forwarded, X-Real-IP, X-Forwarded-Port
            and X-Forwarded-Prefix pass on, and whose X-Forwarded-Proto and X-Forwarded-Host
            (when valid) are sent instead of ours; anyone else's are dropped (spoofed addresses).
    """
    # One pass over the client's headers (this runs once per handshake): drop what is
    # hop-by-hop, ours to set, or Connection-listed; rewrite Cookie; render as we go.
    head = request.head
    # Read by their lower-case names, as Head.get would after lowering ours (a lookup each, and the list
    # compares that `get_all(...) not in` made: some 700 instructions a handshake).
    index = head.index
    dropped = _request_drop(drop, trusted_peer)
    connection = index.get("connection")
    if connection is not None and not (len(connection) == 1 and connection[0] in _ONLY_HOP_BY_HOP_LISTED):
        listed = _connection_listed(head)
        if listed - dropped:
            dropped = dropped | listed
    # An absolute-form target is already origin-form here, with Host from its authority, and
    # `_` aliases of our headers (X_Forwarded_For) are already dropped: lb.http.head does both.
    sent_target = target or request.target
    hosts = index.get("host")
    host = hosts[0] if hosts else None
    forwarded_host = host
    if trusted_peer:
        # The proxy in front ended the client's connection: its word on the scheme and the host the
        # client asked for stands (a TLS-terminating front says https), as X-Forwarded-Port does.
        proto = _first_claim(head, "x-forwarded-proto", _scheme) or proto
        forwarded_host = _first_claim(head, "x-forwarded-host", _host) or host
    added: tuple[tuple[str, str], ...]
    if host is not None and forwarded_host is not None:  # nearly every request: one tuple made at once
        added = (("X-Forwarded-For", forwarded_for), ("X-Forwarded-Proto", proto), ("X-Forwarded-Host", forwarded_host))
    else:
        added = (("X-Forwarded-For", forwarded_for), ("X-Forwarded-Proto", proto))
        if forwarded_host is not None:
            added += (("X-Forwarded-Host", forwarded_host),)
        if host is None:
            # HTTP/1.0 may omit Host; a backend may still need one to route (RFC 9112 §3.2).
            added += (("Host", backend_host),)
    # A WebSocket keeps the upgrade.  Anything else: one request per backend connection,
    # so the end of the response is also the end of the connection, and nothing can be
    # smuggled behind it.
    tail = _UPGRADE_FIELDS if websocket else _CLOSE_FIELDS
    # The client's own version: a backend then answers an HTTP/1.0 client as one (no chunked
    # body, no 1xx, RFC 9112 §6.1, RFC 9110 §15.2), which the client could not read otherwise.
    if append_cookie is None and _FORWARD is not None:
        rendered = _FORWARD(request.method, sent_target, request.version, head.headers, dropped, KNOWN_LOWERED,
                            rewrite_cookie, added, tail)
        if rendered is not None:  # what forwarded_in_python makes (a test holds them equal)
            return rendered
    return forwarded_in_python(request.method, sent_target, request.version, head.headers, dropped, rewrite_cookie,
                               append_cookie, added, tail)


def forwarded_in_python(
    method: str,
    target: str,
    version: str,
    headers: tuple[tuple[str, str], ...],
    dropped: frozenset[str],
    rewrite_cookie: Callable[[str], str | None] | None,
    append_cookie: str | None,
    added: tuple[tuple[str, str], ...],
    tail: tuple[tuple[str, str], ...],
) -> bytes:
    """The forwarded head (`render_forwarded_request`'s arguments as it passes them on): the client's fields
    less `dropped`, each Cookie through `rewrite_cookie` and `append_cookie` placed, then `added`, then `tail`."""
    # The client's (name, value) pairs are passed on as they are (render_head copies each once).
    # Held as objects: compiled, a `tuple[str, str]` variable is unpacked, and appending it would
    # build the pair again.
    fields: list[object] = []
    cookie_at, cookie_kept = -1, False  # where the client's last Cookie line is (or was dropped)
    for field in cast("tuple[object, ...]", headers):
        name, value = cast("tuple[str, str]", field)
        lowered = field_name_lowered(name)
        if lowered in dropped:
            continue
        if lowered == "cookie" and rewrite_cookie is not None:
            new_value = rewrite_cookie(value)
            cookie_at, cookie_kept = len(fields), new_value is not None
            if new_value is None:
                continue
            field = (name, new_value)
        fields.append(field)
    if append_cookie is not None:
        if cookie_kept:
            name, value = cast("tuple[str, str]", fields[cookie_at])
            fields[cookie_at] = (name, f"{value}; {append_cookie}")
        else:
            fields.insert(cookie_at if cookie_at >= 0 else len(fields), ("Cookie", append_cookie))
    fields.extend(added)
    fields.extend(tail)
    return render_head(f"{method} {target} {version}", cast("list[tuple[str, str]]", fields))


# lb.http._render's one pass (append_cookie aside), or None (not built, or LB_PURE_PYTHON=1): forwarded_in_python.
_FORWARD: Final = cast(
    "Callable[[str, str, str, tuple[tuple[str, str], ...], frozenset[str], dict[str, str], "
    "Callable[[str], str | None] | None, tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]], "
    "bytes | None] | None",
    built_in_c("lb.http._render", "forward_request"),
)


_UPGRADE_FIELDS: Final = (("Connection", "Upgrade"), ("Upgrade", "websocket"))
_CLOSE_FIELDS: Final = (("Connection", "close"),)


def _scheme(claim: str) -> str | None:
    """An X-Forwarded-Proto claim as we send it (lower case; URI schemes are case-insensitive), or None."""
    scheme = claim.lower()
    return scheme if scheme in ("http", "https") else None


def _host(claim: str) -> str | None:
    """An X-Forwarded-Host claim that is a valid `uri-host[:port]`, or None."""
    return claim if claim and is_host(claim) else None


def _first_claim(head: Head, name: str, read: Callable[[str], str | None]) -> str | None:
    """The left-most element of a trusted proxy's `name` header (the client's side of a chain of
    proxies) as `read` takes it; None when absent or not valid: ours is sent instead."""
    values = head.get_all(name)
    return read(values[0].partition(",")[0].strip(_OWS)) if values else None


def _request_drop(extra: frozenset[str], trusted_peer: bool) -> frozenset[str]:
    """Hop-by-hop, X-Forwarded-* (we set them), `extra`, and from an untrusted peer its proxy
    claims; one set per configuration and kind of peer, not per request.

    Remembered in a dict per kind of peer, keyed by `extra` (one set per configuration: its hash is
    kept in it), not by functools.lru_cache, whose key tuple and wrapper cost a handshake some 600
    instructions more; up to _DROPS_KEPT sets each, forgotten together past that (reloads)."""
    known = _TRUSTED_DROPS if trusted_peer else _UNTRUSTED_DROPS
    dropped = known.get(extra)
    if dropped is None:
        if len(known) >= _DROPS_KEPT:
            known.clear()
        dropped = HOP_BY_HOP | _FORWARDED | extra
        if not trusted_peer:
            dropped = dropped | PROXY_CLAIMS
        known[extra] = dropped
    return dropped


_DROPS_KEPT: Final = 16
_TRUSTED_DROPS: Final[dict[frozenset[str], frozenset[str]]] = {}
_UNTRUSTED_DROPS: Final[dict[frozenset[str], frozenset[str]]] = {}


def strip_query_param(target: str, name: str) -> str:
    """`target` without any pair named `name` (read as a form: `is_form_name`) in its query;
    everything else byte for byte (`target` itself when no pair was `name`'s)."""
    path, question, query = target.partition("?")
    if not question:
        return target
    pairs = query.split("&")
    kept = [pair for pair in pairs if not is_form_name(pair.partition("=")[0], name)]
    if len(kept) == len(pairs):
        return target  # a query with a `%` but no pair of ours (the caller tries every such query)
    # Left with only empty pairs (`?lb_affinity=T&`): no query, rather than a bare `?` the client never sent alone.
    return f"{path}?{'&'.join(kept)}" if any(kept) else path


def query_values(target: str, name: str) -> list[str]:
    """Values of query parameter `name`, its name read as a form (`is_form_name`); the values raw
    (tokens are base64url, which a form encoder leaves as it is)."""
    values = []
    for pair in target.partition("?")[2].split("&"):
        key, eq, value = pair.partition("=")
        if eq and is_form_name(key, name):
            values.append(value)
    return values


def is_form_name(key: str, name: str) -> bool:
    """Whether the query key `key` is `name` read as a form (URL Standard §5.1): `u%69d` is `uid`,
    as every framework reads it, and compared raw it was no key at all (nor one to take off).

    Decoded only when it has something to decode and could decode to `name`: decoding never
    lengthens a key (a `+` is one space) and takes at most three characters to each byte of
    `name` (`%XX`).  So a query of thousands of pairs (up to limits.max_header_bytes, which may be
    1 MiB), plain or every one percent-encoded, costs a compare and a length check each, and a
    decode only for keys of about `name`'s length: a 16 KiB query of `%41`s took 8-26 ms of decoding.
    """
    if key == name:
        return True
    if not len(name) <= len(key) <= 3 * len(name.encode("utf-8")):
        return False
    return ("%" in key or "+" in key) and unquote_plus(key, errors="surrogateescape") == name


def form_value(target: str, name: str) -> str | None:
    """The first value of query parameter `name`, read as a form (URL Standard §5.1, what a browser's
    `URLSearchParams` writes and aiohttp reads `/route?key=` with): None when it has none.

    The name is decoded as its value is (`%69` is `i`, `+` a space, `%2B` a plus: `is_form_name`).
    Of a repeated name the first counts, as aiohttp's `query.get`, Flask's `args.get` and
    `URLSearchParams.get` take it (a pair without `=` is an empty value: no key).
    """
    for pair in target.partition("?")[2].split("&"):
        key, _, value = pair.partition("=")
        if is_form_name(key, name):
            return unquote_plus(value, errors="surrogateescape")
    return None


def render_client_response(
    response: ResponseHead,
    *,
    switching: bool,
    set_cookies: list[str],
    extra: list[tuple[str, str]],
    rewrite_set_cookie: Callable[[str], str] | None = None,
    keep_alive: bool = False,
    drop_cookie: str | None = None,
    set_cookie_first: str | None = None,
    drop_header: str | None = None,
) -> bytes:
    """The response head the client receives: the backend's, plus our cookie.

    A 101 keeps its Connection/Upgrade headers (they are the switch) and loses the
    other hop-by-hop ones; any other answer loses all of them and says Connection: close
    unless `keep_alive` (the client connection then carries the next request; HTTP/1.1
    is persistent by default, so nothing is added).  Interim answers: `render_interim`.
    `rewrite_set_cookie` is applied to each of the backend's Set-Cookie values.  The backend's
    Set-Cookie headers for cookie `drop_cookie` are left out (insert mode: that name is ours), and so
    are its `drop_header` fields (`affinity.header`: ours in both modes, only `extra` may carry it).
    `set_cookie_first` goes before the backend's Set-Cookie headers (a browser applies them in
    order, so the backend's own have the last word), `set_cookies` after them.
    """
    if switching:
        headers = _switch_headers(response.head, _dropping(_NOT_ON_A_SWITCH, drop_header))
    else:
        # A 204 has no body, and RFC 9112 §6.1-6.2 forbid a length or a coding on it: relayed, a
        # client that believed one would read the next answer's bytes as this body.
        dropped = _NO_BODY if response.status == 204 else HOP_BY_HOP
        headers = _end_to_end(response.head, _dropping(dropped, drop_header))
        lengths = response.head.get_all("content-length") if response.status != 204 else []
        if len(lengths) > 1 or (lengths and "," in lengths[0]):
            headers = _one_length(headers)
        if not keep_alive:
            headers.append(("Connection", "close"))
    if drop_cookie is not None:
        headers = _without_set_cookie(headers, drop_cookie)
    if rewrite_set_cookie is not None:
        headers = [
            (name, rewrite_set_cookie(value) if name.lower() == "set-cookie" else value)
            for name, value in headers
        ]
    if set_cookie_first is not None:
        first = next((i for i, (name, _) in enumerate(headers) if name.lower() == "set-cookie"), len(headers))
        headers.insert(first, ("Set-Cookie", set_cookie_first))
    carries_token = bool(set_cookies) or rewrite_set_cookie is not None  # ours, or the backend's sealed
    if carries_token and not switching and not _kept_from_shared_caches(response.head):
        # Our token on an answer a shared cache may store would be handed to everyone it serves
        # (one pin, one session id for all): HAProxy's `cookie ... insert nocache`.
        headers.append(("Cache-Control", "private"))
    headers.extend(("Set-Cookie", cookie) for cookie in set_cookies)
    headers.extend(extra)
    # status-line = HTTP-version SP status-code SP [ reason-phrase ] (RFC 9112 §4): the second SP stays.
    return render_head(f"HTTP/1.1 {response.status} {response.reason}", headers)


def _kept_from_shared_caches(head: Head) -> bool:
    """The answer says `private` or `no-store` (RFC 9111 §5.2.2): no shared cache stores it.

    Not `private="Set-Cookie"`: a shared cache may store that answer without the fields named,
    and our token may be in `affinity.header` too.
    """
    for value in head.get_all("cache-control"):
        for directive in value.split(","):
            name, eq, _ = directive.partition("=")
            name = name.strip(_OWS).lower()
            if name == "no-store" or (name == "private" and not eq):
                return True
    return False


def _one_length(headers: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Equal Content-Lengths (`2, 2`, or two lines: the head parser refused any that differ) as one.

    RFC 9110 §8.6 lets a recipient take such a list as its one value; a proxy that does must
    send that value on (HAProxy does), since Node's and aiohttp's clients refuse the list.
    """
    out: list[tuple[str, str]] = []
    said = False
    for name, value in headers:
        if name.lower() == "content-length":
            if said:
                continue
            said = True
            value = value.split(",")[0].strip(_OWS)
        out.append((name, value))
    return out


def _switch_headers(head: Head, not_on_a_switch: frozenset[str]) -> list[tuple[str, str]]:
    """A 101's headers for the client: the switch and the end-to-end ones, in the backend's order.

    The backend's Connection header speaks of its connection to us: a `Keep-Alive`, or a name
    it lists there, is not the client's.  What stays is `Connection: Upgrade` (lb.ws.upgrade
    checked that the backend said so) and everything end-to-end but `not_on_a_switch`.
    """
    if head.get_all("connection") in _ONLY_UPGRADE and not head.has_any(not_on_a_switch):
        return list(head.headers)  # what every gateway sends: nothing to take out
    drop = not_on_a_switch | (_connection_listed(head) - {"upgrade"})
    headers: list[tuple[str, str]] = []
    connection_said = False
    for name, value in head.headers:
        lowered = name.lower()
        if lowered == "connection":
            if not connection_said:  # one `Connection: Upgrade` where the backend's first one was
                headers.append((name, "Upgrade"))
                connection_said = True
        elif lowered not in drop:
            headers.append((name, value))
    return headers


def render_interim(response: ResponseHead, affinity_cookie: str | None, affinity_header: str | None = None) -> bytes:
    """A 1xx interim answer (100 Continue, 103 Early Hints) as the client receives it.

    Only its end-to-end headers: nothing hop-by-hop (the backend's Connection speaks of its
    connection to us) and no framing (a 1xx has no body, RFC 9112 §6.1-6.2), and no Set-Cookie
    of `affinity_cookie` (None: every cookie passes).  A client's jar (curl's, a native
    client's) may store a 1xx's cookie, and an interim answer is never rewritten: in insert mode
    the backend's cookie of our name would replace the client's pins, and in rewrite mode its
    session value would reach the client unsealed.  The final answer sets that cookie as the
    mode says; other cookies pass.  Nor the backend's own `affinity_header` field: that header
    is ours, and a native client reading its token there would take the backend's for it.
    """
    headers = _end_to_end(response.head, _dropping(_NO_BODY, affinity_header))
    if affinity_cookie is not None:
        headers = _without_set_cookie(headers, affinity_cookie)
    return render_head(f"HTTP/1.1 {response.status} {response.reason}", headers)


def _without_set_cookie(headers: list[tuple[str, str]], cookie: str) -> list[tuple[str, str]]:
    """`headers` less each Set-Cookie about cookie `cookie` (a value or a deletion)."""
    return [
        (name, value) for name, value in headers
        if name.lower() != "set-cookie" or set_cookie_value(value, cookie) is None
    ]


@functools.lru_cache(maxsize=16)
def _dropping(drop: frozenset[str], name: str | None) -> frozenset[str]:
    """`drop` and the field `name` too (`affinity.header`, ours in every answer): one set per configuration,
    so that the head is filtered in its one pass (`_end_to_end`, `_switch_headers`), not again after."""
    return drop if name is None else drop | {name.lower()}


def render_refusal(
    status: int, reason_phrase: str, request_id: str, headers: dict[str, str], *, head_only: bool = False
) -> bytes:
    """An answer of our own: the status, its fixed reason and the request id the access log also carries.

    The body names no backend, pool, address or anything the client sent: the
    details of why are in the log line with the same request id.  `head_only`: the answer to a
    HEAD, which ends at its head (RFC 9110 §9.3.2): the Content-Length of the body a GET would get.
    """
    body = f"{status} {reason_phrase}\nrequest id: {request_id}\n".encode("ascii")
    all_headers = [
        ("Content-Type", "text/plain; charset=utf-8"),
        ("Content-Length", str(len(body))),
        # A sender of Upgrade (a 426) also lists it in Connection, so intermediaries drop it (RFC 9110 §7.8).
        ("Connection", "Upgrade, close" if "Upgrade" in headers else "close"),
        ("X-Request-Id", request_id),
        *headers.items(),
    ]
    head = render_head(f"HTTP/1.1 {status} {reason_phrase}", all_headers)
    return head if head_only else head + body

"""Cookie headers: read, strip and rewrite one cookie; render our Set-Cookie.  [pure]

Parsing follows RFC 6265 §5.4 leniently on the way in (browsers send what they
send) and renders strictly per RFC 6265 §4.1.1 on the way out.
"""

from __future__ import annotations

import datetime
import email.utils
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from lb.config.model import SameSite
from lb.http.head import ResponseHead

# RFC 6265bis §4.1.3: a browser keeps a cookie whose name starts with one of these only if it comes with
# Secure (a `__Host-` one also with Path=/ and no Domain, as insert mode's always is; a rewrite-mode one
# keeps the backend's own).  Matched whatever the case, as browsers match them now.
_SECURE_PREFIXES = ("__secure-", "__host-")


def secure_prefix(name: str) -> str | None:
    """The prefix of cookie `name` that browsers honour only with Secure (`__Secure-`, `__Host-`), or None."""
    lowered = name.lower()
    for prefix in _SECURE_PREFIXES:
        if lowered.startswith(prefix):
            return name[: len(prefix)]
    return None


def _unquote(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def read_cookie(header_values: list[str], name: str) -> list[str]:
    """Every value of cookie `name` across the Cookie header(s), in order: of each `;`-separated part with
    an `=`, the value (stripped, then unquoted) where the name (stripped) is `name`.  A header without
    `name` in it is passed over, and no pair is built but the ones kept (every returning client's
    handshake reads one: about 1,900 instructions fewer than a list of all its pairs).  The values are
    the list `Head.get_all` gives: compiled, a list is indexed, where an Iterable went through an iterator."""
    values = []
    for header in header_values:
        if name not in header:
            continue
        # One pair (a returning client with no other cookie) is its own one part: a list of it costs
        # less than the call to split.
        for part in header.split(";") if ";" in header else [header]:
            pair_name, eq, value = part.partition("=")
            if eq and pair_name.strip() == name:
                values.append(_unquote(value.strip()))
    return values


def rewrite_cookie(header_value: str, name: str, replace: Callable[[str], str | None]) -> str | None:
    """Apply `replace` to each value of cookie `name`; None from it removes that pair.

    Without cookie `name`, the header is returned as it came, byte for byte (None if empty).
    With it, every other pair keeps its bytes, and the separator before it its own (SPEC: other
    cookies pass unchanged; `a=1;b=2` stays so): a removed pair goes with the separator before it
    (after it, when first), empty pairs go, and what is left starts and ends with a pair.
    Returns None when no cookie is left.
    """
    if name not in header_value:  # most Cookie headers of a new client: nothing to find or rewrite
        return header_value if header_value.strip(" \t;") else None
    out: list[str] = []
    found = False
    before = ""  # the part before this one: its trailing spaces, `;` and this one's leading ones separate them
    for part in header_value.split(";"):
        pair_name, eq, value = part.partition("=")
        if eq and pair_name.strip() == name:
            found = True
            unquoted = _unquote(value.strip())
            new_value = replace(unquoted)
            if new_value is None:
                before = part
                continue
            # One left as it is keeps its bytes: `"legacy"` stays quoted, as it came.
            pair = part.strip(" \t") if new_value == unquoted else f"{name}={new_value}"
        else:
            pair = part.strip(" \t")
        if pair:
            if out:  # the separator as it came (only between two pairs kept: one is seldom there)
                out.append(before[len(before.rstrip(" \t")):] + ";" + part[: len(part) - len(part.lstrip(" \t"))])
            out.append(pair)
        before = part
    if not found:
        return header_value if out else None
    return "".join(out) if out else None


def strip_cookie(header_value: str, name: str) -> str | None:
    """The Cookie header without cookie `name`; None when nothing else is left.  What `rewrite_cookie`
    gives with a `replace` that removes every value (a test holds them equal)."""
    if ";" not in header_value:
        # One pair (nearly every returning client's header, in insert mode ours alone): dropped, or
        # passed as it came, without the list of parts and the call for each value of ours.
        pair_name, eq, _ = header_value.partition("=")
        if eq and pair_name.strip() == name:
            return None
        return header_value if header_value.strip(" \t") else None
    return rewrite_cookie(header_value, name, _removed)


def _removed(_value: str) -> None:
    """`rewrite_cookie`'s `replace` that removes every value."""
    return None


@dataclass(frozen=True, slots=True)
class SetCookie:
    """A backend's Set-Cookie header, read once (RFC 6265 §5.2)."""

    name: str
    value: str
    attributes: tuple[tuple[str, str, str], ...]  # (lower-case name, value, as written), in order

    def last(self, attribute: str) -> str | None:
        """The value of the last `attribute` (the one a browser uses), or None."""
        found = None
        for name, value, _ in self.attributes:
            if name == attribute:
                found = value
        return found

    @property
    def max_age(self) -> int | None:
        """The Max-Age a browser reads (the last valid one, RFC 6265 §5.2.2), or None."""
        found = None
        for attribute, value, _ in self.attributes:
            digits = value[1:] if value[:1] == "-" else value
            if attribute == "max-age" and digits.isascii() and digits.isdigit():
                # More digits than _MAX_AGE_DIGITS are "a very long time" (int() of 4,300 raises).
                big = len(digits.lstrip("0")) > _MAX_AGE_DIGITS
                magnitude = 10**_MAX_AGE_DIGITS if big else int(digits[-_MAX_AGE_DIGITS:])
                found = -magnitude if value[:1] == "-" else magnitude
        return found

    def deletes_at(self, now: float | None) -> bool:
        """Whether it deletes its cookie: an empty value, a Max-Age of zero or less, or, at wall-clock
        `now` (None: not judged), an Expires not after it with no Max-Age (Max-Age wins, RFC 6265
        §5.3): `Expires=Thu, 01 Jan 1970 00:00:00 GMT` is how many frameworks log out."""
        if not self.value:
            return True
        max_age = self.max_age
        if max_age is not None:
            return max_age <= 0
        expires = self.last("expires")
        if now is None or expires is None:
            return False
        when = _http_date(expires)
        return when is not None and when <= now


_MAX_AGE_DIGITS = 12


def _http_date(text: str) -> float | None:
    """Seconds since the epoch of an HTTP date (`Thu, 01 Jan 1970 00:00:00 GMT` and the obsolete
    forms email.utils reads), or None for anything else: a date we cannot read deletes nothing."""
    if len(text) > 64:
        return None
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return when.timestamp()


def parse_set_cookie(header_value: str) -> SetCookie:
    """Read a Set-Cookie header once: name, value, and each attribute (RFC 6265 §5.2)."""
    pair, _, rest = header_value.partition(";")
    name, _, value = pair.partition("=")
    attributes = []
    for part in rest.split(";") if rest else ():
        attribute, _, attribute_value = part.partition("=")
        if attribute.strip():
            attributes.append((attribute.strip().lower(), attribute_value.strip(), part.strip()))
    return SetCookie(name.strip(), value.strip(), tuple(attributes))


_SAME_SITE = {member.value.lower(): member for member in SameSite}
_STRICTNESS = {SameSite.NONE: 0, SameSite.LAX: 1, SameSite.STRICT: 2}

# Attributes the rewritten cookie states itself (below); any other a backend sets is kept.
_RESTATED = frozenset({"path", "domain", "max-age", "expires", "httponly", "samesite", "secure"})


def reissue_set_cookie(
    cookie: SetCookie, token: str, *, max_age: int, same_site: SameSite, http_only: bool, secure: bool
) -> str:
    """A backend's Set-Cookie (rewrite mode) with its value replaced by `token`, in our format.

    The cookie now carries the route, so the affinity settings govern it as they govern
    insert mode's cookie (`render_set_cookie`), without undoing what the backend asked for:
    - its Path and Domain stay (the last of each, as a browser reads them): where the cookie
      belongs is the application's.  Without a valid Path (none, or one not starting with `/`)
      it gets none: the browser then stores it at the request's default path (RFC 6265 §5.1.4,
      `/api` for `/api/login`), as it would without us, and the backend's deletion without a
      Path (from `/api/logout`) reaches it; `Path=/` would have kept it beyond that deletion;
    - lifetime: Max-Age is `max_age`, the token's life, or the backend's own if shorter; a
      backend that gave Expires and no Max-Age keeps its Expires (its lifetime, its dates);
    - HttpOnly and Secure are on when the settings or the backend say so, and SameSite is
      the stricter of the two: never weaker than what the backend asked for;
    - any other attribute (Partitioned, Priority, ...) follows, as the backend wrote it.
    """
    path = cookie.last("path")
    own_max_age = cookie.max_age
    expires = cookie.last("expires") if own_max_age is None else None
    own_same_site = _SAME_SITE.get((cookie.last("samesite") or "").lower())
    if own_same_site is not None and _STRICTNESS[own_same_site] > _STRICTNESS[same_site]:
        same_site = own_same_site
    names = {attribute for attribute, _, _ in cookie.attributes}
    return render_set_cookie(
        cookie.name,
        token,
        max_age=None if expires is not None else max_age if own_max_age is None else min(own_max_age, max_age),
        expires=expires,
        same_site=same_site,
        http_only=http_only or "httponly" in names,
        secure=secure or "secure" in names,
        path=path if path and path.startswith("/") else None,  # RFC 6265 §5.2.4: the default path
        # The last Domain with a value: an empty one is ignored by browsers (RFC 6265 §5.2.3).
        domain=next((value for name, value, _ in reversed(cookie.attributes) if name == "domain" and value), None),
        extra=[written for attribute, _, written in cookie.attributes if attribute not in _RESTATED],
    )


def sets_cookie(response: ResponseHead, name: str) -> bool:
    """Whether any Set-Cookie of `response` is about cookie `name` (a value or a deletion)."""
    return any(set_cookie_value(value, name) is not None for value in response.head.get_all("set-cookie"))


def set_cookie_value(header_value: str, name: str) -> str | None:
    """The value a Set-Cookie header gives cookie `name`, or None if it is about another cookie."""
    pair_name, eq, value = header_value.partition(";")[0].partition("=")
    return value.strip() if eq and pair_name.strip() == name else None


def render_set_cookie(
    name: str,
    value: str,
    *,
    max_age: int | None,
    same_site: SameSite,
    http_only: bool,
    secure: bool,
    path: str | None = "/",
    domain: str | None = None,
    expires: str | None = None,
    extra: Iterable[str] = (),
) -> str:
    """Our Set-Cookie value: `name=value; Path=/; Max-Age=N; HttpOnly; SameSite=X[; Secure]`.

    `path` (None: no Path attribute), `domain`, `expires` (instead of Max-Age) and `extra`
    attributes: a backend's own, kept on a rewrite-mode cookie (`reissue_set_cookie`).
    """
    parts = [f"{name}={value}"]
    if path is not None:
        parts.append(f"Path={path}")
    if domain is not None:
        parts.append(f"Domain={domain}")
    parts.append(f"Max-Age={max_age}" if max_age is not None else f"Expires={expires}")
    if http_only:
        parts.append("HttpOnly")
    parts.append(f"SameSite={same_site}")  # a StrEnum formats as its value (`.value` is a Python-level property)
    if secure:
        parts.append("Secure")
    parts.extend(extra)
    return "; ".join(parts)

"""Cookie headers: read, strip and rewrite one cookie; render our Set-Cookie.  [pure]

Parsing follows RFC 6265 §5.4 leniently on the way in (browsers send what they
send) and renders strictly per RFC 6265 §4.1.1 on the way out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from lb.config.model import SameSite
from lb.http.head import ResponseHead


def _pairs(header_value: str) -> list[tuple[str, str]]:
    pairs = []
    for part in header_value.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq:
            pairs.append((name.strip(), value.strip()))
    return pairs


def _unquote(value: str) -> str:
    return value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value


def read_cookie(header_values: Iterable[str], name: str) -> list[str]:
    """Every value of cookie `name` across the Cookie header(s), in order."""
    return [_unquote(v) for header in header_values for n, v in _pairs(header) if n == name]


def rewrite_cookie(header_value: str, name: str, replace: Callable[[str], str | None]) -> str | None:
    """Apply `replace` to each value of cookie `name`; None from it removes that pair.

    Without cookie `name`, the header is returned as it came, byte for byte (None if empty).
    With it, the other pairs keep their bytes (only the spaces around `;` become one) and are
    joined by `; `.  Returns None when no cookie is left.
    """
    if name not in header_value:  # most Cookie headers of a new client: nothing to find or rewrite
        return header_value if header_value.strip(" \t;") else None
    kept = []
    found = False
    for part in header_value.split(";"):
        pair_name, eq, value = part.partition("=")
        if eq and pair_name.strip() == name:
            found = True
            new_value = replace(_unquote(value.strip()))
            if new_value is None:
                continue
            part = f"{name}={new_value}"
        else:
            part = part.strip(" \t")  # the separator's spaces only: a pair's own bytes stay
        if part:
            kept.append(part)
    if not found:
        return header_value if kept else None
    return "; ".join(kept) if kept else None


def strip_cookie(header_value: str, name: str) -> str | None:
    """The Cookie header without cookie `name`; None when nothing else is left."""
    return rewrite_cookie(header_value, name, lambda _value: None)


def _attributes(header_value: str) -> list[tuple[str, str]]:
    """A Set-Cookie's attributes after its pair, as (lower-case name, value) in order (RFC 6265 §5.2)."""
    attributes = []
    for part in header_value.split(";")[1:]:
        attribute, _, value = part.partition("=")
        if attribute.strip():
            attributes.append((attribute.strip().lower(), value.strip()))
    return attributes


# More Max-Age digits than this are "a very long time" (int() of 4,300 digits raises in CPython).
_MAX_AGE_DIGITS = 12


def _max_age(attributes: list[tuple[str, str]]) -> int | None:
    """The Max-Age a browser reads (the last valid one, RFC 6265 §5.2.2), or None."""
    found = None
    for attribute, value in attributes:
        digits = value[1:] if value[:1] == "-" else value
        if attribute == "max-age" and digits.isascii() and digits.isdigit():
            magnitude = int(digits[-_MAX_AGE_DIGITS:]) if len(digits.lstrip("0")) <= _MAX_AGE_DIGITS else 10**12
            found = -magnitude if value[:1] == "-" else magnitude
    return found


def deletes(header_value: str) -> bool:
    """Whether a Set-Cookie deletes its cookie: an empty value, or a Max-Age of zero or less."""
    value = header_value.partition(";")[0].partition("=")[2].strip()
    if not value:
        return True
    max_age = _max_age(_attributes(header_value)) if "max-age" in header_value.lower() else None
    return max_age is not None and max_age <= 0


_STRICTNESS = {SameSite.NONE: 0, SameSite.LAX: 1, SameSite.STRICT: 2}


def _stricter(same_site: SameSite, attributes: list[tuple[str, str]]) -> SameSite:
    """`same_site`, or the backend's own SameSite (the last valid one, as browsers read it) if stricter."""
    own = None
    for attribute, value in attributes:
        if attribute == "samesite":
            own = next((member for member in SameSite if member.value.lower() == value.lower()), own)
    return own if own is not None and _STRICTNESS[own] > _STRICTNESS[same_site] else same_site


# Attributes the rewritten cookie states itself (below); any other a backend sets is kept.
_RESTATED = frozenset({"path", "domain", "max-age", "expires", "httponly", "samesite", "secure"})


def reissue_set_cookie(
    header_value: str, token: str, *, max_age: int, same_site: SameSite, http_only: bool, secure: bool
) -> str:
    """A backend's Set-Cookie (rewrite mode) with its value replaced by `token`, in our format.

    The cookie now carries the route, so the affinity settings govern it as they govern
    insert mode's cookie (`render_set_cookie`), without undoing what the backend asked for:
    - its Path and Domain stay: where the cookie belongs is the application's (Path=/ if none);
    - lifetime: Max-Age is `max_age`, the token's life, or the backend's own if shorter; a
      backend that gave Expires and no Max-Age keeps its Expires (its lifetime, its dates);
    - HttpOnly and Secure are on when the settings or the backend say so, and SameSite is
      the stricter of the two: never weaker than what the backend asked for;
    - any other attribute (Partitioned, Priority, ...) follows, as the backend wrote it.
    """
    name = header_value.partition(";")[0].partition("=")[0].strip()
    attributes = _attributes(header_value)
    names = {attribute for attribute, _ in attributes}
    path = next((value for attribute, value in attributes if attribute == "path" and value.startswith("/")), "/")
    parts = [f"{name}={token}", f"Path={path}"]
    parts += [f"Domain={value}" for attribute, value in attributes if attribute == "domain" and value][:1]
    own_max_age = _max_age(attributes)
    if own_max_age is None and "expires" in names:
        parts += [f"Expires={value}" for attribute, value in attributes if attribute == "expires"][-1:]
    else:
        parts.append(f"Max-Age={max_age if own_max_age is None else min(own_max_age, max_age)}")
    if http_only or "httponly" in names:
        parts.append("HttpOnly")
    parts.append(f"SameSite={_stricter(same_site, attributes).value}")
    if secure or "secure" in names:
        parts.append("Secure")
    for part in header_value.split(";")[1:]:
        if part.strip() and part.partition("=")[0].strip().lower() not in _RESTATED:
            parts.append(part.strip())
    return "; ".join(parts)


def sets_cookie(response: ResponseHead, name: str) -> bool:
    """Whether any Set-Cookie of `response` is about cookie `name` (a value or a deletion)."""
    return any(set_cookie_value(value, name) is not None for value in response.head.get_all("set-cookie"))


def set_cookie_value(header_value: str, name: str) -> str | None:
    """The value a Set-Cookie header gives cookie `name`, or None if it is about another cookie."""
    pair_name, eq, value = header_value.partition(";")[0].partition("=")
    return value.strip() if eq and pair_name.strip() == name else None


def render_set_cookie(
    name: str, value: str, *, max_age: int, same_site: SameSite, http_only: bool, secure: bool
) -> str:
    """Our Set-Cookie value: `name=value; Path=/; Max-Age=N; HttpOnly; SameSite=X[; Secure]`."""
    parts = [f"{name}={value}", "Path=/", f"Max-Age={max_age}"]
    if http_only:
        parts.append("HttpOnly")
    parts.append(f"SameSite={same_site.value}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)

"""Cookie headers: read, strip and rewrite one cookie; render our Set-Cookie.  [pure]

Parsing follows RFC 6265 §5.4 leniently on the way in (browsers send what they
send) and renders strictly per RFC 6265 §4.1.1 on the way out.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from lb.config.model import SameSite


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


def rewrite_set_cookie(header_value: str, name: str, replace: Callable[[str], str]) -> str:
    """Replace the value of a Set-Cookie for `name`, keeping its attributes; other cookies unchanged."""
    pair, semicolon, attributes = header_value.partition(";")
    pair_name, eq, value = pair.partition("=")
    if not eq or pair_name.strip() != name:
        return header_value
    return f"{pair_name.strip()}={replace(value.strip())}{semicolon}{attributes}"


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

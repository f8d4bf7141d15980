"""Parsers of one scalar value each: a raw YAML value (or a `${...}` string) in, a typed value out, or `Bad`.

Strings and secrets, bounded integers and numbers, booleans, durations, choices and enums, host:port
addresses, request paths, cookie and header names, ids and hash keys.  Pure: nothing is read.  Which
key takes which parser is `lb.config.sections`' business, and so is the path a problem is keyed by:
a parser raises `Bad(message)` ("expected a port from 1 to 65535, got 70000") and the caller adds the
path (`lb.config.checker`).  A value from `${...}` arrives as `Expanded` text, which the number,
integer and boolean parsers read as YAML would have read the same text in the file.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from collections.abc import Callable, Mapping
from enum import Enum
from typing import Final, TypeVar

from lb.config.backend_address import as_ipv4, not_a_host
from lb.config.checker import Bad, Expanded, Parser, got, kind_of, show
from lb.config.durations import BadDuration, parse_duration
from lb.config.model import HashKey, HashKeySource, SecureMode, host_port

T = TypeVar("T")
E = TypeVar("E", bound=Enum)


def string(value: object) -> str:
    """A non-empty string of UTF-8 text (a plain `str`, not `Expanded`).

    Raises:
        Bad: not a string, empty, or not UTF-8 (`NOT_UTF8`).
    """
    if not isinstance(value, str):
        raise Bad(f"expected a string, got {kind_of(value)}")
    if not value:
        raise Bad("expected a non-empty string")
    if not is_utf8(value):
        raise Bad(NOT_UTF8)
    return str(value)  # a plain str, not Expanded


NOT_UTF8 = ("expected UTF-8 text: it holds bytes that are not (a variable set from random bytes?) "
            "or a lone surrogate such as \\ud800")


def is_utf8(text: str) -> bool:
    """Whether `text` can be sent or sealed as UTF-8: an environment variable's bytes that are not UTF-8
    arrive as lone surrogates (Python's surrogateescape), and so does a YAML `"\\ud800"`."""
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


_VISIBLE_ASCII_RE = re.compile(r"[\x21-\x7e]+")


def secret(value: object) -> str:
    """Like string, but for the admin token: the message never echoes the value, even a numeric one.

    Visible ASCII only: the token travels in an `Authorization` header, which lb ctl (http.client) sends
    as Latin-1 and the admin API compares as UTF-8, so another character could never match (and a space
    would end a bearer token).

    Raises:
        Bad: not a string, empty, or not visible ASCII; the message names the value's type only.
    """
    if not isinstance(value, str):
        raise Bad(f"expected a string, got {type(value).__name__}")
    text = string(value)
    if not _VISIBLE_ASCII_RE.fullmatch(text):
        raise Bad("expected visible ASCII (no spaces): the token travels in an HTTP header; `lb keygen` makes one")
    return text


def integer(low: int, high: int) -> Parser:
    """A parser of an integer from `low` to `high` inclusive (`${...}` text of digits too, bools never).

    Returns:
        The parser; it raises `Bad` for anything else, or a value out of the range.
    """

    def parse(value: object) -> int:
        if isinstance(value, Expanded) and value.isascii() and value.isdigit():
            if len(value) > 30:  # int() refuses over 4,300 digits, and no key's range comes near 30
                raise Bad(f"expected an integer from {low} to {high}, got one of {len(value)} digits")
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise Bad(f"expected an integer from {low} to {high}, got {got(value)}")
        if not low <= value <= high:
            raise Bad(f"expected an integer from {low} to {high}, got {value}")
        return value

    return parse


def number(low: float, high: float) -> Parser:
    """A parser of a number from `low` to `high` inclusive, returned as a float (NaN and bools never).

    Returns:
        The parser; it raises `Bad` for anything else, or a value out of the range.
    """

    def parse(value: object) -> float:
        if isinstance(value, Expanded):
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
            raise Bad(f"expected a number from {low:g} to {high:g}, got {got(value)}")
        if not low <= value <= high:
            raise Bad(f"expected a number from {low:g} to {high:g}, got {value:g}")
        return float(value)

    return parse


# The words YAML 1.1 (PyYAML, libyaml) reads as booleans in the file: a `${VAR}` reference's text means
# the same, so that a value moved from the file into the environment keeps its meaning.
_BOOLEAN_WORDS: Final = {"true": True, "yes": True, "on": True, "false": False, "no": False, "off": False}


def boolean(value: object) -> bool:
    """true or false; from `${...}` also the other YAML 1.1 words (yes/no, on/off), in any case.

    Raises:
        Bad: anything else, with a hint when it is such a word in quotes.
    """
    if isinstance(value, Expanded) and value.lower() in _BOOLEAN_WORDS:
        return _BOOLEAN_WORDS[value.lower()]
    if not isinstance(value, bool):
        # A word in quotes is a string, as a quoted "7" is where an integer goes: saying so (`got str
        # 'false'`) keeps the message from reading "expected true or false, got 'false'".
        hint = ""
        if isinstance(value, str) and not isinstance(value, Expanded) and value.lower() in _BOOLEAN_WORDS:
            hint = f" (a quoted string: write {value.lower()} without quotes)"
        raise Bad(f"expected true or false, got {got(value)}{hint}")
    return value


# The longest any duration may be, a hundred years: more than any timeout, interval or token lifetime needs
# (browsers keep a cookie 400 days at most, native clients as long as they like), and far inside what a
# date and a timer can hold.  Unbounded, `max_age: 99999999999999999999h` sealed tokens whose expiry no date
# can show (/lookup failed on it).
MAX_DURATION_DAYS = 36_500


def duration(*, allow_zero: bool = False) -> Parser:
    """A parser of a duration (`500ms`, `2s`, `5m`, `1h`, `1d`, or a number of seconds) into float seconds.

    Args:
        allow_zero: whether 0 is taken (`shutdown_delay: 0`); otherwise the least is above 0.

    Returns:
        The parser; it raises `Bad` for anything else, 0 unless allowed, or more than
        `MAX_DURATION_DAYS`.
    """

    def parse(value: object) -> float:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise Bad(f"expected a duration like 500ms, 2s, 5m or 1h, got {kind_of(value)}")
        try:
            seconds = parse_duration(value)
        except BadDuration as exc:
            raise Bad(f"{exc.problem}, got {show(value)}") from None
        if seconds == 0 and not allow_zero:
            raise Bad(f"expected a duration greater than 0, got {show(value)}")
        if seconds > MAX_DURATION_DAYS * 86_400:
            raise Bad(f"expected a duration of at most {MAX_DURATION_DAYS} days (100 years), got {show(value)}")
        return seconds

    return parse


def choice(options: Mapping[str, T]) -> Callable[[object], T]:
    """Case-insensitive choice; `options` maps each accepted spelling to its value.

    Returns:
        The parser; it raises `Bad` naming every option for anything else.
    """
    by_lower = {name.lower(): value for name, value in options.items()}

    def parse(value: object) -> T:
        if isinstance(value, str) and value.lower() in by_lower:
            return by_lower[value.lower()]
        raise Bad(f"expected one of {', '.join(options)}, got {show(value)}")

    return parse


def enum_of(enum: type[E]) -> Callable[[object], E]:
    """`choice` over the enum's values, each giving its member."""
    return choice({str(member.value): member for member in enum})


def secure_mode(value: object) -> SecureMode:
    """`affinity.secure`: auto, always or never; a YAML boolean is always or never.

    Raises:
        Bad: anything else.
    """
    # YAML reads `secure: true` as a bool; it can only mean "always" (and false "never").
    if isinstance(value, bool):
        return SecureMode.ALWAYS if value else SecureMode.NEVER
    try:
        return enum_of(SecureMode)(value)
    except Bad:
        raise Bad(f"expected one of auto, always (or true), never (or false), got {show(value)}") from None


def prefixed_path(value: object) -> str:
    """A string starting with `/`.

    Raises:
        Bad: not such a string.
    """
    text = string(value)
    if not text.startswith("/"):
        raise Bad(f"expected a path starting with '/', got {show(value)}")
    return text


# What lb.http.head accepts in a request-target (RFC 9112 §3.2: visible ASCII), less `#`: a fragment
# is not sent on the wire.
_REQUEST_PATH_RE = re.compile(r"/[\x21-\x22\x24-\x7e]*")


# A route's prefix is matched against a request's path as sent (visible ASCII, no query): anything else
# in it (a newline, a space, `é` unencoded, a `?`) would make a route no request can reach.
_ROUTE_PREFIX_RE = re.compile(r"/[\x21-\x22\x24-\x3e\x40-\x7e]*")


def route_prefix(value: object) -> str:
    """A route's `path_prefix`: a path a request's can begin with."""
    return _visible_path(value, _ROUTE_PREFIX_RE, "a path of visible ASCII without '?' or '#'",
                         "a request's path is matched as sent: ")


def request_path(value: object) -> str:
    """A path the health check sends as is: what a strict backend (and our own parser) reads."""
    return _visible_path(value, _REQUEST_PATH_RE, "a request path of visible ASCII without '#'")


def _visible_path(value: object, pattern: re.Pattern[str], what: str, why: str = "") -> str:
    text = prefixed_path(value)
    if not pattern.fullmatch(text):
        raise Bad(f"expected {what} ({why}percent-encode spaces and anything else), got {show(value)}")
    return text


# RFC 6265 §4.1.1: cookie-name is an RFC 2616 token (no CTLs, spaces or separators).
_COOKIE_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


# Ids, pool names and cookie/header names travel in every token, Set-Cookie, URL and metric label:
# the affinity token carries a backend id in at most 255 bytes, and one cookie must stay far below
# the 4096 bytes browsers keep (RFC 6265 §6.1).  64 characters leaves room for all of them.
MAX_NAME_CHARS = 64


def matching(pattern: re.Pattern[str], expected: str, *, max_chars: int = MAX_NAME_CHARS) -> Callable[[object], str]:
    """A parser of a string that `pattern` matches whole.

    Args:
        pattern: what the whole string must match.
        expected: what the problem says was expected ("a cookie name (letters, ...)").
        max_chars: the longest string taken, checked before the pattern.

    Returns:
        The parser; it raises `Bad` for a string too long or not matching (and as `string` does).
    """

    def parse(value: object) -> str:
        text = string(value)
        if len(text) > max_chars:
            raise Bad(f"expected at most {max_chars} characters, got {len(text)}")
        if not pattern.fullmatch(text):
            raise Bad(f"expected {expected}, got {show(value)}")
        return text

    return parse


cookie_name = matching(_COOKIE_NAME_RE, "a cookie name (letters, digits and !#$%&'*+-.^_`|~)")
# Header names are RFC 9110 tokens too.
header_name = matching(_COOKIE_NAME_RE, "a header name (letters, digits and !#$%&'*+-.^_`|~)")
# Backend ids and pool names appear in URLs (/pools/{pool}/backends/{id}/drain) and metric labels.
_ID_RE = re.compile(r"[A-Za-z0-9._:-]+")
_id_chars = matching(_ID_RE, "letters, digits and . _ : - only")
# The affinity token seals backend id and pool name (at most 255 bytes each); keeping both far
# below that also keeps a cookie with one pin per pool well under browsers' 4096-byte limit.
MAX_ID_CHARS = 64


def identifier(value: object) -> str:
    """A backend id or pool name: at most `MAX_ID_CHARS` of letters, digits and `._:-`, not `.` or `..`.

    Raises:
        Bad: anything else.
    """
    text = _id_chars(value)
    if len(text) > MAX_ID_CHARS:
        raise Bad(f"expected at most {MAX_ID_CHARS} characters, got {len(text)}")
    if text in (".", ".."):
        # A URL path segment of its own: a browser (the dashboard's buttons) and curl resolve it away, so
        # /pools/gateways/backends/../disable names the pool, not the backend.
        raise Bad(f"expected an id other than {text!r}, which a URL path reads as a directory")
    return text


def hash_key(value: object) -> HashKey:
    """`header:X-User-Id`, `query:uid` or `cookie:NAME`.

    Raises:
        Bad: another source, or a NAME that is not a token of at most 256 characters.
    """
    text = string(value)
    source, colon, name = text.partition(":")
    expected = "header:NAME, query:NAME or cookie:NAME"
    source = source.lower()  # any case, as every other choice in the file (`Header:X-User-Id`, `balance: SOURCE`)
    if not colon or source not in HashKeySource.__members__.values():
        raise Bad(f"expected {expected}, got {show(value)}")
    if not _COOKIE_NAME_RE.fullmatch(name) or len(name) > 256:
        raise Bad(f"expected {expected} with NAME a token (letters, digits and !#$%&'*+-.^_`|~), got {show(value)}")
    return HashKey(source=HashKeySource(source), name=name)


HOSTNAME_RE = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9_-]{1,63}(?<!-))*\.?")


def address(*, min_port: int, wildcard: bool = False) -> Callable[[object], tuple[str, int]]:
    """host:port with the host a name, an IPv4 literal, or an IPv6 literal in brackets.

    `wildcard`: a port alone, `:8080` or `*:8080` (HAProxy's `bind :8080`, Traefik's `address: ":8080"`),
    means every IPv4 address, as HAProxy reads it: `0.0.0.0:8080`.

    Args:
        min_port: the lowest port taken (0 for a listener: any free one).
        wildcard: whether a port alone means every IPv4 address.

    Returns:
        The parser, giving (host, port); it raises `Bad` for anything else.
    """

    def parse(value: object) -> tuple[str, int]:
        if not isinstance(value, str):
            raise Bad(f"expected host:port, got {kind_of(value)}")
        text = value.strip()
        host, port = _split_host_port(text)
        if wildcard and text.rpartition(":")[0] in ("", "*"):
            host = "0.0.0.0"
        if host is None or port is None:
            hint = " (write IPv6 addresses as [::1]:8080)" if value.count(":") > 1 else ""
            raise Bad(f"expected host:port{hint}, got {show(value)}")
        if not min_port <= port <= 65535:
            raise Bad(f"expected a port from {min_port} to 65535, got {port}")
        return host, port

    return parse


def _split_host_port(text: str) -> tuple[str | None, int | None]:
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        valid_host = bool(sep) and is_ip(host, version=6)
    else:
        host, sep, port_text = text.rpartition(":")
        valid_host = bool(sep) and _is_host(host)
    # int() refuses over 4,300 digits; ten is a number the range check below can name.
    port = int(port_text) if port_text.isascii() and port_text.isdigit() and len(port_text) <= 10 else None
    return (host if valid_host else None), port


def bind_address(value: object) -> tuple[str, int]:
    """A listener's or the admin API's host:port (port 0: any free one; `:8080` every IPv4 address).

    Raises:
        Bad: not host:port, or an IPv4-mapped IPv6 address (it never binds here).
    """
    host, port = _any_port(value)
    with contextlib.suppress(ValueError):
        mapped = ipaddress.IPv6Address(host).ipv4_mapped
        if mapped is not None:
            # Our IPv6 sockets are IPv6-only (an IPv4 listener may share the port), so this never binds.
            write = "its IPv4 address" if isinstance(value, Expanded) else f"{mapped}:{port}"  # never a ${...}'s
            raise Bad(f"an IPv4-mapped address does not bind here: write {write}")
    return host, port


_any_port = address(min_port=0, wildcard=True)
_gateway_port = address(min_port=1)


def backend_address(value: object) -> tuple[str, int]:
    """A backend's host:port: a name, or an address some gateway can listen at (`lb.config.backend_address`).

    Raises:
        Bad: not host:port with a port from 1, an IPv4-mapped address, or one no gateway listens at.
    """
    host, port = _gateway_port(value)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host, port
    mapped = as_ipv4(ip)
    if mapped != ip:
        write = "its IPv4 address" if isinstance(value, Expanded) else host_port(str(mapped), port)
        raise Bad(f"an IPv4-mapped address is an IPv4 one: write {write}")
    why = not_a_host(ip)
    if why is not None:
        raise Bad(why)
    return host, port


def is_ip(text: str, *, version: int) -> bool:
    """Whether `text` is an IP address literal of that version (4 or 6)."""
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _is_host(text: str) -> bool:
    if re.fullmatch(r"[0-9.]+", text):  # all digits and dots: must be an IPv4 literal
        return is_ip(text, version=4)
    return len(text) <= 253 and HOSTNAME_RE.fullmatch(text) is not None


def is_loopback(host: str) -> bool:
    """Whether `host` is `localhost` or a loopback address literal (no name is resolved)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

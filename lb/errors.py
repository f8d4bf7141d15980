"""The balancer's error tree; each error knows the answer it stands for.

    LbError
    ├── ConfigError(ValueError)      bad configuration: every Problem, keyed by path
    ├── InvalidToken                 affinity token unusable (treated as absent, never shown)
    ├── RequestRejected              answered by the balancer itself, status per class
    │   ├── BadRequest               400 malformed request head
    │   │   ├── BadHandshake         400 malformed WebSocket upgrade
    │   │   ├── BadFraming           400 body length ambiguous (Content-Length / Transfer-Encoding)
    │   │   └── BadHost              400 Host missing, repeated, malformed or disagreeing with the target
    │   ├── NoRoute                  404
    │   ├── UnsupportedVersion       426 with Sec-WebSocket-Version: 13
    │   ├── RetryLater               with Retry-After
    │   │   ├── TooManyRequests      429
    │   │   └── NoHealthyBackend     503
    │   ├── HeadersTooLarge          431
    │   ├── UnsupportedTransferCoding 501 a transfer coding other than chunked
    │   ├── UnsupportedMethod        501 CONNECT (a tunnel to a host of the client's choice)
    │   ├── HttpVersionNotSupported  505 a major version of HTTP other than 1
    │   ├── RequestTimeout           408 the client did not send its request body in time
    │   └── BadGateway               502 no backend could be reached, or none answered in time and well-formed
    └── BadProxyHeader(ValueError)   no valid PROXY protocol header: closed without an answer

A backend that cannot be reached, or answers badly, is no exception here: the connection core
(`lb.proxy.connection`) hears it as an event, tries another backend or answers `BadGateway`.
"""

from __future__ import annotations

import errno
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# Local resource errors (out of descriptors, buffers or memory): the balancer's own trouble, never
# a backend's.  Neither passive health (a connect that failed so) nor a health check may blame one.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class LbError(Exception):
    """Base class for every error the balancer raises on purpose."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One configuration problem: where it is and what was expected."""

    path: str
    message: str

    def __str__(self) -> str:
        # One line, whatever the file holds: a key is the file's text, and a key with a newline in
        # it must not print as a second, made-up problem (nor move the terminal's cursor).
        text = f"{self.path}: {self.message}" if self.path else self.message
        return text if text.isprintable() else "".join([c if c.isprintable() else repr(c)[1:-1] for c in text])


class ConfigError(LbError, ValueError):
    """The configuration is invalid; carries every problem found in one pass."""

    def __init__(self, problems: Sequence[Problem]) -> None:
        super().__init__(f"{len(problems)} problem(s) in configuration")
        self.problems = tuple(problems)

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


class InvalidToken(LbError):
    """An affinity token that cannot be used; `reason` is a metric label."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RequestRejected(LbError):
    """A request we answer ourselves, without (further) reaching a backend."""

    status: int = 400
    reason_phrase: str = "Bad Request"

    def __init__(self, reason: str, *, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(reason)
        self.headers = dict(headers or {})


class BadRequest(RequestRejected):
    status = 400
    reason_phrase = "Bad Request"


class BadHandshake(BadRequest):
    """A WebSocket upgrade that breaks RFC 6455 §4.2.1."""


class BadFraming(BadRequest):
    """The body's length cannot be determined without guessing (RFC 9112 §6.1, §6.3): a smuggling vector."""


class BadHost(BadRequest):
    """Host missing, repeated, malformed, or not the absolute-form target's authority (RFC 9112 §3.2)."""


class UnsupportedTransferCoding(RequestRejected):
    """A transfer coding we do not implement before the final chunked (RFC 9112 §6.1: 501)."""

    status = 501
    reason_phrase = "Not Implemented"


class UnsupportedMethod(RequestRejected):
    """CONNECT: a forward proxy's tunnel to a host the client names (RFC 9110 §9.3.6), which a reverse
    proxy does not offer; the bytes after its head are that tunnel's, so the connection ends (501)."""

    status = 501
    reason_phrase = "Not Implemented"


class HttpVersionNotSupported(RequestRejected):
    """A request in a major version of HTTP other than 1 on an HTTP/1 connection (RFC 9110 §15.6.6)."""

    status = 505
    reason_phrase = "HTTP Version Not Supported"


class NoRoute(RequestRejected):
    status = 404
    reason_phrase = "Not Found"


class UnsupportedVersion(RequestRejected):
    status = 426
    reason_phrase = "Upgrade Required"

    def __init__(self, reason: str) -> None:
        # RFC 6455 §4.2.2: tell the client which version we speak; RFC 9110 §15.5.22: a 426 MUST
        # name the protocol to upgrade to (and §7.8: Upgrade is listed in Connection, see render_refusal).
        super().__init__(reason, headers={"Sec-WebSocket-Version": "13", "Upgrade": "websocket"})


class RetryLater(RequestRejected):
    """A refusal that tells the client when to try again."""

    def __init__(self, reason: str, *, retry_after: int = 1) -> None:
        super().__init__(reason, headers={"Retry-After": str(retry_after)})


class TooManyRequests(RetryLater):
    status = 429
    reason_phrase = "Too Many Requests"


class HeadersTooLarge(RequestRejected):
    status = 431
    reason_phrase = "Request Header Fields Too Large"


class BadGateway(RequestRejected):
    status = 502
    reason_phrase = "Bad Gateway"


class RequestTimeout(RequestRejected):
    """The client stopped sending its request body: its own time ran out, not the backend's."""

    status = 408
    reason_phrase = "Request Timeout"


class NoHealthyBackend(RetryLater):
    status = 503
    reason_phrase = "Service Unavailable"


class BadProxyHeader(LbError, ValueError):
    """A connection on a `proxy_protocol` listener that does not start with a valid PROXY header.

    Not a RequestRejected: the spec (HAProxy doc/proxy-protocol.txt §2.1) says to abort the
    connection, and the peer is an L4 balancer, not a client that could read an answer.
    """

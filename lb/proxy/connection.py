"""One client connection as a sans-I/O state machine: events in, actions out.  [pure]

In the manner of h11's `Connection` and websockets' `ServerProtocol`, nothing
here touches a socket, a clock or the event loop.  The shell (`lb.proxy.server`)
feeds it events with the current time and carries out the actions it returns.  `now` is the
monotonic clock (a step of the wall clock moves no deadline); the wall-clock instant a token
is issued or checked at is `now + ctx.wall_offset`, taken once per request:

    events:  receive_client(data, now)   client_eof(now)      client_lost(status, reason)
             backend_connected(now)      backend_failed(cause, now)
             receive_backend(data, now)  backend_eof(now)      deadline(now)
             shutdown(now)               client_blocked(blocked, now)  backend_blocked(blocked, now)
             stop_bound_passed(now)
    actions: SendClient  SendBackend  OpenBackend  CloseBackend  CloseClient
             PauseClient  ResumeClient  SetTimer  JoinTunnel

States, one request at a time on a keep-alive client connection:

    HEAD ──head──▶ CONNECTING ──connected──▶ WAITING ──final answer──▶ RELAY ──body done──▶ HEAD
      │                 │  ▲                    │  │                                          (or close)
      │                 └──┴─ failed: retry ◀───┘  └── 101 to an upgrade ──▶ TUNNEL (Tunnel.join)
      └── rejected: our own answer, then CLOSED

Why it is shaped this way (each is a smuggling or memory bug of the await chain it replaces):
- Only bytes that belong to the current request's body (framed by Content-Length
  or chunked) go to the backend.  Anything after them is the next request and
  stays in the buffer until it is parsed and routed on its own.  Behind an
  Upgrade nothing is sent before the backend switches: a refused upgrade is an
  ordinary answer, and what follows it is the next request.
- The client buffer is bounded: past `HELD_LIMIT` bytes reading pauses, and it
  resumes only when the buffer has room again.  Backend answer heads are bounded
  by `MAX_RESPONSE_HEAD`, interim (1xx) answers by `MAX_INTERIM` per request.
- One deadline per phase: `timeouts.handshake` for the head (and for each
  quiet spell of an upload: the client's time), `timeouts.backend_connect` for
  connect plus an upgrade's final answer, and for connect alone before a plain
  request, whose final answer then has `timeouts.response` (interim answers
  extend neither); each quiet spell of an answer's body has `timeouts.answer_body`.  Whose time a
  wait is follows backpressure: an upload the backend stopped reading is the
  backend's (`backend_blocked`), an answer not read because the client is full
  is the client's (`client_blocked`).
- A backend that refuses, resets, stays silent or answers garbage counts towards
  taking it down (passive health: `fall` such handshakes in a row) and the
  request goes to another backend when that is safe (after at most 1 + the
  pool's `retries` that did not answer in time or hung up); otherwise the client gets 502
  (also after a timeout), never a 500.
  Not a plain request that was sent whole and answered late: that is a slow
  endpoint, not a broken backend (`_retry_or_fail`).  Not, either, a backend
  that hung up on a request without a word, or answered it with an HTTP head
  that cannot pass, unless another backend then answered that request: a
  client can shape a request gateways close on, or one a gateway writes into
  a header of its answer.
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable
from typing import Final

from lb.access_log import RateLimitSummary, log_answered, log_request
from lb.affinity.carriers import (
    MAX_SEALS,
    TokenLookup,
    balance_key,
    find_token,
    fitting_value,
    join_pins,
    our_set_cookie,
    plan_forward,
    refreshed_copy_deletion,
    rewrite_response_cookies,
)
from lb.affinity.codec import NONCE_BYTES, SESSION_BYTES, Claim, TokenCodec
from lb.affinity.decision import Decision, decide
from lb.config.model import AffinityMode, SecureMode
from lb.errors import (
    BadGateway,
    BadRequest,
    HeadersTooLarge,
    NoHealthyBackend,
    NoRoute,
    RequestRejected,
    RequestTimeout,
    TooManyRequests,
)
from lb.http.client_address import IPAddress, TrustedProxies, chain_through, client_behind, peer_address
from lb.http.cookies import sets_cookie
from lb.http.forwarding import render_client_response, render_forwarded_request, render_interim, render_refusal
from lb.http.framing import BodyFramer, request_framer, response_framer
from lb.http.head import (
    HEAD_END,
    REQUEST_START_BYTES,
    RequestHead,
    ResponseHead,
    answer_head_length,
    check_request_line,
    could_start_request,
    find_head_end,
    has_bare_lf,
    is_whole_head,
    parse_request_head,
    parse_response_head,
    render_head,
    take_answer_bytes,
)
from lb.http.routing import match_route
from lb.log import Throttle, token_digest
from lb.proxy.actions import (
    Action,
    CloseBackend,
    CloseClient,
    JoinTunnel,
    OpenBackend,
    PauseClient,
    ResumeClient,
    SendBackend,
    SendClient,
    SetTimer,
)
from lb.state.context import ProxyContext
from lb.state.observations import ErrorKind
from lb.state.pool import BackendState, PoolState
from lb.state.tally import add_one
from lb.ws.upgrade import (
    PLAIN_SWITCH,
    PLAIN_UPGRADE,
    check_upgrade,
    is_websocket_upgrade,
    negotiation_fault,
    switch_fault,
)

log: Final = logging.getLogger("lb.proxy")  # the data plane's logger, for both of its modules
# A backend that sets our cookie's name does it on every answer: one line a minute, with a count.
_backend_set_our_cookie: Final = Throttle(60.0)
# Rewrite mode's backend values passed unsealed: a backend may set one on every answer (a cookie-store
# session), so a line a minute says so, with how many answers since; the counter has each value.
_backend_set_unsealed: Final = Throttle(60.0)

# Client bytes held while they may not go anywhere yet (behind a head whose answer
# is awaited, or the next pipelined request): past this, reading pauses.
HELD_LIMIT: Final = 65536
MAX_RESPONSE_HEAD: Final = 65536
SWITCHING_PROTOCOLS: Final = 101
MAX_INTERIM: Final = 8  # 1xx answers per request: a backend that sends more is broken
# Seconds a stop waits for the head of a connection that has sent nothing yet (it connected as the stop
# began): a head on its way comes within a round trip; then it is closed.
STOP_HEAD_WAIT: Final = 0.5
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_TRUST_NOBODY: Final = TrustedProxies()

# The states, as Final ints: compiled, each test of `self.state` is then a compare with a
# literal, not a lookup in the module's globals.
HEAD: Final = 0
CONNECTING: Final = 1
WAITING: Final = 2
RELAY: Final = 3
TUNNEL: Final = 4
CLOSED: Final = 5


_CLOSE_BACKEND: Final = CloseBackend()
_CLOSE_CLIENT: Final = CloseClient()
_ABORT_CLIENT: Final = CloseClient(abort=True)
_PAUSE: Final = PauseClient()
_RESUME: Final = ResumeClient()
_NO_TIMER: Final = SetTimer(None)


# -- request ids -----------------------------------------------------------------

_ID_PREFIX: Final = os.urandom(4).hex()


class _Counter:
    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0


_ids: Final = _Counter()


def new_request_id() -> str:
    """Unique per process and cheap: a random per-process prefix (8 hex digits) and a counter.

    The counter is decimal (still hex digits only): compiled, `str()` of a native int is one
    primitive, where `hex(next(itertools.count))[2:]` looked up two builtins, called them and
    sliced, about 2,000 instructions a handshake."""
    ids = _ids
    ids.count += 1
    return _ID_PREFIX + str(ids.count)


_LEFT_STATES: Final = frozenset({BackendState.DOWN, BackendState.DISABLED})


def _left(pool: PoolState, claim: Claim) -> bool:
    """Whether the backend `claim` names has left its clients: SPEC's down or disabled, migrating them
    (a drain closing its tunnels), or gone from the pool."""
    backend = pool.get(claim.backend_id)
    return backend is None or backend.state in _LEFT_STATES or backend.migrating


@functools.lru_cache(maxsize=8)
def _field_line(name: str) -> bytes:
    """How a field `name` starts a line of a lowered answer head: one needle per configuration."""
    return b"\n" + name.lower().encode("ascii") + b":"


_BODY_INCOMPLETE: Final = "request body incomplete"  # the client half-closed before the end of its body


class _Failure(Exception):
    """A backend attempt that failed: why, and what kind of failure (lb_backend_errors_total{kind})."""

    def __init__(
        self, cause: str, kind: ErrorKind = "bad_answer", *, this_client_only: bool = False,
        request_shaped: bool = False,
    ) -> None:
        super().__init__(cause)
        self.cause = cause
        self.kind = kind
        # Wrong for this client only (a 101 naming what it did not offer): its 502, no retry, no verdict.
        self.this_client_only = this_client_only
        # An HTTP answer head that may be the request's doing (a gateway writes what the client sent into a
        # header): on trial, blamed only once another backend answers the request (`_retry_or_fail`).  Not
        # an answer that is not HTTP at all (an SSH banner, an HTTP/2 preface): no request makes a gateway
        # answer so, and it is blamed at once, as every failure not said to be so is.
        self.request_shaped = request_shaped

    @property
    def timeout(self) -> bool:
        return self.kind == "timeout"


def _attempt_outcome(failure: _Failure, late: bool) -> str:
    """lb_handshakes_total{outcome} of a failed attempt: an answer that came and was not HTTP (or not one
    the client could take) is no failure to connect, and an operator reading `connect_failed` would look
    at the network rather than at the gateway's code."""
    if late:
        return "answer_late"
    return "bad_answer" if failure.kind == "bad_answer" else "connect_failed"


def _token_time(wall: float) -> float:
    """A token's issue time for the wall clock `wall`: floored to the millisecond, the token's precision,
    so never dated after it was issued, and it opens until exactly max_age after, to the millisecond
    (whole seconds, rounded up, let it open up to 1 s past max_age; rounded down, it died up to 1 s
    early, while the browser still sent it)."""
    return math.floor(wall * 1000) / 1000


class _Sealer:
    """One decision's tokens: its backend and pool, issued at one wall-clock time, one session for all of
    them, a fresh nonce for each.

    A class rather than a closure: compiled, a closure was an environment object and a function object
    made for every handshake, and each call went through the generic call with its arguments parsed
    (`_plain_client_head`: 11,900 instructions a handshake issuing a cookie, 11,370 with this); `seal`
    here is a direct call."""

    __slots__ = ("_backend_id", "_codec", "_issued_at", "_nonce", "_pool", "_random", "_session")

    def __init__(
        self, codec: TokenCodec, backend_id: str, pool: str, wall: float, session: bytes,
        random: Callable[[int], bytes], nonce: bytes | None,
    ) -> None:
        self._codec = codec
        self._backend_id = backend_id
        self._pool = pool
        self._issued_at = _token_time(wall)
        self._session = session
        self._random = random
        self._nonce = nonce  # drawn with the session (a new client's first token), used once

    def seal(self, app_value: str | None) -> str:
        nonce = self._nonce
        if nonce is None:
            nonce = self._random(NONCE_BYTES)
        else:
            self._nonce = None
        return self._codec.seal_fields(self._backend_id, self._issued_at, self._session, app_value, self._pool, nonce)


# -- the state machine ---------------------------------------------------------------


class Connection:
    """The data plane of one client connection, from accept to tunnel or close."""

    __slots__ = (
        "_answer_buf",
        "_answer_scan",
        "_backend_blocked_at",
        "_balance_key",
        "_began",
        "_body_left",
        "_buf",
        "_claim",
        "_client_blocked_at",
        "_client_ip",
        "_client_port",
        "_codec",
        "_config",
        "_continue_wait",
        "_ctx",
        "_decision",
        "_interim",
        "_interim_relayed",
        "_keep_alive",
        "_last_backend",
        "_last_client",
        "_line_checked",
        "_lookup",
        "_on_trial",
        "_opened_at",
        "_paused",
        "_peer",
        "_peer_port",
        "_pool",
        "_pools",
        "_protected",
        "_proxy",
        "_random",
        "_request",
        "_request_framer",
        "_response_framer",
        "_retriable",
        "_rid",
        "_routes",
        "_scan",
        "_sent",
        "_started",
        "_tls",
        "_tried",
        "_trusted",
        "_waited",
        "_wall",
        "_websocket",
        "client_eof_seen",
        "state",
    )

    def __init__(
        self,
        ctx: ProxyContext,
        *,
        client_ip: str,
        tls: bool,
        client_port: int = 0,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self._ctx = ctx
        self._peer = client_ip  # the socket's peer, or the PROXY header's source address
        self._trusted = _TRUST_NOBODY
        self._proxy: IPAddress | None = None  # the peer, when it is a trusted proxy
        self._snapshot()
        self._client_ip = self._peer  # per request: the peer, or a trusted X-Forwarded-For hop
        self._peer_port = client_port
        self._client_port = client_port  # 0 when the address came from X-Forwarded-For (no port there)
        self._tls = tls
        self._random = random
        self.state = HEAD
        self.client_eof_seen = False
        self._buf = bytearray()  # client bytes not yet consumed
        self._scan = 0  # where the search for the end of the head resumes
        self._line_checked = False  # whether this head's request line is whole and was checked
        self._paused = False
        # Since when the shell has stopped reading the backend because the client is not reading
        # (its write buffer is full), and since when the backend is not reading what we send it.
        self._client_blocked_at: float | None = None
        self._backend_blocked_at: float | None = None
        self._started = False  # a request of this connection was parsed (keep-alive idle otherwise)
        self._reset_request()

    def _reset_request(self) -> None:
        self._request: RequestHead | None = None
        self._rid = "-"
        self._pool: PoolState | None = None
        self._lookup: TokenLookup | None = None
        self._claim: Claim | None = None
        self._decision: Decision | None = None  # set while a backend connection is counted
        self._tried: list[str] = []
        self._on_trial: list[tuple[str, str]] | None = None  # (backend id, cause): blamed if another answers
        self._waited = 0  # backends of this request that did not answer in time (`retries`)
        self._balance_key: str | None = None  # balance: source|hash, for the first choice and retries
        self._opened_at = 0.0
        self._websocket = False
        self._retriable = False
        self._keep_alive = False
        self._sent = False  # some of the request reached the current backend
        self._body_left = False  # request body bytes still to come from the client
        self._continue_wait = False  # the client waits for the backend's 100 Continue before its body
        self._request_framer: BodyFramer | None = None
        self._response_framer: BodyFramer | None = None
        self._answer_buf = bytearray()
        self._answer_scan = 0  # bytes of _answer_buf already searched for the end of a head
        self._interim = 0  # 1xx heads the current backend sent (MAX_INTERIM)
        # Whether one of them went out to the client: a 1xx read with a failure behind it is dropped with
        # the rest of that read's actions, and an HTTP/1.0 client is sent none.
        self._interim_relayed = False
        self._last_client = 0.0
        self._last_backend = 0.0  # the last bytes of an answer's body relayed: the backend's quiet spell counts from it
        self._began = 0.0  # when its head was complete (the events' monotonic clock)
        self._wall = 0.0  # the same instant in wall-clock seconds: tokens and backend states speak it

    @property
    def request_id(self) -> str:
        return self._rid

    @property
    def client_ip(self) -> str:
        return self._client_ip

    @property
    def client_port(self) -> int:
        return self._client_port

    @property
    def tls(self) -> bool:
        return self._tls

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    # -- events --------------------------------------------------------------------

    def start(self, now: float, admitted: bool = True) -> list[Action]:
        """The connection was accepted and counted at `now` (the shell's ctx.count_in).

        `admitted`: within limits.max_connections when it was accepted; else a 503 now.
        """
        if not admitted:
            return self._refuse(NoHealthyBackend("too many connections"), now, self._ctx.over_limit_log)
        return [SetTimer(now + self._config.timeouts.handshake)]

    def receive_client(self, data: bytes, now: float) -> list[Action]:
        state = self.state
        if state == HEAD:
            return self._read_head(now, data)
        if state in (CLOSED, TUNNEL):
            return []
        if self._continue_wait:
            # The body comes before any 100 Continue (RFC 9110 §10.1.1 allows both): its quiet spells
            # are the client's time again, where the timer still held the backend's longer wait.
            # Ahead of the writes, as in backend_connected.
            self._continue_wait = False
            self._last_client = now
            return [SetTimer(self._upload_deadline()), *self.receive_client(data, now)]
        if self._body_left and self._sent and not self._buf:
            # Streaming the request body: straight through, up to the end of the body.
            self._last_client = now
            return self._send_body(data, now)
        self._buf += data
        if not self._paused and len(self._buf) > HELD_LIMIT:
            self._paused = True
            return [_PAUSE]
        return []

    def client_eof(self, now: float) -> list[Action]:
        """The client will send nothing more.  An answer still on its way is delivered, and so are
        the answers to requests it pipelined behind it (as HAProxy and nginx do for
        `printf 'GET…GET…' | nc -N`); then we close (_finish).

        While connecting, the body may be complete in what is held (it is framed only once it goes
        out): backend_connected decides then.
        """
        self.client_eof_seen = True
        state = self.state
        if state in (CONNECTING, WAITING, RELAY) and not self._websocket:
            if not self._body_left or state == CONNECTING:
                return []
            if state == WAITING:
                return self._release_backend() + self._refuse(BadRequest(_BODY_INCOMPLETE), now)
        self._log_abandoned(499, "client_closed_request")
        return self._close(abort=False)

    def client_lost(self, status: int = 499, reason: str = "client_closed_request") -> list[Action]:
        """The client connection is gone: release what this request holds.

        A request still on its way to its answer is logged with `status` and `reason`: the client
        left (499, as nginx), unless the shell drops the connection itself (a bug: 500; shutdown: 503).
        """
        if self.state in (CLOSED, TUNNEL):
            return []
        self._log_abandoned(status, reason)
        actions = self._release_backend()
        self.state = CLOSED
        return actions

    def client_blocked(self, blocked: bool, now: float) -> list[Action]:
        """The client's write buffer passed its high-water mark (`blocked`), or drained below it.

        While it is full, the backend is not read: a wait for its answer is then the client's
        time, not the backend's (and one that reads nothing for timeouts.handshake is closed).
        Blocking is reported from inside a write, so it changes no state but the time.
        """
        if blocked:
            self._client_blocked_at = self._client_blocked_at or now
            return []
        self._client_blocked_at = None
        if self.state == WAITING and not self._body_left:
            return [SetTimer(now + self._answer_wait())]  # the backend's time again, whole
        if self.state == RELAY and not self._body_left:
            return [self._relay_timer(now)]  # its quiet spell starts when it is read again
        return []

    def backend_blocked(self, blocked: bool, now: float) -> list[Action]:
        """The backend's write buffer passed its high-water mark (`blocked`), or drained below it.

        While it is full, the client is not read: an upload's quiet spell is then the backend's
        time, and it fails after timeouts.backend_connect of that.  Reported from inside the
        write of the body, after which nothing else in that pass sets a timer.
        """
        if blocked:
            self._backend_blocked_at = self._backend_blocked_at or now
            if self.state in (WAITING, RELAY) and self._body_left:
                return [SetTimer(self._upload_deadline())]
            return []
        self._backend_blocked_at = None
        self._last_client = now  # the client's quiet spell starts when it can send again
        return []

    def _upload_deadline(self) -> float:
        """When an upload in progress times out: the client's quiet spell, or, while the backend's
        buffer is full (the client is not read then, so its quiet time does not run), the backend's;
        the backend's too while the client waits for its 100 Continue (from the head sent)."""
        timeouts = self._config.timeouts
        blocked_at = self._backend_blocked_at
        if blocked_at is not None:
            return blocked_at + timeouts.backend_connect
        if self._continue_wait:
            return self._last_client + self._answer_wait()
        return self._last_client + timeouts.handshake

    def backend_connected(self, now: float) -> list[Action]:
        if self.state != CONNECTING:
            return []
        assert self._request is not None and self._decision is not None
        self.state = WAITING
        self._sent = True
        actions: list[Action] = [SendBackend(self._forwarded_head())]
        if self._body_left:
            self._last_client = now
            # RFC 9110 §10.1.1: a client that expects 100-continue may send no body before an answer; in an
            # HTTP/1.0 request the expectation is ignored (and no 1xx would reach that client anyway).
            request = self._request
            self._continue_wait = (
                not self._buf and request.version != "HTTP/1.0" and request.head.has_token("expect", "100-continue")
            )
            if self._buf:
                data = bytes(self._buf)
                self._buf.clear()
                actions += self._send_body(data, now)
                actions += self._maybe_resume()
            if self._body_left and self.client_eof_seen and self.state == WAITING:
                # The client half-closed before the end of its body: the rest will never come, and
                # the backend gets none of it (a truncated upload it might act on): `actions` go unsent.
                return self._release_backend() + self._refuse(BadRequest(_BODY_INCOMPLETE), now)
            if self._body_left and self.state == WAITING:
                # Uploading: the client's time, counted from its last byte.  Ahead of the writes:
                # a full backend buffer they cause sets an earlier deadline (backend_blocked).
                actions.insert(0, SetTimer(self._upload_deadline()))
        elif not self._websocket:
            # A plain request is out whole: its answer has timeouts.response from here.  (An
            # upgrade's answer is part of backend_connect, counted from the connect: SPEC.)
            actions.insert(0, SetTimer(now + self._answer_wait()))
        return actions

    def _answer_wait(self) -> float:
        """How long the backend has for its final answer once the request is out whole."""
        timeouts = self._config.timeouts
        return timeouts.backend_connect if self._websocket else timeouts.plain_answer

    def backend_failed(self, cause: str, now: float, kind: ErrorKind = "reset") -> list[Action]:
        """The connection to the backend failed (`kind`: refused, reset...) or was lost."""
        if self.state in (CONNECTING, WAITING):
            return self._retry_or_fail(_Failure(cause, kind), now)
        if self.state == RELAY:
            return self._backend_gone(now, lost=True)
        return []

    def backend_eof(self, now: float) -> list[Action]:
        if self.state == WAITING:
            return self._retry_or_fail(_Failure("closed the connection before answering", "reset"), now)
        if self.state == RELAY:
            return self._backend_gone(now)
        return []

    def receive_backend(self, data: bytes, now: float) -> list[Action]:
        if self.state == RELAY:
            return self._relay(data, now)
        if self.state != WAITING:
            return []
        try:
            return self._read_answer(now, data)
        except _Failure as failure:
            return self._retry_or_fail(failure, now)

    def deadline(self, now: float) -> list[Action]:
        """The timer set by the last SetTimer fired."""
        state = self.state
        timeouts = self._config.timeouts
        if state == HEAD:
            # A head that does not arrive in time (slowloris), or a keep-alive connection gone idle.
            log.debug("closing %s: no complete request head in time", self._client_ip)
            return self._close_headless()
        if state in (WAITING, RELAY) and self._body_left:
            # An upload in progress: the client's quiet spell, or the backend's stall (_upload_deadline).
            until = self._upload_deadline()
            if now < until:
                return [SetTimer(until)]
            if self._backend_blocked_at is not None:
                if state == WAITING:
                    return self._retry_or_fail(_Failure("stopped reading the request body", "timeout"), now)
                log.debug("closing %s: backend stopped reading its upload (request %s)", self._client_ip, self._rid)
            elif state == WAITING and self._continue_wait:
                # Neither 100 Continue nor an answer to a client allowed to wait for one: as silent
                # as to a request sent whole (a 502 of its own, _retry_or_fail).
                return self._retry_or_fail(_Failure(f"no answer within {self._answer_wait():g}s", "timeout"), now)
            elif state == WAITING:
                # The client stopped uploading: its fault, so passive health does not hear of it.
                return self._release_backend() + self._refuse(RequestTimeout("request body not received in time"), now)
            else:
                # Answered while the client still uploads: the connection cannot carry a 408 any more.
                log.debug("closing %s: request body not received in time (request %s)", self._client_ip, self._rid)
            return self._release_backend() + self._close(abort=True)
        if state in (CONNECTING, WAITING):
            if state == WAITING and self._client_blocked_at is not None:
                # The backend is not read while the client is full: not the backend's fault.
                until = self._client_blocked_at + timeouts.handshake
                if now < until:
                    return [SetTimer(until)]
                self._log_abandoned(408, "client_not_reading")
                return self._release_backend() + self._close(abort=True)
            if state == CONNECTING:
                cause = f"not connected within {timeouts.backend_connect:g}s"
            else:
                cause = f"no answer within {self._answer_wait():g}s"
            return self._retry_or_fail(_Failure(cause, "timeout"), now)
        if state == RELAY:
            blocked_at = self._client_blocked_at
            if blocked_at is not None:
                # The backend is not read while the client is full: its silence says nothing.  A slow
                # reader (a big download on a poor link) drains its buffer now and then, and each time
                # client_blocked(False) re-arms the backend's timer.  One that takes nothing for as
                # long as a backend may stay silent (nginx's send_timeout, HAProxy's `timeout client`)
                # is cut: it held its connection and a backend's for good.
                until = blocked_at + timeouts.answer_body
                if now < until:
                    return [SetTimer(until)]
                log.info("client %s read nothing of its answer for %gs: closing (request %s)",
                         self._client_ip, timeouts.answer_body, self._rid, extra=self._log_fields())
                return self._release_backend() + self._close(abort=True)
            until = self._last_backend + timeouts.answer_body
            if now < until:
                return [SetTimer(until)]  # bytes came since the timer was set: the wait counts from the last
            # The head promised a body that stopped coming: counted as the backend's timeout, but a
            # slow endpoint, not a broken gateway (passive health does not hear of it).  Cut: the
            # client cannot take the answer for complete.
            self._count_answer_failure("timeout")
            log.warning("backend %s sent nothing of its answer's body for %gs: closing %s (request %s)",
                        self._decision_id(), timeouts.answer_body, self._client_ip, self._rid,
                        extra=self._log_fields())
            return self._release_backend() + self._close(abort=True)
        return []

    def _close_headless(self) -> list[Action]:
        """Close a connection with no request in progress (the head timer, or a stop).

        Under TLS a close first waits for the client's close_notify, which a client that never sent a
        request will not send either (and a stop would wait for it): cut at once, as nginx skips
        close_notify on timeouts.  Not after an answer: its end may still be buffered for a client
        that paused.
        """
        return self._close(abort=self._tls and not self._started)

    def shutdown(self, now: float) -> list[Action]:
        """The balancer stops: a request that has not reached a backend gets 503, the others complete."""
        state = self.state
        if state == HEAD:
            if self._buf:
                return self._refuse_stopping(now)
            if self._started:
                return self._close_headless()  # idle between requests: nothing is lost
            # Accepted a moment ago, its head likely on its way: it gets its 503 as it arrives (the stop
            # checked at every head).  Closed now, a client that connected as the stop began got a FIN
            # and no answer.  Waited for a moment only: a silent connection held every stop for its
            # whole handshake deadline (10 s), which anyone could open.
            return [SetTimer(now + min(STOP_HEAD_WAIT, self._config.timeouts.handshake))]
        if state == CONNECTING:
            return self._refuse_stopping(now)
        self._keep_alive = False  # WAITING or RELAY: the answer comes, then the connection closes
        return []

    def stop_bound_passed(self, now: float) -> list[Action]:
        """The stop's bound has passed with this request still in flight: one still waiting for its
        answer gets its 503 now (with Retry-After: nothing but interim answers has reached its client,
        so it can still be answered, as the log says it was); an answer still streaming is cut."""
        if self.state in (CONNECTING, WAITING):
            return self._refuse_stopping(now)
        return self._close(abort=True)

    def _refuse_stopping(self, now: float) -> list[Action]:
        """A stop's 503 with Retry-After, for a request no backend has answered; the backend connection
        it holds, if any, goes with it."""
        return self._release_backend() + self._refuse(NoHealthyBackend("balancer is shutting down"), now)

    def local_failure(self, now: float) -> list[Action]:
        """The balancer could not open a backend connection for lack of its own descriptors or memory.

        503 with Retry-After; no backend is blamed (passive health does not hear of it).
        """
        if self.state != CONNECTING:
            return []
        actions = self._release_backend()
        return actions + self._refuse(NoHealthyBackend("balancer out of resources"), now)

    # -- head and dispatch ------------------------------------------------------------

    def _snapshot(self) -> None:
        """The configuration the next request runs under, whole: a reload swaps these in one synchronous
        step (lb.control.balancer), so a request is never routed under one configuration and answered
        under another.  Taken at accept, and again at the next head after a reload: kept to the end of a
        keep-alive connection, a proxy taken out of `trusted_proxies` went on having its X-Forwarded-For
        believed, and requests went to backends the reload had removed, for as long as it stayed busy.

        Whether the peer's X-Forwarded-For is believed is decided here, so a request from anyone else
        costs no address parsing at all.
        """
        ctx = self._ctx
        config = ctx.config
        self._config = config
        self._pools = ctx.pools
        self._routes = ctx.routes
        self._codec = ctx.codec
        self._protected = ctx.protected
        self._trusted = _TRUST_NOBODY
        self._proxy = None
        if config.trusted_proxies:
            address = peer_address(self._peer)  # a link-local proxy's zone aside, as proxy_protocol_from reads it
            if address is not None:
                self._peer = str(address)  # normalised (IPv4-mapped as IPv4), as client_address gives it
                trusted = ctx.trusted_proxies
                if address in trusted:
                    self._trusted, self._proxy = trusted, address

    def _read_head(self, now: float, data: bytes = b"") -> list[Action]:
        """Read on for a request head in what is held, with `data` (a read not yet held) after it."""
        if self._ctx.config is not self._config:  # reloaded since this connection's last request began
            self._snapshot()
            self._client_ip = self._peer
        buf = self._buf
        limit = self._config.limits.max_header_bytes
        if data:
            if not buf and is_whole_head(data, limit):
                # Nothing held, and the read is one whole head (as browsers send an upgrade): read as
                # it came, not copied into the buffer and out again (1,500 instructions a handshake).
                self._scan = 0
                self._line_checked = False
                return self._head_read(data, now)
            buf += data
        if self._scan < 2 and buf.startswith(b"\r\n"):
            # RFC 9112 §2.2: an empty line before a request line SHOULD be ignored (the stray CRLF
            # some clients send after a body), its CR and LF in one read or two.  One: a second is a
            # malformed request line, and a stream of them, one a read, still runs into the timer.
            del buf[:2]
            self._scan = 0
        try:
            # Incremental: only the new bytes (and 3 before them) are searched for the blank
            # line, once; a slow client feeding a head byte by byte costs O(n), not O(n^2).
            end = find_head_end(buf, limit, self._scan)
            if end < 0:
                if self._scan < REQUEST_START_BYTES and not could_start_request(buf):
                    raise BadRequest("malformed request line")
                if not self._line_checked:
                    # The request line's CRLF, searched for in the new bytes only (and the CR before
                    # them): one no head could mend (HTTP/0.9's `GET /`) is refused now, not at the timer.
                    line_end = buf.find(b"\r\n", max(0, self._scan - 1))
                    if line_end >= 0:
                        self._line_checked = True
                        check_request_line(buf[:line_end])
                self._scan = len(buf)
                return []
            raw = bytes(buf[:end])
            del buf[:end]
            self._scan = 0
            self._line_checked = False
        except RequestRejected as exc:
            return self._refuse(exc, now, head_only=buf.startswith(b"HEAD "))
        return self._head_read(raw, now)

    def _head_read(self, raw: bytes, now: float) -> list[Action]:
        """A complete request head, `raw`, parsed and dispatched, or refused."""
        try:
            request = parse_request_head(raw, protected=self._protected)
        except RequestRejected as exc:
            # A HEAD whose head we refuse (431, 505, a malformed field) is still a HEAD: its answer
            # ends at its head.  Read from its first bytes, as the request never parsed; only here,
            # off the path of every head that parses.
            return self._refuse(exc, now, head_only=raw.startswith(b"HEAD "))
        # An upgrade as browsers send it passes check_upgrade: lb/ws/_plain.c says so from the parsed head.
        plain = PLAIN_UPGRADE is not None and PLAIN_UPGRADE(request.method, request.version, request.head.index)
        return self._dispatch(request, now, plain_upgrade=plain)

    def _dispatch(self, request: RequestHead, now: float, *, plain_upgrade: bool) -> list[Action]:
        """Route and decide a parsed request (`plain_upgrade`: a WebSocket upgrade known to pass check_upgrade)."""
        ctx = self._ctx
        self._request = request
        self._rid = new_request_id()
        self._started = True
        self._began = now
        self._wall = now + ctx.wall_offset
        if self._proxy is not None:
            self._client_ip = client_behind(self._proxy, request.head.get_all("x-forwarded-for"), self._trusted)
            self._client_port = self._peer_port if self._client_ip == self._peer else 0
        if request.dropped:
            # For whoever looks for a header the backend never got: names are tokens (the parser's), so
            # safe to print; a few are enough to say what happened.
            log.debug("dropped %d header(s) spelt like ours with `_` for `-` from %s (request %s): %s",
                      len(request.dropped), self._client_ip, self._rid, ", ".join(request.dropped[:8]))
        try:
            if not ctx.accepting:
                raise NoHealthyBackend("balancer is shutting down")
            route = match_route(self._routes, request.path)
            if route is None:
                raise NoRoute("no route for the path")
            websocket = plain_upgrade or is_websocket_upgrade(request)
            if websocket:
                if self.client_eof_seen:
                    # Pipelined behind answers, from a client that has half-closed: a tunnel could relay
                    # nothing to the backend, and an upgrade whose client ends before its 101 is dropped.
                    log.debug("closing %s: upgrade after the client's EOF (request %s)", self._client_ip, self._rid)
                    return self._close(abort=False)
                if not plain_upgrade:
                    check_upgrade(request)
            wait = ctx.rate_limiter.check(self._client_ip, now)
            if wait:
                raise TooManyRequests("too many handshakes from this address", retry_after=math.ceil(wait))
            pool = self._pools[route.pool]
            decision = self._first_decision(request, pool, self._wall)
        except RequestRejected as exc:
            return self._refuse(exc, now)
        framer = request_framer(request, protected=self._protected)
        self._pool = pool
        self._websocket = websocket
        self._request_framer = framer
        self._body_left = not framer.done
        # A retry sends the head again, never the body: only a request without one is retried.
        self._retriable = framer.done and (websocket or request.method in _IDEMPOTENT)
        # Its `Connection: close` is read with the answer, if it is not a 101 (`_answer`): a WebSocket's
        # connection is the tunnel's after it, and the read cost its handshake 1,200 instructions.
        self._keep_alive = request.version == "HTTP/1.1"
        return self._open(decision, now)

    def _first_decision(self, request: RequestHead, pool: PoolState, now: float) -> Decision:
        """`now`: wall-clock seconds (tokens' issue times, backend states' change times)."""
        affinity = self._config.affinity
        lookup = find_token(request, affinity, self._codec, now, pool=pool.name)
        self._balance_key = balance_key(request, pool.config, self._client_ip)
        stats = self._ctx.stats
        if lookup.rejected:  # rarely: its items' view and their iterator cost every handshake otherwise
            for token, reason in lookup.rejected.items():
                add_one(stats.invalid_tokens, reason)
                log.debug("ignoring affinity token %s from %s: %s", token_digest(token), self._client_ip, reason)
        claim = lookup.claim
        decision = decide(
            claim.backend_id if claim else None,
            pool,
            session=claim.session if claim else None,
            token_invalid=bool(lookup.rejected),
            # Re-issued past half its life; in insert mode also when an older key opened it (a rotation
            # under way), as our cookie (Path=/) replaces itself.  Not in rewrite mode: a re-issue there
            # cannot know the backend cookie's own Path and Domain, so the browser would keep the old
            # cookie beside it, send it first, and get a fresh one on every handshake; the token is
            # sealed under the new key when the backend next sets its cookie.
            refresh=claim is not None and (
                (claim.older_key and affinity.mode is AffinityMode.INSERT)
                or now - claim.issued_at > affinity.max_age / 2
            ),
            now=now,
            grace=affinity.redispatch_grace,
            balance_key=self._balance_key,
        )
        if claim is not None and decision.reason == "invalid":
            add_one(stats.invalid_tokens, "unknown_backend")
        self._lookup = lookup
        self._claim = claim
        return decision

    def _open(self, decision: Decision, now: float) -> list[Action]:
        backend = decision.backend
        backend.connections += 1  # in-flight handshakes count for least_conn
        self._decision = decision
        self._sent = False
        self._answer_buf.clear()
        self._answer_scan = 0
        self._interim = 0
        self.state = CONNECTING
        self._opened_at = now
        config = backend.config
        return [
            OpenBackend(config.host, config.port, config.id),
            SetTimer(now + self._config.timeouts.backend_connect),
        ]

    def _forwarded_head(self) -> bytes:
        request, lookup, decision = self._request, self._lookup, self._decision
        assert request is not None and lookup is not None and decision is not None
        claim = lookup.claim
        plan = plan_forward(
            request,
            self._config.affinity,
            lookup,
            to_claimed=claim is not None and decision.backend.id == claim.backend_id,
        )
        return render_forwarded_request(
            request,
            forwarded_for=self._forwarded_for(request),
            proto="https" if self._tls else "http",
            websocket=self._websocket,
            rewrite_cookie=plan.rewrite_cookie,
            drop=plan.drop,
            target=plan.target,
            append_cookie=plan.append_cookie,
            backend_host=decision.backend.config.address,
            trusted_peer=self._proxy is not None,
        )

    def _forwarded_for(self, request: RequestHead) -> str:
        """X-Forwarded-For for the backend: the client's chain only from a trusted peer (SPEC part 2)."""
        if self._proxy is None:
            return self._peer
        return chain_through(self._peer, request.head.get_all("x-forwarded-for"))

    # -- request body -----------------------------------------------------------------

    def _send_body(self, data: bytes, now: float) -> list[Action]:
        """Forward what belongs to the request body; hold what follows it (the next request)."""
        framer = self._request_framer
        assert framer is not None
        try:
            end = framer.feed(data)
        except ValueError:
            released = self._release_backend()
            if self.state == RELAY:
                # The answer has begun: an error of ours now would land inside its body.
                log.info("closing %s: malformed chunked request body (request %s)", self._client_ip, self._rid,
                         extra=self._log_fields())
                return released + self._close(abort=True)
            return released + self._refuse(RequestRejected("malformed chunked request body"), now)
        if end is None:
            return [SendBackend(data)]
        self._body_left = False
        actions: list[Action] = [SendBackend(data[:end])] if end else []
        if end < len(data):
            self._buf += data[end:]
            if not self._paused and len(self._buf) > HELD_LIMIT:
                self._paused = True
                actions.append(_PAUSE)
        if self.state == WAITING:
            # The whole request is out: from here on the wait is the backend's.
            actions.append(SetTimer(now + self._answer_wait()))
        elif self.state == RELAY:
            actions.append(self._relay_timer(now))
        return actions

    def _maybe_resume(self) -> list[Action]:
        # Reading for a head, what is held is bounded by max_header_bytes (find_head_end refuses
        # more), which may be above HELD_LIMIT: a pipelined head that large must still arrive.
        state = self.state
        if self._paused and (state == HEAD or (state != CLOSED and len(self._buf) <= HELD_LIMIT)):
            self._paused = False
            return [_RESUME]
        return []

    # -- the backend's answer ---------------------------------------------------------------

    def _read_answer(self, now: float, data: bytes) -> list[Action]:
        """Read on for the backend's answer heads in what is held, with `data` (a read not yet held) after it.

        With nothing held, a head whole at the start of the read is taken from it as it came, and what
        follows it waits in `data` (not copied into the buffer and out again: about 2,400 instructions a
        handshake); anything else is held and read as it always was."""
        actions: list[Action] = []
        buf = self._answer_buf
        request = self._request
        assert request is not None
        relaying = False  # a 1xx among `actions`: it reaches the client only if this read returns them
        while True:
            raw: bytes | None = None
            if data and not buf:
                length = answer_head_length(data, MAX_RESPONSE_HEAD)
                if length >= 0:
                    raw, data = data[:length], data[length:]
            if raw is None:
                if data:
                    buf += data
                    data = b""
                try:
                    raw = take_answer_bytes(buf, self._answer_scan, MAX_RESPONSE_HEAD)
                except HeadersTooLarge:
                    raise _Failure("answer head too large", request_shaped=True) from None
                except BadGateway as exc:
                    raise _Failure(f"malformed answer: {exc}") from None
                if raw is None:
                    self._answer_scan = len(buf)
                    if relaying:
                        self._interim_relayed = True
                    return actions
            self._answer_scan = 0
            if self._plain_switch(request, raw):
                return actions + self._switch(self._plain_client_head(raw), now, data)
            try:
                response = parse_response_head(raw)
            except RequestRejected as exc:
                # Judged as take_answer_bytes judges a head still incomplete: the verdict (at once, or on
                # trial) must not hang on whether the blank line came in the same read as the rest.
                shaped = raw.startswith(b"HTTP/") and not has_bare_lf(raw, 0)
                raise _Failure(f"malformed answer: {exc}", request_shaped=shaped) from None
            status = response.status
            if self._continue_wait and (status == 100 or status >= 200):
                # The client's time starts with the backend's word: its 100, or its answer.  Not with
                # another 1xx (103 Early Hints), which is no leave to send (RFC 9110 §10.1.1).
                self._continue_wait = False
                self._last_client = now
                actions.append(SetTimer(self._upload_deadline()))
            if status < 200 and status != 101:
                # Interim (100 Continue, 103 Early Hints): passed on, except to an HTTP/1.0 client,
                # which would take one for the answer (RFC 9110 §15.2); they do not extend the deadline.
                # A Set-Cookie of affinity.cookie only where the final answer would pass it as it is.
                self._interim += 1
                if self._interim > MAX_INTERIM:
                    # Blamed at once; not retried once one of them has reached the client (_retry_or_fail).
                    raise _Failure("too many interim answers")
                if request.version != "HTTP/1.0":
                    interim = render_interim(response, self._interim_drop(), self._config.affinity.header)
                    actions.append(SendClient(interim))
                    relaying = True
                continue
            if status == 101:
                if not self._websocket:
                    raise _Failure("switched protocols without being asked to")
                fault = switch_fault(request, response)
                if fault is not None:
                    raise _Failure(f"malformed answer: {fault}", request_shaped=True)
                mismatch = negotiation_fault(request, response)
                if mismatch is not None:
                    raise _Failure(f"answer this client must fail: {mismatch}", this_client_only=True)
                return actions + self._switch(self._client_head(response, now, switching=True), now, data)
            if data:
                buf += data  # what follows the answer's head: its body (_answer)
            return actions + self._answer(response, now)

    def _plain_switch(self, request: RequestHead, raw: bytes) -> bool:
        """Whether the answer head `raw` is a 101 that passes to the client as it came but for our cookie,
        so that it need not be read into objects (lb/ws/_plain.c says which: what nearly every gateway
        sends); any other is read and checked the ordinary way."""
        affinity = self._config.affinity
        if PLAIN_SWITCH is None or not self._websocket or affinity.mode is not AffinityMode.INSERT:
            return False
        if affinity.header is not None and _field_line(affinity.header) in raw.lower():
            return False  # the backend's own affinity.header field, which the client must not get
        key = request.head.get("sec-websocket-key")
        return key is not None and PLAIN_SWITCH(raw, key)

    def _switch(self, head: bytes, now: float, rest: bytes) -> list[Action]:
        """The backend switched protocols; `head` is its 101 as the client gets it, and `rest` what the
        backend sent after it that is not held (`_read_answer`)."""
        decision, pool = self._decision, self._pool
        assert decision is not None and pool is not None and self._request is not None
        self._observe(now)
        self._count("switched")
        self._log(SWITCHING_PROTOCOLS)
        to_server = b""
        if self._buf:  # early data: a client's first frames, sent with its head
            to_server = bytes(self._buf)
            self._buf.clear()
        to_client = rest
        if self._answer_buf:
            to_client = bytes(self._answer_buf) + rest
            self._answer_buf.clear()
        self._decision = None  # the tunnel releases the backend's count from here on
        self.state = TUNNEL
        return [
            SendClient(head),
            _NO_TIMER,
            JoinTunnel(decision.backend, pool.name, to_server, to_client, self._rid),
        ]

    def _answer(self, response: ResponseHead, now: float) -> list[Action]:
        request = self._request
        assert request is not None
        if request.version == "HTTP/1.0" and response.head.get_all("transfer-encoding"):
            # Forbidden to a 1.0 request (RFC 9112 §6.1), and its client could not read the body.
            # 502, but no retry and no failed check: the client picks the version, and an app that
            # always chunks would otherwise let one request mark every backend down.
            log.info("chunked answer from %s to an HTTP/1.0 request %s", self._decision_id(), self._rid,
                     extra=self._log_fields())
            return self._release_backend() + self._refuse(BadGateway("chunked answer to an HTTP/1.0 request"), now)
        framer = response_framer(response, request_method=request.method)
        keep = (
            self._keep_alive
            and not request.head.has_token("connection", "close")
            and not framer.until_eof
            and not self._body_left
            # After the client's EOF, only for a whole request already here: a partial one will never end.
            and (not self.client_eof_seen or b"\r\n\r\n" in self._buf)
            and self._ctx.accepting
            and not self._ctx.deregistering
        )
        self._keep_alive = keep
        self._observe(now)  # ahead of the head: a backend it takes down is one the cookie must leave
        # Made before the answer counts as begun (RELAY): a bug in it leaves nothing sent, so the client
        # gets the bare 500 (lb.proxy.server's internal_error), not the cut of an answer under way.
        head = self._client_head(response, now, switching=False, keep_alive=keep)
        self._count("refused" if self._websocket else "answered")
        self._log(response.status)
        self._response_framer = framer
        self.state = RELAY
        actions: list[Action] = [SendClient(head), self._relay_timer(now)]
        if self._answer_buf:
            rest = bytes(self._answer_buf)
            self._answer_buf.clear()
            actions += self._relay(rest, now)
        elif framer.done:
            actions += self._finish(now)
        return actions

    def _decision_id(self) -> str:
        decision = self._decision
        return decision.backend.id if decision is not None else "-"

    def _log_fields(self, backend_id: str | None = None) -> dict[str, object]:
        """A line about this request's failure, its fields of their own in `logging.format: json` (as the
        access line's are): a query on `request_id` finds why a request failed, not only its status."""
        pool = self._pool
        return {"access": {"request_id": self._rid, "pool": pool.name if pool is not None else "-",
                           "backend": backend_id or self._decision_id(), "client": self._client_ip}}

    def _relay_timer(self, now: float) -> SetTimer:
        """While an answer is relayed: the upload's quiet-spell deadline while the body still comes, else
        the backend's (`timeouts.answer_body`: HAProxy's `timeout server`, nginx's `proxy_read_timeout`)."""
        if self._body_left:
            return SetTimer(self._upload_deadline())
        self._last_backend = now
        return SetTimer(now + self._config.timeouts.answer_body)

    def _relay(self, data: bytes, now: float) -> list[Action]:
        framer = self._response_framer
        assert framer is not None
        try:
            end = framer.feed(data)
        except ValueError:
            log.warning(
                "malformed chunked body from backend %s; closing (request %s)",
                self._decision_id(),
                self._rid,
                extra=self._log_fields(),
            )
            self._count_answer_failure("bad_answer")
            return self._release_backend() + self._close(abort=True)
        if end is None:
            self._last_backend = now  # no new timer: deadline() moves the quiet-spell one on when it fires
            return [SendClient(data)]
        actions: list[Action] = [SendClient(data[:end])] if end else []
        # Anything behind the body is not ours to relay (we asked for Connection: close).
        return actions + self._finish(now)

    def _finish(self, now: float) -> list[Action]:
        """The answer is complete: on to the next request, or close."""
        actions = self._release_backend()
        if not self._keep_alive or (self.client_eof_seen and not self._buf):
            return actions + self._close(abort=False)
        self._reset_request()
        # The next request's client is its own: the peer until its head names a trusted hop (a head
        # that does not parse was logged as the previous request's client).
        self._client_ip, self._client_port = self._peer, self._peer_port
        self.state = HEAD
        actions.append(SetTimer(now + self._config.timeouts.handshake))
        if self._buf:
            actions += self._read_head(now)
            if self.client_eof_seen and self.state == HEAD:
                return actions + self._close(abort=False)  # what the client left is no whole request
        return actions + self._maybe_resume()

    def _backend_gone(self, now: float, *, lost: bool = False) -> list[Action]:
        """The backend closed (`lost`: reset, or failed otherwise) while its answer's body was being relayed."""
        framer = self._response_framer
        until_eof = framer is not None and framer.until_eof
        if until_eof and not lost:
            return self._finish(now)  # that is how this body ends; keep_alive is already off
        log.warning(
            "backend %s closed before its answer was complete (request %s)",
            self._decision_id(),
            self._rid,
            extra=self._log_fields(),
        )
        self._count_answer_failure("reset")
        # A body that ends at close can be told cut short only by a transport error (RFC 9112 §8): a
        # FIN here would pass a crashed backend's half answer for a whole one, so the client is reset.
        return self._release_backend() + self._close(abort=until_eof)

    # -- failures -------------------------------------------------------------------

    def _count_answer_failure(self, kind: ErrorKind) -> None:
        """A backend that failed an answer it had begun (silent, closed or malformed in its body): in
        lb_backend_errors_total, though not a failed handshake (passive health does not hear of it)."""
        decision, pool = self._decision, self._pool
        if decision is not None and pool is not None:
            self._ctx.observations.count_backend_error(pool.name, decision.backend.id, kind)

    def _retry_or_fail(self, failure: _Failure, now: float) -> list[Action]:
        decision, pool = self._decision, self._pool
        assert decision is not None and pool is not None
        backend = decision.backend
        ctx = self._ctx
        # A plain request delivered whole and answered late is a slow endpoint (a long poll, a
        # report), not a backend that cannot be reached: a 502 for this request only (below).
        late = (failure.timeout and not self._websocket and self.state == WAITING
                and (not self._body_left or self._continue_wait))
        actions = self._release_backend()
        add_one(ctx.stats.handshakes, (pool.name, backend.id, _attempt_outcome(failure, late)))
        ctx.observations.count_backend_error(pool.name, backend.id, failure.kind)
        log.warning(
            "backend %s at %s failed request %s: %s",
            backend.id,
            backend.config.address,
            self._rid,
            failure.cause,
            extra=self._log_fields(backend.id),
        )
        # 502 also after a timeout: SPEC's "a backend that cannot be reached → 502", and the
        # log line (with the request id) says it was silence.
        if failure.timeout:
            last = BadGateway("no backend answered in time")
        elif failure.kind == "bad_answer":
            last = BadGateway("no backend gave a well-formed answer")  # the access line's reason: not unreachable
        elif self._interim:
            # It answered (a 1xx, whether or not that reached the client), then closed: reached.
            last = BadGateway("the backend closed after its interim answer")
        elif self.state == WAITING:
            # Connected and given the request (some or all of it), then closed or reset without an answer:
            # reached, so the operator looks at what the backend did with the request, not at the network.
            last = BadGateway("the backend closed before answering")
        else:
            last = BadGateway("no backend could be reached")
        if failure.this_client_only:
            # Every gateway of the pool may answer so (one that requires a subprotocol this client
            # did not offer): another would fail it alike, and the backend serves other clients.
            return actions + self._refuse(BadGateway("backend named a subprotocol or extension not offered"), now)
        if late:
            # Not sent again elsewhere (the backend may be acting on it: a slow GET would run twice)
            # and not a failed health check (a few slow requests took every gateway of a pool down;
            # a backend that accepts and never answers is left to its active checks, and to the
            # upgrades it fails).
            return actions + self._refuse(last, now)
        hung_up = self.state == WAITING and failure.kind == "reset" and not self._answer_buf and not self._interim
        # An HTTP answer head it could not pass on (a control byte, too large), with nothing relayed yet.
        bad_head = failure.request_shaped and not self._interim_relayed
        if hung_up or bad_head:
            # Either may be the request's doing: a gateway closes on a request it will not take, or writes
            # what the client sent into a header (a cookie from a query parameter, with a control byte in
            # it).  Tried on every gateway in turn, one such request counted a failure against each, so
            # a client took a pool down with `fall` requests.  Counted only once another backend answers
            # this same request (`_observe`), and never when this one got more than the others would
            # (rewrite mode gives the pinned backend alone its session: a client replaying a session its
            # gateway drops would have that gateway blamed).
            if not self._restored_session(decision):
                self._on_trial = [*(self._on_trial or ()), (backend.id, failure.cause)]
        else:
            # A backend that fails a handshake counts towards taking it down (passive health).
            ctx.on_backend_failure(pool.name, backend.id, failure.cause)
        # Nothing goes elsewhere once the client has some of this backend's answer (its 1xx): another
        # backend's answer would follow them, and MAX_INTERIM bounds a request only if it stays here.
        # A 1xx received but never sent (an HTTP/1.0 client's, or one whose read also held the failure)
        # left the client nothing to contradict: the request goes on as if none had come.
        if (self._sent and not self._retriable) or self._interim_relayed:
            return actions + self._refuse(last, now)
        self._tried.append(backend.id)
        if failure.timeout or hung_up or bad_head:
            # Waits are what make a retry costly (a refusal costs a round trip, and SPEC tries another
            # backend while there is one): a pool of wedged gateways answers 502 after 1 + `retries` of
            # them, not after timeouts.backend_connect once per gateway.  Hang-ups and bad heads too: a
            # request every gateway closes on, or answers badly, would otherwise cost a connection to
            # each of them, unblamed.
            self._waited += 1
            if self._waited > pool.config.retries:
                return actions + self._refuse(last, now)
        if not ctx.accepting:
            # A stop answers what has not reached a backend with 503 (SPEC): this has not, and the
            # stop's bound would otherwise cut it between two attempts.
            return actions + self._refuse_stopping(now)
        claim = self._claim
        try:
            # The same choice again without the failed ones: a pinned client goes
            # where every instance would send it, a new client is balanced.
            retry = decide(
                claim.backend_id if claim else None,
                pool,
                session=claim.session if claim else None,
                exclude=self._tried,
                now=now + ctx.wall_offset,
                # As the first choice: a pin kept while its backend is briefly down or full stays kept
                # when a stand-in refuses (a fresh cookie here moved the client for good).
                grace=self._config.affinity.redispatch_grace,
                balance_key=self._balance_key,
            )
        except NoHealthyBackend:
            return actions + self._refuse(last, now)
        reason = decision.reason if decision.reason != "hit" else "redispatch"
        return actions + self._open(Decision(retry.backend, reason, retry.issue_cookie), now)

    def _restored_session(self, decision: Decision) -> bool:
        """Whether `decision`'s backend got the client's session from its token (rewrite mode, pinned)."""
        claim = self._claim
        return (
            self._config.affinity.mode is AffinityMode.REWRITE and claim is not None
            and claim.app_value is not None and claim.backend_id == decision.backend.id
        )

    def _log_abandoned(self, status: int, reason: str) -> None:
        """A request on its way to a backend that ends before its answer: still its one access line, and
        counted (`lb_handshakes_total{outcome="abandoned"}` and its affinity decision), so the log's
        `affinity=` lines and the counters agree."""
        request, decision, pool = self._request, self._decision, self._pool
        if self.state not in (CONNECTING, WAITING) or request is None or decision is None or pool is None:
            return
        self._count("abandoned")
        log_request(
            client=self._client_ip, client_port=self._client_port, method=request.method, path=request.logged_path,
            pool=pool.name, backend=decision.backend.id, affinity=decision.reason, status=status,
            reason=reason, request_id=self._rid,
        )

    def _release_backend(self) -> list[Action]:
        """Stop counting the current backend connection and drop it."""
        decision = self._decision
        if decision is None:
            return []
        decision.backend.connections -= 1
        self._decision = None
        self._backend_blocked_at = None  # that connection's full buffer goes with it
        return [_CLOSE_BACKEND]

    def _refuse(
        self, exc: RequestRejected, now: float, summary: RateLimitSummary | None = None, *, head_only: bool = False
    ) -> list[Action]:
        """Answer with our own error and close; the log line says why, the body only the status.

        `summary`: a refusal a flood repeats, logged one line per interval (429s always are).
        """
        if self._rid == "-":
            self._rid = new_request_id()
        add_one(self._ctx.stats.rejected, exc.status)
        request = self._request
        if summary is None and exc.status == 429:
            summary = self._ctx.rate_limited_log
        method, path = (request.method, request.logged_path) if request else ("-", "-")
        if summary is not None:
            summary.note(self._client_ip, now, self._rid, client_port=self._client_port, method=method, path=path)
        else:
            log_request(
                client=self._client_ip,
                client_port=self._client_port,
                method=method,
                path=path,
                status=exc.status,
                reason=str(exc).replace(" ", "_"),
                request_id=self._rid,
            )
        head_only = head_only or (request is not None and request.method == "HEAD")
        answer = render_refusal(exc.status, exc.reason_phrase, self._rid, exc.headers, head_only=head_only)
        return [SendClient(answer), *self._close(abort=False)]

    def _close(self, *, abort: bool) -> list[Action]:
        """Close the client connection; a backend connection still held is released with it."""
        if self.state == CLOSED:
            return []
        actions = self._release_backend()
        self.state = CLOSED
        self._buf.clear()
        actions += (_NO_TIMER, _ABORT_CLIENT if abort else _CLOSE_CLIENT)
        return actions

    # -- answers -------------------------------------------------------------------

    def _interim_drop(self) -> str | None:
        """The cookie whose Set-Cookie a 1xx loses: affinity.cookie where only the final answer's is
        ours to set (insert mode; rewrite mode on a pool that pins, as an interim answer is never
        sealed), else None: the backend's cookie passes as the final answer passes it."""
        affinity, pool = self._config.affinity, self._pool
        assert pool is not None
        return affinity.cookie if affinity.mode is AffinityMode.INSERT or pool.config.pins else None

    def _client_head(self, response: ResponseHead, now: float, *, switching: bool, keep_alive: bool = False) -> bytes:
        """The backend's answer plus the affinity token, as the mode wants it (at `now`, the events' clock)."""
        ctx = self._ctx
        affinity = self._config.affinity
        decision, claim, lookup, pool = self._decision, self._claim, self._lookup, self._pool
        assert decision is not None and lookup is not None and pool is not None
        wall = self._wall
        unsealed: list[int] = []  # sizes of the backend's values passed unsealed, logged once below
        secure = self._secure_cookie()

        if affinity.mode is AffinityMode.REWRITE and pool.config.pins:
            # Rewrite mode may seal several values of one answer, all with one session: a sealer for them.
            # Made only here, where something may be sealed: for a new client it draws the session.
            sealer = self._sealer()
            rewrite, token = rewrite_response_cookies(
                response, affinity, sealer.seal, secure=secure, others=lookup.others,
                on_unsealed=lambda app_value: unsealed.append(len(app_value)), now=wall,
            )
            if unsealed:
                # Counted each; one line a minute however many answers held them (a backend cannot flood the log).
                ctx.stats.unsealed_cookies[pool.name] += len(unsealed)
                suppressed = _backend_set_unsealed.due(now)  # the events' clock, not `wall`
                if suppressed is not None:
                    log.warning(
                        "backend %s set %d %s cookie value(s) that pass to the client unsealed, with no affinity "
                        "for them: each too large to seal (the largest is %d bytes) or past the first %d of one "
                        "answer (request %s; %d more answers like it since the last line)",
                        decision.backend.id, len(unsealed), affinity.cookie, max(unsealed), MAX_SEALS, self._rid,
                        suppressed, extra=self._log_fields(),
                    )
            set_cookies = []
            first = None
            said = sets_cookie(response, affinity.cookie)  # the backend said something of its cookie
            if (
                decision.issue_cookie and claim is not None and not said
                and (decision.reason == "hit" or (decision.reason == "redispatch" and _left(pool, claim)))
            ):
                # The backend said nothing of its cookie (a value, a deletion).  A hit past half its
                # life: the same value sealed again, so an active client keeps its backend and session.
                # A redispatch from a backend down or disabled (SPEC: the cookie is replaced): a pin with
                # no value, as the stand-in saw none; kept, the old pin took the client back to the old
                # backend once it returned.  Not from one that only failed this request and is still
                # up: its session (the value) is kept for the client's next handshake.
                app_value = claim.app_value if decision.reason == "hit" else None
                refreshed = fitting_value(affinity.cookie, lookup.others, sealer.seal(app_value))
                if refreshed is not None:  # else the cookie it has stands until it expires
                    token = refreshed
                    set_cookies.append(our_set_cookie(affinity, token, secure=secure))
            elif said and lookup.cookie_sent:
                # A value or a deletion scoped elsewhere than a re-issue's copy (host-only, Path=/), from a
                # client that sent our cookie (so may hold such a copy: it goes with every request): that
                # copy is deleted first, or it would outlive what the backend says (a logout, a new login).
                first = refreshed_copy_deletion(response, affinity, secure=secure)
            extra = [(affinity.header, token)] if token and affinity.header is not None else []
            return render_client_response(
                response,
                switching=switching,
                set_cookies=set_cookies,
                extra=extra,
                rewrite_set_cookie=rewrite,
                keep_alive=keep_alive,
                set_cookie_first=first,
                drop_header=affinity.header,
            )
        drop = None
        if affinity.mode is AffinityMode.INSERT and sets_cookie(response, affinity.cookie):
            # The name is ours: the backend never sees our cookie, and its Set-Cookie of that name
            # would replace (or delete) the client's pins, in every pool, whenever we issue none
            # (HAProxy's `cookie ... insert` drops it too).
            drop = affinity.cookie
            suppressed = _backend_set_our_cookie.due(now)  # the events' clock, not `wall`
            if suppressed is not None:
                log.warning(
                    "backend %s sets cookie %s, the name affinity.cookie gives ours: its Set-Cookie is left out "
                    "(request %s; %d more like it since the last line). Give the backend's cookie another name, "
                    "or use affinity.mode: rewrite to route by it", decision.backend.id, affinity.cookie,
                    self._rid, suppressed, extra=self._log_fields(),
                )
        if not decision.issue_cookie or affinity.mode is AffinityMode.REWRITE:
            return render_client_response(
                response, switching=switching, set_cookies=[], extra=[], keep_alive=keep_alive, drop_cookie=drop,
                drop_header=affinity.header,
            )
        set_cookie, extra = self._inserted(self._seal_one(), secure)
        return render_client_response(
            response, switching=switching, set_cookies=[set_cookie], extra=extra, keep_alive=keep_alive,
            drop_cookie=drop, drop_header=affinity.header,
        )

    def _plain_client_head(self, raw: bytes) -> bytes:
        """`_client_head` of a 101 that `plain_switch` passed (insert mode, nothing of the backend's to
        take out or change): `raw` as it came, with our cookie when this decision issues one."""
        decision = self._decision
        assert decision is not None
        if not decision.issue_cookie:
            return raw
        set_cookie, extra = self._inserted(self._seal_one(), self._secure_cookie())
        if not extra:
            # The bytes render_head writes for the head and our field: `raw` less its last CRLF, the field,
            # then CRLF, added as bytes.  Reading the backend's head into a str for render_head and back
            # (a slice, a latin-1 decode, a list and a call) cost about 400 instructions more a new
            # client's handshake (`python -m bench.instructions_live --profile`: this method's 10,490
            # inclusive before, 10,075 after); a join of the four, 140 more than three `+` of these sizes.
            return raw[:-2] + b"Set-Cookie: " + set_cookie.encode("latin-1") + b"\r\n\r\n"
        return render_head(raw[: -len(HEAD_END)].decode("latin-1"), [("Set-Cookie", set_cookie), *extra])

    def _inserted(self, sealed: str, secure: bool) -> tuple[str, list[tuple[str, str]]]:
        """Insert mode's new token (`sealed`, with the other pools' pins): its Set-Cookie value, and
        `affinity.header`'s field when there is one."""
        affinity, lookup = self._config.affinity, self._lookup
        assert lookup is not None
        token = join_pins(lookup.others, sealed)
        return our_set_cookie(affinity, token, secure=secure), [] if affinity.header is None else [
            (affinity.header, token)]

    def _secure_cookie(self) -> bool:
        affinity = self._config.affinity
        return affinity.secure is SecureMode.ALWAYS or (affinity.secure is SecureMode.AUTO and self._tls)

    def _sealer(self) -> _Sealer:
        """Seals this decision's tokens (at the events' wall clock): one session for all of them, the
        client's own when it has one, and a fresh nonce for each."""
        decision, pool = self._decision, self._pool
        assert decision is not None and pool is not None
        session, nonce = self._session()
        return _Sealer(self._codec, decision.backend.id, pool.name, self._wall, session, self._random, nonce)

    def _seal_one(self) -> str:
        """`_sealer().seal(None)`, for a decision that seals one token (insert mode), without a sealer: made
        and freed for one seal, it cost about 400 instructions a new client's handshake."""
        decision, pool = self._decision, self._pool
        assert decision is not None and pool is not None
        session, nonce = self._session()
        return self._codec.seal_fields(
            decision.backend.id, _token_time(self._wall), session, None, pool.name,
            nonce if nonce is not None else self._random(NONCE_BYTES),
        )

    def _session(self) -> tuple[bytes, bytes | None]:
        """The session this decision's tokens carry (the client's own when it has one), and the first
        token's nonce when it was drawn with it (None: draw one)."""
        claim = self._claim
        if claim is not None:
            return claim.session, None
        # A new client's session and its first token's nonce in one draw (the shell's `random` reads
        # the system's randomness a page at a time: lb.proxy.randomness).
        fresh = self._random(SESSION_BYTES + NONCE_BYTES)
        return fresh[:SESSION_BYTES], fresh[SESSION_BYTES:]

    def _observe(self, now: float) -> None:
        """The backend gave its final answer: lb_backend_connect_duration_seconds (connect + answer) and
        lb_handshake_duration_seconds, and its failed handshakes (passive health) count from 0 again.
        Those that hung up on this request without a word, or answered it with a head that could not pass,
        count now: the request was not the cause."""
        decision, pool = self._decision, self._pool
        assert decision is not None and pool is not None
        decision.backend.handshake_failures = 0
        if self._on_trial is not None:
            for backend_id, cause in self._on_trial:
                self._ctx.on_backend_failure(pool.name, backend_id, cause)
            self._on_trial = None
        observations = self._ctx.observations
        observations.observe_connect(pool.name, decision.backend.id, now - self._opened_at)
        observations.observe_handshake(pool.name, now - self._began)

    def _count(self, outcome: str) -> None:
        decision, pool = self._decision, self._pool
        assert decision is not None and pool is not None
        backend_id = decision.backend.id
        stats = self._ctx.stats
        add_one(stats.handshakes, (pool.name, backend_id, outcome))
        add_one(stats.decisions, (pool.name, backend_id, decision.reason))  # the backend's counts too (backend_counts)

    def _log(self, status: int) -> None:
        request, decision, pool = self._request, self._decision, self._pool
        assert request is not None and decision is not None and pool is not None
        log_answered(
            self._client_ip, self._client_port, request.method, request.logged_path, pool.name, decision.backend.id,
            decision.reason, status, self._rid,
        )

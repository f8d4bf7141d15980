"""What a connection's core asks its shell to do: the actions `lb.proxy.connection` returns.  [pure]

The core (`Connection`) never does I/O; each event it is fed returns a list of these, and the shell
(`lb.proxy.server`) carries them out in order:

    SendClient(data)       write to the client          SendBackend(data)   write to the backend
    OpenBackend(host, ...) connect to a backend         CloseBackend()      drop that connection
    CloseClient(abort)     close the client             SetTimer(at)        the one deadline, or none
    PauseClient()          stop reading the client      ResumeClient()      read it again
    JoinTunnel(...)        the backend switched protocols: relay both ways (`lb.proxy.tunnel`)
"""

from __future__ import annotations

from dataclasses import dataclass

from lb.state.pool import BackendStatus


class Action:
    """Something the shell must do; the core never does I/O itself.

    The actions, like the other value classes built per request (heads, claims, decisions), are
    dataclasses with `init=False` and an `__init__` of their own: compiled (build_native.py),
    methods a dataclass generates run interpreted, about 0.4 µs more per object.
    """

    __slots__ = ()


@dataclass(slots=True, init=False)  # not frozen (a frozen __init__ costs ~1 µs); own __init__: see Action
class SendClient(Action):
    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True, init=False)  # not frozen (a frozen __init__ costs ~1 µs); own __init__: see Action
class SendBackend(Action):
    data: bytes

    def __init__(self, data: bytes) -> None:
        self.data = data


@dataclass(slots=True, init=False)  # not frozen (a frozen __init__ costs ~1 µs); own __init__: see Action
class OpenBackend(Action):
    """Connect to this backend; answer with backend_connected or backend_failed."""

    host: str
    port: int
    backend_id: str

    def __init__(self, host: str, port: int, backend_id: str) -> None:
        self.host = host
        self.port = port
        self.backend_id = backend_id


@dataclass(slots=True)  # not frozen, never mutated: a frozen __init__ costs ~1 µs, and this is built per request
class CloseBackend(Action):
    """Drop the backend connection (or the attempt to make one); its bytes are of no more use."""


@dataclass(slots=True, init=False)  # not frozen (a frozen __init__ costs ~1 µs); own __init__: see Action
class CloseClient(Action):
    """Close the client connection after what was sent is flushed (`abort`: at once, unflushed)."""

    abort: bool

    def __init__(self, abort: bool = False) -> None:
        self.abort = abort


@dataclass(slots=True)  # not frozen, never mutated: a frozen __init__ costs ~1 µs, and this is built per request
class PauseClient(Action):
    """Stop reading from the client: the held bytes reached `lb.proxy.connection.HELD_LIMIT`."""


@dataclass(slots=True)  # not frozen, never mutated: a frozen __init__ costs ~1 µs, and this is built per request
class ResumeClient(Action):
    """The held bytes have room again."""


@dataclass(slots=True, init=False)  # not frozen (a frozen __init__ costs ~1 µs); own __init__: see Action
class SetTimer(Action):
    """Call `deadline` at time `at` (same clock as `now`); None cancels.  One deadline per connection."""

    at: float | None

    def __init__(self, at: float | None) -> None:
        self.at = at


@dataclass(slots=True, init=False)  # not frozen (a frozen __init__ costs ~1 µs); own __init__: see Action
class JoinTunnel(Action):
    """The backend switched protocols: relay both ways from here (`lb.proxy.tunnel.Tunnel.join`)."""

    backend: BackendStatus
    pool: str
    to_server: bytes  # what the client sent behind its head, held until now
    to_client: bytes  # what the backend sent behind its 101
    request_id: str
    backend_closed: bool

    def __init__(
        self, backend: BackendStatus, pool: str, to_server: bytes, to_client: bytes, request_id: str = "-",
        backend_closed: bool = False,
    ) -> None:
        self.backend = backend
        self.pool = pool
        self.to_server = to_server
        self.to_client = to_client
        self.request_id = request_id
        self.backend_closed = backend_closed

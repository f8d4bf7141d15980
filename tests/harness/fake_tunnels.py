"""Tunnels over fake transports, for the unit tests of the tunnel and of a drain's paced closes, and
the proxy context they run in (`pool_context`, `one_backend_context`).

The relay is callback-driven, so a transport that records what the tunnel asks of it (writes, closes,
aborts, half-closes) is enough; no socket.
"""

from __future__ import annotations

from typing import Any

from lb.affinity.codec import TokenCodec
from lb.config.model import AffinityConfig, BackendConfig, Config, PoolConfig
from lb.proxy.tunnel import Tunnel, WebSocketClientEnd, WebSocketServerEnd
from lb.state.context import ProxyContext
from lb.state.pool import BackendStatus, PoolState

ESTABLISHED, CLOSE, CLOSE_WAIT = 1, 7, 8  # Linux's tcp_states.h: open, reset, its peer's FIN received


class FakeSocket:
    """What the tunnel asks of a socket: TCP_INFO, whose first byte is the connection's state, and its
    descriptor, whose send queue the kernel is asked for (give one of a real socket pair; without, the
    question fails as on a closed socket)."""

    def __init__(self, tcp_state: int = ESTABLISHED, *, fd: int = -1) -> None:
        self.tcp_state = tcp_state
        self.fd = fd

    def getsockopt(self, level: int, option: int, size: int) -> bytes:
        return bytes([self.tcp_state])

    def fileno(self) -> int:
        return self.fd


class FakeTransport:
    """Records writes, closes and aborts; `buffered` bytes never leave its write buffer.  `sock`: what
    get_extra_info("socket") gives (none by default)."""

    def __init__(
        self, buffered: int = 0, *, half_close: bool = False, tls: bool = False, sock: FakeSocket | None = None
    ) -> None:
        self.written = bytearray()
        self.closed = False
        self.aborted = False
        self.buffered = buffered
        self.protocol: Any = None
        self.half_close = half_close  # can_write_eof(), as a plain TCP transport
        self.tls = tls  # a TLS client's: test_tunnel's join says so (Tunnel.join's client_tls)
        self.eof_written = False
        self.sock = sock

    def write(self, data: bytes) -> None:
        self.written += data

    def can_write_eof(self) -> bool:
        return self.half_close

    def write_eof(self) -> None:
        assert self.half_close
        self.eof_written = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket" and self.sock is not None:
            return self.sock
        return default

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def set_protocol(self, protocol: Any) -> None:
        self.protocol = protocol

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def pool_context(config: Config) -> ProxyContext:
    """The proxy context of `config` with the state of its pool `p` (the only one a test looks at), a codec
    over the key `k` * 43, no routes and no failure handler."""
    return ProxyContext(
        config=config, codec=TokenCodec(("k" * 43,), 60.0), pools={"p": PoolState(config=config.pools["p"])},
        routes=(), on_backend_failure=lambda *_: None, wall_offset=0.0,
    )


def one_backend_context() -> tuple[ProxyContext, BackendStatus]:
    """A context with pool `p` of one backend, `gw-1`, and that backend (no connection counted yet)."""
    backend_config = BackendConfig("gw-1", "127.0.0.1", 1)
    pool = PoolConfig("p", (backend_config,))
    config = Config(listeners=(), affinity=AffinityConfig(secret_keys=("k" * 43,)), routes=(), pools={"p": pool})
    ctx = pool_context(config)
    return ctx, ctx.pools["p"].backends["gw-1"]


def join_tunnel(ctx: ProxyContext, backend: BackendStatus, client: Any, server: Any, **kwargs: Any) -> Tunnel:
    """`Tunnel.join` over two transports (fake or real) whose protocols were not tunnel ends: each gets a
    fresh end as its protocol first, as the shell's transports have theirs from accept and connect."""
    client_end, server_end = WebSocketClientEnd(), WebSocketServerEnd()
    client.set_protocol(client_end)
    server.set_protocol(server_end)
    return Tunnel.join(ctx, backend, client, server, client_end=client_end, server_end=server_end, **kwargs)

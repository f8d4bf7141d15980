"""A balancer's listening sockets: claimed, bound, taken over at a reload, started.  [asyncio shell]

- `claim` holds a listener's addresses for this `lb run` (`lb.proxy.preamble.claim_address`): a single
  process's, or an owner's for the workers that bind them later, which it first probes so that a port
  in use fails the start at once rather than as workers dying one after the other.
- `bind_listener` binds one listener: an `asyncio.Server` for a plain listener on uvloop (its accept
  path is the cheapest), else an `AcceptingServer` (PROXY protocol, TLS, or asyncio's own loop, whose
  accept spins after EMFILE).  With `adopt` it serves sockets already listening instead: a reload that
  turns TLS or `proxy_protocol` on or off at the same address takes the running socket over (a second
  descriptor on it, `dup_sockets`), so nothing has to bind a busy port and nothing queued is lost.
- `Listening` is what the balancer keeps of a bound listener; `Listening.follow` applies a reload's
  config to a kept one (a TLS listener whose files changed gets a new context).
- Every failure to bind is a `BindError` naming the address, which `lb run` turns into one line and
  exit 2 (SPEC part 2), with nothing left listening.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from lb.config.model import AdminConfig, ListenerConfig, TlsConfig, host_port
from lb.control.admin import AdminRunner
from lb.errors import LbError
from lb.proxy.preamble import AcceptingServer, claim_address, listening_sockets
from lb.proxy.server import client_factory, install_accept_error_filter
from lb.state.context import ProxyContext
from lb.tls import server_ssl_context

log = logging.getLogger(__name__)


class BindError(LbError, OSError):
    """A listener or the admin API cannot bind its address (in use, not ours, no permission)."""

    def __init__(self, what: str, address: str, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        super().__init__(f"cannot listen on {address} ({what}): {reason}")
        self.address = address


@dataclass(slots=True)
class Listening:
    """A bound listener: its config, its server, and the TLS context it serves."""

    config: ListenerConfig
    server: asyncio.Server | AcceptingServer
    ssl_context: ssl.SSLContext | None
    address: tuple[str, int] = field(default=("", 0))
    tls_made_of: tuple[str, str, bytes, bytes] | None = None  # `tls_files`: what ssl_context was built from

    def announce(self) -> None:
        log.info(
            "listening on %s%s%s (backlog %d)",
            host_port(*self.address), " (TLS)" if self.ssl_context else "",
            " (PROXY protocol)" if self.config.proxy_protocol else "", self.config.backlog,
        )

    def follow(self, listener: ListenerConfig) -> None:
        """Take a reload's config for this kept listener (same address, same kind).  No await: it runs
        inside the reload's synchronous swap."""
        made_of = tls_files(listener.tls) if listener.tls is not None else None
        if (
            listener.tls is not None and isinstance(self.server, AcceptingServer)
            # The same files: the same context, whose session cache and ticket keys let clients that
            # reconnect resume (a new one at every reload made each of them a full handshake).
            and made_of != self.tls_made_of
        ):
            # New handshakes use the new certificate; established sessions are untouched.  A new context,
            # not the old one loaded again: OpenSSL holds a certificate per key type, so an RSA pair
            # loaded over an ECDSA one left the ECDSA certificate and its key served to every client
            # that prefers ECDSA (most), and a load that failed halfway left no usable key.  load_config
            # loaded these bytes already; should a context still not be made of them (no memory file
            # to be had), this listener keeps its context, untouched, rather than leave the swap half done.
            try:
                context = server_ssl_context(listener.tls)
            except (OSError, ssl.SSLError) as exc:
                log.error("listener %s keeps its previous certificate: %s", listener.bind, exc)
            else:
                self.server.serve_tls_with(context)
                self.ssl_context, self.tls_made_of = context, made_of
        if isinstance(self.server, AcceptingServer):
            self.server.believe_proxy_headers_from(listener.proxy_protocol_from)
        self.config = listener


def tls_files(tls: TlsConfig) -> tuple[str, str, bytes, bytes]:
    """A TLS listener's paths and what they held when the configuration was read (TlsConfig's equality
    leaves the bytes out, so that config_hash and a reload's comparison see the paths alone)."""
    return tls.cert, tls.key, tls.cert_pem, tls.key_pem


async def bind_listener(
    ctx: ProxyContext, listener: ListenerConfig, *, reuse_port: bool, adopt: list[socket.socket] | None = None,
) -> Listening:
    """Bind one listener; raises BindError (TLS files that do not load are an OSError too).

    `reuse_port`: SO_REUSEPORT, for `workers: N` (each worker binds every listener; the kernel spreads
    connections over them).  With `adopt` (a reload changing a running listener's kind), serve those
    already-listening sockets instead, not accepting until `start_serving`; they are closed if this fails.
    """
    tls_made_of = tls_files(listener.tls) if listener.tls else None
    try:
        ssl_context = server_ssl_context(listener.tls) if listener.tls else None
    except (OSError, ssl.SSLError) as exc:
        for sock in adopt or ():
            sock.close()
        raise BindError("TLS", listener.bind, exc) from exc
    tls = ssl_context is not None
    loop = asyncio.get_running_loop()
    install_accept_error_filter(loop)
    # asyncio's own accept loop (not uvloop's) goes on calling accept() after EMFILE within one
    # wake-up, scheduling a retry for each failure: out of descriptors it spins on a whole core
    # and health checks time out (CPython's selector_events, 3.11 to 3.13).  There, plain
    # listeners accept through AcceptingServer too, which pauses instead (0.1 s, up to 1 s); its task
    # per connection is what asyncio's create_server makes for each one anyway.  So does a plain
    # listener taking over the sockets of a name's several addresses: create_server takes one.
    if (
        listener.proxy_protocol or tls or isinstance(loop, asyncio.selector_events.BaseSelectorEventLoop)
        or (adopt is not None and len(adopt) > 1)
    ):
        # The PROXY header comes before TLS and HTTP alike: this listener reads it itself.  A TLS
        # handshake is a task it holds: its failure frees the connection's count at once, and
        # SIGTERM can wait for it (lb.proxy.preamble).
        try:
            socks = adopt or listening_sockets(
                listener.host, listener.port, backlog=listener.backlog, reuse_port=reuse_port
            )
        except OSError as exc:
            raise BindError("listener", listener.bind, exc) from exc
        accepting = AcceptingServer(
            ctx, socks, ssl_context, proxy_protocol=listener.proxy_protocol,
            proxy_from=listener.proxy_protocol_from, start_serving=adopt is None,
        )
        host, port = socks[0].getsockname()[:2]
        return Listening(listener, accepting, ssl_context, (host, port), tls_made_of)
    where: dict[str, Any] = (
        {"host": listener.host, "port": listener.port, "reuse_address": True, "reuse_port": reuse_port}
        if adopt is None
        else {"sock": adopt[0], "start_serving": False}
    )
    try:
        server = await loop.create_server(client_factory(ctx), backlog=listener.backlog, **where)
    except OSError as exc:
        for sock in adopt or ():
            sock.close()
        raise BindError("listener", listener.bind, exc) from exc
    host, port = server.sockets[0].getsockname()[:2]
    return Listening(listener, server, ssl_context, (host, port))


async def bind_admin(app: web.Application, admin: AdminConfig) -> tuple[web.AppRunner, tuple[str, int]]:
    """Serve the admin API `app` on `admin.bind`; raises BindError.  Returns its runner and address."""
    runner = AdminRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, admin.host, admin.port, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        raise BindError("admin", admin.bind, exc) from exc
    host, port = runner.addresses[0][:2]
    return runner, (host, port)


def match_listeners(
    running: Sequence[Listening], listeners: Sequence[ListenerConfig],
) -> tuple[list[tuple[Listening, ListenerConfig]], list[ListenerConfig]]:
    """A reload's listeners against the running ones: (running listeners to keep with their new
    config, listeners to bind).  Kept: the same address and the same kind (TLS or not, PROXY or not)."""
    wanted = list(listeners)
    keep: list[tuple[Listening, ListenerConfig]] = []
    for listening in running:
        same_bind = next(
            (w for w in wanted if (w.host, w.port) == (listening.config.host, listening.config.port)), None
        )
        if (
            same_bind is not None
            and (same_bind.tls is None) == (listening.ssl_context is None)
            # Reading a PROXY header or not is a different listener: turning it on or off rebinds.
            and same_bind.proxy_protocol == listening.config.proxy_protocol
        ):
            wanted.remove(same_bind)
            keep.append((listening, same_bind))
    return keep, wanted


def dup_sockets(socks: Iterable[Any]) -> list[socket.socket]:
    """A second descriptor on each listening socket (asyncio TransportSockets or sockets): all or none."""
    duplicates: list[socket.socket] = []
    try:
        for sock in socks:
            duplicates.append(socket.socket(fileno=os.dup(sock.fileno())))
    except OSError:
        for duplicate in duplicates:
            duplicate.close()
        raise
    return duplicates


def start_serving(server: asyncio.Server | AcceptingServer) -> None:
    """Start accepting on a listener made with start_serving=False; from inside the synchronous swap."""
    if isinstance(server, AcceptingServer):
        server.start_serving_now()
    else:
        # asyncio.Server.start_serving is a coroutine; the socket queues connections until it runs.
        task = asyncio.get_running_loop().create_task(server.start_serving())
        _background.add(task)
        task.add_done_callback(_background.discard)


_background: set[asyncio.Task[None]] = set()


def claim(listener: ListenerConfig, *, probe: bool) -> list[socket.socket]:
    """Claim `listener`'s addresses for this `lb run` (`claim_address`), held for as long as it runs the
    listener; raise BindError if another claims them, or, with `probe` (the owner of `workers: N`, whose
    workers bind later), if they cannot be bound right now.

    The probe binds every address of a name, as each worker binds them: one taken would fail every
    worker.  Nothing serves the address yet (the workers bind it next), so listening for a moment
    refuses no one.
    """
    try:
        locks = claim_address(listener.host, listener.port)
    except OSError as exc:
        raise BindError("listener", listener.bind, exc) from exc
    if probe:
        try:
            probes = listening_sockets(listener.host, listener.port, backlog=1, reuse_port=False)
        except OSError as exc:
            for lock in locks:
                lock.close()
            raise BindError("listener", listener.bind, exc) from exc
        for sock in probes:
            sock.close()
    return locks


def release(held: dict[tuple[str, int], list[socket.socket]]) -> None:
    """Give up the claims on these addresses (`claim`)."""
    for socks in held.values():
        for sock in socks:
            sock.close()

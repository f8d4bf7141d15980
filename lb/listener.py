"""Where the balancer gets its client-side protocol: kept as a stable import path.

The data plane lives in `lb.proxy`: `lb.proxy.connection` is the sans-I/O
state machine per client connection, `lb.proxy.server` the asyncio Protocol
that turns its actions into I/O.
"""

from __future__ import annotations

from lb.proxy.connection import token_digest
from lb.proxy.server import ClientConnection, client_factory, install_accept_error_filter, stop_in_flight

__all__ = ["ClientConnection", "client_factory", "install_accept_error_filter", "stop_in_flight", "token_digest"]

"""A layer-7 WebSocket load balancer with encrypted cookie session affinity.

The handshake path: proxy.server (the asyncio shell) → proxy.connection (the sans-I/O core:
http.head, http.routing, ws.upgrade, affinity.carriers / codec / decision / balancing,
http.forwarding) → proxy.tunnel.  The health path: control.health / control.discovery →
state.pool → control.admin / control.metrics.  Pure layers: http, ws, affinity, state, config.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ws-affinity-lb")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

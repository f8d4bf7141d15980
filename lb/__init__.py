"""A layer-7 WebSocket load balancer with encrypted cookie session affinity.

The handshake path: listener → routing → affinity (affinity_token, cookies,
balancing) → upstream → tunnel.  The health path: health → pool → admin / metrics.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ws-affinity-lb")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

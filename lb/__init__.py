"""A layer-7 WebSocket load balancer with encrypted cookie session affinity.

The handshake path: listener → routing → affinity (affinity_token, cookies,
balancing) → upstream → tunnel.  The health path: health → pool → admin / metrics.
"""

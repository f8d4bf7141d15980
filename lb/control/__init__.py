"""The control plane: the balancer (start, reload, stop), health checks, DNS discovery, the admin API,
console and metrics, drain migration, and workers with their IPC.
"""

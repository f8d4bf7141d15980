"""HAProxy as the reference column: an equivalent cookie-insert configuration.  [pure]

Equivalent to the balancer's benchmark config: HTTP mode, least-connections,
an inserted affinity cookie that is stripped on the way in and only set when
missing (`cookie SRV insert indirect nocache`), the same /health checks every
second, one thread (`nbthread 1`, as the balancer is one event loop), tunnels
that may idle for an hour, and keep-alive mode (no `option http-server-close`).
Logging follows the balancer's: `make bench` runs the balancer on its shipped defaults,
access log on stderr included, so HAProxy logs a line per request to stderr too
(`log=True`, `option httplog`); the storm turns both off.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Sequence

COOKIE = "SRV"


def find_haproxy() -> str | None:
    """Path of `haproxy` on PATH (or the usual sbin places), or None."""
    found = shutil.which("haproxy")
    if found is None:
        for candidate in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy"):
            found = shutil.which(candidate)
            if found:
                break
    return found


def haproxy_version(path: str) -> str:
    """`2.6.12` or so; `unknown` if `haproxy -v` says nothing usable."""
    try:
        out = subprocess.run([path, "-v"], capture_output=True, text=True, timeout=5, check=False).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    match = re.search(r"version (\S+)", out)
    return match.group(1) if match else "unknown"


def render_config(
    listen: tuple[str, int],
    backends: Sequence[tuple[str, str, int]],
    maxconn: int,
    *,
    redispatch: bool = False,
    idle_timeout: str = "30s",
    backlog: int | None = None,
    name: str = "bench",
    log: bool = False,
) -> str:
    """The configuration text: one thread, leastconn, an inserted indirect nocache cookie, 1h tunnels.

    Args:
        listen: (host, port) of the frontend.
        backends: (id, host, port) of each echo backend; the id is also its cookie value.
        maxconn: process-wide connection limit (HAProxy sizes its file limit from it).
        redispatch: `option redispatch` with `retries 3`, as an operator sets it up for sticky
            WebSockets that survive a gateway loss (the storm's reference).
        idle_timeout: `timeout client` and `timeout server`.
        backlog: the frontend's listen backlog (HAProxy's default when None).
        name: prefix of the frontend and backend names.
        log: one line per request (for a WebSocket, when its tunnel ends) on stderr, as an
            operator logs HAProxy in a container; off, HAProxy logs nothing at all.
    """
    servers = "\n".join(
        f"    server {sid} {host}:{port} cookie {sid} check inter 1s fall 2 rise 2" for sid, host, port in backends
    )
    retry = "    option redispatch\n    retries 3\n" if redispatch else ""
    queue = f" backlog {backlog}" if backlog is not None else ""
    logging = "    log stderr format iso local0 info\n    option httplog\n" if log else ""
    return f"""\
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
{logging}    maxconn {maxconn}
{retry}    timeout connect 3s
    timeout client {idle_timeout}
    timeout server {idle_timeout}
    timeout http-request 10s
    timeout tunnel 1h
    # no "option http-server-close": keep-alive mode, as required for the comparison

frontend {name}_in
    bind {listen[0]}:{listen[1]}{queue}
    default_backend {name}_gateways

backend {name}_gateways
    balance leastconn
    cookie {COOKIE} insert indirect nocache
    option httpchk GET /health
{servers}
"""

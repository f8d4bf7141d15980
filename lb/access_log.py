"""Access log: one line per handshake (or request) and one per closed tunnel, on logger `lb.access`.

Plain format renders `key=value` pairs; with `logging.format: json` the
fields travel as the record's `access` attribute and become JSON keys.
Tokens never appear, only `sha256(token)[:8]` where one matters.
"""

from __future__ import annotations

import logging
from typing import Any

access = logging.getLogger("lb.access")


def _emit(event: str, fields: dict[str, Any]) -> None:
    fields = {"event": event, **fields}
    text = " ".join(f"{key}={value}" for key, value in fields.items())
    access.info("%s", text, extra={"access": fields})


def log_request(**fields: Any) -> None:
    """client, method, path, pool, backend, affinity, status (all keyword arguments)."""
    if access.isEnabledFor(logging.INFO):
        _emit("request", fields)


def log_tunnel_closed(**fields: Any) -> None:
    """client, pool, backend, duration, bytes_in, bytes_out (all keyword arguments)."""
    if access.isEnabledFor(logging.INFO):
        _emit("tunnel_closed", fields)

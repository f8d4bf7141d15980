"""Access log: one line per handshake (or request) and one per closed tunnel, on logger `lb.access`.

Plain format renders `key=value` pairs (a value with a space, a quote, a control or
non-ASCII character is written as a JSON string, so client input cannot forge a field
or reach a terminal raw); with `logging.format: json` the
fields travel as the record's `access` attribute and become JSON keys.
Tokens never appear, only `sha256(token)[:8]` where one matters.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

access = logging.getLogger("lb.access")


# A plain value printed as is: visible ASCII, no quote.  Anything else (a space that would forge a
# `status=200` field, an escape sequence for the operator's terminal, non-ASCII) is quoted and escaped.
_BARE = re.compile(r'[!#-~]+')


def plain_value(value: object) -> str:
    """`value` for a `key=value` pair: as is when it is plain visible ASCII, else a JSON string."""
    text = str(value)
    return text if _BARE.fullmatch(text) else json.dumps(text)


def _emit(event: str, fields: dict[str, Any]) -> None:
    fields = {"event": event, **fields}
    text = " ".join(f"{key}={plain_value(value)}" for key, value in fields.items())
    access.info("%s", text, extra={"access": fields})


def log_request(**fields: Any) -> None:
    """client, method, path, pool, backend, affinity, status (all keyword arguments)."""
    if access.isEnabledFor(logging.INFO):
        _emit("request", fields)


def log_tunnel_closed(**fields: Any) -> None:
    """client, pool, backend, duration, bytes_in, bytes_out (all keyword arguments)."""
    if access.isEnabledFor(logging.INFO):
        _emit("tunnel_closed", fields)

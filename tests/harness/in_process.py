"""The configuration of a balancer a unit test runs in-process (`lb.control.balancer.Balancer`)."""

from __future__ import annotations


def in_process_config(listeners: str) -> str:
    """`listeners` (the YAML list items under `listeners:`), an admin port the kernel picks, and one pool
    whose backend (port 9, the discard port) is never reached: its health is checked hourly."""
    return f"""
listeners:
{listeners.rstrip()}
admin: {{bind: "127.0.0.1:0"}}
affinity: {{secret_keys: ["{'k' * 43}"]}}
pools:
  p:
    backends: [{{id: a, address: "127.0.0.1:9"}}]
    health_check: {{type: tcp, interval: 1h}}
routes: [{{path_prefix: /, pool: p}}]
"""

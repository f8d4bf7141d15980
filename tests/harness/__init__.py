"""The test harness: the real processes, clients and scripted peers the tests drive.

Process launchers, clients, raw frames and spy backends live here, each module with what it owns;
`tests/integration/conftest.py` only wires them into fixtures.  Nothing here imports `lb` but
`fake_tunnels`, which builds the product's own tunnels for the unit tests.

- `processes`: demo gateways (`python -m backends_demo`) and balancers (`python -m lb run`) on free
  loopback ports, ready once they answer, stopped by PID; configurations; the shared stack.
- `spy`: an HTTP backend in this process that records every request the balancer forwards to it.
- `clients`: aiohttp WebSocket and HTTP clients, cookies, the admin API's reads, client addresses.
- `raw`: raw sockets for hostile bytes and hand-made WebSocket frames.
- `recording`: a raw-socket backend that keeps every byte it gets, per connection, with a scripted answer.
- `scripted`: a WebSocket backend in a thread, for what a demo gateway will not do on request.
- `tcp`: one threaded TCP server for scripted peers (backends, admin APIs, black holes).
- `dns_server`: a real DNS server on loopback whose zone a test changes.
- `ops`: the operations tests' helpers (admin posts, signals, config rewrites, polling, close frames).
- `in_process`, `polling`, `fake_tunnels`: for unit tests (an in-process balancer's configuration,
  polling a condition against a deadline, tunnels over fake transports).

The constants below are shared by all of them.  Every wait is bounded by a deadline in units of `UNIT`
seconds (`LB_TEST_UNIT=2` on a slow machine).
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
UNIT = float(os.environ.get("LB_TEST_UNIT", "1"))  # seconds; every deadline is a multiple of it
HOST = "127.0.0.1"
COOKIE = "LB_AFFINITY"
APP_COOKIE = "APP_SID"  # the demo gateways' own session cookie in the shared stack
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3

GATEWAY_READY = 10 * UNIT
BALANCER_READY = 15 * UNIT
STOP_WAIT = 5 * UNIT

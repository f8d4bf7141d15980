"""`make bench`: echo backends, the balancer (and HAProxy when installed) and a load generator, one table.

What it owns, by data flow:

- `wire`       handshake heads and RFC 6455 frames for a client and a lean echo server [pure]
- `echo_server` the backend: raw asyncio Protocol, 101 + hello, echoes frames, GET /health
- `loadgen`    the load: echo ping-pong, pipelined streams, handshake workers, idle tunnels;
               samples the proxy's CPU (/proc/PID/stat) and RSS (/proc/PID/status) itself,
               so the samples bracket the measured window exactly
- `procs`      starting, pinning (taskset), readiness and stopping of child processes, /proc readers
- `haproxy`    an equivalent cookie-insert HAProxy configuration                       [pure]
- `report`     the table and the JSON document                                           [pure]
- `runner`     the orchestration: scenarios by targets, the `workers` variant, the header

It leaves the balancer alone: everything talks to `python -m lb run` over sockets, like a client.
It is a benchmark, not a test: nothing in `make test` runs it (a smoke test covers the pure parts).
"""

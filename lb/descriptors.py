"""The process's descriptor limit, raised to its hard limit at start (as HAProxy and Go do).  [I/O: rlimits]

A host's soft RLIMIT_NOFILE is often 1024 (a login shell, systemd's default) under a hard limit of
524288 or more.  At 1024 the balancer ran out of descriptors at about 500 clients, whatever
`limits.max_connections` said: the event loop's accept then fails, and uvloop resets the clients it
cannot take.  Raising the soft limit up to the hard one needs no privilege.  What the hard limit still
does not allow is said at start and on reload, by `lb.config.advice` (`descriptors=`).
"""

from __future__ import annotations

import contextlib
import resource

# When the hard limit is unlimited: Linux's default fs.nr_open, above which setrlimit fails.
UNLIMITED_TARGET = 1 << 20


def raise_descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one where it is lower; returns the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = UNLIMITED_TARGET if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        # A lower fs.nr_open, a sandbox: the limit stays, and the advice says what it allows.
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return descriptor_limit()


def descriptor_limit() -> int:
    """The soft RLIMIT_NOFILE now in force."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return UNLIMITED_TARGET if soft == resource.RLIM_INFINITY else soft

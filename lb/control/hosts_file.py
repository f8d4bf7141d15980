"""/etc/hosts, as the C library reads it before DNS: the system resolver's first answer for a name it lists.

`discovery.nameservers: []` means "the system resolver" (SPEC part 2), and the system resolver of a
Linux host is NSS's `hosts: files dns`: a name /etc/hosts lists (`localhost`, a Kubernetes pod's
`hostAliases`, an operator's pinned name) is answered from the file, and DNS is not asked.  dnspython
asks the nameservers of /etc/resolv.conf only, so `dns: localhost` found nothing (NXDOMAIN) where
`getent hosts localhost` and every other program on the host find 127.0.0.1.

`parse_hosts` is pure; `HostsFile` rereads the file when it changes (looked at once a second at most:
a stat, on the loop, of a local file).
"""

from __future__ import annotations

import ipaddress
import logging
import os
import stat as stat_mode
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

HOSTS_PATH = Path("/etc/hosts")
MAX_HOSTS_BYTES = 1 << 20  # a hosts file past this is read no further (real ones are a few hundred bytes)
MAX_ADDRESSES_PER_NAME = 256  # as many as discovery could use (max_backends' cap is larger, but no file needs it)
RECHECK_EVERY = 1.0  # seconds between looks at whether the file changed


def parse_hosts(text: str) -> dict[str, tuple[str, ...]]:
    """name (lower case, no trailing dot) → its addresses in the file's order, each once, the first
    MAX_ADDRESSES_PER_NAME of them.

    As glibc reads it: `#` starts a comment, the first field is an address, the others its names;
    a line whose address does not parse is skipped.  A scoped IPv6 address (`fe80::1%eth0`) is
    skipped too: a backend address carries no zone.  Linear in the file (an ordered set per name:
    a list searched per line took 16 s over 60,000 lines of one name, on the event loop).
    """
    table: dict[str, dict[str, None]] = {}
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split()
        if len(fields) < 2:
            continue
        try:
            address = ipaddress.ip_address(fields[0])
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address) and address.scope_id:
            continue
        for name in fields[1:]:
            listed = table.setdefault(name.lower().rstrip("."), {})
            if len(listed) < MAX_ADDRESSES_PER_NAME:
                listed[str(address)] = None
    return {name: tuple(addresses) for name, addresses in table.items()}


class HostsFile:
    """The hosts file, reread when its size, time or inode changes; a missing or unreadable one lists nothing."""

    def __init__(self, path: Path = HOSTS_PATH, clock: Callable[[], float] | None = None) -> None:
        self.path = path
        self._clock = clock or time.monotonic
        self._checked: float | None = None
        self._seen: tuple[int, int, int] | None = None
        self._table: dict[str, tuple[str, ...]] = {}

    def addresses(self, name: str) -> tuple[str, ...]:
        """The addresses the file lists for `name` (case and a trailing dot do not matter), or ()."""
        now = self._clock()
        if self._checked is None or now - self._checked >= RECHECK_EVERY:
            self._checked = now
            self._reread()
        return self._table.get(name.lower().rstrip("."), ())

    def _reread(self) -> None:
        try:
            stat = os.stat(self.path)
        except OSError:
            self._seen, self._table = None, {}
            return
        seen = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        if seen == self._seen:
            return
        self._seen = seen  # a file that cannot be read is said once, not at every look
        try:
            # Non-blocking, and its type checked on what was opened: a FIFO or a device in its place would
            # block the loop's read (a FIFO without a writer, for good).
            descriptor = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(descriptor, "rb") as file:
                if not stat_mode.S_ISREG(os.fstat(descriptor).st_mode):
                    self._table = {}
                    return
                data = file.read(MAX_HOSTS_BYTES + 1)
        except OSError as exc:
            log.warning("discovery: cannot read %s: %s", self.path, exc)
            self._table = {}
            return
        if len(data) > MAX_HOSTS_BYTES:  # read no further, and not the line the cut falls in
            data = data[: data.rfind(b"\n", 0, MAX_HOSTS_BYTES) + 1]
            log.warning("discovery: %s is larger than %d bytes; only its first lines are read", self.path,
                        MAX_HOSTS_BYTES)
        self._table = parse_hosts(data.decode("utf-8", errors="replace"))


"""lb.proxy.preamble.claim_address: how the owner of `workers: N` holds its listeners' addresses for its workers.

On loopback sockets: what the kernel's bind rules give (SO_REUSEPORT alone on a socket that does not listen)
is the point of it, and no stand-in would show it.
"""

from __future__ import annotations

import errno
import socket

import pytest

from lb.proxy.preamble import claim_address, listening_sockets

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def test_a_claimed_address_takes_the_workers_binds_and_no_other() -> None:
    port = _free_port()
    claimed = claim_address(HOST, port)
    try:
        # Another `lb run` (its lock), another owner's check or a single process (a plain bind): in use.
        for attempt in (lambda: claim_address(HOST, port),
                        lambda: listening_sockets(HOST, port, backlog=1, reuse_port=False),
                        lambda: listening_sockets("0.0.0.0", port, backlog=1, reuse_port=False)):
            with pytest.raises(OSError) as refused:
                attempt()
            assert refused.value.errno == errno.EADDRINUSE
        # The workers' own binds join it, and the connections reach them, never the claim.
        workers = listening_sockets(HOST, port, backlog=8, reuse_port=True) + listening_sockets(
            HOST, port, backlog=8, reuse_port=True)
        clients = [socket.create_connection((HOST, port), timeout=2) for _ in range(4)]
        accepted = 0
        for worker in workers:
            worker.settimeout(0.5)
            while True:
                try:
                    worker.accept()[0].close()
                except TimeoutError:
                    break
                accepted += 1
        assert accepted == len(clients)
        for sock in workers + clients:
            sock.close()
        # Every worker down (being restarted): the address is still claimed.
        with pytest.raises(OSError):
            listening_sockets(HOST, port, backlog=1, reuse_port=False)
    finally:
        for sock in claimed:
            sock.close()
    # Given up: free for whoever comes next.
    for sock in claim_address(HOST, port):
        sock.close()


def test_a_port_in_use_is_not_claimed_and_nothing_is_left_held() -> None:
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = int(taken.getsockname()[1])
        with pytest.raises(OSError) as refused:
            claim_address(HOST, port)
        assert refused.value.errno == errno.EADDRINUSE
    for sock in claim_address(HOST, port):  # the failed claim's lock was given up
        sock.close()

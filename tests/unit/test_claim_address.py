"""lb.proxy.preamble.claim_address: the lock a `lb run` takes on each address it listens at.

On real abstract-namespace sockets: that two claims of one address exclude each other, in this process as
between two, is the kernel's doing, and no stand-in would show it.
"""

from __future__ import annotations

import errno
import socket

import pytest

from lb.proxy.preamble import claim_address

HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def test_an_address_is_claimed_once_until_given_up() -> None:
    port = _free_port()
    claimed = claim_address(HOST, port)
    assert claimed, "a lock per address"
    try:
        with pytest.raises(OSError) as refused:
            claim_address(HOST, port)
        assert refused.value.errno == errno.EADDRINUSE and "another lb run claims it" in str(refused.value)
        # `localhost` resolves to 127.0.0.1 too: the same address, whatever its spelling.
        with pytest.raises(OSError):
            claim_address("localhost", port)
        for sock in claim_address(HOST, port + 1 if port < 65535 else port - 1):  # another port: another claim
            sock.close()
    finally:
        for sock in claimed:
            sock.close()
    for sock in claim_address(HOST, port):  # given up: free for whoever comes next
        sock.close()


def test_port_0_takes_no_claim() -> None:
    """Each listener on port 0 gets a port of its own: there is nothing two of them could both take."""
    assert claim_address(HOST, 0) == [] and claim_address(HOST, 0) == []


def test_the_claim_is_no_bind() -> None:
    """A port bound by anyone (a TIME_WAIT of an earlier server's, a server of another kind) is the binds'
    business: the claim neither fails for it nor keeps it from being bound."""
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        port = int(taken.getsockname()[1])
        claimed = claim_address(HOST, port)
    try:
        with socket.socket() as after:
            after.bind((HOST, port))
    finally:
        for sock in claimed:
            sock.close()

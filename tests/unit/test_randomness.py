"""lb.affinity.randomness: sessions and nonces taken from blocks of the system's randomness, each byte
handed out once, and a forked child never repeating its parent's."""

from __future__ import annotations

import os
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lb.affinity import randomness
from lb.affinity.codec import NONCE_BYTES, SESSION_BYTES
from lb.affinity.randomness import RandomPool
from lb.proxy.connection import Connection


class _Counting:
    """A source of distinct blocks (a running counter over 2 bytes), recording the size of each read."""

    def __init__(self) -> None:
        self.reads: list[int] = []
        self._next = 0

    def __call__(self, n: int) -> bytes:
        self.reads.append(n)
        out = b"".join((self._next + i).to_bytes(2, "big") for i in range(n // 2 + 1))[:n]
        self._next += n // 2 + 1
        return out


@given(st.lists(st.integers(0, 40), max_size=60), st.integers(1, 64))
@settings(max_examples=300)
def test_bytes_are_taken_in_order_each_once_a_new_block_when_one_runs_short(sizes: list[int], block: int) -> None:
    """Each take is the next slice of the block read last; what a block has left when a take needs more
    is dropped (never joined to the next block's), and a take larger than a block gets a block of its own."""
    source = _Counting()
    pool = RandomPool(source, block_bytes=block)
    for n in sizes:
        block_before, at_before, reads_before = pool._block, pool._at, len(source.reads)
        taken = pool.take(n)
        assert len(taken) == n
        if len(source.reads) == reads_before:  # from the same block: right after the last take
            assert pool._block is block_before and pool._at == at_before + n
        else:  # from a new block, from its start
            assert pool._at == n
        assert pool._block[pool._at - n:pool._at] == taken
    assert source.reads == [max(block, n) for n in _refills(sizes, block)]


def _refills(sizes: list[int], block: int) -> list[int]:
    """The sizes of the takes that needed a new block."""
    refills, left = [], 0
    for n in sizes:
        if n > left:
            refills.append(n)
            left = max(block, n)
        left -= n
    return refills


def test_no_two_takes_share_bytes_of_the_real_source() -> None:
    """2,000 sessions-and-nonces (20 bytes) and nonces (12) from os.urandom: all distinct."""
    pool = RandomPool()
    taken = [pool.take(20 if i % 2 else 12) for i in range(2000)]
    assert len(set(taken)) == len(taken)


@pytest.mark.skipif(not hasattr(os, "fork") or sys.platform != "linux", reason="fork is a Linux process's")
def test_a_forked_child_does_not_repeat_its_parents_bytes() -> None:
    """The child's next bytes come from a block of its own, not from what the parent will hand out next."""
    randomness.take_random(12)  # the parent has a block with bytes left
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next 12 bytes, to the parent
        try:
            os.write(write_end, randomness.take_random(12))
        finally:
            os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 64)
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child) == 12
    assert child != randomness.take_random(12)


def test_a_connection_takes_its_randomness_from_the_pool() -> None:
    """The wiring: a connection made as the shell makes it (no `random`) seals with take_random, not a
    system call per client: an issuing handshake moves the pool along by a session and a nonce."""
    from tests.unit.test_connection import SWITCH, Play, upgrade

    play = Play()
    play.conn = Connection(play.ctx, client_ip="192.0.2.7", client_port=4711, tls=False)
    play.start = play._apply(play.conn.start(play.now))
    before = (randomness._POOL._block, randomness._POOL._at)
    play.client(upgrade())
    play.connected()
    play.backend(SWITCH)
    assert b"\r\nSet-Cookie: " in play.to_client  # a token was issued
    after = (randomness._POOL._block, randomness._POOL._at)
    assert after != before
    assert after[0] is not before[0] or after[1] == before[1] + SESSION_BYTES + NONCE_BYTES

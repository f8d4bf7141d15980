"""What `lb.proxy.tunnel.read_what_is_left` relies on, under both event loops the balancer runs on: in
`connection_lost` the transport's socket is still the lost connection's own (its descriptor is not yet
closed, so not one the kernel may have given to another client), and once it is closed it reports -1.

A loop that closed the descriptor before `connection_lost` would have the balancer read another
connection's bytes into this one: these tests fail first if an upgrade of uvloop or Python changes that.
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct
from collections.abc import Callable

import pytest

from lb.proxy.tunnel import backend_has_reset, read_what_is_left

_NO_LINGER = struct.pack("ii", 1, 0)
ANSWER = b"HTTP/1.1 413 Content Too Large\r\ncontent-length: 0\r\n\r\n"


def _loop_factory(name: str) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        return uvloop.new_event_loop  # type: ignore[no-any-return]
    return asyncio.SelectorEventLoop


class _Watched(asyncio.Protocol):
    """Notes the socket's identity when made, and what `read_what_is_left` finds when lost."""

    def __init__(self) -> None:
        self.lost: asyncio.Future[tuple[BaseException | None, bool, bytes]] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.inode = os.fstat(transport.get_extra_info("socket").fileno()).st_ino
        transport.pause_reading()  # type: ignore[attr-defined]  # what the peer sends stays in the kernel

    def connection_lost(self, exc: Exception | None) -> None:
        sock = self.transport.get_extra_info("socket")
        own = os.fstat(sock.fileno()).st_ino == self.inode
        left: list[bytes] = []
        read_what_is_left(self.transport, lambda data: left.append(data) is None)
        self.lost.set_result((exc, own, b"".join(left)))


async def _connected() -> tuple[asyncio.Transport, _Watched, socket.socket]:
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        transport, protocol = await loop.create_connection(_Watched, *listener.getsockname()[:2])
        peer, _ = listener.accept()
    return transport, protocol, peer


async def _reset_after_answering(transport: asyncio.Transport, peer: socket.socket) -> None:
    """The peer answers, then closes with our bytes unread: a reset, which our side has heard once this returns."""
    peer.sendall(ANSWER)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _NO_LINGER)
    peer.close()
    for _ in range(200):
        if backend_has_reset(transport):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the peer's reset never reached our socket")


async def _write_meets_the_reset() -> tuple[asyncio.Transport, tuple[BaseException | None, bool, bytes]]:
    transport, protocol, peer = await _connected()
    await _reset_after_answering(transport, peer)
    transport.write(b"x" * 1024)
    return transport, await asyncio.wait_for(protocol.lost, 5)


async def _flush_after_close_meets_the_reset() -> tuple[asyncio.Transport, tuple[BaseException | None, bool, bytes]]:
    transport, protocol, peer = await _connected()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    transport.write(b"y" * (16 << 20))  # more than the kernel takes: some stays in our buffer
    transport.close()
    assert transport.get_write_buffer_size() > 0
    await _reset_after_answering(transport, peer)
    return transport, await asyncio.wait_for(protocol.lost, 5)


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("path", [_write_meets_the_reset, _flush_after_close_meets_the_reset])
def test_connection_lost_reads_its_own_socket_which_reports_minus_one_once_closed(
    loop: str, path: Callable[[], object]
) -> None:
    """A write (or a close's flush) that meets the peer's reset: `connection_lost` sees its own socket, and
    reads what the peer sent before the reset; after it, the socket reports descriptor -1."""

    async def run() -> None:
        transport, (exc, own, left) = await path()  # type: ignore[misc]
        assert isinstance(exc, OSError), exc
        assert own, "connection_lost ran after the transport's descriptor was closed or reused"
        assert left == ANSWER
        await asyncio.sleep(0)
        sock = transport.get_extra_info("socket")
        assert sock is None or sock.fileno() == -1

    with asyncio.Runner(loop_factory=_loop_factory(loop)) as runner:
        runner.run(asyncio.wait_for(run(), 10))

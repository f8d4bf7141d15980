"""A listener bound by a name listens on every address the name resolves to, whichever way it accepts.

`loop.create_server` (plain listeners on uvloop) binds each address of a name; TLS and PROXY-protocol
listeners, which accept themselves (`lb.proxy.preamble.AcceptingServer`), do the same through
`listening_sockets`, and so does a listener whose kind a reload changes.  The name is made to resolve
to two loopback addresses here (a patched `socket.getaddrinfo`): on this machine `localhost` has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from test_connection import CONFIG

from lb.config.load import load_config, parse_config
from lb.config.model import ListenerConfig
from lb.control.balancer import Balancer
from lb.control.listening import BindError, claim
from lb.proxy.preamble import AcceptingServer, listening_sockets
from lb.proxy.server import wall_offset
from lb.state.context import ProxyContext
from tests.harness.in_process import in_process_config
from tests.harness.polling import wait_for

NAME = "two.test"
ADDRESSES = ("127.0.0.1", "127.0.0.2")


def _free_port_on_both() -> int:
    """A port free on both addresses (the kernel's pick on the first, checked on the second)."""
    for _ in range(50):
        with socket.socket() as first, socket.socket() as second:
            first.bind((ADDRESSES[0], 0))
            port = int(first.getsockname()[1])
            with contextlib.suppress(OSError):
                second.bind((ADDRESSES[1], port))
                return port
    raise AssertionError("no port free on both addresses")


@pytest.fixture
def two_addresses(monkeypatch: pytest.MonkeyPatch) -> None:
    """`two.test` resolves to 127.0.0.1 and 127.0.0.2 (and again to the first: a duplicate is bound once)."""
    real: Callable[..., Any] = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != NAME:
            return real(host, port, *args, **kwargs)
        return [info for address in (*ADDRESSES, ADDRESSES[0]) for info in real(address, port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


@pytest.mark.usefixtures("two_addresses")
def test_a_name_is_bound_on_each_of_its_addresses_once() -> None:
    port = _free_port_on_both()
    socks = listening_sockets(NAME, port, backlog=16, reuse_port=False)
    try:
        assert sorted(sock.getsockname() for sock in socks) == [(address, port) for address in ADDRESSES]
    finally:
        for sock in socks:
            sock.close()


@pytest.mark.usefixtures("two_addresses")
def test_a_name_whose_second_address_is_taken_binds_none_of_them() -> None:
    port = _free_port_on_both()
    with socket.socket() as taken:
        taken.bind((ADDRESSES[1], port))
        taken.listen()
        with pytest.raises(OSError):
            listening_sockets(NAME, port, backlog=16, reuse_port=False)
    with socket.socket() as again:
        again.bind((ADDRESSES[0], port))  # the first address's socket was closed with the failure


def test_an_address_of_a_family_the_host_lacks_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    """`localhost` as ::1 and 127.0.0.1 on a kernel without IPv6: the listener is on 127.0.0.1, as
    create_server's would be; with no address left at all, the error is the family's."""
    real_socket, real_getaddrinfo = socket.socket, socket.getaddrinfo

    def no_ipv6(family: int = socket.AF_INET, *args: Any, **kwargs: Any) -> socket.socket:
        if family == socket.AF_INET6:
            raise OSError(errno.EAFNOSUPPORT, "Address family not supported by protocol")
        return real_socket(family, *args, **kwargs)

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        names = {NAME: ("::1", ADDRESSES[0]), "six.test": ("::1",)}
        return [info for address in names[host] for info in real_getaddrinfo(address, port, *args, **kwargs)]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    monkeypatch.setattr(socket, "socket", no_ipv6)
    (sock,) = listening_sockets(NAME, 0, backlog=16, reuse_port=False)
    try:
        assert sock.getsockname()[0] == ADDRESSES[0]
    finally:
        sock.close()
    with pytest.raises(OSError) as info:
        listening_sockets("six.test", 0, backlog=16, reuse_port=False)
    assert info.value.errno == errno.EAFNOSUPPORT


@pytest.mark.usefixtures("two_addresses")
def test_the_owner_of_workers_probes_every_address_of_a_name() -> None:
    """Each worker binds all of them: one taken must stop the start (or reload) before any worker fails."""
    port = _free_port_on_both()
    listener = ListenerConfig(host=NAME, port=port)
    for lock in claim(listener, probe=True):  # both free
        lock.close()
    with socket.socket() as taken:
        taken.bind((ADDRESSES[1], port))
        taken.listen()
        with pytest.raises(BindError):
            claim(listener, probe=True)
    for lock in claim(listener, probe=True):  # and the probe left nothing bound behind, nor the claim a lock
        lock.close()


@pytest.mark.usefixtures("two_addresses")
async def test_an_accepting_listener_serves_every_address_and_closes_them_all() -> None:
    ctx = ProxyContext.build(
        parse_config(CONFIG, base_dir=Path("."), environ={}), lambda *_: None, wall_offset=wall_offset()
    )
    port = _free_port_on_both()
    socks = listening_sockets(NAME, port, backlog=16, reuse_port=False)
    server = AcceptingServer(ctx, socks, None, proxy_protocol=False)
    writers = []
    try:
        for address in ADDRESSES:
            _, writer = await asyncio.open_connection(address, port)
            writers.append(writer)
        await wait_for(lambda: len(ctx.in_flight) == 2, within=5.0)
        assert server.sockets == tuple(socks)
    finally:
        server.close()
        for writer in writers:
            writer.close()
    assert all(sock.fileno() == -1 for sock in socks)
    for address in ADDRESSES:
        with pytest.raises(ConnectionRefusedError):
            await asyncio.open_connection(address, port)
    for connection in list(ctx.in_flight):
        connection._close(abort=True)


async def _answer(address: str, port: int) -> bytes:
    """What a plain request to (address, port) gets before the connection closes (b"" when cut)."""
    reader, writer = await asyncio.open_connection(address, port)
    try:
        writer.write(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n")
        return await asyncio.wait_for(reader.read(), 10.0)
    except ConnectionResetError:
        return b""
    finally:
        writer.close()


@pytest.mark.usefixtures("two_addresses")
def test_a_reload_changing_the_kind_of_a_listener_on_two_addresses_keeps_both(tmp_path: Path) -> None:
    """A PROXY-protocol listener on both addresses of a name, reloaded to plain on uvloop: the plain
    listener takes over both sockets (create_server would take one), and answers on each."""
    uvloop = pytest.importorskip("uvloop")
    port = _free_port_on_both()
    config_path = tmp_path / "lb.yaml"
    text = in_process_config(f'  - {{bind: "{NAME}:{port}", proxy_protocol: true}}')
    config_path.write_text(text)

    async def scenario() -> None:
        balancer = Balancer(load_config(config_path), config_path)
        await balancer.start()
        try:
            assert [await _answer(address, port) for address in ADDRESSES] == [b"", b""]  # no PROXY header
            config_path.write_text(text.replace(", proxy_protocol: true", ""))
            assert await balancer.reload()
            for address in ADDRESSES:
                assert (await _answer(address, port)).startswith(b"HTTP/1.1 5"), address  # 502/503: no backend
        finally:
            await balancer.stop()

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(scenario())


@pytest.mark.parametrize("reuse_port", [False, True])
def test_so_reuseport_is_set_only_when_asked(reuse_port: bool) -> None:
    """SO_REUSEPORT only for `workers: N` (their shared sockets): a lone `lb run` keeps its port to itself."""
    (sock,) = listening_sockets("127.0.0.1", 0, backlog=16, reuse_port=reuse_port)
    with sock:
        assert bool(sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)) is reuse_port
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)

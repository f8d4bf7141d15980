"""The PROXY header parser against the reference sender: HAProxy's `send-proxy` and `send-proxy-v2`.

HAProxy (the author of the protocol) runs in `mode tcp` in front of a plain
capturing socket; a client connects through it from 127.0.0.2, and what
arrives is fed to `lb.http.proxy_header.parse_proxy_header`.  This checks the pure
parser on real bytes (v1 text, v2 binary with a CRC32C TLV, v2 LOCAL from a
health check), the way an NLB or HAProxy would send them in production.
Skipped, with the reason, when `haproxy` is not installed.
"""

from __future__ import annotations

import functools
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.procs import free_port
from lb.http.proxy_header import Command, Family, ProxyHeader, parse_proxy_header
from tests.harness import HOST, UNIT
from tests.harness.processes import connects, poll_while_running, stop_process

HAPROXY = shutil.which("haproxy") or shutil.which("/usr/sbin/haproxy")
pytestmark = pytest.mark.skipif(HAPROXY is None, reason="haproxy is not installed (apt-get install haproxy)")

CLIENT_IP = "127.0.0.2"
PAYLOAD = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"


def _read_header(conn: socket.socket, deadline: float) -> tuple[ProxyHeader, bytes]:
    """Read until a complete header (and return it with whatever followed it)."""
    data = b""
    while time.monotonic() < deadline:
        conn.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = conn.recv(4096)
        if not chunk:
            break
        data += chunk
        header = parse_proxy_header(data)
        if header is not None:
            return header, data[header.consumed :]
    raise AssertionError(f"no complete PROXY header before the deadline or EOF; got {data!r}")


@pytest.fixture(scope="module")
def relays(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[socket.socket, dict[str, int], socket.socket]]:
    """A capturing listener and HAProxy frontends that relay to it with v1, v2 and v2+CRC32C headers.

    A second listener only receives HAProxy's health checks, sent with `check-send-proxy` (v2 LOCAL).
    """
    assert HAPROXY is not None
    workdir: Path = tmp_path_factory.mktemp("haproxy-pp")
    sink = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sink.bind((HOST, 0))
    sink.listen(16)
    sink_port = sink.getsockname()[1]
    checked = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    checked.bind((HOST, 0))
    checked.listen(16)
    checked_port = checked.getsockname()[1]
    ports = {"v1": free_port(), "v2": free_port(), "v2crc": free_port()}
    options = {"v1": "send-proxy", "v2": "send-proxy-v2", "v2crc": "send-proxy-v2 proxy-v2-options crc32c"}
    sections = [
        "global\n    nbthread 1\n",
        "defaults\n    mode tcp\n    timeout connect 2s\n    timeout client 5s\n    timeout server 5s\n",
    ]
    for name, port in ports.items():
        sections.append(
            f"listen {name}\n    bind {HOST}:{port}\n    server sink {HOST}:{sink_port} {options[name]}\n"
        )
    sections.append(
        f"backend checked\n    server sink {HOST}:{checked_port} send-proxy-v2 check check-send-proxy inter 200ms\n"
    )
    config = workdir / "haproxy.cfg"
    config.write_text("\n".join(sections))
    log = (workdir / "haproxy.log").open("wb")
    proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 10 * UNIT
        for port in ports.values():
            poll_while_running(
                proc, functools.partial(connects, port, timeout=UNIT), within=max(0.0, deadline - time.monotonic()),
                who="haproxy", what=f"not listening on {port}", tail=(workdir / "haproxy.log").read_text,
            )
            # The readiness probe was relayed too: take its connection off the sink.
            sink.settimeout(5 * UNIT)
            sink.accept()[0].close()
        yield sink, ports, checked
    finally:
        stop_process(proc)
        log.close()
        sink.close()
        checked.close()


@pytest.mark.parametrize(("name", "version"), [("v1", 1), ("v2", 2), ("v2crc", 2)])
def test_haproxy_headers_give_the_client_address(
    relays: tuple[socket.socket, dict[str, int], socket.socket], name: str, version: int
) -> None:
    """What HAProxy sends parses to the client's address and port; the client's bytes follow intact."""
    sink, ports, _ = relays
    deadline = time.monotonic() + 5 * UNIT
    with socket.create_connection((HOST, ports[name]), timeout=5 * UNIT, source_address=(CLIENT_IP, 0)) as client:
        client.sendall(PAYLOAD)
        client_port = client.getsockname()[1]
        sink.settimeout(5 * UNIT)
        conn, _ = sink.accept()
        with conn:
            header, rest = _read_header(conn, deadline)
            while len(rest) < len(PAYLOAD) and time.monotonic() < deadline:
                rest += conn.recv(4096)
    assert header.version == version
    assert header.command is Command.PROXY
    assert header.family is Family.TCP4
    assert header.source == (CLIENT_IP, client_port)
    assert header.destination == (HOST, ports[name])
    assert rest == PAYLOAD
    if name == "v2crc":
        assert [kind for kind, _ in header.tlvs] == [0x03]  # PP2_TYPE_CRC32C
        assert len(header.tlvs[0][1]) == 4


def test_haproxy_health_check_is_local(relays: tuple[socket.socket, dict[str, int], socket.socket]) -> None:
    """A health check with `check-send-proxy` is a v2 LOCAL header: no client address, use the peer."""
    _, _, checked = relays
    checked.settimeout(5 * UNIT)
    conn, _ = checked.accept()
    with conn:
        header, _ = _read_header(conn, time.monotonic() + 5 * UNIT)
    assert header.version == 2
    assert header.command is Command.LOCAL
    assert header.client_ip is None

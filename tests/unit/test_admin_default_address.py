"""The admin API's default address, taken, costs an instance its admin API, not its start.

Without `admin.bind` the API takes 127.0.0.1:9000: a second instance on one host, written with no
admin section as the first was (two instances sharing keys), found it taken and exited 2.  An address
the operator wrote and cannot have still stops the start (SPEC part 2: one line naming it, exit 2).
The taken "default" here is a port this test holds, not 9000 itself, which other processes may use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
from pathlib import Path

import pytest

from lb.config.load import parse_config
from lb.config.model import AdminConfig
from lb.control.balancer import Balancer
from lb.control.listening import BindError
from tests.harness.in_process import in_process_config

SECTIONLESS = in_process_config('  - bind: "127.0.0.1:0"').replace('admin: {bind: "127.0.0.1:0"}\n', "")


def _taken() -> socket.socket:
    """A loopback port this test holds, listening: an address another process has."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    return holder


@pytest.mark.parametrize(("section", "given"), [
    ("", False), ("admin: {token: t-0123456789abcdef}\n", False), ('admin: {bind: "127.0.0.1:9000"}\n', True),
])
def test_whether_the_address_was_written_is_kept(tmp_path: Path, section: str, given: bool) -> None:
    config = parse_config(SECTIONLESS + section, base_dir=tmp_path, environ={})
    assert (config.admin.host, config.admin.port, config.admin.bind_given) == ("127.0.0.1", 9000, given)


@pytest.mark.parametrize("given", [False, True])
def test_a_taken_admin_address_stops_the_start_only_when_it_was_written(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, given: bool
) -> None:
    config = parse_config(SECTIONLESS, base_dir=tmp_path, environ={})

    async def scenario() -> None:
        with _taken() as holder:
            port = holder.getsockname()[1]
            admin = AdminConfig(host="127.0.0.1", port=port, bind_given=given)
            balancer = Balancer(dataclasses.replace(config, admin=admin))
            if given:
                with pytest.raises(BindError, match=f"cannot listen on 127.0.0.1:{port} \\(admin\\)"):
                    await balancer.start()
                assert balancer.listen_addresses == []
                return
            with caplog.at_level(logging.WARNING, logger="lb.control.balancer"):
                await balancer.start()
            try:
                assert balancer.ready and balancer.admin_address is None
                [(host, listening_port)] = balancer.listen_addresses
                # The data plane serves: a request reaches the balancer and gets its answer (the pool's one
                # backend is never reached: 503 or 502, an answer either way).
                reader, writer = await asyncio.open_connection(host, listening_port)
                writer.write(b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n")
                status = await asyncio.wait_for(reader.readline(), 10)
                writer.close()
                assert status.startswith(b"HTTP/1.1 5")
                assert f"cannot listen on 127.0.0.1:{port} (admin)" in caplog.text
                assert "runs without its admin API" in caplog.text and "admin.bind" in caplog.text
            finally:
                await balancer.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("given", [False, True])
def test_a_reload_brings_up_the_admin_api_its_start_could_not_have(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, given: bool
) -> None:
    """An instance started without its admin API (the default address taken) gets it at the reload that
    writes admin.bind, even at that same address, or at one that keeps the default, once it is free."""
    config = parse_config(SECTIONLESS, base_dir=tmp_path, environ={})

    async def scenario() -> None:
        holder = _taken()
        port = holder.getsockname()[1]
        balancer = Balancer(dataclasses.replace(config, admin=AdminConfig(host="127.0.0.1", port=port)))
        try:
            await balancer.start()
            assert balancer.admin_address is None
            holder.close()
            admin = AdminConfig(host="127.0.0.1", port=port, bind_given=given)
            with caplog.at_level(logging.INFO, logger="lb.control.balancer"):
                await balancer.apply(dataclasses.replace(config, admin=admin))
            assert balancer.admin_address == ("127.0.0.1", port)
            assert f"admin API on 127.0.0.1:{port}" in caplog.text
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /livez HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
            status = await asyncio.wait_for(reader.readline(), 10)
            writer.close()
            assert status.startswith(b"HTTP/1.1 200")
        finally:
            holder.close()
            await balancer.stop()

    asyncio.run(scenario())


def test_a_reload_keeping_the_default_address_while_it_is_still_taken_is_no_failure(tmp_path: Path) -> None:
    """Without admin.bind, a default address still taken at a reload leaves the API off, not the reload failed."""
    config = parse_config(SECTIONLESS, base_dir=tmp_path, environ={})

    async def scenario() -> None:
        with _taken() as holder:
            port = holder.getsockname()[1]
            with_default = dataclasses.replace(config, admin=AdminConfig(host="127.0.0.1", port=port))
            balancer = Balancer(with_default)
            try:
                await balancer.start()
                await balancer.apply(with_default)
                assert balancer.admin_address is None and balancer.ready
            finally:
                await balancer.stop()

    asyncio.run(scenario())


def test_a_listener_address_in_use_is_still_the_one_line_when_the_default_admin_address_is_taken_too(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """SPEC part 2: `lb run` with a port in use is one line naming the address.  The default admin address
    taken as well must not add its warning before that line: said once everything is bound, as the
    admin API's own address is."""
    async def scenario() -> None:
        with _taken() as admin_holder, _taken() as listener_holder:
            admin_port, port = admin_holder.getsockname()[1], listener_holder.getsockname()[1]
            config = parse_config(
                SECTIONLESS.replace('bind: "127.0.0.1:0"', f'bind: "127.0.0.1:{port}"'), base_dir=tmp_path, environ={}
            )
            balancer = Balancer(dataclasses.replace(config, admin=AdminConfig(host="127.0.0.1", port=admin_port)))
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="lb"), pytest.raises(BindError, match=str(port)):
                await balancer.start()
            assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
            assert balancer.listen_addresses == []

    asyncio.run(scenario())

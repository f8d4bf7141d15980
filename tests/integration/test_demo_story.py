"""`make demo` tells the whole story, and exits 0 only if the contrast is as expected (issue 11).

Runs `python -m backends_demo.stack --demo` on config.example.yaml moved to free ports (gateways,
listeners, admin) with certificates and secrets of its own, so it never meets another stack.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from backends_demo.stack import story_config, ws_pool
from bench.procs import free_port
from tests.harness import ROOT, UNIT
from tests.harness.processes import lb_certs, new_key, stop_process

DEMO_WITHIN = 120 * UNIT


def _example_on_free_ports(workdir: Path) -> Path:
    raw: dict[str, Any] = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    lb_certs(workdir / "certs")
    for listener in raw["listeners"]:
        listener["bind"] = f"127.0.0.1:{free_port()}"
        if listener.get("tls"):
            listener["tls"] = {"cert": "certs/server.crt", "key": "certs/server.key"}
    raw["admin"]["bind"] = f"127.0.0.1:{free_port()}"
    for pool in raw["pools"].values():
        for backend in pool["backends"]:
            backend["address"] = f"127.0.0.1:{free_port()}"
    path = workdir / "demo.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_demo_shows_source_moving_cookie_holding_and_hash_agreeing(tmp_path: Path) -> None:
    """The source-IP run moves (and the demo checks it did), the cookie runs stick, the hash run sticks and agrees."""
    config = _example_on_free_ports(tmp_path)
    env_file = tmp_path / "secrets.env"
    env_file.write_text(f"LB_COOKIE_KEY={new_key()}\nLB_ADMIN_TOKEN={new_key()}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LB_COOKIE_KEY", "LB_ADMIN_TOKEN")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backends_demo.stack", "--config", str(config), "--env-file", str(env_file), "--demo"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        out, err = proc.communicate(timeout=DEMO_WITHIN)
    finally:
        # Past the timeout, SIGTERM (not run()'s SIGKILL) lets the stack stop the gateways and balancer it
        # started in sessions of their own; a SIGKILLed stack would leave them running.
        stop_process(proc)
    assert proc.returncode == 0, out + err
    before = out.split("1. before", 1)[1].split("2. after", 1)[0]
    assert "NOT STICKY" in before and "as expected" in before
    assert len(set(re.findall(r"\b(gw-\d)\b", before))) >= 2, "the source-IP run moved between gateways"
    after = out.split("2. after", 1)[1].split("3. user", 1)[0]
    assert after.count("STICKY: all") == 2 and "NOT STICKY" not in after  # ws and wss
    story = out.split("3. user", 1)[1]
    assert "STICKY: all" in story and "agreed:" in story and "DID NOT" not in story
    assert "the contrast is as expected" in out


def test_story_config_hashes_every_pool_without_cookie() -> None:
    """The generated story configs: one loopback listener, every pool hashed, sticky off."""
    raw = yaml.safe_load((ROOT / "config.example.yaml").read_text())
    config = story_config(raw, balance="hash", listen_port=1234, admin_port=1235)
    assert config["listeners"] == [{"bind": "127.0.0.1:1234"}]
    assert config["admin"]["bind"] == "127.0.0.1:1235"
    pool = config["pools"][ws_pool(raw)]
    assert (pool["balance"], pool["hash_key"], pool["sticky"]) == ("hash", "header:X-User-Id", False)
    assert raw["pools"][ws_pool(raw)]["balance"] == "least_conn"  # the example itself is untouched


def test_ctrl_c_of_make_run_closes_live_tunnels_with_1001_and_stops_everything(tmp_path: Path) -> None:
    """`make run`, a player connected, Ctrl-C: the player gets close 1001, the stack exits 0 at once, nothing
    is left listening.  The stack sent the balancer one SIGTERM and killed it 5 s later, while its
    `shutdown_grace` (10 s in the example) still spread the 1001s: the player got no close frame (1006) and the
    stack said it had to kill the balancer (found black-box: make run, a held WebSocket, Ctrl-C)."""
    config = _example_on_free_ports(tmp_path)
    raw = yaml.safe_load(config.read_text())
    env_file = tmp_path / "secrets.env"
    env_file.write_text(f"LB_COOKIE_KEY={new_key()}\nLB_ADMIN_TOKEN={new_key()}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("LB_COOKIE_KEY", "LB_ADMIN_TOKEN")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "backends_demo.stack", "--config", str(config), "--env-file", str(env_file)],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if line.startswith("stack: running"):
                break
        else:
            raise AssertionError("the stack never said it was running")

        async def player() -> tuple[aiohttp.WSMsgType, object, float]:
            async with aiohttp.ClientSession() as session, session.ws_connect(
                f"ws://{raw['listeners'][0]['bind']}/ws", timeout=aiohttp.ClientWSTimeout(ws_close=UNIT)
            ) as ws:
                await ws.receive()  # hello
                started = time.monotonic()
                proc.send_signal(signal.SIGINT)  # what Ctrl-C sends the stack (its children have sessions of their own)
                msg = await asyncio.wait_for(ws.receive(), 4 * UNIT)
                return msg.type, msg.data, time.monotonic() - started

        kind, code, after = asyncio.run(player())
        out = proc.communicate(timeout=4 * UNIT)[0]
    finally:
        stop_process(proc)
    assert (kind, code) == (aiohttp.WSMsgType.CLOSE, 1001), (kind, code, out)
    assert after < 4.0, f"the 1001 came {after:.1f}s after Ctrl-C"
    assert proc.returncode == 0 and "killing it" not in out, out
    binds = [listener["bind"] for listener in raw["listeners"]] + [raw["admin"]["bind"]]
    binds += [backend["address"] for pool in raw["pools"].values() for backend in pool["backends"]]
    for bind in binds:
        host, port = bind.rsplit(":", 1)
        with socket.socket() as probe, contextlib.suppress(OSError):
            probe.settimeout(UNIT)
            probe.connect((host, int(port)))
            raise AssertionError(f"{bind} still listening after the stack exited")

"""`${file:PATH}` secrets (a mounted Kubernetes Secret) on a real balancer, re-read on SIGHUP.

The admin token and both affinity keys come from files; the test rotates them the way the README's
recipe does (new key verifying, then signing, then the old one dropped), sending SIGHUP after each
step, and checks that no player is logged out before the old key goes, and that a broken Secret
keeps the running configuration.
"""

from __future__ import annotations

import signal
from pathlib import Path

from tests.harness.clients import visit
from tests.harness.ops import admin_post, reload_with, signal_balancer, wait_until
from tests.harness.processes import Launcher, lb_config, new_key


def write(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    tmp.replace(path)  # the kubelet swaps a Secret volume atomically too


async def test_rotation_through_files_and_sighup(launcher: Launcher, tmp_path: Path) -> None:
    """Keys and token from files; each SIGHUP applies the files as they are now."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    k1, k2, k3 = new_key(), new_key(), new_key()
    write(secrets_dir / "current", k1)
    write(secrets_dir / "previous", k1)
    write(secrets_dir / "token", "token-one")
    [gateway] = launcher.gateways(1)
    config = lb_config(pools={"gateways": [gateway]})
    config["affinity"]["secret_keys"] = [f"${{file:{secrets_dir / 'current'}}}", "${file:secrets/previous}"]
    config["admin"]["token"] = f"${{file:{secrets_dir / 'token'}}}"
    lb = launcher.balancer(config)
    lb.token = "token-one"
    enable = "/pools/gateways/backends/gw-1/enable"
    assert (await admin_post(lb, enable))[0] == 200

    before = await visit(lb.ws_url())
    assert before.cookie is not None
    old_cookie = before.cookie.value

    # Step 1: the new key seals, the old one still opens; the token rotates too.
    write(secrets_dir / "current", k2)
    write(secrets_dir / "token", "token-two")
    signal_balancer(lb, signal.SIGHUP)

    async def token_two_works() -> bool:
        return (await admin_post(lb, enable, token="token-two"))[0] == 200

    await wait_until(token_two_works, what="the rotated admin token")
    assert (await admin_post(lb, enable, token="token-one"))[0] == 401
    still = await visit(lb.ws_url(), cookie=old_cookie)
    assert still.server_id == "gw-1", "a cookie under the previous key was refused"
    assert still.cookie is not None and still.cookie.value != old_cookie, "not re-issued under the new key"
    resealed = still.cookie.value
    fresh = await visit(lb.ws_url())
    assert fresh.cookie is not None
    new_cookie = fresh.cookie.value

    # Step 2: the old key goes.  Cookies under it become invalid (a fresh one), the new ones stay,
    # and so does the one re-issued to the client that came back during the rotation.
    write(secrets_dir / "previous", k3)
    await reload_with(lb, expect="reloaded configuration")
    assert (await visit(lb.ws_url(), cookie=new_cookie)).cookie is None
    assert (await visit(lb.ws_url(), cookie=resealed)).cookie is None
    replaced = await visit(lb.ws_url(), cookie=old_cookie)
    assert replaced.cookie is not None and replaced.cookie.value != old_cookie

    # A broken Secret (file gone): the reload fails, naming the file; the running config stays.
    (secrets_dir / "token").unlink()
    lines = lb.log_lines()
    line = await reload_with(lb, expect="token")
    assert str(secrets_dir / "token") in lb.log_text()
    assert "reload failed" in "\n".join(lb.log_text().splitlines()[lines:]), line
    assert (await admin_post(lb, enable, token="token-two"))[0] == 200

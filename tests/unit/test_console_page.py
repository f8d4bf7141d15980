"""lb.control.console: the server-rendered snapshot in the dashboard page, and its Content-Security-Policy."""

from __future__ import annotations

import base64
import hashlib
import re

import pytest

from lb.config.durations import parse_duration
from lb.control.console import _PAGE, _POLICY, SNAPSHOT_MARK, render_snapshot


def test_snapshot_lists_every_backend_escaped() -> None:
    document = {
        "pools": {
            "gateways": {
                "backends": [
                    {"id": "gw-1", "address": "127.0.0.1:9001", "state": "up", "reason": "initial state",
                     "connections": 3, "handshakes": 10, "affinity_hits": 7, "redispatches": 1},
                    {"id": "<img src=x onerror=alert(1)>", "address": "a", "state": "down",
                     "reason": "HTTP 503 <script>", "connections": 0},
                ],
                "discovery": {"last_ok": 1.5, "last_error": "<b>SERVFAIL</b>"},
            }
        }
    }
    snapshot = render_snapshot(document)
    assert "<td>gw-1</td><td>127.0.0.1:9001</td><td>up</td><td>initial state</td><td>3</td><td>10</td>" in snapshot
    assert "<img" not in snapshot and "<script" not in snapshot and "<b>" not in snapshot
    assert "&lt;img src=x onerror=alert(1)&gt;" in snapshot
    assert "last_error: &lt;b&gt;SERVFAIL&lt;/b&gt;" in snapshot


def test_snapshot_says_discovery_times_in_utc_as_the_logs_do() -> None:
    """/status gives Unix seconds (for scripts); the page before its script ran printed them raw, and null as `None`."""
    document = {"pools": {"gateways": {"backends": [], "discovery": {
        "dns": "gw.internal", "last_ok": 1_764_892_800.25, "last_error": None, "last_error_at": None, "errors": 0,
    }}}}
    snapshot = render_snapshot(document)
    assert ("discovery: dns: gw.internal, last_ok: 2025-12-05T00:00:00Z, last_error: -, last_error_at: never, "
            "errors: 0</p>") in snapshot
    assert "1764892800" not in snapshot and "None" not in snapshot


def test_snapshot_shows_a_removed_backend_as_removed() -> None:
    """A backend gone from its pool is `removed` on the page, as in its live table and `lb ctl status`.

    /status says `"state": "disabled", "removed": true`; the page before its script ran said `disabled`.
    """
    document = {
        "pools": {
            "gateways": {
                "backends": [
                    {"id": "gw-2", "address": "127.0.0.1:9002", "state": "disabled", "removed": True,
                     "reason": "removed by reload", "connections": 2},
                    {"id": "gw-3", "address": "127.0.0.1:9003", "state": "disabled", "removed": False,
                     "reason": "operator: disable", "connections": 0},
                ],
            }
        }
    }
    snapshot = render_snapshot(document)
    assert '<tr data-state="removed"><td>gw-2</td><td>127.0.0.1:9002</td><td>removed</td>' in snapshot
    assert '<tr data-state="disabled"><td>gw-3</td><td>127.0.0.1:9003</td><td>disabled</td>' in snapshot


def test_every_inline_script_and_style_is_allowed_by_hash_and_nothing_else() -> None:
    assert SNAPSHOT_MARK in _PAGE
    for tag in ("script", "style"):
        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", _PAGE, re.S):
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            assert f"'sha256-{digest}'" in _POLICY
    assert "default-src 'none'" in _POLICY and "unsafe-inline" not in _POLICY
    assert not re.search(r"<(script|link|img|iframe)[^>]*\s(src|href)=", _PAGE)



def _close_after_pattern() -> str:
    found = re.search(r'id="drain-close-after"[^>]*pattern="([^"]*)"', _PAGE)
    assert found is not None
    return found.group(1)


@pytest.mark.parametrize("value", ["30s", "500ms", ".5s", "1h30m", "2m30s", "1s500ms", " 5m ", ""])
def test_the_drain_dialog_takes_every_duration_the_api_takes(value: str) -> None:
    """An HTML pattern must match the whole value (re.fullmatch stands in for the browser): the dialog refused
    `1h30m` once the admin API took it.  Empty means "keep the tunnels"."""
    assert re.fullmatch(_close_after_pattern(), value) is not None
    if value.strip():
        parse_duration(value)  # and the API takes it


@pytest.mark.parametrize("value", ["soon", "1h 30m", "30m1h", "-5s"])
def test_the_drain_dialog_refuses_what_the_api_refuses(value: str) -> None:
    assert re.fullmatch(_close_after_pattern(), value) is None

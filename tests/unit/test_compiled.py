"""lb.compiled (which modules run compiled, which are stale) and build_native's choice of modules."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

import build_native
from lb.compiled import SHARED_LIBRARY, CompiledState, compiled_state, stale_message

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def _package(tmp_path: Path) -> Path:
    package = tmp_path / "lb"
    (package / "proxy").mkdir(parents=True)
    for name in ("__init__.py", "log.py", "proxy/__init__.py", "proxy/server.py", "proxy/tunnel.py"):
        (package / name).write_text("")
    return package


def _touch(path: Path, mtime: float) -> None:
    path.write_bytes(b"")
    os.utime(path, (mtime, mtime))


def test_pure_python_has_no_modules_and_nothing_stale(tmp_path: Path) -> None:
    state = compiled_state(_package(tmp_path))
    assert state == CompiledState((), ())
    assert state.describe() == "pure Python"


def test_extension_modules_are_listed_by_dotted_name_and_the_shared_runtime_is_not(tmp_path: Path) -> None:
    package = _package(tmp_path)
    for source in ("log.py", "proxy/server.py"):
        os.utime(package / source, (1000, 1000))
    _touch(package / f"log{SUFFIX}", 2000)
    _touch(package / "proxy" / f"server{SUFFIX}", 2000)
    _touch(package / f"{SHARED_LIBRARY}{SUFFIX}", 2000)
    state = compiled_state(package)
    assert state.modules == ("lb.log", "lb.proxy.server") and state.stale == ()
    assert state.describe() == "compiled (2 modules, mypyc)"


def test_a_source_edited_after_compiling_is_stale_and_the_message_says_how_to_mend_it(tmp_path: Path) -> None:
    package = _package(tmp_path)
    _touch(package / "proxy" / f"server{SUFFIX}", 1000)
    _touch(package / "proxy" / f"tunnel{SUFFIX}", 1000)
    os.utime(package / "proxy" / "server.py", (2000, 2000))  # edited later
    os.utime(package / "proxy" / "tunnel.py", (500, 500))
    state = compiled_state(package)
    assert state.stale == (str(Path("lb/proxy/server.py")),)
    message = stale_message(state)
    assert "lb/proxy/server.py" in message and "make native" in message and "PURE=1" in message


def test_many_stale_sources_are_summarised() -> None:
    state = CompiledState(("a", "b", "c", "d", "e"), ("a.py", "b.py", "c.py", "d.py", "e.py"))
    assert stale_message(state).startswith("a.py, b.py, c.py and 2 more changed")


def test_this_checkout_has_no_stale_compiled_module() -> None:
    """`make test` compiles first; a stale module here means the tests ran old compiled code."""
    state = compiled_state()
    assert not state.stale, stale_message(state)


def test_build_native_compiles_the_data_plane_and_nothing_else() -> None:
    modules = build_native.sources()
    for hot in ("lb/proxy/server.py", "lb/proxy/connection.py", "lb/proxy/tunnel.py", "lb/http/head.py",
                "lb/affinity/codec.py", "lb/access_log.py", "lb/log.py"):
        assert hot in modules
    assert not any(name.endswith("__init__.py") for name in modules)
    assert not any(name.startswith(("lb/control/", "lb/config/")) for name in modules)
    assert "lb/errors.py" not in modules  # subclasses OSError: not a native class


def test_lb_pure_python_sets_the_compiled_modules_aside(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    package = _package(tmp_path)
    _touch(package / "proxy" / f"server{SUFFIX}", 1000)
    os.utime(package / "proxy" / "server.py", (2000, 2000))  # stale, but the source is what runs
    monkeypatch.setenv("LB_PURE_PYTHON", "1")
    state = compiled_state(package)
    assert state == CompiledState(("lb.proxy.server",), (), set_aside=True)
    assert state.describe() == "pure Python (LB_PURE_PYTHON=1; 1 compiled modules set aside)"


@pytest.mark.parametrize("value", ["1", "0", ""])
def test_lb_pure_python_imports_our_sources_and_only_ours(value: str) -> None:
    """In a fresh interpreter, as `lb run` and its workers start: the data plane and the rest of lb from
    their `.py` files; other packages' extension modules (uvloop's) as usual."""
    env = {**os.environ, "LB_PURE_PYTHON": value}
    code = ("import lb.proxy.server, lb.http.head, uvloop.loop; "
            "print(lb.proxy.server.__file__, lb.http.head.__file__, uvloop.loop.__file__)")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    out = done.stdout.split()
    assert out[2].endswith(SUFFIX)
    if value == "1":
        assert out[0].endswith("server.py") and out[1].endswith("head.py")
    elif compiled_state().modules:
        assert out[0].endswith(SUFFIX) and out[1].endswith(SUFFIX)

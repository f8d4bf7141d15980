"""lb.compiled (which modules run compiled, which are stale) and build_native's choice of modules."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import build_native
from lb import pure_python_requested
from lb.compiled import (
    EXT_SUFFIX,
    MANIFEST,
    SHARED_LIBRARY,
    CompiledState,
    compiled_state,
    source_digest,
    stale_message,
)

SUFFIX = EXT_SUFFIX
SOURCES = {"lb.log": "log.py", "lb.proxy.server": "proxy/server.py", "lb.proxy.tunnel": "proxy/tunnel.py"}


@pytest.fixture(autouse=True)
def _builds_are_read_as_built(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A build made under tmp_path is read as built: the suite run with LB_PURE_PYTHON=1 (which sets
    this checkout's build aside) must not set those aside too; the tests of the variable set it
    themselves, and the tests of this checkout's own build still see it."""
    if "tmp_path" in request.fixturenames:
        monkeypatch.delenv("LB_PURE_PYTHON", raising=False)


def _package(tmp_path: Path) -> Path:
    package = tmp_path / "lb"
    (package / "proxy").mkdir(parents=True)
    for name in ("__init__.py", "proxy/__init__.py", *SOURCES.values()):
        (package / name).write_text(f"# {name}\n")
    return package


def _build(package: Path, modules: tuple[str, ...] = tuple(SOURCES), suffix: str = SUFFIX) -> None:
    """What build_native leaves: a module file per module, the shared runtime, the manifest."""
    for module in modules:
        (package.parent / module.replace(".", "/")).with_name(module.rpartition(".")[2] + SUFFIX).write_bytes(b"")
    (package / f"{SHARED_LIBRARY}{SUFFIX}").write_bytes(b"")
    digests = {module: source_digest(package / SOURCES[module]) for module in modules}
    (package / MANIFEST).write_text(json.dumps({"ext_suffix": suffix, "modules": digests}))


def test_pure_python_has_no_modules_and_nothing_stale(tmp_path: Path) -> None:
    state = compiled_state(_package(tmp_path))
    assert state == CompiledState((), ())
    assert state.describe() == "pure Python"


def test_a_current_build_lists_its_modules_and_nothing_stale(tmp_path: Path) -> None:
    package = _package(tmp_path)
    _build(package)
    state = compiled_state(package)
    assert state == CompiledState(("lb.log", "lb.proxy.server", "lb.proxy.tunnel"), ())
    assert state.describe() == "compiled (3 modules, mypyc)"


def test_a_source_edited_after_compiling_is_stale_whatever_its_mtime(tmp_path: Path) -> None:
    package = _package(tmp_path)
    _build(package)
    server = package / "proxy" / "server.py"
    server.write_text("# edited\n")
    os.utime(server, (0, 0))  # older than everything (cp -p, tar x): still an edit
    state = compiled_state(package)
    assert state.stale == (f"{Path('lb/proxy/server.py')} changed",)
    message = stale_message(state)
    assert "lb/proxy/server.py changed" in message and "make native" in message and "LB_PURE_PYTHON=1" in message


def test_touching_a_source_without_changing_it_is_not_stale(tmp_path: Path) -> None:
    """A `git checkout` away and back rewrites files with new mtimes and the same bytes."""
    package = _package(tmp_path)
    _build(package)
    os.utime(package / "log.py", (4e9, 4e9))
    assert compiled_state(package).stale == ()


def test_every_way_a_build_stops_matching_is_named(tmp_path: Path) -> None:
    package = _package(tmp_path)
    _build(package)
    (package / f"{SHARED_LIBRARY}{SUFFIX}").unlink()  # the compiled code itself
    (package / "proxy" / f"tunnel{SUFFIX}").unlink()
    (package / "log.py").unlink()  # a module removed from the sources
    (package / "proxy" / f"stray{SUFFIX}").write_bytes(b"")  # a module file of some other build
    stale = compiled_state(package).stale
    assert stale == (
        f"{SHARED_LIBRARY}{SUFFIX} is missing",
        f"{Path('lb/log.py')} is gone",
        f"{Path('lb/proxy/tunnel')}{SUFFIX} is missing",
        "lb.proxy.stray was not compiled by this build",
    )


def test_a_module_written_in_c_is_checked_against_its_c_source(tmp_path: Path) -> None:
    """lb/http/_scan.c has no `.py`: its build is current while the `.c` it was compiled from is."""
    package = _package(tmp_path)
    _build(package)
    scan = package / "proxy" / "_scan.c"
    scan.write_text("/* C */\n")
    (package / "proxy" / f"_scan{SUFFIX}").write_bytes(b"")
    manifest = json.loads((package / MANIFEST).read_text())
    manifest["modules"]["lb.proxy._scan"] = source_digest(scan)
    manifest["written_in_c"] = ["lb.proxy._scan"]
    (package / MANIFEST).write_text(json.dumps(manifest))
    assert compiled_state(package).stale == ()
    assert compiled_state(package).describe() == "compiled (3 modules, mypyc, 1 written in C)"
    scan.write_text("/* edited */\n")
    assert compiled_state(package).stale == (f"{Path('lb/proxy/_scan.c')} changed",)
    scan.unlink()
    assert compiled_state(package).stale == (f"{Path('lb/proxy/_scan.c')} is gone",)


def test_module_files_without_a_manifest_are_an_unfinished_build(tmp_path: Path) -> None:
    package = _package(tmp_path)
    _build(package)
    (package / MANIFEST).unlink()  # build_native writes it last, and removes it first
    state = compiled_state(package)
    assert state.stale and "unfinished build" in state.stale[0]


def test_a_build_for_another_interpreter_is_stale_and_its_files_are_not_ours(tmp_path: Path) -> None:
    package = _package(tmp_path)
    other_suffix = ".cpython-399-x86_64-linux-gnu.so"
    _build(package, suffix=other_suffix)
    assert compiled_state(package).stale == (f"compiled for {other_suffix}, not this interpreter's {SUFFIX}",)
    other = package / "proxy" / f"server{other_suffix}"  # never counted as a module of ours
    other.write_bytes(b"")
    (package / MANIFEST).unlink()
    for module in SOURCES:
        (package.parent / module.replace(".", "/")).with_name(module.rpartition(".")[2] + SUFFIX).unlink()
    (package / f"{SHARED_LIBRARY}{SUFFIX}").unlink()
    assert compiled_state(package) == CompiledState((), ())


def test_a_broken_manifest_is_stale(tmp_path: Path) -> None:
    package = _package(tmp_path)
    _build(package)
    (package / MANIFEST).write_text("{not json")
    assert compiled_state(package).stale[0].startswith(f"{MANIFEST} unreadable")
    # Valid JSON of another shape (a list of modules, a number for the suffix): stale, never a traceback.
    for shape in ('{"ext_suffix": ".so", "modules": ["lb.log"]}', '{"ext_suffix": 3, "modules": {}}', "[]"):
        (package / MANIFEST).write_text(shape)
        assert compiled_state(package).stale[0].startswith(f"{MANIFEST} unreadable"), shape


def test_many_problems_are_summarised() -> None:
    state = CompiledState(("a",), ("a changed", "b changed", "c changed", "d changed", "e changed"))
    assert "(a changed; b changed; c changed; and 2 more)" in stale_message(state)


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
    assert not any(name.startswith("lb/control/") for name in modules)
    # Of the config, only the frozen objects every handshake reads (native attribute access);
    # the loader, which reads operator input once per load, stays interpreted.
    assert [name for name in modules if name.startswith("lb/config/")] == ["lb/config/model.py"]
    assert "lb/errors.py" not in modules  # subclasses OSError: not a native class
    # The modules written in C (each one's header says why)
    assert build_native.c_sources() == [
        "lb/http/_render.c", "lb/http/_scan.c", "lb/proxy/_coroutine.c", "lb/proxy/_reading.c", "lb/affinity/_aead.c",
        "lb/affinity/_token64.c", "lb/state/_tally.c", "lb/ws/_plain.c", "lb/_logwrite.c",
    ]
    written_in_c = {"lb.http._render", "lb.http._scan", "lb.proxy._coroutine", "lb.proxy._reading", "lb.state._tally",
                    "lb.affinity._aead", "lb.affinity._token64", "lb.ws._plain", "lb._logwrite"}
    assert written_in_c <= build_native.digests(build_native.ROOT).keys()


@pytest.mark.parametrize("value", ["1", "true", "YES", "on"])
def test_lb_pure_python_sets_the_compiled_modules_aside(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    package = _package(tmp_path)
    _build(package)
    (package / "log.py").write_text("# edited\n")  # stale, but the source is what runs
    monkeypatch.setenv("LB_PURE_PYTHON", value)
    state = compiled_state(package)
    assert state == CompiledState(("lb.log", "lb.proxy.server", "lb.proxy.tunnel"), (), set_aside=True)
    assert state.describe() == "pure Python (LB_PURE_PYTHON=1; 3 compiled modules set aside)"


@pytest.mark.parametrize("value", ["0", "false", "no", ""])
def test_other_values_of_lb_pure_python_leave_the_build_in(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("LB_PURE_PYTHON", value)
    assert not pure_python_requested()


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


def _fake_install(tmp_path: Path) -> Path:
    """An `lb` package elsewhere, with a build of another interpreter's and this one's files in it."""
    package = tmp_path / "site" / "lb"
    (package / "http").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    for name in (f"http/head{SUFFIX}", "http/head.cpython-399-x86_64-linux-gnu.so", f"{SHARED_LIBRARY}{SUFFIX}"):
        (package / name).write_bytes(b"")
    (package / MANIFEST).write_text("{}")
    return package


def test_remove_deletes_the_manifest_and_every_module_file_and_stamps(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    package = _fake_install(tmp_path)
    (package / f"http/head{SUFFIX}.partial").write_bytes(b"")  # a build killed between copy and rename
    stamp = tmp_path / "stamp"
    assert build_native.main(["--into", str(package), "--remove", "--stamp", str(stamp)]) == 0
    assert not list(package.rglob("*.so")) and not (package / MANIFEST).exists() and stamp.exists()
    assert not list(package.rglob("*.partial"))
    assert "removed 2 compiled modules" in capsys.readouterr().out  # the shared runtime is not one


@pytest.mark.parametrize("require", [False, True])
def test_without_a_compiler_the_build_falls_back_to_pure_python_and_is_not_stamped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], require: bool
) -> None:
    package = _fake_install(tmp_path)
    stamp = tmp_path / "stamp"
    monkeypatch.setattr(build_native.shutil, "which", lambda name: None)
    args = ["--into", str(package), "--stamp", str(stamp)] + (["--require"] if require else [])
    assert build_native.main(args) == (1 if require else 0)
    err = capsys.readouterr().err
    assert "no C compiler" in err and "stays pure Python" in err
    assert not list(package.rglob("*.so")) and not stamp.exists()  # the old build is gone; make tries again


def test_a_package_whose_sources_are_not_this_checkouts_is_not_built_into(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    package = _fake_install(tmp_path)
    monkeypatch.setattr(build_native, "check_toolchain", lambda: None)
    assert build_native.main(["--into", str(package)]) == 0
    assert "are not this checkout's" in capsys.readouterr().err
    assert not list(package.rglob("*.so"))

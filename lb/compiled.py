"""Which of our modules run compiled (mypyc extension modules beside their sources), and whether that build is stale.

`build_native.py` (the Makefile's `native` target, the container image's build stage) compiles the
data plane's modules with mypyc, puts each extension module next to its `.py`, and writes
`MANIFEST`: the interpreter's extension suffix, which modules are written in C (their source is the
`.c`), and, per module, the SHA-256 of the source it compiled (read before compiling, so an edit
made during a build counts as one made after it). Python's import system takes an extension module
before a source file of the same name, so a source edited after its module was compiled would be
silently ignored: `compiled_state` compares the manifest with the sources, the shared runtime and
the module files on disk, and `lb run` refuses to start on any difference (a unit test fails on one
too) rather than run code that is not the code on disk. Hashes, not modification times: a `git
checkout` back and forth, `cp -p` or a coarse file-system clock neither hides an edit nor invents
one.

`LB_PURE_PYTHON=1` sets the compiled modules aside (`lb.pure_python_requested`).

Imported at start-up only (about 1 ms: two dozen small files hashed), never on a connection's path.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from lb import pure_python_requested

PACKAGE = Path(__file__).resolve().parent
GROUP = "lb._native"  # build_native.py compiles the data plane as one mypyc group of this name
SHARED_LIBRARY = GROUP.rpartition(".")[2] + "__mypyc"  # the group's runtime, where the compiled code is
MANIFEST = "_native.json"  # beside the shared runtime: what was compiled, from which sources
# This interpreter's extension suffix (.cpython-311-x86_64-linux-gnu.so): modules built for another are not ours.
EXT_SUFFIX: str = sysconfig.get_config_var("EXT_SUFFIX") or ".so"


def source_digest(path: Path) -> str:
    """SHA-256 of a module's source; for a module written in C, of its `.c` and the `.pyi` beside it,
    which the mypyc modules that call it were compiled against."""
    data = path.read_bytes()
    stub = path.with_suffix(".pyi")
    if path.suffix == ".c" and stub.exists():
        data += b"\0" + stub.read_bytes()
    return hashlib.sha256(data).hexdigest()


@dataclass(frozen=True, slots=True)
class CompiledState:
    modules: tuple[str, ...]  # dotted names the build compiled (or, with no manifest, that have a module file)
    stale: tuple[str, ...]  # what does not match the build, one phrase each (empty: the build is current)
    set_aside: bool = False  # LB_PURE_PYTHON=1: the sources run, whatever was compiled
    written_in_c: int = 0  # how many of `modules` are written in C (build_native.c_sources()), not compiled by mypyc

    def describe(self) -> str:
        """One phrase for the start-up line and the benchmark's header."""
        if self.set_aside:
            return f"pure Python (LB_PURE_PYTHON=1; {len(self.modules)} compiled modules set aside)"
        if not self.modules:
            return "pure Python"
        by_hand = f", {self.written_in_c} written in C" if self.written_in_c else ""
        return f"compiled ({len(self.modules) - self.written_in_c} modules, mypyc{by_hand})"


def _module_file(package: Path, module: str) -> Path:
    return package.parent.joinpath(*module.split(".")).with_name(module.rpartition(".")[2] + EXT_SUFFIX)


def _source(package: Path, module: str, written_in_c: bool) -> Path:
    """The module's `.py`, or its `.c` for a module written in C (lb/http/_scan.c and the others)."""
    return package.parent.joinpath(*module.split(".")).with_suffix(".c" if written_in_c else ".py")


def compiled_state(package: Path = PACKAGE) -> CompiledState:
    """The data plane's build under `package` (an `lb` directory), checked against the sources."""
    found = sorted(path for path in package.rglob(f"*{EXT_SUFFIX}") if path.name != SHARED_LIBRARY + EXT_SUFFIX)
    found_modules = tuple(".".join(path.relative_to(package.parent).parts)[: -len(EXT_SUFFIX)] for path in found)
    manifest_path = package / MANIFEST
    set_aside = pure_python_requested()
    try:
        manifest = json.loads(manifest_path.read_text())
        compiled: dict[str, str] = manifest["modules"]
        suffix = manifest["ext_suffix"]
        written_in_c = manifest.get("written_in_c", [])  # absent from builds before lb/http/_scan.c
        if not isinstance(compiled, dict) or not isinstance(suffix, str) or not isinstance(written_in_c, list):
            raise TypeError("not the shape build_native.py writes")
    except FileNotFoundError:
        if set_aside or not found:
            return CompiledState(found_modules, (), set_aside=set_aside)
        return CompiledState(found_modules, (f"no {MANIFEST} beside the compiled modules (an unfinished build?)",))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return CompiledState(found_modules, (f"{MANIFEST} unreadable: {exc}",))
    modules = tuple(sorted(compiled))
    if set_aside:  # the sources run: none of them is stale
        return CompiledState(modules, (), set_aside=True)
    stale: list[str] = []
    if suffix != EXT_SUFFIX:
        stale.append(f"compiled for {suffix}, not this interpreter's {EXT_SUFFIX}")
    if not (package / (SHARED_LIBRARY + EXT_SUFFIX)).exists():
        stale.append(f"{SHARED_LIBRARY}{EXT_SUFFIX} is missing")
    for module, digest in sorted(compiled.items()):
        source = _source(package, module, module in written_in_c)
        relative = source.relative_to(package.parent)
        if not _module_file(package, module).exists():
            stale.append(f"{relative.with_suffix(EXT_SUFFIX)} is missing")
        elif not source.exists():
            stale.append(f"{relative} is gone")
        elif source_digest(source) != digest:
            stale.append(f"{relative} changed")
    stale += [f"{module} was not compiled by this build" for module in found_modules if module not in compiled]
    return CompiledState(modules, tuple(stale), written_in_c=len(set(written_in_c) & set(modules)))


def stale_message(state: CompiledState) -> str:
    """What to tell whoever runs code whose compiled build no longer matches its sources."""
    listed = "; ".join(state.stale[:3]) + (f"; and {len(state.stale) - 3} more" if len(state.stale) > 3 else "")
    return (
        f"the compiled data plane does not match the sources ({listed}), so it would not run the code on disk: "
        "rebuild it (`make native`), remove it (`make native PURE=1`) or set it aside (LB_PURE_PYTHON=1)"
    )

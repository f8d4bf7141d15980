"""Which of our modules run compiled (mypyc extension modules beside their sources), and whether any is stale.

`build_native.py` (the Makefile's `native` target, the container image's build stage) compiles the
data plane's modules with mypyc and puts each extension module next to its `.py`; Python's import
system takes an extension module before a source file of the same name. A source edited after its
module was compiled would therefore be silently ignored: `compiled_state` finds those, and `lb`
refuses to start on them (a unit test fails on them too) rather than run code that is not the code on
disk. `LB_PURE_PYTHON=1` sets the compiled modules aside (`lb.pure_python_requested`).

Imported at start-up only: a directory walk of the package, never on a connection's path.
"""

from __future__ import annotations

import importlib.machinery
import os
from dataclasses import dataclass
from pathlib import Path

from lb import pure_python_requested

PACKAGE = Path(__file__).resolve().parent
GROUP = "lb._native"  # build_native.py compiles the data plane as one mypyc group of this name
SHARED_LIBRARY = GROUP.rpartition(".")[2] + "__mypyc"  # the group's shared runtime: lb/_native__mypyc.<suffix>
_SUFFIXES = tuple(importlib.machinery.EXTENSION_SUFFIXES)


@dataclass(frozen=True, slots=True)
class CompiledState:
    modules: tuple[str, ...]  # dotted names with an extension module beside their source
    stale: tuple[str, ...]  # sources (relative paths) edited after their module was compiled
    set_aside: bool = False  # LB_PURE_PYTHON=1: the sources run, whatever was compiled

    def describe(self) -> str:
        """One phrase for the start-up line and the benchmark's header."""
        if self.set_aside:
            return f"pure Python (LB_PURE_PYTHON=1; {len(self.modules)} compiled modules set aside)"
        if not self.modules:
            return "pure Python"
        return f"compiled ({len(self.modules)} modules, mypyc)"


def _extension_stem(name: str) -> str | None:
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return None


def compiled_state(package: Path = PACKAGE) -> CompiledState:
    """The extension modules under `package`, and the sources newer than theirs."""
    modules: list[str] = []
    stale: list[str] = []
    for folder, _dirs, files in os.walk(package):
        for name in files:
            stem = _extension_stem(name)
            if stem is None or stem == SHARED_LIBRARY:
                continue
            source = Path(folder, stem + ".py")
            relative = source.relative_to(package.parent)
            modules.append(".".join(relative.with_suffix("").parts))
            if source.exists() and source.stat().st_mtime > Path(folder, name).stat().st_mtime:
                stale.append(str(relative))
    if pure_python_requested():  # the sources run: none of them is stale
        return CompiledState(tuple(sorted(modules)), (), set_aside=True)
    return CompiledState(tuple(sorted(modules)), tuple(sorted(stale)))


def stale_message(state: CompiledState) -> str:
    """What to tell whoever runs code whose compiled modules are older than their sources."""
    listed = ", ".join(state.stale[:3]) + (f" and {len(state.stale) - 3} more" if len(state.stale) > 3 else "")
    return (
        f"{listed} changed after the data plane was compiled, so the old compiled code would run: "
        "rebuild it (`make native`), remove it (`make native PURE=1`) or set it aside (LB_PURE_PYTHON=1)"
    )

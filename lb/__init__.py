"""A layer-7 WebSocket load balancer with encrypted cookie session affinity.

The handshake path: proxy.server (the asyncio shell) → proxy.connection (the sans-I/O core:
http.head, http.routing, ws.upgrade, affinity.carriers / codec / decision / balancing,
http.forwarding) → proxy.tunnel.  The health path: control.health / control.discovery →
state.pool → control.admin / control.metrics.  Pure layers: http, ws, affinity, state, config.

The data plane may run compiled (`build_native.py`, `lb.compiled`); LB_PURE_PYTHON=1 in the
environment runs the sources instead, without removing anything (`pure_python_requested`).

Importing this package stays cheap: `lb run` imports it before `lb.startup_signals.hold()` can run
(`lb.__main__`), and until then a SIGHUP or SIGTERM ends the process.  So `__version__` is read
from the installed metadata on first use (importlib.metadata alone took ~20 ms), and nothing here
imports importlib.abc (~10 ms).
"""

import os
import sys
from collections.abc import Sequence
from importlib import import_module
from importlib.machinery import SOURCE_SUFFIXES, FileFinder, ModuleSpec, SourceFileLoader
from types import ModuleType

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing (mypy reads the name alike)

if TYPE_CHECKING:
    __version__: str
else:

    def __getattr__(name: str) -> str:
        """`lb.__version__`, looked up once, when first asked for (`lb --version`, lb_build_info)."""
        if name != "__version__":
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("ws-affinity-lb")
        except PackageNotFoundError:  # running from a source tree that was never installed
            found = "0+unknown"
        globals()["__version__"] = found
        return found


def pure_python_requested() -> bool:
    """LB_PURE_PYTHON=1 (or true, yes, on): the operator's switch to rule the compiled modules out
    (of a suspected fault, of a benchmark). Any other value, or none, leaves them in."""
    return os.environ.get("LB_PURE_PYTHON", "").strip().lower() in ("1", "true", "yes", "on")


def built_in_c(module: str, name: str) -> object | None:
    """`name` from `module`, one of the modules written in C (build_native.c_sources()), when it was
    built and not set aside by LB_PURE_PYTHON=1; else None, and the caller's Python does the same work."""
    if pure_python_requested():  # the sources run: a module written in C has none
        return None
    try:
        return getattr(import_module(module), name)  # type: ignore[no-any-return]
    except ImportError:  # not built (no C compiler)
        return None


class _SourcesOnly:
    """A meta-path finder that finds our submodules as `.py` files only, ahead of the extension modules
    the path finder would pick first (workers, started by `sys.executable -m lb`, inherit the variable).
    importlib.abc.MetaPathFinder's protocol, not its subclass: importing importlib.abc costs ~10 ms."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not fullname.startswith(__name__ + ".") or path is None:
            return None
        for entry in path:
            spec = FileFinder(entry, (SourceFileLoader, SOURCE_SUFFIXES)).find_spec(fullname)
            if spec is not None:
                return spec
        return None


if pure_python_requested():  # this file runs once per process
    sys.meta_path.insert(0, _SourcesOnly())

"""The pure core stays free of I/O: its modules import no event loop, socket, TLS or clock (STYLE.md).

`lb/http`, `lb/ws`, `lb/affinity`, `lb/state`, `lb/config` and the connection state machine
(`lb/proxy/connection.py`) take bytes, events and the time as arguments; only the shell
(`lb/proxy/server.py`, `lb/proxy/tunnel.py`, `lb/control/`) reads sockets and clocks.
Time and randomness come in as arguments too: no pure module calls `os.urandom` or `datetime.now`.
Imports under `if TYPE_CHECKING:` are for annotations only and are allowed.  And no module but the
balancer's own imports `Balancer`: its dependents type it by a Protocol of what they use.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LB = Path(__file__).resolve().parents[2] / "lb"
PURE = sorted(
    [path for package in ("http", "ws", "affinity", "state", "config") for path in (LB / package).rglob("*.py")]
    + [LB / "proxy" / "connection.py", LB / "proxy" / "actions.py"]
)
PURE_MODULES = frozenset("lb." + ".".join(path.relative_to(LB).with_suffix("").parts) for path in PURE)
FORBIDDEN = frozenset({
    "asyncio", "aiohttp", "socket", "ssl", "selectors", "uvloop", "time", "random", "secrets",
    "lb.control", "lb.proxy",
})
# Calls that read the clock or draw randomness without importing a forbidden module: they come in as
# arguments (`now: float`, `random: Callable[[int], bytes]`).  Matched on the call's dotted name.
CLOCK_AND_RANDOMNESS = frozenset({
    "os.urandom", "os.getrandom", "datetime.now", "datetime.utcnow", "datetime.today", "date.today",
    "datetime.datetime.now", "datetime.datetime.utcnow", "datetime.datetime.today", "datetime.date.today",
})
# The exceptions, each with its reason.
ALLOWED = {
    ("config/sections.py", "ssl"): "validation loads the TLS certificate and key: part of reading the config",
    ("proxy/connection.py", "os.urandom"): (
        "the request ids' per-process prefix, drawn once at import (`new_request_id`); a connection's own"
        " randomness comes in as its `random` argument"
    ),
}


def _module_of(path: Path) -> str:
    parts = path.relative_to(LB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_imports(path: Path) -> set[str]:
    """Every module `path` imports when it runs (not those only imported for type checking).

    `from lb import x` counts as `lb.x`, and a relative import as the absolute name it stands for.
    """
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    package = _module_of(path) if path.name == "__init__.py" else _module_of(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            if module == "lb" or module.startswith("lb."):
                names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def clock_and_randomness_calls(path: Path) -> set[str]:
    """The dotted names of calls in `path` that read the clock or draw randomness."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return {
        name for node in ast.walk(tree)
        if isinstance(node, ast.Call) and (name := ast.unparse(node.func)) in CLOCK_AND_RANDOMNESS
    }


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(LB)))
def test_pure_module_does_no_io(path: Path) -> None:
    """A [pure] module imports nothing that does I/O or reads the clock."""
    bad = {
        name for name in runtime_imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
        and not any(name == m or name.startswith(m + ".") for m in PURE_MODULES)  # lb.proxy.actions, say
        and (str(path.relative_to(LB)), name) not in ALLOWED
    }
    assert not bad, f"{path.relative_to(LB)} imports {sorted(bad)}"


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(LB)))
def test_pure_module_takes_time_and_randomness_as_arguments(path: Path) -> None:
    """A [pure] module reads no clock and draws no randomness itself: `now` and `random` are arguments."""
    bad = {
        name for name in clock_and_randomness_calls(path) if (str(path.relative_to(LB)), name) not in ALLOWED
    }
    assert not bad, f"{path.relative_to(LB)} calls {sorted(bad)}"


def test_every_exception_is_still_needed() -> None:
    """An exception no module needs any more is removed, not left to excuse the next one."""
    used = {
        (str(path.relative_to(LB)), name)
        for path in PURE
        for name in runtime_imports(path) | clock_and_randomness_calls(path)
    }
    assert set(ALLOWED) <= used, sorted(set(ALLOWED) - used)


def test_the_pure_list_is_not_empty() -> None:
    assert len(PURE) > 20


def balancer_imports(path: Path) -> list[str]:
    """The names `path` imports from `lb.control.balancer`, for type checking too."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom) and node.module == "lb.control.balancer"
        for alias in node.names
    ]


# The balancer itself, and the process entry that makes one and wires its signals.
OF_THE_BALANCER = {LB / "control" / "balancer.py", LB / "control" / "process.py"}
NOT_BALANCER = sorted(path for path in LB.rglob("*.py") if path not in OF_THE_BALANCER)


@pytest.mark.parametrize("path", NOT_BALANCER, ids=lambda p: str(p.relative_to(LB)))
def test_no_module_imports_the_whole_balancer(path: Path) -> None:
    """Admin, workers and discovery depend on a small Protocol of what they use, never on `Balancer`."""
    assert "Balancer" not in balancer_imports(path), f"{path.relative_to(LB)} imports Balancer"

"""The pure core stays free of I/O: its modules import no event loop, socket, TLS or clock (STYLE.md).

`lb/http`, `lb/ws`, `lb/affinity`, `lb/state`, `lb/config` and the connection state machine
(`lb/proxy/connection.py`) take bytes, events and the time as arguments; only the shell
(`lb/proxy/server.py`, `lb/proxy/tunnel.py`, `lb/control/`) reads sockets and clocks.
Imports under `if TYPE_CHECKING:` are for annotations only and are allowed.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LB = Path(__file__).resolve().parents[2] / "lb"
PURE = sorted(
    [path for package in ("http", "ws", "affinity", "state", "config") for path in (LB / package).glob("*.py")]
    + [LB / "proxy" / "connection.py"]
)
FORBIDDEN = frozenset({"asyncio", "aiohttp", "socket", "ssl", "selectors", "uvloop", "time", "lb.control", "lb.proxy"})
# The exceptions, each with its reason.
ALLOWED = {
    ("config/sections.py", "ssl"): "validation loads the TLS certificate and key: part of reading the config",
    ("proxy/connection.py", "lb.proxy.connection"): "itself",
}


def runtime_imports(path: Path) -> set[str]:
    """Every module `path` imports when it runs (not those only imported for type checking)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(child) for stmt in node.body for child in ast.walk(stmt))
    names: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("path", PURE, ids=lambda p: str(p.relative_to(LB)))
def test_pure_module_does_no_io(path: Path) -> None:
    """A [pure] module imports nothing that does I/O or reads the clock."""
    bad = {
        name for name in runtime_imports(path)
        if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)
        and (str(path.relative_to(LB)), name) not in ALLOWED
    }
    assert not bad, f"{path.relative_to(LB)} imports {sorted(bad)}"


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


NOT_BALANCER = sorted(path for path in LB.rglob("*.py") if path != LB / "control" / "balancer.py")


@pytest.mark.parametrize("path", NOT_BALANCER, ids=lambda p: str(p.relative_to(LB)))
def test_no_module_imports_the_whole_balancer(path: Path) -> None:
    """Admin, workers and discovery depend on a small Protocol of what they use, never on `Balancer`."""
    assert "Balancer" not in balancer_imports(path), f"{path.relative_to(LB)} imports Balancer"

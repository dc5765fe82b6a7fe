"""The import rules of ARCHITECTURE.md, checked on the source tree (AST, no imports run)."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "src" / "conntrail"
STDLIB = sys.stdlib_module_names


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:
                base = _module_name(path).split(".")
                found.add(".".join([*base[:len(base) - node.level + 1], node.module]))
            else:
                found.add(node.module)
    return found


MODULES = {_module_name(path): _imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def _ours(names: set[str]) -> set[str]:
    return {name for name in names if name == "conntrail" or name.startswith("conntrail.")}


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_tree_was_found() -> None:
    assert "conntrail.netlink.conntrack" in MODULES and len(MODULES) > 20


@pytest.mark.parametrize("module", [m for m in MODULES if _area(m) in ("model", "errors")])
def test_model_and_errors_import_nothing_of_ours(module: str) -> None:
    assert _ours(MODULES[module]) == set()


@pytest.mark.parametrize("module", [m for m in MODULES if _area(m) == "netlink"])
def test_codec_is_sans_io(module: str) -> None:
    imports = MODULES[module]
    allowed_ours = {"conntrail.model", "conntrail.errors"}
    assert {name for name in _ours(imports) if not name.startswith("conntrail.netlink")} \
        <= allowed_ours
    third_party = {name for name in imports - _ours(imports) if name.split(".")[0] not in STDLIB
                   and name != "__future__"}
    assert third_party == set()
    assert not {"socket", "os", "asyncio", "subprocess", "select"} & imports


@pytest.mark.parametrize("module", [m for m in MODULES
                                    if _area(m) in ("formats", "filters", "inventory",
                                                    "history")])
def test_pure_layers_never_touch_the_kernel(module: str) -> None:
    assert not any(name.startswith("conntrail.kernel") for name in MODULES[module])
    assert not {"socket", "subprocess"} & MODULES[module]


def test_the_history_lifecycle_is_sans_io() -> None:
    """rows.py decides what to write; only the stores do I/O."""
    imports = MODULES["conntrail.history.rows"]
    assert _ours(imports) <= {"conntrail.model"}
    assert not {"sqlite3", "psycopg", "os", "socket"} & imports


@pytest.mark.parametrize("module", [m for m in MODULES if _area(m) not in ("cli", "__main__")])
def test_nothing_imports_the_cli(module: str) -> None:
    assert not any(name.startswith("conntrail.cli") for name in MODULES[module])


@pytest.mark.parametrize("module", [m for m in MODULES
                                    if _area(m) not in ("kernel", "cli", "__main__")])
def test_only_kernel_makes_syscalls(module: str) -> None:
    """subprocess/ctypes belong to kernel/ (select and signals are not syscalls we own);
    so does `socket`, except for network peers: sinks (syslog), metrics exporters and the
    daemon's sd_notify speak plain TCP/UDP/unix sockets, not the kernel's netlink."""
    forbidden = {"subprocess", "ctypes"}
    if _area(module) not in NETWORK_PEERS:
        forbidden.add("socket")
    assert not forbidden & MODULES[module]


NETWORK_PEERS = ("sinks", "metrics", "daemon")

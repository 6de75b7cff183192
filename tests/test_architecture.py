"""No component imports another's internals: what they share lives in ``common``.

Every module's imports are read from its source (``ast``), including imports inside
functions and under ``TYPE_CHECKING``, and relative imports resolved to absolute names.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Component -> the top-level packages it must never import.
FORBIDDEN = {
    "common": {"epp", "sidecar", "vllm_sim"},
    "sidecar": {"epp", "vllm_sim"},
    "epp": {"sidecar", "vllm_sim"},
    "vllm_sim": {"epp", "sidecar"},
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(source: str, module: str, *, is_package: bool = False) -> set[str]:
    """Absolute names of every module the source of ``module`` imports."""
    tree = ast.parse(source)
    package = module.split(".") if is_package else module.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
            # ``from pkg import module`` may import ``pkg.module``.
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


def _imports_of(path: Path) -> set[str]:
    return imported_modules(
        path.read_text(encoding="utf-8"), _module_name(path), is_package=path.name == "__init__.py"
    )


def _sources(component: str) -> list[Path]:
    return sorted(p for p in (ROOT / component).rglob("*.py") if "_proto" not in p.parts)


def test_every_component_is_scanned() -> None:
    for component in FORBIDDEN:
        assert len(_sources(component)) > 3, component


@pytest.mark.parametrize("component", sorted(FORBIDDEN))
def test_no_component_imports_another(component: str) -> None:
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in _sources(component)
        for name in sorted(_imports_of(path))
        if name.split(".")[0] in FORBIDDEN[component]
    ]
    assert violations == []


def test_the_scanner_sees_every_import_form() -> None:
    source = (
        "import epp.app\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from sidecar.settings import Settings\n"
        "def f():\n"
        "    import vllm_sim.server\n"
        "from .. import routing\n"
        "from .rules import Member\n"
    )
    names = imported_modules(source, "sidecar.ssrf.guard")
    assert {"epp.app", "sidecar.settings", "vllm_sim.server"} <= names
    assert {"sidecar.routing", "sidecar.ssrf.rules"} <= names
    assert imported_modules("from . import server\n", "vllm_sim", is_package=True) >= {
        "vllm_sim.server"
    }


def test_a_violation_is_reported() -> None:
    names = imported_modules("from epp.datastore import Endpoint\n", "sidecar.ssrf.pool")
    assert any(n.split(".")[0] in FORBIDDEN["sidecar"] for n in names)

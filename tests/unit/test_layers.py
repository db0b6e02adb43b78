"""The folders are the architecture (README "Where things are"): imports only go down the layers, so a reader finds
any behaviour from the names and a change in a lower layer never has to know the ones above. An AST walk, so that a
new upward import fails here instead of in review."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "myshop_ops"
# layer -> the layers its modules may import (its own included)
ALLOWED = {
    "base": {"base"},
    "adapters": {"base", "adapters"},
    "core": {"base", "adapters", "core"},
    "tools": {"base", "adapters", "core", "tools"},
    "cli": {"base", "adapters", "core", "tools", "cli"},
}


def imported_layers(path: Path) -> dict[str, int]:
    """The package's layers a module imports, each with the line of its first import."""
    found: dict[str, int] = {}
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("myshop_ops"):
            names = [node.module] if node.module != "myshop_ops" else [f"myshop_ops.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("myshop_ops.")]
        for name in names:
            parts = name.split(".")
            if len(parts) > 1:
                found.setdefault(parts[1], node.lineno)
    return found


def test_every_module_sits_in_a_layer():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"]
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(ALLOWED)


def test_imports_only_go_down_the_layers():
    offenders = []
    for layer, allowed in ALLOWED.items():
        for path in sorted((PACKAGE / layer).rglob("*.py")):
            for target, line in imported_layers(path).items():
                if target not in allowed:
                    offenders.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports myshop_ops.{target}")
    assert offenders == []


def test_the_walk_sees_an_upward_import(tmp_path):
    module = tmp_path / "m.py"
    module.write_text("from myshop_ops.tools import stats\nimport myshop_ops.cli.app\n")
    assert imported_layers(module) == {"tools": 1, "cli": 2}

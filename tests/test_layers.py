"""The tree reads in layers: each layer imports only what lies below it (adapters → engine → plan → strategies;
jobs and bench above the api; the command line on top)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "tokred"

#: layer of each module or subpackage, bottom (0) up
LAYERS = {
    "errors": 0,
    "hookspecs": 0,
    "registry": 1,
    "plugins": 2,
    "strategies": 2,
    "config": 2,
    "plan": 3,
    "reduction": 4,
    "engine": 5,
    "adapters": 6,
    "api": 7,
    "jobs": 8,
    "bench": 9,
    "cli": 10,
}
#: a plugin module registers parts and may reach up to what it registers, lazily (inside functions)
LAZY_OK = {"plugins", "config", "reduction", "__init__"}


def _layer_of(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "tokred" or len(parts) < 2:
        return None
    return LAYERS.get(parts[1])


def _imports(path: Path, top_level_only: bool) -> list[str]:
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names if node.module == "tokred"]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return found


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).with_suffix("")
        name = relative.parts[0]
        if name in ("__init__", "__main__"):
            continue
        yield name, path


@pytest.mark.parametrize(("name", "path"), list(_modules()), ids=lambda v: str(v) if isinstance(v, str) else "")
def test_no_module_imports_a_layer_above_its_own(name, path):
    own = LAYERS[name]
    top_level_only = name in LAZY_OK or path.name == "builtin.py"
    for module in _imports(path, top_level_only=top_level_only):
        layer = _layer_of(module)
        assert layer is None or layer <= own, f"{path.relative_to(PACKAGE)} ({name}) imports {module}"


def test_strategies_know_nothing_of_diffusers():
    for path in (PACKAGE / "strategies").rglob("*.py"):
        assert not [m for m in _imports(path, top_level_only=False) if m.startswith("diffusers")], path


def test_the_top_level_holds_the_core_only():
    top = sorted(p.stem for p in PACKAGE.glob("*.py") if not p.stem.startswith("__"))
    assert top == ["api", "cli", "config", "engine", "errors", "hookspecs", "plan", "plugins", "reduction", "registry"]
    assert sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and not p.name.startswith("__")) == [
        "adapters",
        "bench",
        "jobs",
        "presets",
        "strategies",
    ]

"""Imports only go down the layers (docs/architecture.md):

config -> distributed -> parallel -> model / data -> checkpoint -> planning -> engine -> cli

A module may import its own package and any package on a lower layer; ``model`` and ``data``
share a layer and never import each other. Imports inside functions count too: a lazy import is
still a dependency. Top-level helpers (``evoformer.errors``) sit below everything.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "evoformer"

LAYERS = {
    "errors": 0,
    "config": 1,
    "distributed": 2,
    "parallel": 3,
    "model": 4,
    "data": 4,
    "checkpoint": 5,
    "planning": 6,
    "engine": 7,
    "plot": 7,  # reads metrics.jsonl files; imports nothing of the engine
    "cli": 8,
    "torchrun": 8,
    "__main__": 9,
    "__init__": 9,
}


def _package(module: str) -> str:
    """``evoformer.model.attention`` -> ``model``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("evoformer")]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.startswith("evoformer"):
                found.append((node.lineno, node.module))
    return found


def _violations(root: Path) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root.parent).with_suffix("")
        here = _package(".".join(rel.parts))
        if here not in LAYERS:
            bad.append(f"{rel}: package {here!r} has no layer in tests/test_layering.py")
            continue
        for line, module in _imports(path):
            there = _package(module)
            if there == here:
                continue
            if there not in LAYERS:
                bad.append(f"{rel}:{line} imports {module}: no layer for {there!r}")
            elif LAYERS[there] >= LAYERS[here]:
                bad.append(f"{rel}:{line} ({here}) imports {module} ({there}): not a lower layer")
    return bad


def test_imports_only_go_down_the_layers():
    assert _violations(ROOT) == []


def test_the_check_can_fail(tmp_path):
    pkg = tmp_path / "evoformer"
    for name, text in {
        "config/schema.py": "from evoformer.model.attention import Attention\n",
        "data/build.py": "def f():\n    import evoformer.model.transformer\n",
        "model/attention.py": "from evoformer.config.schema import ModelConfig\n",
        "planner/x.py": "",
    }.items():
        (pkg / name).parent.mkdir(parents=True, exist_ok=True)
        (pkg / name).write_text(text)
    bad = _violations(pkg)
    assert any("config/schema:1 (config) imports evoformer.model.attention" in b for b in bad)
    assert any("data/build:2 (data) imports evoformer.model.transformer" in b for b in bad)
    assert any("package 'planner' has no layer" in b for b in bad)
    assert not any("model/attention" in b for b in bad)

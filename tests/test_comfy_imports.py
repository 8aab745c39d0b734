"""ComfyUI imports the node pack by its folder (``custom_nodes/<folder>``), so the core is the pack's own
``<folder>.reneg`` subpackage there and no ``reneg`` is installed: every module a node can reach, including
through imports inside functions that run only when a node runs, must import the core relatively. An
absolute ``reneg...`` import on that path passes the tests (the test environment has ``reneg`` installed)
and fails in a real ComfyUI with ``No module named 'reneg'`` when the node runs."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _reachable_from_the_nodes():
    """``(modules reached, absolute core imports among them)``, following every relative import (module
    level and inside functions) from the pack's entry point and ``nodes/``."""
    todo = [ROOT / "__init__.py", *sorted((ROOT / "nodes").glob("*.py"))]
    seen, absolute = set(), []
    while todo:
        f = todo.pop()
        if f in seen:
            continue
        seen.add(f)
        rel = f.relative_to(ROOT)
        package = list(rel.parts[:-1])
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"), filename=str(rel))):
            if isinstance(node, ast.Import):
                absolute += [
                    f"{rel}:{node.lineno}: import {a.name}" for a in node.names if a.name.split(".")[0] == "reneg"
                ]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                if (node.module or "").split(".")[0] == "reneg":
                    absolute.append(f"{rel}:{node.lineno}: from {node.module}")
            elif isinstance(node, ast.ImportFrom):
                parts = package[: len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                for i in range(1, len(parts) + 1):  # the packages on the way, then the module or its names
                    todo.append(ROOT.joinpath(*parts[:i], "__init__.py"))
                for name in [None] + [a.name for a in node.names]:
                    target = ROOT.joinpath(*parts, *([name] if name else []))
                    todo += [target.with_suffix(".py"), target / "__init__.py"]
                todo = [t for t in todo if t.is_file()]
    return seen, absolute


def test_every_module_the_nodes_reach_imports_the_core_relatively():
    seen, absolute = _reachable_from_the_nodes()
    # the walk follows the nodes into the core: the sampler, the tuning, the backends, the rewards
    for module in ("reneg/sampling.py", "reneg/tuning.py", "reneg/backends/comfy_backend.py", "reneg/frame_reward.py"):
        assert ROOT / module in seen, module
    assert not absolute, absolute

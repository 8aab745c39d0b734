"""The pack as the Comfy Registry publishes it: pyproject.toml's metadata, the node download that
.comfyignore leaves, and the registry's rules for the code in it (no eval/exec, no pip at run time)."""

from __future__ import annotations

import ast
import fnmatch
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = None


def _pyproject() -> dict:
    if tomllib is None:
        pytest.skip("tomllib needs Python 3.11")
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _ignored(path: str, patterns: list[str]) -> bool:
    for p in patterns:
        if p.endswith("/"):
            if path.startswith(p) or f"/{p}" in f"/{path}":
                return True
        elif fnmatch.fnmatch(path, p) or fnmatch.fnmatch(Path(path).name, p):
            return True
    return False


def _download() -> list[str]:
    """The files the registry packs: git-tracked files minus .comfyignore's patterns."""
    try:
        tracked = subprocess.run(
            ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
        ).stdout.split("\n")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    patterns = [
        line.strip()
        for line in (ROOT / ".comfyignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return [f for f in tracked if f and not _ignored(f, patterns)]


def test_registry_metadata_is_complete():
    data = _pyproject()
    project, comfy = data["project"], data["tool"]["comfy"]
    # the node id: letters, digits, - _ . (no two special characters in a row), not "ComfyUI", < 100 chars
    assert re.fullmatch(r"[A-Za-z][A-Za-z0-9]*([-_.][A-Za-z0-9]+)*", project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])  # X.Y.Z
    assert project["description"].strip() and project["license"]
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"].strip()
    # the icon ships in the repository (square, at most 400 px); [tool.comfy] Icon is its URL once the
    # repository is published ([project.urls] Repository): both are set together
    from PIL import Image

    with Image.open(ROOT / "docs" / "images" / "icon.png") as im:
        assert im.size[0] == im.size[1] <= 400
    repo = (project.get("urls") or {}).get("Repository", "")
    if repo:
        assert comfy["Icon"].endswith("/docs/images/icon.png"), "Icon: the shipped docs/images/icon.png"
    else:
        assert comfy["Icon"] == "", "Icon is set with the repository's URL"


def test_the_node_download_holds_what_comfyui_loads_and_nothing_of_tests_or_tools():
    files = set(_download())
    must = ["__init__.py", "install.py", "requirements.txt", "pyproject.toml", "README.md"]
    must += [str(p.relative_to(ROOT)) for p in (ROOT / "nodes").glob("*.py")]
    must += [str(p.relative_to(ROOT)) for p in (ROOT / "web").rglob("*.js")]
    must += [str(p.relative_to(ROOT)) for p in (ROOT / "workflows").glob("*.json")]
    # every module of the core the nodes import (reneg/, demo world assets aside)
    must += [str(p.relative_to(ROOT)) for p in (ROOT / "reneg").rglob("*.py") if "__pycache__" not in p.parts]
    missing = [f for f in must if f not in files]
    assert not missing, f"left out of the node download: {missing[:10]}"
    for folder in ("tests/", "benchmarks/", "tools/", ".ci/", "reneg/demo_world/assets/"):
        assert not any(f.startswith(folder) for f in files), folder


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            yield f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else None, node


def test_the_download_has_no_eval_exec_or_pip_at_run_time():
    """The registry's rules: no eval/exec, and nothing installs packages from code a node runs (install.py
    is ComfyUI-Manager's install step, run once at install; its pip is constrained to the host's torch)."""
    offenders = []
    for f in _download():
        if not f.endswith(".py"):
            continue
        tree = ast.parse((ROOT / f).read_text(encoding="utf-8"), filename=f)
        for name, node in _calls(tree):
            if isinstance(node.func, ast.Name) and name in ("eval", "exec", "compile", "__import__"):
                offenders.append(f"{f}:{node.lineno}: {name}()")
            if name in ("system", "popen") or (
                f != "install.py"
                and any(isinstance(a, ast.Constant) and a.value == "pip" for a in ast.walk(node) if a is not node)
            ):
                offenders.append(f"{f}:{node.lineno}: runs pip or a shell")
    assert not offenders, offenders

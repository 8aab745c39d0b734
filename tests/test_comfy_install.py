"""The root install.py that ComfyUI-Manager runs: never touches torch, does nothing in a webui, and adds or
changes nothing in a ComfyUI environment that already has what the pack needs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, pythonpath=""):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run(
        [sys.executable, str(ROOT / "install.py")], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60
    )


def test_install_py_does_nothing_when_requirements_are_present(tmp_path):
    out = _run(tmp_path)  # the test environment has open_clip
    assert out.returncode == 0 and "nothing to install" in out.stdout, out.stdout + out.stderr


def test_install_py_does_nothing_inside_an_a1111_webui(tmp_path):
    webui = tmp_path / "webui"
    (webui / "modules").mkdir(parents=True)
    (webui / "modules" / "__init__.py").write_text("")
    (webui / "launch.py").write_text("raise SystemExit('launch must not be imported')\n")
    out = _run(tmp_path, pythonpath=str(webui))
    assert out.returncode == 0 and "Nothing installed" in out.stdout and "a1111_extension" in out.stdout


def test_install_py_holds_torch_at_the_installed_version():
    import importlib.metadata
    import importlib.util

    spec = importlib.util.spec_from_file_location("reneg_root_install", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    lines = mod.constraints().split()
    assert f"torch=={importlib.metadata.version('torch')}" in lines
    reqs = (ROOT / "requirements.txt").read_text().splitlines()
    assert not any(r.strip().lower().startswith("torch") for r in reqs)  # never pinned nor listed
    assert set(mod.NEEDED.values()) <= {r.strip() for r in reqs if r.strip() and not r.startswith("#")}


def test_entry_point_loaded_as_a_lone_file_registers_nothing_and_does_not_fail(tmp_path):
    """pytest imports the checkout's __init__.py as a lone module named ``__init__`` when the folder name is not
    a Python identifier (``git clone ... comfyui-reneg``); that must not break the test run."""
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('__init__', {str(ROOT / '__init__.py')!r})\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.NODE_CLASS_MAPPINGS, m.NODE_DISPLAY_NAME_MAPPINGS, m.WEB_DIRECTORY)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "{} {} ./web/js", out.stdout + out.stderr


BANNED = ("image-reward", "image_reward", "imagereward", "timm", "fairscale", "clip")  # the ImageReward package's pins


def _distributions() -> dict[str, str]:
    import importlib.metadata

    return {(d.metadata["Name"] or "").lower(): d.version for d in importlib.metadata.distributions()}


def test_installing_into_a_comfyui_environment_changes_nothing_it_has(tmp_path):
    """ComfyUI-Manager installs requirements.txt, then runs install.py: in an environment that has what
    ComfyUI ships (torch, transformers, safetensors, numpy) plus open_clip, not one distribution is
    added, removed or moved to another version; ImageReward brings none of its package's pins."""
    before = _distributions()
    out = _run(tmp_path)
    assert out.returncode == 0 and "nothing to install" in out.stdout, out.stdout + out.stderr
    assert _distributions() == before
    reqs = [
        r.strip().lower()
        for r in (ROOT / "requirements.txt").read_text().splitlines()
        if r.strip() and not r.startswith("#")
    ]
    import re

    names = {re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0] for r in reqs}
    assert not names & set(BANNED), names
    assert not any("==" in r or "<" in r for r in reqs), reqs  # nothing pinned, nothing held back


def _third_party_imports(path: Path) -> set[str]:
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found - set(sys.stdlib_module_names) - {"reneg"}


def test_rewards_and_nodes_need_only_what_the_host_has():
    """Every reward (ImageReward included) and node imports only torch, safetensors, numpy, transformers
    and open_clip, never the ImageReward package or its pins; and listing the rewards (as the nodes do
    when ComfyUI starts) imports none of the heavy ones."""
    files = sorted((ROOT / "reneg" / "rewards").glob("*.py")) + sorted((ROOT / "nodes").glob("*.py"))
    allowed = {"torch", "safetensors", "numpy", "transformers", "open_clip", "PIL", "comfy", "folder_paths"}
    for f in files:
        extra = _third_party_imports(f) - allowed
        assert not extra, f"{f.relative_to(ROOT)} imports {sorted(extra)}"
    code = (
        "import sys, reneg.rewards as r\n"
        "names = r.names()\n"
        "heavy = [m for m in ('transformers', 'open_clip', 'timm', 'fairscale', 'ImageReward', 'diffusers') "
        "if m in sys.modules]\n"
        "print(','.join(names), heavy)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["aesthetic,hpsv2,hpsv2.1,imagereward,pickscore", "[]"], out.stdout + out.stderr

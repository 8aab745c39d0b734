"""The root install.py that ComfyUI-Manager runs: never touches torch, does nothing in a webui."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(tmp_path, pythonpath=""):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, str(ROOT / "install.py")], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=60)


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
    code = ("import importlib.util, sys\n"
            f"spec = importlib.util.spec_from_file_location('__init__', {str(ROOT / '__init__.py')!r})\n"
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
            "print(m.NODE_CLASS_MAPPINGS, m.NODE_DISPLAY_NAME_MAPPINGS, m.WEB_DIRECTORY)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "{} {} ./web/js", out.stdout + out.stderr

"""Install step for ReNeg's ComfyUI nodes; ComfyUI-Manager runs it after requirements.txt.

It installs what requirements.txt lists only if something is missing, with pip
constrained to the torch and torchvision already installed, so it can never
change the host's torch. Run by hand with ComfyUI's Python:
``python custom_nodes/ReNeg/install.py``.

In an AUTOMATIC1111 / Forge webui (which runs an extension's ``install.py`` with its
own ``launch`` module importable: "Install from URL" clones this whole repository, and
``scripts/`` runs the extension in ``a1111_extension/``) it installs nothing: the
extension needs only torch and safetensors, which the webui ships.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
# module to import -> requirement (as in requirements.txt)
NEEDED = {"open_clip": "open-clip-torch>=2.24"}
PINNED = ("torch", "torchvision", "torchaudio")


def in_webui() -> bool:
    """AUTOMATIC1111, Forge and reForge run extension installers with ``launch`` importable."""
    try:
        return importlib.util.find_spec("launch") is not None and importlib.util.find_spec("modules") is not None
    except (ImportError, ValueError):
        return False


def missing() -> list[str]:
    return [req for mod, req in NEEDED.items() if importlib.util.find_spec(mod) is None]


def constraints() -> str:
    """pip constraints that hold torch (and friends) at the installed versions."""
    lines = []
    for name in PINNED:
        try:
            lines.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return "\n".join(lines) + "\n"


def main() -> int:
    if in_webui():
        print(
            "[ReNeg] webui extension (scripts/ runs a1111_extension/scripts/reneg_negative.py): it needs "
            "only torch and safetensors, which the webui ships. Nothing installed."
        )
        return 0
    todo = missing()
    if not todo:
        print("[ReNeg] requirements present; nothing to install")
        return 0
    if importlib.util.find_spec("torch") is None:
        print(
            "[ReNeg] torch is not installed in this Python; install ComfyUI's requirements first. Nothing installed.",
            file=sys.stderr,
        )
        return 1
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        f.write(constraints())
        pins = f.name
    try:
        cmd = [sys.executable, "-m", "pip", "install", "-c", pins, *todo]
        print("[ReNeg] " + " ".join(cmd), flush=True)
        rc = subprocess.call(cmd)
    finally:
        os.unlink(pins)
    if rc:
        print(
            f"[ReNeg] pip failed (exit {rc}); install {' '.join(todo)} by hand with ComfyUI's Python. "
            f"torch was not changed.",
            file=sys.stderr,
        )
    return rc


if __name__ == "__main__":
    sys.exit(main())

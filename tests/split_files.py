"""``reneg train`` for one step on a transformer file with its parts, as the split-file tests of each family run it."""

from __future__ import annotations

from reneg.cli import main
from reneg.embedding import load_embedding


def train_one_step(tmp_path, capsys, model: str, parts: list[str], reward: str, prompts: list[str], size: int) -> str:
    """Train one step of one sample on ``model`` with ``parts`` (``--text-encoder FILE``, ``--vae FILE`` ...), the
    prompts written twice to a file, a one-prompt held-out set; the trained file's family."""
    out = tmp_path / "run"
    pf = tmp_path / "prompts.txt"
    pf.write_text("\n".join(prompts * 2))
    args = ["train", "--model", model, *parts, "--reward", f"hpsv2={reward}", "--prompts", str(pf)]
    args += ["--sampling-steps", "3", "--grad-range", "0", "1", "--resolution", str(size), "--heldout-count", "1"]
    args += ["--out", str(out), "--steps", "1", "--batch-size", "1", "--eval-every", "0", "--no-progress"]
    assert main(args) == 0, capsys.readouterr().err
    return load_embedding(out / "embedding.safetensors").family

"""reneg train / reneg tune end to end on tiny models, through the CLI."""

from __future__ import annotations

import csv
import json

import torch

from reneg.cli import main
from reneg.embedding import load_embedding


def _prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")))
    return str(p)


def test_train_writes_embedding_summary_log_and_checkpoint(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, capsys):
    out = tmp_path / "run"
    rc = main(
        [
            "train",
            "--model",
            tiny_pipeline_dir,
            "--reward",
            f"hpsv2={tiny_hps_ckpt}",
            "--prompts",
            _prompts(tmp_path),
            "--heldout-count",
            "2",
            "--out",
            str(out),
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--micro-batch",
            "2",
            "--sampling-steps",
            "6",
            "--grad-range",
            "0",
            "2",
            "--resolution",
            "16",
            "--lr",
            "0.05",
            "--checkpoint-every",
            "2",
            "--eval-every",
            "2",
            "--no-progress",
            "--handcrafted",
            "blurry",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["family"] == "tiny"
    assert set(summary["heldout"]) == {"null", "handcrafted", "learned", "diversity"}
    assert [h["step"] for h in summary["heldout_history"]] == [2, 4]
    # null and handcrafted are scored once, on the same seeds, and reused
    assert len({h["null"] for h in summary["heldout_history"]}) == 1
    emb = load_embedding(out / "embedding.safetensors")
    assert emb.family == "tiny" and emb.metadata["kind"] == "global"
    assert emb.metadata["steps"] == "4" and emb.metadata["batch"] == "4"
    null = torch.load(out / "checkpoint.pt", weights_only=True)
    assert null["step"] == 4 and torch.equal(null["neg"], emb.tensor)
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(r["reward"] for r in rows) and rows[1]["heldout_learned"]
    # the embedding moved away from its null start
    from reneg.backends.loading import load_diffusers

    n0, _ = load_diffusers(tiny_pipeline_dir).null_embedding()
    assert not torch.allclose(emb.tensor, n0)


def test_tune_cli_writes_per_sample_embedding(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, capsys):
    out = tmp_path / "tuned.safetensors"
    rc = main(
        [
            "tune",
            "--model",
            tiny_pipeline_dir,
            "--reward",
            f"hpsv2={tiny_hps_ckpt}",
            "--prompt",
            "a red circle",
            "--seed",
            "3",
            "--max-steps",
            "3",
            "--patience",
            "2",
            "--lr",
            "0.05",
            "--sampling-steps",
            "6",
            "--grad-range",
            "0",
            "2",
            "--resolution",
            "16",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    emb = load_embedding(out)
    assert emb.metadata["kind"] == "per-sample" and emb.metadata["prompt"] == "a red circle"
    assert emb.metadata["seed"] == "3"
    rep = json.loads((tmp_path / "tuned.json").read_text())
    assert rep["best_reward"] >= rep["start_reward"]
    assert [h["step"] for h in rep["history"]] == list(range(len(rep["history"])))
    # refusing to overwrite without --overwrite, before loading anything
    rc = main(
        ["tune", "--model", tiny_pipeline_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--prompt", "x", "--out", str(out)]
    )
    assert rc == 2 and "already exists" in capsys.readouterr().err

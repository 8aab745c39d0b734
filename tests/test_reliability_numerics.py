"""Numerical faults: a NaN or inf loss or gradient skips that update and is
counted; after ``--max-bad-steps`` in a row the run stops with a clear message and the
last good checkpoint intact.

Faults are injected through a reward registered in the rewards registry for the test
(``faulty=HPS_FILE``): the tiny HPS reward, made to return NaN or inf, or to send a NaN
gradient back while its value stays finite, at chosen training steps. Were a bad update
applied, AdamW would turn the embedding into NaN, so a finite result after a fault
shows the update was skipped.
"""

from __future__ import annotations

import csv
import json
import os

import pytest
import torch

from reneg.embedding import load_embedding
from reneg.rewards import Reward, RewardInfo, _REGISTRY
from reneg.trainer.checkpoint import load_checkpoint

# which training steps (1-based) misbehave, and how; set by each test
FAULT = {"steps": set(), "mode": "nan", "calls": 0, "per_step": 1, "train_calls": 0}


class _NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


class Faulty(Reward):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, images, prompts):
        call = FAULT["calls"]
        FAULT["calls"] += 1
        step = call // FAULT["per_step"] + 1
        bad = call < FAULT["train_calls"] and step in FAULT["steps"]
        if bad and FAULT["mode"] == "nangrad":
            return self.inner(_NanGrad.apply(images), prompts)
        r = self.inner(images, prompts)
        if bad:
            return r + float("nan") if FAULT["mode"] == "nan" else r + float("inf")
        return r


def _load_faulty(path, device="cpu", dtype=torch.float32, **options):
    from reneg.rewards.hps import _load_hps

    return Faulty(_load_hps(path, device=device, dtype=dtype))


@pytest.fixture
def faulty(monkeypatch):
    monkeypatch.setitem(_REGISTRY, "faulty", RewardInfo("faulty", _load_faulty, "test: injected faults"))
    yield FAULT


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("numerics") / "prompts.txt"
    p.write_text("a red circle\na blue square\na green star\na yellow triangle\na purple circle\n", encoding="utf-8")
    return str(p)


def run(tiny_pipeline_dir, tiny_hps_ckpt, prompts, out, steps=5, max_bad=3, every=2, extra=()):
    from reneg.cli import main

    FAULT["calls"] = 0
    FAULT["per_step"] = 1  # batch 2 in one micro-batch: one reward call per step
    FAULT["train_calls"] = steps  # held-out scoring at the end is never faulty
    return main(
        [
            "train",
            "--model",
            tiny_pipeline_dir,
            "--reward",
            f"faulty={tiny_hps_ckpt}",
            "--prompts",
            prompts,
            "--heldout-count",
            "2",
            "--out",
            out,
            "--steps",
            str(steps),
            "--batch-size",
            "2",
            "--micro-batch",
            "2",
            "--sampling-steps",
            "3",
            "--grad-range",
            "0",
            "1",
            "--resolution",
            "16",
            "--checkpoint-every",
            str(every),
            "--eval-every",
            "0",
            "--eval-batch",
            "2",
            "--lr",
            "5e-2",
            "--max-bad-steps",
            str(max_bad),
            "--device",
            "cpu",
            "--no-progress",
            *extra,
        ]
    )


def log_rows(out):
    with open(os.path.join(out, "log.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("mode", ["nan", "inf", "nangrad"])
def test_bad_update_is_skipped_and_counted(
    faulty, tiny_pipeline_dir, tiny_hps_ckpt, prompts_file, tmp_path, capsys, mode
):
    faulty["mode"], faulty["steps"] = mode, {2, 4}  # not in a row: the run goes on
    out = str(tmp_path / mode)
    assert run(tiny_pipeline_dir, tiny_hps_ckpt, prompts_file, out, max_bad=2) == 0
    text = capsys.readouterr().out
    assert "step 2: non-finite loss or gradient, update skipped (1 in a row, 1 in all)" in text
    assert "step 4: non-finite loss or gradient, update skipped (1 in a row, 2 in all)" in text
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["skipped_updates"] == 2
    assert [r["skipped"] for r in log_rows(out)] == ["0", "1", "1", "2", "2"]
    emb = load_embedding(os.path.join(out, "embedding.safetensors"))  # refuses NaN
    state = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert state["skipped"] == 2 and state["step"] == 5
    assert torch.isfinite(emb.tensor).all()
    for s in state["optimizer"]["state"].values():
        assert all(torch.isfinite(v).all() for v in s.values() if isinstance(v, torch.Tensor))


def test_unskipped_fault_would_poison_the_embedding():
    """The premise of the test above: one NaN gradient through AdamW makes the tensor NaN."""
    p = torch.nn.Parameter(torch.zeros(1, 77, 64))
    opt = torch.optim.AdamW([p], lr=5e-2)
    p.grad = torch.full_like(p, float("nan"))
    opt.step()
    assert torch.isnan(p).all()


def test_bad_steps_in_a_row_stop_the_run(faulty, tiny_pipeline_dir, tiny_hps_ckpt, prompts_file, tmp_path, capsys):
    faulty["mode"], faulty["steps"] = "nan", {3, 4, 5, 6}
    out = str(tmp_path / "stop")
    assert run(tiny_pipeline_dir, tiny_hps_ckpt, prompts_file, out, steps=6, max_bad=2) == 2
    captured = capsys.readouterr()
    # one line from reneg (transformers' own progress bars may share stderr)
    lines = [ln for ln in captured.err.splitlines() if ln.startswith("reneg")]
    assert len(lines) == 1, captured.err
    err = lines[0]
    assert "stopped: 2 non-finite updates in a row" in err and "--max-bad-steps 2" in err, err
    assert os.path.join(out, "checkpoint.pt") in err
    assert "step 3: non-finite" in captured.out and "step 5" not in captured.out
    # the last good checkpoint (step 2) is intact, loadable and finite; the summary says the run failed
    state = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    assert state["step"] == 2 and state["skipped"] == 0
    emb = load_embedding(os.path.join(out, "embedding.safetensors"))
    assert emb.metadata["trained_steps"] == "2"
    assert torch.equal(emb.tensor, state["neg"])
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        summary = json.load(f)
    assert summary["status"] == "failed" and "non-finite updates in a row" in summary["error"], summary
    assert [r["step"] for r in log_rows(out)] == ["1", "2", "3"]  # step 4 raised before its row

    # once the fault is gone, --resume carries on from the good checkpoint
    faulty["steps"] = set()
    assert run(tiny_pipeline_dir, tiny_hps_ckpt, prompts_file, out, steps=6, max_bad=2, extra=("--resume",)) == 0
    assert load_checkpoint(os.path.join(out, "checkpoint.pt"))["step"] == 6
    assert [r["step"] for r in log_rows(out)] == ["1", "2", "3", "4", "5", "6"]


def test_stop_before_any_checkpoint_says_so(faulty, tiny_pipeline_dir, tiny_hps_ckpt, prompts_file, tmp_path, capsys):
    faulty["mode"], faulty["steps"] = "inf", {1, 2, 3}
    out = str(tmp_path / "early")
    assert run(tiny_pipeline_dir, tiny_hps_ckpt, prompts_file, out, steps=4, max_bad=2) == 2
    err = capsys.readouterr().err
    assert "stopped: 2 non-finite updates in a row" in err and "No checkpoint was written" in err, err
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))

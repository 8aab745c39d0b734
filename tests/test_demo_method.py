"""The method on the demo world: `reneg train --demo --recipe fast` must raise the held-out reward.

This is the regression test for the method itself (sampler, CFG, objective, gradient, optimiser,
embedding file): if a change breaks any of them, the learned negative no longer beats the null one on
prompts it never saw, and this test fails. It runs the trainer on the shipped demo world (a real
diffusers folder and an HPS-format reward) with the demo's recipe under `--recipe fast`.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from reneg import demo
from reneg.embedding import load_embedding


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    from reneg.trainer.config import TrainConfig
    from reneg.trainer.train import run_train

    out = tmp_path_factory.mktemp("demo-method")
    d = demo.setup(str(out))
    if d["kind"] != "demo world":
        pytest.skip("the demo world's assets are not installed")
    s = dict(d["settings"])
    # the demo's recipe (160 steps of 16, 30 DDIM steps, grad step among the last 11, lr 5e-2) under
    # `--recipe fast` (a 6-step no-grad rollout, 0.38 of the compute) on training seed 5: the seed on which
    # the earlier fast recipe (a third of the steps at twice the lr) ended below the null negative (0.6913
    # against 0.6982 on 256 held-out images). So this also tests the fast recipe where it once failed.
    from reneg.trainer.config import RECIPES

    s.update(RECIPES["fast"], recipe="fast", seed=5, eval_every=0, checkpoint_every=s["steps"])
    kw = {k: v for k, v in s.items() if k in TrainConfig.__dataclass_fields__}
    cfg = TrainConfig(
        model=d["model"],
        rewards=[d["reward"]],
        prompts=d["prompts"],
        heldout=d["heldout"],
        out=str(out / "train"),
        handcrafted=d["handcrafted"],
        progress=False,
        device="cpu",
        **kw,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count() or 1))  # as `reneg train --demo` runs it
    try:
        summary = run_train(cfg)
    finally:
        torch.set_num_threads(threads)
    return out / "train", summary


@pytest.mark.slow
def test_learned_beats_null_on_heldout_prompts(short_run):
    folder, summary = short_run
    h = summary["heldout"]
    assert summary["heldout_prompts"] == 32 and summary["skipped_updates"] == 0
    # the learned negative, judged by the trainer on the 32 held-out prompts (seeds 1234..1265), beats the
    # null one (0.7416 against 0.6865 where this was written, on one thread)
    assert h["learned"] > h["null"] + 0.01, h
    emb = load_embedding(str(folder / "embedding.safetensors"), expected_family="tiny")
    assert torch.isfinite(emb.tensor).all()
    on_disk = json.loads((folder / "summary.json").read_text())
    assert on_disk["heldout"] == h

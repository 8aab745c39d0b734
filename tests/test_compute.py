"""The compute meter and the compute-saving options (docs/compute.md), on tiny models.

Counts are exact and deterministic: every test below knows, from the recipe alone, how many
UNet calls (at which batch), decodes and reward passes a run must make.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from reneg.cli import main
from reneg.compute import SD15_512, ComputeMeter
from reneg.embedding import load_embedding
from reneg.objective import ObjectiveConfig, grad_step_x0, grad_step_loss, rollout_schedule
from reneg.sampling import initial_latent, sample

PROMPTS = [
    "a red circle",
    "a blue square",
    "a green star",
    "a yellow triangle",
    "a purple circle",
    "a red star",
    "an orange square",
    "a blue star",
]


def _prompts(tmp_path) -> str:
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(PROMPTS) + "\n")
    return str(p)


def _step(backend, reward, meter, grad_index, rollout_steps=None, seed=0, neg=None, steps=6):
    ps = ["a red circle", "a blue square"]
    sigmas = backend.schedule(steps)
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(backend.latent_shape(2, 16, 16), generator=g)
    null, _ = backend.null_embedding()
    neg = (null.clone() if neg is None else neg).requires_grad_(True)
    res = grad_step_loss(
        meter.denoiser(backend.denoiser),
        meter.decode(backend.decode),
        meter.reward(reward),
        ps,
        backend.encode_prompts(ps),
        backend.negative_cond(neg),
        initial_latent(noise, sigmas[0]),
        sigmas,
        7.5,
        grad_index,
        rollout_steps=rollout_steps,
    )
    res.loss.backward()
    return res, neg


def test_meter_counts_the_paper_step_exactly(tiny_backend, tiny_reward):
    meter = ComputeMeter()
    res, neg = _step(tiny_backend, tiny_reward, meter, grad_index=4)
    c = meter.counts
    # 4 no-grad CFG steps at batch 2 x 2 (both branches in one call), then the grad step: the
    # conditional branch without grad (batch 2), the negative's branch with grad (batch 2)
    assert c["unet"]["by_batch"] == {"nograd:4": 4, "nograd:2": 1, "grad:2": 1}
    assert (c["unet"]["items_nograd"], c["unet"]["items_grad"], c["unet"]["items_backward"]) == (18, 2, 2)
    assert c["decode"]["by_batch"] == {"grad:2": 1} and c["decode"]["items_backward"] == 2
    assert c["reward"]["by_batch"] == {"grad:2": 1} and c["reward"]["items_backward"] == 2
    assert meter.units() == {"U": 22, "V": 4, "R": 4}
    assert meter.unet_calls() == 6
    assert meter.tflop_sd15() == pytest.approx((22 * SD15_512["U"] + 4 * SD15_512["V"] + 4 * SD15_512["R"]) / 1e12)
    # the metered step is the paper's step: same loss and gradient as the unmetered formula
    sigmas = tiny_backend.schedule(6)
    ps = ["a red circle", "a blue square"]
    noise = torch.randn(tiny_backend.latent_shape(2, 16, 16), generator=torch.Generator().manual_seed(0))
    neg2 = tiny_backend.null_embedding()[0].clone().requires_grad_(True)
    cond, unc = tiny_backend.encode_prompts(ps), tiny_backend.negative_cond(neg2)
    with torch.no_grad():
        x, _ = sample(tiny_backend.denoiser, initial_latent(noise, sigmas[0]), sigmas, cond, unc.detach(), 7.5, stop=4)
    x0 = grad_step_x0(tiny_backend.denoiser, x, torch.full((2,), float(sigmas[4])), cond, unc, 7.5)
    loss = -tiny_reward(tiny_backend.decode(x0), ps).mean()
    loss.backward()
    assert torch.equal(loss.detach(), res.loss.detach())
    assert torch.equal(neg2.grad, neg.grad)


def test_meter_counts_shorter_rollout_and_several_grad_steps(tiny_backend, tiny_reward):
    sigmas = tiny_backend.schedule(6)
    # 2 no-grad steps from sigma_max land exactly on the grad step's sigma
    sub = rollout_schedule(sigmas, 3, 2)
    assert len(sub) == 3 and sub[0] == sigmas[0] and sub[-1] == sigmas[3]
    assert torch.equal(rollout_schedule(sigmas, 3, None), sigmas[:4])
    meter = ComputeMeter()
    res, neg = _step(tiny_backend, tiny_reward, meter, grad_index=[3, 5], rollout_steps=2)
    c = meter.counts["unet"]
    # 2 steps to index 3, a grad step there, its own prediction carries the trajectory to 4,
    # one CFG step 4 -> 5, a grad step at 5
    assert c["by_batch"] == {"nograd:4": 3, "nograd:2": 2, "grad:2": 2}
    assert meter.units() == {"U": 3 * 4 + 2 * 2 + 2 * 2 * 2, "V": 8, "R": 8}
    assert res.rewards.shape == (4,) and res.grad_index == 5
    assert neg.grad is not None and torch.isfinite(neg.grad).all() and neg.grad.abs().sum() > 0


def test_grad_indices_default_draws_what_the_paper_draws():
    obj = ObjectiveConfig(30, 7.5, (0, 10))
    a = [obj.grad_index(torch.Generator().manual_seed(s)) for s in range(20)]
    b = [obj.grad_indices(1, torch.Generator().manual_seed(s))[0] for s in range(20)]
    assert a == b
    many = obj.grad_indices(3, torch.Generator().manual_seed(1))
    assert len(set(many)) == 3 and many == sorted(many) and all(19 <= i <= 29 for i in many)
    with pytest.raises(ValueError, match="do not fit"):
        ObjectiveConfig(6, 7.5, (0, 1)).grad_indices(3)


def _train(tiny_pipeline_dir, tiny_hps_ckpt, prompts, out, *extra):
    return [
        "train",
        "--model",
        tiny_pipeline_dir,
        "--reward",
        f"hpsv2={tiny_hps_ckpt}",
        "--prompts",
        prompts,
        "--heldout-count",
        "2",
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--micro-batch",
        "2",
        "--sampling-steps",
        "4",
        "--resolution",
        "16",
        "--lr",
        "0.05",
        "--eval-every",
        "0",
        "--no-progress",
        "--device",
        "cpu",
        *extra,
    ]


def test_train_reports_exact_compute(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, capsys):
    out = tmp_path / "run"
    rc = main(
        _train(tiny_pipeline_dir, tiny_hps_ckpt, _prompts(tmp_path), out, "--steps", "2", "--grad-range", "1", "1")
    )
    assert rc == 0, capsys.readouterr().err
    s = json.loads((out / "summary.json").read_text())["compute"]
    # grad step fixed at index 2 of 4: per micro-batch of 2, 2 CFG calls at batch 4, the cond
    # branch at batch 2, the negative's branch at batch 2 with its backward; 2 steps x 2 micro-batches
    per = {"U": 2 * 4 + 2 + 2 + 2, "V": 4, "R": 4}
    assert s["units"] == {k: 4 * v for k, v in per.items()}
    assert s["unet_calls"] == 4 * 4
    assert s["counts"]["unet"]["by_batch"] == {"nograd:4": 8, "nograd:2": 4, "grad:2": 4}
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [int(r["compute_U"]) for r in rows] == [2 * per["U"], 4 * per["U"]]  # cumulative
    assert float(rows[-1]["compute_tflop_sd15"]) == pytest.approx(s["tflop_sd15_512"], rel=1e-4)


def _stopped_after_checkpoint(monkeypatch, argv: list, step: int) -> None:
    """Run ``argv`` and kill it right after it has written the checkpoint of ``step``."""
    from reneg.trainer import train as T

    real = T.save_checkpoint

    class Stop(Exception):
        pass

    def save_then_stop(path, **kw):
        real(path, **kw)
        if kw["step"] == step:
            raise Stop()

    monkeypatch.setattr(T, "save_checkpoint", save_then_stop)
    with pytest.raises(Stop):
        main(argv)
    monkeypatch.setattr(T, "save_checkpoint", real)


def test_options_resume_exactly_and_keep_the_count(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, monkeypatch, capsys):
    """A run with the options, interrupted after its first checkpoint and resumed, ends with the
    uninterrupted run's embedding and compute totals."""

    prompts = _prompts(tmp_path)
    opts = [
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
        "--grad-range",
        "0",
        "2",
        "--rollout-steps",
        "2",
        "--grads-per-rollout",
        "2",
        "--seed",
        "5",
    ]
    assert main(_train(tiny_pipeline_dir, tiny_hps_ckpt, prompts, tmp_path / "a", *opts)) == 0
    _stopped_after_checkpoint(monkeypatch, _train(tiny_pipeline_dir, tiny_hps_ckpt, prompts, tmp_path / "b", *opts), 2)
    assert main(_train(tiny_pipeline_dir, tiny_hps_ckpt, prompts, tmp_path / "b", *opts, "--resume")) == 0
    a, b = (load_embedding(tmp_path / k / "embedding.safetensors").tensor for k in ("a", "b"))
    # the tolerance of the trainer's own kill-and-resume tests (AdamW's state round-trips through a file)
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), float((a - b).abs().max())
    sa, sb = (json.loads((tmp_path / k / "summary.json").read_text())["compute"] for k in ("a", "b"))
    assert sa["counts"] == sb["counts"] and sa["units"]["U"] > 0
    # a different option is refused on resume, naming it
    rc = main(
        _train(
            tiny_pipeline_dir,
            tiny_hps_ckpt,
            prompts,
            tmp_path / "b",
            *[o if o != "2" or i != opts.index("--rollout-steps") + 1 else "3" for i, o in enumerate(opts)],
            "--steps",
            "6",
            "--resume",
        )
    )
    assert rc == 2 and "--rollout-steps" in capsys.readouterr().err


def test_fast_recipe_resumes_exactly(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, monkeypatch, capsys):
    """--recipe fast (the paper's steps and lr with a 6-step no-grad rollout): the run records the options
    it used, costs less than the paper recipe, and a stopped run resumed ends with the uninterrupted
    run's embedding; a resume with another --rollout-steps is refused by name."""
    prompts = _prompts(tmp_path)
    opts = [
        "--steps",
        "4",
        "--checkpoint-every",
        "2",
        "--seed",
        "3",
        "--sampling-steps",
        "12",
        "--grad-range",
        "0",
        "2",
    ]
    assert main(_train(tiny_pipeline_dir, tiny_hps_ckpt, prompts, tmp_path / "a", *opts, "--recipe", "fast")) == 0
    assert main(_train(tiny_pipeline_dir, tiny_hps_ckpt, prompts, tmp_path / "p", *opts)) == 0
    fast, paper = (json.loads((tmp_path / k / "summary.json").read_text()) for k in ("a", "p"))
    cfg = fast["config"]
    assert (cfg["recipe"], cfg["steps"], cfg["lr"], cfg["rollout_steps"]) == ("fast", 4, pytest.approx(0.05), 6)
    assert fast["compute"]["units"]["U"] < paper["compute"]["units"]["U"]
    argv = _train(tiny_pipeline_dir, tiny_hps_ckpt, prompts, tmp_path / "b", *opts, "--recipe", "fast")
    _stopped_after_checkpoint(monkeypatch, argv, 2)
    assert main(argv + ["--resume"]) == 0
    a, b = (load_embedding(tmp_path / k / "embedding.safetensors").tensor for k in ("a", "b"))
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6), float((a - b).abs().max())
    capsys.readouterr()
    rc = main(argv + ["--rollout-steps", "3", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "--rollout-steps 6" in err and "--rollout-steps 3" in err, err


def test_options_are_validated_before_loading(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, capsys):
    prompts = _prompts(tmp_path)
    rc = main(
        _train(
            tiny_pipeline_dir,
            tiny_hps_ckpt,
            prompts,
            tmp_path / "x",
            "--grad-range",
            "0",
            "1",
            "--grads-per-rollout",
            "3",
        )
    )
    assert rc == 2 and "--grads-per-rollout 3" in capsys.readouterr().err
    rc = main(
        _train(
            tiny_pipeline_dir, tiny_hps_ckpt, prompts, tmp_path / "x", "--grad-range", "0", "1", "--rollout-steps", "0"
        )
    )
    assert rc == 2 and "--rollout-steps" in capsys.readouterr().err


def test_recipe_fills_unset_options_and_flags_win():
    from reneg.cli import build_parser
    from reneg.trainer.config import RECIPES, train_config_from_args

    base = ["train", "--model", "m", "--reward", "hpsv2=x", "--prompts", "p"]
    paper = train_config_from_args(build_parser().parse_args(base))
    assert (paper.recipe, paper.rollout_steps, paper.grads_per_rollout) == ("paper", None, 1)
    fast = train_config_from_args(build_parser().parse_args(base + ["--recipe", "fast"]))
    # fast: the paper's optimizer path (steps, lr, samples per step) with a 6-step no-grad rollout
    assert RECIPES["fast"] == {"rollout_steps": 6}
    assert (fast.recipe, fast.steps, fast.lr, fast.batch_size) == ("fast", paper.steps, paper.lr, paper.batch_size)
    assert (fast.rollout_steps, fast.grads_per_rollout) == (6, 1)
    ns = build_parser().parse_args(
        base + ["--recipe", "fast", "--steps", "160", "--lr", "0.05", "--rollout-steps", "9"]
    )
    mine = train_config_from_args(ns)
    assert (mine.steps, mine.lr, mine.rollout_steps) == (160, pytest.approx(0.05), 9)  # flags given win


def test_tune_search_steps_counts_and_record(
    tmp_path, tiny_backend, tiny_reward, tiny_pipeline_dir, tiny_hps_ckpt, capsys
):
    from reneg.tuning import scaled_grad_range, tune_for_seed

    assert scaled_grad_range((0, 10), 30, 7) == (0, 2)
    assert scaled_grad_range((5, 10), 30, 3) == (0, 1)
    assert scaled_grad_range((0, 10), 30, 10) == (0, 3)
    null, _ = tiny_backend.null_embedding()
    meter = ComputeMeter()
    res, image = tune_for_seed(
        tiny_backend,
        tiny_reward,
        "a red circle",
        3,
        null,
        6,
        7.5,
        (1, 1),
        16,
        16,
        max_steps=2,
        patience=2,
        lr=0.05,
        search_steps=3,
        meter=meter,
    )
    # search at 3 steps; grad range 1 1 of 6 steps scales to 0 0 of 3 (the last step)
    c = meter.counts["unet"]
    # step 0: a rollout to the grad step, the grad step (cond no-grad + negative with grad), the rest
    # of the trajectory; step 1 (the last, no update follows): 3 CFG steps; then 6 for the kept image
    assert c["calls_grad"] == 1
    assert c["by_batch"]["nograd:2"] == 2 + 3 + 6 and c["by_batch"]["nograd:1"] == 1
    assert meter.counts["decode"]["items_nograd"] == 3 and meter.counts["reward"]["items_nograd"] == 3
    assert res.final_reward is not None and image.shape[-1] == 16
    # the CLI: the record carries the meter's totals
    out = tmp_path / "t.safetensors"
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
            "2",
            "--patience",
            "2",
            "--lr",
            "0.05",
            "--sampling-steps",
            "6",
            "--grad-range",
            "1",
            "1",
            "--resolution",
            "16",
            "--search-steps",
            "3",
            "--out",
            str(out),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "t.json").read_text())
    assert rep["compute"]["counts"]["unet"] == c and rep["search_steps"] == 3
    assert rep["final_reward"] == pytest.approx(res.final_reward)
    rc = main(
        [
            "tune",
            "--model",
            tiny_pipeline_dir,
            "--reward",
            f"hpsv2={tiny_hps_ckpt}",
            "--prompt",
            "x",
            "--sampling-steps",
            "6",
            "--grad-range",
            "0",
            "1",
            "--search-steps",
            "9",
            "--out",
            str(tmp_path / "u.safetensors"),
        ]
    )
    assert rc == 2 and "--search-steps 9" in capsys.readouterr().err


DRIVER = textwrap.dedent("""
    import sys
    from reneg.cli import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_options_take_the_same_step_in_two_processes(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt):
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    prompts = _prompts(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")

    def args(out, micro):
        return [
            "train",
            "--model",
            tiny_pipeline_dir,
            "--reward",
            f"hpsv2={tiny_hps_ckpt}",
            "--prompts",
            prompts,
            "--heldout-count",
            "2",
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--micro-batch",
            micro,
            "--sampling-steps",
            "4",
            "--grad-range",
            "0",
            "2",
            "--rollout-steps",
            "2",
            "--grads-per-rollout",
            "2",
            "--resolution",
            "16",
            "--lr",
            "0.05",
            "--eval-every",
            "0",
            "--eval-batch",
            "2",
            "--device",
            "cpu",
            "--seed",
            "3",
            "--no-progress",
        ]

    for cmd in (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
        + args(tmp_path / "two", "1"),
        [sys.executable, str(driver)] + args(tmp_path / "one", "1"),
    ):
        p = subprocess.run(cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=400)
        assert p.returncode == 0, p.stderr[-3000:]
    two, one = (load_embedding(tmp_path / k / "embedding.safetensors").tensor for k in ("two", "one"))
    assert (two - one).abs().max() < 1e-5 * max(1.0, float(one.abs().max()))
    s2, s1 = (json.loads((tmp_path / k / "summary.json").read_text())["compute"] for k in ("two", "one"))
    assert s2["counts"] == s1["counts"], "the meter must sum every process's work"


def test_tune_anatomy_replays_the_tune_and_counts_reuse(tiny_backend, tiny_reward):
    """benchmarks/tune_anatomy.py: its replay of keep-best with patience is the tune's own rule (the table's
    "today" row rests on it); a search at the full step count scores its candidates by their own images;
    rollout reuse costs two rollouts plus one UNet call per update, and with no update it keeps the start."""
    import random

    from benchmarks.tune_anatomy import _patience_keep, reuse_run, search_run
    from reneg.objective import per_sample_search

    rng = random.Random(0)
    for _ in range(200):
        scores = [rng.choice([0.1, 0.2, 0.3, 0.4]) for _ in range(10)]
        max_steps, patience = rng.randint(1, 10), rng.randint(1, 4)
        patience = min(patience, max_steps)
        res = per_sample_search(lambda n, k, s=scores: (s[k], None), torch.zeros(2, 3), max_steps, patience)
        assert _patience_keep(scores, max_steps, patience) == (res.best_step, len(res.history)), scores

    st = {"sampling_steps": 4, "guidance": 7.5, "grad_range": [0, 1], "resolution": 16, "tune_lr": 0.05}
    start = tiny_backend.null_embedding()[0]
    full = search_run(tiny_backend, tiny_reward, st, start, "a red circle", 3, 4)
    assert full["full"] == full["own"] and len(full["own"]) == 10
    # every evaluation but the last: 4 CFG calls and the grad step's extra (conditional) call
    assert full["calls_after"][:3] == [5, 10, 15]
    cheap = search_run(tiny_backend, tiny_reward, st, start, "a red circle", 3, 2)
    assert cheap["full"][0] == pytest.approx(full["own"][0], abs=1e-5)  # the start's 4-step image, re-scored
    assert cheap["own"][0] != pytest.approx(cheap["full"][0], abs=1e-6)  # ... not its 2-step one
    r = reuse_run(tiny_backend, tiny_reward, st, start, "a red circle", 3, 3, 0.05)
    assert r["calls"] == 2 * 4 + 3 and r["final"] != r["start"]
    # the start's image as the tune makes it (the tune runs its grad step's two branches unbatched: rounding)
    assert r["start"] == pytest.approx(full["own"][0], abs=1e-3)
    r0 = reuse_run(tiny_backend, tiny_reward, st, start, "a red circle", 3, 0, 0.05)
    assert r0["final"] == r0["start"]

"""Correctness of the performance options: they change speed and memory, not the maths.

Timings are never asserted here; they live in benchmarks/ only.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def fresh(tiny_pipeline_dir, tiny_hps_ckpt):
    """A backend and reward of their own: these tests flip switches on them."""
    from reneg.backends.loading import load_diffusers
    from reneg.rewards import load_rewards

    return load_diffusers(tiny_pipeline_dir), load_rewards([f"hpsv2={tiny_hps_ckpt}"])


def _bench():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import bench, reference

    return bench, reference


def _cos(a, b):
    return float(torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def test_our_path_gradient_equals_the_plain_reference_at_fp32(fresh):
    """grad_step_loss with SDPA, checkpointing everywhere and the no-grad conditional branch
    gives the reference's gradient (plain attention, no checkpointing, batched CFG with
    autograd through both branches, prompts re-encoded)."""
    from reneg.objective import grad_step_loss
    from reneg.sampling import initial_latent

    _, reference = _bench()
    backend, reward = fresh
    prompts = ["a red fox in snow", "an old lighthouse"]
    steps, gi, g = 6, 4, 7.5
    noise = torch.randn(backend.latent_shape(2, 16, 16), generator=torch.Generator().manual_seed(1))
    null, _ = backend.null_embedding()

    backend.set_performance(sdpa=False, checkpointing=False)
    plain = reference.PlainPath(backend, reward, g, steps)
    neg_r = null.clone().requires_grad_(True)
    plain.train_loss(prompts, neg_r, noise, gi).backward()

    backend.set_performance(sdpa=True, checkpointing=True)
    assert reward.enable_gradient_checkpointing() is True
    assert backend.unet.is_gradient_checkpointing and backend.vae.is_gradient_checkpointing
    sigmas = backend.schedule(steps)
    neg_o = null.clone().requires_grad_(True)
    res = grad_step_loss(
        backend.denoiser,
        backend.decode,
        reward,
        prompts,
        backend.encode_prompts(prompts),
        backend.negative_cond(neg_o),
        initial_latent(noise, sigmas[0]),
        sigmas,
        g,
        gi,
    )
    res.loss.backward()

    gr, go = neg_r.grad, neg_o.grad
    assert gr is not None and go is not None and float(gr.norm()) > 0
    assert _cos(go, gr) > 1 - 1e-6
    assert float((go - gr).norm() / gr.norm()) < 1e-3


def test_reward_tower_checkpointing_keeps_scores_and_image_gradients(fresh):
    _, reward = fresh
    imgs = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    prompts = ["a cat", "a dog"]

    def run():
        x = imgs.clone().requires_grad_(True)
        s = reward(x, prompts)
        s.sum().backward()
        return s.detach(), x.grad

    s0, g0 = run()
    assert reward.enable_gradient_checkpointing() is True
    assert reward.model.visual.transformer.grad_checkpointing is True
    s1, g1 = run()
    torch.testing.assert_close(s1, s0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1, g0, rtol=1e-4, atol=1e-7)


def test_weighted_reward_forwards_checkpointing(tiny_hps_ckpt):
    from reneg.rewards import load_rewards

    r = load_rewards([f"hpsv2={tiny_hps_ckpt}", f"hpsv2.1={tiny_hps_ckpt},weight=0.5"])
    assert r.enable_gradient_checkpointing() is True
    assert all(m.model.visual.transformer.grad_checkpointing for m in r.rewards)


def test_set_performance_switches_keep_the_denoiser_and_decoder(fresh):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    backend, _ = fresh
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    sigma = torch.tensor([2.0, 0.5])
    cond = backend.encode_prompts(["a", "b"])
    with torch.no_grad():
        base, img = backend.denoiser(x, sigma, cond), backend.decode(x)
        backend.set_performance(sdpa=False)
        assert all(isinstance(p, AttnProcessor) for p in backend.unet.attn_processors.values())
        plain = backend.denoiser(x, sigma, cond)
        backend.set_performance(sdpa=True, channels_last=True, checkpointing=True)
        assert all(isinstance(p, AttnProcessor2_0) for p in backend.unet.attn_processors.values())
        assert backend.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        nhwc, img2 = backend.denoiser(x, sigma, cond), backend.decode(x)
        backend.set_performance(channels_last=False, checkpointing=False)
        assert not backend.unet.is_gradient_checkpointing
        assert backend.unet.conv_in.weight.is_contiguous()
    torch.testing.assert_close(plain, base, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(nhwc, base, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(img2, img, rtol=1e-4, atol=1e-5)


def test_trainer_checkpointing_covers_the_reward(fresh):
    from reneg.trainer.train import enable_checkpointing

    backend, reward = fresh
    enable_checkpointing(backend, reward)
    assert backend.unet.is_gradient_checkpointing and backend.vae.is_gradient_checkpointing
    assert reward.model.visual.transformer.grad_checkpointing is True


def test_train_flags_parse():
    from reneg.cli import build_parser
    from reneg.trainer.config import train_config_from_args

    cfg = train_config_from_args(
        build_parser().parse_args(["train", "--channels-last", "--compile", "--gradient-checkpointing"])
    )
    assert cfg.channels_last and cfg.compile and cfg.gradient_checkpointing
    assert cfg.to_json()["channels_last"] is True


@pytest.mark.slow
def test_benchmark_runs_end_to_end_at_a_small_tiny_size(tmp_path, capsys):
    """The tiny benchmark's machinery (both paths, agreement, cost model, ablations, table,
    JSON) on a 3-step schedule; the figures themselves are not checked."""
    bench, _ = _bench()
    out = tmp_path / "tiny.json"
    rc = bench.main(
        [
            "--scale",
            "tiny",
            "--sampling-steps",
            "3",
            "--grad-range",
            "0",
            "1",
            "--global-batch",
            "2",
            "--micro-batches",
            "1,2",
            "--tune-steps",
            "2",
            "--repeats",
            "1",
            "--dtype",
            "bf16",
            "--cache",
            str(tmp_path / "cache"),
            "--json",
            str(out),
        ]
    )
    assert rc == 0
    res = json.loads(out.read_text())
    text = capsys.readouterr().out
    for word in ("Training", "Per-sample tune", "Gradient of the negative embedding", "Cost model", "Ablations"):
        assert word in text
    paths = [(r["path"], r["dtype"], r["micro_batch"]) for r in res["train"]]
    assert paths == [("reference", "fp32", 1), ("ours", "fp32", 1), ("ours", "bf16", 1), ("ours", "bf16", 2)]
    assert all(r["finite_grad"] and r["s_per_sample"] > 0 and r["peak_bytes"] > 0 for r in res["train"])
    assert res["train"][0]["speedup_vs_reference"] == pytest.approx(1.0)
    assert [r["path"] for r in res["tune"]] == ["reference", "ours"]
    assert all(r["steps"] == 2 for r in res["tune"])
    a = res["agreement"]["ours_fp32_vs_reference"]
    assert a["end_to_end"]["cosine"] > 1 - 1e-6 and a["grad_step"]["cosine"] > 1 - 1e-6
    assert res["agreement"]["ours_bf16_vs_reference_fp32"]["grad_step"]["cosine"] > 0.9
    cm = res["cost_model"]
    assert cm["unet_forward"] > 0 and cm["vae_decode"] > 0 and cm["reward_image_forward"] > 0
    assert cm["train_sample"] == pytest.approx(
        cm["rollout_steps_mean"] * 2 * cm["unet_forward"]
        + 3 * cm["unet_forward"]
        + 2 * cm["vae_decode"]
        + 2 * cm["reward_image_forward"]
    )
    names = [r["name"] for r in res["ablations"]]
    assert names[0] == "ours" and "- checkpointing" in names and "- no-grad cond branch" in names


def test_benchmark_rejects_bad_sizes(capsys):
    bench, _ = _bench()
    with pytest.raises(SystemExit):
        bench.parse_args(["--scale", "tiny", "--global-batch", "4", "--micro-batches", "3"])
    assert "micro-batch 3 must be >= 1 and divide --global-batch 4" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--scale", "tiny", "--sampling-steps", "5", "--grad-range", "0", "4"])
    assert "--grad-range 0 4" in capsys.readouterr().err

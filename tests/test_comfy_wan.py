"""Wan 2.1 / 2.2 in ComfyUI: the Load, Tune, Save and Reward Score nodes on a Wan MODEL, VAE and UMT5
CLIP as ComfyUI hands them over (stand-ins for ``comfy.*`` around a small WanPipeline folder at Wan's
real text width: see comfy_wan_stubs.py), checked against the diffusers Wan backend."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import comfy_wan_stubs
from test_comfy_nodes import _tune_args, host, node, reward, run  # noqa: F401 - fixtures

from reneg.embedding import NegEmbedding, load_embedding, save_embedding
from reneg.tiny import build_tiny_wan


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory):
    return build_tiny_wan(str(tmp_path_factory.mktemp("comfy-wan") / "wan22"), seed=1, experts=2)


@pytest.fixture(scope="module")
def high(wan22_dir):
    return comfy_wan_stubs.tiny_comfy_wan_models(wan22_dir, "transformer")


def _rows(seed, n=512):
    return torch.randn(1, n, 4096, generator=torch.Generator().manual_seed(seed)) * 0.05


def test_comfy_wan_conditioning_and_experts_equal_the_diffusers_backend(wan22_dir, high):
    """ComfyUI's UMT5 encoding of the empty prompt is the pipeline's 512 zero-padded rows; each expert
    MODEL of the two-sampler wiring gives the x0 the diffusers backend's expert switch gives on its side
    of the boundary; a Wan MODEL is a flow-matching video model for the backend."""
    from reneg.backends.comfy_backend import ComfyBackend
    from reneg.backends.loading import load_diffusers

    low = comfy_wan_stubs.tiny_comfy_wan_models(wan22_dir, "transformer_2")
    ref = load_diffusers(wan22_dir, frames=5)
    with torch.inference_mode():
        empty = high[2].encode_from_tokens_scheduled(high[2].tokenize(""))[0][0]
        prompt = high[2].encode_from_tokens_scheduled(high[2].tokenize("a red circle"))[0][0]
    null, _ = ref.null_embedding()
    assert empty.shape == null.shape == (1, 512, 4096) and torch.allclose(empty, null, atol=1e-5)
    assert empty[:, 1:].abs().sum() == 0  # </s>, then zero rows: what Load ReNeg Embedding reproduces
    c = ref.encode_prompts(["a red circle"])
    assert torch.allclose(prompt, c.crossattn, atol=1e-5)

    b = ComfyBackend(high[0], high[1], 4096, "ddim_uniform", width=16, height=16)
    assert b.family == "wan" and b.flow and b.video and not b.masked
    b.latent_frames = 2
    assert b.latent_shape(1, 16, 16) == (1, 16, 2, 2, 2) and b.frames == 5
    bl = ComfyBackend(low[0], low[1], 4096, "ddim_uniform")
    x = torch.randn(1, 16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    neg = _rows(1)
    with torch.no_grad():
        for s, comfy in ((0.95, b), (0.5, bl)):  # boundary 0.875: high-noise expert above it, low below
            sig = torch.full((1,), s)
            got = comfy.denoiser(x, sig, comfy.negative_cond(neg))
            torch.testing.assert_close(got, ref.denoiser(x, sig, ref.negative_cond(neg)), rtol=1e-4, atol=1e-4)
        # the VAE's frames as images [B * F, 3, H, W], as the diffusers backend decodes them
        torch.testing.assert_close(b.decode(x), ref.decode(x), rtol=1e-4, atol=1e-4)


def test_load_node_gives_wan_negatives_for_one_or_both_experts(host, high):  # noqa: F811
    _, _, clip = high
    folder = Path(host.models_dir) / "reneg"
    folder.mkdir(parents=True, exist_ok=True)
    one, two = _rows(2), torch.cat([_rows(3), _rows(4)], dim=1)
    save_embedding(str(folder / "wan.safetensors"), NegEmbedding(one, "wan"))
    save_embedding(str(folder / "experts.safetensors"), NegEmbedding(two, "wan-experts"))
    save_embedding(str(folder / "pixart.safetensors"), NegEmbedding(_rows(5, 120), "pixart"))
    load = node(host, "ReNegLoadEmbedding")
    (neg,) = run(load.load, "wan.safetensors", clip, 1.0)
    (base,) = run(load.load, "wan.safetensors", clip, 0.0)
    (half,) = run(load.load, "wan.safetensors", clip, 0.5)
    with torch.inference_mode():
        empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))[0][0]
    assert neg[0][0].shape == (1, 512, 4096) and torch.equal(neg[0][0], one)
    assert torch.equal(base[0][0], empty)  # strength 0: exactly the plain (empty) negative
    assert torch.allclose(half[0][0], 0.5 * (one + empty), atol=1e-6)
    (same,) = run(load.load, "wan.safetensors", clip, 1.0, None, "low-noise")  # one file feeds both experts
    assert torch.equal(same[0][0], one)
    (hi,) = run(load.load, "experts.safetensors", clip, 1.0, None, "high-noise")
    (lo,) = run(load.load, "experts.safetensors", clip, 1.0, None, "low-noise")
    assert torch.equal(hi[0][0], two[:, :512]) and torch.equal(lo[0][0], two[:, 512:])
    with pytest.raises(Exception, match="load it twice, expert high-noise"):
        run(load.load, "experts.safetensors", clip, 1.0)
    with pytest.raises(Exception, match="pixart embedding .* but the model in use is wan"):
        run(load.load, "pixart.safetensors", clip, 1.0)


def test_tune_node_on_a_wan_video_latent_then_save(host, high, reward):  # noqa: F811
    model, vae, clip = high
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    tune = node(host, "ReNegPerSampleTune")
    image_latent = {"samples": torch.zeros(1, 16, 2, 2)}
    with pytest.raises(Exception, match="5-d samples"):
        run(tune.tune, **_tune_args(high, pos, neg, reward, latent=image_latent, cfg=5.0))
    video = {"samples": torch.zeros(1, 16, 2, 2, 2)}  # 2 latent frames: 5 frames of 16 x 16
    model.model.calls = 0
    args = _tune_args(high, pos, neg, reward, latent=video, cfg=5.0, max_steps=2, patience=2)
    with torch.inference_mode():
        out = tune.tune(**args)
    tuned, r0, r1 = out["result"]
    assert r1 >= r0 and tuned[0][0].shape == (1, 512, 4096)
    assert model.model.calls >= 2 * 4  # 2 tuning steps of 4 sampling steps (positive and negative batched)
    # the gradient reached the negative: the second step's video (made with the updated negative)
    # scores differently from the first's
    steps = [
        float(line.split("reward ")[1].split()[0])
        for line in out["ui"]["text"][0].splitlines()
        if "reward " in line and line.startswith("step")
    ]
    assert len(steps) == 2 and steps[0] != steps[1]
    (path,) = run(node(host, "ReNegSaveEmbedding").save, tuned, "wan_tuned", False)
    saved = load_embedding(path, expected_family="wan")
    assert saved.tensor.shape == (1, 512, 4096) and saved.attention_mask is None
    assert torch.equal(saved.tensor, tuned[0][0].float())
    (again,) = run(node(host, "ReNegLoadEmbedding").load, Path(path).name, clip, 1.0)
    assert torch.equal(again[0][0], tuned[0][0].float())

    # Reward Score takes the frames ComfyUI's VAE Decode gives a video (an IMAGE batch, one frame each)
    frames = (vae.first_stage_model.decode(torch.zeros(1, 16, 2, 2, 2)).permute(0, 2, 3, 4, 1)[0] + 1) / 2
    scores = run(node(host, "ReNegRewardScore").score, frames.clamp(0, 1), "a red circle", reward)[0]
    assert len(scores) == 5


def test_tune_node_runs_wan22_a14b_with_both_experts(host, wan22_dir, high, reward):  # noqa: F811
    """Wan 2.2 A14B in ComfyUI: with ``model_low_noise`` the tune samples with the high-noise MODEL at flow times
    at or above the release's boundary 0.875 and the low-noise one below it, as WanPipeline (and the diffusers backend) switch
    them; one backend over both gives the diffusers backend's x0 on both sides; bad second inputs are refused."""
    from reneg.backends.comfy_backend import ComfyBackend, ComfyModelError
    from reneg.backends.loading import load_diffusers

    low = comfy_wan_stubs.tiny_comfy_wan_models(wan22_dir, "transformer_2")
    ref = load_diffusers(wan22_dir, frames=5)
    b = ComfyBackend(high[0], high[1], 4096, "ddim_uniform", patcher_2=low[0], boundary=0.875)
    x = torch.randn(2, 16, 2, 2, 2, generator=torch.Generator().manual_seed(0))
    neg = _rows(2)
    with torch.no_grad():
        for s in (0.95, 0.875, 0.5):
            sig = torch.full((2,), s)
            got = b.denoiser(x, sig, _two(b, neg))
            want = ref.denoiser(x, sig, _two(ref, neg))
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ComfyModelError, match="boundary: expected a flow time between 0 and 1"):
        ComfyBackend(high[0], high[1], 4096, patcher_2=low[0], boundary=1.5)
    with pytest.raises(ComfyModelError, match="model_low_noise: expected a ComfyUI MODEL"):
        ComfyBackend(high[0], high[1], 4096, patcher_2=object(), boundary=0.875)

    model, vae, clip = high
    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
        negc = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    video = {"samples": torch.zeros(1, 16, 2, 2, 2)}
    model.model.calls = low[0].model.calls = 0
    args = _tune_args(high, pos, negc, reward, latent=video, cfg=5.0, max_steps=1, patience=1, steps=8)
    with torch.inference_mode():
        out = node(host, "ReNegPerSampleTune").tune(**args, model_low_noise=low[0])
    tuned, r0, r1 = out["result"]
    assert r1 >= r0 and tuned[0][0].shape == (1, 512, 4096)
    assert model.model.calls > 0 and low[0].model.calls > 0  # both experts sampled


def _two(backend, neg):
    """The negative's cond for a batch of two."""
    c = backend.negative_cond(neg)
    return c.index(torch.tensor([0, 0]))

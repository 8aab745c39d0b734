"""Qwen-Image in ComfyUI: the Load, Tune, Save and Reward Score nodes on a Qwen-Image MODEL as ComfyUI loads it
(stand-ins for ``comfy.*`` around a small QwenImageTransformer2DModel: flow-matching CONST sampling, 5-d Wan 2.1
latents, unpadded rows read without a mask), checked against the diffusers Qwen-Image backend, which pads and
masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import comfy_stubs
from test_comfy_nodes import _tune_args, host, node, reward, run  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def qwen_dir(tiny_qwen_image_dir):
    return tiny_qwen_image_dir


@pytest.fixture(scope="module")
def qwen_models(qwen_dir):
    return comfy_stubs.tiny_comfy_qwen_image_models(qwen_dir)


@pytest.fixture(scope="module")
def diffusers_qwen(qwen_dir):
    from reneg.backends.loading import load_diffusers

    return load_diffusers(qwen_dir)


def _encode(clip, text):
    with torch.inference_mode():
        return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def test_comfy_rows_and_denoiser_equal_the_diffusers_backend(host, qwen_models, diffusers_qwen):  # noqa: F811
    """ComfyUI's unpadded rows (the template cut by its own rule) are diffusers' masked rows; its MODEL
    reading them gives the diffusers denoiser's output; cond and uncond of different lengths run apart."""
    from reneg.backends.comfy_backend import ComfyBackend, ComfyModelError
    from reneg.cond import Cond
    from reneg.sampling import cfg_denoise

    model, vae, clip = qwen_models
    backend = ComfyBackend(model, vae, 3584, "simple", width=32, height=32)
    assert backend.family == "qwen-image" and backend.flow and backend.joint
    assert backend.latent_shape(1, 32, 32) == (1, 16, 1, 16, 16)
    ref = diffusers_qwen
    host_rows = _encode(clip, "a red cat")[0][0]
    c = ref.encode_prompts(["a red cat"])
    assert host_rows.shape == (1, 8, 3584) and int(c.mask.sum()) == 8
    torch.testing.assert_close(host_rows, c.crossattn, rtol=1e-5, atol=1e-5)
    host_empty = _encode(clip, "")[0][0]
    null, _ = ref.null_embedding()
    assert host_empty.shape == (1, 5, 3584)
    torch.testing.assert_close(host_empty, null[:, :5], rtol=1e-5, atol=1e-5)
    sigmas = backend.schedule(6)
    assert float(sigmas[0]) == 1.0 and float(sigmas[-1]) == 0.0
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    pos = backend.positive_cond(_encode(clip, "a red cat"))
    neg = backend.negative_cond(host_empty.clone())
    with pytest.raises(ComfyModelError, match="reads every row"):
        backend.negative_cond(null.clone(), mask=ref.null_mask())
    with torch.no_grad():
        for s in sigmas[:-1:2]:
            sig = torch.full((1,), float(s))
            ours = backend.denoiser(x.unsqueeze(2), sig, pos)[:, :, 0]
            torch.testing.assert_close(ours, ref.denoiser(x, sig, c), rtol=1e-4, atol=1e-4)
        model.model.calls.clear()
        sig = torch.full((1,), float(sigmas[1]))
        both = cfg_denoise(backend.denoiser, x.unsqueeze(2), sig, pos, neg, 4.0)
        apart = cfg_denoise(backend.denoiser, x.unsqueeze(2), sig, pos, neg, 4.0, batched=False)
    assert sorted(model.model.calls) == sorted([(1, 5, 3584), (1, 8, 3584)] * 2)  # never padded, never repeated
    torch.testing.assert_close(both, apart, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(Cond.cat([neg, pos]).mask.sum(1), torch.tensor([5, 8]))


def test_load_node_gives_native_conditioning_and_refuses_other_families(host, qwen_models, diffusers_qwen):  # noqa: F811
    from reneg.embedding import NegEmbedding, save_embedding

    _, _, clip = qwen_models
    folder = Path(host.models_dir) / "reneg"
    folder.mkdir(parents=True, exist_ok=True)
    null, _ = diffusers_qwen.null_embedding()
    learned = null.clone()
    learned[:, :5] += 0.1 * torch.randn(1, 5, 3584, generator=torch.Generator().manual_seed(1))
    save_embedding(str(folder / "qwen.safetensors"), NegEmbedding(learned, "qwen-image"))
    pixart = torch.zeros(1, 120, 4096)
    pixart[:, 0] = 1.0
    save_embedding(str(folder / "pixart.safetensors"), NegEmbedding(pixart, "pixart"))
    load = node(host, "ReNegLoadEmbedding")
    (neg,) = run(load.load, "qwen.safetensors", clip, 1.0)
    (plain,) = run(load.load, "qwen.safetensors", clip, 0.0)
    own = _encode(clip, "")
    # ComfyUI's own form: the rows the file's mask keeps, no padding, no attention_mask
    t, extra = neg[0]
    assert t.shape == (1, 5, 3584) and torch.equal(t, learned[:, :5]) and "attention_mask" not in extra
    assert plain[0][0].shape == own[0][0].shape and torch.equal(plain[0][0], own[0][0])  # strength 0: the plain
    (half,) = run(load.load, "qwen.safetensors", clip, 0.5)
    torch.testing.assert_close(half[0][0], 0.5 * (neg[0][0] + own[0][0]))
    with pytest.raises(RuntimeError, match="pixart") as e:
        run(load.load, "pixart.safetensors", clip, 1.0)
    assert "qwen-image" in str(e.value) and "T5-XXL" not in str(e.value)  # Qwen2.5-VL's rows are not T5's


def test_tune_save_and_reward_score_on_qwen_image(host, qwen_models, reward):  # noqa: F811
    from reneg.backends.comfy_backend import ComfyBackend
    from reneg.embedding import load_embedding
    from reneg.generate import seeded_noise
    from reneg.sampling import initial_latent, sample

    model, vae, clip = qwen_models
    pos, neg = _encode(clip, "a red circle"), _encode(clip, "")
    with torch.inference_mode():
        out = node(host, "ReNegPerSampleTune").tune(
            **_tune_args(qwen_models, pos, neg, reward, width=32, height=32, cfg=4.0, scheduler="simple")
        )
    tuned, r0, r1 = out["result"]
    assert r1 >= r0 and tuned[0][0].shape == (1, 5, 3584) and not torch.equal(tuned[0][0], neg[0][0])
    (path,) = run(node(host, "ReNegSaveEmbedding").save, tuned, "qwen_tuned", False)
    saved = load_embedding(path, expected_family="qwen-image")
    assert saved.tensor.shape == (1, 128, 3584) and saved.attention_mask.tolist() == [[1] * 5 + [0] * 123]

    backend = ComfyBackend(model, vae, 3584, "simple", width=32, height=32)
    sigmas = backend.schedule(4)
    images = []
    with torch.no_grad():
        for n in (neg[0][0], tuned[0][0]):
            noise = seeded_noise(backend, [3], 32, 32)
            _, x0 = sample(
                backend.denoiser,
                initial_latent(noise, sigmas[0], True),
                sigmas,
                backend.positive_cond(pos),
                backend.negative_cond(n.clone().float()),
                4.0,
            )
            images.append(backend.decode(x0))
    assert images[0].shape == (1, 3, 32, 32) and not torch.allclose(images[0], images[1])
    batch = torch.cat(images).permute(0, 2, 3, 1).add(1).div(2)  # ComfyUI IMAGE: BHWC in [0, 1]
    with torch.inference_mode():
        scores = node(host, "ReNegRewardScore").score(batch, "a red circle", reward, False)["result"][0]
    # the KSampler-style images of the start and the tuned negative (this seed, scheduler simple, which
    # starts at t = 1) score what the tune reported for them
    torch.testing.assert_close(torch.tensor(scores), torch.tensor([r0, r1]), rtol=1e-4, atol=1e-5)

"""Chroma in ComfyUI: the Load, Tune, Save and Reward Score nodes on a Chroma MODEL as ComfyUI loads it
(stand-ins for ``comfy.*`` around a small Chroma-architecture transformer, written from ComfyUI's
``model_base.Chroma``, ``model_sampling.ModelSamplingFlux``, ``latent_formats.Flux`` and its Chroma text
encoder ``pixart_t5``: unpadded T5 rows, no mask, a ``guidance`` input), checked against the diffusers
Chroma backend, which pads and masks."""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch

import comfy_stubs
from test_comfy_nodes import _tune_args, host, node, reward, run  # noqa: F401 - fixtures


class ModelSamplingFlux(torch.nn.Module):
    """ComfyUI's flow-matching sampling for Flux-type models (``CONST`` + ``ModelSamplingFlux``): a table
    of 10000 shifted flow times, sigma = timestep = t, input unscaled, ``x0 = x - sigma * out``."""

    def __init__(self, shift: float = 1.15, timesteps: int = 10000):
        super().__init__()
        t = torch.arange(1, timesteps + 1, dtype=torch.float64) / timesteps
        e = torch.exp(torch.tensor(shift, dtype=torch.float64))
        self.register_buffer("sigmas", (e / (e + (1 / t - 1))).float())

    @property
    def sigma_max(self):
        return self.sigmas[-1]

    def timestep(self, sigma):
        return sigma

    def calculate_input(self, sigma, x):
        return x

    def calculate_denoised(self, sigma, model_output, x):
        return x - model_output * sigma.view(sigma.shape[:1] + (1,) * (x.ndim - 1))


class FluxLatentFormat:
    latent_channels = 16
    scale_factor, shift_factor = 0.3611, 0.1159


class ChromaModel(torch.nn.Module):
    """``model.model`` of a ComfyUI Chroma MODEL: every conditioning row is read (no mask), 2 x 2
    patches with Flux's position ids, the ``guidance`` input required (``model_base.Chroma`` gives 0)."""

    def __init__(self, transformer):
        super().__init__()
        self.diffusion_model = transformer
        self.model_sampling = ModelSamplingFlux()
        self.latent_format = FluxLatentFormat()
        self.model_config = types.SimpleNamespace(unet_config={"image_model": "chroma"})
        self.adm_channels = 0
        self.calls = []

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None, **kwargs):
        from reneg.backends.chroma import image_ids, pack_latents, unpack_latents

        guidance = kwargs["guidance"]  # ComfyUI's Chroma forward takes it positionally: a TypeError without
        assert guidance.shape == (x.shape[0],) and not guidance.any()
        self.calls.append(c_crossattn.shape[1])
        _, _, h, w = x.shape
        out = self.diffusion_model(
            hidden_states=pack_latents(self.model_sampling.calculate_input(t, x)),
            timestep=self.model_sampling.timestep(t).float(),
            encoder_hidden_states=c_crossattn.float(),
            txt_ids=torch.zeros(c_crossattn.shape[1], 3),
            img_ids=image_ids(h, w, x.device, x.dtype),
            return_dict=False,
        )[0]
        return self.model_sampling.calculate_denoised(t, unpack_latents(out, h, w).float(), x)

    def process_latent_out(self, latent):
        return latent / self.latent_format.scale_factor + self.latent_format.shift_factor


def tiny_comfy_chroma_models(folder: str):
    """(MODEL, VAE, CLIP) as ComfyUI would hand them to a node, from a small Chroma diffusers folder."""
    from diffusers import AutoencoderKL, ChromaTransformer2DModel
    from transformers import AutoTokenizer, T5EncoderModel

    tr = ChromaTransformer2DModel.from_pretrained(folder, subfolder="transformer").eval()
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
    te = T5EncoderModel.from_pretrained(folder, subfolder="text_encoder").eval()
    tok = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))
    base = comfy_stubs.to_inference_tensors(ChromaModel(tr))
    v = comfy_stubs.VAE(comfy_stubs.to_inference_tensors(vae))
    return comfy_stubs.ModelPatcher(base), v, comfy_stubs.T5CLIP(comfy_stubs.to_inference_tensors(te), tok)


@pytest.fixture(scope="module")
def chroma_dir(tmp_path_factory):
    from reneg.tiny import build_tiny_chroma

    return build_tiny_chroma(str(tmp_path_factory.mktemp("tiny") / "chroma"), seed=0)


@pytest.fixture(scope="module")
def chroma_models(chroma_dir):
    return tiny_comfy_chroma_models(chroma_dir)


@pytest.fixture(scope="module")
def ref(chroma_dir):
    from reneg.backends.loading import load_diffusers

    return load_diffusers(chroma_dir)


def test_comfy_chroma_conditioning_and_denoiser_equal_diffusers(chroma_models, ref):
    """ComfyUI's Chroma text encoding is the text's rows (its ``</s>`` included) without padding or mask;
    diffusers' rows on the mask add one padding row. The ComfyUI backend's x0 for those rows equals the
    diffusers backend's for the padded, masked ones, alone and batched with a positive of another length."""
    from reneg.backends.comfy_backend import ComfyBackend
    from reneg.sampling import cfg_denoise

    model, vae, clip = chroma_models
    backend = ComfyBackend(model, vae, 4096, "ddim_uniform", width=32, height=32)
    assert backend.family == "chroma" and backend.flow and backend.masked
    with torch.inference_mode():
        host_rows = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))[0]
        host_empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))[0]
    c = ref.encode_prompts(["a red circle"])
    n = int(c.mask.sum())  # the text's tokens and one padding token
    assert host_rows[0].shape == (1, n - 1, 4096) and set(host_rows[1]) == {"pooled_output"}
    torch.testing.assert_close(host_rows[0], c.crossattn[:, : n - 1], rtol=1e-5, atol=1e-5)
    assert host_empty[0].shape == (1, 1, 4096)
    null, _ = ref.null_embedding()
    x = torch.randn(ref.latent_shape(1, 32, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for t in backend.schedule(10)[:-1:3]:
            sig = torch.full((1,), float(t))
            ours = backend.denoiser(x, sig, backend.negative_cond(c.crossattn[:, :n].clone()))
            torch.testing.assert_close(ours, ref.denoiser(x, sig, c), rtol=1e-4, atol=1e-5)
        sig = torch.full((2,), 0.6)
        xx = x.expand(2, -1, -1, -1)
        pos = backend.positive_cond([[c.crossattn[:, :n], {"pooled_output": None}]]).expand(2)
        a = cfg_denoise(backend.denoiser, xx, sig, pos, backend.negative_cond(null[:, :2]), 5.0)
        b = cfg_denoise(ref.denoiser, xx, sig, c.expand(2), ref.negative_cond(null), 5.0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert model.model.calls[-2:] == [2, n]  # different lengths: one call per length, no rows repeated or padded


def test_load_tune_save_and_score_on_chroma(host, chroma_models, reward, ref):  # noqa: F811
    from reneg.embedding import NegEmbedding, load_embedding, save_embedding

    model, vae, clip = chroma_models
    folder = Path(host.models_dir) / "reneg"
    folder.mkdir(parents=True, exist_ok=True)
    null, _ = ref.null_embedding()
    learned = null.clone()
    learned[:, :2] += 0.05 * torch.randn(1, 2, 4096, generator=torch.Generator().manual_seed(0))
    save_embedding(str(folder / "chroma.safetensors"), NegEmbedding(learned, "chroma"))
    torch.save(torch.zeros(1, 77, 768), folder / "sd.pt")

    load = node(host, "ReNegLoadEmbedding")
    (neg,) = run(load.load, "chroma.safetensors", clip, 1.0)
    (base,) = run(load.load, "chroma.safetensors", clip, 0.0)
    with torch.inference_mode():
        own = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    # the file's mask keeps the text row and the padding row: ComfyUI's native form, unpadded, no mask
    assert neg[0][0].shape == (1, 2, 4096) and torch.equal(neg[0][0], learned[:, :2])
    assert set(neg[0][1]) == set(own[0][1]) == {"pooled_output"} and neg[0][1]["pooled_output"] is None
    assert torch.equal(base[0][0], own[0][0]) and base[0][1] == own[0][1]  # strength 0 is the plain negative
    with pytest.raises(
        Exception,
        match=r"sd1 embedding .*model in use is pixart .* or another model reading T5-XXL rows \(pixart-sigma, chroma\)",
    ):
        run(load.load, "sd.pt", clip, 1.0)

    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    args = _tune_args(chroma_models, pos, neg, reward, width=32, height=32, cfg=5.0)
    with torch.inference_mode():
        out = node(host, "ReNegPerSampleTune").tune(**args)
    tuned, r0, r1 = out["result"]
    assert r1 >= r0 and tuned[0][0].shape == (1, 2, 4096) and tuned[0][1]["reneg"]["family"] == "chroma"
    sd_neg = [[torch.zeros(1, 77, 768), {"pooled_output": None}]]  # a 768-wide negative on the Chroma MODEL
    with pytest.raises(Exception, match=r"the negative is sd1 .* but the positive is chroma \(4096\)"):
        run(node(host, "ReNegPerSampleTune").tune, **dict(args, negative=sd_neg))

    save = node(host, "ReNegSaveEmbedding")
    (path,) = run(save.save, tuned, "chroma_tuned", False)
    saved = load_embedding(path, expected_family="chroma")
    assert saved.family == "chroma" and saved.tensor.shape == (1, 512, 4096)
    assert saved.attention_mask.tolist() == [[1, 1] + [0] * 510] and saved.metadata["family"] == "chroma"
    (again,) = run(load.load, Path(path).name, clip, 1.0)
    assert torch.equal(again[0][0], tuned[0][0].float())

    # Reward Score on images the Chroma MODEL makes with the learned negative and with the plain one
    from reneg.backends.comfy_backend import ComfyBackend
    from reneg.generate import generate, seeded_noise

    backend = ComfyBackend(model, vae, 4096, "ddim_uniform", width=32, height=32)
    cond = backend.positive_cond(pos)
    noise = seeded_noise(backend, [1], 32, 32)
    images = [generate(backend, cond, backend.negative_cond(n[0][0]), noise, 4, 5.0) for n in (neg, base, tuned)]
    assert not torch.allclose(images[0], images[1])  # the learned negative changes the image
    batch = torch.cat(images).permute(0, 2, 3, 1).add(1).div(2)
    scores, report, *_ = run(node(host, "ReNegRewardScore").score, batch, "a red circle", reward)
    assert len(json.loads(scores) if isinstance(scores, str) else scores) == 3 and report


def test_a_comfyui_model_that_updates_activations_in_place_still_gives_the_gradient():
    """ComfyUI's real Chroma blocks update an activation in place after a LayerNorm saved it (``addcmul_``), which
    fails a tune's backward in a real ComfyUI ("modified by an inplace operation"). The denoiser runs the MODEL
    with saved copies: the backward works and its gradient equals the same computation written out of place."""
    from reneg.backends.comfy_backend import ComfyDenoiser
    from reneg.cond import Cond

    w = torch.randn(8, 8, generator=torch.Generator().manual_seed(0))

    class InPlace:
        def __init__(self, in_place):
            self.in_place = in_place

        def apply_model(self, x, sigma, c_crossattn=None, transformer_options=None, **kw):
            h = torch.addcmul(x, c_crossattn.mean(1, keepdim=True), x)  # like the block's modulation
            n = torch.nn.functional.layer_norm(h, (8,))  # saves h for its backward
            if self.in_place:
                h.addcmul_(n, torch.tanh(n))  # ComfyUI: img.addcmul_(gate, attn)
            else:
                h = h + n * torch.tanh(n)
            return h @ w

    x = torch.randn(1, 3, 8)
    grads = []
    for in_place in (True, False):
        neg = torch.randn(1, 2, 8, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        d = ComfyDenoiser(types.SimpleNamespace(model=InPlace(in_place), model_options={}))
        d(x, torch.ones(1), Cond(neg)).square().sum().backward()
        grads.append(neg.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().sum() > 0
    # without the saved copies, the same in-place model cannot be differentiated
    neg = torch.randn(1, 2, 8).requires_grad_(True)
    with pytest.raises(RuntimeError, match="inplace operation"):
        InPlace(True).apply_model(x, torch.ones(1), c_crossattn=neg).square().sum().backward()

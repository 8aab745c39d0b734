"""Flux in ComfyUI: the Load node gives a Flux negative in the shape ComfyUI's own Flux text encoding
gives (T5 rows ``[1, L, 4096]`` without a mask, CLIP-L's ``pooled_output`` ``[1, 768]``, the dict's
``guidance`` kept), from a CLIP made the way ComfyUI makes Flux's (tests/comfy_stubs.py ``FluxCLIP``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import comfy_stubs
from test_comfy_nodes import host, models, node, run  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def flux_clip(tiny_flux_dir):
    return comfy_stubs.tiny_comfy_flux_clip(tiny_flux_dir)


@pytest.fixture(scope="module")
def flux(tiny_flux_dir):
    from reneg.backends.loading import load_diffusers

    return load_diffusers(tiny_flux_dir)


def _save(host, name, emb):  # noqa: F811
    from reneg.embedding import save_embedding

    folder = Path(host.models_dir) / "reneg"
    folder.mkdir(parents=True, exist_ok=True)
    return save_embedding(str(folder / name), emb)


def test_load_node_gives_a_native_flux_negative(host, flux_clip, flux):  # noqa: F811
    from reneg.generate import as_embedding

    null, _ = flux.null_embedding()
    rows = null + 0.05 * torch.randn(null.shape, generator=torch.Generator().manual_seed(0))
    emb = as_embedding(flux, rows)  # as reneg train saves it: the rows and the empty prompt's pooled vector
    emb.pooled = emb.pooled + 0.1
    _save(host, "flux_neg.safetensors", emb)
    load = node(host, "ReNegLoadEmbedding")

    (neg,) = run(load.load, "flux_neg.safetensors", flux_clip, 1.0)
    t, extra = neg[0]
    assert t.shape == (1, 512, 4096) and torch.equal(t, rows) and "attention_mask" not in extra
    assert torch.allclose(extra["pooled_output"], emb.pooled) and extra["pooled_output"].shape == (1, 768)

    # strength 0: ComfyUI's own empty negative, 256 T5 rows and CLIP-L's pooled vector of ""
    with torch.inference_mode():
        own = flux_clip.encode_from_tokens_scheduled(flux_clip.tokenize(""))
    (base,) = run(load.load, "flux_neg.safetensors", flux_clip, 0.0)
    assert base[0][0].shape == (1, 256, 4096) and torch.equal(base[0][0], own[0][0])
    assert torch.equal(base[0][1]["pooled_output"], own[0][1]["pooled_output"])
    # ComfyUI's pooled vector is the one diffusers' pipeline (and so training) uses
    torch.testing.assert_close(own[0][1]["pooled_output"], flux.null_embedding()[1], atol=1e-5, rtol=1e-5)

    # a base negative from CLIPTextEncodeFlux keeps its guidance; its rows are replaced at strength 1
    with torch.inference_mode():
        typed = flux_clip.encode_from_tokens_scheduled(flux_clip.tokenize("blurry"), add_dict={"guidance": 3.5})
    (neg2,) = run(load.load, "flux_neg.safetensors", flux_clip, 1.0, typed)
    assert neg2[0][1]["guidance"] == 3.5 and torch.equal(neg2[0][0], rows)
    # blending needs the same row count (ComfyUI pads to 256, the file has 512): a clear error otherwise
    with pytest.raises(
        Exception, match="flux_neg.safetensors: the embedding has 512 T5 rows and base negative entry 0 has 256"
    ):
        run(load.load, "flux_neg.safetensors", flux_clip, 0.5, typed)
    base512 = [[null.clone(), {"pooled_output": flux.null_embedding()[1], "guidance": 3.5}]]
    (half,) = run(load.load, "flux_neg.safetensors", flux_clip, 0.5, base512)
    assert torch.allclose(half[0][0], 0.5 * (null + rows), atol=1e-6)
    assert torch.allclose(half[0][1]["pooled_output"], flux.null_embedding()[1] + 0.05, atol=1e-5)


def test_flux_and_sd_embeddings_are_refused_on_each_others_models(host, flux_clip, flux, models):  # noqa: F811
    from reneg.embedding import NegEmbedding
    from reneg.generate import as_embedding

    _save(host, "flux_dev.safetensors", as_embedding(flux, flux.null_embedding()[0]))
    _save(
        host, "flux_schnell.safetensors", NegEmbedding(torch.zeros(1, 256, 4096), "flux-schnell", torch.zeros(1, 768))
    )
    _save(host, "sd.safetensors", NegEmbedding(torch.zeros(1, 77, 64), "tiny"))
    _save(host, "pixart.safetensors", NegEmbedding(torch.zeros(1, 120, 4096), "pixart"))
    load = node(host, "ReNegLoadEmbedding")
    _, _, sd_clip = models
    for name, clip, found, in_use in (
        ("flux_dev", sd_clip, "flux-dev", "tiny"),
        ("sd", flux_clip, "tiny", "flux-dev"),
        ("pixart", flux_clip, "pixart", "flux-dev"),
    ):
        with pytest.raises(
            Exception, match=rf"{name}\.safetensors: this is a {found} embedding .* model in use is {in_use}"
        ):
            run(load.load, f"{name}.safetensors", clip, 1.0)
    # schnell's negatives come from the same two encoders: its file fits a Flux CLIP too
    (neg,) = run(load.load, "flux_schnell.safetensors", flux_clip, 1.0)
    assert neg[0][0].shape == (1, 256, 4096) and neg[0][1]["pooled_output"].shape == (1, 768)


def test_comfy_sampler_refuses_a_flux_model_by_name():
    """The Tune node's sampler (reneg/backends/comfy_backend.py) runs the UNet and PixArt models; a
    ComfyUI Flux MODEL (``unet_config["image_model"] == "flux"``) is refused by name, not mis-sampled."""
    from types import SimpleNamespace

    from reneg.backends.comfy_backend import ComfyBackend, ComfyModelError

    model = SimpleNamespace(apply_model=None, model_config=SimpleNamespace(unet_config={"image_model": "flux"}))
    with pytest.raises(ComfyModelError, match="Flux.1 dev model; ReNeg's ComfyUI sampler does not run Flux"):
        ComfyBackend(SimpleNamespace(model=model), SimpleNamespace(first_stage_model=None), 4096)

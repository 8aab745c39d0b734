"""PixArt in ComfyUI: the Load, Tune and Save nodes on a PixArt MODEL as ComfyUI loads it (stand-ins for
``comfy.*`` around a small PixArt-architecture transformer: unpadded T5 rows, no mask, ``c_size``/``c_ar``),
checked against the diffusers PixArt backend, which pads and masks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import comfy_stubs
from test_comfy_nodes import _tune_args, host, node, reward, run  # noqa: F401 - fixtures


@pytest.fixture(scope="module")
def pixart_dir(tiny_pixart_dir):
    return tiny_pixart_dir


@pytest.fixture(scope="module")
def pixart_models(pixart_dir):
    return comfy_stubs.tiny_comfy_pixart_models(pixart_dir)


def test_comfy_pixart_denoiser_equals_diffusers_with_mask(pixart_dir, pixart_models):
    """ComfyUI's unpadded rows without a mask give the transformer output diffusers gets from 120 padded
    rows and the attention mask; the family comes from the family table via unet_config["image_model"]."""
    from reneg.backends.comfy_backend import ComfyBackend, ComfyModelError
    from reneg.backends.loading import load_diffusers

    model, vae, clip = pixart_models
    backend = ComfyBackend(model, vae, 4096, "ddim_uniform", width=16, height=16)
    assert backend.family == "pixart" and backend.masked
    ref = load_diffusers(pixart_dir)
    with torch.inference_mode():
        host_rows = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))[0][0]
        host_empty = clip.encode_from_tokens_scheduled(clip.tokenize(""))[0][0]
    c = ref.encode_prompts(["a red circle"])
    n = int(c.mask.sum())
    assert host_rows.shape == (1, n, 4096) and torch.allclose(host_rows, c.crossattn[:, :n], atol=1e-5)
    null, _ = ref.null_embedding()
    assert host_empty.shape == (1, 1, 4096) and torch.allclose(host_empty, null[:, :1], atol=1e-5)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for s in backend.schedule(10)[:-1:3]:
            sig = torch.full((1,), float(s))
            ours = backend.denoiser(x, sig, backend.negative_cond(host_rows.clone()))
            torch.testing.assert_close(ours, ref.denoiser(x, sig, c), rtol=1e-4, atol=1e-4)
    with pytest.raises(ComfyModelError, match="reads every row"):
        backend.negative_cond(null, mask=torch.tensor([[1] + [0] * 119]))
    # T5 width on a model the table does not know (e.g. an SD UNet stand-in) is refused clearly
    model.model.model_config.unet_config["image_model"] = "hydit"
    try:
        with pytest.raises(ComfyModelError, match="hidden size 4096 for a hydit model"):
            ComfyBackend(model, vae, 4096)
    finally:
        model.model.model_config.unet_config["image_model"] = "pixart_alpha"


def test_official_pixart_file_load_tune_save(host, pixart_models, reward, shared_data):  # noqa: F811
    official = shared_data / "reneg-official" / "pixart-alpha_reneg_emb.bin"
    if not official.is_file():
        pytest.skip("the paper's PixArt-alpha embedding is not in the shared data folder")
    import shutil

    from reneg.embedding import load_embedding

    model, vae, clip = pixart_models
    folder = Path(host.models_dir) / "reneg"
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(official, folder / official.name)
    load = node(host, "ReNegLoadEmbedding")
    (neg,) = run(load.load, official.name, clip, 1.0)
    (base,) = run(load.load, official.name, clip, 0.0)
    file = load_embedding(official)
    # the file's mask keeps its first row only: ComfyUI gets that row, as it gets E("")'s one row
    assert neg[0][0].shape == (1, 1, 4096) and torch.equal(neg[0][0], file.tensor[:, :1].float())
    assert base[0][0].shape == (1, 1, 4096)
    (half,) = run(load.load, official.name, clip, 0.5)
    assert torch.allclose(half[0][0], 0.5 * (neg[0][0] + base[0][0]), atol=1e-6)

    with torch.inference_mode():
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"), add_dict={"width": 16, "height": 16})
    model.model.size_calls.clear()
    with torch.inference_mode():
        out = node(host, "ReNegPerSampleTune").tune(**_tune_args(pixart_models, pos, neg, reward, width=24, height=16))
    tuned, r0, r1 = out["result"]
    assert r1 >= r0 and tuned[0][0].shape == (1, 1, 4096)
    # the positive's own size (from CLIPTextEncodePixArtAlpha, 16 x 16); the negative's is the image's
    # (height 16, width 24), what ComfyUI's PixArt falls back to for conditioning without a size
    calls = {str(c) for c in model.model.size_calls}
    batched, neg_only, pos_only = str([[16.0, 24.0], [16.0, 16.0]]), str([[16.0, 24.0]]), str([[16.0, 16.0]])
    assert batched in calls and calls <= {batched, neg_only, pos_only}

    save = node(host, "ReNegSaveEmbedding")
    (path,) = run(save.save, tuned, "pixart_tuned", False)
    saved = load_embedding(path, expected_family="pixart")
    assert saved.tensor.shape == (1, 120, 4096) and saved.attention_mask.tolist() == [[1] + [0] * 119]
    (again,) = run(load.load, Path(path).name, clip, 1.0)
    assert torch.equal(again[0][0], tuned[0][0].float())


def test_load_node_feeds_a_t5_file_to_ltx_video_conditioning(host, pixart_dir, pixart_models):  # noqa: F811
    """LTX-Video in ComfyUI reads the same T5 encoder's rows, padded to 128 with an attention mask in the
    conditioning: the Load node pads the file's counted rows the same way and writes their mask."""
    from reneg.embedding import NegEmbedding, save_embedding

    _, _, t5 = pixart_models
    clip = comfy_stubs.LTXVT5CLIP(t5.text_encoder, t5.tokenizer)
    folder = Path(host.models_dir) / "reneg"
    folder.mkdir(parents=True, exist_ok=True)
    rows = torch.zeros(1, 120, 4096)
    rows[:, :3] = torch.randn(1, 3, 4096, generator=torch.Generator().manual_seed(0)) * 0.05
    save_embedding(str(folder / "t5.safetensors"), NegEmbedding(rows, "pixart"))
    load = node(host, "ReNegLoadEmbedding")
    (neg,) = run(load.load, "t5.safetensors", clip, 1.0)
    t, extra = neg[0]
    assert t.shape == (1, 128, 4096) and torch.equal(t[:, :3], rows[:, :3]) and t[:, 3:].abs().sum() == 0
    assert extra["attention_mask"].tolist() == [[1, 1, 1] + [0] * 125]
    (base,) = run(load.load, "t5.safetensors", clip, 0.0)
    assert int(base[0][1]["attention_mask"].sum()) == 1  # the empty prompt: </s> only

"""reneg.load_negative on the transformer pipelines (WanPipeline, FluxPipeline, ChromaPipeline,
QwenImagePipeline): called with ``**load_negative(...)`` each gives the image of the same negative
passed by hand (rows, pooled vector, mask), on tiny random folders loaded the way a user's are."""

from __future__ import annotations

import pytest
import torch

import reneg
from reneg.backends.loading import load_diffusers
from reneg.diffusers_api import pipeline_family
from reneg.embedding import NegEmbedding, save_embedding
from reneg.tiny import build_tiny_chroma, build_tiny_wan

PROMPTS = ["a red circle", "a blue square on a green house"]


def _negative(backend, seed):
    """The backend's empty-prompt negative moved off it: the shape, pooled vector and mask of a file of
    the family, with values a learned file would have."""
    null, pooled = backend.null_embedding()
    g = torch.Generator().manual_seed(seed)
    rows = null + 0.3 * torch.randn(null.shape, generator=g) * null.std()
    if getattr(backend, "negative_mask", None) is not None:
        mask = backend.negative_mask(null)
        rows = rows * mask[..., None].to(rows)  # rows the model does not read stay zero, as in a file
    else:
        mask = None
    return rows, pooled, mask


def _run(pipe, kw, **call):
    out = pipe(**kw, generator=torch.Generator().manual_seed(0), output_type="latent", **call)
    return out.frames if hasattr(out, "frames") else out.images


CASES = {
    "wan": dict(
        cls="WanPipeline", call=dict(num_inference_steps=2, guidance_scale=5.0, height=16, width=16, num_frames=5)
    ),
    "flux-dev": dict(cls="FluxPipeline", call=dict(num_inference_steps=2, true_cfg_scale=3.0, height=32, width=32)),
    "chroma": dict(cls="ChromaPipeline", call=dict(num_inference_steps=2, guidance_scale=4.0, height=32, width=32)),
    "qwen-image": dict(
        cls="QwenImagePipeline", call=dict(num_inference_steps=2, true_cfg_scale=4.0, height=32, width=32)
    ),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_flux_dir, tiny_qwen_image_dir):
    root = tmp_path_factory.mktemp("api-flow")
    return {
        "wan": build_tiny_wan(str(root / "wan")),
        "flux-dev": tiny_flux_dir,
        "chroma": build_tiny_chroma(str(root / "chroma")),
        "qwen-image": tiny_qwen_image_dir,
    }


@pytest.mark.parametrize("family", list(CASES))
def test_transformer_pipelines_take_the_kwargs(tmp_path, folders, family):
    import diffusers

    case = CASES[family]
    folder = folders[family]
    backend = load_diffusers(folder)
    assert backend.family == family
    rows, pooled, mask = _negative(backend, seed=1)
    path = save_embedding(str(tmp_path / "neg.safetensors"), NegEmbedding(rows, family, pooled, attention_mask=mask))
    pipe = getattr(diffusers, case["cls"]).from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipeline_family(pipe).name == family
    kw = reneg.load_negative(pipe, path, PROMPTS)
    assert kw["prompt"] == PROMPTS and kw["negative_prompt_embeds"].shape[:2] == (2, rows.shape[1])
    hand = {"prompt": PROMPTS, "negative_prompt_embeds": rows.expand(2, -1, -1).contiguous()}
    if pooled is not None:
        assert torch.equal(kw["negative_pooled_prompt_embeds"], pooled.reshape(1, -1).expand(2, -1))
        hand["negative_pooled_prompt_embeds"] = pooled.reshape(1, -1).expand(2, -1).contiguous()
    if mask is not None:
        arg = next(a for a in ("negative_prompt_attention_mask", "negative_prompt_embeds_mask") if a in kw)
        assert kw[arg].tolist() == mask.expand(2, -1).tolist()
        hand[arg] = mask.expand(2, -1).contiguous().to(kw[arg].dtype)  # Chroma's attention: booleans
    with torch.no_grad():
        got = _run(pipe, kw, **case["call"])
        want = _run(pipe, hand, **case["call"])
        empty = _run(pipe, reneg.load_negative(pipe, path, PROMPTS, strength=0.0), **case["call"])
    assert torch.equal(
        kw["negative_prompt_embeds"], hand["negative_prompt_embeds"].to(kw["negative_prompt_embeds"].dtype)
    ), float((kw["negative_prompt_embeds"] - hand["negative_prompt_embeds"]).abs().max())
    assert torch.equal(got, want), float((got - want).abs().max())
    assert not torch.allclose(got, empty)  # the negative acts: strength 0 (the empty prompt) differs


def test_flux_rows_are_never_repeated(tmp_path, folders):
    """Flux reads its text rows in joint attention: a 256-row (schnell) file on a pipeline called at 512
    rows is refused with the max_sequence_length to give, and taken as it is at 256."""
    from diffusers import FluxPipeline

    backend = load_diffusers(folders["flux-dev"])
    null, pooled = backend.null_embedding()
    path = save_embedding(str(tmp_path / "schnell.safetensors"), NegEmbedding(null[:, :256], "flux-schnell", pooled))
    pipe = FluxPipeline.from_pretrained(folders["flux-dev"], local_files_only=True)
    with pytest.raises(ValueError, match="max_sequence_length=256"):
        reneg.load_negative(pipe, path, PROMPTS)
    kw = reneg.load_negative(pipe, path, PROMPTS, max_sequence_length=256)
    assert kw["negative_prompt_embeds"].shape == (2, 256, 4096)

"""The models ``--demo`` falls back to when the shipped demo world's assets are missing.

A tiny random-weight Stable Diffusion folder (family ``tiny``: text width 64, 16 px images) and a
small HPS-format open_clip reward, built from fixed configs and seeds and saved in the real file
layouts, so they load through the code paths users' files take. They prove the machinery, not the
method (the trained demo world in :mod:`reneg.demo_world` does that). :mod:`reneg.demo` builds them;
the tests and benchmarks build on them too, through :mod:`reneg.tiny`, which adds the models only
tests use.
"""

from __future__ import annotations

import json
import os

import torch

from .backends.clip_tokenizer import write_clip_tokenizer

SD_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

SD_MODEL_INDEX = {  # a StableDiffusionPipeline folder's model_index.json
    "_class_name": "StableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def tiny_unet_blocks(dim: str = "2D") -> dict:
    """The small UNets' shape (two levels, one with cross-attention): SD's 2-D blocks, ZeroScope's 3-D ones."""
    return dict(
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 64),
        norm_num_groups=8,
        down_block_types=(f"CrossAttnDownBlock{dim}", f"DownBlock{dim}"),
        up_block_types=(f"UpBlock{dim}", f"CrossAttnUpBlock{dim}"),
        attention_head_dim=8,
    )


def tiny_vae(sample_size: int, **kw):
    """A two-level AutoencoderKL: images of ``sample_size`` px, latents of half that."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(16, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=sample_size,
        **kw,
    )


def tiny_clip(hidden: int, heads: int, intermediate: int = 64, cls=None, **kw):
    """A two-layer CLIP text encoder of width ``hidden`` over CLIP's real vocabulary and 77 positions."""
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg = CLIPTextConfig(
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=2,
        num_attention_heads=heads,
        vocab_size=49408,
        max_position_embeddings=77,
        **kw,
    )
    return (cls or CLIPTextModel)(cfg)


def write_pipeline_files(folder: str, scheduler: dict, index: dict) -> None:
    """A diffusers folder's ``scheduler/scheduler_config.json`` and ``model_index.json``."""
    from .fileio import atomic_write_json

    os.makedirs(os.path.join(folder, "scheduler"), exist_ok=True)
    atomic_write_json(os.path.join(folder, "scheduler", "scheduler_config.json"), scheduler)
    atomic_write_json(os.path.join(folder, "model_index.json"), dict(index, _diffusers_version="0.30.0"))


def save_text_encoder_prefixed(text_encoder, folder: str) -> None:
    """Save a CLIPTextModel with the ``text_model.`` key prefix real SD folders use
    (transformers 5 drops it; ComfyUI then loads garbage: NaN images)."""
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    text_encoder.config.save_pretrained(folder)
    sd = {}
    for k, v in text_encoder.state_dict().items():
        key = k if k.startswith(("text_model.", "text_projection.")) else "text_model." + k
        sd[key] = v.detach().contiguous().clone()
    save_file(sd, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})


def build_tiny_pipeline(
    folder: str, seed: int = 0, hidden: int = 64, prediction_type: str = "epsilon", sample_size: int = 8
) -> str:
    """A tiny SD-architecture diffusers folder (family ``tiny``, hidden 64): 16 px images, 8 px latents."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)  # the parts are made in this order: their random weights depend on it
    unet = UNet2DConditionModel(sample_size=sample_size, cross_attention_dim=hidden, **tiny_unet_blocks())
    vae = tiny_vae(sample_size * 2)
    te = tiny_clip(hidden, 4, intermediate=2 * hidden, projection_dim=hidden)
    os.makedirs(folder, exist_ok=True)
    unet.save_pretrained(os.path.join(folder, "unet"))
    vae.save_pretrained(os.path.join(folder, "vae"))
    save_text_encoder_prefixed(te, os.path.join(folder, "text_encoder"))
    write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    write_pipeline_files(folder, dict(SD_SCHEDULER, prediction_type=prediction_type), SD_MODEL_INDEX)
    return folder


TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 2},
}


def build_tiny_hps(folder: str, seed: int = 0, config: dict | None = None) -> str:
    """An HPS-format checkpoint (``{"state_dict": ...}``) of a small open_clip model,
    with its ``open_clip_config.json`` beside it. Returns the checkpoint path."""
    import open_clip

    cfg = config or TINY_CLIP_CONFIG
    torch.manual_seed(seed)
    model = open_clip.CLIP(**cfg)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "open_clip_config.json"), "w") as f:
        json.dump({"model_cfg": cfg}, f, indent=1)
    path = os.path.join(folder, "hps_tiny.pt")
    torch.save({"state_dict": model.state_dict()}, path)
    return path

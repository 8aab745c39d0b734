"""The models the benchmarks run, written in the real file layouts and loaded back
through the project's real loaders (``load_diffusers``, ``load_rewards``).

* ``tiny``: reneg.tiny's small diffusers pipeline and HPS-format open_clip reward.
* ``sd15``: Stable Diffusion 1.5's architecture with random weights, built in code
  from its published configs (UNet2DConditionModel defaults with
  cross_attention_dim 768, the 4-level AutoencoderKL, a 12-layer CLIPTextModel of
  width 768 with the real CLIP tokenizer), and OpenCLIP ViT-H-14 (``pretrained=None``)
  saved as an HPS checkpoint: the same FLOPs and memory as the real models.

Built once into a cache folder (``complete.json`` marks a finished build).
"""

from __future__ import annotations

import json
import os
import time

import torch

from reneg.fileio import atomic_torch_save, atomic_write_json

SD15_UNET = dict(sample_size=64, in_channels=4, out_channels=4, cross_attention_dim=768)  # rest: defaults
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    layers_per_block=2,
    sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    norm_num_groups=32,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="quick_gelu",
    projection_dim=768,
)


def _done(folder: str, scale: str) -> dict | None:
    p = os.path.join(folder, "complete.json")
    if os.path.isfile(p):
        with open(p, encoding="utf-8") as f:
            info = json.load(f)
        if (
            info.get("scale") == scale
            and os.path.exists(info.get("model", ""))
            and os.path.exists(info.get("reward_path", ""))
        ):
            return info
    return None


def build(scale: str, cache: str, device: torch.device, log=print) -> dict:
    """``{"model": folder, "reward": spec, ...}`` for ``scale``, building it if needed."""
    folder = os.path.join(cache, scale)
    info = _done(folder, scale)
    if info:
        log(f"models: reusing {folder}")
        return info
    t = time.time()
    os.makedirs(folder, exist_ok=True)
    if scale == "tiny":
        from reneg.tiny import build_tiny_hps, build_tiny_pipeline

        model = build_tiny_pipeline(os.path.join(folder, "pipeline"), seed=0)
        hps = build_tiny_hps(os.path.join(folder, "hps"), seed=0)
    elif scale == "sd15":
        model = build_sd15_pipeline(os.path.join(folder, "sd15-random"), device, log)
        hps = build_vit_h_hps(os.path.join(folder, "hps"), device, log)
    else:
        raise ValueError(f"--scale {scale!r}: expected tiny or sd15")
    info = {
        "scale": scale,
        "model": model,
        "reward_path": hps,
        "reward": f"hpsv2.1={hps}",
        "build_seconds": round(time.time() - t, 1),
    }
    atomic_write_json(os.path.join(folder, "complete.json"), info)
    log(f"models: built {scale} in {info['build_seconds']} s under {folder}")
    return info


def _init_device(device: torch.device) -> torch.device:
    # random initialisation of ~2 B parameters is far quicker on a GPU
    return device if device.type == "cuda" else torch.device("cpu")


def build_sd15_pipeline(folder: str, device: torch.device, log=print) -> str:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from reneg.tiny import (
        SD_MODEL_INDEX,
        SD_SCHEDULER,
        save_text_encoder_prefixed,
        write_clip_tokenizer,
        write_pipeline_files,
    )

    torch.manual_seed(0)
    os.makedirs(folder, exist_ok=True)
    with torch.device(_init_device(device)):
        unet = UNet2DConditionModel(**SD15_UNET)
    log(f"models: SD1.5 UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f} M parameters")
    unet.to(torch.float16).save_pretrained(os.path.join(folder, "unet"))
    del unet
    with torch.device(_init_device(device)):
        vae = AutoencoderKL(**SD15_VAE)
    vae.to(torch.float16).save_pretrained(os.path.join(folder, "vae"))
    del vae
    with torch.device(_init_device(device)):
        te = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    save_text_encoder_prefixed(te.to("cpu", torch.float16), os.path.join(folder, "text_encoder"))
    del te
    write_clip_tokenizer(os.path.join(folder, "tokenizer"))
    write_pipeline_files(folder, SD_SCHEDULER, SD_MODEL_INDEX)
    return folder


def build_vit_h_hps(folder: str, device: torch.device, log=print) -> str:
    """OpenCLIP ViT-H-14 with random weights as an HPS checkpoint (``{"state_dict": ...}``,
    fp16 like the released ``*_compressed.pt``), loaded later by the real HPS loader."""
    import open_clip

    torch.manual_seed(0)
    with torch.device(_init_device(device)):
        model = open_clip.create_model("ViT-H-14", pretrained=None, device=_init_device(device))
    log(f"models: ViT-H-14 reward {sum(p.numel() for p in model.parameters()) / 1e6:.0f} M parameters")
    sd = {k: v.detach().to("cpu", torch.float16) for k, v in model.state_dict().items()}
    del model
    path = os.path.join(folder, "HPS_v2.1_random.pt")
    atomic_torch_save(path, {"state_dict": sd})
    return path

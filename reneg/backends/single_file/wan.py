"""Wan's single files as ComfyUI keeps them, named from their keys and shapes (no tensor is read).

A ComfyUI Wan user holds a transformer in ``models/diffusion_models/`` (``wan2.1_t2v_1.3B_fp16.safetensors``,
``wan2.2_t2v_high_noise_14B_fp16.safetensors`` and its ``low_noise`` twin, ``wan2.2_ti2v_5B_fp16.safetensors``:
Wan's own layout, ``patch_embedding``, ``text_embedding``, ``blocks.N.self_attn`` / ``cross_attn``,
``head.modulation``), the UMT5-XXL text encoder in ``models/text_encoders/`` (``umt5_xxl_fp16.safetensors``,
``umt5_xxl_fp8_e4m3fn_scaled.safetensors``: transformers' ``UMT5EncoderModel`` names, a relative attention
bias in every layer) and the VAE in ``models/vae/`` (named by :mod:`.qwen_image`, whose VAE has Wan 2.1's
layout). :func:`wan_part` tells them apart as ComfyUI's ``model_detection.py`` does (``head.modulation``
makes a Wan transformer; ``img_emb`` or 36 input channels an image-to-video one, ``vace_blocks`` VACE).

ReNeg trains, tunes and evaluates Wan from a diffusers ``WanPipeline`` folder (:mod:`reneg.backends.wan`).
``reneg inspect`` describes these files; the loaders refuse them with a message that says what to pass.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .qwen_image import _layers as _count
from .qwen_image import _weights
from .read import Checkpoint

TRANSFORMER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
UMT5_KEY = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"  # in every UMT5 layer
FOLDERS = {  # where ComfyUI keeps each part, and the node that loads it
    "transformer": ("models/diffusion_models", "Load Diffusion Model (UNETLoader)"),
    "text_encoder": ("models/text_encoders", "Load CLIP (CLIPLoader), type wan"),
}
REFUSAL = (
    "trains, tunes and evaluates Wan from a diffusers WanPipeline folder (transformer/ and, for Wan 2.2 "
    "A14B, transformer_2/, text_encoder/, tokenizer/, vae/, scheduler/); in ComfyUI the ReNeg nodes work "
    "with the model ComfyUI loads from these files"
)


@dataclass
class WanPart:
    path: str
    part: str  # transformer | text_encoder
    description: str
    details: dict = field(default_factory=dict)
    supported: bool = True  # a text-to-video model (or its text encoder): what ReNeg learns negatives for
    size: int = 0

    def to_json(self) -> dict:
        folder, loader = FOLDERS[self.part]
        return dict(asdict(self), architecture="Wan", family="wan" if self.supported else None,
                    comfyui_folder=folder, comfyui_loader=loader)  # fmt: skip

    def describe(self) -> list[str]:
        folder, loader = FOLDERS[self.part]
        lines = [self.path, f"  Wan part      {self.description}"]
        lines += [f"  {k:<13} {v}" for k, v in self.details.items()]
        lines.append(f"  ComfyUI keeps it in {folder}/, loaded by {loader}")
        lines.append(f"  ReNeg         {REFUSAL}")
        return lines

    def refusal(self) -> str:
        return f"{self.path}: {self.description}, one part of a Wan model on its own; ReNeg {REFUSAL}"


def _transformer(ck: Checkpoint) -> WanPart | None:
    keys = list(ck.keys())
    for pre in TRANSFORMER_PREFIXES:
        if pre + "head.modulation" in ck and pre + "patch_embedding.weight" in ck:
            break
    else:
        return None
    dim, in_ch = (int(x) for x in ck.shapes[pre + "patch_embedding.weight"][:2])
    layers = _count(ck, pre + "blocks.")
    ffn = ck.shapes.get(pre + "blocks.0.ffn.0.weight", (0,))[0]
    text = ck.shapes.get(pre + "text_embedding.0.weight", (0, 0))[1]
    details = {
        "blocks": f"{layers} blocks {dim} wide ({dim // 128} heads of 128), feed-forward {ffn}",
        "reads": f"{in_ch} latent channels; UMT5 rows {text} wide",
        "weights": _weights(ck) + (f", keys under {pre!r}" if pre else ""),
    }
    if any(k.startswith(pre + "vace_blocks.") for k in keys):
        return WanPart(ck.path, "transformer", "a Wan VACE transformer (video editing), which ReNeg does not support",
                       details, False)  # fmt: skip
    if pre + "img_emb.proj.0.weight" in ck or in_ch == 36:
        what = "a Wan image-to-video transformer (I2V)"
        return WanPart(ck.path, "transformer", f"{what}; ReNeg learns negatives for Wan text-to-video models",
                       details, False)  # fmt: skip
    known = {(1536, 16): "Wan 2.1 T2V 1.3B", (5120, 16): "Wan 2.1 T2V 14B or one expert of Wan 2.2 T2V A14B",
             (3072, 48): "Wan 2.2 TI2V 5B (used for text to video)"}  # fmt: skip
    name = known.get((dim, in_ch), "a Wan text-to-video transformer")
    if (dim, in_ch) == (5120, 16):
        details["note"] = "Wan 2.2 A14B keeps two such files (high_noise and low_noise experts)"
    return WanPart(ck.path, "transformer", f"the {name} transformer (Wan's own layout)", details)


def wan_part(ck: Checkpoint) -> WanPart | None:
    """What Wan part ``ck`` is (a transformer or the UMT5-XXL encoder), or None when it is neither."""
    size = os.path.getsize(ck.path) if os.path.isfile(ck.path) else 0
    found = _transformer(ck)
    if found is None and UMT5_KEY in ck and "shared.weight" in ck:
        vocab, width = (int(x) for x in ck.shapes["shared.weight"])
        details = {
            "encoder": f"UMT5, {_count(ck, 'encoder.block.')} layers, {width} wide, vocabulary {vocab}",
            "weights": _weights(ck),
        }
        if "spiece_model" in ck:
            details["tokenizer"] = "inside (spiece_model), where ComfyUI reads Wan's tokenizer from"
        ok = width == 4096
        found = WanPart(ck.path, "text_encoder", "the UMT5-XXL text encoder: Wan's rows" if ok
                        else f"a UMT5 text encoder {width} wide (Wan reads 4096)", details, ok)  # fmt: skip
    if found is not None:
        found.size = size
    return found

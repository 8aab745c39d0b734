"""Flux.1's single files as ComfyUI keeps them, named from their keys and shapes.

ComfyUI loads Flux.1 from separate files: the transformer in ``models/diffusion_models/`` (the Black
Forest Labs layout: ``img_in``, ``txt_in``, ``vector_in``, ``double_blocks.N``, ``single_blocks.N``,
``guidance_in`` for dev), the two text encoders in ``models/text_encoders/`` (``clip_l``: a transformers
``CLIPTextModel``, ``text_model.*``; ``t5xxl``: a transformers ``T5EncoderModel``, ``encoder.block.N``,
``shared``) and the autoencoder ``ae`` in ``models/vae/`` (the LDM layout, ``encoder.down.N`` /
``decoder.up.N``, 16 latent channels); or from one checkpoint holding them under
``model.diffusion_model.``, ``text_encoders.clip_l.``, ``text_encoders.t5xxl.`` and ``vae.``.
:func:`flux_part` tells which of these a file is, as ComfyUI's ``model_detection.py`` (the transformer:
``double_blocks.0.img_attn.norm.key_norm.scale`` with ``img_in.weight``; dev when
``guidance_in.in_layer.weight`` is there) and ``sd.py`` (the text encoders) tell them apart.

ReNeg reads Flux from a diffusers ``FluxPipeline`` folder (:mod:`reneg.backends.flux`): the single
files carry no tokenizers. ``reneg inspect`` describes them; the loaders refuse them with a message
that says so.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .read import Checkpoint

TRANSFORMER_PREFIXES = ("", "model.diffusion_model.")
T5_KEY = "encoder.block.0.layer.0.SelfAttention.q.weight"
CLIP_KEY = "text_model.encoder.layers.0.self_attn.q_proj.weight"
# where ComfyUI keeps each part
FOLDERS = {
    "transformer": "models/diffusion_models",
    "clip_l": "models/text_encoders",
    "t5xxl": "models/text_encoders",
    "ae": "models/vae",
    "checkpoint": "models/checkpoints",
}


@dataclass
class FluxPart:
    path: str
    part: str  # transformer | clip_l | t5xxl | ae | checkpoint (all four in one file)
    description: str
    details: dict = field(default_factory=dict)
    family: str = ""  # flux-dev / flux-schnell for a transformer or a checkpoint
    size: int = 0

    def to_json(self) -> dict:
        return dict(asdict(self), architecture="Flux.1", comfyui_folder=FOLDERS[self.part])

    def refusal(self) -> str:
        """The loaders' one line for this file: what it is and what ReNeg takes instead."""
        also = f"; {SHARED[self.part]}" if self.part in SHARED else ""
        return f"{self.path}: {self.description}, one part of a model on its own; ReNeg {REFUSAL}{also}"

    def describe(self) -> list[str]:
        lines = [self.path, f"  Flux.1 part   {self.description}"]
        lines += [f"  {k:<13} {v}" for k, v in self.details.items()]
        lines.append(f"  ComfyUI keeps it in {FOLDERS[self.part]}/")
        lines.append(f"  ReNeg         {REFUSAL}")
        if self.part in SHARED:
            lines.append(f"                {SHARED[self.part]}")
        return lines


REFUSAL = (
    "trains and tunes Flux.1 from a diffusers FluxPipeline folder (transformer/, vae/, text_encoder/, "
    "tokenizer/, text_encoder_2/, tokenizer_2/, scheduler/); in ComfyUI the Load ReNeg Embedding node "
    "works with the model ComfyUI loads from these files"
)


# parts other models read too: what ReNeg takes for those models instead
SHARED = {
    "t5xxl": "Chroma: a diffusers ChromaPipeline folder; PixArt: a PixArtAlphaPipeline / PixArtSigmaPipeline folder",
    "ae": "Chroma: a diffusers ChromaPipeline folder",
}


def _count(ck: Checkpoint, prefix: str) -> int:
    n = set()
    for k in ck.keys():
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                n.add(int(head))
    return max(n) + 1 if n else 0


def _transformer(ck: Checkpoint, prefix: str) -> tuple[str, dict] | None:
    if prefix + "double_blocks.0.img_attn.norm.key_norm.scale" not in ck or prefix + "img_in.weight" not in ck:
        return None
    if any(k.startswith(prefix + "distilled_guidance_layer.") for k in ck.keys()):
        return None  # Chroma: Flux's layout with its own guidance layer
    hidden, in_ch = ck.shapes[prefix + "img_in.weight"]
    family = "flux-dev" if prefix + "guidance_in.in_layer.weight" in ck else "flux-schnell"
    vec = ck.shapes.get(prefix + "vector_in.in_layer.weight")
    txt = ck.shapes.get(prefix + "txt_in.weight")
    head = ck.shapes.get(prefix + "double_blocks.0.img_attn.norm.key_norm.scale", (128,))[0]
    dtypes = {str(ck.dtypes[k]).replace("torch.", "") for k in ck.keys() if k.startswith(prefix + "double_blocks.")}
    details = {
        "variant": f"{family} ({'guidance embedding' if family == 'flux-dev' else 'no guidance embedding'})",
        "blocks": f"{_count(ck, prefix + 'double_blocks.')} double-stream, {_count(ck, prefix + 'single_blocks.')} "
        f"single-stream, {hidden} wide ({int(hidden) // int(head)} heads of {head})",
        "reads": f"{in_ch // 4} latent channels in 2x2 patches; T5 rows {txt[1] if txt else '?'} wide; "
        f"a pooled vector of {vec[1] if vec else '?'}",
        "weights": ", ".join(sorted(dtypes)) or "?",
    }
    return family, details


def flux_part(ck: Checkpoint) -> FluxPart | None:
    """What Flux.1 part ``ck`` is, or None when it is none of them."""
    size = os.path.getsize(ck.path) if os.path.isfile(ck.path) else 0
    keys = list(ck.keys())
    if any(k.startswith("text_encoders.t5xxl.") for k in keys) and any(k.startswith("vae.") for k in keys):
        found = _transformer(ck, "model.diffusion_model.")
        if found:
            family, details = found
            return FluxPart(ck.path, "checkpoint", "a whole Flux.1 checkpoint (transformer, clip_l, t5xxl, ae)",
                            details, family, size)  # fmt: skip
    for prefix in TRANSFORMER_PREFIXES:
        found = _transformer(ck, prefix)
        if found:
            family, details = found
            return FluxPart(ck.path, "transformer", f"the {family} transformer (Black Forest Labs layout)",
                            details, family, size)  # fmt: skip
    if T5_KEY in ck and "shared.weight" in ck:
        vocab, width = ck.shapes["shared.weight"]
        if int(width) != 4096:
            return None
        layers = _count(ck, "encoder.block.")
        scaled = "scaled_fp8" in ck
        details = {"encoder": f"T5 v1.1 XXL, {layers} layers, {width} wide, vocabulary {vocab}"}
        details["weights"] = "fp8 with scales (scaled_fp8)" if scaled else str(ck.dtypes[T5_KEY]).replace("torch.", "")
        return FluxPart(
            ck.path,
            "t5xxl",
            "the T5-XXL text encoder (t5xxl): the rows of Flux.1, Chroma, PixArt-alpha and PixArt-Sigma",
            details,
            size=size,
        )
    if CLIP_KEY in ck and "text_model.embeddings.token_embedding.weight" in ck:
        vocab, width = ck.shapes["text_model.embeddings.token_embedding.weight"]
        if int(width) != 768:
            return None
        details = {
            "encoder": f"CLIP ViT-L/14 text model, {_count(ck, 'text_model.encoder.layers.')} layers, {width} wide"
        }
        return FluxPart(ck.path, "clip_l", "the CLIP-L text encoder (clip_l): Flux's pooled vector", details, size=size)
    conv = ck.shapes.get("decoder.conv_in.weight")
    if conv is not None and "encoder.down.0.block.0.conv1.weight" in ck and int(conv[1]) == 16:
        details = {"latent": "16 channels, 8x downsampling (the LDM layout)"}
        return FluxPart(ck.path, "ae", "the 16-channel autoencoder (ae) of Flux.1 and Chroma", details, size=size)
    return None

"""Qwen-Image's single files as ComfyUI keeps them, named from their keys and shapes (no tensor is read).

ComfyUI loads Qwen-Image from three files: the transformer in ``models/diffusion_models/``
(``qwen_image_bf16.safetensors`` and its fp8 versions: diffusers' ``QwenImageTransformer2DModel`` names,
``img_in``, ``txt_norm``, ``txt_in``, ``transformer_blocks.N``, sometimes under ``model.diffusion_model.``),
the Qwen2.5-VL-7B text encoder in ``models/text_encoders/`` (``qwen_2.5_vl_7b.safetensors``,
``..._fp8_scaled``: ``model.layers.N``, ``model.embed_tokens``, ``visual.*``) and the VAE in ``models/vae/``
(``qwen_image_vae.safetensors``: the Wan 2.1 VAE's layout, ``encoder.downsamples``, ``decoder.middle``).
:func:`qwen_image_part` tells them apart with ComfyUI's own tests: ``txt_norm.weight`` is Qwen-Image's
transformer (``comfy/model_detection.py``); a 512-wide ``k_proj.bias`` in layer 0 is Qwen2.5-7B and
``decoder.middle.0.residual.0.gamma`` without Wan 2.2's extra upsampling residual is the Wan 2.1 VAE
(``comfy/sd.py``).

ReNeg trains, tunes and evaluates Qwen-Image from a diffusers ``QwenImagePipeline`` folder
(:mod:`reneg.backends.qwen_image`): the single files carry no tokenizer. ``reneg inspect`` describes
them; the loaders refuse them with a message that says so.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

from .read import Checkpoint

TRANSFORMER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
TE_KEY = "model.layers.0.self_attn.k_proj.bias"
VAE_KEY = "decoder.middle.0.residual.0.gamma"
WAN22_VAE_KEY = "decoder.upsamples.0.upsamples.0.residual.2.weight"
FOLDERS = {  # where ComfyUI keeps each part, and the node that loads it
    "transformer": ("models/diffusion_models", "Load Diffusion Model (UNETLoader)"),
    "text_encoder": ("models/text_encoders", "Load CLIP (CLIPLoader), type qwen_image"),
    "vae": ("models/vae", "Load VAE (VAELoader)"),
}
REFUSAL = (
    "trains, tunes and evaluates Qwen-Image from a diffusers QwenImagePipeline folder (transformer/, "
    "text_encoder/, tokenizer/, vae/, scheduler/); in ComfyUI the Load ReNeg Embedding node works with "
    "the model ComfyUI loads from these files"
)


@dataclass
class QwenImagePart:
    path: str
    part: str  # transformer | text_encoder | vae
    description: str
    details: dict = field(default_factory=dict)
    parameters: int = 0
    size: int = 0

    def to_json(self) -> dict:
        folder, loader = FOLDERS[self.part]
        return dict(asdict(self), architecture="Qwen-Image", family="qwen-image", comfyui_folder=folder,
                    comfyui_loader=loader)  # fmt: skip

    def describe(self) -> list[str]:
        folder, loader = FOLDERS[self.part]
        lines = [self.path, f"  Qwen-Image part  {self.description}"]
        lines += [f"  {k:<16} {v}" for k, v in self.details.items()]
        n = f"{self.parameters / 1e9:.2f} B" if self.parameters >= 1e8 else f"{self.parameters / 1e6:.2f} M"
        lines.append(f"  {'size':<16} {n} numbers, {self.size / 2**30:.2f} GiB")
        lines.append(f"  ComfyUI keeps it in {folder}/, loaded by {loader}")
        lines.append(f"  ReNeg            {REFUSAL}")
        return lines

    def refusal(self) -> str:
        return f"{self.path}: {self.description}, one part of a Qwen-Image model; ReNeg {REFUSAL}"


def _layers(ck: Checkpoint, prefix: str) -> int:
    found = set()
    for k in ck.keys():
        if k.startswith(prefix):
            head = k[len(prefix) :].split(".", 1)[0]
            if head.isdigit():
                found.add(int(head))
    return max(found) + 1 if found else 0


def _weights(ck: Checkpoint) -> str:
    """The storage dtype most tensors have; fp8 files with ComfyUI's per-weight scales say so."""
    counts: dict[str, int] = {}
    for k in ck.keys():
        name = str(ck.dtypes[k]).replace("torch.", "")
        counts[name] = counts.get(name, 0) + 1
    main = max(counts, key=counts.get) if counts else "?"
    return main + (" with scales (scaled_fp8)" if "scaled_fp8" in ck else "")


def _numbers(ck: Checkpoint) -> int:
    n = 0
    for s in ck.shapes.values():
        p = 1
        for d in s:
            p *= int(d)
        n += p
    return n


def _part(ck: Checkpoint) -> tuple[str, str, dict] | None:
    for pre in TRANSFORMER_PREFIXES:
        if all(f"{pre}{k}.weight" in ck for k in ("txt_norm", "img_in", "txt_in")):
            width, packed = ck.shapes[f"{pre}img_in.weight"]
            text = ck.shapes[f"{pre}txt_in.weight"][1]
            head = ck.shapes.get(f"{pre}transformer_blocks.0.attn.norm_q.weight", (0,))[0]
            blocks = f"{_layers(ck, pre + 'transformer_blocks.')} MMDiT blocks {width} wide"
            details = {
                "blocks": blocks + (f" ({int(width) // int(head)} heads of {head})" if head else ""),
                "reads": f"{packed} packed latent channels (16 in 2x2 patches); text rows {text} wide",
                "weights": _weights(ck) + (f", keys under {pre!r}" if pre else ""),
            }
            return "transformer", "the Qwen-Image transformer", details
    if TE_KEY in ck and int(ck.shapes[TE_KEY][0]) == 512 and "model.embed_tokens.weight" in ck:
        vocab, width = ck.shapes["model.embed_tokens.weight"]
        vision = any(k.startswith("visual.") for k in ck.keys())
        name = "Qwen2.5-VL-7B" if vision else "Qwen2.5-7B (language model only, no vision tower)"
        details = {
            "encoder": f"{_layers(ck, 'model.layers.')} layers, {width} wide, vocabulary {vocab}",
            "weights": _weights(ck),
        }
        if int(width) != 3584:
            details["note"] = f"Qwen-Image reads rows 3584 wide; this model's are {width}"
        return "text_encoder", f"the {name} text encoder: Qwen-Image's rows", details
    if VAE_KEY in ck and WAN22_VAE_KEY not in ck:
        z = ck.shapes.get("decoder.conv1.weight")
        details = {
            "latent": f"{z[1] if z else '?'} channels, 8x spatial (the Wan 2.1 VAE's layout, used on one frame)",
            "weights": _weights(ck),
        }
        details["note"] = (
            "Wan 2.1's own VAE file (wan_2.1_vae, also Wan 2.2 A14B's) has the same keys and shapes: a Wan user passes a WanPipeline folder"
        )
        return "vae", "the Qwen-Image VAE (Wan 2.1's architecture)", details
    return None


def qwen_image_part(ck: Checkpoint) -> QwenImagePart | None:
    """What Qwen-Image part ``ck`` is, or None when it is none of them."""
    found = _part(ck)
    if found is None:
        return None
    part, description, details = found
    size = os.path.getsize(ck.path) if os.path.isfile(ck.path) else 0
    return QwenImagePart(ck.path, part, description, details, _numbers(ck), size)

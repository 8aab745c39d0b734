"""Chroma's single files as ComfyUI keeps them, named from their keys and shapes alone (no tensor is read).

A ComfyUI Chroma user holds three files: the transformer in ``models/diffusion_models/``
(``Chroma1-HD.safetensors``, ``chroma-unlocked-v*.safetensors``), the T5-XXL text encoder in
``models/text_encoders/`` (``t5xxl_fp16.safetensors``, ``t5xxl_fp8_e4m3fn_scaled.safetensors``: a
transformers ``T5EncoderModel``, ``encoder.block.N``, ``shared``) and the 16-channel autoencoder in
``models/vae/`` (``ae.safetensors``, the LDM layout: ``encoder.down.N``, ``decoder.up.N``). The transformer
is told apart as ComfyUI's ``model_detection.py`` tells it: Flux's ``double_blocks`` /
``single_blocks`` layout with a ``distilled_guidance_layer`` in place of Flux's guidance and vector
inputs; ``nerf_blocks`` make it Chroma Radiance, a pixel-space model. The text encoder and the
autoencoder are the ones Flux.1 uses too (and the T5 is PixArt's), so their lines name every family
that reads them.

ReNeg's command line reads Chroma from a diffusers ``ChromaPipeline`` folder (:mod:`reneg.backends.chroma`)
or from these files together (:func:`load_chroma_files`: the transformer as ``--model`` with
``--text-encoder`` t5xxl and ``--vae`` ae; T5's tokenizer is ComfyUI's own, found beside the files, or
``--tokenizer``; the scheduler the release's). ``reneg inspect`` describes each file; the T5 or the ae given
alone as ``--model`` is refused with a line that says what to pass.
"""

from __future__ import annotations

import os
import re
from dataclasses import asdict, dataclass

from .read import Checkpoint

TRANSFORMER_PREFIXES = ("", "model.diffusion_model.", "diffusion_model.")
T5_Q = "encoder.block.0.layer.0.SelfAttention.q.weight"
UMT5_BIAS = "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight"  # every UMT5 layer has one
PIPELINE = (
    "ReNeg's command line reads Chroma from a diffusers ChromaPipeline folder (model_index.json, "
    "transformer/, text_encoder/, tokenizer/, vae/, scheduler/), or from these files together: the "
    "transformer as --model, --text-encoder t5xxl, --vae ae; in ComfyUI the ReNeg nodes take the "
    "MODEL, CLIP and VAE its own loaders make from these files"
)
LOADERS = {
    "transformer": ("diffusion_models", "Load Diffusion Model"),
    "text_encoder": ("text_encoders", "Load CLIP, type chroma (or pixart)"),
    "vae": ("vae", "Load VAE"),
}


@dataclass
class ChromaPart:
    path: str
    kind: str  # transformer | text_encoder | vae
    architecture: str  # e.g. "Chroma transformer"
    family: str | None  # the ReNeg family a model of it belongs to; None: none ReNeg supports
    used_by: str  # the models that read this file
    details: str
    dtype: str
    tensors: int
    parameters: int
    size: int

    @property
    def comfy_folder(self) -> str:
        return LOADERS[self.kind][0]

    def to_json(self) -> dict:
        return dict(asdict(self), comfy_folder=self.comfy_folder)

    def describe(self) -> list[str]:
        """Lines for ``reneg inspect``."""
        folder, loader = LOADERS[self.kind]
        return [
            self.path,
            f"  architecture  {self.architecture}" + (f" (family {self.family})" if self.family else ""),
            f"  layout        {self.details}",
            f"  read by       {self.used_by}",
            f"  weights       {self.dtype}, {self.parameters / 1e9:.2f} B numbers in {self.tensors} tensors, "
            f"{self.size / 2**30:.2f} GiB",
            f"  ComfyUI       models/{folder}/ ({loader})",
            "  ReNeg CLI     one part of a model: --model takes the diffusers ChromaPipeline folder "
            "(transformer/, text_encoder/, tokenizer/, vae/, scheduler/)",
        ]

    def refusal(self) -> str:
        """The one-line error for ``--model`` given this file."""
        return (
            f"{self.path}: a {self.architecture} on its own (the file ComfyUI keeps in "
            f"models/{self.comfy_folder}/), one part of a model; {PIPELINE}"
        )


def _count(keys, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = {int(m.group(1)) for k in keys for m in [pat.match(k)] if m}
    return max(found) + 1 if found else 0


def _common(ck: Checkpoint) -> dict:
    counts: dict = {}
    params = 0
    for k, s in ck.shapes.items():
        n = 1
        for d in s:
            n *= int(d)
        params += n
        counts[ck.dtypes.get(k)] = counts.get(ck.dtypes.get(k), 0) + 1
    dtype = max(counts, key=counts.get) if counts else None
    return {
        "path": ck.path,
        "dtype": str(dtype).replace("torch.", ""),
        "tensors": len(ck.shapes),
        "parameters": params,
        "size": os.path.getsize(ck.path) if os.path.isfile(ck.path) else 0,
    }


def _transformer(ck: Checkpoint, keys: list) -> ChromaPart | None:
    for pre in TRANSFORMER_PREFIXES:
        if pre + "double_blocks.0.img_attn.norm.key_norm.scale" in ck and any(
            k.startswith(pre + "distilled_guidance_layer.") for k in keys
        ):
            break
    else:
        return None
    img, txt = ck.shapes.get(pre + "img_in.weight"), ck.shapes.get(pre + "txt_in.weight")
    width = int(img[0]) if img else (int(txt[0]) if txt else 0)
    details = (
        f"{_count(keys, pre + 'double_blocks.')} double-stream and {_count(keys, pre + 'single_blocks.')} "
        f"single-stream blocks, width {width}, text rows {int(txt[1]) if txt else '?'} wide"
    )
    if pre + "nerf_blocks.0.norm.scale" in ck or any(k.startswith(pre + "nerf_blocks.") for k in keys):
        return ChromaPart(
            kind="transformer",
            architecture="Chroma Radiance transformer (pixel space)",
            family=None,
            used_by="Chroma Radiance, a pixel-space model, which ReNeg does not support",
            details=details,
            **_common(ck),
        )
    if img:
        details += f", latent input {int(img[1])} (2 x 2 patches of {int(img[1]) // 4} channels)"
    return ChromaPart(
        kind="transformer",
        architecture="Chroma transformer",
        family="chroma",
        used_by="Chroma (with the T5-XXL text encoder and the 16-channel ae)",
        details=details,
        **_common(ck),
    )


def chroma_part(ck: Checkpoint) -> ChromaPart | None:
    """What part of a Chroma model ``ck`` is (transformer, T5-XXL encoder, 16-channel autoencoder), or
    None when it is none of them."""
    keys = list(ck.keys())
    if not keys:
        return None
    part = _transformer(ck, keys)
    if part is not None:
        return part
    if T5_Q in ck and UMT5_BIAS not in ck and int(ck.shapes[T5_Q][1]) == 4096:
        layers = _count(keys, "encoder.block.")
        name = "T5 v1.1 XXL" if layers == 24 else "T5-XXL-shaped"
        fp8 = " (scaled fp8)" if "scaled_fp8" in ck else ""
        return ChromaPart(
            kind="text_encoder",
            architecture=f"{name} text encoder{fp8}",
            family="chroma",
            used_by="Chroma, PixArt-alpha and PixArt-Sigma (ReNeg's t5xxl text space); Flux.1 beside clip_l",
            details=f"{layers} layers, width 4096",
            **_common(ck),
        )
    conv = ck.shapes.get("decoder.conv_in.weight")
    if (
        conv is not None
        and len(conv) == 4
        and int(conv[1]) == 16
        and any(k.startswith(("encoder.down.", "decoder.up.")) for k in keys)
    ):
        return ChromaPart(
            kind="vae",
            architecture="16-channel autoencoder (ae)",
            family="chroma",
            used_by="Chroma and Flux.1 (the same ae file)",
            details="16 latent channels, 8x downsampling (the LDM layout)",
            **_common(ck),
        )
    return None


def load_chroma_files(path: str, text_encoders=(), vae: str | None = None, tokenizer: str | None = None,
                      device="cpu", dtype=None):  # fmt: skip
    """A :class:`reneg.backends.chroma.ChromaBackend` from the files a ComfyUI Chroma user holds: the
    transformer (``path``), ``t5xxl`` (``text_encoders``), ``ae`` (``vae``) and T5's tokenizer
    (``tokenizer``; ComfyUI's own when the files sit in a ComfyUI folder). The transformer is converted with
    the mapping of diffusers' ``convert_chroma_transformer_checkpoint_to_diffusers``
    (:func:`reneg.backends.single_file.flux.bfl_to_diffusers`); the T5 and the ae are read as for Flux.1."""
    import torch
    from diffusers import ChromaTransformer2DModel

    from ..chroma import SCHEDULER, ChromaBackend, check_parts
    from ..diffusers_backend import ModelLoadError
    from ..parts import load_t5_tokenizer
    from .build import _empty_weights, _fill, build_vae, load_vae, transformer_file_parts
    from .flux import _ae_config, _t5, bfl_config, bfl_to_diffusers, flux_part, require_t5_tokenizer
    from .read import open_checkpoint

    dtype = dtype or torch.float32
    ck = open_checkpoint(path)
    part = chroma_part(ck)
    if part is None or part.kind != "transformer" or part.family != "chroma":
        raise ModelLoadError(f"{path}: {part.architecture if part else 'not a Chroma transformer'}; "
                             "give the Chroma transformer file as --model")  # fmt: skip
    keys = list(ck.keys())
    pre = next(p for p in TRANSFORMER_PREFIXES if any(k.startswith(p + "distilled_guidance_layer.") for k in keys))

    def check(tck):
        tpart = flux_part(tck)
        return (
            None
            if tpart is not None and tpart.part == "t5xxl"
            else (tpart.description if tpart else "not T5-XXL (t5xxl)")
        )

    t5 = transformer_file_parts(path, text_encoders, vae, "Chroma", check, "t5xxl only", "t5xxl",
                                "t5xxl_fp16.safetensors", "autoencoder", "ae.safetensors")  # fmt: skip
    tok_dir = require_t5_tokenizer(path, text_encoders, tokenizer, "a ChromaPipeline folder's tokenizer/")
    try:
        cfg = bfl_config(ck, pre)
        approx_hidden, approx_in = (int(x) for x in ck.shapes[pre + "distilled_guidance_layer.in_proj.weight"])
        cfg.update(
            approximator_num_channels=approx_in,
            approximator_hidden_dim=approx_hidden,
            approximator_layers=_count(keys, pre + "distilled_guidance_layer.layers."),
        )
        hidden = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        sd = bfl_to_diffusers({k[len(pre) :]: v for k, v in ck.subset(pre, dtype).items()}, hidden)
        with _empty_weights():
            transformer = ChromaTransformer2DModel.from_config(cfg)
        transformer = _fill(transformer, sd, path, "Chroma transformer")
        text_encoder = _t5(t5, "", dtype)
        if os.path.isdir(vae):
            ae = load_vae(vae, dtype)
        else:
            ack = open_checkpoint(vae)
            apart = flux_part(ack)
            if apart is None or apart.part != "ae":
                raise ModelLoadError(f"--vae {vae}: not the 16-channel autoencoder (ae) Chroma reads")
            ae = build_vae(ack, _ae_config(ack, ""), dtype, source=f"--vae {vae}")
    except KeyError as e:
        raise ModelLoadError(
            f"{path}: a Chroma part lacks the tensor {e.args[0]} (a damaged or cut-down file)"
        ) from None
    check_parts(transformer, ae, text_encoder, path)
    for m in (transformer, ae, text_encoder):
        m.requires_grad_(False).eval()
    backend = ChromaBackend(transformer, ae, text_encoder, load_t5_tokenizer(tok_dir), dict(SCHEDULER), "chroma",
                            path, torch.device(device), dtype)  # fmt: skip
    backend.model_info = {
        "source": path,
        "kind": "single files (ComfyUI)",
        "family": "chroma",
        "text_encoders": [t5.path],
        "vae": vae,
        "tokenizer": tok_dir,
    }
    return backend.to(device)

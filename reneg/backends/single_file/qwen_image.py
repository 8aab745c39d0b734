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
(:mod:`reneg.backends.qwen_image`) or from these files together (:func:`load_qwen_image_files`: the
transformer as ``--model`` with ``--text-encoder`` and ``--vae``; Qwen2.5's tokenizer is ComfyUI's own,
``comfy/text_encoders/qwen25_tokenizer/``, found beside the files, or ``--tokenizer``; the scheduler the
release's). ``reneg inspect`` describes each file; the text encoder or the VAE given alone as ``--model`` is
refused with a message that says what to pass.
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
    "text_encoder/, tokenizer/, vae/, scheduler/), or from these files together: the transformer as --model, "
    "--text-encoder qwen_2.5_vl_7b, --vae qwen_image_vae (Qwen2.5's tokenizer: ComfyUI's own when the files "
    "are inside a ComfyUI folder, else --tokenizer FOLDER); in ComfyUI the ReNeg nodes work with the model "
    "ComfyUI loads from these files"
)
HEAD = 128  # Qwen2.5's attention heads and Qwen-Image's: every release's
COMFY_TOKENIZER = os.path.join("comfy", "text_encoders", "qwen25_tokenizer")


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
            "Wan 2.1's own VAE file (wan_2.1_vae, also Wan 2.2 A14B's) has the same keys and shapes: for Wan, "
            "pass it as --vae beside a Wan transformer file (--model) and umt5_xxl (--text-encoder)"
        )
        return "vae", "the Qwen-Image VAE (Wan 2.1's architecture; Wan 2.1's own VAE file is the same)", details
    return None


def qwen_image_part(ck: Checkpoint) -> QwenImagePart | None:
    """What Qwen-Image part ``ck`` is, or None when it is none of them."""
    found = _part(ck)
    if found is None:
        return None
    part, description, details = found
    size = os.path.getsize(ck.path) if os.path.isfile(ck.path) else 0
    return QwenImagePart(ck.path, part, description, details, _numbers(ck), size)


# --- loading the three files together ---------------------------------------------------------------


def transformer_config(ck: Checkpoint, prefix: str) -> dict:
    """diffusers' ``QwenImageTransformer2DModel`` configuration from the file's shapes (the release: 60 blocks
    3072 wide, 24 heads of 128, 64 packed input channels, 16 out, text rows 3584 wide, rotary axes 16/56/56)."""
    from ..diffusers_backend import ModelLoadError

    inner, packed = (int(x) for x in ck.shapes[prefix + "img_in.weight"])
    head = int(ck.shapes[prefix + "transformer_blocks.0.attn.norm_q.weight"][0])
    if head != HEAD:
        raise ModelLoadError(f"{ck.path}: attention heads of {head}; Qwen-Image's are {HEAD} (rotary axes 16/56/56)")
    out = int(ck.shapes[prefix + "proj_out.weight"][0]) // 4
    return {
        "patch_size": 2,
        "in_channels": packed,
        "out_channels": out,
        "num_layers": _layers(ck, prefix + "transformer_blocks."),
        "attention_head_dim": head,
        "num_attention_heads": inner // head,
        "joint_attention_dim": int(ck.shapes[prefix + "txt_in.weight"][1]),
        "guidance_embeds": any(k.startswith(prefix + "time_text_embed.guidance_embedder.") for k in ck.keys()),
        "axes_dims_rope": (16, 56, 56),
    }


def _text_encoder(ck: Checkpoint, dtype):
    """Qwen2.5-VL's language model (``Qwen2_5_VLTextModel``) from ComfyUI's file (``model.*``; the vision tower,
    ``visual.*``, and any ``lm_head`` are not read: a text-to-image prompt never reaches them). Its
    configuration from the shapes, with Qwen2.5-VL-7B's fixed parts: heads of 128, RMS norm eps 1e-6, rotary
    base 1e6 in the multimodal sections 16/24/24."""
    from transformers import Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    from .build import _empty_weights, _fill

    vocab, width = (int(x) for x in ck.shapes["model.embed_tokens.weight"])
    config = Qwen2_5_VLTextConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=int(ck.shapes["model.layers.0.mlp.gate_proj.weight"][0]),
        num_hidden_layers=_layers(ck, "model.layers."),
        num_attention_heads=width // HEAD,
        num_key_value_heads=int(ck.shapes[TE_KEY][0]) // HEAD,
        max_position_embeddings=128000,
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0, mrope_section=[16, 24, 24]),
    )
    with _empty_weights():
        model = Qwen2_5_VLTextModel(config)
    sd = {k[len("model.") :]: v for k, v in ck.subset("model.", dtype).items()}
    return _fill(model, sd, ck.path, "Qwen2.5-VL text encoder")


def _vae(path: str, dtype):
    from diffusers import AutoencoderKLQwenImage

    from ..diffusers_backend import ModelLoadError
    from .build import _empty_weights, _fill
    from .read import open_checkpoint
    from .wan_vae import wan21_vae_config, wan21_vae_to_diffusers

    if os.path.isdir(path):  # a QwenImagePipeline folder's vae/
        try:
            return AutoencoderKLQwenImage.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ModelLoadError(
                f"--vae {path}: not a diffusers AutoencoderKLQwenImage folder: {str(e)[:300]}"
            ) from None
    ck = open_checkpoint(path)
    part = qwen_image_part(ck)
    if part is None or part.part != "vae":
        what = part.description if part else "not a VAE in the Wan 2.1 layout Qwen-Image's has"
        raise ModelLoadError(f"--vae {path}: {what}; Qwen-Image reads qwen_image_vae.safetensors")
    with _empty_weights():
        vae = AutoencoderKLQwenImage(**wan21_vae_config(ck, f"--vae {path}"))
    return _fill(vae, wan21_vae_to_diffusers(ck.subset("", dtype)), f"--vae {path}", "VAE")


def load_qwen_image_files(path: str, text_encoders=(), vae: str | None = None, tokenizer: str | None = None,
                          device="cpu", dtype=None):  # fmt: skip
    """A :class:`reneg.backends.qwen_image.QwenImageBackend` from the files a ComfyUI Qwen-Image user holds:
    the transformer (``path``; diffusers' names, under no prefix or ComfyUI's), Qwen2.5-VL-7B
    (``text_encoders``), the VAE (``vae``: the Wan 2.1 layout, or a diffusers VAE folder) and Qwen2.5's
    tokenizer (``tokenizer``; ComfyUI's own when the files sit in a ComfyUI folder). The parts are checked
    against each other as a folder's are (:func:`reneg.backends.qwen_image.build_backend`)."""
    import torch
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2Tokenizer

    from ..diffusers_backend import ModelLoadError
    from ..qwen_image import FAMILY, SCHEDULER, build_backend
    from .build import _empty_weights, _fill, transformer_file_parts
    from .flux import find_in_comfyui
    from .read import open_checkpoint

    dtype = dtype or torch.float32
    ck = open_checkpoint(path)
    part = qwen_image_part(ck)
    if part is None or part.part != "transformer":
        what = part.description if part else "not a Qwen-Image transformer"
        raise ModelLoadError(f"{path}: {what}; give the Qwen-Image transformer file as --model")
    pre = next(p for p in TRANSFORMER_PREFIXES if f"{p}txt_norm.weight" in ck)

    def check(tck):
        tpart = qwen_image_part(tck)
        ok = tpart is not None and tpart.part == "text_encoder"
        return None if ok else (tpart.description if tpart else "not Qwen2.5-VL-7B")

    te_ck = transformer_file_parts(path, text_encoders, vae, "Qwen-Image", check, "Qwen2.5-VL-7B (qwen_2.5_vl_7b)",
                                   "Qwen2.5-VL-7B", "qwen_2.5_vl_7b.safetensors", "VAE", "qwen_image_vae.safetensors")  # fmt: skip
    tok_dir = tokenizer or find_in_comfyui(COMFY_TOKENIZER, path, *text_encoders)
    if not tok_dir:
        raise ModelLoadError(
            f"{path}: Qwen2.5's tokenizer is not in these files; pass --tokenizer FOLDER (ComfyUI's "
            f"{COMFY_TOKENIZER}/, or a QwenImagePipeline folder's tokenizer/), found by itself when the files "
            "sit inside a ComfyUI folder"
        )
    try:
        tok = Qwen2Tokenizer.from_pretrained(tok_dir, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(
            f"--tokenizer {tok_dir}: not Qwen2.5's tokenizer (vocab.json, merges.txt): {str(e)[:300]}"
        ) from None
    try:
        cfg = transformer_config(ck, pre)
        with _empty_weights():
            transformer = QwenImageTransformer2DModel.from_config(cfg)
        transformer = _fill(transformer, {k[len(pre) :]: v for k, v in ck.subset(pre, dtype).items()}, path,
                            "Qwen-Image transformer")  # fmt: skip
        text_encoder = _text_encoder(te_ck, dtype)
    except KeyError as e:  # a tensor the shapes are read from is not there: the file is not what it says
        raise ModelLoadError(
            f"{path}: a Qwen-Image part lacks the tensor {e.args[0]} (a damaged or cut-down file)"
        ) from None
    info = {
        "source": path,
        "kind": "single files (ComfyUI)",
        "family": FAMILY,
        "text_encoders": [te_ck.path],
        "vae": vae,
        "tokenizer": tok_dir,
    }
    return build_backend(transformer, _vae(vae, dtype), text_encoder, tok, SCHEDULER, path, device, dtype, info)

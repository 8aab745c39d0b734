"""Loading a user's model files into a :class:`DiffusersBackend`, locally.

``load_diffusers(path)`` takes a diffusers folder (``model_index.json`` with
``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``, ``scheduler/``, and for
SDXL also ``text_encoder_2/`` and ``tokenizer_2/``) or a single-file checkpoint
as the UIs keep them (``.safetensors``; ``.ckpt``/``.pt`` through
``weights_only=True``), which :mod:`reneg.backends.single_file` recognises from its
own keys and shapes. Nothing is ever downloaded.

The family a model belongs to (which embeddings fit it) comes from the family
table in :mod:`reneg.families`: the hidden sizes of its text encoders, the UNet's
cross-attention width and, for two-encoder models, the pooled vector's size.

Folder kinds are rows of ``FOLDER_KINDS``: a new architecture adds a row (a test on
the folder's ``model_index.json`` and a loader) without touching the others.
"""

from __future__ import annotations

import json
import os
from typing import Callable, NamedTuple

import torch

from ..families import FAMILIES, family_for_encoders
from .diffusers_backend import DiffusersBackend, ModelLoadError


def load_diffusers(
    path: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: str | None = None,
    vae: str | None = None,
    prediction_type: str | None = None,
) -> DiffusersBackend:
    """Load SD1.x / SD2.x / SDXL from a diffusers folder or a single-file checkpoint, locally.

    ``config``: optional diffusers folder whose configs replace the built-in ones for a single
    file; ``vae``: a VAE file or folder replacing the model's own; ``prediction_type``: ``eps``
    or ``v`` instead of what the files say."""
    path = os.fspath(path)
    if os.path.isdir(path):
        backend = _load_folder(path, device, dtype, vae)
    elif os.path.isfile(path):
        from .single_file import load_single_file

        backend = load_single_file(path, device, dtype, config=config, vae=vae, prediction_type=prediction_type)
        return backend
    else:
        raise ModelLoadError(
            f"{path}: no such model folder or file (give a local diffusers folder "
            f"with model_index.json, or a .safetensors checkpoint)"
        )
    if prediction_type:
        backend.set_prediction_type(normalize_prediction_type(prediction_type), "--prediction-type")
    return backend


def normalize_prediction_type(value: str) -> str:
    """``eps``/``epsilon`` -> ``epsilon``, ``v``/``v_prediction`` -> ``v_prediction``."""
    v = str(value).strip().lower()
    if v in ("eps", "epsilon"):
        return "epsilon"
    if v in ("v", "v_prediction", "v-prediction", "vpred", "v_pred"):
        return "v_prediction"
    raise ModelLoadError(f"--prediction-type {value}: expected eps or v")


def read_json(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ModelLoadError(f"{path}: not a readable JSON config ({e})") from None


# --- families ------------------------------------------------------------------------------


def _first(v):
    return v[0] if isinstance(v, (list, tuple)) else v


def family_of(text_encoders: list, unet, source: str) -> str:
    """The family (a row of :data:`reneg.families.FAMILIES`) of a UNet and its text encoders,
    or a one-line :class:`ModelLoadError` saying what does not fit."""
    xattn = int(_first(unet.config.cross_attention_dim))
    text_time = getattr(unet.config, "addition_embed_type", None) == "text_time"
    widths = tuple(int(getattr(te.config, "hidden_size", 0)) for te in text_encoders)
    multi = [f for f in FAMILIES.values() if len(f.encoders) > 1]
    if len(widths) == 1:
        if text_time:
            two = next((f for f in multi if f.pooled), None)
            raise ModelLoadError(
                f"{source}: the UNet reads a pooled vector and size conditioning"
                f"{f' ({two.name.upper()})' if two else ''}, but there is no text_encoder_2/ "
                f"(an SDXL folder has text_encoder/, text_encoder_2/, tokenizer/ and tokenizer_2/)"
            )
        if widths[0] != xattn:
            raise ModelLoadError(
                f"{source}: text encoder hidden size {widths[0]} does not match the UNet's cross_attention_dim {xattn}"
            )
        fam = family_for_encoders(widths)
        if fam is None:
            known = ", ".join(f"{f.description} ({f.encoders[0]})" for f in FAMILIES.values() if len(f.encoders) == 1)
            raise ModelLoadError(f"{source}: text encoder hidden size {widths[0]} is not one of {known}")
        return fam.name
    if not text_time:
        raise ModelLoadError(
            f"{source}: has text_encoder_2/ but its UNet does not read SDXL's pooled vector "
            f"and size conditioning (addition_embed_type is "
            f"{getattr(unet.config, 'addition_embed_type', None)!r}, expected 'text_time')"
        )
    if sum(widths) != xattn:
        raise ModelLoadError(
            f"{source}: the two text encoders' hidden sizes {' + '.join(map(str, widths))} do not "
            f"add up to the UNet's cross_attention_dim {xattn}"
        )
    pooled = int(getattr(text_encoders[-1].config, "projection_dim", 0))
    add = getattr(getattr(unet, "add_embedding", None), "linear_1", None)
    want = pooled + 6 * int(getattr(unet.config, "addition_time_embed_dim", 0) or 0)
    if add is not None and add.in_features != want:
        raise ModelLoadError(
            f"{source}: the UNet's added embedding reads {add.in_features} numbers, but the "
            f"pooled vector ({pooled}) and six size numbers give {want} (an SDXL refiner, "
            f"which reads an aesthetic score, is not supported)"
        )
    fam = family_for_encoders(widths)
    if fam is None or fam.hidden != xattn or fam.pooled != pooled:
        known = ", ".join(f"{f.description} ({' + '.join(map(str, f.encoders))}, pooled {f.pooled})" for f in multi)
        raise ModelLoadError(
            f"{source}: a two-encoder model with cross_attention_dim {xattn} and a pooled "
            f"vector of {pooled} is not {known or 'a known family'}"
        )
    return fam.name


def assemble(
    unet, vae, text_encoder, tokenizer, sched: dict, source: str, device, dtype, text_encoder_2=None, tokenizer_2=None
) -> DiffusersBackend:
    """Check the parts fit one family, freeze them and wrap them in a backend on ``device``."""
    family = family_of([t for t in (text_encoder, text_encoder_2) if t is not None], unet, source)
    for m in (unet, vae, text_encoder, text_encoder_2):
        if m is not None:
            m.requires_grad_(False).eval()
    if dtype == torch.float16 and getattr(vae.config, "force_upcast", False):
        vae.to(torch.float32)  # SDXL's VAE overflows in float16, as diffusers' pipeline knows
    backend = DiffusersBackend(
        unet,
        vae,
        text_encoder,
        tokenizer,
        dict(sched),
        family,
        source,
        torch.device(device),
        dtype,
        text_encoder_2,
        tokenizer_2,
    )
    return backend.to(device)


# --- VAE override ------------------------------------------------------------------------------


def load_vae(path: str, dtype: torch.dtype, vae_config: dict | None = None):
    """``--vae``: a diffusers AutoencoderKL folder (or a pipeline folder with ``vae/``), or a VAE file
    (``.safetensors``; ``.ckpt``/``.pt`` through ``weights_only=True``) in the original or the diffusers
    layout; ``vae_config`` is the architecture's VAE config a file is built with."""
    from diffusers import AutoencoderKL

    path = os.fspath(path)
    if os.path.isdir(path):
        sub = "vae" if os.path.isfile(os.path.join(path, "vae", "config.json")) else None
        if not os.path.isfile(os.path.join(path, sub or "", "config.json")):
            raise ModelLoadError(f"--vae {path}: not a diffusers VAE folder (no config.json, and no vae/config.json)")
        try:
            return AutoencoderKL.from_pretrained(path, subfolder=sub, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, EnvironmentError) as e:
            raise ModelLoadError(f"--vae {path}: could not load the VAE: {str(e)[:300]}") from None
    if not os.path.isfile(path):
        raise ModelLoadError(f"--vae {path}: no such file or folder")
    from .single_file import build_vae, open_checkpoint

    ckpt = open_checkpoint(path)
    return build_vae(ckpt, vae_config, dtype, source=f"--vae {path}")


# --- folders -----------------------------------------------------------------------------------


class FolderKind(NamedTuple):
    name: str
    matches: Callable[[str, dict], bool]  # (folder, model_index) -> is this kind
    load: Callable  # (folder, device, dtype, vae) -> backend


def is_sdxl_folder(path: str, index: dict | None = None) -> bool:
    """A two-encoder (SDXL) folder: its model_index.json (read here unless given) or its folders say so."""
    if index is None:
        p = os.path.join(path, "model_index.json")
        index = read_json(p) if os.path.isfile(p) else {}
    return "text_encoder_2" in index or os.path.isdir(os.path.join(path, "text_encoder_2"))


def _load_sd_folder(path: str, device, dtype, vae_path: str | None = None) -> DiffusersBackend:
    sdxl = is_sdxl_folder(path)
    need = [
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer",
        "scheduler/scheduler_config.json",
    ]
    if sdxl:
        need += ["text_encoder_2/config.json", "tokenizer_2"]
    if vae_path:
        need.remove("vae/config.json")
    missing = [n for n in need if not os.path.exists(os.path.join(path, n))]
    if missing:
        kind = "Stable Diffusion XL" if sdxl else "Stable Diffusion"
        raise ModelLoadError(f"{path}: not a complete diffusers {kind} folder; missing {', '.join(missing)}")
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = dict(local_files_only=True, torch_dtype=dtype)
    te2 = tok2 = None
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **kw)
        tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", local_files_only=True)
        if sdxl:
            te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **kw)
            tok2 = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", local_files_only=True)
        vae = None if vae_path else AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"{path}: could not load the model: {str(e)[:400]}") from None
    if vae_path:
        own = os.path.join(path, "vae", "config.json")
        vae = load_vae(vae_path, dtype, read_json(own) if os.path.isfile(own) else None)
    sched = read_json(os.path.join(path, "scheduler", "scheduler_config.json"))
    backend = assemble(unet, vae, text_encoder, tokenizer, sched, path, device, dtype, te2, tok2)
    backend.model_info = {
        "source": path,
        "kind": "diffusers folder",
        "family": backend.family,
        "prediction_type": backend.prediction_type,
        "prediction_reason": "scheduler/scheduler_config.json",
        "vae": vae_path or "inside",
    }
    return backend


def _is_pixart(path: str, index: dict) -> bool:
    from .pixart import pixart_family  # imported when a folder is looked at, not with this module

    return pixart_family(index) is not None


def _load_pixart(path: str, device, dtype, vae: str | None = None) -> DiffusersBackend:
    from .pixart import load_folder  # PixArt-alpha / -sigma: T5 with its attention mask, a transformer

    if vae:
        raise ModelLoadError(f"{path}: --vae is for Stable Diffusion checkpoints; a PixArt folder uses its own vae/")
    return load_folder(path, device, dtype)


FOLDER_KINDS: list[FolderKind] = [
    FolderKind("pixart", _is_pixart, _load_pixart),
    FolderKind("stable-diffusion", lambda path, index: os.path.isdir(os.path.join(path, "unet")), _load_sd_folder),
]


def _load_folder(path: str, device, dtype, vae: str | None = None) -> DiffusersBackend:
    p = os.path.join(path, "model_index.json")
    index = read_json(p) if os.path.isfile(p) else {}
    for kind in FOLDER_KINDS:
        if kind.matches(path, index):
            return kind.load(path, device, dtype, vae)
    return _load_sd_folder(path, device, dtype, vae)  # says which parts are missing

"""What every loader shares: reading a folder's JSON configs, the prediction type's spelling,
recognising a model's family from its text encoders and UNet (by the family table), and
assembling a :class:`DiffusersBackend` from loaded modules. The loaders
(:mod:`reneg.backends.loading` for folders, :mod:`reneg.backends.single_file` for one
checkpoint file, and the transformer families' modules) import from here, never from each other's
internals: a folder's parts checked and loaded (:func:`require_parts`, :func:`load_parts`), a T5
tokenizer read with a clear error (:func:`load_t5_tokenizer`)."""

from __future__ import annotations

import json
import os

import torch

from ..families import FAMILIES, family_for_encoders
from .diffusers_backend import DiffusersBackend, ModelLoadError


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


# what a diffusers folder of a one-text-encoder transformer pipeline holds (PixArt, Chroma, Qwen-Image, Wan)
T5_FOLDER_PARTS = [
    "transformer/config.json",
    "vae/config.json",
    "text_encoder/config.json",
    "tokenizer",
    "scheduler/scheduler_config.json",
]


def require_parts(path: str, pipeline: str, need: list[str]) -> None:
    """A diffusers folder must hold every part its pipeline loads: one error that names the folder, the
    pipeline and what is missing."""
    missing = [n for n in need if not os.path.exists(os.path.join(path, n))]
    if missing:
        raise ModelLoadError(f"{path}: not a complete diffusers {pipeline} folder; missing {', '.join(missing)}")


def load_parts(path: str, dtype: torch.dtype, parts: dict) -> dict:
    """``{subfolder: model class}`` loaded with ``from_pretrained`` from local files only, in ``dtype``;
    whatever fails is one :class:`ModelLoadError` naming the folder."""
    kw = dict(local_files_only=True, torch_dtype=dtype)
    try:
        return {sub: cls.from_pretrained(path, subfolder=sub, **kw) for sub, cls in parts.items()}
    except (OSError, ValueError, EnvironmentError) as e:
        raise ModelLoadError(f"{path}: could not load the model: {str(e)[:400]}") from None


SENTENCEPIECE_PACKAGES = {"sentencepiece": "sentencepiece", "google.protobuf": "protobuf"}


def _not_installed(modules: dict[str, str]) -> list[str]:
    import importlib.util

    missing = []
    for module, package in modules.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(package)
    return missing


def load_t5_tokenizer(folder: str, auto_tokenizer=None):
    """The T5 tokenizer of a PixArt folder, as ``AutoTokenizer`` reads it; where it cannot be read, a
    :class:`ModelLoadError` that names the files found and the package that reads them (transformers'
    own message for a ``spiece.model`` without ``sentencepiece`` asks for ``tiktoken``)."""
    if auto_tokenizer is None:
        from transformers import AutoTokenizer as auto_tokenizer
    try:
        files = sorted(os.listdir(folder))
    except OSError as e:
        raise ModelLoadError(f"{folder}: cannot list the tokenizer folder ({e.strerror or e})") from None
    found = ", ".join(files) if files else "nothing"
    spm = [f for f in files if f.endswith(".model")]
    if "tokenizer.json" not in files and spm:
        missing = _not_installed(SENTENCEPIECE_PACKAGES)
        if missing:
            raise ModelLoadError(
                f"{folder}: the tokenizer is a SentencePiece model (found {found}; no tokenizer.json), which "
                f"transformers reads with the sentencepiece and protobuf packages; not installed: "
                f"{', '.join(missing)}. Install them with `pip install sentencepiece protobuf` (reneg's train, "
                "eval and studio extras bring them), or give the folder a tokenizer.json"
            )
    try:
        return auto_tokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises many kinds here; the user needs the files and the reader
        if "tokenizer.json" in files:
            reader = "tokenizer.json is read by the tokenizers package"
        elif spm:
            reader = f"{spm[0]} is read by the sentencepiece and protobuf packages"
        else:
            reader = "expected tokenizer.json, or spiece.model with tokenizer_config.json"
        raise ModelLoadError(
            f"{folder}: could not read the tokenizer (found {found}; {reader}): {str(e)[:300]}"
        ) from None


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


def is_sdxl_folder(path: str, index: dict | None = None) -> bool:
    """A two-encoder (SDXL) folder: its model_index.json (read here unless given) or its folders say so."""
    if index is None:
        p = os.path.join(path, "model_index.json")
        index = read_json(p) if os.path.isfile(p) else {}
    return "text_encoder_2" in index or os.path.isdir(os.path.join(path, "text_encoder_2"))

"""Single-file checkpoints as the UIs keep them: recognise, describe, load. Nothing is downloaded.

Three steps, one module each: :mod:`.read` (the file's keys, shapes and dtypes, its tensors one at a
time), :mod:`.detect` (which family and variant it is, or a one-line refusal, from keys and shapes
alone, with the family table's ``checkpoint_encoders``, ``native_resolution`` and ``v_from_norm_std``
where families differ) and :mod:`.build` (the diffusers modules and the backend, from the built-in
configurations of :mod:`reneg.backends.configs` and diffusers' own single-file conversion functions).
"""

from __future__ import annotations

from .build import build_parts, build_text_encoder, build_unet, build_vae, load_single_file, load_vae
from .detect import ADM, IN_CONV, SD2_V_KEY, SD2_V_STD, CheckpointInfo, classify, describe, inspect_checkpoint
from .read import (
    CHECKPOINT_SUFFIXES,
    SD1_TE,
    SD2_TE,
    UNET,
    VAE,
    XL_REFINER_TE,
    XL_TE1,
    XL_TE2,
    Checkpoint,
    file_sha256,
    looks_like_checkpoint,
    open_checkpoint,
)

__all__ = [
    "ADM",
    "CHECKPOINT_SUFFIXES",
    "IN_CONV",
    "SD1_TE",
    "SD2_TE",
    "SD2_V_KEY",
    "SD2_V_STD",
    "UNET",
    "VAE",
    "XL_REFINER_TE",
    "XL_TE1",
    "XL_TE2",
    "Checkpoint",
    "CheckpointInfo",
    "build_parts",
    "build_text_encoder",
    "build_unet",
    "build_vae",
    "classify",
    "describe",
    "file_sha256",
    "inspect_checkpoint",
    "load_single_file",
    "load_vae",
    "looks_like_checkpoint",
    "open_checkpoint",
]

"""Reading a single-file checkpoint: its keys, shapes and dtypes, and its tensors one at a time.

A ``.safetensors`` file is described by its header alone (checked by
:func:`reneg.fileio.read_safetensors_header`, whose table also gives each tensor's dtype); a
``.ckpt``/``.pt`` pickle is opened memory-mapped with ``weights_only=True``. The key prefixes of the
original (LDM) layout are here; each family's text-encoder prefixes are rows of
:data:`reneg.families.FAMILIES` (``checkpoint_encoders``).
"""

from __future__ import annotations

import hashlib
import os
import struct

import torch

from ...families import FAMILIES
from ...fileio import SAFETENSORS_DTYPES, read_safetensors_header, safe_torch_load
from ..diffusers_backend import ModelLoadError

# The original (LDM) layout: the UNet under model.diffusion_model., the VAE under first_stage_model.,
# the text encoders under cond_stage_model.transformer. (SD1.x: CLIP ViT-L/14 in the transformers
# layout), cond_stage_model.model. (SD2.x: OpenCLIP ViT-H/14 in the open_clip layout) or
# conditioner.embedders.0.transformer. + conditioner.embedders.1.model. (SDXL: CLIP-L and OpenCLIP
# ViT-bigG/14).
UNET = "model.diffusion_model."
VAE = "first_stage_model."
# the text encoders' prefixes, as the family table gives them
(SD1_TE,) = (p for p, _ in FAMILIES["sd1"].checkpoint_encoders)  # cond_stage_model.transformer.
(SD2_TE,) = (p for p, _ in FAMILIES["sd2"].checkpoint_encoders)  # cond_stage_model.model.
XL_TE1, XL_TE2 = (p for p, _ in FAMILIES["sdxl"].checkpoint_encoders)  # conditioner.embedders.{0.transformer,1.model}.
XL_REFINER_TE = "conditioner.embedders.0.model."

CHECKPOINT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
SCALE_SUFFIXES = (".scale_weight", ".scale_input")  # ComfyUI's scaled fp8: beside a float8 weight


class Checkpoint:
    """The keys, shapes and dtypes of a checkpoint, and a reader for one tensor at a time.

    ``shapes``/``dtypes`` come from the safetensors header (or a memory-mapped pickle); tensors
    are read only when a loader asks for them. ``meta=True`` gives shape-only tensors on the
    meta device, so the whole loading path runs on a header without reading any data."""

    def __init__(
        self,
        path: str,
        shapes: dict,
        dtypes: dict,
        metadata: dict | None = None,
        reader=None,
        kind: str = "safetensors",
    ):
        self.path, self.shapes, self.dtypes = path, shapes, dtypes
        self.metadata = dict(metadata or {})
        self.kind = kind
        self._reader = reader

    def __contains__(self, key) -> bool:
        return key in self.shapes

    def keys(self):
        return self.shapes.keys()

    def tensor(self, key: str) -> torch.Tensor:
        if self._reader is None:
            return torch.empty(self.shapes[key], dtype=self.dtypes[key], device="meta")
        return self._reader(key)

    def subset(self, prefix: str, dtype: torch.dtype | None = None) -> dict:
        """Every tensor under ``prefix`` (names kept), floats cast to ``dtype`` one at a time.

        ComfyUI's ``scaled_fp8`` files (``t5xxl_fp8_e4m3fn_scaled``, ``umt5_xxl_fp8_e4m3fn_scaled``, the fp8
        transformers) keep each linear weight in float8 with a ``scale_weight`` beside it; ComfyUI computes with
        ``weight * scale_weight`` (``comfy/ops.py``), which is what is read here for that weight (the product
        in float32, then ``dtype``). The scales, ``scale_input`` and the ``scaled_fp8`` marker are left out."""
        out = {}
        for k in self.shapes:
            if not k.startswith(prefix) or k.endswith(SCALE_SUFFIXES) or k == prefix + "scaled_fp8":
                continue
            t = self.tensor(k)
            scale = k[: -len("weight")] + "scale_weight" if k.endswith("weight") else None
            if scale is not None and scale in self.shapes:
                t = t.to(torch.float32) * self.tensor(scale).to(torch.float32)  # cast to dtype below
            out[k] = t.to(dtype) if dtype is not None and t.is_floating_point() else t
        return out

    @classmethod
    def from_header(cls, path: str, header: dict, meta: bool = True) -> "Checkpoint":
        shapes, dtypes = {}, {}
        for k, v in header.items():
            if k == "__metadata__":
                continue
            shapes[k] = tuple(v["shape"])
            dtypes[k] = _torch_dtype(v["dtype"])
        return cls(path, shapes, dtypes, header.get("__metadata__") or {}, None if meta else _st_reader(path))


def _st_reader(path: str):
    from safetensors import safe_open

    handle = {}

    def read(key: str) -> torch.Tensor:
        if "f" not in handle:
            handle["f"] = safe_open(path, framework="pt", device="cpu")
        return handle["f"].get_tensor(key)

    return read


def _torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype name (float32 for one this torch lacks)."""
    entry = SAFETENSORS_DTYPES.get(name)
    return getattr(torch, entry[1], torch.float32) if entry else torch.float32


def _safetensors_header(path: str) -> dict:
    """The checked header, with a truncated file named as such (its header promises more bytes than are there)."""
    try:
        return read_safetensors_header(path, name_truncation=True)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None


def open_checkpoint(path: str, meta: bool = False) -> Checkpoint:
    """Keys, shapes and dtypes of a ``.safetensors`` file from its header (no tensor read), or of a
    ``.ckpt``/``.pt`` pickle loaded memory-mapped with ``weights_only=True``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ModelLoadError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(8)
    pickle = magic[:4] == b"PK\x03\x04" or magic[:1] == b"\x80"
    if not pickle:
        if not path.lower().endswith(".safetensors") and len(magic) == 8:
            (n,) = struct.unpack("<Q", magic)
            if n > os.path.getsize(path):
                raise ModelLoadError(
                    f"{path}: not a checkpoint: expected a .safetensors file or a .ckpt/.pt pickle (zip) file"
                )
        return Checkpoint.from_header(path, _safetensors_header(path), meta=meta)
    obj = _load_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise ModelLoadError(
            f"{path}: expected a checkpoint (a dict of tensors, or one under 'state_dict'), found {type(obj).__name__}"
        )
    tensors = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    ck = Checkpoint(
        path,
        {k: tuple(v.shape) for k, v in tensors.items()},
        {k: v.dtype for k, v in tensors.items()},
        {},
        None if meta else tensors.__getitem__,
        "pickle",
    )
    return ck


def _load_pickle(path: str):
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - the plain loader below says what is wrong, naming the file
        pass
    try:
        return safe_torch_load(path, what="checkpoint")
    except (ValueError, OSError) as e:
        raise ModelLoadError(str(e)) from None


def key_examples(keys, n=2) -> str:
    """A few of ``keys`` for a message: ``'a', 'b', ...``."""
    keys = sorted(keys)
    return ", ".join(repr(k) for k in keys[:n]) + (", ..." if len(keys) > n else "")


def looks_like_checkpoint(path: str) -> bool:
    """A file with a UNet, text encoder or VAE prefix in it, or too large to be an embedding."""
    try:
        ck = open_checkpoint(path, meta=True)
    except ModelLoadError:
        return os.path.getsize(path) > 512 * 1024 * 1024
    prefixes = (UNET, VAE, "cond_stage_model.", "conditioner.", "lora_", "double_blocks.", "joint_blocks.")
    # a text encoder or an autoencoder on its own (ComfyUI's clip_l, t5xxl and ae files)
    prefixes += ("text_model.encoder.", "encoder.block.", "encoder.down.", "decoder.up.")
    prefixes += ("patch_embedding.", "head.modulation")  # a Wan transformer
    return len(ck.shapes) > 16 or any(k.startswith(prefixes) for k in ck.keys())


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of the whole file; its first 10 hex digits are A1111's "model hash" (autov2)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()

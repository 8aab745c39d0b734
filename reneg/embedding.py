"""Negative-embedding files: ReNeg's own format and the formats found in the wild.

Imports only torch and safetensors, so every front-end (the A1111 extension, the
ComfyUI Load node) can use it.

Our format is a ``.safetensors`` file with ``neg_embedding`` ``[1, L, D]`` (and
``pooled`` ``[1, P]`` where the family needs one, and for the T5 families
``attention_mask`` ``[1, L]``: 1 for a row the model reads, 0 for padding) and
string metadata. We also
read the paper's published files (a bare tensor saved with ``torch.save``),
diffusers-style ``negative_prompt_embeds`` tensors or dicts saved with
``torch.save``, and a safetensors file holding a single tensor under any key.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .families import FAMILIES, Family, family_for_shape, get_family, known_hidden_sizes
from .fileio import atomic_save_safetensors, not_a_file, read_safetensors_header, safe_torch_load, walk_folder

FORMAT_VERSION = "1"
MAIN_KEY = "neg_embedding"
POOLED_KEY = "pooled"
MASK_KEY = "attention_mask"
_ALT_MASK = (MASK_KEY, "negative_prompt_attention_mask", "neg_attention_mask", "mask")
KINDS = ("global", "per-sample", "null", "handcrafted")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
SUFFIXES = (".safetensors",) + PICKLE_SUFFIXES
# keys under which other tools store a negative embedding in a dict
_ALT_KEYS = ("neg_embedding", "negative_prompt_embeds", "neg_emb", "embedding", "emb", "uncond", "prompt_embeds")
_ALT_POOLED = ("pooled", "negative_pooled_prompt_embeds", "pooled_prompt_embeds", "pooled_output")
MAX_FILE_BYTES = 512 * 1024 * 1024


try:  # the name of safetensors' error class has varied across releases
    from safetensors import SafetensorError as _SafetensorError
except ImportError:  # pragma: no cover
    _SafetensorError = RuntimeError


class EmbeddingError(ValueError):
    """A negative-embedding file is unreadable or not what it must be."""


# the value types an embedding may hold (float8 and the like are refused by name)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@dataclass
class NegEmbedding:
    """A validated negative embedding.

    ``tensor`` is ``[1, L, D]`` on the CPU in the dtype it was stored in;
    ``pooled`` is ``[1, P]`` or None; ``metadata`` is a dict of strings.
    """

    tensor: torch.Tensor
    family: str
    pooled: torch.Tensor | None = None
    metadata: dict[str, str] = field(default_factory=dict)
    path: str | None = None
    format: str = "reneg"
    attention_mask: torch.Tensor | None = None  # [1, L] of 0/1 (T5 families); None: see mask()

    def mask(self) -> torch.Tensor | None:
        """The attention mask the rows are used with: the stored one, or for a T5 family's file
        without one (the authors' PixArt file) the one :func:`implied_attention_mask` gives."""
        if self.attention_mask is not None:
            return self.attention_mask
        if self.family in FAMILIES and FAMILIES[self.family].masked:
            return implied_attention_mask(self.tensor, FAMILIES[self.family].reads_padding)
        return None

    def model_rows(self) -> torch.Tensor:
        """The rows with the padding the mask marks set to zero. The model ignores those rows, so its
        output is the same; and the rows alone then imply this mask, so code that passes a negative
        as rows only (training from ``--init``, tuning from a file) keeps it."""
        mask = self.mask()
        if mask is None or bool(mask.all()):
            return self.tensor
        return self.tensor * mask[..., None].to(self.tensor.dtype)

    def dtype_problem(self, dtype: torch.dtype) -> str | None:
        """Why this negative can not be used in ``dtype`` (its values overflow it and would become
        inf there), or None. A float32 value of 7e4 is finite, but not once cast to float16."""
        return _overflow(self.tensor, dtype, self.path or "embedding") or (
            _overflow(self.pooled, dtype, self.path or "embedding", "pooled vector")
            if self.pooled is not None
            else None
        )

    def check_dtype(self, dtype: torch.dtype, where: str = "") -> NegEmbedding:
        """Refuse (:class:`EmbeddingError` naming the file) a negative that is not finite in
        ``dtype``, the dtype the model computes in; ``where`` says what decided it (e.g.
        "--mixed-precision fp16"). Returns ``self``."""
        problem = self.dtype_problem(dtype)
        if problem:
            raise EmbeddingError(
                f"{problem}, the dtype the model computes in{f' ({where})' if where else ''}; "
                f"a negative embedding's values are normally well under 100"
            )
        return self

    @property
    def family_spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def name(self) -> str:
        return Path(self.path).stem if self.path else "embedding"

    def info(self) -> dict[str, Any]:
        t = self.tensor.double()  # float32 sums of large values overflow; a JSON report has no Infinity
        out = {
            "path": self.path,
            "format": self.format,
            "family": self.family,
            "shape": list(self.tensor.shape),
            "dtype": str(self.tensor.dtype).replace("torch.", ""),
            "pooled_shape": list(self.pooled.shape) if self.pooled is not None else None,
            # T5 families: how many rows the model reads, and whether the file says so or its rows imply it
            "mask_rows": int(self.mask().sum()) if self.mask() is not None else None,
            "mask_source": None if self.mask() is None else ("file" if self.attention_mask is not None else "implied"),
            # sorted: safetensors writes its metadata map in no fixed order, so each file lists it differently
            "metadata": dict(sorted(self.metadata.items())),
            "stats": {
                k: _finite(v)
                for k, v in (
                    ("mean", t.mean()),
                    ("std", t.std()),
                    ("norm", t.norm()),
                    ("min", t.min()),
                    ("max", t.max()),
                )
            },
        }
        out["max_abs"] = _finite(t.abs().max())
        # the compute dtypes in which the values would overflow to inf (such a negative is refused there)
        out["overflows"] = [
            dtype_name(d) for d in (torch.float16, torch.bfloat16, torch.float32) if self.dtype_problem(d)
        ]
        if self.path and os.path.isfile(self.path):
            out["sha256"] = _sha256(self.path)
        return out


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _overflow(t: torch.Tensor, dtype: torch.dtype, path: str, what: str = "values") -> str | None:
    """A message when ``t``'s finite values become inf in ``dtype`` (None when they fit)."""
    if not t.is_floating_point() or bool(torch.isfinite(t.to(dtype)).all()):
        return None
    big = float(t.double().abs().max())
    return (
        f"{path}: its {what} reach {big:.3g}, beyond {dtype_name(dtype)}'s largest "
        f"{torch.finfo(dtype).max:.6g}, so they would become inf in {dtype_name(dtype)}"
    )


_F32_NOTE = ", and every use converts an embedding to float32 or narrower"


def _finite(v) -> float | None:
    """A statistic as a float, or None where it is not finite (JSON has no NaN or Infinity)."""
    v = float(v)
    return v if v == v and abs(v) != float("inf") else None


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(str(s) for s in t.shape) + "]"


def implied_attention_mask(tensor: torch.Tensor, reads_padding: int = 0) -> torch.Tensor:
    """The attention mask of T5 rows stored without one, ``[1, L]`` (int64).

    When every row after the first is one and the same row, the tensor is (or was trained
    from) the empty prompt's encoding: T5 turns ``""`` into the end token ``</s>`` and
    padding, and since every padding row attends to that one token only, all padding rows
    come out identical. Such a tensor is used with the empty prompt's mask, ``[1, 0, ..., 0]``:
    that is what diffusers' PixArt pipelines make of ``negative_prompt=""``, and training with it
    leaves the padding rows untouched (the authors' PixArt-alpha file has 119 identical rows
    after the first). Otherwise trailing rows that are exactly zero are padding (how ReNeg pads a
    host's unpadded T5 rows, e.g. from ComfyUI, to the family's row count); every other row counts.
    ``reads_padding``: padding rows past the text the family's model reads (Chroma: 1), which the
    empty prompt's mask then covers too.
    """
    t = tensor.reshape(-1, tensor.shape[-1])
    mask = torch.ones(1, t.shape[0], dtype=torch.long)
    if t.shape[0] > 2 + reads_padding and bool((t[1:] == t[1]).all()) and bool(t[1].any()):
        mask[:, 1 + reads_padding :] = 0
        return mask
    nonzero = (t != 0).any(dim=1).nonzero()
    last = int(nonzero[-1]) + 1 if len(nonzero) else 1
    mask[:, last:] = 0
    return mask


def validate_mask(mask: Any, tensor: torch.Tensor, path: str, family: str) -> torch.Tensor | None:
    """Check an attention mask against its rows: ``[1, L]`` (or ``[L]``) of 0 and 1, at least one 1."""
    if mask is None:
        return None
    spec = FAMILIES.get(family)
    if spec is None or not spec.masked:
        raise EmbeddingError(
            f"{path}: family {family} reads every row; an attention mask belongs to the "
            f"T5 families ({', '.join(f.name for f in FAMILIES.values() if f.masked)})"
        )
    if not isinstance(mask, torch.Tensor):
        raise EmbeddingError(f"{path}: attention mask must be a tensor, found {type(mask).__name__}")
    if mask.dim() == 1:
        mask = mask.unsqueeze(0)
    if tuple(mask.shape) != (1, tensor.shape[1]):
        raise EmbeddingError(
            f"{path}: attention mask must be [1, {tensor.shape[1]}] like the rows, found {_shape(mask)}"
        )
    m = mask.float()
    if not bool(((m == 0) | (m == 1)).all()) or not bool(m.any()):
        raise EmbeddingError(f"{path}: attention mask must hold 0 and 1 with at least one 1")
    return m.long()


def validate(
    tensor: Any, path: str, family: str | None = None, pooled: Any = None, expected_family: str | None = None
) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """Check rank, shape, finiteness and hidden size; return ``([1,L,D], family, pooled)``."""
    if not isinstance(tensor, torch.Tensor):
        raise EmbeddingError(f"{path}: expected a tensor, found {type(tensor).__name__}")
    if tensor.layout != torch.strided:
        raise EmbeddingError(
            f"{path}: expected a dense tensor, found a {str(tensor.layout).replace('torch.', '')} tensor"
        )
    if not tensor.is_floating_point():
        raise EmbeddingError(f"{path}: expected a floating-point tensor, found dtype {tensor.dtype}")
    if tensor.dtype not in _DTYPES:
        raise EmbeddingError(
            f"{path}: expected float32, float16, bfloat16 or float64 values, found "
            f"{str(tensor.dtype).replace('torch.', '')}"
        )
    if tensor.dim() == 2:
        tensor = tensor.unsqueeze(0)
    if tensor.dim() != 3 or tensor.shape[0] != 1:
        raise EmbeddingError(
            f"{path}: expected a tensor of shape [1, tokens, hidden] (or [tokens, hidden]), found {_shape(tensor)}"
        )
    hidden = tensor.shape[-1]
    by_dim = family_for_shape(hidden, tensor.shape[1], pooled=pooled is not None)
    if family:
        spec = get_family(family) if family in FAMILIES else None
        if spec is None:
            raise EmbeddingError(
                f"{path}: metadata names an unknown family {family!r}; expected one of {', '.join(FAMILIES)}"
            )
        if spec.hidden != hidden:
            raise EmbeddingError(
                f"{path}: family {family} needs hidden size {spec.hidden}, found {hidden} (shape {_shape(tensor)})"
            )
    else:
        if by_dim is None:
            raise EmbeddingError(
                f"{path}: unknown hidden size {hidden} (shape {_shape(tensor)}); expected one of {known_hidden_sizes()}"
            )
        spec = by_dim
        want = FAMILIES.get(expected_family or "")
        if want is not None and (want.hidden, want.tokens) == (hidden, tensor.shape[1]):
            spec = want  # a bare tensor of a shape several families share (4096 x 512): the model in use decides
    if tensor.shape[1] != spec.tokens:
        raise EmbeddingError(
            f"{path}: family {spec.name} needs {spec.tokens} token rows, "
            f"found {tensor.shape[1]} (shape {_shape(tensor)})"
        )
    if not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise EmbeddingError(f"{path}: expected finite values, found {bad} NaN/inf entries")
    # every use converts to float32 (or narrower): float64 values beyond its range are refused here
    problem = _overflow(tensor, torch.float32, path)
    if problem:
        raise EmbeddingError(problem + _F32_NOTE)
    if pooled is not None:
        if (
            not isinstance(pooled, torch.Tensor)
            or pooled.layout != torch.strided
            or not pooled.is_floating_point()
            or pooled.dtype not in _DTYPES
        ):
            raise EmbeddingError(f"{path}: pooled vector must be a dense float32/float16/bfloat16/float64 tensor")
        if pooled.dim() == 1:
            pooled = pooled.unsqueeze(0)
        if spec.pooled is None or tuple(pooled.shape) != (1, spec.pooled):
            want = f"[1, {spec.pooled}]" if spec.pooled else "no pooled vector"
            raise EmbeddingError(f"{path}: family {spec.name} expects {want}, found pooled {_shape(pooled)}")
        if not bool(torch.isfinite(pooled).all()):
            raise EmbeddingError(f"{path}: pooled vector has NaN/inf values")
        problem = _overflow(pooled, torch.float32, path, "pooled vector")
        if problem:
            raise EmbeddingError(problem + _F32_NOTE)
    elif spec.pooled is not None and family is not None:
        # our own files must carry it; foreign files are allowed without (hosts keep theirs)
        pass
    if expected_family and spec.name != expected_family and not _same_space(spec.name, expected_family):
        want = FAMILIES.get(expected_family)
        model = expected_family + (f" ({want.description}; {want.hidden} x {want.tokens} rows)" if want else "")
        same = [f.name for f in FAMILIES.values() if want is not None and f.masked and f.text_space == want.text_space]
        if len(same) > 1 and same[0] == expected_family and want.hidden == 4096:
            # the space's first family is what a host's bare T5 rows are taken for (ComfyUI's Chroma CLIP
            # is its PixArt T5 encoder): the rows say not which T5-XXL model reads them, so name the others
            # rather than call a Chroma model PixArt
            model += f" or another model reading T5-XXL rows ({', '.join(same[1:])})"
        raise EmbeddingError(
            f"{path}: this is a {spec.name} embedding ({spec.description}; hidden size {hidden}, "
            f"{tensor.shape[1]} rows), but the model in use is {model}"
        )
    return tensor, spec.name, pooled


def _same_space(a: str, b: str) -> bool:
    """Families whose negatives are interchangeable: PixArt-alpha's 120 T5 rows and PixArt-sigma's
    300 are the same T5-XXL output space (the mask tells which rows count); Flux.1 dev's and schnell's
    are the same two encoders' (a backend that needs its own row count says so). Wan's one negative and
    its two-expert file share a space but not a use: the rows' count says which expert reads which."""
    fa, fb = FAMILIES.get(a), FAMILIES.get(b)
    if fa is None or fb is None or fa.text_space != fb.text_space:
        return False
    return (fa.masked and fb.masked) or (fa.pooled is not None and fa.pooled == fb.pooled)


def _read_for(emb: NegEmbedding, family: str | None) -> NegEmbedding:
    """A T5 file of another family, stored without a mask, for a model that reads padding past the text
    (Chroma reads one row): the file's implied mask counted as that model counts it. For the authors'
    PixArt file that is its end-token row and one of its padding rows, which are T5's own padding row for
    the empty prompt at any length: what the model reads for ``""``, with the learned row in place."""
    want = FAMILIES.get(family or "")
    if (
        emb.attention_mask is None
        and want is not None
        and want.reads_padding
        and emb.family != want.name
        and _same_space(emb.family, want.name)
    ):
        emb.attention_mask = implied_attention_mask(emb.tensor, want.reads_padding)
    return emb


def load_embedding(path: str | os.PathLike, expected_family: str | None = None) -> NegEmbedding:
    """Load and validate a negative embedding from any supported file.

    Whatever the file holds, a failure is one :class:`EmbeddingError` line naming the file."""
    path = str(path)
    try:
        return _read_for(_load_any(path, expected_family), expected_family)
    except EmbeddingError:
        raise
    except Exception as e:  # untrusted content (RecursionError included): any other failure is still a bad file
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise EmbeddingError(
            f"{path}: not a readable embedding file ({type(e).__name__}{': ' + detail if detail else ''})"
        ) from None


def _load_any(path: str, expected_family: str | None) -> NegEmbedding:
    p = Path(path)
    why = not_a_file(p)
    if why:
        raise EmbeddingError(f"{path}: {why}")
    size = p.stat().st_size
    if size > MAX_FILE_BYTES:
        raise EmbeddingError(
            f"{path}: {size} bytes is far too large for a negative embedding "
            f"(expected under {MAX_FILE_BYTES // 2**20} MiB)"
        )
    with open(p, "rb") as f:
        magic = f.read(9)
    if _looks_like_safetensors(magic, size):
        return _load_safetensors(path, expected_family)
    is_zip = magic[:4] == b"PK\x03\x04"
    is_legacy_pickle = magic[:1] == b"\x80"
    protocol = _plain_pickle(magic)
    if protocol is not None:
        raise EmbeddingError(
            f"{path}: not a readable embedding file: it is a plain Python pickle ({protocol}), not one "
            f"torch.save wrote; expected a .safetensors file or tensors saved with torch.save (nothing else "
            f"is unpickled)"
        )
    if p.suffix.lower() == ".safetensors" or not (is_zip or is_legacy_pickle):
        return _load_safetensors(path, expected_family)
    return _load_pickle(path, expected_family)


_TORCH_LEGACY_MAGIC = b"\x80\x02\x8a\x0a"  # torch.save's old format opens with pickle.dump(its magic number)


def _looks_like_safetensors(magic: bytes, size: int) -> bool:
    """A little-endian header length that fits in the file, followed by the header's ``{``."""
    return len(magic) >= 9 and 0 < int.from_bytes(magic[:8], "little") <= size - 8 and magic[8:9] == b"{"


def _plain_pickle(magic: bytes) -> str | None:
    """``protocol N`` when the file (not a safetensors file) is a pickle that torch.save did not
    write, else None: a pickle with a protocol mark other than torch's legacy opening, or a
    protocol-0/1 pickle (text opcodes)."""
    if len(magic) < 8:
        return None
    if magic[:1] == b"\x80":
        return None if magic[:4] == _TORCH_LEGACY_MAGIC else f"protocol {magic[1]}"
    if magic[:1] in (b"(", b"]", b"}", b"c", b"I", b"L", b"F", b"S", b"V", b"N", b"X", b"J", b"K", b"G", b"T"):
        return "protocol 0 or 1"
    return None


def _load_safetensors(path: str, expected_family: str | None) -> NegEmbedding:
    from safetensors.torch import load_file

    try:
        header = read_safetensors_header(path)
    except ValueError as e:
        raise EmbeddingError(str(e)) from None
    meta = dict(header.get("__metadata__") or {})
    if meta.get("format") == "reneg-predictor":  # reneg/predictor.py's file: its global negative is inside
        raise EmbeddingError(
            f"{path}: a ReNeg negative predictor (family {str(meta.get('family'))[:20]}), not an embedding; "
            f"use it where a predictor is taken (reneg eval --negative predictor:FILE or tuned:FILE, reneg tune "
            f"--embedding FILE, ComfyUI's ReNeg Predicted Negative node, the A1111/Forge extension), or its "
            f"global part, the embedding.safetensors its training run wrote beside it"
        )
    keys = [k for k in header if k != "__metadata__"]
    try:
        tensors = load_file(path, device="cpu")
    except (_SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise EmbeddingError(f"{path}: not a readable safetensors file: {e}") from None
    if MAIN_KEY in tensors:
        fmt = "reneg" if meta.get("format") == "reneg" or "family" in meta else "safetensors"
        main, pooled = tensors[MAIN_KEY], tensors.get(POOLED_KEY)
    elif len(keys) == 1:
        fmt, main, pooled = "safetensors-single", tensors[keys[0]], None
    else:
        main_key = next((k for k in _ALT_KEYS if k in tensors), None)
        if main_key is None:
            raise EmbeddingError(
                f"{path}: expected a tensor named {MAIN_KEY!r} or a single tensor, "
                f"found {len(keys)} tensors: {', '.join(sorted(keys))[:200]}"
            )
        fmt, main = "safetensors", tensors[main_key]
        pooled = next((tensors[k] for k in _ALT_POOLED if k in tensors), None)
    family = meta.get("family") or None
    mask = next((tensors[k] for k in _ALT_MASK if k in tensors), None)
    tensor, family, pooled = validate(main, path, family, pooled, expected_family)
    mask = validate_mask(mask, tensor, path, family)
    return NegEmbedding(tensor, family, pooled, meta, path, fmt, mask)


def _load_pickle(path: str, expected_family: str | None) -> NegEmbedding:
    try:
        obj = safe_torch_load(path, what="embedding file")
    except (ValueError, FileNotFoundError) as e:
        raise EmbeddingError(str(e)) from None
    pooled = mask = None
    meta: dict[str, str] = {}
    if isinstance(obj, torch.Tensor):
        fmt, main = "torch-tensor", obj
    elif isinstance(obj, dict):
        tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
        main_key = next((k for k in _ALT_KEYS if k in tensors), None)
        if main_key is None and len(tensors) == 1:
            main_key = next(iter(tensors))
        if main_key is None:
            raise EmbeddingError(
                f"{path}: expected a tensor or a dict with one of "
                f"{', '.join(_ALT_KEYS)}; found keys {', '.join(map(str, obj))[:200]}"
            )
        fmt, main = "torch-dict", tensors[main_key]
        pooled = next((tensors[k] for k in _ALT_POOLED if k in tensors), None)
        mask = next((tensors[k] for k in _ALT_MASK if k in tensors and k != main_key), None)
        if isinstance(obj.get("metadata"), dict):
            meta = {str(k): str(v) for k, v in obj["metadata"].items()}
    else:
        raise EmbeddingError(f"{path}: expected a tensor or a dict of tensors, found {type(obj).__name__}")
    family = meta.get("family") if meta.get("family") in FAMILIES else None
    tensor, family, pooled = validate(main, path, family, pooled, expected_family)
    mask = validate_mask(mask, tensor, path, family)
    return NegEmbedding(tensor, family, pooled, meta, path, fmt, mask)


def make_metadata(family: str, kind: str, **fields: Any) -> dict[str, str]:
    """Build our string metadata. Values that are not strings are JSON-encoded."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    spec = get_family(family)
    meta: dict[str, Any] = {
        "format": "reneg",
        "format_version": FORMAT_VERSION,
        "family": family,
        "text_encoder": spec.text_encoder,
        "hidden_size": spec.hidden,
        "token_count": spec.tokens,
        "clip_skip": 1,
        "kind": kind,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "reneg_version": __version__,
    }
    meta.update({k: v for k, v in fields.items() if v is not None})
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()}


def save_embedding(path: str | os.PathLike, emb: NegEmbedding, overwrite: bool = False, **metadata: Any) -> str:
    """Write ``emb`` in our format, atomically. Extra keyword fields go into metadata."""
    path = str(path)
    if not path.endswith(".safetensors"):
        raise EmbeddingError(f"{path}: ReNeg embeddings are written as .safetensors")
    tensor, family, pooled = validate(emb.tensor.detach().cpu(), path, emb.family, emb.pooled)
    mask = validate_mask(
        emb.attention_mask.detach().cpu() if emb.attention_mask is not None else None, tensor, path, family
    )
    if mask is None and get_family(family).masked:
        mask = implied_attention_mask(tensor, get_family(family).reads_padding)  # our T5 files say which rows count
    meta = dict(emb.metadata)
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items() if v is not None})
    for k, v in (("format", "reneg"), ("format_version", FORMAT_VERSION), ("family", family)):
        meta[k] = v
    spec = get_family(family)
    meta.setdefault("text_encoder", spec.text_encoder)
    meta["hidden_size"] = str(spec.hidden)
    meta["token_count"] = str(tensor.shape[1])
    meta.setdefault("clip_skip", "1")
    meta.setdefault("kind", "global")
    meta.setdefault("created", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    meta.setdefault("reneg_version", __version__)
    tensors = {MAIN_KEY: tensor}
    if pooled is not None:
        tensors[POOLED_KEY] = pooled.detach().cpu()
    if mask is not None:
        tensors[MASK_KEY] = mask
    atomic_save_safetensors(path, tensors, metadata=meta, overwrite=overwrite)
    return path


def convert(src: str, dst: str, family: str | None = None, overwrite: bool = False) -> NegEmbedding:
    """Convert any supported file to our format; values are kept bit for bit. A negative predictor's file
    (``reneg train --predictor``) gives its global negative: the prompt-dependent correction is a network,
    which no embedding file holds."""
    from .predictor import is_predictor_file, load_predictor

    if is_predictor_file(src):
        model = load_predictor(src)
        emb = model.global_embedding()
        own = {"format", "format_version", "kind", "architecture", "rank", "parameters", "created", "reneg_version"}
        own |= {"hidden_size", "token_count", "pooled_size"}
        # how it was trained (rewards, guidance, model) stays; what describes the network does not
        emb.metadata = {k: v for k, v in model.metadata.items() if k not in own}
        emb.metadata.update(kind="global", source_kind="predictor global part")
        emb.path = src
        emb.format = "reneg-predictor"
    else:
        emb = load_embedding(src)
    if family and family != emb.family:
        # an explicit family must agree with the tensor's shape
        tensor, fam, pooled = validate(emb.tensor, src, family, emb.pooled)
        emb = NegEmbedding(tensor, fam, pooled, emb.metadata, src, emb.format, emb.attention_mask)
    meta = dict(emb.metadata)
    meta.setdefault("kind", "global")
    meta.setdefault("source_file", os.path.basename(src))
    meta.setdefault("source_format", emb.format)
    out = NegEmbedding(emb.tensor, emb.family, emb.pooled, meta, dst, "reneg", emb.mask())
    save_embedding(dst, out, overwrite=overwrite)
    return load_embedding(dst)


def list_embedding_files(*folders: str | os.PathLike) -> list[str]:
    """Files with an embedding suffix in the given folders (recursive), sorted, each file once.

    Links are followed but never round a loop, and a file reached by two names (a link to a
    folder or to a file) is listed once, under the first name found."""
    found: dict[str, str] = {}  # real path -> the name listed
    for folder in folders:
        if not folder or not os.path.isdir(folder):
            continue
        for root, _dirs, files in walk_folder(folder):
            for fn in files:
                if fn.lower().endswith(SUFFIXES) and not fn.startswith("."):
                    path = os.path.join(root, fn)
                    found.setdefault(os.path.realpath(path), path)
    return sorted(set(found.values()))


_WARNED: set[str] = set()


def learned_guidance(emb: NegEmbedding) -> str | None:
    """The guidance ``emb`` was learned under (``cfg``, ``nag`` or ``cfg+nag``: the ``guidance`` entry a
    training run writes; a file of ours without one was learned under CFG, the only guidance before NAG);
    None where the file does not say (the paper's files, foreign formats)."""
    return emb.metadata.get("guidance") or ("cfg" if emb.metadata.get("guidance_scale") else None)


def guidance_mismatch(emb: NegEmbedding, mode: str) -> str | None:
    """A note when ``emb`` was learned under another guidance than ``mode`` (``cfg``, ``nag`` or
    ``cfg+nag``, the ``guidance`` entry a training run writes; a file without one was learned under
    CFG, the only guidance before NAG). A negative learned to steer CFG's unconditional pass is not the
    one that steers NAG's attention best, and the other way round."""
    learned = learned_guidance(emb)
    if learned is None or learned == mode:
        return None
    where = os.path.basename(emb.path) if emb.path else "this embedding"
    return (
        f"ReNeg: {where} was learned under {learned} guidance and is used under {mode}; "
        f"it works, but a negative learned under {mode} is likely to do better (docs/nag.md)"
    )


def warn_once(note: str) -> None:
    """Print ``note`` to stderr the first time this process sees it."""
    if note in _WARNED:
        return
    _WARNED.add(note)
    import sys

    print(note, file=sys.stderr, flush=True)

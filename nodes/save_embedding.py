"""Save ReNeg Embedding: write a (tuned) negative CONDITIONING as a ReNeg file."""

from __future__ import annotations

import os
import re

from .common import (
    CATEGORY,
    EMBEDDING_FOLDER,
    conditioning_family,
    folder_paths_of,
    model_family_of,
    one_block,
    reports_errors,
)

TITLE = "Save ReNeg Embedding"
INFO_KEY = "reneg"  # conditioning-dict key under which the tune node leaves its provenance
_NAME = re.compile(r"^[\w\-. ]+$")


def free_name(folder: str, stem: str) -> str:
    """``stem.safetensors`` if free, else the first free ``stem_00001.safetensors``."""
    first = os.path.join(folder, stem + ".safetensors")
    if not os.path.exists(first):
        return first
    for i in range(1, 100000):
        p = os.path.join(folder, f"{stem}_{i:05d}.safetensors")
        if not os.path.exists(p):
            return p
    raise FileExistsError(f"{folder}: no free file name for {stem!r}")


def t5_file_rows(t, family=None):
    """ComfyUI's unpadded T5 rows ``[1, n, 4096]`` -> the file's rows, padded with zero rows to the
    family's count (``family``'s, e.g. Chroma's 512 for a negative tuned on Chroma; else 120
    PixArt-alpha, or 300 when n > 120), and the mask that marks the n rows."""
    import torch

    from ..reneg.families import FAMILIES

    n = t.shape[1]
    fits = sorted((f.tokens for f in FAMILIES.values() if f.masked and f.hidden == t.shape[-1] and f.tokens >= n))
    if family is not None and family.masked and family.hidden == t.shape[-1] and family.tokens >= n:
        fits = [family.tokens]
    if not fits:
        raise ValueError(
            f"negative: {n} T5 rows are more than a PixArt embedding holds "
            f"({max(f.tokens for f in FAMILIES.values() if f.masked)})"
        )
    rows = torch.zeros(1, fits[0], t.shape[-1])
    rows[:, :n] = t.detach().float().cpu()
    mask = torch.zeros(1, fits[0], dtype=torch.long)
    mask[:, :n] = 1
    return rows, mask


class ReNegSaveEmbedding:
    DESCRIPTION = (
        "Writes a negative CONDITIONING (e.g. from Per-Sample ReNeg Tune) into ComfyUI/models/reneg "
        "as a ReNeg .safetensors file with metadata. An existing file is never replaced unless "
        "overwrite is on; otherwise a numbered name is used."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("path",)
    FUNCTION = "save"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "negative": ("CONDITIONING",),
                "filename": (
                    "STRING",
                    {"default": "tuned", "tooltip": "File name without extension; subfolders with '/' are allowed."},
                ),
                "overwrite": (
                    "BOOLEAN",
                    {
                        "default": False,
                        "tooltip": "Replace an existing file of this name. Off: a free numbered name is used instead.",
                    },
                ),
            },
            "optional": {
                "note": ("STRING", {"default": "", "multiline": True, "tooltip": "Stored in the metadata."}),
            },
        }

    @reports_errors(TITLE)
    def save(self, negative, filename, overwrite, note=""):
        import torch

        from ..reneg.embedding import NegEmbedding, save_embedding
        from ..reneg.families import FAMILIES, family_for_shape, get_family

        if not isinstance(negative, list) or not negative:
            raise ValueError(f"negative: expected a CONDITIONING, found {type(negative).__name__}")
        if len(negative) != 1:
            raise ValueError(f"negative: expected one conditioning entry, found {len(negative)}")
        t, extra = negative[0][0], negative[0][1]
        rows = 77
        mask = None
        info = dict(extra.get(INFO_KEY) or {})
        named = FAMILIES.get(str(info.pop("family", "")))  # the tune node says which model it tuned for
        pooled = extra.get("pooled_output")
        size = pooled.shape[-1] if isinstance(pooled, torch.Tensor) else None
        wan = t.dim() == 3 and t.shape[0] == 1 and (named.name if named else conditioning_family(t, size)) == "wan"
        if wan:  # Wan: the 512 rows ComfyUI's UMT5 encoding gives, all read by the model (no mask)
            rows = get_family("wan").tokens
            if t.shape[1] != rows:
                raise ValueError(
                    f"negative: {t.shape[1]} Wan rows (a base negative longer than {rows} tokens blended in); "
                    f"a wan embedding file holds {rows}"
                )
        elif t.dim() == 3 and t.shape[0] == 1 and get_family(model_family_of(t.shape[-1])).masked:
            t, mask = t5_file_rows(t, named)
        elif t.dim() != 3 or t.shape[0] != 1 or t.shape[1] % rows:
            raise ValueError(f"negative: expected a tensor [1, 77k, hidden], found {list(t.shape)}")
        block = one_block(t, rows) if mask is None and not wan else t
        if block.shape[1] != rows and mask is None:
            raise ValueError(
                f"negative: {t.shape[1]} token rows that are not one 77-row block repeated "
                f"(a long base negative blended in); an embedding file holds 77 rows"
            )
        t = block
        stem = str(filename).strip().replace("\\", "/")
        if stem.endswith(".safetensors"):
            stem = stem[: -len(".safetensors")]
        parts = [p for p in stem.split("/") if p]
        if not parts or any(p in (".", "..") or not _NAME.match(p) for p in parts):
            raise ValueError(
                f"filename {filename!r}: use letters, digits, '-', '_', '.', spaces and '/' for subfolders (no '..')"
            )
        folders = folder_paths_of(EMBEDDING_FOLDER)
        if not folders:
            raise ValueError("the 'reneg' model folder is not registered (is the pack loaded in ComfyUI?)")
        folder = os.path.join(folders[0], *parts[:-1])
        path = os.path.join(folder, parts[-1] + ".safetensors")
        if not overwrite:
            path = free_name(folder, parts[-1])
        if wan:
            family = "wan"
        else:
            family = (
                model_family_of(t.shape[-1])
                if mask is None
                else family_for_shape(t.shape[-1], t.shape[1], masked=True).name
            )
        kind = info.pop("kind", "global")
        meta = {k: str(v) for k, v in info.items()}
        if note:
            meta["note"] = str(note)
        pooled = extra.get("pooled_output") if get_family(family).pooled else None
        emb = NegEmbedding(
            t.detach().float().cpu().clone(),
            family,
            None if pooled is None else pooled.detach().float().cpu().reshape(1, -1),
            {"kind": kind, **meta},
            attention_mask=mask,
        )
        save_embedding(path, emb, overwrite=bool(overwrite), source="ComfyUI")
        msg = f"saved {os.path.basename(path)} ({family}, {kind}) in {folder}"
        return {"ui": {"text": [msg]}, "result": (path,)}

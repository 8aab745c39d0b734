"""Load ReNeg Embedding: a negative-embedding file as a sampler's negative CONDITIONING."""

from __future__ import annotations

import torch

from .common import CATEGORY, EMBEDDING_FOLDER, folder_list, full_path, model_family_of, reports_errors

TITLE = "Load ReNeg Embedding"


def null_conditioning(clip):
    """What an empty negative prompt gives: ``[[E(""), {"pooled_output": ...}]]``."""
    tokens = clip.tokenize("")
    encode = getattr(clip, "encode_from_tokens_scheduled", None)
    if encode is not None:
        return encode(tokens)
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def apply_embedding(base, emb, strength: float):
    """Blend ``emb`` (a NegEmbedding) into every entry of the CONDITIONING ``base``.

    0 gives ``base``, 1 the embedding (repeated to the entry's 77k token rows).
    Entry dicts are copied, so ControlNet, area and timestep settings on a base
    negative carry over; the pooled vector is blended too when the file has one.
    """
    from ..reneg.uncond import blend, match_tokens

    out = []
    for i, entry in enumerate(base):
        t, extra = entry[0], dict(entry[1])
        if t.shape[-1] != emb.tensor.shape[-1]:
            raise ValueError(f"{emb.path}: this is a {emb.family} embedding (hidden size "
                             f"{emb.tensor.shape[-1]}), but the base negative is "
                             f"{model_family_of(t.shape[-1])} (hidden size {t.shape[-1]})")
        rows = emb.tensor.shape[1]
        if t.shape[1] % rows:
            raise ValueError(f"base negative entry {i} has {t.shape[1]} token rows, not a multiple "
                             f"of the embedding's {rows}")
        new = blend(t, match_tokens(emb.tensor.float(), t.shape[1]), strength)
        pooled = extra.get("pooled_output")
        if emb.pooled is not None and isinstance(pooled, torch.Tensor) and pooled.shape[-1] == emb.pooled.shape[-1]:
            extra["pooled_output"] = blend(pooled.unsqueeze(1), emb.pooled.float().unsqueeze(1),
                                           strength).squeeze(1)
        out.append([new, extra])
    return out


class ReNegLoadEmbedding:
    DESCRIPTION = ("Loads a ReNeg negative embedding (ComfyUI/models/reneg) as a negative CONDITIONING for a "
                   "sampler. Strength blends it with the base negative (0 = base only, 1 = embedding only); "
                   "without a base negative the base is the empty prompt.")
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("negative",)
    OUTPUT_TOOLTIPS = ("Connect to a sampler's negative input.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embedding": (folder_list(EMBEDDING_FOLDER), {
                    "tooltip": "A file from ComfyUI/models/reneg (our .safetensors, or the paper's .bin)."}),
                "clip": ("CLIP", {"tooltip": "The checkpoint's text encoder: it tells which model family is "
                                             "in use and gives the empty prompt's conditioning."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.05,
                                       "tooltip": "0 = base negative only, 1 = embedding only."}),
            },
            "optional": {
                "base_negative": ("CONDITIONING", {"tooltip": "Negative to blend with (default: empty prompt)."}),
            },
        }

    @reports_errors(TITLE)
    def load(self, embedding, clip, strength, base_negative=None):
        from ..reneg.embedding import load_embedding

        if clip is None:
            raise ValueError("clip input is empty: connect the CLIP output of your checkpoint loader")
        s = float(strength)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        null = null_conditioning(clip)
        family = model_family_of(null[0][0].shape[-1])
        emb = load_embedding(full_path(EMBEDDING_FOLDER, embedding), expected_family=family)
        base = base_negative if base_negative is not None else null
        if not isinstance(base, list) or not base:
            raise ValueError(f"base_negative: expected a CONDITIONING, found {type(base).__name__}")
        return (apply_embedding(base, emb, s),)

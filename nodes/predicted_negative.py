"""ReNeg Predicted Negative: a negative predictor file turns the positive CONDITIONING into its own negative."""

from __future__ import annotations

import torch

from .common import (
    CATEGORY,
    EMBEDDING_FOLDER,
    check_conditioning,
    conditioning_family,
    folder_list,
    full_path,
    reports_errors,
)
from .load_embedding import _check_dtype, apply_embedding, null_conditioning

TITLE = "ReNeg Predicted Negative"


def predicted_embedding(model, rows: torch.Tensor, pooled, mask, path: str):
    """The negative a predictor gives for one positive entry ``[1, L', D]``, as a NegEmbedding of the
    predictor's family (its global negative's mask for T5 families), so that it goes into a
    CONDITIONING exactly as Load ReNeg Embedding puts a file there."""
    from ..reneg.embedding import NegEmbedding
    from ..reneg.families import FAMILIES

    if rows.shape[0] != 1:
        raise ValueError(
            f"positive entry has a batch of {rows.shape[0]} conditionings; the predictor makes one negative "
            f"per prompt: encode each prompt separately"
        )
    keep = mask.reshape(1, -1).bool() if isinstance(mask, torch.Tensor) else None
    if keep is not None and keep.shape[1] != rows.shape[1]:
        keep = None
    family = model.spec.family
    if keep is None and FAMILIES[family].masked:  # ComfyUI's Wan encoding pads with zero rows: not the prompt's
        nonzero = rows.detach().abs().sum(-1) > 0
        if bool(nonzero.any()) and not bool(nonzero.all()):
            keep = nonzero
    rows = rows.detach().float().cpu()  # the predictor is read onto the CPU; one tiny forward there
    pooled = pooled.detach().float().cpu() if isinstance(pooled, torch.Tensor) else None
    neg, neg_pooled = model(rows, pooled, keep.cpu() if keep is not None else None)
    attention = model.neg_mask.long() if FAMILIES[family].masked else None
    meta = dict(getattr(model, "metadata", {}))
    out_pooled = neg_pooled.detach().cpu() if neg_pooled is not None else None
    return NegEmbedding(neg.detach().cpu(), family, out_pooled, meta, path, "reneg", attention)


class ReNegPredictedNegative:
    DESCRIPTION = (
        "A ReNeg negative predictor (a predictor file from ComfyUI/models/reneg, made by `reneg train "
        "--predictor`) gives each prompt its own negative: its global negative plus a small correction "
        "computed from the positive CONDITIONING, one tiny forward and no sampling step. The output is the "
        "negative CONDITIONING Load ReNeg Embedding gives for a file of the family (pooled vector for SDXL "
        "and Flux, the mask's rows for T5 models); strength blends it with the base negative."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("negative",)
    OUTPUT_TOOLTIPS = ("Connect to a sampler's negative input (the positive goes to its positive input).",)
    FUNCTION = "predict"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "predictor": (
                    folder_list(EMBEDDING_FOLDER),
                    {"tooltip": "A predictor file from ComfyUI/models/reneg (reneg train --predictor)."},
                ),
                "positive": (
                    "CONDITIONING",
                    {"tooltip": "The prompt's conditioning (CLIP Text Encode): the negative is predicted from it."},
                ),
                "clip": (
                    "CLIP",
                    {"tooltip": "The checkpoint's text encoder: it gives the empty prompt's conditioning."},
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "0 = base negative only, 1 = predicted negative only.",
                    },
                ),
            },
            "optional": {
                "base_negative": ("CONDITIONING", {"tooltip": "Negative to blend with (default: empty prompt)."}),
            },
        }

    @reports_errors(TITLE)
    def predict(self, predictor, positive, clip, strength, base_negative=None):
        from ..reneg.predictor import load_predictor

        if clip is None:
            raise ValueError("clip input is empty: connect the CLIP output of your checkpoint loader")
        s = float(strength)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        positive = check_conditioning(positive, "positive")
        first = positive[0]
        pooled = first[1].get("pooled_output")
        family = conditioning_family(first[0], pooled.shape[-1] if isinstance(pooled, torch.Tensor) else None)
        path = full_path(EMBEDDING_FOLDER, predictor)
        model = load_predictor(path, expected_family=family)
        null = null_conditioning(clip)
        base = check_conditioning(base_negative, "base_negative") if base_negative is not None else null
        if len(positive) > 1 and len(base) not in (1, len(positive)):
            raise ValueError(
                f"positive has {len(positive)} entries and base_negative {len(base)}: give one base entry, "
                f"or one per positive entry"
            )
        out = []
        with torch.no_grad():
            for i, (t, extra) in enumerate((e[0], e[1]) for e in positive):
                p = extra.get("pooled_output")
                emb = predicted_embedding(model, t, p, extra.get("attention_mask"), path)
                _check_dtype(emb, null[0][0].dtype)
                targets = base if len(positive) == 1 else [base[i if len(base) > 1 else 0]]
                out.extend(apply_embedding(targets, emb, s))
        meta = getattr(model, "metadata", {})
        learned = meta.get("guidance") or ("cfg" if meta.get("guidance_scale") else None)
        if learned:  # the guidance it was learned under: ReNeg NAG warns when it is not NAG
            for entry in out:
                entry[1]["reneg_learned_under"] = learned
        return (out,)

"""ReNeg NAG: a MODEL that samples with Normalized Attention Guidance away from a negative CONDITIONING.

ComfyUI (v0.1.x) has no NAG node of its own; this one patches the model's cross-attention through
ComfyUI's transformer-block patches (``attn2_patch`` and an ``attn2`` replacement in every block,
:func:`reneg.nag.patch_comfy_model`), so any sampler node (KSampler at cfg 1 for a few-step model, or
at the model's usual cfg for CFG + NAG) uses it. torch only at import.
"""

from __future__ import annotations

from .common import CATEGORY, model_family_of, reports_errors

TITLE = "ReNeg NAG"
LEARNED_UNDER_KEY = "reneg_learned_under"  # Load ReNeg Embedding's note of the guidance a file was learned under


def _check_number(name: str, value, lo: float, hi: float | None = None) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number, got {value!r}") from None
    if not (v == v and v >= lo and (hi is None or v <= hi)) or v in (float("inf"), float("-inf")):
        top = f" and <= {hi:g}" if hi is not None else ""
        raise ValueError(f"{name} must be a finite number >= {lo:g}{top}, got {value!r}")
    return v


def model_hidden(model) -> int | None:
    """The width of the text conditioning a ComfyUI MODEL's cross-attention reads (None: not known)."""
    cfg = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None)
    ctx = cfg.get("context_dim") if isinstance(cfg, dict) else None
    return int(ctx) if ctx else None


class ReNegNAG:
    DESCRIPTION = (
        "Normalized Attention Guidance (NAG) with a negative: every cross-attention also attends to the "
        "negative, extrapolates away from it, clips the result's norm and blends it with the positive "
        "output. Works where CFG's negative does nothing (few-step models and speed LoRAs at cfg 1) and "
        "beside CFG. Connect a ReNeg embedding (Load ReNeg Embedding) or any text encoder's output; "
        "sample the returned MODEL with a KSampler."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("MODEL",)
    RETURN_NAMES = ("model",)
    OUTPUT_TOOLTIPS = ("The model with NAG in its cross-attention: connect to a sampler.",)
    FUNCTION = "patch"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "negative": (
                    "CONDITIONING",
                    {"tooltip": "The negative NAG guides away from: Load ReNeg Embedding, or a text encoder."},
                ),
                "nag_scale": (
                    "FLOAT",
                    {
                        "default": 5.0,
                        "min": 0.0,
                        "max": 100.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Extrapolation away from the negative; 1 = no effect. The authors use 5 "
                        "(Flux, SD1.5) and 3 (SDXL DMD2, 4 steps).",
                    },
                ),
                "nag_tau": (
                    "FLOAT",
                    {
                        "default": 2.5,
                        "min": 1.0,
                        "max": 10.0,
                        "step": 0.1,
                        "round": 0.01,
                        "tooltip": "Clip of the guided output's norm ratio (the authors: 2.5).",
                    },
                ),
                "nag_alpha": (
                    "FLOAT",
                    {
                        "default": 0.25,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.01,
                        "round": 0.01,
                        "tooltip": "Blend of the guided and the positive output (the authors: 0.25 for Flux, "
                        "0.38 for SD1.5 with CFG, 0.5 for SDXL DMD2).",
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "0 = no negative (the model unchanged), 1 = nag_scale as set; between, the "
                        "scale moves linearly toward 1.",
                    },
                ),
            }
        }

    @reports_errors(TITLE)
    def patch(self, model, negative, nag_scale, nag_tau, nag_alpha, strength):
        from ..reneg.backends.comfy_backend import conditioning_to_cond
        from ..reneg.embedding import warn_once
        from ..reneg.nag import NAG, patch_comfy_model

        if not hasattr(model, "clone") or not hasattr(model, "model"):
            raise ValueError(f"model: expected a ComfyUI MODEL, found {type(model).__name__}")
        neg = conditioning_to_cond(negative, "negative")
        hidden, have = neg.crossattn.shape[-1], model_hidden(model)
        if have is not None and have != hidden:
            raise ValueError(
                f"the negative is {model_family_of(hidden)} (hidden size {hidden}) but the model reads "
                f"{model_family_of(have)} ({have}): load the embedding of this model's family"
            )
        nag = NAG(
            _check_number("nag_scale", nag_scale, 0.0),
            _check_number("nag_tau", nag_tau, 1.0),
            _check_number("nag_alpha", nag_alpha, 0.0, 1.0),
        ).weaker(_check_number("strength", strength, 0.0, 1.0))
        extra = negative[0][1] if isinstance(negative[0][1], dict) else {}
        learned = extra.get(LEARNED_UNDER_KEY)
        if nag.active and learned and learned != "nag":
            warn_once(
                f"[ReNeg] {TITLE}: this embedding was learned under {learned} guidance; under NAG a negative "
                f"learned with --guidance nag is likely to do better"
            )
        return (patch_comfy_model(model, neg.crossattn, nag),)

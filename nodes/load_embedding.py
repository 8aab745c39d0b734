"""Load ReNeg Embedding: a negative-embedding file as a sampler's negative CONDITIONING."""

from __future__ import annotations

import torch

from .common import (
    CATEGORY,
    EMBEDDING_FOLDER,
    check_conditioning,
    conditioning_family,
    folder_list,
    full_path,
    model_family_of,
    reports_errors,
)

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
    from ..reneg.families import FAMILIES
    from ..reneg.uncond import blend, match_tokens

    rows_used = host_rows(emb)
    out = []
    for i, entry in enumerate(base):
        t, extra = entry[0], dict(entry[1])
        if t.shape[-1] != emb.tensor.shape[-1]:
            raise ValueError(
                f"{emb.path}: this is a {emb.family} embedding (hidden size "
                f"{emb.tensor.shape[-1]}), but the base negative is "
                f"{model_family_of(t.shape[-1])} (hidden size {t.shape[-1]})"
            )
        if rows_used is not None:  # T5: PixArt's conditioning is the counted rows, unpadded; LTX-Video's
            out.append(list(_t5_entry(t, extra, rows_used, strength, emb, i)))  # is padded, with its mask
            continue
        if FAMILIES[emb.family].space == "flux":  # every T5 row, and CLIP-L's pooled vector
            out.append(_flux_entry(t, extra, strength, emb, i))
            continue
        rows = emb.tensor.shape[1]
        if t.shape[1] % rows:
            raise ValueError(
                f"base negative entry {i} has {t.shape[1]} token rows, not a multiple of the embedding's {rows}"
            )
        new = blend(t, match_tokens(emb.tensor.float(), t.shape[1]), strength)
        pooled = extra.get("pooled_output")
        if emb.pooled is not None and isinstance(pooled, torch.Tensor) and pooled.shape[-1] == emb.pooled.shape[-1]:
            extra["pooled_output"] = blend(pooled.unsqueeze(1), emb.pooled.float().unsqueeze(1), strength).squeeze(1)
        out.append([new, extra])
    return out


def _flux_entry(base: torch.Tensor, extra: dict, strength: float, emb, i: int) -> list:
    """A Flux negative as ComfyUI's own Flux text encoding shapes it: T5 rows ``[1, L, 4096]`` (every
    row read, no mask: the file's rows as they are) and CLIP-L's ``pooled_output`` ``[1, 768]``; the
    rest of the entry's dict (a ``guidance`` set by CLIPTextEncodeFlux or FluxGuidance) carries over.
    Strength blends rows and pooled vector with the base's where the row counts agree (ComfyUI pads a
    prompt to at least 256 rows, diffusers' dev to 512); otherwise only 0 and 1 apply."""
    from ..reneg.uncond import blend

    out = dict(extra)
    if strength <= 0.0:
        return [base, out]
    rows = _blend_t5(base, emb.tensor.float(), strength, emb, i)
    pooled = extra.get("pooled_output")
    if emb.pooled is not None:
        own = emb.pooled.float().reshape(1, 1, -1)
        if isinstance(pooled, torch.Tensor) and strength < 1.0:
            out["pooled_output"] = blend(pooled.unsqueeze(1), own.expand(pooled.shape[0], 1, -1), strength).squeeze(1)
        else:
            n = pooled.shape[0] if isinstance(pooled, torch.Tensor) else base.shape[0]
            dtype = pooled.dtype if isinstance(pooled, torch.Tensor) else base.dtype
            out["pooled_output"] = own[:, 0].expand(n, -1).to(dtype)
    return [rows.to(base.dtype).expand(base.shape[0], -1, -1), out]


def host_rows(emb) -> torch.Tensor | None:
    """A T5 file's rows as ComfyUI's PixArt reads them: only the rows its attention mask keeps.

    ComfyUI encodes a PixArt prompt with T5 unpadded (the prompt's tokens and ``</s>``, at least
    one token) and passes no mask, so every row it has counts; diffusers pads to 120 (alpha) or 300
    (sigma) rows and masks the padding. Dropping the masked rows gives the same transformer
    output. None for CLIP families, whose files are used as they are."""
    mask = emb.mask()
    if mask is None:
        return None
    return emb.tensor[:, mask[0].bool()].float()


def _t5_entry(base: torch.Tensor, extra: dict, rows: torch.Tensor, strength: float, emb, i: int):
    """One conditioning entry from T5 rows. A base with an ``attention_mask`` (ComfyUI's LTX-Video
    text encoder pads to at least 128 tokens and masks the padding) gets the rows padded with zero
    rows to its length and a mask of the rows; a base without one (PixArt) gets the rows as they are."""
    mask = extra.get("attention_mask")
    if not isinstance(mask, torch.Tensor):
        return _blend_t5(base, rows, strength, emb, i), extra
    if strength <= 0.0:
        return base, extra
    keep = mask.reshape(-1).bool()
    own = base[:, keep] if keep.numel() == base.shape[1] else base
    new = _blend_t5(own, rows, strength, emb, i)
    n, length = new.shape[1], max(base.shape[1], new.shape[1])
    padded = torch.zeros(base.shape[0], length, base.shape[2], dtype=base.dtype, device=base.device)
    padded[:, :n] = new.to(base.dtype)
    m = torch.zeros(mask.shape[0] if mask.dim() > 1 else 1, length, dtype=mask.dtype, device=mask.device)
    m[:, :n] = 1
    out = dict(extra)
    out["attention_mask"] = m
    return padded, out


def _blend_t5(base: torch.Tensor, rows: torch.Tensor, strength: float, emb, i: int) -> torch.Tensor:
    from ..reneg.uncond import blend

    if strength >= 1.0:
        return rows.to(base.dtype)
    if strength <= 0.0:
        return base
    if base.shape[1] != rows.shape[1]:
        raise ValueError(
            f"{emb.path}: the embedding has {rows.shape[1]} T5 rows and base negative entry {i} has "
            f"{base.shape[1]}; T5 rows of different prompts can only be swapped (strength 1), "
            f"not blended"
        )
    return blend(base, rows, strength)


def _check_dtype(emb, dtype: torch.dtype) -> None:
    """Refuse a file whose values are inf in the conditioning's dtype; warn when they would be in
    float16, the dtype many models sample in (7e4 is a finite float32, and inf in float16)."""
    problem = emb.dtype_problem(dtype)
    if problem:
        raise ValueError(f"{problem}, the dtype of this CLIP's conditioning")
    problem = emb.dtype_problem(torch.float16)
    if problem:
        print(f"[ReNeg] warning: {problem}: a model that samples in float16 gets inf from it (black images)")


EXPERTS = ("both", "high-noise", "low-noise")


def wan_expert_embedding(emb, expert: str):
    """A Wan file for one sampler: a ``wan`` file as it is (both experts read it), the chosen half of a
    ``wan-experts`` file (the high-noise expert's first 512 rows, the low-noise expert's last 512)."""
    from ..reneg.embedding import EmbeddingError, NegEmbedding
    from ..reneg.families import FAMILIES

    if expert not in EXPERTS:
        raise ValueError(f"expert must be one of {', '.join(EXPERTS)}, got {expert!r}")
    if emb.family == "wan":
        return emb
    if emb.family != "wan-experts":
        f = FAMILIES[emb.family]
        raise EmbeddingError(
            f"{emb.path}: this is a {emb.family} embedding ({f.description}; hidden size {f.hidden}, "
            f"{emb.tensor.shape[1]} rows), but the model in use is wan (Wan 2.1 / 2.2, UMT5-XXL 4096 x 512)"
        )
    if expert == "both":
        raise ValueError(
            f"{emb.path}: a wan-experts file holds one negative per Wan 2.2 A14B expert: load it twice, "
            f"expert high-noise for the high-noise model's sampler and low-noise for the low-noise one's "
            f"(a Wan 2.1 model has one expert: use a wan file)"
        )
    n = FAMILIES["wan"].tokens
    half = emb.tensor[:, :n] if expert == "high-noise" else emb.tensor[:, n:]
    return NegEmbedding(half.contiguous(), "wan", None, dict(emb.metadata), emb.path, emb.format)


class ReNegLoadEmbedding:
    DESCRIPTION = (
        "Loads a ReNeg negative embedding (ComfyUI/models/reneg) as a negative CONDITIONING for a "
        "sampler. Strength blends it with the base negative (0 = base only, 1 = embedding only); "
        "without a base negative the base is the empty prompt. PixArt / LTX-Video (T5) files give the "
        "rows their attention mask keeps (the paper's PixArt file: its first row). Wan files give the 512 "
        "zero-padded rows ComfyUI's own Wan text encoding gives; a Wan 2.2 A14B per-expert file gives the "
        "`expert` chosen."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING",)
    RETURN_NAMES = ("negative",)
    OUTPUT_TOOLTIPS = ("Connect to a sampler's negative input.",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "embedding": (
                    folder_list(EMBEDDING_FOLDER),
                    {"tooltip": "A file from ComfyUI/models/reneg (our .safetensors, or the paper's .bin)."},
                ),
                "clip": (
                    "CLIP",
                    {
                        "tooltip": "The checkpoint's text encoder: it tells which model family is "
                        "in use and gives the empty prompt's conditioning."
                    },
                ),
                "strength": (
                    "FLOAT",
                    {
                        "default": 1.0,
                        "min": 0.0,
                        "max": 1.0,
                        "step": 0.05,
                        "tooltip": "0 = base negative only, 1 = embedding only.",
                    },
                ),
            },
            "optional": {
                "base_negative": ("CONDITIONING", {"tooltip": "Negative to blend with (default: empty prompt)."}),
                "expert": (
                    list(EXPERTS),
                    {
                        "default": EXPERTS[0],
                        "tooltip": "Wan 2.2 A14B: the expert whose sampler this negative feeds. A file learned "
                        "one per expert (wan-experts) gives the high-noise expert's half or the low-noise "
                        "expert's; a one-negative file feeds both as it is. Other models: ignored.",
                    },
                ),
            },
        }

    @reports_errors(TITLE)
    def load(self, embedding, clip, strength, base_negative=None, expert=EXPERTS[0]):
        from ..reneg.embedding import load_embedding

        if clip is None:
            raise ValueError("clip input is empty: connect the CLIP output of your checkpoint loader")
        s = float(strength)
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"strength must be between 0 and 1, got {strength}")
        null = null_conditioning(clip)
        pooled = null[0][1].get("pooled_output")
        family = conditioning_family(null[0][0], pooled.shape[-1] if isinstance(pooled, torch.Tensor) else None)
        path = full_path(EMBEDDING_FOLDER, embedding)
        if family == "wan":  # a Wan negative: one for both experts, or one of a per-expert file's two
            emb = wan_expert_embedding(load_embedding(path), expert)
        else:
            emb = load_embedding(path, expected_family=family)
        base = check_conditioning(base_negative, "base_negative") if base_negative is not None else null
        _check_dtype(emb, null[0][0].dtype)
        out = apply_embedding(base, emb, s)
        learned = emb.metadata.get("guidance") or ("cfg" if emb.metadata.get("guidance_scale") else None)
        if learned:  # the guidance the file was learned under: ReNeg NAG warns when it is not NAG
            for entry in out:
                entry[1]["reneg_learned_under"] = learned
        return (out,)

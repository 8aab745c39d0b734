"""Normalized Attention Guidance (NAG; Chen et al. 2025, arXiv 2505.21179), written once.

NAG guides inside attention instead of between two denoiser passes. In every cross-attention layer
the queries attend to the positive context (output ``Z+``) and to the negative context (``Z-``);
then, per token,

    Z~ = s Z+ - (s - 1) Z-                  extrapolate away from the negative (s = ``scale``)
    r  = ||Z~||_1 / ||Z+||_1                the L1-norm ratio over the feature axis
    Z^ = Z~ * min(r, tau) / r               clip the ratio at ``tau``
    Z  = alpha Z^ + (1 - alpha) Z+          blend with the positive output

and ``Z`` goes on through the layer's output projection. ``scale == 1`` or ``alpha == 0`` leaves
``Z = Z+``: the negative has no effect. The parametrisation (``Z+ * s - Z- * (s - 1)``, the L1 norm
with norms clamped at 1e-6, ``min(r, tau) / r``) is the authors' ComfyUI implementation
(ChenDarYen/ComfyUI-NAG, ``utils.nag``); their first diffusers Flux processor used the L2 norm, the
paper and every later release the L1 norm.

Where it is applied (the authors' choice, followed here): in UNets (SD1.x, SD2.x, SDXL) the
cross-attention ``attn2`` of every transformer block, the only layers that read the text; self-
attention is untouched. In a joint-attention transformer (Flux, SD3) the image tokens' part of each
joint attention's output is guided, and the negative text stream runs beside the positive one.

One pass: the negative travels with the positive conditioning (:attr:`reneg.cond.Cond.nag`), so a
NAG sample costs one denoiser call with a second attention in each ``attn2``, where CFG costs two
calls; gradients reach the negative through that attention.

This module holds the combine (:func:`nag_combine`), the guidance settings (:class:`NAG`,
:class:`Guidance`), the attention over split heads both backends use (:func:`attention`), the
diffusers attention processor (:class:`NAGAttnProcessor`, installed by :func:`install`) and
ComfyUI's model patches (:func:`comfy_patches`, :func:`patch_comfy_model`). torch only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

EPS = 1e-6  # the norms are clamped here before the ratio (ComfyUI-NAG's utils.nag)
MODES = ("cfg", "nag", "cfg+nag")


def nag_combine(z_pos: torch.Tensor, z_neg: torch.Tensor, scale: float, tau: float, alpha: float) -> torch.Tensor:
    """NAG's combine of the positive and negative attention outputs ``[..., tokens, features]``."""
    z_g = z_pos * scale - z_neg * (scale - 1)
    n_pos = z_pos.norm(p=1, dim=-1, keepdim=True).clamp_min(EPS)
    n_g = z_g.norm(p=1, dim=-1, keepdim=True).clamp_min(EPS)
    r = n_g / n_pos
    z_g = z_g * (r.clamp(max=tau) / r)
    return z_g * alpha + z_pos * (1 - alpha)


@dataclass(frozen=True)
class NAG:
    """NAG's three settings. The defaults are the authors' general ones (ComfyUI-NAG's node inputs:
    scale 5, tau 2.5, alpha 0.25); each family's own come from its row in :mod:`reneg.families`."""

    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25

    def __post_init__(self):
        for name, v in (("scale", self.scale), ("tau", self.tau), ("alpha", self.alpha)):
            if not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"NAG {name} must be a finite number, got {v!r}")
        if self.scale < 0:
            raise ValueError(f"NAG scale must be >= 0 (1 = no guidance), got {self.scale}")
        if self.tau < 1:
            raise ValueError(f"NAG tau must be >= 1, got {self.tau}")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"NAG alpha must be in 0..1, got {self.alpha}")

    @property
    def active(self) -> bool:
        return self.scale != 1 and self.alpha != 0

    def weaker(self, strength: float) -> "NAG":
        """The same guidance at ``strength`` (0 = none, 1 = as set): the scale moves toward 1."""
        return NAG(1 + float(strength) * (self.scale - 1), self.tau, self.alpha)


@dataclass(frozen=True)
class Guidance:
    """How the sampler uses the negative: CFG (``cfg`` scale; 1 = off), NAG (``nag`` set), or both.

    Under both, the negative is CFG's unconditional input and NAG's negative context of the
    conditional pass; the unconditional pass runs without NAG (as ComfyUI-NAG's guider does)."""

    cfg: float = 7.5
    nag: NAG | None = None

    @property
    def mode(self) -> str:
        if self.nag is None:
            return "cfg"
        return "nag" if self.cfg == 1 else "cfg+nag"

    def describe(self) -> str:
        parts = [] if self.mode == "nag" else [f"CFG {self.cfg:g}"]
        if self.nag is not None:
            parts.append(f"NAG scale {self.nag.scale:g}, tau {self.nag.tau:g}, alpha {self.nag.alpha:g}")
        return " + ".join(parts)

    def metadata(self) -> dict[str, str]:
        """What an embedding file records about the guidance it was learned under."""
        meta = {"guidance": self.mode, "guidance_scale": f"{self.cfg:g}"}
        if self.nag is not None:
            meta.update(nag_scale=f"{self.nag.scale:g}", nag_tau=f"{self.nag.tau:g}", nag_alpha=f"{self.nag.alpha:g}")
        return meta


def as_guidance(scale: "float | Guidance") -> Guidance:
    """The sampler's ``scale`` argument as a :class:`Guidance` (a bare number is a CFG scale)."""
    return scale if isinstance(scale, Guidance) else Guidance(cfg=float(scale))


def make_guidance(mode: str, cfg: float, nag: NAG | None = None) -> Guidance:
    """``--guidance MODE``: ``nag`` samples at CFG 1 whatever ``cfg`` says; ``cfg+nag`` keeps it."""
    if mode not in MODES:
        raise ValueError(f"--guidance must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "cfg":
        return Guidance(cfg=cfg)
    return Guidance(cfg=1.0 if mode == "nag" else cfg, nag=nag or NAG())


def guidance_of(opts, family: str) -> Guidance:
    """The :class:`Guidance` of a command's settings (``guidance``, ``guidance_mode``, ``nag_scale``,
    ``nag_tau``, ``nag_alpha``; see :mod:`reneg.options`) for a model of ``family``: NAG settings
    not given are the family's (:attr:`reneg.families.Family.nag`)."""
    mode = getattr(opts, "guidance_mode", "cfg") or "cfg"
    if mode == "cfg":
        return Guidance(cfg=float(opts.guidance))
    from .families import get_family

    given = (getattr(opts, "nag_scale", None), getattr(opts, "nag_tau", None), getattr(opts, "nag_alpha", None))
    nag = NAG(*(float(v if v is not None else d) for v, d in zip(given, get_family(family).nag)))
    return make_guidance(mode, float(opts.guidance), nag)


# --- the attention both backends use ------------------------------------------------------------------


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Softmax attention of ``q [B, N, H*d]`` over ``k, v [B, L, H*d]`` with ``heads`` heads;
    ``mask``: an additive bias broadcastable to ``[B, H, N, L]``, or a boolean/0-1 ``[B, L]`` keep-mask."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    if mask is not None and mask.dim() == 2:
        mask = mask.to(torch.bool)[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, n, inner)


def guide(
    q: torch.Tensor,
    k_pos: torch.Tensor,
    v_pos: torch.Tensor,
    k_neg: torch.Tensor,
    v_neg: torch.Tensor,
    heads: int,
    nag: NAG,
    mask_pos: torch.Tensor | None = None,
    mask_neg: torch.Tensor | None = None,
) -> torch.Tensor:
    """NAG for one attention layer, from projected queries, keys and values (before the output
    projection): ``Z+`` and ``Z-`` share the queries and differ in the context they attend to."""
    z_pos = attention(q, k_pos, v_pos, heads, mask_pos)
    if not nag.active:
        return z_pos
    z_neg = attention(q, k_neg, v_neg, heads, mask_neg)
    return nag_combine(z_pos, z_neg, nag.scale, nag.tau, nag.alpha)


# --- diffusers ------------------------------------------------------------------------------------------


@dataclass
class NagContext:
    """What one denoiser call hands its attention layers (diffusers' ``cross_attention_kwargs["nag"]``):
    the negative context ``[B, L, D]`` in the model's dtype, its T5 keep-mask ``[B, L]`` or None, the settings."""

    negative: torch.Tensor
    mask: torch.Tensor | None
    nag: NAG


class NAGAttnProcessor:
    """A diffusers attention processor wrapping the one it replaces.

    Self-attention, and any call without a :class:`NagContext`, goes to the wrapped processor
    unchanged (so a model with these installed samples exactly as before). A cross-attention call
    with one computes ``Z+`` and ``Z-`` with :func:`guide` and projects the NAG result."""

    def __init__(self, base):
        self.base = base

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, nag=None, **kw):
        if nag is None or encoder_hidden_states is None or not getattr(attn, "is_cross_attention", False):
            return self.base(
                attn, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kw
            )
        if attn.spatial_norm is not None or attn.group_norm is not None:
            raise ValueError("NAG: a cross-attention layer with spatial or group norm is not supported")
        residual = hidden_states
        four_d = hidden_states.dim() == 4
        if four_d:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch = hidden_states.shape[0]
        neg = _rows(nag.negative.to(hidden_states.dtype), batch)
        pos = encoder_hidden_states
        if attn.norm_cross:
            pos, neg = attn.norm_encoder_hidden_states(pos), attn.norm_encoder_hidden_states(neg)
        q = attn.to_q(hidden_states)
        k_pos, v_pos, k_neg, v_neg = attn.to_k(pos), attn.to_v(pos), attn.to_k(neg), attn.to_v(neg)
        if attn.norm_q is not None or attn.norm_k is not None:
            raise ValueError("NAG: a cross-attention layer with query/key norms is not supported")
        mask_pos = None
        if attention_mask is not None:  # diffusers' additive bias [B, 1, L] from the model's forward
            mask_pos = attention_mask.to(q.dtype).view(batch, 1, -1, attention_mask.shape[-1])
        mask_neg = None
        if nag.mask is not None:
            mask_neg = _rows(nag.mask.to(q.device), batch).bool()
        z = guide(q, k_pos, v_pos, k_neg, v_neg, attn.heads, nag.nag, mask_pos, mask_neg).to(q.dtype)
        z = attn.to_out[1](attn.to_out[0](z))
        if four_d:
            z = z.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            z = z + residual
        return z / attn.rescale_output_factor


def _rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """The negative's rows for a layer that sees ``batch`` rows: one row expanded, or each row repeated
    ``batch / rows`` times in place (a video UNet's per-frame batch, laid out as its ``repeat_interleave``)."""
    n = t.shape[0]
    if n == batch:
        return t
    if n == 1:
        return t.expand(batch, *t.shape[1:])
    if batch % n:
        raise ValueError(f"NAG: a negative of {n} rows for an attention over {batch} rows")
    return t.repeat_interleave(batch // n, 0)


def install(model) -> None:
    """Wrap every attention processor of a diffusers model (UNet, transformer) in
    :class:`NAGAttnProcessor`, once; calls that carry no NAG context run as before."""
    procs = model.attn_processors
    if all(isinstance(p, NAGAttnProcessor) for p in procs.values()):
        return
    model.set_attn_processor(
        {k: p if isinstance(p, NAGAttnProcessor) else NAGAttnProcessor(p) for k, p in procs.items()}
    )


# --- ComfyUI --------------------------------------------------------------------------------------------


class _EveryBlock(dict):
    """ComfyUI's ``patches_replace["attn2"]`` answering every block with one function.

    ComfyUI's BasicTransformerBlock looks a replacement up by ``(block, number, index)`` and then by
    ``block``; this mapping holds for any key, so NAG reaches every transformer block of any UNet
    without listing them. ``copy`` keeps the type (ComfyUI copies the mapping when a patch is added)."""

    def __init__(self, fn, others: dict | None = None):
        super().__init__(others or {})
        self.fn = fn

    def __contains__(self, key) -> bool:
        return True

    def __getitem__(self, key):
        return self.fn

    def get(self, key, default=None):
        return self.fn

    def copy(self):
        return _EveryBlock(self.fn, dict(self))

    def __deepcopy__(self, memo):
        return self.copy()


def comfy_patches(negative: torch.Tensor, nag: NAG) -> tuple:
    """``(attn2_patch, attn2_replace)`` for ComfyUI's transformer-block patch protocol.

    The patch appends the negative's rows to the context the block's ``attn2`` reads; the
    replacement (which ComfyUI calls with ``to_q``/``to_k``/``to_v`` already applied) splits the
    keys and values back into the positive and negative parts and returns NAG's result, which
    ComfyUI sends through ``to_out``. Only the batch rows ComfyUI marks as conditional
    (``cond_or_uncond`` 0) are guided; an unconditional pass attends to its own context alone."""
    neg_rows = negative.shape[1]

    def attn2_patch(n, context, value, extra_options):
        b = context.shape[0]
        neg = negative.to(device=context.device, dtype=context.dtype)
        neg = neg.expand(b, *neg.shape[1:]) if neg.shape[0] != b else neg
        value = context if value is None else value
        return n, torch.cat([context, neg], dim=1), torch.cat([value, neg], dim=1)

    def attn2_replace(q, k, v, extra_options):
        heads = extra_options["n_heads"]
        k_pos, k_neg = k[:, :-neg_rows], k[:, -neg_rows:]
        v_pos, v_neg = v[:, :-neg_rows], v[:, -neg_rows:]
        cou = list(extra_options.get("cond_or_uncond") or [0])
        if all(c == 0 for c in cou):
            return guide(q, k_pos, v_pos, k_neg, v_neg, heads, nag)
        per = q.shape[0] // len(cou)
        rows = torch.tensor([c == 0 for c in cou for _ in range(per)], device=q.device)
        z = attention(q, k_pos, v_pos, heads)
        if not bool(rows.any()):
            return z
        zg = guide(q[rows], k_pos[rows], v_pos[rows], k_neg[rows], v_neg[rows], heads, nag)
        z = z.clone()
        z[rows] = zg.to(z.dtype)
        return z

    return attn2_patch, attn2_replace


def comfy_transformer_options(transformer_options: dict, negative: torch.Tensor, nag: NAG) -> dict:
    """A copy of ComfyUI ``transformer_options`` with NAG's patches added (the ReNeg sampler's
    denoiser in ComfyUI passes this to ``apply_model``)."""
    patch, replace = comfy_patches(negative, nag)
    to = dict(transformer_options)
    patches = {k: list(v) for k, v in to.get("patches", {}).items()}
    patches.setdefault("attn2_patch", []).append(patch)
    to["patches"] = patches
    replaces = dict(to.get("patches_replace", {}))
    if replaces.get("attn2"):
        raise ValueError(
            "NAG: this model already has an attention replacement on its cross-attention (another "
            "node patched attn2); NAG can not be combined with it"
        )
    replaces["attn2"] = _EveryBlock(replace)
    to["patches_replace"] = replaces
    return to


def check_comfy_model(model) -> None:
    """Refuse a ComfyUI model (``patcher.model``) whose blocks do not read the ``attn2`` patches: only
    ComfyUI's UNets (SD1.x, SD2.x, SDXL: no ``image_model`` in their ``unet_config``) go through the
    transformer block that applies them; on a DiT (PixArt, Flux, ...) the patches would change nothing."""
    cfg = getattr(getattr(model, "model_config", None), "unet_config", None)
    image_model = cfg.get("image_model") if isinstance(cfg, dict) else None
    if image_model:
        raise ValueError(
            f"NAG in ComfyUI: this model ({image_model}) does not read ComfyUI's cross-attention patches, "
            "which only its UNets (SD1.x, SD2.x, SDXL) apply; NAG would change nothing here. For Flux, Chroma, "
            "SD3.5 or Wan, connect Load ReNeg Embedding's output to the nag_negative input of ComfyUI-NAG's "
            "KSamplerWithNAG (custom node ChenDarYen/ComfyUI-NAG) instead"
        )


def patch_comfy_model(patcher, negative: torch.Tensor, nag: NAG):
    """A clone of a ComfyUI MODEL (ModelPatcher) that samples with NAG away from ``negative``
    (``[1, L, D]``, our Load node's output or any text encoder's). ``nag`` inactive: the clone is unpatched.
    A model that does not apply ``attn2`` patches is refused (:func:`check_comfy_model`)."""
    check_comfy_model(patcher.model)
    m = patcher.clone()
    if not nag.active:
        return m
    opts = m.model_options.setdefault("transformer_options", {})
    m.model_options["transformer_options"] = comfy_transformer_options(opts, negative.detach(), nag)
    return m

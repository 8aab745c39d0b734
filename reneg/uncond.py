"""Put a negative embedding in place of a host's unconditional conditioning.

Host-independent and pure torch, nothing heavier imported: the AUTOMATIC1111 / Forge / reForge
extension calls :func:`replace_uncond` from its ``on_cfg_denoiser`` callback, and the ComfyUI nodes use
:func:`match_tokens` and :func:`blend` for their strength blend. Nothing here mutates its inputs: every
result is a new tensor or a new dict.
"""

from __future__ import annotations

import copy
from typing import Any, Optional, Tuple, Union

import torch

from .families import describe_hidden as _describe

MARK_VALUE = 1024.0
"""Absolute value of the A1111 ControlNet extension's cond/uncond marker row: it prepends one row filled
with -1024 (+1024 on the positive side) so it can tell cond from uncond, ``[B, 1 + 77 k, D]``."""

MARK_EPS = 1e-3

Uncond = Union[torch.Tensor, dict, None]


def _as_tensor(emb: Any) -> torch.Tensor:
    """Accept a tensor or anything with a ``.tensor`` (a :class:`reneg.embedding.NegEmbedding`)."""
    t = getattr(emb, "tensor", emb)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"expected a tensor or a NegEmbedding, found {type(emb).__name__}")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    if t.dim() != 3:
        raise ValueError(
            f"expected an embedding of shape [1, tokens, hidden] or [B, tokens, hidden], found {list(t.shape)}"
        )
    return t


def match_tokens(emb: Any, length: int) -> torch.Tensor:
    """Repeat ``emb`` ``[B, R, D]`` along the token axis to ``length`` rows.

    ``length`` must be a positive multiple of R (77 k for the CLIP families);
    anything else raises ``ValueError`` (cutting or padding the embedding would
    change what it means). Repeating the embedding k times along the token axis
    gives the same cross-attention output (duplicated keys and values), which is
    why it can meet a host negative of a prompt longer than 75 tokens (``L = 77 k``).
    Always returns a new tensor, never a view of ``emb``.
    """
    t = _as_tensor(emb)
    rows = t.shape[1]
    length = int(length)
    if length <= 0 or rows == 0 or length % rows:
        raise ValueError(
            f"cannot match an embedding of {rows} token rows to {length} rows: "
            f"the length must be a positive multiple of {rows}"
        )
    return t.repeat(1, length // rows, 1)


def blend(base: torch.Tensor, emb: torch.Tensor, strength: float) -> torch.Tensor:
    """Linear blend ``base + strength * (emb - base)``: 0 gives ``base``, 1 gives ``emb``.

    ``emb`` may have batch 1 (broadcast over ``base``'s batch); the token and hidden
    sizes must match (use :func:`match_tokens` first). The arithmetic runs in
    float32 and the result has ``base``'s dtype and device. Always a new tensor.
    """
    s = float(strength)
    emb = emb.to(device=base.device)
    if emb.shape[1:] != base.shape[1:] or emb.shape[0] not in (1, base.shape[0]):
        raise ValueError(
            f"cannot blend an embedding of shape {list(emb.shape)} into conditioning of shape {list(base.shape)}"
        )
    if s == 0.0:
        return base.clone()
    if s == 1.0:
        return emb.to(dtype=base.dtype).expand_as(base).clone()
    out = torch.lerp(base.float(), emb.float().expand_as(base), s)
    return out.to(dtype=base.dtype)


def crossattn_of(cond: Uncond) -> Optional[torch.Tensor]:
    """The cross-attention tensor of a host conditioning (a tensor or an SDXL dict), or None."""
    if isinstance(cond, torch.Tensor):
        return cond
    if isinstance(cond, dict):
        t = cond.get("crossattn")
        return t if isinstance(t, torch.Tensor) else None
    return None


def has_marker(x: torch.Tensor, rows: int = 77) -> bool:
    """True when ``x`` ``[B, 1 + rows k, D]`` starts with the ControlNet marker row (all +-1024)."""
    if x.dim() != 3 or x.shape[1] < 1 + rows or (x.shape[1] - 1) % rows:
        return False
    first = x[:, 0, :].detach().float()
    return bool(((first.abs() - MARK_VALUE).abs() < MARK_EPS).all())


def split_marker(x: torch.Tensor, rows: int = 77) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
    """``(marker [B, 1, D] or None, content [B, L, D])``: views of ``x``, nothing copied."""
    if has_marker(x, rows):
        return x[:, :1, :], x[:, 1:, :]
    return None, x


def content_length(cond: Uncond, rows: int = 77) -> Optional[int]:
    """Token rows of a host conditioning without the ControlNet marker, or None."""
    t = crossattn_of(cond)
    if t is None or t.dim() != 3:
        return None
    return split_marker(t, rows)[1].shape[1]


def replace_uncond(
    text_uncond: Uncond,
    emb: Any,
    strength: float = 1.0,
    length: Optional[int] = None,
    pooled: Optional[torch.Tensor] = None,
) -> Tuple[Uncond, Optional[str]]:
    """Replace (or blend into) a host's negative conditioning.

    Shapes, as ComfyUI, A1111, Forge and reForge pass them:

    * An embedding is ``[1, R, D]`` (R = 77 for the CLIP families) or ``[B, R, D]``.
    * A host's negative conditioning is ``[B, L, D]`` where a prompt longer than 75 tokens gives
      ``L = 77 k`` (:func:`match_tokens` repeats the embedding to it).
    * SDXL hosts pass a dict ``{"crossattn": [B, L, 2048], "vector": [B, 2816]}`` where ``vector`` is the
      pooled text vector ``[B, 1280]`` followed by the size embeddings. ``crossattn`` is replaced; when
      the embedding carries a pooled vector (SDXL files from ``reneg train`` do: the one it was trained
      with), the first 1280 numbers of ``vector`` are replaced too, the size part is kept. (A1111 and
      Forge make an all-zero negative, pooled part included, from an empty SDXL negative prompt.)
    * The A1111 ControlNet extension's marker row (:data:`MARK_VALUE`) makes it ``[B, 1 + 77 k, D]``;
      that row is kept.
    * Forge passes ``None`` at CFG scale 1 (no negative pass at all).

    Args:
        text_uncond: the host's negative conditioning: a tensor ``[B, L, D]``, an SDXL
            dict with ``crossattn`` ``[B, L, D]`` (and ``vector``, kept), or None.
            L may include the ControlNet marker row (kept).
        emb: the embedding, a tensor ``[1, R, D]`` / ``[B, R, D]`` or a NegEmbedding.
        strength: 0 = the host's own negative, 1 = the embedding only, linear between.
        length: optional token rows (without any marker) the result should have
            instead of the host negative's own, e.g. the positive conditioning's
            length, so that the host need not pad. Used only at strength 1 (a blend
            needs the host negative at its own length) and only when it is a
            multiple of R.
        pooled: the embedding's pooled vector ``[1, P]`` (default: ``emb.pooled`` of a
            NegEmbedding). With an SDXL dict, ``vector[:, :P]`` is blended toward it
            like the rows; without one, ``vector`` is kept as it is.

    Returns:
        ``(new, message)``. ``new`` is None when the host's conditioning should be
        left as it is (None input, strength 0, or a mismatch); otherwise a new object
        of the same kind (a dict keeps its class, e.g. A1111's DictWithShape, and its
        other keys), in the host tensor's dtype and device. ``message`` is None or a
        human-readable warning saying why nothing was replaced.
        The inputs are never modified.
    """
    if text_uncond is None:
        return None, None
    s = float(strength)
    if not s == s:  # NaN
        return None, "ReNeg: strength is not a number; the negative prompt is used instead"
    if s == 0.0:
        return None, None
    host = crossattn_of(text_uncond)
    if host is None or host.dim() != 3:
        kind = type(text_uncond).__name__
        keys = f" with keys {sorted(map(str, text_uncond))}" if isinstance(text_uncond, dict) else ""
        return None, f"ReNeg: skipped: unexpected negative conditioning ({kind}{keys})"
    e = _as_tensor(emb)
    rows, hidden = e.shape[1], e.shape[2]
    if host.shape[-1] != hidden:
        return None, (
            f"ReNeg: skipped: the embedding has hidden size {_describe(hidden)} but this "
            f"model's negative conditioning has {_describe(host.shape[-1])}; "
            f"pick an embedding made for this model"
        )
    marker, content = split_marker(host, rows)
    batch, n = content.shape[0], content.shape[1]
    if e.shape[0] not in (1, batch):
        return None, (
            f"ReNeg: skipped: the embedding has batch {e.shape[0]}, the negative conditioning has batch {batch}"
        )
    if n == 0 or n % rows:
        return None, (
            f"ReNeg: skipped: the negative conditioning has {n} token rows, not a multiple of the embedding's {rows}"
        )
    e = e.to(device=host.device)
    if s == 1.0:
        target = n
        if length is not None and int(length) > 0 and int(length) % rows == 0:
            target = int(length)
        new = match_tokens(e, target).to(dtype=host.dtype)  # a new tensor
        if new.shape[0] != batch:
            new = new.expand(batch, -1, -1).contiguous()
    else:
        new = blend(content, match_tokens(e, n), s)
    if marker is not None:
        new = torch.cat([marker.to(dtype=new.dtype), new], dim=1)
    if isinstance(text_uncond, dict):
        out = copy.copy(text_uncond)  # same class (DictWithShape), same other keys
        out["crossattn"] = new
        vector = _with_pooled(text_uncond.get("vector"), getattr(emb, "pooled", None) if pooled is None else pooled, s)
        if vector is not None:
            out["vector"] = vector
        return out, None
    return new, None


def _with_pooled(vector: Any, pooled: Optional[torch.Tensor], strength: float) -> Optional[torch.Tensor]:
    """A new ``vector`` whose first P numbers are blended toward ``pooled`` ``[1, P]``, or None
    (no pooled vector, or a ``vector`` that is not ``[B, more than P]``)."""
    if pooled is None or not isinstance(vector, torch.Tensor) or vector.dim() != 2:
        return None
    pooled = pooled.reshape(-1, pooled.shape[-1])  # [1, P], or [B, P]: one per image (a predictor's)
    n = pooled.shape[1]
    if vector.shape[1] <= n:
        return None
    head = blend(vector[:, None, :n], pooled[:, None, :], strength)[:, 0, :]
    return torch.cat([head, vector[:, n:]], dim=1)

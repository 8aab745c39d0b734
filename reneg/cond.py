"""Conditioning passed to a denoiser, shaped so SD1/SD2, SDXL and later SD3 fit.

``Cond.crossattn`` is what the UNet's cross-attention reads, ``[B, L, D]``.
``pooled`` is the pooled text vector some families need (SDXL ``text_embeds``,
SD3's pooled projection); ``mask`` is the T5 families' attention mask ``[B, L]``
(1 = a token the model reads, 0 = padding it ignores; None = every row counts);
``extra`` carries anything else a backend needs per sample (SDXL's size
conditioning ``time_ids``). ``nag`` is the negative context Normalized Attention Guidance steers
this cond's cross-attention away from (:mod:`reneg.nag`; same batch), ``nag_settings`` its
:class:`reneg.nag.NAG`. The sampler never looks inside: it only batches, expands and detaches conds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any

import torch


@dataclass
class Cond:
    crossattn: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None
    nag: "Cond | None" = None
    nag_settings: Any = None

    @property
    def batch(self) -> int:
        return self.crossattn.shape[0]

    def _map(self, fn) -> "Cond":
        return Cond(
            fn(self.crossattn),
            fn(self.pooled) if self.pooled is not None else None,
            {k: fn(v) for k, v in self.extra.items()},
            fn(self.mask) if self.mask is not None else None,
            self.nag._map(fn) if self.nag is not None else None,
            self.nag_settings,
        )

    def with_nag(self, negative: "Cond", settings) -> "Cond":
        """This cond guided by NAG away from ``negative`` (a batch-1 negative is expanded)."""
        return replace(self, nag=negative.expand(self.batch).without_nag(), nag_settings=settings)

    def without_nag(self) -> "Cond":
        return self if self.nag is None else replace(self, nag=None, nag_settings=None)

    def expand(self, batch: int) -> "Cond":
        """Repeat a batch-1 cond to ``batch`` rows (views, no copies)."""
        if self.batch == batch:
            return self
        if self.batch != 1:
            raise ValueError(f"cannot expand a cond of batch {self.batch} to {batch}")
        return self._map(lambda t: t.expand(batch, *t.shape[1:]))

    def detach(self) -> "Cond":
        return self._map(lambda t: t.detach())

    def to(self, *args, **kwargs) -> "Cond":
        return self._map(lambda t: t.to(*args, **kwargs))

    def index(self, sl) -> "Cond":
        return self._map(lambda t: t[sl])

    @staticmethod
    def cat(conds: list["Cond"]) -> "Cond":
        """Concatenate along the batch; token counts are matched by repetition
        (repeating 77-row blocks leaves the cross-attention output unchanged).

        Masked conds (T5) are padded instead: zero rows the mask marks as padding, which
        the model ignores exactly as it ignores a tokenizer's padding rows."""
        if any(c.nag is not None for c in conds):
            if not all(c.nag is not None and c.nag_settings == conds[0].nag_settings for c in conds):
                raise ValueError("conds with and without NAG (or with different NAG settings) can not be batched")
            plain = Cond.cat([c.without_nag() for c in conds])
            return replace(plain, nag=Cond.cat([c.nag for c in conds]), nag_settings=conds[0].nag_settings)
        length = max(c.crossattn.shape[1] for c in conds)
        if any(c.mask is not None for c in conds):
            return Cond._cat_masked(conds, length)
        if any(length % c.crossattn.shape[1] for c in conds):
            # unpadded T5 rows in a host (ComfyUI): repeat every cond to the least common multiple,
            # as ComfyUI batches its own conds; repeated rows leave cross-attention unchanged
            for c in conds:
                length = length * c.crossattn.shape[1] // math.gcd(length, c.crossattn.shape[1])
        parts = []
        for c in conds:
            n = c.crossattn.shape[1]
            parts.append(c.crossattn.repeat(1, length // n, 1) if n != length else c.crossattn)
        pooled = None
        if any(c.pooled is not None for c in conds):
            if not all(c.pooled is not None for c in conds):
                raise ValueError("some conds carry a pooled vector and some do not")
            pooled = torch.cat([c.pooled for c in conds])
        keys = set(conds[0].extra)
        if any(set(c.extra) != keys for c in conds):
            raise ValueError("conds carry different extra entries")
        extra = {k: torch.cat([c.extra[k] for c in conds]) for k in keys}
        return Cond(torch.cat(parts), pooled, extra)

    @staticmethod
    def _cat_masked(conds: list["Cond"], length: int) -> "Cond":
        rows, masks = [], []
        for c in conds:
            x = c.crossattn
            m = c.mask if c.mask is not None else torch.ones(x.shape[:2], device=x.device)
            pad = length - x.shape[1]
            if pad:
                x = torch.cat([x, x.new_zeros(x.shape[0], pad, x.shape[2])], dim=1)
                m = torch.cat([m, m.new_zeros(m.shape[0], pad)], dim=1)
            rows.append(x)
            masks.append(m)
        dt = masks[0].dtype
        plain = Cond.cat([Cond(x[:, :1], c.pooled, c.extra) for x, c in zip(rows, conds)])
        return Cond(torch.cat(rows), plain.pooled, plain.extra, torch.cat([m.to(dt) for m in masks]))

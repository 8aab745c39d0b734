"""Conditioning passed to a denoiser, shaped so SD1/SD2, SDXL and later SD3 fit.

``Cond.crossattn`` is what the UNet's cross-attention reads, ``[B, L, D]``.
``pooled`` is the pooled text vector some families need (SDXL ``text_embeds``,
SD3's pooled projection); ``extra`` carries anything else a backend needs per
sample (SDXL's size conditioning ``time_ids``, an attention mask). The sampler
never looks inside: it only batches, expands and detaches conds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Cond:
    crossattn: torch.Tensor
    pooled: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch(self) -> int:
        return self.crossattn.shape[0]

    def _map(self, fn) -> "Cond":
        return Cond(fn(self.crossattn),
                    fn(self.pooled) if self.pooled is not None else None,
                    {k: fn(v) for k, v in self.extra.items()})

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
        (repeating 77-row blocks leaves the cross-attention output unchanged)."""
        length = max(c.crossattn.shape[1] for c in conds)
        parts = []
        for c in conds:
            n = c.crossattn.shape[1]
            if length % n:
                raise ValueError(f"cannot batch conds of {n} and {length} tokens")
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

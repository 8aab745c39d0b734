"""What the objective, the trainer, tuning and eval need from a model.

A backend wraps one text-to-image model (a diffusers pipeline, a ComfyUI
MODEL+VAE) behind the few operations ReNeg uses. SDXL adds a pooled vector and
size conditioning, which live in :class:`reneg.cond.Cond` and in
``negative_cond``; nothing above this layer changes for it. PixArt (T5) adds an
attention mask, ``Cond.mask``, which a negative carries too.
"""

from __future__ import annotations

from typing import Protocol

import torch

from ..cond import Cond
from ..sampling import Denoiser


class Backend(Protocol):
    family: str
    device: torch.device
    dtype: torch.dtype  # compute dtype of the denoiser
    # flow-matching models set ``flow = True`` (a class attribute): their ``schedule`` gives flow times t,
    # ending at 0, and the sampler starts from the plain noise (reneg/sampling.py); absent means VE sigmas

    @property
    def denoiser(self) -> Denoiser: ...

    def encode_prompts(self, prompts: list[str]) -> Cond:
        """Positive conditioning ``[B, L, D]`` (+ pooled/extra), no grad."""

    def null_embedding(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``E("")`` as ``[1, L, D]`` (and pooled), the UI conventions' empty negative."""

    def negative_cond(
        self, neg: torch.Tensor, pooled: torch.Tensor | None = None, mask: torch.Tensor | None = None
    ) -> Cond:
        """Turn a (possibly trainable) negative ``[1, L, D]`` into a batch-1 Cond; ``mask`` ``[1, L]``
        is a T5 negative's attention mask (None: the one its rows imply)."""

    def schedule(self, steps: int) -> torch.Tensor:
        """DDIM sigmas ``[steps + 1]`` for this model."""

    def latent_shape(self, batch: int, height: int, width: int) -> tuple[int, ...]: ...

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Differentiable decode of a clean VE/x0 latent to an image in [-1, 1], BCHW."""

"""Plain no-grad generation and scoring with a backend, shared by train, tune and eval (per-sample
tuning is in :mod:`reneg.tuning`)."""

from __future__ import annotations

import torch

from .cond import Cond
from .sampling import initial_latent, is_flow, sample


def text_negative(backend, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A negative prompt as ``(rows [1, L, D], pooled [1, P] or None)``: what a UI makes of it,
    its own pooled vector included (SDXL), for ``backend.negative_cond(rows, pooled)``."""
    c = backend.encode_prompts([text])
    rows = c.crossattn[:1]
    if c.mask is not None:  # T5: the text's own tokens; padding is what the mask leaves out anyway
        rows = rows[:, : max(int(c.mask[0].sum()), 1)]
    return rows, None if c.pooled is None else c.pooled[:1]


def as_embedding(backend, neg: torch.Tensor):
    """A negative as the file it is saved as: the rows, and for SDXL the pooled vector it was
    used with (the empty prompt's, ``negative_cond``'s default)."""
    from .embedding import NegEmbedding
    from .families import family_for_shape, get_family

    pooled = backend.null_embedding()[1]
    family = backend.family
    neg = neg.detach().cpu().float()
    spec = get_family(family)
    if spec.masked:  # a PixArt-alpha file (120 rows) tuned on PixArt-sigma stays a 120-row file
        fits = family_for_shape(neg.shape[-1], neg.shape[1], masked=True)
        if fits.tokens == neg.shape[1]:
            family = fits.name
        elif neg.shape[1] < spec.tokens:  # a text's own rows (a handcrafted start): zero rows are padding
            neg = torch.cat([neg, neg.new_zeros(1, spec.tokens - neg.shape[1], neg.shape[2])], dim=1)
    mask = backend.negative_mask(neg).cpu() if hasattr(backend, "negative_mask") else None
    return NegEmbedding(neg, family, None if pooled is None else pooled.detach().cpu().float(), attention_mask=mask)


def seeded_noise(backend, seeds: list[int], height: int, width: int) -> torch.Tensor:
    """One latent of noise per seed, drawn on the CPU so it is the same on every device."""
    shape = backend.latent_shape(1, height, width)[1:]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(
        backend.device
    )


@torch.no_grad()
def generate(
    backend, cond: Cond, uncond: Cond, noise: torch.Tensor, steps: int, guidance: float, callback=None
) -> torch.Tensor:
    """Images in [-1, 1] from DDIM with CFG; ``noise`` is unit-variance latent noise."""
    sigmas = backend.schedule(steps)
    x = initial_latent(noise.float(), sigmas[0], is_flow(backend))
    _, x0 = sample(backend.denoiser, x, sigmas, cond, uncond, guidance, callback=callback)
    return backend.decode(x0)


@torch.no_grad()
def generate_and_score(
    backend,
    reward,
    prompts: list[str],
    seeds: list[int],
    uncond: Cond,
    steps: int,
    guidance: float,
    height: int,
    width: int,
    batch: int = 4,
    keep_images: bool = False,
):
    """Scores (and optionally images) for ``prompts[i]`` with ``seeds[i]`` and one negative."""
    scores, images = [], []
    for i in range(0, len(prompts), batch):
        p, s = prompts[i : i + batch], seeds[i : i + batch]
        img = generate(
            backend, backend.encode_prompts(p), uncond, seeded_noise(backend, s, height, width), steps, guidance
        )
        scores.append(reward(img, p).float().cpu())
        if keep_images:
            images.append(img.cpu())
    out = torch.cat(scores)
    return (out, torch.cat(images)) if keep_images else out

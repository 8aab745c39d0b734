"""Plain no-grad generation and scoring with a backend, shared by train, tune and eval."""

from __future__ import annotations

import torch

from .cond import Cond
from .sampling import initial_latent, sample


def seeded_noise(backend, seeds: list[int], height: int, width: int) -> torch.Tensor:
    """One latent of noise per seed, drawn on the CPU so it is the same on every device."""
    shape = backend.latent_shape(1, height, width)[1:]
    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s)))
                        for s in seeds]).to(backend.device)


@torch.no_grad()
def generate(backend, cond: Cond, uncond: Cond, noise: torch.Tensor, steps: int, guidance: float,
             callback=None) -> torch.Tensor:
    """Images in [-1, 1] from DDIM with CFG; ``noise`` is unit-variance latent noise."""
    sigmas = backend.schedule(steps)
    x = initial_latent(noise.float(), sigmas[0])
    _, x0 = sample(backend.denoiser, x, sigmas, cond, uncond, guidance, callback=callback)
    return backend.decode(x0)


@torch.no_grad()
def generate_and_score(backend, reward, prompts: list[str], seeds: list[int], uncond: Cond,
                       steps: int, guidance: float, height: int, width: int, batch: int = 4,
                       keep_images: bool = False):
    """Scores (and optionally images) for ``prompts[i]`` with ``seeds[i]`` and one negative."""
    scores, images = [], []
    for i in range(0, len(prompts), batch):
        p, s = prompts[i:i + batch], seeds[i:i + batch]
        img = generate(backend, backend.encode_prompts(p), uncond, seeded_noise(backend, s, height, width),
                       steps, guidance)
        scores.append(reward(img, p).float().cpu())
        if keep_images:
            images.append(img.cpu())
    out = torch.cat(scores)
    return (out, torch.cat(images)) if keep_images else out

"""Diversity of images in a reward model's feature space: the first sign of reward hacking.

A negative that learns what the reward likes rather than what people like tends to make every
image of a prompt look alike (D2-Align, arXiv 2512.24146: "overly smooth and glossy" images with
collapsed diversity under HPSv2.1). The measure here is the mean pairwise cosine distance,
``1 - cos(f_i, f_j)``, between the L2-normalised image features of a group of images (the images of
one prompt across seeds), from a model already loaded: the image tower of the first reward that has
one (:meth:`reneg.rewards.Reward.image_features`). Identical images score 0; the more the images
differ in what that tower sees, the higher the score (at most 2).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import torch


def pairwise_diversity(features: torch.Tensor) -> float | None:
    """Mean ``1 - cos`` over the distinct pairs of the rows of ``features`` ``[N, D]``; None for N < 2."""
    if features.ndim != 2:
        raise ValueError(f"features: expected [N, D], found shape {tuple(features.shape)}")
    n = features.shape[0]
    if n < 2:
        return None
    f = features.double()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    iu = torch.triu_indices(n, n, offset=1)
    # for unit vectors 1 - cos(a, b) = |a - b|^2 / 2: exactly 0 for identical rows (1 - a.a is not, by
    # rounding), and no cancellation for the near-identical images a collapsed negative makes
    d = f[iu[0]] - f[iu[1]]
    return float((d * d).sum(-1).mean() / 2)


def diversity_by_group(features: torch.Tensor, groups: Sequence[Hashable]) -> dict:
    """``{group: diversity}`` for every group with at least two rows (``groups[i]`` is row i's group,
    e.g. its prompt); the images of a prompt across seeds give that prompt's diversity."""
    if len(groups) != features.shape[0]:
        raise ValueError(f"{len(groups)} group labels for {features.shape[0]} feature rows")
    rows: dict = {}
    for i, g in enumerate(groups):
        rows.setdefault(g, []).append(i)
    out = {}
    for g, idx in rows.items():
        d = pairwise_diversity(features[idx])
        if d is not None:
            out[g] = d
    return out


@torch.no_grad()
def image_features(reward, images: torch.Tensor, batch: int = 32) -> torch.Tensor | None:
    """Features of ``images`` ([-1, 1]) from ``reward``'s image tower in batches, or None when it has none."""
    parts = []
    for i in range(0, images.shape[0], batch):
        f = reward.image_features(images[i : i + batch])
        if f is None:
            return None
        parts.append(f.float().cpu())
    return torch.cat(parts) if parts else None

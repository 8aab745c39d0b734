"""Temporal measures of a video that need no model of their own (VBench's definitions).

- ``temporal_flickering``: VBench's temporal flickering score, ``1 - mean |frame[i+1] - frame[i]|`` with
  pixels in [0, 1] (VBench's ``(255 - MAE) / 255``); 1 = no change between consecutive frames.
- ``consistency``: VBench's subject / background consistency formula, the mean over frames ``i >= 1``
  of ``(cos(f_i, f_0) + cos(f_i, f_{i-1})) / 2``, on the image features of the first reward that has an
  image tower (VBench takes DINO features for subjects and CLIP features for backgrounds; with one
  feature extractor the two are one number).

Both are higher-is-better, so ``reneg eval`` reports them beside the rewards (means, paired differences,
win rates). They score steadiness, not quality: a still video scores 1 on both.
"""

from __future__ import annotations

import torch

FLICKER = "temporal_flickering"
CONSISTENCY = "consistency"
MEASURES = (FLICKER, CONSISTENCY)


def flickering(frames: torch.Tensor) -> torch.Tensor:
    """``[N, F, 3, H, W]`` frames in [-1, 1] -> ``[N]`` VBench temporal flickering scores."""
    if frames.shape[1] < 2:
        raise ValueError("temporal flickering needs at least 2 frames")
    diff = (frames[:, 1:] - frames[:, :-1]).abs() / 2  # pixel units of [0, 1]
    return 1 - diff.flatten(1).mean(1)


def consistency(features: torch.Tensor) -> torch.Tensor:
    """``[N, F, D]`` per-frame image features -> ``[N]`` VBench consistency scores."""
    if features.shape[1] < 2:
        raise ValueError("consistency needs at least 2 frames")
    f = features.float()
    f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    to_first = (f[:, 1:] * f[:, :1]).sum(-1)
    to_prev = (f[:, 1:] * f[:, :-1]).sum(-1)
    return ((to_first + to_prev) / 2).mean(1)


@torch.no_grad()
def temporal_scores(x: torch.Tensor, f: int, rewards) -> dict[str, torch.Tensor]:
    """``x`` ``[N * F, 3, H, W]`` (N videos of F frames) -> ``{measure: [N]}``; ``consistency`` only where a
    reward has image features. Nothing for single frames."""
    if f < 2:
        return {}
    n = x.shape[0] // f
    out = {FLICKER: flickering(x.float().view(n, f, *x.shape[1:])).cpu()}
    for r in rewards:
        fx = r.image_features(x)
        if fx is not None:
            out[CONSISTENCY] = consistency(fx.float().view(n, f, -1)).cpu()
            break
    return out

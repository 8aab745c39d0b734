"""Differentiable CLIP preprocessing, as CLIP's PIL pipeline does it (shorter side to the size, bicubic
with antialiasing, centre crop, normalise), on tensors: it never goes through PIL, so gradients flow."""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """[-1, 1] BCHW -> [0, 1] -> resize shorter side to ``size`` (bicubic, antialias)
    -> centre crop ``size`` -> normalise."""
    x = ((images + 1) / 2).clamp(0, 1)
    h, w = x.shape[-2:]
    if min(h, w) != size:
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    x = x[..., top : top + size, left : left + size]
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s

"""Differentiable CLIP preprocessing on tensors, never through PIL, so gradients flow.

It is torchvision's ``Resize(size, interpolation=BICUBIC, antialias=True)`` + ``CenterCrop(size)`` +
``Normalize(mean, std)``, the evaluation transform of OpenAI CLIP, open_clip (HPS) and ImageReward,
computed the way torchvision computes it on tensors (:func:`clip_preprocess`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def resized_size(h: int, w: int, size: int) -> tuple[int, int]:
    """(height, width) after resizing the shorter side of an ``h`` x ``w`` image to ``size``, as
    torchvision (and Hugging Face's image processors) compute it: the longer side becomes
    ``int(size * long / short)`` (truncated, not rounded)."""
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = size, int(size * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    return new_h, new_w


def resize_shorter(x: torch.Tensor, size: int) -> torch.Tensor:
    """Shorter side to ``size``, bicubic with antialiasing, as torchvision's tensor ``resize``
    (``F.interpolate(mode="bicubic", antialias=True)``); an image already at that size is left as it is."""
    h, w = x.shape[-2:]
    out = resized_size(h, w, size)
    if (h, w) == out:
        return x
    dtype = x.dtype
    if dtype not in (torch.float32, torch.float64):  # torchvision resizes other dtypes in float32
        x = x.float()
    x = F.interpolate(x, size=out, mode="bicubic", align_corners=False, antialias=True)
    return x.to(dtype)


def _offset(excess: int, how: str) -> int:
    if how == "round":
        return int(round(excess / 2.0))
    if how == "floor":
        return int(excess / 2.0)
    raise ValueError(f"crop offset must be 'round' (torchvision) or 'floor' (Hugging Face), not {how!r}")


def center_crop(x: torch.Tensor, size: int, offset: str = "round") -> torch.Tensor:
    """Centre crop ``size`` x ``size`` as torchvision's ``center_crop`` (``offset="round"``: the crop
    starts at ``int(round((side - size) / 2.0))``, Python's rounding, halves to even) or Hugging Face's
    ``CLIPImageProcessor`` (PickScore's reference), which differs only in truncating that offset
    (``"floor"``). Sides shorter than ``size`` are padded with zeros first, as both do:
    ``(size - side) // 2`` before and the rest after."""
    h, w = x.shape[-2:]
    if size > h or size > w:
        pad_w, pad_h = max(size - w, 0), max(size - h, 0)
        x = F.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = x.shape[-2:]
        if h == size and w == size:
            return x
    top, left = _offset(h - size, offset), _offset(w - size, offset)
    return x[..., top : top + size, left : left + size]


def clip_preprocess(
    images: torch.Tensor, size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD, crop_offset: str = "round"
) -> torch.Tensor:
    """[-1, 1] BCHW -> [0, 1] -> shorter side to ``size`` (bicubic, antialias) -> centre crop ``size``
    -> normalise; :func:`resized_size` and :func:`center_crop` give the exact sizes and offsets.
    ``tests/test_rewards_preprocess.py`` compares both crop offsets with the libraries themselves."""
    x = ((images + 1) / 2).clamp(0, 1)
    x = center_crop(resize_shorter(x, size), size, crop_offset)
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - m) / s

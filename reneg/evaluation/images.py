"""The eval's image files: one PNG per image (an animated PNG per video) under ``OUT/images``."""

from __future__ import annotations

import os

import numpy as np
import torch

from reneg.fileio import atomic_path

from .config import EvalError

IMAGE_DIR = "images"


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 3, H, W] in [-1, 1] -> [N, H, W, 3] uint8."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def save_frames(path: str, frames: torch.Tensor, fps: int = 8) -> None:
    """One image (``frames`` [1,3,H,W]) as PNG, several as an animated PNG, written atomically."""
    from PIL import Image

    arr = to_uint8(frames)
    ims = [Image.fromarray(a) for a in arr]
    with atomic_path(path) as tmp:
        if len(ims) == 1:
            ims[0].save(tmp, format="PNG")
        else:
            ims[0].save(tmp, format="PNG", save_all=True, append_images=ims[1:], duration=int(1000 / fps), loop=0)


def load_frames(path: str) -> torch.Tensor:
    """A PNG (or animated PNG) as [F, 3, H, W] in [-1, 1]."""
    from PIL import Image, ImageSequence

    try:
        with Image.open(path) as im:
            frames = [np.asarray(f.convert("RGB")) for f in ImageSequence.Iterator(im)]
    except (OSError, ValueError, SyntaxError) as e:
        raise EvalError(f"{path}: unreadable image ({e}); delete it and rerun to make it again") from None
    x = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def image_ok(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, ValueError, SyntaxError):
        return False

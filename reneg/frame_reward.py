"""A video's reward from an image reward: each frame scored, the mean per video.

Only torch is imported here, and nothing of the core by its absolute name: ComfyUI's Per-Sample ReNeg
Tune imports this module from the node pack, where the core is the pack's own ``reneg`` subpackage,
not an installed ``reneg``."""

from __future__ import annotations

import torch


class FrameReward(torch.nn.Module):
    """Scores ``[B*F, 3, H, W]`` frames with an image reward; returns the mean over each video's F frames.

    Its image features (:meth:`image_features`) are a video's: the mean of its frames' normalised features,
    so the diversity of videos is measured as ``reneg eval`` measures it."""

    def __init__(self, reward, frames: int):
        super().__init__()
        self.reward, self.frames = reward, frames
        self.name = getattr(reward, "name", "reward")

    def _videos(self, images: torch.Tensor, what: str) -> int:
        f = self.frames
        if images.shape[0] % f:
            raise ValueError(f"FrameReward: {images.shape[0]} frames are not whole videos of {f} frames ({what})")
        return images.shape[0] // f

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        f = self.frames
        if images.shape[0] != len(prompts) * f:
            raise ValueError(f"FrameReward: {images.shape[0]} frames for {len(prompts)} prompts x {f} frames")
        s = self.reward(images, [p for p in prompts for _ in range(f)])
        return s.view(len(prompts), f).mean(1)

    def image_features(self, images: torch.Tensor) -> torch.Tensor | None:
        """``[B*F, 3, H, W]`` -> ``[B, D]``: the mean of each video's frames' L2-normalised features, or None
        when the image reward has no image tower."""
        n = self._videos(images, "image features")
        get = getattr(self.reward, "image_features", None)
        x = get(images) if get is not None else None
        if x is None:
            return None
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return x.view(n, self.frames, -1).mean(1)

    def enable_gradient_checkpointing(self) -> None:
        if hasattr(self.reward, "enable_gradient_checkpointing"):
            self.reward.enable_gradient_checkpointing()


def per_frame(reward, frames: int):
    """``reward`` itself for images (``frames`` 1), else a :class:`FrameReward` of it."""
    return reward if int(frames) <= 1 else FrameReward(reward, int(frames))

"""A video's reward from an image reward: each frame scored, the mean per video.

Only torch is imported here, and nothing of the core by its absolute name: ComfyUI's Per-Sample ReNeg
Tune imports this module from the node pack, where the core is the pack's own ``reneg`` subpackage,
not an installed ``reneg``."""

from __future__ import annotations

import torch


class FrameReward(torch.nn.Module):
    """Scores ``[B*F, 3, H, W]`` frames with an image reward; returns the mean over each video's F frames."""

    def __init__(self, reward, frames: int):
        super().__init__()
        self.reward, self.frames = reward, frames
        self.name = getattr(reward, "name", "reward")

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        f = self.frames
        if images.shape[0] != len(prompts) * f:
            raise ValueError(f"FrameReward: {images.shape[0]} frames for {len(prompts)} prompts x {f} frames")
        s = self.reward(images, [p for p in prompts for _ in range(f)])
        return s.view(len(prompts), f).mean(1)

"""LAION aesthetic predictor: an MLP on the normalised CLIP ViT-L/14 image embedding.

``aesthetic=MLP_FILE,clip=CLIP_FOLDER``: the MLP is 768-1024-128-64-16-1 with keys
``layers.{0,2,4,6,7}`` (e.g. ``sac+logos+ava1-l14-linearMSE.pth``); the CLIP is a
local Hugging Face ``CLIPModel`` folder of
OpenAI's ViT-L/14.
"""

from __future__ import annotations

import os

import torch

from ..fileio import safe_torch_load
from . import Reward, register
from .preprocess import clip_preprocess


class AestheticMLP(torch.nn.Module):
    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = torch.nn.Sequential(
            torch.nn.Linear(dim, 1024),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(1024, 128),
            torch.nn.Dropout(0.2),
            torch.nn.Linear(128, 64),
            torch.nn.Dropout(0.1),
            torch.nn.Linear(64, 16),
            torch.nn.Linear(16, 1),
        )

    def forward(self, x):
        return self.layers(x)


class Aesthetic(Reward):
    def __init__(self, vision, mlp, size: int):
        super().__init__()
        self.vision, self.mlp, self.size = vision, mlp, size

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.vision.parameters())
        x = clip_preprocess(images.to(p.device, torch.float32), self.size).to(p.dtype)
        emb = self.vision.get_image_features(pixel_values=x)
        emb = getattr(emb, "pooler_output", emb).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        emb = self.image_features(images)
        return self.mlp(emb.to(next(self.mlp.parameters()).dtype)).squeeze(-1).float()


@register(
    "aesthetic",
    "LAION aesthetic MLP file (e.g. sac+logos+ava1-l14-linearMSE.pth); clip= the CLIP "
    "ViT-L/14 folder (Hugging Face format)",
    required=("clip",),
    path_options={"clip": "folder"},
)
def load_aesthetic(path, device="cpu", dtype=torch.float32, clip=None, **unused):
    if unused:
        raise ValueError(f"aesthetic reward: unknown options {', '.join(unused)} (known: clip)")
    if not clip or not os.path.isfile(os.path.join(clip, "config.json")):
        raise ValueError(
            f"aesthetic reward {path}: needs clip=FOLDER, a local Hugging Face "
            f"CLIP ViT-L/14 folder with config.json (got {clip!r})"
        )
    from transformers import CLIPModel

    sd = safe_torch_load(path, what="aesthetic MLP")
    if isinstance(sd, dict) and "state_dict" in sd:
        sd = sd["state_dict"]
    w0 = sd.get("layers.0.weight") if isinstance(sd, dict) else None
    if not isinstance(w0, torch.Tensor) or w0.dim() != 2 or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(
            f"{path}: expected an aesthetic MLP state_dict of tensors with keys layers.0..7, found {type(sd).__name__}"
        )
    dim = w0.shape[1]
    mlp = AestheticMLP(dim)
    try:
        mlp.load_state_dict(sd)
    except (RuntimeError, TypeError, KeyError) as e:
        raise ValueError(f"{path}: not an aesthetic MLP of the expected shape: {str(e)[:300]}") from None
    if not all(torch.isfinite(p).all() for p in mlp.parameters()):
        raise ValueError(f"{path}: the aesthetic MLP has NaN/inf weights; the file is corrupt")
    vision = CLIPModel.from_pretrained(clip, local_files_only=True, torch_dtype=dtype)
    if vision.config.projection_dim != dim:
        raise ValueError(
            f"{path}: the MLP expects {dim}-d CLIP embeddings but {clip} gives {vision.config.projection_dim}"
        )
    return Aesthetic(vision.to(device), mlp.to(device=device, dtype=dtype), int(vision.config.vision_config.image_size))

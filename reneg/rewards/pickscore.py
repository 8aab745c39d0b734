"""PickScore: a CLIP ViT-H/14 in Hugging Face format, from a local folder.

Score = ``logit_scale.exp() * cosine(image, text)``. The folder holds the model
(``config.json`` + weights) and its processor/tokenizer files.
"""

from __future__ import annotations

import os

import torch

from . import Reward, register
from .preprocess import clip_preprocess


class PickScore(Reward):
    def __init__(self, model, tokenizer, mean, std):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.size = int(model.config.vision_config.image_size)
        self.mean, self.std = tuple(mean), tuple(std)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.model.parameters())
        # as its reference, Hugging Face's CLIPImageProcessor: torchvision's resize, crop offset truncated
        x = clip_preprocess(images.to(p.device, torch.float32), self.size, self.mean, self.std, crop_offset="floor")
        img = self.model.get_image_features(pixel_values=x.to(p.dtype))
        img = getattr(img, "pooler_output", img).float()
        return img / img.norm(dim=-1, keepdim=True)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        p = next(self.model.parameters())
        img = self.image_features(images)
        with torch.no_grad():
            tok = self.tokenizer(
                prompts,
                padding="max_length",
                truncation=True,
                max_length=self.tokenizer.model_max_length,
                return_tensors="pt",
            ).to(p.device)
            txt = self.model.get_text_features(**tok)
            txt = getattr(txt, "pooler_output", txt).float()
        txt = txt / txt.norm(dim=-1, keepdim=True)
        return self.model.logit_scale.exp().float() * (img * txt).sum(-1)


@register(
    "pickscore", "PickScore: a local Hugging Face CLIPModel folder (model and tokenizer files)", path_kind="folder"
)
def load_pickscore(path, device="cpu", dtype=torch.float32, **unused):
    if unused:
        raise ValueError(f"pickscore reward: unknown options {', '.join(unused)}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ValueError(
            f"{path}: expected a Hugging Face CLIPModel folder with config.json (and model weights and tokenizer files)"
        )
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(path, local_files_only=True, torch_dtype=dtype).to(device)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    mean, std = _processor_stats(path)
    return PickScore(model, tokenizer, mean, std)


def _processor_stats(path):
    import json

    from .preprocess import OPENAI_MEAN, OPENAI_STD

    pp = os.path.join(path, "preprocessor_config.json")
    if os.path.isfile(pp):
        with open(pp, encoding="utf-8") as f:
            cfg = json.load(f)
        return cfg.get("image_mean", OPENAI_MEAN), cfg.get("image_std", OPENAI_STD)
    return OPENAI_MEAN, OPENAI_STD

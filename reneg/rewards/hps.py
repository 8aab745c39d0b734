"""HPSv2 / HPSv2.1: an OpenCLIP model fine-tuned on human preferences.

Checkpoint: ``HPS_v2_compressed.pt`` / ``HPS_v2.1_compressed.pt``, a dict with a full
``state_dict`` for ``open_clip.create_model("ViT-H-14")`` (no LAION weights needed).
Score: cosine of the L2-normalised image and text features (the benchmark
reports x 100). Another architecture is given as ``config=FILE.json`` (an open_clip
model config, bare or under ``model_cfg``), or an ``open_clip_config.json`` lying
beside the checkpoint; the demo world's reward uses that.
"""

from __future__ import annotations

import json
import os

import torch

from ..fileio import safe_torch_load
from . import Reward, quiet_library_messages, register
from .preprocess import clip_preprocess


def _image_size(visual) -> int:
    s = getattr(visual, "image_size", 224)
    return int(s[0] if isinstance(s, (tuple, list)) else s)


def build_open_clip(arch: str | None, config: str | None, source: str):
    """An untrained open_clip model and its tokenizer, from a known name or a config file."""
    import open_clip

    if config:
        try:
            with open(config, encoding="utf-8") as f:
                cfg = json.load(f)
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config}: not a readable open_clip config JSON ({e})") from None
        cfg = cfg.get("model_cfg", cfg)
        if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
            raise ValueError(
                f"{config}: expected an open_clip model config with embed_dim, "
                f"vision_cfg and text_cfg; found keys {', '.join(cfg)}"
            )
        cls = open_clip.CustomTextCLIP if cfg.get("custom_text") else open_clip.CLIP
        kwargs = {k: v for k, v in cfg.items() if k != "custom_text"}
        model = cls(**kwargs)
        tokenizer = open_clip.SimpleTokenizer(context_length=cfg["text_cfg"].get("context_length", 77))
        return model, tokenizer
    arch = arch or "ViT-H-14"
    if arch not in open_clip.list_models():
        raise ValueError(f"{source}: unknown open_clip architecture {arch!r}")
    # no download: the weights come from the checkpoint, which must fill every key (checked after);
    # open_clip's "initialized randomly" warning would describe a state the user never sees
    with quiet_library_messages("No pretrained weights loaded for model"):
        model = open_clip.create_model(arch, pretrained=None)
    return model, open_clip.get_tokenizer(arch)


def load_state_dict_into(model: torch.nn.Module, path: str, what: str) -> None:
    ckpt = safe_torch_load(path, what=what)
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{path}: expected a {what} holding a state_dict of tensors, found {type(ckpt).__name__}")
    sd = {k[7:] if k.startswith("module.") else k: v for k, v in sd.items()}
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: this {what} does not match the architecture: {len(missing)} missing keys "
            f"({', '.join(missing[:3])}), {len(unexpected)} unexpected ({', '.join(unexpected[:3])}), "
            f"{len(wrong)} with another shape ({', '.join(wrong[:3])})"
        )
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # a corrupt download: NaN rewards would only show up as skipped training steps
        raise ValueError(
            f"{path}: this {what} has NaN/inf values in {len(bad)} tensors ({', '.join(bad[:3])}); the file is corrupt"
        )
    model.load_state_dict(sd)


class OpenClipScore(Reward):
    """Cosine similarity of normalised open_clip image and text features, per image."""

    def __init__(self, model, tokenizer, scale: float = 1.0):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.size = _image_size(model.visual)
        self.scale = scale
        self._text_cache: dict[str, torch.Tensor] = {}

    def enable_gradient_checkpointing(self) -> bool:
        # the image tower only: text features are computed once per prompt without grad
        visual = self.model.visual
        if not hasattr(visual, "transformer") or not hasattr(visual, "set_grad_checkpointing"):
            return False  # e.g. open_clip's ModifiedResNet towers ignore the switch
        visual.set_grad_checkpointing(True)
        return True

    def text_features(self, prompts: list[str]) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        missing = [p for p in dict.fromkeys(prompts) if p not in self._text_cache]
        if missing:
            # one prompt at a time: a prompt's features must not depend on the prompts that happened to
            # be encoded with it (matmul results vary with the batch in the last bit), or a resumed
            # training run, whose cache starts empty, would drift from the uninterrupted one
            with torch.no_grad():
                for p in missing:
                    f = self.model.encode_text(self.tokenizer([p]).to(dev)).float()[0]
                    self._text_cache[p] = f / f.norm()
            if len(self._text_cache) > 4096:
                self._text_cache.clear()
        return torch.stack([self._text_cache[p] for p in prompts]).to(dev)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        p = next(self.model.parameters())
        work = torch.promote_types(p.dtype, torch.float32)  # fp32 at least, fp64 kept for checks
        x = clip_preprocess(images.to(p.device, work), self.size).to(p.dtype)
        img = self.model.encode_image(x).to(work)
        return img / img.norm(dim=-1, keepdim=True)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        img = self.image_features(images)
        return self.scale * (img * self.text_features(prompts).to(img.dtype)).sum(-1)


def _load_hps(path, device="cpu", dtype=torch.float32, arch=None, config=None, **unused):
    if unused:
        raise ValueError(f"hps reward: unknown options {', '.join(unused)} (known: arch, config)")
    if config is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), "open_clip_config.json")
        config = beside if os.path.isfile(beside) else None
    model, tokenizer = build_open_clip(arch, config, path)
    load_state_dict_into(model, path, "HPS checkpoint")
    return OpenClipScore(model.to(device=device, dtype=dtype), tokenizer)


_HPS_OPTIONS = dict(options=("arch",), path_options={"config": "file"})
register(
    "hpsv2",
    "HPSv2 checkpoint (HPS_v2_compressed.pt); arch= an open_clip name (default ViT-H-14), "
    "config= an open_clip model config JSON",
    **_HPS_OPTIONS,
)(_load_hps)
register(
    "hpsv2.1",
    "HPSv2.1 checkpoint (HPS_v2.1_compressed.pt); arch= an open_clip name (default ViT-H-14), "
    "config= an open_clip model config JSON",
    **_HPS_OPTIONS,
)(_load_hps)

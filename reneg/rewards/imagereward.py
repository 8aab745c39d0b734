"""ImageReward: BLIP's ViT-L/16 image encoder, a BERT-base text encoder that cross-attends to
the image, and an MLP head; the score is standardised with fixed constants.

``imagereward=ImageReward.pt[,tokenizer=FOLDER][,config=FILE.json]``. The network is written here
in plain torch, with the ``image-reward`` package's names, so that neither that package nor its
``timm``/``fairscale`` pins are needed (docs/rewards.md, "ImageReward").
"""

from __future__ import annotations

import copy
import json
import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from . import Reward, register
from .preprocess import clip_preprocess

# What the package builds (ImageReward/ImageReward.py, models/BLIP/blip.py create_vit("large"),
# and med_config.json with encoder_width set to the ViT's width).
PUBLISHED: dict = {
    "image_size": 224,
    "max_length": 35,  # tokens, [CLS] and [SEP] included
    "score_mean": 0.16717362830052426,
    "score_std": 1.0333394966054072,
    "embed_dim": 256,  # blip.vision_proj / blip.text_proj (in the checkpoint, unused by the score)
    "vision": {"width": 1024, "layers": 24, "heads": 16, "patch_size": 16, "mlp_ratio": 4.0, "layer_norm_eps": 1e-6},
    "text": {
        "vocab_size": 30524,
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "intermediate_size": 3072,
        "max_position_embeddings": 512,
        "layer_norm_eps": 1e-12,
        "pad_token_id": 0,
    },
}
# keys a checkpoint may hold that are not weights: the text encoder's position-id buffer (0..511)
IGNORED_KEYS = ("blip.text_encoder.embeddings.position_ids",)
TOKENIZER_FOLDERS = ("tokenizer", "bert-base-uncased")
HF_CACHE_NAMES = ("bert-base-uncased", "google-bert/bert-base-uncased")


def merge_config(override: dict | None, source: str = "config") -> dict:
    """:data:`PUBLISHED` with the keys of ``override`` replaced; unknown keys are an error."""
    cfg = copy.deepcopy(PUBLISHED)
    for k, v in (override or {}).items():
        if k not in cfg:
            raise ValueError(f"{source}: unknown ImageReward config key {k!r} (known: {', '.join(cfg)})")
        if isinstance(cfg[k], dict):
            if not isinstance(v, dict):
                raise ValueError(f"{source}: {k!r} must be an object, found {type(v).__name__}")
            bad = [kk for kk in v if kk not in cfg[k]]
            if bad:
                raise ValueError(f"{source}: unknown {k} key(s) {', '.join(bad)} (known: {', '.join(cfg[k])})")
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg


# --------------------------------------------------------------------------- the image encoder (BLIP ViT)


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, width: int):
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch, stride=patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _ViTAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c))


class _ViTMlp(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _ViTBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_ratio: float, eps: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.attn = _ViTAttention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.mlp = _ViTMlp(width, int(width * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """BLIP's ViT (timm layout): patch embedding, [CLS] + learned positions, pre-norm blocks, final norm."""

    def __init__(
        self,
        image_size: int,
        width: int,
        layers: int,
        heads: int,
        patch_size: int,
        mlp_ratio: float,
        layer_norm_eps: float,
    ):
        super().__init__()
        n = (image_size // patch_size) ** 2
        self.patch_embed = _PatchEmbed(patch_size, width)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, width))
        self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, width))
        self.blocks = nn.ModuleList(_ViTBlock(width, heads, mlp_ratio, layer_norm_eps) for _ in range(layers))
        self.norm = nn.LayerNorm(width, eps=layer_norm_eps)
        self.grad_checkpointing = False

    def forward(self, x):
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)
        x = x + self.pos_embed[:, : x.shape[1]]
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled():
                from torch.utils.checkpoint import checkpoint

                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
        return self.norm(x)


# --------------------------------------------------------------------------- the text encoder (BLIP "med" BERT)


class _Linear3(nn.Module):
    """BERT's ``self`` block: query, key, value (key/value read the image for cross-attention)."""

    def __init__(self, hidden: int, kv_width: int):
        super().__init__()
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(kv_width, hidden)
        self.value = nn.Linear(kv_width, hidden)


class _DenseNorm(nn.Module):
    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x, residual):
        return self.LayerNorm(self.dense(x) + residual)


class _BertAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, kv_width: int, eps: float):
        super().__init__()
        self.heads = heads
        self.self = _Linear3(hidden, kv_width)
        self.output = _DenseNorm(hidden, hidden, eps)

    def forward(self, x, context, mask):
        b, n, h = x.shape
        d = h // self.heads

        def split(t):
            return t.view(b, -1, self.heads, d).transpose(1, 2)

        q, k, v = split(self.self.query(x)), split(self.self.key(context)), split(self.self.value(context))
        scores = q @ k.transpose(-1, -2) / math.sqrt(d)
        if mask is not None:
            scores = scores + mask
        out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, h)
        return self.output(out, x)


class _Dense(nn.Module):
    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)


class _BertLayer(nn.Module):
    def __init__(self, hidden: int, heads: int, inter: int, encoder_width: int, eps: float):
        super().__init__()
        self.attention = _BertAttention(hidden, heads, hidden, eps)
        self.crossattention = _BertAttention(hidden, heads, encoder_width, eps)
        self.intermediate = _Dense(hidden, inter)
        self.output = _DenseNorm(inter, hidden, eps)

    def forward(self, x, mask, image):
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image, None)  # every image token is attended to
        return self.output(F.gelu(self.intermediate.dense(x)), x)


class _BertEmbeddings(nn.Module):
    def __init__(self, vocab: int, hidden: int, positions: int, eps: float, pad: int):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab, hidden, padding_idx=pad)
        self.position_embeddings = nn.Embedding(positions, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=eps)

    def forward(self, ids):
        pos = torch.arange(ids.shape[1], device=ids.device)
        return self.LayerNorm(self.word_embeddings(ids) + self.position_embeddings(pos)[None])


class _BertEncoder(nn.Module):
    def __init__(self, layers: list[_BertLayer]):
        super().__init__()
        self.layer = nn.ModuleList(layers)


class TextEncoder(nn.Module):
    """BLIP's "med" BERT in its multimodal mode: self-attention over the prompt, then
    cross-attention to the image tokens, in every layer (no pooler)."""

    def __init__(
        self,
        encoder_width: int,
        vocab_size: int,
        hidden_size: int,
        num_hidden_layers: int,
        num_attention_heads: int,
        intermediate_size: int,
        max_position_embeddings: int,
        layer_norm_eps: float,
        pad_token_id: int,
    ):
        super().__init__()
        self.embeddings = _BertEmbeddings(
            vocab_size, hidden_size, max_position_embeddings, layer_norm_eps, pad_token_id
        )
        self.encoder = _BertEncoder(
            [
                _BertLayer(hidden_size, num_attention_heads, intermediate_size, encoder_width, layer_norm_eps)
                for _ in range(num_hidden_layers)
            ]
        )

    def forward(self, ids, attention_mask, image_embeds):
        x = self.embeddings(ids)
        # BERT's additive mask: 0 where attended, -10000 on padding
        mask = (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -10000.0
        image_embeds = image_embeds.to(x.dtype)
        for layer in self.encoder.layer:
            x = layer(x, mask, image_embeds)
        return x


class _Blip(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        v, t = cfg["vision"], cfg["text"]
        self.visual_encoder = VisionTransformer(cfg["image_size"], **v)
        self.text_encoder = TextEncoder(v["width"], **t)
        self.vision_proj = nn.Linear(v["width"], cfg["embed_dim"])
        self.text_proj = nn.Linear(t["hidden_size"], cfg["embed_dim"])


class ImageRewardModel(nn.Module):
    """The package's ``ImageReward`` module, with its state-dict names; ``forward`` is its ``score_gard``
    (token ids, attention mask and a preprocessed image batch -> standardised rewards ``[B]``).

    Its architecture is ``cfg``, by default :data:`PUBLISHED` (what the package builds:
    ``BLIP_Pretrain(image_size=224, vit="large")`` with its ``med_config.json``)."""

    def __init__(self, cfg: dict | None = None):
        super().__init__()
        from .aesthetic import AestheticMLP  # the same 1024-128-64-16-1 head, keys layers.{0,2,4,6,7}

        self.cfg = copy.deepcopy(cfg) if cfg is not None else merge_config(None)  # a full config (merge_config)
        self.blip = _Blip(self.cfg)
        self.mlp = AestheticMLP(self.cfg["text"]["hidden_size"])

    def forward(self, input_ids, attention_mask, pixels):
        image = self.blip.visual_encoder(pixels)
        h = self.blip.text_encoder(input_ids, attention_mask, image)
        r = self.mlp(h[:, 0].to(self.mlp.layers[0].weight.dtype)).squeeze(-1)
        r = r.to(torch.promote_types(r.dtype, torch.float32))  # fp32 at least, as the package's .float()
        return (r - self.cfg["score_mean"]) / self.cfg["score_std"]


# --------------------------------------------------------------------------- tokenizer


def _tokenizer_from(where: str):
    """A BERT tokenizer from a folder (vocab.txt or tokenizer.json) or a vocab.txt file."""
    from transformers import BertTokenizerFast

    folder = where
    if os.path.isfile(where):
        if os.path.basename(where) != "vocab.txt":
            raise ValueError(f"{where}: expected a BERT vocab.txt file or a tokenizer folder")
        folder = os.path.dirname(os.path.abspath(where))
    if not any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.txt", "tokenizer.json")):
        raise ValueError(f"{where}: expected a BERT tokenizer folder with vocab.txt or tokenizer.json")
    return BertTokenizerFast.from_pretrained(folder, local_files_only=True)


def find_tokenizer(path: str, tokenizer: str | None = None):
    """The bert-base-uncased tokenizer with BLIP's [DEC] and [ENC] added, from local files only.

    ``bert-base-uncased`` plus the two tokens BLIP adds (``[DEC]`` as bos, ``[ENC]``): 30,524 ids. Its
    files (``vocab.txt``, or a Hugging Face tokenizer folder) are not in this package or any of its
    dependencies; they are taken, in this order, from ``tokenizer`` (a folder, or a ``vocab.txt`` file),
    a ``tokenizer/`` or ``bert-base-uncased/`` folder or a ``vocab.txt`` beside the checkpoint, or the
    local Hugging Face cache of ``bert-base-uncased`` (read as plain folders: nothing is downloaded)."""
    if tokenizer:
        tok = _tokenizer_from(tokenizer)
    else:
        here = os.path.dirname(os.path.abspath(path))
        tried = [os.path.join(here, f) for f in TOKENIZER_FOLDERS] + [os.path.join(here, "vocab.txt")]
        tok = None
        for cand in tried:
            if os.path.isdir(cand) or os.path.isfile(cand):
                tok = _tokenizer_from(cand)
                break
        if tok is None:
            tok = _from_hf_cache()
        if tok is None:
            raise ValueError(
                f"{path}: ImageReward needs the bert-base-uncased tokenizer files (vocab.txt, or a Hugging "
                f"Face tokenizer folder); none found in {', '.join(tried)} or the Hugging Face cache "
                f"({hf_cache_root()}). "
                f"Put them in {tried[0]} or give tokenizer=FOLDER"
            )
    tok.add_special_tokens({"bos_token": "[DEC]"})
    tok.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
    return tok


def hf_cache_root() -> str:
    env = os.environ
    hub = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if hub:
        return hub
    cache = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    home = env.get("HF_HOME") or os.path.join(cache, "huggingface")
    return os.path.join(home, "hub")


def _from_hf_cache():
    """bert-base-uncased from the Hugging Face cache folders, read as plain folders: transformers'
    own cache lookup goes through huggingface_hub, which reaches the network even with
    ``local_files_only`` (its user-agent detection), so it is not used."""
    root = hf_cache_root()
    for name in HF_CACHE_NAMES:
        repo = os.path.join(root, "models--" + name.replace("/", "--"))
        snaps = os.path.join(repo, "snapshots")
        revs = []
        try:
            with open(os.path.join(repo, "refs", "main"), encoding="utf-8") as f:
                revs.append(f.read().strip())
        except OSError:
            pass
        if os.path.isdir(snaps):
            revs += sorted(os.listdir(snaps))
        for rev in revs:
            folder = os.path.join(snaps, rev)
            if any(os.path.isfile(os.path.join(folder, f)) for f in ("vocab.txt", "tokenizer.json")):
                return _tokenizer_from(folder)
    return None


# --------------------------------------------------------------------------- the reward


class ImageRewardScore(Reward):
    def __init__(self, model: ImageRewardModel, tokenizer):
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.size = int(model.cfg["image_size"])
        self.max_length = int(model.cfg["max_length"])

    def enable_gradient_checkpointing(self) -> bool:
        self.model.blip.visual_encoder.grad_checkpointing = True
        return True

    def tokens(self, prompts: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return t["input_ids"].to(device), t["attention_mask"].to(device)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """BLIP's image embedding: the vision tower's CLS token through ``vision_proj``, normalised."""
        p = next(self.model.parameters())
        work = torch.promote_types(p.dtype, torch.float32)
        x = clip_preprocess(images.to(p.device, work), self.size).to(p.dtype)
        f = self.model.blip.vision_proj(self.model.blip.visual_encoder(x)[:, 0]).to(work)
        return f / f.norm(dim=-1, keepdim=True)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The score, as the package's ``ImageReward.score``: prompts tokenised to 35 tokens (padded and
        truncated), image resized (shorter side to 224, bicubic, antialiased like PIL), centre-cropped to
        224 (sizes and offset as torchvision's ``Resize`` and ``CenterCrop``) and normalised with the CLIP
        mean/std; the [CLS] output of the text encoder goes through the MLP and
        ``(r - 0.16717362830052426) / 1.0333394966054072``. The image path is differentiable."""
        if len(prompts) != images.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {images.shape[0]} images")
        p = next(self.model.parameters())
        work = torch.promote_types(p.dtype, torch.float32)
        x = clip_preprocess(images.to(p.device, work), self.size).to(p.dtype)
        ids, mask = self.tokens(prompts, p.device)
        return self.model(ids, mask, x).to(work)


def read_config(path: str, config: str | None) -> dict:
    """The architecture: :data:`PUBLISHED`, with the parts that ``config`` (a JSON file), or else an
    ``imagereward_config.json`` beside the checkpoint, overrides (e.g. for a small test model)."""
    if config is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), "imagereward_config.json")
        config = beside if os.path.isfile(beside) else None
    if config is None:
        return merge_config(None)
    try:
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{config}: not a readable ImageReward config JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{config}: expected a JSON object, found {type(data).__name__}")
    return merge_config(data, config)


def read_state_dict(path: str) -> dict:
    """The published ``ImageReward.pt``'s state dict: the package's ``ImageReward`` module
    (``blip.visual_encoder.*``, ``blip.text_encoder.*``, ``blip.vision_proj.*``, ``blip.text_proj.*``,
    ``mlp.layers.*``), read with ``weights_only=True`` (a ``.safetensors`` copy with the same keys works
    too). Every key must then fit (:func:`build_from_state_dict` names the missing and unexpected ones)."""
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file

        from ..fileio import read_safetensors_header

        read_safetensors_header(path)
        sd = load_file(path)
    else:
        from ..fileio import safe_torch_load

        sd = safe_torch_load(path, what="ImageReward checkpoint")
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not sd or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(
            f"{path}: expected an ImageReward state dict of tensors (ImageReward.pt), found {type(sd).__name__}"
        )
    return {k[7:] if k.startswith("module.") else k: v for k, v in sd.items() if k not in IGNORED_KEYS}


def key_table(cfg: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the state dict for ``cfg`` (default: the published model), built on the meta
    device: no memory is allocated."""
    with torch.device("meta"):
        model = ImageRewardModel(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def build_from_state_dict(sd: dict, cfg: dict, path: str) -> ImageRewardModel:
    """The model built on the meta device, its keys and shapes checked against ``sd``, then given
    ``sd``'s tensors (``assign``: no second copy of the weights is ever allocated)."""
    with torch.device("meta"):
        model = ImageRewardModel(cfg)
    own = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {list(sd[k].shape)} vs {list(own[k])}" for k in own if k in sd and tuple(sd[k].shape) != own[k]]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path}: this ImageReward checkpoint does not fit the architecture: {len(missing)} missing keys "
            f"({', '.join(missing[:4])}), {len(unexpected)} unexpected ({', '.join(unexpected[:4])}), "
            f"{len(wrong)} with another shape ({', '.join(wrong[:3])})"
        )
    bad = [
        k for k, v in sd.items() if v.is_floating_point() and v.device.type != "meta" and not torch.isfinite(v).all()
    ]
    if bad:
        raise ValueError(
            f"{path}: this ImageReward checkpoint has NaN/inf values in {len(bad)} tensors "
            f"({', '.join(bad[:3])}); the file is corrupt"
        )
    model.load_state_dict(sd, assign=True)
    return model


@register(
    "imagereward",
    "ImageReward checkpoint (ImageReward.pt); tokenizer= the bert-base-uncased tokenizer "
    "folder (vocab.txt), by default a tokenizer/ folder beside the checkpoint; config= an architecture "
    "JSON (default: the published model)",
    path_options={"tokenizer": "folder", "config": "file"},
)
def load_imagereward(path, device="cpu", dtype=torch.float32, tokenizer=None, config=None, **unused):
    if unused:
        raise ValueError(f"imagereward reward: unknown options {', '.join(unused)} (known: tokenizer, config)")
    cfg = read_config(path, config)
    tok = find_tokenizer(path, tokenizer)
    if len(tok) != cfg["text"]["vocab_size"]:
        raise ValueError(
            f"{path}: the tokenizer has {len(tok)} ids with [DEC] and [ENC] added, the text "
            f"encoder {cfg['text']['vocab_size']}: ImageReward needs bert-base-uncased's vocab.txt"
        )
    model = build_from_state_dict(read_state_dict(path), cfg, path)
    return ImageRewardScore(model.to(device=device, dtype=dtype), tok)

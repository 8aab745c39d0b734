"""Train the ReNeg demo world: a tiny text-to-image latent diffusion model and a tiny reward.

    python tools/train_demo_world.py --out reneg/demo_world/assets [--threads 2] [--smoke]

Stages (each seeded, CPU only):
  1. data      procedural images and captions from :mod:`reneg.demo_world.world`
  2. vae       AutoencoderKL 32 px -> 4 x 8 x 8 latent; scaling_factor = 1 / latent std
  3. diffusion UNet2DConditionModel + CLIPTextModel (hidden 64) trained jointly, eps prediction,
               SD1.5 noise schedule, 10 % empty captions for classifier-free guidance, EMA weights
  4. save      diffusers folder (StableDiffusionPipeline, DDIM scheduler), fp16 safetensors,
               text encoder keys rewritten with the ``text_model.`` prefix
  5. reward    a small open_clip model trained on clean / degraded / mismatched images; saved as
               an HPSv2-style ``{"state_dict": ...}`` checkpoint plus its model config JSON
  6. evaluate  reward accuracy on held-out pairs; DDIM samples with a null vs handcrafted negative
  7. card      ``CARD.md`` with the figures
  8. judges    two held-out judges of the same preference (``judge/``, ``referee/``), trained like the reward
               on triplets of their own, with their own seeds and other open_clip architectures, in the
               same HPS format; compared with the reward (held-out accuracy, how often they rank alike)
               in their own section of ``CARD.md``

``--work DIR`` keeps intermediate checkpoints; ``--resume`` reuses the ones found there.
``--judges-only`` runs stage 8 alone, from the pipeline and reward already in ``--out``:

    python tools/train_demo_world.py --judges-only --out reneg/demo_world/assets --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from reneg.demo_world import world

REWARD_MODEL_NAME = "reneg-demo-clip"
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

UNET_CONFIG: Dict[str, Any] = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    layers_per_block=1,
    block_out_channels=(32, 64, 64),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64,
    attention_head_dim=8,  # SD1-style: 8 heads at every level
)
VAE_CONFIG: Dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    latent_channels=4,
    sample_size=32,
)
TEXT_CONFIG: Dict[str, Any] = dict(
    vocab_size=49408,
    hidden_size=64,
    intermediate_size=256,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=64,
    bos_token_id=49406,
    eos_token_id=49407,
    pad_token_id=49407,
)
SCHEDULER_CONFIG: Dict[str, Any] = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
    timestep_spacing="leading",
)
REWARD_CONFIG: Dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 3, "width": 96, "patch_size": 4, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
# The held-out judges: the same preference as the reward, other architectures (a ViT with 8 px patches
# and a convolutional ModifiedResNet, both with a narrower text tower) and their own data and seeds.
# Nothing trains a negative on them: they judge what a negative trained on the reward learned.
JUDGE_CONFIG: Dict[str, Any] = {
    "embed_dim": 48,
    "vision_cfg": {"image_size": 32, "layers": 4, "width": 128, "patch_size": 8, "head_width": 32, "mlp_ratio": 2.0},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 3},
}
REFEREE_CONFIG: Dict[str, Any] = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": [1, 1, 1, 1], "width": 12},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 24, "heads": 2, "layers": 2},
}


@dataclass(frozen=True)
class RewardRecipe:
    """One preference reward this tool trains: where it goes under --out (``folder/filename`` plus
    ``folder/open_clip_config.json``), the name its config is registered under with open_clip, the
    config, its seeds (offsets from --seed: its triplet data, its initialisation and batches) and the
    keys of its data size, step count and batch in FULL / SMOKE."""

    folder: str
    filename: str
    model_name: str
    config: Dict[str, Any]
    data_seed: int
    train_seed: int
    size_keys: Tuple[str, str, str] = ("n_reward", "reward_steps", "reward_batch")

    @property
    def image_size(self) -> int:
        return int(self.config["vision_cfg"]["image_size"])

    def describe(self) -> str:
        v, t = self.config["vision_cfg"], self.config["text_cfg"]
        if isinstance(v["layers"], (list, tuple)):
            vision = "ModifiedResNet (convolutional) width %d, blocks %s, attention pooling" % (
                v["width"],
                "-".join(str(n) for n in v["layers"]),
            )
        else:
            vision = "ViT patch %d, width %d, %d layers" % (v["patch_size"], v["width"], v["layers"])
        return "%s; text width %d, %d layers; embedding %d" % (
            vision,
            t["width"],
            t["layers"],
            self.config["embed_dim"],
        )


SHIPPED_REWARD = RewardRecipe("reward", "hps_demo.pt", REWARD_MODEL_NAME, REWARD_CONFIG, data_seed=3, train_seed=4)
JUDGE_SIZES = ("n_judge", "judge_steps", "judge_batch")
JUDGES = (
    RewardRecipe(
        "judge", "judge.pt", "reneg-demo-judge", JUDGE_CONFIG, data_seed=7, train_seed=8, size_keys=JUDGE_SIZES
    ),
    RewardRecipe(
        "referee", "referee.pt", "reneg-demo-referee", REFEREE_CONFIG, data_seed=9, train_seed=10, size_keys=JUDGE_SIZES
    ),
)
JUDGE_EVAL_SEED = 11  # offset of the held-out triplets all three rewards are compared on
JUDGE_SAMPLE_SEEDS = (0, 1, 2, 3)  # DDIM seeds of the generated images the three rewards rank

FULL = dict(
    n_data=40000,
    vae_steps=1500,
    vae_batch=24,
    diff_steps=3500,
    diff_batch=64,
    n_reward=8000,
    reward_steps=500,
    reward_batch=64,
    n_eval_pairs=1500,
    eval_seeds=8,
    n_judge=6000,
    judge_steps=700,
    judge_batch=64,
)
SMOKE = dict(
    n_data=600,
    vae_steps=20,
    vae_batch=16,
    diff_steps=20,
    diff_batch=16,
    n_reward=300,
    reward_steps=10,
    reward_batch=16,
    n_eval_pairs=60,
    eval_seeds=1,
    n_judge=200,
    judge_steps=8,
    judge_batch=16,
)


def log(*a: Any) -> None:
    print("[%s]" % time.strftime("%H:%M:%S"), *a, flush=True)


# --------------------------------------------------------------------------- tokenizer


def write_tokenizer_folder(folder: Path) -> None:
    """An SD1-style CLIPTokenizer folder built offline from open_clip's BPE file (same ids as open_clip's tokenizer)."""
    from reneg.backends.clip_tokenizer import write_clip_tokenizer

    write_clip_tokenizer(str(folder))


def build_tokenizer(folder: Path):
    """Write the tokenizer folder, load it with transformers and check its ids against open_clip's."""
    from transformers import CLIPTokenizer

    write_tokenizer_folder(folder)
    tok = CLIPTokenizer.from_pretrained(str(folder))
    check_tokenizer(tok)
    return tok


def check_tokenizer(tok) -> None:
    import open_clip

    oc = open_clip.get_tokenizer("ViT-B-32")
    prompts = ["a red circle on the left", world.HANDCRAFTED_NEGATIVE, "", "Two BLUE squares, noisy!"]
    a = tok(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    b = oc(prompts)
    # open_clip pads with 0, SD1 pads with <|endoftext|>; compare up to and including the end token
    for i in range(len(prompts)):
        n = int((b[i] != 0).sum())
        assert torch.equal(a[i, :n], b[i, :n]), (prompts[i], a[i, :n], b[i, :n])
        assert bool((a[i, n:] == 49407).all())


def tokenize(tok, texts: Sequence[str]) -> torch.Tensor:
    return tok(list(texts), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


# --------------------------------------------------------------------------- models


def make_vae(scaling_factor: float = 1.0):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**VAE_CONFIG, scaling_factor=scaling_factor)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**UNET_CONFIG)


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**TEXT_CONFIG))


def make_scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(**SCHEDULER_CONFIG)


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, 0).float()


def world_token_ids(tok) -> List[int]:
    """Token ids that occur in world captions, the handcrafted negative or the empty prompt."""
    ids = set([49406, 49407])
    for w in world.vocabulary():
        ids.update(tok(w, add_special_tokens=False).input_ids)
    return sorted(ids)


def cosine_lr(step: int, total: int, base: float, warmup: int, floor: float = 0.1) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def to_model_range(imgs_uint8: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(imgs_uint8)).permute(0, 3, 1, 2).float()
    return x / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """float NCHW in [-1, 1] -> uint8 NHWC."""
    x = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


# --------------------------------------------------------------------------- stage: vae


def train_vae(imgs: np.ndarray, cfg: Dict[str, Any], seed: int):
    torch.manual_seed(seed)
    vae = make_vae()
    opt = torch.optim.AdamW(vae.parameters(), lr=4e-3, weight_decay=0.0, betas=(0.9, 0.99))
    g = np.random.default_rng(seed)
    steps, bs = cfg["vae_steps"], cfg["vae_batch"]
    t0 = time.time()
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, 4e-3, 30))
        x = to_model_range(imgs[g.integers(0, len(imgs), bs)])
        post = vae.encode(x).latent_dist
        rec = vae.decode(post.sample()).sample
        l1 = (rec - x).abs().mean()
        mse = (rec - x).pow(2).mean()
        kl = post.kl().mean()
        loss = l1 + mse + 1e-5 * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            log(
                "vae %d/%d l1 %.4f mse %.4f kl %.1f (%.0fs)"
                % (step, steps, l1.item(), mse.item(), kl.item(), time.time() - t0)
            )
    vae.eval()
    return vae, {"vae_steps": steps, "vae_final_l1": float(l1.item()), "vae_seconds": time.time() - t0}


@torch.no_grad()
def encode_all(vae, imgs: np.ndarray, bs: int = 500) -> Tuple[torch.Tensor, torch.Tensor]:
    means, stds = [], []
    for i in range(0, len(imgs), bs):
        post = vae.encode(to_model_range(imgs[i : i + bs])).latent_dist
        means.append(post.mean)
        stds.append(post.std)
    return torch.cat(means), torch.cat(stds)


@torch.no_grad()
def reconstruct(vae, imgs: np.ndarray, bs: int = 500) -> np.ndarray:
    out = []
    for i in range(0, len(imgs), bs):
        x = to_model_range(imgs[i : i + bs])
        out.append(to_uint8(vae.decode(vae.encode(x).latent_dist.mean).sample))
    return np.concatenate(out)


# --------------------------------------------------------------------------- stage: diffusion


def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    with torch.no_grad():
        for pe, pm in zip(ema.parameters(), model.parameters()):
            pe.lerp_(pm, 1.0 - decay)


@torch.no_grad()
def encode_captions(te, tok, captions: Sequence[str], bs: int = 256) -> torch.Tensor:
    """last_hidden_state [N, 77, 64] of the (frozen) text encoder."""
    out = []
    for i in range(0, len(captions), bs):
        out.append(te(tokenize(tok, captions[i : i + bs])).last_hidden_state)
    return torch.cat(out)


def train_diffusion(
    lat_mean,
    lat_std,
    scale: float,
    cond_table: torch.Tensor,
    cap_idx: torch.Tensor,
    empty_cond: torch.Tensor,
    cfg: Dict[str, Any],
    seed: int,
):
    """Train the UNet on precomputed text-encoder outputs (the text encoder stays frozen)."""
    torch.manual_seed(seed)
    unet = make_unet()
    ema_unet = copy.deepcopy(unet).eval()
    for p in ema_unet.parameters():
        p.requires_grad_(False)
    params = list(unet.parameters())
    base_lr = 2e-3
    opt = torch.optim.AdamW(params, lr=base_lr, weight_decay=0.0)
    acp = alphas_cumprod()
    g = torch.Generator().manual_seed(seed)
    steps, bs = cfg["diff_steps"], cfg["diff_batch"]
    t0 = time.time()
    run = 0.0
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, base_lr, 150))
        idx = torch.randint(0, len(cap_idx), (bs,), generator=g)
        z0 = (lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=g)) * scale
        h = cond_table[cap_idx[idx]].clone()
        drop = torch.rand(bs, generator=g) < 0.1
        h[drop] = empty_cond
        t = torch.randint(0, 1000, (bs,), generator=g)
        noise = torch.randn(z0.shape, generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * noise
        pred = unet(zt, t, h).sample
        # min-SNR-5 weighting (eps prediction): w = min(snr, 5) / snr; converges faster on a small budget
        snr = acp[t] / (1 - acp[t])
        w = snr.clamp(max=5.0) / snr
        loss = (w * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_unet, unet, min(0.999, (1 + step) / (10 + step)))
        run = loss.item() if step == 0 else 0.98 * run + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log("diffusion %d/%d loss %.4f (%.0fs)" % (step, steps, run, time.time() - t0))
    return ema_unet, {"diff_steps": steps, "diff_final_loss": run, "diff_seconds": time.time() - t0}


# --------------------------------------------------------------------------- stage: save pipeline


def rewrite_text_encoder_keys(folder: Path) -> None:
    """Make sure text_encoder/model.safetensors uses the ``text_model.`` prefix (ComfyUI loads garbage without it)."""
    from safetensors.torch import load_file, save_file

    path = folder / "model.safetensors"
    sd = load_file(str(path))
    if all(k.startswith("text_model.") for k in sd):
        return
    new = {}
    for k, v in sd.items():
        new[k if k.startswith("text_model.") else "text_model." + k] = v.contiguous()
    save_file(new, str(path), metadata={"format": "pt"})


def save_pipeline(out: Path, vae, unet, te, tok) -> None:
    from diffusers import StableDiffusionPipeline

    pdir = out / "pipeline"
    if pdir.exists():
        shutil.rmtree(pdir)
    pipe = StableDiffusionPipeline(
        vae=copy.deepcopy(vae).half(),
        text_encoder=copy.deepcopy(te).half(),
        tokenizer=tok,
        unet=copy.deepcopy(unet).half(),
        scheduler=make_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        image_encoder=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(str(pdir), safe_serialization=True)
    shutil.rmtree(pdir / "tokenizer")
    write_tokenizer_folder(pdir / "tokenizer")  # the SD1 layout; no 3.6 MB tokenizer.json
    rewrite_text_encoder_keys(pdir / "text_encoder")
    # fp16 weights on disk, but loaders that follow the config's dtype should build fp32 models
    cfg_path = pdir / "text_encoder" / "config.json"
    c = json.loads(cfg_path.read_text())
    for key in ("dtype", "torch_dtype"):
        if key in c:
            c[key] = "float32"
    cfg_path.write_text(json.dumps(c, indent=2, sort_keys=True) + "\n")


def load_pipeline(pdir: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(pdir), torch_dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_saved_pipeline(pdir: Path, te_ref) -> None:
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    keys = list(load_file(str(pdir / "text_encoder" / "model.safetensors")).keys())
    assert keys and all(k.startswith("text_model.") for k in keys), keys[:3]
    te2 = CLIPTextModel.from_pretrained(str(pdir / "text_encoder"), torch_dtype=torch.float32)
    ids = torch.tensor([[49406, 320, 736, 7117, 49407] + [49407] * 72])
    with torch.no_grad():
        a = te2(ids).last_hidden_state
        b = te_ref.half().float()(ids).last_hidden_state
    assert a.dtype == torch.float32
    assert torch.allclose(a, b, atol=1e-3), (a - b).abs().max()


# --------------------------------------------------------------------------- reward


def reward_preprocess(x: torch.Tensor, image_size: int) -> torch.Tensor:
    """Differentiable HPS-style preprocessing of images in [-1, 1] (NCHW)."""
    x = ((x + 1) / 2).clamp(0, 1)
    h, w = x.shape[-2:]
    s = image_size / min(h, w)
    nh, nw = max(image_size, round(h * s)), max(image_size, round(w * s))
    if (nh, nw) != (h, w):
        x = F.interpolate(x, size=(nh, nw), mode="bicubic", align_corners=False, antialias=True)
    top, left = (nh - image_size) // 2, (nw - image_size) // 2
    x = x[..., top : top + image_size, left : left + image_size]
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def register_reward_config(recipe: RewardRecipe = SHIPPED_REWARD) -> None:
    from open_clip import factory

    factory._MODEL_CONFIGS[recipe.model_name] = copy.deepcopy(recipe.config)


def make_reward_model(recipe: RewardRecipe = SHIPPED_REWARD):
    import open_clip

    register_reward_config(recipe)
    return open_clip.create_model(recipe.model_name, pretrained=None)


def reward_score(model, imgs: torch.Tensor, tokens: torch.Tensor, image_size: int = 32) -> torch.Tensor:
    """HPS convention: cosine of L2-normalised image and text features. imgs in [-1, 1]."""
    fi = F.normalize(model.encode_image(reward_preprocess(imgs, image_size)), dim=-1)
    ft = F.normalize(model.encode_text(tokens), dim=-1)
    return (fi * ft).sum(-1)


MISMATCH_KINDS = ("colour", "shape", "count", "position", "background")


def mismatch_scene(scene: Dict[str, Any], rng: np.random.Generator) -> Tuple[Dict[str, Any], str]:
    """A scene that differs from ``scene`` in one attribute its caption mentions."""
    kinds = ["colour", "shape", "count"]
    if scene["count"] == 1 and scene["named_position"]:
        kinds.append("position")
    if scene["named_background"]:
        kinds.append("background")
    kind = kinds[int(rng.integers(len(kinds)))]

    def other(options: Sequence[Any], cur: Any) -> Any:
        opts = [o for o in options if o != cur]
        return opts[int(rng.integers(len(opts)))]

    s = copy.deepcopy(scene)
    if kind == "colour":
        s["colour"] = other(list(world.COLOURS), scene["colour"])
    elif kind == "shape":
        s["shape"] = other(world.SHAPES, scene["shape"])
    elif kind == "background":
        s["background"] = other(world.BACKGROUNDS, scene["background"])
    else:
        ov = {k: scene[k] for k in ("shape", "colour", "background", "named_background")}
        if kind == "count":
            ov["count"] = other([1, 2, 3], scene["count"])
        else:
            ov["count"] = 1
            ov["position"] = other([p for p in world.POSITIONS if p != "middle"] + ["middle"], scene["position"])
        s = world.sample_scene(rng, **ov)
        s["texture"] = scene["texture"]
        s["jitter"] = scene["jitter"]
    return s, kind


def reward_triplets(n: int, seed: int) -> Dict[str, Any]:
    """Clean image, a degraded copy and a mismatched image for ``n`` clean captions."""
    rng = np.random.default_rng(seed)
    clean = np.empty((n, 32, 32, 3), np.uint8)
    deg = np.empty_like(clean)
    mis = np.empty_like(clean)
    caps, deg_kinds, mis_kinds = [], [], []
    for i in range(n):
        scene = world.sample_scene(rng)
        clean[i] = world.render_scene(scene)
        k = world.DEGRADATIONS[int(rng.integers(len(world.DEGRADATIONS)))]
        deg[i] = world.degrade(clean[i], k, rng)
        s2, mk = mismatch_scene(scene, rng)
        mis[i] = world.render_scene(s2)
        caps.append(world.caption_for(scene))
        deg_kinds.append(k)
        mis_kinds.append(mk)
    return {"clean": clean, "deg": deg, "mis": mis, "caps": caps, "deg_kinds": deg_kinds, "mis_kinds": mis_kinds}


def train_reward(
    data: Dict[str, Any],
    recon: Dict[str, np.ndarray],
    cfg: Dict[str, Any],
    seed: int,
    recipe: RewardRecipe = SHIPPED_REWARD,
):
    import open_clip

    torch.manual_seed(seed)
    model = make_reward_model(recipe)
    tokenizer = open_clip.get_tokenizer(recipe.model_name)
    tokens = tokenizer(data["caps"])
    cap_index = {c: i for i, c in enumerate(sorted(set(data["caps"])))}
    cap_id = torch.tensor([cap_index[c] for c in data["caps"]])
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in name or "logit_scale" in name else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0}], lr=1e-3
    )
    g = np.random.default_rng(seed)
    n = len(data["caps"])
    steps, bs = cfg[recipe.size_keys[1]], cfg[recipe.size_keys[2]]
    t0 = time.time()
    run = None

    def pick(kind: str, idx: np.ndarray) -> torch.Tensor:
        use_rec = g.random(len(idx)) < 0.5
        arr = np.where(use_rec[:, None, None, None], recon[kind][idx], data[kind][idx])
        return to_model_range(arr)

    model.train()
    for step in range(steps):
        set_lr(opt, cosine_lr(step, steps, 1e-3, 50))
        idx = g.integers(0, n, bs)
        imgs = torch.cat([pick("clean", idx), pick("deg", idx), pick("mis", idx)])
        fi = F.normalize(model.encode_image(reward_preprocess(imgs, recipe.image_size)), dim=-1)
        ft = F.normalize(model.encode_text(tokens[idx]), dim=-1)
        f_pos, f_deg, f_mis = fi[:bs], fi[bs : 2 * bs], fi[2 * bs :]
        ls = model.logit_scale.exp().clamp(max=100)
        s_pos = (ft * f_pos).sum(-1)
        s_deg = (ft * f_deg).sum(-1)
        s_mis = (ft * f_mis).sum(-1)
        l_pref = F.softplus(-ls * (s_pos - s_deg)).mean() + F.softplus(-ls * (s_pos - s_mis)).mean()
        logits = ls * ft @ f_pos.t()  # text x image
        cid = cap_id[idx]
        same = (cid[:, None] == cid[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        l_clip = 0.5 * (
            -(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean()
        )
        loss = l_clip + l_pref
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        acc = float(((s_pos > s_deg).float().mean() + (s_pos > s_mis).float().mean()) / 2)
        run = (loss.item(), acc) if run is None else (0.95 * run[0] + 0.05 * loss.item(), 0.95 * run[1] + 0.05 * acc)
        if step % 100 == 0 or step == steps - 1:
            log(
                "%s %d/%d loss %.3f train-acc %.3f scale %.1f (%.0fs)"
                % (recipe.folder, step, steps, run[0], run[1], ls.item(), time.time() - t0)
            )
    model.eval()
    return model, {"reward_steps": steps, "reward_seconds": time.time() - t0}


@torch.no_grad()
def reward_scores_np(
    model, imgs_uint8: np.ndarray, caps: Sequence[str], bs: int = 500, recipe: RewardRecipe = SHIPPED_REWARD
) -> np.ndarray:
    import open_clip

    tokenizer = open_clip.get_tokenizer(recipe.model_name)
    out = []
    for i in range(0, len(caps), bs):
        x = to_model_range(imgs_uint8[i : i + bs])
        out.append(reward_score(model, x, tokenizer(list(caps[i : i + bs])), recipe.image_size))
    return torch.cat(out).numpy()


def triplet_scores(
    model, data: Dict[str, Any], recon: Dict[str, np.ndarray], recipe: RewardRecipe = SHIPPED_REWARD
) -> Dict[str, Dict[str, np.ndarray]]:
    """The reward's scores of the held-out clean / degraded / mismatched images, rendered (``raw``) and
    VAE-reconstructed (``vae``), each against its clean caption."""
    return {
        src_name: {k: reward_scores_np(model, src[k], data["caps"], recipe=recipe) for k in ("clean", "deg", "mis")}
        for src_name, src in (("raw", data), ("vae", recon))
    }


def eval_reward(
    model, data: Dict[str, Any], recon: Dict[str, np.ndarray], recipe: RewardRecipe = SHIPPED_REWARD
) -> Dict[str, Any]:
    scores = triplet_scores(model, data, recon, recipe)
    res: Dict[str, Any] = {}
    for src_name in ("raw", "vae"):
        s_pos, s_deg, s_mis = (scores[src_name][k] for k in ("clean", "deg", "mis"))
        r = {
            "clean_vs_degraded": float((s_pos > s_deg).mean()),
            "clean_vs_mismatched": float((s_pos > s_mis).mean()),
            "mean_clean": float(s_pos.mean()),
            "mean_degraded": float(s_deg.mean()),
            "mean_mismatched": float(s_mis.mean()),
        }
        dk = np.array(data["deg_kinds"])
        for k in world.DEGRADATIONS:
            r["degraded_" + k] = float((s_pos[dk == k] > s_deg[dk == k]).mean())
        mk = np.array(data["mis_kinds"])
        for k in MISMATCH_KINDS:
            if (mk == k).any():
                r["mismatch_" + k] = float((s_pos[mk == k] > s_mis[mk == k]).mean())
        res[src_name] = r
    # a raw clean image against its VAE reconstruction: the reward should not care much
    res["clean_raw_minus_vae_mean"] = float((scores["raw"]["clean"] - scores["vae"]["clean"]).mean())
    return res


def zero_unused_reward_tokens(model, recipe: RewardRecipe = SHIPPED_REWARD) -> int:
    """Zero the token embedding rows of tokens the world never uses (they were never trained)."""
    import open_clip

    tokenizer = open_clip.get_tokenizer(recipe.model_name)
    keep = set([0, 49406, 49407])
    for w in world.vocabulary():
        keep.update(int(i) for i in tokenizer([w])[0].tolist())
    with torch.no_grad():
        w = model.token_embedding.weight
        mask = torch.ones(w.shape[0], dtype=torch.bool)
        mask[sorted(keep)] = False
        w[mask] = 0
    return len(keep)


def save_reward(out: Path, model, recipe: RewardRecipe = SHIPPED_REWARD) -> None:
    rdir = out / recipe.folder
    rdir.mkdir(parents=True, exist_ok=True)
    sd = {
        k: v.detach().to(torch.float16).contiguous() if v.is_floating_point() else v
        for k, v in model.state_dict().items()
    }
    torch.save({"state_dict": sd}, str(rdir / recipe.filename))
    (rdir / "open_clip_config.json").write_text(json.dumps(recipe.config, indent=2) + "\n")


def load_reward(out: Path, recipe: RewardRecipe = SHIPPED_REWARD):
    import open_clip
    from open_clip import factory

    rdir = out / recipe.folder
    for f in (rdir / "open_clip_config.json", rdir / recipe.filename):
        if not f.is_file():
            raise SystemExit(f"--out {out}: {f} is missing; expected the {recipe.folder} reward's files there")
    cfg = json.loads((rdir / "open_clip_config.json").read_text())
    factory._MODEL_CONFIGS[recipe.model_name] = cfg
    model = open_clip.create_model(recipe.model_name, pretrained=None)
    ckpt = torch.load(str(rdir / recipe.filename), map_location="cpu", weights_only=True)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval()


def reward_stage(
    out: Path, work: Path, vae32, recipe: RewardRecipe, cfg: Dict[str, Any], seed: int, resume: bool
) -> Tuple[Any, Dict[str, Any]]:
    """Draw the recipe's triplets (half of them seen through ``vae32``), train it (or reuse its
    checkpoint in ``work`` with ``resume``), save it under ``out`` in HPS format and return what ships
    (reloaded from ``out``) and ``{data_seconds, steps, seconds[, resumed]}``."""
    t0 = time.time()
    path = work / (recipe.folder + ".pt")
    if resume and path.exists():
        model, old = _resume_stage(path, lambda: make_reward_model(recipe), "model", recipe.folder)
        # checkpoints written before this function existed name the shipped reward's figures reward_*
        rinfo = {k: old.get(k, old.get("reward_" + k)) for k in ("data_seconds", "steps", "seconds")}
        rinfo["resumed"] = True
    else:
        n = cfg[recipe.size_keys[0]]
        data = reward_triplets(n, seed + recipe.data_seed)
        rec = {k: reconstruct(vae32, data[k]) for k in ("clean", "deg", "mis")}
        rinfo = {"data_seconds": time.time() - t0}
        log("%s data ready: %d triplets (%.0fs)" % (recipe.folder, n, rinfo["data_seconds"]))
        model, tinfo = train_reward(data, rec, cfg, seed + recipe.train_seed, recipe)
        rinfo.update(steps=tinfo["reward_steps"], seconds=tinfo["reward_seconds"])
        torch.save({"model": model.state_dict(), "info": rinfo}, str(path))
    zero_unused_reward_tokens(model, recipe)
    save_reward(out, model, recipe)
    return load_reward(out, recipe), rinfo  # what ships


# --------------------------------------------------------------------------- evaluation of samples


def colour_hits(imgs_uint8: np.ndarray, prompts: Sequence[str]) -> float:
    """Fraction of images whose most frequent palette colour is the prompt's colour."""
    pal_names = list(world.COLOURS)
    pal = np.array([world.COLOURS[c] for c in pal_names], np.float32)
    hits = 0
    for im, p in zip(imgs_uint8, prompts):
        x = im.reshape(-1, 3).astype(np.float32)
        d = ((x[:, None, :] - pal[None]) ** 2).sum(-1) ** 0.5
        near = d.min(1) < 60
        counts = np.bincount(d.argmin(1)[near], minlength=len(pal))
        want = next(c for c in pal_names if (" %s " % c) in (" %s " % p))
        hits += int(counts.sum() > 0 and pal_names[int(counts.argmax())] == want)
    return hits / len(prompts)


@torch.no_grad()
def sample(
    pipe, prompts: Sequence[str], seeds: Sequence[int], negative: Optional[str], steps: int = 25, guidance: float = 7.5
) -> torch.Tensor:
    """Images in [-1, 1], one per (prompt, seed) with prompts varying fastest."""
    ps = [p for _ in seeds for p in prompts]
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds for _ in prompts]
    out = pipe(
        prompt=ps,
        negative_prompt=None if negative is None else [negative] * len(ps),
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=gens,
        height=32,
        width=32,
        output_type="pt",
    ).images
    return out * 2 - 1


def eval_samples(
    pipe, reward, prompts: Sequence[str], seeds: Sequence[int], threshold: float, grid_path: Optional[Path] = None
) -> Dict[str, Any]:
    import open_clip

    tokenizer = open_clip.get_tokenizer(REWARD_MODEL_NAME)
    res: Dict[str, Any] = {}
    grids = []
    ps = [p for _ in seeds for p in prompts]
    toks = tokenizer(ps)
    for guidance in (5.0, 7.5):
        for name, neg in (
            ("null", None),
            ("handcrafted", world.HANDCRAFTED_NEGATIVE),
            ("handcrafted-long", world.HANDCRAFTED_NEGATIVE_LONG),
        ):
            imgs = sample(pipe, prompts, seeds, neg, guidance=guidance)
            with torch.no_grad():
                s = reward_score(reward, imgs, toks).numpy()
            u8 = to_uint8(imgs)
            key = "%s_cfg%s" % (name, guidance)
            res[key] = {
                "mean_reward": float(s.mean()),
                "frac_below_threshold": float((s < threshold).mean()),
                "colour_match": colour_hits(u8, ps),
            }
            log("samples %s: %s" % (key, res[key]))
            if guidance == 7.5:
                grids.append(u8[:16])
    if grid_path is not None:
        from PIL import Image

        g = np.concatenate([world.to_grid(list(x), ncol=8, scale=2) for x in grids], 0)
        Image.fromarray(g).save(str(grid_path))
    return res


# --------------------------------------------------------------------------- held-out judges


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman's rank correlation (scores are continuous: ties are left to argsort's order)."""
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def same_order(da: np.ndarray, db: np.ndarray) -> float:
    """Of pairs of images with score differences ``da`` under one reward and ``db`` under another, the
    fraction the two rewards put in the same order."""
    return float((np.sign(da) == np.sign(db)).mean())


def triplet_pairs(sc: Dict[str, Dict[str, np.ndarray]]) -> np.ndarray:
    """Score differences of the pairs within each held-out triplet (clean - degraded, clean - mismatched,
    degraded - mismatched), rendered and VAE-reconstructed."""
    return np.concatenate(
        [sc[src]["clean"] - sc[src]["deg"] for src in ("raw", "vae")]
        + [sc[src]["clean"] - sc[src]["mis"] for src in ("raw", "vae")]
        + [sc[src]["deg"] - sc[src]["mis"] for src in ("raw", "vae")]
    )


def within_prompt_pairs(scores: np.ndarray, n_prompts: int) -> np.ndarray:
    """Differences between every two images of the same prompt (images ordered seed-major, as
    :func:`sample` makes them)."""
    s = scores.reshape(-1, n_prompts)  # [seeds, prompts]
    i, j = np.triu_indices(s.shape[0], 1)
    return (s[i] - s[j]).reshape(-1)


def judges_stage(
    out: Path, work: Path, pipe, cfg: Dict[str, Any], seed: int, resume: bool, threads: int
) -> Dict[str, Any]:
    """Train the held-out judges (:data:`JUDGES`) one after the other on their own triplets, through the
    shipped VAE, and compare them with the shipped reward: accuracy on common held-out triplets and how
    often the three rank the same images the same way (held-out triplets and generated images)."""
    import open_clip

    t_start = time.time()
    vae32 = pipe.vae
    models: Dict[str, Any] = {SHIPPED_REWARD.folder: load_reward(out, SHIPPED_REWARD)}
    recipes = {SHIPPED_REWARD.folder: SHIPPED_REWARD}
    jinfo: Dict[str, Any] = {
        "seed": seed,
        "threads": threads,
        "cfg": {k: cfg[k] for k in JUDGE_SIZES + SHIPPED_REWARD.size_keys},
        "judges": {},
    }
    for recipe in JUDGES:
        model, rinfo = reward_stage(out, work, vae32, recipe, cfg, seed, resume)
        rdir = out / recipe.folder
        rinfo.update(
            architecture=recipe.describe(),
            params=sum(p.numel() for p in model.parameters()),
            bytes=(rdir / recipe.filename).stat().st_size,
            data_seed=seed + recipe.data_seed,
            train_seed=seed + recipe.train_seed,
            n_triplets=cfg[recipe.size_keys[0]],
        )
        jinfo["judges"][recipe.folder] = rinfo
        models[recipe.folder], recipes[recipe.folder] = model, recipe
    jinfo["shipped_architecture"] = SHIPPED_REWARD.describe()

    # held-out triplets none of the three was trained on
    t0 = time.time()
    n_eval = cfg["n_eval_pairs"]
    edata = reward_triplets(n_eval, seed + JUDGE_EVAL_SEED)
    erec = {k: reconstruct(vae32, edata[k]) for k in ("clean", "deg", "mis")}
    scores = {k: triplet_scores(m, edata, erec, recipes[k]) for k, m in models.items()}
    jinfo["eval"] = {k: eval_reward(m, edata, erec, recipes[k]) for k, m in models.items()}
    jinfo["eval_seed"] = seed + JUDGE_EVAL_SEED
    jinfo["n_eval"] = n_eval

    # generated images: the held-out prompts with the null negative, the images a negative starts from
    prompts = world.heldout_prompts(32)
    imgs = sample(pipe, prompts, JUDGE_SAMPLE_SEEDS, None, guidance=7.5)
    ps = [p for _ in JUDGE_SAMPLE_SEEDS for p in prompts]
    gen = {}
    for k, m in models.items():
        r = recipes[k]
        register_reward_config(r)
        with torch.no_grad():
            gen[k] = reward_score(m, imgs, open_clip.get_tokenizer(r.model_name)(ps), r.image_size).numpy()
    jinfo["generated_mean"] = {k: float(v.mean()) for k, v in gen.items()}
    jinfo["n_generated"] = len(ps)

    names = list(models)
    flat = {
        k: np.concatenate([scores[k][src][x] for src in ("raw", "vae") for x in ("clean", "deg", "mis")]) for k in names
    }
    agree = {}
    for i in range(len(names)):
        for j in range(i + 1, len(names)):
            a, b = names[i], names[j]
            agree["%s / %s" % (a, b)] = {
                "heldout_spearman": spearman(flat[a], flat[b]),
                "heldout_same_order": same_order(triplet_pairs(scores[a]), triplet_pairs(scores[b])),
                "generated_spearman": spearman(gen[a], gen[b]),
                "generated_same_order": same_order(
                    within_prompt_pairs(gen[a], len(prompts)), within_prompt_pairs(gen[b], len(prompts))
                ),
            }
    jinfo["agreement"] = agree
    jinfo["eval_seconds"] = time.time() - t0
    jinfo["total_seconds"] = time.time() - t_start
    log("judges: %s" % json.dumps({k: jinfo[k] for k in ("agreement", "generated_mean")}))
    return jinfo


# --------------------------------------------------------------------------- card


def dir_size(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def write_card(out: Path, info: Dict[str, Any], argv: Sequence[str]) -> None:
    r = info["reward_eval"]
    s = info["samples"]
    sizes = {name: dir_size(out / name) for name in ("pipeline", "reward")}
    lines = [
        "# ReNeg demo world: model card",
        "",
        "Tiny models trained from scratch on CPU on the procedural world in `reneg/demo_world/world.py`",
        "(32 x 32 RGB images of 1-3 coloured circles / squares / triangles on plain or textured backgrounds): a",
        "text-to-image pipeline, the preference reward a negative is trained on, and two held-out judges of the",
        "same preference that nothing trains on (their own section below). They exist only to exercise ReNeg end",
        "to end without a GPU; they are not useful for anything else.",
        "",
        "## Command and seeds",
        "",
        "```",
        "python tools/train_demo_world.py " + " ".join(a for a in argv if a != "--resume"),
        "```",
        "",
        (
            "These files came from runs that reused earlier stages with `--resume` (same code and seeds)."
            if "--resume" in argv
            else "All stages ran in this invocation."
        ),
        "",
        "Seed %d (data seed %d, VAE %d, diffusion %d, reward data %d, reward %d, held-out reward pairs %d)."
        % (
            info["seed"],
            info["seed"],
            info["seed"] + 1,
            info["seed"] + 2,
            info["seed"] + 3,
            info["seed"] + 4,
            info["seed"] + 5,
        ),
        "Training time with %d CPU thread(s): data %.0f s, VAE %.0f s, diffusion %.0f s, reward data %.0f s,"
        % (
            info["threads"],
            info["data_seconds"],
            info["vae_seconds"],
            info["diff_seconds"],
            info["reward_data_seconds"],
        ),
        "reward %.0f s (%.1f min in all, evaluation included; stages resumed from --work count with the time"
        % (info["reward_seconds"], info["total_seconds"] / 60),
        "they took when trained). The machine's 2 cores were shared with other jobs.",
        "torch %s, diffusers %s, transformers %s, open_clip %s." % tuple(info["versions"]),
        "",
        "## Training data",
        "",
        "%d samples from `world.make_dataset`: %.0f %% are degraded (blur, noise, smear, washed out, channel-swapped"
        % (info["n_data"], 100 * world.DEGRADED_FRACTION),
        "colours); %.0f %% of all samples are degraded without the caption saying so and %.0f %% name the degradation"
        % (
            100 * world.UNLABELLED_DEGRADED_FRACTION,
            100 * (world.DEGRADED_FRACTION - world.UNLABELLED_DEGRADED_FRACTION),
        ),
        '("a blurry red circle", "two red squares, noisy", "noisy").',
        "",
        "Handcrafted negative `%s` (`HANDCRAFTED_NEGATIVE`): of a dozen candidates built from the degradation"
        % world.HANDCRAFTED_NEGATIVE,
        "words, the one that raised the mean reward at every CFG tried (3, 5, 7.5) on two prompt/seed sets, by",
        "0.005-0.014. Lists such as `%s` (`HANDCRAFTED_NEGATIVE_LONG`) push colours and contrast"
        % world.HANDCRAFTED_NEGATIVE_LONG,
        "off the world's distribution and lower the reward (table below).",
        "",
        "## Text-to-image pipeline (`pipeline/`, %.2f MB)" % (sizes["pipeline"] / 1e6),
        "",
        "diffusers `StableDiffusionPipeline` folder, fp16 safetensors (load with `torch_dtype=torch.float32`).",
        "",
        "- `vae`: AutoencoderKL, block_out_channels (32, 64, 64), 1 layer per block,",
        "  32 px -> 4 x 8 x 8 latent, L1 + MSE + 1e-5 KL, %d steps of batch %d, AdamW lr 4e-3 cosine.\n"
        "  `scaling_factor` = 1 / std of sampled training latents = %.4f."
        % (info["vae_steps"], info["cfg"]["vae_batch"], info["scaling_factor"]),
        "- `text_encoder`: CLIPTextModel, hidden 64, 3 layers, 4 heads, 77 positions, vocab 49408, quick_gelu;",
        "  randomly initialised (seed %d) and frozen: the UNet learned to read it. last_hidden_state (after"
        % (info["seed"] + 6),
        "  the final layer norm) is the conditioning, as in SD1. Keys carry the `text_model.` prefix. Token",
        "  embedding rows of tokens that never occur in the world (all but %d ids) are zero." % info["n_world_tokens"],
        "- `tokenizer`: CLIPTokenizer built offline from open_clip's BPE file: real CLIP ids, padded with",
        "  `<|endoftext|>`, model_max_length 77.",
        "- `unet`: UNet2DConditionModel, block_out_channels (32, 64, 64) (CrossAttnDown x 2, Down / Up,",
        "  CrossAttnUp x 2), 1 layer per block, cross_attention_dim 64, 8 heads, sample_size 8. eps prediction,",
        "  SD1.5 noise schedule (scaled_linear 0.00085-0.012, 1000 steps), min-SNR-5 loss weighting, 10 % empty",
        "  captions, AdamW lr 2e-3 cosine, %d steps of batch %d, EMA 0.999 (the EMA weights are shipped).\n"
        "  Final (weighted) loss %.4f." % (info["diff_steps"], info["cfg"]["diff_batch"], info["diff_final_loss"]),
        "- `scheduler`: DDIMScheduler with SD1.5's values (steps_offset 1, clip_sample false, set_alpha_to_one false).",
        "",
        "## Reward (`reward/`, %.2f MB)" % (sizes["reward"] / 1e6),
        "",
        "open_clip CLIP from the custom config `reward/open_clip_config.json` (ViT 32 px, patch 4, width 96,",
        "3 layers; text width 32, 2 layers, context 77, vocab 49408, so open_clip's default tokenizer works).",
        'HPSv2 checkpoint format: `torch.load(..., weights_only=True)["state_dict"]` (fp16 tensors; `load_state_dict`',
        "into the fp32 model casts them). Score = cosine of L2-normalised image and text features. Preprocessing:",
        "[-1, 1] -> [0, 1] -> bicubic antialiased resize of the shorter side to 32 -> centre crop -> OpenAI CLIP",
        "mean/std. Register the config under any name, e.g.",
        '`open_clip.factory._MODEL_CONFIGS["%s"] = json.load(...)` (or `open_clip.add_model_config(path)`, which'
        % REWARD_MODEL_NAME,
        "registers it under the file's stem, `open_clip_config`).",
        "",
        "Trained %d steps (batch %d caption triplets) on %d clean captions, each with its clean image, a degraded"
        % (info["reward_steps"], info["cfg"]["reward_batch"], info["cfg"]["n_reward"]),
        "copy and an image that differs in one named attribute (colour, shape, count, position or background);",
        "half of all images are replaced by their VAE reconstruction so that the VAE's own softness is not",
        "punished. Loss: symmetric InfoNCE (identical captions count as positives) + pairwise preference",
        "(clean > degraded, clean > mismatched) on logit_scale x cosine.",
        "",
        "Held-out pairs (%d new captions, seed %d):" % (info["cfg"]["n_eval_pairs"], info["seed"] + 5),
        "",
        "| images | clean > degraded | clean > mismatched | mean clean | mean degraded | mean mismatched |",
        "|---|---|---|---|---|---|",
    ]
    for k in ("raw", "vae"):
        x = r[k]
        lines.append(
            "| %s | %.3f | %.3f | %.3f | %.3f | %.3f |"
            % (
                "rendered" if k == "raw" else "VAE reconstructions",
                x["clean_vs_degraded"],
                x["clean_vs_mismatched"],
                x["mean_clean"],
                x["mean_degraded"],
                x["mean_mismatched"],
            )
        )
    lines += [
        "",
        "Per degradation (rendered / VAE): "
        + ", ".join(
            "%s %.2f / %.2f" % (k, r["raw"]["degraded_" + k], r["vae"]["degraded_" + k]) for k in world.DEGRADATIONS
        )
        + ".",
        "Per mismatch (rendered): "
        + ", ".join("%s %.2f" % (k, r["raw"]["mismatch_" + k]) for k in MISMATCH_KINDS if "mismatch_" + k in r["raw"])
        + ".",
        "",
        "## Samples (DDIM 25 steps, 32 px)",
        "",
        "`heldout_prompts(32)` x seeds %s, scored with the reward. `below threshold` = fraction scoring under the"
        % (list(info["eval_seeds"]),),
        "midpoint %.3f between the mean clean and mean degraded held-out VAE-reconstruction scores (a proxy for"
        % info["threshold"],
        '"looks degraded or wrong"); `colour match` = the most frequent palette colour is the prompt\'s.',
        "",
        "| negative | CFG | mean reward | below threshold | colour match |",
        "|---|---|---|---|---|",
    ]
    for key, v in s.items():
        name, g = key.split("_cfg")
        lines.append(
            "| %s | %s | %.4f | %.3f | %.3f |"
            % (name, g, v["mean_reward"], v["frac_below_threshold"], v["colour_match"])
        )
    lines += [
        "",
        "`samples.png`: the first 16 samples at CFG 7.5 with the null negative (rows 1-2), `%s` (rows 3-4)"
        % world.HANDCRAFTED_NEGATIVE,
        "and `%s` (rows 5-6)." % world.HANDCRAFTED_NEGATIVE_LONG,
        "",
        "## Limits",
        "",
        "- Toy models: 32 px, a vocabulary of about 40 words; unseen words map to zero token embeddings.",
        "- The reward is small and easy to exploit; a negative optimised hard against it will find adversarial",
        "  images. Check samples by eye.",
        "- fp16 weights on disk; run in fp32 on CPU.",
        "",
    ]
    (out / "CARD.md").write_text("\n".join(lines))


JUDGES_HEADING = "## Held-out judges"


def judges_card_lines(out: Path, j: Dict[str, Any], argv: Sequence[str]) -> List[str]:
    """The card's section on the held-out judges (:func:`judges_stage`'s figures)."""
    cfg = j["cfg"]
    shipped_bytes = (out / SHIPPED_REWARD.folder / SHIPPED_REWARD.filename).stat().st_size
    lines = [
        "%s (`%s`)" % (JUDGES_HEADING, "`, `".join(r.folder + "/" for r in JUDGES)),
        "",
        "Two more rewards of the same preference (clean, prompt-matching images) that no negative is trained on.",
        "`reneg eval --demo` reports them beside the reward: a negative can learn what the reward happens to like",
        "rather than the preference, and such a gain does not carry over to a judge that was trained on other",
        "images, from other seeds, with another architecture. They follow the reward's recipe (the same triplets",
        "and loss, half of the images seen through the shipped VAE) on triplets of their own:",
        "",
        "```",
        "python tools/train_demo_world.py " + " ".join(a for a in argv if a != "--resume"),
        "```",
        "",
        "(`--judges-only` trains only the judges, from the shipped VAE and reward, and rewrites only this section;",
        "the full command trains them last.) HPS checkpoint format like the reward's; load with e.g.",
        "`hpsv2=%s/%s,config=%s/open_clip_config.json`." % (JUDGES[0].folder, JUDGES[0].filename, JUDGES[0].folder),
        "",
        "| reward | architecture (open_clip config) | file (fp16) | triplets (data seed) | steps x batch (seed) | data + training |",
        "|---|---|---|---|---|---|",
        "| `%s/` (trained on) | %s | %.2f MB | %d (%d) | %d x %d (%d) | see above |"
        % (
            SHIPPED_REWARD.folder,
            SHIPPED_REWARD.describe(),
            shipped_bytes / 1e6,
            cfg["n_reward"],
            j["seed"] + SHIPPED_REWARD.data_seed,
            cfg["reward_steps"],
            cfg["reward_batch"],
            j["seed"] + SHIPPED_REWARD.train_seed,
        ),
    ]
    for r in JUDGES:
        x = j["judges"][r.folder]
        lines.append(
            "| `%s/` (held out) | %s | %.2f MB | %d (%d) | %d x %d (%d) | %.0f s + %.0f s |"
            % (
                r.folder,
                r.describe(),
                x["bytes"] / 1e6,
                x["n_triplets"],
                x["data_seed"],
                x["steps"],
                cfg["judge_batch"],
                x["train_seed"],
                x["data_seconds"],
                x["seconds"],
            )
        )
    lines += [
        "",
        "Trained one after the other with %d CPU thread(s) on a machine whose 2 cores were shared with other jobs;"
        % j["threads"],
        "the stage took %.1f min in all, the comparison below included. torch %s, open_clip %s."
        % (j["total_seconds"] / 60, j["versions"][0], j["versions"][1]),
        "",
        "Held-out triplets that none of the three saw (%d new captions, seed %d), as in the reward's table above:"
        % (j["n_eval"], j["eval_seed"]),
        "",
        "| reward | clean > degraded (rendered / VAE) | clean > mismatched (rendered / VAE) "
        "| mean clean / degraded / mismatched (VAE) |",
        "|---|---|---|---|",
    ]
    for k, e in j["eval"].items():
        lines.append(
            "| `%s/` | %.3f / %.3f | %.3f / %.3f | %.3f / %.3f / %.3f |"
            % (
                k,
                e["raw"]["clean_vs_degraded"],
                e["vae"]["clean_vs_degraded"],
                e["raw"]["clean_vs_mismatched"],
                e["vae"]["clean_vs_mismatched"],
                e["vae"]["mean_clean"],
                e["vae"]["mean_degraded"],
                e["vae"]["mean_mismatched"],
            )
        )
    lines += [
        "",
        "Per mismatch (rendered): "
        + "; ".join(
            "`%s/` " % k
            + ", ".join(
                "%s %.2f" % (m, e["raw"]["mismatch_" + m]) for m in MISMATCH_KINDS if "mismatch_" + m in e["raw"]
            )
            for k, e in j["eval"].items()
        )
        + ".",
        "",
        "How often two rewards rank the same images the same way. Held-out: Spearman's rank correlation of the",
        "%d scores above (clean, degraded and mismatched images, rendered and reconstructed, each with its"
        % (6 * j["n_eval"]),
        "clean caption) and the fraction of the %d pairs within a triplet (clean / degraded, clean / mismatched,"
        % (6 * j["n_eval"]),
        "degraded / mismatched) they order alike. Generated: `heldout_prompts(32)` x DDIM seeds %s (25 steps,"
        % (list(JUDGE_SAMPLE_SEEDS),),
        "CFG 7.5, null negative; %d images, the ones a negative starts from): Spearman over all of them and the"
        % j["n_generated"],
        "fraction of the pairs of images of one prompt they order alike (the choice a negative changes).",
        "",
        "| rewards | held-out Spearman | held-out pairs alike | generated Spearman | generated pairs alike |",
        "|---|---|---|---|---|",
    ]
    for pair, a in j["agreement"].items():
        lines.append(
            "| %s | %.3f | %.3f | %.3f | %.3f |"
            % (
                " / ".join("`%s`" % x for x in pair.split(" / ")),
                a["heldout_spearman"],
                a["heldout_same_order"],
                a["generated_spearman"],
                a["generated_same_order"],
            )
        )
    lines += [
        "",
        "Mean score of the generated images: "
        + ", ".join("`%s/` %.3f" % (k, v) for k, v in j["generated_mean"].items())
        + " (each reward has its own scale: compare a reward with itself, across negatives).",
        "",
    ]
    return lines


def write_card_section(out: Path, lines: List[str]) -> None:
    """Put the judges' section into ``out/CARD.md``: in place of an earlier one, else before ``## Limits``."""
    path = out / "CARD.md"
    old = path.read_text().splitlines() if path.is_file() else ["# ReNeg demo world: model card", ""]
    start = next((i for i, ln in enumerate(old) if ln.startswith(JUDGES_HEADING)), None)
    if start is not None:
        end = next((i for i in range(start + 1, len(old)) if old[i].startswith("## ")), len(old))
    else:
        start = end = next((i for i, ln in enumerate(old) if ln.startswith("## Limits")), len(old))
    path.write_text("\n".join(old[:start] + lines + old[end:]) + "\n")


# --------------------------------------------------------------------------- main


def _resume_stage(path: Path, make, key: str, name: str):
    """A stage's model and info from its intermediate checkpoint in --work (``--resume``)."""
    state = torch.load(str(path), weights_only=True)
    model = make()
    model.load_state_dict(state[key])
    model.eval()
    log(f"{name}: resumed")
    return model, state["info"]


def text_stage(tok, caps: Sequence[str], seed: int, info: Dict[str, Any]):
    """The frozen, randomly initialised (seeded) CLIP text encoder and every caption's conditioning:
    ``(te, cond_table, cap_idx, empty_cond)``."""
    torch.manual_seed(seed + 6)
    te = make_text_encoder().eval()
    te.requires_grad_(False)
    # tokens that never occur in the world: zero rows (keeps the files compressible; world prompts unchanged)
    keep = world_token_ids(tok)
    info["n_world_tokens"] = len(keep)
    with torch.no_grad():
        w = te.get_input_embeddings().weight
        mask = torch.ones(w.shape[0], dtype=torch.bool)
        mask[keep] = False
        w[mask] = 0
    te.half().float()  # train on exactly the weights that ship (fp16)
    uniq = sorted(set(caps))
    where = {c: i for i, c in enumerate(uniq)}
    cond_table = encode_captions(te, tok, uniq)
    cap_idx = torch.tensor([where[c] for c in caps])
    empty_cond = encode_captions(te, tok, [""])[0]
    log("text encoder: %d distinct captions encoded" % len(uniq))
    return te, cond_table, cap_idx, empty_cond


def diffusion_only(out: Path, work: Path, cfg: Dict[str, Any], seed: int, named_fraction: float) -> None:
    """Retrain the UNet alone (stage 3) on the VAE and text encoder already in ``out/pipeline``, with the
    captions naming ``named_fraction`` of the degraded images, and rewrite ``out/pipeline``: an experiment on
    the world's captions that keeps the VAE, the reward and the judges (the images are the same; only
    which captions name their degradation changes). CARD.md is not rewritten."""
    pipe = load_pipeline(out / "pipeline")  # the shipped VAE (fp16 on disk, fp32 here)
    vae = pipe.vae
    tok = build_tokenizer(work / "tokenizer")
    imgs, caps, clean, metas = world.make_dataset(cfg["n_data"], seed, named_fraction=named_fraction)
    named = sum(m["named"] for m in metas) / len(metas)
    log("data: %d samples, %.1f%% clean, %.1f%% name their degradation" % (len(caps), 100 * clean.mean(), 100 * named))
    lat_mean, lat_std = encode_all(vae, imgs)
    scale = float(vae.config.scaling_factor)
    info: Dict[str, Any] = {}
    te, cond_table, cap_idx, empty_cond = text_stage(tok, caps, seed, info)
    unet, dinfo = train_diffusion(lat_mean, lat_std, scale, cond_table, cap_idx, empty_cond, cfg, seed + 2)
    save_pipeline(out, vae, unet, te, tok)
    check_saved_pipeline(out / "pipeline", te)
    log(
        "pipeline rewritten in %s (diffusion %.0f s, final loss %.4f)"
        % (out, dinfo["diff_seconds"], dinfo["diff_final_loss"])
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--smoke", action="store_true", help="tiny iteration counts, to check the pipeline end to end")
    ap.add_argument(
        "--work",
        type=Path,
        default=None,
        help="folder for intermediate checkpoints (default: $TMPDIR/reneg_demo_world_work)",
    )
    ap.add_argument("--resume", action="store_true", help="reuse intermediate checkpoints found in --work")
    ap.add_argument(
        "--judges-only",
        action="store_true",
        help="train only the held-out judges (stage 8) from the VAE and reward already in --out, and rewrite "
        "only their section of CARD.md",
    )
    ap.add_argument(
        "--named-fraction",
        type=float,
        default=world.NAMED_FRACTION,
        help="fraction of the degraded training images whose caption names the degradation (default %(default)s)",
    )
    ap.add_argument(
        "--diffusion-only",
        action="store_true",
        help="retrain only the UNet (stage 3) on the VAE and text encoder already in --out/pipeline (with "
        "--named-fraction: the captions' experiment) and rewrite --out/pipeline; the rewards are kept",
    )
    args = ap.parse_args(argv)
    raw_argv = list(argv) if argv is not None else sys.argv[1:]
    if args.judges_only:
        need = [args.out / "pipeline" / "model_index.json"] + [
            args.out / SHIPPED_REWARD.folder / f for f in (SHIPPED_REWARD.filename, "open_clip_config.json")
        ]
        missing = [str(f) for f in need if not f.is_file()]
        if missing:
            ap.error(
                "--judges-only trains the judges from the pipeline and reward already in --out %s, but %s %s "
                "missing (run without --judges-only to train everything)"
                % (args.out, ", ".join(missing), "is" if len(missing) == 1 else "are")
            )

    import diffusers
    import open_clip
    import transformers

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:
        pass
    cfg = dict(SMOKE if args.smoke else FULL)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    work: Path = args.work or Path(tempfile.gettempdir()) / ("reneg_demo_world_work" + ("_smoke" if args.smoke else ""))
    work.mkdir(parents=True, exist_ok=True)
    seed = args.seed
    info: Dict[str, Any] = {
        "seed": seed,
        "threads": args.threads,
        "cfg": cfg,
        "n_data": cfg["n_data"],
        "versions": [torch.__version__, diffusers.__version__, transformers.__version__, open_clip.__version__],
    }
    t_start = time.time()

    if args.diffusion_only:
        diffusion_only(out, work, cfg, seed, args.named_fraction)
        return 0
    if args.judges_only:
        pipe = load_pipeline(out / "pipeline")  # the shipped VAE (fp16 on disk, fp32 here) and sampler
        jinfo = judges_stage(out, work, pipe, cfg, seed, args.resume, args.threads)
        finish_judges(out, work, jinfo, info["versions"], raw_argv)
        return 0

    # tokenizer
    tok = build_tokenizer(work / "tokenizer")

    # 1. data
    t0 = time.time()
    imgs, caps, clean, _ = world.make_dataset(cfg["n_data"], seed, named_fraction=args.named_fraction)
    info["data_seconds"] = time.time() - t0
    log("data: %d samples, %.1f%% clean (%.0fs)" % (len(caps), 100 * clean.mean(), info["data_seconds"]))

    # 2. vae
    vae_path = work / "vae.pt"
    if args.resume and vae_path.exists():
        vae, vinfo = _resume_stage(vae_path, make_vae, "model", "vae")
        info.update(vinfo)
        info["vae_seconds_resumed"] = True
    else:
        vae, vinfo = train_vae(imgs, cfg, seed + 1)
        info.update(vinfo)
        torch.save({"model": vae.state_dict(), "info": vinfo}, str(vae_path))
    lat_mean, lat_std = encode_all(vae, imgs)
    g = torch.Generator().manual_seed(seed)
    z = lat_mean + lat_std * torch.randn(lat_mean.shape, generator=g)
    scale = float(1.0 / z.std())
    info["scaling_factor"] = scale
    vae.register_to_config(scaling_factor=scale)
    log("vae: latent std %.4f -> scaling_factor %.4f" % (1 / scale, scale))

    # 3. diffusion: a frozen, randomly initialised CLIP text encoder (seeded) and a UNet trained on its outputs
    te, cond_table, cap_idx, empty_cond = text_stage(tok, caps, seed, info)
    diff_path = work / "diffusion.pt"
    if args.resume and diff_path.exists():
        unet, dinfo = _resume_stage(diff_path, make_unet, "unet", "diffusion")
        info.update(dinfo)
        info["diff_seconds_resumed"] = True
    else:
        unet, dinfo = train_diffusion(lat_mean, lat_std, scale, cond_table, cap_idx, empty_cond, cfg, seed + 2)
        info.update(dinfo)
        torch.save({"unet": unet.state_dict(), "info": dinfo}, str(diff_path))

    # 4. save pipeline
    save_pipeline(out, vae, unet, te, tok)
    check_saved_pipeline(out / "pipeline", te)
    check_tokenizer(load_pipeline(out / "pipeline").tokenizer)
    log("pipeline saved and checked")

    # 5. reward
    vae32 = load_pipeline(out / "pipeline").vae  # the shipped (fp16-rounded) VAE
    reward, rinfo = reward_stage(out, work, vae32, SHIPPED_REWARD, cfg, seed, args.resume)
    info.update(reward_data_seconds=rinfo["data_seconds"], reward_steps=rinfo["steps"], reward_seconds=rinfo["seconds"])
    if rinfo.get("resumed"):
        info["reward_seconds_resumed"] = True

    # 6. evaluate
    edata = reward_triplets(cfg["n_eval_pairs"], seed + 5)
    erec = {k: reconstruct(vae32, edata[k]) for k in ("clean", "deg", "mis")}
    info["reward_eval"] = eval_reward(reward, edata, erec)
    log("reward eval: %s" % json.dumps(info["reward_eval"]))
    info["threshold"] = 0.5 * (info["reward_eval"]["vae"]["mean_clean"] + info["reward_eval"]["vae"]["mean_degraded"])
    pipe = load_pipeline(out / "pipeline")
    info["eval_seeds"] = list(range(cfg["eval_seeds"]))
    info["samples"] = eval_samples(
        pipe, reward, world.heldout_prompts(32), info["eval_seeds"], info["threshold"], grid_path=out / "samples.png"
    )
    info["total_seconds"] = time.time() - t_start
    if args.resume:  # count stages that were loaded instead of trained with their original time
        info["total_seconds"] += sum(
            info[k] for k in ("vae_seconds", "diff_seconds", "reward_seconds") if k + "_resumed" in info
        )
        if "reward_seconds_resumed" in info:
            info["total_seconds"] += info["reward_data_seconds"]

    # 7. card
    write_card(out, info, raw_argv)
    (work / "info.json").write_text(json.dumps(info, indent=2, default=str))
    log("done in %.1f min; assets %.2f MB" % (info["total_seconds"] / 60, dir_size(out) / 1e6))

    # 8. held-out judges (their own section of the card)
    jinfo = judges_stage(out, work, pipe, cfg, seed, args.resume, args.threads)
    finish_judges(out, work, jinfo, info["versions"], raw_argv)
    return 0


def finish_judges(out: Path, work: Path, jinfo: Dict[str, Any], versions: Sequence[str], argv: Sequence[str]) -> None:
    jinfo["versions"] = [versions[0], versions[3]]  # torch, open_clip
    write_card_section(out, judges_card_lines(out, jinfo, argv))
    (work / "judges_info.json").write_text(json.dumps(jinfo, indent=2, default=str))
    log(
        "judges done in %.1f min; %s"
        % (
            jinfo["total_seconds"] / 60,
            ", ".join("%s/ %.2f MB" % (r.folder, dir_size(out / r.folder) / 1e6) for r in JUDGES),
        )
    )


if __name__ == "__main__":
    raise SystemExit(main())

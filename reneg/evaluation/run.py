"""Generation and scoring for ``reneg eval``: resumable, batched, one seed per image for every negative.

An *item* is one prompt and one seed; every negative makes one image per item from the same
noise, so images (and their scores) pair up across negatives. Image files are named
``images/{prompt index:05d}_s{seed}_{negative}.png`` where the prompt index is the prompt's
position in the prompt file (so a ``--limit`` run and a full run share their images). A rerun
with the same ``--out`` only makes the images that are missing (or unreadable); every image is
scored from its PNG file, so a resumed run and a fresh one give the same scores.
"""

from __future__ import annotations

import csv
import hashlib
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from reneg.fileio import atomic_path, atomic_write_json
from reneg.options import PAPER
from reneg.prompts import PAPER_HANDCRAFTED, load_prompts, subsample

IMAGE_DIR = "images"
MANIFEST = "manifest.json"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
EMBEDDING_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


class EvalError(ValueError):
    """A bad argument or an output folder that does not fit this run; the message names the flag or file."""


# --------------------------------------------------------------------------- negatives

@dataclass(frozen=True)
class Negative:
    name: str      # used in file names and the report
    kind: str      # null | zero | text | file | tuned
    source: str    # the text (text), the embedding file (file, tuned; "null" for tuned from null)

    def describe(self) -> str:
        if self.kind == "null":
            return 'null text E("")'
        if self.kind == "zero":
            return "all-zero negative (A1111/Forge for an empty SDXL negative prompt)"
        if self.kind == "text":
            return f'text "{self.source}"'
        if self.kind == "file":
            return f"embedding {_short(self.source)}"
        start = "null" if self.source == "null" else _short(self.source)
        return f"per-sample tuning from {start}"


def _short(path: str) -> str:
    """The file name, with its folder when the name alone says little (``train/embedding.safetensors``)."""
    parts = os.path.normpath(path).replace(os.sep, "/").split("/")
    return "/".join(parts[-2:])


def _clean_name(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.+-]+", "-", s).strip("-.") or "negative"
    return s[:64]


def parse_negative(spec: str, handcrafted: str = PAPER_HANDCRAFTED) -> Negative:
    """``[NAME=]SPEC`` with SPEC one of ``null``, ``zero``, ``handcrafted``, ``handcrafted:TEXT``,
    ``text:TEXT``, an embedding file, ``tuned:FILE`` or ``tuned:null``."""
    raw = spec
    spec = spec.strip()
    if not spec:
        raise EvalError("--negative: empty value (expected null, zero, handcrafted[:TEXT], text:TEXT, an embedding "
                        "file or tuned:FILE)")
    name = None
    head, sep, rest = spec.partition("=")
    if sep and _NAME_RE.match(head) and not os.path.exists(spec) and ":" not in head:
        name, spec = head, rest.strip()
    low = spec.lower()
    if low == "null":
        neg = Negative("null", "null", "")
    elif low == "zero":
        neg = Negative("zero", "zero", "")
    elif low == "handcrafted" or low.startswith("handcrafted:") or low.startswith("text:"):
        text = spec.split(":", 1)[1].strip() if ":" in spec else handcrafted
        if not text:
            raise EvalError(f"--negative {raw!r}: the negative prompt text is empty")
        neg = Negative("handcrafted" if low.startswith("handcrafted") else "text", "text", text)
    elif low.startswith("tuned:"):
        start = spec.split(":", 1)[1].strip()
        if start.lower() == "null":
            neg = Negative("tuned-null", "tuned", "null")
        else:
            _check_embedding_file(start, raw)
            neg = Negative("tuned-" + _clean_name(os.path.splitext(os.path.basename(start))[0]), "tuned", start)
    else:
        _check_embedding_file(spec, raw)
        neg = Negative(_clean_name(os.path.splitext(os.path.basename(spec))[0]), "file", spec)
    if name is not None:
        neg = Negative(name, neg.kind, neg.source)
    return neg


def _check_embedding_file(path: str, raw: str) -> None:
    if not os.path.isfile(path):
        raise EvalError(f"--negative {raw!r}: expected null, zero, handcrafted[:TEXT], text:TEXT, tuned:FILE or an "
                        f"embedding file; {path} is not a file")
    if not path.lower().endswith(EMBEDDING_SUFFIXES):
        raise EvalError(f"--negative {raw!r}: {path} does not look like an embedding file (expected one of "
                        f"{', '.join(EMBEDDING_SUFFIXES)})")


def parse_negatives(specs: list[str], handcrafted: str = PAPER_HANDCRAFTED) -> list[Negative]:
    negs = [parse_negative(s, handcrafted) for s in specs]
    seen: dict[str, str] = {}
    for spec, n in zip(specs, negs):
        if n.name in seen:
            raise EvalError(f"--negative {spec!r}: its name {n.name!r} is already taken by --negative "
                            f"{seen[n.name]!r}; name it explicitly as NAME={spec}")
        seen[n.name] = spec
    return negs


# --------------------------------------------------------------------------- items

@dataclass(frozen=True)
class Item:
    index: int       # position in the prompt file
    text: str
    category: str
    seed: int
    k: int = 0       # which image of its prompt (0 .. images_per_prompt - 1)

    def image_name(self, negative: str) -> str:
        return f"{self.index:05d}_s{self.seed}_{negative}.png"


def build_items(prompts_path: str, limit: int | None = None, sample_seed: int = 0, seed: int = 0,
                images_per_prompt: int = 1) -> list[Item]:
    """Items of a prompt file; ``seed + index * images_per_prompt + k`` is image k's seed."""
    prompts = load_prompts(prompts_path)
    indexed = list(enumerate(prompts))
    chosen = subsample(indexed, limit, sample_seed)
    return [Item(i, p.text, p.category, seed + i * images_per_prompt + k, k)
            for i, p in chosen for k in range(images_per_prompt)]


def items_for(cfg, neg: Negative, items: list[Item]) -> list[Item]:
    """The items ``neg`` is made for: all of them, except tuned negatives under ``--tune-per-prompt K``
    (the first K images of each prompt; per-sample search is the expensive part of an evaluation)."""
    k = getattr(cfg, "tune_per_prompt", None)
    if neg.kind != "tuned" or k is None:
        return items
    return [it for it in items if it.k < k]


# --------------------------------------------------------------------------- config

@dataclass
class EvalConfig:
    model: str = ""
    config: str | None = None
    vae: str | None = None             # a VAE file or folder replacing the model's own
    prediction_type: str | None = None  # eps | v: instead of what the model's files say
    rewards: list[str] = field(default_factory=list)
    prompts: str = ""
    negatives: list[str] = field(default_factory=list)
    out: str = "runs/eval"
    handcrafted: str = PAPER_HANDCRAFTED
    limit: int | None = None
    sample_seed: int = 0
    seed: int = PAPER.seed
    images_per_prompt: int = 1
    sampling_steps: int = PAPER.sampling_steps
    guidance: float = PAPER.guidance
    resolution: int = PAPER.resolution
    batch: int = 4
    tune_steps: int = PAPER.max_steps
    tune_patience: int = PAPER.patience
    tune_lr: float = PAPER.lr
    tune_noise: str = "seed"
    tune_per_prompt: int | None = None  # tuned negatives: only images k < this of each prompt (None: all)
    grad_range: tuple[int, int] = PAPER.grad_range
    save_tuned: bool = False
    video: str | None = None           # motion-adapter folder (AnimateDiff)
    frames: int = 16
    reference: str | None = None
    tie_tol: float = 0.0
    grid_limit: int = 200
    device: str | None = None
    progress: bool = True
    title: str = "ReNeg evaluation"
    note: str = ""
    remake_mismatched: bool = False    # --demo: delete images made under other settings instead of refusing

    def to_json(self) -> dict:
        d = asdict(self)
        d["grad_range"] = list(self.grad_range)
        return d


# the numeric flags of eval, checked by reneg.options (kind, bounds)
EVAL_NUMBERS = {
    "batch": ("int",), "images_per_prompt": ("int",), "tune_steps": ("int",), "tune_patience": ("int",),
    "frames": ("int",), "grid_limit": ("int",), "limit": ("opt_int", 1), "tune_per_prompt": ("opt_int", 1),
    "tune_lr": ("pos",), "tie_tol": ("nonneg",), "seed": ("seed",), "sample_seed": ("seed",),
}


def check_eval_numbers(cfg) -> None:
    """Every numeric flag of eval, before anything is read (also run first under --demo)."""
    from reneg import options as O

    try:
        O.check_sampling(cfg, grad=False)
        O.check_numbers(cfg, EVAL_NUMBERS)
        threads = getattr(cfg, "threads", None)
        if threads is not None:
            O.check_int("--threads", threads, 1, 4096)
    except O.OptionError as e:
        raise EvalError(str(e)) from None


def validate_eval(cfg: EvalConfig) -> tuple[list[Item], list[Negative]]:
    """Check every flag before a model loads; returns the items and the negatives."""
    from reneg import options as O
    from reneg.prompts import PromptFileError

    check_eval_numbers(cfg)
    try:
        O.check_model_and_rewards(cfg)
        O.check_device(cfg.device)
    except O.OptionError as e:
        raise EvalError(str(e)) from None
    if not cfg.prompts:
        raise EvalError("--prompts is required (.txt, ImageReward .json, PartiPrompts .tsv or an HPSv2 folder)")
    if cfg.tune_noise not in ("seed", "fresh"):
        raise EvalError(f"--tune-noise must be seed or fresh, got {cfg.tune_noise}")
    from reneg.backends.video import is_text_to_video_folder

    if not cfg.video and os.path.isdir(cfg.model) and is_text_to_video_folder(cfg.model):
        cfg.video = cfg.model  # ZeroScope / ModelScope: the model itself makes videos
    if cfg.video and not os.path.isfile(os.path.join(cfg.video, "config.json")) and not is_text_to_video_folder(cfg.video):
        raise EvalError(f"--video {cfg.video}: expected a diffusers MotionAdapter folder (config.json and "
                        f"diffusion_pytorch_model.safetensors)")
    negatives = parse_negatives(cfg.negatives or ["null", "handcrafted"], cfg.handcrafted)
    from reneg.embedding import load_embedding

    for n in negatives:
        if n.kind in ("file", "tuned") and n.source != "null":
            try:  # readable before any model loads; the family is checked against the model later
                load_embedding(n.source)
            except ValueError as e:
                raise EvalError(f"--negative: {e}") from None
    if any(n.kind == "tuned" for n in negatives):
        try:
            O.check_grad_range(tuple(cfg.grad_range), cfg.sampling_steps)
        except O.OptionError as e:
            raise EvalError(str(e)) from None
        if cfg.tune_patience > cfg.tune_steps:
            raise EvalError(f"--tune-patience {cfg.tune_patience} is above --tune-steps {cfg.tune_steps}")
    if cfg.reference and cfg.reference not in [n.name for n in negatives]:
        raise EvalError(f"--reference {cfg.reference}: not one of the negatives "
                        f"({', '.join(n.name for n in negatives)})")
    try:
        items = build_items(cfg.prompts, cfg.limit, cfg.sample_seed, cfg.seed, cfg.images_per_prompt)
    except PromptFileError as e:
        raise EvalError(f"--prompts: {e}") from None
    # image seeds are SEED + i * images-per-prompt + k; fresh-noise tuning also uses the next --tune-steps
    top = max((it.seed for it in items), default=cfg.seed)
    span = top - cfg.seed + 1 + (cfg.tune_steps if any(n.kind == "tuned" for n in negatives) else 0)
    try:
        O.check_seed("--seed", cfg.seed, span=span)
    except O.OptionError as e:
        raise EvalError(str(e)) from None
    try:
        os.makedirs(os.path.join(cfg.out, IMAGE_DIR), exist_ok=True)
    except OSError as e:
        raise EvalError(f"--out {cfg.out}: cannot create the folder ({e.strerror or e})") from None
    if not os.access(cfg.out, os.W_OK):
        raise EvalError(f"--out {cfg.out}: the folder is not writable")
    return items, negatives


# --------------------------------------------------------------------------- images

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
            ims[0].save(tmp, format="PNG", save_all=True, append_images=ims[1:], duration=int(1000 / fps),
                        loop=0)


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


def _image_ok(path: str) -> bool:
    if not os.path.isfile(path):
        return False
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except (OSError, ValueError, SyntaxError):
        return False


# --------------------------------------------------------------------------- manifest (resume safety)

def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _generation_key(cfg: EvalConfig) -> dict:
    key = {"model": os.path.abspath(cfg.model), "config": cfg.config, "video": cfg.video and os.path.abspath(cfg.video),
            "frames": cfg.frames if cfg.video else None, "sampling_steps": cfg.sampling_steps,
            "guidance": cfg.guidance, "resolution": cfg.resolution}
    # a manifest written before these options existed stays valid when they are unset
    key.update({k: v for k, v in (("vae", cfg.vae and os.path.abspath(cfg.vae)),
                                  ("prediction_type", cfg.prediction_type)) if v})
    return key


def _negative_key(cfg: EvalConfig, n: Negative) -> dict:
    d = {"kind": n.kind}
    if n.kind == "text":
        d["text"] = n.source
    elif n.kind in ("file", "tuned") and n.source != "null":
        d["sha256"] = _file_digest(n.source)
    if n.kind == "tuned":
        d.update(tune_steps=cfg.tune_steps, tune_patience=cfg.tune_patience, tune_lr=cfg.tune_lr,
                 tune_noise=cfg.tune_noise, grad_range=list(cfg.grad_range), tune_reward=cfg.rewards[0])
    return d


def check_manifest(cfg: EvalConfig, items: list[Item], negatives: list[Negative]) -> dict:
    """Refuse to mix images made under other settings into this run; returns the updated manifest."""
    import json

    path = os.path.join(cfg.out, MANIFEST)
    old = {}
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError) as e:
            raise EvalError(f"{path}: unreadable ({e}); delete it only if the images in {cfg.out} were made "
                            f"with the settings of this run") from None
    gen = _generation_key(cfg)
    hint = f"use another --out, or delete {os.path.join(cfg.out, IMAGE_DIR)} to start over"
    remake = cfg.remake_mismatched

    def refuse_or_remake(msg: str, image_re: str, tuning: str | None) -> None:
        if not remake:
            raise EvalError(f"{msg}; {hint}")
        n = _remove_images(cfg.out, image_re, tuning)
        print(f"reneg eval: {msg}: removed {n} old image(s)", flush=True)

    if old.get("generation") and old["generation"] != gen:
        diff = [f"{k} {old['generation'].get(k)!r} -> {v!r}" for k, v in gen.items()
                if old["generation"].get(k) != v]
        refuse_or_remake(f"--out {cfg.out}: its images were made with other settings ({'; '.join(diff)})",
                         r".*", "*")
        old = {}
    negs = dict(old.get("negatives", {}))
    for n in negatives:
        key = _negative_key(cfg, n)
        if n.name in negs and negs[n.name] != key:
            refuse_or_remake(f"--out {cfg.out}: negative {n.name!r} was made from something else before "
                             f"({negs[n.name]}, now {key}; or give this one another NAME=)",
                             r"\d+_s-?\d+_" + re.escape(n.name), n.name)
        negs[n.name] = key
    prompts = dict(old.get("prompts", {}))
    for it in items:
        k = str(it.index)
        if k in prompts and prompts[k] != it.text:
            refuse_or_remake(f"--prompts {cfg.prompts}: prompt {it.index} is now {it.text!r} but the images in "
                             f"{cfg.out} were made for {prompts[k]!r}", f"{it.index:05d}_.*", None)
        prompts[k] = it.text
    man = {"generation": gen, "negatives": negs, "prompts": prompts}
    atomic_write_json(path, man)
    return man


def _remove_images(out: str, name_re: str, tuning: str | None) -> int:
    """Delete this tool's images whose names match ``name_re`` (and the matching tuning logs)."""
    pat = re.compile(r"^(?:" + name_re + r")\.png$")
    img_dir = os.path.join(out, IMAGE_DIR)
    n = 0
    for fn in os.listdir(img_dir):
        if pat.match(fn) and re.match(r"^\d{5}_s-?\d+_.+\.png$", fn):
            os.unlink(os.path.join(img_dir, fn))
            n += 1
    if tuning:
        import glob

        pattern = "tuning_*.json" if tuning == "*" else f"tuning_{glob.escape(tuning)}.json"
        for p in glob.glob(os.path.join(out, pattern)):
            os.unlink(p)
    return n


# --------------------------------------------------------------------------- rewards

def _reward_names(specs) -> list[str]:
    names = []
    for s in specs:
        base = s.name
        if base in names:
            base = f"{s.name}-{_clean_name(os.path.splitext(os.path.basename(s.path))[0])}"
        k = 2
        name = base
        while name in names:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


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


# --------------------------------------------------------------------------- the run

def _progress(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, unit="img")


def _device(cfg: EvalConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_backend(cfg: EvalConfig, device: torch.device):
    from reneg.backends.loading import load_diffusers
    from reneg.backends.video import is_text_to_video_folder, load_text_to_video

    if cfg.video and is_text_to_video_folder(cfg.video):
        return load_text_to_video(cfg.video, device, frames=cfg.frames)
    backend = load_diffusers(cfg.model, device=device, config=cfg.config, vae=cfg.vae,
                             prediction_type=cfg.prediction_type)
    if cfg.video:
        from .video import load_animatediff

        backend = load_animatediff(backend, cfg.video, cfg.frames)
    return backend


def run_eval(cfg: EvalConfig, log=None) -> dict:
    """Generate what is missing, score everything, write scores.csv and the report; returns the summary."""
    log = log or (lambda msg: print(msg, flush=True))
    items, negatives = validate_eval(cfg)
    check_manifest(cfg, items, negatives)
    from reneg.embedding import load_embedding
    from reneg.generate import text_negative
    from reneg.rewards import load_reward, parse_spec

    t0 = time.time()
    device = _device(cfg)
    backend = load_backend(cfg, device)
    if hasattr(backend, "describe"):
        log(f"reneg eval: model {backend.describe()}")
    note = backend.resolution_note(cfg.resolution)
    if note:
        log(f"reneg eval: {note}")
    frames = cfg.frames if cfg.video else 1
    specs = [parse_spec(s) for s in cfg.rewards]
    names = _reward_names(specs)
    rewards = [load_reward(s, device=device) for s in specs]
    for s in specs:
        if s.weight != 1.0:
            log(f"reneg eval: note: weight={s.weight:g} of reward {s.name} is ignored (each reward is reported "
                f"on its own)")
    tune_reward = FrameReward(rewards[0], frames) if frames > 1 else rewards[0]
    # every embedding file must fit the model before any image is made
    embs = {n.source: load_embedding(n.source, expected_family=backend.family)
            for n in negatives if n.kind in ("file", "tuned") and n.source != "null"}
    tensors = {k: e.model_rows().float() for k, e in embs.items()}
    img_dir = os.path.join(cfg.out, IMAGE_DIR)
    tuning_logs: dict[str, dict] = {}
    made = 0
    cover = {n.name: items_for(cfg, n, items) for n in negatives}
    total = sum(len(v) for v in cover.values())
    todo = {n.name: [it for it in cover[n.name] if not _image_ok(os.path.join(img_dir, it.image_name(n.name)))]
            for n in negatives}
    missing = sum(len(v) for v in todo.values())
    sizes = ", ".join(n.name + ("" if len(cover[n.name]) == len(items) else f" ({len(cover[n.name])})")
                      for n in negatives)
    log(f"reneg eval: {len(items)} images x {len(negatives)} negatives ({sizes}); "
        f"{total - missing} already made, {missing} to make")
    bar = _progress(total, total - missing, "reneg eval: generate", cfg.progress)
    try:
        for neg in negatives:
            need = todo[neg.name]
            if not need and neg.kind != "tuned":
                continue
            if neg.kind == "tuned":
                tuning_logs[neg.name] = _run_tuned(cfg, backend, tune_reward, neg, items, need, img_dir, bar,
                                                   tensors.get(neg.source))
                made += len(need)
                continue
            pooled = mask = None  # SDXL: the empty prompt's pooled vector, except a text negative's own
            if neg.kind in ("null", "zero"):
                t, pooled = backend.null_embedding()
                if neg.kind == "zero":  # crossattn and pooled vector all zeros; the size numbers stay
                    t, pooled = torch.zeros_like(t), None if pooled is None else torch.zeros_like(pooled)
            elif neg.kind == "text":
                t, pooled = text_negative(backend, neg.source)
            else:
                t, mask = tensors[neg.source], embs[neg.source].mask()  # a T5 file's attention mask
            uncond = backend.negative_cond(t.to(device), pooled, mask)
            made += _generate_batched(cfg, backend, uncond, neg, need, img_dir, bar, frames)
    finally:
        if bar is not None:
            bar.close()
    gen_s = time.time() - t0

    t1 = time.time()
    rows = score_images(cfg, items, negatives, rewards, names, img_dir, frames, cover)
    write_scores_csv(os.path.join(cfg.out, "scores.csv"), rows)
    score_s = time.time() - t1

    from .report import build_summary, write_report

    summary = build_summary(rows, items, negatives, names, cfg, tuning=tuning_logs, coverage=cover,
                            timing={"generated_images": made, "generate_seconds": round(gen_s, 2),
                                    "score_seconds": round(score_s, 2)})
    write_report(cfg.out, summary, rows, items, negatives, names, cfg)
    return summary


def _generate_batched(cfg, backend, uncond, neg, need, img_dir, bar, frames) -> int:
    from reneg.generate import generate, seeded_noise

    n = 0
    for i in range(0, len(need), cfg.batch):
        chunk = need[i:i + cfg.batch]
        prompts = [it.text for it in chunk]
        noise = seeded_noise(backend, [it.seed for it in chunk], cfg.resolution, cfg.resolution)
        img = generate(backend, backend.encode_prompts(prompts), uncond, noise, cfg.sampling_steps, cfg.guidance)
        img = img.cpu().view(len(chunk), frames, *img.shape[1:])
        for it, im in zip(chunk, img):
            save_frames(os.path.join(img_dir, it.image_name(neg.name)), im)
            n += 1
            if bar is not None:
                bar.update(1)
    return n


def _run_tuned(cfg, backend, reward, neg, items, need, img_dir, bar, start) -> dict:
    """Per-sample search per item (Algorithm 1) from ``neg.source``; saves the best image."""
    import json

    from reneg.embedding import save_embedding
    from reneg.generate import as_embedding, generate, seeded_noise, tune_for_seed

    log_path = os.path.join(cfg.out, f"tuning_{neg.name}.json")
    logs = {}
    if os.path.isfile(log_path):
        try:
            with open(log_path, encoding="utf-8") as f:
                logs = json.load(f)
        except (OSError, ValueError):
            logs = {}
    if not need:
        return logs
    if start is None:
        start, _ = backend.null_embedding()
    frames = cfg.frames if cfg.video else 1
    for it in need:
        res, image = tune_for_seed(backend, reward, it.text, it.seed, start.to(backend.device), cfg.sampling_steps,
                                   cfg.guidance, tuple(cfg.grad_range), cfg.resolution, cfg.resolution,
                                   cfg.tune_steps, cfg.tune_patience, cfg.tune_lr, noise=cfg.tune_noise)
        if image is None or cfg.tune_noise == "fresh":
            # the search's best image was made from other noise (or none scored): make this item's image
            noise = seeded_noise(backend, [it.seed], cfg.resolution, cfg.resolution)
            image = generate(backend, backend.encode_prompts([it.text]), backend.negative_cond(res.best),
                             noise, cfg.sampling_steps, cfg.guidance).cpu()
        name = it.image_name(neg.name)
        save_frames(os.path.join(img_dir, name), image.view(frames, *image.shape[1:]))
        if cfg.save_tuned:
            save_embedding(os.path.join(cfg.out, "tuned", neg.name, os.path.splitext(name)[0] + ".safetensors"),
                           as_embedding(backend, res.best), overwrite=True, kind="per-sample", prompt=it.text,
                           seed=it.seed, start_embedding=os.path.basename(neg.source), steps=len(res.history),
                           lr=cfg.tune_lr, guidance_scale=cfg.guidance, start_reward=res.start_reward,
                           best_reward=res.best_reward)
        logs[name] = {"prompt_index": it.index, "seed": it.seed, "start_reward": _f(res.start_reward),
                      "best_reward": _f(res.best_reward), "best_step": res.best_step, "steps": len(res.history),
                      "stopped": res.stopped}
        atomic_write_json(log_path, logs)
        if bar is not None:
            bar.update(1)
    return logs


def _f(x: float):
    return float(x) if x is not None and math.isfinite(x) else None


# --------------------------------------------------------------------------- scoring

@torch.no_grad()
def score_images(cfg, items, negatives, rewards, names, img_dir, frames=1, coverage=None) -> list[dict]:
    """One row per image and reward, scored from the PNG files (``coverage``: {negative: its items})."""
    device = next((p.device for r in rewards for p in r.parameters()), torch.device("cpu"))
    rows = []
    pairs = [(n, it) for n in negatives for it in (coverage or {}).get(n.name, items)]
    bar = _progress(len(pairs), 0, "reneg eval: score", cfg.progress)
    try:
        for i in range(0, len(pairs), cfg.batch):
            chunk = pairs[i:i + cfg.batch]
            vids = [load_frames(os.path.join(img_dir, it.image_name(n.name))) for n, it in chunk]
            counts = {v.shape[0] for v in vids}
            if len(counts) != 1:
                raise EvalError(f"{img_dir}: images of one batch have different frame counts {sorted(counts)}")
            f = counts.pop()
            x = torch.cat(vids).to(device)
            prompts = [it.text for _, it in chunk for _ in range(f)]
            for r, rname in zip(rewards, names):
                s = r(x, prompts).float().view(len(chunk), f).mean(1).cpu().tolist()
                for (n, it), v in zip(chunk, s):
                    rows.append({"prompt_index": it.index, "category": it.category, "prompt": it.text,
                                 "seed": it.seed, "negative": n.name, "reward": rname, "score": v,
                                 "image": f"{IMAGE_DIR}/{it.image_name(n.name)}"})
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    return rows


SCORE_FIELDS = ["prompt_index", "category", "prompt", "seed", "negative", "reward", "score", "image"]


def write_scores_csv(path: str, rows: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, SCORE_FIELDS)
            w.writeheader()
            for r in rows:
                w.writerow(dict(r, score=f"{r['score']:.8g}"))


def read_scores_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["prompt_index"], r["seed"], r["score"] = int(r["prompt_index"]), int(r["seed"]), float(r["score"])
    return rows

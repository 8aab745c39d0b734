"""``OUT/manifest.json``: what the images in an output folder were made with, so a resumed run never mixes
images made under other settings (it refuses, or under ``--demo`` removes the old ones)."""

from __future__ import annotations

import hashlib
import os
import re

from reneg.fileio import atomic_write_json

from .config import EvalConfig, EvalError, Item
from .images import IMAGE_DIR
from .negatives import Negative

MANIFEST = "manifest.json"


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _generation_key(cfg: EvalConfig) -> dict:
    key = {
        "model": os.path.abspath(cfg.model),
        "config": cfg.config,
        "video": cfg.video and os.path.abspath(cfg.video),
        "frames": cfg.frames if cfg.video else None,
        "sampling_steps": cfg.sampling_steps,
        "guidance": cfg.guidance,
        "resolution": cfg.resolution,
    }
    # a manifest written before these options existed stays valid when they are unset
    key.update(
        {
            k: v
            for k, v in (
                ("vae", cfg.vae and os.path.abspath(cfg.vae)),
                ("prediction_type", cfg.prediction_type),
                ("mixed_precision", cfg.mixed_precision if cfg.mixed_precision != "no" else None),
                ("guidance_mode", cfg.guidance_mode if cfg.guidance_mode != "cfg" else None),
                ("nag_scale", cfg.nag_scale),
                ("nag_tau", cfg.nag_tau),
                ("nag_alpha", cfg.nag_alpha),
                ("guidance_2", cfg.guidance_2),
                ("shift", cfg.shift),
                ("wan_experts", cfg.wan_experts if cfg.wan_experts != "shared" else None),
            )
            if v
        }
    )
    return key


def _negative_key(cfg: EvalConfig, n: Negative) -> dict:
    d = {"kind": n.kind}
    if n.kind == "text":
        d["text"] = n.source
    elif n.kind in ("file", "tuned", "predictor") and n.source != "null":
        d["sha256"] = _file_digest(n.source)
    if n.kind == "tuned":
        d.update(
            tune_steps=cfg.tune_steps,
            tune_patience=cfg.tune_patience,
            tune_lr=cfg.tune_lr,
            tune_noise=cfg.tune_noise,
            grad_range=list(cfg.grad_range),
            tune_reward=cfg.rewards[0],
        )
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
            raise EvalError(
                f"{path}: unreadable ({e}); delete it only if the images in {cfg.out} were made "
                f"with the settings of this run"
            ) from None
    gen = _generation_key(cfg)
    hint = f"use another --out, or delete {os.path.join(cfg.out, IMAGE_DIR)} to start over"
    remake = cfg.remake_mismatched

    def refuse_or_remake(msg: str, image_re: str, tuning: str | None) -> None:
        if not remake:
            raise EvalError(f"{msg}; {hint}")
        n = _remove_images(cfg.out, image_re, tuning)
        print(f"reneg eval: {msg}: removed {n} old image(s)", flush=True)

    if old.get("generation") and old["generation"] != gen:
        diff = [f"{k} {old['generation'].get(k)!r} -> {v!r}" for k, v in gen.items() if old["generation"].get(k) != v]
        refuse_or_remake(f"--out {cfg.out}: its images were made with other settings ({'; '.join(diff)})", r".*", "*")
        old = {}
    negs = dict(old.get("negatives", {}))
    for n in negatives:
        key = _negative_key(cfg, n)
        if n.name in negs and negs[n.name] != key:
            refuse_or_remake(
                f"--out {cfg.out}: negative {n.name!r} was made from something else before "
                f"({negs[n.name]}, now {key}; or give this one another NAME=)",
                r"\d+_s-?\d+_" + re.escape(n.name),
                n.name,
            )
        negs[n.name] = key
    prompts = dict(old.get("prompts", {}))
    for it in items:
        k = str(it.index)
        if k in prompts and prompts[k] != it.text:
            refuse_or_remake(
                f"--prompts {cfg.prompts}: prompt {it.index} is now {it.text!r} but the images in "
                f"{cfg.out} were made for {prompts[k]!r}",
                f"{it.index:05d}_.*",
                None,
            )
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

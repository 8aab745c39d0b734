"""Scoring the eval's image files with every reward, and ``scores.csv`` (one row per image and reward);
in the same pass the image features each negative's diversity per prompt is measured in, ``diversity.csv``."""

from __future__ import annotations

import csv
import os

import torch

from reneg.fileio import atomic_path
from reneg.frame_reward import FrameReward  # noqa: F401  (re-exported: reneg eval scores videos with it)

from .config import EvalError, progress_bar
from .images import IMAGE_DIR, load_frames
from .temporal import temporal_scores


def reward_names(specs) -> list[str]:
    from reneg.rewards import display_names

    return display_names(specs)


@torch.no_grad()
def score_image_files(cfg, items, negatives, rewards, names, img_dir, frames=1, coverage=None, features=False):
    """One row per image and reward, scored from the PNG files (``coverage``: {negative: its items}).

    With ``features=True`` returns ``(rows, feats)``: in the same pass over the files, the image
    features (:meth:`reneg.rewards.Reward.image_features`) of the first reward that has an image tower,
    ``{"reward": its name, "features": {(negative, prompt index, seed): [D]}}`` (a video's feature is
    the mean of its frames' features, normalised), or None when no reward has one."""
    device = next((p.device for r in rewards for p in r.parameters()), torch.device("cpu"))
    rows = []
    feats: dict | None = {"reward": None, "features": {}} if features else None
    tower = None  # index of the reward whose image features are taken; -1 when none has a tower
    pairs = [(n, it) for n in negatives for it in (coverage or {}).get(n.name, items)]
    bar = progress_bar(len(pairs), 0, "reneg eval: score", cfg.progress)
    try:
        for i in range(0, len(pairs), cfg.batch):
            chunk = pairs[i : i + cfg.batch]
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
                    rows.append(
                        {
                            "prompt_index": it.index,
                            "category": it.category,
                            "prompt": it.text,
                            "seed": it.seed,
                            "negative": n.name,
                            "reward": rname,
                            "score": v,
                            "image": f"{IMAGE_DIR}/{it.image_name(n.name)}",
                        }
                    )
            for mname, vals in temporal_scores(x, f, rewards).items():  # videos: VBench's temporal measures
                for (n, it), v in zip(chunk, vals.tolist()):
                    rows.append(
                        dict(
                            rows[-1],
                            prompt_index=it.index,
                            category=it.category,
                            prompt=it.text,
                            seed=it.seed,
                            negative=n.name,
                            reward=mname,
                            score=v,
                            image=f"{IMAGE_DIR}/{it.image_name(n.name)}",
                        )
                    )
            if feats is not None and tower != -1:
                fx, tower = _tower_features(rewards, x, tower)
                if fx is not None:
                    feats["reward"] = names[tower]
                    fx = fx.float().cpu().view(len(chunk), f, -1).mean(1)  # a video: the mean of its frames
                    fx = fx / fx.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                    for (n, it), v in zip(chunk, fx):
                        feats["features"][(n.name, it.index, it.seed)] = v
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    if feats is None:
        return rows
    return rows, (feats if tower not in (None, -1) else None)


def _tower_features(rewards, x, tower):
    """(features of ``x``, the index of the reward they came from): the first reward whose
    ``image_features`` is not None, found on the first batch and kept; (None, -1) when none has one."""
    order = range(len(rewards)) if tower is None else [tower]
    for k in order:
        fx = rewards[k].image_features(x)
        if fx is not None:
            return fx, k
    return None, -1


DIVERSITY_CSV = "diversity.csv"
DIVERSITY_FIELDS = ["negative", "prompt_index", "diversity", "n_images", "reward"]


def prompt_diversity(feats: dict | None, negatives, items, coverage=None) -> list[dict]:
    """Per negative and prompt with two or more images: the mean pairwise ``1 - cos`` of those images'
    features (:func:`reneg.diversity.diversity_by_group`, grouped by prompt index), as rows of
    ``diversity.csv``. Empty when ``feats`` is None."""
    from reneg.diversity import diversity_by_group

    if not feats:
        return []
    out = []
    for n in negatives:
        its = (coverage or {}).get(n.name, items)
        keys = [(n.name, it.index, it.seed) for it in its if (n.name, it.index, it.seed) in feats["features"]]
        if not keys:
            continue
        groups = [k[1] for k in keys]
        sizes = {g: groups.count(g) for g in groups}
        div = diversity_by_group(torch.stack([feats["features"][k] for k in keys]), groups)
        for g, d in div.items():
            out.append(
                {"negative": n.name, "prompt_index": g, "diversity": d, "n_images": sizes[g], "reward": feats["reward"]}
            )
    return out


def _write_csv(path: str, fields: list[str], rows: list[dict], number: str) -> None:
    """``rows`` as a CSV written atomically, the float column ``number`` to 8 significant digits."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fields)
            w.writeheader()
            for r in rows:
                w.writerow(dict(r, **{number: f"{r[number]:.8g}"}))


def write_diversity_csv(path: str, rows: list[dict]) -> None:
    _write_csv(path, DIVERSITY_FIELDS, rows, "diversity")


def read_diversity_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r.update(prompt_index=int(r["prompt_index"]), diversity=float(r["diversity"]), n_images=int(r["n_images"]))
    return rows


SCORE_FIELDS = ["prompt_index", "category", "prompt", "seed", "negative", "reward", "score", "image"]


def write_scores_csv(path: str, rows: list[dict]) -> None:
    _write_csv(path, SCORE_FIELDS, rows, "score")


def read_scores_csv(path: str) -> list[dict]:
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["prompt_index"], r["seed"], r["score"] = int(r["prompt_index"]), int(r["seed"]), float(r["score"])
    return rows

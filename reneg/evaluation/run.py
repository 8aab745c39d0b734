"""The ``reneg eval`` run: check every flag, make the missing images (tuned negatives per sample), score, report.

An *item* is one prompt and one seed; every negative makes one image per item from the same
noise, so images (and their scores) pair up across negatives. Image files are named
``images/{prompt index:05d}_s{seed}_{negative}.png`` where the prompt index is the prompt's
position in the prompt file (so a ``--limit`` run and a full run share their images). A rerun
with the same ``--out`` only makes the images that are missing (or unreadable); every image is
scored from its PNG file, so a resumed run and a fresh one give the same scores.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import replace

import torch

from reneg.embedding import guidance_mismatch, learned_guidance, warn_once
from reneg.fileio import atomic_write_json

from . import images
from .config import EvalConfig, EvalError, Item, build_items, check_eval_numbers, items_for, progress_bar
from .images import IMAGE_DIR
from .manifest import check_manifest
from .negatives import Negative, parse_negatives
from .scoring import (
    DIVERSITY_CSV,
    FrameReward,
    prompt_diversity,
    reward_names,
    score_image_files,
    write_diversity_csv,
    write_scores_csv,
)


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
    from reneg.backends.loading import makes_videos

    if not cfg.video and makes_videos(cfg.model):
        cfg.video = cfg.model  # ZeroScope / ModelScope: the model itself makes videos
    if cfg.frames is None:
        from reneg.backends.loading import VIDEO_FRAMES, default_frames

        cfg.frames = default_frames(cfg.video) if cfg.video else VIDEO_FRAMES
    if cfg.video and not os.path.isfile(os.path.join(cfg.video, "config.json")) and not makes_videos(cfg.video):
        raise EvalError(
            f"--video {cfg.video}: expected a diffusers MotionAdapter folder (config.json and "
            f"diffusion_pytorch_model.safetensors)"
        )
    negatives = parse_negatives(cfg.negatives or ["null", "handcrafted"], cfg.handcrafted)
    from reneg.embedding import load_embedding

    from reneg.predictor import is_predictor_file, load_predictor
    from reneg.tokens import load_tokens, looks_like_tokens

    for n in negatives:
        if n.kind == "predictor" or (n.kind == "tuned" and n.source != "null" and is_predictor_file(n.source)):
            try:  # rebuilt from its metadata before any model loads; the family is checked later
                load_predictor(n.source).global_embedding().check_dtype(*O.compute_dtype(cfg))
            except ValueError as e:
                raise EvalError(f"--negative: {e}") from None
        elif n.kind == "file" and looks_like_tokens(n.source):
            try:  # a negative-token file: read now, encoded through the model's own text encoder later
                load_tokens(n.source)
            except ValueError as e:
                raise EvalError(f"--negative: {e}") from None
        elif n.kind in ("file", "tuned") and n.source != "null":
            try:  # readable and finite in the compute dtype before any model loads; the family is checked later
                load_embedding(n.source).check_dtype(*O.compute_dtype(cfg))
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
        raise EvalError(
            f"--reference {cfg.reference}: not one of the negatives ({', '.join(n.name for n in negatives)})"
        )
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
    check_not_a_training_run(cfg)
    return items, negatives


def check_not_a_training_run(cfg: EvalConfig) -> None:
    """An evaluation writes its own summary.json: it never replaces a training run's unless ``--overwrite``."""
    from .manifest import MANIFEST

    if getattr(cfg, "overwrite", False):
        return
    marks = [f for f in ("checkpoint.pt", "log.csv") if os.path.isfile(os.path.join(cfg.out, f))]
    if os.path.isfile(os.path.join(cfg.out, "summary.json")) and not os.path.isfile(os.path.join(cfg.out, MANIFEST)):
        marks.append("summary.json")
    if marks:
        raise EvalError(
            f"--out {cfg.out}: holds a training run or other results ({', '.join(marks)}), not an evaluation; "
            f"choose another --out, or pass --overwrite to write the evaluation there (replacing its summary.json)"
        )


def _device(cfg: EvalConfig) -> torch.device:
    return torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def load_backend(cfg: EvalConfig, device: torch.device):
    from reneg.backends.loading import apply_model_options, load_diffusers, makes_videos, model_files, weights_dtype

    dtype = weights_dtype(cfg.mixed_precision, device)
    if cfg.video and makes_videos(cfg.video):  # a video model's folder: the loader's video kind
        backend = load_diffusers(cfg.video, device, dtype, frames=cfg.frames, **model_files(cfg))
        return apply_model_options(backend, cfg.wan_experts, cfg.guidance_2, cfg.shift)
    backend = load_diffusers(cfg.model, device=device, dtype=dtype, **model_files(cfg))
    if cfg.video:
        from .video import load_animatediff

        backend = load_animatediff(backend, cfg.video, cfg.frames)
    return apply_model_options(backend, cfg.wan_experts, cfg.guidance_2, cfg.shift)


def run_eval(cfg: EvalConfig, log=None) -> dict:
    """Generate what is missing, score everything, write scores.csv and the report; returns the summary."""
    log = log or (lambda msg: print(msg, flush=True))
    items, negatives = validate_eval(cfg)
    from reneg.fileio import FolderLock

    with FolderLock(cfg.out, "reneg eval", flag="--out"):  # one writer per out folder
        check_not_a_training_run(cfg)  # again, now that no other command can start writing there
        return _run_eval(cfg, log, items, negatives)


def _run_eval(cfg: EvalConfig, log, items, negatives) -> dict:
    check_manifest(cfg, items, negatives)
    from reneg.backends.loading import weights_dtype
    from reneg.generate import text_negative
    from reneg.rewards import load_reward, parse_spec

    t0 = time.time()
    device = _device(cfg)
    backend = load_backend(cfg, device)
    if hasattr(backend, "describe"):
        log(f"reneg eval: model {backend.describe()}")
    notes = [backend.resolution_note(cfg.resolution)]
    if hasattr(backend, "truncation_note"):
        notes.append(backend.truncation_note([it.text for it in items]))
    for note in notes:
        if note:
            log(f"reneg eval: {note}")
    frames = cfg.frames if cfg.video else 1
    # every embedding file must fit the model before any image is made (or a reward loads)
    embs, tensors = check_negatives_fit(backend, negatives, _guidance(cfg, backend).mode)
    # the report says, beside each file, the guidance it was learned under (next to the one used here)
    negatives = [
        replace(n, learned_under=learned_guidance(embs[n.source]) or "") if n.kind == "file" and n.source in embs else n
        for n in negatives
    ]
    specs = [parse_spec(s) for s in cfg.rewards]
    names = reward_names(specs)
    dtype = weights_dtype(cfg.mixed_precision, device)
    rewards = [load_reward(s, device=device, dtype=dtype) for s in specs]
    for s in specs:
        if s.weight != 1.0:
            log(
                f"reneg eval: note: weight={s.weight:g} of reward {s.name} is ignored (each reward is reported "
                f"on its own)"
            )
    from .provenance import reward_roles, role_text

    meta = {src: e.metadata for src, e in embs.items()}
    meta.update({src: m.metadata for src, m in tensors.items() if hasattr(m, "spec")})  # predictors' own
    roles = reward_roles(specs, names, negatives, meta)
    log("reneg eval: rewards: " + "; ".join(f"{r['name']} ({role_text(r)})" for r in roles))
    tune_reward = FrameReward(rewards[0], frames) if frames > 1 else rewards[0]
    img_dir = os.path.join(cfg.out, IMAGE_DIR)
    tuning_logs: dict[str, dict] = {}
    made = 0
    cover = {n.name: items_for(cfg, n, items) for n in negatives}
    total = sum(len(v) for v in cover.values())
    todo = {
        n.name: [it for it in cover[n.name] if not images.image_ok(os.path.join(img_dir, it.image_name(n.name)))]
        for n in negatives
    }
    missing = sum(len(v) for v in todo.values())
    sizes = ", ".join(
        n.name + ("" if len(cover[n.name]) == len(items) else f" ({len(cover[n.name])})") for n in negatives
    )
    log(
        f"reneg eval: {len(items)} images x {len(negatives)} negatives ({sizes}); "
        f"{total - missing} already made, {missing} to make"
    )
    bar = progress_bar(total, total - missing, "reneg eval: generate", cfg.progress)
    try:
        for neg in negatives:
            need = todo[neg.name]
            if not need and neg.kind != "tuned":
                continue
            if neg.kind == "tuned":
                tuning_logs[neg.name] = _run_tuned(
                    cfg, backend, tune_reward, neg, items, need, img_dir, bar, tensors.get(neg.source)
                )
                made += len(need)
                continue
            pooled = mask = None  # SDXL: the empty prompt's pooled vector, except a text negative's own
            if neg.kind in ("null", "zero"):
                t, pooled = backend.null_embedding()
                if neg.kind == "zero":  # crossattn and pooled vector all zeros; the size numbers stay
                    t, pooled = torch.zeros_like(t), None if pooled is None else torch.zeros_like(pooled)
            elif neg.kind == "text":
                t, pooled = text_negative(backend, neg.source)
            elif neg.kind == "predictor":  # each batch's prompts get their own negatives (_generate_batched)
                made += _generate_batched(cfg, backend, tensors[neg.source], neg, need, img_dir, bar, frames)
                continue
            else:
                t, mask = tensors[neg.source], embs[neg.source].mask()  # a T5 file's attention mask
            uncond = backend.negative_cond(t.to(device), pooled, mask)
            made += _generate_batched(cfg, backend, uncond, neg, need, img_dir, bar, frames)
    finally:
        if bar is not None:
            bar.close()
    gen_s = time.time() - t0

    t1 = time.time()
    from .report import DIVERSITY_NEEDS, build_summary, write_report
    from .temporal import MEASURES as TEMPORAL_MEASURES

    # diversity of each negative's images of one prompt across seeds, in its reward's feature space:
    # the features come from the same pass over the files as the scores
    feats, note = None, DIVERSITY_NEEDS
    if cfg.images_per_prompt >= 2:
        rows, feats = score_image_files(cfg, items, negatives, rewards, names, img_dir, frames, cover, features=True)
        note = None if feats else "diversity needs a --reward with an image tower (none of these has one)"
    else:
        rows = score_image_files(cfg, items, negatives, rewards, names, img_dir, frames, cover)
    write_scores_csv(os.path.join(cfg.out, "scores.csv"), rows)
    measured = [m for m in TEMPORAL_MEASURES if any(r["reward"] == m for r in rows)]  # videos
    roles = roles + [
        {"name": m, "spec": m, "role": "temporal measure, VBench's definition", "trained_by": [], "embeddings": {}}
        for m in measured
    ]
    names = names + measured
    div_rows = prompt_diversity(feats, negatives, items, cover)
    write_diversity_csv(os.path.join(cfg.out, DIVERSITY_CSV), div_rows)
    diversity = {"reward": feats["reward"] if feats else None, "rows": div_rows, "frames": frames, "note": note}
    score_s = time.time() - t1

    summary = build_summary(
        rows,
        items,
        negatives,
        names,
        cfg,
        tuning=tuning_logs,
        coverage=cover,
        timing={"generated_images": made, "generate_seconds": round(gen_s, 2), "score_seconds": round(score_s, 2)},
        diversity=diversity,
        reward_roles=roles,
    )
    write_report(cfg.out, summary, rows, items, negatives, names, cfg)
    return summary


def check_negatives_fit(backend, negatives: list[Negative], guidance: str = "cfg") -> tuple[dict, dict]:
    """Load every embedding negative for the loaded model and put it through the model's own
    negative check (``negative_cond``, what generation and tuning call), so that a negative the model
    cannot read (PixArt-sigma's 300 rows on PixArt-alpha, a file of another family) is refused before
    the first image, naming the negative and its file; a file learned under another guidance than
    ``guidance`` (cfg, nag, cfg+nag) is warned about, once. Returns ``({file: NegEmbedding}, {file: rows})``."""
    from reneg.embedding import load_embedding
    from reneg.tokens import looks_like_tokens

    from reneg.predictor import is_predictor_file, load_predictor

    embs, tensors = {}, {}
    for n in negatives:
        if n.kind == "predictor" or (n.kind == "tuned" and n.source != "null" and is_predictor_file(n.source)):
            # {file: NegPredictor}: the model of the file, for this model's family (tuned: each item's start)
            try:
                model = load_predictor(n.source, expected_family=backend.family).to(backend.device)
                g = model.global_embedding()  # its negatives have the global part's rows: the model must read them
                backend.negative_cond(
                    g.model_rows().to(backend.device), None, g.mask() if n.kind == "predictor" else None
                )
            except ValueError as e:
                raise EvalError(f"--negative {n.name} ({n.source}): {e}") from None
            tensors[n.source] = model
            continue
        if n.kind not in ("file", "tuned") or n.source == "null" or n.source in embs:
            continue
        try:
            if n.kind == "file" and looks_like_tokens(n.source):
                emb = token_embedding(backend, n.source)  # what a UI gives the model for the file's name
            else:
                emb = load_embedding(n.source, expected_family=backend.family)  # its family, width and rows
        except ValueError as e:
            raise EvalError(f"--negative {n.name}: {e}") from None
        rows = emb.model_rows().float()
        try:
            # a file negative is used with its mask; a tuned one starts from the rows alone
            backend.negative_cond(rows.to(backend.device), None, emb.mask() if n.kind == "file" else None)
        except ValueError as e:
            raise EvalError(f"--negative {n.name} ({n.source}): {e}") from None
        embs[n.source], tensors[n.source] = emb, rows
        note = guidance_mismatch(emb, guidance)
        if note:
            warn_once(note)
    return embs, tensors


def token_embedding(backend, path: str):
    """A negative-token file as the output-space negative the model reads: its vectors through the model's
    own text encoder(s), placed as the UIs and diffusers place them for the file's name alone."""
    from reneg.embedding import NegEmbedding
    from reneg.tokens import TokenEncoder, load_tokens

    tok = load_tokens(path, expected_family=backend.family)
    with torch.no_grad():
        rows, pooled = TokenEncoder(backend).encode(tok.flat().to(backend.device))
    meta = dict(tok.metadata)
    return NegEmbedding(rows.cpu(), backend.family, None if pooled is None else pooled.cpu(), meta, path)


def _guidance(cfg, backend):
    """The eval's :class:`reneg.nag.Guidance` for this model (NAG settings not given: the family's)."""
    from reneg.nag import guidance_of

    return guidance_of(cfg, backend.family)


def _generate_batched(cfg, backend, uncond, neg, need, img_dir, bar, frames) -> int:
    """``uncond``: one negative's Cond, or a negative predictor (each batch's prompts get their own)."""
    from reneg.generate import generate, seeded_noise
    from reneg.predictor import NegPredictor, predicted_cond

    n = 0
    for i in range(0, len(need), cfg.batch):
        chunk = need[i : i + cfg.batch]
        prompts = [it.text for it in chunk]
        noise = seeded_noise(backend, [it.seed for it in chunk], cfg.resolution, cfg.resolution)
        cond = backend.encode_prompts(prompts)
        u = predicted_cond(uncond, cond) if isinstance(uncond, NegPredictor) else uncond
        img = generate(backend, cond, u, noise, cfg.sampling_steps, _guidance(cfg, backend))
        img = img.cpu().view(len(chunk), frames, *img.shape[1:])
        for it, im in zip(chunk, img):
            images.save_frames(os.path.join(img_dir, it.image_name(neg.name)), im)
            n += 1
            if bar is not None:
                bar.update(1)
    return n


def _run_tuned(cfg, backend, reward, neg, items, need, img_dir, bar, start) -> dict:
    """Per-sample search per item (Algorithm 1) from ``neg.source``; saves the best image."""
    import json

    from reneg.embedding import save_embedding
    from reneg.generate import as_embedding, generate, seeded_noise
    from reneg.tuning import tune_for_seed

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
    from reneg.predictor import NegPredictor

    if start is None:
        start, _ = backend.null_embedding()
    frames = cfg.frames if cfg.video else 1
    for it in need:
        first = start
        if isinstance(start, NegPredictor):  # tuned:PREDICTOR: each item starts from its prompt's own negative
            c = backend.encode_prompts([it.text])
            with torch.no_grad():
                first = start(c.crossattn, c.pooled, c.mask)[0].float()
        res, image = tune_for_seed(
            backend,
            reward,
            it.text,
            it.seed,
            first.to(backend.device),
            cfg.sampling_steps,
            _guidance(cfg, backend),
            tuple(cfg.grad_range),
            cfg.resolution,
            cfg.resolution,
            cfg.tune_steps,
            cfg.tune_patience,
            cfg.tune_lr,
            noise=cfg.tune_noise,
            autocast_dtype=None if backend.dtype == torch.float32 else backend.dtype,
        )
        if image is None or cfg.tune_noise == "fresh":
            # the search's best image was made from other noise (or none scored): make this item's image
            noise = seeded_noise(backend, [it.seed], cfg.resolution, cfg.resolution)
            image = generate(
                backend,
                backend.encode_prompts([it.text]),
                backend.negative_cond(res.best),
                noise,
                cfg.sampling_steps,
                _guidance(cfg, backend),
            ).cpu()
        name = it.image_name(neg.name)
        images.save_frames(os.path.join(img_dir, name), image.view(frames, *image.shape[1:]))
        if cfg.save_tuned:
            save_embedding(
                os.path.join(cfg.out, "tuned", neg.name, os.path.splitext(name)[0] + ".safetensors"),
                as_embedding(backend, res.best),
                overwrite=True,
                kind="per-sample",
                prompt=it.text,
                seed=it.seed,
                start_embedding=os.path.basename(neg.source),
                steps=len(res.history),
                lr=cfg.tune_lr,
                **{**_guidance(cfg, backend).metadata(), "guidance_scale": cfg.guidance},
                start_reward=res.start_reward,
                best_reward=res.best_reward,
            )
        logs[name] = {
            "prompt_index": it.index,
            "seed": it.seed,
            "start_reward": _f(res.start_reward),
            "best_reward": _f(res.best_reward),
            "best_step": res.best_step,
            "steps": len(res.history),
            "stopped": res.stopped,
        }
        atomic_write_json(log_path, logs)
        if bar is not None:
            bar.update(1)
    return logs


def _f(x: float):
    return float(x) if x is not None and math.isfinite(x) else None

"""``reneg train --predictor ARCH``: learn a negative predictor (reneg/predictor.py) with the ReNeg loss.

The same samples as a global run (each micro-batch's prompts, noise and grad step from
``sample_generator(seed, step, index)``), the same objective and optimizer; the negative of each sample is
the predictor's output for that sample's prompt, so one step trains the global negative and the
prompt-dependent correction together. ``--predictor-reg W`` adds ``W x`` the correction's mean square
(towards the global negative). ``--init`` (null, handcrafted or a trained global embedding) is the global
negative it starts from; the correction starts at zero. Before the first step the predictor's
``feature_mean`` is fitted on the training prompts (at most 512 of them, evenly spaced, every process the
same ones) with ``--predictor-features centred``; ``mean``, the default, leaves it zero (the uncentred
features of format version 1). Exact resume holds as for the global trainer (the checkpoint holds every
tensor of the predictor, the feature mean among them, and the optimizer's state; tested). Under several
processes the gradients of every tensor are averaged across processes as the global trainer averages its
embedding's; a 2-process run takes the same step as one process (tests/test_predictor.py, slow).

Writes ``OUT/predictor.safetensors`` (the predictor, its global negative inside), ``OUT/embedding.safetensors``
(that global negative alone, usable anywhere an embedding is), ``OUT/checkpoint.pt``, ``OUT/log.csv`` and
``OUT/summary.json`` with the held-out check: null, the predictor's global part alone, and the predictor.
"""

from __future__ import annotations

import math
import os
import time
import warnings

import torch

from reneg.embedding import save_embedding
from reneg.fileio import OutputError, atomic_torch_save, atomic_write_json
from reneg.generate import as_embedding
from reneg.objective import grad_step_loss
from reneg.predictor import fit_feature_mean, from_embedding, predicted_cond, predicted_scores, save_predictor
from reneg.sampling import initial_latent, is_flow

from .checkpoint import CHECKPOINT_NAME, EMBEDDING_NAME, find_resume, load_checkpoint

PREDICTOR_NAME = "predictor.safetensors"
LOG_FIELDS = ["penalty"]  # beside log.csv's usual columns


def predictor_loop(cfg, acc, main: bool) -> dict:
    """The predictor's run: setup (the global trainer's models, prompts and --init), resume, steps, finish."""
    from .train import CsvLog, lr_lambda, setup_run

    run = setup_run(cfg, acc, main)  # models, prompts, the --init negative as run.neg
    backend, device = run.backend, run.device
    model = from_embedding(as_embedding(backend, run.neg), cfg.predictor, cfg.predictor_rank, seed=cfg.seed)
    features = getattr(cfg, "predictor_features", "mean")
    fitted = 0
    if features == "centred":  # what every training prompt shares, taken away from each prompt's features
        with torch.no_grad():
            fitted = fit_feature_mean(model, backend.encode_prompts, run.train_texts, batch=max(1, cfg.eval_batch))
    model = model.to(device)
    params = [p for _, p in model.named_parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))
    start, skipped, history = 0, 0, []
    path = find_resume(cfg.out, cfg.resume) if cfg.resume else None
    if path:
        start, skipped, history = _resume(path, model, opt, sched, features)
    from .config import resume_fingerprint

    saved_config = dict(cfg.to_json(), **resume_fingerprint(cfg))
    log = CsvLog(os.path.join(cfg.out, "log.csv"), start, LOG_FIELDS) if main else None
    meta = dict(_metadata(cfg), predictor_features=features, feature_mean_prompts=fitted)
    if main and cfg.progress:
        print(
            f"reneg train: predictor {cfg.predictor} rank {cfg.predictor_rank} "
            f"({model.num_parameters()} parameters beside the global negative), "
            + (f"features centred on {fitted} training prompts" if fitted else "features uncentred"),
            flush=True,
        )
    t0 = time.time()
    try:
        for step in range(start, cfg.steps):
            row = _step(run, model, opt, step)
            bad = not (math.isfinite(row["loss"]) and math.isfinite(row["grad_norm"]))
            if bad:
                skipped += 1
            else:
                before = [p.detach().clone() for p in params]
                opt.step()
                if not all(bool(torch.isfinite(p).all()) for p in params):
                    with torch.no_grad():
                        for p, b in zip(params, before):
                            p.copy_(b)
                    skipped += 1
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                sched.step()
            done = step + 1
            row.update(step=done, lr=sched.get_last_lr()[0], skipped=skipped, seconds=round(time.time() - t0, 2))
            if main:
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.steps:
                    history.append(_heldout(run, model, done))
                log.write(row)
                if done % cfg.checkpoint_every == 0:
                    _write(cfg, model, opt, sched, done, skipped, history, saved_config, meta)
            acc.wait_for_everyone()
    finally:
        if log is not None:
            log.close()
    summary = {}
    if main:
        rec = _heldout(run, model, cfg.steps)  # with its per-prompt scores (a checkpoint keeps only the means)
        history = [h for h in history if h["step"] != cfg.steps] + [rec]
        _write(cfg, model, opt, sched, cfg.steps, skipped, history, saved_config, meta)
        summary = {
            "status": "finished",
            "kind": "predictor",
            "steps": cfg.steps,
            "family": backend.family,
            "predictor": {
                "architecture": cfg.predictor,
                "rank": cfg.predictor_rank,
                "reg": cfg.predictor_reg,
                "features": features,
                "feature_mean_prompts": fitted,
            },
            "parameters": model.num_parameters(),
            "heldout": {k: v for k, v in rec.items() if k not in ("step", "per_prompt")},
            "heldout_per_prompt": rec["per_prompt"],
            "heldout_prompts": len(run.heldout_texts),
            "heldout_history": [{k: v for k, v in h.items() if k != "per_prompt"} for h in history],
            "skipped_updates": skipped,
            "predictor_file": os.path.join(cfg.out, PREDICTOR_NAME),
            "embedding": os.path.join(cfg.out, EMBEDDING_NAME),
            "seconds": round(time.time() - t0, 2),
            "config": cfg.to_json(),
        }
        atomic_write_json(os.path.join(cfg.out, "summary.json"), summary)
    acc.wait_for_everyone()
    return summary


def _step(run, model, opt, step: int) -> dict:
    """One optimizer step's gradients over the global batch (this process's micro-batches, averaged across
    processes); the update is the caller's."""
    from .train import sample_generator

    cfg, backend, acc = run.cfg, run.backend, run.acc
    opt.zero_grad(set_to_none=True)
    rewards, loss_sum, pen_sum = [], 0.0, 0.0
    for m in range(run.accum):
        g = sample_generator(cfg.seed, step, acc.process_index * run.accum + m)
        idx = torch.randint(len(run.train_texts), (cfg.micro_batch,), generator=g)
        ps = [run.train_texts[i] for i in idx]
        noise = torch.randn(run.shape, generator=g).to(run.device)
        gi = run.obj.grad_indices(cfg.grads_per_rollout, g)
        cond = backend.encode_prompts(ps)
        with acc.autocast():
            res = grad_step_loss(
                backend.denoiser,
                backend.decode,
                run.reward,
                ps,
                cond,
                predicted_cond(model, cond),
                initial_latent(noise, run.sigmas[0], is_flow(backend)),
                run.sigmas,
                run.obj.guidance,
                gi if len(gi) > 1 else gi[0],
                rollout_steps=cfg.rollout_steps or None,
                # several grad steps: each one's backward at once (the predictor's graph kept for the next)
                backward=(lambda loss: (loss / run.accum).backward(retain_graph=True)) if len(gi) > 1 else None,
            )
        if len(gi) == 1:
            (res.loss / run.accum).backward()
        pen = model.penalty(cond.crossattn, cond.pooled, cond.mask)
        if cfg.predictor_reg:
            (cfg.predictor_reg * pen / run.accum).backward()
        rewards.append(res.rewards.float())
        loss_sum += float(res.loss.detach()) / run.accum
        pen_sum += float(pen.detach()) / run.accum
    grads = []
    for p in model.parameters():
        gr = p.grad if p.grad is not None else torch.zeros_like(p)
        if acc.num_processes > 1:
            gr = acc.reduce(gr.contiguous(), reduction="mean")
        p.grad = gr
        grads.append(gr)
    r_all = torch.cat(rewards)
    if acc.num_processes > 1:
        r_all = acc.gather(r_all)
    gnorm = float(torch.sqrt(sum(g.double().pow(2).sum() for g in grads)))
    return {"loss": loss_sum, "reward": float(r_all.mean()), "penalty": pen_sum, "grad_norm": gnorm}


def _heldout(run, model, step: int) -> dict:
    """Held-out scores (the training reward, one image per prompt at the held-out seeds): null, the
    predictor's global part alone, and the predictor."""
    cfg, backend = run.cfg, run.backend
    model.eval()
    args = (cfg.sampling_steps, run.obj.guidance, cfg.resolution, cfg.resolution, cfg.eval_batch)
    texts, seeds = run.heldout_texts, run.heldout_seeds
    from reneg.generate import generate_and_score

    null_s = generate_and_score(backend, run.reward, texts, seeds, backend.negative_cond(run.null), *args)
    glob = model.global_embedding()
    glob_s = generate_and_score(
        backend,
        run.reward,
        texts,
        seeds,
        backend.negative_cond(glob.model_rows().to(backend.device), glob.pooled, glob.mask()),
        *args,
    )
    pred_s = predicted_scores(backend, run.reward, model, texts, seeds, *args)
    model.train()
    return {
        "step": step,
        "null": float(null_s.mean()),
        "global": float(glob_s.mean()),
        "predictor": float(pred_s.mean()),
        "per_prompt": [
            {"prompt": t, "null": float(a), "global": float(b), "predictor": float(c)}
            for t, a, b, c in zip(texts, null_s, glob_s, pred_s)
        ],
    }


def _metadata(cfg) -> dict:
    from .train import embedding_metadata

    meta = embedding_metadata(cfg)
    meta.pop("kind", None)
    return dict(meta, predictor_reg=cfg.predictor_reg, predictor_init=os.path.basename(cfg.init))


def _write(cfg, model, opt, sched, step, skipped, history, saved_config, meta) -> None:
    """``predictor.safetensors``, ``embedding.safetensors`` and ``checkpoint.pt`` all or nothing: both files
    staged, the checkpoint written (the commit), the staged files moved in."""
    staged_p = os.path.join(cfg.out, ".predictor.pending.tmp.safetensors")
    staged_e = os.path.join(cfg.out, ".embedding.pending.tmp.safetensors")
    try:
        save_predictor(staged_p, model, overwrite=True, **dict(meta, trained_steps=step))
        save_embedding(staged_e, model.global_embedding(), overwrite=True, **dict(meta, trained_steps=step))
        state = {
            "format": "reneg-train-checkpoint",
            "version": 1,
            "step": int(step),
            "neg": model.base.detach().cpu().clone(),  # the global part (what a checkpoint reader shows)
            "predictor": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "skipped": int(skipped),
            "config": _json(saved_config),
            "heldout": _json([{k: v for k, v in h.items() if k != "per_prompt"} for h in history]),
            "extra": _json({"kind": "predictor"}),
        }
        atomic_torch_save(os.path.join(cfg.out, CHECKPOINT_NAME), state)
    except BaseException:
        for p in (staged_p, staged_e):
            try:
                os.unlink(p)
            except OSError:
                pass
        raise
    for staged, name in ((staged_p, PREDICTOR_NAME), (staged_e, EMBEDDING_NAME)):
        try:
            os.replace(staged, os.path.join(cfg.out, name))
        except OSError as e:
            raise OutputError(f"{os.path.join(cfg.out, name)}: writing failed: {e.strerror or e}") from e


def _json(v) -> str:
    import json

    return json.dumps(v, sort_keys=True)


def _resume(path: str, model, opt, sched, features: str = "centred") -> tuple[int, int, list]:
    state = load_checkpoint(path)
    pred = state.get("predictor")
    want = model.state_dict()
    if isinstance(pred, dict) and "feature_mean" not in pred and set(pred) == set(want) - {"feature_mean"}:
        # a checkpoint written before the features were centred: it goes on as it was trained, uncentred
        if features != "mean":
            raise ValueError(
                f"{path}: this predictor checkpoint has no feature_mean (written before the features were "
                "centred); resume it with --predictor-features mean"
            )
        pred = dict(pred, feature_mean=torch.zeros_like(want["feature_mean"]))
    if not isinstance(pred, dict) or set(pred) != set(want):
        raise ValueError(
            f"{path}: not a --predictor checkpoint of this predictor (expected tensors "
            f"{', '.join(sorted(want))}; found {', '.join(sorted(pred)) if isinstance(pred, dict) else 'none'})"
        )
    for k, v in pred.items():
        if not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(want[k].shape) or not torch.isfinite(v).all():
            raise ValueError(f"{path}: checkpoint's predictor tensor {k!r} is not a finite {list(want[k].shape)}")
    model.load_state_dict({k: v.to(want[k].device) for k, v in pred.items()})
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if "rng_cpu" in state:
        torch.set_rng_state(state["rng_cpu"])
    return state["step"], state.get("skipped", 0), state["heldout"]

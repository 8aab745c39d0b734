"""``reneg train``: learn a global negative embedding from a reward (paper section 3).

One readable loop. Each optimizer step averages ``batch_size`` samples: every
process runs ``batch_size / (micro_batch x processes)`` micro-batches and the
gradients of the one trainable tensor are averaged across processes, so
``accelerate launch`` with N processes takes the same step as one process.
The prompts, noise and grad step of micro-batch ``j`` of step ``s`` are drawn
from a generator seeded by ``(seed, s, j)``: a resumed run sees exactly the
samples the uninterrupted one would have.
"""

from __future__ import annotations

import copy
import csv
import math
import os
import time
import warnings

import torch

from reneg.backends.loading import weights_dtype  # noqa: F401  (also imported from here by tune)
from reneg.compute import ComputeMeter
from reneg.diversity import image_features, pairwise_diversity
from reneg.embedding import load_embedding, save_embedding
from reneg.fileio import atomic_write_json
from reneg.generate import as_embedding, generate_and_score, text_negative
from reneg.objective import ObjectiveConfig, grad_step_loss
from reneg.prompts import load_prompts
from reneg.sampling import initial_latent

from .checkpoint import CHECKPOINT_NAME, find_resume, load_checkpoint, save_checkpoint, save_run_files
from .config import BEST_NAME, TrainConfig, check_out_free, remove_old_run, resume_fingerprint, validate_train
from .events import STOP_EXIT, TrainEvents
from .monitor import HeldoutMonitor

SUMMARY_NAME = "summary.json"


class TrainingError(RuntimeError):
    pass


class TrainingStopped(RuntimeError):
    """The run was stopped on request (OUT/STOP, or SIGTERM/Ctrl-C where the command listens for them)
    before its last step: ``checkpoint`` holds it at ``step``, and ``--resume`` continues it. Raised by
    :func:`run_train` so that no caller can take a stopped run for a finished one; ``exit_code`` is
    what ``reneg train`` exits with (143 for SIGTERM or OUT/STOP, 130 for Ctrl-C)."""

    def __init__(self, step: int, steps: int, checkpoint: str, reason: str = "STOP"):
        self.step, self.steps, self.checkpoint, self.reason = step, steps, checkpoint, reason
        self.exit_code = STOP_EXIT.get(reason, 143)
        why = {"STOP": "OUT/STOP", "SIGINT": "Ctrl-C"}.get(reason, reason)
        super().__init__(
            f"stopped on request ({why}) at step {step} of {steps}: {checkpoint} holds the run; "
            f"the same command with --resume continues it"
        )


def lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if cfg.warmup and step < cfg.warmup:
            return (step + 1) / cfg.warmup
        if cfg.lr_schedule == "constant":
            return 1.0
        t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f


def sample_generator(seed: int, step: int, index: int) -> torch.Generator:
    # taken modulo 2**64, the range manual_seed accepts: every --seed up to 2**64 - 1 works
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 10_007 + index) % 2**64)


class CsvLog:
    FIELDS = [
        "step",
        "loss",
        "reward",
        "lr",
        "grad_norm",
        "skipped",
        "seconds",
        "heldout_null",
        "heldout_handcrafted",
        "heldout_learned",
        "compute_U",
        "compute_V",
        "compute_R",
        "compute_tflop_sd15",
    ]  # cumulative training compute
    # after them: heldout_diversity, then heldout_<monitor>_{null,handcrafted,learned} for each --monitor-reward

    def __init__(self, path: str, resume_step: int, extra_fields: list[str] | tuple = ()):
        self.path = path
        self.fields = self.FIELDS + [f for f in extra_fields if f not in self.FIELDS]
        rows = []
        if resume_step and os.path.isfile(path):
            with open(path, newline="", encoding="utf-8") as f:
                rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and int(r["step"]) <= resume_step]
        # the kept rows are rewritten atomically, then appended to: a kill while
        # resuming never truncates the log
        import io

        from reneg.fileio import atomic_write_text

        buf = io.StringIO(newline="")
        w = csv.DictWriter(buf, self.fields, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
        atomic_write_text(path, buf.getvalue())
        self.f = open(path, "a", newline="", encoding="utf-8")
        self.w = csv.DictWriter(self.f, self.fields, extrasaction="ignore")

    def write(self, row: dict) -> None:
        try:
            self.w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            self.f.flush()
        except OSError as e:  # a full disk shows up here first: name the file
            from reneg.fileio import OutputError

            raise OutputError(f"{self.path}: writing failed: {e.strerror or e}") from e

    def close(self):
        self.f.close()


def base_model_fields(model: str) -> dict:
    """Metadata naming the model an embedding was made on: its file or folder name and, for a
    single file, ``base_model_hash``: the first 10 hex digits of the sha256 of the whole file, the
    "model hash" A1111 shows (its "autov2" hash; reading a multi-GB file takes some seconds)."""
    fields = {"base_model": os.path.basename(os.path.normpath(model))}
    if os.path.isfile(model):
        from reneg.backends.single_file import file_sha256

        fields["base_model_hash"] = file_sha256(model)[:10]
    return fields


def load_monitor_rewards(cfg: TrainConfig, device) -> dict:
    """The ``--monitor-reward`` models by their names (reneg.options.monitor_names): frozen, in eval
    mode, scored without grad on the held-out images only; they never enter the loss or the compute meter."""
    from reneg.options import monitor_names
    from reneg.rewards import load_reward

    specs = list(getattr(cfg, "monitor_rewards", None) or [])
    dtype = weights_dtype(cfg.mixed_precision, device)
    return {name: load_reward(spec, device, dtype) for name, spec in zip(monitor_names(specs, cfg.rewards), specs)}


def check_image_tower(cfg: TrainConfig, reward, device) -> None:
    """``--keep-best-by diversity`` needs the training reward's image tower (one tiny no-grad pass)."""
    if getattr(cfg, "keep_best_by", None) != "diversity":
        return
    with torch.no_grad():
        f = reward.image_features(torch.zeros(1, 3, 32, 32, device=device))
    if f is None:
        raise TrainingError(
            f"--keep-best-by diversity: the training reward ({getattr(reward, 'name', 'reward')}) has no image "
            f"tower to measure the held-out diversity in; keep the best by heldout or a --monitor-reward"
        )


def run_train(cfg: TrainConfig, accelerator=None, *, handle_signals: bool = False) -> dict:
    """Train; returns the summary dict of the finished run (also written to ``OUT/summary.json``,
    with ``"status": "finished"``).

    A run stopped before its last step (``OUT/STOP``; with ``handle_signals``, also SIGTERM or
    Ctrl-C) writes its checkpoint and a summary with ``"status": "stopped"``, then raises
    :class:`TrainingStopped`. ``handle_signals`` is for a command's entry point: a library call leaves
    the process's signal handlers alone. The out folder is locked (``OUT/.reneg.lock``) while it runs.
    """
    from accelerate import Accelerator

    acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision, cpu=(cfg.device == "cpu"))
    validate_train(cfg, acc.num_processes)
    main = acc.is_main_process
    lock = None
    if main:  # one writer per out folder; released when this returns or the process ends, however
        from reneg.fileio import FolderLock

        lock = FolderLock(cfg.out, "reneg train", flag="--out").acquire()
    try:
        check_out_free(cfg)  # again, now that no other run can start there
        return _run_train(cfg, acc, main, handle_signals)
    finally:
        if lock is not None:
            lock.release()


def _run_train(cfg: TrainConfig, acc, main: bool, handle_signals: bool) -> dict:
    device = torch.device(cfg.device) if cfg.device and acc.num_processes == 1 else acc.device
    torch.manual_seed(cfg.seed)

    from reneg.backends.loading import load_diffusers
    from reneg.rewards import load_rewards

    backend = load_diffusers(
        cfg.model,
        device=device,
        dtype=weights_dtype(cfg.mixed_precision, device),
        config=cfg.config,
        vae=cfg.vae,
        prediction_type=cfg.prediction_type,
    )
    if main:
        print(f"reneg train: model {backend.describe()}", flush=True)
    reward = load_rewards(cfg.rewards, device=device, dtype=weights_dtype(cfg.mixed_precision, device))
    judges = load_monitor_rewards(cfg, device) if main else {}  # scored on held-out images only, by main
    check_image_tower(cfg, reward, device)
    note = backend.resolution_note(cfg.resolution)
    if note and main:
        print(f"reneg train: {note}", flush=True)
    if cfg.gradient_checkpointing:
        enable_checkpointing(backend, reward)
    if getattr(cfg, "channels_last", False) or getattr(cfg, "compile", False):
        backend.set_performance(
            channels_last=getattr(cfg, "channels_last", False) or None, compile=getattr(cfg, "compile", False)
        )

    prompts = load_prompts(cfg.prompts)
    if cfg.heldout:
        train, heldout = prompts, load_prompts(cfg.heldout)[: cfg.heldout_count]
    else:
        train, heldout = prompts[: -cfg.heldout_count], prompts[-cfg.heldout_count :]
    train_texts = [p.text for p in train]
    note = backend.truncation_note(train_texts + [p.text for p in heldout]) if main else None
    if note:
        print(f"reneg train: {note}", flush=True)
    heldout_texts = [p.text for p in heldout]
    heldout_seeds = [cfg.heldout_seed + i for i in range(len(heldout_texts))]

    # SDXL: the learned negative is the 77 x 2048 cross-attention rows; the pooled vector stays the
    # empty prompt's (what hosts pass for an empty negative) and is saved beside it in the file
    null, _ = backend.null_embedding()
    handcrafted, hc_pooled = text_negative(backend, cfg.handcrafted)
    if cfg.init == "null":
        init = null
    elif cfg.init == "handcrafted":
        init = handcrafted
    else:
        init = load_embedding(cfg.init, expected_family=backend.family).model_rows()
    neg = torch.nn.Parameter(init.detach().float().clone().to(device))
    opt = torch.optim.AdamW([neg], lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg))

    start, skipped, history = 0, 0, []
    watch_state, best_neg = None, None  # a resumed run's held-out monitor and best embedding
    spent = ComputeMeter()  # all processes' training compute so far (held-out scoring is not counted)
    ckpt_path = os.path.join(cfg.out, CHECKPOINT_NAME)
    resume_from = find_resume(cfg.out, cfg.resume) if cfg.resume else None
    if resume_from:
        state = load_checkpoint(resume_from)
        if tuple(state["neg"].shape) != tuple(neg.shape):
            raise TrainingError(
                f"{resume_from}: checkpoint embedding {list(state['neg'].shape)} does not "
                f"fit this model ({list(neg.shape)})"
            )
        with torch.no_grad():
            neg.copy_(state["neg"].to(device))
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        start, skipped, history = state["step"], state.get("skipped", 0), state["heldout"]
        if "rng_cpu" in state:
            torch.set_rng_state(state["rng_cpu"])
        spent = ComputeMeter(_checkpoint_compute(state))
        watch_state, best_neg = _checkpoint_extra(state).get("monitor"), state.get("best_neg")

    obj = ObjectiveConfig(cfg.sampling_steps, cfg.guidance, tuple(cfg.grad_range))
    sigmas = backend.schedule(cfg.sampling_steps)
    accum = cfg.batch_size // (cfg.micro_batch * acc.num_processes)
    shape = backend.latent_shape(cfg.micro_batch, cfg.resolution, cfg.resolution)
    measures = ["heldout", *judges, "diversity"]
    watch = HeldoutMonitor(measures, cfg.keep_best_by, watch_state if isinstance(watch_state, dict) else None)
    extra_fields = ["heldout_diversity"] + [
        f"heldout_{n}_{k}" for n in judges for k in ("null", "handcrafted", "learned")
    ]
    log = CsvLog(os.path.join(cfg.out, "log.csv"), start, extra_fields) if main else None
    base = dict(base_model=cfg.base_model_name) if cfg.base_model_name else base_model_fields(cfg.model)
    from reneg.rewards import reward_files

    meta = dict(
        kind="global",
        **base,
        rewards=cfg.rewards,
        reward_files=reward_files(cfg.rewards),  # kind, path, name and size: how reneg eval recognises them
        steps=cfg.steps,
        lr=cfg.lr,
        batch=cfg.batch_size,
        guidance_scale=cfg.guidance,
        sampling_steps=cfg.sampling_steps,
        seed=cfg.seed,
        resolution=cfg.resolution,
        init=os.path.basename(cfg.init),
    )

    def heldout_scores(t, pooled=None, features: bool = False) -> tuple[dict, torch.Tensor | None]:
        """The per-image scores of one negative's held-out images: the training reward's ("heldout") and
        each monitor reward's (by name); with ``features``, also the images' features in the training
        reward's image tower (None when it has none). No grad, not metered: held-out scoring measures."""
        keep = bool(judges) or features
        got = generate_and_score(
            backend,
            reward,
            heldout_texts,
            heldout_seeds,
            backend.negative_cond(t.detach(), pooled),
            cfg.sampling_steps,
            cfg.guidance,
            cfg.resolution,
            cfg.resolution,
            cfg.eval_batch,
            keep_images=keep,
        )
        scores, images = got if keep else (got, None)
        out = {"heldout": scores}
        feats = None
        if images is not None:
            with torch.no_grad():
                for name, judge in judges.items():
                    parts = []
                    for i in range(0, len(heldout_texts), cfg.eval_batch):
                        img = images[i : i + cfg.eval_batch].to(backend.device)
                        parts.append(judge(img, heldout_texts[i : i + cfg.eval_batch]).float().cpu())
                    out[name] = torch.cat(parts)
            if features:
                feats = image_features(reward, images.to(backend.device), batch=cfg.eval_batch)
        return out, feats

    def heldout_eval(step: int) -> tuple[dict, dict]:
        """One held-out check: the record (means; null and handcrafted scored once and reused) and the
        learned negative's per-image scores by measure."""
        base_keys = ["null", "handcrafted"] + [f"{n}_{k}" for n in judges for k in ("null", "handcrafted")]
        base = next((h for h in history if all(k in h for k in base_keys)), None)
        rec = {"step": step}
        if not base:
            base = {}
            for which, (t, pooled) in (("null", (null, None)), ("handcrafted", (handcrafted, hc_pooled))):
                scores, _ = heldout_scores(t, pooled)
                base[which] = float(scores["heldout"].mean())
                base.update({f"{n}_{which}": float(scores[n].mean()) for n in judges})
        rec.update({k: base[k] for k in base_keys})
        scores, feats = heldout_scores(neg, features=True)
        rec["learned"] = float(scores["heldout"].mean())
        rec.update({f"{n}_learned": float(scores[n].mean()) for n in judges})
        # the spread of the learned negative's images across the held-out prompts (one image each)
        rec["diversity"] = pairwise_diversity(feats) if feats is not None else None
        history.append(rec)
        return rec, {k: [float(x) for x in v] for k, v in scores.items()}

    saved_config = dict(cfg.to_json(), **resume_fingerprint(cfg))  # what a --resume compares
    best_path = os.path.join(cfg.out, BEST_NAME)
    kept = {"neg": best_neg}  # --keep-best-by: the embedding of the best check so far (the checkpoint keeps it)

    def write_best() -> None:
        # as embedding.safetensors is written (atomically, the run's metadata), saying which check it is
        k = watch.keep
        save_embedding(
            best_path,
            as_embedding(backend, kept["neg"]),
            overwrite=True,
            **dict(meta, trained_steps=k["step"], best_by=k["by"], best_step=k["step"], best_value=k["value"]),
        )

    def write_outputs(step: int) -> None:
        # all or nothing: the embedding staged, the checkpoint written (the commit), the embedding moved in
        emb = as_embedding(backend, neg)
        save_run_files(
            cfg.out,
            lambda path: save_embedding(path, emb, overwrite=True, **dict(meta, trained_steps=step)),
            lambda path: save_checkpoint(
                path,
                step=step,
                neg=neg,
                optimizer=opt,
                scheduler=sched,
                skipped=skipped,
                config=saved_config,
                heldout=history,
                extra={"compute": spent.counts, "monitor": watch.state()},
                best_neg=kept["neg"],
            ),
        )

    summary_path = os.path.join(cfg.out, SUMMARY_NAME)

    def watch_fields() -> dict:
        # the hacking warnings given so far and (--keep-best-by) the best check: summary.json carries them
        d = {"warnings": watch.warnings}
        if cfg.keep_best_by:
            d["best"] = dict(watch.keep, embedding=best_path) if watch.keep else None
        return d

    def write_status(status: str, step: int, **more) -> None:
        # what scripts (and the studio) read to tell a finished run from a stopped or running one
        atomic_write_json(
            summary_path,
            dict(
                status=status,
                step=step,
                steps=cfg.steps,
                checkpoint=ckpt_path,
                embedding=os.path.join(cfg.out, "embedding.safetensors"),
                **watch_fields(),
                **more,
                config=cfg.to_json(),
            ),
        )

    if main and cfg.overwrite and not resume_from:
        remove_old_run(cfg.out)  # --overwrite: the old run's files go once the models have loaded
    if main and cfg.keep_best_by and resume_from:
        # embedding-best.safetensors as it was at the checkpoint (a killed run may have written a later one)
        if watch.keep and kept["neg"] is not None:
            write_best()
        elif os.path.isfile(best_path):
            os.unlink(best_path)
    if main and start < cfg.steps:
        write_status("running", start)  # a summary that says "finished" only when the run has
    # --- reported events (trainer/events.py): samples, TensorBoard, stop on SIGTERM or OUT/STOP ---
    events = TrainEvents(
        cfg, backend, main, null, heldout_texts, heldout_seeds, acc.num_processes, signals=handle_signals
    )
    events.on_start(start, neg)
    stopped_at = None
    # --- end reported events ---

    def held_out_check(step: int) -> dict:
        """Score the held-out images, then watch them: warnings (once a measure) and the best check."""
        rec, per_image = heldout_eval(step)
        values = {"heldout": rec["learned"], "diversity": rec["diversity"]}
        values.update({n: rec[f"{n}_learned"] for n in judges})
        new, best_now = watch.observe(
            step, values, per_image, cfg.eval_every or step, kept=best_path if cfg.keep_best_by else None
        )
        if best_now:
            kept["neg"] = neg.detach().float().cpu().clone()
            write_best()
        for w in new:
            print(f"reneg train: warning: {w['message']}", flush=True)
            events.on_warning(w)
        if new:
            write_status("running", step)  # a long run's reader (the studio) sees a warning as it comes
        return rec

    bar = None
    if main and cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=start, desc="reneg train", dynamic_ncols=True)
    bad_streak, t0 = 0, time.time()
    meter = ComputeMeter()  # this process's counts of the current step
    m_denoiser, m_decode, m_reward = (
        meter.denoiser(backend.denoiser),
        meter.decode(backend.decode),
        meter.reward(reward),
    )
    grads_per_rollout = getattr(cfg, "grads_per_rollout", 1)
    rollout_steps = getattr(cfg, "rollout_steps", None) or None
    try:
        for step in range(start, cfg.steps):
            opt.zero_grad(set_to_none=True)
            rewards, loss_sum = [], 0.0
            for m in range(accum):
                j = acc.process_index * accum + m
                g = sample_generator(cfg.seed, step, j)
                idx = torch.randint(len(train_texts), (cfg.micro_batch,), generator=g)
                ps = [train_texts[i] for i in idx]
                noise = torch.randn(shape, generator=g).to(device)
                gi = obj.grad_indices(grads_per_rollout, g)
                with acc.autocast():
                    res = grad_step_loss(
                        m_denoiser,
                        m_decode,
                        m_reward,
                        ps,
                        backend.encode_prompts(ps),
                        backend.negative_cond(neg),
                        initial_latent(noise, sigmas[0]),
                        sigmas,
                        cfg.guidance,
                        gi if len(gi) > 1 else gi[0],
                        rollout_steps=rollout_steps,
                        # several grad steps: each one's backward at once (one graph alive)
                        backward=(lambda loss: (loss / accum).backward()) if len(gi) > 1 else None,
                    )
                if len(gi) == 1:
                    (res.loss / accum).backward()
                rewards.append(res.rewards.float())
                loss_sum += float(res.loss.detach()) / accum
            grad = neg.grad if neg.grad is not None else torch.zeros_like(neg)
            if acc.num_processes > 1:
                grad = acc.reduce(grad.contiguous(), reduction="mean")
                neg.grad = grad
            r_all = torch.cat(rewards)
            if acc.num_processes > 1:
                r_all = acc.gather(r_all)
            gnorm = float(grad.norm())
            bad = None
            if not math.isfinite(gnorm) or not math.isfinite(loss_sum):
                bad = "non-finite loss or gradient"
            else:
                # a finite gradient can still make a non-finite update (a huge --lr): the step is taken
                # on a copy of the state and undone when the embedding is no longer finite
                before = (neg.detach().clone(), copy.deepcopy(opt.state_dict()))
                opt.step()
                if not bool(torch.isfinite(neg).all()):
                    with torch.no_grad():
                        neg.copy_(before[0])
                    opt.load_state_dict(before[1])
                    bad = "non-finite update"
                del before
            if bad:
                skipped += 1
                bad_streak += 1
                if main:
                    print(
                        f"reneg train: step {step + 1}: {bad}, update skipped "
                        f"({bad_streak} in a row, {skipped} in all)",
                        flush=True,
                    )
                if bad_streak >= cfg.max_bad_steps:
                    last = (
                        f"The last good checkpoint is {ckpt_path}"
                        if os.path.isfile(ckpt_path)
                        else "No checkpoint was written before this"
                    )
                    raise TrainingError(
                        f"stopped: {bad_streak} non-finite updates in a row (limit --max-bad-steps "
                        f"{cfg.max_bad_steps}). {last}; try a lower --lr "
                        f"or --mixed-precision no."
                    )
            else:
                bad_streak = 0
            with warnings.catch_warnings():
                # a skipped first step never calls opt.step(); the schedule advances all the same, on purpose
                warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
                sched.step()
            done = step + 1
            counts = meter.take()
            if acc.num_processes > 1:
                from accelerate.utils import gather_object

                for c in gather_object([counts]):
                    spent.add(c)
            else:
                spent.add(counts)
            units = spent.units()
            row = {
                "step": done,
                "loss": loss_sum,
                "reward": float(r_all.mean()),
                "lr": sched.get_last_lr()[0],
                "grad_norm": gnorm,
                "skipped": skipped,
                "seconds": round(time.time() - t0, 2),
                "compute_U": units["U"],
                "compute_V": units["V"],
                "compute_R": units["R"],
                "compute_tflop_sd15": round(spent.tflop_sd15(), 3),
            }
            watch.add_training_reward(done, row["reward"])
            # the last step's row carries the final held-out scores, like every --eval-every row
            if main and (done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0)):
                rec = held_out_check(done)
                row.update({f"heldout_{k}": v for k, v in rec.items() if k != "step"})
            if main:
                log.write(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(reward=f"{row['reward']:.4f}", lr=f"{row['lr']:.2e}")
                if done % cfg.checkpoint_every == 0 and bad_streak == 0:
                    write_outputs(done)
                events.on_step(done, row, neg, last=done == cfg.steps)
            acc.wait_for_everyone()
            # --- reported events: a stop request ends the run here, with a checkpoint ---
            if done < cfg.steps and events.should_stop(acc):
                if main:
                    write_outputs(done)
                    write_status("stopped", done, reason=events.stop_reason)
                    print(
                        f"reneg train: stopped on request after step {done}; checkpoint {ckpt_path} "
                        f"(continue with --resume)",
                        flush=True,
                    )
                stopped_at = done
                break
            # --- end reported events ---
    except BaseException as e:
        events.close()
        if main:  # best effort (the disk may be what failed): the summary must not keep saying "running"
            try:
                interrupted = isinstance(e, KeyboardInterrupt)
                write_status("interrupted" if interrupted else "failed", step, error=str(e)[:300])
            except Exception:
                pass
        raise
    finally:
        if bar is not None:
            bar.close()
        if log is not None:
            log.close()
        events.close_stop_watch()

    if stopped_at is not None:
        reason = events.stop_reason or "STOP"
        events.close()
        acc.wait_for_everyone()
        raise TrainingStopped(stopped_at, cfg.steps, ckpt_path, reason)

    summary = {}
    if main:
        if history and history[-1]["step"] == cfg.steps:
            rec = history[-1]  # scored in the last step's row (or before a resume at the last step)
        else:
            rec = held_out_check(cfg.steps)
            events.on_heldout(rec)
        write_outputs(cfg.steps)
        summary = {
            "status": "finished",
            "steps": cfg.steps,
            "family": backend.family,
            # how the model was read (single file or folder, prediction type and why, VAE), as printed at the start
            "model": {k: v for k, v in getattr(backend, "model_info", {}).items() if v is not None},
            # null, handcrafted, learned; each monitor's (NAME_null, ...); the learned images' diversity
            "heldout": {k: v for k, v in rec.items() if k != "step"},
            "heldout_prompts": len(heldout_texts),
            "heldout_seeds": [heldout_seeds[0], heldout_seeds[-1]] if heldout_seeds else [],
            "heldout_history": history,
            **watch_fields(),
            "skipped_updates": skipped,
            "compute": spent.to_json(),
            "rewards": cfg.rewards,
            "embedding": os.path.join(cfg.out, "embedding.safetensors"),
            "seconds": round(time.time() - t0, 2),
            "config": cfg.to_json(),
        }
        atomic_write_json(summary_path, summary)
    events.close()
    acc.wait_for_everyone()
    return summary


def _checkpoint_extra(state: dict) -> dict:
    """A checkpoint's ``extra`` record (compute counts, the held-out monitor), parsed."""
    import json

    extra = state.get("extra") or {}
    if isinstance(extra, str):  # load_checkpoint parses it; a raw state still holds JSON text
        try:
            extra = json.loads(extra)
        except ValueError:
            return {}
    return extra if isinstance(extra, dict) else {}


def _checkpoint_compute(state: dict) -> dict:
    """The compute counts a checkpoint carries (none in checkpoints written before the meter)."""
    return _checkpoint_extra(state).get("compute", {})


def enable_checkpointing(backend, reward=None) -> None:
    """Gradient checkpointing of the UNet, the VAE decoder and the reward's image tower
    (less memory, ~1 more forward of each)."""
    for m in (backend.unet, backend.vae):
        if hasattr(m, "enable_gradient_checkpointing"):
            m.enable_gradient_checkpointing()
    if reward is not None and hasattr(reward, "enable_gradient_checkpointing"):
        reward.enable_gradient_checkpointing()

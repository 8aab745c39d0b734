"""``reneg train``: learn a global negative embedding from a reward (paper section 3).

One readable loop, :func:`train_loop`; a :class:`TrainRun` carries the run's state between its parts.
``accelerate launch`` with N processes takes the same step as one process, and a resumed run sees
exactly the samples the uninterrupted one would have (:func:`train_step`, :func:`sample_generator`).
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch

from reneg.backends.loading import weights_dtype
from reneg.compute import ComputeMeter
from reneg.cond import Cond
from reneg.diversity import image_features, pairwise_diversity
from reneg.embedding import load_embedding, save_embedding
from reneg.fileio import atomic_write_json
from reneg.generate import as_embedding, generate_and_score, text_negative
from reneg.nag import guidance_of
from reneg.objective import ObjectiveConfig, grad_step_loss
from reneg.prompts import load_prompts
from reneg.sampling import initial_latent, is_flow

from .checkpoint import CHECKPOINT_NAME, find_resume, load_checkpoint, save_checkpoint, save_run_files
from .config import BEST_NAME, TrainConfig, check_out_free, remove_old_run, resume_fingerprint, validate_train
from .events import STOP_EXIT, TrainEvents
from .monitor import HeldoutMonitor

SUMMARY_NAME = "summary.json"
SCORES_NAME = "heldout_scores.csv"  # every held-out check's per-image scores (ScoreLog)
TOKENS_NAME = "tokens"  # --tokens: OUT/tokens.safetensors (and tokens.pt), the textual-inversion files


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
    """The generator the prompts, noise and grad step of micro-batch ``index`` of ``step`` are drawn from,
    seeded by ``(seed, step, index)``: a resumed run sees exactly the samples the uninterrupted one would
    have, and N processes split one global batch exactly."""
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

    def write(self, *rows: dict) -> None:
        """Append rows (floats to 6 significant digits), flushed together."""
        try:
            for row in rows:
                self.w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
            self.f.flush()
        except OSError as e:  # a full disk shows up here first: name the file
            from reneg.fileio import OutputError

            raise OutputError(f"{self.path}: writing failed: {e.strerror or e}") from e

    def close(self):
        self.f.close()


class ScoreLog(CsvLog):
    """``heldout_scores.csv``: every held-out check's per-image scores of the learned negative, one row per
    image and measure (``heldout``: the training reward; each monitor by its name), so that a user can read
    what the check's means hide (which prompts a monitor turned against); kept like log.csv on resume."""

    FIELDS = ["step", "prompt_index", "prompt", "measure", "score"]

    def write_check(self, step: int, prompts: list[str], per_image: dict) -> None:
        self.write(
            *(
                {"step": step, "prompt_index": i, "prompt": prompts[i], "measure": measure, "score": v}
                for measure, scores in per_image.items()
                for i, v in enumerate(scores)
            )
        )


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

    specs = list(cfg.monitor_rewards or [])
    dtype = weights_dtype(cfg.mixed_precision, device)
    return {name: load_reward(spec, device, dtype) for name, spec in zip(monitor_names(specs, cfg.rewards), specs)}


def check_image_tower(cfg: TrainConfig, reward, device) -> None:
    """``--keep-best-by diversity`` needs the training reward's image tower (one tiny no-grad pass)."""
    if cfg.keep_best_by != "diversity":
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
        if cfg.predictor:  # a negative predictor (trainer/predictor.py) instead of one global negative
            from .predictor import predictor_loop

            return predictor_loop(cfg, acc, main)
        return train_loop(cfg, acc, main, handle_signals)
    finally:
        if lock is not None:
            lock.release()


def train_loop(cfg: TrainConfig, acc, main: bool, handle_signals: bool) -> dict:
    """The run, from its setup (or its checkpoint) to its summary: one step, its log row, a stop check.

    :func:`setup_run` (models, prompts, embedding, optimizer), :func:`resume` (the checkpoint),
    :func:`open_outputs` and :func:`start_events`, then for each step :func:`train_step` (the update;
    returns the log row), :func:`log_step` (held-out check, log, checkpoint, events) and
    :func:`stop_requested`, and :func:`finish` (summary.json)."""
    run = setup_run(cfg, acc, main)
    resume(run)
    open_outputs(run)
    start_events(run, handle_signals)
    step, stopped_at = run.start, None
    try:
        for step in range(run.start, cfg.steps):
            row = train_step(run, step)
            log_step(run, row)
            acc.wait_for_everyone()
            if stop_requested(run, row["step"]):
                stopped_at = row["step"]
                break
    except BaseException as e:
        record_failure(run, e, step)
        raise
    finally:
        close_loop(run)
    if stopped_at is not None:
        reason = run.events.stop_reason or "STOP"
        run.events.close()
        acc.wait_for_everyone()
        raise TrainingStopped(stopped_at, cfg.steps, run.ckpt_path, reason)
    return finish(run)


@dataclass
class TrainRun:
    """One run's models, embedding, optimizer and progress: made by :func:`setup_run`, brought to its
    checkpoint by :func:`resume`, given its outputs by :func:`open_outputs` and :func:`start_events`."""

    cfg: TrainConfig
    acc: Any
    main: bool  # the main process: the one that scores held-out images and writes files
    device: torch.device
    backend: Any
    reward: Any
    judges: dict  # the --monitor-reward models by name (main process only)
    train_texts: list
    heldout_texts: list
    heldout_seeds: list
    null: torch.Tensor
    handcrafted: torch.Tensor
    hc_pooled: Any
    neg: torch.nn.Parameter  # the one trainable tensor (--tokens: [1, N, widths], the vectors / TokenEncoder.unit)
    opt: torch.optim.Optimizer
    sched: Any
    obj: ObjectiveConfig
    sigmas: torch.Tensor
    accum: int  # micro-batches per process and step
    shape: tuple  # one micro-batch's latent
    # where the run stands: a fresh run's, or the checkpoint's after resume()
    start: int = 0
    skipped: int = 0
    bad_streak: int = 0
    history: list = field(default_factory=list)  # the held-out checks so far
    spent: ComputeMeter = field(default_factory=ComputeMeter)  # all processes' training compute so far
    resumed_from: str | None = None
    watch_state: Any = None  # the checkpoint's held-out monitor
    best_neg: torch.Tensor | None = None  # --keep-best-by: the embedding of the best check so far
    # set by open_outputs() and start_events()
    watch: HeldoutMonitor | None = None
    log: CsvLog | None = None
    score_log: ScoreLog | None = None
    meta: dict = field(default_factory=dict)  # the embedding files' metadata
    saved_config: dict = field(default_factory=dict)  # what a --resume compares
    events: TrainEvents | None = None
    bar: Any = None
    meter: ComputeMeter | None = None  # this process's counts of the current step
    metered: tuple = ()  # the denoiser, decode and reward, counted by meter
    t0: float = 0.0
    tokens: Any = None  # --tokens: the TokenEncoder the vectors go through

    def neg_cond(self, t: torch.Tensor | None = None):
        """The Cond of the trained tensor ``t`` (default: the embedding being trained)."""
        t = self.neg if t is None else t
        if self.tokens is None:
            return self.backend.negative_cond(t)
        return self.tokens.cond(t.to(self.device)[0] * self.tokens.unit.to(self.device))

    def embedding_of(self, t: torch.Tensor):
        """The output-space file of the trained tensor ``t`` (--tokens: what its vectors encode to)."""
        if self.tokens is None:
            return as_embedding(self.backend, t)
        from reneg.embedding import NegEmbedding

        with torch.no_grad():
            rows, pooled = self.tokens.encode(t.detach().to(self.device)[0] * self.tokens.unit.to(self.device))
        return NegEmbedding(rows.cpu(), self.backend.family, None if pooled is None else pooled.cpu())

    def write_tokens(self, t: torch.Tensor, stem: str, **meta) -> None:
        """--tokens: ``OUT/<stem>.safetensors`` (and ``.pt`` for a one-encoder family), the files the UIs read."""
        if self.tokens is None:
            return
        from reneg.tokens import TokenNegative, save_tokens

        vec = t.detach().float().cpu()[0] * self.tokens.unit
        info = dict(self.meta, **meta, how=f"reneg train --tokens {vec.shape[0]}: ReNeg objective, frozen text encoder")
        info = {k: v if isinstance(v, str) else json.dumps(v) for k, v in info.items()}
        tok = TokenNegative.from_flat(vec, self.backend.family, metadata=info)
        for suffix in (".safetensors",) + ((".pt",) if self.backend.family != "sdxl" else ()):
            save_tokens(os.path.join(self.cfg.out, stem + suffix), tok, overwrite=True, step=meta.get("trained_steps"))

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.cfg.out, CHECKPOINT_NAME)

    @property
    def best_path(self) -> str:
        return os.path.join(self.cfg.out, BEST_NAME)

    @property
    def embedding_path(self) -> str:
        return os.path.join(self.cfg.out, "embedding.safetensors")

    def write_outputs(self, step: int) -> None:
        # all or nothing: the embedding staged, the checkpoint written (the commit), the embedding moved in
        emb = self.embedding_of(self.neg)
        save_run_files(
            self.cfg.out,
            lambda path: save_embedding(path, emb, overwrite=True, **dict(self.meta, trained_steps=step)),
            lambda path: save_checkpoint(
                path,
                step=step,
                neg=self.neg,
                optimizer=self.opt,
                scheduler=self.sched,
                skipped=self.skipped,
                config=self.saved_config,
                heldout=self.history,
                extra={"compute": self.spent.counts, "monitor": self.watch.state()},
                best_neg=self.best_neg,
            ),
        )
        self.write_tokens(self.neg, TOKENS_NAME, trained_steps=step)  # after the commit: rebuilt from it on resume

    def write_best(self) -> None:
        # as embedding.safetensors is written (atomically, the run's metadata), saying which check it is
        k = self.watch.keep
        best = dict(trained_steps=k["step"], best_by=k["by"], best_step=k["step"], best_value=k["value"])
        save_embedding(self.best_path, self.embedding_of(self.best_neg), overwrite=True, **dict(self.meta, **best))
        self.write_tokens(self.best_neg, TOKENS_NAME + "-best", **best)

    def watch_fields(self) -> dict:
        # the hacking warnings given so far and (--keep-best-by) the best check: summary.json carries them
        d = {"warnings": self.watch.warnings}
        if self.cfg.keep_best_by:
            d["best"] = dict(self.watch.keep, embedding=self.best_path) if self.watch.keep else None
        return d

    def write_status(self, status: str, step: int, **more) -> None:
        # what scripts (and the studio) read to tell a finished run from a stopped or running one
        atomic_write_json(
            os.path.join(self.cfg.out, SUMMARY_NAME),
            dict(
                status=status,
                step=step,
                steps=self.cfg.steps,
                checkpoint=self.ckpt_path,
                embedding=self.embedding_path,
                **self.watch_fields(),
                **more,
                config=self.cfg.to_json(),
            ),
        )


# --- setup ---------------------------------------------------------------------------------------------


def setup_run(cfg: TrainConfig, acc, main: bool) -> TrainRun:
    """The models, the prompts, the negatives compared against, the embedding and its optimizer: a run
    at step 0."""
    device = torch.device(cfg.device) if cfg.device and acc.num_processes == 1 else acc.device
    torch.manual_seed(cfg.seed)
    backend, reward, judges = load_models(cfg, device, main)
    train_texts, heldout_texts = split_prompts(cfg, backend, main)
    # SDXL: the learned negative is the 77 x 2048 cross-attention rows; the pooled vector stays the
    # empty prompt's (what hosts pass for an empty negative) and is saved beside it in the file
    null, _ = backend.null_embedding()
    handcrafted, hc_pooled = text_negative(backend, cfg.handcrafted)
    tokens = None
    if cfg.tokens:
        tokens, init = token_start(cfg, backend)
    else:
        init = {"null": null, "handcrafted": handcrafted}.get(cfg.init)
        if init is None:
            init = load_embedding(cfg.init, expected_family=backend.family).model_rows()
    if cfg.offload_text_encoder:  # every prompt encoded by now: the text encoder(s) leave the device
        pre_encode_and_offload(cfg, acc, main, backend, train_texts, heldout_texts)
    neg = torch.nn.Parameter(init.detach().float().clone().to(device))
    opt = torch.optim.AdamW([neg], lr=cfg.lr, weight_decay=cfg.weight_decay)
    return TrainRun(
        cfg=cfg,
        acc=acc,
        main=main,
        device=device,
        backend=backend,
        reward=reward,
        judges=judges,
        train_texts=train_texts,
        heldout_texts=heldout_texts,
        heldout_seeds=[cfg.heldout_seed + i for i in range(len(heldout_texts))],
        null=null,
        handcrafted=handcrafted,
        hc_pooled=hc_pooled,
        neg=neg,
        opt=opt,
        sched=torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg)),
        obj=ObjectiveConfig(cfg.sampling_steps, guidance_of(cfg, backend.family), tuple(cfg.grad_range)),
        # the shape first: a flow model's schedule follows the image size it was last given (Flux dev, Qwen-Image)
        shape=backend.latent_shape(cfg.micro_batch, cfg.resolution, cfg.resolution),
        sigmas=backend.schedule(cfg.sampling_steps),
        accum=cfg.batch_size // (cfg.micro_batch * acc.num_processes),
        tokens=tokens,
    )


def pre_encode_and_offload(cfg: TrainConfig, acc, main: bool, backend, train_texts, heldout_texts) -> dict:
    """--offload-text-encoder: encode (and cache) every prompt the run will need, then move the text
    encoder(s) to the CPU; returns the moved encoders' parameter counts by name.

    The run encodes its training prompts (every process; as :func:`micro_batch` does, under the
    accelerator's autocast, so the cached rows are the ones the run would make without the flag; the
    predictor encodes outside it), its held-out prompts (the main process: held-out checks and sample
    images) and, before this, the empty prompt (``null_embedding``, also the pooled vector of SDXL's
    and Flux's negatives) and the handcrafted negative (``text_negative``). The monitor rewards and the
    training reward have their own text towers, which stay. A prompt encoded after this is still encoded
    exactly, on the CPU, with one warning."""
    import contextlib

    if not hasattr(backend, "offload_text_encoder"):
        raise TrainingError(f"--offload-text-encoder: the {backend.family} backend can not offload its text encoder")
    t0 = time.time()
    train = list(dict.fromkeys(train_texts))
    seen = set(train)
    held = [p for p in dict.fromkeys(heldout_texts) if p not in seen] if main else []
    with acc.autocast() if not cfg.predictor else contextlib.nullcontext():
        for p in train:  # one prompt per call, as the backends encode a batch (exact resume)
            backend.encode_prompts([p])
    for p in held:
        backend.encode_prompts([p])
    from reneg.backends.diffusers_backend import module_device

    before = sorted({str(module_device(m)) for _, m in backend.text_encoders()})

    def warn(message: str) -> None:
        if main:
            print(f"reneg train: warning: {message}", flush=True)

    moved = backend.offload_text_encoder("cpu", warn=warn)
    if main:
        print(
            f"reneg train: {offload_line(backend, moved, before, len(train), len(held), time.time() - t0)}", flush=True
        )
    return moved


def parameter_count(n: int) -> str:
    return f"{n / 1e9:.3g} B" if n >= 1e9 else f"{n / 1e6:.3g} M" if n >= 1e6 else str(n)


def offload_line(backend, moved: dict, before: list, n_train: int, n_held: int, seconds: float) -> str:
    """The one line --offload-text-encoder prints: what was encoded, what the cache holds, what moved."""
    kinds = {name: type(m).__name__ for name, m in backend.text_encoders()}
    parts = ", ".join(f"{name} ({kinds.get(name, '?')}, {parameter_count(n)} parameters)" for name, n in moved.items())
    total = f"; {parameter_count(sum(moved.values()))} parameters in all" if len(moved) > 1 else ""
    held = f" and {n_held} held-out" if n_held else ""
    where = (
        "to the CPU (already there: the CPU is the compute device)"
        if before == ["cpu"]
        else f"from {', '.join(before)} to the CPU"
    )
    return (
        f"--offload-text-encoder: {n_train} training{held} prompts, the empty prompt and the handcrafted "
        f"negative encoded in {seconds:.1f} s and cached ({backend.text_cache_bytes() / 2**30:.3g} GiB, kept on "
        f"the CPU with the encoders, each batch's rows brought to {backend.device}); moved {parts} {where}{total}"
    )


def token_start(cfg: TrainConfig, backend) -> tuple:
    """--tokens N: the encoder and the starting vectors in its units: the end token's vector (null: the
    empty prompt where the tokenizer pads with it), the handcrafted negative's own token vectors, or a
    token file's vectors."""
    from reneg.tokens import TokenEncoder, TokenError, load_tokens

    try:
        enc = TokenEncoder(backend)
    except TokenError as e:
        raise TrainingError(f"--tokens {cfg.tokens}: {e}") from None
    if cfg.init == "null":
        vec = enc.null(cfg.tokens)
    elif cfg.init == "handcrafted":
        vec = enc.from_text(cfg.handcrafted, cfg.tokens)
    else:
        vec = load_tokens(cfg.init, expected_family=backend.family).flat()
    return enc, (vec / enc.unit).unsqueeze(0)  # [1, N, widths]: the checkpoint's shape of a trained tensor


def load_models(cfg: TrainConfig, device, main: bool) -> tuple:
    """The model, the training reward and (main process) the monitor rewards, set up as the flags say."""
    from reneg.backends.loading import load_run_model
    from reneg.frame_reward import per_frame
    from reneg.rewards import load_rewards

    dtype = weights_dtype(cfg.mixed_precision, device)
    backend = load_run_model(cfg, device, dtype)
    if main:
        print(f"reneg train: model {backend.describe()}", flush=True)
    reward = load_rewards(cfg.rewards, device=device, dtype=dtype)
    judges = load_monitor_rewards(cfg, device) if main else {}  # scored on held-out images only, by main
    check_image_tower(cfg, reward, device)
    note = backend.resolution_note(cfg.resolution)
    if note and main:
        print(f"reneg train: {note}", flush=True)
    if cfg.gradient_checkpointing:
        enable_checkpointing(backend, reward)
    if cfg.channels_last or cfg.compile:
        backend.set_performance(channels_last=cfg.channels_last or None, compile=cfg.compile)
    # --frames: a sample is a clip, each frame scored by the image reward, a clip's reward the mean
    judges = {name: per_frame(j, cfg.frames) for name, j in judges.items()}
    return backend, per_frame(reward, cfg.frames), judges


def split_prompts(cfg: TrainConfig, backend, main: bool) -> tuple[list[str], list[str]]:
    """The training and held-out prompts' texts: --heldout's first --heldout-count, or the last
    --heldout-count of --prompts."""
    prompts = load_prompts(cfg.prompts)
    if cfg.heldout:
        train, heldout = prompts, load_prompts(cfg.heldout)[: cfg.heldout_count]
    else:
        train, heldout = prompts[: -cfg.heldout_count], prompts[-cfg.heldout_count :]
    train_texts, heldout_texts = [p.text for p in train], [p.text for p in heldout]
    note = backend.truncation_note(train_texts + heldout_texts) if main else None
    if note:
        print(f"reneg train: {note}", flush=True)
    return train_texts, heldout_texts


def resume(run: TrainRun) -> None:
    """``--resume``: the checkpoint's embedding, optimizer, schedule, step, skipped updates, RNG,
    held-out checks, compute counts, monitor and best embedding (nothing when there is no checkpoint to
    resume from: no --resume, or --resume auto in a new folder)."""
    cfg = run.cfg
    path = find_resume(cfg.out, cfg.resume) if cfg.resume else None
    if not path:
        return
    state = load_checkpoint(path)
    if tuple(state["neg"].shape) != tuple(run.neg.shape):
        raise TrainingError(
            f"{path}: checkpoint embedding {list(state['neg'].shape)} does not fit this model ({list(run.neg.shape)})"
        )
    with torch.no_grad():
        run.neg.copy_(state["neg"].to(run.device))
    run.opt.load_state_dict(state["optimizer"])
    run.sched.load_state_dict(state["scheduler"])
    run.start, run.skipped, run.history = state["step"], state.get("skipped", 0), state["heldout"]
    if "rng_cpu" in state:
        torch.set_rng_state(state["rng_cpu"])
    extra = state["extra"]  # a dict: load_checkpoint parses and checks it ({} when the file has none)
    run.spent = ComputeMeter(extra.get("compute", {}))
    run.watch_state, run.best_neg = extra.get("monitor"), state.get("best_neg")
    run.resumed_from = path


def open_outputs(run: TrainRun) -> None:
    """Before the first step: the held-out monitor, log.csv (a resumed run's rows up to its step), the
    embeddings' metadata; with --overwrite, the old run's files removed; a resumed run's best embedding put
    back as it was at its checkpoint, and the summary saying "running"."""
    cfg, main = run.cfg, run.main
    watch_state = run.watch_state if isinstance(run.watch_state, dict) else None
    run.watch = HeldoutMonitor(["heldout", *run.judges, "diversity"], cfg.keep_best_by, watch_state)
    extra_fields = ["heldout_diversity"] + [
        f"heldout_{n}_{k}" for n in run.judges for k in ("null", "handcrafted", "learned")
    ]
    run.log = CsvLog(os.path.join(cfg.out, "log.csv"), run.start, extra_fields) if main else None
    run.score_log = ScoreLog(os.path.join(cfg.out, SCORES_NAME), run.start) if main else None
    run.meta = {**embedding_metadata(cfg), **run.obj.guidance.metadata()}  # and the guidance it was learned under
    run.saved_config = dict(cfg.to_json(), **resume_fingerprint(cfg))
    if main and cfg.overwrite and not run.resumed_from:
        remove_old_run(cfg.out)  # --overwrite: the old run's files go once the models have loaded
    if main and cfg.keep_best_by and run.resumed_from:
        # embedding-best.safetensors as it was at the checkpoint (a killed run may have written a later one)
        if run.watch.keep and run.best_neg is not None:
            run.write_best()
        else:  # (--tokens: its best token files too)
            for path in [run.best_path] + [
                os.path.join(cfg.out, TOKENS_NAME + "-best" + x) for x in (".safetensors", ".pt")
            ]:
                if os.path.isfile(path):
                    os.unlink(path)
    if main and run.start < cfg.steps:
        run.write_status("running", run.start)  # a summary that says "finished" only when the run has


def embedding_metadata(cfg: TrainConfig) -> dict:
    """What every embedding file of the run carries: the model, the rewards and the recipe."""
    from reneg.rewards import reward_files

    base = dict(base_model=cfg.base_model_name) if cfg.base_model_name else base_model_fields(cfg.model)
    return dict(
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
        tokens=cfg.tokens or None,  # --tokens: the output rows of N learned input-token vectors
        frames=cfg.frames if cfg.frames > 1 else None,  # --frames: trained on clips of this many frames
        flow_shift=cfg.shift,  # --shift: the flow shift it was trained at (None: the model's own)
    )


def start_events(run: TrainRun, handle_signals: bool) -> None:
    """The reported events (trainer/events.py: samples, TensorBoard, stop on SIGTERM or OUT/STOP) with the
    starting point's samples, the progress bar, the clock and the compute meter."""
    cfg = run.cfg
    run.events = TrainEvents(
        cfg,
        run.backend,
        run.main,
        run.null,
        run.heldout_texts,
        run.heldout_seeds,
        run.acc.num_processes,
        signals=handle_signals,
    )
    run.events.on_start(run.start, sample_neg(run))
    if run.main and cfg.progress:
        from tqdm.auto import tqdm

        run.bar = tqdm(total=cfg.steps, initial=run.start, desc="reneg train", dynamic_ncols=True)
    run.t0 = time.time()
    run.meter = ComputeMeter()
    run.metered = (
        run.meter.denoiser(run.backend.denoiser),
        run.meter.decode(run.backend.decode),
        run.meter.reward(run.reward),
    )


# --- one step --------------------------------------------------------------------------------------------


def train_step(run: TrainRun, step: int) -> dict:
    """Optimizer step ``step`` over the global batch (this process's micro-batches, the gradient averaged
    across processes); returns its log row, without held-out scores.

    Each optimizer step averages ``batch_size`` samples: every process runs
    ``batch_size / (micro_batch x processes)`` micro-batches and the gradients of the one trainable
    tensor are averaged across processes, so ``accelerate launch`` with N processes takes the same step
    as one process."""
    acc, neg = run.acc, run.neg
    run.opt.zero_grad(set_to_none=True)
    rewards, loss_sum = [], 0.0
    for m in range(run.accum):
        res = micro_batch(run, step, acc.process_index * run.accum + m)
        rewards.append(res.rewards.float())
        loss_sum += float(res.loss.detach()) / run.accum
    grad = neg.grad if neg.grad is not None else torch.zeros_like(neg)
    if acc.num_processes > 1:
        grad = acc.reduce(grad.contiguous(), reduction="mean")
        neg.grad = grad
    r_all = torch.cat(rewards)
    if acc.num_processes > 1:
        r_all = acc.gather(r_all)
    gnorm = float(grad.norm())
    finite = math.isfinite(gnorm) and math.isfinite(loss_sum)
    count_bad_step(run, step, apply_update(run) if finite else "non-finite loss or gradient")
    with warnings.catch_warnings():
        # a skipped first step never calls opt.step(); the schedule advances all the same, on purpose
        warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler\.step\(\)` before")
        run.sched.step()
    add_compute(run)
    units = run.spent.units()
    return {
        "step": step + 1,
        "loss": loss_sum,
        "reward": float(r_all.mean()),
        "lr": run.sched.get_last_lr()[0],
        "grad_norm": gnorm,
        "skipped": run.skipped,
        "seconds": round(time.time() - run.t0, 2),
        "compute_U": units["U"],
        "compute_V": units["V"],
        "compute_R": units["R"],
        "compute_tflop_sd15": round(run.spent.tflop_sd15(), 3),
    }


def micro_batch(run: TrainRun, step: int, j: int):
    """Micro-batch ``j`` of ``step``: its prompts, noise and grad step(s) drawn from
    ``sample_generator(seed, step, j)``, its loss's gradient (over the micro-batches of this process)
    added to the embedding's; returns the objective's result."""
    cfg, backend, accum = run.cfg, run.backend, run.accum
    g = sample_generator(cfg.seed, step, j)
    idx = torch.randint(len(run.train_texts), (cfg.micro_batch,), generator=g)
    ps = [run.train_texts[i] for i in idx]
    noise = torch.randn(run.shape, generator=g).to(run.device)
    gi = run.obj.grad_indices(cfg.grads_per_rollout, g)
    with run.acc.autocast():
        res = grad_step_loss(
            *run.metered,
            ps,
            backend.encode_prompts(ps),
            run.neg_cond(),
            initial_latent(noise, run.sigmas[0], is_flow(backend)),
            run.sigmas,
            run.obj.guidance,
            gi if len(gi) > 1 else gi[0],
            rollout_steps=cfg.rollout_steps or None,
            # several grad steps: each one's backward at once (one graph alive)
            backward=(lambda loss: (loss / accum).backward()) if len(gi) > 1 else None,
        )
    if len(gi) == 1:
        (res.loss / accum).backward()
    return res


def apply_update(run: TrainRun) -> str | None:
    """The optimizer's step; None, or why it was undone. A finite gradient can still make a non-finite
    update (a huge --lr): the step is taken on a copy of the state and undone when the embedding is no
    longer finite."""
    neg, opt = run.neg, run.opt
    before = (neg.detach().clone(), copy.deepcopy(opt.state_dict()))
    opt.step()
    if bool(torch.isfinite(neg).all()):
        return None
    with torch.no_grad():
        neg.copy_(before[0])
    opt.load_state_dict(before[1])
    return "non-finite update"


def count_bad_step(run: TrainRun, step: int, bad: str | None) -> None:
    """A skipped update is counted and said; --max-bad-steps of them in a row end the run."""
    if not bad:
        run.bad_streak = 0
        return
    run.skipped += 1
    run.bad_streak += 1
    if run.main:
        print(
            f"reneg train: step {step + 1}: {bad}, update skipped ({run.bad_streak} in a row, {run.skipped} in all)",
            flush=True,
        )
    if run.bad_streak >= run.cfg.max_bad_steps:
        last = (
            f"The last good checkpoint is {run.ckpt_path}"
            if os.path.isfile(run.ckpt_path)
            else "No checkpoint was written before this"
        )
        raise TrainingError(
            f"stopped: {run.bad_streak} non-finite updates in a row (limit --max-bad-steps "
            f"{run.cfg.max_bad_steps}). {last}; try a lower --lr "
            f"or --mixed-precision no."
        )


def add_compute(run: TrainRun) -> None:
    """This step's compute, of every process, added to the run's."""
    counts = run.meter.take()
    if run.acc.num_processes > 1:
        from accelerate.utils import gather_object

        for c in gather_object([counts]):
            run.spent.add(c)
    else:
        run.spent.add(counts)


# --- logging, held-out checks, stop and end ------------------------------------------------------------------


def log_step(run: TrainRun, row: dict) -> None:
    """After a step: the monitor notes its reward; the main process scores the held-out prompts when a
    check is due (every --eval-every steps and the last step: that row carries the final scores), writes
    the row, moves the progress bar, writes the checkpoint when one is due (not amid skipped updates) and
    reports the step's events."""
    cfg, done = run.cfg, row["step"]
    run.watch.add_training_reward(done, row["reward"])
    if not run.main:
        return
    if done == cfg.steps or (cfg.eval_every and done % cfg.eval_every == 0):
        rec = held_out_check(run, done)
        row.update({f"heldout_{k}": v for k, v in rec.items() if k != "step"})
    run.log.write(row)
    if run.bar is not None:
        run.bar.update(1)
        run.bar.set_postfix(reward=f"{row['reward']:.4f}", lr=f"{row['lr']:.2e}")
    if done % cfg.checkpoint_every == 0 and run.bad_streak == 0:
        run.write_outputs(done)
    run.events.on_step(done, row, sample_neg(run), last=done == cfg.steps)


def sample_neg(run: TrainRun):
    """What the sample images are made with: the embedding, or (--tokens) a function giving its Cond."""
    if run.tokens is None:
        return run.neg

    def cond():
        with torch.no_grad():
            return run.neg_cond(run.neg.detach())

    return cond


def held_out_check(run: TrainRun, step: int) -> dict:
    """Score the held-out images, then watch them: warnings (once a measure) and the best check."""
    rec, per_image = heldout_eval(run, step)
    if run.score_log is not None:
        run.score_log.write_check(step, run.heldout_texts, per_image)
    values = {"heldout": rec["learned"], "diversity": rec["diversity"]}
    values.update({n: rec[f"{n}_learned"] for n in run.judges})
    cfg = run.cfg
    new, best_now = run.watch.observe(
        step, values, per_image, cfg.eval_every or step, kept=run.best_path if cfg.keep_best_by else None
    )
    if best_now:
        run.best_neg = run.neg.detach().float().cpu().clone()
        run.write_best()
    for w in new:
        print(f"reneg train: warning: {w['message']}", flush=True)
        run.events.on_warning(w)
    if new:
        run.write_status("running", step)  # a long run's reader (the studio) sees a warning as it comes
    return rec


def heldout_eval(run: TrainRun, step: int) -> tuple[dict, dict]:
    """One held-out check: the record (means; null and handcrafted scored once and reused) and the
    learned negative's per-image scores by measure."""
    judges = run.judges
    base_keys = ["null", "handcrafted"] + [f"{n}_{k}" for n in judges for k in ("null", "handcrafted")]
    base = next((h for h in run.history if all(k in h for k in base_keys)), None)
    rec = {"step": step}
    if not base:
        base = {}
        for which, (t, pooled) in (("null", (run.null, None)), ("handcrafted", (run.handcrafted, run.hc_pooled))):
            scores, _ = heldout_scores(run, t, pooled)
            base[which] = float(scores["heldout"].mean())
            base.update({f"{n}_{which}": float(scores[n].mean()) for n in judges})
    rec.update({k: base[k] for k in base_keys})
    with torch.no_grad():
        learned = run.neg_cond(run.neg.detach())
    scores, feats = heldout_scores(run, learned, features=True)
    rec["learned"] = float(scores["heldout"].mean())
    rec.update({f"{n}_learned": float(scores[n].mean()) for n in judges})
    # the spread of the learned negative's images across the held-out prompts (one image each)
    rec["diversity"] = pairwise_diversity(feats) if feats is not None else None
    run.history.append(rec)
    return rec, {k: [float(x) for x in v] for k, v in scores.items()}


def heldout_scores(run: TrainRun, t, pooled=None, features: bool = False) -> tuple[dict, torch.Tensor | None]:
    """The per-image scores of one negative's held-out images: the training reward's ("heldout") and
    each monitor reward's (by name); with ``features``, also the images' features in the training
    reward's image tower (None when it has none). No grad, not metered: held-out scoring measures."""
    cfg, backend, texts = run.cfg, run.backend, run.heldout_texts
    keep = bool(run.judges) or features
    got = generate_and_score(
        backend,
        run.reward,
        texts,
        run.heldout_seeds,
        t if isinstance(t, Cond) else backend.negative_cond(t.detach(), pooled),
        cfg.sampling_steps,
        run.obj.guidance,
        cfg.resolution,
        cfg.resolution,
        cfg.eval_batch,
        keep_images=keep,
    )
    scores, images = got if keep else (got, None)
    out = {"heldout": scores}
    feats = None
    if images is not None:
        f, b = cfg.frames, cfg.eval_batch  # images: f frames a prompt (a clip), one image in image mode
        with torch.no_grad():
            for name, judge in run.judges.items():
                parts = []
                for i in range(0, len(texts), b):
                    img = images[i * f : (i + b) * f].to(backend.device)
                    parts.append(judge(img, texts[i : i + b]).float().cpu())
                out[name] = torch.cat(parts)
        if features:  # a clip's features: the mean of its frames' (reneg.frame_reward.FrameReward)
            feats = image_features(run.reward, images.to(backend.device), batch=b * f)
    return out, feats


def stop_requested(run: TrainRun, done: int) -> bool:
    """A stop request (OUT/STOP, SIGTERM, Ctrl-C) on any process, before the last step: the main process
    writes the checkpoint and a "stopped" summary."""
    if done >= run.cfg.steps or not run.events.should_stop(run.acc):
        return False
    if run.main:
        run.write_outputs(done)
        run.write_status("stopped", done, reason=run.events.stop_reason)
        print(
            f"reneg train: stopped on request after step {done}; checkpoint {run.ckpt_path} (continue with --resume)",
            flush=True,
        )
    return True


def record_failure(run: TrainRun, e: BaseException, step: int) -> None:
    """A step that raised: best effort (the disk may be what failed), the summary must not keep saying
    "running"."""
    run.events.close()
    if run.main:
        try:
            interrupted = isinstance(e, KeyboardInterrupt)
            run.write_status("interrupted" if interrupted else "failed", step, error=str(e)[:300])
        except Exception:
            pass


def close_loop(run: TrainRun) -> None:
    if run.bar is not None:
        run.bar.close()
    if run.log is not None:
        run.log.close()
    if run.score_log is not None:
        run.score_log.close()
    run.events.close_stop_watch()


def finish(run: TrainRun) -> dict:
    """The finished run (main process): the last held-out check (unless the last step's row made it),
    the final embedding and checkpoint, and summary.json."""
    cfg, summary = run.cfg, {}
    if run.main:
        if run.history and run.history[-1]["step"] == cfg.steps:
            rec = run.history[-1]  # scored in the last step's row (or before a resume at the last step)
        else:
            rec = held_out_check(run, cfg.steps)
            run.events.on_heldout(rec)
        run.write_outputs(cfg.steps)
        seeds = run.heldout_seeds
        summary = {
            "status": "finished",
            "steps": cfg.steps,
            "family": run.backend.family,
            # how the model was read (single file or folder, prediction type and why, VAE), as printed at the start
            "model": {k: v for k, v in getattr(run.backend, "model_info", {}).items() if v is not None},
            # null, handcrafted, learned; each monitor's (NAME_null, ...); the learned images' diversity
            "heldout": {k: v for k, v in rec.items() if k != "step"},
            "heldout_prompts": len(run.heldout_texts),
            "heldout_seeds": [seeds[0], seeds[-1]] if seeds else [],
            "heldout_history": run.history,
            **run.watch_fields(),
            "skipped_updates": run.skipped,
            "compute": run.spent.to_json(),
            "rewards": cfg.rewards,
            "embedding": run.embedding_path,
            "seconds": round(time.time() - run.t0, 2),
            "config": cfg.to_json(),
        }
        atomic_write_json(os.path.join(cfg.out, SUMMARY_NAME), summary)
    run.events.close()
    run.acc.wait_for_everyone()
    return summary


def enable_checkpointing(backend, reward=None) -> None:
    """Gradient checkpointing of the UNet, the VAE decoder and the reward's image tower
    (less memory, ~1 more forward of each)."""
    for m in (backend.unet, backend.vae):
        if hasattr(m, "enable_gradient_checkpointing"):
            m.enable_gradient_checkpointing()
    if reward is not None and hasattr(reward, "enable_gradient_checkpointing"):
        reward.enable_gradient_checkpointing()

"""Command-line arguments of ``reneg train`` / ``reneg tune``, validated before any model loads."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, field

from reneg.prompts import PAPER_HANDCRAFTED


class ConfigError(ValueError):
    """A bad argument; the message is one line naming the flag."""


@dataclass
class TrainConfig:
    model: str = ""
    config: str | None = None          # configs folder for a single-file checkpoint
    rewards: list[str] = field(default_factory=list)
    prompts: str = ""
    heldout: str | None = None
    heldout_count: int = 16
    heldout_seed: int = 1234
    out: str = "runs/reneg"
    steps: int = 4000
    lr: float = 5e-3
    weight_decay: float = 0.0
    warmup: int = 0
    lr_schedule: str = "cosine"
    batch_size: int = 64
    micro_batch: int = 1
    sampling_steps: int = 30
    guidance: float = 7.5
    grad_range: tuple[int, int] = (0, 10)
    resolution: int = 512
    init: str = "null"                 # null | handcrafted | path to an embedding file
    handcrafted: str = PAPER_HANDCRAFTED
    seed: int = 0
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_batch: int = 4
    max_bad_steps: int = 10
    resume: str | None = None
    mixed_precision: str = "no"        # no | fp16 | bf16
    gradient_checkpointing: bool = False
    channels_last: bool = False
    compile: bool = False
    device: str | None = None
    base_model_name: str | None = None
    progress: bool = True
    demo: bool = False
    # --- reported events (trainer/events.py): sample images, TensorBoard ---
    sample_every: int = 0
    report_to: str = "none"
    # --- end reported events ---

    def to_json(self) -> dict:
        d = asdict(self)
        d["grad_range"] = list(self.grad_range)
        return d


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = p.add_argument
    a("--demo", action="store_true", help="train on the built-in demo world (no files needed)")
    a("--model", help="Stable Diffusion 1.x/2.x/XL: a diffusers folder or a single-file .safetensors")
    a("--config", help="for a single-file checkpoint: a local diffusers folder with the same "
                       "architecture's configs")
    a("--reward", dest="rewards", action="append", default=[], metavar="SPEC",
      help="NAME=PATH[,option=value][,weight=W]; repeat to combine (e.g. "
           "hpsv2.1=HPS_v2.1_compressed.pt); see 'reneg rewards'")
    a("--prompts", help="training prompts: .txt (one a line), .json (ImageReward list, "
                        "{'prompt':...} or strings), .tsv with a Prompt column, or an HPSv2 folder")
    a("--heldout", help="held-out prompts (same formats); default: the last --heldout-count "
                        "prompts of --prompts are held out")
    a("--heldout-count", type=int, default=d.heldout_count)
    a("--heldout-seed", type=int, default=d.heldout_seed, help="first seed of the held-out images")
    a("--out", default=None, help="output folder (embedding.safetensors, summary.json, log.csv, "
                                   "checkpoint.pt)")
    a("--steps", type=int, default=d.steps, help="optimizer steps (paper: 4000)")
    a("--lr", type=float, default=d.lr)
    a("--weight-decay", type=float, default=d.weight_decay)
    a("--warmup", type=int, default=d.warmup, help="linear warm-up steps")
    a("--lr-schedule", choices=("cosine", "constant"), default=d.lr_schedule)
    a("--batch-size", type=int, default=d.batch_size, help="samples per optimizer step (paper: 64)")
    a("--micro-batch", type=int, default=d.micro_batch,
      help="samples per forward pass; batch-size / (micro-batch x processes) accumulation steps")
    a("--sampling-steps", type=int, default=d.sampling_steps, help="DDIM steps (paper: 30)")
    a("--guidance", type=float, default=d.guidance, help="CFG scale (paper: 7.5)")
    a("--grad-range", type=int, nargs=2, default=list(d.grad_range), metavar=("LO", "HI"),
      help="grad step, counted in DDIM steps from the end (paper: 0 10)")
    a("--resolution", type=int, default=d.resolution)
    a("--init", default=d.init, help="null, handcrafted, or an embedding file to start from")
    a("--handcrafted", default=d.handcrafted, help="the handcrafted negative prompt compared against")
    a("--seed", type=int, default=d.seed)
    a("--checkpoint-every", type=int, default=d.checkpoint_every)
    a("--eval-every", type=int, default=d.eval_every, help="score held-out prompts every N steps (0: "
                                                           "only at the end)")
    a("--eval-batch", type=int, default=d.eval_batch)
    a("--max-bad-steps", type=int, default=d.max_bad_steps,
      help="stop after this many NaN/inf updates in a row")
    a("--resume", nargs="?", const="latest", default=None,
      help="resume from OUT/checkpoint.pt (or the given checkpoint file)")
    a("--mixed-precision", choices=("no", "fp16", "bf16"), default=d.mixed_precision)
    a("--gradient-checkpointing", action="store_true",
      help="recompute UNet, VAE-decoder and reward-tower activations in backward (less memory)")
    a("--channels-last", action="store_true", help="NHWC convolution weights (pays with bf16/fp16 on GPUs)")
    a("--compile", action="store_true", help="torch.compile the UNet (slow first steps; see the README's Performance section)")
    a("--device", help="cpu, cuda, cuda:1... (default: what accelerate picks)")
    a("--no-progress", dest="progress", action="store_false")
    # --- reported events (trainer/events.py) ---
    from .events import add_event_args

    add_event_args(p)
    # --- end reported events ---


def _positive(name: str, v, allow_zero: bool = False):
    if v is None or not math.isfinite(v) or (v < 0 if allow_zero else v <= 0):  # nan/inf too
        raise ConfigError(f"--{name} must be {'>= 0' if allow_zero else '> 0'}, got {v}")


def check_model_and_rewards(cfg) -> None:
    """``--model``, ``--config`` and ``--reward``: shared by train, tune and eval."""
    if not cfg.model:
        raise ConfigError("--model is required (a diffusers folder or a .safetensors checkpoint)")
    if not os.path.exists(cfg.model):
        raise ConfigError(f"--model {cfg.model}: no such folder or file")
    if os.path.isdir(cfg.model) and not os.path.isfile(os.path.join(cfg.model, "model_index.json")):
        raise ConfigError(f"--model {cfg.model}: not a diffusers folder (no model_index.json)")
    if cfg.config and not os.path.isdir(cfg.config):
        raise ConfigError(f"--config {cfg.config}: no such folder")
    if not cfg.rewards:
        raise ConfigError("--reward is required (e.g. --reward hpsv2.1=/models/HPS_v2.1_compressed.pt)")
    from reneg.rewards import RewardSpecError, parse_spec

    for spec in cfg.rewards:
        try:
            parse_spec(spec)
        except RewardSpecError as e:
            raise ConfigError(f"--reward: {e}") from None


def validate_common(cfg) -> None:
    """Checks shared by train and tune."""
    check_model_and_rewards(cfg)
    _positive("sampling-steps", cfg.sampling_steps)
    if cfg.resolution <= 0 or cfg.resolution % 8:
        raise ConfigError(f"--resolution must be a positive multiple of 8, got {cfg.resolution}")
    lo, hi = cfg.grad_range
    if not (0 <= lo <= hi < cfg.sampling_steps):
        raise ConfigError(f"--grad-range {lo} {hi}: need 0 <= LO <= HI < --sampling-steps "
                          f"({cfg.sampling_steps})")
    _positive("lr", cfg.lr)
    if not cfg.guidance > 0 or not math.isfinite(cfg.guidance):
        raise ConfigError(f"--guidance must be > 0, got {cfg.guidance}")
    _check_device(getattr(cfg, "device", None))


def _check_device(device: str | None) -> None:
    if not device:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"--device {device}: not a device ({str(e).splitlines()[0][:120]})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: there are {torch.cuda.device_count()} CUDA devices")


def validate_train(cfg: TrainConfig, num_processes: int = 1) -> None:
    from reneg.prompts import PromptFileError, load_prompts

    validate_common(cfg)
    for name in ("steps", "batch_size", "micro_batch", "checkpoint_every", "max_bad_steps", "eval_batch",
                 "heldout_count"):
        _positive(name.replace("_", "-"), getattr(cfg, name))
    _positive("warmup", cfg.warmup, allow_zero=True)
    _positive("eval-every", cfg.eval_every, allow_zero=True)
    _positive("weight-decay", cfg.weight_decay, allow_zero=True)
    per = cfg.micro_batch * num_processes
    if cfg.batch_size % per:
        raise ConfigError(f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch x processes "
                          f"({cfg.micro_batch} x {num_processes} = {per})")
    if cfg.warmup >= cfg.steps:
        raise ConfigError(f"--warmup {cfg.warmup} must be below --steps {cfg.steps}")
    if not cfg.prompts:
        raise ConfigError("--prompts is required")
    flag = "--prompts"
    try:
        n = len(load_prompts(cfg.prompts))
        if cfg.heldout:
            flag = "--heldout"
            load_prompts(cfg.heldout)
        elif n <= cfg.heldout_count:
            raise ConfigError(f"--prompts {cfg.prompts}: {n} prompts leave none for training after "
                              f"holding out {cfg.heldout_count}; pass --heldout or lower --heldout-count")
    except PromptFileError as e:
        raise ConfigError(f"{flag}: {e}") from None
    if cfg.init not in ("null", "handcrafted") and not os.path.isfile(cfg.init):
        raise ConfigError(f"--init {cfg.init}: expected null, handcrafted or an embedding file")
    if cfg.init not in ("null", "handcrafted"):
        check_embedding_arg("init", cfg.init)
    if cfg.resume is not None:
        _check_resume(cfg)
    check_out_dir(cfg.out)


def check_embedding_arg(flag: str, path: str) -> None:
    """An embedding file given on the command line must load, before any model does
    (its family is checked against the model later)."""
    from reneg.embedding import load_embedding

    try:
        load_embedding(path)
    except ValueError as e:
        raise ConfigError(f"--{flag}: {e}") from None


# settings that decide which samples a step sees and how it updates (--steps may grow)
RESUME_MUST_MATCH = ("seed", "batch_size", "micro_batch", "sampling_steps", "grad_range", "guidance",
                     "resolution", "lr", "lr_schedule", "warmup", "weight_decay")


def _check_resume(cfg: TrainConfig) -> None:
    """A missing or unreadable checkpoint is a bad --resume, found before any model loads."""
    from .checkpoint import find_resume, load_checkpoint

    try:
        path = find_resume(cfg.out, cfg.resume)
        state = load_checkpoint(path) if path else None
    except (OSError, ValueError) as e:
        hint = " (--resume auto starts afresh when there is none)" if cfg.resume == "latest" else ""
        raise ConfigError(f"--resume {cfg.resume}: {e}{hint}") from None
    if state is None:
        return
    # a resumed run repeats the interrupted one only with the same sampling settings
    old, new = state["config"], cfg.to_json()
    changed = [k for k in RESUME_MUST_MATCH if k in old and old[k] != new.get(k)]
    if changed:
        def show(d):
            return " ".join(f"--{k.replace('_', '-')} {' '.join(map(str, d[k])) if isinstance(d[k], list) else d[k]}"
                            for k in changed)
        raise ConfigError(f"--resume: {path} was made with {show(old)}, this command has {show(new)}; "
                          f"resume with the same settings (the optimizer state would ignore a new --lr) "
                          f"or start a new --out")


def check_out_dir(out: str) -> None:
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {out}: cannot create the folder ({e.strerror or e})") from None
    probe = os.path.join(out, ".reneg-write-test")
    try:
        with open(probe, "w") as f:
            f.write("ok")
    except OSError as e:
        raise ConfigError(f"--out {out}: the folder is not writable ({e.strerror or e})") from None
    finally:
        try:
            os.unlink(probe)
        except OSError:
            pass


def config_from_args(ns: argparse.Namespace) -> TrainConfig:
    d = {k: v for k, v in vars(ns).items() if k in TrainConfig.__dataclass_fields__}
    d["grad_range"] = tuple(d.get("grad_range", (0, 10)))
    if not d.get("out"):
        d["out"] = TrainConfig.out
    return TrainConfig(**d)

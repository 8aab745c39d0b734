"""Command-line arguments of ``reneg train`` / ``reneg tune``, validated before any model loads."""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import asdict, dataclass, field

from reneg import options as O
from reneg.options import PAPER, OptionError
from reneg.prompts import PAPER_HANDCRAFTED

# one error class for every front-end's bad arguments (the message names the flag)
ConfigError = OptionError

# the most prompts a backend's prompt cache keeps; --offload-text-encoder needs them all
OFFLOAD_PROMPTS_MAX = O.PROMPT_CACHE_MAX


@dataclass
class TrainConfig:
    model: str = ""
    config: str | None = None  # configs folder for a single-file checkpoint (optional)
    vae: str | None = None  # a VAE file or folder replacing the model's own
    text_encoders: list[str] = field(default_factory=list)  # a transformer file's text encoders (Flux: clip_l, t5xxl)
    tokenizer: str | None = None  # the tokenizer folder for a transformer file (T5's, Qwen2.5's, UMT5's)
    low_noise_model: str | None = None  # Wan 2.2 A14B's low-noise expert file, beside --model the high-noise one
    prediction_type: str | None = None  # eps | v: instead of what the model's files say
    rewards: list[str] = field(default_factory=list)
    prompts: str = ""
    heldout: str | None = None
    heldout_count: int = 16
    heldout_seed: int = 1234
    out: str = "runs/reneg"
    steps: int = PAPER.steps
    lr: float = PAPER.lr
    weight_decay: float = PAPER.weight_decay
    warmup: int = PAPER.warmup
    lr_schedule: str = PAPER.lr_schedule
    batch_size: int = PAPER.batch_size
    micro_batch: int = 1
    sampling_steps: int = PAPER.sampling_steps
    guidance: float = PAPER.guidance
    guidance_mode: str = "cfg"  # cfg | nag | cfg+nag (set by --guidance; reneg/nag.py)
    nag_scale: float | None = None  # None: the family's (reneg/families.py)
    nag_tau: float | None = None
    nag_alpha: float | None = None
    guidance_2: float | None = PAPER.guidance_2  # Wan 2.2 A14B's low-noise expert
    shift: float | None = PAPER.shift  # Wan's flow shift (None: the model's own)
    wan_experts: str = PAPER.wan_experts
    frames: int = PAPER.frames  # a text-to-video model's frames per sample (1: image mode)
    grad_range: tuple[int, int] = PAPER.grad_range
    resolution: int = PAPER.resolution
    init: str = "null"  # null | handcrafted | path to an embedding file (--tokens: a token file)
    tokens: int | None = None  # --tokens N: learn N input-token vectors (reneg/tokens.py); None: the embedding
    handcrafted: str = PAPER_HANDCRAFTED
    seed: int = PAPER.seed
    checkpoint_every: int = 100
    eval_every: int = 500
    eval_batch: int = 4
    max_bad_steps: int = 10
    resume: str | None = None
    overwrite: bool = False  # start afresh over a run --out already holds (else refused)
    mixed_precision: str = "no"  # no | fp16 | bf16
    gradient_checkpointing: bool = False
    offload_text_encoder: bool = PAPER.offload_text_encoder  # encode every prompt first, then text encoders to the CPU
    channels_last: bool = False
    compile: bool = False
    device: str | None = None
    base_model_name: str | None = None
    progress: bool = True
    demo: bool = False
    # --- compute-saving options (docs/compute.md); the defaults are the paper's recipe ---
    rollout_steps: int | None = None  # no-grad DDIM steps to the grad step (None: every step)
    grads_per_rollout: int = 1  # grad steps taken along one trajectory
    recipe: str = "paper"  # paper | fast: a named set of the options above
    # --- end of compute-saving options ---
    # --- reported events (trainer/events.py): sample images, TensorBoard ---
    sample_every: int = 0
    report_to: str = "none"
    # --- end reported events ---
    # --- watching for reward hacking (trainer/monitor.py) ---
    monitor_rewards: list[str] = field(default_factory=list)  # rewards scored on held-out images, never trained on
    keep_best_by: str | None = None  # heldout | diversity | a monitor's name: OUT/embedding-best.safetensors
    # --- a negative predictor instead of one global negative (trainer/predictor.py) ---
    predictor: str | None = None  # lowrank | xattn
    predictor_rank: int = 4
    predictor_reg: float = 0.01
    predictor_features: str = "mean"  # mean (uncentred, as v1) | centred (on the training prompts' mean)

    def to_json(self) -> dict:
        d = asdict(self)
        d["grad_range"] = list(self.grad_range)
        return d


def add_train_args(p: argparse.ArgumentParser) -> None:
    d = TrainConfig()
    a = p.add_argument
    a(
        "--demo",
        action="store_true",
        help="train on the built-in demo world (no files needed); flags given beside it replace the demo's settings",
    )
    O.add_options(
        p, ["model", "config", "vae", "text_encoders", "tokenizer", "low_noise_model", "prediction_type", "rewards"]
    )
    a(
        "--prompts",
        help="training prompts: .txt (one a line), .json (ImageReward list, "
        "{'prompt':...} or strings), .tsv with a Prompt column, or an HPSv2 folder",
    )
    a(
        "--heldout",
        help="held-out prompts (same formats); default: the last --heldout-count prompts of --prompts are held out",
    )
    a("--heldout-count", type=int, default=d.heldout_count)
    a("--heldout-seed", type=int, default=d.heldout_seed, help="first seed of the held-out images")
    a("--out", default=None, help="output folder (embedding.safetensors, summary.json, log.csv, checkpoint.pt)")
    O.add_options(p, ["steps", "lr", "weight_decay", "warmup", "lr_schedule", "batch_size"])
    a(
        "--micro-batch",
        type=int,
        default=d.micro_batch,
        help="samples per forward pass; batch-size / (micro-batch x processes) accumulation steps",
    )
    O.add_options(
        p,
        [
            "sampling_steps",
            "guidance",
            "nag_scale",
            "nag_tau",
            "nag_alpha",
            "grad_range",
            "resolution",
            "guidance_2",
            "shift",
            "wan_experts",
            "frames",
        ],
    )
    a("--init", default=d.init, help="null, handcrafted, or an embedding file to start from (--tokens: a token file)")
    a(
        "--tokens",
        type=int,
        default=d.tokens,
        metavar="N",
        help="learn N input-token vectors (1-75; a textual-inversion file every UI loads by name) instead of "
        "the output-space embedding (default: the embedding)",
    )
    a("--handcrafted", default=d.handcrafted, help="the handcrafted negative prompt compared against")
    O.add_options(p, ["seed"])
    a("--checkpoint-every", type=int, default=d.checkpoint_every)
    a("--eval-every", type=int, default=d.eval_every, help="score held-out prompts every N steps (0: only at the end)")
    a("--eval-batch", type=int, default=d.eval_batch)
    O.add_options(p, ["monitor_rewards", "keep_best_by"])
    a("--max-bad-steps", type=int, default=d.max_bad_steps, help="stop after this many NaN/inf updates in a row")
    a(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        help="resume from OUT/checkpoint.pt (or the given checkpoint file)",
    )
    O.add_options(
        p,
        ["overwrite"],
        helps={
            "overwrite": "start afresh in an --out that already holds a run, replacing it (without it "
            "such an --out is refused; --resume continues the run instead)"
        },
    )
    O.add_options(p, ["mixed_precision"])
    a(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute UNet, VAE-decoder and reward-tower activations in backward (less memory)",
    )
    O.add_options(p, ["offload_text_encoder"])
    a("--channels-last", action="store_true", help="NHWC convolution weights (pays with bf16/fp16 on GPUs)")
    a("--compile", action="store_true", help="torch.compile the UNet (slow first steps; see docs/performance.md)")
    O.add_options(p, ["device", "threads"], helps={"device": "cpu, cuda, cuda:1... (default: what accelerate picks)"})
    a("--no-progress", dest="progress", action="store_false")
    add_compute_args(p, d)
    # --- reported events (trainer/events.py) ---
    from .events import add_event_args

    add_event_args(p)
    # --- end reported events ---
    add_predictor_args(p)


# --- compute-saving options (docs/compute.md) -------------------------------------------------------
# A named recipe sets several options at once; an option it names is filled only where the command line
# left it unset (a flag given beside --recipe wins).
# "fast": the paper's optimizer path (the same steps, lr and samples per step) with a coarser no-grad
# rollout to the grad step: --rollout-steps 6, 0.38 of the paper recipe's compute (the rollout is over 80 %
# of it). Measured on the demo world (benchmarks/seed_study.py, 10 training seeds, 32 held-out prompts x 16
# image seeds, docs/compute.md): above the untrained null negative on every seed (interval above 0 on 9),
# but level with the paper recipe on only 5 of 10 (-0.0062 on average, -0.0179 on the worst seed). It is
# a trade, not a free saving, and the README does not recommend it. The earlier "fast" (a third of the
# steps at twice the lr) ended below null on training seed 5: its first steps at twice the lr threw the
# embedding off and a cosine over a third of the steps left no time to recover (a linear warm-up of 5 or
# 10 steps did not save it).
RECIPES = {
    "paper": {},
    "fast": {"rollout_steps": 6},
}


def add_compute_args(p: argparse.ArgumentParser, d: TrainConfig) -> None:
    a = p.add_argument
    a(
        "--recipe",
        choices=sorted(RECIPES),
        default=None,
        help="paper (default): the paper's recipe; fast: the same steps, lr and samples with a 6-step no-grad "
        "rollout to the grad step (--rollout-steps 6), 0.38 of the compute; on the demo world it stayed above "
        "null on 10 training seeds but below the paper recipe on half of them (docs/compute.md)",
    )
    a(
        "--rollout-steps",
        type=int,
        default=None,
        metavar="N",
        help="reach the grad step's noise level in N no-grad DDIM steps instead of every step of "
        "--sampling-steps (default: every step, the paper)",
    )
    a(
        "--grads-per-rollout",
        type=int,
        default=None,
        metavar="K",
        help="take K grad steps (distinct, from --grad-range) along each sampled trajectory (default 1, the paper)",
    )


def apply_recipe(ns: argparse.Namespace) -> None:
    """Fills the compute options a command line left unset from ``--recipe``, then the defaults."""
    recipe = getattr(ns, "recipe", None) or "paper"
    if recipe not in RECIPES:
        raise ConfigError(f"--recipe {recipe}: expected one of {', '.join(sorted(RECIPES))}")
    ns.recipe = recipe
    for k, v in RECIPES[recipe].items():
        if getattr(ns, k, None) is None:
            setattr(ns, k, v)
    if getattr(ns, "grads_per_rollout", None) is None:
        ns.grads_per_rollout = TrainConfig.grads_per_rollout


def validate_compute(cfg) -> None:
    if cfg.rollout_steps is not None:
        O.check_float("--rollout-steps", cfg.rollout_steps)
    O.check_float("--grads-per-rollout", cfg.grads_per_rollout)
    lo, hi = cfg.grad_range
    if cfg.grads_per_rollout > hi - lo + 1:
        raise ConfigError(
            f"--grads-per-rollout {cfg.grads_per_rollout}: --grad-range {lo} {hi} holds only "
            f"{hi - lo + 1} distinct grad steps"
        )


# --- end of compute-saving options ------------------------------------------------------------------


# the numeric flags of train, checked by reneg.options (kind, bounds)
TRAIN_NUMBERS = {
    "steps": ("int",),
    "batch_size": ("int",),
    "micro_batch": ("int",),
    "checkpoint_every": ("int",),
    "max_bad_steps": ("int",),
    "eval_batch": ("int",),
    "heldout_count": ("int",),
    "warmup": ("int", 0),
    "eval_every": ("int", 0),
    "lr": ("pos",),
    "weight_decay": ("nonneg",),
    "seed": ("seed",),
}


def validate_common(cfg) -> None:
    """Checks shared by train and tune once their numbers are checked (check_train_numbers,
    check_tune_numbers): the model, the rewards and --device."""
    O.check_model_and_rewards(cfg)
    O.check_device(getattr(cfg, "device", None))


def check_common_numbers(cfg, table: dict | None = None) -> None:
    """The numeric flags shared by train and tune (sampling settings, --lr), then ``table``'s."""
    O.check_sampling(cfg)
    O.check_float("--lr", cfg.lr)
    O.check_int("--frames", getattr(cfg, "frames", 1), hi=O.FRAMES_MAX)
    if table:
        O.check_number_table(cfg, table)


def validate_train(cfg: TrainConfig, num_processes: int = 1) -> None:
    """Every check of ``reneg train``'s arguments, in one pass, before any model loads (run_train and the
    studio's form run it)."""
    from reneg.prompts import PromptFileError, load_prompts

    from .events import check_event_args

    check_train_numbers(cfg)
    validate_compute(cfg)
    validate_common(cfg)
    per = cfg.micro_batch * num_processes
    if cfg.batch_size % per:
        raise ConfigError(
            f"--batch-size {cfg.batch_size} must be a multiple of --micro-batch x processes "
            f"({cfg.micro_batch} x {num_processes} = {per})"
        )
    if cfg.warmup >= cfg.steps:
        raise ConfigError(f"--warmup {cfg.warmup} must be below --steps {cfg.steps}")
    if not cfg.prompts:
        raise ConfigError("--prompts is required")
    flag, n_heldout = "--prompts", cfg.heldout_count
    try:
        n = len(load_prompts(cfg.prompts))
        if cfg.heldout:
            flag = "--heldout"
            n_heldout = min(cfg.heldout_count, len(load_prompts(cfg.heldout)))
        elif n <= cfg.heldout_count:
            raise ConfigError(
                f"--prompts {cfg.prompts}: {n} prompts leave none for training after "
                f"holding out {cfg.heldout_count}; pass --heldout or lower --heldout-count"
            )
    except PromptFileError as e:
        raise ConfigError(f"{flag}: {e}") from None
    total = n + (n_heldout if cfg.heldout else 0)  # and the handcrafted negative: one more cached prompt
    if getattr(cfg, "offload_text_encoder", False) and total >= OFFLOAD_PROMPTS_MAX:
        raise ConfigError(
            f"--offload-text-encoder: {total} prompts and the handcrafted negative are more than the "
            f"{OFFLOAD_PROMPTS_MAX} the prompt cache keeps, so most would be encoded again on the CPU at every "
            f"step; use fewer prompts or leave the text encoder on the device"
        )
    if cfg.init not in ("null", "handcrafted") and not os.path.isfile(cfg.init):
        raise ConfigError(f"--init {cfg.init}: expected null, handcrafted or an embedding file")
    if getattr(cfg, "tokens", None) is not None:
        check_tokens_args(cfg)
        if getattr(cfg, "offload_text_encoder", False):
            raise ConfigError(
                "--offload-text-encoder does not go with --tokens: the token vectors are trained through the "
                "text encoder at every step, so it has to stay on the device"
            )
    elif cfg.init not in ("null", "handcrafted"):
        check_embedding_arg("init", cfg.init, cfg)
    check_monitor_args(cfg, n_heldout)
    if cfg.resume is not None:
        _check_resume(cfg)
    check_out_free(cfg)
    check_out_dir(cfg.out)
    check_event_args(cfg)  # --sample-every, --report-to
    check_predictor_args(cfg)


def add_predictor_args(p) -> None:
    """``--predictor``, ``--predictor-rank``, ``--predictor-reg`` for ``reneg train`` (defined once here)."""
    from reneg.predictor import ARCHITECTURES, RANK_MAX

    p.add_argument(
        "--predictor",
        choices=ARCHITECTURES,
        default=None,
        help="learn a negative predictor instead of one global negative: lowrank (a low-rank correction "
        "from the prompt's pooled text features) or xattn (learned queries over the prompt's tokens); "
        "--init is the global negative it starts from (docs/predictor.md)",
    )
    p.add_argument(
        "--predictor-rank",
        type=int,
        default=4,
        metavar="R",
        help=f"--predictor's size: lowrank's directions or xattn's queries (1 to {RANK_MAX})",
    )
    p.add_argument(
        "--predictor-reg",
        type=float,
        default=0.01,
        metavar="W",
        help="weight of the correction's mean square in the loss (regularisation towards the global negative)",
    )
    p.add_argument(
        "--predictor-features",
        choices=("centred", "mean"),
        default="mean",
        help="how the predictor reads the prompt: mean (default: uncentred, as predictor files of format "
        "version 1 do) or centred (the training prompts' mean feature taken away before the layer norm, "
        "stored in the file; prompt-specific corrections, but not better on the demo world: docs/predictor.md)",
    )


def check_predictor_args(cfg) -> None:
    from reneg.predictor import ARCHITECTURES, RANK_MAX

    if cfg.predictor is None:
        return
    if cfg.predictor not in ARCHITECTURES:
        raise OptionError(f"--predictor must be one of {', '.join(ARCHITECTURES)}, got {cfg.predictor!r}")
    r = cfg.predictor_rank
    if not isinstance(r, int) or isinstance(r, bool) or not 1 <= r <= RANK_MAX:
        raise OptionError(f"--predictor-rank must be an integer from 1 to {RANK_MAX}, got {r}")
    w = cfg.predictor_reg
    if not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
        raise OptionError(f"--predictor-reg must be a finite number >= 0, got {w}")
    if getattr(cfg, "predictor_features", "mean") not in ("centred", "mean"):
        raise OptionError(f"--predictor-features must be centred or mean, got {cfg.predictor_features!r}")
    for flag, bad in (
        ("--keep-best-by", cfg.keep_best_by),
        ("--monitor-reward", cfg.monitor_rewards),
        ("--sample-every", cfg.sample_every),
        ("--tokens", getattr(cfg, "tokens", None)),
    ):
        if bad:
            raise OptionError(f"{flag} is not supported with --predictor (the predictor's run checks held-out itself)")


def check_tokens_args(cfg) -> None:
    """--tokens N: 1 to 75 vectors (77 positions less start and end); an --init file is a token file of N."""
    from reneg.tokens import MAX_TOKENS, TokenError, load_tokens

    if not 1 <= cfg.tokens <= MAX_TOKENS:
        raise ConfigError(f"--tokens {cfg.tokens}: expected 1 to {MAX_TOKENS} (77 positions less start and end)")
    if cfg.init in ("null", "handcrafted"):
        return
    try:
        tok = load_tokens(cfg.init)
    except TokenError as e:
        raise ConfigError(f"--init: {e} (with --tokens, --init is null, handcrafted or a token file)") from None
    if tok.count != cfg.tokens:
        raise ConfigError(f"--init {cfg.init}: holds {tok.count} token vectors, --tokens asks for {cfg.tokens}")


def check_monitor_args(cfg, heldout_prompts: int) -> None:
    """``--monitor-reward`` and ``--keep-best-by`` (reneg.options.check_monitor), and what the latter needs
    of this run: held-out checks before the end, and for ``diversity`` two held-out prompts at least."""
    O.check_monitor(cfg)
    by = getattr(cfg, "keep_best_by", None)
    if by is None:
        return
    if not cfg.eval_every or cfg.eval_every >= cfg.steps:
        raise ConfigError(
            f"--keep-best-by {by}: needs held-out checks during the run (--eval-every N below --steps "
            f"{cfg.steps}, got --eval-every {cfg.eval_every}); the only check would be the last step's, "
            f"which embedding.safetensors holds already"
        )
    if by == "diversity" and heldout_prompts < 2:
        raise ConfigError(
            f"--keep-best-by diversity: the held-out diversity needs 2 held-out prompts at least, this run "
            f"has {heldout_prompts}"
        )


# the files that make a folder a training run's: a new run there needs --resume or --overwrite
RUN_FILES = ("checkpoint.pt", "embedding.safetensors", "summary.json")
BEST_NAME = "embedding-best.safetensors"  # --keep-best-by
# --tokens: the textual-inversion files a run writes beside its embedding (reneg/tokens.py)
TOKEN_FILES = ("tokens.safetensors", "tokens.pt", "tokens-best.safetensors", "tokens-best.pt")


def existing_run(out: str) -> list[str]:
    """The run files ``out`` holds (a summary of a run still starting, with no checkpoint, is not one)."""
    import json

    found = [f for f in RUN_FILES if os.path.isfile(os.path.join(out, f))]
    if found == ["summary.json"]:
        try:
            with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
                if json.load(f).get("status") == "running":
                    return []
        except (OSError, ValueError, AttributeError):
            pass
    return found


def check_out_free(cfg) -> None:
    """A new run (no ``--resume``) never replaces a run in ``--out`` unless ``--overwrite`` says so."""
    if cfg.resume is not None or getattr(cfg, "overwrite", False) or not os.path.isdir(cfg.out):
        return
    found = existing_run(cfg.out)
    if found:
        raise ConfigError(
            f"--out {cfg.out}: already holds a training run ({', '.join(found)}); pass --resume to continue "
            f"it, --overwrite to start afresh over it, or choose another --out"
        )


def remove_old_run(out: str) -> None:
    """``--overwrite``: the old run's files, so that nothing of it is taken for the new one's."""
    for name in RUN_FILES + (BEST_NAME, os.path.join("samples", "index.json")) + TOKEN_FILES:
        try:
            os.unlink(os.path.join(out, name))
        except OSError:
            pass


def check_train_numbers(cfg) -> None:
    """Every numeric flag of train, before anything is read."""
    check_common_numbers(cfg, TRAIN_NUMBERS)
    O.check_seed("--heldout-seed", cfg.heldout_seed, span=cfg.heldout_count)


def check_embedding_arg(flag: str, path: str, opts=None) -> None:
    """An embedding file given on the command line must load, before any model does (its family
    is checked against the model later); with ``opts``, its values must also be finite in the
    dtype their ``--mixed-precision`` and ``--device`` make the model compute in."""
    from reneg.embedding import load_embedding

    try:
        emb = load_embedding(path)
        if opts is not None:
            emb.check_dtype(*O.compute_dtype(opts))
    except ValueError as e:
        raise ConfigError(f"--{flag}: {e}") from None


# What a resume compares with the checkpoint, so that the resumed run is the interrupted one:
# the flags that decide which samples a step sees and how it updates (a larger --steps is allowed:
# "train longer"), those of the held-out scores kept in the checkpoint, and the content (not the
# path: a run may move between machines) of the prompt files and of an --init file.
RESUME_MUST_MATCH = (
    "seed",
    "batch_size",
    "micro_batch",
    "sampling_steps",
    "grad_range",
    "guidance",
    "guidance_mode",
    "nag_scale",
    "nag_tau",
    "nag_alpha",
    "resolution",
    "frames",
    "guidance_2",
    "shift",
    "lr",
    "lr_schedule",
    "warmup",
    "weight_decay",
    "heldout_count",
    "heldout_seed",
    "handcrafted",
    "prompts_sha256",
    "heldout_sha256",
    "init_sha256",
    "rollout_steps",
    "grads_per_rollout",
    "predictor",
    "predictor_rank",
    "predictor_reg",
    "predictor_features",
    "monitor_names",
    "keep_best_by",
    "tokens",
)
_CONTENT_FLAG = {"prompts_sha256": "--prompts", "heldout_sha256": "--heldout", "init_sha256": "--init"}


def resume_fingerprint(cfg: TrainConfig) -> dict:
    """Digests of what the files given to a run hold: the prompts' texts, the held-out prompts'
    texts, the --init embedding's values (``null``/``handcrafted`` stand for themselves)."""
    import hashlib

    from reneg.prompts import load_prompts

    def texts(path):
        if not path:
            return None
        return hashlib.sha256("\n".join(p.text for p in load_prompts(path)).encode("utf-8")).hexdigest()

    init = cfg.init
    if init not in ("null", "handcrafted") and getattr(cfg, "tokens", 0):
        from reneg.tokens import load_tokens

        init = hashlib.sha256(load_tokens(init).flat().contiguous().numpy().tobytes()).hexdigest()
    elif init not in ("null", "handcrafted"):
        from reneg.embedding import load_embedding

        t = load_embedding(init).tensor.detach().float().contiguous()
        init = hashlib.sha256(t.numpy().tobytes()).hexdigest()
    return {
        "prompts_sha256": texts(cfg.prompts),
        "heldout_sha256": texts(cfg.heldout),
        "init_sha256": init,
        # the monitors by name (their files may move with the run): the best checks kept are theirs
        "monitor_names": O.monitor_names(getattr(cfg, "monitor_rewards", None) or [], cfg.rewards),
    }


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
    # a resumed run repeats the interrupted one only with the same settings and the same files
    old, new = state["config"], dict(cfg.to_json(), **resume_fingerprint(cfg))
    changed = [k for k in RESUME_MUST_MATCH if k in old and old[k] != new.get(k)]
    if changed:

        def show(d):
            out = []
            for k in changed:
                v = d.get(k)
                if k in _CONTENT_FLAG:
                    out.append(f"{_CONTENT_FLAG[k]} {'(none)' if v is None else str(v)[:12]}")
                elif k == "monitor_names":
                    out.append(f"--monitor-reward {', '.join(map(str, v or [])) or '(none)'}")
                elif v is None:
                    out.append(f"--{k.replace('_', '-')} (none)")
                else:
                    v = " ".join(map(str, v)) if isinstance(v, list) else str(v)
                    out.append(f"--{k.replace('_', '-')} {v if len(v) <= 40 else repr(v[:30] + '...')}")
            return " ".join(out)

        raise ConfigError(
            f"--resume: {path} was made with {show(old)}, this command has {show(new)} "
            f"(file contents shown by their sha256); resume with the same settings and files "
            f"(the optimizer state would ignore a new --lr) or start a new --out"
        )
    # with the settings equal, only a too small --steps is left: the advice is a --steps this check accepts
    least = max(state["step"], cfg.warmup + 1)
    if cfg.steps < least:
        raise ConfigError(
            f"--steps {cfg.steps}: {path} is already at step {state['step']}; resume with "
            f"--steps {least} or more (a run is continued, never cut back)"
        )


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


def train_config_from_args(ns: argparse.Namespace) -> TrainConfig:
    """The TrainConfig of parsed ``reneg train`` arguments, with the compute options the command line
    left unset filled in from --recipe (apply_recipe)."""
    apply_recipe(ns)
    d = {k: v for k, v in vars(ns).items() if k in TrainConfig.__dataclass_fields__}
    d["grad_range"] = tuple(d.get("grad_range", PAPER.grad_range))
    if not d.get("out"):
        d["out"] = TrainConfig.out
    return TrainConfig(**d)

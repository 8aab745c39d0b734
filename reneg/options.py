"""One options layer: the settings train, tune, eval, the ComfyUI tune node and a web app share.

:class:`ReNegOptions` holds each shared setting once, with its documentation and the paper's
default (SD1.5 recipe: 30 DDIM steps, CFG 7.5, grad step among the last 11, AdamW at lr 5e-3,
4,000 steps of batch 64, per-sample search of at most 10 steps with patience 3).
:func:`add_options` builds command-line flags from its fields, and the ``check_*`` functions
are the one set of checks every front-end runs before a model loads: a bad value is an
:class:`OptionError` whose one-line message names the flag (or the node input).

Core-level: imports only the standard library (``--device`` checks import torch lazily).
"""

from __future__ import annotations

import argparse
import math
import os
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Iterable

# limits of what a flag may hold (beyond them a value is refused by name, never half-used)
SEED_MAX = 2**64 - 1  # torch.Generator.manual_seed takes seeds in [0, 2**64)
COUNT_MAX = 2**31 - 1  # steps, batch sizes, image counts
SAMPLING_STEPS_MAX = 1000  # a DDIM schedule can not have more steps than the model's 1000 timesteps
RESOLUTION_MAX = 8192
FRAMES_MAX = 1024  # frames per training clip (Wan's releases make 81)


# prompt encodings a backend keeps cached (reneg/backends); --offload-text-encoder needs a run's prompts all in it
PROMPT_CACHE_MAX = 20000


class OptionError(ValueError):
    """A bad option; the message is one line naming the flag."""


def _opt(default: Any, help: str, flag: str | None = None, **argparse_kw: Any):
    if isinstance(default, (list, dict, set)):
        return field(
            default_factory=lambda: type(default)(default),
            metadata={"help": help, "flag": flag, "argparse": argparse_kw},
        )
    return field(default=default, metadata={"help": help, "flag": flag, "argparse": argparse_kw})


@dataclass
class ReNegOptions:
    """Settings shared by ``reneg train``, ``reneg tune``, ``reneg eval``, the ComfyUI tune node and
    the web app. The defaults are the paper's; each front-end takes them from here."""

    # --- model and reward
    model: str = _opt(
        "",
        "Stable Diffusion 1.x/2.x/XL: a single-file checkpoint (.safetensors, as the UIs keep "
        "them) or a diffusers folder",
    )
    config: str | None = _opt(
        None,
        "optional, for a single-file checkpoint: a local diffusers folder whose configs "
        "replace the built-in ones of its architecture (nothing is downloaded)",
    )
    vae: str | None = _opt(
        None,
        "a VAE file (.safetensors) or diffusers VAE folder used instead of the model's own "
        "(needed when the checkpoint has none inside)",
    )
    text_encoders: list = _opt(
        [],
        "for a Flux.1, Chroma, Qwen-Image or Wan transformer file as ComfyUI keeps it (--model): its text "
        "encoder files (Flux: clip_l and t5xxl; Chroma: t5xxl; Qwen-Image: qwen_2.5_vl_7b; Wan: umt5_xxl; e.g. "
        "models/text_encoders/t5xxl_fp16.safetensors); repeat",
        flag="--text-encoder",
        action="append",
        metavar="FILE",
    )
    tokenizer: str | None = _opt(
        None,
        "for a Flux.1, Chroma, Qwen-Image or Wan transformer file: a folder with its text encoder's tokenizer "
        "(ComfyUI's comfy/text_encoders/t5_tokenizer or qwen25_tokenizer, found by itself when the files are "
        "inside a ComfyUI folder; Wan's is read from the umt5_xxl file)",
        metavar="FOLDER",
    )
    low_noise_model: str | None = _opt(
        None,
        "for Wan 2.2 A14B as ComfyUI keeps it: the low-noise expert's transformer file (--model is the "
        "high-noise one; they switch at the release's boundary 0.875)",
        metavar="FILE",
    )
    prediction_type: str | None = _opt(
        None,
        "what the UNet predicts, instead of what the checkpoint says (default: read from the file)",
        choices=("eps", "v"),
    )
    rewards: list = _opt(
        [],
        "NAME=PATH[,option=value][,weight=W]; repeat to combine (e.g. "
        "hpsv2.1=HPS_v2.1_compressed.pt); see 'reneg rewards'",
        flag="--reward",
        action="append",
        metavar="SPEC",
    )
    device: str | None = _opt(None, "cpu, cuda, cuda:1... (default: cuda if available)")
    mixed_precision: str = _opt(
        "no",
        "load the models in this precision and run under autocast; on a CPU only bf16 is kept (it halves "
        "an SDXL checkpoint's memory) and fp16 runs in fp32",
        choices=("no", "fp16", "bf16"),
    )
    offload_text_encoder: bool = _opt(
        False,
        "train and tune: encode every prompt the run needs first (training and held-out prompts, the empty "
        "and handcrafted negatives), then move the text encoder(s) (T5-XXL, CLIP, Qwen2.5-VL) to the CPU, so "
        "the card holds only the denoiser, the VAE and the rewards; the result is the same (docs/performance.md)",
        action="store_true",
    )
    threads: str = _opt(
        "auto",
        "CPU threads for torch: a number, or auto: the cores other work leaves free, followed as the load "
        "changes (on a busy machine more threads than free cores make every step wait; docs/performance.md); "
        "the environment variable RENEG_THREADS replaces auto",
    )
    # --- sampling (the objective samples exactly like this)
    sampling_steps: int = _opt(30, "DDIM steps (paper: 30)")
    guidance: float = _opt(
        7.5,
        "CFG scale (paper: 7.5); or nag: Normalized Attention Guidance alone, at CFG 1 (few-step and "
        "guidance-distilled models); or SCALE+nag (e.g. 7.5+nag): CFG with NAG in its conditional pass "
        "(docs/nag.md)",
        metavar="SCALE|nag|SCALE+nag",
    )
    guidance_mode: str = _opt("cfg", "how the negative guides: cfg, nag or cfg+nag (set by --guidance)")
    nag_scale: float | None = _opt(None, "NAG scale (1: the negative has no effect; default: the family's)", type=float)
    nag_tau: float | None = _opt(None, "NAG norm-ratio clip tau, >= 1 (default: the family's)", type=float)
    nag_alpha: float | None = _opt(None, "NAG blend alpha, 0 to 1 (default: the family's)", type=float)
    guidance_2: float | None = _opt(
        None,
        "Wan 2.2 A14B: the low-noise expert's own CFG scale, as WanPipeline's guidance_scale_2 (default: --guidance)",
        type=float,
    )
    shift: float | None = _opt(
        None,
        "Wan: the flow shift to sample with, as ComfyUI's ModelSamplingSD3 shift (default: the model's own: "
        "3 for Wan 2.1, 12 for 2.2 A14B, 5 for 2.2 TI2V 5B, as their releases ship); give the shift your "
        "ComfyUI workflow samples with (its Wan 2.2 templates use 8)",
        type=float,
    )
    wan_experts: str = _opt(
        "shared",
        "Wan 2.2 A14B: one negative for both experts (shared: family wan) or one per expert, stored together "
        "in one file (per-expert: family wan-experts)",
        choices=("shared", "per-expert"),
    )
    frames: int = _opt(
        1,
        "train and tune on a text-to-video model (Wan, ZeroScope): frames per sample (Wan: 4 k + 1). 1 (the "
        "default): image mode, one frame; above 1: each sample is a clip, every frame scored by the image "
        "reward and a clip's reward the mean over its frames (docs/wan.md)",
    )
    grad_range: tuple = _opt(
        (0, 10),
        "grad step, counted in DDIM steps from the end (paper: 0 10, one of the last 11 of 30)",
        nargs=2,
        metavar=("LO", "HI"),
    )
    resolution: int = _opt(512, "image width and height in pixels (paper: 512)")
    seed: int = _opt(0, "seed (0 to 2**64 - 1)")
    # --- optimisation
    lr: float = _opt(5e-3, "learning rate (paper: 5e-3)")
    steps: int = _opt(4000, "optimizer steps (paper: 4000)")
    batch_size: int = _opt(64, "samples per optimizer step (paper: 64)")
    lr_schedule: str = _opt("cosine", "learning-rate schedule (paper: cosine)", choices=("cosine", "constant"))
    weight_decay: float = _opt(0.0, "AdamW weight decay (the paper does not say; 0)")
    warmup: int = _opt(0, "linear warm-up steps (the paper does not say; 0)")
    # --- per-sample search (the paper's Algorithm 1)
    max_steps: int = _opt(10, "per-sample search: at most N gradient steps (paper: 10)")
    patience: int = _opt(3, "per-sample search: stop after this many steps without a new best (paper: 3)")
    # --- watching a training run for reward hacking (reneg train)
    monitor_rewards: list = _opt(
        [],
        "a reward that only watches: NAME=PATH[,option=value] as for --reward, scored on the held-out images "
        "at every held-out check (learned, null, handcrafted) and never trained on; repeat for several",
        flag="--monitor-reward",
        action="append",
        metavar="SPEC",
    )
    keep_best_by: str | None = _opt(
        None,
        "also keep OUT/embedding-best.safetensors, the embedding of the held-out check with the best MEASURE: "
        "heldout (the training reward on the held-out images), diversity, or a --monitor-reward's NAME",
        metavar="MEASURE",
    )
    # --- outputs
    overwrite: bool = _opt(
        False,
        "replace what --out already holds (a file, or a run's files) instead of refusing to",
        action="store_true",
    )


PAPER = ReNegOptions()
"""The paper's defaults, as values: ``PAPER.sampling_steps``, ``PAPER.grad_range``..."""

_FIELDS = {f.name: f for f in fields(ReNegOptions)}


def default(name: str) -> Any:
    """The default of one shared setting (a fresh copy for lists)."""
    f = _FIELDS[name]
    return f.default_factory() if f.default is MISSING else f.default


def help_of(name: str) -> str:
    """The help text of one shared setting (a UI shows it beside the field)."""
    return _FIELDS[name].metadata["help"]


def flag_of(name: str) -> str:
    f = _FIELDS.get(name)
    return (f.metadata.get("flag") if f else None) or "--" + name.replace("_", "-")


def add_options(
    p,
    names: Iterable[str],
    *,
    flags: dict[str, str] | None = None,
    defaults: dict[str, Any] | None = None,
    helps: dict[str, str] | None = None,
) -> None:
    """Add the flags of the shared settings ``names`` to an argparse parser or group.

    ``flags`` renames a flag (``{"lr": "--tune-lr"}``: dest ``tune_lr``), ``defaults`` and ``helps``
    replace a default or a help text for one front-end. Types, choices, nargs and the paper's
    defaults come from :class:`ReNegOptions`.
    """
    flags, defaults, helps = flags or {}, defaults or {}, helps or {}
    for name in names:
        f = _FIELDS[name]
        flag = flags.get(name) or flag_of(name)
        kw: dict[str, Any] = dict(f.metadata.get("argparse") or {})
        value = defaults.get(name, default(name))
        kw["help"] = helps.get(name, f.metadata["help"])
        if name == "rewards":  # the reward registry names the rewards there are (a light import)
            from .rewards import spec_help

            kw["help"] = spec_help() + ("; " + helps[name] if name in helps else "")
        kw["dest"] = name if name not in flags else flag.lstrip("-").replace("-", "_")
        if name == "guidance":  # a CFG scale, nag or SCALE+nag: also sets guidance_mode
            kw.update(action=_GuidanceAction, default=value)
            p.set_defaults(guidance_mode=defaults.get("guidance_mode", "cfg"))
            p.add_argument(flag, **kw)
            continue
        if kw.get("action") == "append":
            kw["default"] = list(value)
        elif kw.get("nargs") == 2:
            kw.update(type=int, default=list(value))
        else:
            kind = type(default(name)) if default(name) is not None else str
            if kind in (int, float):
                kw["type"] = kind
            kw["default"] = value
        p.add_argument(flag, **kw)


GUIDANCE_MODES = ("cfg", "nag", "cfg+nag")


def parse_guidance(text: str, flag: str = "--guidance") -> tuple[float | None, str]:
    """``--guidance``'s value as (CFG scale or None for the default, mode): ``7.5`` (CFG), ``nag``
    (NAG alone: CFG 1), ``7.5+nag`` or ``cfg+nag`` (CFG with NAG)."""
    t = str(text).strip().lower()
    if t == "nag":
        return 1.0, "nag"
    if t == "cfg+nag":
        return None, "cfg+nag"
    head, plus, tail = t.partition("+")
    try:
        scale = float(head)
    except ValueError:
        scale = None
    if scale is None or (plus and tail != "nag"):
        raise OptionError(f"{flag} must be a CFG scale, nag, or SCALE+nag (e.g. 7.5+nag), got {text!r}")
    return scale, "cfg+nag" if plus else "cfg"


class _GuidanceAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        try:
            scale, mode = parse_guidance(values, option_string or "--guidance")
        except OptionError as e:
            raise argparse.ArgumentError(self, str(e)) from None
        if scale is not None:
            setattr(namespace, self.dest, scale)
        namespace.guidance_mode = mode


def check_nag(opts: Any) -> None:
    """``guidance_mode`` and the NAG settings given (None: the family's default)."""
    mode = getattr(opts, "guidance_mode", "cfg") or "cfg"
    if mode not in GUIDANCE_MODES:
        raise OptionError(f"--guidance mode must be one of {', '.join(GUIDANCE_MODES)}, got {mode!r}")
    checks = (("nag_scale", 0.0, None), ("nag_tau", 1.0, None), ("nag_alpha", 0.0, 1.0))
    for name, lo, hi in checks:
        v = getattr(opts, name, None)
        if v is None:
            continue
        v = _num(flag_of(name), v)
        if not (math.isfinite(v) and v >= lo and (hi is None or v <= hi)):
            top = f" and <= {hi:g}" if hi is not None else ""
            raise OptionError(f"{flag_of(name)} must be a finite number >= {lo:g}{top}, got {_short(v)}")


# --------------------------------------------------------------------------- checks


def _num(flag: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise OptionError(f"{flag} must be a number, got {v!r}")
    return v


def check_int(flag: str, v: Any, lo: int = 1, hi: int = COUNT_MAX, what: str = "") -> int:
    """An integer in ``[lo, hi]``; refuses floats, NaN, booleans and values beyond ``hi``."""
    if isinstance(v, float) and v.is_integer():
        v = int(v)
    if isinstance(v, bool) or not isinstance(v, int):
        raise OptionError(f"{flag} must be an integer, got {v!r}")
    if not lo <= v <= hi:
        base = "a positive integer" if lo == 1 else f"an integer >= {lo}"
        top = "" if v < lo and hi >= COUNT_MAX else f" up to {hi}"
        raise OptionError(f"{flag} must be {base}{top}{what}, got {_short(v)}")
    return v


def check_seed(flag: str, v: Any, span: int = 1) -> int:
    """A seed: an integer in ``[0, 2**64 - span]`` (the run also uses ``seed + 1`` ... ``seed + span - 1``)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise OptionError(f"{flag} must be an integer seed, got {v!r}")
    top = SEED_MAX - max(0, int(span) - 1)
    if not 0 <= v <= top:
        extra = f" (this run also uses the next {span - 1} seeds)" if span > 1 else ""
        raise OptionError(f"{flag} must be between 0 and {top}{extra}, got {_short(v)}")
    return v


def check_float(flag: str, v: Any, *, positive: bool = True, hi: float | None = None) -> float:
    """A finite number, > 0 (``positive``) or >= 0; NaN and inf are refused."""
    v = _num(flag, v)
    try:
        ok = math.isfinite(v) and (v > 0 if positive else v >= 0) and (hi is None or v <= hi)
    except OverflowError:  # an int too large for a float
        ok = False
    if not ok:
        want = "> 0" if positive else ">= 0"
        raise OptionError(
            f"{flag} must be a finite number {want}{f' and <= {hi}' if hi is not None else ''}, got {_short(v)}"
        )
    return float(v)


def _short(v: Any) -> str:
    s = str(v)
    return s if len(s) <= 40 else f"{s[:12]}...{s[-6:]} ({len(s)} digits)"


def check_resolution(flag: str, v: Any, multiple: int = 8) -> int:
    """An image side in pixels: an integer from ``multiple`` up to ``RESOLUTION_MAX`` and a multiple
    of ``multiple`` (the VAE's downscale: 8 for every Stable Diffusion family)."""
    res = check_int(flag, v, multiple, RESOLUTION_MAX)
    if res % multiple:
        raise OptionError(f"{flag} must be a positive multiple of {multiple}, got {res}")
    return res


def check_sampling(
    opts: Any, grad: bool = True, names: dict[str, str] | None = None, sides: tuple[str, ...] = ("resolution",)
) -> None:
    """``sampling_steps``, ``guidance``, the image ``sides`` (``resolution``; a front-end with a
    width and a height names both, or none to check them later with :func:`check_resolution`) and
    (``grad``) ``grad_range`` of any object with those attributes; ``names`` maps an attribute to
    the flag or input a user sees."""
    n = {k: flag_of(k) for k in ("sampling_steps", "guidance", "grad_range", *sides)}
    n.update(names or {})
    steps = check_int(n["sampling_steps"], opts.sampling_steps, 1, SAMPLING_STEPS_MAX)
    check_float(n["guidance"], opts.guidance)
    for name in ("guidance_2", "shift"):  # Wan's, where a front-end has them
        if getattr(opts, name, None) is not None:
            check_float(n.get(name, flag_of(name)), getattr(opts, name))
    check_nag(opts)
    for side in sides:
        check_resolution(n[side], getattr(opts, side))
    if grad:
        check_grad_range(opts.grad_range, steps, n["grad_range"], n["sampling_steps"])


def check_search(opts: Any, names: dict[str, str] | None = None) -> None:
    """The per-sample search's settings (the paper's Algorithm 1: ``reneg tune``, the ComfyUI tune
    node): ``max_steps``, ``patience`` (at most ``max_steps``), ``lr`` and ``seed``, of any object
    with those attributes; ``names`` as for :func:`check_sampling`. Every seed up to 2**64 - 1 is
    taken: fresh noise uses ``seed + 1`` ... ``seed + max_steps`` modulo 2**64 (reneg/tuning.py)."""
    n = {k: flag_of(k) for k in ("max_steps", "patience", "lr", "seed")}
    n.update(names or {})
    max_steps = check_int(n["max_steps"], opts.max_steps)
    patience = check_int(n["patience"], opts.patience)
    check_float(n["lr"], opts.lr)
    check_seed(n["seed"], opts.seed)
    if patience > max_steps:
        raise OptionError(f"{n['patience']} {patience} is above {n['max_steps']} {max_steps}")


def check_grad_range(
    grad_range: Any, steps: int, flag: str = "--grad-range", steps_flag: str = "--sampling-steps"
) -> tuple[int, int]:
    try:
        lo, hi = grad_range
    except (TypeError, ValueError):
        raise OptionError(f"{flag}: expected two integers LO HI, got {grad_range!r}") from None
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)) or not 0 <= lo <= hi < steps:
        raise OptionError(f"{flag} {_short(lo)} {_short(hi)}: need 0 <= LO <= HI < {steps_flag} ({steps})")
    return lo, hi


def clamp_grad_range(grad_range: tuple[int, int], steps: int) -> tuple[tuple[int, int], str | None]:
    """The grad-step range fitted to ``steps`` sampling steps, and a note when it had to change.

    For a UI: the paper's 0-10 asks for 11 steps; with 8 sampling steps it becomes 0-7 (every step)."""
    lo, hi = int(grad_range[0]), int(grad_range[1])
    if lo > hi:
        lo, hi = hi, lo
    new = (max(0, min(lo, steps - 1)), max(0, min(hi, steps - 1)))
    if new == (lo, hi) and tuple(grad_range) == (lo, hi):
        return new, None
    return new, (
        f"grad step range {grad_range[0]}-{grad_range[1]} does not fit {steps} sampling steps; using {new[0]}-{new[1]}"
    )


def check_device(device: str | None, flag: str = "--device") -> None:
    if not device:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as e:
        raise OptionError(f"{flag} {device}: not a device ({str(e).splitlines()[0][:120]})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise OptionError(f"{flag} {device}: CUDA is not available here (use --device cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise OptionError(f"{flag} {device}: there are {torch.cuda.device_count()} CUDA devices")


def compute_dtype(opts: Any) -> tuple[Any, str]:
    """The dtype a model loaded with these options computes in (``mixed_precision`` on ``device``,
    as :func:`reneg.backends.loading.weights_dtype` decides), and the flags that decide it, for a
    message. A negative whose values overflow this dtype is refused before any model loads."""
    import torch

    from .backends.loading import weights_dtype

    mixed = getattr(opts, "mixed_precision", None) or "no"
    device = getattr(opts, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    return weights_dtype(mixed, device), f"--mixed-precision {mixed} on {torch.device(device).type}"


def check_model_and_rewards(opts: Any) -> None:
    """``--model``, ``--config`` and ``--reward`` (files exist, specs parse); loads nothing."""
    if not opts.model:
        raise OptionError("--model is required (a diffusers folder or a .safetensors checkpoint)")
    if not os.path.exists(opts.model):
        raise OptionError(f"--model {opts.model}: no such folder or file")
    if os.path.isdir(opts.model) and not os.path.isfile(os.path.join(opts.model, "model_index.json")):
        raise OptionError(f"--model {opts.model}: not a diffusers folder (no model_index.json)")
    if opts.config and not os.path.isdir(opts.config):
        raise OptionError(f"--config {opts.config}: no such folder")
    vae = getattr(opts, "vae", None)
    if vae and not os.path.exists(vae):
        raise OptionError(f"--vae {vae}: no such file or folder")
    for te in getattr(opts, "text_encoders", None) or ():
        if not os.path.isfile(te):
            raise OptionError(f"--text-encoder {te}: no such file")
    tok = getattr(opts, "tokenizer", None)
    if tok and not os.path.isdir(tok):
        raise OptionError(f"--tokenizer {tok}: no such folder")
    low = getattr(opts, "low_noise_model", None)
    if low and not os.path.isfile(low):
        raise OptionError(f"--low-noise-model {low}: no such file")
    if getattr(opts, "prediction_type", None) not in (None, "eps", "v"):
        raise OptionError(f"--prediction-type {opts.prediction_type}: expected eps or v")
    if not opts.rewards:
        raise OptionError("--reward is required (e.g. --reward hpsv2.1=/models/HPS_v2.1_compressed.pt)")
    from .rewards import RewardSpecError, parse_spec

    for spec in opts.rewards:
        try:
            parse_spec(spec)
        except RewardSpecError as e:
            raise OptionError(f"--reward: {e}") from None


# the held-out measures besides the monitor rewards' (``--keep-best-by``, the hacking warnings)
HELDOUT_MEASURES = ("heldout", "diversity")


def monitor_names(specs: Iterable[str], trained: Iterable[str] = ()) -> list[str]:
    """The name each ``--monitor-reward`` is logged and chosen by, as ``reneg eval`` names reward columns
    (:func:`reneg.rewards.display_names`) with the run's training rewards first: a monitor of another
    NAME is NAME; one that shares a training reward's or another monitor's NAME is ``NAME-<file stem>``
    (a demo-world judge beside the demo HPS: ``hpsv2-judge``); never a held-out measure's name. Checks
    nothing on disk (:func:`check_monitor` does)."""
    from types import SimpleNamespace

    from .rewards import RewardSpecError, parse_spec

    def parsed(spec):
        try:
            return parse_spec(spec, check_files=False)
        except RewardSpecError:
            name = str(spec).split("=", 1)[0].strip().lower() or "monitor"
            return SimpleNamespace(name=name, path=str(spec).split("=", 1)[-1].split(",")[0])

    from .rewards import display_names

    trained, specs = [parsed(s) for s in trained], [parsed(s) for s in specs]
    return display_names(trained + specs, taken=HELDOUT_MEASURES)[len(trained) :]


def check_monitor(opts: Any) -> list[str]:
    """``--monitor-reward`` (files exist, specs parse, no weight) and ``--keep-best-by`` (a measure this
    run has); loads nothing. Returns the monitors' names."""
    from .rewards import RewardSpecError, parse_spec

    specs = list(getattr(opts, "monitor_rewards", None) or [])
    for spec in specs:
        try:
            parsed = parse_spec(spec)
        except RewardSpecError as e:
            raise OptionError(f"--monitor-reward: {e}") from None
        if parsed.weight != 1.0:
            raise OptionError(
                f"--monitor-reward {spec}: a monitor reward has no weight (it never enters the loss); "
                f"drop weight={parsed.weight:g}"
            )
    names = monitor_names(specs, getattr(opts, "rewards", None) or [])
    by = getattr(opts, "keep_best_by", None)
    if by is not None:
        known = list(HELDOUT_MEASURES[:1]) + names + list(HELDOUT_MEASURES[1:])
        if by not in known:
            raise OptionError(
                f"--keep-best-by {_short(by)}: expected one of {', '.join(known)} (heldout: the training "
                f"reward on the held-out images; diversity: their spread; else a --monitor-reward's name)"
            )
    return names


def check_number_table(obj: Any, table: dict[str, tuple]) -> None:
    """Check attributes of ``obj`` by a table ``{attr: (kind, *args)}``; kinds: ``"int"`` (lo, hi),
    ``"seed"`` (span), ``"pos"`` / ``"nonneg"`` (floats), ``"opt_int"`` (None or int >= lo).
    The flag is ``--attr-with-dashes`` unless the table's last item is a flag string."""
    for attr, spec in table.items():
        kind, *args = spec
        flag = args.pop() if args and isinstance(args[-1], str) else "--" + attr.replace("_", "-")
        v = getattr(obj, attr)
        if kind == "int":
            check_int(flag, v, *args)
        elif kind == "opt_int":
            if v is not None:
                check_int(flag, v, *args)
        elif kind == "seed":
            check_seed(flag, v, *args)
        elif kind == "pos":
            check_float(flag, v, positive=True)
        elif kind == "nonneg":
            check_float(flag, v, positive=False)
        else:  # pragma: no cover - a programming error
            raise ValueError(f"unknown check kind {kind!r}")


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The dests the user set on the command line (for ``--demo``, whose settings yield to them)."""
    saved = []

    def walk(p):
        for a in p._actions:
            if isinstance(a, argparse._SubParsersAction):
                for sp in a.choices.values():
                    walk(sp)
            elif a.dest != "help":
                saved.append((a, a.default))
                a.default = argparse.SUPPRESS
        saved.append((p, dict(p._defaults)))
        p._defaults.clear()

    walk(parser)
    try:
        ns = parser.parse_args(argv)
    finally:
        for obj, d in saved:
            if isinstance(obj, argparse.ArgumentParser):
                obj._defaults.update(d)
            else:
                obj.default = d
    return set(vars(ns))


def markdown_table() -> str:
    """The shared settings as a Markdown table (docs/options.md is made from it)."""
    rows = ["| flag | default | what |", "|---|---|---|"]
    for f in fields(ReNegOptions):
        if f.name == "guidance_mode":  # no flag of its own: --guidance sets it
            continue
        d = default(f.name)
        if isinstance(d, bool):
            shown = "on" if d else "off"
        else:
            shown = " ".join(map(str, d)) if isinstance(d, tuple) else ("(none)" if d in (None, "", []) else d)
        rows.append(f"| `{flag_of(f.name)}` | {shown} | {f.metadata['help']} |")
    return "\n".join(rows)

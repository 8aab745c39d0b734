"""The studio's forms, built from the commands' own option definitions, and checked by their own checks.

Each form (Train: ``reneg train``, Tune: ``reneg tune``, Compare: ``reneg eval``) is a table of
:class:`Field` rows: the name the page and the tests use, the label the page shows, and the flag of
the command it fills. Everything else about a field is read from that command's argument parser,
built by the same functions as the command line's (``add_train_args``, ``add_tune_args``,
``add_eval_parser``, which take the shared settings from :mod:`reneg.options`): its default, its
help text and its choices. A field whose default on the page differs from the command's says so in
its row (``own=``), with the reason. A filled form becomes the command's arguments, which are
parsed by that same parser and checked by the command's own checks; a bad value is refused with the
command's message, its flags named as the page labels the fields.

Nothing here imports gradio; the parsers are built (importing torch) only when a form is first made.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any


class FormError(ValueError):
    """A bad value in the page's form: the message is shown in the page as it is."""


# --------------------------------------------------------------------------- the commands' parsers


@lru_cache(maxsize=None)
def _command_parser(kind: str):
    """``reneg train`` / ``reneg tune`` / ``reneg eval``'s own argument parser, built by the functions
    the command line builds it with, under a ``reneg`` parser (parse ``[kind, *args]``)."""
    import argparse

    p = argparse.ArgumentParser(prog="reneg")
    sub = p.add_subparsers(dest="command", required=True)
    if kind == "train":
        from reneg.trainer.config import add_train_args

        add_train_args(sub.add_parser("train"))
    elif kind == "tune":
        from reneg.trainer.tune import add_tune_args

        add_tune_args(sub.add_parser("tune"))
    else:
        from reneg.evaluation.cli import add_eval_parser

        add_eval_parser(sub)
    return p


def _actions(kind: str) -> dict:
    """The command's arguments by flag (``{"--steps": argparse.Action}``)."""
    sub = next(a for a in _command_parser(kind)._actions if a.dest == "command").choices[kind]
    return {flag: a for a in sub._actions for flag in a.option_strings}


def parse_command(kind: str, args: list[str], names: dict):
    """``args`` parsed as the command parses them; argparse's refusal becomes a :class:`FormError`."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            return _command_parser(kind).parse_args([kind, *args])
    except SystemExit:
        msg = err.getvalue().strip().splitlines()
        text = msg[-1].replace(f"reneg {kind}: error: ", "") if msg else "bad arguments"
        raise FormError(name_fields(text, names)) from None


# --------------------------------------------------------------------------- the fields

_CLI = object()  # a field's default is the command's


@dataclass(frozen=True)
class Field:
    """One field of a form: ``flag`` is the command's flag it fills (None: the page's own field),
    ``part`` which of a two-value flag's values it holds (``--grad-range LO HI``), ``own`` the page's
    default where it is not the command's."""

    name: str
    label: str
    flag: str | None = None
    part: int | None = None
    own: Any = _CLI


class FormSpec:
    """A form's fields, with what the command's parser says of each."""

    def __init__(self, command: str, rows: list[Field]):
        self.command = command
        self.fields = {f.name: f for f in rows}
        self.labels = {f.name: f.label for f in rows}

    def action(self, name: str):
        """The command's argparse action for field ``name`` (None for the page's own fields)."""
        f = self.fields[name]
        return _actions(self.command)[f.flag] if f.flag else None

    def cli_default(self, name: str) -> Any:
        """The command's default for the field, as the page holds it: None and an empty list as an
        empty text, a list as one item a line, one of two values by ``part``."""
        f = self.fields[name]
        v = self.action(name).default
        if f.part is not None:
            v = v[f.part]
        if isinstance(v, (list, tuple)):
            v = "\n".join(map(str, v))
        return "" if v is None else v

    def default(self, name: str) -> Any:
        f = self.fields[name]
        return f.own if f.own is not _CLI or not f.flag else self.cli_default(name)

    def field(self, name: str):
        """A dataclass field whose default is :meth:`default` (read when a form is made)."""
        return field(default_factory=lambda: self.default(name))

    def help(self, name: str) -> str | None:
        a = self.action(name)
        return None if a is None or not a.help else a.help.replace("%%", "%")

    def choices(self, name: str) -> list:
        a = self.action(name)
        return list(a.choices) if a is not None and a.choices else []

    @property
    def names(self) -> dict:
        """``{flag: '"label"'}``: how a message of the command names the page's fields; a flag two
        fields share is named by both (``"grad step from"/"grad step to"``)."""
        by_flag: dict = {}
        for f in self.fields.values():
            if f.flag:
                by_flag.setdefault(f.flag, []).append(f'"{short_label(f.label)}"')
        return {flag: "/".join(labels) for flag, labels in by_flag.items()}


def short_label(label: str) -> str:
    """A field's name in a message: its label without the explanation (``Reward(s)``, ``steps``)."""
    return re.split(r" \(|, one a line", label)[0]


def name_fields(message: str, names: dict) -> str:
    """A command's message with each flag the form has replaced by the field's label."""
    return re.sub(r"(?<![\w-])--[a-z][a-z0-9-]*", lambda m: names.get(m.group(0), m.group(0)), message)


# a transformer file's other parts (ComfyUI's separate files), one a line: a text encoder file as it is, the
# rest as KEY=PATH
PARTS_LABEL = (
    "Model parts, for a transformer file kept as ComfyUI keeps it (one a line: each text encoder file; "
    "vae=FILE; tokenizer=FOLDER; low-noise=FILE for Wan 2.2 A14B)"
)
PART_FLAGS = {"vae": "--vae", "tokenizer": "--tokenizer", "low-noise": "--low-noise-model"}


def parts_args(text: str) -> list[str]:
    """The flags a Model parts field holds: ``KEY=PATH`` lines (:data:`PART_FLAGS`) as their flags, every
    other line a ``--text-encoder``."""
    out = []
    for line in _lines(text):
        key, sep, value = line.partition("=")
        flag = PART_FLAGS.get(key.strip().lower()) if sep else None
        out.append(f"{flag}={value.strip()}" if flag else f"--text-encoder={line}")
    return out


def parts_text(cfg: dict) -> str:
    """A run's parts (a trainer config's ``text_encoders``, ``vae``, ``tokenizer``, ``low_noise_model``) as
    the Model parts field shows them."""
    lines = [str(t) for t in cfg.get("text_encoders") or []]
    for key, name in (("vae", "vae"), ("tokenizer", "tokenizer"), ("low-noise", "low_noise_model")):
        if cfg.get(name):
            lines.append(f"{key}={cfg[name]}")
    return "\n".join(lines)


F = Field
TRAIN = FormSpec(
    "train",
    [
        F("model", "Model (diffusers folder or single .safetensors file)", "--model"),
        F("config", "Configs folder (single-file checkpoints only)", "--config"),
        F("parts", PARTS_LABEL, "--text-encoder"),
        F("rewards", "Rewards (NAME=PATH[,weight=W], one a line)", "--reward"),
        F(
            "monitor_rewards",
            "Monitor rewards (NAME=PATH, one a line; scored on the held-out images, never trained on)",
            "--monitor-reward",
        ),
        F("prompts", "Training prompts file", "--prompts"),
        F("heldout", "Held-out prompts file (empty: the last N training prompts)", "--heldout"),
        F("handcrafted", "Handcrafted negative (compared against)", "--handcrafted"),
        # the page names a folder under its --root (reneg train's own default is runs/reneg)
        F("out", "Output folder", "--out", own="runs/studio"),
        F("steps", "steps", "--steps"),
        F("lr", "learning rate", "--lr"),
        F("batch_size", "batch size", "--batch-size"),
        F("micro_batch", "micro-batch", "--micro-batch"),
        F("sampling_steps", "DDIM steps", "--sampling-steps"),
        F("guidance", "CFG scale", "--guidance"),
        F("grad_lo", "grad step from (end)", "--grad-range", part=0),
        F("grad_hi", "grad step to", "--grad-range", part=1),
        F("resolution", "resolution", "--resolution"),
        F("frames", "frames (text-to-video models; 1: images)", "--frames"),
        F("shift", "flow shift (Wan; empty: the model's own)", "--shift"),
        F("init", "init (null, handcrafted or a file)", "--init"),
        F("seed", "seed", "--seed"),
        F("heldout_count", "held-out prompts", "--heldout-count"),
        F("checkpoint_every", "checkpoint every", "--checkpoint-every"),
        F("eval_every", "held-out eval every", "--eval-every"),
        F("eval_batch", "eval batch", "--eval-batch"),
        # the page shows the run's sample images as they come (reneg train's own default, 0, makes none)
        F("sample_every", "samples every", "--sample-every", own=100),
        F("mixed_precision", "mixed precision", "--mixed-precision"),
        F("device", "device (empty: automatic)", "--device"),
        F("report_to", "also report to", "--report-to"),
        F("keep_best_by", "keep best by (empty: off)", "--keep-best-by"),
    ],
)
EVAL = FormSpec(
    "eval",
    [
        F("model", "Model", "--model"),
        F("config", "Configs folder (single-file checkpoints only)", "--config"),
        F("parts", PARTS_LABEL, "--text-encoder"),
        F("rewards", "Reward(s), one a line", "--reward"),
        F("prompts", "Prompt set", "--prompts"),
        # reneg eval's default with no --negative, written out
        F(
            "negatives",
            "Negatives, one a line (null, handcrafted, text:..., NAME=FILE, tuned:FILE)",
            "--negative",
            own="null\nhandcrafted",
        ),
        # empty: no --handcrafted, reneg eval's own (the paper's negative prompt)
        F("handcrafted", "Handcrafted negative text", "--handcrafted", own=""),
        F("out", "Report folder", "--out", own="runs/studio-eval"),
        # 0 stands for reneg eval's default (no --limit: every prompt)
        F("limit", "prompts (0: all)", "--limit", own=0),
        F("images_per_prompt", "images per prompt", "--images-per-prompt"),
        F("sampling_steps", "DDIM steps", "--sampling-steps"),
        F("guidance", "CFG scale", "--guidance"),
        F("resolution", "resolution", "--resolution"),
        F("frames", "frames (text-to-video models; empty: the model's own)", "--frames"),
        F("shift", "flow shift (Wan; empty: the model's own)", "--shift"),
        F("batch", "batch", "--batch"),
        F("seed", "seed", "--seed"),
        F("device", "device", "--device"),
    ],
)
TUNE = FormSpec(
    "tune",
    [
        F("model", "Model", "--model"),
        F("config", "Configs folder (single-file checkpoints only)", "--config"),
        F("parts", PARTS_LABEL, "--text-encoder"),
        F("rewards", "Reward(s), one a line", "--reward"),
        F("embedding", "Starting embedding (empty: null)", "--embedding"),
        F("prompt", "Prompt", "--prompt"),
        F("seed", "seed", "--seed"),
        F("noise", "noise each step", "--noise"),
        F("max_steps", "max steps N", "--max-steps"),
        F("patience", "patience P", "--patience"),
        F("lr", "learning rate", "--lr"),
        F("sampling_steps", "DDIM steps", "--sampling-steps"),
        F("guidance", "CFG scale", "--guidance"),
        F("grad_lo", "grad step from", "--grad-range", part=0),
        F("grad_hi", "grad step to", "--grad-range", part=1),
        F("resolution", "resolution", "--resolution"),
        F("device", "device", "--device"),
        F("frames", "frames (text-to-video models; 1: images)", "--frames"),
        F("shift", "flow shift (Wan; empty: the model's own)", "--shift"),
    ],
)
del F

# the labels and the flag-to-label maps by their earlier names
TRAIN_LABELS, EVAL_LABELS, TUNE_LABELS = TRAIN.labels, EVAL.labels, TUNE.labels
TRAIN_NAMES, EVAL_NAMES, TUNE_NAMES = TRAIN.names, EVAL.names, TUNE.names


# --------------------------------------------------------------------------- reading a field's value


def _shown(v) -> str:
    s = str(v).strip()
    return s if len(s) <= 40 else f"{s[:30]}... ({len(s)} characters)"


def whole(label: str, v) -> int:
    """A whole-number field's value, exactly: an int, a float with no fraction, or its digits as text
    (a seed field is text: a browser's number input would round 12345678901234567891 to a float)."""
    name = f'"{short_label(label)}"'
    if v is None or (isinstance(v, str) and not v.strip()):
        raise FormError(f"{name}: a number is required (the field is empty)")
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and re.fullmatch(r"[+-]?[0-9]{1,400}", v.strip()):
        return int(v.strip())
    raise FormError(f"{name}: expected a whole number, got {_shown(v)}")


def real(label: str, v) -> float:
    """A number field's value as a float (its range is checked by the command's own checks)."""
    name = f'"{short_label(label)}"'
    if v is None or (isinstance(v, str) and not v.strip()):
        raise FormError(f"{name}: a number is required (the field is empty)")
    if isinstance(v, bool):
        raise FormError(f"{name}: expected a number, got {v}")
    try:
        return float(v.strip() if isinstance(v, str) else v)
    except (TypeError, ValueError, OverflowError):
        raise FormError(f"{name}: expected a number, got {_shown(v)}") from None


def _text(v) -> str:
    return (v or "").strip() if isinstance(v, str) or v is None else str(v).strip()


def _lines(text: str) -> list[str]:
    return [s.strip() for s in (text or "").splitlines() if s.strip()]


# --------------------------------------------------------------------------- the Train form


@dataclass
class TrainForm:
    """The Train tab's fields; the defaults are ``reneg train``'s own (:data:`TRAIN`)."""

    model: str = TRAIN.field("model")
    config: str = TRAIN.field("config")
    parts: str = TRAIN.field("parts")  # a transformer file's text encoders, vae=, tokenizer=, low-noise=
    rewards: str = TRAIN.field("rewards")  # one NAME=PATH[,...] spec a line
    monitor_rewards: str = TRAIN.field("monitor_rewards")  # --monitor-reward specs, one a line
    prompts: str = TRAIN.field("prompts")
    heldout: str = TRAIN.field("heldout")
    handcrafted: str = TRAIN.field("handcrafted")
    out: str = TRAIN.field("out")
    steps: int = TRAIN.field("steps")
    lr: float = TRAIN.field("lr")
    batch_size: int = TRAIN.field("batch_size")
    micro_batch: int = TRAIN.field("micro_batch")
    sampling_steps: int = TRAIN.field("sampling_steps")
    guidance: float = TRAIN.field("guidance")
    grad_lo: int = TRAIN.field("grad_lo")
    grad_hi: int = TRAIN.field("grad_hi")
    resolution: int = TRAIN.field("resolution")
    frames: int = TRAIN.field("frames")  # --frames: 1 (images) unless the model makes clips
    shift: str = TRAIN.field("shift")  # --shift; empty: the model's own
    init: str = TRAIN.field("init")
    seed: int = TRAIN.field("seed")
    heldout_count: int = TRAIN.field("heldout_count")
    checkpoint_every: int = TRAIN.field("checkpoint_every")
    eval_every: int = TRAIN.field("eval_every")
    eval_batch: int = TRAIN.field("eval_batch")
    sample_every: int = TRAIN.field("sample_every")
    mixed_precision: str = TRAIN.field("mixed_precision")
    device: str = TRAIN.field("device")
    report_to: str = TRAIN.field("report_to")
    keep_best_by: str = TRAIN.field("keep_best_by")  # --keep-best-by MEASURE; empty: off
    extra: list[str] = field(default_factory=list)  # more reneg train flags, as given

    @classmethod
    def defaults(cls) -> TrainForm:
        return cls()


def train_args(form: TrainForm) -> list[str]:
    """``reneg train`` arguments for a filled form. Each value travels as ``--flag=value``, so a value
    that starts with ``-`` is never taken for a flag; numbers are read exactly (:func:`whole`,
    :func:`real`), a field that is empty or not a number raising :class:`FormError` with its label."""
    L = TRAIN_LABELS

    def n(k):
        return str(whole(L[k], getattr(form, k)))

    def r(k):
        return repr(real(L[k], getattr(form, k)))

    a = [f"--model={_text(form.model)}"]
    if _text(form.config):
        a.append(f"--config={_text(form.config)}")
    a += parts_args(form.parts)
    a += [f"--reward={spec}" for spec in _lines(form.rewards)]
    a += [f"--monitor-reward={spec}" for spec in _lines(form.monitor_rewards)]
    a.append(f"--prompts={_text(form.prompts)}")
    if _text(form.heldout):
        a.append(f"--heldout={_text(form.heldout)}")
    if _text(form.handcrafted):
        a.append(f"--handcrafted={_text(form.handcrafted)}")
    a += [
        f"--out={_text(form.out)}",
        f"--steps={n('steps')}",
        f"--lr={r('lr')}",
        f"--batch-size={n('batch_size')}",
        f"--micro-batch={n('micro_batch')}",
        f"--sampling-steps={n('sampling_steps')}",
        f"--guidance={r('guidance')}",
        "--grad-range",  # two values; whole numbers (a negative one is read as a number, and refused)
        n("grad_lo"),
        n("grad_hi"),
        f"--resolution={n('resolution')}",
        f"--frames={n('frames')}",
        f"--init={_text(form.init) or 'null'}",
        f"--seed={n('seed')}",
        f"--heldout-count={n('heldout_count')}",
        f"--checkpoint-every={n('checkpoint_every')}",
        f"--eval-every={n('eval_every')}",
        f"--eval-batch={n('eval_batch')}",
        f"--sample-every={n('sample_every')}",
        f"--mixed-precision={form.mixed_precision or 'no'}",
        f"--report-to={form.report_to or 'none'}",
    ]
    if _text(form.device):
        a.append(f"--device={_text(form.device)}")
    if _text(form.keep_best_by):
        a.append(f"--keep-best-by={_text(form.keep_best_by)}")
    a += _shift_args(L["shift"], form.shift)
    return a + list(form.extra)


def _shift_args(label: str, v) -> list[str]:
    """``--shift`` for a Shift field's value: none when it is empty (the model's own shift)."""
    return [] if v is None or _text(v) == "" else [f"--shift={real(label, v)!r}"]


def check_train(form: TrainForm, resume: bool = False) -> list[str]:
    """The arguments, checked exactly as ``reneg train`` checks them (no model loads): a bad form
    raises :class:`FormError` with the trainer's one-line message, the fields named as the page
    labels them."""
    from reneg.trainer.config import ConfigError, train_config_from_args, validate_train

    if not _text(form.out):
        raise FormError('"Output folder": required')
    args = train_args(form) + (["--resume=latest"] if resume else [])
    ns = parse_command("train", args, TRAIN_NAMES)
    try:
        cfg = train_config_from_args(ns)
        validate_train(cfg)  # the events' flags included (check_event_args)
    except (ConfigError, OSError, ValueError) as e:
        raise FormError(name_fields(str(e), TRAIN_NAMES)) from None
    return args


def demo_setup(root: str = "runs") -> dict:
    """The demo world's files (written under ``ROOT/studio-demo/demo``) and the forms filled for it."""
    from reneg import demo

    out = os.path.join(root, "studio-demo")
    d = demo.setup(out)
    s = d["settings"]
    train = TrainForm(
        model=d["model"],
        rewards=d["reward"],
        prompts=d["prompts"],
        heldout=d["heldout"],
        handcrafted=d["handcrafted"],
        out=out,
        steps=s["steps"],
        lr=s["lr"],
        batch_size=s["batch_size"],
        micro_batch=s["micro_batch"],
        sampling_steps=s["sampling_steps"],
        guidance=s["guidance"],
        grad_lo=s["grad_range"][0],
        grad_hi=s["grad_range"][1],
        resolution=s["resolution"],
        seed=0,
        heldout_count=s.get("heldout_count", TRAIN.default("heldout_count")),
        checkpoint_every=s["checkpoint_every"],
        eval_every=s["eval_every"],
        eval_batch=s["eval_batch"],
        sample_every=max(1, s["steps"] // 16),
    )
    heldout = d["heldout_texts"]
    return {
        "kind": d["kind"],
        "train": train,
        "prompt": heldout[0] if heldout else "a red circle",
        "tune_lr": s.get("tune_lr", s["lr"]),
        "threads": demo.default_threads(),
        "root": root,
    }


# --------------------------------------------------------------------------- the Tune form


@dataclass
class TuneForm:
    """The Tune tab's fields; the defaults are ``reneg tune``'s own (:data:`TUNE`)."""

    model: str = TUNE.field("model")
    config: str = TUNE.field("config")
    parts: str = TUNE.field("parts")
    rewards: str = TUNE.field("rewards")
    embedding: str = TUNE.field("embedding")
    prompt: str = TUNE.field("prompt")
    seed: int = TUNE.field("seed")
    noise: str = TUNE.field("noise")
    max_steps: int = TUNE.field("max_steps")
    patience: int = TUNE.field("patience")
    lr: float = TUNE.field("lr")
    sampling_steps: int = TUNE.field("sampling_steps")
    guidance: float = TUNE.field("guidance")
    grad_lo: int = TUNE.field("grad_lo")
    grad_hi: int = TUNE.field("grad_hi")
    resolution: int = TUNE.field("resolution")
    device: str = TUNE.field("device")
    frames: int = TUNE.field("frames")
    shift: str = TUNE.field("shift")


def tune_args(v: dict) -> list[str]:
    """``reneg tune`` arguments for the Tune form's values (``--out`` aside: the page saves the kept
    embedding itself); numbers read exactly, as :func:`train_args` reads them."""
    L = TUNE_LABELS

    def n(k):
        return str(whole(L[k], v[k]))

    def r(k):
        return repr(real(L[k], v[k]))

    a = [f"--model={_text(v['model'])}"]
    if _text(v["config"]):
        a.append(f"--config={_text(v['config'])}")
    a += parts_args(v.get("parts") or "")
    a += [f"--reward={spec}" for spec in _lines(v["rewards"])]
    if _text(v["embedding"]):
        a.append(f"--embedding={_text(v['embedding'])}")
    a += [
        f"--prompt={v['prompt'] or ''}",
        f"--seed={n('seed')}",
        f"--noise={v['noise'] or 'seed'}",
        f"--max-steps={n('max_steps')}",
        f"--patience={n('patience')}",
        f"--lr={r('lr')}",
        f"--sampling-steps={n('sampling_steps')}",
        f"--guidance={r('guidance')}",
        "--grad-range",
        n("grad_lo"),
        n("grad_hi"),
        f"--resolution={n('resolution')}",
        f"--frames={whole(L['frames'], v.get('frames', 1))}",
    ]
    a += _shift_args(L["shift"], v.get("shift"))
    if _text(v["device"]):
        a.append(f"--device={_text(v['device'])}")
    return a


def check_tune(v: dict):
    """The Tune form's values, parsed by ``reneg tune``'s parser and checked by its own checks
    (:func:`reneg.trainer.tune.check_tune_inputs`) before any model loads; returns the namespace.
    A bad value is a :class:`FormError` naming the field as the page labels it."""
    from reneg.options import OptionError
    from reneg.trainer.tune import check_tune_inputs

    ns = parse_command("tune", tune_args(v), TUNE_NAMES)
    ns.embedding = ns.embedding or ""
    try:
        check_tune_inputs(ns)
    except (OptionError, OSError, ValueError) as e:
        raise FormError(name_fields(str(e), TUNE_NAMES)) from None
    return ns


# --------------------------------------------------------------------------- the Compare form (reneg eval)


@dataclass
class EvalForm:
    """The Compare tab's fields; the defaults are ``reneg eval``'s own (:data:`EVAL`)."""

    model: str = EVAL.field("model")
    config: str = EVAL.field("config")
    parts: str = EVAL.field("parts")
    rewards: str = EVAL.field("rewards")
    prompts: str = EVAL.field("prompts")
    negatives: str = EVAL.field("negatives")
    handcrafted: str = EVAL.field("handcrafted")
    out: str = EVAL.field("out")
    limit: int = EVAL.field("limit")
    images_per_prompt: int = EVAL.field("images_per_prompt")
    sampling_steps: int = EVAL.field("sampling_steps")
    guidance: float = EVAL.field("guidance")
    resolution: int = EVAL.field("resolution")
    frames: str = EVAL.field("frames")  # empty: the model's own (81 for Wan, 16 for other video models)
    shift: str = EVAL.field("shift")
    batch: int = EVAL.field("batch")
    seed: int = EVAL.field("seed")
    device: str = EVAL.field("device")


def eval_args(form: EvalForm) -> list[str]:
    L = EVAL_LABELS

    def n(k):
        return str(whole(L[k], getattr(form, k)))

    a = [f"--model={_text(form.model)}"]
    if _text(form.config):
        a.append(f"--config={_text(form.config)}")
    a += parts_args(form.parts)
    a += [f"--reward={spec}" for spec in _lines(form.rewards)]
    a.append(f"--prompts={_text(form.prompts)}")
    a += [f"--negative={spec}" for spec in _lines(form.negatives)]
    if _text(form.handcrafted):
        a.append(f"--handcrafted={_text(form.handcrafted)}")
    a += [
        f"--out={_text(form.out)}",
        f"--images-per-prompt={n('images_per_prompt')}",
        f"--sampling-steps={n('sampling_steps')}",
        f"--guidance={real(L['guidance'], form.guidance)!r}",
        f"--resolution={n('resolution')}",
        f"--batch={n('batch')}",
        f"--seed={n('seed')}",
    ]
    if form.limit not in (None, "") and whole(L["limit"], form.limit) != 0:
        a.append(f"--limit={n('limit')}")
    if form.frames is not None and _text(form.frames) != "":  # empty: the model's own count
        a.append(f"--frames={n('frames')}")
    a += _shift_args(L["shift"], form.shift)
    if _text(form.device):
        a.append(f"--device={_text(form.device)}")
    return a


def check_eval(form: EvalForm) -> list[str]:
    """``reneg eval``'s own checks, before any model loads."""
    from reneg.trainer.config import ConfigError

    from reneg.evaluation.cli import eval_config_from_args
    from reneg.evaluation.run import validate_eval

    if not _text(form.out):
        raise FormError('"Report folder": required')
    args = eval_args(form)
    ns = parse_command("eval", args, EVAL_NAMES)
    try:
        validate_eval(eval_config_from_args(ns))
    except (ConfigError, OSError, ValueError) as e:
        raise FormError(name_fields(str(e), EVAL_NAMES)) from None
    return args

"""Differentiable reward models, loaded from local files only: the registry of reward kinds, and the
``--reward`` specs that name them.

A new reward is one new module in this package that decorates a loader with :func:`register`; the CLI
help, ``reneg rewards`` and the ComfyUI nodes' lists all come from the registry (:func:`reward_kinds`).
Several specs combine into a weighted sum (:class:`WeightedReward`).
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import pkgutil
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

_REGISTRY: dict[str, "RewardInfo"] = {}


@dataclass
class RewardInfo:
    name: str
    loader: Callable[..., "Reward"]
    help: str = ""
    path_kind: str = "file"  # file | folder
    required: tuple[str, ...] = ()  # options the spec must give (checked before any model loads)
    options: tuple[str, ...] = ()  # every option the loader takes (besides weight)
    path_options: dict[str, str] = field(default_factory=dict)  # option -> "file" | "folder"

    @property
    def syntax(self) -> str:
        """The spec, e.g. ``aesthetic=FILE,clip=FOLDER[,weight=W]``."""

        def value(k):
            return self.path_options.get(k, "value").upper()

        opts = [k for k in dict.fromkeys(self.required + self.options + tuple(self.path_options))]
        parts = [f",{k}={value(k)}" if k in self.required else f"[,{k}={value(k)}]" for k in opts]
        return f"{self.name}={self.path_kind.upper()}{''.join(parts)}[,weight=W]"


class Reward(torch.nn.Module):
    """Base class: subclasses implement ``forward(images, prompts) -> [B]``, with images in [-1, 1],
    BCHW, differentiable w.r.t. the images."""

    name: str = "reward"

    def requires_grad_(self, requires_grad: bool = True):  # rewards are always frozen
        return super().requires_grad_(False)

    def enable_gradient_checkpointing(self) -> bool:
        """Recompute the image tower's activations during backward (less memory, about
        one more forward). Returns whether this reward supports it."""
        return False

    def image_features(self, images: torch.Tensor) -> torch.Tensor | None:
        """L2-normalised features ``[B, D]`` of images in [-1, 1] from the reward's own image tower
        (what :mod:`reneg.diversity` measures distances in), or None when the reward has none."""
        return None


def register(
    name: str,
    help: str = "",
    path_kind: str = "file",
    required: tuple[str, ...] = (),
    options: tuple[str, ...] = (),
    path_options: dict[str, str] | None = None,
):
    """Decorator: make ``fn(path, device=, dtype=, **options)`` the loader of reward ``name``.

    ``path_kind``: whether PATH is a "file" or a "folder"; ``options``: the option names it takes;
    ``path_options``: those options whose value is a path ("file" or "folder"; checked to exist
    before anything loads, and offered as model lists by the ComfyUI Load Reward Model node);
    ``required``: options the spec must give. For example::

        @register("myreward", "what it scores and which file it reads", options=("opt",))
        def load_myreward(path, device="cpu", dtype=torch.float32, **options) -> Reward: ...

    Heavy libraries (open_clip, transformers) are imported inside the loader.
    """

    def deco(fn):
        _REGISTRY[name] = RewardInfo(
            name, fn, help, path_kind, tuple(required), tuple(options), dict(path_options or {})
        )
        return fn

    return deco


_FAILED: dict[str, str] = {}


def _discover() -> None:
    """Import every module of this package (each registers its rewards). A module imports only
    torch at the top; open_clip and transformers load inside the loaders. A module that fails to
    import is reported once and left out, so one broken reward never hides the others."""
    for m in pkgutil.iter_modules(__path__):
        qual = f"{__name__}.{m.name}"
        if m.name.startswith("_") or qual in _FAILED:
            continue
        try:
            importlib.import_module(qual)
        except Exception as e:  # noqa: BLE001 - report and go on with the other rewards
            _FAILED[qual] = f"{type(e).__name__}: {e}"
            warnings.warn(f"reward module {qual} could not be imported and is left out: {_FAILED[qual]}", stacklevel=2)


def reward_kinds() -> dict[str, RewardInfo]:
    """The registry of reward kinds: every registered reward's RewardInfo, by name, sorted. The modules
    of this package are found with :mod:`pkgutil` the first time it is read (:func:`_discover`), so a
    new reward module changes nothing else."""
    _discover()
    return dict(sorted(_REGISTRY.items()))


def names() -> list[str]:
    return list(reward_kinds())


def spec_help(prefix: str = "") -> str:
    """One line for a ``--reward`` flag's help: the spec syntax and the known names."""
    return (
        f"{prefix}NAME=PATH[,option=value...][,weight=W] with NAME one of "
        f"{', '.join(names())}; repeat to combine. 'reneg rewards' shows each one's options"
    )


@contextlib.contextmanager
def quiet_library_messages(*starts: str, loggers: tuple[str, ...] = ("",)) -> Iterator[None]:
    """Drop log records that begin with one of ``starts`` while a loader runs: messages a library
    prints about a step our loader makes moot (open_clip's "No pretrained weights loaded ...
    Model initialized randomly." right before the checkpoint's weights go in). Every other
    record passes."""

    class _Drop(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            try:
                msg = record.getMessage()
            except Exception:  # noqa: BLE001 - a malformed record is not ours to judge
                return True
            return not msg.startswith(starts)

    flt = _Drop()
    targets = [logging.getLogger(n) if n else logging.getLogger() for n in loggers]
    for lg in targets:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in targets:
            lg.removeFilter(flt)


class RewardSpecError(ValueError):
    pass


@dataclass
class RewardSpec:
    name: str
    path: str
    weight: float = 1.0
    options: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        opts = "".join(f",{k}={v}" for k, v in self.options.items())
        w = f",weight={self.weight:g}" if self.weight != 1.0 else ""
        return f"{self.name}={self.path}{opts}{w}"


def parse_spec(text: str, check_files: bool = True) -> RewardSpec:
    """Parse ``NAME=PATH[,key=value...][,weight=W]``; checks the name and that the path exists.

    E.g. ``hpsv2.1=/models/HPS_v2.1_compressed.pt`` or
    ``aesthetic=/models/sac+logos+ava1-l14-linearMSE.pth,clip=/models/clip-vit-large-patch14,weight=0.5``."""
    regs = reward_kinds()
    if "=" not in text:
        raise RewardSpecError(
            f"reward spec {text!r}: expected NAME=PATH[,weight=W], NAME one of {', '.join(sorted(regs))}"
        )
    name, rest = text.split("=", 1)
    name = name.strip().lower()
    if name not in regs:
        raise RewardSpecError(f"reward spec {text!r}: unknown reward {name!r}; known: {', '.join(sorted(regs))}")
    parts = rest.split(",")
    path, opts, weight = parts[0].strip(), {}, 1.0
    if not path:
        raise RewardSpecError(f"reward spec {text!r}: no path given")
    for p in parts[1:]:
        if "=" not in p:
            raise RewardSpecError(f"reward spec {text!r}: option {p!r} is not key=value")
        k, v = (s.strip() for s in p.split("=", 1))
        if k == "weight":
            try:
                weight = float(v)
            except ValueError:
                raise RewardSpecError(f"reward spec {text!r}: weight {v!r} is not a number") from None
            if weight != weight or weight in (float("inf"), float("-inf")) or weight <= 0:
                raise RewardSpecError(
                    f"reward spec {text!r}: weight {v!r} must be a finite number > 0 (a reward of weight 0 "
                    f"would only cost time: leave its --reward out instead)"
                )
        else:
            opts[k] = v
    if check_files:
        paths = regs[name].path_options
        for label, p in [("path", path)] + [(k, v) for k, v in opts.items() if k in paths]:
            if not os.path.exists(p):
                raise RewardSpecError(f"reward spec {text!r}: {label} {p} does not exist")
        kind = regs[name].path_kind
        if (kind == "folder") != os.path.isdir(path):
            raise RewardSpecError(
                f"reward spec {text!r}: {name} expects a {kind}, but {path} is "
                f"{'a folder' if os.path.isdir(path) else 'a file'}"
            )
    info = regs[name]
    known = set(info.options) | set(info.path_options) | set(info.required)
    unknown = [k for k in opts if k not in known]
    if known and unknown:
        raise RewardSpecError(
            f"reward spec {text!r}: {name} takes no option {', '.join(unknown)} "
            f"(it takes {', '.join(sorted(known))}); syntax: {info.syntax}"
        )
    missing = [k for k in regs[name].required if not opts.get(k)]
    if missing:
        raise RewardSpecError(f"reward spec {text!r}: {name} needs {', '.join(k + '=...' for k in missing)}")
    return RewardSpec(name, path, weight, opts)


def _size_of(path: str) -> int | None:
    """A file's size in bytes; a folder's: the total of the files in it; None when it cannot be read."""
    try:
        if not os.path.isdir(path):
            return os.path.getsize(path)
        total = 0
        for root, _dirs, files in os.walk(path):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
        return total
    except OSError:
        return None


def reward_file(spec: RewardSpec | str) -> dict:
    """What recognises a reward's weights in another run: ``{kind, path, basename, size}``, its registry
    name, the weights' resolved path, the file (or folder) name as given and its size in bytes (a folder:
    the total of its files). Training writes one per reward into an embedding's metadata
    (``reward_files``), so that ``reneg eval`` can tell the rewards an embedding was trained on from
    held-out ones, also on another machine (same name and size)."""
    if isinstance(spec, str):
        spec = parse_spec(spec, check_files=False)
    return {
        "kind": spec.name,
        "path": os.path.realpath(spec.path),
        "basename": os.path.basename(os.path.normpath(spec.path)),
        "size": _size_of(spec.path),
    }


def reward_files(specs: list[RewardSpec | str]) -> list[dict]:
    """:func:`reward_file` of every spec, in order."""
    return [reward_file(s) for s in specs]


def display_names(specs, taken: tuple[str, ...] = ()) -> list[str]:
    """The names rewards are reported by (eval's columns, a training run's monitors): the reward's NAME,
    and for a second reward of that NAME ``NAME-<file stem>`` (``hpsv2-judge``), then ``-2``, ``-3``...
    ``taken`` names are never given (e.g. a run's held-out measures)."""
    import os
    import re

    names: list[str] = []
    for s in specs:
        base = s.name
        if base in names or base in taken:
            stem = os.path.splitext(os.path.basename(str(s.path)))[0]
            base = f"{s.name}-{re.sub(r'[^A-Za-z0-9_.+-]+', '-', stem).strip('-.')[:64] or 'reward'}"
        name, k = base, 2
        while name in names or name in taken:
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def load_reward(
    spec: RewardSpec | str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> Reward:
    if isinstance(spec, str):
        spec = parse_spec(spec)
    info = reward_kinds()[spec.name]
    try:
        model = info.loader(spec.path, device=device, dtype=dtype, **spec.options)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - third-party loaders raise their own types on bad files
        if isinstance(e, ValueError) and spec.path in str(e):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        code = next((ln for ln in lines if "GLOBAL" in ln), None)
        what = (
            f"refused: a pickle in it asks to run code ({code[:200]})"
            if code
            else f"{type(e).__name__}: {(lines[0] if lines else '')[:300]}"
        )
        raise ValueError(f"reward {spec.name}={spec.path}: cannot load it: {what}") from None
    model.eval().requires_grad_(False)
    model.name = spec.name
    return model


class WeightedReward(Reward):
    """``sum_i w_i * R_i(images, prompts)``; ``parts`` holds the last per-reward scores."""

    def __init__(self, rewards: list[Reward], weights: list[float]):
        super().__init__()
        self.rewards = torch.nn.ModuleList(rewards)
        self.weights = list(weights)
        self.name = "+".join(f"{w:g}*{r.name}" if w != 1 else r.name for r, w in zip(rewards, weights))
        self.last_parts: dict[str, torch.Tensor] = {}

    def enable_gradient_checkpointing(self) -> bool:
        return any([r.enable_gradient_checkpointing() for r in self.rewards])

    def image_features(self, images: torch.Tensor) -> torch.Tensor | None:
        for r in self.rewards:  # the first part that has an image tower
            f = r.image_features(images)
            if f is not None:
                return f
        return None

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        total = None
        self.last_parts = {}
        for r, w in zip(self.rewards, self.weights):
            s = r(images, prompts)
            self.last_parts[r.name] = s.detach()
            total = w * s if total is None else total + w * s
        return total


def load_rewards(specs: list[str | RewardSpec], device="cpu", dtype=torch.float32) -> Reward:
    parsed = [parse_spec(s) if isinstance(s, str) else s for s in specs]
    if not parsed:
        raise RewardSpecError("no reward given")
    models = [load_reward(s, device, dtype) for s in parsed]
    if len(models) == 1 and parsed[0].weight == 1.0:
        return models[0]
    return WeightedReward(models, [s.weight for s in parsed])

"""Differentiable reward models, loaded from local files only.

Every reward is a ``torch.nn.Module`` called as ``reward(images, prompts) -> [B]``
with images in [-1, 1], BCHW, differentiable w.r.t. the images. A new reward is
one small module that decorates a loader with :func:`register`::

    @register("myreward", help="what it scores; options: path=FILE")
    def load_myreward(path, device="cpu", dtype=torch.float32, **options) -> Reward: ...

Reward specs on the command line: ``NAME=PATH[,option=value...][,weight=W]``,
e.g. ``hpsv2.1=/models/HPS_v2.1_compressed.pt`` or
``aesthetic=/models/sac+logos+ava1-l14-linearMSE.pth,clip=/models/clip-vit-large-patch14,weight=0.5``.
Several specs combine into a weighted sum (:class:`WeightedReward`).
Heavy libraries (open_clip, transformers) are imported inside the loaders.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Callable

import torch

_REGISTRY: dict[str, "RewardInfo"] = {}


@dataclass
class RewardInfo:
    name: str
    loader: Callable[..., "Reward"]
    help: str = ""
    path_kind: str = "file"  # file | folder
    required: tuple[str, ...] = ()  # options the spec must give (checked before any model loads)


class Reward(torch.nn.Module):
    """Base class: subclasses implement ``forward(images, prompts) -> [B]``."""

    name: str = "reward"

    def requires_grad_(self, requires_grad: bool = True):  # rewards are always frozen
        return super().requires_grad_(False)

    def enable_gradient_checkpointing(self) -> bool:
        """Recompute the image tower's activations during backward (less memory, about
        one more forward). Returns whether this reward supports it."""
        return False


def register(name: str, help: str = "", path_kind: str = "file", required: tuple[str, ...] = ()):
    def deco(fn):
        _REGISTRY[name] = RewardInfo(name, fn, help, path_kind, tuple(required))
        return fn
    return deco


def _ensure_builtin() -> None:
    # importing the modules registers them; they import heavy libraries lazily
    from . import aesthetic, hps, pickscore  # noqa: F401


def available() -> dict[str, RewardInfo]:
    _ensure_builtin()
    return dict(_REGISTRY)


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
    """Parse ``NAME=PATH[,key=value...]``; checks the name and that the path exists."""
    regs = available()
    if "=" not in text:
        raise RewardSpecError(f"reward spec {text!r}: expected NAME=PATH[,weight=W], "
                              f"NAME one of {', '.join(sorted(regs))}")
    name, rest = text.split("=", 1)
    name = name.strip().lower()
    if name not in regs:
        raise RewardSpecError(f"reward spec {text!r}: unknown reward {name!r}; "
                              f"known: {', '.join(sorted(regs))}")
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
            if weight != weight or weight in (float("inf"), float("-inf")):
                raise RewardSpecError(f"reward spec {text!r}: weight {v!r} is not a finite number")
        else:
            opts[k] = v
    if check_files:
        for label, p in [("path", path)] + [(k, v) for k, v in opts.items() if k in ("clip", "config")]:
            if not os.path.exists(p):
                raise RewardSpecError(f"reward spec {text!r}: {label} {p} does not exist")
        kind = regs[name].path_kind
        if (kind == "folder") != os.path.isdir(path):
            raise RewardSpecError(f"reward spec {text!r}: {name} expects a {kind}, but {path} is "
                                  f"{'a folder' if os.path.isdir(path) else 'a file'}")
    missing = [k for k in regs[name].required if not opts.get(k)]
    if missing:
        raise RewardSpecError(f"reward spec {text!r}: {name} needs {', '.join(k + '=...' for k in missing)}")
    return RewardSpec(name, path, weight, opts)


def load_reward(spec: RewardSpec | str, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32) -> Reward:
    if isinstance(spec, str):
        spec = parse_spec(spec)
    info = available()[spec.name]
    try:
        model = info.loader(spec.path, device=device, dtype=dtype, **spec.options)
    except torch.cuda.OutOfMemoryError:
        raise
    except Exception as e:  # noqa: BLE001 - third-party loaders raise their own types on bad files
        if isinstance(e, ValueError) and spec.path in str(e):
            raise
        lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        code = next((ln for ln in lines if "GLOBAL" in ln), None)
        what = (f"refused: a pickle in it asks to run code ({code[:200]})" if code else
                f"{type(e).__name__}: {(lines[0] if lines else '')[:300]}")
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

"""A compute meter: what a training run or a per-sample tune really spent, in the cost model's units.

The cost model (``benchmarks/cost_model.py``) prices everything in three units, the FLOPs of one
forward pass for one latent or image: ``U``, one UNet forward of one latent; ``V``, one VAE decode of
one latent; ``R``, one forward of the reward's image tower on one image. Text encoding is not counted
(the trainer caches it; it is < 0.1 %).
"""

from __future__ import annotations

import functools
from typing import Callable

import torch

# FLOPs of one forward, counted with torch.utils.flop_counter on the meta device
# (python benchmarks/cost_model.py): SD1.5 UNet at 64 x 64 latents, SD1.5 VAE decoder to 512 x 512,
# OpenCLIP ViT-H-14 image tower at 224 x 224. U, V and R are converted to FLOPs with these, so runs on
# any model can be compared on the scale that matters to a user of SD1.5.
SD15_512 = {"U": 803_273_441_280, "V": 2_514_518_933_504, "R": 334_590_279_680}

KINDS = ("unet", "decode", "reward")
UNIT_OF = {"unet": "U", "decode": "V", "reward": "R"}


def _blank() -> dict:
    return {
        k: {"calls_nograd": 0, "calls_grad": 0, "items_nograd": 0, "items_grad": 0, "items_backward": 0, "by_batch": {}}
        for k in KINDS
    }


class ComputeMeter:
    """Counts UNet calls, decodes and reward passes, forward and backward, by batch size.

    ``meter.denoiser(fn)``, ``meter.decode(fn)`` and ``meter.reward(fn)`` return counting
    wrappers with the same signature. ``units()`` gives the totals in forward-equivalents of
    ``U``, ``V`` and ``R``; ``to_json()`` everything, for ``summary.json`` and checkpoints.

    Every call is counted, with or without grad, with how many latents it carried, and each backward
    exactly (:meth:`_count`). A backward pass with frozen weights needs only input gradients: it is
    counted as one more forward of the same size (the cost model's convention; gradient checkpointing
    would add a further forward, which is not counted). Counts are deterministic: the same recipe gives
    the same counts on any machine, in any number of processes.
    """

    def __init__(self, counts: dict | None = None):
        self.counts = _blank()
        if counts:
            self.add(counts)

    # --- counting ---------------------------------------------------------------------------
    def _count(self, kind: str, batch: int, out) -> None:
        """One call of ``batch`` items; a call whose output needs grad gets a hook that counts its
        backward when a gradient flows through it."""
        c = self.counts[kind]
        grad = isinstance(out, torch.Tensor) and out.requires_grad
        mode = "grad" if grad else "nograd"
        c[f"calls_{mode}"] += 1
        c[f"items_{mode}"] += int(batch)
        key = f"{mode}:{int(batch)}"
        c["by_batch"][key] = c["by_batch"].get(key, 0) + 1
        if grad:

            def hook(g, _c=c, _b=int(batch)):
                _c["items_backward"] += _b

            out.register_hook(hook)

    def _wrap(self, kind: str, fn: Callable, batch_of: Callable) -> Callable:
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            self._count(kind, batch_of(args), out)
            return out

        wrapped.__reneg_meter__ = self
        wrapped.supports_nag = getattr(fn, "supports_nag", False)  # the sampler asks a denoiser (reneg/nag.py)
        return wrapped

    def denoiser(self, fn: Callable) -> Callable:
        """``D(x, sigma, cond)``: one call is ``x.shape[0]`` UNet forwards of one latent."""
        return self._wrap("unet", fn, lambda a: a[0].shape[0])

    def decode(self, fn: Callable) -> Callable:
        """``decode(x0)``: ``x0.shape[0]`` VAE decodes."""
        return self._wrap("decode", fn, lambda a: a[0].shape[0])

    def reward(self, fn: Callable) -> Callable:
        """``reward(images, prompts)``: ``images.shape[0]`` reward passes (a sum of several
        rewards counts once: each has its own tower, priced at ``R``)."""
        return self._wrap("reward", fn, lambda a: a[0].shape[0])

    # --- totals -----------------------------------------------------------------------------
    def units(self) -> dict:
        """Forward-equivalents of U, V and R (a backward counts as one more forward)."""
        return {UNIT_OF[k]: c["items_nograd"] + c["items_grad"] + c["items_backward"] for k, c in self.counts.items()}

    def tflop_sd15(self) -> float:
        """The same work priced at SD1.5 512 x 512 with the HPS ViT-H-14 reward, in TFLOP."""
        u = self.units()
        return sum(u[k] * SD15_512[k] for k in u) / 1e12

    def unet_calls(self) -> int:
        c = self.counts["unet"]
        return c["calls_nograd"] + c["calls_grad"]

    def add(self, other: ComputeMeter | dict) -> ComputeMeter:
        """Adds another meter's (or its ``to_json()['counts']``) counts into this one."""
        counts = other.counts if isinstance(other, ComputeMeter) else other.get("counts", other)
        for k in KINDS:
            src, dst = counts.get(k, {}), self.counts[k]
            for f in ("calls_nograd", "calls_grad", "items_nograd", "items_grad", "items_backward"):
                dst[f] += int(src.get(f, 0))
            for b, n in src.get("by_batch", {}).items():
                dst["by_batch"][b] = dst["by_batch"].get(b, 0) + int(n)
        return self

    def take(self) -> dict:
        """The counts so far, and a fresh start (for per-step deltas across processes)."""
        out, self.counts = self.counts, _blank()
        return out

    def to_json(self) -> dict:
        return {
            "units": self.units(),
            "tflop_sd15_512": round(self.tflop_sd15(), 6),
            "unet_calls": self.unet_calls(),
            "counts": self.counts,
            "unit_flops_sd15_512": dict(SD15_512),
            "convention": "U/V/R = one forward of one latent/decode/reward image; a backward counts "
            "as one more forward",
        }

    def short(self) -> str:
        u = self.units()
        return (
            f"{u['U']} U + {u['V']} V + {u['R']} R = {self.tflop_sd15():.1f} TFLOP at SD1.5 512 px "
            f"({self.unet_calls()} UNet calls)"
        )


def metered_backend(backend, meter: ComputeMeter):
    """The backend's ``(denoiser, decode)`` wrapped by ``meter``."""
    return meter.denoiser(backend.denoiser), meter.decode(backend.decode)

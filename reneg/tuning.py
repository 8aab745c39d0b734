"""Per-sample tuning (the paper's Algorithm 1 for one prompt and seed) with a backend, shared by
``reneg tune``, ``reneg eval``'s tuned negatives, the ComfyUI tune node and the studio."""

from __future__ import annotations

import math

import torch

from .cond import Cond
from .nag import Guidance
from .generate import seeded_noise
from .options import PAPER
from .sampling import initial_latent, is_flow, sample


def tune_for_seed(
    backend,
    reward,
    prompt: str,
    seed: int,
    start: torch.Tensor,
    steps: int,
    guidance: float | Guidance,  # a CFG scale or a reneg.nag.Guidance
    grad_range: tuple[int, int],
    height: int,
    width: int,
    max_steps: int = PAPER.max_steps,
    patience: int = PAPER.patience,
    lr: float = PAPER.lr,
    noise: str = "seed",
    should_stop=None,
    on_step=None,
    cond: Cond | None = None,
    callback=None,
    autocast_dtype: torch.dtype | None = None,
    search_steps: int | None = None,
    meter=None,
):
    """Per-sample search (Algorithm 1) for one prompt, shared by ``reneg tune`` and ``reneg eval``.

    ``noise="seed"`` samples every step from ``seed``'s noise (tuning for that image);
    ``"fresh"`` uses seed ``seed + 1 + step`` at step ``step``, as in the paper. The grad step
    is drawn from a generator seeded by ``seed``. Returns ``(SearchResult, image)`` where
    ``image`` ([1, C, H, W] in [-1, 1], CPU) is the image the best negative made during the search
    (None if no step gave a finite score). ``cond`` is the prompt's conditioning where the
    backend does not encode prompts itself (ComfyUI); ``callback(i, x, x0)`` runs after every
    sampling step (progress bars, cancellation). ``autocast_dtype`` runs the forward passes
    under autocast in that dtype (the backward runs outside it, as PyTorch recommends).

    ``search_steps`` (cheaper, docs/compute.md): search with that many sampling steps (the grad
    range scaled to match), then make the kept negative's image once at the full ``steps``; its
    reward is ``res.final_reward`` and it is the returned image. ``meter`` (a
    :class:`reneg.compute.ComputeMeter`) counts every UNet call, decode and reward pass.
    """
    from .objective import ObjectiveConfig, per_sample_search, sample_score_and_loss

    if noise not in ("seed", "fresh"):
        raise ValueError(f"noise must be 'seed' or 'fresh', got {noise!r}")
    backend.latent_shape(1, height, width)  # the size first: a flow model's schedule follows it (Flux dev, Qwen-Image)
    full = backend.schedule(steps)  # a host's scheduler may give another step count
    search = search_steps is not None and 0 < search_steps < len(full) - 1
    sigmas = backend.schedule(search_steps) if search else full
    grad_range = scaled_grad_range(tuple(grad_range), len(full) - 1, len(sigmas) - 1) if search else grad_range
    obj = ObjectiveConfig(len(sigmas) - 1, guidance, tuple(grad_range))
    cond = backend.encode_prompts([prompt]) if cond is None else cond
    denoiser, decode = backend.denoiser, backend.decode
    if meter is not None:
        denoiser, decode, reward = meter.denoiser(denoiser), meter.decode(decode), meter.reward(reward)
    g = torch.Generator().manual_seed(seed)
    best = {"score": -math.inf, "image": None}

    def evaluate(neg, step):
        s = seed if noise == "seed" else (seed + 1 + step) % 2**64
        x = seeded_noise(backend, [s], height, width)
        with torch.autocast(
            backend.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
        ):
            scores, loss, image = sample_score_and_loss(
                denoiser,
                decode,
                reward,
                [prompt],
                cond,
                backend.negative_cond(neg),
                initial_latent(x, sigmas[0], is_flow(backend)),
                sigmas,
                guidance,
                obj.grad_index(g),
                want_loss=step < max_steps - 1,
                callback=callback,
            )
        score = float(scores.mean())
        if score > best["score"]:  # the same keep-best rule as per_sample_search
            best["score"], best["image"] = score, image.detach().cpu()
        return score, loss

    res = per_sample_search(
        evaluate, start.to(backend.device), max_steps, patience, lr, should_stop=should_stop, on_step=on_step
    )
    if search and math.isfinite(res.best_reward):
        # the kept negative's image at the full step count (the seed's noise; fresh mode: the seed's too)
        x = seeded_noise(backend, [seed], height, width)
        with (
            torch.no_grad(),
            torch.autocast(
                backend.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
            ),
        ):
            _, x0 = sample(
                denoiser,
                initial_latent(x.float(), full[0], is_flow(backend)),
                full,
                cond,
                backend.negative_cond(res.best),
                guidance,
                callback=callback,
            )
            image = decode(x0)
            res.final_reward = float(reward(image, [prompt]).float().mean())
        best["image"] = image.detach().cpu()
    return res, best["image"]


def scaled_grad_range(grad_range: tuple[int, int], steps: int, new_steps: int) -> tuple[int, int]:
    """A grad range counted in ``steps`` DDIM steps from the end, at the same relative place
    in a ``new_steps`` schedule (e.g. the last 11 of 30 -> the last 3 of 7)."""
    lo, hi = grad_range
    f = new_steps / steps
    hi2 = min(new_steps - 1, int(round(hi * f)))
    return min(int(math.floor(lo * f)), hi2), hi2

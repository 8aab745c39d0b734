"""One sampler for every backend: deterministic DDIM in sigma space.

A *denoiser* is any callable ``D(x, sigma, cond) -> x0`` where ``x = x0 + sigma*eps``
is the variance-exploding latent, ``sigma`` a ``[B]`` tensor and ``cond`` a
:class:`reneg.cond.Cond`. The diffusers adapter builds it from a UNet and the
scheduler's ``alphas_cumprod``; in ComfyUI ``model.apply_model`` already is one.

DDIM with eta = 0 is exactly Euler in sigma space:
``x_next = x0~ + sigma_next * (x - x0~) / sigma``, and classifier-free guidance on
x0 is the same linear combination as on eps. ``scale`` is a CFG scale or a
:class:`reneg.nag.Guidance` (CFG, Normalized Attention Guidance, or both).

Flow-matching models (``x_t = (1 - t) x0 + t eps``, a velocity ``v = eps - x0``) use the
same step with ``sigma = t``: the Euler step ``x + (t_next - t) v`` with ``v = (x - x0~) / t``
is ``x0~ + (t_next / t)(x - x0~)``, and CFG on x0 (``x0 = x - t v``) is CFG on v. Such a
backend says ``flow = True``, its ``schedule`` returns flow times ending at 0, and only the
start differs (:func:`initial_latent`).
"""

from __future__ import annotations

import inspect
from typing import Callable, Protocol

import torch

from .cond import Cond
from .nag import Guidance, as_guidance
from .threads import tick as _follow_cpu_load


class Denoiser(Protocol):
    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cond: Cond) -> torch.Tensor: ...


def sigmas_from_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    ac = alphas_cumprod.double()
    return ((1 - ac) / ac).sqrt()


def ddim_timesteps(
    num_train_timesteps: int, steps: int, steps_offset: int = 0, spacing: str = "leading"
) -> torch.Tensor:
    """The discrete timesteps diffusers' DDIMScheduler visits, high to low."""
    if steps < 1 or steps > num_train_timesteps:
        raise ValueError(f"steps must be in 1..{num_train_timesteps}, got {steps}")
    if spacing == "leading":
        ratio = num_train_timesteps // steps
        ts = (torch.arange(steps) * ratio).round().flip(0) + steps_offset
    elif spacing == "trailing":
        ratio = num_train_timesteps / steps
        ts = torch.arange(num_train_timesteps, 0, -ratio).round() - 1
    elif spacing == "linspace":
        ts = torch.linspace(0, num_train_timesteps - 1, steps).round().flip(0)
    else:
        raise ValueError(f"unknown timestep spacing {spacing!r}")
    return ts.long()


def ddim_schedule(
    alphas_cumprod: torch.Tensor,
    steps: int,
    steps_offset: int = 1,
    spacing: str = "leading",
    set_alpha_to_one: bool = False,
) -> torch.Tensor:
    """Sigmas ``[steps + 1]`` (float64) for DDIM, matching diffusers' DDIMScheduler.

    The last entry is the level diffusers stops at (``final_alpha_cumprod``), not
    zero: with ``set_alpha_to_one=False`` (Stable Diffusion) that is ``alphas_cumprod[0]``.
    """
    n = alphas_cumprod.shape[0]
    ts = ddim_timesteps(n, steps, steps_offset, spacing)
    sig = sigmas_from_alphas_cumprod(alphas_cumprod)
    final = torch.zeros((), dtype=torch.float64) if set_alpha_to_one else sig[0]
    return torch.cat([sig[ts], final.reshape(1)])


def uniform_schedule(sigma_table: torch.Tensor, steps: int, final_zero: bool = True) -> torch.Tensor:
    """Sigmas ``[steps + 1]`` picked evenly from a model's sigma table (low to high),
    as ComfyUI's ``ddim_uniform`` scheduler does; ends at 0."""
    table = sigma_table.double()
    n = table.shape[0]
    ratio = max(n // steps, 1)
    idx = (torch.arange(steps) * ratio + 1).clamp(max=n - 1).flip(0)
    tail = torch.zeros(1, dtype=torch.float64) if final_zero else table[:1]
    return torch.cat([table[idx], tail])


def initial_latent(noise: torch.Tensor, sigma_max: float | torch.Tensor, flow: bool = False) -> torch.Tensor:
    """Pure-noise start at ``sigma_max``.

    VE space: ``noise * sqrt(1 + sigma^2)`` (what diffusers' unit-variance initial latents are in VE
    units). Flow matching (``flow=True``, ``sigma`` is the flow time t): the noise itself, as the
    flow-matching pipelines start whatever their first t (1.0 unless a schedule is cut short)."""
    if flow:
        return noise
    s = torch.as_tensor(sigma_max, dtype=torch.float64)
    return noise * float((1 + s * s).sqrt())


def is_flow(backend) -> bool:
    """Whether a backend's sigmas are flow-matching times (its ``flow`` attribute; absent: VE)."""
    return bool(getattr(backend, "flow", False))


def to_vp(x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
    """VE latent at ``sigma`` -> the variance-preserving latent diffusers works with."""
    s = torch.as_tensor(sigma, dtype=torch.float64)
    return x / float((1 + s * s).sqrt())


def step_scale(denoiser: Denoiser, sigma: torch.Tensor, scale: float) -> float:
    """The guidance scale at a step: ``scale``, unless the denoiser sets its own per step through a
    ``step_guidance(sigma, scale)`` method (Wan 2.2 A14B: the low-noise expert has its own scale)."""
    own = getattr(inspect.unwrap(denoiser), "step_guidance", None)  # through the compute meter's wrapper
    return scale if own is None else own(sigma, scale)


def cfg_denoise(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigma: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    scale: float | Guidance,
    batched: bool = True,
) -> torch.Tensor:
    """x0 with classifier-free guidance; ``uncond`` is the negative.

    ``batched`` runs both branches in one denoiser call (faster, no gradient
    needed); otherwise two calls. ``scale == 1`` skips the negative entirely.
    Under NAG (``scale`` a :class:`Guidance` with ``nag``) the conditional pass carries the negative
    into its attention (:func:`nag_cond`); with CFG as well, the unconditional pass runs without it.
    """
    b = x.shape[0]
    g = as_guidance(scale)
    cond, uncond = cond.expand(b), uncond.expand(b)
    if g.nag is not None:
        cond = nag_cond(denoiser, cond, uncond, g)
        batched = False  # a NAG cond and a plain one do not share a batch
    scale = step_scale(denoiser, sigma, g.cfg)
    if scale == 1.0:
        return denoiser(x, sigma, cond)
    if batched:
        both = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), Cond.cat([uncond, cond]))
        x0_u, x0_c = both.chunk(2)
    else:
        x0_u = denoiser(x, sigma, uncond)
        x0_c = denoiser(x, sigma, cond)
    guide = own_guidance(denoiser)
    if guide is not None:
        return guide(x, sigma, x0_u, x0_c, scale)
    return x0_u + scale * (x0_c - x0_u)


def nag_cond(denoiser: Denoiser, cond: Cond, negative: Cond, guidance: Guidance) -> Cond:
    """``cond`` carrying ``negative`` for NAG, after checking the denoiser applies it."""
    if not getattr(denoiser, "supports_nag", False):
        raise ValueError(f"{type(denoiser).__name__} does not apply Normalized Attention Guidance (--guidance nag)")
    return cond.with_nag(negative, guidance.nag)


def own_guidance(denoiser):
    """A denoiser's own CFG rule, ``guide(x, sigma, x0_u, x0_c, scale) -> x0``, where its pipeline's is
    not the linear combination (Qwen-Image rescales the guided velocity); None: the linear one.
    Looked up through wrappers (the compute meter's ``functools.wraps``)."""
    return getattr(inspect.unwrap(denoiser), "guide", None)


def ddim_step(x: torch.Tensor, x0: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    if sigma_next == 0:
        return x0
    return x0 + (sigma_next / sigma) * (x - x0)


def _sig(s: float, b: int, like: torch.Tensor) -> torch.Tensor:
    return torch.full((b,), float(s), dtype=like.dtype, device=like.device)


def sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor,
    cond: Cond,
    uncond: Cond,
    scale: float | Guidance,
    start: int = 0,
    stop: int | None = None,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
    batched: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Run DDIM steps ``start .. stop-1`` from ``x`` at ``sigmas[start]``.

    Returns ``(x at sigmas[stop], last x0 prediction)``. ``callback(i, x, x0)``
    runs after each step (progress bars, cancellation).
    """
    stop = len(sigmas) - 1 if stop is None else stop
    x0 = None
    sig = [float(s) for s in sigmas]
    for i in range(start, stop):
        _follow_cpu_load()  # --threads auto: between steps, as many threads as the busy machine leaves free
        x0 = cfg_denoise(denoiser, x, _sig(sig[i], x.shape[0], x), cond, uncond, scale, batched)
        x = ddim_step(x, x0, sig[i], sig[i + 1])
        if callback is not None:
            callback(i, x, x0)
    return x, x0

"""The ReNeg objective (paper eq. 5-7) and per-sample search (Algorithm 1).

One training sample: deterministic DDIM from pure noise down to a grad step
``i`` chosen among the last ``grad_range`` steps, without gradients; then one
x0 prediction at ``i`` in which only the unconditional (negative) branch carries
gradient, a differentiable decode and a reward. ``loss = -reward``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from .cond import Cond
from .options import PAPER
from .nag import Guidance, as_guidance
from .sampling import Denoiser, cfg_denoise, ddim_step, nag_cond, own_guidance, sample, step_scale


@dataclass
class ObjectiveConfig:
    steps: int = PAPER.sampling_steps  # DDIM steps of the full trajectory
    guidance: float = PAPER.guidance  # CFG scale g
    grad_range: tuple[int, int] = PAPER.grad_range  # grad step counted in DDIM steps from the end, inclusive

    def __post_init__(self):
        lo, hi = self.grad_range
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not (0 <= lo <= hi < self.steps):
            raise ValueError(f"grad_range must satisfy 0 <= lo <= hi < steps ({self.steps}); got {self.grad_range}")

    def grad_index(self, generator: torch.Generator | None = None) -> int:
        """Index into the sigma schedule of the grad step (uniform in the range)."""
        lo, hi = self.grad_range
        k = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        return self.steps - 1 - k

    def grad_indices(self, count: int, generator: torch.Generator | None = None) -> list[int]:
        """``count`` distinct grad steps in the range, ascending (one trajectory visits them in
        order). ``count == 1`` draws exactly what :meth:`grad_index` draws."""
        if count <= 1:
            return [self.grad_index(generator)]
        lo, hi = self.grad_range
        if count > hi - lo + 1:
            raise ValueError(f"{count} grad steps per rollout do not fit in grad_range {self.grad_range}")
        ks = torch.randperm(hi - lo + 1, generator=generator)[:count] + lo
        return sorted(self.steps - 1 - int(k) for k in ks)


def rollout_schedule(sigmas: torch.Tensor, stop: int, rollout_steps: int | None) -> torch.Tensor:
    """The sigmas a no-grad rollout from ``sigmas[0]`` to ``sigmas[stop]`` visits.

    ``None`` (the paper) walks every step of the schedule; ``n`` takes ``n`` DDIM steps picked
    evenly from it, landing exactly on ``sigmas[stop]``, the grad step's noise level.
    """
    if rollout_steps is None or stop <= rollout_steps:
        return sigmas[: stop + 1]
    idx = torch.linspace(0, stop, rollout_steps + 1).round().long().unique()
    return sigmas[idx]


def grad_step_x0(
    denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, cond: Cond, uncond: Cond, scale: float | Guidance
) -> torch.Tensor:
    """``x0~ = x0(x, n) + g (x0(x, c) - x0(x, n))`` where only the ``n`` branch has grad.

    With ``g == 1`` the result does not depend on ``n`` at all (and carries no graph).
    Under NAG the conditional pass reads ``n`` in its attention, so it carries the gradient: one
    pass under NAG alone, both passes under CFG + NAG.
    """
    b = x.shape[0]
    x = x.detach()
    g = as_guidance(scale)
    if g.nag is not None:
        x0_c = denoiser(x, sigma, nag_cond(denoiser, cond.expand(b), uncond.expand(b), g))
        cfg = step_scale(denoiser, sigma, g.cfg)
        if cfg == 1.0:
            return x0_c
        x0_u = denoiser(x, sigma, uncond.expand(b))
        guide = own_guidance(denoiser)
        return guide(x, sigma, x0_u, x0_c, cfg) if guide is not None else (1.0 - cfg) * x0_u + cfg * x0_c
    scale = step_scale(denoiser, sigma, g.cfg)
    with torch.no_grad():
        x0_c = denoiser(x, sigma, cond.expand(b))
    if scale == 1.0:
        return x0_c
    x0_u = denoiser(x, sigma, uncond.expand(b))
    guide = own_guidance(denoiser)  # Qwen-Image: the pipeline's norm rescale, through which n's gradient flows too
    if guide is not None:
        return guide(x, sigma, x0_u, x0_c, scale)
    return (1.0 - scale) * x0_u + scale * x0_c


@dataclass
class StepResult:
    loss: torch.Tensor  # scalar, differentiable w.r.t. the negative
    rewards: torch.Tensor  # [B] detached rewards of the grad-step prediction
    grad_index: int
    x: torch.Tensor | None = None  # latent at the grad step (detached)
    x0: torch.Tensor | None = None  # grad-step x0 prediction (detached)


def grad_step_loss(
    denoiser: Denoiser,
    decode: Callable[[torch.Tensor], torch.Tensor],
    reward: Callable[[torch.Tensor, list[str]], torch.Tensor],
    prompts: list[str],
    cond: Cond,
    uncond: Cond,
    x_start: torch.Tensor,
    sigmas: torch.Tensor,
    scale: float | Guidance,
    grad_index: int | list[int],
    reward_weight: float = 1.0,
    rollout_steps: int | None = None,
    backward: Callable[[torch.Tensor], None] | None = None,
) -> StepResult:
    """Training's loss: no-grad rollout to ``grad_index``, then the reward of the grad step's x0 prediction
    (the image is never finished; :func:`sample_score_and_loss` also finishes and scores it).

    ``x_start`` is the VE latent at ``sigmas[0]``; ``uncond`` holds the trainable
    negative (its tensors may require grad); ``reward(images, prompts) -> [B]``.

    Cheaper variants (the defaults are the paper's): ``grad_index`` may be a list of
    ascending indices: one trajectory takes a grad step at each (the rollout continues from
    each grad step's own guided prediction, so the extra grad steps cost no extra rollout)
    and the loss is their mean. ``rollout_steps`` reaches the first grad step's sigma in that
    many no-grad DDIM steps instead of every step of the schedule. ``backward(loss_k)``, if
    given, is called on each grad step's share of the loss at once, so only one grad step's
    graph is alive at a time; the returned loss is then detached.
    """
    indices = [grad_index] if isinstance(grad_index, int) else sorted(int(i) for i in grad_index)
    b = x_start.shape[0]
    x, pos, losses, rewards, x0 = x_start, 0, [], [], None
    neg_ng = uncond.detach()
    for n, gi in enumerate(indices):
        with torch.no_grad():
            if n == 0:
                x, _ = sample(denoiser, x, rollout_schedule(sigmas, gi, rollout_steps), cond, neg_ng, scale)
            else:
                x = ddim_step(x, x0, float(sigmas[pos - 1]), float(sigmas[pos]))
                x, _ = sample(denoiser, x, sigmas, cond, neg_ng, scale, start=pos, stop=gi)
        sigma = torch.full((b,), float(sigmas[gi]), dtype=x.dtype, device=x.device)
        x0g = grad_step_x0(denoiser, x, sigma, cond, uncond, scale)
        r = reward(decode(x0g), prompts)
        loss = -(reward_weight * r).mean() / len(indices)
        if backward is not None and loss.requires_grad:
            backward(loss)
            loss = loss.detach()
        losses.append(loss)
        rewards.append(r.detach())
        x0, pos = x0g.detach(), gi + 1
    loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    return StepResult(loss, rewards[0] if len(rewards) == 1 else torch.cat(rewards), indices[-1], x.detach(), x0)


@dataclass
class SearchResult:
    best: torch.Tensor  # the best negative seen ([1, L, D], detached)
    best_reward: float
    start_reward: float
    best_step: int
    history: list[dict] = field(default_factory=list)
    stopped: str = "max_steps"  # max_steps | patience | cancelled
    final_reward: float | None = None  # the kept negative's full-step image (search with fewer steps)


def per_sample_search(
    evaluate: Callable[[torch.Tensor, int], tuple[float, torch.Tensor | None]],
    start: torch.Tensor,
    max_steps: int = PAPER.max_steps,
    patience: int = PAPER.patience,
    lr: float = PAPER.lr,
    should_stop: Callable[[], bool] | None = None,
    on_step: Callable[[dict], None] | None = None,
    optimizer: str = "adamw",
) -> SearchResult:
    """The paper's Algorithm 1 around any ``evaluate``.

    ``evaluate(neg, step) -> (score, loss)`` samples with ``neg`` (fresh noise or the
    fixed seed: the caller decides), returns the score of the image it made and a
    differentiable loss (or None on the last step, where no update follows).
    The start is scored first, so the returned ``best`` never scores worse than
    ``start`` on the scores measured.
    """
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if patience < 1:
        raise ValueError(f"patience must be >= 1, got {patience}")
    neg = start.detach().clone().float().requires_grad_(True)
    opt = torch.optim.AdamW([neg], lr=lr, weight_decay=0.0) if optimizer == "adamw" else torch.optim.SGD([neg], lr=lr)
    best, best_r, best_step, start_r = neg.detach().clone(), -math.inf, 0, math.nan
    counter, stopped, history = 0, "max_steps", []
    for step in range(max_steps):
        if should_stop is not None and should_stop():
            stopped = "cancelled"
            break
        opt.zero_grad(set_to_none=True)
        score, loss = evaluate(neg, step)
        score = float(score)
        if step == 0:
            start_r = score
        improved = score > best_r
        if improved:
            best, best_r, best_step, counter = neg.detach().clone(), score, step, 0
        else:
            counter += 1
        rec = {
            "step": step,
            "reward": score,
            "best_reward": best_r,
            "improved": improved,
            "loss": float(loss.detach()) if loss is not None else None,
        }
        history.append(rec)
        if on_step is not None:
            on_step(rec)
        if counter >= patience:
            stopped = "patience"
            break
        if loss is None or step == max_steps - 1:
            continue
        if not torch.isfinite(loss):
            continue
        loss.backward()
        if neg.grad is not None and torch.isfinite(neg.grad).all():
            opt.step()
    neg.requires_grad_(False)
    neg.grad = None
    return SearchResult(best.to(start.dtype), best_r, start_r, best_step, history, stopped)


def sample_score_and_loss(
    denoiser: Denoiser,
    decode: Callable[[torch.Tensor], torch.Tensor],
    reward: Callable[[torch.Tensor, list[str]], torch.Tensor],
    prompts: list[str],
    cond: Cond,
    uncond: Cond,
    x_start: torch.Tensor,
    sigmas: torch.Tensor,
    scale: float | Guidance,
    grad_index: int,
    want_loss: bool = True,
    callback: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-sample search's step: the grad step's loss (as :func:`grad_step_loss`) *and* the finished image's
    reward, from one trajectory.

    Samples without gradients to the grad step, takes the differentiable x0
    prediction there (the loss), then finishes the same trajectory without
    gradients and scores the final image. Returns ``(scores [B], loss or None,
    final image)``. Per-sample search uses this: the score decides keep-best, the
    loss drives the update, and the rollout is shared.
    """
    from .sampling import ddim_step

    with torch.no_grad():
        x, _ = sample(denoiser, x_start, sigmas, cond, uncond.detach(), scale, stop=grad_index, callback=callback)
    loss = None
    b = x.shape[0]
    sig = torch.full((b,), float(sigmas[grad_index]), dtype=x.dtype, device=x.device)
    if want_loss:
        x0 = grad_step_x0(denoiser, x, sig, cond, uncond, scale)
        loss = -reward(decode(x0), prompts).mean()
        x0 = x0.detach()
    else:
        with torch.no_grad():
            x0 = cfg_denoise(denoiser, x, sig, cond, uncond.detach(), scale)
    with torch.no_grad():
        x = ddim_step(x, x0, float(sigmas[grad_index]), float(sigmas[grad_index + 1]))
        if callback is not None:
            callback(grad_index, x, x0)
        x, last = sample(denoiser, x, sigmas, cond, uncond.detach(), scale, start=grad_index + 1, callback=callback)
        final = last if last is not None else x0
        image = decode(final)
        scores = reward(image, prompts).float()
    return scores, loss, image

"""The plain reference path the benchmarks compare against.

What anyone would write first from the paper and a diffusers pipeline, on the same
loaded models as our path:

* fp32 weights and activations, no autocast;
* the plain attention processor (softmax(QK^T)V materialised), no PyTorch SDPA;
* no gradient checkpointing anywhere;
* the prompt re-encoded for every sample (no cache);
* classifier-free guidance as one batched UNet call on ``cat([x, x])`` at every step,
  as diffusers pipelines do; the rollout to the grad step under ``torch.no_grad``
  (x_t is detached in the paper's objective, eq. 6-7), and at the grad step the same
  batched call with autograd on, so gradient flows through *both* CFG branches;
* decode of the grad step's x0 and the reward, then ``backward``.

The options ``split_grad_step`` and ``batched_rollout`` exist for the ablation rows
(``bench.py --ablations``): they switch single optimizations of our path off.
"""

from __future__ import annotations

import torch

from reneg.cond import Cond
from reneg.sampling import ddim_step, initial_latent


class PlainPath:
    def __init__(
        self,
        backend,
        reward,
        guidance: float,
        steps: int,
        cache_text: bool = False,
        split_grad_step: bool = False,
        batched_rollout: bool = True,
    ):
        self.b = backend
        self.reward = reward
        self.g = guidance
        self.sigmas = backend.schedule(steps)
        self.cache_text = cache_text
        self.split = split_grad_step
        self.batched = batched_rollout

    # --- pieces --------------------------------------------------------------------------
    def encode(self, prompts: list[str]) -> torch.Tensor:
        if self.cache_text:
            return self.b.encode_prompts(prompts).crossattn
        tok = self.b.tokenizer(
            prompts,
            padding="max_length",
            max_length=self.b.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        )
        with torch.no_grad():
            return self.b.text_encoder(tok.input_ids.to(self.b.device)).last_hidden_state.float()

    def _sig(self, i: int, b: int, like: torch.Tensor) -> torch.Tensor:
        return torch.full((b,), float(self.sigmas[i]), dtype=like.dtype, device=like.device)

    def cfg(self, x: torch.Tensor, i: int, cond: torch.Tensor, neg: torch.Tensor, batched: bool) -> torch.Tensor:
        D, b = self.b.denoiser, x.shape[0]
        s = self._sig(i, b, x)
        negb = neg.expand(b, -1, -1)
        if batched:
            out = D(torch.cat([x, x]), torch.cat([s, s]), Cond(torch.cat([negb, cond])))
            x0_u, x0_c = out.chunk(2)
        else:
            x0_u, x0_c = D(x, s, Cond(negb)), D(x, s, Cond(cond))
        return x0_u + self.g * (x0_c - x0_u)

    def grad_x0(self, x: torch.Tensor, i: int, cond: torch.Tensor, neg: torch.Tensor) -> torch.Tensor:
        if not self.split:
            return self.cfg(x, i, cond, neg, batched=True)  # graph through both branches
        D, b = self.b.denoiser, x.shape[0]
        s = self._sig(i, b, x)
        with torch.no_grad():
            x0_c = D(x, s, Cond(cond))
        x0_u = D(x, s, Cond(neg.expand(b, -1, -1)))
        return x0_u + self.g * (x0_c - x0_u)

    def rollout(self, x: torch.Tensor, start: int, stop: int, cond, neg) -> tuple[torch.Tensor, torch.Tensor | None]:
        x0 = None
        with torch.no_grad():
            for i in range(start, stop):
                x0 = self.cfg(x, i, cond, neg, self.batched)
                x = ddim_step(x, x0, float(self.sigmas[i]), float(self.sigmas[i + 1]))
        return x, x0

    # --- what the benchmarks time ------------------------------------------------------------
    def train_loss(self, prompts: list[str], neg: torch.Tensor, noise: torch.Tensor, grad_index: int):
        """The ReNeg loss of one micro-batch (``-mean reward`` of the grad step's image)."""
        cond = self.encode(prompts)
        x = initial_latent(noise, self.sigmas[0])
        x, _ = self.rollout(x, 0, grad_index, cond, neg.detach())
        x0 = self.grad_x0(x.detach(), grad_index, cond, neg)
        return -self.reward(self.b.decode(x0), prompts).mean()

    def grad_step_loss(self, prompts: list[str], neg: torch.Tensor, x: torch.Tensor, grad_index: int):
        """Only the grad step from a given latent ``x`` at ``sigmas[grad_index]``."""
        x0 = self.grad_x0(x.detach(), grad_index, self.encode(prompts), neg)
        return -self.reward(self.b.decode(x0), prompts).mean()

    def tune_evaluate(self, prompt: str, neg: torch.Tensor, noise: torch.Tensor, grad_index: int, want_loss: bool):
        """One step of per-sample tuning: the whole trajectory, the loss at the grad step
        and the final image's score. Returns ``(score, loss or None)``."""
        prompts = [prompt]
        cond = self.encode(prompts)
        x = initial_latent(noise, self.sigmas[0])
        x, _ = self.rollout(x, 0, grad_index, cond, neg.detach())
        loss = None
        if want_loss:
            x0 = self.grad_x0(x, grad_index, cond, neg)
            loss = -self.reward(self.b.decode(x0), prompts).mean()
            x0 = x0.detach()
        else:
            with torch.no_grad():
                x0 = self.cfg(x, grad_index, cond, neg.detach(), True)
        x = ddim_step(x, x0, float(self.sigmas[grad_index]), float(self.sigmas[grad_index + 1]))
        x, last = self.rollout(x, grad_index + 1, len(self.sigmas) - 1, cond, neg.detach())
        with torch.no_grad():
            score = self.reward(self.b.decode(last if last is not None else x0), prompts)
        return float(score.mean()), loss

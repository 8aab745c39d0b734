"""Per-Sample ReNeg Tune: the paper's Algorithm 1 for one prompt, inside ComfyUI."""

from __future__ import annotations

import types

import torch

from .common import CATEGORY, REWARD_TYPE, check_interrupt, model_family_of, one_block, progress_bar, reports_errors
from ..reneg import options as O
from ..reneg.options import GUIDANCE_MODES, PAPER, clamp_grad_range
from .save_embedding import INFO_KEY

TITLE = "Per-Sample ReNeg Tune"
NOISE_MODES = ("this seed", "fresh noise (paper)")
# the options layer's settings under the names of this node's inputs
INPUT_NAMES = {
    "sampling_steps": "steps",
    "guidance": "cfg",
    "lr": "learning_rate",
    "max_steps": "max_steps",
    "patience": "patience",
    "seed": "seed",
}
FALLBACK_SCHEDULERS = ["ddim_uniform", "normal", "karras", "exponential", "sgm_uniform", "simple", "beta"]


def schedulers() -> list[str]:
    try:
        from comfy.samplers import SCHEDULER_NAMES
    except ImportError:
        return list(FALLBACK_SCHEDULERS)
    names = list(SCHEDULER_NAMES)
    return (["ddim_uniform"] if "ddim_uniform" in names else []) + [n for n in names if n != "ddim_uniform"]


def check_inputs(
    *, steps, cfg, learning_rate, max_steps, patience, seed, grad_step_min, grad_step_max, **_
) -> types.SimpleNamespace:
    """The node's numbers through the options layer's checks (those ``reneg tune`` runs), each
    error naming the node input; the numbers as ints and floats. Width and height are checked
    once the VAE's scale is known (:func:`reneg.options.check_resolution`). ComfyUI holds a
    widget to INPUT_TYPES' min and max, but not a value that arrives through a link."""
    v = types.SimpleNamespace(
        sampling_steps=steps, guidance=cfg, lr=learning_rate, max_steps=max_steps, patience=patience, seed=seed
    )
    O.check_sampling(v, grad=False, names=INPUT_NAMES, sides=())
    O.check_search(v, names=INPUT_NAMES)
    v.grad_range = tuple(
        O.check_int(name, value, 0, O.SAMPLING_STEPS_MAX)
        for name, value in (("grad_step_min", grad_step_min), ("grad_step_max", grad_step_max))
    )
    v.sampling_steps, v.max_steps, v.patience = int(v.sampling_steps), int(v.max_steps), int(v.patience)
    v.guidance, v.lr = float(v.guidance), float(v.lr)
    return v


class ReNegPerSampleTune:
    DESCRIPTION = (
        "Tunes the negative embedding for one prompt (ReNeg, Algorithm 1): at most max_steps gradient "
        "steps on the reward, stopping after `patience` steps without a new best, keeping the best "
        "negative seen, so the result never scores below the start. 'this seed' tunes for the image "
        "a KSampler makes with sampler ddim (or euler), the same scheduler, steps, cfg and seed."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("CONDITIONING", "FLOAT", "FLOAT")
    RETURN_NAMES = ("negative", "reward_before", "reward_after")
    OUTPUT_TOOLTIPS = (
        "The tuned negative: connect to a sampler's negative input or to Save ReNeg Embedding.",
        "Reward of the image made with the starting negative.",
        "Reward of the image made with the tuned negative (never below reward_before).",
    )
    FUNCTION = "tune"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL",),
                "vae": ("VAE",),
                "positive": ("CONDITIONING", {"tooltip": "The prompt's conditioning (CLIP Text Encode)."}),
                "negative": ("CONDITIONING", {"tooltip": "The starting negative, e.g. Load ReNeg Embedding."}),
                "reward": (REWARD_TYPE,),
                "prompt": (
                    "STRING",
                    {"multiline": True, "default": "", "tooltip": "The prompt text, for the reward model."},
                ),
                "seed": ("INT", {"default": 0, "min": 0, "max": 0xFFFFFFFFFFFFFFFF, "control_after_generate": True}),
                "max_steps": ("INT", {"default": PAPER.max_steps, "min": 1, "max": 200}),
                "patience": ("INT", {"default": PAPER.patience, "min": 1, "max": 200}),
                "learning_rate": (
                    "FLOAT",
                    {"default": PAPER.lr, "min": 0.00001, "max": 1.0, "step": 0.0005, "round": 0.00001},
                ),
                "cfg": ("FLOAT", {"default": PAPER.guidance, "min": 1.0, "max": 30.0, "step": 0.1, "round": 0.01}),
                "steps": ("INT", {"default": PAPER.sampling_steps, "min": 2, "max": 200, "tooltip": "Sampling steps."}),
                "grad_step_min": (
                    "INT",
                    {
                        "default": PAPER.grad_range[0],
                        "min": 0,
                        "max": 199,
                        "tooltip": "The gradient is taken at a step drawn from [min, max], counted from the end; "
                        "a range past the sampling steps is clamped to them (and the node says so).",
                    },
                ),
                "grad_step_max": ("INT", {"default": PAPER.grad_range[1], "min": 0, "max": 199}),
                "width": ("INT", {"default": PAPER.resolution, "min": 64, "max": O.RESOLUTION_MAX, "step": 8}),
                "height": ("INT", {"default": PAPER.resolution, "min": 64, "max": O.RESOLUTION_MAX, "step": 8}),
                "noise_mode": (
                    list(NOISE_MODES),
                    {
                        "default": NOISE_MODES[0],
                        "tooltip": "this seed: tune for the image of this seed; fresh noise: a new seed every "
                        "step, as in the paper (a negative that helps this prompt in general).",
                    },
                ),
                "scheduler": (schedulers(), {"default": "ddim_uniform"}),
            },
            "optional": {
                "latent": ("LATENT", {"tooltip": "Takes the size from this latent instead of width/height."}),
                # compute-saving option (docs/compute.md); 0 = the paper's search at `steps`
                "search_steps": (
                    "INT",
                    {
                        "default": 0,
                        "min": 0,
                        "max": 200,
                        "tooltip": "Search with this many sampling steps (cheaper), then make the kept "
                        "negative's image once at `steps`. 0: search at `steps` (the paper). 10 with "
                        "max_steps 4 kept about three quarters of the paper search's gain at a third of its "
                        "UNet calls (docs/compute.md).",
                    },
                ),
                # Normalized Attention Guidance (docs/nag.md): learn the negative for the guidance it will be used with
                "guidance": (
                    list(GUIDANCE_MODES),
                    {
                        "default": "cfg",
                        "tooltip": "cfg: the negative is CFG's unconditional input (KSampler). nag: learn it for "
                        "ReNeg NAG at cfg 1 (few-step models). cfg+nag: both, at `cfg`.",
                    },
                ),
                "nag_scale": ("FLOAT", {"default": 5.0, "min": 0.0, "max": 100.0, "step": 0.1, "round": 0.01}),
                "nag_tau": ("FLOAT", {"default": 2.5, "min": 1.0, "max": 10.0, "step": 0.1, "round": 0.01}),
                "nag_alpha": ("FLOAT", {"default": 0.25, "min": 0.0, "max": 1.0, "step": 0.01, "round": 0.01}),
                # Wan 2.2 A14B: both experts, switched where WanPipeline switches them
                "model_low_noise": (
                    "MODEL",
                    {
                        "tooltip": "Wan 2.2 A14B: the low-noise expert (model is the high-noise one). The tune "
                        "samples with the high-noise expert at sigmas from 0.875 (the release's boundary) up "
                        "and the low-noise one below, as WanPipeline does.",
                    },
                ),
            },
        }

    @reports_errors(TITLE)
    def tune(
        self,
        model,
        vae,
        positive,
        negative,
        reward,
        prompt,
        seed,
        max_steps,
        patience,
        learning_rate,
        cfg,
        steps,
        grad_step_min,
        grad_step_max,
        width,
        height,
        noise_mode,
        scheduler,
        latent=None,
        search_steps=0,
        guidance="cfg",
        nag_scale=5.0,
        nag_tau=2.5,
        nag_alpha=0.25,
        model_low_noise=None,
    ):
        from ..reneg.backends.comfy_backend import ComfyBackend, clone_normal, conditioning_to_cond
        from ..reneg.compute import ComputeMeter
        from ..reneg.nag import guidance_of
        from ..reneg.tuning import tune_for_seed
        from .reward import RewardModel

        if not isinstance(reward, RewardModel):
            raise ValueError(f"reward: expected the output of Load Reward Model, found {type(reward).__name__}")
        prompt = str(prompt)
        if not prompt.strip():
            raise ValueError("prompt is empty: give the prompt text the reward should score against")
        if noise_mode not in NOISE_MODES:
            raise ValueError(f"noise_mode must be one of {', '.join(NOISE_MODES)}, got {noise_mode!r}")
        v = check_inputs(
            steps=steps,
            cfg=cfg,
            learning_rate=learning_rate,
            max_steps=max_steps,
            patience=patience,
            seed=seed,
            noise_mode=noise_mode,
            grad_step_min=grad_step_min,
            grad_step_max=grad_step_max,
        )
        steps, cfg, learning_rate, max_steps, patience = v.sampling_steps, v.guidance, v.lr, v.max_steps, v.patience
        g = types.SimpleNamespace(guidance_mode=guidance, nag_scale=nag_scale, nag_tau=nag_tau, nag_alpha=nag_alpha)
        O.check_nag(g)
        pos, neg = conditioning_to_cond(positive, "positive"), conditioning_to_cond(negative, "negative")
        if pos.crossattn.shape[-1] != neg.crossattn.shape[-1]:
            raise ValueError(
                f"the negative is {model_family_of(neg.crossattn.shape[-1])} (hidden size "
                f"{neg.crossattn.shape[-1]}) but the positive is "
                f"{_family_on(model, pos.crossattn.shape[-1])} ({pos.crossattn.shape[-1]})"
            )
        from ..reneg.backends.wan import A14B_BOUNDARY

        backend = ComfyBackend(model, vae, pos.crossattn.shape[-1], scheduler, patcher_2=model_low_noise,
                               boundary=A14B_BOUNDARY if model_low_noise is not None else None)  # fmt: skip
        if latent is not None:
            samples = latent.get("samples") if isinstance(latent, dict) else None
            dims = 5 if backend.video else 4
            if not isinstance(samples, torch.Tensor) or samples.dim() != dims:
                what = "5-d samples [B, C, frames, h, w] (a video model)" if backend.video else "4-d samples"
                raise ValueError(f"latent: expected a LATENT with {what}")
            height, width = samples.shape[-2] * backend.vae_scale, samples.shape[-1] * backend.vae_scale
            if backend.video:  # Wan: tune for a video of this many latent frames (1: one image)
                backend.latent_frames = int(samples.shape[2])
        side = "latent {}" if latent is not None else "{}"
        backend.width = O.check_resolution(side.format("width"), width, backend.vae_scale)
        backend.height = O.check_resolution(side.format("height"), height, backend.vae_scale)
        sigmas = backend.schedule(int(steps))
        n = len(sigmas) - 1
        # the paper's 0-10 needs 11 sampling steps: with fewer, use the range that fits and say so
        (grad_step_min, grad_step_max), clamp_note = clamp_grad_range(v.grad_range, n)
        if clamp_note:
            print(f"[ReNeg] {TITLE}: {clamp_note}", flush=True)
        search = O.check_int("search_steps", 0 if search_steps is None else search_steps, 0, O.SAMPLING_STEPS_MAX)
        if search > n:
            raise ValueError(f"search_steps {search} must be between 0 and steps ({n})")
        search = search if 0 < search < n else None
        per = len(backend.schedule(search)) - 1 if search else n
        total = int(max_steps) * per + (n if search else 0)
        pbar = progress_bar(total)
        meter = ComputeMeter()

        def on_sample_step(i, x, x0):
            if pbar is not None:
                pbar.update(1)
            check_interrupt()

        with backend.trainable(), reward.use() as rmodel:
            if backend.frames > 1:  # a video's frames, each scored, averaged per video
                from ..reneg.frame_reward import FrameReward

                rmodel = FrameReward(rmodel, backend.frames)
            cond = backend.positive_cond(positive)
            backend.negative_pooled = clone_normal(neg.pooled)
            start = clone_normal(neg.crossattn).float()
            if not backend.masked:  # T5 rows are never 77-row blocks
                start = one_block(start)

            def on_step(rec):
                if pbar is not None:
                    pbar.update_absolute(min((rec["step"] + 1) * per, total))

            res, _ = tune_for_seed(
                backend,
                rmodel,
                prompt,
                int(seed),
                start,
                int(steps),
                guidance_of(types.SimpleNamespace(guidance=float(cfg), **vars(g)), backend.family),
                (int(grad_step_min), int(grad_step_max)),
                backend.height,
                backend.width,
                int(max_steps),
                int(patience),
                float(learning_rate),
                noise="seed" if noise_mode == NOISE_MODES[0] else "fresh",
                on_step=on_step,
                cond=cond,
                callback=on_sample_step,
                search_steps=search,
                meter=meter,
            )
            tuned = res.best.detach().float().cpu().clone()
        if pbar is not None:
            pbar.update_absolute(total)
        extra = dict(negative[0][1]) if isinstance(negative[0][1], dict) else {}
        extra[INFO_KEY] = {
            "kind": "per-sample",
            "family": backend.family,
            "prompt": prompt,
            "seed": int(seed),
            "noise_mode": noise_mode,
            "reward": reward.name,
            "steps": len(res.history),
            "best_step": res.best_step,
            "lr": float(learning_rate),
            "guidance_scale": float(cfg),
            "guidance": guidance,
            "sampling_steps": n,
            "scheduler": scheduler,
            "grad_range": f"{grad_step_min},{grad_step_max}",
            "start_reward": res.start_reward,
            "best_reward": res.best_reward,
            "stopped": res.stopped,
            "search_steps": search or n,
            "final_reward": res.final_reward,
            # flat values: the Save node writes each as a metadata string
            "compute_unet_calls": meter.unet_calls(),
            "compute_units": " ".join(f"{k}={v}" for k, v in meter.units().items()),
            "compute_tflop_sd15": round(meter.tflop_sd15(), 3),
        }
        lines = [f"note: {clamp_note}"] if clamp_note else []
        lines += [
            f"step {r['step']}: reward {r['reward']:.5f}{'  new best' if r['improved'] else ''}" for r in res.history
        ]
        lines.append(
            f"before {res.start_reward:.5f} -> after {res.best_reward:.5f} "
            f"(best at step {res.best_step}, stopped: {res.stopped})"
        )
        if res.final_reward is not None:
            lines.append(f"searched at {search} steps; the kept negative at {n} steps: {res.final_reward:.5f}")
        lines.append(f"compute: {meter.short()}")
        return {
            "ui": {"text": ["\n".join(lines)]},
            "result": ([[tuned, extra]], float(res.start_reward), float(res.best_reward)),
        }


def _family_on(model, hidden: int) -> str:
    """The family of a conditioning of width ``hidden`` on ``model``: where a width is shared (T5-XXL's 4096:
    PixArt, Chroma), the MODEL tells which (ComfyUI's ``unet_config["image_model"]``)."""
    from ..reneg.families import family_for_model

    cfg = getattr(getattr(getattr(model, "model", None), "model_config", None), "unet_config", None)
    name = cfg.get("image_model") if isinstance(cfg, dict) else None
    fam = family_for_model(hidden, name if isinstance(name, str) else None)
    return fam.name if fam is not None else model_family_of(hidden)

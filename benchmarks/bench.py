"""Time one global training step and one per-sample tune: our path beside the plain reference.

    python benchmarks/bench.py --scale tiny            # CPU, about a minute
    bash benchmarks/run_sd15.sh                         # one GPU, SD1.5-size models, < 10 minutes

Both paths run in this one process on the same model files, loaded by the project's
own loaders, with the same prompts, noise and grad steps:

* reference (benchmarks/reference.py): fp32, plain attention, no checkpointing,
  prompts re-encoded per sample, batched CFG with gradient through both branches
  at the grad step;
* ours: the trainer's code (``reneg.objective.grad_step_loss``, ``per_sample_search`` +
  ``sample_score_and_loss``) with bf16 weights and autocast on a GPU (fp32 on the CPU),
  PyTorch SDPA, gradient checkpointing of UNet, VAE decoder and reward tower, the
  conditional branch of the grad step under no-grad, batched CFG in the rollout,
  cached text embeddings, decode only at the grad step; ``--channels-last`` and
  ``--compile`` add those.

It prints a table (seconds per sample, samples per second, peak memory, speed-up,
share of the cost-model floor, gradient agreement at fp32, ablations) and writes JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import math
import os
import platform
import sys
import time

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` and ``reneg`` importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

from benchmarks.measure import GIB, PeakMemory, count_flops, default_peak_tflops, device_name, release_memory, sync
from benchmarks.models import build
from benchmarks.reference import PlainPath
from reneg.fileio import atomic_write_json
from reneg.sampling import initial_latent

PROMPTS = [
    "a red fox sitting in fresh snow, morning light",
    "portrait of an old fisherman, oil painting",
    "a futuristic city skyline at dusk, highly detailed",
    "a bowl of ramen on a wooden table, food photography",
    "a lighthouse on a cliff during a storm",
    "a cat wearing a tiny wizard hat, digital art",
    "an astronaut riding a horse on the moon",
    "a cozy cabin in a pine forest, winter evening",
]

SCALES = {
    # tiny: reneg.tiny's models at their native 16 px; one CPU thread (tiny ops gain nothing from
    # more, and lose badly when the cores are shared); the best of 3 timed optimizer steps
    "tiny": dict(
        resolution=16,
        sampling_steps=30,
        global_batch=4,
        micro_batches="1,4",
        tune_steps=10,
        time_budget=300,
        threads=1,
        repeats=3,
    ),
    # sd15: SD1.5 + ViT-H-14 with random weights at the paper's 512 x 512
    "sd15": dict(
        resolution=512,
        sampling_steps=30,
        global_batch=8,
        micro_batches="1,8",
        tune_steps=10,
        time_budget=420,
        threads=None,
        repeats=1,
    ),
}

# an earlier rough estimate of one SD1.5 training sample, for comparison with the FLOPs counted here
ESTIMATED_TFLOP_PER_SAMPLE = 54.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="benchmarks/bench.py", description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--scale", choices=sorted(SCALES), default="tiny")
    a("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    a("--resolution", type=int, default=None, help="image size (tiny 32, sd15 512)")
    a("--sampling-steps", type=int, default=None, help="DDIM steps (default 30)")
    a("--guidance", type=float, default=7.5)
    a("--grad-range", type=int, nargs=2, default=[0, 10], metavar=("LO", "HI"))
    a("--global-batch", type=int, default=None, help="samples in the timed optimizer step (tiny 4, sd15 8)")
    a("--micro-batches", default=None, help="comma list of our path's micro-batch sizes (tiny 1,4; sd15 1,8)")
    a("--reference-micro-batch", type=int, default=1)
    a("--tune-steps", type=int, default=None, help="per-sample tune steps (default 10)")
    a(
        "--dtype",
        choices=("auto", "bf16", "fp16", "fp32"),
        default="auto",
        help="our path's precision (auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU)",
    )
    a("--channels-last", action="store_true", help="our path: channels-last convolution weights")
    a("--compile", action="store_true", help="our path: torch.compile the UNet (compile time not timed)")
    a(
        "--ablations",
        dest="ablations",
        action="store_true",
        default=None,
        help="also time our path with one optimization switched off at a time (default on)",
    )
    a("--no-ablations", dest="ablations", action="store_false")
    a(
        "--try-compile",
        dest="try_compile",
        action="store_true",
        default=None,
        help="finally time the tune and a training step with the UNet under torch.compile, if the time "
        "budget allows (default: on with a GPU at sd15 scale)",
    )
    a("--no-try-compile", dest="try_compile", action="store_false")
    a("--no-reference", action="store_true", help="skip the reference path (its rows read n/a)")
    a(
        "--peak-tflops",
        type=float,
        default=None,
        help="the card's bf16 matmul rate for the cost-model floor (default: 790 on H100/H200)",
    )
    a(
        "--time-budget",
        type=float,
        default=None,
        help="seconds after which optional parts (ablations) are skipped (tiny 300, sd15 540)",
    )
    a("--cache", default=None, help="folder for the built models (default runs/bench-cache)")
    a("--json", default=None, help="output JSON (default runs/bench/<scale>.json)")
    a("--seed", type=int, default=0)
    a("--threads", type=int, default=None, help="CPU threads for torch (tiny: 1)")
    a(
        "--repeats",
        type=int,
        default=None,
        help="timed optimizer steps per training row; the fastest counts (tiny 3, sd15 1)",
    )
    ns = p.parse_args(argv)
    for k, v in SCALES[ns.scale].items():
        if getattr(ns, k, None) is None:
            setattr(ns, k, v)
    if ns.ablations is None:
        ns.ablations = True
    if ns.try_compile is None:
        ns.try_compile = ns.scale == "sd15" and (ns.device or "cuda").startswith("cuda") and torch.cuda.is_available()
    try:
        ns.micro_batches = [int(x) for x in str(ns.micro_batches).split(",") if x.strip()]
    except ValueError:
        p.error(f"--micro-batches {ns.micro_batches!r}: expected a comma list of integers such as 1,4")
    problems = []
    if ns.resolution <= 0 or ns.resolution % 8:
        problems.append(f"--resolution must be a positive multiple of 8, got {ns.resolution}")
    if ns.sampling_steps < 2:
        problems.append(f"--sampling-steps must be >= 2, got {ns.sampling_steps}")
    lo, hi = ns.grad_range
    if not (0 <= lo <= hi < ns.sampling_steps - 1):
        problems.append(f"--grad-range {lo} {hi}: need 0 <= LO <= HI < --sampling-steps - 1 ({ns.sampling_steps - 1})")
    if ns.repeats < 1:
        problems.append(f"--repeats must be >= 1, got {ns.repeats}")
    if ns.tune_steps < 1:
        problems.append(f"--tune-steps must be >= 1, got {ns.tune_steps}")
    for mb in ns.micro_batches + [ns.reference_micro_batch]:
        if mb < 1 or ns.global_batch % mb:
            problems.append(f"micro-batch {mb} must be >= 1 and divide --global-batch {ns.global_batch}")
    if not ns.micro_batches:
        problems.append("--micro-batches: give at least one size")
    if problems:
        p.error("; ".join(problems))
    return ns


# --- helpers ---------------------------------------------------------------------------------


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "fp32" or (name == "auto" and device.type != "cuda"):
        return torch.float32
    if name == "bf16" or (name == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def dtype_name(dt: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dt]


def autocast(device: torch.device, dt: torch.dtype):
    if dt == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dt)


@contextlib.contextmanager
def strict_fp32():
    """No TF32 anywhere: for comparing gradients at fp32."""
    m, c = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = m, c


def set_reward_checkpointing(reward, on: bool) -> None:
    if on:
        reward.enable_gradient_checkpointing()
        return
    for m in reward.modules():  # open_clip towers: switch it off again
        if hasattr(m, "grad_checkpointing"):
            m.grad_checkpointing = False


class Samples:
    """The same prompts, noise and grad steps for every path: sample ``j`` of the run."""

    def __init__(self, prompts: list[str], shape: tuple[int, ...], steps: int, grad_range, seed: int):
        from reneg.objective import ObjectiveConfig

        self.prompts, self.shape, self.seed = prompts, shape, seed
        self.obj = ObjectiveConfig(steps, 7.5, tuple(grad_range))

    def micro(self, start: int, size: int, device) -> tuple[list[str], torch.Tensor, int]:
        g = torch.Generator().manual_seed(self.seed * 7919 + start)
        noise = torch.stack(
            [
                torch.randn(self.shape, generator=torch.Generator().manual_seed(self.seed + start + k))
                for k in range(size)
            ]
        ).to(device)
        prompts = [self.prompts[(start + k) % len(self.prompts)] for k in range(size)]
        return prompts, noise, self.obj.grad_index(g)


# --- the paths ---------------------------------------------------------------------------------


def load_path(info: dict, reward_master, device: torch.device, dt: torch.dtype):
    from reneg.backends.loading import load_diffusers

    backend = load_diffusers(info["model"], device=device, dtype=dt)
    if device.type == "cpu" and dt == torch.float32:
        reward = reward_master  # nothing to cast: no copy (saves memory on small machines)
    else:
        reward = copy.deepcopy(reward_master).to(device=device, dtype=dt)
    reward.eval()
    return backend, reward


def ours_micro_loss(backend, reward, ns, prompts, neg, noise, gi, device, dt):
    from reneg.objective import grad_step_loss
    from reneg.sampling import initial_latent

    sigmas = backend.schedule(ns.sampling_steps)
    with autocast(device, dt):
        res = grad_step_loss(
            backend.denoiser,
            backend.decode,
            reward,
            prompts,
            backend.encode_prompts(prompts),
            backend.negative_cond(neg),
            initial_latent(noise, sigmas[0]),
            sigmas,
            ns.guidance,
            gi,
        )
    return res.loss


def time_global_step(
    loss_fn, neg0: torch.Tensor, samples: Samples, ns, micro: int, device, repeats: int | None = None
) -> dict:
    """One optimizer step over ``ns.global_batch`` samples in micro-batches (gradient
    accumulation, AdamW), after one warm-up micro-batch; the fastest of ``repeats`` such
    steps counts. ``loss_fn(prompts, neg, noise, gi)`` returns the micro-batch's loss."""
    repeats = repeats or ns.repeats
    accum = ns.global_batch // micro
    neg = torch.nn.Parameter(neg0.detach().clone())
    p, x, gi = samples.micro(10_000, micro, device)  # warm-up: allocator, kernels, autotuning
    loss_fn(p, neg, x, gi).backward()
    times, peak, ok = [], 0, True
    for _ in range(repeats):
        neg = torch.nn.Parameter(neg0.detach().clone())
        opt = torch.optim.AdamW([neg], lr=5e-3, weight_decay=0.0)
        with PeakMemory(device) as pm:
            sync(device)
            t = time.perf_counter()
            for m in range(accum):
                p, x, gi = samples.micro(m * micro, micro, device)
                (loss_fn(p, neg, x, gi) / accum).backward()
            opt.step()
            sync(device)
            times.append(time.perf_counter() - t)
        peak = max(peak, pm.peak)
        ok = ok and neg.grad is not None and bool(torch.isfinite(neg.grad).all())
    secs, n = min(times), ns.global_batch
    return {
        "micro_batch": micro,
        "samples": n,
        "seconds": secs,
        "all_seconds": times,
        "s_per_sample": secs / n,
        "samples_per_s": n / secs,
        "peak_bytes": peak,
        "memory_kind": pm.kind,
        "finite_grad": ok,
    }


def time_tune(evaluate_fn, neg0: torch.Tensor, ns, device) -> dict:
    """``ns.tune_steps`` steps of Algorithm 1 (patience = steps, so all of them run)."""
    from reneg.objective import per_sample_search

    per_sample_search(evaluate_fn, neg0, max_steps=2, patience=2, lr=5e-3)  # warm-up
    with PeakMemory(device) as pm:
        sync(device)
        t = time.perf_counter()
        res = per_sample_search(evaluate_fn, neg0, max_steps=ns.tune_steps, patience=ns.tune_steps, lr=5e-3)
        sync(device)
        secs = time.perf_counter() - t
    return {
        "steps": len(res.history),
        "seconds": secs,
        "s_per_step": secs / max(1, len(res.history)),
        "peak_bytes": pm.peak,
        "memory_kind": pm.kind,
        "start_reward": res.start_reward,
        "best_reward": res.best_reward,
    }


def ours_tune_evaluate(backend, reward, ns, prompt: str, noise: torch.Tensor, device, dt):
    from reneg.objective import ObjectiveConfig, sample_score_and_loss
    from reneg.sampling import initial_latent

    sigmas = backend.schedule(ns.sampling_steps)
    obj = ObjectiveConfig(ns.sampling_steps, ns.guidance, tuple(ns.grad_range))
    cond = backend.encode_prompts([prompt])
    g = torch.Generator().manual_seed(ns.seed)

    def evaluate(neg, step):
        if step == 0:
            g.manual_seed(ns.seed)  # the same grad steps in every search
        with autocast(device, dt):
            scores, loss, _ = sample_score_and_loss(
                backend.denoiser,
                backend.decode,
                reward,
                [prompt],
                cond,
                backend.negative_cond(neg),
                initial_latent(noise, sigmas[0]),
                sigmas,
                ns.guidance,
                obj.grad_index(g),
                want_loss=step < ns.tune_steps - 1,
            )
        return float(scores.mean()), loss

    return evaluate


def ref_tune_evaluate(plain: PlainPath, ns, prompt: str, noise: torch.Tensor):
    from reneg.objective import ObjectiveConfig

    obj = ObjectiveConfig(ns.sampling_steps, ns.guidance, tuple(ns.grad_range))
    g = torch.Generator().manual_seed(ns.seed)

    def evaluate(neg, step):
        if step == 0:
            g.manual_seed(ns.seed)
        return plain.tune_evaluate(prompt, neg, noise, obj.grad_index(g), want_loss=step < ns.tune_steps - 1)

    return evaluate


def grad_of(loss_fn, neg0: torch.Tensor) -> torch.Tensor:
    neg = neg0.detach().clone().requires_grad_(True)
    loss_fn(neg).backward()
    return neg.grad.detach().double().cpu()


def agreement(g: torch.Tensor, ref: torch.Tensor) -> dict:
    rn, gn = float(ref.norm()), float(g.norm())
    cos = float(torch.nn.functional.cosine_similarity(g.flatten(), ref.flatten(), dim=0)) if rn and gn else math.nan
    return {
        "cosine": cos,
        "rel_error": float((g - ref).norm()) / rn if rn else math.nan,
        "max_abs_diff": float((g - ref).abs().max()),
        "ref_norm": rn,
        "norm": gn,
    }


def cost_model(backend, reward, ns, device) -> dict:
    """FLOPs of one UNet forward, one VAE decode and one reward image-tower forward at
    batch 1 (counted by PyTorch), and the per-sample totals of the cost model
    (frozen weights, so a backward is about one more forward)."""
    from reneg.cond import Cond

    h = ns.resolution
    x = torch.randn(backend.latent_shape(1, h, h), device=device)
    sigma = torch.full((1,), 1.0, device=device)
    cond = backend.encode_prompts([PROMPTS[0]])
    img = torch.zeros(1, 3, h, h, device=device)
    with torch.no_grad():
        reward(img, [PROMPTS[0]])  # fills the text-feature cache: only the image tower is counted
        U = count_flops(lambda: backend.denoiser(x, sigma, Cond(cond.crossattn)))
        V = count_flops(lambda: backend.decode(x))
        T = count_flops(lambda: backend._encode([PROMPTS[1]]))
    # with grad on the input, open_clip's attention leaves the fused inference kernel; the math
    # SDPA kernel decomposes into matmuls the counter sees
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
        R = count_flops(lambda: reward(img.clone().requires_grad_(True), [PROMPTS[0]]))
    return dict(cost_totals(U, V, R, ns.sampling_steps, tuple(ns.grad_range), ns.tune_steps), text_encode=T)


def cost_totals(U: float, V: float, R: float, steps: int, grad_range: tuple[int, int], tune_steps: int) -> dict:
    """The cost model's per-sample totals from the per-call FLOPs: every
    no-grad CFG step is 2 UNet forwards; at the grad step the conditional branch is one
    forward without grad, the negative's branch a forward and a backward (about one more
    forward: weights are frozen, only input gradients are needed), and decode and reward
    each a forward and a backward. A tune step also finishes the trajectory and scores it."""
    lo, hi = grad_range
    n = steps
    n_roll = sum(n - 1 - k for k in range(lo, hi + 1)) / (hi - lo + 1)  # CFG steps before the grad step
    train = n_roll * 2 * U + 3 * U + 2 * V + 2 * R
    tune = (tune_steps - 1) * ((n - 1) * 2 * U + 3 * U + 3 * V + 3 * R) + n * 2 * U + V + R
    return {
        "unet_forward": U,
        "vae_decode": V,
        "reward_image_forward": R,
        "rollout_steps_mean": n_roll,
        "train_sample": train,
        "tune": tune,
        "formula_train": "mean_rollout_steps*2U + 3U (cond no-grad, uncond fwd+bwd) + 2V + 2R",
        "formula_tune": "(tune_steps-1)*((n-1)*2U + 3U + 3V + 3R) + n*2U + V + R",
    }


# --- the run -----------------------------------------------------------------------------------


def run(ns) -> dict:
    t_start = time.time()
    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if ns.threads and device.type == "cpu":
        torch.set_num_threads(ns.threads)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {ns.device}: CUDA is not available here")
    dt = pick_dtype(ns.dtype, device)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    cache = ns.cache or os.path.join(root, "runs", "bench-cache")
    out_json = ns.json or os.path.join(root, "runs", "bench", f"{ns.scale}.json")
    log = lambda s: print(f"[{time.time() - t_start:6.1f}s] {s}", flush=True)  # noqa: E731

    info = build(ns.scale, cache, device, log)
    from reneg.rewards import load_rewards

    reward_master = load_rewards([info["reward"]], device="cpu", dtype=torch.float32)  # the real HPS loader
    peak_tflops = ns.peak_tflops or default_peak_tflops(device)
    result = {
        "scale": ns.scale,
        "device": device_name(device),
        "command": " ".join([sys.executable] + sys.argv),
        "settings": {k: v for k, v in vars(ns).items()},
        "our_dtype": dtype_name(dt),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "peak_tflops": peak_tflops,
        "train": [],
        "tune": [],
        "agreement": {},
        "ablations": [],
        "notes": [],
    }
    try:
        import diffusers
        import open_clip

        result["versions"].update(diffusers=diffusers.__version__, open_clip=open_clip.__version__)
    except ImportError:
        pass

    samples = None
    tune_prompt = PROMPTS[2]
    ref_grads = {}

    # ---- reference path (fp32) and our path at fp32 on the same models -------------------
    log(f"loading the fp32 models on {device}")
    backend, reward = load_path(info, reward_master, device, torch.float32)
    shape = backend.latent_shape(1, ns.resolution, ns.resolution)[1:]
    samples = Samples(PROMPTS, shape, ns.sampling_steps, ns.grad_range, ns.seed)
    tune_noise = torch.randn((1,) + tuple(shape), generator=torch.Generator().manual_seed(ns.seed + 999)).to(device)
    null, _ = backend.null_embedding()
    null = null.float().to(device)
    backend.set_performance(sdpa=False, checkpointing=False)
    set_reward_checkpointing(reward, False)
    log("counting FLOPs (cost model)")
    cm = cost_model(backend, reward, ns, device)
    result["cost_model"] = cm
    plain = PlainPath(backend, reward, ns.guidance, ns.sampling_steps)
    agree_sample = samples.micro(20_000, 1, device)
    if not ns.no_reference:
        torch.backends.cudnn.benchmark = False
        log("reference: training step")
        row = time_global_step(plain.train_loss, null, samples, ns, ns.reference_micro_batch, device)
        result["train"].append(dict(row, path="reference", dtype="fp32"))
        log(f"reference: {row['s_per_sample']:.3f} s/sample")
        log("reference: per-sample tune")
        trow = time_tune(ref_tune_evaluate(plain, ns, tune_prompt, tune_noise), null, ns, device)
        result["tune"].append(dict(trow, path="reference", dtype="fp32"))
        log(f"reference: tune {trow['seconds']:.2f} s")
    log("gradient agreement at fp32")
    p, x, gi = agree_sample
    with strict_fp32():
        ref_grads["end_to_end"] = grad_of(lambda n: plain.train_loss(p, n, x, gi), null)
        x_t, _ = plain.rollout(initial_latent(x, plain.sigmas[0]), 0, gi, plain.encode(p), null)
        ref_grads["grad_step"] = grad_of(lambda n: plain.grad_step_loss(p, n, x_t, gi), null)
        backend.set_performance(sdpa=True, checkpointing=True)
        set_reward_checkpointing(reward, True)
        ours32 = {
            "end_to_end": grad_of(
                lambda n: ours_micro_loss(backend, reward, ns, p, n, x, gi, device, torch.float32), null
            ),
            "grad_step": grad_of(
                lambda n: _ours_grad_step(backend, reward, ns, p, n, x_t, gi, device, torch.float32), null
            ),
        }
    result["agreement"]["ours_fp32_vs_reference"] = {k: agreement(ours32[k], ref_grads[k]) for k in ours32}
    log("ours at fp32 (same optimizations, no reduced precision): training step")
    torch.backends.cudnn.benchmark = device.type == "cuda"
    row = time_global_step(
        lambda p_, n_, x_, g_: ours_micro_loss(backend, reward, ns, p_, n_, x_, g_, device, torch.float32),
        null,
        samples,
        ns,
        ns.micro_batches[0],
        device,
    )
    result["train"].append(dict(row, path="ours", dtype="fp32"))
    # drop the fp32 models before loading ours (not `del`: the closures above name these variables)
    backend = reward = plain = None
    release_memory(device)

    # ---- our path -------------------------------------------------------------------------
    log(f"loading our models ({dtype_name(dt)})")
    backend, reward = load_path(info, reward_master, device, dt)
    backend.set_performance(sdpa=True, checkpointing=True, channels_last=ns.channels_last or None, compile=ns.compile)
    set_reward_checkpointing(reward, True)

    def ours_loss(p_, n_, x_, g_):
        return ours_micro_loss(backend, reward, ns, p_, n_, x_, g_, device, dt)

    if dt != torch.float32 or ns.channels_last or ns.compile:
        for mb in ns.micro_batches:
            log(f"ours ({dtype_name(dt)}): training step, micro-batch {mb}")
            row = time_global_step(ours_loss, null, samples, ns, mb, device)
            result["train"].append(dict(row, path="ours", dtype=dtype_name(dt)))
            log(f"ours: {row['s_per_sample']:.3f} s/sample")
    else:
        for mb in ns.micro_batches[1:]:
            log(f"ours (fp32): training step, micro-batch {mb}")
            row = time_global_step(ours_loss, null, samples, ns, mb, device)
            result["train"].append(dict(row, path="ours", dtype="fp32"))
    log(f"ours ({dtype_name(dt)}): per-sample tune")
    trow = time_tune(ours_tune_evaluate(backend, reward, ns, tune_prompt, tune_noise, device, dt), null, ns, device)
    result["tune"].append(dict(trow, path="ours", dtype=dtype_name(dt)))
    log(f"ours: tune {trow['seconds']:.2f} s")
    if dt != torch.float32:
        g_low = {
            "end_to_end": grad_of(lambda n: ours_loss(p, n, x, gi), null),
            "grad_step": grad_of(lambda n: _ours_grad_step(backend, reward, ns, p, n, x_t, gi, device, dt), null),
        }
        result["agreement"][f"ours_{dtype_name(dt)}_vs_reference_fp32"] = {
            k: agreement(g_low[k], ref_grads[k]) for k in g_low
        }

    # ---- torch.compile of the UNet, where the time budget leaves room (undone afterwards) -------
    if ns.try_compile and not ns.compile:
        if time.time() - t_start > ns.time_budget * 0.7:
            result["notes"].append("the torch.compile rows were skipped: not enough of the time budget left")
        else:
            try_compile(backend, reward, ns, samples, null, tune_noise, tune_prompt, device, dt, result, log)

    # ---- ablations: our path with one switch flipped ----------------------------------------
    if ns.ablations:
        if time.time() - t_start > ns.time_budget:
            result["notes"].append(f"ablations skipped: past the time budget of {ns.time_budget:.0f} s")
        else:
            result["ablations"] = ablations(backend, reward, ns, samples, null, device, dt, log)
    backend = reward = None  # not `del`: the closures above name these variables
    release_memory(device)
    result["seconds_total"] = round(time.time() - t_start, 1)
    summarize(result, ns)
    atomic_write_json(out_json, result)
    result["json"] = out_json
    return result


def _ours_grad_step(backend, reward, ns, prompts, neg, x_t, gi, device, dt):
    """Our grad step alone from the reference's latent ``x_t`` (``grad_step_loss`` with no rollout)."""
    from reneg.objective import grad_step_loss

    sigmas = backend.schedule(ns.sampling_steps)[gi:]
    with autocast(device, dt):
        return grad_step_loss(
            backend.denoiser,
            backend.decode,
            reward,
            prompts,
            backend.encode_prompts(prompts),
            backend.negative_cond(neg),
            x_t,
            sigmas,
            ns.guidance,
            0,
        ).loss


def try_compile(backend, reward, ns, samples, null, tune_noise, tune_prompt, device, dt, result, log) -> None:
    """Our path with the UNet under torch.compile: the tune and the micro-batch-1 training
    step (the same shapes, so one set of compilations). Compile time is reported, not timed
    into the rows; a failure becomes a note, never the end of the run. The UNet is eager again
    afterwards."""
    log("ours + torch.compile: compiling and warming up (compile time is not in the rows)")
    t = time.time()
    try:
        backend.set_performance(compile=True)
        trow = time_tune(ours_tune_evaluate(backend, reward, ns, tune_prompt, tune_noise, device, dt), null, ns, device)
        result["tune"].append(
            dict(
                trow,
                path="ours+compile",
                dtype=dtype_name(dt),
                warmup_seconds=round(time.time() - t - trow["seconds"], 1),
            )
        )
        log(f"ours + compile: tune {trow['seconds']:.2f} s")
        result["notes"].append(
            f"torch.compile: compiling and warming up took "
            f"{result['tune'][-1]['warmup_seconds']:.0f} s before the ours+compile rows"
        )

        def loss(p_, n_, x_, g_):
            return ours_micro_loss(backend, reward, ns, p_, n_, x_, g_, device, dt)

        row = time_global_step(loss, null, samples, ns, ns.micro_batches[0], device)
        result["train"].append(dict(row, path="ours+compile", dtype=dtype_name(dt)))
    except Exception as e:  # noqa: BLE001 - an optional experiment; the note says what broke
        result["notes"].append(
            f"torch.compile rows failed after {time.time() - t:.0f} s: {type(e).__name__}: {str(e)[:300]}"
        )
        log(result["notes"][-1])
    finally:
        # back to eager for the ablations: nn.Module.compile() keeps the compiled callable here
        if hasattr(backend.unet, "_compiled_call_impl"):
            backend.unet._compiled_call_impl = None
        torch._dynamo.reset()


def ablations(backend, reward, ns, samples, null, device, dt, log) -> list[dict]:
    mb = ns.micro_batches[0]
    rows = []

    def ours(p_, n_, x_, g_):
        return ours_micro_loss(backend, reward, ns, p_, n_, x_, g_, device, dt)

    def plain_variant(**kw):
        pp = PlainPath(backend, reward, ns.guidance, ns.sampling_steps, cache_text=True, **kw)

        def f(p_, n_, x_, g_):
            with autocast(device, dt):
                return pp.train_loss(p_, n_, x_, g_)

        return f

    def timed(name, fn, what):
        log(f"ablation: {name}")
        r = time_global_step(fn, null, samples, ns, mb, device, repeats=1)
        rows.append(dict(r, name=name, what=what))

    timed("ours", ours, "all of our path's switches as in the main rows")
    backend.set_performance(checkpointing=False)
    set_reward_checkpointing(reward, False)
    timed("- checkpointing", ours, "no gradient checkpointing of UNet, VAE decoder, reward tower")
    backend.set_performance(checkpointing=True)
    set_reward_checkpointing(reward, True)
    backend.set_performance(sdpa=False)
    timed("- SDPA", ours, "plain softmax(QK^T)V attention in UNet and VAE")
    backend.set_performance(sdpa=True)
    timed(
        "- no-grad cond branch",
        plain_variant(split_grad_step=False),
        "grad step as one batched CFG call with autograd through both branches",
    )
    timed(
        "- batched rollout",
        plain_variant(split_grad_step=True, batched_rollout=False),
        "two UNet calls per no-grad CFG step instead of one call on a doubled batch",
    )
    if not ns.channels_last and not ns.compile:
        backend.set_performance(channels_last=True)
        timed("+ channels-last", ours, "NHWC weights in UNet and VAE")
        backend.set_performance(channels_last=False)
    return rows


# --- report ------------------------------------------------------------------------------------


def _gib(b) -> str:
    return f"{b / GIB:.2f} GiB" if b is not None else "n/a"


def summarize(result: dict, ns) -> None:
    cm, peak = result["cost_model"], result["peak_tflops"]
    ref = next((r for r in result["train"] if r["path"] == "reference"), None)
    for r in result["train"]:
        r["speedup_vs_reference"] = (r["samples_per_s"] / ref["samples_per_s"]) if ref else None
        r["floor_s_per_sample"] = cm["train_sample"] / (peak * 1e12) if peak else None
        r["floor_fraction"] = (r["floor_s_per_sample"] / r["s_per_sample"]) if peak else None
        r["achieved_tflops"] = cm["train_sample"] / r["s_per_sample"] / 1e12
    tref = next((r for r in result["tune"] if r["path"] == "reference"), None)
    for r in result["tune"]:
        r["speedup_vs_reference"] = (tref["seconds"] / r["seconds"]) if tref else None
        r["floor_seconds"] = cm["tune"] / (peak * 1e12) if peak else None
        r["floor_fraction"] = (r["floor_seconds"] / r["seconds"]) if peak else None
    base = next((r for r in result["ablations"] if r["name"] == "ours"), None)
    for r in result["ablations"]:
        r["relative_time"] = r["s_per_sample"] / base["s_per_sample"] if base else None
    if ns.scale == "sd15" and ns.resolution == 512 and ns.sampling_steps == 30:
        result["targets"] = targets(result, ns)


def targets(result: dict, ns) -> list[dict]:
    """The sd15 targets, each checked on our fastest row that qualifies (named)."""
    out = []
    ours = [r for r in result["train"] if r["path"].startswith("ours") and r["dtype"] == result["our_dtype"]]
    if ours:
        best = max(ours, key=lambda r: r["samples_per_s"])
        where = f"({best['path']}, micro-batch {best['micro_batch']})"
        if best.get("speedup_vs_reference") is not None:
            out.append(
                {
                    "target": "training >= 3x the reference's samples/s",
                    "value": f"{best['speedup_vs_reference']:.2f}x {where}",
                    "met": best["speedup_vs_reference"] >= 3,
                }
            )
        if best.get("floor_fraction") is not None:
            out.append(
                {
                    "target": ">= 40 % of the cost-model floor",
                    "value": f"{100 * best['floor_fraction']:.0f} % {where}",
                    "met": best["floor_fraction"] >= 0.4,
                }
            )
    tunes = [r for r in result["tune"] if r["path"].startswith("ours")]
    if tunes and ns.tune_steps == 10:
        t = min(tunes, key=lambda r: r["seconds"])
        out.append(
            {
                "target": "per-sample tune (10 x 30 steps) < 5 s",
                "value": f"{t['seconds']:.2f} s ({t['path']})",
                "met": t["seconds"] < 5,
            }
        )
        if t["memory_kind"].startswith("cuda"):
            out.append(
                {
                    "target": "per-sample tune peak GPU memory < 8 GiB",
                    "value": f"{_gib(t['peak_bytes'])} ({t['path']})",
                    "met": t["peak_bytes"] < 8 * GIB,
                }
            )
    b1 = next((r for r in ours if r["path"] == "ours" and r["micro_batch"] == 1), None)
    if b1 and b1["memory_kind"].startswith("cuda"):
        out.append(
            {
                "target": "training peak memory at batch 1 < 10 GiB (checkpointing on)",
                "value": _gib(b1["peak_bytes"]),
                "met": b1["peak_bytes"] < 10 * GIB,
            }
        )
    return out


def format_table(result: dict) -> str:
    s = result["settings"]
    cm, peak = result["cost_model"], result["peak_tflops"]
    L = []
    L.append(
        f"ReNeg benchmark, scale {result['scale']} on {result['device']}: {s['resolution']}x{s['resolution']}, "
        f"{s['sampling_steps']} DDIM steps, CFG {s['guidance']}, grad step {s['grad_range'][0]}-"
        f"{s['grad_range'][1]} from the end; our precision {result['our_dtype']}"
    )
    L.append("")
    L.append(f"Training: one optimizer step of {s['global_batch']} samples (gradient accumulation over micro-batches)")
    L.append(
        f"  {'path':<20}{'micro':>6}{'s/sample':>10}{'samples/s':>11}{'peak mem':>12}{'vs ref':>8}"
        f"{'% floor':>9}{'TFLOP/s':>9}"
    )
    for r in result["train"]:
        name = f"{r['path']} {r['dtype']}"
        L.append(
            f"  {name:<20}{r['micro_batch']:>6}{r['s_per_sample']:>10.4f}{r['samples_per_s']:>11.2f}"
            f"{_gib(r['peak_bytes']):>12}{_x(r.get('speedup_vs_reference')):>8}"
            f"{_pct(r.get('floor_fraction')):>9}{r['achieved_tflops']:>9.3f}"
        )
    L.append("")
    L.append(
        f"Per-sample tune: {s['tune_steps']} steps of {s['sampling_steps']} sampling steps (Algorithm 1, one image)"
    )
    L.append(f"  {'path':<20}{'seconds':>10}{'s/step':>10}{'peak mem':>12}{'vs ref':>8}{'% floor':>9}")
    for r in result["tune"]:
        name = f"{r['path']} {r['dtype']}"
        L.append(
            f"  {name:<20}{r['seconds']:>10.3f}{r['s_per_step']:>10.4f}{_gib(r['peak_bytes']):>12}"
            f"{_x(r.get('speedup_vs_reference')):>8}{_pct(r.get('floor_fraction')):>9}"
        )
    L.append(f"  peak memory is {result['train'][0]['memory_kind'] if result['train'] else ''}")
    L.append("")
    L.append("Gradient of the negative embedding, our path vs the reference, same sample")
    for k, v in result["agreement"].items():
        for part, a in v.items():
            L.append(
                f"  {k:<32} {part:<11} cosine {a['cosine']:.8f}  rel. error {a['rel_error']:.2e}  "
                f"(|g_ref| {a['ref_norm']:.3e})"
            )
    L.append("")
    U, V, R = cm["unet_forward"] / 1e12, cm["vae_decode"] / 1e12, cm["reward_image_forward"] / 1e12
    L.append(
        f"Cost model (FLOPs counted by torch.utils.flop_counter at batch 1): UNet forward "
        f"U = {U:.4g} TFLOP, VAE decode V = {V:.4g}, reward image tower R = {R:.4g}"
    )
    L.append(
        f"  training sample = {cm['rollout_steps_mean']:.1f} x 2U + 3U + 2V + 2R = "
        f"{cm['train_sample'] / 1e12:.4g} TFLOP (rough estimate: about {ESTIMATED_TFLOP_PER_SAMPLE:g} TFLOP "
        f"at SD1.5 512 x 512); tune = {cm['tune'] / 1e12:.4g} TFLOP"
    )
    if peak:
        L.append(
            f"  floor at {peak:g} TFLOP/s: {cm['train_sample'] / (peak * 1e12):.4f} s per training sample, "
            f"{cm['tune'] / (peak * 1e12):.3f} s per tune"
        )
    else:
        L.append(
            "  floor: no peak rate known for this device (pass --peak-tflops; the cost model uses 790 for an "
            "H100 at bf16)"
        )
    if result["ablations"]:
        L.append("")
        L.append(
            "Ablations: our path with one switch flipped (training, micro-batch "
            f"{result['ablations'][0]['micro_batch']})"
        )
        for r in result["ablations"]:
            L.append(
                f"  {r['name']:<24}{r['s_per_sample']:>10.4f} s/sample{_gib(r['peak_bytes']):>12}"
                f"{r['relative_time']:>8.2f}x time   {r['what']}"
            )
    if result.get("targets"):
        L.append("")
        L.append("Targets")
        for t in result["targets"]:
            L.append(f"  {'MET ' if t['met'] else 'MISS'} {t['target']}: {t['value']}")
    for n in result["notes"]:
        L.append(f"note: {n}")
    L.append(f"total {result['seconds_total']} s")
    return "\n".join(L)


def _x(v) -> str:
    return f"{v:.2f}x" if v is not None else "-"


def _pct(v) -> str:
    return f"{100 * v:.1f}%" if v is not None else "-"


def main(argv=None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ns = parse_args(argv)
    result = run(ns)
    print()
    print(format_table(result))
    print(f"wrote {result['json']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

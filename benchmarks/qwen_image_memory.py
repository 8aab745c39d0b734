"""Memory of Qwen-Image's grad step, measured on reduced-depth random transformers at the real width.

ReNeg's grad step runs the transformer on the negative's rows with grad (its weights frozen) and
back-propagates to the rows. This script builds ``QwenImageTransformer2DModel`` with Qwen-Image's real
configuration (3072 wide: 24 heads of 128, text rows 3584 wide, 64 packed latent channels, RoPE axes
16/56/56) but only ``--depths`` blocks instead of 60, random weights in bf16, and runs one grad step
through :class:`reneg.backends.qwen_image.QwenImageDenoiser` (the backend's own call) on the CPU, with and
without gradient checkpointing. Each measurement runs in a fresh process whose allocator gives every large
tensor back when it is freed (``MALLOC_MMAP_THRESHOLD_``): the peak resident memory (``ru_maxrss``) above the
memory after the model is built is what the step needs beyond the weights; the bytes autograd keeps for
the backward (counted with saved-tensor hooks, each storage once, the weights left out) are the part of
it that grows with depth.
Two depths give the cost of one more block, which extrapolates to the 60 blocks of the release::

    python benchmarks/qwen_image_memory.py --resolution 512 --rows 128 --depths 1 2

It prints one JSON line per measurement and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys

REAL = dict(  # Qwen/Qwen-Image transformer/config.json, but num_layers
    patch_size=2,
    in_channels=64,
    out_channels=16,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=3584,
    axes_dims_rope=(16, 56, 56),
)
BLOCKS = 60


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def measure(depth: int, checkpointing: bool, resolution: int, rows: int) -> dict:
    import time

    import torch
    from diffusers import QwenImageTransformer2DModel

    from reneg.backends.qwen_image import QwenImageDenoiser
    from reneg.cond import Cond

    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)  # built in bf16: no float32 copy is ever resident
    model = QwenImageTransformer2DModel(num_layers=depth, **REAL).eval().requires_grad_(False)
    torch.set_default_dtype(torch.float32)
    if checkpointing:
        model.enable_gradient_checkpointing()
    params = sum(p.numel() for p in model.parameters())
    den = QwenImageDenoiser(model)
    lat = resolution // 8
    x = torch.randn(1, 16, lat, lat)
    neg = (torch.randn(1, rows, 3584) * 0.1).requires_grad_(True)
    mask = torch.ones(1, rows, dtype=torch.long)
    mask[:, rows // 2 :] = 0  # a masked negative, as a file's rows are used
    saved = [0]  # the activations autograd keeps for the backward (not the weights it also keeps a reference to)
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def keep(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:
            seen.add(ptr)
            saved[0] += t.untyped_storage().nbytes()
        return t

    base = _rss_kib()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        v = den.velocity(x, torch.tensor([0.7]), Cond(neg, mask=mask))
    v.float().square().mean().backward()
    seconds = time.perf_counter() - t0
    assert neg.grad is not None and torch.isfinite(neg.grad).all()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return dict(
        depth=depth,
        checkpointing=checkpointing,
        resolution=resolution,
        image_tokens=(lat // 2) ** 2,
        text_rows=rows,
        parameters=params,
        weights_gib=round(params * 2 / 2**30, 3),
        saved_gib=round(saved[0] / 2**30, 3),
        step_gib=round((peak - base) / 2**20, 3),
        seconds=round(seconds, 1),
    )


def _extrapolate(a: dict, b: dict, key: str, lo: int, hi: int) -> tuple[float, float]:
    """One block's cost (the two depths' difference) and the figure at 60 blocks."""
    per_block = (b[key] - a[key]) / (hi - lo)
    return per_block, a[key] + per_block * (BLOCKS - lo)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--rows", type=int, default=128, help="the negative's text rows (the family's 128)")
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--one", nargs=2, metavar=("DEPTH", "CKPT"), help=argparse.SUPPRESS)
    ns = ap.parse_args(argv)
    if ns.one:
        print(json.dumps(measure(int(ns.one[0]), ns.one[1] == "1", ns.resolution, ns.rows)))
        return 0
    runs = []
    for ckpt in (False, True):
        for depth in ns.depths:
            cmd = [sys.executable, os.path.abspath(__file__), "--one", str(depth), "1" if ckpt else "0"]
            cmd += ["--resolution", str(ns.resolution), "--rows", str(ns.rows)]
            # a fixed mmap threshold: every large tensor is its own mapping, given back when freed, so the
            # resident peak follows the live tensors instead of what the allocator keeps for reuse
            env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
            run = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
            out = run.stdout.strip().splitlines()[-1]
            print(out, flush=True)
            runs.append(json.loads(out))
    if len(ns.depths) >= 2:
        lo, hi = min(ns.depths), max(ns.depths)
        for ckpt in (False, True):
            a = next(r for r in runs if r["depth"] == lo and r["checkpointing"] == ckpt)
            b = next(r for r in runs if r["depth"] == hi and r["checkpointing"] == ckpt)
            (_, weights), (step_block, step), (saved_block, saved) = (
                _extrapolate(a, b, key, lo, hi) for key in ("weights_gib", "step_gib", "saved_gib")
            )
            print(
                f"checkpointing {'on ' if ckpt else 'off'}: a block adds {step_block:.3f} GiB to the step's peak "
                f"({saved_block:.3f} GiB kept for the backward); 60 blocks: weights {weights:.1f} GiB (bf16), "
                f"grad step {step:.1f} GiB above them ({saved:.1f} GiB kept for the backward)"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The cost model of a ReNeg training sample and a per-sample tune on Wan 2.1 / 2.2, counted on any machine.

    python benchmarks/cost_model_wan.py                          # Wan 2.1 1.3B, 832 x 480, one frame
    python benchmarks/cost_model_wan.py --frames 33              # short clips, each frame scored
    python benchmarks/cost_model_wan.py --model 14b --peak-tflops 990

Builds Wan's transformer (``WanTransformer3DModel`` with the released 1.3B or 14B sizes; each Wan 2.2
A14B expert has the 14B sizes and one runs per step), its VAE (``AutoencoderKLWan`` with the released
sizes) and OpenCLIP ViT-H-14 on PyTorch's ``meta`` device (shapes only: no memory, no arithmetic),
counts one forward of each with ``torch.utils.flop_counter`` and prints the per-sample totals of
:func:`benchmarks.bench.cost_totals` (the formula of ``benchmarks/cost_model.py``) with the reward
applied to every frame, and the floor at a given matmul rate (790 TFLOP/s: an H100 at bf16).
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

# the released transformers' sizes (their config.json files: Wan-AI/Wan2.1-T2V-1.3B-Diffusers and
# Wan2.1-T2V-14B-Diffusers; Wan2.2-T2V-A14B's two experts have the 14B sizes)
WAN_TRANSFORMER = {
    "1.3b": dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "14b": dict(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}
WAN_COMMON = dict(
    patch_size=(1, 2, 2),
    in_channels=16,
    out_channels=16,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
)


def count_wan(model: str, width: int, height: int, frames: int) -> dict:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    def flops(fn):
        with FlopCounterMode(display=False) as fc, sdpa_kernel(SDPBackend.MATH):
            fn()
        return int(fc.get_total_flops())

    meta = torch.device("meta")
    with meta:
        tr = WanTransformer3DModel(**WAN_COMMON, **WAN_TRANSFORMER[model])
        vae = AutoencoderKLWan()  # the defaults are the released Wan 2.1 VAE's sizes (z_dim 16, base_dim 96)
    lat_f = (frames - 1) // 4 + 1
    x = torch.empty(1, 16, lat_f, height // 8, width // 8, device=meta)
    text = torch.empty(1, 512, 4096, device=meta)
    with torch.no_grad():
        U = flops(lambda: tr(hidden_states=x, timestep=torch.tensor([500.0], device=meta), encoder_hidden_states=text))
        V = flops(lambda: vae.decode(x))
    import logging

    import open_clip

    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded" is the point here
    with meta:
        clip = open_clip.create_model("ViT-H-14", pretrained=None, device=meta)
    img = torch.empty(1, 3, 224, 224, device=meta, requires_grad=True)
    R = flops(lambda: clip.encode_image(img))
    return {"unet_forward": U, "vae_decode": V, "reward_image_forward": R, "latent_frames": lat_f}


def main(argv=None) -> int:
    from benchmarks.bench import cost_totals
    from reneg.compute import SD15_512

    p = argparse.ArgumentParser(prog="benchmarks/cost_model_wan.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=sorted(WAN_TRANSFORMER), default="1.3b")
    p.add_argument("--width", type=int, default=832)
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--frames", type=int, default=1, help="frames per video (4 k + 1; 1: image mode)")
    p.add_argument("--sampling-steps", type=int, default=30)
    p.add_argument("--grad-range", type=int, nargs=2, default=[0, 10])
    p.add_argument("--tune-steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    ns = p.parse_args(argv)
    if ns.frames < 1 or (ns.frames - 1) % 4:
        p.error(f"--frames must be 4 k + 1 (1, 5, 9, ...), got {ns.frames}")
    if ns.width % 16 or ns.height % 16:
        p.error(f"--width and --height must be multiples of 16, got {ns.width} x {ns.height}")
    c = count_wan(ns.model, ns.width, ns.height, ns.frames)
    R_all = c["reward_image_forward"] * ns.frames  # an image reward scores every frame
    t = cost_totals(c["unet_forward"], c["vae_decode"], R_all, ns.sampling_steps, tuple(ns.grad_range), ns.tune_steps)
    U, V, R = (t[k] / 1e12 for k in ("unet_forward", "vae_decode", "reward_image_forward"))
    sd15 = cost_totals(SD15_512["U"], SD15_512["V"], SD15_512["R"], 30, (0, 10), ns.tune_steps)
    print(
        f"Wan {ns.model.upper()} transformer at {ns.width} x {ns.height}, {ns.frames} frame(s) "
        f"({c['latent_frames']} latent), Wan VAE, reward ViT-H-14 on each frame at 224 x 224 "
        f"(FLOPs counted on the meta device)"
    )
    print(
        f"  transformer forward U = {U:.2f} TFLOP, VAE decode V = {V:.2f} TFLOP, reward on all frames R = {R:.3f} TFLOP"
    )
    print(
        f"  training sample ({ns.sampling_steps} steps): {t['rollout_steps_mean']:.1f} x 2U + 3U + 2V + 2R = "
        f"{t['train_sample'] / 1e12:.1f} TFLOP ({t['train_sample'] / sd15['train_sample']:.1f} x SD1.5 at 512 x 512)"
    )
    print(f"  per-sample tune ({ns.tune_steps} x {ns.sampling_steps} steps): {t['tune'] / 1e12:.0f} TFLOP")
    f = ns.peak_tflops * 1e12
    print(
        f"  floor at {ns.peak_tflops:g} TFLOP/s: {t['train_sample'] / f:.2f} s per training sample, "
        f"{t['tune'] / f:.1f} s per tune; 40 % of the floor: {t['train_sample'] / f / 0.4:.2f} s and "
        f"{t['tune'] / f / 0.4:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

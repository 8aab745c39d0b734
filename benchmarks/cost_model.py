"""The cost model of a ReNeg training sample, counted instead of estimated, on any machine.

    python benchmarks/cost_model.py                      # SD1.5 + ViT-H-14, 512 x 512
    python benchmarks/cost_model.py --resolution 768 --peak-tflops 990

Builds SD1.5's UNet and VAE and OpenCLIP ViT-H-14 on PyTorch's ``meta`` device
(shapes only: no memory, no arithmetic, a few seconds), counts one forward of each
with ``torch.utils.flop_counter`` and prints the per-sample totals and the floor at
a given matmul rate (790 TFLOP/s: an H100 at bf16).

The counted U, V and R at 512 x 512 are also the units of the trainer's compute meter
(``reneg.compute.SD15_512``); ``--check-meter`` verifies that the two agree.

    python benchmarks/cost_model.py --memory             # weights a run holds, with and without
                                                         # --offload-text-encoder (arithmetic)

``--memory`` prints, for the large flow families, the bf16 weights a training run keeps on the card
with the text encoder resident and with ``--offload-text-encoder``, and the prompt cache's size per
prompt: arithmetic from the released parameter counts, not a measurement.
"""

from __future__ import annotations

import argparse
import os
import sys

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


def count_sd15(resolution: int = 512) -> dict:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.models import SD15_UNET, SD15_VAE

    def flops(fn):
        with FlopCounterMode(display=False) as fc:
            fn()
        return int(fc.get_total_flops())

    meta = torch.device("meta")
    with meta:
        unet, vae = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
    for m in (unet, vae):  # plain attention: its matmuls are what the counter sees
        m.set_attn_processor(AttnProcessor())
    lat = resolution // 8
    x = torch.empty(1, 4, lat, lat, device=meta)
    with torch.no_grad():
        U = flops(
            lambda: unet(
                x, torch.tensor([500.0], device=meta), encoder_hidden_states=torch.empty(1, 77, 768, device=meta)
            )
        )
        V = flops(lambda: vae.decode(x))
    import logging

    import open_clip

    logging.getLogger().setLevel(logging.ERROR)  # "no pretrained weights loaded" is the point here
    with meta:
        clip = open_clip.create_model("ViT-H-14", pretrained=None, device=meta)
    img = torch.empty(1, 3, 224, 224, device=meta, requires_grad=True)  # the reward sees 224 x 224
    with sdpa_kernel(SDPBackend.MATH):
        R = flops(lambda: clip.encode_image(img))
    return {"unet_forward": U, "vae_decode": V, "reward_image_forward": R}


# released parameter counts (billions) of what a training run loads besides the reward, by family; the text
# encoders are what --offload-text-encoder moves to the CPU. Chroma: the transformer (19 double-, 38
# single-stream blocks, 3072 wide), T5 v1.1 XXL's encoder, Flux's ae. Qwen-Image: the MMDiT, Qwen2.5-VL-7B
# (7.6 B language model with its head + 0.67 B vision tower), its video-style VAE. Flux.1 dev: the
# transformer, T5-XXL, CLIP-L's text model, the ae.
MEMORY_PARTS = {
    "chroma": {"transformer": 8.9, "vae": 0.084, "text": {"T5-XXL": 4.76}, "rows": (512, 4096)},
    "qwen-image": {"transformer": 20.4, "vae": 0.127, "text": {"Qwen2.5-VL-7B": 8.29}, "rows": (512, 3584)},
    "flux": {"transformer": 11.9, "vae": 0.084, "text": {"T5-XXL": 4.76, "CLIP-L": 0.123}, "rows": (512, 4096)},
}


def memory_table(bytes_per_parameter: int = 2) -> list[dict]:
    """Per family: the weights (GB, 1e9 bytes) a run holds on the card with the text encoder(s) resident and
    with ``--offload-text-encoder``, and one cached prompt's rows in float32 (MB; Qwen-Image: at most, as its
    cache keeps only a prompt's real tokens)."""
    rows = []
    for family, p in MEMORY_PARTS.items():
        text = sum(p["text"].values())
        kept = p["transformer"] + p["vae"]
        rows.append(
            {
                "family": family,
                "transformer_gb": p["transformer"] * bytes_per_parameter,
                "vae_gb": p["vae"] * bytes_per_parameter,
                "text_gb": text * bytes_per_parameter,
                "text": ", ".join(f"{k} {v:g} B" for k, v in p["text"].items()),
                "without_gb": (kept + text) * bytes_per_parameter,
                "with_gb": kept * bytes_per_parameter,
                "cache_mb_per_prompt": p["rows"][0] * p["rows"][1] * 4 / 1e6,
            }
        )
    return rows


def print_memory() -> None:
    print("bf16 weights on the card during training (GB = 1e9 bytes; the reward and activations come on top)")
    print(
        f"  {'family':<11} {'transformer':>11} {'VAE':>5} {'text encoders':>37} {'without':>8} {'with':>6}  cache/prompt"
    )
    for r in memory_table():
        text = f"{r['text']} = {r['text_gb']:.2f}"
        print(
            f"  {r['family']:<11} {r['transformer_gb']:>11.2f} {r['vae_gb']:>5.2f} {text:>37} "
            f"{r['without_gb']:>8.2f} {r['with_gb']:>6.2f}  {'up to ' if r['family'] == 'qwen-image' else ''}{r['cache_mb_per_prompt']:.1f} MB (fp32)"
        )
    print("  without: text encoder(s) resident; with: --offload-text-encoder (they go to the CPU once encoded)")


def main(argv=None) -> int:
    from benchmarks.bench import ESTIMATED_TFLOP_PER_SAMPLE, cost_totals

    p = argparse.ArgumentParser(prog="benchmarks/cost_model.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--sampling-steps", type=int, default=30)
    p.add_argument("--grad-range", type=int, nargs=2, default=[0, 10])
    p.add_argument("--tune-steps", type=int, default=10)
    p.add_argument("--peak-tflops", type=float, default=790.0)
    p.add_argument(
        "--check-meter",
        action="store_true",
        help="check that reneg.compute.SD15_512 holds the counts at 512 x 512, then exit",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="print the weights a run holds with and without --offload-text-encoder (arithmetic), then exit",
    )
    ns = p.parse_args(argv)
    if ns.memory:
        print_memory()
        return 0
    if ns.check_meter:
        from reneg.compute import SD15_512

        c = count_sd15(512)
        got = {"U": c["unet_forward"], "V": c["vae_decode"], "R": c["reward_image_forward"]}
        print(f"counted {got}; reneg.compute.SD15_512 {SD15_512}")
        return 0 if got == SD15_512 else 1
    if ns.resolution <= 0 or ns.resolution % 64:
        p.error(f"--resolution must be a positive multiple of 64, got {ns.resolution}")
    c = count_sd15(ns.resolution)
    t = cost_totals(
        c["unet_forward"],
        c["vae_decode"],
        c["reward_image_forward"],
        ns.sampling_steps,
        tuple(ns.grad_range),
        ns.tune_steps,
    )
    U, V, R = (t[k] / 1e12 for k in ("unet_forward", "vae_decode", "reward_image_forward"))
    print(
        f"SD1.5 at {ns.resolution} x {ns.resolution}, reward ViT-H-14 at 224 x 224 (FLOPs counted on the meta device)"
    )
    print(f"  UNet forward U = {U:.3f} TFLOP, VAE decode V = {V:.3f} TFLOP, reward image tower R = {R:.3f} TFLOP")
    print(
        f"  training sample: {t['rollout_steps_mean']:.1f} x 2U + 3U + 2V + 2R = {t['train_sample'] / 1e12:.2f} TFLOP "
        f"(an earlier rough estimate: about {ESTIMATED_TFLOP_PER_SAMPLE:g})"
    )
    print(f"  per-sample tune ({ns.tune_steps} x {ns.sampling_steps} steps): {t['tune'] / 1e12:.1f} TFLOP")
    f = ns.peak_tflops * 1e12
    print(
        f"  floor at {ns.peak_tflops:g} TFLOP/s: {t['train_sample'] / f:.4f} s per training sample "
        f"({f / t['train_sample']:.1f} samples/s), {t['tune'] / f:.3f} s per tune; "
        f"40 % of the floor = {t['train_sample'] / f / 0.4:.3f} s per sample"
    )
    print(f"  a paper run (4,000 x 64 samples) at the floor: {4000 * 64 * t['train_sample'] / f / 3600:.1f} GPU-hours")
    return 0


if __name__ == "__main__":
    sys.exit(main())

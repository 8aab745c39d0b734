"""The cost of one Flux.1 dev transformer pass with and without NAG, counted, not timed.

The transformer is built with Flux.1 dev's real configuration (19 double-stream and 38 single-stream blocks,
3072 wide: 24 heads of 128, T5 rows 4096 wide, CLIP-L's 768 pooled, 64 packed latent channels, guidance
embedding) on PyTorch's ``meta`` device, so nothing is allocated or run, and one call of ReNeg's own
:class:`reneg.backends.flux.FluxDenoiser` is counted with ``torch.utils.flop_counter`` for each image size:
plain, and under NAG (the authors' Flux formulation: the negative's text stream beside the positive's, the
image stream repeated beside each text in the single-stream blocks). True CFG costs two plain passes::

    python benchmarks/flux_nag_flops.py --sizes 512 1024

It prints one line per image size and a JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json

import torch

DEV = dict(  # black-forest-labs/FLUX.1-dev transformer/config.json
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def count(sizes, rows: int = 512) -> list[dict]:
    from diffusers import FluxTransformer2DModel
    from torch.utils.flop_counter import FlopCounterMode

    from reneg.backends.flux import FluxDenoiser
    from reneg.cond import Cond
    from reneg.nag import NAG

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**DEV)
    d = FluxDenoiser(transformer)
    out = []
    for px in sizes:
        n = px // 8
        x = torch.zeros(1, 16, n, n, device="meta")
        sigma = torch.full((1,), 0.5, device="meta")
        pos = Cond(torch.zeros(1, rows, 4096, device="meta"), torch.zeros(1, 768, device="meta"))
        neg = Cond(torch.zeros(1, rows, 4096, device="meta"), torch.zeros(1, 768, device="meta"))
        flops = []
        for cond in (pos, pos.with_nag(neg, NAG(5.0))):
            with torch.no_grad(), FlopCounterMode(display=False) as fc:
                d(x, sigma, cond)
            flops.append(fc.get_total_flops() / 1e12)
        out.append(
            {"px": px, "rows": rows, "plain_tflop": flops[0], "nag_tflop": flops[1], "true_cfg_tflop": 2 * flops[0]}
        )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--rows", type=int, default=512, help="T5 rows (dev 512, schnell 256)")
    a = p.parse_args(argv)
    res = count(a.sizes, a.rows)
    for r in res:
        print(
            f"{r['px']} px, {r['rows']} rows: plain {r['plain_tflop']:.2f} TFLOP, NAG {r['nag_tflop']:.2f} "
            f"({r['nag_tflop'] / r['plain_tflop']:.3f} x plain), true CFG {r['true_cfg_tflop']:.2f}"
        )
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

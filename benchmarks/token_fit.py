"""How close N negative tokens come to a trained output-space embedding on the demo world, by encoding.

    python benchmarks/token_fit.py                          # seed 0; N = 1 4 8 16 75
    python benchmarks/token_fit.py --seeds 0 1 --tokens 4 16 --fit-steps 600

For every training seed it runs what a user runs, ``reneg train --demo --seed S --out OUT/train/emb-sS``
(a finished run is reused), then fits N token vectors to that embedding through the demo pipeline's text
encoder (``reneg convert --to tokens N``'s code, :func:`reneg.tokens.convert_to_tokens`) and reports the
fit: the relative error and cosine of the tokens' encoding against the embedding, the empty prompt's
(the distance training covered), and ``kept`` (1 - error / empty prompt's error).

This measures the closeness of conditionings, not images or rewards: it says how much of the embedding
N tokens can express through the encoder, not how much of its gain they keep. Writes ``OUT/fit.json``
and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.seed_study import log, train_demo  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/token-fit")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 8, 16, 75])
    p.add_argument("--fit-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--train-flags", default="", help="flags added to reneg train --demo, e.g. '--steps 40'")
    a = p.parse_args(argv)

    import torch

    from reneg import demo_world
    from reneg.backends.loading import load_diffusers
    from reneg.tokens import convert_to_tokens

    torch.set_num_threads(a.threads)
    backend = load_diffusers(demo_world.pipeline_dir())
    rows = []
    for seed in a.seeds:
        train_demo(a.out, f"emb-s{seed}", shlex.split(a.train_flags), seed, a.threads)
        src = os.path.join(a.out, "train", f"emb-s{seed}", "embedding.safetensors")
        for n in a.tokens:
            t0 = time.time()
            dst = os.path.join(a.out, "tokens", f"s{seed}-n{n}.safetensors")
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            _, rep = convert_to_tokens(src, dst, backend, n, steps=a.fit_steps, overwrite=True)
            keep = ("relative_error", "cosine", "row_cosine_min", "null_relative_error", "null_cosine", "kept")
            rows.append(dict(seed=seed, tokens=n, seconds=round(time.time() - t0, 1), **{k: rep[k] for k in keep}))
            log(f"seed {seed} N {n}: relative error {rep['relative_error']:.4f}, kept {100 * rep['kept']:.1f} %")
    with open(os.path.join(a.out, "fit.json"), "w", encoding="utf-8") as f:
        json.dump(dict(fit_steps=a.fit_steps, train_flags=a.train_flags, rows=rows), f, indent=2)
    lines = [
        "| seed | N | relative error | cosine | worst row cosine | empty prompt's error | kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | {r['tokens']} | {r['relative_error']:.4f} | {r['cosine']:.4f} | "
            f"{r['row_cosine_min']:.4f} | {r['null_relative_error']:.4f} | {100 * r['kept']:.1f} % |"
        )
    table = "\n".join(lines) + "\n"
    with open(os.path.join(a.out, "table.md"), "w", encoding="utf-8") as f:
        f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Learned negatives under Normalized Attention Guidance, on the demo world run as a few-step CFG-1 model.

    python benchmarks/nag_study.py --quick --threads 1   # 5 training seeds of 40 steps of 16: 21 min on 2 busy cores
    python benchmarks/nag_study.py             # 8 training seeds of the demo's 160 steps of 16

The demo world's model is sampled the way a few-step or guidance-distilled model is used: ``--sampling-steps``
DDIM steps (8) at CFG 1, where a CFG negative does nothing, with NAG at the ``tiny`` family's settings
(reneg/families.py). For every training seed it runs what a user runs,

    reneg train --demo --guidance nag --sampling-steps 8 --grad-range 0 3 --seed S [--steps/--batch-size]

then, in this process, makes the demo's held-out prompts (``--heldout``, ``--images-per-prompt`` noise seeds each,
the same prompt and noise at the same index for every negative) three ways and scores them with the training reward and the two held-out judges:

- ``none``: CFG 1 without NAG: no negative at all;
- ``handcrafted``: NAG away from the demo's handcrafted negative prompt;
- ``learned``: NAG away from the seed's learned embedding.

Per training seed: the paired differences learned - handcrafted and handcrafted - none over the images (mean and
95 % Student-t interval, ``reneg.evaluation.stats``); across seeds: the per-seed mean differences with their own
interval and the worst seed. The cost: a short CFG training run (``--guidance 7.5``, ``--cost-steps`` steps, the other
flags the same, first seed) beside the same first steps of the NAG run of that seed, in metered units per training sample (UNet forwards U, decodes V, reward passes R; a backward
counts as one more forward; a NAG pass is counted as one U although its cross-attention runs twice) and in wall
seconds per training sample on this machine (the median training step, :func:`step_seconds`). Writes ``OUT/study.json`` and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.seed_study import log, train_demo  # noqa: E402

FEW_STEP = ["--sampling-steps", "8", "--grad-range", "0", "3", "--eval-every", "0"]


def _ci(values):
    from reneg.evaluation.stats import mean_ci

    c = mean_ci(values)
    return {k: c[k] for k in ("n", "mean", "lo", "hi")}


def _fmt(c) -> str:
    if c["lo"] is None:
        return f"{c['mean']:+.4f}"
    return f"{c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"


def log_rows(folder: str) -> list[dict]:
    """A training run's log.csv, one dict a step (``seconds`` and the ``compute_*`` meters are cumulative)."""
    import csv

    with open(os.path.join(folder, "log.csv"), encoding="utf-8") as f:
        return list(csv.DictReader(f))


def step_seconds(folder: str) -> float:
    """The median wall time of one training step from a run's log.csv, leaving out the first step (warm-up)
    and any step that ran a held-out check: the machine's other work moves single steps, the median less."""
    import statistics

    rows = log_rows(folder)
    deltas = [float(b["seconds"]) - float(a["seconds"]) for a, b in zip(rows, rows[1:]) if not b.get("heldout_learned")]
    if not deltas:
        raise SystemExit(f"{folder}/log.csv: too few steps to time (at least 3 are needed)")
    return statistics.median(deltas)


def count_nag_unet(resolution: int = 512) -> dict:
    """FLOPs of one SD1.5 UNet forward at ``resolution`` px without and with NAG (a 77-token negative), counted on
    the ``meta`` device like ``benchmarks/cost_model.py`` (shapes only, seconds, any machine): what the meter's
    one U per NAG pass leaves out."""
    import torch
    from diffusers import UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from benchmarks.models import SD15_UNET
    from reneg.nag import NAG, NagContext, install

    def flops(fn) -> int:
        with FlopCounterMode(display=False) as fc, torch.no_grad():
            fn()
        return int(fc.get_total_flops())

    meta = torch.device("meta")
    with meta:
        unet = UNet2DConditionModel(**SD15_UNET)
    install(unet)
    lat = resolution // 8
    x, t = torch.empty(1, 4, lat, lat, device=meta), torch.tensor([500.0], device=meta)
    ctx = torch.empty(1, 77, 768, device=meta)
    nag = NagContext(torch.empty(1, 77, 768, device=meta), None, NAG())
    plain = flops(lambda: unet(x, t, encoder_hidden_states=ctx))
    guided = flops(lambda: unet(x, t, encoder_hidden_states=ctx, cross_attention_kwargs={"nag": nag}))
    return {"resolution": resolution, "plain": plain, "nag": guided, "ratio": guided / plain}


def score_negatives(root: str, embeddings: dict[str, str], heldout: int, images: int, threads: int) -> dict:
    """Held-out scores of none / handcrafted / each learned embedding under NAG, per reward: ``{reward: {name: [..]}}``,
    ``images`` per prompt, the same prompt and noise at the same index for every negative."""
    import torch

    from reneg.backends.loading import load_diffusers
    from reneg.demo import setup
    from reneg.embedding import load_embedding
    from reneg.generate import generate_and_score
    from reneg.nag import NAG, Guidance
    from reneg.families import get_family
    from reneg.rewards import load_rewards

    torch.set_num_threads(threads)
    d = setup(root)
    backend = load_diffusers(d["model"])
    rewards = {"hpsv2": load_rewards([d["reward"]])}
    for i, spec in enumerate(d["judges"]):
        rewards[["hpsv2-judge", "hpsv2-referee"][i] if i < 2 else f"judge{i}"] = load_rewards([spec])
    with open(d["heldout"], encoding="utf-8") as f:
        prompts = [line.strip() for line in f if line.strip()][:heldout]
    texts = [p for p in prompts for _ in range(images)]
    seeds = [1234 + i for i in range(len(texts))]
    nag = Guidance(1.0, NAG(*get_family(backend.family).nag))
    plain = Guidance(1.0)
    null = backend.negative_cond(backend.null_embedding()[0])
    negs = {"none": (null, plain), "handcrafted": (backend.encode_prompts([d["handcrafted"]]), nag)}
    for name, path in embeddings.items():
        negs[name] = (backend.negative_cond(load_embedding(path, expected_family=backend.family).tensor.float()), nag)
    out = {r: {} for r in rewards}
    with torch.no_grad():
        for name, (uncond, g) in negs.items():
            _, imgs = generate_and_score(
                backend, rewards["hpsv2"], texts, seeds, uncond, 8, g, 32, 32, 16, keep_images=True
            )
            for rname, rw in rewards.items():
                out[rname][name] = [float(v) for v in rw(imgs.to(backend.device), texts).float().cpu()]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4, 5, 6, 7])
    ap.add_argument("--steps", type=int, default=160, help="training steps per seed (the demo recipe: 160)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--heldout", type=int, default=32, help="held-out prompts scored (the demo's 32)")
    ap.add_argument("--images-per-prompt", type=int, default=4, help="images per held-out prompt (default 4)")
    ap.add_argument("--cost-steps", type=int, default=10, help="steps of the CFG run that the cost is compared on")
    ap.add_argument("--quick", action="store_true", help="5 seeds, 40 steps of 16, 32 held-out prompts x 4 images")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="runs/nag-study")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.batch_size, a.heldout, a.images_per_prompt = a.seeds[:5], 40, 16, 32, 4
    from reneg.evaluation.stats import paired_differences

    sizes = ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--micro-batch", str(a.batch_size)]
    for s in a.seeds:
        train_demo(a.out, f"nag-s{s}", ["--guidance", "nag", *FEW_STEP, *sizes], s, a.threads)
    cost_steps = min(a.cost_steps, a.steps)
    cfg_sizes = ["--steps", str(cost_steps), *sizes[2:]]
    train_demo(a.out, f"cfg-s{a.seeds[0]}", ["--guidance", "7.5", *FEW_STEP, *cfg_sizes], a.seeds[0], a.threads)
    log("training done; scoring the held-out prompts")
    t0 = time.time()
    embs = {f"learned-s{s}": os.path.join(a.out, "train", f"nag-s{s}", "embedding.safetensors") for s in a.seeds}
    scores = score_negatives(a.out, embs, a.heldout, a.images_per_prompt, a.threads)
    log(f"scored in {time.time() - t0:.0f} s")

    result = {"settings": vars(a), "per_seed": {}, "across_seeds": {}, "cost": {}}
    lines = [
        f"# NAG study ({'quick' if a.quick else 'full'}): {len(a.seeds)} seeds, {a.steps} steps of {a.batch_size}",
        "",
    ]
    for rname, sc in scores.items():
        lh, ln = [], []
        rows = []
        for s in a.seeds:
            learned = sc[f"learned-s{s}"]
            d_lh = _ci(paired_differences(learned, sc["handcrafted"]))
            d_hn = _ci(paired_differences(sc["handcrafted"], sc["none"]))
            d_ln = _ci(paired_differences(learned, sc["none"]))
            result["per_seed"].setdefault(rname, {})[s] = {"learned-handcrafted": d_lh, "handcrafted-none": d_hn}
            lh.append(d_lh["mean"])
            ln.append(d_ln["mean"])
            rows.append(f"| {s} | {_fmt(d_lh)} | {_fmt(d_hn)} | {_fmt(d_ln)} |")
        # handcrafted - none has no training seed: its interval is the images' (the same in every row)
        across = {"learned-handcrafted": _ci(lh), "handcrafted-none": d_hn, "learned-none": _ci(ln)}
        across["worst seed learned-handcrafted"] = min(lh)
        result["across_seeds"][rname] = across
        means = {k: sum(v) / len(v) for k, v in sc.items() if not k.startswith("learned")}
        means["learned (mean over seeds)"] = sum(
            sum(sc[f"learned-s{s}"]) / len(sc[f"learned-s{s}"]) for s in a.seeds
        ) / len(a.seeds)
        lines += [
            f"## {rname}{' (trained on)' if rname == 'hpsv2' else ' (held out)'}",
            "",
            "mean reward: " + ", ".join(f"{k} {v:.4f}" for k, v in means.items()),
            "",
            "| training seed | learned - handcrafted | handcrafted - none | learned - none |",
            "|---|---|---|---|",
            *rows,
            f"| across seeds | {_fmt(across['learned-handcrafted'])} | {_fmt(across['handcrafted-none'])} | "
            f"{_fmt(across['learned-none'])} |",
            "",
            f"worst seed, learned - handcrafted: {min(lh):+.4f}. Across seeds: the interval of the per-seed means; "
            "handcrafted - none does not depend on the training seed, its interval is over the images.",
            "",
        ]
    per = cost_steps * a.batch_size
    for name, run in (("nag", f"nag-s{a.seeds[0]}"), ("cfg 7.5", f"cfg-s{a.seeds[0]}")):
        row = log_rows(os.path.join(a.out, "train", run))[cost_steps - 1]
        result["cost"][name] = {
            "units_per_sample": {k: float(row[f"compute_{k}"]) / per for k in ("U", "V", "R")},
            "tflop_sd15_per_sample": float(row["compute_tflop_sd15"]) / per,
            "seconds_per_sample": step_seconds(os.path.join(a.out, "train", run)) / a.batch_size,
        }
    result["nag_unet_sd15"] = nu = count_nag_unet()
    lines += [
        f"## cost per training sample (first seed, its first {cost_steps} steps, same flags)",
        "",
        "| guidance | U | V | R | TFLOP at SD1.5 512 px | s on this machine (median step / batch) |",
        "|---|---|---|---|---|---|",
    ]
    for name, c in result["cost"].items():
        u = c["units_per_sample"]
        lines.append(
            f"| {name} | {u['U']:.2f} | {u['V']:.2f} | {u['R']:.2f} | {c['tflop_sd15_per_sample']:.1f} | "
            f"{c['seconds_per_sample']:.3f} |"
        )
    lines += [
        "",
        f"One SD1.5 UNet forward at 512 px (counted on the meta device): {nu['plain'] / 1e12:.3f} TFLOP plain, "
        f"{nu['nag'] / 1e12:.3f} TFLOP with NAG ({100 * (nu['ratio'] - 1):+.2f} %: the second attention of every "
        "attn2 and the negative's keys and values), which the meter's one U per NAG pass leaves out.",
    ]
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "study.json"), "w", encoding="utf-8") as f:
        json.dump({**result, "scores": scores}, f, indent=1)
    with open(os.path.join(a.out, "table.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

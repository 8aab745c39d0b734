"""Negative tokens against the output-space embedding on the demo world: how much of its gain N tokens keep.

    python benchmarks/tokens_study.py --quick --threads 1   # 3 seeds of 40 steps of 16, 32 prompts x 2 images
    python benchmarks/tokens_study.py                       # 5 seeds of the demo's 160 steps of 16, 16 images

For every training seed it runs what a user runs (``--jobs`` at once, each on ``--threads`` torch threads),

    reneg train --demo --seed S --eval-every 0 [--steps/--batch-size]             # emb: the output-space embedding
    reneg train --demo --seed S --eval-every 0 --tokens N [--steps/--batch-size]  # tokN: N tokens trained directly

then fits N tokens to each seed's embedding (``reneg convert --to tokens N``'s code,
:func:`reneg.tokens.convert_to_tokens`, ``--fit-steps``): convN. A token negative is evaluated through what its
vectors encode to: the training run's ``embedding.safetensors`` twin, and for a converted file its encoding written
here the same way (``OUT/convert/convN-sS.embedding.safetensors``), which is what a UI gives the model when the
file's name is the whole negative prompt. Every negative is scored with ``reneg eval --demo`` (null, handcrafted
and every file, the demo's 32 held-out prompts x ``--images-per-prompt`` image seeds, the same noise for every
negative) under the training reward and the held-out judges.

Per reward and training seed, paired on (prompt, image seed) with 95 % Student-t intervals
(``reneg.evaluation.stats`` via ``benchmarks/seed_study.py``): each negative's gain over null, its difference
from the same seed's embedding, and the share of the embedding's gain over null it keeps
(``(X - null) / (emb - null)``, mean differences). Across seeds: the per-seed gains' interval, the pooled share
(mean gain / mean embedding gain) and the worst seed's share. The goal: a token negative of at most 16 tokens keeps
at least 80 % of the embedding's gain (on the worst seed, under the training reward). Writes ``OUT/study.json`` and
``OUT/table.md``; finished training runs, conversions and evaluations are reused when it is run again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.seed_study import eval_group, log, paired, save, scores_by_reward, train_demo  # noqa: E402

GOAL_SHARE = 0.8
GOAL_MAX_TOKENS = 16


def convert(root: str, seed: int, counts: list[int], fit_steps: int, threads: int) -> dict[int, dict]:
    """convN-sS: N tokens fitted to emb-sS's embedding, and what they encode to as an embedding file;
    ``{N: {"tokens", "embedding", "fit"}}`` (a finished conversion is reused)."""
    import torch

    from reneg import demo_world
    from reneg.backends.loading import load_diffusers
    from reneg.embedding import NegEmbedding, save_embedding
    from reneg.tokens import TokenEncoder, convert_to_tokens, load_tokens

    torch.set_num_threads(threads)
    src = os.path.join(root, "train", f"emb-s{seed}", "embedding.safetensors")
    folder = os.path.join(root, "convert")
    os.makedirs(folder, exist_ok=True)
    backend = None
    out = {}
    for n in counts:
        dst = os.path.join(folder, f"conv{n}-s{seed}.safetensors")
        twin = os.path.join(folder, f"conv{n}-s{seed}.embedding.safetensors")
        report_path = os.path.join(folder, f"conv{n}-s{seed}.json")
        if not (os.path.isfile(twin) and os.path.isfile(report_path)):
            if backend is None:
                backend = load_diffusers(demo_world.pipeline_dir())
            t0 = time.time()
            _, rep = convert_to_tokens(src, dst, backend, n, steps=fit_steps, overwrite=True)
            tok = load_tokens(dst, expected_family=backend.family)  # the file as written, read back
            with torch.no_grad():
                rows, pooled = TokenEncoder(backend).encode(tok.flat().to(backend.device))
            emb = NegEmbedding(rows.cpu(), backend.family, None if pooled is None else pooled.cpu())
            save_embedding(twin, emb, overwrite=True, tokens=n, source=os.path.basename(dst))
            keep = ("relative_error", "cosine", "row_cosine_min", "null_relative_error", "kept")
            rep = {k: float(rep[k]) for k in keep} | {"fit_steps": fit_steps, "seconds": round(time.time() - t0, 1)}
            with open(report_path, "w", encoding="utf-8") as f:
                json.dump(rep, f, indent=1)
            log(f"converted seed {seed} to {n} tokens: relative error {rep['relative_error']:.4f}")
        with open(report_path, encoding="utf-8") as f:
            out[n] = {"tokens": dst, "embedding": twin, "fit": json.load(f)}
    return out


def _mean(d: dict) -> float:
    return sum(d.values()) / len(d)


def analyse(sc: dict, seeds: list[int], variants: list[str]) -> dict:
    """Under one reward: per seed and negative, the paired gain over null and difference from the embedding,
    and the share of the embedding's gain kept; across seeds, the per-seed gains' interval and the worst seed."""
    from reneg.evaluation.stats import mean_ci

    null, hand = sc["null"], sc["handcrafted"]
    res = {
        "null_mean": _mean(null),
        "handcrafted_mean": _mean(hand),
        "handcrafted_minus_null": paired(hand, null),
        "per_seed": {},
        "across": {},
    }
    for s in seeds:
        emb = sc[f"emb-s{s}"]
        g_emb = paired(emb, null)["mean"]
        row = {}
        for v in variants:
            x = sc[f"{v}-s{s}"]
            gain = paired(x, null)
            row[v] = {
                "mean": _mean(x),
                "minus_null": gain,
                "minus_emb": paired(x, emb),
                "minus_handcrafted": paired(x, hand),
                "share": gain["mean"] / g_emb if g_emb > 0 else None,
            }
        res["per_seed"][s] = row
    for v in variants:
        gains = [res["per_seed"][s][v]["minus_null"]["mean"] for s in seeds]
        diffs = [res["per_seed"][s][v]["minus_emb"]["mean"] for s in seeds]
        shares = [res["per_seed"][s][v]["share"] for s in seeds]
        emb_gains = [res["per_seed"][s]["emb"]["minus_null"]["mean"] for s in seeds]
        pooled = sum(gains) / sum(emb_gains) if sum(emb_gains) > 0 else None
        known = [x for x in shares if x is not None]
        worst = min(
            seeds, key=lambda s: res["per_seed"][s][v]["share"] if res["per_seed"][s][v]["share"] is not None else -1e9
        )
        res["across"][v] = {
            "minus_null": mean_ci(gains),
            "minus_emb": mean_ci(diffs),
            "pooled_share": pooled,
            "worst_seed": worst,
            "worst_share": res["per_seed"][worst][v]["share"],
            "shares_known": len(known),
        }
    return res


def _ci(d: dict) -> str:
    if d.get("lo") is None:
        return f"{d['mean']:+.4f}"
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.0f} %"


def table(result: dict) -> str:
    st = result["settings"]
    variants, seeds = result["variants"], st["seeds"]
    lines = [
        f"# Negative tokens on the demo world ({'quick' if st['quick'] else 'full'}): {len(seeds)} training seeds "
        f"({', '.join(map(str, seeds))}), {st['steps']} steps of {st['batch_size']}, 32 held-out prompts x "
        f"{st['images_per_prompt']} image seeds, conversions of {st['fit_steps']} fit steps",
        "",
        "Paired on (prompt, image seed), 95 % Student-t intervals. *gain*: the negative minus null; *share*: its "
        "gain over the same seed's embedding's gain; across seeds the interval is over the per-seed means and the "
        "share is pooled (mean gain / mean embedding gain).",
    ]
    for rname, res in result["rewards"].items():
        trained = rname == result["reward"]
        lines += [
            "",
            f"## {rname} ({'trained on' if trained else 'held out'})",
            "",
            f"null {res['null_mean']:.4f}, handcrafted {res['handcrafted_mean']:.4f}; handcrafted - null "
            f"{_ci(res['handcrafted_minus_null'])}",
            "",
            "| negative | gain over null, across seeds | minus embedding, across seeds | pooled share | worst seed (share) |",
            "|---|---:|---:|---:|---:|",
        ]
        for v in variants:
            a = res["across"][v]
            lines.append(
                f"| {v} | {_ci(a['minus_null'])} | {_ci(a['minus_emb'])} | {_pct(a['pooled_share'])} | "
                f"{a['worst_seed']} ({_pct(a['worst_share'])}) |"
            )
        if trained:
            lines += ["", "Per training seed: gain over null / minus embedding / share", ""]
            lines += ["| seed | " + " | ".join(variants) + " |", "|---:|" + "---|" * len(variants)]
            for s in seeds:
                row = res["per_seed"][s]
                cells = [
                    f"{_ci(row[v]['minus_null'])} / {_ci(row[v]['minus_emb'])} / {_pct(row[v]['share'])}"
                    if v != "emb"
                    else _ci(row[v]["minus_null"])
                    for v in variants
                ]
                lines.append(f"| {s} | " + " | ".join(cells) + " |")
    goal = result["goal"]
    lines += [
        "",
        f"Goal (at most {GOAL_MAX_TOKENS} tokens keep at least {100 * GOAL_SHARE:.0f} % of the embedding's gain on "
        f"the worst seed, training reward): {'met by ' + ', '.join(goal['met_by']) if goal['met_by'] else 'not met'}.",
        "",
        "Conversion fit (encoding closeness, per seed): relative error / kept of the distance from the empty prompt",
        "",
        "| seed | " + " | ".join(f"conv{n}" for n in st["convert"]) + " |",
        "|---:|" + "---|" * len(st["convert"]),
    ]
    for s in seeds:
        fits = result["fits"][str(s)]
        lines.append(
            f"| {s} | "
            + " | ".join(
                f"{fits[str(n)]['relative_error']:.4f} / {100 * fits[str(n)]['kept']:.1f} %" for n in st["convert"]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 75], help="token counts trained directly")
    ap.add_argument("--convert", type=int, nargs="+", default=[4, 16], help="token counts fitted to the embedding")
    ap.add_argument("--steps", type=int, default=160, help="training steps per run (the demo recipe: 160)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--images-per-prompt", type=int, default=16, help="image seeds per held-out prompt")
    ap.add_argument("--fit-steps", type=int, default=300, help="reneg convert --fit-steps")
    ap.add_argument("--quick", action="store_true", help="3 seeds, 40 steps of 16, 32 held-out prompts x 2 images")
    ap.add_argument("--jobs", type=int, default=2, help="commands run at once")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per command")
    ap.add_argument("--out", default="runs/tokens-study")
    a = ap.parse_args(argv)
    if a.quick:
        a.seeds, a.steps, a.batch_size, a.images_per_prompt = a.seeds[:3], 40, 16, 2
    from reneg import demo

    if demo._world() is None:
        raise SystemExit("the demo world's assets are missing (reneg/demo_world/assets)")
    os.makedirs(a.out, exist_ok=True)
    t_start = time.time()

    sizes = ["--steps", str(a.steps), "--batch-size", str(a.batch_size), "--micro-batch", str(a.batch_size)]
    runs = [("emb", [])] + [(f"tok{n}", ["--tokens", str(n)]) for n in a.tokens]
    work = [(name, flags, s) for s in a.seeds for name, flags in runs]  # seed by seed: a cut run leaves whole seeds
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        futures = [
            pool.submit(train_demo, a.out, f"{name}-s{s}", ["--eval-every", "0", *sizes, *flags], s, a.threads)
            for name, flags, s in work
        ]
        summaries = [f.result() for f in futures]
    t_train = time.time() - t_start
    log(f"training done ({t_train:.0f} s)")

    fits, files = {}, {}
    for s in a.seeds:
        conv = convert(a.out, s, a.convert, a.fit_steps, a.threads)
        fits[str(s)] = {str(n): c["fit"] for n, c in conv.items()}
        files[f"emb-s{s}"] = os.path.join(a.out, "train", f"emb-s{s}", "embedding.safetensors")
        for n in a.tokens:
            files[f"tok{n}-s{s}"] = os.path.join(a.out, "train", f"tok{n}-s{s}", "embedding.safetensors")
        for n, c in conv.items():
            files[f"conv{n}-s{s}"] = c["embedding"]
    t_conv = time.time() - t_start - t_train
    log(f"conversions done ({t_conv:.0f} s); scoring the held-out prompts")

    negs = [f"{k}={v}" for k, v in files.items()]
    groups = [[] for _ in range(max(1, min(a.jobs, len(negs))))]
    for i, e in enumerate(negs):
        groups[i % len(groups)].append(e)
    groups[0] = ["null", "handcrafted"] + groups[0]
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        paths = list(
            pool.map(lambda g: eval_group(a.out, g[0], g[1], a.threads, a.images_per_prompt), enumerate(groups))
        )
    # null and handcrafted are scored in group 0 only; every group uses the same prompts and noise
    by_reward = scores_by_reward(paths)
    t_eval = time.time() - t_start - t_train - t_conv
    log(f"evaluation done ({t_eval:.0f} s)")

    variants = ["emb"] + [f"tok{n}" for n in a.tokens] + [f"conv{n}" for n in a.convert]
    rewards = list(by_reward)
    result = {
        "settings": vars(a),
        "variants": variants,
        "reward": rewards[0],
        "rewards": {r: analyse(by_reward[r], a.seeds, variants) for r in rewards},
        "fits": fits,
        "seconds": {"train": round(t_train), "convert": round(t_conv), "eval": round(t_eval)},
        "train_seconds": {f"{n}-s{s}": sm.get("seconds") for (n, _, s), sm in zip(work, summaries)},
        "command": " ".join([sys.executable] + sys.argv),
    }
    main_res = result["rewards"][rewards[0]]
    met = [
        v
        for v in variants[1:]
        if int(v.removeprefix("tok").removeprefix("conv")) <= GOAL_MAX_TOKENS
        and main_res["across"][v]["worst_share"] is not None
        and main_res["across"][v]["worst_share"] >= GOAL_SHARE
        and main_res["across"][v]["shares_known"] == len(a.seeds)
    ]
    result["goal"] = {"share": GOAL_SHARE, "max_tokens": GOAL_MAX_TOKENS, "met_by": met}
    save(a.out, "study.json", result, table(result))
    log(f"done in {time.time() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

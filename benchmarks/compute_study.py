"""Held-out reward against compute on the demo world: the paper recipe beside cheaper ones.

    python benchmarks/compute_study.py                          # all variants, seeds 0 1
    python benchmarks/compute_study.py --seeds 0 --only paper,recipe-fast --tune-prompts 4

Trains one embedding per (variant, training seed) on the demo world (CPU), metering every
UNet call, decode and reward pass (``reneg.compute``), scores each embedding on the demo
world's 32 held-out prompts x ``--eval-seeds`` fixed image seeds (the same noise for every
variant), and compares each variant with the paper recipe of the same training seed, paired on
(training seed, prompt, image seed), with a 95 % Student-t interval (``reneg.evaluation.stats``).
Per-sample tuning: today's search (30 sampling steps, at most 10 steps, patience 3) beside
``--search-steps`` searches, from the paper recipe's embedding, on ``--tune-prompts`` held-out
prompts; the gain is the kept negative's reward at 30 steps minus the start's, on the same seed.

Everything goes to ``--out`` (default ``runs/compute-study``): ``train/<variant>-s<seed>/``
(the trainer's own outputs; a finished run is reused when the study is run again),
``scores.json``, ``study.json``, ``table.md`` and ``compute_study.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch

# name -> (overrides of the base recipe as a function of it, description). A name that reads like a flag
# is that flag: "recipe-fast" is `reneg train --recipe fast` (its options taken from the trainer's own
# RECIPES table), "rollout-6" is `--rollout-steps 6`; the others describe what they change.
VARIANTS = {
    "paper": (lambda b: {}, "the paper's recipe (30-step no-grad rollout, one grad step per trajectory)"),
    "steps-third": (lambda b: {"steps": b["steps"] // 3}, "a third of the optimizer steps, same lr"),
    "steps-third-lr2x": (
        lambda b: {"steps": b["steps"] // 3, "lr": 2 * b["lr"]},
        "a third of the optimizer steps at twice the lr",
    ),
    "steps-third-lr3x": (
        lambda b: {"steps": b["steps"] // 3, "lr": 3 * b["lr"]},
        "a third of the optimizer steps at three times the lr",
    ),
    "batch-third": (
        lambda b: {"batch_size": max(1, b["batch_size"] // 3), "micro_batch": max(1, b["micro_batch"] // 3)},
        "a third of the samples per step (every optimizer step kept, same lr)",
    ),
    "rollout-6": (lambda b: {"rollout_steps": 6}, "--rollout-steps 6"),
    "rollout-3": (lambda b: {"rollout_steps": 3}, "--rollout-steps 3"),
    "grads-2": (
        lambda b: {"grads_per_rollout": 2, "batch_size": b["batch_size"] // 2, "micro_batch": b["micro_batch"] // 2},
        "--grads-per-rollout 2 on half the trajectories (same gradients per step)",
    ),
    "recipe-fast": (lambda b: _recipe("fast"), "`--recipe fast`"),
    "rollout-3-grads-2": (
        lambda b: {
            "rollout_steps": 3,
            "grads_per_rollout": 2,
            "batch_size": b["batch_size"] // 2,
            "micro_batch": b["micro_batch"] // 2,
        },
        "--rollout-steps 3 --grads-per-rollout 2 on half the trajectories",
    ),
}
TUNE_VARIANTS = {
    "paper": (None, 10, "today: search at 30 sampling steps, at most 10 steps, patience 3"),
    "search-7": (7, 10, "--search-steps 7 (10 x 7 + one 30-step image)"),
    "search-5": (5, 10, "--search-steps 5"),
    "search-5-max6": (5, 6, "--search-steps 5 --max-steps 6"),
    "max-2": (None, 2, "--max-steps 2: one update at 30 sampling steps"),
    "max-3": (None, 3, "--max-steps 3: two updates at 30 sampling steps"),
    "search-10-max5": (10, 5, "--search-steps 10 --max-steps 5"),
    "search-10-max4": (10, 4, "--search-steps 10 --max-steps 4"),
    # fewer, larger search steps: the tune's lr times a factor (4th element)
    "search-10-max4-lr2x": (10, 4, "--search-steps 10 --max-steps 4, twice the lr", 2.0),
    "search-10-max4-lr3x": (10, 4, "--search-steps 10 --max-steps 4, three times the lr", 3.0),
    "search-7-max5-lr2x": (7, 5, "--search-steps 7 --max-steps 5, twice the lr", 2.0),
    "search-5-max8-lr2x": (5, 8, "--search-steps 5 --max-steps 8, twice the lr", 2.0),
    "max-2-lr3x": (None, 2, "--max-steps 2 (one update at 30 sampling steps), three times the lr", 3.0),
}


def _recipe(name: str) -> dict:
    from reneg.trainer.config import RECIPES

    return dict(RECIPES[name])


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def base_recipe(world: dict, ns) -> dict:
    from reneg.demo import train_settings

    s = train_settings(world["settings"])
    for k in ("steps", "batch_size", "lr"):  # a shortened base recipe (the demo world's is 160 x 16 at 5e-2)
        if getattr(ns, k) is not None:
            s[k] = getattr(ns, k)
    s["micro_batch"] = min(s["micro_batch"], s["batch_size"])
    return s


def demo_train_config(world: dict, out: str, settings: dict):
    """The TrainConfig of an in-process demo-world run into ``out`` with ``settings`` (TrainConfig fields),
    resumed where a run stopped earlier (``resume="auto"``)."""
    from reneg.trainer.config import TrainConfig

    return TrainConfig(
        model=world["model"],
        rewards=[world["reward"]],
        prompts=world["prompts"],
        heldout=world["heldout"],
        handcrafted=world["handcrafted"],
        out=out,
        progress=False,
        device="cpu",
        base_model_name="reneg-demo",
        resume="auto",
        **{k: (tuple(v) if k == "grad_range" else v) for k, v in settings.items()},
    )


def train_variant(world: dict, base: dict, name: str, seed: int, root: str) -> dict:
    from reneg.trainer.train import run_train

    out = os.path.join(root, "train", f"{name}-s{seed}")
    done = os.path.join(out, "summary.json")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            summary = json.load(f)
        if summary.get("status", "finished") == "finished":  # a stopped run is continued below
            return summary
    s = dict(base)
    s.update(VARIANTS[name][0](base))
    s.update(eval_every=0, checkpoint_every=max(1, s["steps"]), seed=seed)
    cfg = demo_train_config(world, out, s)  # resume="auto": a run stopped earlier continues where it stopped
    t0 = time.time()
    # a stop (SIGTERM, Ctrl-C, OUT/STOP) ends the run after its step with a checkpoint and raises
    # TrainingStopped, which main() turns into the exit status; never a half-made summary
    summary = run_train(cfg, handle_signals=True)
    log(
        f"trained {name} seed {seed} in {time.time() - t0:.0f} s: {summary['compute']['tflop_sd15_512']:.0f} "
        f"TFLOP at SD1.5 scale"
    )
    return summary


def demo_world(out: str) -> dict:
    """The demo world's paths and settings, its prompt files written under ``out``. The studies score the
    first 32 of the demo's 128 held-out prompts (``heldout_texts``; the trainer's own check reads the same
    32): the set their documented figures were measured on, at a quarter of the cost of all 128."""
    from reneg import demo

    if demo._world() is None:
        raise SystemExit("the demo world's assets are missing (reneg/demo_world/assets)")
    os.makedirs(out, exist_ok=True)
    d = demo.setup(out)
    d["heldout_texts"] = d["heldout_texts"][: d["settings"]["heldout_count"]]
    return d


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/compute_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "compute-study"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds")
    p.add_argument("--only", default=None, help="comma-separated variants (default: all)")
    p.add_argument("--eval-seeds", type=int, default=4, help="image seeds per held-out prompt")
    p.add_argument("--tune-prompts", type=int, default=8, help="held-out prompts tuned (0: no tune study)")
    p.add_argument("--tune-only", default=None, help="comma-separated tune variants (default: all)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=None, help="base recipe's optimizer steps (demo world: 160)")
    p.add_argument("--batch-size", type=int, default=None, help="base recipe's samples per step (demo world: 16)")
    p.add_argument("--lr", type=float, default=None, help="base recipe's lr (demo world: 5e-2)")
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    world = demo_world(ns.out)
    names = ns.only.split(",") if ns.only else list(VARIANTS)
    for n in names:
        if n not in VARIANTS:
            raise SystemExit(f"--only: unknown variant {n!r} (known: {', '.join(VARIANTS)})")
    if "paper" not in names:
        names = ["paper"] + names
    base = base_recipe(world, ns)
    log(f"base recipe: {base['steps']} steps x {base['batch_size']} samples, lr {base['lr']}")
    from reneg.trainer.train import TrainingStopped

    summaries = {}
    try:
        for seed in ns.seeds:
            for n in names:
                summaries[(n, seed)] = train_variant(world, base, n, seed, ns.out)
    except TrainingStopped as e:
        log(f"{e}; the study stops here (run it again to continue)")
        return e.exit_code

    from reneg.backends.loading import load_diffusers
    from reneg.embedding import load_embedding
    from reneg.evaluation.stats import mean_ci, paired_differences, win_rate
    from reneg.generate import generate_and_score
    from reneg.rewards import load_rewards

    backend = load_diffusers(world["model"], device="cpu")
    reward = load_rewards([world["reward"]], device="cpu")
    st = world["settings"]
    texts = world["heldout_texts"]
    prompts = [t for t in texts for _ in range(ns.eval_seeds)]
    seeds = [10_000 + i * 97 + k for i in range(len(texts)) for k in range(ns.eval_seeds)]
    cache_path = os.path.join(ns.out, "scores.json")
    cache = json.load(open(cache_path, encoding="utf-8")) if os.path.isfile(cache_path) else {}

    def score(key: str, tensor: torch.Tensor) -> list[float]:
        ck = f"{key}|{ns.eval_seeds}"
        if ck not in cache:
            t0 = time.time()
            cache[ck] = generate_and_score(
                backend,
                reward,
                prompts,
                seeds,
                backend.negative_cond(tensor),
                st["sampling_steps"],
                st["guidance"],
                st["resolution"],
                st["resolution"],
                st["eval_batch"],
            ).tolist()
            log(f"scored {key} ({len(prompts)} images, {time.time() - t0:.0f} s)")
            from reneg.fileio import atomic_write_json

            atomic_write_json(cache_path, cache)
        return cache[ck]

    rows = []
    for n in names:
        scores, ref, compute, seconds = [], [], [], []
        for seed in ns.seeds:
            sm = summaries[(n, seed)]
            emb = load_embedding(sm["embedding"]).tensor
            scores += score(f"{n}-s{seed}", emb)
            ref += score(f"paper-s{seed}", load_embedding(summaries[("paper", seed)]["embedding"]).tensor)
            compute.append(sm["compute"]["tflop_sd15_512"])
            seconds.append(sm["seconds"])
        m = mean_ci(scores)
        d = mean_ci(paired_differences(scores, ref))
        w = win_rate(scores, ref)
        rows.append(
            {
                "variant": n,
                "what": VARIANTS[n][1],
                "tflop_sd15": sum(compute) / len(compute),
                "compute_units": summaries[(n, ns.seeds[0])]["compute"]["units"],
                "seconds_cpu": sum(seconds) / len(seconds),
                "mean": m,
                "diff_vs_paper": d,
                "win_rate_vs_paper": w,
                "images": len(scores),
            }
        )
    null, _ = backend.null_embedding()
    null_scores = score("null", null) * len(ns.seeds)
    paper_scores = sum(
        (score(f"paper-s{s}", load_embedding(summaries[("paper", s)]["embedding"]).tensor) for s in ns.seeds), []
    )
    null_row = {"mean": mean_ci(null_scores), "diff_vs_paper": mean_ci(paired_differences(null_scores, paper_scores))}
    paper_c = next(r["tflop_sd15"] for r in rows if r["variant"] == "paper")
    for r in rows:
        r["compute_fraction"] = r["tflop_sd15"] / paper_c
        gap = sum(paper_scores) / len(paper_scores) - null_row["mean"]["mean"]
        hi = r["diff_vs_paper"]["hi"]
        r["reaches_paper"] = r["variant"] == "paper" or (hi is not None and hi >= 0)  # not below it at 95 %
        r["share_of_paper_gain_over_null"] = (r["mean"]["mean"] - null_row["mean"]["mean"]) / gap if gap else None

    tune_rows = tune_study(ns, world, backend, reward, summaries, texts) if ns.tune_prompts else []
    result = {
        "seeds": ns.seeds,
        "eval_seeds": ns.eval_seeds,
        "heldout_prompts": len(texts),
        "train": rows,
        "null": null_row,
        "tune": tune_rows,
        "settings": {k: v for k, v in st.items()},
        "base_recipe": base,
        "command": " ".join([sys.executable] + sys.argv),
    }
    from reneg.fileio import atomic_write_json, atomic_write_text

    atomic_write_json(os.path.join(ns.out, "study.json"), result)
    md = table(result)
    atomic_write_text(os.path.join(ns.out, "table.md"), md)
    print(md)
    plot(result, os.path.join(ns.out, "compute_study.png"))
    return 0


def tune_study(ns, world, backend, reward, summaries, texts) -> list[dict]:
    from reneg.compute import ComputeMeter
    from reneg.embedding import load_embedding
    from reneg.evaluation.stats import mean_ci
    from reneg.generate import generate_and_score
    from reneg.tuning import tune_for_seed

    st = world["settings"]
    start = load_embedding(summaries[("paper", ns.seeds[0])]["embedding"]).tensor
    names = ns.tune_only.split(",") if ns.tune_only else list(TUNE_VARIANTS)
    if "paper" not in names:
        names = ["paper"] + names
    items = [(texts[i * len(texts) // ns.tune_prompts], 20_000 + i) for i in range(ns.tune_prompts)]
    full = {}
    for text, seed in items:  # the start's image at the full step count (what the user would get untuned)
        full[(text, seed)] = float(
            generate_and_score(
                backend,
                reward,
                [text],
                [seed],
                backend.negative_cond(start),
                st["sampling_steps"],
                st["guidance"],
                st["resolution"],
                st["resolution"],
                1,
            )[0]
        )
    cache_path = os.path.join(ns.out, "tune_rows.json")  # a finished tune variant is reused
    cache = json.load(open(cache_path, encoding="utf-8")) if os.path.isfile(cache_path) else {}
    out = []
    for n in names:
        search, max_steps, what = TUNE_VARIANTS[n][:3]
        lr_factor = TUNE_VARIANTS[n][3] if len(TUNE_VARIANTS[n]) > 3 else 1.0
        key = f"{n}|{ns.tune_prompts}|s{ns.seeds[0]}"
        if key in cache:
            out.append(cache[key])
            continue
        gains, calls, tflop, t0 = [], [], [], time.time()
        for text, seed in items:
            meter = ComputeMeter()
            res, _ = tune_for_seed(
                backend,
                reward,
                text,
                seed,
                start,
                st["sampling_steps"],
                st["guidance"],
                tuple(st["grad_range"]),
                st["resolution"],
                st["resolution"],
                max_steps,
                min(3, max_steps),
                st.get("tune_lr", st["lr"]) * lr_factor,
                search_steps=search,
                meter=meter,
            )
            kept = res.final_reward if res.final_reward is not None else res.best_reward
            gains.append(kept - full[(text, seed)])
            calls.append(meter.unet_calls())
            tflop.append(meter.tflop_sd15())
        out.append(
            {
                "variant": n,
                "what": what,
                "gain": mean_ci(gains),
                "gains": gains,
                "unet_calls": sum(calls) / len(calls),
                "tflop_sd15": sum(tflop) / len(tflop),
                "worse_than_start": sum(g < 0 for g in gains),
                "prompts": len(items),
            }
        )
        cache[key] = out[-1]
        from reneg.fileio import atomic_write_json

        atomic_write_json(cache_path, cache)
        log(
            f"tune {n}: mean gain {out[-1]['gain']['mean']:+.4f}, {out[-1]['unet_calls']:.0f} UNet calls "
            f"({time.time() - t0:.0f} s)"
        )
    g0, c0 = out[0]["gain"]["mean"], out[0]["unet_calls"]
    for r in out:
        r["gain_share"] = r["gain"]["mean"] / g0 if g0 else None
        r["calls_fraction"] = r["unet_calls"] / c0
    return out


def _ci(d: dict, signed: bool = False) -> str:
    f = "{:+.4f}" if signed else "{:.4f}"
    if d.get("lo") is None:
        return f.format(d["mean"])
    return f"{f.format(d['mean'])} [{f.format(d['lo'])}, {f.format(d['hi'])}]"


def table(res: dict) -> str:
    b = res["base_recipe"]
    lines = [
        f'Base recipe ("paper"): {b["steps"]} steps x {b["batch_size"]} samples at lr {b["lr"]}, '
        f"{b['sampling_steps']} DDIM steps, CFG {b['guidance']}, grad step among the last "
        f"{b['grad_range'][1] - b['grad_range'][0] + 1}, {b['resolution']} px.",
        f"Training: {len(res['seeds'])} training seed(s) x {res['heldout_prompts']} held-out prompts x "
        f"{res['eval_seeds']} image seeds; differences paired with the paper recipe of the same training "
        f"seed, 95 % Student-t intervals. Compute: the meter's totals priced at SD1.5 512 px.",
        "",
        "| variant | compute (SD1.5 TFLOP) | share of paper | held-out reward | minus paper | win rate vs paper |"
        " reaches paper? |",
        "|---|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in res["train"]:
        w = r["win_rate_vs_paper"]
        lines.append(
            f"| {r['variant']} | {r['tflop_sd15']:,.0f} | {r['compute_fraction']:.2f} | {_ci(r['mean'])} | "
            f"{'—' if r['variant'] == 'paper' else _ci(r['diff_vs_paper'], True)} | "
            f"{'—' if r['variant'] == 'paper' else format(w['rate'], '.2f')} | "
            f"{'yes' if r['reaches_paper'] else 'no'} |"
        )
    lines.append(
        f"| null (untrained) | 0 | 0 | {_ci(res['null']['mean'])} | {_ci(res['null']['diff_vs_paper'], True)} | | |"
    )
    if res["tune"]:
        t = res["tune"]
        lines += [
            "",
            f"Per-sample tuning from the paper recipe's embedding, {t[0]['prompts']} held-out prompts, one "
            "seed each; gain = the kept negative's reward at 30 sampling steps minus the start's, same seed.",
            "",
            "| tune | UNet calls | share of today | mean gain [95 % CI] | share of today's gain | worse than start |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in t:
            lines.append(
                f"| {r['variant']} | {r['unet_calls']:.0f} | {r['calls_fraction']:.2f} | "
                f"{_ci(r['gain'], True)} | {r['gain_share']:.2f} | {r['worse_than_start']}/{r['prompts']} |"
            )
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if res["tune"] else 1, figsize=(12 if res["tune"] else 7, 4.5), squeeze=False)
    ax = axes[0][0]
    for r in res["train"]:
        m = r["mean"]
        err = [[m["mean"] - m["lo"]], [m["hi"] - m["mean"]]] if m.get("lo") is not None else None
        ax.errorbar(
            [r["tflop_sd15"] / 1e3],
            [m["mean"]],
            yerr=err,
            fmt="o",
            capsize=3,
            color="black" if r["variant"] == "paper" else None,
        )
        ax.annotate(
            r["variant"], (r["tflop_sd15"] / 1e3, m["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8
        )
    ax.axhline(res["null"]["mean"]["mean"], color="grey", ls=":", lw=1, label="null negative")
    paper = next(r for r in res["train"] if r["variant"] == "paper")
    ax.axvline(paper["tflop_sd15"] / 3e3, color="tab:red", ls="--", lw=1, label="1/3 of the paper's compute")
    ax.set_xlabel("training compute (PFLOP at SD1.5 512 px, metered)")
    ax.set_ylabel("held-out reward (demo HPS), 95 % CI")
    ax.set_title("global negative: reward vs compute")
    ax.legend(fontsize=8, loc="lower right")
    if res["tune"]:
        ax = axes[0][1]
        for r in res["tune"]:
            g = r["gain"]
            err = [[g["mean"] - g["lo"]], [g["hi"] - g["mean"]]] if g.get("lo") is not None else None
            ax.errorbar([r["unet_calls"]], [g["mean"]], yerr=err, fmt="s", capsize=3)
            ax.annotate(
                r["variant"], (r["unet_calls"], g["mean"]), textcoords="offset points", xytext=(5, 4), fontsize=8
            )
        t0 = res["tune"][0]
        ax.axvline(t0["unet_calls"] / 3, color="tab:red", ls="--", lw=1, label="1/3 of today's UNet calls")
        ax.axhline(0.9 * t0["gain"]["mean"], color="tab:green", ls=":", lw=1, label="90 % of today's gain")
        ax.set_xlabel("UNet calls per tune (metered)")
        ax.set_ylabel("reward gain at 30 steps, 95 % CI")
        ax.set_title("per-sample tune: gain vs UNet calls")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())

"""The negative predictor against the global negative and per-sample tuning, on the demo world.

    python benchmarks/predictor_study.py --quick          # 2 training seeds, very short runs at 10 sampling steps
    python benchmarks/predictor_study.py --quick --features centred mean --seeds 0 1 2 3 4   # docs/predictor.md
    python benchmarks/predictor_study.py --seeds 0 1 2 --archs xattn --predictor-steps 80 --eval-seeds 4 --tune-prompts 16  # docs/predictor.md
    python benchmarks/predictor_study.py                   # the full study: 10 seeds at the demo recipe (not yet run)

``--quick`` with both features took 8 to 15 s a training run and about 20 s of scoring per training seed
on one thread of a 2-core machine (an earlier run, on the same machine far busier, took 6 to 8 min a run);
its figures are in docs/predictor.md.

For each training seed S: ``global-sS`` is the demo recipe's global negative (``reneg train --demo --seed
S``, shortened by ``--steps``/``--batch-size``); for each architecture A and ``--features`` F, ``A-F-sS`` is
``reneg train --demo --seed S --predictor A --predictor-features F --init global-sS/embedding.safetensors``
(``--predictor-steps`` more steps, warm started from that global negative). ``--features centred mean``
trains both and compares them, paired. Everything is scored on the demo world's 32 held-out prompts, which no
run trains on, x ``--eval-seeds`` fixed image seeds (the same noise for every negative):

- predictor - global (the global negative it started from), and predictor - its own global part alone
  (the run's ``embedding.safetensors``: the same steps, without the prompt-dependent correction), paired on
  (training seed, prompt, image seed), 95 % Student-t intervals;
- what the predictors learned (training seed ``--seeds[0]``'s): the cosine between two held-out prompts'
  features (what the read-in sees) and corrections, over all pairs (mean and the least alike pair);
- per-sample tuning on ``--tune-prompts`` held-out prompts (one image seed each): from the global negative
  at the full budget (at most ``--tune-steps`` steps, patience 3) and at a third of it, and from the
  predictor's negative at a third of it; each gain is the kept negative's image minus the global
  negative's image of the same prompt and seed, and the predictor's own gain (zero UNet calls of search)
  is measured on the same images. The goals: predictor gain >= half the full tune's gain; the tune from
  the predictor at a third of the calls >= the full tune's gain;
- the prompt's part of a tune's gain: each full tune's kept negative on the ``--eval-seeds`` image seeds of
  its prompt (seeds it was not tuned on), minus the global negative (and each predictor) on the same images:
  what a per-prompt negative can hope to keep of a per-image search.

Outputs under ``--out`` (default ``runs/predictor-study``): ``train/`` (the runs; a finished run is reused),
``study.json`` and ``table.md``.
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


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def train(world: dict, s: dict, out: str, **over) -> dict:
    from benchmarks.compute_study import demo_train_config
    from reneg.trainer.train import run_train

    s = dict(s, **over)
    s.update(eval_every=0, checkpoint_every=max(1, s["steps"]))
    done = os.path.join(out, "summary.json")
    if os.path.isfile(done):
        with open(done, encoding="utf-8") as f:
            summary = json.load(f)
        if summary.get("status") == "finished":
            # a finished run is reused only for the settings asked for now
            old = summary.get("config") or {}
            diff = [k for k, v in s.items() if k in old and _plain(old[k]) != _plain(v)]
            if diff:
                raise SystemExit(f"{out}: a finished run with other settings ({', '.join(diff)}); use another --out")
            log(f"reused {os.path.basename(out)} (trained in {summary.get('seconds', 0):.0f} s)")
            return summary
    cfg = demo_train_config(world, out, s)
    t0 = time.time()
    summary = run_train(cfg)
    log(f"trained {os.path.basename(out)} in {time.time() - t0:.0f} s")
    return summary


def _plain(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/predictor_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "predictor-study"))
    p.add_argument(
        "--quick",
        action="store_true",
        help="a check that the study runs, not a result: 2 seeds, 8 steps x 8 samples, 10 sampling steps, "
        "1 image seed, 4 tuned prompts (6 tune steps)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0-9; quick 0 1)")
    p.add_argument("--archs", nargs="+", default=["lowrank", "xattn"])
    p.add_argument(
        "--features",
        nargs="+",
        choices=("centred", "mean"),
        default=["mean"],
        help="--predictor-features of the predictor runs (default mean, the trainer's; centred mean: both, compared paired)",
    )
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--reg", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=None, help="global run's steps (demo: 160; quick: 8)")
    p.add_argument("--batch-size", type=int, default=None, help="samples per step (demo: 16; quick: 8)")
    p.add_argument(
        "--sampling-steps",
        type=int,
        default=None,
        help="DDIM steps everywhere, grad range scaled (demo: 30; quick: 10)",
    )
    p.add_argument("--predictor-steps", type=int, default=None, help="predictor's steps (default: as --steps)")
    p.add_argument("--predictor-lr", type=float, default=None, help="predictor's lr (default: the demo's)")
    p.add_argument("--eval-seeds", type=int, default=None, help="image seeds per held-out prompt (8; quick 1)")
    p.add_argument("--tune-prompts", type=int, default=None, help="held-out prompts tuned (32; quick 4)")
    p.add_argument(
        "--tune-steps", type=int, default=None, help="the full tune's max steps (10; quick 6); a third: a third"
    )
    p.add_argument("--threads", type=int, default=2)
    ns = p.parse_args(argv)
    q = ns.quick
    seeds = ns.seeds or ([0, 1] if q else list(range(10)))
    eval_seeds = ns.eval_seeds or (1 if q else 8)
    tune_prompts = ns.tune_prompts if ns.tune_prompts is not None else (4 if q else 32)
    ns.tune_steps = ns.tune_steps or (6 if q else 10)
    torch.set_num_threads(ns.threads)
    t_start = time.time()
    from benchmarks.compute_study import demo_world

    world = demo_world(ns.out)
    from reneg.demo import train_settings

    st = train_settings(world["settings"])
    st["steps"] = ns.steps or (8 if q else st["steps"])
    sampling = ns.sampling_steps or (10 if q else st["sampling_steps"])
    if sampling != st["sampling_steps"]:  # the grad range (the last 11 of 30) scaled to the step count
        lo, hi = st["grad_range"]
        scale = sampling / st["sampling_steps"]
        st["sampling_steps"], st["grad_range"] = (
            sampling,
            (round(lo * scale), max(round(lo * scale), round(hi * scale))),
        )
    st["batch_size"] = ns.batch_size or (8 if q else st["batch_size"])
    st["micro_batch"] = min(st["micro_batch"], st["batch_size"])
    psteps = ns.predictor_steps or st["steps"]
    plr = ns.predictor_lr or st["lr"]
    tune_lr = world["settings"].get("tune_lr", st["lr"])
    root = os.path.join(ns.out, "train")
    log(
        f"recipe: {st['steps']} steps x {st['batch_size']} samples, {st['sampling_steps']} sampling steps, grad "
        f"range {tuple(st['grad_range'])}; predictor {psteps} steps at lr {plr}"
    )
    variants = [(f"{a}-{f}", a, f) for a in ns.archs for f in ns.features]  # (name, architecture, features)
    runs = {}
    for seed in seeds:
        g = train(world, st, os.path.join(root, f"global-s{seed}"), seed=seed)
        runs[("global", seed)] = g
        for v, a, f in variants:
            runs[(v, seed)] = train(
                world,
                st,
                os.path.join(root, f"{v}-s{seed}"),
                seed=seed,
                steps=psteps,
                lr=plr,
                init=g["embedding"],
                predictor=a,
                predictor_rank=ns.rank,
                predictor_reg=ns.reg,
                predictor_features=f,
            )

    from reneg.backends.loading import load_diffusers
    from reneg.compute import ComputeMeter
    from reneg.embedding import load_embedding
    from reneg.evaluation.stats import mean_ci, paired_differences, win_rate
    from reneg.generate import generate_and_score
    from reneg.predictor import load_predictor, predicted_scores
    from reneg.rewards import load_rewards
    from reneg.tuning import tune_for_seed

    backend = load_diffusers(world["model"], device="cpu")
    reward = load_rewards([world["reward"]], device="cpu")
    texts = world["heldout_texts"]
    prompts = [t for t in texts for _ in range(eval_seeds)]
    iseeds = [10_000 + i * 97 + k for i in range(len(texts)) for k in range(eval_seeds)]
    args = (st["sampling_steps"], st["guidance"], st["resolution"], st["resolution"], st["eval_batch"])

    def emb_scores(path, ps=prompts, ss=iseeds):
        e = load_embedding(path)
        return generate_and_score(backend, reward, ps, ss, backend.negative_cond(e.model_rows()), *args).tolist()

    names = [v for v, _, _ in variants]
    scores = {k: [] for k in ["null", "global"] + [f"{v}{x}" for v in names for x in ("", "-base")]}
    null, _ = backend.null_embedding()
    null_s = generate_and_score(backend, reward, prompts, iseeds, backend.negative_cond(null), *args).tolist()
    per_prompt_moves = {v: {} for v in names}
    per_seed = {v: {} for v in names}  # training seed -> predictor - global on that seed's images
    learned = {}  # training seed 0's predictors: how alike two held-out prompts' features and corrections are
    for seed in seeds:
        t0 = time.time()
        scores["null"] += null_s
        scores["global"] += emb_scores(runs[("global", seed)]["embedding"])
        for a in names:
            model = load_predictor(runs[(a, seed)]["predictor_file"])
            scores[a] += predicted_scores(backend, reward, model, prompts, iseeds, *args).tolist()
            scores[f"{a}-base"] += emb_scores(runs[(a, seed)]["embedding"])
            n = len(prompts)
            per_seed[a][seed] = mean_ci(paired_differences(scores[a][-n:], scores["global"][-n:]))
            # what it learned: how far each held-out prompt's negative moves from the global part
            with torch.no_grad():
                c = backend.encode_prompts(texts)
                delta, _ = model.correction(c.crossattn, c.pooled, c.mask)
                for t, d in zip(texts, delta.flatten(1).norm(dim=1).tolist()):
                    per_prompt_moves[a].setdefault(t, []).append(d / float(model.base.norm()))
                if seed == seeds[0]:
                    learned[a] = {
                        "features": _cosines(model.features(c.crossattn, c.pooled, c.mask)),
                        "corrections": _cosines(delta.flatten(1)),
                    }
        log(f"scored seed {seed} ({time.time() - t0:.0f} s)")

    def cmp(a, b):
        d = paired_differences(scores[a], scores[b])
        return {"diff": mean_ci(d), "win_rate": win_rate(scores[a], scores[b])}

    result = {
        "seeds": seeds,
        "eval_seeds": eval_seeds,
        "heldout_prompts": len(texts),
        "recipe": {k: st[k] for k in ("steps", "batch_size", "lr", "sampling_steps", "grad_range")},
        "predictor": {"steps": psteps, "lr": plr, "rank": ns.rank, "reg": ns.reg},
        "means": {k: mean_ci(v) for k, v in scores.items()},
        "global_vs_null": cmp("global", "null"),
        "features": ns.features,
        "arch": {
            a: {
                "vs_global": cmp(a, "global"),
                "vs_own_base": cmp(a, f"{a}-base"),
                "base_vs_global": cmp(f"{a}-base", "global"),
                "parameters": load_predictor(runs[(a, seeds[0])]["predictor_file"]).num_parameters(),
                "train_seconds": sum(runs[(a, s)]["seconds"] for s in seeds) / len(seeds),
                "per_seed_vs_global": {str(k): v for k, v in per_seed[a].items()},
                "worst_seed": min(per_seed[a].items(), key=lambda kv: kv[1]["mean"])[0],
                "moves": sorted(((t, sum(v) / len(v)) for t, v in per_prompt_moves[a].items()), key=lambda x: -x[1]),
                "cosines": learned[a],
            }
            for a in names
        },
        # centred - mean features of the same architecture, paired (when both were trained)
        "centred_vs_mean": {
            a: cmp(f"{a}-centred", f"{a}-mean") for a in ns.archs if {"centred", "mean"} <= set(ns.features)
        },
        "global_train_seconds": sum(runs[("global", s)].get("seconds", 0) for s in seeds) / len(seeds),
    }

    # --- per-sample tuning: full, a third, and a third from the predictor's negative (training seed 0's runs)
    tune = {}
    if tune_prompts:
        seed = seeds[0]
        gpath = runs[("global", seed)]["embedding"]
        gstart = load_embedding(gpath).model_rows()
        items = [(texts[i * len(texts) // tune_prompts], 20_000 + i) for i in range(tune_prompts)]
        base = [emb_scores(gpath, [t], [s])[0] for t, s in items]
        third = max(1, round(ns.tune_steps / 3))

        def run_tune(label, start_of, max_steps, negatives=None):
            kept, calls, t0 = [], [], time.time()
            for text, s in items:
                meter = ComputeMeter()
                res, _ = tune_for_seed(
                    backend, reward, text, s, start_of(text), *args[:2], tuple(st["grad_range"]),
                    *args[2:4], max_steps, min(3, max_steps), tune_lr, meter=meter,
                )  # fmt: skip
                kept.append(res.final_reward if res.final_reward is not None else res.best_reward)
                calls.append(meter.unet_calls())
                if negatives is not None:
                    negatives.append(res.best.detach())
            log(f"tune {label}: {time.time() - t0:.0f} s")
            return {"kept": kept, "unet_calls": sum(calls) / len(calls)}

        tuned = []  # the full tune's kept negatives, one per item
        tune["global_full"] = run_tune("full", lambda t: gstart, ns.tune_steps, tuned)
        tune["global_third"] = run_tune("third", lambda t: gstart, third)
        for a in names:
            model = load_predictor(runs[(a, seed)]["predictor_file"])

            def pstart(text, model=model):
                c = backend.encode_prompts([text])
                with torch.no_grad():
                    return model(c.crossattn, c.pooled, c.mask)[0]

            own = []
            for text, s in items:
                own += predicted_scores(backend, reward, model, [text], [s], *args).tolist()
            tune[f"{a}_alone"] = {"kept": own, "unet_calls": 0}
            tune[f"{a}_third"] = run_tune(f"{a} third", pstart, third)
        full_gain = mean_ci(paired_differences(tune["global_full"]["kept"], base))
        rows = {}
        for k, v in tune.items():
            gain = mean_ci(paired_differences(v["kept"], base))
            rows[k] = {
                "gain_over_global": gain,
                "unet_calls": v["unet_calls"],
                "share_of_full_gain": gain["mean"] / full_gain["mean"] if full_gain["mean"] else None,
                "vs_full": mean_ci(paired_differences(v["kept"], tune["global_full"]["kept"])),
            }
        result["tune"] = {"prompts": tune_prompts, "training_seed": seed, "third_steps": third, "rows": rows}
        # How much of a tune's gain belongs to the prompt and how much to its one noise: each kept negative
        # on the --eval-seeds image seeds of its prompt (seeds it was not tuned on, the main comparison's),
        # against the global negative and the predictors on the same images. No negative read from the
        # prompt alone can be expected to keep more than the prompt's part.
        # each item's places in training seed seeds[0]'s block of the main comparison, which comes first
        where = [[texts.index(text) * eval_seeds + k for k in range(eval_seeds)] for text, _ in items]
        pos = [p for w in where for p in w]
        other = []
        for w, (text, _), neg in zip(where, items, tuned):
            ss = [iseeds[p] for p in w]
            other += generate_and_score(
                backend, reward, [text] * eval_seeds, ss, backend.negative_cond(neg), *args
            ).tolist()
        glob = [scores["global"][p] for p in pos]
        transfer = {"tuned_on_other_seeds": mean_ci(paired_differences(other, glob))}
        for a in names:
            transfer[a] = mean_ci(paired_differences([scores[a][p] for p in pos], glob))
        g = transfer["tuned_on_other_seeds"]["mean"]
        transfer["prompt_share_of_full_gain"] = g / full_gain["mean"] if full_gain["mean"] else None
        transfer["images"] = len(other)
        result["tune"]["transfer"] = transfer
    result["command"] = " ".join([sys.executable] + sys.argv)
    result["seconds"] = round(time.time() - t_start)
    from reneg.fileio import atomic_write_json, atomic_write_text

    atomic_write_json(os.path.join(ns.out, "study.json"), result)
    md = table(result)
    atomic_write_text(os.path.join(ns.out, "table.md"), md)
    print(md)
    return 0


def _cosines(x: torch.Tensor) -> dict:
    """Cosine between two rows of ``x`` over all pairs: the mean and the least alike pair."""
    u = torch.nn.functional.normalize(x.double(), dim=-1)
    c = u @ u.T
    off = c[~torch.eye(len(c), dtype=torch.bool)]
    return {"mean": float(off.mean()), "least": float(off.min())}


def _label(name: str) -> str:
    a, _, f = name.rpartition("-")
    return f"`{a}`, {f}"


def _ci(d: dict) -> str:
    if d.get("lo") is None:
        return f"{d['mean']:+.4f}"
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def table(r: dict) -> str:
    n = len(r["seeds"]) * r["heldout_prompts"] * r["eval_seeds"]
    out = [
        f"Held-out: {r['heldout_prompts']} prompts x {r['eval_seeds']} image seeds x {len(r['seeds'])} training "
        f"seeds = {n} paired images per row. Global: {r['recipe']['steps']} steps x {r['recipe']['batch_size']} "
        f"samples at {r['recipe']['sampling_steps']} sampling steps; predictor: {r['predictor']['steps']} more steps from it (rank {r['predictor']['rank']}, "
        f"reg {r['predictor']['reg']}).",
        "",
        "| negative | mean reward | vs the global negative [95 % CI] | vs its own global part [95 % CI] | "
        "win rate vs global |",
        "|---|---:|---:|---:|---:|",
        f"| null | {r['means']['null']['mean']:.4f} | {_ci(_neg(r['global_vs_null']['diff']))} | | |",
        f"| learned global | {r['means']['global']['mean']:.4f} | — | | |",
    ]
    for a, v in r["arch"].items():
        out.append(
            f"| predictor {_label(a)} ({v['parameters']} parameters) | {r['means'][a]['mean']:.4f} | "
            f"{_ci(v['vs_global']['diff'])} | {_ci(v['vs_own_base']['diff'])} | "
            f"{v['vs_global']['win_rate']['rate']:.2f} |"
        )
        out.append(
            f"| its global part alone | {r['means'][a + '-base']['mean']:.4f} | {_ci(v['base_vs_global']['diff'])} | | |"
        )
    for a, v in r["arch"].items():
        w = v["worst_seed"]
        per = "; ".join(f"seed {k}: {_ci(d)}" for k, d in v["per_seed_vs_global"].items())
        out += ["", f"{_label(a)} - global per training seed ({r['heldout_prompts'] * r['eval_seeds']} paired images "
                f"each): {per}; worst: seed {w}."]  # fmt: skip
    for a, d in r.get("centred_vs_mean", {}).items():
        out += ["", f"`{a}` centred - `{a}` mean, paired: {_ci(d['diff'])}, win rate {d['win_rate']['rate']:.2f}."]
    t = r.get("tune")
    if t:
        out += [
            "",
            f"Per-sample tuning on {t['prompts']} held-out prompts (one image seed each, training seed "
            f"{t['training_seed']}); gain = kept image's reward minus the learned global negative's image:",
            "",
            "| negative | UNet calls of search / image | gain over global [95 % CI] | share of the full tune's gain |",
            "|---|---:|---:|---:|",
        ]
        names = {
            "global_full": "tune from global, full",
            "global_third": f"tune from global, a third ({t['third_steps']} steps)",
        }
        for k, v in t["rows"].items():
            label = names.get(k) or (
                f"predictor {_label(k[:-6])} alone"
                if k.endswith("_alone")
                else f"tune from predictor {_label(k[:-6])}, a third"
            )
            share = "" if v["share_of_full_gain"] is None else f"{v['share_of_full_gain']:.2f}"
            out.append(f"| {label} | {v['unet_calls']:.0f} | {_ci(v['gain_over_global'])} | {share} |")
        tr = t.get("transfer")
        if tr:
            share = tr["prompt_share_of_full_gain"]
            preds = "; ".join(
                f"predictor {_label(a)} {_ci(d)}"
                for a, d in tr.items()
                if isinstance(d, dict) and a != "tuned_on_other_seeds"
            )
            out += [
                "",
                f"The prompt's part of a tune's gain: each full tune's kept negative on {tr['images'] // t['prompts']} "
                f"other image seeds of its prompt ({tr['images']} images), minus the global negative on the same "
                f"images: {_ci(tr['tuned_on_other_seeds'])}"
                + ("" if share is None else f", {share:.2f} of the full tune's gain on its own image")
                + f"; on the same images {preds}.",
            ]
    for a, v in r["arch"].items():
        top = ", ".join(f"{t!r} {m:.3f}" for t, m in v["moves"][:3])
        low = ", ".join(f"{t!r} {m:.3f}" for t, m in v["moves"][-3:])
        out += ["", f"{_label(a)}: correction norm / global norm, most moved: {top}; least: {low}."]
        cf, cc = v["cosines"]["features"], v["cosines"]["corrections"]
        out.append(
            f"Cosine between two held-out prompts (training seed {r['seeds'][0]}): features {cf['mean']:.2f} "
            f"(least alike {cf['least']:.2f}), corrections {cc['mean']:.2f} (least alike {cc['least']:.2f})."
        )
    return "\n".join(out) + "\n"


def _neg(d: dict) -> dict:
    return {k: (-v if isinstance(v, float) and k in ("mean",) else v) for k, v in d.items()} | (
        {"lo": -d["hi"], "hi": -d["lo"]} if d.get("lo") is not None else {}
    )


if __name__ == "__main__":
    sys.exit(main())

"""The demo's headline and the cheap recipe, on many training seeds, through the user's own commands.

    python benchmarks/seed_study.py --seeds 0 1 2 3 4 5 6 7 8 9 --jobs 2
    python benchmarks/seed_study.py --seeds 5 --variant "paper=" --variant "fast=--recipe fast"

For every training seed and every variant it runs exactly what a user runs,

    reneg train --demo --seed S --out OUT/train/VARIANT-sS [the variant's flags]

then scores every embedding with ``reneg eval --demo`` (the README's second command, with its
negatives replaced: null, the handcrafted negative, and every embedding trained here), on the demo's
128 held-out prompts x 8 image seeds (the same noise for every negative), with the training reward (the
headline) and the held-out judges (their own table: each variant's lead over handcrafted under each). Per training seed it
reports, paired on (prompt, image seed), with 95 % Student-t intervals (``reneg.evaluation.stats``):

- the demo's headline for the first variant: learned - handcrafted, handcrafted - null, and whether
  learned > handcrafted > null holds with both intervals above 0 and learned's gain over null is at
  least twice handcrafted's;
- every other variant against the first (the paper recipe) and against null: whether it is not below
  the paper recipe by more than its interval (the interval of the difference reaches 0) and above null.

Variants are named by the flags they add (``--variant NAME=FLAGS``; default ``paper=`` and
``fast=--recipe fast``), and the table shows the flags beside the name. ``--jobs`` commands run at
once, each on ``--threads`` torch threads (on 2 cores: 2 jobs of 1 thread). A finished training run
or evaluation is reused when the study is run again. Writes ``OUT/study.json`` and ``OUT/table.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_VARIANTS = ["paper=", "fast=--recipe fast"]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name.strip():
        raise SystemExit(f"--variant {text!r}: expected NAME=FLAGS (FLAGS may be empty: paper=)")
    flags = shlex.split(flags)
    for f in flags:
        if f in ("--seed", "--out", "--demo", "--threads"):
            raise SystemExit(f"--variant {text!r}: {f} is set by the study")
    return name.strip(), flags


def reneg_command() -> list[str]:
    return [sys.executable, "-c", "import sys; from reneg.cli import main; sys.exit(main())"]


def finished(folder: str) -> dict | None:
    path = os.path.join(folder, "summary.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        s = json.load(f)
    return s if s.get("status") == "finished" else None


def run(cmd: list[str], logfile: str) -> float:
    t0 = time.time()
    os.makedirs(os.path.dirname(logfile), exist_ok=True)
    with open(logfile, "w", encoding="utf-8") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        raise SystemExit(f"{' '.join(cmd)} failed (exit {rc}); see {logfile}")
    return time.time() - t0


def train_demo(
    root: str, name: str, flags: list[str], seed: int, threads: int, command: list[str] | None = None
) -> dict:
    """``reneg train --demo --seed S --out ROOT/train/NAME [flags]`` (``command``: what runs ``reneg``), its
    summary.json; a finished run is reused, a stopped one resumed."""
    out = os.path.join(root, "train", name)
    s = finished(out)
    if s is None:
        resume = ["--resume"] if os.path.isfile(os.path.join(out, "checkpoint.pt")) else ["--overwrite"]
        cmd = (command or reneg_command()) + ["train", "--demo", "--seed", str(seed), "--out", out]
        cmd += ["--threads", str(threads), "--no-progress", *resume, *flags]
        secs = run(cmd, os.path.join(root, "logs", f"train-{name}.log"))
        s = finished(out)
        if s is None:
            raise SystemExit(f"{out}: training ended without a finished summary.json")
        log(f"trained {name} in {secs:.0f} s")
    return s


def eval_group(root: str, group: int, negatives: list[str], threads: int, images_per_prompt: int) -> str:
    out = os.path.join(root, "eval", f"group-{group}")
    done = os.path.join(out, "scores.csv")
    marker = os.path.join(out, "negatives.json")
    if os.path.isfile(done) and os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            if json.load(f) == negatives:
                return done
    cmd = reneg_command() + ["eval", "--demo", "--out", out, "--threads", str(threads), "--no-progress"]
    cmd += ["--images-per-prompt", str(images_per_prompt)]
    for n in negatives:
        cmd += ["--negative", n]
    secs = run(cmd, os.path.join(root, "logs", f"eval-{group}.log"))
    with open(marker, "w", encoding="utf-8") as f:
        json.dump(negatives, f)
    log(f"evaluated group {group} ({len(negatives)} negatives) in {secs:.0f} s")
    return done


def scores_by_reward(paths: list[str]) -> dict[str, dict[str, dict[tuple[int, int], float]]]:
    """``{reward: {negative: {(prompt_index, seed): score}}}``, the rewards in the files' order: the
    training reward first (``reneg eval --demo`` scores with it, then with the held-out judges)."""
    from reneg.evaluation.scoring import read_scores_csv

    out: dict[str, dict[str, dict[tuple[int, int], float]]] = {}
    for p in paths:
        for r in read_scores_csv(p):
            out.setdefault(r["reward"], {}).setdefault(r["negative"], {})[(r["prompt_index"], r["seed"])] = r["score"]
    return out


def paired(a: dict, b: dict) -> dict:
    from reneg.evaluation.stats import mean_ci

    keys = sorted(set(a) & set(b))
    return mean_ci([a[k] - b[k] for k in keys])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/seed_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "seed-study"))
    p.add_argument("--seeds", type=int, nargs="+", default=list(range(10)), help="training seeds")
    p.add_argument(
        "--variant", action="append", default=None, help="NAME=FLAGS (repeatable); the first is the reference"
    )
    p.add_argument("--jobs", type=int, default=2, help="commands run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per command")
    p.add_argument(
        "--images-per-prompt",
        type=int,
        default=None,
        help="image seeds per held-out prompt (default: eval --demo's, 8)",
    )
    ns = p.parse_args(argv)
    variants = [parse_variant(v) for v in (ns.variant or DEFAULT_VARIANTS)]
    names = [n for n, _ in variants]
    if len(set(names)) != len(names):
        raise SystemExit("--variant: two variants share a name")
    from reneg import demo

    if demo._world() is None:
        raise SystemExit("the demo world's assets are missing (reneg/demo_world/assets)")
    if ns.images_per_prompt is None:
        ns.images_per_prompt = demo.WORLD_SETTINGS["eval_images_per_prompt"]
    os.makedirs(ns.out, exist_ok=True)

    # training: the longest runs first, so that the jobs end together
    work = [(n, f, s) for s in ns.seeds for n, f in variants]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=ns.jobs) as pool:
        futures = {(n, s): pool.submit(train_demo, ns.out, f"{n}-s{s}", f, s, ns.threads) for n, f, s in work}
        summaries = {k: f.result() for k, f in futures.items()}
    log(f"training done ({time.time() - t0:.0f} s)")

    # evaluation: the embeddings split over the jobs, null and handcrafted in the first group only
    embs = [f"{n}-s{s}={summaries[(n, s)]['embedding']}" for n, _, s in work]
    groups = [[] for _ in range(max(1, min(ns.jobs, len(embs))))]
    for i, e in enumerate(embs):
        groups[i % len(groups)].append(e)
    groups[0] = ["null", "handcrafted"] + groups[0]
    with ThreadPoolExecutor(max_workers=len(groups)) as pool:
        paths = list(
            pool.map(lambda g: eval_group(ns.out, g[0], g[1], ns.threads, ns.images_per_prompt), enumerate(groups))
        )
    by_reward = scores_by_reward(paths)
    rewards = list(by_reward)
    sc = by_reward[rewards[0]]  # the training reward: the headline

    ref = names[0]
    null, hand = sc["null"], sc["handcrafted"]
    per_seed = []
    for s in ns.seeds:
        learned = sc[f"{ref}-s{s}"]
        row = {
            "seed": s,
            "learned_minus_handcrafted": paired(learned, hand),
            "handcrafted_minus_null": paired(hand, null),
            "learned_minus_null": paired(learned, null),
            "variants": {},
        }
        gl, gh = row["learned_minus_null"]["mean"], row["handcrafted_minus_null"]["mean"]
        row["gain_ratio"] = gl / gh if gh > 0 else None
        row["headline_holds"] = bool(
            row["learned_minus_handcrafted"]["lo"] > 0
            and row["handcrafted_minus_null"]["lo"] > 0
            and row["gain_ratio"] is not None
            and row["gain_ratio"] >= 2
        )
        for n in names[1:]:
            v = sc[f"{n}-s{s}"]
            d = paired(v, learned)
            dn = paired(v, null)
            row["variants"][n] = {
                "mean": sum(v.values()) / len(v),
                "minus_reference": d,
                "minus_null": dn,
                "reaches_reference": d["hi"] >= 0,
                "above_null": dn["lo"] > 0,
            }
        row["reference_mean"] = sum(learned.values()) / len(learned)
        # the held-out judges' view of each variant: its lead over the handcrafted negative under each
        row["judges"] = {
            j: {n: paired(by_reward[j][f"{n}-s{s}"], by_reward[j]["handcrafted"]) for n in names} for j in rewards[1:]
        }
        per_seed.append(row)
    result = {
        "seeds": ns.seeds,
        "variants": {n: f for n, f in variants},
        "images_per_prompt": ns.images_per_prompt,
        "heldout_prompts": len({k[0] for k in null}),
        "reward": rewards[0],
        "judges": rewards[1:],
        "null_mean": sum(null.values()) / len(null),
        "handcrafted_mean": sum(hand.values()) / len(hand),
        "per_seed": per_seed,
        "train_seconds": {
            f"{n}-s{s}": summaries[(n, s)].get("seconds") for n, _, s in work if summaries[(n, s)].get("seconds")
        },
        "command": " ".join([sys.executable] + sys.argv),
    }
    save(ns.out, "study.json", result, table(result))
    return 0


def save(out: str, name: str, result: dict, md: str) -> None:
    """``OUT/NAME`` (the figures) and ``OUT/table.md`` (the tables, also printed), each written atomically."""
    from reneg.fileio import atomic_write_json, atomic_write_text

    atomic_write_json(os.path.join(out, name), result)
    atomic_write_text(os.path.join(out, "table.md"), md)
    print(md)


def _ci(d: dict) -> str:
    return f"{d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]"


def _ratio(v) -> str:
    """The gain ratio as the table shows it: none when handcrafted gains nothing over null."""
    return "— (handcrafted <= null)" if v is None else f"{v:.2f}"


def table(res: dict) -> str:
    names = list(res["variants"])
    ref = names[0]
    flags = lambda n: " ".join(res["variants"][n]) or "(the demo's recipe)"  # noqa: E731
    lines = [
        f"Null {res['null_mean']:.4f}, handcrafted {res['handcrafted_mean']:.4f} (the same images on every row); "
        f"{res.get('heldout_prompts', 32)} held-out prompts x {res['images_per_prompt']} image seeds, paired, "
        "95 % Student-t intervals.",
        "",
        f"**{ref}** (`reneg train --demo --seed S {flags(ref)}`): the demo's headline per training seed",
        "",
        "| seed | learned | learned - handcrafted | handcrafted - null | learned - null | gain ratio | holds |",
        "|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in res["per_seed"]:
        lines.append(
            f"| {r['seed']} | {r['reference_mean']:.4f} | {_ci(r['learned_minus_handcrafted'])} | "
            f"{_ci(r['handcrafted_minus_null'])} | {_ci(r['learned_minus_null'])} | "
            f"{_ratio(r['gain_ratio'])} | {'yes' if r['headline_holds'] else '**no**'} |"
        )
    worst = min(res["per_seed"], key=lambda r: r["learned_minus_handcrafted"]["mean"])
    lines += [
        "",
        f"Worst seed for learned - handcrafted: {worst['seed']} ({_ci(worst['learned_minus_handcrafted'])}); "
        f"headline holds on {sum(r['headline_holds'] for r in res['per_seed'])} of {len(res['per_seed'])} seeds.",
    ]
    judges = res.get("judges") or []
    if judges:
        lines += [
            "",
            f"Under the held-out judges (never trained on): each variant's learned - handcrafted, per training seed "
            f"(the table above is under {res.get('reward', 'the training reward')})",
            "",
            "| seed | " + " | ".join(f"{n}: {j}" for j in judges for n in names) + " |",
            "|---:|" + "---:|" * (len(judges) * len(names)),
        ]
        for r in res["per_seed"]:
            cells = [_ci(r["judges"][j][n]) for j in judges for n in names]
            lines.append(f"| {r['seed']} | " + " | ".join(cells) + " |")
    for n in names[1:]:
        lines += [
            "",
            f"**{n}** (`{flags(n)}`) against {ref} and null, per training seed",
            "",
            f"| seed | {ref} | {n} | {n} - {ref} | {n} - null | reaches {ref} | above null |",
            "|---:|---:|---:|---:|---:|:---:|:---:|",
        ]
        rows = [(r, r["variants"][n]) for r in res["per_seed"]]
        for r, v in rows:
            lines.append(
                f"| {r['seed']} | {r['reference_mean']:.4f} | {v['mean']:.4f} | {_ci(v['minus_reference'])} | "
                f"{_ci(v['minus_null'])} | {'yes' if v['reaches_reference'] else '**no**'} | "
                f"{'yes' if v['above_null'] else '**no**'} |"
            )
        w = min(rows, key=lambda rv: rv[1]["minus_reference"]["mean"])
        lines += [
            "",
            f"Worst seed for {n}: {w[0]['seed']} ({_ci(w[1]['minus_reference'])} against {ref}); reaches {ref} on "
            f"{sum(v['reaches_reference'] for _, v in rows)} of {len(rows)} seeds, above null on "
            f"{sum(v['above_null'] for _, v in rows)}.",
        ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

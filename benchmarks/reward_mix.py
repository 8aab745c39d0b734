"""Does a mix of rewards resist reward hacking better than one reward? Measured on the demo world.

    python benchmarks/reward_mix.py --seeds 0 1 --jobs 2 --threads 1

Two training objectives, each run exactly as ``reneg train --demo --seed S`` with only its rewards
replaced (the trainer takes several ``--reward`` specs and optimises their weighted sum):

- ``reward``: the demo's reward alone (the demo's own objective);
- ``mix``: the demo's reward and the held-out ``judge`` at weight 0.5 each.

Both are watched by the same two monitors (``--monitor-reward``: ``hpsv2-judge`` and ``hpsv2-referee``);
the ``referee`` (a convolutional network, where the two others are ViTs) is held out from both
objectives, so it is the one that can tell whether mixing in a second reward kept the negative closer to
the preference. Two regimes, each on every ``--seeds``:

- ``normal``: the demo's recipe; both embeddings then scored with ``reneg eval --demo`` on its 32
  held-out prompts x 16 image seeds under every reward (paired on prompt and seed, 95 % Student-t
  intervals): learned - handcrafted under the reward, the judge and the referee;
- ``overtrain``: the over-trained run of docs/demo-world.md (``--rollout-steps 6 --batch-size 16
  --lr-schedule constant --steps 480 --eval-every 40``: three times the steps at a constant lr); from its ``log.csv`` and ``summary.json``: the referee's
  best held-out check, where it ended, the end against its null, and the warnings given.

Writes ``OUT/result.json`` and ``OUT/table.md``; finished runs are reused when run again.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.seed_study import _ci, eval_group, log, paired, save, scores_by_reward, train_demo  # noqa: E402

OVERTRAIN = [
    "--rollout-steps",
    "6",
    "--batch-size",
    "16",
    "--lr-schedule",
    "constant",
    "--steps",
    "480",
    "--eval-every",
    "40",
]
REGIMES = {"normal": [], "overtrain": OVERTRAIN}


def objectives() -> dict[str, list[str]]:
    from reneg import demo_world

    reward = f"hpsv2={demo_world.reward_checkpoint()},config={demo_world.reward_config()}"
    judges = {name: f"hpsv2={ckpt},config={config}" for name, ckpt, config in demo_world.judges()}
    if "judge" not in judges or "referee" not in judges:
        raise SystemExit("the demo world's judges are missing (reneg/demo_world/assets/judge, referee)")
    return {"reward": [reward], "mix": [f"{reward},weight=0.5", f"{judges['judge']},weight=0.5"]}


def monitors() -> list[str]:
    from reneg import demo_world

    return [f"hpsv2={ckpt},config={config}" for _name, ckpt, config in demo_world.judges()]


def child(spec_file: str, argv: list[str]) -> int:
    """Run ``reneg train --demo ...`` with the demo's rewards and monitors replaced by the file's."""
    with open(spec_file, encoding="utf-8") as f:
        spec = json.load(f)
    from reneg import cli

    apply_demo = cli._apply_demo

    def apply(ns, kind):
        apply_demo(ns, kind)
        ns.rewards, ns.monitor_rewards = list(spec["rewards"]), list(spec["monitors"])

    cli._apply_demo = apply
    return cli.main(argv)


def train_one(root: str, regime: str, objective: str, seed: int, threads: int) -> dict:
    """The demo's training with the objective's rewards (this script as a child that replaces them)."""
    spec = os.path.join(root, "specs", f"{objective}.json")
    child = [sys.executable, os.path.abspath(__file__), "--child", spec, "--"]
    return train_demo(root, f"{objective}-{regime}-s{seed}", REGIMES[regime], seed, threads, command=child)


def trajectory(folder: str, monitor: str) -> list[tuple[int, float]]:
    """``(step, value)`` of a monitor's held-out checks of the learned negative, from log.csv."""
    col = f"heldout_{monitor}_learned"
    out = []
    with open(os.path.join(folder, "log.csv"), newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            if r.get(col):
                out.append((int(r["step"]), float(r[col])))
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1], argv[3:])
    p = argparse.ArgumentParser(prog="benchmarks/reward_mix.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "reward-mix"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds")
    p.add_argument("--regimes", nargs="+", default=list(REGIMES), choices=list(REGIMES))
    p.add_argument("--jobs", type=int, default=2, help="commands run at once")
    p.add_argument("--threads", type=int, default=1, help="torch threads per command")
    ns = p.parse_args(argv)
    os.makedirs(os.path.join(ns.out, "specs"), exist_ok=True)
    objs, mons = objectives(), monitors()
    for name, rewards in objs.items():
        with open(os.path.join(ns.out, "specs", f"{name}.json"), "w", encoding="utf-8") as f:
            json.dump({"rewards": rewards, "monitors": mons}, f)

    work = [(r, o, s) for r in ns.regimes for s in ns.seeds for o in objs]
    t0 = time.time()
    with ThreadPoolExecutor(max_workers=ns.jobs) as pool:
        futures = {w: pool.submit(train_one, ns.out, *w, ns.threads) for w in work}
        summaries = {w: f.result() for w, f in futures.items()}
    log(f"training done ({time.time() - t0:.0f} s)")

    result: dict = {"seeds": ns.seeds, "objectives": objs, "monitors": mons, "normal": [], "overtrain": []}
    if "normal" in ns.regimes:
        embs = [f"{o}-s{s}={summaries[('normal', o, s)]['embedding']}" for s in ns.seeds for o in objs]
        groups = [[] for _ in range(max(1, min(ns.jobs, len(embs))))]
        for i, e in enumerate(embs):
            groups[i % len(groups)].append(e)
        groups[0] = ["null", "handcrafted"] + groups[0]
        with ThreadPoolExecutor(max_workers=len(groups)) as pool:
            paths = list(pool.map(lambda g: eval_group(ns.out, g[0], g[1], ns.threads, 16), enumerate(groups)))
        by_reward = scores_by_reward(paths)
        for s in ns.seeds:
            for o in objs:
                row = {"seed": s, "objective": o, "minus_handcrafted": {}, "minus_null": {}, "mean": {}}
                for rw, sc in by_reward.items():
                    mine = sc[f"{o}-s{s}"]
                    row["mean"][rw] = sum(mine.values()) / len(mine)
                    row["minus_handcrafted"][rw] = paired(mine, sc["handcrafted"])
                    row["minus_null"][rw] = paired(mine, sc["null"])
                result["normal"].append(row)
            # the mix against the reward alone, paired on the same images, under every reward
            result.setdefault("mix_minus_reward", []).append(
                {"seed": s, **{rw: paired(sc[f"mix-s{s}"], sc[f"reward-s{s}"]) for rw, sc in by_reward.items()}}
            )
        result["rewards"] = list(by_reward)
    if "overtrain" in ns.regimes:
        for s in ns.seeds:
            for o in objs:
                folder = os.path.join(ns.out, "train", f"{o}-overtrain-s{s}")
                summ = summaries[("overtrain", o, s)]
                h = summ.get("heldout") or {}
                row = {"seed": s, "objective": o, "warnings": summ.get("warnings") or [], "monitors": {}}
                # a monitor that is also trained on is named apart (the mix's judge: hpsv2-judge-2)
                names = [k[: -len("_learned")] for k in h if k.endswith("_learned") and k != "learned"]
                for m in ("hpsv2-judge", "hpsv2-referee"):
                    col = next((n for n in names if n == m or n.startswith(m + "-")), None)
                    tr = trajectory(folder, col) if col else []
                    if not tr:
                        continue
                    best = max(tr, key=lambda x: x[1])
                    row["monitors"][m] = {
                        "best_step": best[0],
                        "best": best[1],
                        "end": tr[-1][1],
                        "null": h.get(f"{col}_null"),
                        "handcrafted": h.get(f"{col}_handcrafted"),
                    }
                row["heldout_end"] = h.get("learned")
                row["heldout_null"] = h.get("null")
                result["overtrain"].append(row)
    save(ns.out, "result.json", result, table(result))
    return 0


def table(res: dict) -> str:
    lines = []
    if res["normal"]:
        rw = res["rewards"]
        lines += [
            "**normal** (the demo's recipe): learned - handcrafted under each reward (512 paired images; the "
            "reward is trained on by both, the judge by the mix only, the referee by neither)",
            "",
            "| seed | objective | " + " | ".join(rw) + " |",
            "|---:|---|" + "---:|" * len(rw),
        ]
        for r in res["normal"]:
            lines.append(
                f"| {r['seed']} | {r['objective']} | " + " | ".join(_ci(r["minus_handcrafted"][x]) for x in rw) + " |"
            )
        for r in res.get("mix_minus_reward", []):
            lines.append(f"| {r['seed']} | mix - reward | " + " | ".join(_ci(r[x]) for x in rw) + " |")
    if res["overtrain"]:
        lines += [
            "",
            "**overtrain** (`" + " ".join(OVERTRAIN) + "`): the held-out monitors' best check and end, and the "
            "warnings",
            "",
            "| seed | objective | held-out reward end (null) | judge best (step) -> end (null) | "
            "referee best (step) -> end (null) | warnings |",
            "|---:|---|---:|---:|---:|---|",
        ]
        for r in res["overtrain"]:
            cells = []
            for m in ("hpsv2-judge", "hpsv2-referee"):
                v = r["monitors"].get(m)
                cells.append(f"{v['best']:.4f} ({v['best_step']}) -> {v['end']:.4f} ({v['null']:.4f})" if v else "-")
            warns = "; ".join(f"step {w['step']}: {w['measure']}" for w in r["warnings"]) or "none"
            lines.append(
                f"| {r['seed']} | {r['objective']} | {r['heldout_end']:.4f} ({r['heldout_null']:.4f}) | "
                + " | ".join(cells)
                + f" | {warns} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())

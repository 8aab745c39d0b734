"""Where per-sample tuning's gain comes from, on the demo world: the update direction, or keep-best's choice.

    python benchmarks/tune_anatomy.py                      # 32 prompts, about half an hour on 2 cores
    python benchmarks/tune_anatomy.py --prompts 4 --searches 30,7

Today's tune (``reneg tune``: search at 30 sampling steps, at most 10 steps, patience 3) keeps the best of up
to 10 images made at the full step count. The cheaper ``--search-steps S`` searches rank their candidates
by an S-step image and make only the kept one at 30 steps. This script separates the two things a search
does, on the compute study's items (the demo world's held-out prompts, one seed each, tuned from the paper
recipe's embedding):

- **the direction**: every search runs 10 steps without early stopping, and every candidate negative it
  visits is also scored at the full 30 steps (analysis only, not counted as the search's cost). "oracle"
  is the best of those full-step scores: what the search's updates could give if keep-best cost nothing;
- **the choice**: "kept by its own score" is what the search really returns (its S-step keep-best, made at
  30 steps), and "last" is the final negative with no keep-best at all.

It also measures **rollout reuse** (``reuse-M``): one full rollout with the start negative keeps the latent
and the conditional prediction at every step of the grad range; M optimizer steps then take the grad step
from those kept latents (one UNet call with grad each, no new rollout), and one full rollout with the
updated negative makes the final image; the better of start and final is kept. This is "rollouts reused
for a few optimizer steps while the negative moves little" applied to the tune.

Writes ``anatomy.json`` and ``table.md`` under ``--out`` (default ``runs/tune-anatomy``). The start
embedding is the compute study's paper recipe for training seed 0 (``--study``, trained there by
``benchmarks/compute_study.py``'s code if it is missing).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if __package__ in (None, ""):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def full_score(backend, reward, st, text, seed, neg) -> float:
    from reneg.generate import generate_and_score

    r = st["resolution"]
    args = (backend.negative_cond(neg), st["sampling_steps"], st["guidance"], r, r, 1)
    return float(generate_and_score(backend, reward, [text], [seed], *args)[0])


def search_run(backend, reward, st, start, text, seed, search_steps, lr_factor=1.0):
    """Ten steps of the tune without early stopping; every visited negative, its own score, its full score."""
    from reneg.compute import ComputeMeter
    from reneg.tuning import tune_for_seed

    meter, negs, own, calls = ComputeMeter(), [], [], []
    real = backend.negative_cond

    def capture(neg):  # the tune asks for each step's negative once; the kept one's 30-step image last
        negs.append(neg.detach().clone())
        return real(neg)

    def on_step(rec):
        own.append(rec["reward"])
        calls.append(meter.unet_calls())

    backend.negative_cond = capture
    try:
        tune_for_seed(
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
            max_steps=10,
            patience=10,
            lr=st["tune_lr"] * lr_factor,
            search_steps=None if search_steps == st["sampling_steps"] else search_steps,
            meter=meter,
            on_step=on_step,
        )
    finally:
        backend.negative_cond = real
    negs = negs[: len(own)]
    full = (
        own if search_steps == st["sampling_steps"] else [full_score(backend, reward, st, text, seed, n) for n in negs]
    )
    return {"own": own, "full": full, "calls_after": calls}


def reuse_run(backend, reward, st, start, text, seed, updates, lr):
    """Rollout reuse: one rollout's grad-range latents drive ``updates`` optimizer steps."""
    from reneg.compute import ComputeMeter
    from reneg.cond import Cond
    from reneg.generate import seeded_noise
    from reneg.sampling import ddim_step, initial_latent

    meter = ComputeMeter()
    den, dec, rew = meter.denoiser(backend.denoiser), meter.decode(backend.decode), meter.reward(reward)
    cond = backend.encode_prompts([text])
    sig = backend.schedule(st["sampling_steps"])
    n, (lo, hi), g_scale = len(sig) - 1, st["grad_range"], st["guidance"]
    grad_steps = list(range(n - 1 - hi, n - lo))
    noise = seeded_noise(backend, [seed], st["resolution"], st["resolution"])

    @torch.no_grad()
    def rollout(neg):
        kept, uncond = {}, backend.negative_cond(neg.detach())
        x = initial_latent(noise, sig[0])
        for i in range(n):
            s = torch.full((2,), float(sig[i]))
            x0_u, x0_c = den(torch.cat([x, x]), s, Cond.cat([uncond, cond])).chunk(2)
            if i in grad_steps:
                kept[i] = (x.clone(), x0_c.clone())
            x = ddim_step(x, x0_u + g_scale * (x0_c - x0_u), float(sig[i]), float(sig[i + 1]))
        return float(rew(dec(x), [text]).float().mean()), kept

    g = torch.Generator().manual_seed(seed)
    neg = start.detach().clone().float().requires_grad_(True)
    opt = torch.optim.AdamW([neg], lr=lr, weight_decay=0.0)
    r0, kept = rollout(neg)
    for _ in range(updates):
        i = grad_steps[int(torch.randint(0, len(grad_steps), (1,), generator=g))]
        x, x0_c = kept[i]
        x0_u = den(x, torch.full((1,), float(sig[i])), backend.negative_cond(neg))
        loss = -rew(dec(x0_u + g_scale * (x0_c - x0_u)), [text]).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    r1, _ = rollout(neg)
    return {"start": r0, "final": r1, "calls": meter.unet_calls(), "tflop": meter.tflop_sd15()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/tune_anatomy.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("runs", "tune-anatomy"))
    p.add_argument("--study", default=os.path.join("runs", "compute-study"), help="compute study folder (start)")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument(
        "--searches", default="30,10,7,5", help="search step counts (30: today's tune); SxF: at F times the tune's lr"
    )
    p.add_argument("--reuse", default="10x0.5,5x1", help="rollout reuse: updates x lr factor, comma-separated")
    p.add_argument("--threads", type=int, default=2)
    ns = p.parse_args(argv)
    torch.set_num_threads(ns.threads)
    from benchmarks.compute_study import base_recipe, demo_world, train_variant
    from reneg.backends.loading import load_diffusers
    from reneg.embedding import load_embedding
    from reneg.evaluation.stats import mean_ci
    from reneg.fileio import atomic_write_json, atomic_write_text
    from reneg.rewards import load_rewards

    os.makedirs(ns.out, exist_ok=True)
    world = demo_world(ns.study)
    st = world["settings"]
    defaults = argparse.Namespace(steps=None, batch_size=None, lr=None)
    start_summary = train_variant(world, base_recipe(world, defaults), "paper", 0, ns.study)
    start = load_embedding(start_summary["embedding"]).tensor
    backend = load_diffusers(world["model"], device="cpu")
    reward = load_rewards([world["reward"]], device="cpu")
    texts = world["heldout_texts"]
    items = [(texts[i * len(texts) // ns.prompts], 20_000 + i) for i in range(ns.prompts)]
    path = os.path.join(ns.out, "anatomy.json")
    res = json.load(open(path, encoding="utf-8")) if os.path.isfile(path) else {}
    res.setdefault("items", [list(it) for it in items])
    key0 = "start_full"
    if key0 not in res:
        res[key0] = [full_score(backend, reward, st, t, s, start) for t, s in items]
    jobs = [(f"search-{s}", s) for s in ns.searches.split(",") if s]
    jobs += [(f"reuse-{r}", r) for r in ns.reuse.split(",") if r]
    for name, arg in jobs:
        if name in res:
            continue
        t0 = time.time()
        if name.startswith("search-"):
            steps, _, f = arg.partition("x")
            res[name] = [search_run(backend, reward, st, start, t, s, int(steps), float(f or 1)) for t, s in items]
        else:
            m, f = arg.split("x")
            res[name] = [
                reuse_run(backend, reward, st, start, t, s, int(m), st["tune_lr"] * float(f)) for t, s in items
            ]
        atomic_write_json(path, res)
        log(f"{name}: {time.time() - t0:.0f} s")
    md = table(res, st["sampling_steps"], mean_ci)
    atomic_write_text(os.path.join(ns.out, "table.md"), md)
    print(md)
    return 0


def _patience_keep(own: list[float], max_steps: int, patience: int) -> tuple[int, int]:
    """(kept index, evaluations made) of the tune's keep-best with early stopping, replayed on ``own``."""
    best, kept, bad, k = float("-inf"), 0, 0, 0
    for k in range(min(max_steps, len(own))):
        if own[k] > best:
            best, kept, bad = own[k], k, 0
        else:
            bad += 1
        if bad >= patience:
            break
    return kept, k + 1


def _label(name: str) -> str:
    """``search-7x2`` -> ``7 steps, lr x2``; ``search-10`` -> ``10 steps``."""
    steps, _, f = name[len("search-") :].partition("x")
    return f"{steps} steps" + (f", lr x{f}" if f else "")


def _after(rows: list[dict], base: list[float], k: int) -> tuple[list[float], float, float]:
    """After ``k`` updates: each item's gain as the search keeps it (its own score's best, at full steps),
    the mean gain of a perfect keep-best over the full-step scores, and of the last negative."""
    kept = [r["full"][max(range(k + 1), key=lambda j: r["own"][j])] - b for r, b in zip(rows, base)]
    oracle = statistics.mean(max(r["full"][: k + 1]) - b for r, b in zip(rows, base))
    last = statistics.mean(r["full"][k] - b for r, b in zip(rows, base))
    return kept, oracle, last


def table(res: dict, full_steps: int, mean_ci) -> str:
    base = res["start_full"]
    paper = res.get(f"search-{full_steps}")
    today = None
    if paper:  # today's tune, replayed: at most 10 steps, patience 3, on the recorded full-step scores
        kept = [_patience_keep(r["own"], 10, 3) for r in paper]
        today = statistics.mean(r["own"][k] - b for (k, _), r, b in zip(kept, paper, base))
        today_calls = statistics.mean(r["calls_after"][n - 1] for (_, n), r in zip(kept, paper))
    lines = [
        f"Per-sample tuning from the paper recipe's embedding, {len(base)} held-out prompts, one seed each; gain ="
        f" a negative's reward at {full_steps} sampling steps minus the start's, same seed."
        + (f" Today's tune (patience 3): +{today:.4f} at {today_calls:.0f} UNet calls." if today else ""),
        "",
        "| search | after k updates | UNet calls (search + kept image) | kept by its own score | share of today |"
        " oracle: best full-step score | last negative |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    searches = [(n, rows) for n, rows in res.items() if n.startswith("search-")]

    def calls(name, rows, k):  # the search's calls after k updates, and the kept image's unless it searched at full
        extra = 0 if _label(name) == f"{full_steps} steps" else full_steps
        return statistics.mean(r["calls_after"][k] for r in rows) + extra

    for name, rows in searches:
        for k in (1, 2, 4, 6, 9):
            if any(len(r["own"]) <= k for r in rows):
                continue
            gains, oracle, last = _after(rows, base, k)
            kept = mean_ci(gains)
            share = f"{kept['mean'] / today:.2f}" if today else ""
            lines.append(
                f"| {_label(name)} | {k} | {calls(name, rows, k):.0f} |"
                f" {kept['mean']:+.4f} [{kept['lo']:+.4f}, {kept['hi']:+.4f}] | {share} | {oracle:+.4f} | {last:+.4f} |"
            )
    if today:  # the ceiling: what each search gives, and could give with a perfect keep-best, in a third of the calls
        lines += [
            "",
            f"Within a third of today's calls ({today_calls / 3:.0f}):",
            "",
            "| search | updates | UNet calls | kept by its own score | share | oracle keep-best | share |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, rows in searches:
            fits = [k for k in range(min(len(r["own"]) for r in rows)) if calls(name, rows, k) <= today_calls / 3]
            if not fits:
                continue
            k = fits[-1]
            gains, oracle, _ = _after(rows, base, k)
            kept = statistics.mean(gains)
            lines.append(
                f"| {_label(name)} | {k} | {calls(name, rows, k):.0f} |"
                f" {kept:+.4f} | {kept / today:.2f} | {oracle:+.4f} | {oracle / today:.2f} |"
            )
    reuse = [(n, rows) for n, rows in res.items() if n.startswith("reuse-")]
    if reuse:
        lines += [
            "",
            "| rollout reuse (updates x lr) | UNet calls | SD1.5 TFLOP | gain (better of start and final) |"
            " share of today | final below start |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for name, rows in reuse:
            g = mean_ci([max(r["start"], r["final"]) - b for r, b in zip(rows, base)])
            share = f"{g['mean'] / today:.2f}" if today else ""
            lines.append(
                f"| {name[6:]} | {statistics.mean(r['calls'] for r in rows):.0f} |"
                f" {statistics.mean(r['tflop'] for r in rows):.0f} |"
                f" {g['mean']:+.4f} [{g['lo']:+.4f}, {g['hi']:+.4f}] | {share} |"
                f" {sum(r['final'] < r['start'] for r in rows)}/{len(rows)} |"
            )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())

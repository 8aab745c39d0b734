"""How a busy CPU slows a training step: torch's thread settings under a fixed background load.

    python benchmarks/load_study.py                       # idle, 1, 2, 4 busy processes; about 20 minutes
    python benchmarks/load_study.py --loads 0 2 --steps 3 # shorter

Each measurement is a fresh child process (the OpenMP wait policy is read once, when the runtime
starts, so it cannot change inside one process) that loads the demo world's model and reward the
way ``reneg train --demo`` does, runs one warm-up step and then ``--steps`` timed optimizer steps of
the demo's recipe (16 samples at 32 px, 30 DDIM steps, grad step among the last 11), and prints
seconds per step (a measurement that passes ``--budget`` seconds stops after the step in progress,
with at least one timed step). Around it, the parent keeps ``L`` busy processes running (each a Python loop
that never sleeps: what a browser tab, a compile or another job looks like to the scheduler).

Settings compared (``--settings``):

* ``t2``: two torch threads, OpenMP's default wait policy (what ``--demo`` used);
* ``t1``: one torch thread;
* ``t2-passive``: two threads, ``OMP_WAIT_POLICY=PASSIVE`` (a waiting thread sleeps instead of spinning);
* ``auto``: what ``--threads auto`` (the default) does: :func:`reneg.threads.apply_threads`;
* ``t2-spin10k``: two threads, ``GOMP_SPINCOUNT=10000`` (spin briefly, then sleep).

The fair share for a step under ``L`` busy processes on ``C`` cores is ``(L + 1) / C`` times the idle
time once ``L + 1 > C`` (the step gets one of ``L + 1`` runnable shares). Settings are measured in turn,
A B A B ..., ``--rounds`` times, so drift in the machine's speed falls on every setting alike; the
table shows the median over rounds and the ratio to the idle ``t2`` median.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SETTINGS = {
    "t2": dict(threads="2", env={}),
    "t1": dict(threads="1", env={}),
    "t2-passive": dict(threads="2", env={"OMP_WAIT_POLICY": "PASSIVE"}),
    "auto": dict(threads="auto", env={}),
    "t2-spin10k": dict(threads="2", env={"GOMP_SPINCOUNT": "10000"}),
}


def busy() -> None:  # a background load: never sleeps
    x = 0
    while True:
        x = (x + 1) % 1_000_003


def child(ns) -> int:
    """One measurement: ``--steps`` demo-world optimizer steps after a warm-up; prints JSON."""
    sys.path.insert(0, ROOT)
    import torch

    from reneg import demo
    from reneg.threads import apply_threads

    used = apply_threads(ns.threads)
    from reneg.backends.loading import load_diffusers
    from reneg.objective import ObjectiveConfig, grad_step_loss
    from reneg.rewards import load_rewards
    from reneg.sampling import initial_latent

    d = demo.setup(ns.tmp)
    s = d["settings"]
    backend = load_diffusers(d["model"], device="cpu")
    reward = load_rewards([d["reward"]], device="cpu")
    texts = [line for line in open(d["prompts"], encoding="utf-8").read().split("\n") if line][:64]
    null, _ = backend.null_embedding()
    neg = torch.nn.Parameter(null.detach().float().clone())
    opt = torch.optim.AdamW([neg], lr=s["lr"])
    obj = ObjectiveConfig(s["sampling_steps"], s["guidance"], tuple(s["grad_range"]))
    sigmas = backend.schedule(s["sampling_steps"])
    shape = backend.latent_shape(s["micro_batch"], s["resolution"], s["resolution"])
    times, t_start = [], time.perf_counter()
    for step in range(ns.steps + 1):
        if len(times) >= 1 and time.perf_counter() - t_start > ns.budget:
            break  # a setting that slow is measured well enough by the steps it took
        g = torch.Generator().manual_seed(step)
        ps = [texts[int(i)] for i in torch.randint(len(texts), (s["micro_batch"],), generator=g)]
        noise = torch.randn(shape, generator=g)
        gi = obj.grad_indices(1, g)[0]
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        res = grad_step_loss(
            backend.denoiser,
            backend.decode,
            reward,
            ps,
            backend.encode_prompts(ps),
            backend.negative_cond(neg),
            initial_latent(noise, sigmas[0]),
            sigmas,
            s["guidance"],
            gi,
        )
        res.loss.backward()
        opt.step()
        if step:  # the first step warms up
            times.append(time.perf_counter() - t0)
    print(json.dumps({"threads": used, "seconds": times}), flush=True)
    return 0


def measure(setting: str, steps: int, tmp: str, budget: float) -> dict:
    spec = SETTINGS[setting]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.pop("RENEG_THREADS", None)
    env.update(spec["env"])
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--threads", spec["threads"]]
    cmd += ["--steps", str(steps), "--tmp", tmp, "--budget", str(budget)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="benchmarks/load_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--loads", type=int, nargs="+", default=[0, 1, 2, 4], help="busy background processes")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}")
    p.add_argument("--steps", type=int, default=3, help="timed steps per measurement (after one warm-up)")
    p.add_argument("--rounds", type=int, default=2, help="A B A B ... rounds per load")
    p.add_argument(
        "--budget", type=float, default=120.0, help="seconds a measurement may take; past it, no further step"
    )
    p.add_argument("--out", default=os.path.join("runs", "load-study.json"))
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", default="2", help=argparse.SUPPRESS)
    p.add_argument("--tmp", default=os.path.join("runs", "load-study"), help=argparse.SUPPRESS)
    ns = p.parse_args(argv)
    if ns.child:
        return child(ns)
    import multiprocessing as mp

    settings = ns.settings.split(",")
    for s in settings:
        if s not in SETTINGS:
            raise SystemExit(f"--settings: unknown {s!r} (known: {', '.join(SETTINGS)})")
    os.makedirs(ns.tmp, exist_ok=True)
    cores = os.cpu_count() or 1
    results = []
    for load in ns.loads:
        procs = [mp.Process(target=busy, daemon=True) for _ in range(load)]
        for q in procs:
            q.start()
        try:
            time.sleep(1.0 if load else 0)
            for r in range(ns.rounds):
                for s in settings:
                    m = measure(s, ns.steps, ns.tmp, ns.budget)
                    med = statistics.median(m["seconds"])
                    results.append(dict(load=load, setting=s, round=r, threads=m["threads"], seconds=m["seconds"]))
                    print(f"load {load} {s:>11} round {r}: {med:6.2f} s/step (threads {m['threads']})", flush=True)
        finally:
            for q in procs:
                q.terminate()
            for q in procs:
                q.join()
    os.makedirs(os.path.dirname(os.path.abspath(ns.out)), exist_ok=True)
    with open(ns.out, "w", encoding="utf-8") as f:
        json.dump({"cores": cores, "results": results}, f, indent=1)
    print(table(results, cores, settings, ns.loads))
    return 0


def table(results: list[dict], cores: int, settings: list[str], loads: list[int]) -> str:
    def med(load, s):
        xs = [t for r in results if r["load"] == load and r["setting"] == s for t in r["seconds"]]
        return statistics.median(xs) if xs else float("nan")

    idle = med(loads[0], "t2") if "t2" in settings else med(loads[0], settings[0])
    head = "| busy processes | fair share | " + " | ".join(f"`{s}` s/step (x idle)" for s in settings) + " |"
    rows = [head, "|" + "---|" * (2 + len(settings))]
    for load in loads:
        fair = max(1.0, (load + 1) / cores)
        cells = [f"{med(load, s):.2f} ({med(load, s) / idle:.1f}x)" for s in settings]
        rows.append(f"| {load} | {fair:.1f}x | " + " | ".join(cells) + " |")
    return "\n".join(rows)


if __name__ == "__main__":
    raise SystemExit(main())

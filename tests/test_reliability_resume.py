"""Kill and resume: a training run killed with SIGKILL at any point resumes
with ``--resume`` and ends with the same embedding as a run that was never killed;
a kill never leaves a half-written file where a good one was.

The killed runs are real processes running ``reneg.cli.main`` (one through
``python -m reneg.cli``), killed with SIGKILL: after a checkpoint appears, at random
times, and inside an atomic write, between the finished temporary file and its
rename (``os.replace`` in the child sends SIGKILL to its own process). To keep the
import cost (~7 s per interpreter) paid once, the other children fork from a
multiprocessing forkserver that preloads the heavy modules. Every child runs on one
thread, like the in-process runs, so results compare bit for bit on the CPU.
"""

from __future__ import annotations

import csv
import glob
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch

from reneg.embedding import load_embedding
from reneg.trainer.checkpoint import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [
    "a red circle",
    "a blue square",
    "a green star",
    "a yellow triangle",
    "a purple circle",
    "a red star",
    "an orange square",
    "a blue star",
]
STEPS = 6
EVERY = 2
# figures for the closing note (printed with -s)
KILL_POINTS: list[str] = []


def train_args(model: str, reward: str, prompts: str, out: str, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        model,
        "--reward",
        f"hpsv2={reward}",
        "--prompts",
        prompts,
        "--heldout-count",
        "2",
        "--out",
        out,
        "--steps",
        str(STEPS),
        "--batch-size",
        "2",
        "--micro-batch",
        "1",
        "--sampling-steps",
        "4",
        "--grad-range",
        "0",
        "2",
        "--resolution",
        "16",
        "--checkpoint-every",
        str(EVERY),
        "--eval-every",
        "4",
        "--eval-batch",
        "2",
        "--lr",
        "5e-2",
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]


def _child(argv: list[str], kill_on_replace: str | None, kill_on_nth: int) -> None:
    """Forkserver child: run the CLI; optionally SIGKILL ourselves inside the nth
    ``os.replace`` onto a file named ``kill_on_replace`` (temporary file complete,
    target not yet replaced): the worst moment for an atomic write."""
    torch.set_num_threads(1)
    os.environ["TQDM_DISABLE"] = "1"  # no progress-bar locks left behind by the kill
    if kill_on_replace:
        real = os.replace
        seen = [0]

        def replace(src, dst, *a, **k):
            if os.path.basename(os.fspath(dst)) == kill_on_replace:
                seen[0] += 1
                if seen[0] == kill_on_nth:
                    os.kill(os.getpid(), signal.SIGKILL)
            return real(src, dst, *a, **k)

        os.replace = replace
    from reneg.cli import main

    sys.exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(
        [
            "torch",
            "diffusers",
            "transformers",
            "open_clip",
            "accelerate",
            "reneg.cli",
            "reneg.trainer.train",
            "reneg.backends.diffusers_backend",
            "reneg.rewards.hps",
        ]
    )
    return ctx


@pytest.fixture(scope="module")
def world(tiny_pipeline_dir, tiny_hps_ckpt, tmp_path_factory):
    d = tmp_path_factory.mktemp("resume")
    prompts = d / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    return tiny_pipeline_dir, tiny_hps_ckpt, str(prompts), d


@pytest.fixture(scope="module")
def reference(world):
    """The uninterrupted run (in this process, one thread)."""
    from reneg.cli import main

    model, reward, prompts, d = world
    out = str(d / "reference")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(train_args(model, reward, prompts, out)) == 0
    finally:
        torch.set_num_threads(n)
    return out


def _wait_for(cond, proc_alive, timeout=120.0, what=""):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return True
        if not proc_alive():
            return False
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def _ckpt_step(out: str) -> int:
    p = os.path.join(out, "checkpoint.pt")
    if not os.path.isfile(p):
        return -1
    try:
        return int(load_checkpoint(p)["step"])
    except ValueError:
        return -1  # being replaced right now; look again


def assert_outputs_intact(out: str) -> None:
    """Whatever a kill left behind, every file under its real name is a good one."""
    ck = os.path.join(out, "checkpoint.pt")
    emb = os.path.join(out, "embedding.safetensors")
    if os.path.exists(ck):
        state = load_checkpoint(ck)
        assert torch.isfinite(state["neg"]).all()
    if os.path.exists(emb):
        e = load_embedding(emb)
        assert e.family == "tiny"
    if os.path.exists(os.path.join(out, "summary.json")):
        import json

        with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
            json.load(f)


def assert_same_as_reference(out: str, reference: str) -> None:
    got = load_embedding(os.path.join(out, "embedding.safetensors")).tensor
    want = load_embedding(os.path.join(reference, "embedding.safetensors")).tensor
    init = load_checkpoint(os.path.join(reference, "checkpoint.pt"))
    assert int(init["step"]) == STEPS
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), float((got - want).abs().max())
    with open(os.path.join(out, "log.csv"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    with open(os.path.join(reference, "log.csv"), newline="", encoding="utf-8") as f:
        ref_rows = list(csv.DictReader(f))
    assert [r["step"] for r in rows] == [str(s) for s in range(1, STEPS + 1)]
    for r, w in zip(rows, ref_rows):
        assert abs(float(r["reward"]) - float(w["reward"])) < 1e-4, (r, w)
    s_got = load_checkpoint(os.path.join(out, "checkpoint.pt"))
    s_ref = load_checkpoint(os.path.join(reference, "checkpoint.pt"))
    assert s_got["skipped"] == s_ref["skipped"] == 0
    assert [h["step"] for h in s_got["heldout"]] == [h["step"] for h in s_ref["heldout"]]


def test_reference_run_learns_something(reference, tiny_backend):
    """Sanity: the comparisons below are not between two untouched null embeddings."""
    state = load_checkpoint(os.path.join(reference, "checkpoint.pt"))
    assert state["step"] == STEPS
    emb = load_embedding(os.path.join(reference, "embedding.safetensors"))
    assert torch.equal(emb.tensor, state["neg"].cpu())
    null, _ = tiny_backend.null_embedding()
    assert float((emb.tensor - null.cpu()).abs().max()) > 1e-3


@pytest.mark.slow
def test_kill_chain_resumes_to_the_same_embedding(world, reference, forkserver):
    """One run killed five times, at every kind of point, resumed each time with --resume."""
    from reneg.cli import main

    model, reward, prompts, d = world
    out = str(d / "chain")
    base = train_args(model, reward, prompts, out)

    # 1. a real `python -m reneg.cli train`, SIGKILLed as soon as checkpoint 2 is on disk
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["TQDM_DISABLE"] = "1"
    log = open(d / "cli-stderr.txt", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "reneg.cli", *base], cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log
    )
    try:
        reached = _wait_for(
            lambda: _ckpt_step(out) >= EVERY, lambda: proc.poll() is None, what="checkpoint 2 of the CLI subprocess"
        )
        assert reached, f"the CLI subprocess ended early: {(d / 'cli-stderr.txt').read_text()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
        log.close()
    assert proc.returncode == -signal.SIGKILL
    KILL_POINTS.append(f"CLI subprocess after checkpoint {_ckpt_step(out)}")
    assert_outputs_intact(out)
    assert _ckpt_step(out) < STEPS

    def child(kill_on=None, nth=0):
        p = forkserver.Process(target=_child, args=(base + ["--resume"], kill_on, nth))
        p.start()
        return p

    # 2. killed inside the atomic write of checkpoint.pt at step 4: the temporary file is
    # complete, embedding.safetensors already says step 4, checkpoint.pt still says 2
    before = _ckpt_step(out)
    p = child("checkpoint.pt", 1)
    p.join(120)
    assert p.exitcode == -signal.SIGKILL, p.exitcode
    KILL_POINTS.append(f"inside os.replace of checkpoint.pt (step {before} -> {before + EVERY})")
    assert _ckpt_step(out) == before
    assert glob.glob(os.path.join(out, ".checkpoint.pt.*.tmp")), "the kill should leave a temp file"
    assert_outputs_intact(out)

    # 3. killed inside the atomic write of embedding.safetensors (the next write after resuming)
    p = child("embedding.safetensors", 1)
    p.join(120)
    assert p.exitcode == -signal.SIGKILL, p.exitcode
    KILL_POINTS.append("inside os.replace of embedding.safetensors")
    assert_outputs_intact(out)

    # 4. killed at random moments (model loading, a step, a write: wherever it falls)
    rng = random.Random(7)
    for _ in range(2):
        p = child()
        delay = rng.uniform(0.5, 5.0)
        p.join(delay)
        if p.is_alive():
            p.kill()  # SIGKILL; the run may end on its own between is_alive() and kill()
        p.join(60)
        if p.exitcode == -signal.SIGKILL:
            KILL_POINTS.append(f"random time {delay:.2f} s after start (checkpoint at {_ckpt_step(out)})")
        else:
            assert p.exitcode == 0, p.exitcode
            KILL_POINTS.append(f"random time {delay:.2f} s: the run had finished")
        assert_outputs_intact(out)

    # 5. killed inside the final write of summary.json, after the last checkpoint
    if not os.path.exists(os.path.join(out, "summary.json")):
        p = child("summary.json", 1)
        p.join(120)
        assert p.exitcode == -signal.SIGKILL, p.exitcode
        KILL_POINTS.append("inside os.replace of summary.json (training done)")
        assert_outputs_intact(out)
        assert not os.path.exists(os.path.join(out, "summary.json"))

    # the last resume, in this process, finishes the run
    assert main(base + ["--resume"]) == 0
    assert_outputs_intact(out)
    assert_same_as_reference(out, reference)
    print(f"\nkill points tried ({len(KILL_POINTS)}): " + "; ".join(KILL_POINTS))


def test_kill_before_first_checkpoint(world, reference, forkserver, capsys):
    """Killed before any checkpoint: --resume says so before loading a model;
    --resume auto starts afresh and still ends where the reference does."""
    from reneg.cli import main

    model, reward, prompts, d = world
    out = str(d / "early")
    base = train_args(model, reward, prompts, out)
    # the first file a run puts in place is checkpoint.pt at checkpoint 1 (the embedding, staged
    # beside it, follows): die inside that rename
    p = forkserver.Process(target=_child, args=(base, "checkpoint.pt", 1))
    p.start()
    p.join(120)
    assert p.exitcode == -signal.SIGKILL, p.exitcode
    KILL_POINTS.append("before the first checkpoint (inside the first write)")
    assert not os.path.exists(os.path.join(out, "embedding.safetensors"))
    assert not os.path.exists(os.path.join(out, "checkpoint.pt"))

    import reneg.backends.loading as db

    def no_load(*a, **k):
        raise AssertionError("a model was loaded before --resume was checked")

    real = db.load_diffusers
    db.load_diffusers = no_load
    try:
        capsys.readouterr()
        assert main(base + ["--resume"]) == 2
        err = capsys.readouterr().err.strip()
    finally:
        db.load_diffusers = real
    assert "--resume" in err and "checkpoint" in err and len(err.splitlines()) == 1, err

    assert main(base + ["--resume", "auto"]) == 0
    assert_same_as_reference(out, reference)

"""Several processes: ``reneg train`` under a 2-process launch (gloo on the CPU) splits the
batch across the processes and takes the same update as one process with the same
global batch (trainer/train.py averages the embedding's gradient with accelerate).

The runs go through a small driver that calls ``run_train`` and records which
(step, micro-batch index) samples each process drew, so the test can tell that the
work really was split: without cross-process averaging, rank 0 would end where a
1-process run on its half of the batch ends, which the test also checks is elsewhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

DRIVER = textwrap.dedent("""
    import json, os, sys
    from accelerate import PartialState
    from reneg.cli import build_parser
    from reneg.trainer import train as T
    from reneg.trainer.config import train_config_from_args

    orig = T.sample_generator
    runs = [[]]
    for a in sys.argv[1:]:
        if a == ":::":
            runs.append([])
        else:
            runs[-1].append(a)
    for record, *args in runs:
        seen = []

        def spy(seed, step, index, _seen=seen):
            _seen.append([step, index])
            return orig(seed, step, index)

        T.sample_generator = spy
        T.run_train(train_config_from_args(build_parser().parse_args(args)))
        st = PartialState()
        with open(os.path.join(record, f"rank{st.process_index}.json"), "w") as f:
            json.dump({"rank": st.process_index, "world": st.num_processes, "seen": seen}, f)
""")


def _args(model, hps, prompts, out, batch):
    return [
        "train",
        "--model",
        model,
        "--reward",
        f"hpsv2={hps}",
        "--prompts",
        prompts,
        "--out",
        out,
        "--steps",
        "2",
        "--batch-size",
        str(batch),
        "--micro-batch",
        "1",
        "--sampling-steps",
        "4",
        "--grad-range",
        "0",
        "1",
        "--resolution",
        "16",
        "--lr",
        "0.01",
        "--eval-every",
        "0",
        "--heldout-count",
        "2",
        "--eval-batch",
        "2",
        "--checkpoint-every",
        "100",
        "--device",
        "cpu",
        "--seed",
        "3",
        "--no-progress",
    ]


def _run(cmd, cwd, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"{' '.join(cmd[:6])}... timed out after {timeout} s:\n{(e.stderr or '')[-3000:]}")
    if p.returncode != 0:
        pytest.fail(f"{' '.join(cmd[:6])}... exited {p.returncode}:\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return p


def _embedding(out):
    from reneg.embedding import load_embedding

    return load_embedding(os.path.join(out, "embedding.safetensors")).tensor


@pytest.mark.slow
def test_two_processes_take_the_same_step_as_one(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt):
    prompts = ["a red fox in snow", "an old lighthouse", "a bowl of soup", "a city at night", "a cat in a hat"]
    prompts += ["a mountain lake", "a blue car", "a tree in autumn"]
    dirs = run_two_and_one(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, [], "\n".join(prompts) + "\n")

    ranks = [json.loads((dirs["two"] / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2], "the launch did not give a 2-process group"
    # each process drew half of every step's micro-batches: rank 0 indices 0-1, rank 1 indices 2-3
    for r, rec in enumerate(ranks):
        assert sorted(rec["seen"]) == [[s, 2 * r + m] for s in (0, 1) for m in (0, 1)], rec
    one = json.loads((dirs["one4"] / "rank0.json").read_text())
    assert one["world"] == 1
    assert sorted(one["seen"]) == [[s, j] for s in (0, 1) for j in range(4)]

    two, one4, one2 = (_embedding(str(dirs[k] / "out")) for k in ("two", "one4", "one2"))
    assert torch.isfinite(two).all()
    moved = (one4 - _init_null(tiny_pipeline_dir)).abs().max()
    assert moved > 1e-3, "training did not move the embedding; the comparison would be empty"
    diff = (two - one4).abs().max()
    assert diff < 1e-5 * max(1.0, float(one4.abs().max())), f"2 processes vs 1: max diff {diff:.3g}"
    # rank 0 alone (its half of the batch) ends elsewhere: the processes' gradients were averaged
    assert (two - one2).abs().max() > 100 * max(float(diff), 1e-7)
    summary = json.loads((dirs["two"] / "out" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["skipped_updates"] == 0


SIX_PROMPTS = "a red fox in snow\nan old lighthouse\na bowl of soup\na city at night\na cat\na lake\n"


def run_two_and_one(tmp_path, model, hps, extra: list, prompts_text: str = SIX_PROMPTS) -> dict:
    """The launches every multi-process test makes: ``reneg train ... extra`` as 2 processes of a batch
    of 4, as 1 process of a batch of 4 and as 1 of a batch of 2, each writing under ``tmp_path / name / out``;
    returns ``{"two", "one4", "one2"}`` -> their folders (skips where torch.distributed's gloo is missing)."""
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(prompts_text)
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    dirs = {k: tmp_path / k for k in ("two", "one4", "one2")}
    for d in dirs.values():
        d.mkdir()

    def run_args(name, batch):
        return [str(dirs[name])] + _args(model, hps, str(prompts), str(dirs[name] / "out"), batch) + list(extra)

    cwd = str(tmp_path)
    _run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(driver)]
        + run_args("two", 4),
        cwd,
    )
    _run([sys.executable, str(driver)] + run_args("one4", 4) + [":::"] + run_args("one2", 2), cwd)
    return dirs


def _init_null(model):
    from reneg.backends.loading import load_diffusers

    null, _ = load_diffusers(model).null_embedding()
    return null

"""``reneg train --tokens N``: N input-token vectors learned with the ReNeg objective through the frozen text
encoder, with the trainer's exact resume (SIGKILL mid-run, then --resume) and multi-process equivalence,
and the flags checked before any model loads."""

from __future__ import annotations

import os

import pytest
import torch

from reneg.tokens import TokenEncoder, TokenNegative, load_tokens, save_tokens
from test_reliability_resume import forkserver  # noqa: F401


def test_tokens_flags_are_checked_before_any_model_loads(tmp_path, capsys, tiny_pipeline_dir, tiny_hps_ckpt):
    from reneg.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a\nb\nc\nd\n", encoding="utf-8")
    base = ["train", "--model", tiny_pipeline_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--prompts", str(prompts)]
    base += ["--heldout-count", "1", "--out", str(tmp_path / "out")]
    for n in ("0", "76"):
        assert main(base + ["--tokens", n]) == 2
        assert f"--tokens {n}: expected 1 to 75" in capsys.readouterr().err
    save_tokens(tmp_path / "four.safetensors", TokenNegative.from_flat(torch.zeros(4, 768), "sd1"))
    assert main(base + ["--tokens", "3", "--init", str(tmp_path / "four.safetensors")]) == 2
    assert "four.safetensors: holds 4 token vectors, --tokens asks for 3" in capsys.readouterr().err
    (tmp_path / "emb.safetensors").write_bytes(b"not a file")
    assert main(base + ["--tokens", "3", "--init", str(tmp_path / "emb.safetensors")]) == 2
    assert "--init: " in capsys.readouterr().err


def _args(model, hps, prompts, out, steps, extra=()):
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
        str(steps),
        "--batch-size",
        "2",
        "--micro-batch",
        "1",
        "--sampling-steps",
        "3",
        "--grad-range",
        "0",
        "1",
        "--resolution",
        "16",
        "--lr",
        "0.05",
        "--lr-schedule",
        "constant",
        "--warmup",
        "0",
        "--eval-every",
        "0",
        "--heldout-count",
        "2",
        "--eval-batch",
        "2",
        "--checkpoint-every",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--tokens",
        "3",
        "--init",
        "handcrafted",
        "--handcrafted",
        "blurry",
        *extra,
    ]


@pytest.mark.slow
def test_train_tokens_writes_ui_files_and_resumes_exactly(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, tiny_backend):
    """A 2-step run against a 1-step run resumed to 2 steps (constant lr: the schedule does not depend on
    --steps): the same vectors bit for bit; the files are the ones the UIs read, and embedding.safetensors
    is what the vectors encode to."""
    from reneg.cli import main
    from reneg.embedding import load_embedding

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\nan old lighthouse\na bowl of soup\na city at night\na cat\na lake\n")
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    assert main(_args(tiny_pipeline_dir, tiny_hps_ckpt, str(prompts), a, 2)) == 0
    assert main(_args(tiny_pipeline_dir, tiny_hps_ckpt, str(prompts), b, 1)) == 0
    assert main(_args(tiny_pipeline_dir, tiny_hps_ckpt, str(prompts), b, 2, ["--resume"])) == 0
    ta, tb = load_tokens(os.path.join(a, "tokens.safetensors")), load_tokens(os.path.join(b, "tokens.safetensors"))
    assert torch.equal(ta.flat(), tb.flat()) and ta.metadata["trained_steps"] == "2"
    assert torch.equal(load_tokens(os.path.join(a, "tokens.pt")).flat(), ta.flat())
    enc = TokenEncoder(tiny_backend)
    start = enc.from_text("blurry", 3)
    assert float((ta.flat() - start).abs().max()) > 1e-4  # trained: moved from the handcrafted start
    rows, _ = enc.encode(ta.flat())
    emb = load_embedding(os.path.join(a, "embedding.safetensors"))
    assert torch.allclose(emb.tensor, rows, atol=1e-6) and emb.metadata["tokens"] == "3"
    # a different --tokens is a different run: refused on resume
    assert main(_args(tiny_pipeline_dir, tiny_hps_ckpt, str(prompts), b, 3, ["--resume", "--tokens", "4"])) == 2


@pytest.mark.slow
def test_train_tokens_sdxl_learns_both_encoders(tmp_path, tiny_sdxl_dir, tiny_hps_ckpt):
    from reneg.cli import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a red fox\nan old lighthouse\na bowl of soup\na city at night\n")
    out = str(tmp_path / "xl")
    assert main(_args(tiny_sdxl_dir, tiny_hps_ckpt, str(prompts), out, 1)) == 0
    tok = load_tokens(os.path.join(out, "tokens.safetensors"), expected_family="sdxl")
    assert tok.vectors["clip_l"].shape == (3, 768) and tok.vectors["clip_g"].shape == (3, 1280)
    assert not os.path.exists(os.path.join(out, "tokens.pt"))  # SDXL TI files are safetensors


@pytest.mark.slow
def test_killed_and_resumed_tokens_run_equals_the_unbroken_one(tmp_path, forkserver):  # noqa: F811
    """The exact-resume test of tests/test_reliability_exact_resume.py, with --tokens 4."""
    import test_reliability_exact_resume as R

    from reneg.cli import main

    w = R._world()
    if w is None:
        pytest.skip("the demo world's assets are not installed")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(w.train_prompts(200, seed=0)[:8]) + "\n", encoding="utf-8")
    ref, run = str(tmp_path / "unbroken"), str(tmp_path / "killed")
    extra = ["--tokens", "4", "--init", "handcrafted"]
    n = torch.get_num_threads()
    torch.set_num_threads(R.THREADS)
    try:
        assert main(R._args(w, str(prompts), ref) + extra) == 0
        p = forkserver.Process(target=R._child, args=(R._args(w, str(prompts), run) + extra, 3))
        p.start()
        p.join(600)
        assert p.exitcode == -9, p.exitcode
        p = forkserver.Process(target=R._child, args=(R._args(w, str(prompts), run) + extra + ["--resume"], 0))
        p.start()
        p.join(600)
        assert p.exitcode == 0, p.exitcode
    finally:
        torch.set_num_threads(n)
    got, want = (load_tokens(os.path.join(d, "tokens.safetensors")).flat() for d in (run, ref))
    assert torch.equal(got, want), float((got - want).abs().max())
    assert R._rows(run) == R._rows(ref)
    best = [load_tokens(os.path.join(d, "tokens-best.safetensors")) for d in (run, ref)]
    assert torch.equal(best[0].flat(), best[1].flat())


@pytest.mark.slow
def test_two_processes_take_the_same_tokens_step_as_one(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt):
    """The multi-process test of tests/test_multiprocess.py, with --tokens 3."""
    import test_multiprocess as M

    extra = ["--tokens", "3", "--init", "handcrafted", "--lr", "0.5"]
    dirs = M.run_two_and_one(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, extra)
    two, one4, one2 = (load_tokens(str(dirs[k] / "out" / "tokens.safetensors")).flat() for k in ("two", "one4", "one2"))
    diff = float((two - one4).abs().max())
    assert diff < 1e-6 * max(1.0, float(one4.abs().max())), f"2 processes vs 1: max diff {diff:.3g}"
    assert float((two - one2).abs().max()) > 100 * max(diff, 1e-9)

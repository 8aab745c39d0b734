"""reneg train's reported events: sample images, TensorBoard, and a stop request that keeps a checkpoint."""

from __future__ import annotations

import json
import os

import pytest
import torch

from reneg.cli import main


def _prompts(tmp_path):
    p = tmp_path / "prompts.txt"
    p.write_text("\n".join(f"a {c} {s}" for c in ("red", "blue", "green") for s in ("circle", "square")))
    return str(p)


def _args(tmp_path, out, pipe, hps, *extra):
    return [
        "train",
        "--model",
        pipe,
        "--reward",
        f"hpsv2={hps}",
        "--prompts",
        _prompts(tmp_path),
        "--heldout-count",
        "2",
        "--out",
        str(out),
        "--steps",
        "4",
        "--batch-size",
        "2",
        "--micro-batch",
        "2",
        "--sampling-steps",
        "4",
        "--grad-range",
        "0",
        "2",
        "--resolution",
        "16",
        "--lr",
        "0.05",
        "--checkpoint-every",
        "2",
        "--eval-every",
        "2",
        "--no-progress",
        "--handcrafted",
        "blurry",
        *extra,
    ]


def test_stop_request_checkpoints_then_resume_with_samples_and_tensorboard(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, monkeypatch, capsys
):
    pytest.importorskip("tensorboard")
    from reneg.trainer import events

    out = tmp_path / "run"
    real = events.TrainEvents.on_step

    def on_step(self, step, row, neg, last):  # the studio's Stop button: OUT/STOP during step 3
        real(self, step, row, neg, last)
        if step == 3:
            (out / events.STOP_FILE).write_text("stop")

    monkeypatch.setattr(events.TrainEvents, "on_step", on_step)
    rc = main(
        _args(tmp_path, out, tiny_pipeline_dir, tiny_hps_ckpt, "--sample-every", "2", "--report-to", "tensorboard")
    )
    assert rc == 143, capsys.readouterr().err  # a stopped run is not a finished one
    assert "stopped at step 3" in capsys.readouterr().out
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == 3  # the step in progress finished and was kept, off the --checkpoint-every grid
    assert json.loads((out / "summary.json").read_text())["status"] == "stopped"
    assert not (out / events.STOP_FILE).exists()
    index = json.loads((out / "samples" / "index.json").read_text())
    assert index["steps"] == [0, 2] and len(index["prompts"]) == 2 and index["columns"] == ["null", "learned"]
    from PIL import Image

    im = Image.open(out / "samples" / "step_000002.png")
    assert im.width >= 2 * events.SAMPLE_TILE and im.height >= 2 * events.SAMPLE_TILE

    monkeypatch.setattr(events.TrainEvents, "on_step", real)
    rc = main(
        _args(
            tmp_path,
            out,
            tiny_pipeline_dir,
            tiny_hps_ckpt,
            "--sample-every",
            "2",
            "--report-to",
            "tensorboard",
            "--resume",
        )
    )
    assert rc == 0, capsys.readouterr().err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4
    # the resumed process shows its starting point (step 3) once, then keeps the --sample-every grid
    assert json.loads((out / "samples" / "index.json").read_text())["steps"] == [0, 2, 3, 4]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = {"scalars": set(), "images": set()}
    steps = set()
    for f in sorted(os.listdir(out / "tensorboard")):
        acc = EventAccumulator(str(out / "tensorboard" / f))
        acc.Reload()
        t = acc.Tags()
        tags["scalars"] |= set(t["scalars"])
        tags["images"] |= set(t["images"])
        steps |= {e.step for e in acc.Scalars("train/reward")}
    assert {"train/loss", "train/reward", "train/lr", "heldout/learned", "heldout/null"} <= tags["scalars"]
    assert "samples/null_vs_learned" in tags["images"]
    assert steps == {1, 2, 3, 4}


def test_bad_event_flags_are_one_line_errors(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, capsys):
    rc = main(_args(tmp_path, tmp_path / "r", tiny_pipeline_dir, tiny_hps_ckpt, "--sample-every", "-1"))
    assert rc == 2 and "--sample-every must be an integer >= 0" in capsys.readouterr().err


def test_sigterm_requests_a_stop(tmp_path):
    import signal

    from reneg.trainer.events import _StopWatch

    old = signal.getsignal(signal.SIGTERM)
    w = _StopWatch(str(tmp_path), signals=True)  # as the command installs it
    try:
        assert not w.check()
        os.kill(os.getpid(), signal.SIGTERM)
        assert w.check()
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing: the stop is under way
        assert w.check() and w.reason == "SIGTERM"
    finally:
        w.close()
    assert signal.getsignal(signal.SIGTERM) == old  # the handler is the process's own again

"""reneg train watching for reward hacking: --monitor-reward, the held-out diversity, the hacking warning
and --keep-best-by (trainer/monitor.py), on tiny models through the command line."""

from __future__ import annotations

import csv
import json
import os
import random

import pytest
import torch

from reneg.cli import main
from reneg.embedding import load_embedding
from reneg.trainer.checkpoint import load_checkpoint
from reneg.trainer.monitor import DIVERSITY_DROP, HeldoutMonitor, hacking_warning, training_trend
from test_reliability_cli import ModelLoadAttempt, env, train_base  # noqa: F401
from test_reliability_promises import _refused
from test_train_events import _args


@pytest.fixture(scope="session")
def judge_ckpt(tmp_path_factory) -> str:
    """A second tiny HPS reward, built with another seed: the monitor reward (it scores differently)."""
    from reneg.tiny import build_tiny_hps

    return build_tiny_hps(str(tmp_path_factory.mktemp("tiny") / "judge"), seed=1)


def _rows(out) -> list[dict]:
    with open(os.path.join(out, "log.csv"), newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _header(out) -> list[str]:
    with open(os.path.join(out, "log.csv"), newline="", encoding="utf-8") as f:
        return next(csv.reader(f))


# --------------------------------------------------------------------------- the columns


def test_monitor_rewards_and_diversity_are_logged_and_never_trained_on(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, judge_ckpt, capsys
):
    from reneg.trainer.train import CsvLog

    tb = ["--report-to", "tensorboard"] if _has_tensorboard() else []
    out, plain = tmp_path / "run", tmp_path / "plain"
    watched = ["--eval-every", "1", "--monitor-reward", f"hpsv2={judge_ckpt}", *tb]
    assert main(_args(tmp_path, out, tiny_pipeline_dir, tiny_hps_ckpt, *watched)) == 0, capsys.readouterr().err
    assert main(_args(tmp_path, plain, tiny_pipeline_dir, tiny_hps_ckpt, "--eval-every", "1")) == 0

    # the existing columns first, in their order; then the diversity, then the monitor's three
    new = [
        "heldout_diversity",
        "heldout_hpsv2-hps_tiny_null",
        "heldout_hpsv2-hps_tiny_handcrafted",
        "heldout_hpsv2-hps_tiny_learned",
    ]
    assert _header(out) == CsvLog.FIELDS + new
    assert _header(plain) == CsvLog.FIELDS + new[:1]
    rows, ref = _rows(out), _rows(plain)
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    for r, p in zip(rows, ref):
        for k in new:
            assert r[k] != "", (k, r)
        # a monitor never enters the loss nor the compute meter: the run trains as the one without it
        for k in CsvLog.FIELDS:
            if k != "seconds":
                assert r[k] == p[k], (k, r[k], p[k])
        assert r["heldout_diversity"] == p["heldout_diversity"] and float(r["heldout_diversity"]) >= 0
    # the monitor is another model: its scores are its own; null and handcrafted are scored once
    assert rows[0]["heldout_hpsv2-hps_tiny_learned"] != rows[0]["heldout_learned"]
    assert len({r["heldout_hpsv2-hps_tiny_null"] for r in rows}) == 1

    # heldout_scores.csv: each check's per-image scores, whose means are log.csv's columns
    with open(out / "heldout_scores.csv", newline="", encoding="utf-8") as f:
        per = list(csv.DictReader(f))
    assert set(per[0]) == {"step", "prompt_index", "prompt", "measure", "score"}
    for r in rows:
        for measure, col in (("heldout", "heldout_learned"), ("hpsv2-hps_tiny", "heldout_hpsv2-hps_tiny_learned")):
            got = [float(x["score"]) for x in per if x["step"] == r["step"] and x["measure"] == measure]
            assert got and sum(got) / len(got) == pytest.approx(float(r[col]), abs=1e-5), (measure, r["step"])

    summary = json.loads((out / "summary.json").read_text())
    h = summary["heldout"]
    assert set(h) == {
        "null",
        "handcrafted",
        "learned",
        "diversity",
        "hpsv2-hps_tiny_null",
        "hpsv2-hps_tiny_handcrafted",
        "hpsv2-hps_tiny_learned",
    }
    assert h["hpsv2-hps_tiny_learned"] == pytest.approx(float(rows[-1]["heldout_hpsv2-hps_tiny_learned"]), rel=1e-5)
    assert [x["step"] for x in summary["heldout_history"]] == [1, 2, 3, 4]
    assert all("hpsv2-hps_tiny_learned" in x and "diversity" in x for x in summary["heldout_history"])
    assert summary["warnings"] == [] and "best" not in summary
    assert "held-out hpsv2-hps_tiny (monitor)" in capsys.readouterr().out

    # the studio's plot: the monitor and the diversity in a panel beside the held-out reward
    pytest.importorskip("matplotlib")
    from reneg.studio.app import curves_figure
    from reneg.studio.runs import run_status

    st = run_status(str(out))
    assert [s for s, _ in st["monitors"]["hpsv2-hps_tiny"]] == [1, 2, 3, 4] and len(st["monitors"]["diversity"]) == 4
    fig = curves_figure(st["rows"], st["heldout"], monitors=st["monitors"])
    lines = {ln.get_label(): ln for ax in fig.axes[2:] for ln in ax.lines}
    assert list(lines["hpsv2-hps_tiny"].get_xdata()) == [1, 2, 3, 4] and list(lines["diversity"].get_xdata()) == [
        1,
        2,
        3,
        4,
    ]
    assert list(lines["hpsv2-hps_tiny"].get_ydata()) == pytest.approx(
        [float(r["heldout_hpsv2-hps_tiny_learned"]) for r in rows]
    )

    if tb:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        tags = set()
        for f in os.listdir(out / "tensorboard"):
            acc = EventAccumulator(str(out / "tensorboard" / f))
            acc.Reload()
            tags |= set(acc.Tags()["scalars"])
        assert {
            "heldout/learned",
            "heldout/diversity",
            "heldout/hpsv2-hps_tiny_learned",
            "heldout/hpsv2-hps_tiny_null",
        } <= tags


def test_diversity_is_left_empty_for_a_reward_without_an_image_tower(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, judge_ckpt, monkeypatch, capsys
):
    from reneg.rewards import WeightedReward

    # two rewards make a WeightedReward: made to have no image tower, as a reward without one
    monkeypatch.setattr(WeightedReward, "image_features", lambda self, images: None)
    out = tmp_path / "run"
    two = ("--reward", f"hpsv2={judge_ckpt}", "--steps", "2", "--eval-every", "1")
    assert main(_args(tmp_path, out, tiny_pipeline_dir, tiny_hps_ckpt, *two)) == 0, capsys.readouterr().err
    assert [r["heldout_diversity"] for r in _rows(out)] == ["", ""] and _rows(out)[0]["heldout_learned"]
    assert json.loads((out / "summary.json").read_text())["heldout"]["diversity"] is None
    # and --keep-best-by diversity says why it can not keep one, naming the flag
    capsys.readouterr()
    rc = main(_args(tmp_path, tmp_path / "r2", tiny_pipeline_dir, tiny_hps_ckpt, *two, "--keep-best-by", "diversity"))
    err = capsys.readouterr().err
    assert rc == 2 and "--keep-best-by diversity: the training reward" in err and "no image tower" in err, err


def test_a_warning_reaches_the_console_summary_tensorboard_and_studio(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, monkeypatch, capsys
):
    """The plumbing of a warning (the rule itself is tested on synthetic histories below)."""
    from reneg.studio.runs import run_status
    from reneg.trainer import events, monitor

    def warn(measure, step, *a, **k):  # the held-out diversity "falls" at step 3
        return f"held-out {measure} fell at step {step}" if (measure, step) == ("diversity", 3) else None

    monkeypatch.setattr(monitor, "hacking_warning", warn)
    seen = {}
    real = events.TrainEvents.on_step

    def on_step(self, step, row, neg, last):  # what a reader of the running run sees
        real(self, step, row, neg, last)
        seen[step] = json.loads((tmp_path / "run" / "summary.json").read_text())

    monkeypatch.setattr(events.TrainEvents, "on_step", on_step)
    tb = ["--report-to", "tensorboard"] if _has_tensorboard() else []
    out = tmp_path / "run"
    assert main(_args(tmp_path, out, tiny_pipeline_dir, tiny_hps_ckpt, "--eval-every", "1", *tb)) == 0
    printed = capsys.readouterr().out
    assert printed.count("reneg train: warning: held-out diversity fell at step 3") == 1
    want = [{"step": 3, "measure": "diversity", "message": "held-out diversity fell at step 3"}]
    assert seen[2]["warnings"] == [] and seen[3]["status"] == "running" and seen[3]["warnings"] == want
    assert json.loads((out / "summary.json").read_text())["warnings"] == want
    assert run_status(str(out))["warnings"] == ["held-out diversity fell at step 3"]
    if tb:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        texts = []
        for f in os.listdir(out / "tensorboard"):
            acc = EventAccumulator(str(out / "tensorboard" / f), size_guidance={"tensors": 0})
            acc.Reload()
            texts += [t for t in acc.Tags().get("tensors", []) if t.startswith("warnings/")]
        assert any(t.startswith("warnings/diversity") for t in texts), texts


def _has_tensorboard() -> bool:
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- --keep-best-by


def test_keep_best_by_writes_the_embedding_of_the_best_check(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, judge_ckpt, monkeypatch, capsys
):
    from reneg.trainer import train

    saved = {}
    real = train.save_checkpoint

    def save_checkpoint(path, **kw):  # every step's checkpoint, as written
        saved[kw["step"]] = kw["neg"].detach().cpu().clone()
        return real(path, **kw)

    monkeypatch.setattr(train, "save_checkpoint", save_checkpoint)
    out = tmp_path / "run"
    extra = ["--eval-every", "1", "--checkpoint-every", "1", "--monitor-reward", f"hpsv2={judge_ckpt}"]
    rc = main(_args(tmp_path, out, tiny_pipeline_dir, tiny_hps_ckpt, *extra, "--keep-best-by", "hpsv2-hps_tiny"))
    assert rc == 0, capsys.readouterr().err
    rows = _rows(out)
    scores = [float(r["heldout_hpsv2-hps_tiny_learned"]) for r in rows]
    step = int(rows[scores.index(max(scores))]["step"])  # the first check with the highest value
    best = json.loads((out / "summary.json").read_text())["best"]
    assert (best["by"], best["step"]) == ("hpsv2-hps_tiny", step) and best["value"] == pytest.approx(
        max(scores), rel=1e-5
    )
    emb = load_embedding(out / "embedding-best.safetensors")
    assert torch.equal(emb.tensor, saved[step])
    assert emb.metadata["best_by"] == "hpsv2-hps_tiny" and emb.metadata["best_step"] == str(step)
    assert emb.metadata["trained_steps"] == str(step) and emb.metadata["kind"] == "global"
    assert float(emb.metadata["best_value"]) == best["value"]
    # the checkpoint carries the best check: its embedding and the monitor's state
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert torch.equal(state["best_neg"], saved[step])
    assert state["extra"]["monitor"]["keep"] == {k: best[k] for k in ("by", "step", "value")}


def test_resume_continues_the_best_check_exactly(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, monkeypatch, capsys):
    """A run stopped at step 3 and resumed ends where the unbroken one ends, its best check included, even
    when embedding-best.safetensors was replaced after the checkpoint (a killed run writing a later best)."""
    from reneg.trainer import events

    extra = ("--eval-every", "1", "--keep-best-by", "heldout")
    ref, out = tmp_path / "ref", tmp_path / "run"
    assert main(_args(tmp_path, ref, tiny_pipeline_dir, tiny_hps_ckpt, *extra)) == 0, capsys.readouterr().err

    real_step, real_start = events.TrainEvents.on_step, events.TrainEvents.on_start

    def on_step(self, step, row, neg, last):
        real_step(self, step, row, neg, last)
        if step == 3:
            (out / events.STOP_FILE).write_text("stop")

    monkeypatch.setattr(events.TrainEvents, "on_step", on_step)
    assert main(_args(tmp_path, out, tiny_pipeline_dir, tiny_hps_ckpt, *extra)) == 143
    monkeypatch.setattr(events.TrainEvents, "on_step", real_step)
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["step"] == 3 and state["extra"]["monitor"]["keep"]["by"] == "heldout"

    # a resumed run keeps the best check of the measure it was started with
    rc = main(_args(tmp_path, out, tiny_pipeline_dir, tiny_hps_ckpt, "--eval-every", "1", "--resume"))
    assert rc == 2 and "--keep-best-by" in capsys.readouterr().err

    # a later best written by a run killed after this checkpoint: the resumed run puts the checkpoint's back
    (out / "embedding-best.safetensors").write_bytes((ref / "embedding.safetensors").read_bytes())
    seen = {}

    def on_start(self, step, neg):
        seen["best"] = load_embedding(out / "embedding-best.safetensors")
        real_start(self, step, neg)

    monkeypatch.setattr(events.TrainEvents, "on_start", on_start)
    assert main(_args(tmp_path, out, tiny_pipeline_dir, tiny_hps_ckpt, *extra, "--resume")) == 0
    assert torch.equal(seen["best"].tensor, state["best_neg"])
    assert seen["best"].metadata["best_step"] == str(state["extra"]["monitor"]["keep"]["step"])

    got, want = json.loads((out / "summary.json").read_text()), json.loads((ref / "summary.json").read_text())
    assert got["best"]["step"] == want["best"]["step"] and got["best"]["value"] == want["best"]["value"]
    assert got["warnings"] == want["warnings"] and got["heldout_history"] == want["heldout_history"]
    a, b = load_embedding(out / "embedding-best.safetensors"), load_embedding(ref / "embedding-best.safetensors")
    assert torch.equal(a.tensor, b.tensor) and a.metadata["best_step"] == b.metadata["best_step"]
    sa, sb = load_checkpoint(str(out / "checkpoint.pt")), load_checkpoint(str(ref / "checkpoint.pt"))
    assert sa["extra"]["monitor"] == sb["extra"]["monitor"] and torch.equal(sa["best_neg"], sb["best_neg"])

    def rows(d):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in _rows(d)]

    assert rows(out) == rows(ref)
    # the per-image scores too: the resumed run's file keeps the rows up to its checkpoint, then goes on
    assert (out / "heldout_scores.csv").read_text() == (ref / "heldout_scores.csv").read_text()


# --------------------------------------------------------------------------- bad flags


def test_bad_monitor_flags_are_refused_by_name_before_any_model_loads(env, capsys):  # noqa: F811
    base = train_base(env) + ["--eval-every", "2"]
    missing = os.path.join(env["tmp"], "missing.pt")
    _refused("train", base + ["--monitor-reward", f"hpsv2={missing}"], "--monitor-reward", capsys)
    _refused("train", base + ["--monitor-reward", f"nosuchreward={env['reward_path']}"], "--monitor-reward", capsys)
    _refused("train", base + ["--monitor-reward", env["reward"] + ",weight=0.5"], "--monitor-reward", capsys)
    _refused("train", base + ["--keep-best-by", "judge"], "--keep-best-by", capsys)
    _refused("train", train_base(env) + ["--keep-best-by", "heldout"], "--keep-best-by", capsys)  # --eval-every 500
    _refused("train", base + ["--eval-every", "0", "--keep-best-by", "heldout"], "--keep-best-by", capsys)
    one = train_base(env, drop=("--heldout-count",)) + ["--heldout-count", "1", "--eval-every", "2"]
    _refused("train", one + ["--keep-best-by", "diversity"], "--keep-best-by", capsys)
    # a monitor's name, once there is one: two of the training reward's NAME are NAME-<file stem> and NAME-<file stem>-2
    two = base + ["--monitor-reward", env["reward"], "--monitor-reward", env["reward"]]
    for by in ("heldout", "diversity", "hpsv2-hps", "hpsv2-hps-2"):
        with pytest.raises(ModelLoadAttempt):
            main(two + ["--keep-best-by", by])
    capsys.readouterr()
    _refused("train", two + ["--keep-best-by", "hpsv2-hps-3"], "--keep-best-by", capsys)


def test_keep_best_by_names_the_measures_there_are(env, capsys):  # noqa: F811
    rc = main(train_base(env) + ["--eval-every", "2", "--monitor-reward", env["reward"], "--keep-best-by", "judge"])
    err = capsys.readouterr().err
    assert rc == 2 and "expected one of heldout, hpsv2-hps, diversity" in err, err


# --------------------------------------------------------------------------- the warning rule


def _train(n: int, slope: float) -> list[list[float]]:
    rng = random.Random(0)
    return [[s, 0.5 + slope * s + rng.gauss(0, 0.002)] for s in range(1, n + 1)]


def _scores(mean: float, n: int = 16, seed: int = 1, sd: float = 0.01) -> list[float]:
    rng = random.Random(seed)
    return [mean + rng.gauss(0, sd) for _ in range(n)]


def test_warning_fires_when_training_rises_and_held_out_falls_significantly():
    best_scores = _scores(0.70)
    best = {"step": 10, "value": sum(best_scores) / 16, "scores": best_scores}
    now = [x - 0.04 + random.Random(2).gauss(0, 0.003) for x in best_scores]  # the same images, each lower
    msg = hacking_warning("judge", 40, sum(now) / 16, now, best, _train(40, 0.005), 10)
    assert msg is not None
    assert msg.startswith("from step 30 the training reward rose (")
    assert f"held-out judge fell ({best['value']:.4f} at step 10 -> {sum(now) / 16:.4f} at step 40)" in msg
    assert "(reward hacking); the best held-out checkpoint is step 10 (--keep-best-by judge keeps it)" in msg
    # with the measure kept, the message names the file that holds it
    kept = hacking_warning("judge", 40, sum(now) / 16, now, best, _train(40, 0.005), 10, kept="OUT/best.st")
    assert kept.endswith("(OUT/best.st holds it)")


def test_no_warning_on_noise_or_when_the_training_reward_falls_too():
    best_scores = _scores(0.70)
    best = {"step": 10, "value": sum(best_scores) / 16, "scores": best_scores}
    # held-out noise around the same value: the paired interval straddles 0
    noisy = [x + g for x, g in zip(best_scores, _scores(0.0, seed=5))]
    assert hacking_warning("heldout", 40, sum(noisy) / 16, noisy, best, _train(40, 0.005), 10) is None
    # a real fall, but the training reward falls as well: the run is not hacking its reward, just worse
    low = [x - 0.04 for x in best_scores]
    assert hacking_warning("heldout", 40, sum(low) / 16, low, best, _train(40, -0.005), 10) is None
    # a flat training reward whose last window happens to be a little higher (the demo's normal run: 0.6927
    # -> 0.6943 with steps scattered by +-0.03) does not count as rising: no warning however far held-out fell
    rng = random.Random(3)
    flat = [[s, 0.69 + rng.gauss(0, 0.03)] for s in range(1, 41)]
    flat[-10:] = [[s, r + 0.002] for s, r in flat[-10:]]
    assert hacking_warning("heldout", 40, sum(low) / 16, low, best, flat, 10) is None
    # the best check is this one, or later: nothing to compare
    assert hacking_warning("heldout", 10, sum(low) / 16, low, best, _train(40, 0.005), 10) is None
    assert hacking_warning("heldout", 40, sum(low) / 16, low, None, _train(40, 0.005), 10) is None
    # one image gives no interval: never a warning from it
    one = {"step": 10, "value": 0.7, "scores": [0.7]}
    assert hacking_warning("heldout", 40, 0.6, [0.6], one, _train(40, 0.005), 10) is None


def test_diversity_warns_on_a_relative_drop_of_more_than_ten_percent():
    best = {"step": 20, "value": 0.30, "scores": None}
    train = _train(60, 0.005)
    small = 0.30 * (1 - DIVERSITY_DROP) + 0.001  # a drop just under 10 %
    assert hacking_warning("diversity", 60, small, None, best, train, 20) is None
    msg = hacking_warning("diversity", 60, 0.26, None, best, train, 20)
    assert msg and "held-out diversity fell (0.3000 at step 20 -> 0.2600 at step 60)" in msg
    assert "from step 40 the training reward rose" in msg
    assert hacking_warning("diversity", 60, 0.26, None, best, _train(60, -0.005), 20) is None


def test_the_monitor_warns_once_a_measure_and_resumes_from_its_state():
    """Checks every 10 steps: the judge peaks at step 20 and then falls while the training reward rises."""
    base = _scores(0.70)
    judge = {10: 0.0, 20: 0.02, 30: 0.0, 40: -0.03, 50: -0.05}
    train = _train(50, 0.005)

    def run(mon, steps, warnings):
        for step in steps:
            for s, r in train[step - 10 : step]:
                mon.add_training_reward(s, r)
            sc = [x + judge[step] for x in base]
            heldout = [x + 0.001 * step for x in base]  # the held-out training reward keeps rising
            values = {"heldout": sum(heldout) / 16, "judge": sum(sc) / 16, "diversity": 0.3}
            new, _ = mon.observe(step, values, {"heldout": heldout, "judge": sc}, 10)
            warnings += [(w["step"], w["measure"]) for w in new]

    mon, got = HeldoutMonitor(["heldout", "judge", "diversity"], keep_best_by="judge"), []
    run(mon, [10, 20, 30, 40, 50], got)
    assert got == [(30, "judge")]  # the first check significantly below step 20's, once
    assert mon.keep == {"by": "judge", "step": 20, "value": pytest.approx(sum(base) / 16 + 0.02)}
    assert mon.best["heldout"]["step"] == 50 and mon.best["diversity"]["step"] == 10  # ties keep the first

    # the same checks split by a resume through the checkpoint's JSON: the same warnings, the same best
    half, got2 = HeldoutMonitor(["heldout", "judge", "diversity"], keep_best_by="judge"), []
    run(half, [10, 20], got2)
    state = json.loads(json.dumps(half.state()))
    resumed = HeldoutMonitor(["heldout", "judge", "diversity"], keep_best_by="judge", state=state)
    run(resumed, [30, 40, 50], got2)
    assert got2 == got and resumed.state() == mon.state()


def test_warning_fires_on_the_held_out_images_when_the_batches_reward_is_too_noisy_to_read():
    """The over-trained demo run's shape: the batches' reward scattered by +-0.05 (never a significant rise),
    while on the same held-out images the training reward rose and the judge fell (rule 1b)."""
    rng = random.Random(4)
    noisy_train = [[s, 0.70 + rng.gauss(0, 0.05)] for s in range(1, 81)]
    held_then = _scores(0.71, seed=6)
    judge_then = _scores(0.745, seed=7)
    best = {"step": 40, "value": sum(judge_then) / 16, "scores": judge_then, "heldout": held_then}
    held_now = [x + 0.015 + random.Random(8).gauss(0, 0.003) for x in held_then]
    judge_now = [x - 0.045 for x in judge_then]
    assert training_trend(noisy_train, 80, 40, 40)[2] is False  # the batches say nothing
    msg = hacking_warning("judge", 80, sum(judge_now) / 16, judge_now, best, noisy_train, 40, heldout_now=held_now)
    assert msg is not None and msg.startswith(
        f"the training reward of the held-out images rose ({sum(held_then) / 16:.4f} at step 40 -> "
        f"{sum(held_now) / 16:.4f} at step 80) while held-out judge fell"
    )
    # the held-out reward level (noise only): no warning, however far the judge fell
    held_flat = [x + g for x, g in zip(held_then, _scores(0.0, seed=9))]
    assert hacking_warning("judge", 80, 0.6, judge_now, best, noisy_train, 40, heldout_now=held_flat) is None
    # the held-out reward fell too: the run is degrading, not hacking
    held_down = [x - 0.02 for x in held_then]
    assert hacking_warning("judge", 80, 0.6, judge_now, best, noisy_train, 40, heldout_now=held_down) is None
    # a best check recorded before this rule (no "heldout" in it), or no per-image reward now: rule 1a only
    old = {k: v for k, v in best.items() if k != "heldout"}
    assert hacking_warning("judge", 80, 0.6, judge_now, old, noisy_train, 40, heldout_now=held_now) is None
    assert hacking_warning("judge", 80, 0.6, judge_now, best, noisy_train, 40) is None
    # the training reward's own fall is never read against itself
    assert hacking_warning("heldout", 80, 0.6, held_down, best, noisy_train, 40, heldout_now=held_now) is None


def test_the_monitor_passes_the_held_out_reward_to_rule_1b():
    """Through observe(): the judge's best check keeps that check's held-out reward; a later check with the
    held-out reward up and the judge down warns although the batches' reward is flat noise."""
    rng = random.Random(11)
    base = _scores(0.70)
    mon = HeldoutMonitor(["heldout", "judge", "diversity"])
    got = []
    for step, (up, down) in zip((20, 40, 60), ((0.0, 0.0), (0.01, 0.0), (0.03, -0.05))):
        for s in range(step - 19, step + 1):
            mon.add_training_reward(s, 0.70 + rng.gauss(0, 0.05))
        held = [x + up for x in base]
        judge = [x + down for x in base]
        values = {"heldout": sum(held) / 16, "judge": sum(judge) / 16, "diversity": 0.3}
        new, _ = mon.observe(step, values, {"heldout": held, "judge": judge}, 20)
        got += [(w["step"], w["measure"]) for w in new]
    assert mon.best["judge"]["heldout"] == pytest.approx(base)  # the judge's best: step 20 (ties keep the first)
    assert got == [(60, "judge")]


def test_a_new_high_of_the_held_out_reward_with_a_monitor_far_below_its_best_warns():
    """Rule 1c, the over-trained demo run's shape: the judge's best check (step 40) had a held-out reward the
    run later passed only by noise; at step 80 the held-out reward sets a new high (over step 60's) while
    the judge stands far below its best. The batches' reward is flat noise; rule 1b's paired rise over step
    40 is not significant."""
    rng = random.Random(12)
    base = _scores(0.70, sd=0.03)

    def centred(sd):  # image-to-image scatter that moves no mean
        n = [rng.gauss(0, sd) for _ in base]
        return [x - sum(n) / len(n) for x in n]

    held = {20: [x - 0.01 for x in base], 40: base, 60: [x + 0.004 + n for x, n in zip(base, centred(0.02))]}
    held[80] = [x + 0.002 + n for x, n in zip(held[60], centred(0.02))]  # just above step 60's: a new high
    judge = {20: 0.0, 40: 0.02, 60: 0.02, 80: -0.04}  # step 60 ties step 40 (the first of equal ones stays best)
    mon, got = HeldoutMonitor(["heldout", "judge", "diversity"]), []
    for step in (20, 40, 60, 80):
        for s in range(step - 19, step + 1):
            mon.add_training_reward(s, 0.70 + rng.gauss(0, 0.05))
        j = [x + judge[step] + random.Random(min(step, 40) if step <= 60 else step).gauss(0, 0.003) for x in base]
        values = {"heldout": sum(held[step]) / 16, "judge": sum(j) / 16, "diversity": 0.3}
        new, _ = mon.observe(step, values, {"heldout": held[step], "judge": j}, 20)
        got += [(w["step"], w["measure"], w["message"]) for w in new]
    assert [(s, m) for s, m, _ in got] == [(80, "judge")]
    assert got[0][2].startswith(
        f"the training reward of the held-out images reached a new high ({sum(held[80]) / 16:.4f} at step 80, "
        f"above {sum(held[60]) / 16:.4f} at step 60) while held-out judge fell"
    )
    # the same checks with step 80's held-out reward a little below step 60's: no new high, no warning
    mon2, got2 = HeldoutMonitor(["heldout", "judge", "diversity"]), []
    held[80] = [x - 0.002 for x in held[60]]
    for step in (20, 40, 60, 80):
        j = [x + judge[step] + random.Random(min(step, 40) if step <= 60 else step).gauss(0, 0.003) for x in base]
        values = {"heldout": sum(held[step]) / 16, "judge": sum(j) / 16, "diversity": 0.3}
        got2 += mon2.observe(step, values, {"heldout": held[step], "judge": j}, 20)[0]
    assert got2 == []

"""A stopped run says it stopped; every command stops within moments of SIGTERM; nothing a user made is
replaced without --overwrite; a non-finite update is skipped; resume advice is a command that is accepted.

The signal tests run the real command in a subprocess on the tiny models, send SIGTERM once it is
working, and check the exit status, the time it took and the files it left.
"""

from __future__ import annotations

import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reneg.cli import main
from test_reliability_cli import ModelLoadAttempt, env, eval_base, train_base, tune_base  # noqa: F401
from test_reliability_promises import _checkpoint_for
from test_train_events import _args as _event_args
from test_train_events import _prompts

ROOT = Path(__file__).resolve().parents[1]
STOP_WITHIN = 20.0  # seconds from SIGTERM to exit: generous for a loaded CI machine; typically under 2


def _train_args(tmp_path, pipe, hps, out, *extra):
    """The tiny 4-step run of tests/test_train_events.py, on the CPU, held-out scoring in batches of 2."""
    return _event_args(tmp_path, out, pipe, hps, "--eval-batch", "2", "--device", "cpu", *extra)


def _spawn(argv, cwd, log):
    child = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    child["TQDM_DISABLE"] = "1"
    child["PYTHONPATH"] = str(ROOT) + os.pathsep + child.get("PYTHONPATH", "")
    f = open(log, "wb")  # noqa: SIM115 - the child's output
    return subprocess.Popen([sys.executable, "-m", "reneg.cli", *argv], cwd=cwd, env=child, stdout=f, stderr=f), f


def _wait_for(pred, proc, what, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if pred():
            return
        if proc.poll() is not None:
            raise AssertionError(f"the command ended (rc {proc.returncode}) before {what}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"timed out waiting for {what}")


def _terminate(proc, twice=False) -> tuple[int, float]:
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    if twice:  # a second request right after the first (the studio's Stop pressed twice)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(STOP_WITHIN + 10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("did not stop after SIGTERM") from None
    return rc, time.time() - t0


def _stopped_by_sigterm(argv, tmp_path, ready, what, twice=False, timeout=240) -> str:
    """Run ``reneg ARGV``; once ``ready()`` holds, SIGTERM it (``twice``: two in a row); it must exit 143
    within STOP_WITHIN seconds. Returns what it printed."""
    proc, f = _spawn(argv, tmp_path, tmp_path / "log.txt")
    try:
        _wait_for(ready, proc, what, timeout=timeout)
        rc, took = _terminate(proc, twice=twice)
    finally:
        f.close()
    text = (tmp_path / "log.txt").read_text()
    assert rc == 143, text[-3000:]
    assert took < STOP_WITHIN, took
    print(f"\n{argv[0]}{' --demo' if '--demo' in argv else ''}: exit {rc} {took:.2f} s after SIGTERM")
    return text


def _no_temp_files(folder) -> list[str]:
    return [p for p in glob.glob(os.path.join(folder, "**", ".*.tmp*"), recursive=True)]


def _log_rows(out) -> int:
    try:
        lines = (Path(out) / "log.csv").read_text().splitlines()
    except OSError:
        return 0
    return sum(1 for ln in lines[1:] if ln.split(",")[0].isdigit())


# --------------------------------------------------------------------------- signals


@pytest.mark.slow  # a real process: about 20 s on 2 busy cores, mostly imports
def test_train_sigterm_twice_stops_after_its_step_with_status_143(tiny_pipeline_dir, tiny_hps_ckpt, tmp_path):
    out = tmp_path / "run"
    argv = _train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, out, "--steps", "100000")
    argv[argv.index("--checkpoint-every") + 1] = "100000"  # only the stop writes a checkpoint
    argv[argv.index("--eval-every") + 1] = "0"
    text = _stopped_by_sigterm(argv, tmp_path, lambda: _log_rows(out) >= 1, "the first step", twice=True)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["step"] == _log_rows(out) >= 1  # the step in progress was finished and kept
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "stopped" and summary["step"] == state["step"] and summary["reason"] == "SIGTERM"
    assert "stopped at step" in text and "--resume" in text
    assert _no_temp_files(out) == [] and not (out / "STOP").exists()
    from reneg.fileio import FolderLock

    FolderLock(out, "test").acquire().release()  # the lock went with the process


@pytest.mark.slow  # a real process: about 20 s on 2 busy cores, mostly imports
def test_tune_sigterm_stops_at_once_and_writes_nothing(tiny_pipeline_dir, tiny_hps_ckpt, tmp_path):
    out = tmp_path / "tuned.safetensors"
    argv = ["tune", "--model", tiny_pipeline_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--prompt", "a red circle"]
    argv += ["--out", str(out), "--sampling-steps", "4", "--grad-range", "0", "2", "--resolution", "16"]
    argv += ["--max-steps", "100000", "--patience", "100000", "--device", "cpu"]
    _stopped_by_sigterm(
        argv, tmp_path, lambda: "step 1:" in (tmp_path / "log.txt").read_text(), "the first tuning step"
    )
    assert not out.exists() and not (tmp_path / "tuned.json").exists() and _no_temp_files(tmp_path) == []


@pytest.mark.slow  # a real process: about 20 s on 2 busy cores, mostly imports
def test_eval_sigterm_stops_at_once_leaving_whole_images(tiny_pipeline_dir, tiny_hps_ckpt, tmp_path):
    out = tmp_path / "ev"
    argv = ["eval", "--model", tiny_pipeline_dir, "--reward", f"hpsv2={tiny_hps_ckpt}"]
    argv += ["--prompts", _prompts(tmp_path), "--negative", "null", "--images-per-prompt", "2000", "--batch", "1"]
    argv += ["--out", str(out), "--sampling-steps", "4", "--resolution", "16", "--device", "cpu", "--no-progress"]
    _stopped_by_sigterm(argv, tmp_path, lambda: len(glob.glob(str(out / "images" / "*.png"))) >= 2, "the first images")
    from PIL import Image

    for p in glob.glob(str(out / "images" / "*.png")):
        Image.open(p).load()  # every image there is whole
    assert _no_temp_files(out) == [] and not (out / "summary.json").exists()


@pytest.mark.slow
def test_eval_demo_sigterm_stops_inside_its_own_training(tmp_path):
    out = tmp_path / "demo-eval"
    argv = ["eval", "--demo", "--out", str(out), "--no-progress"]
    _stopped_by_sigterm(
        argv, tmp_path, lambda: (out / "train" / "log.csv").exists(), "its training's first step", timeout=600
    )
    assert _no_temp_files(out) == []


def test_library_call_keeps_the_callers_handlers_and_raises_when_stopped(
    tiny_pipeline_dir, tiny_hps_ckpt, tmp_path, monkeypatch
):
    """run_train as a library: no signal handler of its own; OUT/STOP raises TrainingStopped (never a
    summary a caller could take for a finished run); the stopped summary says so; --resume finishes,
    and the last log row carries the final held-out scores."""
    from reneg.cli import build_parser
    from reneg.trainer import events
    from reneg.trainer.config import train_config_from_args
    from reneg.trainer.train import TrainingStopped, run_train

    out = tmp_path / "run"
    argv = _train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, out)
    seen = []
    real = events.TrainEvents.on_step

    def on_step(self, step, row, neg, last):
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)))
        real(self, step, row, neg, last)
        if step == 1:
            (out / events.STOP_FILE).write_text("stop")

    monkeypatch.setattr(events.TrainEvents, "on_step", on_step)
    before = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    with pytest.raises(TrainingStopped) as e:
        run_train(train_config_from_args(build_parser().parse_args(argv)))
    assert seen == [before]  # the caller's handlers, untouched
    assert (e.value.step, e.value.exit_code) == (1, 143) and e.value.checkpoint == str(out / "checkpoint.pt")
    assert json.loads((out / "summary.json").read_text())["status"] == "stopped"
    # the command: the same stop is exit status 143
    monkeypatch.setattr(events.TrainEvents, "on_step", real)
    assert main(argv + ["--resume"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["steps"] == 4
    last = (out / "log.csv").read_text().splitlines()
    header, row = last[0].split(","), last[-1].split(",")
    assert row[0] == "4" and row[header.index("heldout_learned")] != "", last[-1]
    assert float(row[header.index("heldout_learned")]) == pytest.approx(summary["heldout"]["learned"], abs=1e-5)


def test_stop_file_in_the_command_exits_143(tiny_pipeline_dir, tiny_hps_ckpt, tmp_path, monkeypatch, capsys):
    from reneg.trainer import events

    out = tmp_path / "run"
    real = events.TrainEvents.on_step

    def on_step(self, step, row, neg, last):
        real(self, step, row, neg, last)
        (out / events.STOP_FILE).write_text("stop")

    monkeypatch.setattr(events.TrainEvents, "on_step", on_step)
    assert main(_train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, out)) == 143
    assert "stopped at step 1 of 4" in capsys.readouterr().out
    # eval --demo would not take it for a finished run
    from reneg.evaluation.cli import _usable_training

    assert _usable_training(str(out), None) is None


def test_repeated_sigterm_is_ignored_second_ctrl_c_is_not(tmp_path):
    from reneg.trainer.events import _StopWatch

    old = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))
    w = _StopWatch(str(tmp_path), signals=True)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert w.check() and w.exit_code == 143
        os.kill(os.getpid(), signal.SIGTERM)  # the studio's Stop pressed again: no hard stop
        os.kill(os.getpid(), signal.SIGTERM)
        assert w.check()
        with pytest.raises(KeyboardInterrupt):  # Ctrl-C after a stop request: at once
            os.kill(os.getpid(), signal.SIGINT)
    finally:
        w.close()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == old
    w = _StopWatch(str(tmp_path))  # without signals=True (a library call): no handler at all
    try:
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == old
    finally:
        w.close()


def test_studio_stop_asks_once_and_shows_a_143_stop_as_stopped(tmp_path):
    pytest.importorskip("gradio")
    from reneg.studio import runs

    out = tmp_path / "run"
    out.mkdir()
    counter = tmp_path / "count"
    code = (
        "import signal, sys, time\n"
        "n = [0]\n"
        "def h(s, f):\n"
        f"    n[0] += 1; open({str(counter)!r}, 'w').write(str(n[0]))\n"
        "signal.signal(signal.SIGTERM, h)\n"
        "print('ready', flush=True)\n"
        "t = time.time()\n"
        "while time.time() - t < 30: time.sleep(0.05)\n"
    )
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == b"ready"
        m = runs.RunManager()
        m.procs[m._key(str(out))] = p
        assert m.stop(str(out)).startswith("Stopping")
        assert m.stop(str(out)).startswith("Already stopping")
        time.sleep(0.5)
        assert counter.read_text() == "1"  # one SIGTERM, however often Stop is pressed
    finally:
        p.kill()
        p.wait()
    # a run that stopped on request (exit status 143, summary "stopped", a checkpoint) is stopped, not failed
    from reneg.trainer.checkpoint import save_checkpoint

    os.unlink(out / "STOP")
    (out / runs.RUN_FILE).write_text(json.dumps({"pid": p.pid, "steps": 10, "started": time.time() - 60}))
    neg = torch.nn.Parameter(torch.zeros(1, 77, 64))
    opt = torch.optim.AdamW([neg], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(
        str(out / "checkpoint.pt"), step=3, neg=neg, optimizer=opt, scheduler=sched, skipped=0, config={}, heldout=[]
    )
    (out / runs.TRAIN_LOG).write_text("reneg train: stopped on request after step 3\nstopped at step 3 of 10\n")
    (out / "summary.json").write_text(json.dumps({"status": "stopped", "step": 3, "steps": 10}))
    m = runs.RunManager()
    m.procs[m._key(str(out))] = q = subprocess.Popen([sys.executable, "-c", "import sys; sys.exit(143)"])
    q.wait()
    st = runs.run_status(str(out), m)
    assert st["state"] == "stopped" and "Resume" in st["message"], st


# --------------------------------------------------------------------------- numerics


def test_non_finite_update_is_skipped_not_written(tiny_pipeline_dir, tiny_hps_ckpt, tmp_path, capsys, recwarn):
    out = tmp_path / "r"
    argv = _train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, out, "--lr", "1e308")
    argv[argv.index("--checkpoint-every") + 1] = "1"
    rc = main(argv + ["--max-bad-steps", "2"])
    cap = capsys.readouterr()
    assert rc == 2, cap.err
    assert "step 1: non-finite update, update skipped" in cap.out, cap.out
    assert "2 non-finite updates in a row" in cap.err and "expected finite values" not in cap.err, cap.err
    assert not (out / "embedding.safetensors").exists()  # nothing non-finite was ever written
    assert not [w for w in recwarn if "lr_scheduler.step()" in str(w.message)]


def test_checkpoint_with_a_non_finite_lr_is_refused(tmp_path):
    from reneg.trainer.checkpoint import load_checkpoint, save_checkpoint

    neg = torch.nn.Parameter(torch.zeros(1, 77, 64))
    for where in ("optimizer", "scheduler"):
        opt = torch.optim.AdamW([neg], lr=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        if where == "optimizer":
            opt.param_groups[0]["lr"] = float("nan")
        else:
            sched.base_lrs = [float("inf")]
        path = str(tmp_path / f"{where}.pt")
        save_checkpoint(path, step=1, neg=neg, optimizer=opt, scheduler=sched, skipped=0, config={}, heldout=[])
        with pytest.raises(ValueError, match=re.escape(path) + ".*non-finite " + where):
            load_checkpoint(path)


# --------------------------------------------------------------------------- overwriting


def test_a_new_run_never_replaces_a_run(env, capsys):  # noqa: F811
    from reneg.fileio import FolderLock

    base = train_base(env)
    out = Path(env["tmp"]) / "run"
    out.mkdir()
    (out / "summary.json").write_text(json.dumps({"status": "finished", "steps": 10}))
    capsys.readouterr()
    assert main(base) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err, err
    with pytest.raises(ModelLoadAttempt):  # --overwrite is the way through
        main(base + ["--overwrite"])
    # a second command on a folder another one is writing to is refused, even with --overwrite
    with FolderLock(out, "reneg train"):
        assert main(base + ["--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "is writing there now" in err and f"process {os.getpid()}" in err, err
    # eval into a training run's folder
    ev = eval_base(env)
    ev[ev.index("--out") + 1] = str(out)
    assert main(ev) == 2
    assert "not an evaluation" in capsys.readouterr().err
    with pytest.raises(ModelLoadAttempt):
        main(ev + ["--overwrite"])


def test_tune_refuses_its_json_and_bad_out_paths_before_tuning(env, capsys, tmp_path):  # noqa: F811
    base = tune_base(env)
    sidecar = Path(env["tmp"]) / "tuned.json"
    sidecar.write_text("{}")
    capsys.readouterr()
    assert main(base) == 2 and "tuned.json already exists" in capsys.readouterr().err
    with pytest.raises(ModelLoadAttempt):
        main(base + ["--overwrite"])
    sidecar.unlink()
    for bad, says in (
        (str(tmp_path / "missing" / "t.safetensors"), "does not exist"),
        (str(tmp_path / ("x" * 300 + ".safetensors")), "can not write"),
        (str(tmp_path / ".safetensors"), "expected a .safetensors file name"),
    ):
        argv = list(base)
        argv[argv.index("--out") + 1] = bad
        assert main(argv) == 2, bad
        assert says in capsys.readouterr().err, bad
    (tmp_path / "d.safetensors").mkdir()
    argv = list(base)
    argv[argv.index("--out") + 1] = str(tmp_path / "d.safetensors")
    assert main(argv + ["--overwrite"]) == 2 and "is a folder" in capsys.readouterr().err


def test_tune_demo_keeps_a_named_out_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    precious = tmp_path / "precious.safetensors"
    precious.write_bytes(b"mine")
    assert main(["tune", "--demo", "--out", str(precious)]) == 2
    assert "already exists" in capsys.readouterr().err and precious.read_bytes() == b"mine"


def test_train_demo_starts_its_own_folder_afresh_but_keeps_a_named_one(tmp_path, monkeypatch, capsys):
    """`reneg train --demo && reneg eval --demo` can be run again: the demo's own runs/demo-train is
    replaced; an --out the user names is not."""
    import reneg.trainer.train as train_mod
    from reneg.trainer.config import check_out_free

    monkeypatch.chdir(tmp_path)
    seen = []

    def fake_run_train(cfg, **kw):  # the trainer's own refusal, then no model work
        seen.append((cfg.out, cfg.overwrite))
        check_out_free(cfg)
        raise ModelLoadAttempt()

    monkeypatch.setattr(train_mod, "run_train", fake_run_train)
    own = tmp_path / "runs" / "demo-train"
    own.mkdir(parents=True)
    (own / "summary.json").write_text(json.dumps({"status": "finished", "steps": 160}))
    with pytest.raises(ModelLoadAttempt):
        main(["train", "--demo"])
    assert seen == [(os.path.join("runs", "demo-train"), True)]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text(json.dumps({"status": "finished", "steps": 160}))
    capsys.readouterr()
    assert main(["train", "--demo", "--out", str(mine)]) == 2
    assert "already holds a training run" in capsys.readouterr().err


# --------------------------------------------------------------------------- full disk


def test_failed_checkpoint_write_keeps_the_embedding_too(
    tiny_pipeline_dir, tiny_hps_ckpt, tmp_path, monkeypatch, capsys
):
    """The disk fills up after the embedding of checkpoint 4 is written and before its checkpoint:
    both files stay at step 2."""
    import errno

    import reneg.trainer.train as tt
    from reneg.embedding import load_embedding
    from reneg.trainer.checkpoint import load_checkpoint

    out = tmp_path / "run"
    real_emb, real_ckpt = tt.save_embedding, tt.save_checkpoint
    state = {"armed": False}

    def save_embedding(path, emb, **kw):
        real_emb(path, emb, **kw)
        if kw.get("trained_steps") == 4:
            state["armed"] = True

    def save_checkpoint(path, **kw):
        if state["armed"]:
            raise OSError(errno.ENOSPC, f"{path}: writing failed: {os.strerror(errno.ENOSPC)}")
        real_ckpt(path, **kw)

    monkeypatch.setattr(tt, "save_embedding", save_embedding)
    monkeypatch.setattr(tt, "save_checkpoint", save_checkpoint)
    argv = _train_args(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, out, "--steps", "6")
    assert main(argv) == 2
    assert os.strerror(errno.ENOSPC) in capsys.readouterr().err
    assert load_checkpoint(str(out / "checkpoint.pt"))["step"] == 2
    assert load_embedding(str(out / "embedding.safetensors")).metadata["trained_steps"] == "2"
    assert _no_temp_files(out) == []


# --------------------------------------------------------------------------- resume advice (a --steps it names is one the command accepts)


@pytest.mark.parametrize(
    "made, step, given",
    [
        (["--steps", "30", "--recipe", "fast"], 10, ["--steps", "5", "--recipe", "fast"]),
        (["--steps", "11"], 5, ["--steps", "11", "--recipe", "fast"]),  # another rollout: no --steps advice
        (["--steps", "2147483647", "--recipe", "fast"], 2147483000, ["--steps", "11", "--recipe", "fast"]),
        (["--steps", "2147483647"], 2147483647, ["--steps", "11"]),
    ],
)
def test_resume_advice_is_accepted(env, capsys, made, step, given):  # noqa: F811
    from reneg.cli import build_parser
    from reneg.trainer.config import train_config_from_args, validate_train

    base = [a for a in train_base(env) if a not in ("--steps", "10")]
    _checkpoint_for(base + made, step)
    capsys.readouterr()
    assert main(base + given + ["--resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    advice = re.search(r"resume with --steps (\d+) or more", err)
    if advice is None:
        return
    argv = list(base + given + ["--resume"])
    argv[argv.index("--steps") + 1] = advice.group(1)
    validate_train(train_config_from_args(build_parser().parse_args(argv)))  # accepted: no ConfigError

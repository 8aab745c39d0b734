"""reneg studio, driven through the page's handlers (and once through a launched app on 127.0.0.1).

Training and eval run as child processes exactly as the page runs them.
"""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch

pytest.importorskip("gradio")

from reneg.studio.app import EVAL_FIELDS, TRAIN_FIELDS, TUNE_FIELDS, Studio
from reneg.studio.runs import EvalForm, RunManager, TrainForm


def _values(form: TrainForm):
    return [getattr(form, k) for k in TRAIN_FIELDS]


def _poll_until(studio, out, pred, timeout=240, shown=""):
    t0, seen = time.time(), []
    while time.time() - t0 < timeout:
        r = studio.poll(out, shown)
        seen.append(r)
        if pred(r):
            return r, seen
        if r["state"] in ("failed",):
            raise AssertionError(f"the run failed: {r['status']}\n{r['log']}")
        time.sleep(0.5)
    raise AssertionError(f"timed out; last state {seen[-1]['state']}: {seen[-1]['status']}\n{seen[-1]['log']}")


@pytest.mark.slow
def test_demo_run_starts_reports_stops_with_checkpoint_and_resumes(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    studio = Studio(demo=True, root="runs")
    f = studio.train_defaults
    assert f.model.endswith("pipeline") and f.prompts and f.heldout and "hpsv2=" in f.rewards
    # a short run of the demo recipe
    f.steps, f.batch_size, f.micro_batch, f.heldout_count, f.eval_batch = 5, 2, 2, 2, 2
    f.sample_every, f.eval_every, f.checkpoint_every = 1, 2, 100
    msg = studio.start(*_values(f))
    assert msg.startswith("Started"), msg
    out = f.out
    r, _ = _poll_until(studio, out, lambda r: r["state"] == "running" and r["step"] >= 1)
    assert "Running: step" in r["status"] and r["steps"] == 5
    assert r["latest"] is not None and r["gallery"]  # sample images: null beside the current negative
    assert r["curves"] is not None and r["curves"].size[0] > 0 and r["rows"]  # loss and reward curves
    # the page is only a view: a new page (or a restarted app) finds the run from its folder
    other = Studio(demo=True, root="runs", manager=RunManager())
    again = other.poll(out, "")
    assert again["state"] in ("running", "loading") and again["step"] >= 1
    assert studio.start(*_values(f)).startswith("**Error:** Output folder")  # one run per folder
    # Stop from the other page: the run ends after its current step, with a checkpoint
    assert "Stopping" in other.stop(out)
    again = studio.stop(out)  # pressed twice: asked once, the step is not lost
    assert again.startswith(("Already stopping", "No run is going")), again
    assert studio.manager.wait(out, 240) == 143  # a stopped run exits non-zero, as SIGTERM's 128 + 15
    r = studio.poll(out, "")
    assert r["state"] == "stopped", r["status"]
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert 1 <= ck["step"] < 5 and f"step {ck['step']}" in r["status"]
    with open(os.path.join(out, "summary.json")) as fh:
        assert json.load(fh)["status"] == "stopped"
    # Resume continues to the end
    assert studio.resume(*_values(f)).startswith("Resumed")
    assert studio.manager.wait(out, 300) == 0
    r = studio.poll(out, "")
    assert r["state"] == "finished", r["status"] + r["log"]
    with open(os.path.join(out, "summary.json")) as fh:
        summary = json.load(fh)
    assert summary["steps"] == 5
    last = r["heldout"][-1]
    assert last[0] == 5 and last[1:] == pytest.approx(
        [summary["heldout"][k] for k in ("null", "handcrafted", "learned")], abs=1e-4
    )
    steps = [int(x) for x in r["signature"].split(":")[-1].strip("[]").split(",")]
    assert steps[0] == 0 and steps[-1] == 5
    assert r["rows"] == list(range(1, 6))  # the resumed log continues the stopped one


def test_bad_inputs_get_one_line_messages_not_tracebacks(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt):
    studio = Studio(demo=False, root=str(tmp_path / "runs"))
    f = studio.train_defaults
    assert (f.steps, f.lr, f.batch_size, f.sampling_steps, f.guidance) == (4000, 5e-3, 64, 30, 7.5)
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(f"a {c} circle" for c in ("red", "blue", "green", "pink")))

    def start(**kw):
        form = TrainForm.defaults()
        form.out = str(tmp_path / "out")
        form.model, form.rewards, form.prompts, form.heldout_count = (
            tiny_pipeline_dir,
            f"hpsv2={tiny_hps_ckpt}",
            str(prompts),
            2,
        )
        for k, v in kw.items():
            setattr(form, k, v)
        return studio.start(*_values(form))

    cases = {
        "model": ({"model": str(tmp_path / "nope")}, "no such folder or file"),
        "reward": ({"rewards": "hpsv9=x.pt"}, '"Rewards": '),
        "steps": ({"steps": 0}, '"steps" must be a positive integer'),
        "prompts": ({"prompts": str(tmp_path / "missing.txt")}, '"Training prompts file"'),
        "resolution": ({"resolution": 30}, '"resolution" must be a positive multiple of 8'),
        "number": ({"seed": None}, '"seed": a number is required'),
        "init": ({"init": str(tmp_path / "x.bin")}, '"init"'),
    }
    for name, (kw, expect) in cases.items():
        msg = start(**kw)
        assert msg.startswith("**Error:**") and expect in msg, (name, msg)
        assert "Traceback" not in msg and "\n" not in msg, (name, msg)
    assert not os.path.exists(tmp_path / "out" / "studio_run.json")  # nothing was started
    assert studio.resume(*_values(TrainForm(out=str(tmp_path / "out")))).startswith("**Error:** Resume:")
    assert studio.stop(str(tmp_path / "out")).startswith("No run is going")
    # a folder that is not a run shows a sentence, not an error
    assert "No run in" in studio.poll(str(tmp_path / "none"), "")["status"]

    tune = dict(
        zip(
            TUNE_FIELDS,
            [tiny_pipeline_dir, "", "", f"hpsv2={tiny_hps_ckpt}", "", "", 0, "seed", 3, 2, 0.05, 4, 7.5, 0, 2, 16, ""],
        )
    )
    status, *_ = next(studio.tune(*tune.values()))
    assert status == '**Error:** "Prompt" is required and must not be empty'  # reneg tune's own message
    status, *_ = next(studio.tune(*dict(tune, prompt="a", patience=5).values()))
    assert '"patience P" 5 is above "max steps N" 3' in status
    assert studio.tune_save(None, str(tmp_path / "t.safetensors")).startswith("**Error:** Nothing to save")

    ev = EvalForm(
        model=tiny_pipeline_dir,
        rewards=f"hpsv2={tiny_hps_ckpt}",
        prompts=str(prompts),
        negatives=f"null\n{tmp_path / 'missing.safetensors'}",
        out=str(tmp_path / "ev"),
        resolution=16,
    )
    status, *_ = next(studio.compare(*[getattr(ev, k) for k in EVAL_FIELDS]))
    assert status.startswith("**Error:**") and "missing.safetensors" in status and "\n" not in status
    assert studio.embeddings(str(tmp_path / "nowhere"))[0].startswith("**Error:** Folder")
    assert studio.convert("", "x.safetensors").startswith("**Error:**")
    assert "error" in studio.inspect(str(tmp_path / "nope.safetensors"))


@pytest.mark.slow
def test_a_run_that_crashes_shows_its_error_and_the_app_goes_on(tmp_path, tiny_pipeline_dir):
    bad = tmp_path / "hps.pt"
    bad.write_bytes(b"this is no checkpoint")  # passes the form's checks, fails when the run loads it
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\na green circle\n")
    studio = Studio(demo=False, root=str(tmp_path))
    form = TrainForm.defaults()
    form.model, form.rewards, form.prompts, form.heldout_count = tiny_pipeline_dir, f"hpsv2={bad}", str(prompts), 1
    form.out, form.steps, form.batch_size, form.resolution, form.sampling_steps = str(tmp_path / "o"), 2, 1, 16, 4
    form.grad_hi = 2
    assert studio.start(*_values(form)).startswith("Started")
    assert studio.manager.wait(form.out, 240) not in (0, None)
    r = studio.poll(form.out, "")
    assert r["state"] == "failed" and "hps.pt" in r["status"] and "Traceback" not in r["status"], r["status"]
    assert studio.stop(form.out).startswith("No run is going")  # the app itself carries on


def test_tune_streams_each_step_and_saves_the_kept_embedding(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt):
    from reneg.embedding import load_embedding

    studio = Studio(demo=False, root=str(tmp_path))
    values = [
        tiny_pipeline_dir,
        "",
        "",
        f"hpsv2={tiny_hps_ckpt}",
        "",
        "a red circle",
        3,
        "seed",
        3,
        3,
        0.05,
        4,
        7.5,
        0,
        2,
        16,
        "",
    ]
    updates = list(studio.tune(*values))
    assert updates[0][0].startswith("Loading")
    steps = [u for u in updates if u[0].startswith("Step ")]
    assert len(steps) == 3
    for i, (status, gallery, table, result) in enumerate(steps):
        assert len(gallery) == i + 1 and len(table) == i + 1 and result is None  # one image per step, as made
        assert gallery[-1][0].size[0] >= 256 and gallery[-1][1].startswith(f"step {i}: reward")
        # one numbering (reneg tune's: step 0 scores the start) in the status, the table and the pictures
        assert status.startswith(f"Step {i} of at most 2 ") and table[-1][0] == i, status
    final = updates[-1]
    assert final[0].startswith("**Done")
    best = max(final[2], key=lambda r: r[1])[0]
    assert f"at step {best}." in final[0], final[0]
    assert abs(final[3]["best_reward"] - max(r[1] for r in final[2])) < 1e-4  # the kept one is the best seen
    path = tmp_path / "kept.safetensors"
    assert studio.tune_save(final[3], str(path)).startswith("Saved")
    emb = load_embedding(path)
    assert emb.metadata["kind"] == "per-sample" and emb.metadata["prompt"] == "a red circle"
    again = studio.tune_save(final[3], str(path))
    assert again.startswith("**Error:**") and "already exists" in again


def test_embeddings_tab_lists_inspects_and_converts(tmp_path):
    from reneg.embedding import NegEmbedding, load_embedding, save_embedding

    folder = tmp_path / "embs"
    (folder / "run" / "samples").mkdir(parents=True)
    t = torch.randn(1, 77, 768)
    save_embedding(
        str(folder / "run" / "embedding.safetensors"),
        NegEmbedding(t, "sd1"),
        kind="global",
        base_model="sd15",
        steps=40,
    )
    from PIL import Image

    Image.new("RGB", (64, 32), (9, 9, 9)).save(folder / "run" / "samples" / "step_000040.png")
    torch.save(torch.randn(1, 77, 1024), folder / "official_sd21.bin")  # the paper's release format
    (folder / "broken.safetensors").write_bytes(b"not a file")
    studio = Studio(demo=False, root=str(tmp_path))
    status, rows, thumbs, _ = studio.embeddings(str(folder))
    assert status.startswith("3 embedding files")
    by = {r[0]: r for r in rows}
    assert by[os.path.join("run", "embedding.safetensors")][1:4] == ["sd1", "global", "1x77x768"]
    assert by["official_sd21.bin"][1] == "sd2" and by["broken.safetensors"][1] == "unreadable"
    assert len(thumbs) == 2 and thumbs[0][0].size[0] > 0
    info = studio.inspect(str(folder / "official_sd21.bin"))
    assert info["family"] == "sd2" and info["shape"] == [1, 77, 1024]
    dst = tmp_path / "sd21.safetensors"
    msg = studio.convert(str(folder / "official_sd21.bin"), str(dst))
    assert msg.startswith("Wrote") and load_embedding(dst).metadata["source_file"] == "official_sd21.bin"
    assert "already exists" in studio.convert(str(folder / "official_sd21.bin"), str(dst))
    # the family dropdown offers every family of the table (and empty: from the shape)
    from reneg.families import FAMILIES
    from reneg.studio.embeddings_tab import family_choices

    assert family_choices() == ["", *FAMILIES] and "pixart-sigma" in family_choices()


@pytest.mark.slow
def test_compare_runs_reneg_eval_and_shows_its_report(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n")
    studio = Studio(demo=False, root=str(tmp_path))
    ev = EvalForm(
        model=tiny_pipeline_dir,
        rewards=f"hpsv2={tiny_hps_ckpt}",
        prompts=str(prompts),
        negatives="null\nhandcrafted:blurry",
        out=str(tmp_path / "ev"),
        sampling_steps=4,
        resolution=16,
        images_per_prompt=2,
        batch=4,
    )
    updates = list(studio.compare(*[getattr(ev, k) for k in EVAL_FIELDS], poll=0.5))
    assert updates[0][0].startswith("Running `reneg eval`")
    status, log, table, grid, plots = updates[-1]
    assert status.startswith("Done"), (status, log)
    assert [r[1] for r in table] == ["null", "handcrafted"]
    assert grid is not None and grid.size[0] > 0 and plots
    assert studio.show_report(str(tmp_path / "ev"))[2] == table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_launched_app_binds_localhost_and_answers_a_client(tmp_path, capsys):
    from gradio_client import Client

    from reneg.studio.app import launch

    port = _free_port()
    app, _studio = launch(demo=False, port=port, root=str(tmp_path), block=False)
    try:
        out = capsys.readouterr().out
        assert f"ReNeg Studio: http://127.0.0.1:{port}" in out and "this machine only" in out
        assert app.server_name == "127.0.0.1"
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        msg = client.predict(str(tmp_path / "nothing"), api_name="/stop")
        assert msg.startswith("No run is going")
        # a bad form through the real page: a readable line comes back, not a traceback
        values = _values(TrainForm(out=str(tmp_path / "o")))
        msg = client.predict(*values, api_name="/start")
        assert msg == '**Error:** "Model" is required (a diffusers folder or a .safetensors checkpoint)'
    finally:
        app.close()


def test_front_end_imports_stay_light_and_listen_is_announced():
    import subprocess
    import sys

    heavy = "('gradio', 'torch', 'diffusers', 'pandas', 'tensorboard')"
    code = (
        f"import sys, reneg.studio.app; print(sorted(m for m in {heavy} if m in sys.modules)); "
        f"import reneg.cli; reneg.cli.build_parser(); print('gradio' in sys.modules, 'tensorboard' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # gradio and the models load only when the app starts or a run needs them
    assert out.split("\n")[:2] == ["[]", "False False"]
    from reneg.studio.app import address_line

    assert "this machine only" in address_line("http://127.0.0.1:7860", False)
    assert "ALL NETWORK INTERFACES" in address_line("http://127.0.0.1:7860", True)


def _studio_tune(studio, **values):
    """The Tune tab run to its end with the form's ``values`` (the rest its defaults): the last update."""
    from dataclasses import asdict

    from reneg.studio.forms import TuneForm

    v = dict(asdict(TuneForm()), **values)
    updates = list(studio.tune(*[v[k] for k in TUNE_FIELDS]))
    assert updates[-1][0].startswith("**Done"), updates[-1][0]
    return updates[-1]


def _cli_tune(tmp_path, name, args):
    from reneg.cli import main

    out = tmp_path / f"{name}.safetensors"
    assert main(["tune", *args, "--out", str(out), "--device", "cpu"]) == 0
    return json.loads(out.with_suffix(".json").read_text())


def test_tune_tab_starts_and_samples_as_reneg_tune_does(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt):
    """The Tune tab starts where ``reneg tune`` starts and samples what it samples: from a negative predictor
    (its negative for the prompt, not a refusal), and on Wan clips with --frames and --shift (a clip's reward
    the mean over its frames, the gallery a strip of frames); the start reward equals the command's, and the
    saved file records the start's kind, the frames and the shift as the command's does."""
    from reneg.embedding import NegEmbedding, load_embedding, save_embedding
    from reneg.predictor import from_embedding, save_predictor
    from reneg.tiny import build_tiny_wan

    studio = Studio(demo=False, root=str(tmp_path))
    reward = f"hpsv2={tiny_hps_ckpt}"
    common = dict(rewards=reward, prompt="a red circle", seed="1", max_steps=1, patience=1, sampling_steps=3)
    common.update(guidance=5.0, grad_lo=0, grad_hi=1, resolution=16)
    cli = ["--reward", reward, "--prompt", "a red circle", "--seed", "1", "--max-steps", "1", "--patience", "1"]
    cli += ["--sampling-steps", "3", "--guidance", "5", "--grad-range", "0", "1", "--resolution", "16"]

    # a predictor as the start
    from reneg.backends.loading import load_diffusers

    null, _ = load_diffusers(tiny_pipeline_dir).null_embedding()
    gpath = str(tmp_path / "glob.safetensors")
    save_embedding(gpath, NegEmbedding(null.float(), "tiny"))
    model = from_embedding(load_embedding(gpath), "xattn", 2)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in ("up", "mix", "up_pooled"):
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(2)) * 0.1)
    pred = str(tmp_path / "pred.safetensors")
    save_predictor(pred, model)
    final = _studio_tune(studio, model=tiny_pipeline_dir, embedding=pred, **common)
    want = _cli_tune(tmp_path, "p", ["--model", tiny_pipeline_dir, "--embedding", pred, *cli])
    assert final[3]["start_reward"] == pytest.approx(want["start_reward"], abs=1e-5)
    glob = _cli_tune(tmp_path, "g", ["--model", tiny_pipeline_dir, "--embedding", gpath, *cli])
    assert abs(want["start_reward"] - glob["start_reward"]) > 1e-6  # the predictor's own negative, not its global
    saved = tmp_path / "kept-p.safetensors"
    assert studio.tune_save(final[3], str(saved)).startswith("Saved")
    assert load_embedding(saved).metadata["start_kind"] == "predictor"

    # Wan clips with a shift
    wan = build_tiny_wan(str(tmp_path / "wan21"))
    final = _studio_tune(studio, model=wan, frames=5, shift="8", **common)
    want = _cli_tune(tmp_path, "w", ["--model", wan, "--frames", "5", "--shift", "8", *cli])
    assert final[3]["start_reward"] == pytest.approx(want["start_reward"], abs=1e-5)
    image, caption = final[1][-1]
    assert image.size[0] >= 5 * image.size[1] - 5 and caption.startswith("step 0")  # a strip of the clip's frames
    saved = tmp_path / "kept-w.safetensors"
    assert studio.tune_save(final[3], str(saved)).startswith("Saved")
    meta = load_embedding(saved).metadata
    assert (meta["frames"], float(meta["flow_shift"])) == ("5", 8.0)
    # the Compare and Train forms carry the two fields to their commands
    from reneg.studio.forms import eval_args, train_args

    ev = EvalForm(model=wan, frames="9", shift="8")
    assert "--frames=9" in eval_args(ev) and "--shift=8.0" in eval_args(ev)
    assert not any(a.startswith(("--frames", "--shift")) for a in eval_args(EvalForm(model=wan)))
    assert {"--frames=5", "--shift=8.0"} <= set(train_args(TrainForm(model=wan, frames=5, shift="8")))

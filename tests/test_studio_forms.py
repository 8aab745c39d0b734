"""reneg studio: what the forms send and what the page shows, without training anything.

Run folders are written by hand (``studio_run.json``, ``log.csv``, ``checkpoint.pt``,
``summary.json``) the way the trainer and the studio write them; process starts are recorded by a
stand-in for ``subprocess.Popen`` so that the exact command line can be read.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("gradio")

from reneg.studio import runs
from reneg.studio.app import TRAIN_FIELDS, TUNE_FIELDS, Studio
from reneg.studio.runs import EvalForm, FormError, RunManager, TrainForm

BIG_SEED = 12345678901234567891


def _values(form: TrainForm):
    return [getattr(form, k) for k in TRAIN_FIELDS]


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("\n".join(f"a {c} circle" for c in ("red", "blue", "green", "pink", "grey")) + "\n")
    return str(p)


def _form(tmp_path, pipeline, hps, prompt_file, **kw) -> TrainForm:
    f = TrainForm.defaults()
    f.model, f.rewards, f.prompts, f.out = pipeline, f"hpsv2={hps}", prompt_file, str(tmp_path / "run")
    f.heldout_count, f.resolution, f.sampling_steps, f.grad_hi = 2, 16, 4, 2
    for k, v in kw.items():
        setattr(f, k, v)
    return f


class _FakePopen:
    """Records the command instead of starting it (a finished child)."""

    started: list = []

    def __init__(self, cmd, **kw):
        self.cmd, self.pid, self.returncode = list(cmd), os.getpid(), 0
        _FakePopen.started.append(self.cmd)

    def poll(self):
        return 0

    def wait(self, timeout=None):
        return 0


@pytest.fixture()
def fake_popen(monkeypatch):
    _FakePopen.started = []
    monkeypatch.setattr(runs.subprocess, "Popen", _FakePopen)
    return _FakePopen.started


def _checkpoint(form: TrainForm, step: int) -> None:
    """A checkpoint as ``reneg train`` writes it for ``form``'s settings, at ``step``."""
    from reneg.trainer.checkpoint import save_checkpoint
    from reneg.trainer.config import train_config_from_args, resume_fingerprint

    ns = runs._command_parser("train").parse_args(["train", *runs.train_args(form)])
    cfg = train_config_from_args(ns)
    neg = torch.nn.Parameter(torch.zeros(1, 77, 32))
    opt = torch.optim.AdamW([neg], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    os.makedirs(form.out, exist_ok=True)
    save_checkpoint(
        os.path.join(form.out, "checkpoint.pt"),
        step=step,
        neg=neg,
        optimizer=opt,
        scheduler=sched,
        skipped=0,
        config=dict(cfg.to_json(), **resume_fingerprint(cfg)),
        heldout=[],
    )


# --------------------------------------------------------------------------- a reopened page, Resume


def test_a_reopened_page_refills_the_form_and_resume_uses_the_runs_settings(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompts, fake_popen
):
    studio = Studio(demo=False, root=str(tmp_path))
    run = _form(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompts, steps=8, batch_size=4, lr=0.02, seed=BIG_SEED)
    assert studio.start(*_values(run)).startswith("Started")
    assert not [a for a in fake_popen[-1] if a.startswith("--resume")]
    _checkpoint(run, 4)
    # the page is reloaded (or the app restarted): the form is refilled from the run it finds
    again = Studio(demo=False, root=str(tmp_path), manager=RunManager())
    again.manager.last_out = run.out
    out, values = again.reopen("")
    assert out == run.out
    shown = dict(zip(TRAIN_FIELDS, values))
    assert (shown["steps"], shown["batch_size"], shown["lr"], shown["model"]) == (8, 4, 0.02, tiny_pipeline_dir)
    assert shown["seed"] == str(BIG_SEED)  # exact: a seed field holds text, never a float
    # Resume from a page still at the defaults: the run's own settings are used, not the page's
    page = TrainForm.defaults()
    page.out = run.out
    msg = again.resume(*_values(page))
    assert msg.startswith("Resumed"), msg
    cmd = fake_popen[-1]
    assert "--batch-size=4" in cmd and "--steps=8" in cmd and "--lr=0.02" in cmd and f"--seed={BIG_SEED}" in cmd
    assert [a for a in cmd if a.startswith("--resume")] == ["--resume=latest"]  # once, not twice
    assert "batch size" in msg  # the page's values that were not used are named


def test_the_form_is_refilled_from_a_checkpoint_when_the_studio_did_not_start_the_run(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompts
):
    run = _form(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompts, steps=9, batch_size=3, micro_batch=3, seed=7)
    _checkpoint(run, 2)  # a run started by `reneg train`: no studio_run.json
    form = runs.recorded_form(run.out)
    assert form is not None
    assert (form.steps, form.batch_size, form.micro_batch, form.seed, form.prompts) == (9, 3, 3, 7, prompts)
    assert "--resume=latest" in runs.check_train(form, resume=True)  # the trainer takes it for the same run


# --------------------------------------------------------------------------- progress after a resume


def _write_log(out, rows):
    with open(os.path.join(out, "log.csv"), "w", newline="") as f:
        w = csv.DictWriter(
            f, ["step", "loss", "reward", "seconds", "heldout_null", "heldout_handcrafted", "heldout_learned"]
        )
        w.writeheader()
        for r in rows:
            w.writerow(r)


def _live_manager(out):
    """A manager whose child for ``out`` is a live process (a stand-in for a training run)."""
    m = RunManager()
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    m.procs[os.path.abspath(out)] = p
    return m, p


def test_after_a_resume_the_time_left_uses_only_the_resumed_steps(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "samples").mkdir()
    (out / "samples" / "step_000000.png").write_bytes(b"")
    started = time.time() - 5
    with open(out / runs.RUN_FILE, "w") as f:
        json.dump({"pid": 1, "steps": 8, "started": started, "resume": True, "resume_step": 4}, f)
    # the stopped run's steps took 2 s; the resumed ones take 30 s (another load on the machine), and
    # `seconds` restarts at the resume; a process's first row leaves out the samples made at its start
    old = [{"step": s, "loss": 1, "reward": 0, "seconds": 2 * s - 1} for s in range(1, 5)]
    new = [{"step": 5, "loss": 1, "reward": 0, "seconds": 10}, {"step": 6, "loss": 1, "reward": 0, "seconds": 40}]
    _write_log(out, old)
    os.utime(out / "log.csv", (started - 100, started - 100))  # the resumed run has not opened it yet
    m, p = _live_manager(out)
    try:
        st = runs.run_status(str(out), m)
        assert st["state"] == "loading"
        assert "first step" not in st["message"] and "Resuming from step 4" in st["message"], st["message"]
        _write_log(out, old + new[:1])
        st = runs.run_status(str(out), m)  # one resumed row: no time per step yet, none made up
        assert st["state"] == "running" and st["eta"] is None and "measuring" in st["message"], st["message"]
        _write_log(out, old + new + [{"step": 7, "loss": 1, "reward": 0, "seconds": 70}])
        st = runs.run_status(str(out), m)
        assert "30.00 s a step" in st["message"] and st["eta"] == pytest.approx(30), st["message"]
    finally:
        p.kill()
        p.wait()


# --------------------------------------------------------------------------- the plot


def test_the_final_held_out_score_is_plotted_and_a_single_point_is_drawn(tmp_path):
    from reneg.studio.app import curves_figure

    out = tmp_path / "run"
    out.mkdir()
    _write_log(
        out,
        [
            {"step": 1, "loss": 1.0, "reward": 0.1, "seconds": 1},
            {
                "step": 2,
                "loss": 0.9,
                "reward": 0.2,
                "seconds": 2,
                "heldout_null": 0.1,
                "heldout_handcrafted": 0.2,
                "heldout_learned": 0.3,
            },
            {"step": 3, "loss": 0.8, "reward": 0.3, "seconds": 3},
            {"step": 4, "loss": 0.7, "reward": 0.4, "seconds": 4},  # the final held-out score is not in the row
        ],
    )
    history = [
        {"step": 2, "null": 0.1, "handcrafted": 0.2, "learned": 0.3},
        {"step": 4, "null": 0.1, "handcrafted": 0.2, "learned": 0.5},
    ]
    summary = {"steps": 4, "heldout": history[-1], "heldout_history": history, "embedding": str(out / "e.safetensors")}
    (out / "summary.json").write_text(json.dumps(summary))
    studio = Studio(demo=False, root=str(tmp_path))
    r = studio.poll(str(out), "")
    assert r["state"] == "finished"
    assert [row[0] for row in r["heldout"]] == [2, 4]  # once each
    fig = curves_figure(runs.read_log(str(out)), r["heldout"])
    learned = next(ln for ln in fig.axes[1].lines if ln.get_label() == "held-out: learned")
    assert list(learned.get_xdata()) == [2, 4] and list(learned.get_ydata())[-1] == pytest.approx(0.5)
    # one logged step: the curves are a visible marker, not an invisible line of one point
    fig = curves_figure([{"step": 1, "loss": 1.0, "reward": 0.1}], [])
    for ax in fig.axes:
        assert ax.lines and ax.lines[0].get_marker() not in (None, "None", "", " "), ax.get_title()


# --------------------------------------------------------------------------- the page


def test_the_demo_header_names_the_world_once(tmp_path):
    from reneg.studio.app import header_markdown

    studio = Studio(demo=False, root=str(tmp_path))
    studio.demo = {"kind": "demo world", "threads": None}
    assert header_markdown(studio).lower().count("demo world") == 1
    studio.demo = {"kind": "tiny random models", "threads": None}
    assert "tiny random models" in header_markdown(studio)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from reneg.studio.app import build_app

    studio = Studio(demo=False, root=str(tmp_path_factory.mktemp("page")))
    app = build_app(studio)
    return {b.elem_id: b for b in app.blocks.values() if getattr(b, "elem_id", None)}, app


def test_the_page_keeps_seeds_exact_and_never_rounds_a_whole_number(page):
    import gradio as gr

    by_id, app = page
    for eid in ("train_seed", "tune_seed", "compare_seed"):
        assert isinstance(by_id[eid], gr.Textbox), eid  # a browser's number input is a float
    for eid, comp in by_id.items():
        if isinstance(comp, gr.Number):
            assert comp.preprocess(2.5) == 2.5, eid  # 2.5 reaches the checks (and is refused), never 2
    # Compare's plots and the embeddings' thumbnails shown whole: not cropped, nor cut off by a height
    for eid in ("compare_plots", "emb_thumbs"):
        assert by_id[eid].object_fit == "contain" and by_id[eid].height == "auto", eid


# --------------------------------------------------------------------------- numbers and flags


def test_train_numbers_stay_exact_and_are_checked_by_the_field_name(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompts
):
    f = _form(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompts)
    args = runs.check_train(_form(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompts, seed=str(BIG_SEED)))
    assert f"--seed={BIG_SEED}" in args
    # a value starting with '-' is a value, not a flag
    assert "--handcrafted=-blurry, lowres" in runs.check_train(
        _form(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompts, handcrafted="-blurry, lowres")
    )
    cases = [
        ({"lr": None}, '"learning rate": a number is required'),
        ({"lr": -1e-05}, '"learning rate" must be a finite number > 0'),
        ({"steps": 2.5}, '"steps": expected a whole number, got 2.5'),
        ({"steps": 0}, '"steps" must be a positive integer'),
        ({"seed": -5}, '"seed" must be between 0 and'),
        ({"seed": str(2**64)}, '"seed" must be between 0 and'),
        ({"seed": "12x"}, '"seed": expected a whole number'),
        ({"grad_hi": 9}, '"grad step from"/"grad step to" 0 9'),
        ({"prompts": "-p.txt"}, '"Training prompts file": -p.txt: no such prompt file'),
        ({"model": ""}, '"Model" is required'),
    ]
    for kw, expect in cases:
        with pytest.raises(FormError) as e:
            runs.check_train(_form(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompts, **kw))
        assert expect in str(e.value) and "--" not in str(e.value).split(":")[0], (kw, str(e.value))
    assert not f.out or not os.path.exists(os.path.join(f.out, runs.RUN_FILE))


def test_compare_takes_seeds_exactly(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompts):
    ev = EvalForm(model=tiny_pipeline_dir, rewards=f"hpsv2={tiny_hps_ckpt}", prompts=prompts, out=str(tmp_path / "ev"))
    # 5 prompts x 1 image use seeds SEED ... SEED + 4: the largest allowed is 2**64 - 5, exactly
    ev.seed, ev.resolution = str(2**64 - 5), 16
    assert f"--seed={2**64 - 5}" in runs.check_eval(ev)
    ev.seed = str(2**64 - 1)
    with pytest.raises(FormError, match=f'"seed" must be between 0 and {2**64 - 5}.*got {2**64 - 1}$'):
        runs.check_eval(ev)
    ev.seed, ev.images_per_prompt = 0, 1.5
    with pytest.raises(FormError, match='"images per prompt": expected a whole number'):
        runs.check_eval(ev)


def test_tune_runs_the_options_layers_checks(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt):
    studio = Studio(demo=False, root=str(tmp_path))
    ok = dict(
        zip(
            TUNE_FIELDS,
            [
                tiny_pipeline_dir,
                "",
                "",
                f"hpsv2={tiny_hps_ckpt}",
                "",
                "a cat",
                "0",
                "seed",
                3,
                2,
                0.05,
                4,
                7.5,
                0,
                2,
                16,
                "",
            ],
        )
    )
    assert studio.check_tune(dict(ok, seed=str(BIG_SEED))).seed == BIG_SEED
    cases = [
        ({"seed": "-5"}, '"seed" must be between 0 and'),
        ({"seed": str(2**64)}, '"seed" must be between 0 and'),
        ({"max_steps": 2.5}, '"max steps N": expected a whole number, got 2.5'),
        ({"lr": None}, '"learning rate": a number is required'),
        ({"lr": 0}, '"learning rate" must be a finite number > 0'),
        ({"guidance": float("nan")}, '"CFG scale" must be a finite number'),
        ({"patience": 5}, '"patience P" 5 is above "max steps N" 3'),
    ]
    for kw, expect in cases:
        status, *_ = next(studio.tune(*dict(ok, **kw).values()))
        assert status.startswith("**Error:**") and expect in status, (kw, status)


def test_a_root_that_cannot_be_written_is_refused_at_start(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="--root"):
        Studio(demo=False, root=str(blocker / "runs"))


# --------------------------------------------------------------------------- embeddings


def test_embedding_thumbnails_are_captioned_and_show_files_with_outliers(tmp_path):
    from reneg.embedding import NegEmbedding, save_embedding

    folder = tmp_path / "embs"
    folder.mkdir()
    g = torch.Generator().manual_seed(0)
    t = torch.randn(1, 77, 768, generator=g) * 0.02
    t[0, :, 5] += 40.0  # a few channels far from the rest, as in the paper's released files
    t[0, 0, :] *= 500.0
    save_embedding(str(folder / "outliers.safetensors"), NegEmbedding(t, "sd1"), kind="global")
    studio = Studio(demo=False, root=str(tmp_path))
    _status, _rows, thumbs, _ = studio.embeddings(str(folder))
    (im, caption) = thumbs[0]
    assert "outliers.safetensors" in caption and "sd1" in caption and "1x77x768" in caption
    import numpy as np

    a = np.asarray(im).astype(float)
    coloured = (a.max(-1) - a.min(-1)) > 40  # visibly red or blue, not near white
    assert coloured.mean() > 0.3, coloured.mean()


def test_a_run_from_separate_files_keeps_its_parts_in_the_refilled_form():
    """A run trained from ComfyUI's separate files (a transformer file with its text encoders, tokenizer and
    Wan's low-noise expert): the form refilled from its config shows them in Model parts and gives each
    part's flag back, so Resume and a restart load the same model; the field's lines read as the label says."""
    cfg = {
        "model": "/m/wan2.2_t2v_high_noise_14B_fp16.safetensors",
        "text_encoders": ["/m/umt5_xxl_fp16.safetensors"],
        "vae": "/m/wan_2.1_vae.safetensors",
        "tokenizer": "/m/tokenizer",
        "low_noise_model": "/m/wan2.2_t2v_low_noise_14B_fp16.safetensors",
        "rewards": ["hpsv2=/m/hps.pt"],
        "prompts": "/m/p.txt",
    }
    form = runs.form_from_config(cfg, "/tmp/run")
    args = runs.train_args(form)
    for flag, value in (("--text-encoder", cfg["text_encoders"][0]), ("--vae", cfg["vae"]),
                        ("--tokenizer", cfg["tokenizer"]), ("--low-noise-model", cfg["low_noise_model"])):  # fmt: skip
        assert f"{flag}={value}" in args, args
    assert form.parts.splitlines()[0] == cfg["text_encoders"][0] and "low-noise=" in form.parts
    from reneg.studio.forms import parts_args

    assert parts_args("a.safetensors\n VAE = v.safetensors\nx=y.safetensors") == [
        "--text-encoder=a.safetensors",
        "--vae=v.safetensors",
        "--text-encoder=x=y.safetensors",
    ]


def test_the_refilled_form_gives_back_every_setting_a_resume_must_match():
    """Resume in the studio restarts a run (one started from the command line too) from its config: every
    option a resumed run must match (trainer.config.RESUME_MUST_MATCH), set away from its default, comes
    back from the refilled form as the same value, so Resume is never refused over a setting the page
    dropped (Wan's clips and shift, NAG, a predictor, --tokens, ...)."""
    from reneg.studio.forms import parse_command, TRAIN_NAMES
    from reneg.trainer.config import RESUME_MUST_MATCH, train_config_from_args

    given = [
        "--model=/m/wan", "--reward=hpsv2=/m/hps.pt", "--prompts=/m/p.txt", "--out=/tmp/run",
        "--seed=7", "--batch-size=4", "--micro-batch=2", "--sampling-steps=12", "--grad-range", "1", "5",
        "--guidance=4.5+nag", "--nag-scale=3.0", "--nag-tau=2.0", "--nag-alpha=0.5", "--resolution=64",
        "--frames=5", "--guidance-2=3.0", "--shift=8.0", "--wan-experts=per-expert", "--lr=0.01",
        "--lr-schedule=constant", "--warmup=3", "--weight-decay=0.1", "--heldout-count=4", "--heldout-seed=9",
        "--handcrafted=blurry", "--rollout-steps=4", "--grads-per-rollout=2", "--predictor=xattn",
        "--predictor-rank=2", "--predictor-reg=0.1", "--predictor-features=centred", "--keep-best-by=diversity",
        "--tokens=3",
    ]  # fmt: skip
    cfg = vars(train_config_from_args(parse_command("train", given, TRAIN_NAMES)))
    form = runs.form_from_config(cfg, "/tmp/run")
    back = vars(train_config_from_args(parse_command("train", runs.train_args(form), TRAIN_NAMES)))
    skip = {"prompts_sha256", "heldout_sha256", "init_sha256", "monitor_names"}  # from files, not flags
    for k in RESUME_MUST_MATCH:
        if k in skip:
            continue
        assert k in cfg, k
        assert back[k] == cfg[k], (k, back[k], cfg[k])
    assert (back["frames"], back["shift"], back["guidance_mode"]) == (5, 8.0, "cfg+nag")
    assert (form.frames, form.shift) == (5, "8.0")

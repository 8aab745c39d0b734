"""The promises of docs/reliability.md that an adversarial user broke, one test each:

- every numeric flag of train, tune and eval, tried with NaN, inf, negatives, zero and values
  beyond 64 bits, is refused by name before any model loads, or accepted and honoured;
- a flag given beside ``--demo`` replaces the demo's setting or is refused by name;
- every loader failure is one line naming the file, whatever the file holds;
- ``--tie-tol nan``, seeds beyond 64 bits, a resume with a smaller ``--steps`` or other prompts
  or another ``--init``; ``inspect --json`` stays JSON, ``inspect`` never prints a file's
  control characters raw and lists metadata in one order; ``convert --family bogus`` blames the flag.

The exact-resume test on the demo world's real model layout is in test_reliability_exact_resume.py.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from reneg.cli import main
from test_reliability_cli import ModelLoadAttempt, env, eval_base, train_base, tune_base  # noqa: F401

BIG = [str(2**64), str(2**70), "9" * 30]
# a float flag takes any finite value in its range: 2**64 is a (large) number there, not an overflow
FLOATS = ["nan", "inf", "-inf", "-1", "0", "-0.5", "1e400", "-" + str(2**64)]
INTS = ["-1", "0"] + BIG

# (command, flag, values that must be refused, values that must be accepted)
NUMERIC = [
    ("train", "--steps", INTS, ["1"]),
    ("train", "--lr", FLOATS, ["1e-3", str(2**64)]),
    ("train", "--weight-decay", ["nan", "inf", "-1", "1e400"], ["0", "0.1", str(2**64)]),
    ("train", "--warmup", ["-1"] + BIG, ["0"]),
    ("train", "--batch-size", INTS, ["2"]),
    ("train", "--micro-batch", INTS, ["1"]),
    ("train", "--sampling-steps", INTS + ["1001"], ["4"]),
    ("train", "--guidance", FLOATS, ["7.5", str(2**64)]),
    ("train", "--resolution", INTS + ["12", "16384"], ["16"]),
    ("train", "--seed", ["-1"] + BIG, ["0", str(2**64 - 1)]),
    ("train", "--heldout-seed", ["-1"] + BIG + [str(2**64 - 1)], ["0", str(2**64 - 2)]),  # 2 held-out seeds
    ("train", "--heldout-count", INTS, ["2"]),
    ("train", "--checkpoint-every", INTS, ["5"]),
    ("train", "--eval-every", ["-1"] + BIG, ["0", "5"]),
    ("train", "--eval-batch", INTS, ["2"]),
    ("train", "--max-bad-steps", INTS, ["3"]),
    ("tune", "--seed", ["-1"] + BIG, ["0", str(2**64 - 1)]),  # fresh noise: seed+1..+10, modulo 2**64
    ("tune", "--max-steps", INTS, ["5"]),
    ("tune", "--patience", INTS, ["2"]),
    ("tune", "--lr", FLOATS, ["0.01"]),
    ("tune", "--sampling-steps", INTS + ["1001"], ["4"]),
    ("tune", "--guidance", FLOATS, ["3"]),
    ("tune", "--resolution", INTS + ["12"], ["16"]),
    ("eval", "--limit", INTS, ["2"]),
    ("eval", "--sample-seed", ["-1"] + BIG, ["0", str(2**64 - 1)]),
    ("eval", "--seed", ["-1"] + BIG + [str(2**64 - 1)], ["0", str(2**64 - 5)]),  # 5 prompts, 1 image each
    ("eval", "--images-per-prompt", INTS, ["1"]),
    ("eval", "--sampling-steps", INTS + ["1001"], ["4"]),
    ("eval", "--guidance", FLOATS, ["7.5"]),
    ("eval", "--resolution", INTS + ["12"], ["16"]),
    ("eval", "--batch", INTS, ["2"]),
    ("eval", "--tune-steps", INTS, ["3"]),
    ("eval", "--tune-patience", INTS, ["3"]),
    ("eval", "--tune-lr", FLOATS, ["0.01"]),
    ("eval", "--tune-per-prompt", INTS, ["1"]),
    ("eval", "--tune-prompts", INTS, ["1"]),
    ("eval", "--frames", INTS, ["4"]),
    ("eval", "--tie-tol", ["nan", "inf", "-1", "1e400"], ["0", "0.01", str(2**64)]),
    ("eval", "--grid-limit", INTS, ["10"]),
    ("eval", "--threads", INTS, ["1"]),
]
GRAD = [(cmd, pos) for cmd in ("train", "tune", "eval") for pos in (0, 1)]
BASE = {"train": train_base, "tune": tune_base, "eval": eval_base}


def _replace(argv: list[str], flag: str, values: list[str]) -> list[str]:
    """``argv`` with ``flag``'s value(s) replaced (or the flag added)."""
    if flag in argv:
        i = argv.index(flag)
        n = len(values)
        return argv[: i + 1] + values + argv[i + 1 + n :]
    return argv + [flag, *values]


def _refused(cmd: str, argv: list[str], flag: str, capsys) -> None:
    capsys.readouterr()
    try:
        rc = main(argv)
    except ModelLoadAttempt:
        pytest.fail(f"reneg {' '.join(argv)}: reached a model loader; {flag} was not refused up front")
    except SystemExit as e:  # argparse: a value of the wrong type
        rc = e.code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (argv, err)
    assert "Traceback" not in err and flag in lines[-1], f"{argv}: the message does not name {flag}: {err}"
    assert lines[-1].startswith(f"reneg {cmd}: error: ") and len(lines[-1]) < 400, lines[-1]


@pytest.mark.parametrize("cmd, flag, bad, good", NUMERIC, ids=[f"{c}{f}" for c, f, _, _ in NUMERIC])
def test_every_numeric_flag_is_refused_by_name_or_accepted(env, capsys, cmd, flag, bad, good):  # noqa: F811
    base = BASE[cmd](env)
    if cmd == "eval" and flag in (
        "--tune-steps",
        "--tune-patience",
        "--tune-lr",
        "--tune-per-prompt",
        "--tune-prompts",
    ):
        base = base + ["--negative", "tuned:null", "--grad-range", "0", "2"]
    for v in bad:
        _refused(cmd, _replace(base, flag, [v]), flag, capsys)
    for v in good:  # accepted: the run gets as far as loading the model, with the value in its config
        with pytest.raises(ModelLoadAttempt):
            main(_replace(base, flag, [v]))


@pytest.mark.parametrize("cmd, pos", GRAD)
def test_grad_range_is_refused_by_name(env, capsys, cmd, pos):  # noqa: F811
    base = BASE[cmd](env) + (["--negative", "tuned:null"] if cmd == "eval" else [])
    for v in ["-1", "4", str(2**64), "nan"]:
        values = ["0", v] if pos else [v, "2"]
        _refused(cmd, _replace(base, "--grad-range", values), "--grad-range", capsys)


def test_large_seeds_are_honoured():
    """Seeds up to 2**64 - 1 are used as given: training draws from them, held-out and image
    noise too (torch.Generator takes exactly that range)."""
    from reneg.trainer.train import sample_generator

    top = 2**64 - 1
    a = torch.randn(4, generator=sample_generator(top, 3, 1))
    assert torch.equal(a, torch.randn(4, generator=sample_generator(top, 3, 1)))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(top - 1, 3, 1)))
    assert not torch.equal(a, torch.randn(4, generator=sample_generator(0, 3, 1)))


# --------------------------------------------------------------------------- --demo


@pytest.fixture
def demo_env(env, tmp_path, monkeypatch):  # noqa: F811
    """--demo runs in a scratch folder; run_train is replaced to capture the config it gets."""
    monkeypatch.chdir(tmp_path)
    seen = {}
    import reneg.trainer.train as tr

    real = tr.run_train

    def capture(cfg, accelerator=None, **kw):
        seen["cfg"] = cfg
        from reneg.trainer.config import validate_train

        validate_train(cfg)
        raise ModelLoadAttempt("training would start")

    monkeypatch.setattr(tr, "run_train", capture)
    yield seen
    tr.run_train = real


def test_demo_refuses_bad_flags_by_name(demo_env, capsys):
    _refused("train", ["train", "--demo", "--lr", "-1", "--steps", "2"], "--lr", capsys)
    _refused("train", ["train", "--demo", "--steps", "0"], "--steps", capsys)
    _refused("tune", ["tune", "--demo", "--lr", "-1"], "--lr", capsys)
    _refused("tune", ["tune", "--demo", "--max-steps", "0"], "--max-steps", capsys)
    _refused("eval", ["eval", "--demo", "--limit", "0"], "--limit", capsys)
    _refused("eval", ["eval", "--demo", "--tie-tol", "nan"], "--tie-tol", capsys)
    for cmd, flag in [("train", "--model"), ("train", "--prompts"), ("tune", "--reward"), ("eval", "--model")]:
        _refused(cmd, [cmd, "--demo", flag, "x"], flag, capsys)


def test_demo_applies_the_flags_it_is_given(demo_env, capsys, tmp_path):
    with pytest.raises(ModelLoadAttempt):
        main(["train", "--demo", "--steps", "2", "--lr", "0.02", "--no-progress"])
    cfg = demo_env["cfg"]
    assert (cfg.steps, cfg.lr) == (2, 0.02)
    assert "using your --lr, --steps instead of the demo's" in capsys.readouterr().out


def test_demo_eval_checks_a_given_negative(demo_env, capsys, tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{broken}")
    _refused("eval", ["eval", "--demo", "--negative", str(bad), "--no-progress"], str(bad), capsys)


# --------------------------------------------------------------------------- files


def _sparse(path):
    torch.save(torch.zeros(1, 77, 64).to_sparse(), path)


def _float8(path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    torch.save(torch.zeros(1, 77, 64).to(torch.float8_e4m3fn), path)


def _float8_safetensors(path):
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    from safetensors.torch import save_file

    save_file({"neg_embedding": torch.zeros(1, 77, 64).to(torch.float8_e4m3fn)}, path)


def _header(raw: bytes):
    def write(path):
        with open(path, "wb") as f:
            f.write(len(raw).to_bytes(8, "little") + raw)

    return write


HOSTILE = {
    "sparse.pt": _sparse,
    "float8.pt": _float8,
    "float8.safetensors": _float8_safetensors,
    "digits.safetensors": _header(
        b'{"neg_embedding": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    ),
    "nested.safetensors": _header(b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_every_loader_failure_is_one_line_naming_the_file(tmp_path, capsys, name):
    from reneg.embedding import EmbeddingError, load_embedding

    path = str(tmp_path / name)
    HOSTILE[name](path)
    with pytest.raises(EmbeddingError) as ei:
        load_embedding(path)
    msg = str(ei.value)
    assert msg.startswith(path) and "\n" not in msg and len(msg) < 400, msg
    for argv in (["inspect", path], ["convert", path, str(tmp_path / "out.safetensors")]):
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and path in err and "Traceback" not in err, err


@pytest.mark.parametrize("name", ["sparse", "float8"])
def test_checkpoint_loader_names_the_file(tmp_path, name):
    from reneg.trainer.checkpoint import load_checkpoint, save_checkpoint

    neg = torch.nn.Parameter(torch.zeros(1, 77, 64))
    opt = torch.optim.AdamW([neg], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = str(tmp_path / "checkpoint.pt")
    save_checkpoint(path, step=1, neg=neg, optimizer=opt, scheduler=sched, skipped=0, config={}, heldout=[])
    state = torch.load(path, weights_only=True)
    if name == "float8" and not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("no float8 in this torch")
    state["neg"] = state["neg"].to_sparse() if name == "sparse" else state["neg"].to(torch.float8_e4m3fn)
    torch.save(state, path)
    with pytest.raises(ValueError) as ei:
        load_checkpoint(path)
    assert str(ei.value).startswith(path) and "\n" not in str(ei.value), str(ei.value)


def test_tie_tol_nan_is_refused_by_the_statistics_too():
    from reneg.evaluation.stats import win_rate

    with pytest.raises(ValueError, match="tie_tol"):
        win_rate([1.0, 2.0], [0.0, 1.0], tie_tol=float("nan"))
    assert win_rate([1.0, 2.0], [0.0, 1.0])["rate"] == 1.0


def _tiny_embedding(path, value=0.0, **meta):
    from reneg.embedding import NegEmbedding, save_embedding

    t = torch.full((1, 77, 64), value)
    save_embedding(path, NegEmbedding(t, "tiny"), **meta)


def test_inspect_json_is_json_for_large_finite_values(tmp_path, capsys):
    path = str(tmp_path / "big.safetensors")
    _tiny_embedding(path, 3.0e38)
    capsys.readouterr()
    assert main(["inspect", "--json", path]) == 0

    def no_constants(c):
        raise AssertionError(f"not JSON: {c}")

    info = json.loads(capsys.readouterr().out, parse_constant=no_constants)
    assert info["stats"]["max"] == pytest.approx(3.0e38) and info["stats"]["mean"] == pytest.approx(3.0e38)


def test_inspect_never_prints_control_characters(tmp_path, capsys):
    path = str(tmp_path / "meta.safetensors")
    _tiny_embedding(path, note="\x1b[2J\x1b[31mred\nfake: line\r\x07", **{"k\x1b]0;title\x07": "v"})
    capsys.readouterr()
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out and "\x07" not in out
    assert not any(ln.startswith("fake:") for ln in out.splitlines())
    assert "\\x1b[31mred\\nfake: line" in out


def test_inspect_lists_metadata_in_one_order_whatever_order_the_file_holds(tmp_path, capsys):
    """safetensors writes its metadata map in no fixed order; two files with the same metadata
    must inspect the same. The files here are written byte by byte, keys in opposite orders."""
    import struct

    import numpy as np

    data = np.zeros((1, 77, 64), dtype="<f4").tobytes()
    meta = {"family": "tiny", "format": "reneg", "kind": "global", "steps": "8", "lr": "0.05"}
    outs = []
    for name, keys in (("fwd", list(meta)), ("rev", list(reversed(meta)))):
        header = {
            "__metadata__": {k: meta[k] for k in keys},
            "neg_embedding": {"dtype": "F32", "shape": [1, 77, 64], "data_offsets": [0, len(data)]},
        }
        raw = json.dumps(header).encode()
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
        capsys.readouterr()
        assert main(["inspect", "--json", str(path)]) == 0
        info = json.loads(capsys.readouterr().out)
        assert list(info["metadata"]) == sorted(meta), info["metadata"]
        assert main(["inspect", str(path)]) == 0
        outs.append(capsys.readouterr().out.replace(str(path), "FILE"))
    assert outs[0] == outs[1]


def test_convert_family_bogus_blames_the_flag(tmp_path, capsys):
    path = str(tmp_path / "e.safetensors")
    _tiny_embedding(path)
    capsys.readouterr()
    assert main(["convert", path, str(tmp_path / "o.safetensors"), "--family", "bogus"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("reneg convert: error: --family bogus: expected one of") and "metadata" not in err


# --------------------------------------------------------------------------- resume


def _checkpoint_for(argv, step: int, **changes):
    """A checkpoint as ``argv``'s run would have written it at ``step`` (then ``changes`` applied to
    its saved config)."""
    from reneg.cli import build_parser
    from reneg.trainer.checkpoint import save_checkpoint
    from reneg.trainer.config import train_config_from_args, resume_fingerprint

    cfg = train_config_from_args(build_parser().parse_args(argv))
    neg = torch.nn.Parameter(torch.zeros(1, 77, 64))
    opt = torch.optim.AdamW([neg], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    config = dict(cfg.to_json(), **resume_fingerprint(cfg))
    config.update(changes)
    save_checkpoint(
        os.path.join(cfg.out, "checkpoint.pt"),
        step=step,
        neg=neg,
        optimizer=opt,
        scheduler=sched,
        skipped=0,
        config=config,
        heldout=[],
    )


def test_resume_with_a_smaller_steps_is_refused(env, capsys):  # noqa: F811
    base = train_base(env)  # --steps 10
    _checkpoint_for(base, 8)
    with pytest.raises(ModelLoadAttempt):  # 10 > 8: continues
        main(base + ["--resume"])
    _refused("train", _replace(base, "--steps", ["5"]) + ["--resume"], "--steps", capsys)
    with pytest.raises(ModelLoadAttempt):  # == the checkpoint's step: finishes (writes the outputs)
        main(_replace(base, "--steps", ["8"]) + ["--resume"])


def test_resume_compares_prompts_and_init_by_content(env, capsys, tmp_path):  # noqa: F811
    base = train_base(env)
    _checkpoint_for(base, 2)
    # the same prompts under another path are the same run
    moved = tmp_path / "moved.txt"
    moved.write_text(open(env["prompts"], encoding="utf-8").read())
    with pytest.raises(ModelLoadAttempt):
        main(_replace(base, "--prompts", [str(moved)]) + ["--resume"])
    other = tmp_path / "other.txt"
    other.write_text("a cat\na dog\na bird\na fish\na cow\n")
    _refused("train", _replace(base, "--prompts", [str(other)]) + ["--resume"], "--prompts", capsys)
    _refused("train", base + ["--init", "handcrafted", "--resume"], "--init", capsys)
    emb = str(tmp_path / "init.safetensors")
    _tiny_embedding(emb, 0.5)
    _refused("train", base + ["--init", emb, "--resume"], "--init", capsys)
    _refused("train", base + ["--handcrafted", "ugly", "--resume"], "--handcrafted", capsys)


# --------------------------------------------------------------------------- options layer


def test_shared_flags_have_one_default_everywhere():
    """train, tune, eval and the ComfyUI tune node take the paper's defaults from reneg.options."""
    from reneg.cli import build_parser
    from reneg.options import PAPER

    p = build_parser()
    train = vars(p.parse_args(["train"]))
    tune = vars(p.parse_args(["tune"]))
    ev = vars(p.parse_args(["eval"]))
    for ns in (train, tune, ev):
        assert (ns["sampling_steps"], ns["guidance"], ns["resolution"], tuple(ns["grad_range"])) == (
            PAPER.sampling_steps,
            PAPER.guidance,
            PAPER.resolution,
            PAPER.grad_range,
        )
    assert (train["lr"], train["steps"], train["batch_size"], train["lr_schedule"]) == (
        PAPER.lr,
        PAPER.steps,
        PAPER.batch_size,
        PAPER.lr_schedule,
    )
    assert (tune["lr"], tune["max_steps"], tune["patience"]) == (PAPER.lr, PAPER.max_steps, PAPER.patience)
    assert (ev["tune_lr"], ev["tune_steps"], ev["tune_patience"]) == (PAPER.lr, PAPER.max_steps, PAPER.patience)
    from reneg.evaluation.config import EvalConfig
    from reneg.trainer.config import TrainConfig

    assert TrainConfig().grad_range == EvalConfig().grad_range == PAPER.grad_range


def test_clamp_grad_range():
    from reneg.options import clamp_grad_range

    assert clamp_grad_range((0, 10), 30) == ((0, 10), None)
    (r, note) = clamp_grad_range((0, 10), 8)
    assert r == (0, 7) and "using 0-7" in note
    assert clamp_grad_range((5, 2), 30)[0] == (2, 5)


def test_options_module_is_import_light():
    import subprocess
    import sys

    code = (
        "import sys, reneg.options; bad = [m for m in ('torch', 'diffusers', 'transformers', 'open_clip') "
        "if m in sys.modules]; print(bad); sys.exit(1 if bad else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr


def test_docs_options_table_is_current():
    from reneg.options import markdown_table

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "options.md")
    with open(path, encoding="utf-8") as f:
        assert markdown_table() in f.read(), "docs/options.md: regenerate the table from reneg.options"


def test_prompt_features_do_not_depend_on_their_batch():
    """The cause of an inexact resume: a prompt's cached text features must be the same whether it
    was first encoded alone or beside other prompts (a resumed process fills its caches anew)."""
    from reneg import demo

    world = demo._world()
    if world is None:
        pytest.skip("the demo world's assets are not installed")
    from reneg.backends.loading import load_diffusers
    from reneg.rewards import load_rewards

    prompts = list(world.train_prompts(12, seed=0))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        reward = load_rewards([f"hpsv2={world.reward_checkpoint()},config={world.reward_config()}"])
        together = reward.text_features(prompts)
        reward._text_cache.clear()
        alone = torch.stack([reward.text_features([p])[0] for p in reversed(prompts)]).flip(0)
        assert torch.equal(together, alone)
        backend = load_diffusers(world.pipeline_dir())
        together = backend.encode_prompts(prompts).crossattn
        backend._cache.clear()
        alone = torch.cat([backend.encode_prompts([p]).crossattn for p in reversed(prompts)]).flip(0)
        assert torch.equal(together, alone)
    finally:
        torch.set_num_threads(n)

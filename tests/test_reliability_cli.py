"""Bad arguments: every flag of ``reneg train``, ``reneg tune`` and ``reneg eval``
is validated up front, with one clear line naming the flag, before any model loads.

Each case runs ``reneg.cli.main([...])`` with the model and reward loaders replaced by
a function that raises ``ModelLoadAttempt``: a case passes only when main returns 2,
prints exactly one ``reneg CMD: error:`` line naming the flag, and never reached a
loader. The good command lines the cases start from are shown to reach the loader, so
each failure is caused by the one bad flag.
"""

from __future__ import annotations

import os

import pytest

from reneg.cli import main

FIGURES: dict[str, set] = {"train": set(), "tune": set(), "eval": set()}


class ModelLoadAttempt(Exception):
    """Raised by the replaced loaders: reaching one means validation let the case through."""


@pytest.fixture
def env(tmp_path, monkeypatch):
    import reneg.backends.loading as db
    import reneg.rewards as rw

    def refuse(*a, **k):
        raise ModelLoadAttempt("a model loader was called")

    monkeypatch.setattr(db, "load_diffusers", refuse)
    monkeypatch.setattr(rw, "load_rewards", refuse)
    monkeypatch.setattr(rw, "load_reward", refuse)

    model = tmp_path / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    no_index = tmp_path / "not-a-pipeline"
    no_index.mkdir()
    reward = tmp_path / "hps.pt"
    reward.write_bytes(b"never loaded")
    folder_reward = tmp_path / "pickscore"
    folder_reward.mkdir()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\na green star\na yellow triangle\na purple circle\n")
    files = {
        "empty": b"",
        "blank": b"\n   \n\t\n",
        "latin1": "caf\xe9 au lait\n".encode("latin-1"),
        "utf16": "a red circle\n".encode("utf-16"),
        "two": b"a red circle\na blue square\n",
    }
    paths = {}
    for k, data in files.items():
        p = tmp_path / f"{k}.txt"
        p.write_bytes(data)
        paths[k] = str(p)
    bad_json = tmp_path / "bad.json"
    bad_json.write_text('[{"prompt": "a cat"},')
    not_emb = tmp_path / "not-an-embedding.safetensors"
    not_emb.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    bad_ckpt = tmp_path / "bad-checkpoint.pt"
    bad_ckpt.write_bytes(b"PK\x03\x04 truncated")
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"")
    e = dict(
        tmp=str(tmp_path),
        model=str(model),
        no_index=str(no_index),
        reward=f"hpsv2={reward}",
        reward_path=str(reward),
        folder_reward=str(folder_reward),
        prompts=str(prompts),
        bad_json=str(bad_json),
        not_emb=str(not_emb),
        bad_ckpt=str(bad_ckpt),
        a_file=str(a_file),
        existing=str(existing),
        **paths,
    )
    return e


def train_base(e, drop=()):
    args = {
        "--model": e["model"],
        "--reward": e["reward"],
        "--prompts": e["prompts"],
        "--out": os.path.join(e["tmp"], "run"),
        "--heldout-count": "2",
        "--steps": "10",
        "--sampling-steps": "4",
        "--grad-range": ["0", "2"],
        "--resolution": "16",
        "--batch-size": "2",
        "--device": "cpu",
    }
    out = ["train"]
    for k, v in args.items():
        if k not in drop:
            out += [k, *v] if isinstance(v, list) else [k, v]
    return out


def tune_base(e, drop=()):
    args = {
        "--model": e["model"],
        "--reward": e["reward"],
        "--prompt": "a red circle",
        "--out": os.path.join(e["tmp"], "tuned.safetensors"),
        "--sampling-steps": "4",
        "--grad-range": ["0", "2"],
        "--resolution": "16",
        "--device": "cpu",
    }
    out = ["tune"]
    for k, v in args.items():
        if k not in drop:
            out += [k, *v] if isinstance(v, list) else [k, v]
    return out


def eval_base(e, drop=()):
    args = {
        "--model": e["model"],
        "--reward": e["reward"],
        "--prompts": e["prompts"],
        "--out": os.path.join(e["tmp"], "eval"),
        "--sampling-steps": "4",
        "--resolution": "16",
    }
    out = ["eval"]
    for k, v in args.items():
        if k not in drop:
            out += [k, *v] if isinstance(v, list) else [k, v]
    return out


def has_eval() -> bool:
    try:
        import reneg.evaluation.cli  # noqa: F401
    except ImportError:
        return False
    return True


GUIDANCE_INF = ("--guidance", lambda e: ["--guidance", "inf"], ())
# (flag named in the message, extra args or a builder, dropped base flags)
COMMON = [
    ("--reward", lambda e: [], ("--reward",)),
    ("--reward", lambda e: ["--reward", "hpsv2="], ("--reward",)),  # names nothing
    ("--reward", lambda e: ["--reward", "=" + e["reward_path"]], ("--reward",)),  # no name
    ("--reward", lambda e: ["--reward", ""], ("--reward",)),
    ("--reward", lambda e: ["--reward", "hpsv2"], ("--reward",)),
    ("--reward", lambda e: ["--reward", "nosuch=" + e["reward_path"]], ("--reward",)),
    ("--reward", lambda e: ["--reward", "hpsv2=/does/not/exist.pt"], ("--reward",)),
    ("--reward", lambda e: ["--reward", e["reward"] + ",weight=abc"], ("--reward",)),
    ("--reward", lambda e: ["--reward", e["reward"] + ",weight=nan"], ("--reward",)),
    ("--reward", lambda e: ["--reward", e["reward"] + ",oops"], ("--reward",)),
    ("--reward", lambda e: ["--reward", e["reward"] + ",config=/no/config.json"], ("--reward",)),
    ("--reward", lambda e: ["--reward", "aesthetic=" + e["reward_path"]], ("--reward",)),  # needs clip=
    ("--reward", lambda e: ["--reward", "pickscore=" + e["reward_path"]], ("--reward",)),  # a file, not a folder
    ("--reward", lambda e: ["--reward", "hpsv2=" + e["folder_reward"]], ("--reward",)),  # a folder, not a file
    ("--reward", lambda e: ["--reward", e["reward"], "--reward", "hpsv2="], ("--reward",)),  # the 2nd is bad
    ("--model", lambda e: [], ("--model",)),
    ("--model", lambda e: ["--model", "/no/such/model"], ("--model",)),
    ("--model", lambda e: ["--model", e["no_index"]], ("--model",)),
    ("--config", lambda e: ["--config", "/no/such/configs"], ()),
    ("--sampling-steps", lambda e: ["--sampling-steps", "0"], ("--sampling-steps", "--grad-range")),
    ("--sampling-steps", lambda e: ["--sampling-steps", "-5"], ("--sampling-steps", "--grad-range")),
    ("--resolution", lambda e: ["--resolution", "20"], ("--resolution",)),
    ("--resolution", lambda e: ["--resolution", "0"], ("--resolution",)),
    ("--grad-range", lambda e: ["--grad-range", "3", "1"], ("--grad-range",)),
    ("--grad-range", lambda e: ["--grad-range", "0", "4"], ("--grad-range",)),  # = --sampling-steps
    ("--grad-range", lambda e: ["--grad-range", "-1", "2"], ("--grad-range",)),
    ("--lr", lambda e: ["--lr", "0"], ()),
    ("--lr", lambda e: ["--lr=-1e-3"], ()),
    ("--lr", lambda e: ["--lr", "nan"], ()),
    ("--lr", lambda e: ["--lr", "inf"], ()),
    ("--guidance", lambda e: ["--guidance", "0"], ()),
    ("--guidance", lambda e: ["--guidance", "nan"], ()),
    GUIDANCE_INF,
    ("--device", lambda e: ["--device", "banana"], ("--device",)),
    ("--device", lambda e: ["--device", "cuda:99"], ("--device",)),
]

TRAIN = COMMON + [
    ("--steps", lambda e: ["--steps", "0"], ("--steps",)),
    ("--steps", lambda e: ["--steps", "-3"], ("--steps",)),
    ("--batch-size", lambda e: ["--batch-size", "0"], ("--batch-size",)),
    ("--micro-batch", lambda e: ["--micro-batch", "0"], ()),
    ("--batch-size", lambda e: ["--batch-size", "3", "--micro-batch", "2"], ("--batch-size",)),
    ("--checkpoint-every", lambda e: ["--checkpoint-every", "0"], ()),
    ("--max-bad-steps", lambda e: ["--max-bad-steps", "0"], ()),
    ("--eval-batch", lambda e: ["--eval-batch", "0"], ()),
    ("--heldout-count", lambda e: ["--heldout-count", "0"], ("--heldout-count",)),
    ("--warmup", lambda e: ["--warmup", "-1"], ()),
    ("--warmup", lambda e: ["--warmup", "10"], ()),  # = --steps
    ("--eval-every", lambda e: ["--eval-every", "-1"], ()),
    ("--weight-decay", lambda e: ["--weight-decay", "-0.1"], ()),
    ("--weight-decay", lambda e: ["--weight-decay", "nan"], ()),
    ("--prompts", lambda e: [], ("--prompts",)),
    ("--prompts", lambda e: ["--prompts", "/no/such/prompts.txt"], ("--prompts",)),
    ("empty.txt", lambda e: ["--prompts", e["empty"]], ("--prompts",)),
    ("blank.txt", lambda e: ["--prompts", e["blank"]], ("--prompts",)),
    ("latin1.txt", lambda e: ["--prompts", e["latin1"]], ("--prompts",)),  # not UTF-8
    ("utf16.txt", lambda e: ["--prompts", e["utf16"]], ("--prompts",)),  # not UTF-8
    ("bad.json", lambda e: ["--prompts", e["bad_json"]], ("--prompts",)),
    ("--heldout-count", lambda e: ["--prompts", e["two"]], ("--prompts",)),  # none left to train on
    ("--heldout", lambda e: ["--heldout", e["empty"]], ()),
    ("--init", lambda e: ["--init", "/no/such/init.safetensors"], ()),
    ("--init", lambda e: ["--init", e["not_emb"]], ()),  # unreadable embedding
    ("--init", lambda e: ["--init", e["prompts"]], ()),  # a text file
    ("--tokens", lambda e: ["--tokens", "0"], ()),  # 1 to 75, not "off"
    ("--tokens", lambda e: ["--tokens", "76"], ()),
    ("--init", lambda e: ["--tokens", "3", "--init", e["not_emb"]], ()),  # --tokens: not a token file
    ("--resume", lambda e: ["--resume", "/no/such/checkpoint.pt"], ()),
    ("--resume", lambda e: ["--resume"], ()),  # none in --out yet
    ("--resume", lambda e: ["--resume", e["bad_ckpt"]], ()),
    ("--resume", lambda e: ["--resume", e["prompts"]], ()),
    ("--out", lambda e: ["--out", os.path.join(e["a_file"], "sub")], ("--out",)),  # under a file
]

TUNE = COMMON + [
    ("--max-steps", lambda e: ["--max-steps", "0"], ()),
    ("--patience", lambda e: ["--patience", "0"], ()),
    ("--patience", lambda e: ["--patience", "5", "--max-steps", "3"], ()),
    ("--prompt", lambda e: [], ("--prompt",)),
    ("--prompt", lambda e: ["--prompt", "   "], ("--prompt",)),
    ("--embedding", lambda e: ["--embedding", "/no/such.safetensors"], ()),
    ("--embedding", lambda e: ["--embedding", e["not_emb"]], ()),
    ("--embedding", lambda e: ["--embedding", e["prompts"]], ()),
    ("--out", lambda e: ["--out", os.path.join(e["tmp"], "tuned.pt")], ("--out",)),
    ("--out", lambda e: ["--out", e["existing"]], ("--out",)),
    ("--out", lambda e: ["--out", "/no/such/folder/tuned.safetensors"], ("--out",)),
]

EVAL = [
    c
    for c in COMMON
    if c[0] not in ("--lr", "--device")
    and c[2] != ("--sampling-steps", "--grad-range")
    and not (c[0] == "--grad-range")
] + [
    ("--prompts", lambda e: [], ("--prompts",)),
    ("empty.txt", lambda e: ["--prompts", e["empty"]], ("--prompts",)),
    ("latin1.txt", lambda e: ["--prompts", e["latin1"]], ("--prompts",)),
    ("bad.json", lambda e: ["--prompts", e["bad_json"]], ("--prompts",)),
    ("--sampling-steps", lambda e: ["--sampling-steps", "0"], ("--sampling-steps",)),
    ("--batch", lambda e: ["--batch", "0"], ()),
    ("--images-per-prompt", lambda e: ["--images-per-prompt", "0"], ()),
    ("--limit", lambda e: ["--limit", "0"], ()),
    ("--tune-lr", lambda e: ["--tune-lr", "0"], ()),
    ("--tie-tol", lambda e: ["--tie-tol", "-1"], ()),
    ("--negative", lambda e: ["--negative", ""], ()),
    ("--negative", lambda e: ["--negative", "/no/such.safetensors"], ()),
    ("--negative", lambda e: ["--negative", "text:"], ()),
    ("--negative", lambda e: ["--negative", e["prompts"]], ()),
    (
        "--tune-patience",
        lambda e: ["--negative", "tuned:null", "--tune-patience", "5", "--tune-steps", "3", "--grad-range", "0", "2"],
        (),
    ),
    ("--grad-range", lambda e: ["--negative", "tuned:null", "--grad-range", "3", "1"], ()),
    ("--reference", lambda e: ["--reference", "nobody"], ()),
    ("--video", lambda e: ["--video", "/no/such/adapter"], ()),
]


EVAL += [
    ("--tune-lr", lambda e: ["--tune-lr", "inf"], ()),
    ("--negative", lambda e: ["--negative", e["not_emb"]], ()),  # unreadable embedding file
    ("--device", lambda e: ["--device", "banana"], ()),
]


def check_case(cmd, base, flag, extra, drop, e, capsys):
    argv = base(e, drop) + extra(e)
    capsys.readouterr()
    try:
        rc = main(argv)
    except ModelLoadAttempt:
        pytest.fail(f"reneg {' '.join(argv[1:])}: reached a model loader; {flag} was not validated up front")
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, (argv, err)
    assert "Traceback" not in err, err
    assert len(lines) == 1 and lines[0].startswith(f"reneg {cmd}: error: "), (argv, err)
    assert flag in lines[0], f"the message does not name {flag}: {lines[0]}"
    FIGURES[cmd].add(flag)


def test_good_command_lines_reach_the_loader(env):
    """The control: without a bad flag, each command gets as far as loading a model."""
    for base in (train_base, tune_base) + ((eval_base,) if has_eval() else ()):
        with pytest.raises(ModelLoadAttempt):
            main(base(env))


@pytest.mark.parametrize("case", range(len(TRAIN)))
def test_train_flags(env, capsys, case):
    flag, extra, drop = TRAIN[case]
    check_case("train", train_base, flag, extra, drop, env, capsys)


@pytest.mark.parametrize("case", range(len(TUNE)))
def test_tune_flags(env, capsys, case):
    flag, extra, drop = TUNE[case]
    check_case("tune", tune_base, flag, extra, drop, env, capsys)


@pytest.mark.parametrize("case", range(len(EVAL)))
def test_eval_flags(env, capsys, case):
    if not has_eval():
        pytest.skip("reneg.evaluation is not present")
    flag, extra, drop = EVAL[case]
    check_case("eval", eval_base, flag, extra, drop, env, capsys)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["train", "--steps", "abc"], "--steps"),
        (["train", "--lr", "fast"], "--lr"),
        (["train", "--mixed-precision", "fp8"], "--mixed-precision"),
        (["train", "--lr-schedule", "linear"], "--lr-schedule"),
        (["train", "--grad-range", "1"], "--grad-range"),
        (["tune", "--noise", "loud"], "--noise"),
        (["tune", "--max-steps", "1.5"], "--max-steps"),
    ],
)
def test_type_errors_are_argparse_errors(env, capsys, argv, flag):
    """Values of the wrong type stop in argparse (exit status 2), naming the flag."""
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"reneg {argv[0]}: error: argument {flag}"), err
    FIGURES[argv[0]].add(flag)


def test_resume_with_other_sampling_settings_is_refused(env, capsys):
    """A resumed run repeats the interrupted one only with the same settings: a changed one
    is named before any model loads (a longer --steps is fine)."""
    import torch

    from reneg.cli import build_parser
    from reneg.trainer.checkpoint import save_checkpoint
    from reneg.trainer.config import train_config_from_args

    base = train_base(env)
    cfg = train_config_from_args(build_parser().parse_args(base))
    neg = torch.nn.Parameter(torch.zeros(1, 77, 64))
    opt = torch.optim.AdamW([neg], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    save_checkpoint(
        os.path.join(cfg.out, "checkpoint.pt"),
        step=1,
        neg=neg,
        optimizer=opt,
        scheduler=sched,
        skipped=0,
        config=cfg.to_json(),
        heldout=[],
    )
    with pytest.raises(ModelLoadAttempt):
        main(base + ["--resume"])
    with pytest.raises(ModelLoadAttempt):
        main(base + ["--resume", "--steps", "20"])
    for flag, extra in [
        ("--seed", ["--seed", "5"]),
        ("--batch-size", ["--batch-size", "4"]),
        ("--lr", ["--lr", "1e-3"]),
        ("--grad-range", ["--grad-range", "1", "2"]),
        ("--guidance", ["--guidance", "5"]),
        ("--micro-batch", ["--micro-batch", "2"]),
    ]:
        capsys.readouterr()
        assert main(base + ["--resume", *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and flag in err and "was made with" in err, err
        FIGURES["train"].add(flag)


def test_zz_report_cli_figures():
    """Prints the figures for the closing note (run with -s)."""
    n = {k: len([f for f in v if f.startswith("--")]) for k, v in FIGURES.items()}
    print(
        f"\nflags checked: train {n['train']}, tune {n['tune']}, eval {n['eval']}; cases: "
        f"train {len(TRAIN)}, tune {len(TUNE)}, eval {len(EVAL) if has_eval() else 0}"
    )
    assert len(TRAIN) > 40 and len(TUNE) > 40

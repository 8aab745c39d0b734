"""Hostile and careless inputs: files whose values overflow the compute dtype, link loops in model
folders, pathological prompt files, unreadable files, odd flags. Each case names the file or flag
and says what it found, or does the right thing quietly; nothing hangs and nothing is a traceback."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_reliability_cli import ModelLoadAttempt, env, eval_base, train_base, tune_base  # noqa: F401

from reneg import options as O
from reneg.cli import main
from reneg.embedding import EmbeddingError, NegEmbedding, list_embedding_files, load_embedding, save_embedding
from reneg.families import FAMILIES
from reneg.prompts import PromptFileError, load_prompts

ROOT = Path(__file__).resolve().parents[1]


def big_file(path, value, dtype, hidden=768, pooled=None):
    tensors = {"neg_embedding": torch.full((1, 77, hidden), value, dtype=dtype)}
    if pooled is not None:
        tensors["pooled"] = pooled
    save_file(tensors, str(path))
    return str(path)


# --------------------------------------------------------------------------- values that overflow


def test_float64_values_beyond_float32_are_refused_at_load(tmp_path):
    path = big_file(tmp_path / "huge.safetensors", 1e300, torch.float64)
    with pytest.raises(EmbeddingError, match=r"huge\.safetensors: its values reach 1e\+300, beyond float32"):
        load_embedding(path)
    # the pooled vector too (an SDXL file)
    path = big_file(
        tmp_path / "xl.safetensors", 0.5, torch.float32, 2048, pooled=torch.full((1, 1280), -1e300, dtype=torch.float64)
    )
    with pytest.raises(EmbeddingError, match=r"xl\.safetensors: its pooled vector reach"):
        load_embedding(path)
    # large but representable float64 values still load
    assert load_embedding(big_file(tmp_path / "ok.safetensors", 1e30, torch.float64)).tensor.dtype == torch.float64


def test_check_dtype_refuses_values_that_overflow_the_compute_dtype(tmp_path):
    emb = load_embedding(big_file(tmp_path / "f16.safetensors", 7e4, torch.float32))  # finite in float32
    assert emb.check_dtype(torch.float32) is emb and emb.check_dtype(torch.bfloat16) is emb
    with pytest.raises(EmbeddingError) as e:
        emb.check_dtype(torch.float16, "--mixed-precision fp16 on cuda")
    msg = str(e.value)
    assert "f16.safetensors" in msg and "float16" in msg and "65504" in msg and "--mixed-precision fp16" in msg, msg
    # 65504 is float16's largest value: still fine
    load_embedding(big_file(tmp_path / "edge.safetensors", 65504.0, torch.float32)).check_dtype(torch.float16)


def test_compute_dtype_follows_mixed_precision_and_device():
    ns = types.SimpleNamespace
    assert O.compute_dtype(ns(mixed_precision="fp16", device="cuda"))[0] == torch.float16
    assert O.compute_dtype(ns(mixed_precision="bf16", device="cuda:1"))[0] == torch.bfloat16
    assert O.compute_dtype(ns(mixed_precision="fp16", device="cpu"))[0] == torch.float32  # fp16 runs in fp32 there
    assert O.compute_dtype(ns(mixed_precision="no", device="cuda"))[0] == torch.float32


def test_inspect_reports_the_overflow(tmp_path, capsys):
    path = big_file(tmp_path / "f16.safetensors", 7e4, torch.float32)
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "overflow float16" in out and "max |x| 7e+04" in out, out
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["overflows"] == ["float16"] and info["max_abs"] == 7e4
    assert main(["inspect", big_file(tmp_path / "huge.safetensors", 1e300, torch.float64)]) == 2
    assert "huge.safetensors: its values reach 1e+300" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["train", "tune", "eval"])
def test_train_tune_eval_refuse_an_overflowing_file_before_any_model(env, capsys, monkeypatch, cmd):  # noqa: F811
    """--init / --embedding / --negative with values that are inf in the dtype the model would compute
    in: refused by flag and file before a model loads (the fp16 GPU case, made here with compute_dtype)."""
    path = big_file(Path(env["tmp"]) / "f16.safetensors", 7e4, torch.float32)
    base = {"train": train_base, "tune": tune_base, "eval": eval_base}[cmd]
    extra = {"train": ["--init", path], "tune": ["--embedding", path], "eval": ["--negative", path]}[cmd]
    with pytest.raises(ModelLoadAttempt):  # in float32 the file is fine
        main(base(env) + extra)
    monkeypatch.setattr(O, "compute_dtype", lambda opts: (torch.float16, "--mixed-precision fp16 on cuda"))
    assert main(base(env) + extra) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    flag = {"train": "--init", "tune": "--embedding", "eval": "--negative"}[cmd]
    assert err.startswith(f"reneg {cmd}: error: {flag}") and "f16.safetensors" in err and "float16" in err, err


def test_a1111_skips_a_file_that_overflows_the_hosts_dtype(tmp_path, capsys):
    from reneg.hosts import a1111 as core

    folder = tmp_path / "reneg"
    folder.mkdir()
    big_file(folder / "loud.safetensors", 7e4, torch.float32)
    host = core.Host(lambda: [str(folder)])

    class P:
        def __init__(self, dtype=None):
            self.extra_generation_params, self.comments = {}, []
            self.sd_model = types.SimpleNamespace(
                is_sd1=True, is_sd2=False, is_sdxl=False, cond_stage_model_empty_prompt=torch.zeros(1, 77, 768)
            )
            if dtype is not None:
                self.sd_model.dtype = dtype

        def comment(self, text):
            self.comments.append(text)

    p = P(torch.float16)  # the model says it runs in fp16: not applied, with the file named
    assert host.process(p, True, "loud", 1.0, True) is None
    assert "ReNeg" not in p.extra_generation_params
    assert len(p.comments) == 1 and "loud.safetensors" in p.comments[0] and "float16" in p.comments[0]
    p = P()  # no dtype on the model: the hook sees fp16 conditioning and leaves it as it is
    assert host.process(p, True, "loud", 1.0, True) is not None
    uncond = torch.randn(1, 77, 768, dtype=torch.float16)
    params = types.SimpleNamespace(text_cond=uncond, text_uncond=uncond, denoiser=types.SimpleNamespace(p=p))
    for _ in range(2):
        host.on_cfg_denoiser(params)  # never raises into the host
        assert params.text_uncond is uncond
    assert len(p.comments) == 1 and "loud.safetensors" in p.comments[0] and "inf" in p.comments[0]
    p32 = P()
    host.process(p32, True, "loud", 1.0, True)
    params32 = types.SimpleNamespace(
        text_cond=torch.zeros(1, 77, 768), text_uncond=torch.zeros(1, 77, 768), denoiser=types.SimpleNamespace(p=p32)
    )
    host.on_cfg_denoiser(params32)  # float32 holds 7e4: applied
    assert float(params32.text_uncond.max()) == 7e4


def test_comfy_load_node_refuses_or_warns_on_overflow(tmp_path, tiny_pipeline_dir, capsys):
    import comfy_stubs

    h = comfy_stubs.Host(str(tmp_path / "models"))
    try:
        pack = h.load_pack(str(ROOT))
        _, _, clip = comfy_stubs.tiny_comfy_models(tiny_pipeline_dir)
        folder = Path(h.models_dir) / "reneg"
        folder.mkdir(parents=True, exist_ok=True)
        big_file(folder / "loud.safetensors", 7e4, torch.float32, hidden=64)
        load = pack.NODE_CLASS_MAPPINGS["ReNegLoadEmbedding"]()
        with torch.inference_mode():
            (cond,) = load.load("loud.safetensors", clip, 1.0)  # float32 conditioning: finite, with a warning
        assert bool(torch.isfinite(cond[0][0]).all())
        out = capsys.readouterr().out
        assert "loud.safetensors" in out and "float16" in out, out
        half = types.SimpleNamespace(
            tokenize=clip.tokenize,
            encode_from_tokens_scheduled=lambda t: [
                [c.half(), {"pooled_output": d["pooled_output"]}] for c, d in clip.encode_from_tokens_scheduled(t)
            ],
        )
        with pytest.raises(RuntimeError, match=r"Load ReNeg Embedding: .*loud\.safetensors.*float16"):
            with torch.inference_mode():
                load.load("loud.safetensors", half, 1.0)
    finally:
        h.close()


# --------------------------------------------------------------------------- folder walks


def loop_folder(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    save_embedding(str(d / "a.safetensors"), NegEmbedding(torch.zeros(1, 77, 64), "tiny"))
    save_embedding(str(d / "sub" / "b.safetensors"), NegEmbedding(torch.ones(1, 77, 64), "tiny"))
    os.symlink(".", d / "loop1")
    os.symlink(".", d / "loop2")
    os.symlink("..", d / "sub" / "up")
    os.symlink("a.safetensors", d / "same.safetensors")  # a second name for one file
    return d


def test_embedding_listing_survives_link_loops_and_lists_each_file_once(tmp_path):
    d = loop_folder(tmp_path)
    found = list_embedding_files(str(d), str(d / "sub"))
    assert found == [str(d / "a.safetensors"), str(d / "sub" / "b.safetensors")], found
    # one link: once, not 41 times
    e = tmp_path / "e"
    e.mkdir()
    save_embedding(str(e / "x.safetensors"), NegEmbedding(torch.zeros(1, 77, 64), "tiny"))
    os.symlink(".", e / "again")
    assert list_embedding_files(str(e)) == [str(e / "x.safetensors")]


def test_a1111_refresh_survives_link_loops(tmp_path):
    from reneg.hosts import a1111 as core

    d = loop_folder(tmp_path)
    assert sorted(core.Host(lambda: [str(d)]).store.refresh()) == ["a.safetensors", "sub/b.safetensors"]


def test_reward_folder_walk_survives_link_loops(tmp_path):
    import comfy_stubs

    h = comfy_stubs.Host(str(tmp_path / "models"))
    try:
        pack = h.load_pack(str(ROOT))
        root = Path(h.models_dir) / "reward_models"
        (root / "pick").mkdir(parents=True)
        (root / "pick" / "config.json").write_text("{}")
        os.symlink(".", root / "loop1")
        os.symlink(".", root / "loop2")
        reward = sys.modules[pack.__name__ + ".nodes.reward"]
        assert reward.model_folders() == ["pick/"]
    finally:
        h.close()


# --------------------------------------------------------------------------- prompt files


def test_json_prompt_files_nested_deep_or_with_huge_numbers(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(PromptFileError, match=r"deep\.json: not a prompt file: its JSON is nested too deeply"):
        load_prompts(str(deep))
    digits = tmp_path / "digits.json"
    digits.write_text("[" + "1" * 5000 + "]")
    with pytest.raises(PromptFileError, match=r"digits\.json: .*number of thousands of digits"):
        load_prompts(str(digits))


def test_json_prompt_errors_name_the_flag(env, capsys):  # noqa: F811
    deep = Path(env["tmp"]) / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    argv = train_base(env)
    argv[argv.index("--prompts") + 1] = str(deep)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("reneg train: error: --prompts: ") and "deep.json" in err, err


def test_txt_prompts_split_on_line_ends_only(tmp_path):
    p = tmp_path / "p.txt"
    p.write_bytes("a red\fcircle\nb\u2028c\x85d\r\ne\vf\rg\n".encode())
    assert [x.text for x in load_prompts(str(p))] == ["a red\fcircle", "b\u2028c\x85d", "e\vf", "g"]


def test_tsv_unbalanced_quote_swallows_nothing(tmp_path):
    p = tmp_path / "p.tsv"
    p.write_text('Prompt\tCategory\n"a red circle\tshapes\na blue square\tshapes\n"quoted" star\tstars\n')
    got = [(x.text, x.category) for x in load_prompts(str(p))]
    assert got == [('"a red circle', "shapes"), ("a blue square", "shapes"), ('"quoted" star', "stars")]
    c = tmp_path / "p.csv"
    c.write_text('Prompt,Category\nfine,x\n"a red circle,x\nb,y\nc,z\n')
    with pytest.raises(PromptFileError, match=r"p\.csv: line 3: malformed CSV"):
        load_prompts(str(c))


def test_parti_prompts_keep_their_quotes(shared_data):
    prompts = [p.text for p in load_prompts(str(shared_data / "prompts" / "PartiPrompts.tsv"))]
    assert len(prompts) == 1632
    assert any(t.startswith('"G I G G L E" painted') for t in prompts)


def test_prompt_paths_that_are_not_files_say_what_they_are(tmp_path):
    fifo = tmp_path / "fifo.txt"
    os.mkfifo(fifo)
    os.symlink("l2.txt", tmp_path / "l1.txt")
    os.symlink("l1.txt", tmp_path / "l2.txt")
    os.symlink("gone.txt", tmp_path / "dangling.txt")
    for name, want in (
        ("fifo.txt", "a FIFO (named pipe), not a regular file"),
        ("l1.txt", "a symlink loop"),
        ("dangling.txt", "a broken symlink"),
        ("missing.txt", "no such prompt file"),
    ):
        with pytest.raises(PromptFileError) as e:
            load_prompts(str(tmp_path / name))
        assert str(e.value).startswith(f"{tmp_path / name}: {want}"), str(e.value)
    with pytest.raises(EmbeddingError, match="a FIFO"):
        load_embedding(str(fifo))
    with pytest.raises(EmbeddingError, match="a directory, not a file"):
        load_embedding(str(tmp_path))


# --------------------------------------------------------------------------- what a file is


def test_complex_and_plain_pickles_are_named_for_what_they_are(tmp_path):
    c = tmp_path / "c64.safetensors"
    save_file({"neg_embedding": torch.zeros(1, 77, 768, dtype=torch.complex64)}, str(c))
    with pytest.raises(EmbeddingError, match=r"c64\.safetensors: tensor 'neg_embedding' holds complex numbers"):
        load_embedding(str(c))
    for protocol in (0, 1, 2, 4):
        p = tmp_path / f"p{protocol}.bin"
        p.write_bytes(pickle.dumps([1.0, 2.0], protocol=protocol))
        with pytest.raises(EmbeddingError) as e:
            load_embedding(str(p))
        assert "a plain Python pickle" in str(e.value) and "corrupt safetensors" not in str(e.value), str(e.value)
    # torch.save's files still load, old format included
    t = torch.randn(1, 77, 768)
    torch.save(t, tmp_path / "new.pt")
    torch.save(t, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    assert torch.equal(load_embedding(str(tmp_path / "new.pt")).tensor, t)
    assert torch.equal(load_embedding(str(tmp_path / "old.pt")).tensor, t)


def test_safetensors_whose_header_length_looks_like_a_pickle_still_load(tmp_path):
    """A header length's first byte may be 0x80 or '(' (a pickle's opening): still safetensors, any suffix."""
    from safetensors.torch import save

    t = torch.randn(1, 77, 64)
    seen = set()
    for pad in range(300):
        data = save({"neg_embedding": t}, metadata={"pad": "x" * pad})
        if data[0] not in (0x80, ord("("), ord("]"), ord("}"), ord("c")) or data[0] in seen:
            continue
        seen.add(data[0])
        for suffix in (".safetensors", ".bin"):
            path = tmp_path / f"h{data[0]}{suffix}"
            path.write_bytes(data)
            assert torch.equal(load_embedding(str(path)).tensor, t), path
    assert 0x80 in seen and ord("(") in seen


def test_inspect_names_an_unreadable_file(tmp_path, capsys):
    if not os.path.exists("/proc/self/mem"):
        pytest.skip("no /proc")
    link = tmp_path / "eio.safetensors"
    os.symlink("/proc/self/mem", link)
    assert main(["inspect", str(link)]) == 2
    err = capsys.readouterr().err
    assert f"{link}: cannot read the file" in err, err


def test_inspect_describes_a_training_checkpoint(tmp_path, capsys):
    from reneg.trainer.checkpoint import save_checkpoint

    neg = torch.nn.Parameter(torch.zeros(1, 77, 64))
    opt = torch.optim.AdamW([neg], lr=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    path = str(tmp_path / "checkpoint.pt")
    heldout = [{"step": 10, "null": 0.5, "handcrafted": 0.55, "learned": 0.6}]
    save_checkpoint(
        path, step=10, neg=neg, optimizer=opt, scheduler=sched, skipped=1, config={"steps": 40}, heldout=heldout
    )
    assert main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "ReNeg training checkpoint" in out and "step    10 of 40" in out and "tiny" in out, out
    assert "[1, 77, 64]" in out and "learned 0.60000" in out, out
    assert main(["inspect", path, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["step"] == 10 and info["shape"] == [1, 77, 64] and info["family"].startswith("tiny")


def test_inspect_into_a_closed_pipe_is_quiet(tmp_path):
    path = big_file(tmp_path / "e.safetensors", 0.5, torch.float32)
    r, w = os.pipe()
    os.close(r)  # the reader is gone before anything is written (as after `| head` has read its lines)
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "reneg.cli", "inspect", path],
            stdout=w,
            stderr=subprocess.PIPE,
            cwd=str(ROOT),
            timeout=120,
        )
    finally:
        os.close(w)
    assert proc.returncode == 141 and proc.stderr == b"", proc.stderr.decode()


# --------------------------------------------------------------------------- flags


@pytest.mark.parametrize("port", ["99999", "0", "-1", "http"])
def test_studio_port_is_checked(capsys, port):
    with pytest.raises(SystemExit) as e:
        main(["studio", "--port", port])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("reneg studio: error: argument --port: expected a port number from 1 to 65535"), err


def test_tune_accepts_the_largest_seed_its_help_names(env):  # noqa: F811
    assert "2**64 - 1" in " ".join(O.ReNegOptions.__dataclass_fields__["seed"].metadata["help"].split())
    for noise in ("seed", "fresh"):
        with pytest.raises(ModelLoadAttempt):
            main(tune_base(env) + ["--seed", str(2**64 - 1), "--noise", noise])


def test_fresh_noise_tuning_runs_at_the_largest_seed(tiny_backend, tiny_reward):
    """--noise fresh at seed 2**64 - 1: its later seeds wrap round modulo 2**64, as torch takes them."""
    from reneg.tuning import tune_for_seed

    null, _ = tiny_backend.null_embedding()
    res, _ = tune_for_seed(
        tiny_backend, tiny_reward, "a red circle", 2**64 - 1, null, 2, 7.5, (0, 1), 16, 16, max_steps=2, noise="fresh"
    )
    assert res is not None


def test_reward_weight_must_be_positive():
    from reneg.rewards import RewardSpecError, parse_spec

    for w in ("0", "0.0", "-1"):
        with pytest.raises(RewardSpecError, match=f"weight '{re.escape(w)}' must be a finite number > 0"):
            parse_spec(f"hpsv2=/x.pt,weight={w}")
    assert parse_spec("hpsv2=/x.pt,weight=0.25", check_files=False).weight == 0.25


def test_negative_names_must_be_safe():
    from reneg.evaluation.config import EvalError
    from reneg.evaluation.negatives import parse_negative

    with pytest.raises(EvalError, match=r"'<i>x</i>' is not a valid name: a name is 1 to 64 letters, digits"):
        parse_negative("<i>x</i>=null")
    assert parse_negative("ok.name-1=null").name == "ok.name-1"
    assert parse_negative("text:a=null").source == "a=null"  # a text with '=' in it is no name


def test_demo_out_that_can_not_be_written_names_out(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    for cmd, out in (("train", "run"), ("eval", "ev"), ("tune", "t.safetensors")):
        assert main([cmd, "--demo", "--out", str(blocker / out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"reneg {cmd}: error: --out "), err


def test_documented_families_are_the_family_table():
    text = (ROOT / "docs" / "embeddings.md").read_text(encoding="utf-8")
    section = text.split("## Families", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z0-9-]+)` \| [^|]+ \| (\d+) \| (\d+) \|", section, flags=re.M)
    assert [(n, int(h), int(t)) for n, h, t in rows] == [(f.name, f.hidden, f.tokens) for f in FAMILIES.values()]
    help_text = subprocess_free_help(["convert", "--help"])
    # argparse may break a line after a name's hyphen (flux-\n schnell)
    assert ", ".join(FAMILIES) in re.sub(r"-\s+", "-", " ".join(help_text.split()))


def subprocess_free_help(argv) -> str:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main(argv)
    return buf.getvalue()


def test_long_prompts_are_noted_once_per_run(tiny_backend):
    long = " ".join(["red circle"] * 60)
    note = tiny_backend.truncation_note(["a red circle", long, long + " blue", "a star"])
    assert note is not None and "2 of 4 prompts" in note and "77 tokens" in note, note
    assert tiny_backend.truncation_note(["a red circle", "a star"]) is None


def fake_finished_demo_train(out) -> str:
    """``out/train`` as a finished demo training run on the demo's model leaves it (so that
    ``demo_config`` evaluates its embedding instead of training one); returns the embedding's path."""
    from reneg import demo

    d = demo.setup(str(out))
    train = out / "train"
    train.mkdir(parents=True)
    (train / "embedding.safetensors").write_bytes(b"a finished run's file")
    (train / "summary.json").write_text(json.dumps({"config": {"model": d["model"]}}))
    return str(train / "embedding.safetensors")


def demo_eval_config(argv):
    """The EvalConfig ``reneg eval`` makes of ``argv`` (which holds ``--demo``), without running it."""
    from reneg.cli import build_parser
    from reneg.evaluation import cli as eval_cli
    from reneg.options import given_flags

    ns = build_parser().parse_args(argv)
    ns.given_flags = given_flags(build_parser(), argv)
    return eval_cli.demo_config(ns)


def test_eval_demo_names_only_the_learned_file_it_evaluates(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no runs/demo-train here
    out = tmp_path / "ev"
    emb = fake_finished_demo_train(out)

    capsys.readouterr()
    cfg = demo_eval_config(["eval", "--demo", "--out", str(out), "--negative", "null", "--negative", "zero"])
    assert cfg.negatives == ["null", "zero"]
    assert emb not in capsys.readouterr().out  # your negatives replace the demo's: its file is not named
    cfg = demo_eval_config(["eval", "--demo", "--out", str(out)])
    assert f"using the learned embedding {emb}" in capsys.readouterr().out
    assert any(emb in n for n in cfg.negatives)

"""reneg eval on tiny models: every output file, the HTML's images, resume, negatives, prompt sets."""

import json
import os
import re
from html.parser import HTMLParser

import pytest
import torch

from reneg.embedding import NegEmbedding, save_embedding
from reneg.evaluation import images as image_files
from reneg.evaluation import scoring
from reneg.evaluation import run as ev
from reneg.evaluation.config import EvalConfig, EvalError, Item, build_items
from reneg.evaluation.negatives import Negative, parse_negative, parse_negatives


@pytest.fixture(scope="module")
def emb_file(tmp_path_factory, tiny_backend):
    null, _ = tiny_backend.null_embedding()
    g = torch.Generator().manual_seed(3)
    t = null + 0.5 * torch.randn(null.shape, generator=g)
    path = str(tmp_path_factory.mktemp("emb") / "my_neg.safetensors")
    save_embedding(path, NegEmbedding(t.float(), "tiny"))
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "p.tsv"
    path.write_text(
        "Prompt\tCategory\na red circle\tshapes\na blue square\tshapes\na green cat\tanimals\n", encoding="utf-8"
    )
    return str(path)


def _cfg(tmp, pipe, hps, prompt_path, emb, **kw):
    base = dict(
        model=pipe,
        rewards=[f"hpsv2={hps}", f"hpsv2={hps}"],
        prompts=prompt_path,
        negatives=["null", "handcrafted:blurry, ugly", emb, f"tuned:{emb}"],
        out=str(tmp),
        sampling_steps=3,
        guidance=5.0,
        resolution=16,
        batch=4,
        tune_steps=2,
        tune_patience=2,
        tune_lr=0.05,
        grad_range=(0, 1),
        seed=7,
        progress=False,
        device="cpu",
    )
    base.update(kw)
    return EvalConfig(**base)


class _Imgs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.srcs = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def test_end_to_end_files_html_and_resume(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file, monkeypatch
):
    out = tmp_path / "ev"
    cfg = _cfg(out, tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file)
    summary = ev.run_eval(cfg, log=lambda m: None)
    negs = ["null", "handcrafted", "my_neg", "tuned-my_neg"]
    rewards = ["hpsv2", "hpsv2-hps_tiny"]

    # images: one per prompt and negative, named by prompt index, seed and negative
    images = sorted(os.listdir(out / "images"))
    assert images == sorted(f"{i:05d}_s{7 + i}_{n}.png" for i in range(3) for n in negs)
    # scores.csv: one row per image and reward
    rows = scoring.read_scores_csv(str(out / "scores.csv"))
    assert len(rows) == 3 * 4 * 2
    assert {r["reward"] for r in rows} == set(rewards)
    assert {r["category"] for r in rows} == {"shapes", "animals"}
    assert all(os.path.isfile(out / r["image"]) for r in rows)
    # summary.json: means with intervals per negative, reward and category; pairwise win rates
    s = json.loads((out / "summary.json").read_text())
    assert [r["name"] for r in s["rewards"]] == rewards and [n["name"] for n in s["negatives"]] == negs
    assert s["reference"] == "handcrafted" and s["categories"] == {"shapes": 2, "animals": 1}
    for rw in rewards:
        for n in negs:
            m = s["means"][rw][n]
            assert m["all"]["n"] == 3 and m["all"]["lo"] <= m["all"]["mean"] <= m["all"]["hi"]
            assert m["categories"]["animals"]["n"] == 1 and m["categories"]["animals"]["lo"] is None
            for other in negs:
                if other != n:
                    w = s["win_rates"][rw][n][other]
                    assert w["wins"] + w["ties"] + w["losses"] == 3
                    assert w["rate"] == pytest.approx(1 - s["win_rates"][rw][other][n]["rate"])
    mine = [r["score"] for r in rows if r["negative"] == "my_neg" and r["reward"] == "hpsv2"]
    assert s["means"]["hpsv2"]["my_neg"]["all"]["mean"] == pytest.approx(sum(mine) / 3)
    assert summary["means"] == s["means"]
    # per-sample tuning from my_neg keeps the best: never worse than its start on the same seed
    by = {(r["prompt_index"], r["negative"]): r["score"] for r in rows if r["reward"] == "hpsv2"}
    for i in range(3):
        assert by[(i, "tuned-my_neg")] >= by[(i, "my_neg")] - 2e-3
    tlog = json.loads((out / "tuning_tuned-my_neg.json").read_text())
    assert len(tlog) == 3 and all(v["best_reward"] >= v["start_reward"] for v in tlog.values())
    # plots, markdown
    for p in ("means", "categories", "differences", "winrates"):
        assert (out / "plots" / f"{p}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "report.md").read_text()
    assert all(f"`{n}`" in md for n in negs) and "| negative |" in md
    # grid.png: a row per prompt and seed, a column per negative (label column 230 px, 96 px cells)
    from PIL import Image

    with Image.open(out / "grid.png") as g:
        assert g.size == (230 + 4 * 102 + 6, 22 + 3 * 118 + 6)
        # the first row's first image is the null image of prompt 0, upscaled 16 -> 96 px
        cell = g.crop((236, 28, 236 + 96, 28 + 96))
    with Image.open(out / "images" / "00000_s7_null.png") as im:
        import numpy as np

        assert np.array_equal(np.asarray(cell.resize((16, 16), Image.NEAREST)), np.asarray(im.convert("RGB")))
    assert "![grid.png" in md
    # report.html: every image it shows exists, and it shows every image made
    html = (out / "report.html").read_text()
    parser = _Imgs()
    parser.feed(html)
    assert all(not src.startswith(("/", "http", "file:")) for src in parser.srcs)
    for src in parser.srcs:
        assert (out / src).is_file(), src
    shown = {src for src in parser.srcs if src.startswith("images/")}
    assert shown == {f"images/{f}" for f in images}
    assert {f"plots/{p}.png" for p in ("means", "categories", "differences", "winrates")} <= set(parser.srcs)

    # resume: delete half the images; only those are made again and the scores do not change
    deleted = images[::2]
    for f in deleted:
        os.unlink(out / "images" / f)
    saved = []
    real_save = image_files.save_frames
    monkeypatch.setattr(
        image_files,
        "save_frames",
        lambda path, fr, **k: (saved.append(os.path.basename(path)), real_save(path, fr, **k)),
    )
    ev.run_eval(cfg, log=lambda m: None)
    assert sorted(saved) == sorted(deleted)
    rows2 = scoring.read_scores_csv(str(out / "scores.csv"))
    old = {(r["image"], r["reward"]): r["score"] for r in rows}
    for r in rows2:
        assert r["score"] == pytest.approx(old[(r["image"], r["reward"])], abs=1e-6)

    # a rerun with other generation settings must not mix images
    with pytest.raises(EvalError, match="sampling_steps 3 -> 5"):
        ev.run_eval(
            _cfg(out, tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file, sampling_steps=5), log=lambda m: None
        )


def test_negative_syntax(tmp_path, emb_file):
    assert parse_negative("null") == Negative("null", "null", "")
    assert parse_negative("Zero") == Negative("zero", "zero", "")
    hc = parse_negative("handcrafted", handcrafted="bad, ugly")
    assert (hc.name, hc.kind, hc.source) == ("handcrafted", "text", "bad, ugly")
    assert parse_negative("handcrafted").source.startswith("distorted, ugly, blurry")
    assert parse_negative("handcrafted: low quality").source == "low quality"
    assert parse_negative("text:grainy").name == "text"
    assert parse_negative(emb_file) == Negative("my_neg", "file", emb_file)
    assert parse_negative(f"tuned:{emb_file}").name == "tuned-my_neg"
    assert parse_negative("tuned:null").kind == "tuned"
    named = parse_negative(f"mine={emb_file}")
    assert (named.name, named.kind) == ("mine", "file")
    assert parse_negative("short=text:blurry").source == "blurry"
    with pytest.raises(EvalError, match="is not a file"):
        parse_negative(str(tmp_path / "nope.safetensors"))
    bad = tmp_path / "prompts.txt"
    bad.write_text("x")
    with pytest.raises(EvalError, match="does not look like an embedding"):
        parse_negative(str(bad))
    with pytest.raises(EvalError, match="text is empty"):
        parse_negative("handcrafted:")
    with pytest.raises(EvalError, match="already taken"):
        parse_negatives([emb_file, emb_file])
    assert [n.name for n in parse_negatives([emb_file, f"b={emb_file}"])] == ["my_neg", "b"]


def test_prompt_sets_and_limit(tmp_path, shared_data):
    # HPSv2 benchmark layout: categories from the file names
    folder = tmp_path / "hps"
    folder.mkdir()
    for style in ("anime", "concept-art", "paintings", "photo"):
        (folder / f"{style}.json").write_text(json.dumps([f"{style} prompt {i}" for i in range(5)]))
    items = build_items(str(folder))
    assert len(items) == 20 and {it.category for it in items} == {"anime", "concept-art", "paintings", "photo"}
    # PartiPrompts TSV: the Category column
    parti = build_items(str(shared_data / "prompts" / "PartiPrompts.tsv"), limit=50, sample_seed=1, seed=100)
    assert len(parti) == 50 and len({it.category for it in parti}) > 3
    again = build_items(str(shared_data / "prompts" / "PartiPrompts.tsv"), limit=50, sample_seed=1, seed=100)
    assert parti == again  # a fixed sub-sample
    assert all(it.seed == 100 + it.index for it in parti)  # seeds follow the prompt's index in the file
    # ImageReward JSON and plain text
    ir = build_items(str(shared_data / "prompts" / "imagereward_benchmark_100.json"), limit=10)
    assert len(ir) == 10 and ir[0].text
    txt = tmp_path / "p.txt"
    txt.write_text("one\n\ntwo\n")
    two = build_items(str(txt), images_per_prompt=3, seed=5)
    assert [(it.index, it.seed) for it in two] == [(0, 5), (0, 6), (0, 7), (1, 8), (1, 9), (1, 10)]


def test_bad_arguments_name_the_flag(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file):
    def cfg(**kw):
        return _cfg(tmp_path / "o", tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file, **kw)

    with pytest.raises(EvalError, match="--model .*no such"):
        ev.validate_eval(cfg(model=str(tmp_path / "missing")))
    with pytest.raises(EvalError, match="--reward"):
        ev.validate_eval(cfg(rewards=[]))
    with pytest.raises(EvalError, match="--prompts: .*no such prompt file"):
        ev.validate_eval(cfg(prompts=str(tmp_path / "none.txt")))
    with pytest.raises(EvalError, match="--grad-range"):
        ev.validate_eval(cfg(grad_range=(0, 4)))
    with pytest.raises(EvalError, match="--reference x"):
        ev.validate_eval(cfg(reference="x"))
    with pytest.raises(EvalError, match="--video .*MotionAdapter"):
        ev.validate_eval(cfg(video=str(tmp_path)))
    with pytest.raises(EvalError, match="--resolution"):
        ev.validate_eval(cfg(resolution=12))


def test_cli_reports_errors(capsys, tmp_path):
    from reneg.cli import main

    assert main(["eval", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "reneg eval: error: --model is required" in err


def test_grid_limit_keeps_every_category():
    from reneg.evaluation.report import grid_items

    items = [Item(i, f"p{i}", "a" if i < 8 else "b", i) for i in range(10)]
    shown = grid_items(items, 4)
    assert len(shown) == 4 and {it.category for it in shown} == {"a", "b"}
    assert [it.index for it in shown] == [0, 1, 8, 9]
    assert re.match(r"^\d{5}_s\d+_x\.png$", items[0].image_name("x"))
    # several seeds per prompt: every prompt's first seed is shown before any prompt's second
    items = [Item(i, f"p{i}", "a", 100 + 3 * i + k, k) for i in range(4) for k in range(3)]
    shown = grid_items(items, 6)
    assert [(it.index, it.k) for it in shown] == [(0, 0), (1, 0), (2, 0), (3, 0), (0, 1), (1, 1)]


def test_tune_for_seed_returns_the_best_image(tiny_backend, tiny_reward):
    from reneg.tuning import tune_for_seed

    null, _ = tiny_backend.null_embedding()
    res, image = tune_for_seed(
        tiny_backend,
        tiny_reward,
        "a red circle",
        11,
        null,
        steps=3,
        guidance=5.0,
        grad_range=(0, 1),
        height=16,
        width=16,
        max_steps=2,
        patience=2,
        lr=0.5,
    )
    assert len(res.history) == 2 and res.best_reward == max(h["reward"] for h in res.history)
    with torch.no_grad():
        assert float(tiny_reward(image, ["a red circle"])) == pytest.approx(res.best_reward, abs=1e-5)
    with pytest.raises(ValueError, match="noise must be"):
        tune_for_seed(tiny_backend, tiny_reward, "x", 0, null, 4, 5.0, (0, 1), 16, 16, noise="other")


def test_wrong_family_embedding_fails_before_any_image(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file
):
    sd1 = str(tmp_path / "sd1_neg.safetensors")
    save_embedding(sd1, NegEmbedding(torch.zeros(1, 77, 768), "sd1"))
    cfg = _cfg(tmp_path / "o", tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file, negatives=["null", sd1])
    with pytest.raises(EvalError, match="--negative sd1_neg: .*sd1_neg.safetensors: this is a sd1 embedding"):
        ev.run_eval(cfg, log=lambda m: None)
    assert os.listdir(tmp_path / "o" / "images") == []


@pytest.mark.slow
def test_demo_as_a_new_user(tmp_path, monkeypatch, capsys):
    """`reneg eval --demo` from an empty folder: trains a short embedding, writes the report; a rerun makes nothing."""
    from reneg import demo
    from reneg.cli import main

    # the demo's own 16 images per prompt, 20 training steps and 5 tuning steps cost minutes more; fewer keep
    # the path and its checks
    monkeypatch.setitem(demo.WORLD_SETTINGS, "eval_images_per_prompt", 2)
    monkeypatch.setitem(demo.WORLD_SETTINGS, "eval_train_steps", 8)
    monkeypatch.setitem(demo.WORLD_SETTINGS, "eval_tune_steps", 3)
    monkeypatch.chdir(tmp_path)
    assert main(["eval", "--demo", "--no-progress", "--limit", "8"]) == 0  # a flag beside --demo replaces its setting
    out = tmp_path / "runs" / "demo-eval"
    s = json.loads((out / "summary.json").read_text())
    assert [n["name"] for n in s["negatives"]] == ["null", "handcrafted", "learned", "tuned"]
    assert (out / "train" / "embedding.safetensors").is_file() and len(s["categories"]) > 1
    # per-sample tuning for the first image of each prompt (--tune-per-prompt 1), the rest for all
    assert s["images"] == {
        "null": 2 * s["prompts"],
        "handcrafted": 2 * s["prompts"],
        "learned": 2 * s["prompts"],
        "tuned": s["prompts"],
    }
    sub = s["subsets"]["hpsv2"]["tuned"]
    assert sub["tuned"]["mean"] >= sub["learned"]["mean"] - 2e-3  # the search keeps its start
    parser = _Imgs()
    parser.feed((out / "report.html").read_text())
    assert len([x for x in parser.srcs if x.startswith("images/")]) == 3 * s["images_per_negative"] + s["prompts"]
    assert (out / "grid.png").is_file()
    capsys.readouterr()
    assert main(["eval", "--demo", "--no-progress", "--limit", "8"]) == 0
    printed = capsys.readouterr().out
    assert "using the learned embedding" in printed and ", 0 to make" in printed
    # the flags that replace the demo's settings are named; --no-progress (a display choice) is not one
    assert "using your --limit instead of the demo's" in printed


def test_tuned_fresh_noise_and_saved_embeddings(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, tiny_backend, emb_file):
    """--tune-noise fresh: the image is made from the item's seed with the best negative, which --save-tuned keeps."""
    from reneg.embedding import load_embedding
    from reneg.generate import generate, seeded_noise

    prompts = tmp_path / "p.txt"
    prompts.write_text("a green triangle\n")
    out = tmp_path / "fresh"
    cfg = _cfg(
        out,
        tiny_pipeline_dir,
        tiny_hps_ckpt,
        str(prompts),
        emb_file,
        negatives=[f"t=tuned:{emb_file}"],
        rewards=[f"hpsv2={tiny_hps_ckpt}"],
        tune_noise="fresh",
        save_tuned=True,
        tune_steps=3,
    )
    ev.run_eval(cfg, log=lambda m: None)
    saved = load_embedding(str(out / "tuned" / "t" / "00000_s7_t.safetensors"), expected_family="tiny")
    assert saved.metadata["kind"] == "per-sample" and saved.metadata["prompt"] == "a green triangle"
    with torch.no_grad():
        img = generate(
            tiny_backend,
            tiny_backend.encode_prompts(["a green triangle"]),
            tiny_backend.negative_cond(saved.tensor.float()),
            seeded_noise(tiny_backend, [7], 16, 16),
            cfg.sampling_steps,
            cfg.guidance,
        )
    made = image_files.load_frames(str(out / "images" / "00000_s7_t.png"))
    assert (image_files.to_uint8(img).astype(int) - image_files.to_uint8(made).astype(int)).__abs__().max() <= 1


def test_tune_per_prompt_tunes_a_subset_and_compares_on_it(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file, monkeypatch
):
    """--tune-per-prompt 1 with 2 images per prompt: tuned is made for image 0 of each prompt only, compared
    with the others on those images, and a rerun does not try to make the rest."""
    out = tmp_path / "ev"
    cfg = _cfg(
        out,
        tiny_pipeline_dir,
        tiny_hps_ckpt,
        prompt_file,
        emb_file,
        rewards=[f"hpsv2={tiny_hps_ckpt}"],
        images_per_prompt=2,
        tune_per_prompt=1,
    )
    s = ev.run_eval(cfg, log=lambda m: None)
    negs = ["null", "handcrafted", "my_neg", "tuned-my_neg"]
    images = set(os.listdir(out / "images"))
    tuned = {f for f in images if f.endswith("_tuned-my_neg.png")}
    # seeds: 7 + i * 2 + k; tuned only for k = 0
    assert tuned == {f"{i:05d}_s{7 + 2 * i}_tuned-my_neg.png" for i in range(3)}
    assert len(images) == 3 * 6 + 3
    assert s["images_per_negative"] == 6 and s["images"] == {
        "null": 6,
        "handcrafted": 6,
        "my_neg": 6,
        "tuned-my_neg": 3,
    }
    rows = [r for r in scoring.read_scores_csv(str(out / "scores.csv"))]
    assert len(rows) == 21
    sc = {(r["prompt_index"], r["seed"], r["negative"]): r["score"] for r in rows}
    first = [(i, 7 + 2 * i) for i in range(3)]
    m = s["means"]["hpsv2"]
    assert m["tuned-my_neg"]["all"]["n"] == 3 and m["my_neg"]["all"]["n"] == 6
    # a pair is compared on the images both have
    d = s["differences"]["hpsv2"]["tuned-my_neg"]["my_neg"]
    assert d["n"] == 3
    assert d["mean"] == pytest.approx(sum(sc[k + ("tuned-my_neg",)] - sc[k + ("my_neg",)] for k in first) / 3)
    assert s["win_rates"]["hpsv2"]["tuned-my_neg"]["null"]["n"] == 3
    assert s["win_rates"]["hpsv2"]["my_neg"]["null"]["n"] == 6
    # every negative's mean on the tuned images; tuned never below its start there
    sub = s["subsets"]["hpsv2"]["tuned-my_neg"]
    assert set(sub) == set(negs) and all(v["n"] == 3 for v in sub.values())
    assert sub["my_neg"]["mean"] == pytest.approx(sum(sc[k + ("my_neg",)] for k in first) / 3)
    assert sub["tuned-my_neg"]["mean"] >= sub["my_neg"]["mean"] - 2e-3
    md = (out / "report.md").read_text()
    assert "| `tuned-my_neg` | 3 |" in md and "On the 3 images `tuned-my_neg` was made for" in md
    html = (out / "report.html").read_text()
    parser = _Imgs()
    parser.feed(html)
    assert {x for x in parser.srcs if x.startswith("images/")} == {f"images/{f}" for f in images}
    assert html.count("not made") == 3 and "tuned-my_neg (n=3)" in html
    from PIL import Image

    with Image.open(out / "grid.png") as g:  # only rows every negative has: image 0 of each prompt
        assert g.size == (230 + 4 * 102 + 6, 22 + 3 * 118 + 6)
    for p in ("means", "categories", "differences", "winrates"):
        assert (out / "plots" / f"{p}.png").is_file()
    # rerun: nothing to make (the untuned images of k = 1 are not missing)
    logs = []
    ev.run_eval(cfg, log=logs.append)
    assert any(", 0 to make" in x for x in logs), logs


def test_tune_per_prompt_must_be_positive(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file):
    with pytest.raises(EvalError, match="--tune-per-prompt must be a positive integer, got 0"):
        ev.validate_eval(
            _cfg(tmp_path / "ev", tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file, tune_per_prompt=0)
        )


@pytest.mark.parametrize("spec", ["big={f}", "tuned:{f}"])
def test_a_negative_the_model_cannot_read_is_refused_before_any_image(
    tmp_path, tiny_pixart_dir, tiny_hps_ckpt, prompt_file, spec
):
    """A PixArt-sigma file (300 T5 rows) is in PixArt-alpha's output space, so it loads for an alpha
    model, which reads at most 120 rows: eval must say so before the null images are made."""
    sigma = str(tmp_path / "sigma_neg.safetensors")
    t = torch.zeros(1, 300, 4096)
    t[:, :200] = 0.01
    save_embedding(sigma, NegEmbedding(t, "pixart-sigma", attention_mask=(t[..., 0] != 0).long()))
    cfg = _cfg(
        tmp_path / "o",
        tiny_pixart_dir,
        tiny_hps_ckpt,
        prompt_file,
        sigma,
        negatives=["null", spec.format(f=sigma)],
        rewards=[f"hpsv2={tiny_hps_ckpt}"],
    )
    with pytest.raises(EvalError) as e:
        ev.run_eval(cfg, log=lambda m: None)
    msg = str(e.value)
    name = "big" if spec.startswith("big") else "tuned-sigma_neg"
    assert f"--negative {name}" in msg and sigma in msg and "120" in msg and "300" in msg
    assert os.listdir(tmp_path / "o" / "images") == []


def test_every_embedding_negative_is_checked_against_the_model_before_any_image(
    tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file, monkeypatch
):
    """Whatever the family, each file negative goes through the model's own negative check (the one
    generation uses) before the first image; a refusal names the negative and its file."""
    from reneg.backends.diffusers_backend import DiffusersBackend

    real = DiffusersBackend.negative_cond

    def picky(self, neg, pooled=None, mask=None):
        if float(neg.abs().sum()) > 0:  # every negative here but "zero"
            raise ValueError("this model cannot read that negative")
        return real(self, neg, pooled, mask)

    monkeypatch.setattr(DiffusersBackend, "negative_cond", picky)
    cfg = _cfg(tmp_path / "o", tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file, negatives=["zero", emb_file])
    with pytest.raises(EvalError, match=r"--negative my_neg \(.*my_neg\.safetensors\): this model cannot read"):
        ev.run_eval(cfg, log=lambda m: None)
    assert os.listdir(tmp_path / "o" / "images") == []


def test_tune_prompts_limits_tuning_to_the_first_prompts(tmp_path):
    """--tune-prompts N: a tuned negative is made for the images of the first N prompts only (in the order
    the items come, so after --limit's choice), with --tune-per-prompt K their first K; other negatives
    are made for every image."""
    from reneg.evaluation.config import items_for

    path = tmp_path / "p.txt"
    path.write_text("a\nb\nc\nd\n", encoding="utf-8")
    items = build_items(str(path), seed=7, images_per_prompt=3)
    tuned = Negative("tuned-x", "tuned", "x.safetensors")
    plain = Negative("x", "file", "x.safetensors")
    both = EvalConfig(tune_per_prompt=1, tune_prompts=2)
    assert [(it.index, it.k) for it in items_for(both, tuned, items)] == [(0, 0), (1, 0)]
    assert items_for(both, plain, items) == items
    only_n = EvalConfig(tune_prompts=3)
    assert [(it.index, it.k) for it in items_for(only_n, tuned, items)] == [(i, k) for i in range(3) for k in range(3)]
    # more than there are: every prompt; the first N of a subsample are its first N, not indices < N
    assert items_for(EvalConfig(tune_prompts=9), tuned, items) == items
    picked = [it for it in items if it.index in (1, 3)]
    assert {it.index for it in items_for(EvalConfig(tune_prompts=1), tuned, picked)} == {1}


def test_tune_prompts_must_be_positive(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file):
    with pytest.raises(EvalError, match="--tune-prompts must be a positive integer, got 0"):
        ev.validate_eval(_cfg(tmp_path / "ev", tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file, tune_prompts=0))

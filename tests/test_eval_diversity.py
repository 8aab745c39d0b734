"""reneg eval's signs of reward hacking: each negative's diversity (its images of one prompt across seeds,
in the reward's image-feature space) and every reward marked trained on / held out."""

from __future__ import annotations

import csv
import json
import os
import shutil

import pytest
import torch
from test_eval_run import _cfg, emb_file, prompt_file  # noqa: F401 - fixtures
from test_rewards_preprocess import _hf_clip, _score_from, torchvision_reference
from test_train_events import _args as train_args

from reneg.diversity import diversity_by_group, pairwise_diversity
from reneg.embedding import load_embedding
from reneg.evaluation import images as image_files
from reneg.evaluation import provenance, scoring
from reneg.evaluation import run as ev
from reneg.evaluation.cli import _console_table
from reneg.evaluation.config import Item
from reneg.evaluation.negatives import Negative
from reneg.rewards import load_reward, parse_spec, reward_file

NEEDS = "diversity needs --images-per-prompt 2 or more"


def _images(seed, n=1, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- the measure


def test_identical_images_score_exactly_zero(tiny_reward):
    x = _images(0).repeat(3, 1, 1, 1)
    f = tiny_reward.image_features(x)
    assert pairwise_diversity(f) == 0.0
    # for unit rows whose 1 - a.a is not 0 by rounding, too
    g = torch.nn.functional.normalize(torch.randn(1, 7, generator=torch.Generator().manual_seed(5)), dim=-1)
    for _ in range(50):
        assert pairwise_diversity(g.repeat(4, 1)) == 0.0
        g = torch.nn.functional.normalize(g + 0.1 * torch.randn_like(g), dim=-1)
    assert pairwise_diversity(f[:1]) is None  # one image: nothing to compare
    assert pairwise_diversity(torch.tensor([[1.0, 0.0], [-1.0, 0.0]])) == 2.0  # opposite: the most


def test_a_slightly_changed_copy_is_less_diverse_than_another_image(tiny_reward):
    x, y = _images(1), _images(2)
    near = (x + 0.02 * torch.randn(x.shape, generator=torch.Generator().manual_seed(3))).clamp(-1, 1)
    f = tiny_reward.image_features(torch.cat([x, near, y]))
    copy, other = pairwise_diversity(f[[0, 1]]), pairwise_diversity(f[[0, 2]])
    assert 0 < copy < other
    # three images: a near copy in the group lowers its diversity
    assert pairwise_diversity(f) < pairwise_diversity(tiny_reward.image_features(torch.cat([x, _images(4), y])))


def test_diversity_by_group_groups_by_label_and_checks_the_length():
    f = torch.nn.functional.normalize(torch.randn(6, 5, generator=torch.Generator().manual_seed(0)), dim=-1)
    groups = [0, 1, 0, 1, 1, 2]
    out = diversity_by_group(f, groups)
    assert set(out) == {0, 1}  # prompt 2 has one image: no diversity
    assert out[0] == pytest.approx(pairwise_diversity(f[[0, 2]]), abs=0)
    assert out[1] == pytest.approx(pairwise_diversity(f[[1, 3, 4]]), abs=0)
    assert out[0] == pytest.approx(1 - float(f[0] @ f[2]), abs=1e-6)
    with pytest.raises(ValueError, match="5 group labels for 6 feature rows"):
        diversity_by_group(f, groups[:5])


# --------------------------------------------------------------------------- every reward's image tower


@pytest.mark.parametrize("name", ["hps", "pickscore", "aesthetic", "imagereward"])
def test_every_reward_has_unit_image_features_and_scores_as_before(name, tmp_path, tiny_hps_ckpt):
    if name == "hps":
        reward = load_reward(f"hpsv2={tiny_hps_ckpt}")
    elif name == "pickscore":
        reward = load_reward(f"pickscore={_hf_clip(tmp_path / 'clip')}")
    elif name == "aesthetic":
        from reneg.rewards.aesthetic import AestheticMLP

        torch.save(AestheticMLP(16).state_dict(), tmp_path / "mlp.pth")
        reward = load_reward(f"aesthetic={tmp_path / 'mlp.pth'},clip={_hf_clip(tmp_path / 'clip')}")
    else:
        from test_imagereward import make_tiny_imagereward

        reward = load_reward(f"imagereward={make_tiny_imagereward(tmp_path / 'ir') / 'ImageReward.pt'}")
    size = reward.size
    x = _images(7, n=3, size=size)
    prompts = ["a red circle", "a blue square", "a dog"]
    ref_x = torchvision_reference(((x + 1) / 2).clamp(0, 1), size)
    with torch.no_grad():
        f = reward.image_features(x)
        if name == "hps":
            want = reward.model.encode_image(ref_x)
        elif name == "pickscore":
            want = reward.model.get_image_features(pixel_values=ref_x)
        elif name == "aesthetic":
            want = reward.vision.get_image_features(pixel_values=ref_x)
        else:
            want = reward.model.blip.vision_proj(reward.model.blip.visual_encoder(ref_x)[:, 0])
        want = getattr(want, "pooler_output", want).float()
        got, ref_score = reward(x, prompts), _score_from(reward, name, ref_x, prompts)
    assert f.ndim == 2 and f.shape[0] == 3 and f.shape[1] == want.shape[1]
    assert torch.allclose(f.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert torch.allclose(f.float(), want / want.norm(dim=-1, keepdim=True), atol=1e-5)
    assert got.shape == (3,) and torch.allclose(got.float(), ref_score.float(), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- trained on / held out


@pytest.fixture(scope="module")
def other_hps(tmp_path_factory):
    """Reward B: another tiny HPS checkpoint, of another name (its open_clip config beside it)."""
    from reneg.tiny import build_tiny_hps

    path = build_tiny_hps(str(tmp_path_factory.mktemp("other") / "hps"), seed=1)
    other = os.path.join(os.path.dirname(path), "hps_other.pt")
    os.rename(path, other)
    return other


@pytest.fixture(scope="module")
def trained_emb(tmp_path_factory, tiny_pipeline_dir, tiny_hps_ckpt):
    """An embedding from a tiny ``reneg train`` with reward A (``hpsv2=`` the session's tiny HPS)."""
    from reneg.cli import main

    tmp = tmp_path_factory.mktemp("train")
    out = tmp / "run"
    assert main(train_args(tmp, out, tiny_pipeline_dir, tiny_hps_ckpt, "--steps", "2")) == 0
    return str(out / "embedding.safetensors")


def test_training_records_what_recognises_its_rewards(trained_emb, tiny_hps_ckpt):
    meta = load_embedding(trained_emb).metadata
    assert json.loads(meta["rewards"]) == [f"hpsv2={tiny_hps_ckpt}"]  # as before
    (rec,) = json.loads(meta["reward_files"])
    assert rec == {
        "kind": "hpsv2",
        "path": os.path.realpath(tiny_hps_ckpt),
        "basename": "hps_tiny.pt",
        "size": os.path.getsize(tiny_hps_ckpt),
    }
    assert provenance.trained_with(meta) == [rec]


def test_marks_from_metadata_moved_files_old_files_tuned_and_unknown(tmp_path, tiny_hps_ckpt, other_hps):
    a, b = parse_spec(f"hpsv2={tiny_hps_ckpt}"), parse_spec(f"hpsv2={other_hps}")
    ra = reward_file(a)
    copy = tmp_path / "elsewhere" / "hps_tiny.pt"
    copy.parent.mkdir()
    shutil.copy(tiny_hps_ckpt, copy)
    gone = dict(ra, path=str(tmp_path / "another-machine" / "hps_tiny.pt"))  # the file moved: name and size
    metas = {
        "a.safetensors": {"reward_files": json.dumps([ra])},
        "moved.safetensors": {"reward_files": json.dumps([gone])},
        "old.safetensors": {"rewards": json.dumps([f"hpsv2={tiny_hps_ckpt}"])},  # before reward_files
        "old-elsewhere.safetensors": {"rewards": json.dumps([f"hpsv2={copy}"])},
        "hps21.safetensors": {"reward_files": json.dumps([dict(ra, kind="hpsv2.1")])},  # another kind
        "paper.bin": {},  # no metadata
    }
    negs = [Negative("null", "null", "")] + [Negative(os.path.splitext(k)[0], "file", k) for k in metas]
    negs += [Negative("tuned-null", "tuned", "null"), Negative("tuned-paper", "tuned", "paper.bin")]
    roles = provenance.reward_roles([a, b], ["A", "B"], negs, metas)
    assert [r["name"] for r in roles] == ["A", "B"] and roles[0]["spec"] == str(a)
    assert roles[0]["embeddings"] == {
        "a": "trained on",
        "moved": "trained on",
        "old": "trained on",
        "old-elsewhere": "unknown",  # the same name elsewhere, no size recorded to confirm it
        "hps21": "held out",
        "paper": "unknown",
        "tuned-null": "trained on",  # per-sample tuning optimises the first reward
        "tuned-paper": "trained on",
    }
    assert roles[0]["role"] == "trained on" and "tuned" in roles[0]["note"]
    assert roles[0]["trained_by"] == ["a", "moved", "old", "tuned-null", "tuned-paper"]
    assert roles[1]["role"] == "held out" and roles[1]["trained_by"] == []
    assert roles[1]["embeddings"]["paper"] == "unknown" and roles[1]["embeddings"]["tuned-null"] == "held out"
    assert "held out: a, moved" in provenance.role_text(roles[1])  # they disagree: said per embedding
    # only embeddings without metadata: unknown; no embedding at all: nothing was trained on it
    only = provenance.reward_roles([b], ["B"], [Negative("paper", "file", "paper.bin")], metas)
    assert only[0]["role"] == "unknown" and provenance.role_text(only[0]) == "unknown"
    assert provenance.reward_roles([a], ["A"], negs[:1], metas)[0]["role"] == "held out"
    # a size that differs: another file of the same name
    assert provenance.match(dict(gone, size=ra["size"] + 1), ra) == "held out"
    assert provenance.match(dict(ra, size=ra["size"] + 1), ra) == "held out"  # the file at that path was replaced
    assert provenance.trained_with({"rewards": "not json"}) is None and provenance.trained_with({}) is None


# --------------------------------------------------------------------------- end to end


def _diversity_csv(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_eval_measures_diversity_and_marks_rewards(
    tmp_path,
    tiny_pipeline_dir,
    tiny_hps_ckpt,
    tiny_reward,
    other_hps,
    trained_emb,
    prompt_file,  # noqa: F811
    emb_file,  # noqa: F811
    monkeypatch,
):
    out = tmp_path / "ev"
    negs = ["null", "handcrafted", "trained", "my_neg"]
    cfg = _cfg(
        out,
        tiny_pipeline_dir,
        tiny_hps_ckpt,
        prompt_file,
        emb_file,
        rewards=[f"hpsv2={tiny_hps_ckpt}", f"hpsv2={other_hps}"],
        negatives=["null", "handcrafted:blurry, ugly", f"trained={trained_emb}", emb_file],
        images_per_prompt=2,
    )
    logs = []
    summary = ev.run_eval(cfg, log=logs.append)
    assert (
        "reneg eval: rewards: hpsv2 (trained on: trained; unknown: my_neg); "
        "hpsv2-hps_other (held out: trained; unknown: my_neg)"
    ) in logs

    # diversity.csv: each negative's images of each prompt (2 seeds), in reward A's features
    rows = scoring.read_diversity_csv(str(out / "diversity.csv"))
    assert {(r["negative"], r["prompt_index"]) for r in rows} == {(n, i) for n in negs for i in range(3)}
    assert all(r["n_images"] == 2 and r["reward"] == "hpsv2" and 0 <= r["diversity"] <= 2 for r in rows)
    r0 = next(r for r in rows if r["negative"] == "trained" and r["prompt_index"] == 1)
    ims = [image_files.load_frames(str(out / "images" / f"00001_s{s}_trained.png")) for s in (9, 10)]
    with torch.no_grad():
        want = pairwise_diversity(tiny_reward.image_features(torch.cat(ims)))
    assert r0["diversity"] == pytest.approx(want, abs=1e-6)

    # summary.json: per negative, the mean over prompts with its interval and the paired difference
    s = json.loads((out / "summary.json").read_text())
    assert s["diversity"]["reward"] == "hpsv2" and s["diversity"]["note"] is None
    assert s["reference"] == "handcrafted"
    by = {n["name"]: n["diversity"] for n in s["negatives"]}
    assert list(by) == negs
    for n in negs:
        d = by[n]
        assert (
            d["reward"] == "hpsv2" and d["mean"]["n"] == 3 and d["mean"]["lo"] <= d["mean"]["mean"] <= d["mean"]["hi"]
        )
        mine = [r["diversity"] for r in rows if r["negative"] == n]
        assert d["mean"]["mean"] == pytest.approx(sum(mine) / 3, abs=1e-6)
        if n == "handcrafted":
            assert d["difference_vs_reference"] is None
        else:
            ref = {r["prompt_index"]: r["diversity"] for r in rows if r["negative"] == "handcrafted"}
            diff = [r["diversity"] - ref[r["prompt_index"]] for r in rows if r["negative"] == n]
            assert d["difference_vs_reference"]["mean"] == pytest.approx(sum(diff) / 3, abs=1e-6)
    # the rewards, marked: A trained the embedding, B did not; the file without metadata is unknown
    assert [r["name"] for r in s["rewards"]] == ["hpsv2", "hpsv2-hps_other"]
    a, b = s["rewards"]
    assert a["role"] == "trained on" and a["trained_by"] == ["trained"] and a["spec"] == f"hpsv2={tiny_hps_ckpt}"
    assert a["embeddings"] == {"trained": "trained on", "my_neg": "unknown"}
    assert b["role"] == "held out" and b["trained_by"] == []
    assert b["embeddings"] == {"trained": "held out", "my_neg": "unknown"}
    assert summary["rewards"] == s["rewards"]

    # report.html: the diversity column and its explanation, and each reward's mark
    html = (out / "report.html").read_text()
    assert "reward-feature, same prompt across seeds" in html and "reward hacking" in html
    assert "1 − cosine" in html and "diversity.csv" in html and NEEDS not in html
    assert "trained on: trained; unknown: my_neg" in html and "held out: trained; unknown: my_neg" in html
    md = (out / "report.md").read_text()
    assert "diversity (same prompt across seeds)" in md and "`hpsv2` (trained on: trained" in md
    # the printed summary
    text = _console_table(summary)
    assert "hpsv2 (trained on: trained; unknown: my_neg)" in text
    assert "hpsv2-hps_other (held out: trained; unknown: my_neg)" in text
    assert "diversity (hpsv2 image features, same prompt across seeds" in text
    div_lines = text.split("diversity (hpsv2 image features")[1].splitlines()
    assert any(ln.split()[:2] == ["trained", f"{by['trained']['mean']['mean']:.4f}"] for ln in div_lines), text
    # the studio's eval page reads the new reward entries
    from reneg.studio.runs import eval_report

    assert {row[0] for row in eval_report(str(out))["table"]} == {"hpsv2", "hpsv2-hps_other"}

    # a rerun that makes no image still measures it, with the same numbers
    os.unlink(out / "diversity.csv")
    saved = []
    monkeypatch.setattr(image_files, "save_frames", lambda path, fr, **k: saved.append(path))
    ev.run_eval(cfg, log=lambda m: None)
    assert saved == []
    again = scoring.read_diversity_csv(str(out / "diversity.csv"))
    assert [(r["negative"], r["prompt_index"]) for r in again] == [(r["negative"], r["prompt_index"]) for r in rows]
    assert all(x["diversity"] == pytest.approx(y["diversity"], abs=1e-7) for x, y in zip(again, rows))


def test_one_image_per_prompt_says_diversity_needs_two(
    tmp_path,
    tiny_pipeline_dir,
    tiny_hps_ckpt,
    prompt_file,  # noqa: F811
    emb_file,  # noqa: F811
):
    out = tmp_path / "one"
    cfg = _cfg(out, tiny_pipeline_dir, tiny_hps_ckpt, prompt_file, emb_file, negatives=["null", "handcrafted:blurry"])
    summary = ev.run_eval(cfg, log=lambda m: None)
    assert _diversity_csv(out / "diversity.csv") == []  # the header alone
    s = json.loads((out / "summary.json").read_text())
    assert s["diversity"]["note"] == NEEDS
    assert all(n["diversity"]["mean"] is None and n["diversity"]["note"] == NEEDS for n in s["negatives"])
    # no embedding was evaluated: nothing was trained on the rewards
    assert {r["role"] for r in s["rewards"]} == {"held out"}
    assert NEEDS in (out / "report.html").read_text() and NEEDS in (out / "report.md").read_text()
    assert NEEDS in _console_table(summary).splitlines()


def test_a_video_is_one_feature_the_mean_of_its_frames(tmp_path, tiny_reward):
    """Videos (frames > 1): a video's feature is the normalised mean of its frames' features."""
    from types import SimpleNamespace

    img_dir = tmp_path / "images"
    items = [Item(0, "a red circle", "all", s, k) for k, s in enumerate((3, 4))]
    neg = Negative("null", "null", "")
    for it in items:
        image_files.save_frames(str(img_dir / it.image_name("null")), _images(it.seed, n=3, size=16))
    cfg = SimpleNamespace(batch=2, progress=False)
    rows, feats = scoring.score_image_files(
        cfg, items, [neg], [tiny_reward], ["hpsv2"], str(img_dir), frames=3, features=True
    )
    # one reward row per video (the mean of its frames), beside the temporal measures' rows
    assert len([r for r in rows if r["reward"] == "hpsv2"]) == 2 and feats["reward"] == "hpsv2"
    with torch.no_grad():
        fr = tiny_reward.image_features(image_files.load_frames(str(img_dir / items[0].image_name("null"))))
    want = torch.nn.functional.normalize(fr.mean(0), dim=0)
    assert torch.allclose(feats["features"][("null", 0, 3)], want, atol=1e-6)
    (row,) = scoring.prompt_diversity(feats, [neg], items)
    assert row["n_images"] == 2 and row["diversity"] > 0


def test_a_reward_without_an_image_tower_gives_no_features(tmp_path, tiny_reward):
    from types import SimpleNamespace

    from reneg.rewards import Reward

    class Flat(Reward):
        def forward(self, images, prompts):
            return images.mean((1, 2, 3))

    items = [Item(0, "a", "all", 1, 0), Item(0, "a", "all", 2, 1)]
    for it in items:
        image_files.save_frames(str(tmp_path / it.image_name("null")), _images(it.seed, size=16))
    cfg = SimpleNamespace(batch=4, progress=False)
    neg = [Negative("null", "null", "")]
    _, feats = scoring.score_image_files(cfg, items, neg, [Flat()], ["flat"], str(tmp_path), features=True)
    assert feats is None and scoring.prompt_diversity(feats, neg, items) == []
    # the first reward that has a tower is used, whichever place it has
    _, feats = scoring.score_image_files(
        cfg, items, neg, [Flat(), tiny_reward], ["flat", "hpsv2"], str(tmp_path), features=True
    )
    assert feats["reward"] == "hpsv2" and len(feats["features"]) == 2


def test_an_embedding_without_metadata_is_unknown(emb_file, tiny_hps_ckpt):  # noqa: F811
    meta = load_embedding(emb_file).metadata
    assert provenance.trained_with(meta) is None
    roles = provenance.reward_roles(
        [parse_spec(f"hpsv2={tiny_hps_ckpt}")], ["hpsv2"], [Negative("my_neg", "file", emb_file)], {emb_file: meta}
    )
    assert roles[0]["embeddings"] == {"my_neg": "unknown"} and roles[0]["role"] == "unknown"


def test_reneg_tune_records_its_rewards_too(tmp_path, tiny_pipeline_dir, tiny_hps_ckpt):
    from reneg.cli import main

    out = tmp_path / "tuned.safetensors"
    args = ["tune", "--model", tiny_pipeline_dir, "--reward", f"hpsv2={tiny_hps_ckpt}", "--prompt", "a red circle"]
    args += [
        "--max-steps",
        "1",
        "--patience",
        "1",
        "--sampling-steps",
        "3",
        "--grad-range",
        "0",
        "1",
        "--resolution",
        "16",
    ]
    assert main(args + ["--out", str(out)]) == 0
    (rec,) = provenance.trained_with(load_embedding(out).metadata)
    assert rec == reward_file(f"hpsv2={tiny_hps_ckpt}")

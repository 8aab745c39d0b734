"""Reward loaders (through the real file formats) and prompt-set loaders."""

from __future__ import annotations

import json
import os

import pytest
import torch

from reneg.prompts import PromptFileError, load_prompts, subsample
from reneg.rewards import RewardSpecError, WeightedReward, load_rewards, parse_spec, reward_kinds


def _tiny_hf_clip(folder):
    from transformers import CLIPConfig, CLIPModel

    from reneg.tiny import write_clip_tokenizer

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            vocab_size=49408,
            max_position_embeddings=77,
        ),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder


def test_hps_checkpoint_scores_through_the_loader(tiny_hps_ckpt):
    r = load_rewards([f"hpsv2.1={tiny_hps_ckpt}"])
    img = (torch.rand(3, 3, 40, 48) * 2 - 1).requires_grad_(True)
    s = r(img, ["a red circle", "a blue square", "a dog"])
    assert s.shape == (3,) and torch.isfinite(s).all() and (s.abs() <= 1).all()
    s.sum().backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in r.parameters())
    # the same image and prompt score the same (cosine, deterministic)
    a = r(img[:1].detach(), ["a dog"])
    assert torch.allclose(a, r(img[:1].detach(), ["a dog"]))


def test_hps_checkpoint_of_another_architecture_is_refused_clearly(tmp_path, tiny_hps_ckpt):
    sd = torch.load(tiny_hps_ckpt, weights_only=True)["state_dict"]
    sd.pop(next(iter(sd)))
    bad = tmp_path / "hps_bad.pt"
    torch.save({"state_dict": sd}, bad)
    cfg = os.path.join(os.path.dirname(tiny_hps_ckpt), "open_clip_config.json")
    with pytest.raises(ValueError, match="hps_bad.pt: this HPS checkpoint does not match.*1 missing"):
        load_rewards([f"hpsv2={bad},config={cfg}"])


def test_pickscore_and_aesthetic_from_local_folders(tmp_path):
    folder = _tiny_hf_clip(str(tmp_path / "clip"))
    mlp = tmp_path / "aesthetic.pth"
    from reneg.rewards.aesthetic import AestheticMLP

    torch.save(AestheticMLP(16).state_dict(), mlp)
    r = load_rewards([f"pickscore={folder}", f"aesthetic={mlp},clip={folder},weight=0.5"])
    assert isinstance(r, WeightedReward)
    img = (torch.rand(2, 3, 32, 32) * 2 - 1).requires_grad_(True)
    s = r(img, ["a cat", "a dog"])
    assert s.shape == (2,)
    parts = r.last_parts
    assert torch.allclose(s, parts["pickscore"] + 0.5 * parts["aesthetic"], atol=1e-5)
    s.sum().backward()
    assert img.grad.abs().sum() > 0


def test_reward_specs(tmp_path, tiny_hps_ckpt):
    assert {"hpsv2", "hpsv2.1", "pickscore", "aesthetic"} <= set(reward_kinds())
    spec = parse_spec(f"hpsv2.1={tiny_hps_ckpt},weight=0.25")
    assert spec.name == "hpsv2.1" and spec.weight == 0.25 and spec.path == tiny_hps_ckpt
    for bad, needle in [
        ("hps", "expected NAME=PATH"),
        ("nope=/x", "unknown reward 'nope'"),
        (f"hpsv2={tmp_path}/missing.pt", "does not exist"),
        (f"hpsv2={tiny_hps_ckpt},weight=abc", "not a number"),
        ("hpsv2=", "no path"),
    ]:
        with pytest.raises(RewardSpecError, match=needle):
            parse_spec(bad)
    with pytest.raises(RewardSpecError, match="no reward"):
        load_rewards([])


def test_prompt_formats(tmp_path, shared_data):
    ir = load_prompts(str(shared_data / "prompts" / "imagereward_refl_train.json"))
    assert len(ir) == 10000 and all(p.text for p in ir[:50])
    bench = load_prompts(str(shared_data / "prompts" / "imagereward_benchmark_100.json"))
    assert len(bench) == 100
    parti = load_prompts(str(shared_data / "prompts" / "PartiPrompts.tsv"))
    assert len(parti) == 1632 and len({p.category for p in parti}) > 5
    hps = tmp_path / "hps"
    hps.mkdir()
    for style in ("anime", "photo"):
        (hps / f"{style}.json").write_text(json.dumps([f"{style} one", f"{style} two"]))
    got = load_prompts(str(hps))
    assert [(p.text, p.category) for p in got][:2] == [("anime one", "anime"), ("anime two", "anime")]
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\n\n  a dog  \n")
    assert [p.text for p in load_prompts(str(txt))] == ["a cat", "a dog"]
    sub = subsample(parti, 10, seed=3)
    assert sub == subsample(parti, 10, seed=3) and len(sub) == 10


@pytest.mark.parametrize(
    "content, needle",
    [
        (b"", "no prompts found"),
        (b"\n \n", "no prompts found"),
        (b"\xff\xfe\x00bad", "not UTF-8"),
    ],
)
def test_bad_prompt_files(tmp_path, content, needle):
    p = tmp_path / "prompts.txt"
    p.write_bytes(content)
    with pytest.raises(PromptFileError, match=needle):
        load_prompts(str(p))


def test_bad_json_and_tsv(tmp_path):
    j = tmp_path / "p.json"
    j.write_text('[{"x": 1}]')
    with pytest.raises(PromptFileError, match="item 0 has no 'text' or 'prompt'"):
        load_prompts(str(j))
    t = tmp_path / "p.tsv"
    t.write_text("Caption\tCategory\na\tb\n")
    with pytest.raises(PromptFileError, match="expected a 'Prompt' column"):
        load_prompts(str(t))

"""The reward registry is the one list of rewards: a new module in reneg/rewards/ is found by itself and
shows in ``reneg rewards``, the ``--reward`` help of train/tune/eval and the ComfyUI Load Reward Model
node; ImageReward runs through every one of those front-ends."""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

import comfy_stubs
from test_imagereward import PROMPTS, make_tiny_imagereward

import reneg.rewards as rewards
from reneg.cli import main

ROOT = Path(__file__).resolve().parents[1]
NEW_MODULE = """
import torch
from . import Reward, register


class Brightness(Reward):
    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@register("brightness", "mean pixel value (a test reward)", options=("gain",))
def load(path, device="cpu", dtype=torch.float32, gain="1", **unused):
    return Brightness()
"""


@pytest.fixture(scope="module")
def tiny_ir(tmp_path_factory):
    return make_tiny_imagereward(tmp_path_factory.mktemp("ir") / "ImageReward")


def _add_module(package, folder: Path, monkeypatch):
    package.reward_kinds()  # the built-in rewards registered before the registry is copied for this test
    (folder / "brightness_reward.py").write_text(NEW_MODULE)
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    monkeypatch.setattr(package, "_REGISTRY", dict(package._REGISTRY))
    monkeypatch.delitem(sys.modules, f"{package.__name__}.brightness_reward", raising=False)


def test_a_new_reward_module_is_found_and_listed_by_the_cli(tmp_path, monkeypatch, capsys):
    _add_module(rewards, tmp_path, monkeypatch)
    assert "brightness" in rewards.reward_kinds()
    assert rewards.reward_kinds()["brightness"].syntax == "brightness=FILE[,gain=VALUE][,weight=W]"
    assert main(["rewards"]) == 0
    out = capsys.readouterr().out
    assert "brightness=FILE[,gain=VALUE][,weight=W]" in out and "imagereward=FILE[,tokenizer=FOLDER]" in out
    for cmd in ("train", "tune", "eval"):
        with pytest.raises(SystemExit):
            main([cmd, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "aesthetic, brightness, hpsv2, hpsv2.1, imagereward, pickscore" in text, cmd
    f = tmp_path / "any.pt"
    f.write_bytes(b"x")
    r = rewards.load_reward(f"brightness={f},gain=2")
    assert float(r(torch.ones(1, 3, 4, 4), ["x"])) == 1.0
    monkeypatch.delitem(sys.modules, "reneg.rewards.brightness_reward", raising=False)


def test_a_broken_reward_module_is_left_out_with_a_warning(tmp_path, monkeypatch):
    (tmp_path / "broken_reward.py").write_text("raise ImportError('needs a library this host lacks')\n")
    monkeypatch.setattr(rewards, "__path__", [*rewards.__path__, str(tmp_path)])
    monkeypatch.setattr(rewards, "_FAILED", {})
    with pytest.warns(UserWarning, match="broken_reward could not be imported and is left out: ImportError"):
        names = rewards.names()
    assert {"hpsv2.1", "imagereward", "pickscore", "aesthetic"} <= set(names)


def test_loading_hps_does_not_print_open_clips_random_init_warning(monkeypatch, caplog):
    import types

    from reneg.rewards import hps

    def create_model(arch, pretrained=None):  # what open_clip does for pretrained=None: warn, then build
        logging.warning(f"No pretrained weights loaded for model '{arch}'. Model initialized randomly.")
        logging.warning("another library warning")
        return "model"

    fake = types.SimpleNamespace(
        create_model=create_model, list_models=lambda: ["ViT-H-14"], get_tokenizer=lambda arch: "tokenizer"
    )
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    with caplog.at_level(logging.WARNING):
        model, tok = hps.build_open_clip("ViT-H-14", None, "HPS_v2.1_compressed.pt")
    assert (model, tok) == ("model", "tokenizer")
    msgs = [r.getMessage() for r in caplog.records]
    assert "another library warning" in msgs and not any("initialized randomly" in m for m in msgs)
    logging.warning("No pretrained weights loaded for model 'x'. Model initialized randomly.")  # filter is gone
    assert any("initialized randomly" in r.getMessage() for r in caplog.records)


def test_load_reward_model_node_offers_the_registry_and_scores_with_imagereward(tmp_path, tiny_ir, monkeypatch):
    host = comfy_stubs.Host(str(tmp_path / "models"))
    try:
        pack = host.load_pack(str(ROOT))
        folder = Path(host.models_dir) / "reward_models" / "ImageReward"
        shutil.copytree(tiny_ir, folder)
        pack_rewards = sys.modules[f"{pack.__name__}.reneg.rewards"]
        _add_module(pack_rewards, tmp_path, monkeypatch)  # a new reward shows without touching the node
        load = pack.NODE_CLASS_MAPPINGS["ReNegLoadRewardModel"]()
        spec = load.INPUT_TYPES()
        assert spec["required"]["reward_type"][0] == [
            "aesthetic",
            "brightness",
            "hpsv2",
            "hpsv2.1",
            "imagereward",
            "pickscore",
        ]
        assert spec["required"]["reward_type"][1]["default"] == "hpsv2.1"
        assert list(spec["required"]) == ["reward_type", "model", "clip_model", "precision"]  # saved graphs' order
        assert list(spec["optional"]) == ["tokenizer_model"]
        assert "ImageReward/ImageReward.pt" in spec["required"]["model"][0]
        assert "ImageReward/tokenizer/" in spec["optional"]["tokenizer_model"][0]
        assert "imagereward" in load.DESCRIPTION
        with torch.inference_mode():
            beside = load.load("imagereward", "ImageReward/ImageReward.pt", "none", "float32")[0]
            given = load.load(
                "imagereward", "ImageReward/ImageReward.pt", "none", "float32", tokenizer_model="ImageReward/tokenizer/"
            )[0]
        assert beside.kind == "imagereward" and given.name == "imagereward:ImageReward.pt"
        images = torch.rand(2, 40, 48, 3, generator=torch.Generator().manual_seed(5))
        score = pack.NODE_CLASS_MAPPINGS["ReNegRewardScore"]()
        with torch.inference_mode():
            out = score.score(images, PROMPTS[0], given, False)
        scores = out["result"][0]
        with torch.no_grad():
            direct = given.module(images.movedim(-1, 1) * 2 - 1, [PROMPTS[0]] * 2)
        torch.testing.assert_close(torch.tensor(scores), direct.float(), rtol=1e-5, atol=1e-6)
        # a non-square image (SDXL-like 4:3-ish, resized and cropped) is seen as the package's
        # Resize(224, BICUBIC) + CenterCrop(224) + Normalize sees it
        from test_rewards_preprocess import torchvision_reference

        for h, w in [(351, 280), (280, 354)]:
            tall = torch.rand(1, h, w, 3, generator=torch.Generator().manual_seed(h))
            with torch.inference_mode():
                got = score.score(tall, PROMPTS[0], given, False)["result"][0]
                ids, mask = given.module.tokens([PROMPTS[0]], "cpu")
                want = given.module.model(ids, mask, torchvision_reference(tall.movedim(-1, 1), 224))
            torch.testing.assert_close(torch.tensor(got), want.float(), rtol=0, atol=1e-5)
        with pytest.raises(RuntimeError, match="aesthetic needs clip_model"):
            with torch.inference_mode():
                load.load("aesthetic", "ImageReward/ImageReward.pt", "none", "float32")
    finally:
        host.close()


@pytest.mark.slow
def test_tune_and_eval_run_with_imagereward(tmp_path, tiny_pipeline_dir, tiny_ir, capsys):
    spec = f"imagereward={tiny_ir / 'ImageReward.pt'}"
    common = [
        "--model",
        tiny_pipeline_dir,
        "--reward",
        spec,
        "--sampling-steps",
        "3",
        "--resolution",
        "16",
        "--device",
        "cpu",
    ]
    out = tmp_path / "tuned.safetensors"
    rc = main(
        [
            "tune",
            *common,
            "--prompt",
            "a red cat",
            "--seed",
            "3",
            "--max-steps",
            "2",
            "--patience",
            "2",
            "--lr",
            "0.05",
            "--grad-range",
            "0",
            "1",
            "--out",
            str(out),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    rep = json.loads((tmp_path / "tuned.json").read_text())
    assert rep["best_reward"] >= rep["start_reward"] and out.is_file()
    try:
        import reneg.evaluation.cli  # noqa: F401
    except ImportError:
        pytest.skip("reneg.evaluation is not present")
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red cat\nthe blue sky\n")
    ev = tmp_path / "eval"
    assert (
        main(
            [
                "eval",
                *common,
                "--prompts",
                str(prompts),
                "--limit",
                "2",
                "--negative",
                "null",
                "--batch",
                "2",
                "--out",
                str(ev),
                "--no-progress",
            ]
        )
        == 0
    ), capsys.readouterr().err
    summary = json.loads((ev / "summary.json").read_text())
    assert [r["name"] for r in summary["rewards"]] == ["imagereward"]
    assert os.path.isfile(ev / "scores.csv")

"""Offline: with the network unreachable, no code path tries to reach it when
local files are given.

The ``no_network`` fixture replaces every way Python opens a connection or resolves a
name (``socket.socket.connect``/``connect_ex``/``sendto``, ``socket.create_connection``,
``getaddrinfo``, ``gethostbyname``) with a function that records the attempt and
raises. Libraries that swallow connection errors (and fall back to a cache) are still
caught: the test fails on any recorded attempt. ``HF_HUB_OFFLINE`` and friends stay
unset, so the product's own local-only loading is what is tested.
"""

from __future__ import annotations

import json
import os
import socket
import traceback

import pytest
import torch

ATTEMPTS: list[str] = []


@pytest.fixture
def no_network(monkeypatch):
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "DIFFUSERS_OFFLINE"):
        monkeypatch.delenv(var, raising=False)
    attempts: list[str] = []

    def blocked(name):
        def f(*args, **kwargs):
            where = "".join(traceback.format_stack(limit=8)[:-1])
            attempts.append(f"{name}{args[1:] if name.startswith('socket.') else args}\n{where}")
            raise OSError(101, f"network disabled by the test ({name})")

        return f

    monkeypatch.setattr(socket.socket, "connect", blocked("socket.connect"))
    monkeypatch.setattr(socket.socket, "connect_ex", blocked("socket.connect_ex"))
    monkeypatch.setattr(socket.socket, "sendto", blocked("socket.sendto"))
    monkeypatch.setattr(socket, "create_connection", blocked("create_connection"))
    monkeypatch.setattr(socket, "getaddrinfo", blocked("getaddrinfo"))
    monkeypatch.setattr(socket, "gethostbyname", blocked("gethostbyname"))
    yield attempts
    ATTEMPTS.extend(attempts)
    assert not attempts, "tried to reach the network:\n" + "\n".join(attempts[:3])


def test_the_fixture_blocks_and_records(no_network):
    with pytest.raises(OSError, match="network disabled"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    with pytest.raises(OSError, match="network disabled"):
        socket.getaddrinfo("huggingface.co", 443)
    assert len(no_network) == 2
    import urllib.request

    with pytest.raises(OSError):  # urllib wraps it in URLError, an OSError
        urllib.request.urlopen("https://huggingface.co/api/models", timeout=1)
    assert len(no_network) > 2
    no_network.clear()  # these were the test's own


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A tiny Hugging Face CLIPModel folder with the real CLIP tokenizer (for PickScore
    and the aesthetic predictor's CLIP), and an aesthetic MLP of its projection size."""
    from transformers import CLIPConfig, CLIPModel

    from reneg.rewards.aesthetic import AestheticMLP
    from reneg.tiny import write_clip_tokenizer

    d = tmp_path_factory.mktemp("hf")
    clip = d / "clip"
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
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(str(clip))
    write_clip_tokenizer(str(clip))
    mlp = d / "aesthetic.pth"
    torch.save(AestheticMLP(16).state_dict(), mlp)
    return str(clip), str(mlp)


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    p = tmp_path_factory.mktemp("offline") / "prompts.txt"
    p.write_text("a red circle\na blue square\na green star\na yellow triangle\n")
    return str(p)


def test_reward_loaders_stay_local(no_network, tiny_hps_ckpt, hf_clip):
    from reneg.rewards import load_rewards

    clip, mlp = hf_clip
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    for spec in (
        f"hpsv2={tiny_hps_ckpt}",
        f"hpsv2.1={tiny_hps_ckpt}",
        f"pickscore={clip}",
        f"aesthetic={mlp},clip={clip}",
    ):
        r = load_rewards([spec])
        s = r(images, ["a red circle", "a blue square"])
        assert s.shape == (2,) and torch.isfinite(s).all(), spec
    both = load_rewards([f"pickscore={clip}", f"aesthetic={mlp},clip={clip},weight=0.5"])
    assert torch.isfinite(both(images, ["a", "b"])).all()


def test_embedding_files_stay_local(no_network, tmp_path, capsys):
    from reneg.cli import main
    from reneg.embedding import NegEmbedding, load_embedding, save_embedding

    p = tmp_path / "e.safetensors"
    save_embedding(str(p), NegEmbedding(torch.randn(1, 77, 768), "sd1"))
    assert load_embedding(p).family == "sd1"
    official = os.path.join(
        os.path.dirname(__file__), "..", "..", "shared", "data", "reneg-official", "sd1.5_reneg_emb.bin"
    )
    src = official if os.path.isfile(official) else str(p)
    assert main(["inspect", src]) == 0
    assert main(["convert", src, str(tmp_path / "c.safetensors")]) == 0
    assert load_embedding(tmp_path / "c.safetensors").family == "sd1"
    capsys.readouterr()


def test_train_and_tune_stay_local(no_network, tiny_pipeline_dir, tiny_hps_ckpt, hf_clip, prompts, tmp_path):
    from reneg.cli import main

    clip, mlp = hf_clip
    out = str(tmp_path / "run")
    common = [
        "--model",
        tiny_pipeline_dir,
        "--sampling-steps",
        "3",
        "--grad-range",
        "0",
        "1",
        "--resolution",
        "16",
        "--device",
        "cpu",
    ]
    assert (
        main(
            [
                "train",
                *common,
                "--reward",
                f"hpsv2={tiny_hps_ckpt}",
                "--reward",
                f"pickscore={clip},weight=0.1",
                "--prompts",
                prompts,
                "--heldout-count",
                "1",
                "--out",
                out,
                "--steps",
                "2",
                "--batch-size",
                "1",
                "--checkpoint-every",
                "1",
                "--eval-every",
                "0",
                "--eval-batch",
                "1",
                "--no-progress",
            ]
        )
        == 0
    )
    assert (
        main(
            [
                "train",
                *common,
                "--reward",
                f"hpsv2={tiny_hps_ckpt}",
                "--reward",
                f"pickscore={clip},weight=0.1",
                "--prompts",
                prompts,
                "--heldout-count",
                "1",
                "--out",
                out,
                "--steps",
                "3",
                "--batch-size",
                "1",
                "--checkpoint-every",
                "1",
                "--eval-every",
                "0",
                "--eval-batch",
                "1",
                "--no-progress",
                "--resume",
            ]
        )
        == 0
    )
    with open(os.path.join(out, "summary.json"), encoding="utf-8") as f:
        assert json.load(f)["steps"] == 3
    tuned = str(tmp_path / "tuned.safetensors")
    assert (
        main(
            [
                "tune",
                *common,
                "--reward",
                f"aesthetic={mlp},clip={clip}",
                "--prompt",
                "a red circle",
                "--embedding",
                os.path.join(out, "embedding.safetensors"),
                "--max-steps",
                "2",
                "--patience",
                "1",
                "--out",
                tuned,
            ]
        )
        == 0
    )
    assert os.path.isfile(tuned)


def test_eval_stays_local(no_network, tiny_pipeline_dir, tiny_hps_ckpt, prompts, tmp_path):
    try:
        import reneg.evaluation.cli  # noqa: F401
    except ImportError:
        pytest.skip("reneg.evaluation is not present")
    from reneg.cli import main

    out = str(tmp_path / "eval")
    assert (
        main(
            [
                "eval",
                "--model",
                tiny_pipeline_dir,
                "--reward",
                f"hpsv2={tiny_hps_ckpt}",
                "--prompts",
                prompts,
                "--limit",
                "2",
                "--negative",
                "null",
                "--negative",
                "handcrafted",
                "--sampling-steps",
                "3",
                "--resolution",
                "16",
                "--batch",
                "2",
                "--out",
                out,
                "--device",
                "cpu",
                "--no-progress",
            ]
        )
        == 0
    )
    assert os.path.isfile(os.path.join(out, "summary.json"))

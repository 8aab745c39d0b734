"""Hosts: no exception escapes a ComfyUI node or the A1111 callback in a way
that stops the host, and a missing optional dependency is a message in the UI, not a
failed import of the whole pack.

The ComfyUI pack and the A1111 script are loaded as their own tests load them (stubs of
``comfy.*``/``folder_paths`` and of ``modules.*``/gradio, tests/comfy_stubs.py and
tests/a1111_stubs.py). Here they get the files from strangers the fuzz tests use:
truncated, bit-flipped and header-mangled embeddings and reward checkpoints, pickles
that would run code, NaN values, the wrong model family. ComfyUI's executor catches
``Exception`` from a node and shows its message (``InterruptProcessingException`` and
out-of-memory pass through on purpose); A1111 swallows errors in callbacks, so its hook
is called directly here, where nothing would catch them.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import test_reliability_fuzz as fz  # noqa: E402  (mutations and malicious pickles)

from reneg.embedding import NegEmbedding, make_metadata, save_embedding  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
SCRIPT = ROOT / "a1111_extension" / "scripts" / "reneg_negative.py"
HAS_COMFY = (
    (ROOT / "__init__.py").is_file()
    and (ROOT / "nodes" / "__init__.py").is_file()
    and (TESTS / "comfy_stubs.py").is_file()
)
HAS_A1111 = SCRIPT.is_file() and (TESTS / "a1111_stubs.py").is_file()
FIGURES: dict[str, int] = {}


def embedding_corpus(folder: Path, family: str, hidden: int, marker: str, n_mutants: int = 10) -> dict[str, str]:
    """``name -> kind`` for files written into ``folder``: good, mutated, malicious, odd."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(fz.SEED + hidden)
    t = torch.randn(1, 77, hidden, generator=torch.Generator().manual_seed(1)) * 0.1
    kinds = {}
    save_embedding(str(folder / "good.safetensors"), NegEmbedding(t, family, metadata=make_metadata(family, "global")))
    kinds["good.safetensors"] = "good"
    torch.save(t, folder / "good_bare.bin")
    kinds["good_bare.bin"] = "good"
    raws = {".safetensors": (folder / "good.safetensors").read_bytes(), ".bin": (folder / "good_bare.bin").read_bytes()}
    for suffix, raw in raws.items():
        for i in range(n_mutants):
            kind, data = fz.mutate(raw, rng)
            name = f"mutant-{kind}-{i}{suffix}"
            (folder / name).write_bytes(data)
            kinds[name] = "mutant"
    for name, _path in fz.malicious_files(str(folder), marker).items():
        kinds[name] = "malicious"
    other = {"sd1": 768, "sd2": 1024, "tiny": 64}
    wrong = next(f for f in other if f != family)
    save_embedding(str(folder / "wrong_family.safetensors"), NegEmbedding(torch.zeros(1, 77, other[wrong]), wrong))
    kinds["wrong_family.safetensors"] = "wrong"
    nan = t.clone()
    nan[0, 3, 5] = float("nan")
    torch.save(nan, folder / "nan_values.bin")
    kinds["nan_values.bin"] = "bad"
    (folder / "empty.safetensors").write_bytes(b"")
    kinds["empty.safetensors"] = "bad"
    torch.save({"neg_embedding": t[:, :40]}, folder / "short_rows.pt")
    kinds["short_rows.pt"] = "bad"
    return kinds


# ============================================================================ ComfyUI


@pytest.fixture
def comfy_host(tmp_path):
    if not HAS_COMFY:
        pytest.skip("the ComfyUI pack (repo-root __init__.py, nodes/) is not present")
    import comfy_stubs

    h = comfy_stubs.Host(str(tmp_path / "models"))
    try:
        h.pack = h.load_pack(str(ROOT))
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def comfy_models(tiny_pipeline_dir):
    if not HAS_COMFY:
        pytest.skip("the ComfyUI pack is not present")
    import comfy_stubs

    return comfy_stubs.tiny_comfy_models(tiny_pipeline_dir)


def executor(fn, *args, **kwargs):
    """What ComfyUI's execution.py does around a node: inference mode, catch Exception."""
    try:
        with torch.inference_mode():
            out = fn(*args, **kwargs)
        return "ok", out
    except Exception as e:  # noqa: BLE001 - this is the host's behaviour being modelled
        if type(e).__name__ == "InterruptProcessingException":
            return "interrupted", e
        return "error", e
    # anything else (SystemExit, KeyboardInterrupt, a BaseException) escapes and fails the test


def test_comfy_nodes_survive_untrusted_embedding_files(comfy_host, comfy_models, tmp_path):
    marker = str(tmp_path / "PWNED")
    folder = Path(comfy_host.models_dir) / "reneg"
    kinds = embedding_corpus(folder, "tiny", 64, marker)
    node = comfy_host.pack.NODE_CLASS_MAPPINGS["ReNegLoadEmbedding"]()
    listed = node.INPUT_TYPES()["required"]["embedding"][0]
    _, _, clip = comfy_models
    outcomes = {"ok": 0, "error": 0}
    for name, kind in kinds.items():
        assert name in listed, name
        status, out = executor(node.load, name, clip, 1.0)
        assert status in ("ok", "error"), (name, status)
        outcomes[status] += 1
        assert not os.path.exists(marker), f"{name}: the payload ran"
        if status == "error":
            msg = str(out)
            assert msg.startswith("Load ReNeg Embedding: ") and name in msg, (name, msg)
            assert kind != "good", (name, msg)
        else:
            assert kind in ("good", "mutant"), (name, kind)  # a harmless bit flip may still load
            cond = out["result"][0] if isinstance(out, dict) else out[0]
            assert torch.isfinite(cond[0][0]).all() and cond[0][0].shape[-1] == 64
    assert outcomes["ok"] >= 2 and outcomes["error"] >= len([k for k in kinds.values() if k != "mutant"]) - 2
    FIGURES["ComfyUI Load Embedding files"] = len(kinds)


def test_comfy_reward_node_survives_untrusted_checkpoints(comfy_host, tiny_hps_ckpt, tmp_path):
    marker = str(tmp_path / "PWNED")
    root = Path(comfy_host.models_dir) / "reward_models"
    rng = random.Random(fz.SEED + 7)
    raw = open(tiny_hps_ckpt, "rb").read()
    cfg = os.path.join(os.path.dirname(tiny_hps_ckpt), "open_clip_config.json")
    entries = {}
    for i in range(5):
        d = root / f"hps-{i}"
        d.mkdir(parents=True)
        shutil.copy(cfg, d / "open_clip_config.json")
        kind, data = fz.mutate(raw, rng)
        (d / "hps.pt").write_bytes(data)
        entries[f"hps-{i}/hps.pt"] = kind
    evil = root / "evil"
    evil.mkdir()
    shutil.copy(cfg, evil / "open_clip_config.json")
    for name, _path in fz.malicious_files(str(evil), marker).items():
        if name.endswith(".safetensors"):
            continue  # not a reward checkpoint suffix ComfyUI lists for this folder
        entries[f"evil/{name}"] = "malicious"
    node = comfy_host.pack.NODE_CLASS_MAPPINGS["ReNegLoadRewardModel"]()
    listed = node.INPUT_TYPES()["required"]["model"][0]
    for entry, kind in entries.items():
        assert entry in listed, entry
        status, out = executor(node.load, "hpsv2", entry, "none", "float32")
        assert status in ("ok", "error"), entry
        assert not os.path.exists(marker), entry
        if status == "error":
            assert str(out).startswith("Load Reward Model: ") and len(str(out)) > 25, str(out)
        else:
            assert kind != "malicious"
    FIGURES["ComfyUI Load Reward Model files"] = len(entries)


def test_comfy_score_node_survives_bad_images(comfy_host, tiny_hps_ckpt):
    folder = Path(comfy_host.models_dir) / "reward_models" / "tiny-hps"
    folder.mkdir(parents=True)
    for f in os.listdir(os.path.dirname(tiny_hps_ckpt)):
        shutil.copy(os.path.join(os.path.dirname(tiny_hps_ckpt), f), folder / f)
    status, out = executor(
        comfy_host.pack.NODE_CLASS_MAPPINGS["ReNegLoadRewardModel"]().load,
        "hpsv2",
        "tiny-hps/hps_tiny.pt",
        "none",
        "float32",
    )
    assert status == "ok", out
    reward = out[0]
    score = comfy_host.pack.NODE_CLASS_MAPPINGS["ReNegRewardScore"]().score
    for images, prompt in [
        (torch.rand(2, 16, 16), "a cat"),
        (torch.rand(1, 16, 16, 7), "a cat"),
        ("not an image", "a cat"),
        (torch.rand(1, 16, 16, 3), ""),
        (torch.rand(0, 16, 16, 3), "a cat"),
    ]:
        status, out = executor(score, images, prompt, reward)
        assert status == "error" and str(out).startswith("Reward Score: "), (status, out)
    status, out = executor(score, torch.rand(2, 16, 16, 3), "a cat", "not a reward")
    assert status == "error"


MISSING_DEPS_DRIVER = r"""
import json, os, sys
BLOCKED = {"open_clip", "transformers", "diffusers", "accelerate", "tokenizers", "huggingface_hub"}

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Blocker())
root, tests, models, hps = sys.argv[1:5]
sys.path.insert(0, tests)
import torch
import comfy_stubs
host = comfy_stubs.Host(models)
pack = host.load_pack(root)
res = {"nodes": sorted(pack.NODE_CLASS_MAPPINGS), "inputs": {}}
for name, cls in pack.NODE_CLASS_MAPPINGS.items():
    res["inputs"][name] = sorted(cls.INPUT_TYPES())

class FakeClip:  # a text encoder as ComfyUI hands it to the node: [1, 77, 64] + pooled
    def tokenize(self, text):
        return {"l": [[0] * 77]}
    def encode_from_tokens(self, tokens, return_pooled=False):
        return torch.zeros(1, 77, 64), torch.zeros(1, 64)

with torch.inference_mode():
    out = pack.NODE_CLASS_MAPPINGS["ReNegLoadEmbedding"]().load("e.safetensors", FakeClip(), 1.0)
res["embedding_rows"] = list(out[0][0][0].shape)
try:
    with torch.inference_mode():
        pack.NODE_CLASS_MAPPINGS["ReNegLoadRewardModel"]().load("hpsv2", "tiny/hps_tiny.pt", "none", "float32")
    res["reward"] = "loaded"
except Exception as e:
    res["reward"] = f"{type(e).__name__}: {e}"
res["heavy"] = sorted(m for m in BLOCKED if m in sys.modules)
print(json.dumps(res))
"""


def test_comfy_pack_loads_without_optional_dependencies(tmp_path, tiny_hps_ckpt):
    """open_clip, transformers, diffusers, accelerate missing: the pack still loads, the nodes
    that need only torch work, and the reward node says what is missing."""
    if not HAS_COMFY:
        pytest.skip("the ComfyUI pack is not present")
    models = tmp_path / "models"
    save_embedding(str(models / "reneg" / "e.safetensors"), NegEmbedding(torch.randn(1, 77, 64), "tiny"))
    shutil.copytree(os.path.dirname(tiny_hps_ckpt), models / "reward_models" / "tiny")
    r = subprocess.run(
        [sys.executable, "-c", MISSING_DEPS_DRIVER, str(ROOT), str(TESTS), str(models), tiny_hps_ckpt],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(res["nodes"]) >= 5 and "ReNegLoadEmbedding" in res["nodes"], res
    assert res["embedding_rows"] == [1, 77, 64]
    assert res["reward"].startswith("ReNegNodeError: Load Reward Model: ") and "open_clip" in res["reward"], res
    assert res["heavy"] == []


# ============================================================================ A1111


@pytest.fixture
def a1111(tmp_path, monkeypatch):
    if not HAS_A1111:
        pytest.skip("the A1111 extension is not present")
    import a1111_stubs as stubs

    models = tmp_path / "models"
    (models / "reneg").mkdir(parents=True)
    ns, saved = stubs.install(str(models))
    try:
        module = stubs.load_script(str(SCRIPT))
        monkeypatch.setattr(module, "CORE_ROOT", None)  # list only this test's files
        yield types.SimpleNamespace(ns=ns, module=module, stubs=stubs, models=models, script=module.ReNegScript())
    finally:
        stubs.uninstall(saved)


def sd1_model():
    return types.SimpleNamespace(
        is_sd1=True, is_sd2=False, is_sdxl=False, cond_stage_model_empty_prompt=torch.zeros(1, 77, 768)
    )


def test_a1111_hook_survives_untrusted_files(a1111, tmp_path):
    marker = str(tmp_path / "PWNED")
    kinds = embedding_corpus(a1111.models / "reneg", "sd1", 768, marker, n_mutants=12)
    stubs, module = a1111.stubs, a1111.module
    applied = 0
    for name, kind in kinds.items():
        p = stubs.FakeP(sd_model=sd1_model())
        a1111.script.process(p, True, name, 1.0, False)  # A1111 would only log an error here
        uncond = torch.randn(2, 154, 768)
        for text_uncond in (
            uncond,
            None,
            "not a tensor",
            stubs.DictWithShape({"crossattn": torch.randn(2, 77, 768), "vector": torch.randn(2, 16)}),
        ):
            params = stubs.CFGDenoiserParams(
                torch.zeros(2, 4, 8, 8),
                None,
                torch.ones(2),
                0,
                20,
                torch.randn(2, 154, 768),
                text_uncond,
                types.SimpleNamespace(p=p),
            )
            module.on_cfg_denoiser(params)  # called directly: nothing would catch an escape
            if text_uncond is uncond and params.text_uncond is not uncond:
                applied += 1
                assert kind in ("good", "mutant"), name
                assert params.text_uncond.shape == uncond.shape and torch.isfinite(params.text_uncond).all()
        # and through the host's own runner, which records what it swallowed
        params = stubs.CFGDenoiserParams(
            torch.zeros(1), None, torch.ones(1), 0, 20, uncond, uncond, types.SimpleNamespace(p=p)
        )
        a1111.ns.script_callbacks.cfg_denoiser_callback(params)
        assert a1111.ns.script_callbacks.errors == [], (name, a1111.ns.script_callbacks.errors)
        a1111.script.postprocess(p, None)
        assert not os.path.exists(marker), name
        if kind in ("malicious", "wrong", "bad"):
            assert any("not applied" in c for c in p.comments), (name, p.comments)
    assert applied >= 2
    # the dropdown (built from the same files) lists them without raising
    choices, status = module.choices_and_status(refresh=True)
    assert "good.safetensors" in choices
    FIGURES["A1111 files"] = len(kinds)


def test_zz_report_hosts_figures():
    print(f"\nhost files tried: {FIGURES}")
    assert all(v > 0 for v in FIGURES.values())

"""A negative predictor in the AUTOMATIC1111 / Forge extension (reneg/hosts/predicted.py through
reneg/hosts/a1111.py): picked like an embedding, it gives each prompt its own negative in the
``on_cfg_denoiser`` hook. The core is driven with small stand-ins for the web UI's objects; the script
file itself, under the web UI stubs, in the last tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from reneg.embedding import NegEmbedding, save_embedding
from reneg.hosts import a1111 as core
from reneg.predictor import from_embedding, save_predictor

sys.path.insert(0, os.path.dirname(__file__))
import a1111_stubs as stubs  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "a1111_extension" / "scripts" / "reneg_negative.py"
WIDTH = {"sd1": 768, "sdxl": 2048}


def sd_model(family):
    return types.SimpleNamespace(
        is_sd1=family == "sd1",
        is_sd2=False,
        is_sdxl=family == "sdxl",
        cond_stage_model_empty_prompt=torch.zeros(1, 77, WIDTH[family]),
    )


class Params:
    def __init__(self, p, cond, uncond):
        self.text_cond, self.text_uncond = cond, uncond
        self.denoiser = types.SimpleNamespace(p=p)


def write_files(folder: Path, family: str, random_readout: bool, seed=0):
    """``<family>_global.safetensors`` and ``<family>_pred.safetensors`` (a predictor around that global
    negative: zero read-out, so it predicts the global negative, or a random one with a feature mean: the
    file's centring travels through the hook)."""
    g = torch.Generator().manual_seed(seed)
    d = WIDTH[family]
    pooled = torch.randn(1, 1280, generator=g) if family == "sdxl" else None
    emb = NegEmbedding(torch.randn(1, 77, d, generator=g), family, pooled)
    save_embedding(str(folder / f"{family}_global.safetensors"), emb)
    model = from_embedding(emb, "lowrank", rank=3, seed=seed)
    if random_readout:
        with torch.no_grad():
            model.up.normal_(0.0, 1.0, generator=g)
            if model.up_pooled is not None:
                model.up_pooled.normal_(0.0, 1.0, generator=g)
        model.set_feature_mean(0.5 * torch.randn(model.feature_mean.shape, generator=g))
    save_predictor(str(folder / f"{family}_pred.safetensors"), model)
    return emb, model


@pytest.fixture
def folder(tmp_path):
    f = tmp_path / "reneg"
    f.mkdir()
    return f


def step(host, p, cond, uncond):
    params = Params(p, cond, uncond)
    host.on_cfg_denoiser(params)
    return params.text_uncond


def test_zero_initialised_predictor_gives_exactly_the_global_negative(folder):
    write_files(folder, "sd1", random_readout=False)
    host = core.Host(lambda: [str(folder)])
    names, _ = host.choices_and_status()
    assert {"sd1_global.safetensors", "sd1_pred.safetensors"} <= set(names)  # listed like an embedding
    g = torch.Generator().manual_seed(1)
    cond, uncond = torch.randn(2, 77, 768, generator=g), torch.randn(2, 77, 768, generator=g)
    for strength in (1.0, 0.4):
        outs = []
        for name in ("sd1_global.safetensors", "sd1_pred.safetensors"):
            p = types.SimpleNamespace(extra_generation_params={}, sd_model=sd_model("sd1"), comment=print)
            assert host.process(p, True, name, strength, True) is not None
            outs.append(step(host, p, cond, uncond))
        assert torch.equal(outs[0], outs[1]), strength
    assert p.extra_generation_params["ReNeg"] == "sd1_pred.safetensors"


def test_trained_predictor_gives_each_prompt_its_own_negative_sdxl(folder):
    _, model = write_files(folder, "sdxl", random_readout=True)
    host = core.Host(lambda: [str(folder)])
    p = types.SimpleNamespace(extra_generation_params={}, sd_model=sd_model("sdxl"), comment=print)
    assert host.process(p, True, "sdxl_pred", 1.0, True) is not None
    g = torch.Generator().manual_seed(2)
    rows, vector = torch.randn(2, 77, 2048, generator=g), torch.randn(2, 2816, generator=g)
    cond = {"crossattn": rows, "vector": vector}
    uncond = {"crossattn": torch.zeros(2, 77, 2048), "vector": torch.zeros(2, 2816)}
    out = step(host, p, cond, uncond)
    with torch.no_grad():
        want_rows, want_pooled = model(rows, vector[:, :1280])
    torch.testing.assert_close(out["crossattn"], want_rows)
    torch.testing.assert_close(out["vector"][:, :1280], want_pooled)
    assert torch.equal(out["vector"][:, 1280:], uncond["vector"][:, 1280:])  # the size part stays
    assert (out["crossattn"][0] - out["crossattn"][1]).abs().max() > 1e-3  # two prompts, two negatives
    assert (out["vector"][0, :1280] - out["vector"][1, :1280]).abs().max() > 1e-3
    # one prompt for a batch of two images: both get its negative; AND prompts (3 rows for 2 images): the mean
    one = step(host, p, {"crossattn": rows[:1], "vector": vector[:1]}, uncond)
    torch.testing.assert_close(one["crossattn"], want_rows[:1].expand(2, -1, -1))
    three = step(host, p, {"crossattn": torch.cat([rows, rows[:1]]), "vector": torch.cat([vector, vector[:1]])}, uncond)
    assert three["crossattn"].shape == (2, 77, 2048)


def test_another_familys_predictor_is_refused_naming_both(folder):
    write_files(folder, "sd1", random_readout=True)
    host = core.Host(lambda: [str(folder)])
    comments = []
    p = types.SimpleNamespace(extra_generation_params={}, sd_model=sd_model("sdxl"), comment=comments.append)
    assert host.process(p, True, "sd1_pred.safetensors", 1.0, True) is None
    assert any("sd1_pred.safetensors" in c and "Stable Diffusion 1" in c and "XL" in c for c in comments), comments
    names, _ = core.Host(lambda: [str(folder)], lambda: sd_model("sdxl")).choices_and_status()
    assert "sd1_pred.safetensors" not in names  # hidden for an SDXL model, as an SD1 embedding is
    # a positive conditioning that is not the predictor's: the step keeps the host's negative and says why
    p = types.SimpleNamespace(extra_generation_params={}, sd_model=sd_model("sd1"), comment=comments.append)
    assert host.process(p, True, "sd1_pred.safetensors", 1.0, True) is not None
    uncond = torch.randn(1, 77, 768)
    assert step(host, p, torch.randn(1, 77, 1024), uncond) is uncond
    assert any("predictor reads positive conditioning" in c for c in comments), comments


def test_through_the_script_and_import_light(tmp_path):
    folder = tmp_path / "models" / "reneg"
    folder.mkdir(parents=True)
    _, model = write_files(folder, "sd1", random_readout=True)
    ns, saved = stubs.install(str(tmp_path / "models"))
    try:
        module = stubs.load_script(str(SCRIPT))
        p = stubs.FakeP(sd_model=sd_model("sd1"))
        module.ReNegScript().process(p, True, "sd1_pred.safetensors", 1.0, True)
        cond = torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(3))
        params = stubs.CFGDenoiserParams(
            torch.zeros(1), None, torch.ones(1), 0, 20, cond, torch.zeros(1, 77, 768), types.SimpleNamespace(p=p)
        )
        ns.script_callbacks.cfg_denoiser_callback(params)
        assert ns.script_callbacks.errors == []
        with torch.no_grad():
            torch.testing.assert_close(params.text_uncond, model(cond)[0])
    finally:
        stubs.uninstall(saved)
    # the core's predictor path imports torch and safetensors, nothing heavier
    code = f"""
import json, sys, torch
from reneg.hosts import a1111 as core
host = core.Host(lambda: [{str(folder)!r}])
p = type("P", (), {{"extra_generation_params": {{}}, "comment": print}})()
assert host.process(p, True, "sd1_pred.safetensors", 1.0, True) is not None
params = type("Q", (), {{}})()
params.text_cond, params.text_uncond = torch.randn(1, 77, 768), torch.zeros(1, 77, 768)
params.denoiser = type("D", (), {{"p": p}})()
host.on_cfg_denoiser(params)
print(json.dumps({{"changed": bool(params.text_uncond.abs().sum() > 0),
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in ("diffusers", "transformers", "open_clip"))}}))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"changed": True, "heavy": []}

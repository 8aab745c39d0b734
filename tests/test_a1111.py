"""The AUTOMATIC1111 / Forge / reForge extension, driven without a webui (stubs in a1111_stubs.py)."""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
import a1111_stubs as stubs  # noqa: E402

from reneg.embedding import NegEmbedding, save_embedding  # noqa: E402
from reneg.uncond import MARK_VALUE, match_tokens  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "a1111_extension"
SCRIPT = EXT / "scripts" / "reneg_negative.py"
OFFICIAL = ROOT.parent / "shared" / "data" / "reneg-official"


def tensor(d, seed):
    return torch.randn(1, 77, d, generator=torch.Generator().manual_seed(seed))


def xl_pooled():
    return torch.randn(1, 1280, generator=torch.Generator().manual_seed(5))


def sd_model(family):
    d = {"sd1": 768, "sd2": 1024, "sdxl": 2048, "refiner": 1280}[family]
    return types.SimpleNamespace(is_sd1=family == "sd1", is_sd2=family == "sd2",
                                 is_sdxl=family in ("sdxl", "refiner"),
                                 cond_stage_model_empty_prompt=torch.zeros(1, 77, d))


@pytest.fixture
def models(tmp_path):
    """models/reneg with our format, the bare torch.save form, an SD2 and an SDXL file, and a broken one."""
    folder = tmp_path / "models" / "reneg"
    (folder / "sub").mkdir(parents=True)
    save_embedding(str(folder / "sd1_ours.safetensors"), NegEmbedding(tensor(768, 1), "sd1"))
    torch.save(tensor(768, 2), folder / "sd1_bare.bin")
    save_embedding(str(folder / "sub" / "sd2.safetensors"), NegEmbedding(tensor(1024, 3), "sd2"))
    save_embedding(str(folder / "xl, v1.safetensors"),
                   NegEmbedding(tensor(2048, 4), "sdxl", pooled=xl_pooled()))
    (folder / "broken.safetensors").write_bytes(b"not a safetensors file")
    return tmp_path / "models"


class Host:
    def __init__(self, ns, module):
        self.ns, self.module = ns, module
        self.script = module.ReNegScript()

    def set_model(self, family):
        self.ns.sd_models.model_data.sd_model = sd_model(family) if family else None

    def p(self, family="sd1", **kw):
        return stubs.FakeP(sd_model=sd_model(family), **kw)

    def run(self, p, uncond, cond=None, denoiser=True):
        """One sampling step through the host's callback runner (which swallows exceptions)."""
        params = stubs.CFGDenoiserParams(torch.zeros(1), None, torch.ones(1), 0, 20,
                                         cond if cond is not None else uncond, uncond,
                                         types.SimpleNamespace(p=p) if denoiser else None)
        self.ns.script_callbacks.cfg_denoiser_callback(params)
        assert self.ns.script_callbacks.errors == []
        return params.text_uncond


def _load(models_path, **kw):
    ns, saved = stubs.install(str(models_path), **kw)
    try:
        return ns, saved, stubs.load_script(str(SCRIPT))
    except BaseException:
        stubs.uninstall(saved)
        raise


@pytest.fixture
def host(models, monkeypatch):
    ns, saved, module = _load(models)
    assert module.CORE_ROOT == str(ROOT)  # the repository's embeddings/ is searched too ...
    assert os.path.join(str(ROOT), "embeddings") in module.embedding_folders()
    monkeypatch.setattr(module, "CORE_ROOT", None)  # ... but the tests list only their own files
    yield Host(ns, module)
    stubs.uninstall(saved)


# --------------------------------------------------------------------------- loading and UI


def test_script_basics_and_single_hook(host):
    s = host.script
    assert s.title() == "ReNeg" and s.show(False) is host.ns.scripts.AlwaysVisible
    assert host.module.reneg is not None and host.module.CORE_ERROR is None
    hooks = host.ns.script_callbacks.callback_map["callbacks_cfg_denoiser"]
    assert len(hooks) == 1
    stubs.load_script(str(SCRIPT))  # "reload scripts" without clearing the callbacks
    assert len(hooks) == 1 and hooks[0].name == "reneg"


def test_hook_without_name_argument(models):
    ns, saved, module = _load(models, with_name_arg=False)
    try:
        assert len(ns.script_callbacks.callback_map["callbacks_cfg_denoiser"]) == 1
    finally:
        stubs.uninstall(saved)


def test_ui_components_order_and_family_filter(host):
    host.set_model("sd1")
    comps = host.script.ui(False)
    enabled, embedding, strength, hires = comps
    assert isinstance(enabled, stubs.Checkbox) and enabled.value is False
    assert isinstance(embedding, stubs.Dropdown) and isinstance(strength, stubs.Slider)
    assert isinstance(hires, stubs.Checkbox) and hires.value is True
    assert embedding.choices == ["None", "sd1_bare.bin", "sd1_ours.safetensors"]
    assert embedding.kwargs["allow_custom_value"] is True
    assert (strength.kwargs["minimum"], strength.kwargs["maximum"], strength.value) == (0.0, 1.0, 1.0)
    status = next(c for c in enabled.accordion.children if isinstance(c, stubs.HTML))
    assert "2 embedding(s)" in status.value and "2 for other model families hidden" in status.value
    assert "broken.safetensors" in status.value

    host.set_model("sdxl")
    assert host.script.ui(True)[1].choices == ["None", "xl, v1.safetensors"]
    host.set_model("sd2")
    assert host.script.ui(False)[1].choices == ["None", "sub/sd2.safetensors"]
    host.set_model(None)  # not loaded yet: every host family, with a note
    emb = host.script.ui(False)[1]
    assert emb.choices == ["None", "sd1_bare.bin", "sd1_ours.safetensors", "sub/sd2.safetensors",
                           "xl, v1.safetensors"]
    host.ns.sd_models.model_data.sd_model = types.SimpleNamespace(is_sd1=False, is_sd2=False, is_sdxl=False)
    emb = host.script.ui(False)[1]  # Flux on Forge
    assert emb.choices == ["None"]
    host.set_model("refiner")
    assert host.script.ui(False)[1].choices == ["None"]


def test_ui_without_input_accordion_and_refresh(models):
    ns, saved, module = _load(models, with_input_accordion=False)
    module.CORE_ROOT = None  # list only this test's files (a fresh module, dropped afterwards)
    try:
        ns.sd_models.model_data.sd_model = sd_model("sd1")
        script = module.ReNegScript()
        enabled, embedding, strength, hires = script.ui(False)
        assert isinstance(enabled, stubs.Checkbox) and enabled.label == "Enable ReNeg"
        assert embedding.value == "sd1_bare.bin"
        torch.save(tensor(768, 9), models / "reneg" / "new.pt")
        button = [b for b in stubs.Block.created if isinstance(b, stubs.Button) and b.events][-1]
        _, fn, inputs, outputs = button.events[0]
        assert inputs == [embedding] and outputs[0] is embedding and isinstance(outputs[1], stubs.HTML)
        update, html = fn("sd1_ours.safetensors")
        assert update["choices"] == ["None", "new.pt", "sd1_bare.bin", "sd1_ours.safetensors"]
        assert update["value"] == "sd1_ours.safetensors" and "3 embedding(s)" in html
        assert fn("gone.safetensors")[0]["value"] == "new.pt"
    finally:
        stubs.uninstall(saved)


# --------------------------------------------------------------------------- process and the hook


@pytest.mark.parametrize("b,n", [(1, 77), (4, 77), (1, 154), (4, 154)])
def test_replacement_batches_and_lengths(host, b, n):
    p = host.p()
    host.script.process(p, True, "sd1_ours.safetensors", 1.0, True)
    uncond = torch.randn(b, n, 768)
    before = uncond.clone()
    out = host.run(p, uncond)
    assert out is not uncond and torch.equal(uncond, before)
    assert torch.equal(out, match_tokens(tensor(768, 1), n).expand(b, -1, -1))
    assert p.extra_generation_params["ReNeg"] == "sd1_ours.safetensors"
    assert p.extra_generation_params["ReNeg strength"] == 1.0
    assert len(p.extra_generation_params["ReNeg hash"]) == 10


def test_negative_follows_long_positive(host):
    p = host.p()
    host.script.process(p, True, "sd1_bare", 1.0, True)
    out = host.run(p, torch.randn(2, 77, 768), cond=torch.randn(2, 154, 768))
    assert out.shape == (2, 154, 768)  # no padding with E("") left for the host to do
    host.script.process(p, True, "sd1_bare", 0.5, True)
    out = host.run(p, torch.randn(2, 77, 768), cond=torch.randn(2, 154, 768))
    assert out.shape == (2, 77, 768)  # a blend needs the host's negative at its own length


def test_strength_numerics(host):
    base = torch.randn(2, 154, 768)
    e = match_tokens(tensor(768, 2), 154)
    for s, want in ((0.0, base), (0.5, 0.5 * base + 0.5 * e), (1.0, e.expand(2, -1, -1))):
        p = host.p()
        host.script.process(p, True, "sd1_bare.bin", s, True)
        out = host.run(p, base.clone())
        assert torch.allclose(out, want, atol=1e-6), s
        assert p.extra_generation_params["ReNeg strength"] == s


def test_controlnet_marker_sdxl_none_fp16(host):
    p = host.p("sd1")
    host.script.process(p, True, "sd1_ours.safetensors", 1.0, True)
    content = torch.randn(2, 154, 768)
    marked = torch.cat([torch.full((2, 1, 768), -MARK_VALUE), content], dim=1)
    before = marked.clone()
    out = host.run(p, marked, cond=torch.cat([torch.full((2, 1, 768), MARK_VALUE), content], dim=1))
    assert torch.equal(marked, before)
    assert out.shape == (2, 155, 768) and torch.equal(out[:, 0], before[:, 0])
    assert torch.equal(out[:, 1:], match_tokens(tensor(768, 1), 154).expand(2, -1, -1))

    assert host.run(p, None) is None  # Forge at CFG 1

    half = torch.randn(3, 77, 768, dtype=torch.float16)
    out = host.run(p, half)
    assert out.dtype == torch.float16 and torch.equal(out, tensor(768, 1).half().expand(3, -1, -1))

    px = host.p("sdxl")
    host.script.process(px, True, "xl, v1", 1.0, True)
    vector = torch.randn(2, 2816)
    d = stubs.DictWithShape({"crossattn": torch.randn(2, 77, 2048), "vector": vector})
    cross_before = d["crossattn"].clone()
    vector_before = vector.clone()
    out = host.run(px, d)
    assert type(out) is stubs.DictWithShape and out is not d and out.shape == (2, 77, 2048)
    assert torch.equal(d["crossattn"], cross_before) and torch.equal(vector, vector_before)
    assert torch.equal(out["crossattn"], tensor(2048, 4).expand(2, -1, -1))
    # the file's pooled vector (what it was trained with) replaces the vector's pooled part; sizes stay
    pooled = xl_pooled()
    assert torch.equal(out["vector"][:, :1280], pooled.expand(2, -1)) and torch.equal(out["vector"][:, 1280:],
                                                                                       vector[:, 1280:])
    host.script.process(px, True, "xl, v1", 0.5, True)
    half = host.run(px, d)
    torch.testing.assert_close(half["vector"][:, :1280], 0.5 * (vector[:, :1280] + pooled))
    assert torch.equal(half["vector"][:, 1280:], vector[:, 1280:])


def test_wrong_dimension_is_skipped_with_one_warning(host, capsys):
    p = host.p("sdxl")  # the model says SDXL, but a refiner's 1280 arrives (A1111's refiner switch)
    host.script.process(p, True, "xl, v1.safetensors", 1.0, True)
    d = {"crossattn": torch.randn(1, 77, 1280), "vector": torch.randn(1, 2560)}
    for _ in range(3):
        assert host.run(p, d) is d
    warnings = [c for c in p.comments if "1280" in c]
    assert len(warnings) == 1
    assert capsys.readouterr().out.count("1280") == 1


def test_family_mismatch_at_process_is_not_applied(host):
    p = host.p("sdxl")
    host.script.process(p, True, "sd1_ours.safetensors", 1.0, True)
    assert "ReNeg" not in p.extra_generation_params
    assert any("Stable Diffusion 1.x embedding" in c for c in p.comments)
    u = torch.randn(1, 77, 2048)
    assert host.run(p, u) is u


def test_gating(host):
    u = torch.randn(1, 77, 768)
    p = host.p()
    host.script.process(p, False, "sd1_ours.safetensors", 1.0, True)  # disabled
    assert host.run(p, u) is u and p.extra_generation_params == {}
    host.script.process(p, True, "None", 1.0, True)
    assert host.run(p, u) is u
    host.script.process(p, True, "missing", 1.0, True)
    assert host.run(p, u) is u and any("missing" in c for c in p.comments)

    p = host.p(enable_hr=True)
    host.script.process(p, True, "sd1_ours.safetensors", 1.0, False)  # not on the hires pass
    assert p.extra_generation_params["ReNeg hires"] is False
    assert host.run(p, u) is not u
    p.is_hr_pass = True
    assert host.run(p, u) is u
    p.is_hr_pass = False
    assert host.run(p, u) is not u

    p = host.p(enable_hr=True)
    host.script.process(p, True, "sd1_ours.safetensors", 1.0, True)
    assert "ReNeg hires" not in p.extra_generation_params
    p.is_hr_pass = True
    assert host.run(p, u) is not u

    host.script.postprocess(p, None, True, "sd1_ours.safetensors", 1.0, True)
    assert host.run(p, u) is u  # over: later generations are left alone
    other = host.p()  # a generation the script did not process (another extension's own p)
    assert host.run(other, u) is u


def test_hosts_without_denoiser_in_params(host):
    """A1111 1.6/1.7 build CFGDenoiserParams without the denoiser: the last process() applies."""
    u = torch.randn(1, 77, 768)
    p = host.p(enable_hr=True)
    host.script.process(p, True, "sd1_ours.safetensors", 1.0, False)
    assert host.run(p, u, denoiser=False) is not u
    p.is_hr_pass = True
    assert host.run(p, u, denoiser=False) is u
    host.script.postprocess(p, None)
    p.is_hr_pass = False
    assert host.run(p, u, denoiser=False) is u


def test_errors_inside_the_hook_never_escape(host):
    p = host.p()
    host.script.process(p, True, "sd1_ours.safetensors", 1.0, True)
    params = stubs.CFGDenoiserParams(None, None, None, 0, 1, object(), "not a tensor",
                                     types.SimpleNamespace(p=p))
    host.module.on_cfg_denoiser(params)  # called directly: the host's own try/except is not there
    assert params.text_uncond == "not a tensor"
    getattr(p, host.module.P_ATTR).tensor = None  # break the state itself
    params = stubs.CFGDenoiserParams(None, None, None, 0, 1, None, torch.randn(1, 77, 768),
                                     types.SimpleNamespace(p=p))
    host.module.on_cfg_denoiser(params)
    assert any("error" in c for c in p.comments)


def test_api_args_order_and_coercion(host):
    assert host.module.ARG_NAMES == ("enabled", "embedding", "strength", "hires")
    assert host.module.parse_args([]) == (False, "None", 1.0, True)
    assert host.module.parse_args(["true", "x", "0.25", "false"]) == (True, "x", 0.25, False)
    assert host.module.parse_args([1, None, 7, 0]) == (True, "None", 1.0, False)
    assert host.module.parse_args([True, "x", "abc"]) == (True, "x", 1.0, True)
    p = host.p()
    host.script.process(p, True, "SD1_OURS", 0.5)  # a stem, any case; hires left out
    assert p.extra_generation_params["ReNeg"] == "sd1_ours.safetensors"
    assert p.extra_generation_params["ReNeg strength"] == 0.5


def test_embedding_cache_follows_the_file(host, models):
    path = models / "reneg" / "sd1_bare.bin"
    first = host.module.store.load(str(path))
    assert host.module.store.load(str(path)) is first
    torch.save(tensor(768, 7) * 2, path)
    os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 10**9))
    assert torch.equal(host.module.store.load(str(path)).tensor, tensor(768, 7) * 2)


# --------------------------------------------------------------------------- infotext


@pytest.mark.parametrize("name,s,hires", [("sd1_ours.safetensors", 0.5, True),
                                          ("xl, v1.safetensors", 1.0, False)])
def test_infotext_round_trip(host, name, s, hires):
    family = "sdxl" if name.startswith("xl") else "sd1"
    p = host.p(family, enable_hr=True)
    host.script.process(p, True, name, s, hires)
    line = "Steps: 20, Sampler: Euler a, CFG scale: 7, " + stubs.infotext_line(p.extra_generation_params)
    params = stubs.parse_infotext_line(line)
    assert params["ReNeg"] == name
    comps = host.script.ui(False)
    pasted = stubs.paste(host.script.infotext_fields, params)
    assert [pasted[c] for c in comps] == [True, name, s, hires]
    assert set(host.script.paste_field_names) <= {k for _, k in host.script.infotext_fields if isinstance(k, str)}

    p2 = host.p(family)
    host.script.process(p2, *[pasted[c] for c in comps])
    assert p2.extra_generation_params == {k: v for k, v in p.extra_generation_params.items() if k != "ReNeg hires"}

    without = stubs.paste(host.script.infotext_fields, stubs.parse_infotext_line("Steps: 20, Seed: 1, Size: 512x512"))
    assert [without[c] for c in comps] == [False, None, None, None]


# --------------------------------------------------------------------------- settings and X/Y/Z


def test_settings_folder(host, tmp_path):
    host.ns.script_callbacks.ui_settings_callback()
    info = host.ns.shared.opts.data_labels["reneg_dir"]
    assert info.default == "" and info.section[0] == "reneg"
    extra = tmp_path / "elsewhere"
    extra.mkdir()
    torch.save(tensor(768, 5), extra / "mine.pt")
    host.ns.shared.opts.reneg_dir = str(extra)
    host.set_model("sd1")
    assert "mine.pt" in host.script.ui(False)[1].choices
    assert host.module.embedding_folders()[1] == str(extra)


def test_xyz_axes(host):
    xyz = stubs.make_xyz_module()
    host.ns.scripts.scripts_data.append(stubs.ScriptClassData(xyz.Script, "xyz_grid.py", "/", xyz))
    host.ns.script_callbacks.before_ui_callback()
    host.ns.script_callbacks.before_ui_callback()
    labels = [o.label for o in xyz.axis_options]
    assert labels.count("[ReNeg] Embedding") == 1 and labels.count("[ReNeg] Strength") == 1
    emb_axis = next(o for o in xyz.axis_options if o.label == "[ReNeg] Embedding")
    strength_axis = next(o for o in xyz.axis_options if o.label == "[ReNeg] Strength")
    host.set_model("sd1")
    assert emb_axis.choices() == ["None", "sd1_bare.bin", "sd1_ours.safetensors"]
    emb_axis.confirm(None, ["None", "sd1_bare.bin"])
    with pytest.raises(RuntimeError, match="nope"):
        emb_axis.confirm(None, ["nope"])

    u = torch.randn(1, 77, 768)
    p = host.p()
    emb_axis.apply(p, "sd1_bare.bin", [])
    strength_axis.apply(p, strength_axis.type("0.5"), [])
    host.script.process(p, False, "None", 1.0, True)  # the axis turns it on
    assert p.extra_generation_params["ReNeg"] == "sd1_bare.bin"
    assert torch.allclose(host.run(p, u), 0.5 * u + 0.5 * tensor(768, 2), atol=1e-6)
    p = host.p()
    emb_axis.apply(p, "None", [])
    host.script.process(p, True, "sd1_ours.safetensors", 1.0, True)  # ... and "None" off
    assert host.run(p, u) is u and p.extra_generation_params == {}


# --------------------------------------------------------------------------- the paper's files


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="shared/data/reneg-official (beside the checkout) is absent")
def test_official_files(host):
    host.ns.shared.opts.reneg_dir = str(OFFICIAL)
    host.set_model("sd1")
    names = host.script.ui(False)[1].choices
    assert {"sd1.4_reneg_emb.bin", "sd1.5_reneg_emb.bin"} <= set(names)
    assert "sd2.1_reneg_emb.bin" not in names and "pixart-alpha_reneg_emb.bin" not in names
    host.set_model("sd2")
    assert "sd2.1_reneg_emb.bin" in host.script.ui(False)[1].choices
    host.set_model(None)
    assert "pixart-alpha_reneg_emb.bin" not in host.script.ui(False)[1].choices
    p = host.p("sd1")
    host.script.process(p, True, "sd1.5_reneg_emb", 1.0, True)
    assert p.extra_generation_params["ReNeg hash"] == "3124786328"  # sd1.5_reneg_emb.bin's sha256, first ten hex digits
    official = torch.load(OFFICIAL / "sd1.5_reneg_emb.bin", weights_only=True)
    out = host.run(p, torch.randn(2, 154, 768, dtype=torch.float16))
    assert torch.equal(out, match_tokens(official, 154).half().expand(2, -1, -1))


# --------------------------------------------------------------------------- install.py


@pytest.mark.parametrize("present", [True, False])
def test_install_py(monkeypatch, present):
    calls = []
    launch = types.ModuleType("launch")
    launch.is_installed = lambda name: calls.append(("is_installed", name)) or present
    launch.run_pip = lambda cmd, desc=None: calls.append(("run_pip", cmd))
    monkeypatch.setitem(sys.modules, "launch", launch)
    runpy.run_path(str(EXT / "install.py"))
    assert [c for c in calls if c[0] == "is_installed"] == [("is_installed", "safetensors")]
    assert [c[1] for c in calls if c[0] == "run_pip"] == ([] if present else ["install safetensors"])


# --------------------------------------------------------------------------- installs, in a clean interpreter

_DRIVER = textwrap.dedent(r"""
    import importlib.abc, json, sys, types
    stubs_dir, script, models, expect_core = sys.argv[1:5]

    class Block(importlib.abc.MetaPathFinder):
        blocked = {"diffusers", "transformers", "open_clip", "gradio_client"}
        if expect_core == "none":
            blocked.add("reneg")
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in self.blocked:
                raise ImportError(f"{name} is not importable here")
            return None

    if expect_core != "installed":  # a webui venv without the package: drop an editable install's finder
        sys.meta_path[:] = [f for f in sys.meta_path
                            if not str(getattr(f, "__module__", "")).startswith("__editable__")]
    sys.meta_path.insert(0, Block())
    sys.path.insert(0, stubs_dir)
    import torch
    import a1111_stubs as stubs
    ns, _ = stubs.install(models)
    ns.sd_models.model_data.sd_model = types.SimpleNamespace(is_sd1=True, is_sd2=False, is_sdxl=False)
    m = stubs.load_script(script)
    s = m.ReNegScript()
    comps = s.ui(False)
    p = stubs.FakeP(sd_model=ns.sd_models.model_data.sd_model)
    s.process(p, True, "a", 1.0, True)
    u = torch.randn(2, 77, 768)
    params = stubs.CFGDenoiserParams(None, None, None, 0, 1, u, u, types.SimpleNamespace(p=p))
    ns.script_callbacks.cfg_denoiser_callback(params)
    print(json.dumps({
        "core_file": getattr(m.reneg, "__file__", None),
        "core_error": m.CORE_ERROR,
        "choices": comps[1].choices,
        "replaced": params.text_uncond is not u,
        "errors": [repr(e) for e in ns.script_callbacks.errors],
        "heavy": sorted(n for n in sys.modules if n.split(".")[0] in ("diffusers", "transformers", "open_clip")),
        "n_args": len(comps),
    }))
""")


def _drive(tmp_path, webui_ext, models, expect_core="found"):
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    out = subprocess.run([sys.executable, "-I", str(driver), str(Path(__file__).parent),
                          str(webui_ext / "scripts" / "reneg_negative.py"), str(models), expect_core],
                         cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1]), out.stdout


@pytest.fixture
def small_models(tmp_path):
    folder = tmp_path / "models" / "reneg"
    folder.mkdir(parents=True)
    torch.save(tensor(768, 1), folder / "a.bin")
    return tmp_path / "models"


@pytest.mark.skipif(os.name == "nt", reason="symlinks")
def test_linked_install_without_heavy_libraries(tmp_path, small_models):
    ext = tmp_path / "webui" / "extensions" / "reneg"
    ext.parent.mkdir(parents=True)
    ext.symlink_to(EXT, target_is_directory=True)
    res, _ = _drive(tmp_path, ext, small_models)
    assert res["core_error"] is None and res["errors"] == [] and res["heavy"] == []
    assert Path(res["core_file"]).resolve() == (ROOT / "reneg" / "__init__.py").resolve()  # found by walking up
    assert "a.bin" in res["choices"] and res["replaced"] and res["n_args"] == 4


def test_copied_install_with_core_inside(tmp_path, small_models):
    ext = tmp_path / "webui" / "extensions" / "reneg"
    shutil.copytree(EXT, ext, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "reneg", ext / "reneg", ignore=shutil.ignore_patterns("__pycache__"))
    res, _ = _drive(tmp_path, ext, small_models)
    assert res["core_error"] is None and res["heavy"] == [] and res["replaced"]
    assert Path(res["core_file"]).resolve() == (ext / "reneg" / "__init__.py").resolve()


def test_copied_install_uses_an_installed_core(tmp_path, small_models):
    probe = subprocess.run([sys.executable, "-I", "-c", "import reneg, sys; sys.stdout.write(reneg.__file__)"],
                           cwd=str(tmp_path), capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("the reneg package is not installed in this environment")
    ext = tmp_path / "webui" / "extensions" / "reneg"
    shutil.copytree(EXT, ext, ignore=shutil.ignore_patterns("__pycache__"))
    res, _ = _drive(tmp_path, ext, small_models, expect_core="installed")
    assert res["core_error"] is None and res["heavy"] == [] and res["replaced"]
    assert Path(res["core_file"]).resolve() == Path(probe.stdout).resolve()


def test_copied_install_without_core_says_so(tmp_path, small_models):
    ext = tmp_path / "webui" / "extensions" / "reneg"
    shutil.copytree(EXT, ext, ignore=shutil.ignore_patterns("__pycache__"))
    res, stdout = _drive(tmp_path, ext, small_models, expect_core="none")
    assert res["core_file"] is None and "not found" in res["core_error"]
    assert res["choices"] == ["None"] and not res["replaced"] and res["n_args"] == 4
    assert res["errors"] == [] and "ReNeg" in stdout


def test_find_core_root(host, tmp_path):
    find = host.module.find_core_root
    assert Path(find(str(SCRIPT))) == ROOT
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    assert find(str(deep)) is None
    (tmp_path / "a" / "reneg").mkdir()
    (tmp_path / "a" / "reneg" / "embedding.py").write_text("")
    assert find(str(deep)) is None  # uncond.py is needed too
    (tmp_path / "a" / "reneg" / "uncond.py").write_text("")
    assert Path(find(str(deep / "x.py"))) == tmp_path / "a"


def test_install_from_url_entry_point(models):
    """A webui "Install from URL" clones the whole repository: its top-level scripts/ shim
    must expose the same script, with one callback, finding the core in the clone."""
    ns, saved = stubs.install(str(models))
    try:
        module = stubs.load_script(str(ROOT / "scripts" / "reneg_negative.py"))
        script = module.ReNegScript()
        assert script.title() == "ReNeg"
        assert module.ReNegScript.__module__ == module.__name__
        assert module.CORE_ROOT == str(ROOT)
        assert len(ns.script_callbacks.callback_map["callbacks_cfg_denoiser"]) == 1
    finally:
        stubs.uninstall(saved)

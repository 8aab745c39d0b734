"""The AUTOMATIC1111 / Forge / reForge extension's script file, driven without a webui (stubs in
a1111_stubs.py): loading, callbacks, the panel and its events, install ways. What the extension
decides is tested without any stub in test_a1111_host.py."""

from __future__ import annotations

import copy
import json
import os
import re
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

ROOT = Path(__file__).resolve().parents[1]
EXT = ROOT / "a1111_extension"
SCRIPT = EXT / "scripts" / "reneg_negative.py"


def tensor(d, seed):
    return torch.randn(1, 77, d, generator=torch.Generator().manual_seed(seed))


def xl_pooled():
    return torch.randn(1, 1280, generator=torch.Generator().manual_seed(5))


def sd_model(family):
    d = {"sd1": 768, "sd2": 1024, "sdxl": 2048, "refiner": 1280}[family]
    return types.SimpleNamespace(
        is_sd1=family == "sd1",
        is_sd2=family == "sd2",
        is_sdxl=family in ("sdxl", "refiner"),
        cond_stage_model_empty_prompt=torch.zeros(1, 77, d),
    )


@pytest.fixture
def models(tmp_path):
    """models/reneg with our format, the bare torch.save form, an SD2 and an SDXL file, and a broken one."""
    folder = tmp_path / "models" / "reneg"
    (folder / "sub").mkdir(parents=True)
    save_embedding(str(folder / "sd1_ours.safetensors"), NegEmbedding(tensor(768, 1), "sd1"))
    torch.save(tensor(768, 2), folder / "sd1_bare.bin")
    save_embedding(str(folder / "sub" / "sd2.safetensors"), NegEmbedding(tensor(1024, 3), "sd2"))
    save_embedding(str(folder / "xl, v1.safetensors"), NegEmbedding(tensor(2048, 4), "sdxl", pooled=xl_pooled()))
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
        params = stubs.CFGDenoiserParams(
            torch.zeros(1),
            None,
            torch.ones(1),
            0,
            20,
            cond if cond is not None else uncond,
            uncond,
            types.SimpleNamespace(p=p) if denoiser else None,
        )
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


# --------------------------------------------------------------------------- loading and callbacks


def test_script_basics_and_single_hooks(host):
    s = host.script
    assert s.title() == "ReNeg" and s.show(False) is host.ns.scripts.AlwaysVisible
    assert host.module.reneg is not None and host.module.CORE_ERROR is None
    cmap = host.ns.script_callbacks.callback_map
    hooks, loaded = cmap["callbacks_cfg_denoiser"], cmap["callbacks_model_loaded"]
    assert len(hooks) == 1 and len(loaded) == 1
    stubs.load_script(str(SCRIPT))  # "reload scripts" without clearing the callbacks
    assert len(hooks) == 1 and hooks[0].name == "reneg"
    assert len(loaded) == 1 and loaded[0].name == "reneg"


def test_hook_without_name_argument(models):
    ns, saved, module = _load(models, with_name_arg=False)
    try:
        assert len(ns.script_callbacks.callback_map["callbacks_cfg_denoiser"]) == 1
        assert len(ns.script_callbacks.callback_map["callbacks_model_loaded"]) == 1
    finally:
        stubs.uninstall(saved)


# --------------------------------------------------------------------------- the panel


def _status(enabled):
    return next(c for c in enabled.accordion.children if isinstance(c, stubs.HTML))


def test_ui_components_order_and_defaults(host):
    host.set_model("sd1")
    comps = host.script.ui(False)
    enabled, embedding, strength, hires = comps
    assert isinstance(enabled, stubs.Checkbox) and enabled.value is False
    assert isinstance(embedding, stubs.Dropdown) and isinstance(strength, stubs.Slider)
    assert isinstance(hires, stubs.Checkbox) and hires.value is True and hires.kwargs["visible"] is True
    assert embedding.choices == ["None", "sd1_bare.bin", "sd1_ours.safetensors"]
    assert embedding.value == "None"  # first start: off, whatever sorts first
    assert embedding.label == "Negative embedding"  # the web UI's ui-config key holds the label
    assert embedding.kwargs["allow_custom_value"] is True
    assert (strength.kwargs["minimum"], strength.kwargs["maximum"], strength.value) == (0.0, 1.0, 1.0)
    status = _status(enabled)
    assert "2 embedding(s)" in status.value and "2 for other model families hidden" in status.value
    assert "broken.safetensors" in status.value
    fields = dict((id(c), k) for c, k in host.script.infotext_fields)
    assert fields[id(embedding)] == "ReNeg" and fields[id(strength)] == "ReNeg strength"
    assert fields[id(enabled)]({"ReNeg": "x"}) is True and fields[id(enabled)]({}) is False
    assert host.script.paste_field_names == ["ReNeg", "ReNeg strength"]

    host.set_model("sdxl")
    i2i = host.script.ui(True)
    assert i2i[1].choices == ["None", "xl, v1.safetensors"]
    assert i2i[3].kwargs["visible"] is False and i2i[3].value is True  # img2img has no hires pass
    host.set_model(None)  # Forge before its first generation: every host family
    emb = host.script.ui(False)[1]
    assert emb.choices == ["None", "sd1_bare.bin", "sd1_ours.safetensors", "sub/sd2.safetensors", "xl, v1.safetensors"]
    # a user's default saved in ui-config.json is applied by the web UI only when it is among the
    # choices at build time (ui_loadsave's check_dropdown): with no model yet, every file is
    assert "sd1_ours.safetensors" in emb.choices


def test_panel_follows_a_model_load_in_open_and_new_pages(host):
    """Forge builds the page before any model is loaded and loads one at the first generation:
    the page-load event (new pages) and the generation-info change (open pages) bring the list
    and status up to date, with the model the model-loaded callback reported."""
    script = host.script
    script.is_txt2img, script.is_img2img = True, False
    enabled, embedding, strength, hires = script.ui(False)
    status = _status(enabled)
    assert "no model is loaded yet" in status.value
    interface = next(b for b in stubs.Block.created if isinstance(b, stubs.Blocks) and embedding in b_all(b))
    ((kind, on_load, inputs, outputs),) = interface.events
    assert kind == "load" and inputs == [embedding] and outputs == [embedding, status]

    html_info = stubs.HTML(elem_id="html_info_txt2img")  # gradio 4 HTML "change" loops: not used
    script.after_component(html_info, elem_id="html_info_txt2img")
    other = stubs.Textbox(visible=False, elem_id="generation_info")  # not a tab's generation info
    script.after_component(other, elem_id="generation_info")
    assert other.events == [] and html_info.events == []
    gen_info = stubs.Textbox(visible=False, elem_id="generation_info_txt2img")
    script.after_component(gen_info, elem_id="generation_info_txt2img")
    ((kind, after_generation, inputs, outputs),) = gen_info.events
    assert kind == "change" and inputs == [embedding] and outputs == [embedding, status]

    model = sd_model("sdxl")
    model.sd_checkpoint_info = types.SimpleNamespace(name_for_extra="sdxl-base")
    host.ns.script_callbacks.model_loaded_callback(model)  # what Forge calls after loading
    assert host.ns.script_callbacks.errors == []
    for fn in (on_load, after_generation):
        update, html = fn("sd1_ours.safetensors")
        assert update["choices"] == ["None", "xl, v1.safetensors"] and update["value"] == "None"
        assert "for Stable Diffusion XL (model: sdxl-base)" in html
    host.set_model("sd1")  # the web UI's own model slot, once it has one, is the truth
    update, html = after_generation("sd1_ours.safetensors")
    assert "value" not in update and "Stable Diffusion 1.x" in html  # a value still offered is left alone


def test_both_tabs_panels_follow_a_generation_in_either_tab(host):
    """Forge loads the model at the first generation. A generation in txt2img must bring the
    img2img panel up to date too (and the other way round), not leave it saying that no model is
    loaded and offering every family's files until an img2img generation or a reload.

    As the web UI builds the page: one script object per tab; the txt2img tab (panel, then its
    generation info) first, then the img2img tab; a script's after_component sees only the
    components of its own tab."""
    t2i, i2i = host.script, host.module.ReNegScript()
    t2i.is_txt2img, t2i.is_img2img = True, False
    i2i.is_txt2img, i2i.is_img2img = False, True
    panels, infos = {}, {}
    for tab, script in (("txt2img", t2i), ("img2img", i2i)):
        enabled, embedding, _, _ = script.ui(tab == "img2img")
        panels[tab] = (embedding, _status(enabled))
        assert "no model is loaded yet" in panels[tab][1].value
        infos[tab] = stubs.Textbox(visible=False, elem_id=f"generation_info_{tab}")
        script.after_component(infos[tab], elem_id=f"generation_info_{tab}")
    for tab, info in infos.items():
        wired = {(id(ins[0]), id(outs[1])) for kind, fn, ins, outs in info.events if kind == "change"}
        assert wired == {(id(e), id(st)) for e, st in panels.values()}, tab  # each panel once
        assert len(info.events) == 2
    host.ns.script_callbacks.model_loaded_callback(sd_model("sdxl"))  # Forge's load at a txt2img generation
    for _, fn, _, _ in infos["txt2img"].events:
        update, html = fn("sd1_ours.safetensors")
        assert "no model is loaded yet" not in html and "Stable Diffusion XL" in html
        assert update["choices"] == ["None", "xl, v1.safetensors"]
    i2i.ui(True)  # a second build (a reloaded UI) wires its new panel, and the old ones only once
    assert len(infos["txt2img"].events) == 3 and len(infos["img2img"].events) == 3


def b_all(block):
    out = []
    for c in block.children:
        out.append(c)
        out.extend(b_all(c))
        if hasattr(c, "accordion"):
            out.extend(b_all(c.accordion))
    return out


@pytest.mark.parametrize("kind", ["a1111", "forge"])
def test_what_ui_config_keeps_is_what_the_docs_say(models, kind):
    """Settings -> Defaults keeps the dropdown, the strength and the hires box in both hosts; the
    on/off (an InputAccordion) only in A1111: Forge's ui-config.json keeps no input accordion's
    state, not even its own Hires. fix's. docs/a1111.md names the keys and says which host keeps which."""
    ns, saved, module = _load(models, host=kind)
    try:
        module.CORE_ROOT = None
        ns.sd_models.model_data.sd_model = sd_model("sd1")
        with stubs.Blocks() as tab:
            module.ReNegScript().ui(False)
        prefix = "customscript/reneg_negative.py/txt2img"
        keys = stubs.ui_config_keys(tab, ns.ui_components.InputAccordion, prefix)
    finally:
        stubs.uninstall(saved)
    on = f"{prefix}/ReNeg/value"
    assert {f"{prefix}/Negative embedding/value", f"{prefix}/Apply to hires pass/value"} <= keys
    assert (on in keys) == (kind == "a1111")
    text = " ".join((ROOT / "docs" / "a1111.md").read_text().split())
    section = text[text.index("**The default is None.**") : text.index("An embedding of the wrong family")]
    named = set(re.findall(r"`(customscript/[^`]+)`", section))
    assert f"{prefix}/Negative embedding/value" in named and on in named
    assert "Forge does not keep" in section and "ReNeg on by default" in section, section


def test_ui_without_input_accordion_and_refresh(models):
    ns, saved, module = _load(models, with_input_accordion=False)
    module.CORE_ROOT = None  # list only this test's files (a fresh module, dropped afterwards)
    try:
        ns.sd_models.model_data.sd_model = sd_model("sd1")
        script = module.ReNegScript()
        enabled, embedding, strength, hires = script.ui(False)
        assert isinstance(enabled, stubs.Checkbox) and enabled.label == "Enable ReNeg"
        assert embedding.value == "None"
        torch.save(tensor(768, 9), models / "reneg" / "new.pt")
        button = [b for b in stubs.Block.created if isinstance(b, stubs.Button) and b.events][-1]
        _, fn, inputs, outputs = button.events[0]
        assert inputs == [embedding] and outputs[0] is embedding and isinstance(outputs[1], stubs.HTML)
        update, html = fn("sd1_ours.safetensors")
        assert update["choices"] == ["None", "new.pt", "sd1_bare.bin", "sd1_ours.safetensors"]
        assert "value" not in update and "3 embedding(s)" in html
        assert fn("sub/sd2.safetensors")[0]["value"] == "None"  # another family's file is no longer offered
    finally:
        stubs.uninstall(saved)


def test_panel_events_never_raise(host, monkeypatch):
    def boom(*a, **k):
        raise OSError("disk gone")

    monkeypatch.setattr(host.module.host, "panel_state", boom)
    assert host.module.panel_update("x") == (stubs.update(), stubs.update())


# --------------------------------------------------------------------------- generation through the script


def test_process_and_hook_through_the_script(host):
    p = host.p()
    host.script.process(p, True, "sd1_ours.safetensors", 1.0, True)
    assert p.extra_generation_params["ReNeg"] == "sd1_ours.safetensors"
    u = torch.randn(2, 77, 768)
    assert torch.equal(host.run(p, u), tensor(768, 1).expand(2, -1, -1))
    host.script.postprocess(p, None, True, "sd1_ours.safetensors", 1.0, True)
    assert host.run(p, u) is u
    # an X/Y/Z cell copied from a processed p, made without ReNeg, carries no ReNeg key
    cell = copy.copy(p)
    host.script.process(cell, False, "None", 1.0, True)
    assert not any(k.startswith("ReNeg") for k in cell.extra_generation_params)
    assert p.extra_generation_params["ReNeg"] == "sd1_ours.safetensors"  # the earlier image keeps its own


def test_process_with_what_the_api_can_send_never_raises(host):
    """alwayson_scripts args straight from JSON: a strength too large for a float, null, text."""
    for strength in (10**400, None, "abc", float("nan")):
        p = host.p()
        host.script.process(p, True, "sd1_ours.safetensors", strength, True)
        assert not any(k.startswith("ReNeg") for k in p.extra_generation_params)
        assert any("not applied: strength must be a number from 0 to 1" in c for c in p.comments), p.comments
        u = torch.randn(1, 77, 768)
        assert host.run(p, u) is u
        host.script.postprocess(p, None, True, "sd1_ours.safetensors", strength, True)


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


def test_xyz_axes_registered_before_the_ui(host):
    xyz = stubs.make_xyz_module()
    host.ns.scripts.scripts_data.append(stubs.ScriptClassData(xyz.Script, "xyz_grid.py", "/", xyz))
    host.ns.script_callbacks.before_ui_callback()
    host.ns.script_callbacks.before_ui_callback()
    assert host.ns.script_callbacks.errors == []
    labels = [o.label for o in xyz.axis_options]
    assert labels.count("[ReNeg] Embedding") == 1 and labels.count("[ReNeg] Strength") == 1
    emb_axis = next(o for o in xyz.axis_options if o.label == "[ReNeg] Embedding")
    host.set_model("sd1")
    assert emb_axis.choices() == ["None", "sd1_bare.bin", "sd1_ours.safetensors"]
    p = host.p()
    emb_axis.apply(p, "sd1_bare.bin", [])
    host.script.process(p, False, "None", 1.0, True)  # the axis turns it on
    assert p.extra_generation_params["ReNeg"] == "sd1_bare.bin"


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
    out = subprocess.run(
        [
            sys.executable,
            "-I",
            str(driver),
            str(Path(__file__).parent),
            str(webui_ext / "scripts" / "reneg_negative.py"),
            str(models),
            expect_core,
        ],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
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
    probe = subprocess.run(
        [sys.executable, "-I", "-c", "import reneg, sys; sys.stdout.write(reneg.__file__)"],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
    )
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
    assert find(str(deep)) is None  # ... and the host logic, reneg/hosts/a1111.py (an older copy lacks it)
    (tmp_path / "a" / "reneg" / "hosts").mkdir()
    (tmp_path / "a" / "reneg" / "hosts" / "a1111.py").write_text("")
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

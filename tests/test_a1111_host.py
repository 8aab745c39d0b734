"""What the AUTOMATIC1111 / Forge / reForge extension decides, tested without a web UI.

``reneg.hosts.a1111`` is a plain module: the web UI's objects it reads (a processing object,
the hook's parameters, a model) are duck-typed, so these tests build small stand-ins here.
The script file's glue (gradio, callback registration) is tested in test_a1111.py.
"""

from __future__ import annotations

import copy
import json
import os
import types
from pathlib import Path

import pytest
import torch

from reneg.embedding import NegEmbedding, save_embedding
from reneg.families import FAMILIES
from reneg.hosts import a1111 as core
from reneg.uncond import MARK_VALUE, match_tokens

ROOT = Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "data" / "reneg-official"


def tensor(d, seed):
    return torch.randn(1, 77, d, generator=torch.Generator().manual_seed(seed))


def xl_pooled():
    return torch.randn(1, 1280, generator=torch.Generator().manual_seed(5))


def sd_model(family, title=None):
    """What A1111 and Forge models carry that the extension reads."""
    d = {"sd1": 768, "sd2": 1024, "sdxl": 2048, "refiner": 1280}[family]
    m = types.SimpleNamespace(
        is_sd1=family == "sd1",
        is_sd2=family == "sd2",
        is_sdxl=family in ("sdxl", "refiner"),
        cond_stage_model_empty_prompt=torch.zeros(1, 77, d),
    )
    if title:
        m.sd_checkpoint_info = types.SimpleNamespace(name_for_extra=title)
    return m


class P:
    """The attributes of StableDiffusionProcessing the extension reads."""

    def __init__(self, sd_model=None, enable_hr=False):
        self.extra_generation_params = {}
        self.comments = {}
        self.sd_model = sd_model
        self.enable_hr = enable_hr
        self.is_hr_pass = False

    def comment(self, text):
        self.comments[text] = 1


class DictWithShape(dict):
    """A1111's prompt_parser.DictWithShape: the SDXL conditioning dict, with a shape."""

    @property
    def shape(self):
        return self["crossattn"].shape


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


class Rig:
    """A Host with its folders, a settable "loaded model" and a CLIP skip setting."""

    def __init__(self, models):
        self.folders = [str(models / "reneg")]
        self.model = None
        self.clip_skip = 1
        self.host = core.Host(lambda: list(self.folders), lambda: self.model, lambda: self.clip_skip)

    def set_model(self, family, title=None):
        self.model = sd_model(family, title) if family else None

    def p(self, family="sd1", **kw):
        return P(sd_model=sd_model(family), **kw)

    def run(self, p, uncond, cond=None, denoiser=True):
        """One sampling step through the hook."""
        params = types.SimpleNamespace(
            text_cond=cond if cond is not None else uncond,
            text_uncond=uncond,
            denoiser=types.SimpleNamespace(p=p) if denoiser else None,
        )
        self.host.on_cfg_denoiser(params)
        return params.text_uncond


@pytest.fixture
def rig(models):
    return Rig(models)


# --------------------------------------------------------------------------- the family table


def test_host_families_come_from_the_family_table():
    assert core.HOST_FAMILIES == tuple(f.name for f in FAMILIES.values() if "a1111" in f.hosts)
    assert core.HOST_FAMILIES == ("sd1", "sd2", "sdxl")
    # the CLIP skip note is for the families the table marks (A1111's setting moves SD1.x's negative)
    assert [f.name for f in FAMILIES.values() if f.clip_skip_warning] == ["sd1"]
    assert core.host_families_text() == "Stable Diffusion 1.x, Stable Diffusion 2.x or Stable Diffusion XL"
    assert core.model_family(sd_model("sd1")) == "sd1"
    assert core.model_family(sd_model("refiner")) == core.UNSUPPORTED  # 1280 is no family of the table
    # without E(""): the host's is_<family> flags
    assert core.model_family(types.SimpleNamespace(is_sd1=False, is_sd2=True, is_sdxl=False)) == "sd2"
    assert core.model_family(types.SimpleNamespace(is_sd1=False, is_sd2=False, is_sdxl=False)) == core.UNSUPPORTED
    assert core.model_family(types.SimpleNamespace(is_sd3=True)) == core.UNSUPPORTED
    assert core.model_family(types.SimpleNamespace()) is None and core.model_family(None) is None


# --------------------------------------------------------------------------- the panel's list and status


def test_list_and_status_per_family(rig):
    rig.set_model("sd1")
    names, status = rig.host.choices_and_status()
    assert names == ["sd1_bare.bin", "sd1_ours.safetensors"]
    assert "2 embedding(s)" in status and "2 for other model families hidden" in status
    assert "broken.safetensors" in status
    rig.set_model("sdxl")
    assert rig.host.choices_and_status()[0] == ["xl, v1.safetensors"]
    rig.set_model("sd2")
    assert rig.host.choices_and_status()[0] == ["sub/sd2.safetensors"]
    rig.set_model(None)  # not loaded yet: every host family, with a note
    names, status = rig.host.choices_and_status()
    assert names == ["sd1_bare.bin", "sd1_ours.safetensors", "sub/sd2.safetensors", "xl, v1.safetensors"]
    assert "no model is loaded yet" in status
    rig.model = types.SimpleNamespace(is_sd1=False, is_sd2=False, is_sdxl=False)  # Flux on Forge
    names, status = rig.host.choices_and_status()
    assert names == [] and "is not Stable Diffusion 1.x, Stable Diffusion 2.x or Stable Diffusion XL" in status
    rig.set_model("refiner")
    assert rig.host.choices_and_status()[0] == []


def test_list_and_status_follow_a_model_load(rig):
    """Forge loads the checkpoint at the first generation, after the page is built: the model-loaded
    callback (and the host's own model slot) make the list and status follow it."""
    rig.folders.append(str(rig.folders[0]))  # a duplicate folder changes nothing
    first = rig.host.panel_state("sd1_ours.safetensors")
    assert first[0] == ["None", "sd1_bare.bin", "sd1_ours.safetensors", "sub/sd2.safetensors", "xl, v1.safetensors"]
    assert "no model is loaded yet" in first[2]

    # Forge: the model object arrives through the model-loaded callback
    loaded = sd_model("sd1", title="v1-5-pruned")
    rig.host.on_model_loaded(loaded)
    choices, value, status = rig.host.panel_state("sd1_ours.safetensors")
    assert choices == ["None", "sd1_bare.bin", "sd1_ours.safetensors"] and value == "sd1_ours.safetensors"
    assert "for Stable Diffusion 1.x (model: v1-5-pruned)" in status and "no model" not in status
    assert rig.host.watch.loads == 1

    # the user switches to an SDXL checkpoint: the host's slot says so, and the SD1 pick is no longer offered
    rig.model = sd_model("sdxl", title="sdxl-base")
    choices, value, status = rig.host.panel_state("sd1_ours.safetensors")
    assert choices == ["None", "xl, v1.safetensors"] and value == "None"
    assert "for Stable Diffusion XL (model: sdxl-base)" in status and status != first[2]
    # a name found in no folder (typed, or pasted from another machine's image) is left as it is
    assert rig.host.panel_state("from elsewhere.bin")[1] == "from elsewhere.bin"
    assert rig.host.panel_state("XL, V1")[1] == "xl, v1.safetensors"  # a stem, any case
    assert rig.host.panel_state(None)[1] == "None"


def test_refresh_finds_new_files(rig, models):
    rig.set_model("sd1")
    assert rig.host.panel_state("None")[0] == ["None", "sd1_bare.bin", "sd1_ours.safetensors"]
    torch.save(tensor(768, 9), models / "reneg" / "new.pt")
    choices, value, status = rig.host.panel_state("sd1_ours.safetensors", refresh=True)
    assert choices == ["None", "new.pt", "sd1_bare.bin", "sd1_ours.safetensors"]
    assert value == "sd1_ours.safetensors" and "3 embedding(s)" in status
    assert rig.host.panel_state("gone.safetensors", refresh=True)[1] == "gone.safetensors"


def test_no_files_says_where_they_go(tmp_path):
    folder = tmp_path / "models" / "reneg"
    host = core.Host(lambda: [str(folder)])
    names, status = host.choices_and_status(refresh=True)
    assert names == [] and "No ReNeg embeddings found" in status and str(folder) in status
    assert folder.is_dir()  # made, to show users where files go


def test_embedding_folders_order_and_duplicates(tmp_path):
    out = core.embedding_folders(str(tmp_path / "models"), " ~/mine ", str(tmp_path / "ext"), str(tmp_path / "ext"))
    assert out == [
        str(tmp_path / "models" / "reneg"),
        os.path.expanduser("~/mine"),
        str(tmp_path / "ext" / "embeddings"),
    ]
    assert core.embedding_folders(None, "", None, None) == []


# --------------------------------------------------------------------------- process and the hook


@pytest.mark.parametrize("b,n", [(1, 77), (4, 77), (1, 154), (4, 154)])
def test_replacement_batches_and_lengths(rig, b, n):
    p = rig.p()
    rig.host.process(p, True, "sd1_ours.safetensors", 1.0, True)
    uncond = torch.randn(b, n, 768)
    before = uncond.clone()
    out = rig.run(p, uncond)
    assert out is not uncond and torch.equal(uncond, before)
    assert torch.equal(out, match_tokens(tensor(768, 1), n).expand(b, -1, -1))
    assert p.extra_generation_params["ReNeg"] == "sd1_ours.safetensors"
    assert p.extra_generation_params["ReNeg strength"] == 1.0
    assert len(p.extra_generation_params["ReNeg hash"]) == 10


def test_negative_follows_long_positive(rig):
    p = rig.p()
    rig.host.process(p, True, "sd1_bare", 1.0, True)
    out = rig.run(p, torch.randn(2, 77, 768), cond=torch.randn(2, 154, 768))
    assert out.shape == (2, 154, 768)  # no padding with E("") left for the host to do
    rig.host.process(p, True, "sd1_bare", 0.5, True)
    out = rig.run(p, torch.randn(2, 77, 768), cond=torch.randn(2, 154, 768))
    assert out.shape == (2, 77, 768)  # a blend needs the host's negative at its own length


def test_strength_numerics(rig):
    base = torch.randn(2, 154, 768)
    e = match_tokens(tensor(768, 2), 154)
    for s, want in ((0.0, base), (0.5, 0.5 * base + 0.5 * e), (1.0, e.expand(2, -1, -1))):
        p = rig.p()
        rig.host.process(p, True, "sd1_bare.bin", s, True)
        out = rig.run(p, base.clone())
        assert torch.allclose(out, want, atol=1e-6), s
        assert p.extra_generation_params["ReNeg strength"] == s


def test_controlnet_marker_sdxl_none_fp16(rig):
    p = rig.p("sd1")
    rig.host.process(p, True, "sd1_ours.safetensors", 1.0, True)
    content = torch.randn(2, 154, 768)
    marked = torch.cat([torch.full((2, 1, 768), -MARK_VALUE), content], dim=1)
    before = marked.clone()
    out = rig.run(p, marked, cond=torch.cat([torch.full((2, 1, 768), MARK_VALUE), content], dim=1))
    assert torch.equal(marked, before)
    assert out.shape == (2, 155, 768) and torch.equal(out[:, 0], before[:, 0])
    assert torch.equal(out[:, 1:], match_tokens(tensor(768, 1), 154).expand(2, -1, -1))

    assert rig.run(p, None) is None  # Forge at CFG 1

    half = torch.randn(3, 77, 768, dtype=torch.float16)
    out = rig.run(p, half)
    assert out.dtype == torch.float16 and torch.equal(out, tensor(768, 1).half().expand(3, -1, -1))

    px = rig.p("sdxl")
    rig.host.process(px, True, "xl, v1", 1.0, True)
    vector = torch.randn(2, 2816)
    d = DictWithShape({"crossattn": torch.randn(2, 77, 2048), "vector": vector})
    cross_before = d["crossattn"].clone()
    vector_before = vector.clone()
    out = rig.run(px, d)
    assert type(out) is DictWithShape and out is not d and out.shape == (2, 77, 2048)
    assert torch.equal(d["crossattn"], cross_before) and torch.equal(vector, vector_before)
    assert torch.equal(out["crossattn"], tensor(2048, 4).expand(2, -1, -1))
    # the file's pooled vector (what it was trained with) replaces the vector's pooled part; sizes stay
    pooled = xl_pooled()
    assert torch.equal(out["vector"][:, :1280], pooled.expand(2, -1))
    assert torch.equal(out["vector"][:, 1280:], vector[:, 1280:])
    rig.host.process(px, True, "xl, v1", 0.5, True)
    half = rig.run(px, d)
    torch.testing.assert_close(half["vector"][:, :1280], 0.5 * (vector[:, :1280] + pooled))
    assert torch.equal(half["vector"][:, 1280:], vector[:, 1280:])


def test_wrong_dimension_is_skipped_with_one_warning(rig, capsys):
    p = rig.p("sdxl")  # the model says SDXL, but a refiner's 1280 arrives (A1111's refiner switch)
    rig.host.process(p, True, "xl, v1.safetensors", 1.0, True)
    d = {"crossattn": torch.randn(1, 77, 1280), "vector": torch.randn(1, 2560)}
    for _ in range(3):
        assert rig.run(p, d) is d
    warnings = [c for c in p.comments if "1280" in c]
    assert len(warnings) == 1 and "an SDXL refiner?" in warnings[0]
    assert capsys.readouterr().out.count("1280") == 1


def test_family_mismatch_at_process_is_not_applied(rig):
    p = rig.p("sdxl")
    rig.host.process(p, True, "sd1_ours.safetensors", 1.0, True)
    assert "ReNeg" not in p.extra_generation_params
    assert any("Stable Diffusion 1.x embedding" in c for c in p.comments)
    u = torch.randn(1, 77, 2048)
    assert rig.run(p, u) is u


def test_gating(rig):
    u = torch.randn(1, 77, 768)
    p = rig.p()
    rig.host.process(p, False, "sd1_ours.safetensors", 1.0, True)  # disabled
    assert rig.run(p, u) is u and p.extra_generation_params == {}
    rig.host.process(p, True, "None", 1.0, True)
    assert rig.run(p, u) is u
    rig.host.process(p, True, "missing", 1.0, True)
    assert rig.run(p, u) is u and any("missing" in c for c in p.comments)

    p = rig.p(enable_hr=True)
    rig.host.process(p, True, "sd1_ours.safetensors", 1.0, False)  # not on the hires pass
    assert p.extra_generation_params["ReNeg hires"] is False
    assert rig.run(p, u) is not u
    p.is_hr_pass = True
    assert rig.run(p, u) is u
    p.is_hr_pass = False
    assert rig.run(p, u) is not u

    p = rig.p(enable_hr=True)
    rig.host.process(p, True, "sd1_ours.safetensors", 1.0, True)
    assert "ReNeg hires" not in p.extra_generation_params
    p.is_hr_pass = True
    assert rig.run(p, u) is not u

    rig.host.postprocess(p)
    assert rig.run(p, u) is u  # over: later generations are left alone
    other = rig.p()  # a generation the script did not process (another extension's own p)
    assert rig.run(other, u) is u


def test_hosts_without_denoiser_in_params(rig):
    """A1111 1.6/1.7 build CFGDenoiserParams without the denoiser: the last process() applies."""
    u = torch.randn(1, 77, 768)
    p = rig.p(enable_hr=True)
    rig.host.process(p, True, "sd1_ours.safetensors", 1.0, False)
    assert rig.run(p, u, denoiser=False) is not u
    p.is_hr_pass = True
    assert rig.run(p, u, denoiser=False) is u
    rig.host.postprocess(p)
    p.is_hr_pass = False
    assert rig.run(p, u, denoiser=False) is u


def test_errors_inside_the_hook_never_escape(rig):
    p = rig.p()
    rig.host.process(p, True, "sd1_ours.safetensors", 1.0, True)
    params = types.SimpleNamespace(text_cond=object(), text_uncond="not a tensor", denoiser=types.SimpleNamespace(p=p))
    rig.host.on_cfg_denoiser(params)
    assert params.text_uncond == "not a tensor"
    getattr(p, core.P_ATTR).tensor = None  # break the state itself
    params = types.SimpleNamespace(
        text_cond=None, text_uncond=torch.randn(1, 77, 768), denoiser=types.SimpleNamespace(p=p)
    )
    rig.host.on_cfg_denoiser(params)
    assert any("error" in c for c in p.comments)


def test_api_args_order_and_coercion(rig):
    assert core.ARG_NAMES == ("enabled", "embedding", "strength", "hires")
    assert core.parse_args([]) == (False, "None", 1.0, True)
    assert core.parse_args(["true", "x", "0.25", "false"]) == (True, "x", "0.25", False)  # strength as given:
    assert core.parse_args([1, None, 7, 0]) == (True, "None", 7, False)  # process reads it (read_strength)
    assert core.parse_args((True, "x")) == (True, "x", 1.0, True)  # a tuple, as *args arrive
    assert core.read_strength("0.25") == (0.25, None) and core.read_strength(0) == (0.0, None)
    p = rig.p()
    rig.host.process(p, True, "SD1_OURS", 0.5)  # a stem, any case; hires left out
    assert p.extra_generation_params["ReNeg"] == "sd1_ours.safetensors"
    assert p.extra_generation_params["ReNeg strength"] == 0.5


@pytest.mark.parametrize(
    "bad,shown",
    [
        (None, "None"),
        ("abc", "'abc'"),
        ("", "''"),
        (float("nan"), "nan"),
        (float("inf"), "inf"),
        pytest.param(10**400, "(401 digits)", id="10**400"),  # float() of it overflows
        (True, "True"),
        ([0.5], "[0.5]"),
    ],
)
def test_unreadable_strength_skips_reneg_with_a_warning(rig, bad, shown):
    """What the API's alwayson_scripts can send: never an exception into the host, never a silent
    1.0; the generation runs without ReNeg and says why, naming the value."""
    p = rig.p()
    assert rig.host.process(p, True, "sd1_ours.safetensors", bad, True) is None
    u = torch.randn(1, 77, 768)
    assert rig.run(p, u) is u and not any(k.startswith("ReNeg") for k in p.extra_generation_params)
    (msg,) = p.comments
    assert msg.startswith("ReNeg: not applied: strength must be a number from 0 to 1, got ") and shown in msg, msg
    if bad is None:
        return  # an X/Y/Z axis never gives None: its values went through float()
    cell = rig.p()  # an X/Y/Z strength axis value is read the same way
    core.xyz_apply_strength(cell, bad, [])
    assert rig.host.process(cell, True, "sd1_ours.safetensors", 1.0, True) is None and shown in next(
        iter(cell.comments)
    )


@pytest.mark.parametrize("given,used", [(1.5, 1.0), (-0.25, 0.0), ("2", 1.0)])
def test_strength_outside_0_1_is_clamped_with_a_warning(rig, given, used):
    p = rig.p()
    assert rig.host.process(p, True, "sd1_ours.safetensors", given, True) is not None
    assert p.extra_generation_params["ReNeg strength"] == used
    assert list(p.comments) == [f"ReNeg: strength {given!r} is outside 0..1; using {used}"]


def test_process_never_raises_into_the_host(rig, monkeypatch):
    def boom(name):
        raise OSError("the folder went away")

    monkeypatch.setattr(rig.host.store, "resolve", boom)
    p = rig.p()
    p.extra_generation_params["ReNeg"] = "stale"
    assert rig.host.process(p, True, "sd1_ours.safetensors", 1.0, True) is None
    assert p.extra_generation_params == {} and getattr(p, core.P_ATTR, None) is None
    assert list(p.comments) == ["ReNeg: not applied after an error: OSError: the folder went away"]


def test_clip_skip_mismatch_is_said(rig, capsys):
    rig.clip_skip = 2
    p = rig.p()
    assert rig.host.process(p, True, "sd1_ours", 1.0, True) is not None  # applied, with a console note
    assert "CLIP skip 1, this generation uses 2" in capsys.readouterr().out


def test_embedding_cache_follows_the_file(rig, models):
    path = models / "reneg" / "sd1_bare.bin"
    first = rig.host.store.load(str(path))
    assert rig.host.store.load(str(path)) is first
    torch.save(tensor(768, 7) * 2, path)
    os.utime(path, ns=(1, os.stat(path).st_mtime_ns + 10**9))
    assert torch.equal(rig.host.store.load(str(path)).tensor, tensor(768, 7) * 2)


def test_core_error_means_nothing_applied(rig, capsys):
    p = rig.p()
    assert rig.host.process(p, True, "sd1_ours", 1.0, True, core_error="broken core") is None
    assert p.extra_generation_params == {} and "broken core" in capsys.readouterr().out


# --------------------------------------------------------------------------- infotext


def infotext_line(params: dict) -> str:
    """``k: v, k: v`` with values holding , : or a newline JSON-quoted, as A1111 writes them."""

    def q(v):
        v = str(v)
        return json.dumps(v, ensure_ascii=False) if any(c in v for c in ",:\n") else v

    return ", ".join(f"{k}: {q(v)}" for k, v in params.items() if v is not None)


def parse_infotext_line(line: str) -> dict:
    """The inverse of :func:`infotext_line` (what A1111's parse_generation_parameters does for it)."""
    out, i, n = {}, 0, len(line)
    while i < n:
        colon = line.find(":", i)
        if colon < 0:
            break
        key, k = line[i:colon].strip(), colon + 1
        while k < n and line[k] == " ":
            k += 1
        if k < n and line[k] == '"':
            value, k = json.JSONDecoder().raw_decode(line, k)
            comma = line.find(",", k)
        else:
            comma = line.find(",", k)
            value = line[k : comma if comma >= 0 else n].strip()
        out[key] = value
        i = n if comma < 0 else comma + 1
    return out


def paste(params: dict) -> list:
    """What pasting ``params`` sets on the four components (None = unchanged), converting strings
    to each component's value type as the host does."""
    out = [None] * len(core.ARG_DEFAULTS)
    for i, key in core.INFOTEXT_FIELDS:
        v = key(params) if callable(key) else params.get(key)
        if v is not None:
            t = type(core.ARG_DEFAULTS[i])
            if t is bool and v == "False":
                v = False
            elif t in (int, float):
                v = float(v)
            else:
                v = t(v)
        out[i] = v
    return out


@pytest.mark.parametrize("name,s,hires", [("sd1_ours.safetensors", 0.5, True), ("xl, v1.safetensors", 1.0, False)])
def test_infotext_round_trip(rig, name, s, hires):
    family = "sdxl" if name.startswith("xl") else "sd1"
    p = rig.p(family, enable_hr=True)
    rig.host.process(p, True, name, s, hires)
    line = "Steps: 20, Sampler: Euler a, CFG scale: 7, " + infotext_line(p.extra_generation_params)
    params = parse_infotext_line(line)
    assert params["ReNeg"] == name
    pasted = paste(params)
    assert pasted == [True, name, s, hires]
    assert set(core.PASTE_FIELD_NAMES) <= {k for _, k in core.INFOTEXT_FIELDS if isinstance(k, str)}

    p2 = rig.p(family)
    rig.host.process(p2, *pasted)
    assert p2.extra_generation_params == {k: v for k, v in p.extra_generation_params.items() if k != "ReNeg hires"}

    assert paste(parse_infotext_line("Steps: 20, Seed: 1, Size: 512x512")) == [False, None, None, None]


def test_grid_cells_share_one_params_dict_but_never_each_others_keys(rig):
    """The X/Y/Z plot makes every cell with ``copy(p)``: one shared extra_generation_params dict.
    Embedding (file, None) x Strength (0, 1) x hires: a cell made without ReNeg carries no ReNeg key,
    and a cell with ReNeg carries only its own (no stale "ReNeg hires")."""
    base = rig.p(enable_hr=True)
    base.extra_generation_params["Hires upscale"] = 2  # the host's own keys must stay
    shared = base.extra_generation_params
    u = torch.randn(1, 77, 768)
    made = []
    for name in ("sd1_ours.safetensors", "None", "sd1_bare.bin", "None"):
        for strength in (0.0, 1.0):
            for hires in (False, True):
                cell = copy.copy(base)  # what xyz_grid does for each cell
                assert cell.extra_generation_params is shared
                core.xyz_apply_embedding(cell, name, [])
                core.xyz_apply_strength(cell, strength, [])
                rig.host.process(cell, True, "sd1_ours.safetensors", 1.0, hires)  # panel on, another file
                infotext = parse_infotext_line(infotext_line(cell.extra_generation_params))
                replaced = rig.run(cell, u) is not u
                rig.host.postprocess(cell)
                made.append((name, strength, hires, infotext, replaced))
    assert shared == {"Hires upscale": 2}  # no cell wrote into the shared dict
    for name, strength, hires, infotext, replaced in made:
        assert infotext["Hires upscale"] == "2"
        if name == "None":
            assert not any(k.startswith("ReNeg") for k in infotext), (name, strength, hires, infotext)
            assert not replaced
        else:
            assert infotext["ReNeg"] == name and float(infotext["ReNeg strength"]) == strength
            assert ("ReNeg hires" in infotext) == (not hires)
            assert replaced == (strength > 0)
    # the same, when an earlier generation did write into a dict a later one shares (an old copy
    # of this extension, or another script copying ours): the later one drops those keys
    stale = P(sd_model=sd_model("sd1"), enable_hr=True)
    stale.extra_generation_params.update(
        {
            "ReNeg": "x.bin",
            "ReNeg strength": 0.0,
            "ReNeg hash": "0123456789",
            "ReNeg hires": False,
            "Seed resize from": "-1x-1",
        }
    )
    rig.host.process(stale, False, "None", 1.0, True)
    assert stale.extra_generation_params == {"Seed resize from": "-1x-1"}


@pytest.mark.parametrize(
    "axes,grid_keys",
    [
        ({"embedding": "sd1_bare.bin", "strength": 0.5}, set()),  # both vary: the grid carries neither
        ({"embedding": "sd1_bare.bin"}, set()),
        ({"strength": 0.5}, {"ReNeg", "ReNeg hash"}),  # the file is every cell's; the strength is not
        ({}, {"ReNeg", "ReNeg strength", "ReNeg hash"}),  # another axis (CFG...): true of every cell
    ],
)
def test_grid_image_infotext_carries_no_values_of_a_reneg_axis(rig, axes, grid_keys):
    """The X/Y/Z script writes the grid image's infotext from the first cell's parameters after that
    cell's process_images (and so after the script's postprocess). With a ReNeg axis the first
    cell's value is not the grid's: the cell's image keeps it, the grid does not get it."""
    base = rig.p()
    cell = copy.copy(base)  # what xyz_grid does for each cell
    if "embedding" in axes:
        core.xyz_apply_embedding(cell, axes["embedding"], [])
    if "strength" in axes:
        core.xyz_apply_strength(cell, axes["strength"], [])
    rig.host.process(cell, True, "sd1_ours.safetensors", 1.0, True)
    cell_image = dict(cell.extra_generation_params)  # the cell's own infotext is written from this
    processed = cell.extra_generation_params  # Processed(p, ...) keeps this dict (its generation info)
    rig.host.postprocess(cell)
    grid = dict(cell.extra_generation_params, Script="X/Y/Z plot")  # xyz_grid: copy(pc.extra_generation_params)
    assert {k for k in grid if k.startswith("ReNeg")} == grid_keys
    assert {"ReNeg", "ReNeg strength", "ReNeg hash"} <= set(cell_image) and processed == cell_image


# --------------------------------------------------------------------------- X/Y/Z axes


class AxisOption:
    """The fields of xyz_grid.AxisOption the extension fills."""

    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None):
        self.label, self.type, self.apply, self.confirm, self.choices = label, type, apply, confirm, choices


def test_xyz_axes(rig):
    xyz = types.SimpleNamespace(AxisOption=AxisOption, axis_options=[AxisOption("Nothing", str, None)])
    cls = type("Script", (), {"__module__": "xyz_grid.py"})
    data = [
        types.SimpleNamespace(script_class=type("Other", (), {}), module=object()),
        types.SimpleNamespace(script_class=cls, module=xyz),
    ]
    assert core.find_xyz_module(data) is xyz and core.find_xyz_module(data[:1]) is None
    core.add_xyz_axes(xyz, rig.host)
    old = list(xyz.axis_options)
    again = core.Host(lambda: list(rig.folders), lambda: rig.model)  # a reloaded extension
    core.add_xyz_axes(xyz, again)
    labels = [o.label for o in xyz.axis_options]
    assert labels == ["Nothing", "[ReNeg] Embedding", "[ReNeg] Strength"]  # same places, new owner
    assert xyz.axis_options[1] is not old[1] and xyz.axis_options[1].confirm.__self__ is again

    emb_axis, strength_axis = xyz.axis_options[1], xyz.axis_options[2]
    rig.set_model("sd1")
    assert emb_axis.choices() == ["None", "sd1_bare.bin", "sd1_ours.safetensors"]
    emb_axis.confirm(None, ["None", "sd1_bare.bin"])
    with pytest.raises(RuntimeError, match="nope"):
        emb_axis.confirm(None, ["nope"])

    u = torch.randn(1, 77, 768)
    p = rig.p()
    emb_axis.apply(p, "sd1_bare.bin", [])
    strength_axis.apply(p, strength_axis.type("0.5"), [])
    rig.host.process(p, False, "None", 1.0, True)  # the axis turns it on
    assert p.extra_generation_params["ReNeg"] == "sd1_bare.bin"
    assert torch.allclose(rig.run(p, u), 0.5 * u + 0.5 * tensor(768, 2), atol=1e-6)
    p = rig.p()
    emb_axis.apply(p, "None", [])
    rig.host.process(p, True, "sd1_ours.safetensors", 1.0, True)  # ... and "None" off
    assert rig.run(p, u) is u and p.extra_generation_params == {}


# --------------------------------------------------------------------------- the paper's files


@pytest.mark.skipif(not OFFICIAL.is_dir(), reason="the paper's embeddings are not in ../shared")
def test_official_files(rig):
    rig.folders.append(str(OFFICIAL))
    rig.set_model("sd1")
    names = rig.host.choices_and_status(refresh=True)[0]
    assert {"sd1.4_reneg_emb.bin", "sd1.5_reneg_emb.bin"} <= set(names)
    assert "sd2.1_reneg_emb.bin" not in names and "pixart-alpha_reneg_emb.bin" not in names
    rig.set_model("sd2")
    assert "sd2.1_reneg_emb.bin" in rig.host.choices_and_status()[0]
    rig.set_model(None)
    assert "pixart-alpha_reneg_emb.bin" not in rig.host.choices_and_status()[0]
    p = rig.p("sd1")
    rig.host.process(p, True, "sd1.5_reneg_emb", 1.0, True)
    assert p.extra_generation_params["ReNeg hash"] == "3124786328"  # the published file's SHA-256
    official = torch.load(OFFICIAL / "sd1.5_reneg_emb.bin", weights_only=True)
    out = rig.run(p, torch.randn(2, 154, 768, dtype=torch.float16))
    assert torch.equal(out, match_tokens(official, 154).half().expand(2, -1, -1))

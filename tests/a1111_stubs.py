"""Just enough of AUTOMATIC1111's ``modules.*`` and of gradio to load the ReNeg script.

Modelled on A1111 1.10 / Forge (modules/scripts.py, script_callbacks.py,
script_loading.py, ui_components.py, options.py, scripts/xyz_grid.py); written
for these tests, no host code copied. The fake gradio accepts only the
components and keyword arguments that exist in both gradio 3.41 and 4.40, so a
script that uses anything else fails here.

``install(models_path, ...)`` returns a namespace of the fake modules and puts
them in ``sys.modules``; ``uninstall(saved)`` puts the previous entries back.
``load_script(path)`` loads a script file the way A1111 does (by path, module
name = file name, the extension folder on sys.path while it loads).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import sys
import types
from collections import namedtuple

STUBBED = ("gradio", "modules", "modules.scripts", "modules.script_callbacks", "modules.shared",
           "modules.paths", "modules.ui_components", "modules.sd_models", "launch")


# --------------------------------------------------------------------------- gradio

_COMMON = {"label", "elem_id", "elem_classes", "visible", "interactive", "show_label", "min_width",
           "scale", "info", "container"}


class Block:
    allowed: set = set()

    def __init__(self, *args, **kwargs):
        bad = set(kwargs) - self.allowed - _COMMON
        if bad:
            raise TypeError(f"gr.{type(self).__name__} has no argument(s) {sorted(bad)} in gradio 3.41/4.40")
        self.args, self.kwargs = args, kwargs
        self.label = kwargs.get("label")
        self.elem_id = kwargs.get("elem_id")
        self.value = kwargs.get("value", args[0] if args and self.first_is_value else None)
        self.events = []
        self.children = []
        Block.created.append(self)
        if Block.stack:
            Block.stack[-1].children.append(self)

    first_is_value = True
    stack: list = []  # the open `with` blocks
    created: list = []  # every block made, oldest first

    def __enter__(self):
        Block.stack.append(self)
        return self

    def __exit__(self, *exc):
        Block.stack.pop()
        return False

    def click(self, fn=None, inputs=None, outputs=None, **kw):
        self.events.append(("click", fn, inputs, outputs))

    def change(self, fn=None, inputs=None, outputs=None, **kw):
        self.events.append(("change", fn, inputs, outputs))


class Accordion(Block):
    allowed = {"open"}
    first_is_value = False

    def __init__(self, label=None, **kwargs):
        super().__init__(label=label, **kwargs)


class Row(Block):
    allowed = {"variant", "equal_height"}
    first_is_value = False


class Column(Row):
    pass


class Group(Row):
    pass


class Checkbox(Block):
    allowed = {"value"}


class Dropdown(Block):
    allowed = {"choices", "value", "type", "multiselect", "allow_custom_value", "max_choices"}

    def __init__(self, choices=None, value=None, **kwargs):
        super().__init__(choices=choices, value=value, **kwargs)
        self.choices = list(choices or [])


class Slider(Block):
    allowed = {"minimum", "maximum", "step", "value", "randomize"}


class Button(Block):
    allowed = {"value", "variant", "size", "icon", "link"}


class HTML(Block):
    allowed = {"value"}


class Markdown(HTML):
    pass


def update(**kwargs):
    return {"__type__": "update", **kwargs}


def make_gradio() -> types.ModuleType:
    gr = types.ModuleType("gradio")
    for cls in (Block, Accordion, Row, Column, Group, Checkbox, Dropdown, Slider, Button, HTML, Markdown):
        setattr(gr, cls.__name__, cls)
    gr.update = update
    gr.__version__ = "3.41.2-stub"
    return gr


# --------------------------------------------------------------------------- modules.*

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


def make_script_callbacks(with_name_arg: bool = True) -> types.ModuleType:
    m = types.ModuleType("modules.script_callbacks")
    m.callback_map = {k: [] for k in ("callbacks_cfg_denoiser", "callbacks_ui_settings",
                                      "callbacks_before_ui", "callbacks_model_loaded")}
    m.errors = []
    m.CFGDenoiserParams = CFGDenoiserParams

    def adder(key):
        if with_name_arg:
            def add(callback, *, name=None):
                m.callback_map[key].append(ScriptCallback("reneg_negative.py", callback, name))
        else:
            def add(callback):
                m.callback_map[key].append(ScriptCallback("reneg_negative.py", callback, None))
        return add

    m.on_cfg_denoiser = adder("callbacks_cfg_denoiser")
    m.on_ui_settings = adder("callbacks_ui_settings")
    m.on_before_ui = adder("callbacks_before_ui")
    m.on_model_loaded = adder("callbacks_model_loaded")

    def run(key, *args):  # like the host: every exception is caught and reported
        for c in m.callback_map[key]:
            try:
                c.callback(*args)
            except Exception as e:  # noqa: BLE001
                m.errors.append(e)

    m.cfg_denoiser_callback = lambda params: run("callbacks_cfg_denoiser", params)
    m.ui_settings_callback = lambda: run("callbacks_ui_settings")
    m.before_ui_callback = lambda: run("callbacks_before_ui")
    return m


class Script:
    filename = None
    args_from = args_to = None
    alwayson = False
    is_txt2img = is_img2img = False
    infotext_fields = None
    paste_field_names = None

    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        pass

    def elem_id(self, item_id):
        tab = "img2img" if self.is_img2img else "txt2img"
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tab}_{title}_{item_id}"


class OptionInfo:
    def __init__(self, default=None, label="", component=None, component_args=None, onchange=None,
                 section=None, refresh=None, **kwargs):
        self.default, self.label, self.section = default, label, section


class Options:
    def __init__(self):
        object.__setattr__(self, "data", {"CLIP_stop_at_last_layers": 1})
        object.__setattr__(self, "data_labels", {})

    def add_option(self, key, info):
        self.data_labels[key] = info
        self.data.setdefault(key, info.default)

    def __getattr__(self, item):
        if item in self.data:
            return self.data[item]
        if item in self.data_labels:
            return self.data_labels[item].default
        raise AttributeError(item)

    def __setattr__(self, key, value):
        self.data[key] = value


def make_ui_components(gr, with_input_accordion: bool = True) -> types.ModuleType:
    m = types.ModuleType("modules.ui_components")

    class ToolButton(gr.Button):
        pass

    m.ToolButton = ToolButton
    if with_input_accordion:
        class InputAccordionImpl(gr.Checkbox):
            """A checkbox that is also the accordion (hidden checkbox + gr.Accordion in the host)."""

            def __init__(self, value=None, **kwargs):
                super().__init__(value=value, **kwargs)
                self.accordion = gr.Accordion(kwargs.get("label", "Accordion"), open=bool(value))

            def __enter__(self):
                self.accordion.__enter__()
                return self

            def __exit__(self, *exc):
                return self.accordion.__exit__(*exc)

        m.InputAccordion = lambda value=None, **kw: InputAccordionImpl(value=value, **kw)
    return m


def install(models_path: str, *, with_input_accordion: bool = True, with_name_arg: bool = True,
            sd_model=None) -> tuple[types.SimpleNamespace, dict]:
    saved = {name: sys.modules.get(name) for name in STUBBED}
    gr = make_gradio()
    modules = types.ModuleType("modules")
    modules.__path__ = []
    scripts = types.ModuleType("modules.scripts")
    scripts.Script = Script
    scripts.AlwaysVisible = object()
    scripts.scripts_data = []
    scripts.ScriptClassData = ScriptClassData
    callbacks = make_script_callbacks(with_name_arg)
    shared = types.ModuleType("modules.shared")
    shared.opts = Options()
    shared.OptionInfo = OptionInfo
    shared.models_path = models_path
    paths = types.ModuleType("modules.paths")
    paths.models_path = models_path
    sd_models = types.ModuleType("modules.sd_models")
    sd_models.model_data = types.SimpleNamespace(sd_model=sd_model)
    ui_components = make_ui_components(gr, with_input_accordion)
    ns = types.SimpleNamespace(gradio=gr, modules=modules, scripts=scripts, script_callbacks=callbacks,
                               shared=shared, paths=paths, sd_models=sd_models, ui_components=ui_components)
    sys.modules["gradio"] = gr
    sys.modules["modules"] = modules
    for short in ("scripts", "script_callbacks", "shared", "paths", "sd_models", "ui_components"):
        mod = getattr(ns, short)
        sys.modules[f"modules.{short}"] = mod
        setattr(modules, short, mod)
    return ns, saved


def uninstall(saved: dict) -> None:
    for name, mod in saved.items():
        if mod is None:
            sys.modules.pop(name, None)
        else:
            sys.modules[name] = mod


def load_script(path: str) -> types.ModuleType:
    """Load ``extensions/<ext>/scripts/x.py`` as A1111 does (script_loading.load_module)."""
    basedir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
    old = list(sys.path)
    sys.path.insert(0, basedir)
    try:
        spec = importlib.util.spec_from_file_location(os.path.basename(path), path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = old
    return module


def make_xyz_module() -> types.ModuleType:
    """A stand-in for scripts/xyz_grid.py: AxisOption and the axis_options list."""
    m = types.ModuleType("xyz_grid.py")

    class AxisOption:
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None,
                     prepare=None):
            self.label, self.type, self.apply = label, type, apply
            self.format_value, self.confirm, self.cost, self.choices = format_value, confirm, cost, choices

    class XYZScript(Script):
        def title(self):
            return "X/Y/Z plot"

    XYZScript.__module__ = "xyz_grid.py"
    m.AxisOption = AxisOption
    m.axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None)]
    m.Script = XYZScript
    return m


# --------------------------------------------------------------------------- a processing object


class FakeP:
    """The attributes of StableDiffusionProcessing the script reads."""

    def __init__(self, sd_model=None, enable_hr=False):
        self.extra_generation_params = {}
        self.comments = {}
        self.sd_model = sd_model
        self.enable_hr = enable_hr
        self.is_hr_pass = False

    def comment(self, text):
        self.comments[text] = 1


class DictWithShape(dict):
    """A1111's prompt_parser.DictWithShape: a dict with the crossattn shape."""

    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


# --------------------------------------------------------------------------- infotext (the format only)


def infotext_line(params: dict) -> str:
    """``k: v, k: v`` with values holding , : or a newline JSON-quoted, as A1111 writes them."""
    def q(v):
        v = str(v)
        return json.dumps(v, ensure_ascii=False) if any(c in v for c in ",:\n") else v
    return ", ".join(f"{k}: {q(v)}" for k, v in params.items() if v is not None)


def parse_infotext_line(line: str) -> dict:
    """The inverse of :func:`infotext_line`."""
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
            value = line[k:comma if comma >= 0 else n].strip()
        out[key] = value
        i = n if comma < 0 else comma + 1
    return out


def paste(infotext_fields, params: dict) -> dict:
    """What pasting ``params`` sets on each component: {component: value} (None = unchanged),
    converting strings to the component's value type as the host does."""
    out = {}
    for comp, key in infotext_fields:
        v = key(params) if callable(key) else params.get(key)
        if v is not None and not isinstance(v, dict):
            t = type(comp.value)
            if t is bool and v == "False":
                v = False
            elif t in (int, float):
                v = float(v)
            elif t is not type(None):
                v = t(v)
        out[comp] = v
    return out

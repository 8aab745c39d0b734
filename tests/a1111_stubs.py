"""Just enough of AUTOMATIC1111's ``modules.*`` and of gradio to load the ReNeg script's glue.

The extension's decisions live in ``reneg.hosts.a1111`` and are tested without any of this
(tests/test_a1111_host.py); this stub serves only the script file: loading, callback
registration, the gradio panel and its events, the X/Y/Z registration, the install ways.

Modelled on A1111 1.10 / Forge (modules/scripts.py, script_callbacks.py,
script_loading.py, ui_components.py, options.py, scripts/xyz_grid.py); written for these
tests, no host code copied. The fake gradio accepts only the components and keyword
arguments that exist in both gradio 3.41 and 4.40, so a script that uses anything else
fails here.

``install(models_path, ...)`` returns a namespace of the fake modules and puts them in
``sys.modules``; ``uninstall(saved)`` puts the previous entries back. ``load_script(path)``
loads a script file the way A1111 does (by path, module name = file name, the extension
folder on sys.path while it loads).
"""

from __future__ import annotations

import importlib.util
import os
import re
import sys
import types
from collections import namedtuple

STUBBED = (
    "gradio",
    "modules",
    "modules.scripts",
    "modules.script_callbacks",
    "modules.shared",
    "modules.paths",
    "modules.ui_components",
    "modules.sd_models",
    "launch",
)


# --------------------------------------------------------------------------- gradio

_COMMON = {
    "label",
    "elem_id",
    "elem_classes",
    "visible",
    "interactive",
    "show_label",
    "min_width",
    "scale",
    "info",
    "container",
}
_EVENT = {"fn", "inputs", "outputs", "queue", "show_progress"}  # keyword arguments both versions take


class Block:
    allowed: set = set()
    first_is_value = True
    stack: list = []  # the open `with` blocks
    created: list = []  # every block made, oldest first

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

    def __enter__(self):
        Block.stack.append(self)
        return self

    def __exit__(self, *exc):
        Block.stack.pop()
        return False

    def _event(self, kind, fn=None, inputs=None, outputs=None, **kw):
        bad = set(kw) - _EVENT
        if bad:
            raise TypeError(f"{type(self).__name__}.{kind} has no argument(s) {sorted(bad)} in gradio 3.41/4.40")
        self.events.append((kind, fn, inputs, outputs))

    def click(self, fn=None, inputs=None, outputs=None, **kw):
        self._event("click", fn, inputs, outputs, **kw)

    def change(self, fn=None, inputs=None, outputs=None, **kw):
        self._event("change", fn, inputs, outputs, **kw)


class Blocks(Block):
    first_is_value = False

    def load(self, fn=None, inputs=None, outputs=None, **kw):
        self._event("load", fn, inputs, outputs, **kw)

    def __exit__(self, *exc):
        super().__exit__(*exc)
        if Block.stack:  # a nested Blocks hands its children to the enclosing block, as gradio does
            parent = Block.stack[-1]
            parent.children.remove(self)
            parent.children.extend(self.children)
        return False


class Accordion(Block):
    allowed = {"open"}
    first_is_value = False

    def __init__(self, label=None, **kwargs):
        super().__init__(label=label, **kwargs)


class Row(Block):
    allowed = {"variant", "equal_height"}
    first_is_value = False


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


class Textbox(Block):
    allowed = {"value", "lines", "max_lines", "placeholder", "type"}


def update(**kwargs):
    return {"__type__": "update", **kwargs}


def make_gradio() -> types.ModuleType:
    gr = types.ModuleType("gradio")
    for cls in (Block, Blocks, Accordion, Row, Checkbox, Dropdown, Slider, Button, HTML, Textbox):
        setattr(gr, cls.__name__, cls)
    gr.update = update
    gr.__version__ = "3.41.2-stub"
    return gr


# --------------------------------------------------------------------------- modules.*

ScriptCallback = namedtuple("ScriptCallback", ["script", "callback", "name"])
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])


class CFGDenoiserParams:
    def __init__(
        self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None
    ):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


_CALLBACKS = ("cfg_denoiser", "ui_settings", "before_ui", "model_loaded")


def make_script_callbacks(with_name_arg: bool = True) -> types.ModuleType:
    m = types.ModuleType("modules.script_callbacks")
    m.callback_map = {f"callbacks_{k}": [] for k in _CALLBACKS}
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

    def runner(key):
        def run(*args):  # like the host: every exception is caught and reported
            for c in m.callback_map[key]:
                try:
                    c.callback(*args)
                except Exception as e:  # noqa: BLE001
                    m.errors.append(e)

        return run

    for k in _CALLBACKS:
        setattr(m, f"on_{k}", adder(f"callbacks_{k}"))
        setattr(m, f"{k}_callback", runner(f"callbacks_{k}"))
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

    def after_component(self, component, **kwargs):
        pass

    def elem_id(self, item_id):
        tab = "img2img" if self.is_img2img else "txt2img"
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tab}_{title}_{item_id}"


class OptionInfo:
    def __init__(
        self,
        default=None,
        label="",
        component=None,
        component_args=None,
        onchange=None,
        section=None,
        refresh=None,
        **kwargs,
    ):
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


def make_ui_components(gr, with_input_accordion: bool = True, host: str = "forge") -> types.ModuleType:
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

        if host == "a1111":  # A1111 1.6-1.10 (gradio 3.41): InputAccordion is the class itself
            InputAccordionImpl.__name__ = "InputAccordion"
            m.InputAccordion = InputAccordionImpl
        else:  # Forge (gradio 4): a function returning an InputAccordionImpl
            m.InputAccordion = lambda value=None, **kw: InputAccordionImpl(value=value, **kw)
    return m


_STORED = (Slider, Checkbox, Dropdown, Textbox)  # the types in this stub whose value ui-config.json keeps
_CONTAINERS = (Blocks, Accordion, Row)


def ui_config_keys(block, input_accordion, path: str) -> set:
    """The ``.../value`` keys the web UI's ``ui-config.json`` keeps for the components in ``block``.

    Modelled on ``modules/ui_loadsave.py`` (``UiLoadsave.add_block``/``add_component``), the same
    in A1111 1.10.1 and Forge f2.0.1: containers are walked, a component with a label is stored
    under ``<path>/<label>/value`` when its *exact* type is one of gradio's (a subclass is not), or
    when its type is ``modules.ui_components.InputAccordion``. In A1111 that name is the class, so
    an input accordion is stored; in Forge it is a function, which no type equals, so no input
    accordion is (neither ReNeg's nor the web UI's own Hires. fix)."""
    keys = set()
    for c in block.children:
        if isinstance(c, _CONTAINERS):
            keys |= ui_config_keys(c, input_accordion, path)
        elif c.label is not None and (type(c) in _STORED or type(c) is input_accordion):
            keys.add(f"{path}/{c.label}/value")
    return keys


def install(
    models_path: str,
    *,
    with_input_accordion: bool = True,
    with_name_arg: bool = True,
    sd_model=None,
    host: str = "forge",
) -> tuple[types.SimpleNamespace, dict]:
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
    ui_components = make_ui_components(gr, with_input_accordion, host)
    ns = types.SimpleNamespace(
        gradio=gr,
        modules=modules,
        scripts=scripts,
        script_callbacks=callbacks,
        shared=shared,
        paths=paths,
        sd_models=sd_models,
        ui_components=ui_components,
    )
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
        def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
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

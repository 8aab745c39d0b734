"""ReNeg learned negative embeddings for AUTOMATIC1111 (1.6-1.10), Forge and reForge.

A ReNeg embedding lives in the text encoder's *output* space, so it replaces the
unconditional (negative) conditioning of classifier-free guidance at every
sampling step, through the one hook every host has: ``on_cfg_denoiser``.

This file is the web UI glue only: it finds the ``reneg`` package, builds the gradio
panel, registers the callbacks and holds the script class. Every decision (files,
model families, the panel's list and status, what a generation applies, the hook's
tensor work, infotext, X/Y/Z axes) is made by :mod:`reneg.hosts.a1111`, which also
documents the script's arguments and infotext.

Imports nothing heavier than torch and safetensors (A1111 pins transformers 4.30).
"""

from __future__ import annotations

import html
import os
import sys

import gradio as gr
from modules import script_callbacks, scripts, shared

try:
    from modules import paths as _paths
except ImportError:  # pragma: no cover - every host has it
    _paths = None

TITLE = "ReNeg"
NONE = "None"
OPT_DIR = "reneg_dir"
EXT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CORE_FILES = (("embedding.py",), ("uncond.py",), ("hosts", "a1111.py"))


def log(msg: str) -> None:
    print(msg if msg.startswith("ReNeg") else f"ReNeg: {msg}", flush=True)


# --------------------------------------------------------------------------- finding the core


def find_core_root(start: str) -> str | None:
    """The nearest folder at or above ``start`` holding the ``reneg`` package's files this script uses."""
    d = start if os.path.isdir(start) else os.path.dirname(start)
    while True:
        if all(os.path.isfile(os.path.join(d, "reneg", *f)) for f in _CORE_FILES):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def _import_core():
    """Import the ``reneg`` package: installed, else found above this file (linked or copied)."""
    try:
        import reneg.hosts.a1111  # noqa: F401

        pkg = sys.modules["reneg"]
        parent = os.path.dirname(os.path.dirname(os.path.abspath(pkg.__file__)))
        in_repo = os.path.isdir(os.path.join(parent, "a1111_extension"))  # an editable install
        return pkg, (parent if in_repo else None), None
    except ImportError:
        for name in [m for m in sys.modules if m == "reneg" or m.startswith("reneg.")]:
            del sys.modules[name]
    here = os.path.abspath(__file__)
    root = find_core_root(os.path.realpath(here)) or find_core_root(here)
    if root is None:
        return (
            None,
            None,
            (
                "the ReNeg core (the 'reneg' Python package) was not found. Install the extension by "
                "linking the repository's a1111_extension folder (ln -s / mklink /J), or copy the "
                "repository's reneg folder into this extension's folder, or pip install the repository."
            ),
        )
    if root not in sys.path:
        sys.path.append(root)  # appended: nothing in the repository shadows a host module
    try:
        import reneg.hosts.a1111  # noqa: F401

        return sys.modules["reneg"], root, None
    except ImportError as e:
        return None, root, f"the ReNeg core in {root} could not be imported: {e}"


reneg, CORE_ROOT, CORE_ERROR = _import_core()
if reneg is not None:
    from reneg.hosts import a1111 as core
else:
    core = None
    log(CORE_ERROR)


# --------------------------------------------------------------------------- what the web UI tells us


def embedding_folders() -> list[str]:
    """Where embeddings are looked for, first match of a name wins (see :func:`reneg.hosts.a1111.embedding_folders`)."""
    models = getattr(shared, "models_path", None) or getattr(_paths, "models_path", None)
    extra = getattr(getattr(shared, "opts", None), OPT_DIR, "")
    return core.embedding_folders(models, extra, EXT_DIR, CORE_ROOT)


def loaded_model():
    """The loaded model without loading one (A1111's ``shared.sd_model`` loads it on first access)."""
    sd_models = sys.modules.get("modules.sd_models")
    data = getattr(sd_models, "model_data", None)
    return getattr(data, "sd_model", None) if data is not None else None


def _clip_skip():
    return getattr(getattr(shared, "opts", None), "CLIP_stop_at_last_layers", 1)


host = core.Host(embedding_folders, loaded_model, _clip_skip) if core is not None else None
store = host.store if host is not None else None


def choices_and_status(refresh: bool = False) -> tuple[list[str], str]:
    if host is None:
        return [], f"<p style='color:#d33'>ReNeg is disabled: {html.escape(CORE_ERROR)}</p>"
    return host.choices_and_status(refresh=refresh)


def panel_update(current, refresh: bool = False):
    """The dropdown and the status line for the model now loaded (a gradio event handler)."""
    try:
        if host is None:
            return gr.update(), choices_and_status()[1]
        choices, value, status = host.panel_state(current, refresh=refresh)
        if value == current:  # leave the value alone: the user may be picking one right now
            return gr.update(choices=choices), status
        return gr.update(choices=choices, value=value), status
    except Exception as e:  # a UI event must never take the page down
        log(f"could not update the panel: {type(e).__name__}: {e}")
        return gr.update(), gr.update()


def refresh_panel(current):
    return panel_update(current, refresh=True)


# --------------------------------------------------------------------------- callbacks


def on_cfg_denoiser(params) -> None:
    """Registered once at import; does nothing unless ``process`` armed this generation."""
    if host is not None:
        host.on_cfg_denoiser(params)


on_cfg_denoiser._reneg_hook = True


def on_model_loaded(sd_model) -> None:
    if host is not None:
        host.on_model_loaded(sd_model)


on_model_loaded._reneg_hook = True


def _register(kind: str, fn) -> None:
    """``script_callbacks.on_<kind>(fn)``, once: a reload of this file leaves no older copy behind."""
    add = getattr(script_callbacks, f"on_{kind}", None)
    if add is None:
        return
    callbacks = getattr(script_callbacks, "callback_map", {}).get(f"callbacks_{kind}")
    if callbacks is not None:
        for c in [c for c in callbacks if getattr(getattr(c, "callback", None), "_reneg_hook", False)]:
            callbacks.remove(c)
    try:
        add(fn, name="reneg")
    except TypeError:  # older hosts take no name argument
        add(fn)


def on_ui_settings() -> None:
    section = ("reneg", "ReNeg")
    shared.opts.add_option(
        OPT_DIR,
        shared.OptionInfo(
            "", "Extra folder with ReNeg negative embeddings (searched after models/reneg)", section=section
        ),
    )


def register_xyz_axes() -> bool:
    """Add the ReNeg axes to the built-in X/Y/Z plot script."""
    xyz = core.find_xyz_module(getattr(scripts, "scripts_data", [])) if core is not None else None
    if xyz is None:
        return False
    core.add_xyz_axes(xyz, host)
    return True


# --------------------------------------------------------------------------- the script


def _ui_components():
    try:
        from modules import ui_components
    except ImportError:
        return None, None
    return getattr(ui_components, "InputAccordion", None), getattr(ui_components, "ToolButton", None)


# Every tab's panel follows a generation in any tab: Forge loads the model at the first
# generation, and a txt2img one must bring the img2img panel up to date too. A script object
# sees only its own tab's components (after_component), so the panels and the tabs' generation
# infos are gathered here, for this load of the script, and each pair is connected once.
_PANELS: list = []  # (dropdown, status) of every panel built
_GEN_INFOS: list = []  # every tab's hidden generation-info Textbox, which changes after each generation
_WIRED: set = set()  # (id(generation info), id(dropdown)) pairs already connected
GEN_INFO_IDS = ("generation_info_txt2img", "generation_info_img2img")


def _wire_panels() -> None:
    for gen_info in _GEN_INFOS:
        for embedding, status in _PANELS:
            key = (id(gen_info), id(embedding))
            if key not in _WIRED:
                gen_info.change(fn=panel_update, inputs=[embedding], outputs=[embedding, status], show_progress=False)
                _WIRED.add(key)


class ReNegScript(scripts.Script):
    sorting_priority = 15

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        input_accordion, tool_button = _ui_components()
        names, status_html = choices_and_status()
        # a Blocks of our own, as the web UI's built-in "Extra options" script does, for a page-load event
        with gr.Blocks() as interface:
            if input_accordion is not None:
                with input_accordion(False, label=TITLE, elem_id=self.elem_id("enabled")) as enabled:
                    embedding, strength, hires, status = self._controls(names, status_html, tool_button, is_img2img)
            else:
                with gr.Accordion(TITLE, open=False):
                    enabled = gr.Checkbox(value=False, label="Enable ReNeg", elem_id=self.elem_id("enabled"))
                    embedding, strength, hires, status = self._controls(names, status_html, tool_button, is_img2img)
        # every page opened shows the list and status for the model loaded by then
        interface.load(
            fn=panel_update, inputs=[embedding], outputs=[embedding, status], queue=False, show_progress=False
        )
        _PANELS.append((embedding, status))
        _wire_panels()
        comps = [enabled, embedding, strength, hires]
        if core is not None:
            self.infotext_fields = [(comps[i], key) for i, key in core.INFOTEXT_FIELDS]
            self.paste_field_names = list(core.PASTE_FIELD_NAMES)
        return comps

    def _controls(self, names, status_html, tool_button, is_img2img):
        with gr.Row():
            # "None" on first start; a user's own default is kept by the web UI's ui-config.json
            # (Settings > Defaults > Apply), and restored when that file is still listed
            embedding = gr.Dropdown(
                label="Negative embedding",
                choices=[NONE] + names,
                value=NONE,
                allow_custom_value=True,
                elem_id=self.elem_id("embedding"),
            )
            button = tool_button or gr.Button
            refresh = button(value="\U0001f504", elem_id=self.elem_id("refresh"))
        with gr.Row():
            strength = gr.Slider(
                minimum=0.0,
                maximum=1.0,
                step=0.05,
                value=1.0,
                label="Strength (0 = negative prompt, 1 = embedding only)",
                elem_id=self.elem_id("strength"),
            )
            # img2img has no hires pass: the box is kept (the script's arguments keep their places) but hidden
            hires = gr.Checkbox(
                value=True, label="Apply to hires pass", visible=not is_img2img, elem_id=self.elem_id("hires")
            )
        status = gr.HTML(value=status_html, elem_id=self.elem_id("status"))
        refresh.click(fn=refresh_panel, inputs=[embedding], outputs=[embedding, status])
        return embedding, strength, hires, status

    def after_component(self, component, **kwargs):
        """Follow the model in pages already open: a tab's generation info (a hidden Textbox
        holding the last generation's JSON) changes once after every generation, which is when
        Forge loads (or switches) the model; it updates every tab's panel. Not the visible info
        HTML: gradio 4's HTML fires "change" again whenever an event it triggered updates, a loop
        without end."""
        elem_id = kwargs.get("elem_id") or getattr(component, "elem_id", None)
        if elem_id in GEN_INFO_IDS and isinstance(component, gr.Textbox):
            if not any(g is component for g in _GEN_INFOS):
                _GEN_INFOS.append(component)
            _wire_panels()

    def process(self, p, *args):
        if host is None:
            if _asks_for_reneg(args):
                log(f"not applied: {CORE_ERROR}")
            return
        host.process(p, *args)

    def postprocess(self, p, processed, *args):
        if host is not None:
            host.postprocess(p)


def _asks_for_reneg(args) -> bool:
    """Without the core: whether the arguments ask for ReNeg (to say why it is not applied)."""
    on = args[0] if args else False
    on = on.strip().lower() in ("1", "true", "yes", "on") if isinstance(on, str) else bool(on)
    return on and str(args[1] if len(args) > 1 else NONE).strip() not in ("", NONE)


_register("cfg_denoiser", on_cfg_denoiser)
_register("model_loaded", on_model_loaded)
script_callbacks.on_ui_settings(on_ui_settings)
if hasattr(script_callbacks, "on_before_ui"):
    script_callbacks.on_before_ui(register_xyz_axes)
else:  # pragma: no cover - very old hosts: xyz_grid (a root script) is loaded before extensions
    register_xyz_axes()

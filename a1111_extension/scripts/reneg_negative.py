"""ReNeg learned negative embeddings for AUTOMATIC1111 (1.6-1.10), Forge and reForge.

A ReNeg embedding lives in the text encoder's *output* space, so it replaces the
unconditional (negative) conditioning of classifier-free guidance at every
sampling step, through the one hook every host has: ``on_cfg_denoiser``.
The tensor work is done by :mod:`reneg.uncond`; this file is the host shell.

Script arguments, in this order (the UI passes them, and so does the API under
``alwayson_scripts: {"reneg": {"args": [...]}}``; missing ones keep their defaults):

    0  enabled      bool   default False
    1  embedding    str    a name as listed in the dropdown (e.g. "sd15_reneg.safetensors"),
                           its stem ("sd15_reneg"), or "None"
    2  strength     float  0..1, default 1 (0 = the negative prompt, 1 = the embedding only)
    3  hires        bool   default True: also replace the negative in the hires-fix pass

Infotext: ``ReNeg: <name>, ReNeg strength: <s>, ReNeg hash: <sha256[:10]>`` and
``ReNeg hires: False`` when a hires pass runs without it.

Imports nothing heavier than torch and safetensors (A1111 pins transformers 4.30).
"""

from __future__ import annotations

import html
import os
import sys
import threading
import weakref

import gradio as gr
import torch

from modules import script_callbacks, scripts, shared

try:
    from modules import paths as _paths
except ImportError:  # pragma: no cover - every host has it
    _paths = None

TITLE = "ReNeg"
NONE = "None"
ARG_NAMES = ("enabled", "embedding", "strength", "hires")
ARG_DEFAULTS = (False, NONE, 1.0, True)
OPT_DIR = "reneg_dir"
P_ATTR = "_reneg_active"
XYZ_EMBEDDING = "reneg_xyz_embedding"
XYZ_STRENGTH = "reneg_xyz_strength"
AXIS_EMBEDDING = "[ReNeg] Embedding"
AXIS_STRENGTH = "[ReNeg] Strength"
HOST_FAMILIES = ("sd1", "sd2", "sdxl")
UNSUPPORTED = "unsupported"
EXT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def log(msg: str) -> None:
    print(msg if msg.startswith("ReNeg") else f"ReNeg: {msg}", flush=True)


# --------------------------------------------------------------------------- finding the core


def find_core_root(start: str) -> str | None:
    """The nearest folder at or above ``start`` holding ``reneg/embedding.py`` and ``reneg/uncond.py``."""
    d = start if os.path.isdir(start) else os.path.dirname(start)
    while True:
        pkg = os.path.join(d, "reneg")
        if os.path.isfile(os.path.join(pkg, "embedding.py")) and os.path.isfile(os.path.join(pkg, "uncond.py")):
            return d
        parent = os.path.dirname(d)
        if parent == d:
            return None
        d = parent


def _import_core():
    """Import the ``reneg`` package: installed, else found above this file (linked or copied)."""
    try:
        import reneg.embedding  # noqa: F401
        import reneg.uncond  # noqa: F401
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
        return None, None, (
            "the ReNeg core (the 'reneg' Python package) was not found. Install the extension by "
            "linking the repository's a1111_extension folder (ln -s / mklink /J), or copy the "
            "repository's reneg folder into this extension's folder, or pip install the repository.")
    if root not in sys.path:
        sys.path.append(root)  # appended: nothing in the repository shadows a host module
    try:
        import reneg.embedding  # noqa: F401,F811
        import reneg.uncond  # noqa: F401,F811
        return sys.modules["reneg"], root, None
    except ImportError as e:
        return None, root, f"the ReNeg core in {root} could not be imported: {e}"


reneg, CORE_ROOT, CORE_ERROR = _import_core()
if reneg is not None:
    from reneg.embedding import EmbeddingError, _sha256, list_embedding_files, load_embedding
    from reneg.families import FAMILIES, family_for_hidden
    from reneg.uncond import content_length, crossattn_of, replace_uncond
else:
    log(CORE_ERROR)


# --------------------------------------------------------------------------- embedding files


def embedding_folders() -> list[str]:
    """Where embeddings are looked for, first match of a name wins."""
    out = []
    models = getattr(shared, "models_path", None) or getattr(_paths, "models_path", None)
    if models:
        out.append(os.path.join(models, "reneg"))
    extra = str(getattr(getattr(shared, "opts", None), OPT_DIR, "") or "").strip()
    if extra:
        out.append(os.path.expanduser(extra))
    out.append(os.path.join(EXT_DIR, "embeddings"))
    if CORE_ROOT:
        out.append(os.path.join(CORE_ROOT, "embeddings"))
    seen, unique = set(), []
    for folder in out:
        key = os.path.normcase(os.path.realpath(folder))
        if key not in seen:
            seen.add(key)
            unique.append(folder)
    return unique


class EmbeddingStore:
    """Names -> files, and loaded embeddings cached by path, mtime and size."""

    def __init__(self):
        self.lock = threading.Lock()
        self.cache: dict[str, tuple] = {}  # path -> ((mtime_ns, size), NegEmbedding | error str, hash)
        self.names: dict[str, str] = {}

    def refresh(self) -> dict[str, str]:
        names: dict[str, str] = {}
        if reneg is not None:
            folders = embedding_folders()
            try:
                os.makedirs(folders[0], exist_ok=True)  # models/reneg: shows users where files go
            except OSError:
                pass
            for folder in folders:
                for path in list_embedding_files(folder):
                    names.setdefault(os.path.relpath(path, folder).replace(os.sep, "/"), path)
        with self.lock:
            self.names = names
        return names

    def resolve(self, name) -> tuple[str, str] | None:
        """``(listed name, path)`` for a listed name or its stem (any case); refreshes once if unknown."""
        name = str(name or "").strip()
        if not name or name == NONE:
            return None
        found = self._match(name, self.names)
        return found if found is not None else self._match(name, self.refresh())

    @staticmethod
    def _match(name: str, names: dict[str, str]) -> tuple[str, str] | None:
        if name in names:
            return name, names[name]
        low = name.lower()
        for n, path in names.items():
            if low in (n.lower(), os.path.splitext(n)[0].lower()):
                return n, path
        return None

    def _entry(self, path: str):
        st = os.stat(path)
        key = (st.st_mtime_ns, st.st_size)
        with self.lock:
            hit = self.cache.get(path)
        if hit is not None and hit[0] == key:
            return hit
        try:
            value = load_embedding(path)
        except EmbeddingError as e:
            value = str(e)
            log(f"ReNeg: cannot use {value}")
        entry = (key, value, None)
        with self.lock:
            self.cache[path] = entry
        return entry

    def load(self, path: str):
        """The NegEmbedding at ``path``; raises EmbeddingError (cached too) for a bad file."""
        value = self._entry(path)[1]
        if isinstance(value, str):
            raise EmbeddingError(value)
        return value

    def family(self, path: str) -> str | None:
        try:
            return self.load(path).family
        except (EmbeddingError, OSError):
            return None

    def short_hash(self, path: str) -> str:
        """First ten hex digits of the file's SHA-256, computed once per file version."""
        key, value, digest = self._entry(path)
        if digest is None:
            digest = _sha256(path)[:10]
            with self.lock:
                self.cache[path] = (key, value, digest)
        return digest


store = EmbeddingStore()


# --------------------------------------------------------------------------- the model in use


def loaded_model():
    """The loaded model without loading one (A1111's ``shared.sd_model`` loads it on first access)."""
    sd_models = sys.modules.get("modules.sd_models")
    data = getattr(sd_models, "model_data", None)
    return getattr(data, "sd_model", None) if data is not None else None


def model_family(sd_model) -> str | None:
    """'sd1' / 'sd2' / 'sdxl'; UNSUPPORTED for another kind of model; None when unknown."""
    if sd_model is None or reneg is None:
        return None
    if getattr(sd_model, "is_sd3", False):
        return UNSUPPORTED
    empty = crossattn_of(getattr(sd_model, "cond_stage_model_empty_prompt", None))
    if isinstance(empty, torch.Tensor) and empty.dim() >= 2:  # the host's E(""): its hidden size
        fam = family_for_hidden(empty.shape[-1])
        return fam.name if fam is not None and fam.name in HOST_FAMILIES else UNSUPPORTED
    for flag, fam in (("is_sdxl", "sdxl"), ("is_sd2", "sd2"), ("is_sd1", "sd1")):
        if getattr(sd_model, flag, False) is True:
            return fam
    if any(hasattr(sd_model, f) for f in ("is_sdxl", "is_sd2", "is_sd1")):
        return UNSUPPORTED  # e.g. Flux on Forge
    return None


def _family_label(fam: str | None) -> str:
    if reneg is not None and fam in FAMILIES:
        return FAMILIES[fam].description
    return str(fam)


def choices_and_status(refresh: bool = False) -> tuple[list[str], str]:
    """Dropdown names for the loaded model's family, and an HTML line saying what was found."""
    if reneg is None:
        return [], f"<p style='color:#d33'>ReNeg is disabled: {html.escape(CORE_ERROR)}</p>"
    names = store.refresh() if refresh or not store.names else store.names
    fam = model_family(loaded_model())
    shown, other, bad = [], 0, []
    for name, path in names.items():
        f = store.family(path)
        if f is None:
            bad.append(name)
        elif f not in HOST_FAMILIES:
            other += 1
        elif fam in (None, f):
            shown.append(name)
        else:
            other += 1
    folders = ", ".join(embedding_folders()[:2])
    if not names:
        msg = f"No ReNeg embeddings found. Put .safetensors / .bin files in {folders}."
    elif fam == UNSUPPORTED:
        msg = "The loaded model is not SD 1.x, SD 2.x or SDXL: ReNeg has no embeddings for it."
        shown = []
    elif fam is None:
        msg = f"{len(shown)} embedding(s); no model loaded yet, so all families are listed (press refresh later)."
    else:
        msg = f"{len(shown)} embedding(s) for {_family_label(fam)}"
        if other:
            msg += f"; {other} for other model families hidden"
        if not shown:
            msg = f"No ReNeg embedding for {_family_label(fam)} in {folders}" + (
                f" ({other} for other families hidden)" if other else "")
    if bad:
        msg += f"; unreadable: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} (see the console)"
    return sorted(shown, key=str.casefold), f"<p>{html.escape(msg)}</p>"


# --------------------------------------------------------------------------- per-generation state


class Active:
    """What one generation applies; stored on ``p`` (and as the fallback for hosts whose
    CFGDenoiserParams carry no denoiser)."""

    def __init__(self, emb, strength: float, hires: bool, p):
        self.tensor = emb.tensor
        self.pooled = getattr(emb, "pooled", None)  # SDXL: the pooled vector the embedding was trained with
        self.rows = int(emb.tensor.shape[1])
        self.strength = strength
        self.hires = hires
        try:
            self._p = weakref.ref(p)
        except TypeError:
            self._p = lambda p=p: p
        self.warned: set[str] = set()
        self._cast: tuple | None = None

    @property
    def p(self):
        return self._p()

    def tensor_like(self, host: torch.Tensor) -> torch.Tensor:
        """The embedding on the host tensor's device and dtype, converted once per generation."""
        key = (host.device, host.dtype)
        if self._cast is None or self._cast[0] != key:
            self._cast = (key, self.tensor.to(device=host.device, dtype=host.dtype))
        return self._cast[1]

    def warn(self, msg: str) -> None:
        """Say it once per generation."""
        if msg not in self.warned:
            self.warned.add(msg)
            warn(self.p, msg)


_fallback: dict[str, Active | None] = {"active": None}


def warn(p, msg: str) -> None:
    """To the console, and to the comments shown under the image in the UI."""
    log(msg)
    comment = getattr(p, "comment", None)
    if callable(comment):
        try:
            comment(msg)
        except Exception:
            pass


def deactivate(p) -> None:
    active = getattr(p, P_ATTR, None) if p is not None else None
    if active is not None:
        try:
            delattr(p, P_ATTR)
        except AttributeError:
            setattr(p, P_ATTR, None)
    if _fallback["active"] is not None and (active is None or _fallback["active"] is active):
        _fallback["active"] = None


def as_strength(v) -> float:
    """A strength from the UI, the API or an X/Y/Z axis: clamped to 0..1, 1 when unreadable."""
    try:
        s = float(v)
    except (TypeError, ValueError):
        return 1.0
    return min(max(s, 0.0), 1.0) if s == s else 1.0


def parse_args(args) -> tuple[bool, str, float, bool]:
    """The four script args (see the module docstring), coerced, with defaults for missing ones."""
    enabled, name, strength, hires = list(args[: len(ARG_DEFAULTS)]) + list(ARG_DEFAULTS[len(args):])

    def as_bool(v, default):
        if isinstance(v, str):
            return v.strip().lower() in ("1", "true", "yes", "on")
        return default if v is None else bool(v)

    return as_bool(enabled, False), str(name or NONE).strip() or NONE, as_strength(strength), as_bool(hires, True)


# --------------------------------------------------------------------------- the CFG hook


def _active_for(params):
    p = getattr(getattr(params, "denoiser", None), "p", None)
    if p is not None:
        return getattr(p, P_ATTR, None), p
    active = _fallback["active"]
    return active, (active.p if active is not None else None)


def on_cfg_denoiser(params) -> None:
    """Registered once at import; does nothing unless ``process`` activated this generation."""
    active = None
    try:
        active, p = _active_for(params)
        if active is None or params.text_uncond is None:
            return
        if not active.hires and getattr(p, "is_hr_pass", False):
            return
        host = crossattn_of(params.text_uncond)
        emb = active.tensor_like(host) if isinstance(host, torch.Tensor) else active.tensor
        length = content_length(getattr(params, "text_cond", None), active.rows)
        new, msg = replace_uncond(params.text_uncond, emb, active.strength, length=length, pooled=active.pooled)
        if msg:
            active.warn(msg)
        if new is not None:
            params.text_uncond = new
    except Exception as e:  # never break sampling: the host would only log it
        msg = f"ReNeg: skipped this step after an error: {type(e).__name__}: {e}"
        if active is not None:
            active.warn(msg)
        else:
            log(msg)


on_cfg_denoiser._reneg_hook = True


def _register_cfg_hook() -> None:
    # a reload of this file must not leave an older copy of the hook behind
    callbacks = getattr(script_callbacks, "callback_map", {}).get("callbacks_cfg_denoiser")
    if callbacks is not None:
        for c in [c for c in callbacks if getattr(getattr(c, "callback", None), "_reneg_hook", False)]:
            callbacks.remove(c)
    try:
        script_callbacks.on_cfg_denoiser(on_cfg_denoiser, name="reneg")
    except TypeError:  # older hosts take no name argument
        script_callbacks.on_cfg_denoiser(on_cfg_denoiser)


# --------------------------------------------------------------------------- settings and X/Y/Z plot


def on_ui_settings() -> None:
    section = ("reneg", "ReNeg")
    shared.opts.add_option(OPT_DIR, shared.OptionInfo(
        "", "Extra folder with ReNeg negative embeddings (searched after models/reneg)", section=section))


def _xyz_apply_embedding(p, x, xs):
    setattr(p, XYZ_EMBEDDING, x)


def _xyz_apply_strength(p, x, xs):
    setattr(p, XYZ_STRENGTH, float(x))


def _xyz_confirm_embedding(p, xs):
    for x in xs:
        if str(x).strip() != NONE and store.resolve(x) is None:
            raise RuntimeError(f"ReNeg: unknown embedding {x!r}; looked in {', '.join(embedding_folders())}")


def _xyz_choices():
    return [NONE] + choices_and_status()[0]


def register_xyz_axes() -> bool:
    """Add the ReNeg axes to the built-in X/Y/Z plot script, once per loaded copy of it."""
    xyz = None
    for data in getattr(scripts, "scripts_data", []):
        module = getattr(data, "module", None)
        if getattr(data.script_class, "__module__", None) in ("xyz_grid.py", "xy_grid.py") and module is not None:
            xyz = module
            break
    if xyz is None or not hasattr(xyz, "AxisOption") or not hasattr(xyz, "axis_options"):
        return False
    have = {getattr(o, "label", None) for o in xyz.axis_options}
    if AXIS_EMBEDDING not in have:
        xyz.axis_options.append(xyz.AxisOption(AXIS_EMBEDDING, str, _xyz_apply_embedding,
                                               confirm=_xyz_confirm_embedding, choices=_xyz_choices))
    if AXIS_STRENGTH not in have:
        xyz.axis_options.append(xyz.AxisOption(AXIS_STRENGTH, float, _xyz_apply_strength))
    return True


# --------------------------------------------------------------------------- the script


def _ui_components():
    try:
        from modules import ui_components
    except ImportError:
        return None, None
    return getattr(ui_components, "InputAccordion", None), getattr(ui_components, "ToolButton", None)


def _paste_hires(d):
    if "ReNeg" not in d:
        return None
    return str(d.get("ReNeg hires", "True")).strip().lower() != "false"


class ReNegScript(scripts.Script):
    sorting_priority = 15

    def title(self):
        return TITLE

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        input_accordion, tool_button = _ui_components()
        names, status_html = choices_and_status()
        if input_accordion is not None:
            with input_accordion(False, label=TITLE, elem_id=self.elem_id("enabled")) as enabled:
                embedding, strength, hires = self._controls(names, status_html, tool_button)
        else:
            with gr.Accordion(TITLE, open=False):
                enabled = gr.Checkbox(value=False, label="Enable ReNeg", elem_id=self.elem_id("enabled"))
                embedding, strength, hires = self._controls(names, status_html, tool_button)
        self.infotext_fields = [
            (enabled, lambda d: "ReNeg" in d),
            (embedding, "ReNeg"),
            (strength, "ReNeg strength"),
            (hires, _paste_hires),
        ]
        self.paste_field_names = ["ReNeg", "ReNeg strength"]
        return [enabled, embedding, strength, hires]

    def _controls(self, names, status_html, tool_button):
        with gr.Row():
            embedding = gr.Dropdown(label="Negative embedding", choices=[NONE] + names,
                                    value=names[0] if names else NONE, allow_custom_value=True,
                                    elem_id=self.elem_id("embedding"))
            button = tool_button or gr.Button
            refresh = button(value="\U0001f504", elem_id=self.elem_id("refresh"))
        with gr.Row():
            strength = gr.Slider(minimum=0.0, maximum=1.0, step=0.05, value=1.0,
                                 label="Strength (0 = negative prompt, 1 = embedding only)",
                                 elem_id=self.elem_id("strength"))
            hires = gr.Checkbox(value=True, label="Apply to hires pass", elem_id=self.elem_id("hires"))
        status = gr.HTML(value=status_html, elem_id=self.elem_id("status"))

        def do_refresh(current):
            names, status_html = choices_and_status(refresh=True)
            value = current if current in names else (names[0] if names else NONE)
            return gr.update(choices=[NONE] + names, value=value), status_html

        refresh.click(fn=do_refresh, inputs=[embedding], outputs=[embedding, status])
        return embedding, strength, hires

    def process(self, p, *args):
        deactivate(p)
        enabled, name, strength, hires = parse_args(args)
        xyz_name = getattr(p, XYZ_EMBEDDING, None)
        if xyz_name is not None:
            name = str(xyz_name).strip() or NONE
            enabled = name != NONE
        if getattr(p, XYZ_STRENGTH, None) is not None:
            strength = as_strength(getattr(p, XYZ_STRENGTH))
        if not enabled or name == NONE:
            return
        if reneg is None:
            log(f"not applied: {CORE_ERROR}")
            return
        found = store.resolve(name)
        if found is None:
            warn(p, f"ReNeg: not applied: no embedding named {name!r} in "
                    f"{', '.join(embedding_folders())}")
            return
        name, path = found
        try:
            emb = store.load(path)
        except (EmbeddingError, OSError) as e:
            warn(p, f"ReNeg: not applied: {e}")
            return
        fam = model_family(getattr(p, "sd_model", None))
        problem = None
        if emb.family not in HOST_FAMILIES:
            problem = "this extension handles SD 1.x, SD 2.x and SDXL embeddings"
        elif fam == UNSUPPORTED:
            problem = "the model in use is not SD 1.x, SD 2.x or SDXL"
        elif fam is not None and fam != emb.family:
            problem = f"the model in use is {_family_label(fam)}"
        if problem:
            warn(p, f"ReNeg: not applied: {name} is a {_family_label(emb.family)} embedding; {problem}")
            return
        clip_skip = getattr(getattr(shared, "opts", None), "CLIP_stop_at_last_layers", 1)
        if emb.family == "sd1" and str(clip_skip) != str(emb.metadata.get("clip_skip", "1")):
            log(f"ReNeg: {name} was learned at CLIP skip {emb.metadata.get('clip_skip', '1')}, "
                f"this generation uses {clip_skip}: results may be off")
        active = Active(emb, strength, hires, p)
        setattr(p, P_ATTR, active)
        _fallback["active"] = active
        params = p.extra_generation_params
        params["ReNeg"] = name
        params["ReNeg strength"] = strength
        try:
            params["ReNeg hash"] = store.short_hash(path)
        except OSError:
            pass
        if not hires and getattr(p, "enable_hr", False):
            params["ReNeg hires"] = False

    def postprocess(self, p, processed, *args):
        deactivate(p)


_register_cfg_hook()
script_callbacks.on_ui_settings(on_ui_settings)
if hasattr(script_callbacks, "on_before_ui"):
    script_callbacks.on_before_ui(register_xyz_axes)
else:  # pragma: no cover - very old hosts: xyz_grid (a root script) is loaded before extensions
    register_xyz_axes()

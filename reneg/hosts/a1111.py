"""Everything the AUTOMATIC1111 / Forge / reForge extension decides, without the web UI.

The extension's script (``a1111_extension/scripts/reneg_negative.py``) builds the gradio panel,
registers the callbacks and holds the ``scripts.Script`` class; it hands every decision to a
:class:`Host` from this module: the embedding files (:class:`EmbeddingStore`), the loaded model's
family (:func:`model_family`, :class:`ModelWatch`), the panel's list and status, what one generation
applies and the ``on_cfg_denoiser`` hook's work, the infotext and the X/Y/Z plot's axes.
"""

from __future__ import annotations

import html
import math
import os
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch

from ..embedding import EmbeddingError, _overflow, _sha256, list_embedding_files, load_embedding
from ..families import FAMILIES, families_for_host, family_for_hidden
from ..predictor import is_predictor_file, load_predictor
from ..uncond import content_length, crossattn_of, replace_uncond
from .predicted import PredictedNegative

HOST = "a1111"
TITLE = "ReNeg"
NONE = "None"
ARG_NAMES = ("enabled", "embedding", "strength", "hires")
ARG_DEFAULTS = (False, NONE, 1.0, True)
P_ATTR = "_reneg_active"
XYZ_EMBEDDING = "reneg_xyz_embedding"
XYZ_STRENGTH = "reneg_xyz_strength"
AXIS_EMBEDDING = "[ReNeg] Embedding"
AXIS_STRENGTH = "[ReNeg] Strength"
KEY_NAME = "ReNeg"
KEY_STRENGTH = "ReNeg strength"
KEY_HASH = "ReNeg hash"
KEY_HIRES = "ReNeg hires"
INFOTEXT_KEYS = (KEY_NAME, KEY_STRENGTH, KEY_HASH, KEY_HIRES)
PASTE_FIELD_NAMES = [KEY_NAME, KEY_STRENGTH]
HOST_FAMILIES = families_for_host(HOST)  # the family table says which families the hook handles
UNSUPPORTED = "unsupported"


def log(msg: str) -> None:
    print(msg if msg.startswith("ReNeg") else f"ReNeg: {msg}", flush=True)


def family_label(fam: str | None) -> str:
    return FAMILIES[fam].description if fam in FAMILIES else str(fam)


def host_families_text() -> str:
    """``"Stable Diffusion 1.x, Stable Diffusion 2.x or Stable Diffusion XL"``."""
    labels = [family_label(f) for f in HOST_FAMILIES]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " or " + labels[-1]


# --------------------------------------------------------------------------- embedding files


def embedding_folders(
    models_path: str | None, extra: str | None, ext_dir: str | None, core_root: str | None
) -> list[str]:
    """Where embeddings are looked for, in order; the first folder holding a name wins.

    ``models/reneg``, the folder set in the web UI's settings, the extension's own
    ``embeddings/``, the repository's ``embeddings/`` (linked installs); duplicates dropped.
    """
    out = []
    if models_path:
        out.append(os.path.join(models_path, "reneg"))
    extra = str(extra or "").strip()
    if extra:
        out.append(os.path.expanduser(extra))
    if ext_dir:
        out.append(os.path.join(ext_dir, "embeddings"))
    if core_root:
        out.append(os.path.join(core_root, "embeddings"))
    seen, unique = set(), []
    for folder in out:
        key = os.path.normcase(os.path.realpath(folder))
        if key not in seen:
            seen.add(key)
            unique.append(folder)
    return unique


class EmbeddingStore:
    """Names -> files, and loaded embeddings cached by path, mtime and size."""

    def __init__(self, folders: Callable[[], list[str]]):
        self.folders = folders
        self.lock = threading.Lock()
        self.cache: dict[str, tuple] = {}  # path -> ((mtime_ns, size), NegEmbedding | error str, hash)
        self.names: dict[str, str] = {}

    def refresh(self) -> dict[str, str]:
        names: dict[str, str] = {}
        folders = self.folders()
        if folders:
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
        try:  # a predictor file is picked like an embedding; it gives each prompt its own negative
            value = PredictedNegative(load_predictor(path)) if is_predictor_file(path) else load_embedding(path)
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


# --------------------------------------------------------------------------- the model in use


def model_family(sd_model) -> str | None:
    """A family name from :data:`HOST_FAMILIES`; UNSUPPORTED for another kind of model; None when unknown.

    The host's E("") (``cond_stage_model_empty_prompt``) decides by its hidden size, through
    the family table; without it, the host's ``is_<family>`` flags do.
    """
    if sd_model is None:
        return None
    if getattr(sd_model, "is_sd3", False):
        return UNSUPPORTED
    empty = crossattn_of(getattr(sd_model, "cond_stage_model_empty_prompt", None))
    if isinstance(empty, torch.Tensor) and empty.dim() >= 2:
        fam = family_for_hidden(empty.shape[-1])
        return fam.name if fam is not None and fam.name in HOST_FAMILIES else UNSUPPORTED
    flags = [f"is_{name}" for name in HOST_FAMILIES]
    for flag, name in zip(flags, HOST_FAMILIES):
        if getattr(sd_model, flag, False) is True:
            return name
    if any(hasattr(sd_model, f) for f in flags):
        return UNSUPPORTED  # e.g. Flux on Forge: every flag False
    return None


def model_title(sd_model) -> str | None:
    """The checkpoint's short name as the web UI shows it, or None."""
    info = getattr(sd_model, "sd_checkpoint_info", None)
    for attr in ("name_for_extra", "model_name", "title"):
        v = getattr(info, attr, None)
        if isinstance(v, str) and v:
            return v
    return None


class ModelWatch:
    """The model the web UI has loaded: asked of the host (``probe``, which must not load one)
    and told by its model-loaded callback (:meth:`loaded`), which A1111 and Forge call after
    every load, including Forge's load at the first generation."""

    def __init__(self, probe: Callable[[], Any] = lambda: None):
        self.probe = probe
        self._last: Callable[[], Any] = lambda: None
        self.loads = 0

    def loaded(self, sd_model) -> None:
        try:
            self._last = weakref.ref(sd_model)
        except TypeError:
            self._last = lambda m=sd_model: m
        self.loads += 1

    def model(self):
        try:
            m = self.probe()
        except Exception:  # a host in the middle of a load
            m = None
        return m if m is not None else self._last()

    def family(self) -> str | None:
        return model_family(self.model())


# --------------------------------------------------------------------------- per-generation state


def warn(p, msg: str) -> None:
    """To the console, and to the comments shown under the image in the UI."""
    log(msg)
    comment = getattr(p, "comment", None)
    if callable(comment):
        try:
            comment(msg)
        except Exception:
            pass


class Active:
    """What one generation applies; stored on ``p`` (and as the fallback for hosts whose
    CFGDenoiserParams carry no denoiser)."""

    def __init__(self, emb, strength: float, hires: bool, p):
        self.emb = emb
        self.problems: dict = {}  # dtype -> why the embedding can not be used in it (None: it can)
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

    def dtype_problem(self, dtype: torch.dtype) -> str | None:
        """Why the embedding overflows ``dtype`` (the host's conditioning dtype), once per dtype."""
        if dtype not in self.problems:
            self.problems[dtype] = self.emb.dtype_problem(dtype) if dtype.is_floating_point else None
        return self.problems[dtype]

    def warn(self, msg: str) -> None:
        """Say it once per generation."""
        if msg not in self.warned:
            self.warned.add(msg)
            warn(self.p, msg)


def _shown(v) -> str:
    s = repr(v)
    return s if len(s) <= 40 else f"{s[:12]}...{s[-6:]} ({len(s)} digits)" if s.isdigit() else s[:40] + "..."


def read_strength(v) -> tuple[float | None, str | None]:
    """A strength from the UI, the API or an X/Y/Z axis: ``(value, note)``.

    A number (or a number as text) in 0..1 is used as it is. A finite number outside 0..1 is
    clamped to it, with a note. Anything else (None, text, NaN, inf, a bool, an integer too large
    for a float) gives ``(None, note)``: the generation runs without ReNeg and says why. Never raises.
    """
    s = None
    if not isinstance(v, bool):
        try:
            s = float(v.strip() if isinstance(v, str) else v)
        except (TypeError, ValueError, OverflowError):
            s = None
    if s is None or not math.isfinite(s):
        return None, f"strength must be a number from 0 to 1, got {_shown(v)}"
    if 0.0 <= s <= 1.0:
        return s, None
    used = min(max(s, 0.0), 1.0)
    return used, f"strength {_shown(v)} is outside 0..1; using {used}"


def parse_args(args) -> tuple[bool, str, Any, bool]:
    """The four script args with defaults for missing ones: enabled, embedding and hires coerced,
    strength as given (:meth:`Host.process` reads it with :func:`read_strength`, which can say what
    was wrong with it).

    The args, in this order (the UI passes them, and so does the API under
    ``alwayson_scripts: {"reneg": {"args": [...]}}``; missing ones keep their defaults):

        0  enabled      bool   default False
        1  embedding    str    a name as listed in the dropdown (e.g. "sd15_reneg.safetensors"),
                               its stem ("sd15_reneg"), or "None" (the default)
        2  strength     float  0..1, default 1 (0 = the negative prompt, 1 = the embedding only);
                               outside 0..1 it is clamped, with a warning; a value that is not a finite
                               number (null, text, NaN) turns ReNeg off for that generation, with a warning
        3  hires        bool   default True: also replace the negative in the hires-fix pass
    """
    args = list(args)
    enabled, name, strength, hires = args[: len(ARG_DEFAULTS)] + list(ARG_DEFAULTS[len(args) :])

    def as_bool(v, default):
        if isinstance(v, str):
            return v.strip().lower() in ("1", "true", "yes", "on")
        return default if v is None else bool(v)

    return as_bool(enabled, False), str(name or NONE).strip() or NONE, strength, as_bool(hires, True)


# --------------------------------------------------------------------------- infotext


def clear_infotext(p) -> dict:
    """Give ``p`` its own parameters dict without any ReNeg key, and return it.

    The X/Y/Z plot makes each cell from a shallow copy of one processing object, so every
    cell starts with the *same* ``extra_generation_params`` dict. Writing into it would
    carry one cell's ReNeg keys into the next; a fresh dict per generation cannot.
    """
    old = getattr(p, "extra_generation_params", None)
    fresh = {k: v for k, v in (old or {}).items() if k not in INFOTEXT_KEYS}
    p.extra_generation_params = fresh
    return fresh


def write_infotext(p, name: str, strength: float, digest: str | None, hires_skipped: bool) -> None:
    """Write ``ReNeg: <name>, ReNeg strength: <s>, ReNeg hash: <sha256[:10]>`` into ``p``'s parameters,
    and ``ReNeg hires: False`` when a hires pass runs without it. A generation made without ReNeg
    carries none of these keys, even when it shares its parameters dict with one made with it
    (:func:`clear_infotext` gives each generation its own); an X/Y/Z grid image does not carry the
    keys its ReNeg axes vary (:func:`drop_axis_keys`)."""
    params = p.extra_generation_params
    params[KEY_NAME] = name
    params[KEY_STRENGTH] = strength
    if digest:
        params[KEY_HASH] = digest
    if hires_skipped:
        params[KEY_HIRES] = False


def drop_axis_keys(p) -> None:
    """After an X/Y/Z cell is made: drop the ReNeg keys a ReNeg axis varies from ``p``'s parameters.

    The X/Y/Z plot writes the grid image's infotext from its first cell's parameters once that
    cell's images are made (after the scripts' ``postprocess``): with a ReNeg axis, the first
    cell's file or strength is not the grid's, whose own ``X Type``/``X Values`` say what varied.
    An embedding axis drops every ReNeg key, a strength axis the strength. The cell's images
    carry their keys already; ``p`` gets a new dict, so the generation info kept with them (the
    old dict) keeps them too.
    """
    if getattr(p, XYZ_EMBEDDING, None) is not None:
        keys = INFOTEXT_KEYS
    elif getattr(p, XYZ_STRENGTH, None) is not None:
        keys = (KEY_STRENGTH,)
    else:
        return
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict) and any(k in params for k in keys):
        p.extra_generation_params = {k: v for k, v in params.items() if k not in keys}


def paste_enabled(d: dict) -> bool:
    """Pasted parameters turn ReNeg on exactly when they name an embedding."""
    return KEY_NAME in d


def paste_hires(d: dict):
    if KEY_NAME not in d:
        return None
    return str(d.get(KEY_HIRES, "True")).strip().lower() != "false"


# what pasting sets on each of the four script components (by argument position)
INFOTEXT_FIELDS = ((0, paste_enabled), (1, KEY_NAME), (2, KEY_STRENGTH), (3, paste_hires))


# --------------------------------------------------------------------------- the host


class Host:
    """One loaded copy of the extension: its files, the model it follows, and the generation
    in progress. ``folders`` lists the embedding folders (re-read on every refresh, so a
    changed setting applies); ``probe_model`` returns the loaded model without loading one;
    ``clip_skip`` returns the web UI's CLIP skip setting.

    The web UI objects it touches are passed in and duck-typed: a processing object ``p``
    (``extra_generation_params``, ``sd_model``, ``enable_hr``, ``is_hr_pass``, ``comment``), the
    hook's ``params`` (``text_cond``, ``text_uncond``, ``denoiser.p``) and a model
    (``cond_stage_model_empty_prompt``, ``is_sd1`` / ``is_sd2`` / ``is_sdxl``)."""

    def __init__(
        self,
        folders: Callable[[], list[str]],
        probe_model: Callable[[], Any] = lambda: None,
        clip_skip: Callable[[], Any] = lambda: 1,
    ):
        self.folders = folders
        self.store = EmbeddingStore(folders)
        self.watch = ModelWatch(probe_model)
        self.clip_skip = clip_skip
        self.fallback: Active | None = None

    # ---------------------------------------------------------------- panel

    def choices_and_status(self, refresh: bool = False) -> tuple[list[str], str]:
        """Dropdown names for the loaded model's family, and an HTML line saying what was found."""
        store = self.store
        names = store.refresh() if refresh or not store.names else store.names
        model = self.watch.model()
        fam = model_family(model)
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
        folders = ", ".join(self.folders()[:2])
        title = model_title(model)
        loaded = f" (model: {title})" if title else ""
        if not names:
            msg = f"No ReNeg embeddings found. Put .safetensors / .bin files in {folders}."
        elif fam == UNSUPPORTED:
            msg = f"The loaded model{loaded} is not {host_families_text()}: ReNeg has no embeddings for it."
            shown = []
        elif fam is None:
            msg = (
                f"{len(shown)} embedding(s); no model is loaded yet, so every family is listed "
                f"(the list follows the model once it loads)."
            )
        else:
            msg = f"{len(shown)} embedding(s) for {family_label(fam)}{loaded}"
            if other:
                msg += f"; {other} for other model families hidden"
            if not shown:
                msg = f"No ReNeg embedding for {family_label(fam)}{loaded} in {folders}" + (
                    f" ({other} for other families hidden)" if other else ""
                )
        if bad:
            msg += f"; unreadable: {', '.join(bad[:3])}{' ...' if len(bad) > 3 else ''} (see the console)"
        return sorted(shown, key=str.casefold), f"<p>{html.escape(msg)}</p>"

    def panel_state(self, current, refresh: bool = False) -> tuple[list[str], str, str]:
        """``(dropdown choices, dropdown value, status html)`` for the model now loaded.

        The value a user picked stays, unless it is a file made for another model family:
        that one is no longer offered, so the dropdown goes back to "None". A name that is
        in no folder (typed, or pasted from another machine's image) stays; generating with
        it says what is missing.
        """
        names, status = self.choices_and_status(refresh=refresh)
        value = str(current).strip() if current not in (None, "") else NONE
        if value != NONE and value not in names:
            found = self.store._match(value, self.store.names)
            if found is not None:
                value = found[0] if found[0] in names else NONE
        return [NONE] + names, value, status

    def on_model_loaded(self, sd_model) -> None:
        """The web UI's model-loaded callback: remember the model, say what the panel now offers."""
        self.watch.loaded(sd_model)
        fam = model_family(sd_model)
        if fam is not None and self.store.names:
            names, _ = self.choices_and_status()
            log(f"{len(names)} embedding(s) for the loaded model ({family_label(fam)})")

    # ---------------------------------------------------------------- one generation

    def deactivate(self, p) -> None:
        active = getattr(p, P_ATTR, None) if p is not None else None
        if active is not None:
            try:
                delattr(p, P_ATTR)
            except AttributeError:
                setattr(p, P_ATTR, None)
        if self.fallback is not None and (active is None or self.fallback is active):
            self.fallback = None

    def process(self, p, *args, core_error: str | None = None) -> Active | None:
        """Decide what this generation applies, write its infotext, and arm the hook.

        Every call starts from a clean slate: no ReNeg key is left in the generation's
        parameters and no earlier state stays armed, whatever came before. Never raises (the
        arguments may come straight from an API request): after an unexpected error the
        generation runs without ReNeg and says why.
        """
        try:
            return self._process(p, args, core_error)
        except Exception as e:  # noqa: BLE001 - the host would only print it, mid-generation
            try:
                self.deactivate(p)
                clear_infotext(p)
            except Exception:  # noqa: BLE001
                pass
            warn(p, f"ReNeg: not applied after an error: {type(e).__name__}: {e}")
            return None

    def _process(self, p, args, core_error: str | None) -> Active | None:
        self.deactivate(p)
        clear_infotext(p)
        enabled, name, strength, hires = parse_args(args)
        xyz_name = getattr(p, XYZ_EMBEDDING, None)
        if xyz_name is not None:
            name = str(xyz_name).strip() or NONE
            enabled = name != NONE
        if getattr(p, XYZ_STRENGTH, None) is not None:
            strength = getattr(p, XYZ_STRENGTH)
        if not enabled or name == NONE:
            return None
        if core_error:
            log(f"not applied: {core_error}")
            return None
        strength, note = read_strength(strength)
        if strength is None:
            warn(p, f"ReNeg: not applied: {note}")
            return None
        if note:
            warn(p, f"ReNeg: {note}")
        found = self.store.resolve(name)
        if found is None:
            warn(p, f"ReNeg: not applied: no embedding named {name!r} in {', '.join(self.folders())}")
            return None
        name, path = found
        try:
            emb = self.store.load(path)
        except (EmbeddingError, OSError) as e:
            warn(p, f"ReNeg: not applied: {e}")
            return None
        fam = model_family(getattr(p, "sd_model", None))
        problem = None
        if emb.family not in HOST_FAMILIES:
            problem = f"this extension handles {host_families_text()} embeddings"
        elif fam == UNSUPPORTED:
            problem = f"the model in use is not {host_families_text()}"
        elif fam is not None and fam != emb.family:
            problem = f"the model in use is {family_label(fam)}"
        if problem:
            warn(p, f"ReNeg: not applied: {name} is a {family_label(emb.family)} embedding; {problem}")
            return None
        try:
            clip_skip = self.clip_skip()
        except Exception:
            clip_skip = 1
        learned = str(emb.metadata.get("clip_skip", "1"))
        if FAMILIES[emb.family].clip_skip_warning and str(clip_skip) != learned:
            log(
                f"ReNeg: {name} was learned at CLIP skip {learned}, this generation uses {clip_skip}: "
                f"results may be off"
            )
        active = Active(emb, strength, hires, p)
        dtype = getattr(getattr(p, "sd_model", None), "dtype", None)  # an fp16 model: 7e4 becomes inf
        if isinstance(dtype, torch.dtype) and active.dtype_problem(dtype):
            warn(p, f"ReNeg: not applied: {active.dtype_problem(dtype)}, the dtype the model runs in")
            return None
        setattr(p, P_ATTR, active)
        self.fallback = active
        try:
            digest = self.store.short_hash(path)
        except OSError:
            digest = None
        write_infotext(p, name, strength, digest, not hires and bool(getattr(p, "enable_hr", False)))
        return active

    def postprocess(self, p) -> None:
        self.deactivate(p)
        try:
            drop_axis_keys(p)
        except Exception as e:  # noqa: BLE001 - the images are made; never fail the generation now
            log(f"could not tidy the grid's parameters: {type(e).__name__}: {e}")

    def _active_for(self, params):
        p = getattr(getattr(params, "denoiser", None), "p", None)
        if p is not None:
            return getattr(p, P_ATTR, None), p
        active = self.fallback
        return active, (active.p if active is not None else None)

    def on_cfg_denoiser(self, params) -> None:
        """The ``on_cfg_denoiser`` hook's work; does nothing unless :meth:`process` armed it.
        Never raises: a failure skips this step and says why once per generation."""
        active = None
        try:
            active, p = self._active_for(params)
            if active is None or params.text_uncond is None:
                return
            if not active.hires and getattr(p, "is_hr_pass", False):
                return
            host = crossattn_of(params.text_uncond)
            if isinstance(host, torch.Tensor) and active.dtype_problem(host.dtype):
                active.warn(f"ReNeg: not applied: {active.dtype_problem(host.dtype)}, the host's conditioning dtype")
                return
            emb = active.tensor_like(host) if isinstance(host, torch.Tensor) else active.tensor
            pooled = active.pooled
            if getattr(active.emb, "is_predictor", False) and isinstance(host, torch.Tensor):
                # this step's prompts' own negatives (rows [B, R, D], SDXL's pooled [B, P])
                emb, pooled, note = active.emb.predict(params.text_cond, host.shape[0])
                if note:
                    active.warn(note)
                problem = _overflow(emb, host.dtype, active.emb.path or "predictor", "predicted values")
                if problem:
                    active.warn(f"ReNeg: not applied: {problem}, the host's conditioning dtype")
                    return
            length = content_length(getattr(params, "text_cond", None), active.rows)
            new, msg = replace_uncond(params.text_uncond, emb, active.strength, length=length, pooled=pooled)
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

    # ---------------------------------------------------------------- X/Y/Z plot

    def xyz_confirm_embedding(self, p, xs) -> None:
        for x in xs:
            if str(x).strip() != NONE and self.store.resolve(x) is None:
                raise RuntimeError(f"ReNeg: unknown embedding {x!r}; looked in {', '.join(self.folders())}")

    def xyz_choices(self) -> list[str]:
        return [NONE] + self.choices_and_status()[0]


def xyz_apply_embedding(p, x, xs) -> None:
    setattr(p, XYZ_EMBEDDING, x)


def xyz_apply_strength(p, x, xs) -> None:
    setattr(p, XYZ_STRENGTH, x)  # read (and, if need be, refused with a warning) by Host.process


def find_xyz_module(scripts_data: Iterable) -> Any:
    """The web UI's loaded X/Y/Z plot script module (``scripts/xyz_grid.py``), or None."""
    for data in scripts_data:
        module = getattr(data, "module", None)
        cls = getattr(data, "script_class", None)
        if getattr(cls, "__module__", None) in ("xyz_grid.py", "xy_grid.py") and module is not None:
            if hasattr(module, "AxisOption") and hasattr(module, "axis_options"):
                return module
    return None


def add_xyz_axes(xyz, host: Host) -> None:
    """Add the ReNeg axes to an X/Y/Z plot module; a second call (a reloaded extension) puts
    its own in place of the earlier ones, at the same positions (the plot saves axes by index)."""
    axes = {
        AXIS_EMBEDDING: xyz.AxisOption(
            AXIS_EMBEDDING, str, xyz_apply_embedding, confirm=host.xyz_confirm_embedding, choices=host.xyz_choices
        ),
        AXIS_STRENGTH: xyz.AxisOption(AXIS_STRENGTH, float, xyz_apply_strength),
    }
    for i, option in enumerate(xyz.axis_options):
        label = getattr(option, "label", None)
        if label in axes:
            xyz.axis_options[i] = axes.pop(label)
    xyz.axis_options.extend(axes.values())

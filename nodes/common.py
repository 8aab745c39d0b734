"""What every ReNeg node shares: model folders, ComfyUI hooks and error messages.

Imports only torch (and, when running inside ComfyUI, its ``folder_paths`` and
``comfy`` modules, which the host has already loaded).
"""

from __future__ import annotations

import functools
import os

import torch

PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDING_FOLDER = "reneg"  # ComfyUI/models/reneg (+ the pack's own embeddings/)
REWARD_FOLDER = "reward_models"  # ComfyUI/models/reward_models
EMBEDDING_EXTENSIONS = {".safetensors", ".bin", ".pt", ".pth"}
REWARD_EXTENSIONS = {".pt", ".pth", ".bin", ".safetensors"}
CATEGORY = "conditioning/ReNeg"
REWARD_TYPE = "RENEG_REWARD"


class ReNegNodeError(RuntimeError):
    """An error a ReNeg node reports to the user (ComfyUI shows the message)."""


def _folder_paths():
    try:
        import folder_paths
    except ImportError:
        return None
    return folder_paths


def _register(fp, name: str, defaults: list[str], extensions: set[str]) -> None:
    """Add ``name`` to ComfyUI's model folders, keeping paths that ``extra_model_paths.yaml`` set."""
    table = fp.folder_names_and_paths
    if name in table:
        paths, exts = table[name]
        paths = list(paths)
        exts = set(exts) | extensions if exts else set(extensions)
    else:
        paths, exts = [], set(extensions)
    for i, d in enumerate(defaults):
        if d not in paths:
            paths.insert(i if i == 0 else len(paths), d)
    table[name] = (paths, exts)


def register_folders() -> None:
    """Called once when the pack loads: the ``reneg`` and ``reward_models`` model folders."""
    fp = _folder_paths()
    if fp is None:
        return
    models = getattr(fp, "models_dir", None) or os.path.join(os.getcwd(), "models")
    _register(
        fp,
        EMBEDDING_FOLDER,
        [os.path.join(models, EMBEDDING_FOLDER), os.path.join(PACK_ROOT, "embeddings")],
        EMBEDDING_EXTENSIONS,
    )
    _register(fp, REWARD_FOLDER, [os.path.join(models, REWARD_FOLDER)], REWARD_EXTENSIONS)


def folder_list(name: str) -> list[str]:
    fp = _folder_paths()
    if fp is None or name not in fp.folder_names_and_paths:
        return []
    return list(fp.get_filename_list(name))


def folder_paths_of(name: str) -> list[str]:
    fp = _folder_paths()
    if fp is None or name not in fp.folder_names_and_paths:
        return []
    return list(fp.get_folder_paths(name))


def full_path(name: str, filename: str) -> str:
    """The file ``filename`` chosen from model folder ``name``, or a clear error."""
    fp = _folder_paths()
    path = fp.get_full_path(name, filename) if fp is not None else None
    if not path:
        where = ", ".join(folder_paths_of(name)) or f"models/{name}"
        raise ReNegNodeError(
            f"{filename!r} was not found in the {name!r} model folder ({where}); "
            f"put the file there and press R (refresh) in ComfyUI"
        )
    return path


def check_interrupt() -> None:
    """Raise ComfyUI's InterruptProcessingException when the user pressed Cancel."""
    try:
        import comfy.model_management as mm
    except ImportError:
        return
    mm.throw_exception_if_processing_interrupted()


def progress_bar(total: int):
    try:
        import comfy.utils
    except ImportError:
        return None
    return comfy.utils.ProgressBar(total)


def torch_device() -> torch.device:
    try:
        import comfy.model_management as mm
    except ImportError:
        return torch.device("cpu")
    return mm.get_torch_device()


def _passes_through(e: BaseException) -> bool:
    """Exceptions ComfyUI itself handles: Cancel, and out-of-memory (it unloads models)."""
    if type(e).__name__ == "InterruptProcessingException":
        return True
    return isinstance(e, getattr(torch, "OutOfMemoryError", ()) or ())


def reports_errors(title: str):
    """Decorate a node's FUNCTION: any failure reaches the user as ``"<title>: <message>"``."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except ReNegNodeError as e:
                if str(e).startswith(title):
                    raise
                raise ReNegNodeError(f"{title}: {e}") from e
            except Exception as e:  # noqa: BLE001 - every error becomes a message for the user
                if _passes_through(e):
                    raise
                detail = str(e) or type(e).__name__
                if not isinstance(e, (ValueError, OSError, KeyError)):
                    detail = f"{type(e).__name__}: {detail}"
                raise ReNegNodeError(f"{title}: {detail}") from e

        return wrapper

    return deco


def _kinds(value) -> str:
    if isinstance(value, (list, tuple)):
        if not value:
            return f"an empty {type(value).__name__}"
        return "[" + ", ".join(type(v).__name__ for v in value) + "]"
    return type(value).__name__


def check_conditioning(conditioning, what: str) -> list:
    """A CONDITIONING as ComfyUI passes it: a non-empty list of ``[tensor [batch, tokens, hidden],
    dict]`` entries; anything else is a clear error naming the input (``what``) and the entry."""
    if not isinstance(conditioning, (list, tuple)) or not conditioning:
        raise ValueError(f"{what}: expected a CONDITIONING (a list of [tensor, dict]), found {_kinds(conditioning)}")
    for i, entry in enumerate(conditioning):
        ok = isinstance(entry, (list, tuple)) and len(entry) >= 2
        if not ok or not isinstance(entry[0], torch.Tensor) or not isinstance(entry[1], dict):
            raise ValueError(f"{what} entry {i}: expected [tensor, dict], found {_kinds(entry)}")
        if entry[0].dim() != 3:
            raise ValueError(
                f"{what} entry {i}: expected a tensor [batch, tokens, hidden], found shape {list(entry[0].shape)}"
            )
    return list(conditioning)


def model_family_of(hidden: int, pooled: int | None = None) -> str:
    """The family of a CLIP's conditioning: its width, and where widths are shared (T5-XXL's 4096:
    PixArt, Flux) the size of its pooled vector."""
    from ..reneg.families import family_for_text, known_hidden_sizes

    fam = family_for_text(hidden, pooled)
    if fam is None:
        raise ReNegNodeError(
            f"the model's text encoder gives hidden size {hidden}, which no ReNeg "
            f"embedding family uses ({known_hidden_sizes()})"
        )
    return fam.name


def conditioning_family(t: torch.Tensor, pooled: int | None = None) -> str:
    """The family of a text encoder's conditioning ``[1, rows, D]`` (``pooled``: the size of its pooled
    vector, if any): by its width and pooled vector (Flux's CLIP-L 768), and for T5 widths without one by
    its rows (ComfyUI's Wan UMT5 encoding pads to at least 512 rows; PixArt's and Chroma's T5 are unpadded)."""
    from ..reneg.families import FAMILIES

    family = model_family_of(t.shape[-1], pooled)
    wan = FAMILIES["wan"]
    if pooled is None and t.shape[-1] == wan.hidden and t.shape[1] >= wan.tokens:
        return wan.name
    return family


def one_block(t: torch.Tensor, rows: int = 77) -> torch.Tensor:
    """``[1, 77k, D]`` made of one 77-row block repeated (as Load ReNeg Embedding gives for a
    long base negative) -> that block; anything else is returned as it is."""
    if t.shape[1] <= rows or t.shape[1] % rows:
        return t
    blocks = t.split(rows, dim=1)
    return blocks[0] if all(bool((b == blocks[0]).all()) for b in blocks[1:]) else t

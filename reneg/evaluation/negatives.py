"""The negatives ``reneg eval`` compares: ``--negative [NAME=]SPEC`` parsed into :class:`Negative`."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from reneg.prompts import PAPER_HANDCRAFTED

from .config import EvalError

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
EMBEDDING_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class Negative:
    name: str  # used in file names and the report
    kind: str  # null | zero | text | file | tuned | predictor
    source: str  # the text (text), the embedding file (file, tuned; "null" for tuned from null)
    learned_under: str = ""  # the guidance the file says it was learned under (cfg, nag, cfg+nag), once read

    def describe(self) -> str:
        if self.kind == "null":
            return 'null text E("")'
        if self.kind == "zero":
            return "all-zero negative (A1111/Forge for an empty SDXL negative prompt)"
        if self.kind == "text":
            return f'text "{self.source}"'
        if self.kind == "file":
            return f"embedding {_short(self.source)}" + (
                f" (learned under {self.learned_under})" if self.learned_under else ""
            )
        if self.kind == "predictor":
            return f"negative predictor {_short(self.source)} (each prompt's own negative)"
        start = "null" if self.source == "null" else _short(self.source)
        return f"per-sample tuning from {start}"


def _short(path: str) -> str:
    """The file name, with its folder when the name alone says little (``train/embedding.safetensors``)."""
    parts = os.path.normpath(path).replace(os.sep, "/").split("/")
    return "/".join(parts[-2:])


def clean_name(s: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_.+-]+", "-", s).strip("-.") or "negative"
    return s[:64]


def parse_negative(spec: str, handcrafted: str = PAPER_HANDCRAFTED) -> Negative:
    """``[NAME=]SPEC`` with SPEC one of ``null``, ``zero``, ``handcrafted``, ``handcrafted:TEXT``,
    ``text:TEXT``, a preset's name (:func:`preset_negatives`), an embedding file, ``tuned:FILE``, ``tuned:null``
    or ``predictor:FILE`` (a negative predictor, reneg/predictor.py: each prompt gets its own negative; a
    predictor file given bare is one too)."""
    raw = spec
    spec = spec.strip()
    if not spec:
        raise EvalError(
            "--negative: empty value (expected null, zero, handcrafted[:TEXT], text:TEXT, an embedding "
            "file or tuned:FILE)"
        )
    name = None
    head, sep, rest = spec.partition("=")
    if sep and _NAME_RE.match(head) and not os.path.exists(spec) and ":" not in head:
        name, spec = head, rest.strip()
    elif (
        sep
        and not os.path.exists(spec)
        and not head.lower().startswith(("handcrafted:", "text:", "tuned:", "predictor:"))
        and _looks_like_spec(rest.strip())
    ):
        raise EvalError(
            f"--negative {raw!r}: {head!r} is not a valid name: a name is 1 to 64 letters, digits and "
            f"_ . + - (starting with a letter or digit), as it becomes part of image file names"
        )
    low = spec.lower()
    if low in preset_negatives():
        neg = Negative(low, "text", preset_negatives()[low])
    elif low == "null":
        neg = Negative("null", "null", "")
    elif low == "zero":
        neg = Negative("zero", "zero", "")
    elif low == "handcrafted" or low.startswith("handcrafted:") or low.startswith("text:"):
        text = spec.split(":", 1)[1].strip() if ":" in spec else handcrafted
        if not text:
            raise EvalError(f"--negative {raw!r}: the negative prompt text is empty")
        neg = Negative("handcrafted" if low.startswith("handcrafted") else "text", "text", text)
    elif low.startswith("predictor:") or (os.path.isfile(spec) and _is_predictor(spec)):
        path = spec.split(":", 1)[1].strip() if low.startswith("predictor:") else spec
        _check_embedding_file(path, raw)
        neg = Negative("predictor-" + clean_name(os.path.splitext(os.path.basename(path))[0]), "predictor", path)
    elif low.startswith("tuned:"):
        start = spec.split(":", 1)[1].strip()
        if start.lower() == "null":
            neg = Negative("tuned-null", "tuned", "null")
        else:
            _check_embedding_file(start, raw)
            neg = Negative("tuned-" + clean_name(os.path.splitext(os.path.basename(start))[0]), "tuned", start)
    else:
        _check_embedding_file(spec, raw)
        neg = Negative(clean_name(os.path.splitext(os.path.basename(spec))[0]), "file", spec)
    if name is not None:
        neg = Negative(name, neg.kind, neg.source)
    return neg


def preset_negatives() -> dict[str, str]:
    """Negative prompts known by name: Wan's official default (``wan-default``, Chinese, as its configs
    ship it) and diffusers' English rendering of it (``wan-default-en``)."""
    from reneg.backends.wan import DEFAULT_NEGATIVE_EN, DEFAULT_NEGATIVE_ZH

    return {"wan-default": DEFAULT_NEGATIVE_ZH, "wan-default-en": DEFAULT_NEGATIVE_EN}


def _is_predictor(path: str) -> bool:
    from reneg.predictor import is_predictor_file

    return is_predictor_file(path)


def _looks_like_spec(spec: str) -> bool:
    """What follows ``NAME=`` is a negative (so the part before it was meant as a name)."""
    low = spec.lower()
    return (
        low in ("null", "zero", "handcrafted", *preset_negatives())
        or low.startswith(("handcrafted:", "text:", "tuned:", "predictor:"))
        or low.endswith(EMBEDDING_SUFFIXES)
        or os.path.isfile(spec)
    )


def _check_embedding_file(path: str, raw: str) -> None:
    if not os.path.isfile(path):
        raise EvalError(
            f"--negative {raw!r}: expected null, zero, handcrafted[:TEXT], text:TEXT, tuned:FILE, predictor:FILE or an "
            f"embedding file; {path} is not a file"
        )
    if not path.lower().endswith(EMBEDDING_SUFFIXES):
        raise EvalError(
            f"--negative {raw!r}: {path} does not look like an embedding file (expected one of "
            f"{', '.join(EMBEDDING_SUFFIXES)})"
        )


def parse_negatives(specs: list[str], handcrafted: str = PAPER_HANDCRAFTED) -> list[Negative]:
    negs = [parse_negative(s, handcrafted) for s in specs]
    seen: dict[str, str] = {}
    for spec, n in zip(specs, negs):
        if n.name in seen:
            raise EvalError(
                f"--negative {spec!r}: its name {n.name!r} is already taken by --negative "
                f"{seen[n.name]!r}; name it explicitly as NAME={spec}"
            )
        seen[n.name] = spec
    return negs

"""Prompt sets: text files, JSON lists, TSV (PartiPrompts) and the HPSv2 benchmark folder.

Every loader returns a list of :class:`Prompt` (text + category). Errors name the
file and what was wrong (empty, not UTF-8, no ``Prompt`` column...).
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")

# The handcrafted negative prompt the ReNeg paper compares against.
PAPER_HANDCRAFTED = (
    "distorted, ugly, blurry, low resolution, low quality, bad, deformed, disgusting, "
    "Overexposed, Simple background, Plain background, Grainy, Underexposed, too dark, "
    "too bright, too low contrast, too high contrast, Broken, Macabre, artifacts, "
    "oversaturated"
)


class PromptFileError(ValueError):
    pass


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str = "all"


def _read_text(path: str) -> str:
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise PromptFileError(f"{path}: cannot read prompt file ({e.strerror or e})") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise PromptFileError(
            f"{path}: prompt file is not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r})"
        ) from None


def _from_json_obj(obj, path: str, category: str) -> list[Prompt]:
    if isinstance(obj, dict):
        for key in ("prompts", "data", "items"):
            if isinstance(obj.get(key), list):
                obj = obj[key]
                break
        else:
            raise PromptFileError(
                f"{path}: expected a JSON list of prompts, found an object with keys {', '.join(list(obj)[:8])}"
            )
    if not isinstance(obj, list):
        raise PromptFileError(f"{path}: expected a JSON list of prompts, found {type(obj).__name__}")
    out = []
    for i, item in enumerate(obj):
        if isinstance(item, str):
            text, cat = item, category
        elif isinstance(item, dict):
            text = item.get("text", item.get("prompt", item.get("caption")))
            cat = str(item.get("category", item.get("Category", category)))
            if not isinstance(text, str):
                raise PromptFileError(f"{path}: item {i} has no 'text' or 'prompt' string (keys: {', '.join(item)})")
        else:
            raise PromptFileError(
                f"{path}: item {i} is a {type(item).__name__}, expected a string or an object with 'text'/'prompt'"
            )
        out.append(Prompt(text.strip(), cat))
    return out


def load_prompts(path: str) -> list[Prompt]:
    """Load prompts from a file or an HPSv2 benchmark folder; empty prompts are dropped."""
    path = os.fspath(path)
    if os.path.isdir(path):
        files = sorted(f for f in os.listdir(path) if f.endswith(".json"))
        if not files:
            raise PromptFileError(
                f"{path}: expected a folder of JSON prompt lists (HPSv2 benchmark "
                f"layout: {', '.join(s + '.json' for s in HPS_STYLES)}), found none"
            )
        out = []
        for fn in files:
            fp = os.path.join(path, fn)
            out += _from_json_obj(_parse_json(fp), fp, os.path.splitext(fn)[0])
    elif not os.path.isfile(path):
        raise PromptFileError(f"{path}: no such prompt file")
    else:
        low = path.lower()
        if low.endswith(".json"):
            out = _from_json_obj(_parse_json(path), path, "all")
        elif low.endswith((".tsv", ".csv")):
            out = _from_table(path, "\t" if low.endswith(".tsv") else ",")
        else:
            out = [Prompt(line.strip()) for line in _read_text(path).splitlines()]
    out = [p for p in out if p.text]
    if not out:
        raise PromptFileError(f"{path}: no prompts found (the file is empty or every entry is blank)")
    return out


def _parse_json(path: str):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None


def _from_table(path: str, delim: str) -> list[Prompt]:
    rows = list(csv.DictReader(io.StringIO(_read_text(path)), delimiter=delim))
    if not rows:
        raise PromptFileError(f"{path}: no rows found")
    cols = {c.lower(): c for c in rows[0] if c}
    pc = cols.get("prompt") or cols.get("text")
    if pc is None:
        raise PromptFileError(f"{path}: expected a 'Prompt' column, found columns {', '.join(c for c in rows[0] if c)}")
    cc = cols.get("category")
    return [Prompt((r.get(pc) or "").strip(), (r.get(cc) or "all").strip() if cc else "all") for r in rows]


def subsample(prompts: list[Prompt], limit: int | None, seed: int = 0) -> list[Prompt]:
    """A fixed sub-sample of ``limit`` prompts (same result for the same seed), in file order."""
    if not limit or limit >= len(prompts):
        return list(prompts)
    idx = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[i] for i in idx]

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
import re
from dataclasses import dataclass

from .fileio import not_a_file

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
    elif not_a_file(path):
        why = not_a_file(path)
        raise PromptFileError(f"{path}: {'no such prompt file' if why == 'no such file' else why}")
    else:
        low = path.lower()
        if low.endswith(".json"):
            out = _from_json_obj(_parse_json(path), path, "all")
        elif low.endswith((".tsv", ".csv")):
            out = _from_table(path, "\t" if low.endswith(".tsv") else ",")
        else:
            # lines end at \n, \r\n or \r only: a form feed, a vertical tab or U+2028 inside a
            # prompt is part of it (str.splitlines would split there too)
            out = [Prompt(line.strip()) for line in _LINE_BREAK.split(_read_text(path))]
    out = [p for p in out if p.text]
    if not out:
        raise PromptFileError(f"{path}: no prompts found (the file is empty or every entry is blank)")
    return out


_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def _parse_json(path: str):
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as e:
        raise PromptFileError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise PromptFileError(
            f"{path}: not a prompt file: its JSON is nested too deeply to read (a prompt list is a list "
            f"of strings or objects)"
        ) from None
    except ValueError as e:  # e.g. an integer of thousands of digits (Python's int-digits limit)
        detail = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
        if "digits" in detail:
            detail = "it holds a number of thousands of digits, more than Python reads"
        raise PromptFileError(f"{path}: not a readable JSON prompt file ({detail})") from None


def _from_table(path: str, delim: str) -> list[Prompt]:
    if delim == "\t":
        # TSV has no quoting: a quote is part of the prompt (PartiPrompts has '"G I G G L E" painted...'),
        # and a row with an unbalanced quote can not swallow the rows after it
        rows = list(csv.DictReader(io.StringIO(_read_text(path)), delimiter=delim, quoting=csv.QUOTE_NONE))
    else:
        rows = _csv_rows(path, delim)
    if not rows:
        raise PromptFileError(f"{path}: no rows found")
    cols = {c.lower(): c for c in rows[0] if c}
    pc = cols.get("prompt") or cols.get("text")
    if pc is None:
        raise PromptFileError(f"{path}: expected a 'Prompt' column, found columns {', '.join(c for c in rows[0] if c)}")
    cc = cols.get("category")
    return [Prompt((r.get(pc) or "").strip(), (r.get(cc) or "all").strip() if cc else "all") for r in rows]


def _csv_rows(path: str, delim: str) -> list[dict]:
    """CSV rows; a quote that is never closed (which would take in every row after it) is an
    error naming the line it opens on."""
    reader = csv.DictReader(io.StringIO(_read_text(path)), delimiter=delim, strict=True)
    rows, end = [], 0
    try:
        for row in reader:
            rows.append(row)
            end = reader.line_num
    except csv.Error as e:
        raise PromptFileError(
            f"{path}: line {end + 1}: malformed CSV ({e}): is a quote there left open? Quote a "
            f'field whole ("a, b") and double a quote inside one ("say ""hi""")'
        ) from None
    return rows


def subsample(prompts: list[Prompt], limit: int | None, seed: int = 0) -> list[Prompt]:
    """A fixed sub-sample of ``limit`` prompts (same result for the same seed), in file order."""
    if not limit or limit >= len(prompts):
        return list(prompts)
    idx = sorted(random.Random(seed).sample(range(len(prompts)), limit))
    return [prompts[i] for i in idx]

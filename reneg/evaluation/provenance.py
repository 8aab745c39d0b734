"""Which of the eval's rewards the evaluated embeddings were trained on, and which are held out.

A score on the reward an embedding was trained with says how well it learned that reward; only a
held-out reward says whether the images got better rather than the reward fooled. ``reneg train``
(and ``reneg tune``) record each reward in the embedding's metadata as ``reward_files``: its kind
(the registry name), the weights' resolved path, the file name and its size
(:func:`reneg.rewards.reward_file`). A reward of the eval is *trained on* for an embedding when one of
those has the same kind and the same file: the same resolved path, else the same file name and size
(the file moved, or another machine). Files written before ``reward_files`` recorded only the specs
(``rewards``: ``NAME=PATH,...``); they match on kind and path, and a file of the same name elsewhere
is *unknown* (no size to confirm it). An embedding with no such metadata (the paper's released files,
foreign formats) is *unknown*. A tuned negative is trained on the eval's first reward, the one
per-sample tuning optimises, besides what its start file was trained on.
"""

from __future__ import annotations

import json
import os

TRAINED, HELD_OUT, UNKNOWN = "trained on", "held out", "unknown"


def trained_with(metadata: dict) -> list[dict] | None:
    """The rewards an embedding's metadata says it was trained with, as ``[{kind, path, basename, size}]``
    (``size`` None for files that recorded only the specs); None when it says nothing about rewards."""
    files = _json(metadata.get("reward_files"))
    if isinstance(files, list) and files and all(isinstance(f, dict) and f.get("kind") for f in files):
        return [
            {
                "kind": str(f["kind"]).lower(),
                "path": str(f.get("path") or ""),
                "basename": str(f.get("basename") or os.path.basename(os.path.normpath(str(f.get("path") or "")))),
                "size": f.get("size") if isinstance(f.get("size"), int) else None,
            }
            for f in files
        ]
    specs = _json(metadata.get("rewards"))
    if isinstance(specs, str):
        specs = [specs]
    if not isinstance(specs, list):
        return None
    out = []
    for s in specs:
        if not isinstance(s, str) or "=" not in s:
            continue
        kind, rest = s.split("=", 1)
        path = rest.split(",", 1)[0].strip()
        if kind.strip() and path:
            out.append(
                {
                    "kind": kind.strip().lower(),
                    "path": path,
                    "basename": os.path.basename(os.path.normpath(path)),
                    "size": None,
                }
            )
    return out or None


def _json(v):
    if not isinstance(v, str):
        return v
    try:
        return json.loads(v)
    except ValueError:
        return v


def match(trained: dict, current: dict) -> str:
    """:data:`TRAINED`, :data:`HELD_OUT` or :data:`UNKNOWN`: is ``current`` (a
    :func:`reneg.rewards.reward_file`) the reward ``trained`` (one of :func:`trained_with`) describes?"""
    if trained["kind"] != current["kind"]:
        return HELD_OUT
    sizes_known = trained["size"] is not None and current["size"] is not None
    if trained["path"] and os.path.realpath(trained["path"]) == current["path"]:
        return HELD_OUT if sizes_known and trained["size"] != current["size"] else TRAINED  # replaced since
    if trained["basename"] != current["basename"]:
        return HELD_OUT
    if not sizes_known:
        return UNKNOWN  # the same name elsewhere, and no size to confirm it is the same file
    return TRAINED if trained["size"] == current["size"] else HELD_OUT


def status(trained: list[dict] | None, current: dict) -> str:
    """One embedding's mark for one reward (``trained`` None: the embedding says nothing)."""
    if trained is None:
        return UNKNOWN
    marks = [match(t, current) for t in trained]
    return TRAINED if TRAINED in marks else UNKNOWN if UNKNOWN in marks else HELD_OUT


def reward_roles(specs, names: list[str], negatives, metadata: dict[str, dict]) -> list[dict]:
    """Per eval reward: ``{name, spec, role, trained_by, embeddings}``. ``embeddings`` maps every
    embedding negative (file or tuned) to its mark; ``trained_by`` lists those trained on the reward;
    ``role`` is "trained on" when any is, else "held out" when any embedding is known not to be (or
    there is no embedding), else "unknown". ``metadata``: ``{file: its metadata}`` of the file negatives
    and tuned negatives' start files."""
    from reneg.rewards import reward_file

    current = [reward_file(s) for s in specs]
    marks: dict[str, list[str]] = {}  # negative -> mark per reward
    for n in negatives:
        if n.kind not in ("file", "tuned", "predictor"):  # a predictor file's metadata says its rewards too
            continue
        start = None if n.source == "null" else trained_with(metadata.get(n.source) or {})
        row = []
        for i, cur in enumerate(current):
            if n.kind == "tuned" and i == 0:
                row.append(TRAINED)  # per-sample tuning optimises the first --reward
            elif n.kind == "tuned" and n.source == "null":
                row.append(HELD_OUT)
            else:
                row.append(status(start, cur))
        marks[n.name] = row
    out = []
    for i, (spec, name) in enumerate(zip(specs, names)):
        per = {neg: row[i] for neg, row in marks.items()}
        vals = set(per.values())
        role = TRAINED if TRAINED in vals else HELD_OUT if HELD_OUT in vals or not vals else UNKNOWN
        entry = {
            "name": name,
            "spec": str(spec),
            "role": role,
            "trained_by": [neg for neg, m in per.items() if m == TRAINED],
            "embeddings": per,
        }
        if i == 0 and any(n.kind == "tuned" for n in negatives):
            entry["note"] = "tuned negatives are tuned on this reward (per-sample tuning optimises the first --reward)"
        out.append(entry)
    return out


def role_text(entry: dict) -> str:
    """The mark shown beside a reward's name: its role, and each embedding's where they disagree."""
    per = entry.get("embeddings") or {}
    if len(set(per.values())) <= 1:
        return entry["role"]
    groups: dict[str, list[str]] = {}
    for neg, m in per.items():
        groups.setdefault(m, []).append(neg)
    return "; ".join(f"{m}: {', '.join(negs)}" for m, negs in groups.items())


def reward_names_of(summary: dict) -> list[str]:
    """The reward names of an eval summary (``rewards`` holds entries of :func:`reward_roles`; summaries
    written before it held the names)."""
    return [r["name"] if isinstance(r, dict) else r for r in summary.get("rewards", [])]

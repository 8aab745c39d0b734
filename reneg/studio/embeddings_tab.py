"""The Embeddings tab: the embedding files under a folder, with thumbnails; inspect and convert one.

:func:`build` lays the tab out with gradio (passed in).
"""

from __future__ import annotations

import os

from .common import _err, readable
from .forms import FormError
from .runs import sample_files


def list_embeddings(folder: str) -> list[dict]:
    """The embedding files under ``folder`` with family, kind and provenance, or the load error."""
    from reneg.embedding import list_embedding_files, load_embedding

    rows = []
    for path in list_embedding_files(folder):
        if os.path.basename(path) == "checkpoint.pt":  # a training checkpoint, not an embedding
            continue
        try:
            emb = load_embedding(path)
        except (OSError, ValueError, RuntimeError) as e:
            rows.append({"path": path, "error": str(e)})
            continue
        m = emb.metadata
        rows.append(
            {
                "path": path,
                "family": emb.family,
                "kind": m.get("kind", "?" if emb.format == "reneg" else "official (no metadata)"),
                "shape": "x".join(map(str, emb.tensor.shape)),
                "format": emb.format,
                "base_model": m.get("base_model", ""),
                "steps": m.get("trained_steps", m.get("steps", "")),
                "rewards": m.get("rewards", ""),
                "created": m.get("created", ""),
                "source": m.get("source_file", m.get("prompt", "")),
                "emb": emb,
            }
        )
    return rows


def thumbnail(entry: dict, size: int = 160):
    """A picture of an embedding: its run's latest sample grid when it sits in a run folder, else a
    heat map of its values (tokens down, channels across; each value's distance from its channel's
    mean, scaled by the file's 98th percentile of those distances)."""
    from PIL import Image

    folder = os.path.dirname(entry["path"])
    samples = sample_files(folder)
    if samples:
        im = Image.open(samples[-1][1]).convert("RGB")
        im.thumbnail((size * 2, size * 2))
        return im
    import numpy as np

    emb = entry.get("emb")
    if emb is None:
        return Image.new("RGB", (size, size), (200, 60, 60))
    t = emb.tensor.double()[0].numpy()
    t = t - t.mean(0, keepdims=True)
    # scaled per file by a high percentile, not the maximum: the released files have a few values far
    # from the rest (the start token's row), which would leave every other value near white
    mag = np.abs(t[np.isfinite(t)])
    scale = float(np.percentile(mag, 98)) if mag.size else 0.0
    if not scale > 0:
        scale = float(mag.max()) if mag.size and mag.max() > 0 else 1.0
    t = np.nan_to_num(t / scale, nan=0.0, posinf=1.0, neginf=-1.0)
    pos, neg = np.clip(t, 0, 1), np.clip(-t, 0, 1)
    rgb = (np.stack([1 - neg, 1 - pos - neg, 1 - pos], -1).clip(0, 1) * 255).astype("uint8")
    # red: above the channel's mean over tokens, blue: below
    return Image.fromarray(rgb, "RGB").resize((size, size), Image.NEAREST)


class EmbeddingsTab:
    """The Embeddings tab's handlers."""

    def embeddings(self, folder: str):
        """(status, table rows, thumbnails, file choices) for the files under ``folder``."""
        folder = (folder or "").strip()
        if not folder or not os.path.isdir(folder):
            return f"**Error:** Folder {folder or '(empty)'}: no such folder", [], [], []
        try:
            entries = list_embeddings(folder)
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            return _err(e), [], [], []
        rows, thumbs = [], []
        for e in entries:
            rel = os.path.relpath(e["path"], folder)
            if "error" in e:
                rows.append([rel, "unreadable", "", "", "", "", e["error"]])
                continue
            rows.append(
                [rel, e["family"], e["kind"], e["shape"], e["base_model"], str(e["steps"]), e["source"] or e["created"]]
            )
            try:
                thumbs.append((thumbnail(e), f"{rel} ({e['family']}, {e['shape']})"))
            except (OSError, ValueError):  # an unreadable picture: the row above says what is wrong
                pass
        return f"{len(entries)} embedding files under {folder}", rows, thumbs, [e["path"] for e in entries]

    def inspect(self, path: str):
        try:
            from reneg.embedding import load_embedding

            return load_embedding((path or "").strip()).info()
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            return {"error": readable(e)}

    def convert(self, src: str, dst: str, family: str = "", overwrite: bool = False) -> str:
        try:
            from reneg.embedding import convert

            src, dst = (src or "").strip(), (dst or "").strip()
            if not src:
                raise FormError("Convert: pick a file first")
            if not dst.endswith(".safetensors"):
                raise FormError(f"Convert to {dst or '(empty)'}: expected a .safetensors file name")
            if os.path.exists(dst) and not overwrite:
                raise FormError(f"Convert to {dst}: already exists (tick Overwrite to replace it)")
            emb = convert(src, dst, family=family or None, overwrite=overwrite)
            return f"Wrote {dst}: {emb.family} {list(emb.tensor.shape)}"
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            return _err(e)


def family_choices() -> list[str]:
    """The convert form's family dropdown: every family of the table, and empty (from the shape)."""
    from reneg.families import FAMILIES

    return ["", *FAMILIES]


def build(gr, studio) -> None:
    """The Embeddings tab, in the page being built."""
    with gr.Tab("Embeddings"):
        with gr.Row():
            folder = gr.Textbox(studio.root, label="Folder", scale=3)
            list_b = gr.Button("List", elem_id="emb_list", scale=1)
        emb_status = gr.Markdown("")
        emb_table = gr.Dataframe(
            headers=["file", "family", "kind", "shape", "base model", "steps", "source / created"],
            value=[],
            interactive=False,
        )
        emb_thumbs = gr.Gallery(
            label="Thumbnails (a run's latest samples, else the values: red above the channel mean, blue below)",
            columns=6,
            height="auto",  # each thumbnail whole, its caption (file, family, shape) in view
            object_fit="contain",
            elem_id="emb_thumbs",
        )
        with gr.Row():
            pick = gr.Dropdown([], label="File", allow_custom_value=True, scale=3)
            inspect_b = gr.Button("Inspect", scale=1)
        info = gr.JSON(label="Inspect")
        with gr.Row():
            conv_dst = gr.Textbox("", label="Convert to (.safetensors)", scale=3)
            conv_family = gr.Dropdown(family_choices(), value="", label="family (empty: from the shape)", scale=1)
            conv_over = gr.Checkbox(False, label="Overwrite", scale=1)
        conv_b = gr.Button("Convert")
        conv_msg = gr.Markdown("")

        def _list(f):
            s, rows, thumbs, choices = studio.embeddings(f)
            return s, rows, thumbs, gr.update(choices=choices, value=choices[0] if choices else None)

        list_b.click(_list, folder, [emb_status, emb_table, emb_thumbs, pick])
        inspect_b.click(studio.inspect, pick, info)
        pick.change(studio.inspect, pick, info)
        conv_b.click(studio.convert, [pick, conv_dst, conv_family, conv_over], conv_msg)

"""What every tab shares: an error as the one line the page shows, a picture file read, a form's fields.

No gradio import here: the tabs' handlers are plain methods (:mod:`reneg.studio.app`), and the page's
builders pass their gradio module in.
"""

from __future__ import annotations

from .forms import FormError


def readable(e: BaseException) -> str:
    """One line for the page: the message our code wrote, never a traceback."""
    if isinstance(e, FormError):
        return str(e)
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}".strip(": ")


def _err(e: BaseException) -> str:
    return f"**Error:** {readable(e)}"


def _pil(path: str):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def form_field(component, prefix: str, defaults, labels: dict):
    """``make(name, **more)``: a ``component`` (gr.Number, gr.Textbox...) for the form field ``name``, its
    page id ``PREFIX_NAME``, its value the form's default, its label the form's."""

    def make(name: str, **more):
        return component(elem_id=f"{prefix}_{name}", value=getattr(defaults, name), label=labels[name], **more)

    return make

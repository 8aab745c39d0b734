"""What every tab's handlers share: an error as the one line the page shows, a picture file read.

No gradio here: the tabs' handlers are plain methods (:mod:`reneg.studio.app`).
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

"""The ReNeg Studio page (gradio 5 or 6): its tabs assembled, and ``reneg studio``'s start.

One module per tab holds that tab's handlers and layout: :mod:`.train_tab`, :mod:`.tune_tab`,
:mod:`.compare_tab`, :mod:`.embeddings_tab`. :class:`Studio` joins their handlers, plain methods
that take and return plain values (strings, numbers, lists, PIL images); :func:`build_app` wires them
to gradio components, importing gradio only then. Tests call the methods directly. Only components
and calls that gradio 5 and 6 both have are used (Blocks, Tab, Row, Column, Accordion, Textbox,
Number, Dropdown, Button, Markdown, Dataframe, Image, Gallery, JSON, Timer,
``.click``/``.tick``/``.load``, generator handlers).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

from ..threads import apply_threads
from . import compare_tab, embeddings_tab, train_tab, tune_tab
from .common import readable  # noqa: F401 - the handlers' one-line errors, by their earlier address
from .compare_tab import EVAL_FIELDS, CompareTab  # noqa: F401 - each tab's field order, as tests read it
from .embeddings_tab import EmbeddingsTab
from .forms import TrainForm, demo_setup
from .runs import RunManager
from .train_tab import TRAIN_FIELDS, TrainTab, curves_figure, curves_image, form_values  # noqa: F401
from .tune_tab import TUNE_FIELDS, TuneTab  # noqa: F401


def check_root(root: str) -> None:
    """``--root`` must be a folder the app can write (runs and reports go there): refused at start-up,
    with the reason, rather than at the first Start."""
    try:
        os.makedirs(root, exist_ok=True)
    except OSError as e:
        raise OSError(f"--root {root}: cannot create the folder ({e.strerror or e})") from None
    probe = os.path.join(root, f".reneg-studio-write-test-{os.getpid()}")
    try:
        with open(probe, "w", encoding="utf-8") as f:
            f.write("ok")
    except OSError as e:
        raise OSError(f"--root {root}: the folder is not writable ({e.strerror or e})") from None
    finally:
        with contextlib.suppress(OSError):
            os.unlink(probe)


class Studio(TrainTab, TuneTab, CompareTab, EmbeddingsTab):
    """The page's state and handlers (one per app; runs are shared by every open page)."""

    def __init__(self, demo: bool = False, root: str = "runs", manager: RunManager | None = None):
        check_root(root)  # a folder the app cannot write is refused now, not at the first Start
        self.root = root
        self.manager = manager or RunManager()
        self.demo = demo_setup(root) if demo else None
        self.train_defaults = self.demo["train"] if demo else TrainForm.defaults()
        if not demo:
            self.train_defaults.out = os.path.join(root, "studio")
        self.manager.last_out = self.manager.last_out or self.train_defaults.out
        self._models = {}
        self._models_lock = threading.Lock()
        # the in-app tune: as many torch threads as other work (a browser, a training run) leaves free
        apply_threads("auto", most=self.demo["threads"] if demo else None)


def header_markdown(studio: Studio) -> str:
    """The page's first lines; on the demo world, which world is filled in."""
    text = "# ReNeg Studio\nLearned negative embeddings: train, watch, tune, compare."
    if studio.demo:
        kind = studio.demo["kind"]
        world = "The demo world" if kind == "demo world" else f"The demo world (*{kind}*)"
        text += f"  {world} is filled in everywhere: press **Start**."
    return text


# --------------------------------------------------------------------------- the page


def build_app(studio: Studio):
    import gradio as gr

    with gr.Blocks(title="ReNeg Studio", analytics_enabled=False) as app:
        gr.Markdown(header_markdown(studio), elem_id="header")
        train_tab.build(gr, studio, app)
        tune_tab.build(gr, studio)
        compare_tab.build(gr, studio)
        embeddings_tab.build(gr, studio)
    return app


def address_line(url: str, listen: bool) -> str:
    """What ``reneg studio`` prints about where it listens."""
    if listen:
        return (
            f"ReNeg Studio: {url}  LISTENING ON ALL NETWORK INTERFACES (--listen): anyone who can reach "
            f"this machine's port can start runs and read and write files as you"
        )
    return f"ReNeg Studio: {url}  (this machine only; --listen opens it to the network)"


def launch(demo: bool = False, listen: bool = False, port: int = 7860, root: str = "runs", block: bool = True):
    """Start the app on 127.0.0.1 (all interfaces with ``listen``) and print its address."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    studio = Studio(demo=demo, root=root)
    app = build_app(studio)
    host = "0.0.0.0" if listen else "127.0.0.1"
    app.queue(default_concurrency_limit=4)
    try:
        app.launch(
            server_name=host,
            server_port=port,
            inbrowser=False,
            share=False,
            show_error=False,
            prevent_thread_lock=True,
            quiet=True,
        )
    except OSError as e:
        raise OSError(f"--port {port}: cannot serve there ({str(e).splitlines()[0][:160]})") from None
    url = (getattr(app, "local_url", None) or f"http://127.0.0.1:{port}/").rstrip("/")
    print(address_line(url, listen), flush=True)
    if studio.demo:
        print(f"ReNeg Studio: demo world ({studio.demo['kind']}); runs go under {root}/", flush=True)
    if not block:
        return app, studio
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("ReNeg Studio: closed (training runs it started go on; reopen the app to find them)", flush=True)
    finally:
        app.close()
    return app, studio

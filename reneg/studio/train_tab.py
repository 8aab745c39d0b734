"""The Train tab: start, stop, resume and watch a ``reneg train`` run (its process and folder: :mod:`.runs`).

:class:`TrainTab` holds the tab's handlers (plain values in and out, for :class:`reneg.studio.app.Studio`
and the tests); :func:`build` lays the tab out with gradio, which only it uses (passed in).
"""

from __future__ import annotations

import os
from dataclasses import fields

from .common import _err, _pil, form_field
from .forms import TRAIN, TRAIN_LABELS, TrainForm
from .runs import monitor_points, recorded_form, resume_form, run_status

TRAIN_FIELDS = [f.name for f in fields(TrainForm) if f.name != "extra"]
MAX_SAMPLE_CARDS = 8


class TrainTab:
    """The Train tab's handlers (``self.manager``, ``self.train_defaults``: :class:`reneg.studio.app.Studio`)."""

    def _form(self, values) -> TrainForm:
        form = TrainForm(**dict(zip(TRAIN_FIELDS, values)))
        for k in (
            "model",
            "config",
            "rewards",
            "monitor_rewards",
            "prompts",
            "heldout",
            "handcrafted",
            "out",
            "init",
            "device",
            "keep_best_by",
            "shift",
        ):
            lines = k in ("rewards", "monitor_rewards")
            setattr(form, k, (getattr(form, k) or "").strip() if not lines else getattr(form, k) or "")
        return form

    def start(self, *values) -> str:
        try:
            return self.manager.start(self._form(values))
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            return _err(e)

    def resume_run(self, *values) -> tuple[str, TrainForm | None]:
        """Resume the run in the form's output folder with the settings it was made with (a resumed
        run is the interrupted one: the page's other values are not used, and are named); returns the
        line for the page and the form used, for the page to show."""
        try:
            form, differ = resume_form(self._form(values))
            msg = self.manager.start(form, resume=True)
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            return _err(e), None
        if differ:
            more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
            msg += f", with the run's own settings (this page's {', '.join(differ[:6])}{more} differed: not used)"
        return msg, form

    def resume(self, *values) -> str:
        return self.resume_run(*values)[0]

    def reopen(self, out: str) -> tuple[str, list | None]:
        """A page opened (or reloaded): the run it shows (the last one this app started, else the
        form's folder) and that run's settings as the form's values (None when there is no run)."""
        out = self.manager.last_out or out
        form = recorded_form(out)
        return out, None if form is None else form_values(form)

    def stop(self, out: str) -> str:
        try:
            return self.manager.stop(out or "")
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            return _err(e)

    def poll(self, out: str, shown: str = "") -> dict:
        """The Train tab's view of ``out``: status line, curves, held-out table, samples, log.
        ``shown`` is the signature of what the page has; pictures are sent only when it changed
        (``None`` in ``curves``/``gallery`` means: keep what is shown)."""
        try:
            st = run_status(out, self.manager)
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            return {
                "status": _err(e),
                "curves": None,
                "heldout": [],
                "latest": None,
                "gallery": None,
                "signature": shown,
                "log": "",
                "state": "error",
                "step": 0,
                "steps": None,
                "rows": [],
            }
        rows = st["rows"]
        samples = st["samples"]
        last = rows[-1] if rows else {}
        sig = (
            f"{os.path.abspath(out or '')}:{len(rows)}:{last.get('step')}:{len(st['heldout'])}:"
            f"{[s for s, _ in samples]}"
        )
        latest = gallery = curves = None
        if sig != shown:
            try:
                curves = curves_image(rows, st["heldout"], monitors=st["monitors"])
                if samples:
                    latest = _pil(samples[-1][1])
                gallery = [(_pil(p), f"step {s}") for s, p in reversed(samples[-MAX_SAMPLE_CARDS:])]
            except OSError:  # a file being replaced: next poll
                sig, curves, gallery = shown, None, None
        steps = st["steps"]
        head = f"**{st['message']}**"
        if st["state"] == "running" and steps:
            head += "\n\n" + _bar(st["step"], steps)
        for w in st["warnings"]:  # reward hacking (trainer/monitor.py): shown for as long as the run is shown
            head += f"\n\n**Warning:** {w}"
        table = [[r[0]] + [None if x is None else round(float(x), 4) for x in r[1:]] for r in st["heldout"]]
        return {
            "status": head,
            "curves": curves,
            "heldout": table,
            "latest": latest,
            "gallery": gallery,
            "signature": sig,
            "log": st["log"],
            "state": st["state"],
            "step": st["step"],
            "steps": steps,
            "rows": [r["step"] for r in rows],
        }


def curves_figure(
    rows: list[dict],
    heldout: list | None = None,
    width: float = 9.0,
    height: float = 2.8,
    monitors: dict | None = None,
):
    """Loss and reward curves (training batches, and the held-out means as they are scored:
    ``heldout`` rows ``[step, null, handcrafted, learned]``, the final one included) as a matplotlib
    figure; without pyplot, so it is safe in the app's worker threads. A curve of one point is drawn
    as a marker. ``monitors`` (``{series: [(step, value)]}``, :func:`reneg.studio.runs.monitor_points`;
    from ``rows`` when None) adds a third panel beside the held-out reward: the learned negative's
    held-out monitor rewards, and its held-out diversity on an axis of its own (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if monitors is None:
        monitors = monitor_points(rows)
    watched = {k: v for k, v in monitors.items() if v}
    fig = Figure(figsize=(width * (1.5 if watched else 1.0), height), dpi=100)
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, 3 if watched else 2))
    ax1, ax2 = axes[:2]
    steps = [r["step"] for r in rows]
    dot = {"marker": "o", "ms": 4} if len(rows) == 1 else {}
    ax1.plot(steps, [r.get("loss") for r in rows], color="#444", lw=1.2, **dot)
    ax1.set_title("loss", fontsize=10)
    ax2.plot(steps, [r.get("reward") for r in rows], color="#999", lw=1.0, label="training batch", **dot)
    if heldout is None:
        keys = ("heldout_null", "heldout_handcrafted", "heldout_learned")
        heldout = [[r["step"]] + [r.get(k) for k in keys] for r in rows if "heldout_learned" in r]
    for i, label, colour in (
        (1, "held-out: null", "#d62728"),
        (2, "held-out: handcrafted", "#ff7f0e"),
        (3, "held-out: learned", "#1f77b4"),
    ):
        pts = [(h[0], h[i]) for h in heldout if h[i] is not None]
        if pts:
            ax2.plot(*zip(*pts), marker="o", ms=4, lw=1.5, color=colour, label=label)
    ax2.set_title("reward", fontsize=10)
    if rows or heldout:
        ax2.legend(fontsize=7, loc="best")
    if watched:
        ax3 = axes[2]
        colours = ["#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
        handles = []
        for i, name in enumerate(k for k in watched if k != "diversity"):
            handles += ax3.plot(
                *zip(*watched[name]), marker="o", ms=4, lw=1.5, color=colours[i % len(colours)], label=f"{name}"
            )
        if "diversity" in watched:
            axd = ax3.twinx() if len(handles) else ax3
            handles += axd.plot(
                *zip(*watched["diversity"]), marker="s", ms=3, lw=1.2, ls="--", color="#333", label="diversity"
            )
            axd.set_ylabel("diversity", fontsize=8)
            axd.tick_params(labelsize=7)
        rewards = [k for k in watched if k != "diversity"]
        title = " and ".join(x for x, on in (("monitors", rewards), ("diversity", "diversity" in watched)) if on)
        ax3.set_title(f"held-out {title} (learned)", fontsize=10)
        ax3.legend(handles, [h.get_label() for h in handles], fontsize=7, loc="best")
        axes = [ax1, ax2, ax3]
    for ax in axes:
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def curves_image(
    rows: list[dict],
    heldout: list | None = None,
    width: float = 9.0,
    height: float = 2.8,
    monitors: dict | None = None,
):
    """:func:`curves_figure` as a picture."""
    from PIL import Image

    fig = curves_figure(rows, heldout, width, height, monitors=monitors)
    fig.canvas.draw()
    buf = fig.canvas.buffer_rgba()
    return Image.frombuffer("RGBA", fig.canvas.get_width_height(), bytes(buf), "raw", "RGBA", 0, 1).convert("RGB")


def form_values(form: TrainForm) -> list:
    """A form as the page's Train fields hold it (the seed as text: exact at any size)."""
    return [str(form.seed) if k == "seed" else getattr(form, k) for k in TRAIN_FIELDS]


def _bar(step: int, steps: int) -> str:
    n = 30
    k = int(n * min(1.0, step / max(1, steps)))
    return f"`[{'#' * k}{'.' * (n - k)}] {100 * step / max(1, steps):.0f} %`"


def build(gr, studio, app) -> None:
    """The Train tab, in the page being built (``app``: its Blocks, for the page's load event)."""
    t = studio.train_defaults

    number = form_field(gr.Number, "train", t, TRAIN_LABELS)
    text = form_field(gr.Textbox, "train", t, TRAIN_LABELS)

    with gr.Tab("Train"):
        with gr.Row():
            with gr.Column(scale=1):
                c = {}
                c["model"] = text("model")
                c["config"] = text("config")
                c["parts"] = text("parts", lines=1)
                c["rewards"] = text("rewards", lines=2)
                c["monitor_rewards"] = gr.Textbox(
                    elem_id="train_monitor_rewards",
                    value=t.monitor_rewards,
                    lines=1,
                    label=TRAIN_LABELS["monitor_rewards"],
                    info=TRAIN.help("monitor_rewards"),
                )
                c["prompts"] = text("prompts")
                c["heldout"] = text("heldout")
                c["handcrafted"] = text("handcrafted")
                c["out"] = text("out")
                with gr.Accordion("Recipe (defaults as reneg train)", open=False):
                    with gr.Row():
                        c["steps"] = number("steps")
                        c["lr"] = number("lr")
                        c["batch_size"] = number("batch_size")
                        c["micro_batch"] = number("micro_batch")
                    with gr.Row():
                        c["sampling_steps"] = number("sampling_steps")
                        c["guidance"] = number("guidance")
                        c["grad_lo"] = number("grad_lo")
                        c["grad_hi"] = number("grad_hi")
                    with gr.Row():
                        c["resolution"] = number("resolution")
                        c["init"] = text("init")
                        c["seed"] = gr.Textbox(elem_id="train_seed", value=str(t.seed), label=TRAIN_LABELS["seed"])
                        c["heldout_count"] = number("heldout_count")
                    with gr.Row():  # text-to-video models (Wan, ZeroScope): clips and Wan's flow shift
                        c["frames"] = number("frames")
                        c["shift"] = text("shift")
                    with gr.Row():
                        c["checkpoint_every"] = number("checkpoint_every")
                        c["eval_every"] = number("eval_every")
                        c["eval_batch"] = number("eval_batch")
                        c["sample_every"] = number("sample_every")
                    with gr.Row():
                        c["mixed_precision"] = gr.Dropdown(
                            TRAIN.choices("mixed_precision"),
                            value=t.mixed_precision,
                            elem_id="train_mixed_precision",
                            label=TRAIN_LABELS["mixed_precision"],
                        )
                        c["device"] = text("device")
                        c["report_to"] = gr.Dropdown(
                            TRAIN.choices("report_to"),
                            value=t.report_to,
                            elem_id="train_report_to",
                            label=TRAIN_LABELS["report_to"],
                        )
                        c["keep_best_by"] = gr.Textbox(
                            elem_id="train_keep_best_by",
                            value=t.keep_best_by,
                            label=TRAIN_LABELS["keep_best_by"],
                            info=TRAIN.help("keep_best_by"),
                        )
                with gr.Row():
                    start_b = gr.Button("Start", variant="primary", elem_id="train_start")
                    stop_b = gr.Button("Stop (keeps a checkpoint)", elem_id="train_stop")
                    resume_b = gr.Button("Resume", elem_id="train_resume")
                action = gr.Markdown("", elem_id="train_action")
            with gr.Column(scale=2):
                status = gr.Markdown("", elem_id="train_status")
                curves = gr.Image(
                    label="Loss and reward", type="pil", interactive=False, elem_id="train_curves", height=300
                )
                heldout = gr.Dataframe(
                    headers=["step", "null", "handcrafted", "learned"],
                    value=[],
                    label="Held-out mean reward (as scored)",
                    interactive=False,
                )
                latest = gr.Image(
                    label="Latest samples: null (left) and the current negative (right), fixed prompts and seeds",
                    type="pil",
                    interactive=False,
                    elem_id="train_latest",
                    height=360,
                )
                gallery = gr.Gallery(
                    label="Earlier samples", columns=6, height=260, object_fit="contain", elem_id="train_gallery"
                )
                log = gr.Textbox(label="Trainer output", lines=6, max_lines=12, interactive=False)
        shown = gr.State("")
        inputs = [c[k] for k in TRAIN_FIELDS]

        def _poll(out, sig):
            r = studio.poll(out, sig)
            keep = gr.update()
            return (
                r["status"],
                keep if r["curves"] is None else r["curves"],
                r["heldout"],
                keep if r["gallery"] is None else r["latest"],
                keep if r["gallery"] is None else r["gallery"],
                r["log"],
                r["signature"],
            )

        poll_outputs = [status, curves, heldout, latest, gallery, log, shown]
        keep_form = [gr.update() for _ in inputs]

        def _resume(*values):
            # the form then shows the settings the resumed run uses (the run's own)
            msg, form = studio.resume_run(*values)
            return (msg, *(keep_form if form is None else form_values(form)))

        start_b.click(studio.start, inputs, action)
        resume_b.click(_resume, inputs, [action] + inputs, api_name="resume")
        stop_b.click(studio.stop, c["out"], action)
        gr.Timer(2.0).tick(_poll, [c["out"], shown], poll_outputs)

        def _on_load(out, sig):
            # a reopened page shows the last run this app started, its form filled from that run's
            # settings (so that Resume continues it as it was made)
            last, values = studio.reopen(out)
            values = list(keep_form if values is None else values)
            values[TRAIN_FIELDS.index("out")] = last
            return (*values, *_poll(last, ""))

        app.load(_on_load, [c["out"], shown], inputs + poll_outputs)

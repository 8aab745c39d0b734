"""The Compare tab: ``reneg eval`` as a child process (:func:`reneg.studio.runs.start_eval`) and its report.

The form is ``reneg eval``'s (:data:`reneg.studio.forms.EVAL`). :func:`build` lays the tab out with
gradio (passed in).
"""

from __future__ import annotations

import os
import time
from dataclasses import fields

from .common import _err, _pil, form_field
from .forms import EVAL_LABELS, EvalForm
from .runs import _tail, error_line, eval_report, start_eval

EVAL_FIELDS = [f.name for f in fields(EvalForm)]


class CompareTab:
    """The Compare tab's handlers (``self.root``, ``self.demo``, ``self.train_defaults``:
    :class:`reneg.studio.app.Studio`)."""

    def eval_defaults(self) -> EvalForm:
        t = self.train_defaults
        if not self.demo:
            return EvalForm(model=t.model, rewards=t.rewards, out=os.path.join(self.root, "studio-eval"))
        emb = os.path.join(t.out, "embedding.safetensors")
        return EvalForm(
            model=t.model,
            rewards=t.rewards,
            prompts=t.heldout,
            negatives=f"null\nhandcrafted\nlearned={emb}",
            handcrafted=t.handcrafted,
            out=os.path.join(self.root, "studio-demo-eval"),
            limit=16,
            images_per_prompt=4,
            sampling_steps=t.sampling_steps,
            guidance=t.guidance,
            resolution=t.resolution,
            batch=32,
            seed=1234,
        )

    def compare(self, *values, poll: float = 1.0):
        """Generator: (status, log, table rows, grid image, plots) while ``reneg eval`` runs."""
        try:
            form = EvalForm(**dict(zip(EVAL_FIELDS, values)))
            proc = start_eval(form)  # reneg eval's own --threads auto
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            yield _err(e), "", [], None, []
            return
        out = form.out.strip()
        log = os.path.join(out, "studio_eval.log")
        t0 = time.time()
        while proc.poll() is None:
            yield (f"Running `reneg eval` (process {proc.pid}), {time.time() - t0:.0f} s", _tail(log, 12), [], None, [])
            time.sleep(poll)
        text = _tail(log, 40)
        if proc.returncode != 0:
            yield f"**`reneg eval` failed:** {error_line(text) or 'see the log'}", text, [], None, []
            return
        yield self._report_tuple(out, text, f"Done in {time.time() - t0:.0f} s. ")

    def _report_tuple(self, out: str, log: str, prefix: str = ""):
        rep = eval_report(out)
        if not rep["table"]:
            return f"{prefix}No report in {out} yet", log, [], None, []
        grid = _pil(rep["grid"]) if rep["grid"] else None
        plots = [(_pil(p), os.path.basename(p)) for p in rep["plots"]]
        return (f"{prefix}Report: {os.path.join(out, 'report.html')}", log, rep["table"], grid, plots)

    def show_report(self, out: str):
        try:
            return self._report_tuple((out or "").strip(), _tail(os.path.join(out or "", "studio_eval.log"), 40))
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            return _err(e), "", [], None, []


def build(gr, studio) -> None:
    """The Compare tab, in the page being built."""
    with gr.Tab("Compare"):
        ed = studio.eval_defaults()
        number = form_field(gr.Number, "compare", ed, EVAL_LABELS)
        text = form_field(gr.Textbox, "compare", ed, EVAL_LABELS)
        with gr.Row():
            with gr.Column(scale=1):
                e = {}
                e["model"] = text("model")
                e["config"] = text("config")
                e["parts"] = text("parts", lines=1)
                e["rewards"] = gr.Textbox(
                    elem_id="compare_rewards", value=ed.rewards, lines=2, label=EVAL_LABELS["rewards"]
                )
                e["prompts"] = text("prompts")
                e["negatives"] = text("negatives", lines=4)
                e["handcrafted"] = text("handcrafted")
                e["out"] = text("out")
                with gr.Accordion("Settings", open=False):
                    with gr.Row():
                        e["limit"] = number("limit")
                        e["images_per_prompt"] = number("images_per_prompt")
                        e["sampling_steps"] = number("sampling_steps")
                        e["guidance"] = number("guidance")
                    with gr.Row():
                        e["resolution"] = number("resolution")
                        e["frames"] = text("frames")  # empty: the model's own count
                        e["shift"] = text("shift")
                        e["batch"] = number("batch")
                        e["seed"] = gr.Textbox(elem_id="compare_seed", value=str(ed.seed), label=EVAL_LABELS["seed"])
                        e["device"] = text("device")
                with gr.Row():
                    cmp_b = gr.Button("Run reneg eval", variant="primary", elem_id="compare_start")
                    show_b = gr.Button("Show the report in the folder")
            with gr.Column(scale=2):
                cmp_status = gr.Markdown("", elem_id="compare_status")
                cmp_table = gr.Dataframe(
                    headers=["reward", "negative", "mean", "95% CI", "win rate"],
                    value=[],
                    interactive=False,
                    label="Summary",
                )
                cmp_grid = gr.Image(
                    label="Grid (one row per image, one column per negative)", type="pil", interactive=False
                )
                cmp_plots = gr.Gallery(
                    # whole: no fixed height that would cut the plots (or their captions) off
                    label="Plots",
                    columns=2,
                    height="auto",
                    object_fit="contain",
                    elem_id="compare_plots",
                )
                cmp_log = gr.Textbox(label="reneg eval output", lines=6, max_lines=12, interactive=False)
        cmp_outputs = [cmp_status, cmp_log, cmp_table, cmp_grid, cmp_plots]
        cmp_b.click(studio.compare, [e[k] for k in EVAL_FIELDS], cmp_outputs)
        show_b.click(studio.show_report, e["out"], cmp_outputs)

"""The ReNeg Studio page (gradio 5 or 6) and the handlers behind it.

:class:`Studio` holds the handlers as plain methods that take and return plain values (strings,
numbers, lists, PIL images); :func:`build_app` wires them to gradio components. Tests call the
methods directly. Only components and calls that gradio 5 and 6 both have are used (Blocks, Tab,
Row, Column, Accordion, Textbox, Number, Dropdown, Button, Markdown, Dataframe, Image, Gallery,
JSON, Timer, ``.click``/``.tick``/``.load``, generator handlers).
"""

from __future__ import annotations

import os
import queue
import threading
import time
from dataclasses import asdict, fields

from ..threads import apply_threads
from .forms import TRAIN, TUNE, TuneForm, check_tune
from .runs import (
    EVAL_LABELS,
    TRAIN_LABELS,
    TUNE_LABELS,
    EvalForm,
    FormError,
    RunManager,
    TrainForm,
    _tail,
    check_root,
    demo_setup,
    eval_report,
    list_embeddings,
    recorded_form,
    resume_form,
    run_status,
    start_eval,
    thumbnail,
)

TRAIN_FIELDS = [f.name for f in fields(TrainForm) if f.name != "extra"]
EVAL_FIELDS = [f.name for f in fields(EvalForm)]
TUNE_FIELDS = [f.name for f in fields(TuneForm)]
MAX_SAMPLE_CARDS = 8


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


class Studio:
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

    # ------------------------------------------------------------------ defaults for the form
    def tune_defaults(self) -> dict:
        t = self.train_defaults
        d = asdict(TuneForm(model=t.model, config=t.config, rewards=t.rewards))
        if self.demo:
            emb = os.path.join(t.out, "embedding.safetensors")
            d.update(
                prompt=self.demo["prompt"],
                lr=self.demo["tune_lr"],
                sampling_steps=t.sampling_steps,
                guidance=t.guidance,
                grad_lo=t.grad_lo,
                grad_hi=t.grad_hi,
                resolution=t.resolution,
                embedding=emb if os.path.isfile(emb) else "",
            )
        return d

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

    # ------------------------------------------------------------------ Train
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

    # ------------------------------------------------------------------ Tune
    def _models_for(self, model, config, rewards, device):
        import torch

        from reneg.backends.loading import load_diffusers
        from reneg.rewards import load_rewards

        key = (model, config or None, tuple(rewards), device or "")
        with self._models_lock:
            if key not in self._models:
                self._models.clear()  # one model set in memory at a time
                dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
                backend = load_diffusers(model, device=dev, config=config or None)
                self._models[key] = (backend, load_rewards(list(rewards), device=dev))
            return self._models[key]

    def check_tune(self, v: dict):
        """The Tune form, checked by ``reneg tune``'s own checks (the options layer's), before any
        model loads; a bad value is a :class:`FormError` naming the field as the page labels it."""
        return check_tune(v)

    def tune(self, *values):
        """Generator: (status, gallery [(image, caption)], table rows, result) after every step."""
        v = dict(zip(TUNE_FIELDS, values))
        try:
            ns = self.check_tune(v)
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            yield _err(e), [], [], None
            return
        yield "Loading the models...", [], [], None
        try:
            backend, reward = self._models_for(ns.model, ns.config, ns.rewards, ns.device)
            from reneg.embedding import load_embedding

            if ns.embedding:
                start = load_embedding(ns.embedding, expected_family=backend.family).tensor.float()
            else:
                start, _ = backend.null_embedding()
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            yield _err(e), [], [], None
            return
        q: queue.Queue = queue.Queue()
        capture = _ImageCapture(reward)

        def on_step(rec):
            q.put(("step", dict(rec), capture.last))

        def work():
            from reneg.tuning import tune_for_seed

            try:
                res, image = tune_for_seed(
                    backend,
                    capture,
                    ns.prompt,
                    ns.seed,
                    start.to(backend.device),
                    ns.sampling_steps,
                    float(ns.guidance),
                    ns.grad_range,
                    ns.resolution,
                    ns.resolution,
                    ns.max_steps,
                    ns.patience,
                    float(ns.lr),
                    noise=ns.noise or "seed",
                    on_step=on_step,
                )
                q.put(("done", res, image))
            except Exception as e:  # noqa: BLE001 - the page shows every error as one line
                q.put(("error", e, None))

        threading.Thread(target=work, daemon=True).start()
        gallery, table = [], []
        while True:
            kind, a, b = q.get()
            if kind == "step":
                table.append(
                    [a["step"], round(a["reward"], 5), round(a["best_reward"], 5), "yes" if a["improved"] else ""]
                )
                if b is not None:
                    from reneg.trainer.events import to_pil

                    im = to_pil(b)[0]
                    im = im.resize((max(256, im.width), max(256, im.height)), 0)
                    gallery.append((im, f"step {a['step']}: reward {a['reward']:.4f}"))
                # numbered as reneg tune numbers them: step 0 scores the start, step k follows k updates
                status = (
                    f"Step {a['step']} of at most {ns.max_steps - 1} (step 0: the start): reward "
                    f"{a['reward']:.5f} (best {a['best_reward']:.5f})"
                )
                yield status, list(gallery), list(table), None
            elif kind == "error":
                yield _err(a), list(gallery), list(table), None
                return
            else:
                from reneg.generate import as_embedding

                res = a
                emb = as_embedding(backend, res.best)
                result = {
                    "embedding": emb,
                    "prompt": ns.prompt,
                    "seed": ns.seed,
                    "noise": ns.noise,
                    "model": ns.model,
                    "rewards": ns.rewards,
                    "lr": float(ns.lr),
                    "guidance": float(ns.guidance),
                    "steps": len(res.history),
                    "start": os.path.basename(ns.embedding) or "null",
                    "start_reward": res.start_reward,
                    "best_reward": res.best_reward,
                }
                yield (
                    (
                        f"**Done ({res.stopped}).** Start reward {res.start_reward:.5f} (step 0), best "
                        f"{res.best_reward:.5f} at step {res.best_step}. Save keeps the best embedding."
                    ),
                    list(gallery),
                    list(table),
                    result,
                )
                return

    def tune_save(self, result, path: str, overwrite: bool = False) -> str:
        try:
            if not result:
                raise FormError("Nothing to save yet: run Tune first")
            path = (path or "").strip()
            if not path.endswith(".safetensors"):
                raise FormError(f"Save as {path or '(empty)'}: expected a .safetensors file name")
            if os.path.exists(path) and not overwrite:
                raise FormError(f"Save as {path}: already exists (tick Overwrite to replace it)")
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            from reneg.embedding import save_embedding

            r = result
            save_embedding(
                path,
                r["embedding"],
                overwrite=overwrite,
                kind="per-sample",
                prompt=r["prompt"],
                seed=r["seed"],
                noise_mode=r["noise"],
                base_model=os.path.basename(os.path.normpath(r["model"])),
                rewards=r["rewards"],
                steps=r["steps"],
                lr=r["lr"],
                guidance_scale=r["guidance"],
                start_embedding=r["start"],
                start_reward=r["start_reward"],
                best_reward=r["best_reward"],
            )
            return f"Saved {path} (best reward {r['best_reward']:.5f})"
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            return _err(e)

    # ------------------------------------------------------------------ Compare
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
            from .runs import error_line

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

    # ------------------------------------------------------------------ Embeddings
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


class _ImageCapture:
    """The reward, remembering the last image it scored without gradients (a step's final image)."""

    def __init__(self, reward):
        self.reward = reward
        self.last = None

    def __call__(self, images, prompts):
        import torch

        if not torch.is_grad_enabled():
            self.last = images.detach().float().cpu()
        return self.reward(images, prompts)

    def __getattr__(self, name):
        return getattr(self.reward, name)


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

    from .runs import monitor_points

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


def header_markdown(studio: Studio) -> str:
    """The page's first lines; on the demo world, which world is filled in."""
    text = "# ReNeg Studio\nLearned negative embeddings: train, watch, tune, compare."
    if studio.demo:
        kind = studio.demo["kind"]
        world = "The demo world" if kind == "demo world" else f"The demo world (*{kind}*)"
        text += f"  {world} is filled in everywhere: press **Start**."
    return text


def form_values(form: TrainForm) -> list:
    """A form as the page's Train fields hold it (the seed as text: exact at any size)."""
    return [str(form.seed) if k == "seed" else getattr(form, k) for k in TRAIN_FIELDS]


def _bar(step: int, steps: int) -> str:
    n = 30
    k = int(n * min(1.0, step / max(1, steps)))
    return f"`[{'#' * k}{'.' * (n - k)}] {100 * step / max(1, steps):.0f} %`"


# --------------------------------------------------------------------------- the page


def build_app(studio: Studio):
    import gradio as gr

    from reneg.families import FAMILIES

    t = studio.train_defaults
    with gr.Blocks(title="ReNeg Studio", analytics_enabled=False) as app:
        gr.Markdown(header_markdown(studio), elem_id="header")
        with gr.Tab("Train"):
            with gr.Row():
                with gr.Column(scale=1):
                    c = {}
                    c["model"] = gr.Textbox(
                        elem_id="train_model",
                        value=t.model,
                        label=TRAIN_LABELS["model"],
                    )
                    c["config"] = gr.Textbox(elem_id="train_config", value=t.config, label=TRAIN_LABELS["config"])
                    c["rewards"] = gr.Textbox(
                        elem_id="train_rewards",
                        value=t.rewards,
                        lines=2,
                        label=TRAIN_LABELS["rewards"],
                    )
                    c["monitor_rewards"] = gr.Textbox(
                        elem_id="train_monitor_rewards",
                        value=t.monitor_rewards,
                        lines=1,
                        label=TRAIN_LABELS["monitor_rewards"],
                        info=TRAIN.help("monitor_rewards"),
                    )
                    c["prompts"] = gr.Textbox(elem_id="train_prompts", value=t.prompts, label=TRAIN_LABELS["prompts"])
                    c["heldout"] = gr.Textbox(
                        elem_id="train_heldout",
                        value=t.heldout,
                        label=TRAIN_LABELS["heldout"],
                    )
                    c["handcrafted"] = gr.Textbox(
                        elem_id="train_handcrafted",
                        value=t.handcrafted,
                        label=TRAIN_LABELS["handcrafted"],
                    )
                    c["out"] = gr.Textbox(elem_id="train_out", value=t.out, label=TRAIN_LABELS["out"])
                    with gr.Accordion("Recipe (defaults as reneg train)", open=False):
                        with gr.Row():
                            c["steps"] = gr.Number(elem_id="train_steps", value=t.steps, label=TRAIN_LABELS["steps"])
                            c["lr"] = gr.Number(elem_id="train_lr", value=t.lr, label=TRAIN_LABELS["lr"])
                            c["batch_size"] = gr.Number(
                                elem_id="train_batch_size", value=t.batch_size, label=TRAIN_LABELS["batch_size"]
                            )
                            c["micro_batch"] = gr.Number(
                                elem_id="train_micro_batch", value=t.micro_batch, label=TRAIN_LABELS["micro_batch"]
                            )
                        with gr.Row():
                            c["sampling_steps"] = gr.Number(
                                elem_id="train_sampling_steps",
                                value=t.sampling_steps,
                                label=TRAIN_LABELS["sampling_steps"],
                            )
                            c["guidance"] = gr.Number(
                                elem_id="train_guidance", value=t.guidance, label=TRAIN_LABELS["guidance"]
                            )
                            c["grad_lo"] = gr.Number(
                                elem_id="train_grad_lo", value=t.grad_lo, label=TRAIN_LABELS["grad_lo"]
                            )
                            c["grad_hi"] = gr.Number(
                                elem_id="train_grad_hi", value=t.grad_hi, label=TRAIN_LABELS["grad_hi"]
                            )
                        with gr.Row():
                            c["resolution"] = gr.Number(
                                elem_id="train_resolution", value=t.resolution, label=TRAIN_LABELS["resolution"]
                            )
                            c["init"] = gr.Textbox(elem_id="train_init", value=t.init, label=TRAIN_LABELS["init"])
                            c["seed"] = gr.Textbox(elem_id="train_seed", value=str(t.seed), label=TRAIN_LABELS["seed"])
                            c["heldout_count"] = gr.Number(
                                elem_id="train_heldout_count",
                                value=t.heldout_count,
                                label=TRAIN_LABELS["heldout_count"],
                            )
                        with gr.Row():
                            c["checkpoint_every"] = gr.Number(
                                elem_id="train_checkpoint_every",
                                value=t.checkpoint_every,
                                label=TRAIN_LABELS["checkpoint_every"],
                            )
                            c["eval_every"] = gr.Number(
                                elem_id="train_eval_every", value=t.eval_every, label=TRAIN_LABELS["eval_every"]
                            )
                            c["eval_batch"] = gr.Number(
                                elem_id="train_eval_batch", value=t.eval_batch, label=TRAIN_LABELS["eval_batch"]
                            )
                            c["sample_every"] = gr.Number(
                                elem_id="train_sample_every", value=t.sample_every, label=TRAIN_LABELS["sample_every"]
                            )
                        with gr.Row():
                            c["mixed_precision"] = gr.Dropdown(
                                TRAIN.choices("mixed_precision"),
                                value=t.mixed_precision,
                                elem_id="train_mixed_precision",
                                label=TRAIN_LABELS["mixed_precision"],
                            )
                            c["device"] = gr.Textbox(
                                elem_id="train_device", value=t.device, label=TRAIN_LABELS["device"]
                            )
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

        with gr.Tab("Tune"):
            td = studio.tune_defaults()
            with gr.Row():
                with gr.Column(scale=1):
                    u = {}
                    u["model"] = gr.Textbox(elem_id="tune_model", value=td["model"], label=TUNE_LABELS["model"])
                    u["config"] = gr.Textbox(elem_id="tune_config", value=td["config"], label=TUNE_LABELS["config"])
                    u["rewards"] = gr.Textbox(
                        elem_id="tune_rewards", value=td["rewards"], lines=2, label=TUNE_LABELS["rewards"]
                    )
                    u["embedding"] = gr.Textbox(
                        elem_id="tune_embedding", value=td["embedding"], label=TUNE_LABELS["embedding"]
                    )
                    u["prompt"] = gr.Textbox(elem_id="tune_prompt", value=td["prompt"], label=TUNE_LABELS["prompt"])
                    with gr.Row():
                        u["seed"] = gr.Textbox(elem_id="tune_seed", value=str(td["seed"]), label=TUNE_LABELS["seed"])
                        u["noise"] = gr.Dropdown(TUNE.choices("noise"), value=td["noise"], label=TUNE_LABELS["noise"])
                    with gr.Accordion("Algorithm 1 settings", open=True):
                        with gr.Row():
                            u["max_steps"] = gr.Number(
                                elem_id="tune_max_steps", value=td["max_steps"], label=TUNE_LABELS["max_steps"]
                            )
                            u["patience"] = gr.Number(
                                elem_id="tune_patience", value=td["patience"], label=TUNE_LABELS["patience"]
                            )
                            u["lr"] = gr.Number(elem_id="tune_lr", value=td["lr"], label=TUNE_LABELS["lr"])
                        with gr.Row():
                            u["sampling_steps"] = gr.Number(
                                elem_id="tune_sampling_steps",
                                value=td["sampling_steps"],
                                label=TUNE_LABELS["sampling_steps"],
                            )
                            u["guidance"] = gr.Number(
                                elem_id="tune_guidance", value=td["guidance"], label=TUNE_LABELS["guidance"]
                            )
                            u["grad_lo"] = gr.Number(
                                elem_id="tune_grad_lo", value=td["grad_lo"], label=TUNE_LABELS["grad_lo"]
                            )
                            u["grad_hi"] = gr.Number(
                                elem_id="tune_grad_hi", value=td["grad_hi"], label=TUNE_LABELS["grad_hi"]
                            )
                        with gr.Row():
                            u["resolution"] = gr.Number(
                                elem_id="tune_resolution", value=td["resolution"], label=TUNE_LABELS["resolution"]
                            )
                            u["device"] = gr.Textbox(
                                elem_id="tune_device", value=td["device"], label=TUNE_LABELS["device"]
                            )
                    tune_b = gr.Button("Tune", variant="primary", elem_id="tune_start")
                    with gr.Row():
                        save_path = gr.Textbox(
                            os.path.join(studio.root, "tuned.safetensors"), label="Save as", elem_id="tune_save_path"
                        )
                        save_over = gr.Checkbox(False, label="Overwrite")
                    save_b = gr.Button("Save the kept embedding", elem_id="tune_save")
                    save_msg = gr.Markdown("", elem_id="tune_save_msg")
                with gr.Column(scale=2):
                    tune_status = gr.Markdown("", elem_id="tune_status")
                    tune_gallery = gr.Gallery(label="Each step's image", columns=5, height=320, elem_id="tune_gallery")
                    tune_table = gr.Dataframe(
                        headers=["step (0: the start)", "reward", "best so far", "kept"],
                        value=[],
                        interactive=False,
                        label="Rewards",
                        elem_id="tune_table",
                    )
            tune_result = gr.State(None)
            tune_b.click(studio.tune, [u[k] for k in TUNE_FIELDS], [tune_status, tune_gallery, tune_table, tune_result])
            save_b.click(studio.tune_save, [tune_result, save_path, save_over], save_msg)

        with gr.Tab("Compare"):
            ed = studio.eval_defaults()
            with gr.Row():
                with gr.Column(scale=1):
                    e = {}
                    e["model"] = gr.Textbox(elem_id="compare_model", value=ed.model, label=EVAL_LABELS["model"])
                    e["config"] = gr.Textbox(elem_id="compare_config", value=ed.config, label=EVAL_LABELS["config"])
                    e["rewards"] = gr.Textbox(
                        elem_id="compare_rewards", value=ed.rewards, lines=2, label=EVAL_LABELS["rewards"]
                    )
                    e["prompts"] = gr.Textbox(elem_id="compare_prompts", value=ed.prompts, label=EVAL_LABELS["prompts"])
                    e["negatives"] = gr.Textbox(
                        elem_id="compare_negatives",
                        value=ed.negatives,
                        lines=4,
                        label=EVAL_LABELS["negatives"],
                    )
                    e["handcrafted"] = gr.Textbox(
                        elem_id="compare_handcrafted", value=ed.handcrafted, label=EVAL_LABELS["handcrafted"]
                    )
                    e["out"] = gr.Textbox(elem_id="compare_out", value=ed.out, label=EVAL_LABELS["out"])
                    with gr.Accordion("Settings", open=False):
                        with gr.Row():
                            e["limit"] = gr.Number(elem_id="compare_limit", value=ed.limit, label=EVAL_LABELS["limit"])
                            e["images_per_prompt"] = gr.Number(
                                elem_id="compare_images_per_prompt",
                                value=ed.images_per_prompt,
                                label=EVAL_LABELS["images_per_prompt"],
                            )
                            e["sampling_steps"] = gr.Number(
                                elem_id="compare_sampling_steps",
                                value=ed.sampling_steps,
                                label=EVAL_LABELS["sampling_steps"],
                            )
                            e["guidance"] = gr.Number(
                                elem_id="compare_guidance", value=ed.guidance, label=EVAL_LABELS["guidance"]
                            )
                        with gr.Row():
                            e["resolution"] = gr.Number(
                                elem_id="compare_resolution", value=ed.resolution, label=EVAL_LABELS["resolution"]
                            )
                            e["batch"] = gr.Number(elem_id="compare_batch", value=ed.batch, label=EVAL_LABELS["batch"])
                            e["seed"] = gr.Textbox(
                                elem_id="compare_seed", value=str(ed.seed), label=EVAL_LABELS["seed"]
                            )
                            e["device"] = gr.Textbox(
                                elem_id="compare_device", value=ed.device, label=EVAL_LABELS["device"]
                            )
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
                conv_family = gr.Dropdown(["", *FAMILIES], value="", label="family (empty: from the shape)", scale=1)
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

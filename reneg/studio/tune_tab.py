"""The Tune tab: the paper's per-sample search (Algorithm 1) for one prompt, inside the app.

The form is ``reneg tune``'s (:data:`reneg.studio.forms.TUNE`), checked by its own checks; the models
stay loaded between searches (one set at a time). :func:`build` lays the tab out with gradio (passed in).
"""

from __future__ import annotations

import os
import queue
import threading
from dataclasses import asdict, fields

from .common import _err
from .forms import TUNE, TUNE_LABELS, FormError, TuneForm, check_tune

TUNE_FIELDS = [f.name for f in fields(TuneForm)]


class TuneTab:
    """The Tune tab's handlers (``self.train_defaults``, ``self.demo``, ``self._models``:
    :class:`reneg.studio.app.Studio`)."""

    def tune_defaults(self) -> dict:
        t = self.train_defaults
        d = asdict(TuneForm(model=t.model, config=t.config, parts=t.parts, rewards=t.rewards))
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

    def _models_for(self, ns):
        """The model and rewards of the Tune form's ``ns``, loaded as ``reneg tune`` loads them
        (:func:`reneg.backends.loading.load_run_model`: its files, --frames, --shift) and kept loaded
        while the form asks for the same ones."""
        import torch

        from reneg.backends.loading import load_run_model, model_files
        from reneg.rewards import load_rewards

        parts = {k: v for k, v in model_files(ns).items() if k != "config"}
        frozen = tuple((k, tuple(v) if isinstance(v, (list, tuple)) else v) for k, v in sorted(parts.items()))
        model_opts = tuple(getattr(ns, k, None) for k in ("frames", "shift", "wan_experts", "guidance_2"))
        key = (ns.model, ns.config or None, frozen, model_opts, tuple(ns.rewards), ns.device or "")
        with self._models_lock:
            if key not in self._models:
                self._models.clear()  # one model set in memory at a time
                dev = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
                backend = load_run_model(ns, dev, torch.float32)
                self._models[key] = (backend, load_rewards(list(ns.rewards), device=dev))
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
            from reneg.frame_reward import per_frame
            from reneg.nag import guidance_of
            from reneg.trainer.tune import tune_start

            backend, reward = self._models_for(ns)
            # as reneg tune starts: a predictor's negative for this prompt, an embedding file's rows, or null
            start = tune_start(backend, ns.embedding, ns.prompt)
            guidance = guidance_of(ns, backend.family)
        except Exception as e:  # noqa: BLE001 - the page shows every error as one line
            yield _err(e), [], [], None
            return
        q: queue.Queue = queue.Queue()
        frames = getattr(ns, "frames", 1) or 1
        capture = _ImageCapture(per_frame(reward, frames))  # --frames: a clip's reward, its frames' mean

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
                    guidance,
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
                    from reneg.trainer.events import filmstrips, to_pil

                    im = to_pil(filmstrips(b, frames))[0]  # a clip as a strip of its frames
                    k = max(1, -(-256 // min(im.width, im.height)))  # at least 256 px, a strip's shape kept
                    im = im.resize((im.width * k, im.height * k), 0)
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
                from reneg.predictor import is_predictor_file

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
                    "start_kind": "predictor" if ns.embedding and is_predictor_file(ns.embedding) else None,
                    "frames": frames if frames > 1 else None,
                    "flow_shift": getattr(ns, "shift", None),
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
                start_kind=r.get("start_kind"),
                frames=r.get("frames"),
                flow_shift=r.get("flow_shift"),
                start_reward=r["start_reward"],
                best_reward=r["best_reward"],
            )
            return f"Saved {path} (best reward {r['best_reward']:.5f})"
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


def build(gr, studio) -> None:
    """The Tune tab, in the page being built."""
    with gr.Tab("Tune"):
        td = studio.tune_defaults()
        with gr.Row():
            with gr.Column(scale=1):
                u = {}
                u["model"] = gr.Textbox(elem_id="tune_model", value=td["model"], label=TUNE_LABELS["model"])
                u["config"] = gr.Textbox(elem_id="tune_config", value=td["config"], label=TUNE_LABELS["config"])
                u["parts"] = gr.Textbox(elem_id="tune_parts", value=td["parts"], lines=1, label=TUNE_LABELS["parts"])
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
                        u["device"] = gr.Textbox(elem_id="tune_device", value=td["device"], label=TUNE_LABELS["device"])
                    with gr.Row():  # text-to-video models (Wan, ZeroScope): clips and Wan's flow shift
                        u["frames"] = gr.Number(elem_id="tune_frames", value=td["frames"], label=TUNE_LABELS["frames"])
                        u["shift"] = gr.Textbox(elem_id="tune_shift", value=td["shift"], label=TUNE_LABELS["shift"])
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

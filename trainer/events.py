"""What a training run reports besides ``log.csv``, and how it stops cleanly.

The trainer calls one :class:`TrainEvents` object at fixed points of its loop: sample images
(``--sample-every``), TensorBoard (``--report-to tensorboard``) and stop requests (``OUT/STOP``,
SIGTERM, Ctrl-C). ``reneg studio`` reads the files it writes to show a run; any other tool can too.
"""

from __future__ import annotations

import json
import os
import signal
import threading

import torch

SAMPLES_DIR = "samples"
SAMPLES_INDEX = "index.json"
STOP_FILE = "STOP"
TENSORBOARD_DIR = "tensorboard"
REPORT_TO = ("none", "tensorboard")
SAMPLE_PROMPTS = 4  # fixed prompts (the first held-out ones) shown in the sample grids
STRIP_FRAMES = 5  # --frames: a clip in the sample grids is a strip of this many of its frames
SAMPLE_TILE = 128  # small models' images are enlarged to at least this many pixels


def add_event_args(p) -> None:
    """``--sample-every`` and ``--report-to`` for ``reneg train``."""
    p.add_argument(
        "--sample-every",
        type=int,
        default=0,
        metavar="N",
        help="every N steps write OUT/samples/step_N.png: the current negative beside null for "
        f"the first {SAMPLE_PROMPTS} held-out prompts, fixed seeds (0: never)",
    )
    p.add_argument(
        "--report-to",
        choices=REPORT_TO,
        default="none",
        help="tensorboard: also write scalars and sample images to OUT/tensorboard (needs the tensorboard package)",
    )


def check_event_args(cfg) -> None:
    """Raise the trainer's ConfigError for bad ``--sample-every`` / ``--report-to`` before models load."""
    from reneg.options import OptionError as ConfigError  # trainer.config.ConfigError is this class

    every = getattr(cfg, "sample_every", 0) or 0
    if not isinstance(every, int) or every < 0:
        raise ConfigError(f"--sample-every must be an integer >= 0, got {every}")
    report = getattr(cfg, "report_to", "none") or "none"
    if report not in REPORT_TO:
        raise ConfigError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report!r}")
    if report == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError:
            raise ConfigError(
                "--report-to tensorboard needs the tensorboard package "
                "(pip install tensorboard, or the reneg[tensorboard] extra)"
            ) from None


def to_pil(images: torch.Tensor):
    """[B, C, H, W] in [-1, 1] -> list of RGB PIL images."""
    from PIL import Image

    x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    out = []
    for im in x:
        a = im.permute(1, 2, 0).numpy()
        if a.shape[2] == 1:
            a = a.repeat(3, axis=2)
        out.append(Image.fromarray(a[:, :, :3], "RGB"))
    return out


def filmstrips(images: torch.Tensor, frames: int, keep: int = STRIP_FRAMES) -> torch.Tensor:
    """``[B*F, C, H, W]`` clips (F ``frames`` each) -> ``[B, C, H, k*W]``: each clip as one strip of ``k``
    evenly spaced frames (at most ``keep``, the first and the last among them); images are left as they are."""
    if frames <= 1:
        return images
    b = images.shape[0] // frames
    idx = torch.linspace(0, frames - 1, min(frames, keep)).round().long().unique()
    x = images.view(b, frames, *images.shape[1:])[:, idx]  # [B, k, C, H, W]
    return x.permute(0, 2, 3, 1, 4).reshape(b, x.shape[2], x.shape[3], -1)


def pair_grid(null_images, learned_images, step: int):
    """One row per prompt: null on the left, the current negative on the right, with a header."""
    from PIL import Image, ImageDraw

    w, h = null_images[0].size
    scale = max(1, -(-SAMPLE_TILE // max(w, h)))
    tw, th = w * scale, h * scale
    pad, head = 4, 18
    grid = Image.new("RGB", (2 * tw + 3 * pad, head + len(null_images) * (th + pad) + pad), (255, 255, 255))
    d = ImageDraw.Draw(grid)
    d.text((pad, 3), "null", fill=(0, 0, 0))
    d.text((2 * pad + tw, 3), f"learned, step {step}", fill=(0, 0, 0))
    for i, (a, b) in enumerate(zip(null_images, learned_images)):
        y = head + i * (th + pad)
        grid.paste(a.resize((tw, th), Image.NEAREST), (pad, y))
        grid.paste(b.resize((tw, th), Image.NEAREST), (2 * pad + tw, y))
    return grid


# exit status of a run stopped on request: 128 + the signal, as a shell reports a process the signal ended;
# OUT/STOP (the studio's Stop) counts as SIGTERM
STOP_EXIT = {"SIGTERM": 143, "SIGINT": 130, "STOP": 143}


class _StopWatch:
    """``OUT/STOP`` (and, with ``signals``, SIGTERM or SIGINT in the main thread) asks the run to stop
    after the current step, with a checkpoint, so ``--resume`` continues it. Signals are listened to
    only when the command installed them (``reneg train``, never a library call). Repeated SIGTERMs
    change nothing (the stop is under way); a second Ctrl-C stops at once, without the step in progress."""

    def __init__(self, out: str, main: bool = True, signals: bool = False):
        self.path = os.path.join(out, STOP_FILE)
        self.requested = False
        self.reason: str | None = None  # SIGTERM | SIGINT | STOP
        self.main = main
        self._old: dict = {}
        if main:
            try:
                os.unlink(self.path)  # a request left from an earlier stop must not end this run at once
            except OSError:
                pass
        if signals and threading.current_thread() is threading.main_thread():
            for name in ("SIGTERM", "SIGINT"):
                sig = getattr(signal, name, None)
                if sig is None:
                    continue
                try:
                    self._old[sig] = signal.signal(sig, self._on_signal)
                except (ValueError, OSError):
                    pass

    def _on_signal(self, signum, frame):
        if self.requested:
            if signum == getattr(signal, "SIGINT", None):  # Ctrl-C twice: stop now, without this step
                raise KeyboardInterrupt
            return  # SIGTERM again (a second Stop, a scheduler repeating itself): the stop is under way
        self.requested = True
        self.reason = "SIGINT" if signum == getattr(signal, "SIGINT", None) else "SIGTERM"

    def check(self) -> bool:
        if not self.requested and os.path.exists(self.path):
            self.requested = True
            self.reason = "STOP"
        return self.requested

    @property
    def exit_code(self) -> int:
        return STOP_EXIT.get(self.reason or "STOP", 143)

    def close(self) -> None:
        for sig, old in self._old.items():
            try:
                signal.signal(sig, old)
            except (ValueError, OSError, TypeError):
                pass
        self._old = {}
        if self.main:
            try:
                os.unlink(self.path)
            except OSError:
                pass


class TrainEvents:
    """Sample images, TensorBoard and stop requests for one run of the trainer.

    - ``--sample-every N``: every N steps (and at the start and the end) the current negative and the
      null negative each make an image for a few fixed held-out prompts and seeds (:meth:`sample`).
    - ``--report-to tensorboard``: the logged scalars (loss, reward, lr, gradient norm, held-out
      rewards, the monitor rewards' and the held-out diversity), the sample grids and the reward-hacking
      warnings go to ``OUT/tensorboard`` through TensorBoard's own ``SummaryWriter``.
    - Stop on request: :class:`_StopWatch`, agreed on by every process in :meth:`should_stop`.
    """

    def __init__(
        self,
        cfg,
        backend,
        main: bool,
        null: torch.Tensor,
        sample_texts: list[str],
        sample_seeds: list[int],
        num_processes: int = 1,
        signals: bool = False,
    ):
        self.cfg, self.backend, self.main = cfg, backend, main
        self.every = int(getattr(cfg, "sample_every", 0) or 0)
        self.null = null
        self.texts = list(sample_texts[:SAMPLE_PROMPTS])
        self.seeds = list(sample_seeds[:SAMPLE_PROMPTS])
        self.num_processes = num_processes
        self.dir = os.path.join(cfg.out, SAMPLES_DIR)
        self._null_images = None
        self.writer = None
        # every process listens (a launcher passes SIGTERM to all of them); they agree in should_stop.
        # Signal handlers only where the command asked for them: a library call keeps the caller's.
        self.stop = _StopWatch(cfg.out, main=main, signals=signals)
        self.stop_reason: str | None = None
        if main and (getattr(cfg, "report_to", "none") or "none") == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(os.path.join(cfg.out, TENSORBOARD_DIR))

    # ------------------------------------------------------------------ samples
    def _images(self, neg):
        from reneg.generate import generate, seeded_noise

        c = self.cfg
        # a tensor of output rows, or (negative tokens) a function giving the negative's Cond
        uncond = neg() if callable(neg) else self.backend.negative_cond(neg.detach())
        imgs = generate(
            self.backend,
            self.backend.encode_prompts(self.texts),
            uncond,
            seeded_noise(self.backend, self.seeds, c.resolution, c.resolution),
            c.sampling_steps,
            c.guidance,
        )
        return to_pil(filmstrips(imgs, getattr(self.backend, "frames", 1)))

    def sample(self, step: int, neg: torch.Tensor) -> str | None:
        """Write ``samples/step_NNNNNN.png`` for ``neg`` at ``step`` (main process only): one row per
        prompt, null left, learned right, listed in ``samples/index.json``. The null images are made once
        and reused."""
        if not (self.main and self.every and self.texts):
            return None
        from reneg.fileio import atomic_path, atomic_write_json

        if self._null_images is None:
            self._null_images = self._images(self.null)
        grid = pair_grid(self._null_images, self._images(neg), step)
        os.makedirs(self.dir, exist_ok=True)
        name = f"step_{step:06d}.png"
        with atomic_path(os.path.join(self.dir, name)) as tmp:
            grid.save(tmp, format="PNG")
        index_path = os.path.join(self.dir, SAMPLES_INDEX)
        index = {"prompts": self.texts, "seeds": self.seeds, "columns": ["null", "learned"], "steps": []}
        try:
            with open(index_path, encoding="utf-8") as f:
                old = json.load(f)
            if old.get("prompts") == self.texts and old.get("seeds") == self.seeds:
                index["steps"] = [s for s in old.get("steps", []) if isinstance(s, int) and s != step]
        except (OSError, ValueError, AttributeError):
            pass
        index["steps"] = sorted(index["steps"] + [step])
        atomic_write_json(index_path, index)
        if self.writer is not None:
            import numpy as np

            self.writer.add_image("samples/null_vs_learned", np.asarray(grid), step, dataformats="HWC")
            self.writer.flush()
        return os.path.join(self.dir, name)

    # ------------------------------------------------------------------ the loop's hooks
    def on_start(self, step: int, neg: torch.Tensor) -> None:
        """Before the first step of this process: the starting point's samples, once."""
        if self.every and self.main and not os.path.isfile(os.path.join(self.dir, f"step_{step:06d}.png")):
            self.sample(step, neg)

    def on_step(self, step: int, row: dict, neg: torch.Tensor, last: bool) -> None:
        """After step ``step`` is logged (main process)."""
        if not self.main:
            return
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(
                        f"train/{k}" if not k.startswith("heldout_") else f"heldout/{k[len('heldout_') :]}", v, step
                    )
            self.writer.flush()
        if self.every and (step % self.every == 0 or last):
            self.sample(step, neg)

    def on_heldout(self, rec: dict) -> None:
        """A held-out score made outside the per-step rows (the final one): the same ``heldout/...``
        scalars a row's ``heldout_...`` columns give (null, handcrafted, learned, each monitor's, diversity)."""
        if self.writer is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.writer.add_scalar(f"heldout/{k}", v, rec["step"])
            self.writer.flush()

    def on_warning(self, warning: dict) -> None:
        """A reward-hacking warning (trainer/monitor.py), ``{step, measure, message}``: TensorBoard's text
        tab shows it at its step (the console and summary.json have it too)."""
        if self.writer is not None:
            self.writer.add_text(f"warnings/{warning['measure']}", warning["message"], warning["step"])
            self.writer.flush()

    def should_stop(self, acc=None) -> bool:
        """True on every process once any of them was asked to stop."""
        flag = bool(self.stop and self.stop.check())
        if acc is not None and self.num_processes > 1:
            t = torch.tensor([1.0 if flag else 0.0], device=acc.device)
            flag = bool(acc.reduce(t, reduction="sum").item() > 0)
        if flag and self.stop_reason is None:
            self.stop_reason = (self.stop.reason if self.stop is not None else None) or "STOP"
        return flag

    def close_stop_watch(self) -> None:
        """Stop listening for stop requests (the loop is over)."""
        if self.stop is not None:
            self.stop.close()
            self.stop = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.stop is not None:
            self.stop.close()
            self.stop = None

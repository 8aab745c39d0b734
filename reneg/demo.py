"""The built-in demo: the world ``--demo`` runs on, with no files from the user.

It prefers the shipped demo world (:mod:`reneg.demo_world`: a small text-to-image
model and a preference reward trained on a procedural world of shapes, where a
learned negative visibly helps). When those assets are absent, it builds a tiny
random pipeline and reward from fixed configs and seeds (:mod:`reneg.demo_fallback`),
which proves the machinery but not the method.

Of the three look-alikes: this module sets up a ``--demo`` run (settings, paths, which models);
:mod:`reneg.demo_world` holds the shipped trained models; :mod:`reneg.tiny` builds random-weight
models for tests (no production code imports it).
"""

from __future__ import annotations

import os

from .options import PAPER, OptionError, flag_of


def _world():
    try:
        from . import demo_world
    except ImportError:
        return None
    try:
        if os.path.isfile(os.path.join(demo_world.pipeline_dir(), "model_index.json")) and os.path.isfile(
            demo_world.reward_checkpoint()
        ):
            return demo_world
    except (AttributeError, OSError):
        return None
    return None


# The demo world's recipe: the paper's (AdamW, cosine, 30 DDIM steps, CFG 7.5, init from null, grad
# step among the last 11) with 160 steps of 16 samples at lr 5e-2: about 4.5 minutes on 2 idle CPU cores
# (held-out checks with the two judges every 40 steps included; how often they run changes what the log
# shows, not the embedding).
# Why lr 5e-2 and these sizes: docs/demo-world.md ("The recipe", and the recipes tried on ten seeds).
# eval --demo: 128 held-out prompts (captions training never draws) x 8 images for the global negatives,
# and per-sample tuning (the slow part: about 2.5 s an image) for the first image of the first 8 prompts,
# which with the checks every 40 steps keeps train + eval under 10 minutes on 2 cores; the trainer's own
# held-out check reads the first 32 prompts. Why 128 prompts x 8 and not 32 x 16: a 32-prompt sample of the
# world's captions measured the handcrafted word's gain twice as high as wider samples do (about +0.008),
# and a gain that small needs about 1,000 paired images for its interval to exclude 0
# (docs/demo-world.md, "Which prompts the demo is judged on").
DEMO_HELDOUT_PROMPTS = 128
WORLD_SETTINGS = dict(
    resolution=32,
    steps=160,
    batch_size=16,
    micro_batch=16,
    sampling_steps=PAPER.sampling_steps,
    guidance=PAPER.guidance,
    grad_range=PAPER.grad_range,
    lr=5e-2,
    eval_every=40,  # a held-out check (and the judges' scores, the hacking warning) every 40 steps
    checkpoint_every=40,
    eval_batch=32,
    heldout_count=32,
    eval_images_per_prompt=8,
    eval_tune_per_prompt=1,
    eval_tune_prompts=8,
    eval_tune_steps=5,
    tune_lr=5e-2,
    eval_train_steps=20,
)


def default_threads() -> int:
    """Torch CPU threads for ``--demo``: two for the demo world's batches of 16-32 (about 1.5x faster
    than one), one for the tiny random fallback, whose models are too small to gain from a second."""
    return min(2, os.cpu_count() or 1) if _world() is not None else 1


def setup(out: str, flag: str = "--out") -> dict:
    """Write the demo's prompt files into ``out/demo`` and return paths and settings; a folder that
    can not be written is an :class:`OptionError` naming ``flag``.

    ``reward`` is the spec training optimises; ``judges`` the specs of the held-out judges (rewards of
    the same preference that no negative is trained on, for reports and monitoring only; empty with
    the tiny random fallback)."""
    try:
        return _setup(out)
    except OSError as e:
        raise OptionError(
            f"{flag} {out}: cannot write the demo's files into {os.path.join(out, 'demo')} "
            f"({e.strerror or e}); choose a writable folder"
        ) from None


def _setup(out: str) -> dict:
    from .fileio import atomic_write_text

    folder = os.path.join(out, "demo")
    os.makedirs(folder, exist_ok=True)
    world = _world()
    if world is not None:
        model = world.pipeline_dir()
        reward = f"hpsv2={world.reward_checkpoint()},config={world.reward_config()}"
        # held-out judges of the same preference: scored beside the reward, never trained on (eval reports
        # them as hpsv2-judge and hpsv2-referee, after their file names)
        judges = [f"hpsv2={ckpt},config={config}" for _name, ckpt, config in world.judges()]
        # the held-out prompts are captions training never draws (the world has only about 860 distinct
        # ones, so a plain draw of 2000 would hold most of them); the trainer checks on the first 32
        heldout = list(world.heldout_prompts(DEMO_HELDOUT_PROMPTS))
        train = list(world.train_prompts(2000, seed=0, exclude=heldout))
        handcrafted = world.HANDCRAFTED_NEGATIVE
        settings = dict(WORLD_SETTINGS)
        kind = "demo world"
    else:
        from .demo_fallback import build_tiny_hps, build_tiny_pipeline

        model = os.path.join(folder, "tiny-pipeline")
        if not os.path.isfile(os.path.join(model, "model_index.json")):
            build_tiny_pipeline(model, seed=0)
        ckpt = os.path.join(folder, "tiny-reward", "hps_tiny.pt")
        if not os.path.isfile(ckpt):
            build_tiny_hps(os.path.dirname(ckpt), seed=0)
        reward = f"hpsv2={ckpt}"
        colours = ["red", "green", "blue", "yellow", "purple", "orange"]
        shapes = ["circle", "square", "triangle", "star"]
        allp = [f"a {c} {s}" for c in colours for s in shapes]
        train, heldout = allp[:18], allp[18:]
        handcrafted = "blurry, noisy, ugly"
        judges = []
        settings = {}
        kind = "tiny random models"
    atomic_write_text(os.path.join(folder, "train_prompts.txt"), "\n".join(train) + "\n")
    atomic_write_text(os.path.join(folder, "heldout_prompts.txt"), "\n".join(heldout) + "\n")
    base = dict(
        resolution=16,
        steps=30,
        batch_size=4,
        micro_batch=4,
        sampling_steps=10,
        guidance=7.5,
        grad_range=(0, 4),
        lr=5e-2,
        eval_every=0,
        checkpoint_every=10,
        heldout_count=len(heldout),
        eval_batch=8,
    )
    base.update(settings)
    return dict(
        kind=kind,
        model=model,
        reward=reward,
        judges=judges,
        prompts=os.path.join(folder, "train_prompts.txt"),
        heldout=os.path.join(folder, "heldout_prompts.txt"),
        handcrafted=handcrafted,
        settings=base,
        heldout_texts=heldout,
    )


def train_settings(settings: dict) -> dict:
    """The part of the demo's ``settings`` a training run takes (:class:`TrainConfig` fields); the rest
    (``eval_*`` but ``eval_every``/``eval_batch``, ``tune_lr``) is eval's and tune's. One filter for every
    caller that trains in-process, so that a setting added for eval never reaches a TrainConfig."""
    from .trainer.config import TrainConfig

    return {k: v for k, v in settings.items() if k in TrainConfig.__dataclass_fields__}


# what --demo brings itself: these flags can not be combined with it
DEMO_OWNS = {
    "train": ("model", "config", "rewards", "prompts", "heldout"),
    "tune": ("model", "config", "rewards"),
    "eval": ("model", "config", "rewards", "prompts"),
}


def refuse_demo_conflicts(ns, kind: str) -> set:
    """The flags the user gave beside ``--demo`` (they replace the demo's settings); a flag the
    demo supplies itself (its model, reward, prompts) is refused by name, never dropped."""
    given = set(getattr(ns, "given_flags", None) or ())
    clash = [flag_of(k) for k in DEMO_OWNS[kind] if k in given]
    if clash:
        raise OptionError(
            f"{', '.join(clash)} can not be used with --demo: the demo brings its own model, "
            f"reward and prompts (drop --demo to use your own)"
        )
    return given

"""The ReNeg demo world: a procedural image-caption world (:mod:`reneg.demo_world.world`) and the tiny
models trained on it, shipped in ``assets/``. Importing this package needs only numpy and PIL.

Of the three look-alikes: this package holds the shipped *trained* demo models and their world;
:mod:`reneg.demo` sets up a ``--demo`` run on them; :mod:`reneg.tiny` builds random-weight models
for tests.
"""

from __future__ import annotations

import os

from .world import HANDCRAFTED_NEGATIVE, HANDCRAFTED_NEGATIVE_LONG, heldout_prompts, train_prompts

# The models, trained by tools/train_demo_world.py (in the repository, not installed); assets/CARD.md
# says how.
ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")

# The trainer and eval settings that suit this world live in reneg.demo.WORLD_SETTINGS.

# Name under which :func:`register_reward_config` registers the reward's open_clip config.
REWARD_MODEL_NAME = "reneg-demo-clip"


def pipeline_dir() -> str:
    """The diffusers folder of the demo text-to-image pipeline (a ``StableDiffusionPipeline`` folder:
    32 px images, text width 64)."""
    return os.path.join(ASSETS, "pipeline")


def reward_checkpoint() -> str:
    """The reward checkpoint, a small open_clip reward in HPSv2 checkpoint format:
    ``torch.load(path, weights_only=True)["state_dict"]``."""
    return os.path.join(ASSETS, "reward", "hps_demo.pt")


def reward_config() -> str:
    """The reward's open_clip model config (JSON with ``embed_dim``, ``vision_cfg``, ``text_cfg``)."""
    return os.path.join(ASSETS, "reward", "open_clip_config.json")


# The held-out judges, in the order reneg eval --demo reports them (after the reward): two judges of the
# same preference as the reward, in the same format, trained on other data, from other seeds, with other
# architectures. Nothing trains a negative on them; they check what a negative trained on the reward learned.
JUDGES = ("judge", "referee")


def judge_files(name: str) -> tuple[str, str]:
    """A held-out judge's checkpoint (HPS format, like :func:`reward_checkpoint`) and its open_clip config."""
    if name not in JUDGES:
        raise ValueError(f"demo world judge {name!r}: expected one of {', '.join(JUDGES)}")
    folder = os.path.join(ASSETS, name)
    return os.path.join(folder, f"{name}.pt"), os.path.join(folder, "open_clip_config.json")


def judge_checkpoint() -> str:
    """The held-out judge ``judge`` (a ViT with 8 px patches): its HPS-format checkpoint."""
    return judge_files("judge")[0]


def judge_config() -> str:
    """The held-out judge ``judge``: its open_clip model config."""
    return judge_files("judge")[1]


def referee_checkpoint() -> str:
    """The held-out judge ``referee`` (a convolutional ModifiedResNet): its HPS-format checkpoint."""
    return judge_files("referee")[0]


def referee_config() -> str:
    """The held-out judge ``referee``: its open_clip model config."""
    return judge_files("referee")[1]


def judges() -> list[tuple[str, str, str]]:
    """``(name, checkpoint, config)`` of each held-out judge whose files are installed."""
    found = []
    for name in JUDGES:
        ckpt, config = judge_files(name)
        if os.path.isfile(ckpt) and os.path.isfile(config):
            found.append((name, ckpt, config))
    return found


def register_reward_config(name: str = REWARD_MODEL_NAME) -> str:
    """Register the reward config with open_clip under ``name`` and return the name (imports open_clip)."""
    import json

    from open_clip import factory

    with open(reward_config(), "r", encoding="utf-8") as f:
        factory._MODEL_CONFIGS[name] = json.load(f)
    return name


__all__ = [
    "ASSETS",
    "HANDCRAFTED_NEGATIVE",
    "HANDCRAFTED_NEGATIVE_LONG",
    "JUDGES",
    "REWARD_MODEL_NAME",
    "heldout_prompts",
    "judge_checkpoint",
    "judge_config",
    "judge_files",
    "judges",
    "pipeline_dir",
    "referee_checkpoint",
    "referee_config",
    "register_reward_config",
    "reward_checkpoint",
    "reward_config",
    "train_prompts",
]

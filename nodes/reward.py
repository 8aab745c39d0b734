"""Load Reward Model and Reward Score: differentiable preference models inside ComfyUI."""

from __future__ import annotations

import contextlib
import math
import os

import torch

from .common import (
    CATEGORY,
    REWARD_EXTENSIONS,
    REWARD_FOLDER,
    REWARD_TYPE,
    folder_list,
    folder_paths_of,
    reports_errors,
    torch_device,
)

from ..reneg.fileio import walk_folder

NONE = "none"
PRECISIONS = ("auto", "float32", "float16", "bfloat16")
DEFAULT_KIND = "hpsv2.1"
# A reward's folder options become inputs named OPTION_model. "clip_model" came first and stays a
# required input in its place (saved workflows list widget values by position); every other one
# is appended as an optional input.
FIRST_EXTRA = "clip"
MODEL_MARKERS = ("config.json",)
EXTRA_MARKERS = ("config.json", "vocab.txt", "tokenizer.json", "tokenizer_config.json")


def rewards() -> dict:
    """The reward registry (names, help, options): the single list the nodes offer."""
    from ..reneg.rewards import reward_kinds

    return reward_kinds()


def extra_options() -> list[str]:
    """Every folder option any registered reward takes, ``clip`` first."""
    opts = [k for info in rewards().values() for k, kind in info.path_options.items() if kind == "folder"]
    return list(dict.fromkeys([FIRST_EXTRA] + opts))


def describe() -> str:
    try:
        lines = [f"{name}: {info.help}" for name, info in rewards().items()]
    except Exception as e:  # noqa: BLE001 - a description must never keep the pack from loading
        return f"Loads a preference reward from ComfyUI/models/reward_models ({e})"
    return "Loads a preference reward from ComfyUI/models/reward_models. " + "; ".join(lines) + "."


def model_folders(markers: tuple[str, ...] = MODEL_MARKERS) -> list[str]:
    """Sub-folders of the reward_models folders that hold a Hugging Face model (config.json), or
    with ``markers`` any of those files, as ``name/``."""
    out = set()
    for root in folder_paths_of(REWARD_FOLDER):
        if not os.path.isdir(root):
            continue
        for here, dirs, files in walk_folder(root):  # links followed, but never round a loop
            rel = os.path.relpath(here, root)
            if rel != "." and any(m in files for m in markers):
                out.add(rel.replace(os.sep, "/") + "/")
                dirs[:] = []
            elif rel.count(os.sep) >= 2:
                dirs[:] = []
    return sorted(out)


def model_entries() -> list[str]:
    """Checkpoint files and model folders, for the Load Reward Model list."""
    folders = model_folders()
    files = [
        f
        for f in folder_list(REWARD_FOLDER)
        if os.path.splitext(f)[1].lower() in REWARD_EXTENSIONS
        and not any(f.replace(os.sep, "/").startswith(d) for d in folders)
    ]
    return sorted(files) + folders


def resolve(entry: str, what: str) -> str:
    for root in folder_paths_of(REWARD_FOLDER):
        p = os.path.join(root, entry.rstrip("/"))
        if os.path.exists(p):
            return p
    where = ", ".join(folder_paths_of(REWARD_FOLDER)) or f"models/{REWARD_FOLDER}"
    raise FileNotFoundError(f"{what} {entry!r} was not found in the {REWARD_FOLDER!r} model folder ({where})")


class RewardModel:
    """The RENEG_REWARD value: a loaded reward plus where it came from.

    The model is kept on the CPU between uses and moved to the compute device only
    while a node uses it (:meth:`use`), so it holds no GPU memory in between.
    """

    def __init__(self, module, kind: str, source: str, device: torch.device):
        self.module, self.kind, self.source, self.device = module, kind, source, device

    @property
    def name(self) -> str:
        return f"{self.kind}:{os.path.basename(self.source.rstrip('/'))}"

    @contextlib.contextmanager
    def use(self):
        moved = self.device.type != "cpu"
        if moved:
            with torch.inference_mode(False):  # a copy made in inference mode could not be trained through
                self.module.to(self.device)
        try:
            yield self.module
        finally:
            if moved:
                with torch.inference_mode(False):
                    self.module.to("cpu")
                from ..reneg.backends.comfy_backend import release_memory

                release_memory()


def _dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return getattr(torch, precision)


class ReNegLoadRewardModel:
    DESCRIPTION = describe()
    CATEGORY = CATEGORY
    RETURN_TYPES = (REWARD_TYPE,)
    RETURN_NAMES = ("reward",)
    FUNCTION = "load"

    @classmethod
    def INPUT_TYPES(cls):
        regs = rewards()
        names = list(regs)
        folders = [NONE] + model_folders(EXTRA_MARKERS)

        def extra(opt):
            users = [n for n, info in regs.items() if opt in info.path_options]
            need = [n for n in users if opt in regs[n].required]
            tip = f"{', '.join(users)}: the {opt} folder in reward_models" + (
                f" (needed by {', '.join(need)})" if need else " (optional when it lies beside the checkpoint)"
            )
            return (folders, {"default": NONE, "tooltip": tip})

        return {
            "required": {
                "reward_type": (
                    names,
                    {
                        "default": DEFAULT_KIND if DEFAULT_KIND in regs else names[0],
                        "tooltip": "; ".join(f"{n}: {i.help}" for n, i in regs.items()),
                    },
                ),
                "model": (
                    model_entries(),
                    {
                        "tooltip": "Checkpoint file or model folder (shown with a trailing "
                        "'/'), as the reward type needs."
                    },
                ),
                f"{FIRST_EXTRA}_model": extra(FIRST_EXTRA),
                "precision": (
                    list(PRECISIONS),
                    {"default": "auto", "tooltip": "auto: float16 on a GPU, float32 on the CPU."},
                ),
            },
            "optional": {f"{opt}_model": extra(opt) for opt in extra_options() if opt != FIRST_EXTRA},
        }

    @reports_errors("Load Reward Model")
    def load(self, reward_type, model, clip_model=NONE, precision="auto", **extras):
        from ..reneg.rewards import RewardSpec, load_reward

        regs = rewards()
        if reward_type not in regs:
            raise ValueError(f"reward_type must be one of {', '.join(regs)}, got {reward_type!r}")
        info = regs[reward_type]
        path = resolve(model, "model")
        if info.path_kind == "folder" and not os.path.isdir(path):
            raise ValueError(f"{reward_type} needs a model folder (shown with a trailing '/'), got the file {model!r}")
        if info.path_kind == "file" and not os.path.isfile(path):
            raise ValueError(f"{reward_type} needs a checkpoint file, got the folder {model!r}")
        extras[f"{FIRST_EXTRA}_model"] = clip_model
        options = {}
        for opt, kind in info.path_options.items():
            if kind != "folder":
                continue  # file options (e.g. a config JSON) are found beside the checkpoint
            value = extras.get(f"{opt}_model")
            if value and value != NONE:
                options[opt] = resolve(value, f"{opt}_model")
            elif opt in info.required:
                raise ValueError(f"{reward_type} needs {opt}_model: {info.help}")
        device = torch_device()
        # loaded outside inference mode: its weights must be normal tensors for the tune node's backward
        with torch.inference_mode(False):
            module = load_reward(RewardSpec(reward_type, path, 1.0, options), "cpu", _dtype(precision, device))
        return (RewardModel(module, reward_type, path, device),)


def images_to_reward_input(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE (BHWC in [0, 1]) -> BCHW in [-1, 1], as the rewards take it."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[-1] not in (3, 4):
        shape = list(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images: expected an IMAGE batch [B, H, W, 3], found {shape}")
    if images.shape[0] == 0 or images.shape[1] == 0 or images.shape[2] == 0:
        b, h, w = images.shape[:3]
        raise ValueError(f"images: the batch is empty ({b} images of {w}x{h}): connect a node that makes images")
    return images[..., :3].movedim(-1, 1).float() * 2 - 1


def score_images(reward: RewardModel, images: torch.Tensor, prompt: str, batch: int = 4) -> torch.Tensor:
    x = images_to_reward_input(images)
    out = []
    with torch.no_grad(), reward.use() as module:
        dev = next(module.parameters()).device
        for i in range(0, x.shape[0], batch):
            chunk = x[i : i + batch].to(dev)
            out.append(module(chunk, [prompt] * chunk.shape[0]).float().cpu())
    return torch.cat(out)


def rank_order(scores: list[float]) -> list[int]:
    """Image indices best first; a NaN score (an image with NaN pixels) ranks after every number,
    ties in input order."""
    return sorted(
        range(len(scores)), key=lambda i: (math.isnan(scores[i]), -scores[i] if scores[i] == scores[i] else 0)
    )


class ReNegRewardScore:
    DESCRIPTION = (
        "Scores each image of a batch for the prompt with a reward model. Outputs the scores, a "
        "readable report, the batch ranked best first (when rank is on) and the best image."
    )
    CATEGORY = CATEGORY
    RETURN_TYPES = ("FLOAT", "STRING", "IMAGE", "IMAGE", "INT")
    RETURN_NAMES = ("scores", "report", "images", "best_image", "best_index")
    OUTPUT_IS_LIST = (True, False, False, False, False)
    OUTPUT_TOOLTIPS = (
        "One score per image, in input order.",
        "The scores as text.",
        "The batch, best first when rank is on.",
        "The highest-scoring image.",
        "Index (0-based) of the best image in the input batch.",
    )
    FUNCTION = "score"
    OUTPUT_NODE = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "images": ("IMAGE",),
                "prompt": (
                    "STRING",
                    {"multiline": True, "default": "", "tooltip": "The prompt the images were made for."},
                ),
                "reward": (REWARD_TYPE,),
                "rank": ("BOOLEAN", {"default": True, "tooltip": "Sort the images output best first."}),
            }
        }

    @reports_errors("Reward Score")
    def score(self, images, prompt, reward, rank=True):
        if not isinstance(reward, RewardModel):
            raise ValueError(f"reward: expected the output of Load Reward Model, found {type(reward).__name__}")
        if not str(prompt).strip():
            raise ValueError("prompt is empty: give the prompt the images were made for")
        scores = score_images(reward, images, str(prompt))
        values = scores.tolist()
        order = rank_order(values)
        best = order[0]
        finite = any(math.isfinite(v) for v in values)
        lines = [f"{reward.name} for {len(values)} image(s):"]
        for i, s in enumerate(values):
            place = order.index(i) + 1
            lines.append(f"  image {i}: {s:.5f}  (rank {place}){'  best' if i == best and finite else ''}")
        if not finite:
            lines.append("  no image has a finite score (NaN or inf pixels, or a reward that overflowed)")
        report = "\n".join(lines)
        ranked = images[torch.tensor(order, device=images.device)] if rank else images
        return {
            "ui": {"text": [report]},
            "result": ([float(s) for s in scores], report, ranked, images[best : best + 1], best),
        }

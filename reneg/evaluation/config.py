"""``reneg eval``'s settings: :class:`EvalConfig`, its numeric checks, and the items (prompt, seed) it makes.

An *item* is one prompt and one seed; every negative makes one image per item from the same noise,
so images (and their scores) pair up across negatives.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from reneg.options import PAPER
from reneg.prompts import PAPER_HANDCRAFTED, load_prompts, subsample


class EvalError(ValueError):
    """A bad argument or an output folder that does not fit this run; the message names the flag or file."""


@dataclass(frozen=True)
class Item:
    index: int  # position in the prompt file
    text: str
    category: str
    seed: int
    k: int = 0  # which image of its prompt (0 .. images_per_prompt - 1)

    def image_name(self, negative: str) -> str:
        return f"{self.index:05d}_s{self.seed}_{negative}.png"


def build_items(
    prompts_path: str, limit: int | None = None, sample_seed: int = 0, seed: int = 0, images_per_prompt: int = 1
) -> list[Item]:
    """Items of a prompt file; ``seed + index * images_per_prompt + k`` is image k's seed."""
    prompts = load_prompts(prompts_path)
    indexed = list(enumerate(prompts))
    chosen = subsample(indexed, limit, sample_seed)
    return [
        Item(i, p.text, p.category, seed + i * images_per_prompt + k, k)
        for i, p in chosen
        for k in range(images_per_prompt)
    ]


def items_for(cfg, neg, items: list[Item]) -> list[Item]:
    """The items ``neg`` is made for: all of them, except tuned negatives under ``--tune-per-prompt K``
    (the first K images of each prompt) and ``--tune-prompts N`` (the images of the first N prompts):
    per-sample search is the expensive part of an evaluation."""
    if neg.kind != "tuned":
        return items
    k = getattr(cfg, "tune_per_prompt", None)
    n = getattr(cfg, "tune_prompts", None)
    first = None
    if n is not None:
        order = list(dict.fromkeys(it.index for it in items))
        first = set(order[:n])
    return [it for it in items if (k is None or it.k < k) and (first is None or it.index in first)]


@dataclass
class EvalConfig:
    model: str = ""
    config: str | None = None
    vae: str | None = None  # a VAE file or folder replacing the model's own
    text_encoders: list[str] = field(default_factory=list)  # a transformer file's text encoders (Flux: clip_l, t5xxl)
    tokenizer: str | None = None  # the tokenizer folder for a transformer file (T5's, Qwen2.5's, UMT5's)
    low_noise_model: str | None = None  # Wan 2.2 A14B's low-noise expert file, beside --model the high-noise one
    prediction_type: str | None = None  # eps | v: instead of what the model's files say
    rewards: list[str] = field(default_factory=list)
    prompts: str = ""
    negatives: list[str] = field(default_factory=list)
    out: str = "runs/eval"
    handcrafted: str = PAPER_HANDCRAFTED
    limit: int | None = None
    sample_seed: int = 0
    seed: int = PAPER.seed
    images_per_prompt: int = 1
    sampling_steps: int = PAPER.sampling_steps
    guidance: float = PAPER.guidance
    guidance_mode: str = "cfg"  # cfg | nag | cfg+nag (set by --guidance; reneg/nag.py)
    nag_scale: float | None = None  # None: the family's (reneg/families.py)
    nag_tau: float | None = None
    nag_alpha: float | None = None
    guidance_2: float | None = PAPER.guidance_2  # Wan 2.2 A14B's low-noise expert
    shift: float | None = PAPER.shift  # Wan's flow shift (None: the model's own)
    wan_experts: str = PAPER.wan_experts
    resolution: int = PAPER.resolution
    batch: int = 4
    tune_steps: int = PAPER.max_steps
    tune_patience: int = PAPER.patience
    tune_lr: float = PAPER.lr
    tune_noise: str = "seed"
    tune_per_prompt: int | None = None  # tuned negatives: only images k < this of each prompt (None: all)
    tune_prompts: int | None = None  # tuned negatives: only the images of the first N prompts (None: all)
    grad_range: tuple[int, int] = PAPER.grad_range
    save_tuned: bool = False
    video: str | None = None  # motion-adapter folder (AnimateDiff)
    frames: int | None = None  # None: the model's default (reneg.backends.loading.default_frames)
    reference: str | None = None
    tie_tol: float = 0.0
    grid_limit: int = 200
    device: str | None = None
    mixed_precision: str = "no"  # no | fp16 | bf16 (reneg.options)
    progress: bool = True
    title: str = "ReNeg evaluation"
    note: str = ""
    remake_mismatched: bool = False  # --demo: delete images made under other settings instead of refusing
    overwrite: bool = False  # write into an --out that holds a training run (its summary.json is replaced)

    def to_json(self) -> dict:
        d = asdict(self)
        d["grad_range"] = list(self.grad_range)
        return d


# the numeric flags of eval, checked by reneg.options (kind, bounds)
EVAL_NUMBERS = {
    "batch": ("int",),
    "images_per_prompt": ("int",),
    "tune_steps": ("int",),
    "tune_patience": ("int",),
    "frames": ("opt_int", 1),
    "grid_limit": ("int",),
    "limit": ("opt_int", 1),
    "tune_per_prompt": ("opt_int", 1),
    "tune_prompts": ("opt_int", 1),
    "tune_lr": ("pos",),
    "tie_tol": ("nonneg",),
    "seed": ("seed",),
    "sample_seed": ("seed",),
}


def check_eval_numbers(cfg) -> None:
    """Every numeric flag of eval, before anything is read (also run first under --demo)."""
    from reneg import options as O

    try:
        O.check_sampling(cfg, grad=False)
        O.check_number_table(cfg, EVAL_NUMBERS)
        threads = getattr(cfg, "threads", None)
        if threads is not None:
            from reneg.threads import parse_threads

            parse_threads(threads)
    except O.OptionError as e:
        raise EvalError(str(e)) from None


def progress_bar(total: int, initial: int, desc: str, enabled: bool):
    """A tqdm bar for ``cfg.progress`` (None when off)."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True, unit="img")

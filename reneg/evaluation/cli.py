"""The ``reneg eval`` sub-command (registered by :func:`reneg.cli.build_parser`)."""

from __future__ import annotations

import argparse
import json
import os
import re
import time

from reneg import options as O

from .config import EvalConfig

DEMO_OUT = os.path.join("runs", "demo-eval")
DEMO_TRAIN = os.path.join("runs", "demo-train")


def add_eval_parser(sub) -> argparse.ArgumentParser:
    d = EvalConfig()
    s = sub.add_parser(
        "eval",
        help="compare negatives (null, handcrafted, embeddings, per-sample tuning) on a prompt set",
        description="Generate one image per prompt and seed with every negative (same noise across negatives), "
        "score them with one or more rewards and write images/, scores.csv, diversity.csv, summary.json, plots/, "
        "report.html and report.md into --out. Rerunning with the same --out makes only the "
        "missing images.",
    )
    a = s.add_argument
    a(
        "--demo",
        action="store_true",
        help="run everything on the built-in demo world (no files needed); flags "
        "given beside it replace the demo's settings",
    )
    O.add_options(
        s,
        ["model", "config", "vae", "text_encoders", "tokenizer", "low_noise_model", "prediction_type", "rewards"],
        helps={
            "rewards": "each reward is reported on its own, marked trained on or held out (from the evaluated "
            "embeddings' metadata); the first one also drives per-sample tuning"
        },
    )
    a(
        "--prompts",
        help="prompt set: .txt (one a line), ImageReward .json, PartiPrompts .tsv (Category column) "
        "or an HPSv2 benchmark folder (anime.json, concept-art.json, paintings.json, photo.json)",
    )
    a(
        "--negative",
        dest="negatives",
        action="append",
        default=[],
        metavar="[NAME=]SPEC",
        help="repeatable: null | handcrafted (the paper's prompt, or --handcrafted) | handcrafted:TEXT | text:TEXT "
        "| wan-default or wan-default-en (Wan's own negative prompt, Chinese or English) "
        "| FILE (an embedding: .safetensors or the official .bin) | tuned:FILE or tuned:null (per-sample "
        "tuning from it, per image) | predictor:FILE (a negative predictor: each prompt's own negative). Names come from the file names unless given as NAME=SPEC. "
        "Default: null and handcrafted",
    )
    a("--handcrafted", default=d.handcrafted, help="text of 'handcrafted' (default: the paper's negative prompt)")
    a("--out", default=None, help="output folder (default runs/eval, or runs/demo-eval with --demo)")
    O.add_options(
        s,
        ["overwrite"],
        helps={
            "overwrite": "write into an --out that holds a training run (its summary.json is replaced); "
            "without it such an --out is refused. An evaluation's own --out is always continued"
        },
    )
    a("--limit", type=int, default=None, help="evaluate a fixed random sub-sample of this many prompts")
    a("--sample-seed", type=int, default=d.sample_seed, help="seed of the --limit sub-sample")
    a("--seed", type=int, default=d.seed, help="seed of prompt i's image k is SEED + i * images-per-prompt + k")
    a(
        "--images-per-prompt",
        type=int,
        default=d.images_per_prompt,
        help="seeds per prompt; 2 or more also measure each negative's diversity (how much a prompt's images "
        "differ in the first reward's image features; a drop is the sign of reward hacking), into diversity.csv",
    )
    O.add_options(
        s,
        [
            "sampling_steps",
            "guidance",
            "nag_scale",
            "nag_tau",
            "nag_alpha",
            "resolution",
            "guidance_2",
            "shift",
            "wan_experts",
        ],
    )
    a("--batch", type=int, default=d.batch, help="images per generation / scoring batch")
    O.add_options(
        s,
        ["max_steps", "patience", "lr"],
        flags={"max_steps": "--tune-steps", "patience": "--tune-patience", "lr": "--tune-lr"},
        helps={"lr": "per-sample search: learning rate (paper: 5e-3)"},
    )
    a(
        "--tune-per-prompt",
        type=int,
        default=None,
        metavar="K",
        help="tuned negatives: tune only the first K images of each prompt (per-sample search is the slow part); "
        "they are compared with the others on those images (default: all images)",
    )
    a(
        "--tune-prompts",
        type=int,
        default=None,
        metavar="N",
        help="tuned negatives: tune only the images of the first N prompts (with --tune-per-prompt K, their "
        "first K); they are compared with the others on those images (default: every prompt)",
    )
    a(
        "--tune-noise",
        choices=("seed", "fresh"),
        default=d.tune_noise,
        help="seed: tune for each image's own seed (default); fresh: new noise each step as in the paper, then "
        "the image is made from its seed with the best negative",
    )
    O.add_options(
        s, ["grad_range"], helps={"grad_range": "tuning grad step, counted in DDIM steps from the end (paper: 0 10)"}
    )
    a("--save-tuned", action="store_true", help="also save each tuned embedding under OUT/tuned/NAME/")
    a(
        "--video",
        metavar="MOTION_ADAPTER",
        help="AnimateDiff: a local diffusers MotionAdapter folder; --model "
        "must be SD1.x. Frames are scored with the image rewards and "
        "averaged; videos are saved as animated PNGs. A --model that is a "
        "TextToVideoSDPipeline folder (ZeroScope) makes videos without it",
    )
    a(
        "--frames",
        type=int,
        default=d.frames,
        help="frames per video with --video or a text-to-video --model (default: 81 for Wan, as its releases "
        "make; 16 otherwise); Wan makes 4 k + 1",
    )
    a("--reference", help="negative the others are compared to in the report (default: handcrafted, else null)")
    a("--tie-tol", type=float, default=d.tie_tol, help="score differences up to this count as ties (default 0)")
    a("--grid-limit", type=int, default=d.grid_limit, help="rows of images shown in report.html")
    a("--title", default=d.title)
    O.add_options(s, ["device", "mixed_precision", "threads"])
    a("--no-progress", dest="progress", action="store_false")
    s.set_defaults(fn=cmd_eval)
    return s


def eval_config_from_args(ns) -> EvalConfig:
    """The EvalConfig of parsed ``reneg eval`` arguments (flags left unset keep EvalConfig's defaults)."""
    d = {k: v for k, v in vars(ns).items() if k in EvalConfig.__dataclass_fields__ and v is not None}
    d["grad_range"] = tuple(d.get("grad_range", O.PAPER.grad_range))
    d.setdefault("out", EvalConfig.out)
    return EvalConfig(**d)


def cmd_eval(ns) -> int:
    from .config import check_eval_numbers
    from .run import run_eval

    t0 = time.time()
    if ns.demo:
        cfg = demo_config(ns)
    else:
        cfg = eval_config_from_args(ns)
        check_eval_numbers(cfg)
    summary = run_eval(cfg)
    print(_console_table(summary))
    print(
        f"wrote {os.path.join(cfg.out, 'report.html')} (open it in a browser), report.md, summary.json, "
        f"scores.csv, diversity.csv, plots/ and images/ in {cfg.out}  [{time.time() - t0:.1f} s]"
    )
    return 0


def _console_table(summary: dict) -> str:
    from .report import _diff_text, _label, diversity_note, diversity_shown, reward_marks

    ref = summary["reference"]
    lines = []
    for rw, mark in reward_marks(summary):
        lines.append(
            f"{rw} ({mark}): mean [95% CI]; paired difference vs {ref} [95% CI]; win rate over {ref} [95% CI] (W/T/L)"
        )
        for n in summary["negatives"]:
            name = n["name"]
            ci = summary["means"][rw][name]["all"]
            rng = f"[{ci['lo']:.4f}, {ci['hi']:.4f}]" if ci["lo"] is not None else ""
            wr = dr = ""
            if name != ref:
                w = summary["win_rates"][rw][name][ref]
                wr = f"{w['rate']:.2f} [{w['lo']:.2f}, {w['hi']:.2f}] ({w['wins']}/{w['ties']}/{w['losses']})"
                dr = _diff_text(summary["differences"][rw][name][ref])
            lines.append(f"  {_label(summary, name):20s} {ci['mean']:.4f} {rng:20s} {dr:28s} {wr}")
        for part, m in summary.get("subsets", {}).get(rw, {}).items():
            lines.append(
                f"  on the {summary['images'][part]} images {part} was made for: "
                + ", ".join(f"{k} {v['mean']:.4f}" for k, v in m.items())
            )
    d = summary.get("diversity") or {}
    if diversity_shown(summary):
        lines.append(
            f"diversity ({d.get('reward')} image features, same prompt across seeds; 0 = identical images, a drop "
            f"vs {ref} is the sign of reward hacking): mean [95% CI]; paired difference vs {ref} [95% CI]"
        )
        for n in summary["negatives"]:
            nd = n.get("diversity") or {}
            ci = nd.get("mean")
            if not ci:
                lines.append(f"  {_label(summary, n['name']):20s} n/a ({nd.get('note') or 'not measured'})")
                continue
            rng = f"[{ci['lo']:.4f}, {ci['hi']:.4f}]" if ci["lo"] is not None else ""
            dd = nd.get("difference_vs_reference")
            dr = _diff_text(dd) if dd and n["name"] != ref else ""
            lines.append(f"  {_label(summary, n['name']):20s} {ci['mean']:.4f} {rng:20s} {dr}")
    else:
        lines.append(diversity_note(summary))  # "diversity needs ..."
    return "\n".join(lines)


# --------------------------------------------------------------------------- --demo


def _category(text: str, shapes) -> str:
    for w in re.findall(r"[a-z]+", text.lower()):
        for s in shapes:
            if w in (s, s + "s"):
                return s + "s"
    return "other"


def _demo_prompts(d: dict, folder: str) -> str:
    """The held-out demo prompts as a TSV with a category per shape (so the report shows categories)."""
    from reneg.fileio import atomic_write_text
    from reneg.prompts import load_prompts

    try:
        from reneg.demo_world.world import SHAPES
    except ImportError:
        SHAPES = ()
    shapes = tuple(SHAPES) + ("circle", "square", "triangle", "star")
    texts = [p.text for p in load_prompts(d["heldout"])]
    rows = ["Prompt\tCategory"] + [f"{t}\t{_category(t, shapes)}" for t in texts]
    path = os.path.join(folder, "eval_prompts.tsv")
    atomic_write_text(path, "\n".join(rows) + "\n")
    return path


def _usable_training(folder: str, world_model: str | None):
    """(model, embedding) of a finished demo training run in ``folder``, if it fits this demo."""
    emb, sj = os.path.join(folder, "embedding.safetensors"), os.path.join(folder, "summary.json")
    if not (os.path.isfile(emb) and os.path.isfile(sj)):
        return None
    try:
        with open(sj, encoding="utf-8") as f:
            summary = json.load(f)
        model = summary["config"]["model"]
        status = summary.get("status", "finished")  # summaries written before "status" were of finished runs
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if status != "finished":  # a stopped (or still running) run is not evaluated as if it had finished
        print(
            f"reneg eval --demo: not using {folder}: its run is {status} at step {summary.get('step')} of "
            f"{summary.get('steps')} (`reneg train --demo --resume` finishes it)",
            flush=True,
        )
        return None
    if not model or not os.path.isfile(os.path.join(model, "model_index.json")):
        return None
    if world_model and os.path.abspath(model) != os.path.abspath(world_model):
        return None  # trained on the tiny fallback before the demo world was installed
    return model, emb


def demo_config(ns) -> EvalConfig:
    """The demo's evaluation; flags given beside --demo replace its settings (checked before it
    trains or loads anything), and flags naming the demo's own model, reward or prompts are refused."""
    from reneg import demo
    from reneg.demo import refuse_demo_conflicts

    from .config import check_eval_numbers

    given = refuse_demo_conflicts(ns, "eval")
    user = {k: getattr(ns, k) for k in given if k in EvalConfig.__dataclass_fields__ and k not in ("out",)}
    if "grad_range" in user:
        user["grad_range"] = tuple(user["grad_range"])
    check_eval_numbers(EvalConfig(**{k: v for k, v in user.items() if k in _NUMERIC_FIELDS}))
    out = ns.out or DEMO_OUT
    d = demo.setup(out)
    s = d["settings"]
    world_model = d["model"] if d["kind"] == "demo world" else None
    print(f"reneg eval --demo: {d['kind']} ({d['model']})", flush=True)
    found = _usable_training(DEMO_TRAIN, world_model) or _usable_training(os.path.join(out, "train"), world_model)
    emb = found[1] if found else os.path.join(out, "train", "embedding.safetensors")
    cfg = EvalConfig(
        model=found[0] if found else d["model"],
        # the reward the negative was trained on first (the report's headline, and per-sample tuning's), then
        # the held-out judges it never saw: a gain that is the reward's taste, not the preference, shows there
        rewards=[d["reward"], *d["judges"]],
        prompts=_demo_prompts(d, os.path.join(out, "demo")),
        negatives=["null", f"handcrafted:{d['handcrafted']}", f"learned={emb}", f"tuned=tuned:{emb}"],
        out=out,
        handcrafted=d["handcrafted"],
        seed=s.get("eval_seed", 1234),
        sampling_steps=s["sampling_steps"],
        guidance=s["guidance"],
        resolution=s["resolution"],
        batch=s.get("eval_batch", 8),
        images_per_prompt=s.get("eval_images_per_prompt", 1),
        tune_per_prompt=s.get("eval_tune_per_prompt"),
        tune_prompts=s.get("eval_tune_prompts"),
        tune_steps=s.get("eval_tune_steps", 5),
        tune_patience=s.get("eval_tune_patience", 3),
        tune_lr=s.get("tune_lr", s["lr"]),
        grad_range=tuple(s["grad_range"]),
        device=ns.device,
        progress=ns.progress,
        remake_mismatched=True,
        title=f"ReNeg evaluation: built-in demo ({d['kind']})",
        note=(
            "Demo world: a small model and reward trained on a procedural world of shapes."
            + (
                f" The first reward is the one the negative was trained on; the other {len(d['judges'])} are "
                "held-out judges of the same preference (other data, seeds and architectures) that it never saw."
                if d["judges"]
                else ""
            )
            if world_model
            else "Tiny random models: this run proves the machinery (files, statistics, report), not the method; "
            "the numbers mean nothing."
        ),
    )
    for k, v in user.items():
        setattr(cfg, k, v)
    shown = [
        _FLAG_OF.get(k, O.flag_of(k)) for k in sorted(user) if k not in ("progress", "guidance_mode")
    ]  # a display choice
    if shown:
        print(f"reneg eval --demo: using your {', '.join(shown)} instead of the demo's", flush=True)
    check_eval_numbers(cfg)
    if not any(emb in n for n in cfg.negatives):
        pass  # your --negative replaced the demo's: its learned embedding is neither named nor trained
    elif found:
        print(f"reneg eval --demo: using the learned embedding {emb}", flush=True)
    else:
        _demo_train(d, os.path.join(out, "train"), ns.progress)
    return cfg


_FLAG_OF = {
    "negatives": "--negative",
    "tune_steps": "--tune-steps",
    "tune_patience": "--tune-patience",
    "tune_lr": "--tune-lr",
}

# eval's flags that hold numbers (checked before the demo trains anything)
_NUMERIC_FIELDS = (
    "sampling_steps",
    "guidance",
    "resolution",
    "batch",
    "images_per_prompt",
    "tune_steps",
    "tune_patience",
    "frames",
    "grid_limit",
    "limit",
    "tune_per_prompt",
    "tune_prompts",
    "tune_lr",
    "tie_tol",
    "seed",
    "sample_seed",
)


def _demo_train(d: dict, folder: str, progress: bool) -> str:
    """A short global embedding with the demo's training settings."""
    from reneg.trainer.config import TrainConfig
    from reneg.trainer.train import run_train

    steps = d["settings"].get("eval_train_steps", d["settings"]["steps"])
    print(
        f"reneg eval --demo: no learned embedding yet; training a short one ({steps} steps) into {folder}. "
        f"It only shows the path: run `reneg train --demo` first for the full embedding (the demo "
        f"world's published figures come from that)",
        flush=True,
    )
    from reneg.demo import train_settings

    s = dict(d["settings"])
    kw = train_settings(s)
    kw["grad_range"] = tuple(kw.get("grad_range", O.PAPER.grad_range))
    if "eval_train_steps" in s:
        kw["steps"] = int(s["eval_train_steps"])
        kw["checkpoint_every"] = min(int(kw.get("checkpoint_every", kw["steps"])), kw["steps"])
    cfg = TrainConfig(
        model=d["model"],
        rewards=[d["reward"]],
        prompts=d["prompts"],
        heldout=d["heldout"],
        out=folder,
        handcrafted=d["handcrafted"],
        base_model_name="reneg-demo",
        progress=progress,
        overwrite=True,  # the demo's own scratch run, made again whenever no finished one is found
        **kw,
    )
    summary = run_train(cfg)
    return summary["embedding"]

"""``reneg tune``: per-sample search (the paper's Algorithm 1) for one prompt."""

from __future__ import annotations

import argparse
import os

import torch

from reneg import options as O
from reneg.embedding import load_embedding, save_embedding
from reneg.fileio import not_a_file
from reneg.fileio import atomic_write_json
from reneg.generate import as_embedding
from reneg.nag import guidance_of
from reneg.tuning import tune_for_seed

from .config import ConfigError, check_common_numbers, check_embedding_arg, check_out_dir, validate_common
from .train import base_model_fields


def add_tune_args(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a(
        "--demo",
        action="store_true",
        help="tune on the built-in demo world (no files needed); flags given beside it replace the demo's settings",
    )
    O.add_options(
        p, ["model", "config", "vae", "text_encoders", "tokenizer", "low_noise_model", "prediction_type", "rewards"]
    )
    a(
        "--embedding",
        help="starting embedding file (default: the null embedding), or a negative predictor file: the "
        "tune starts from its negative for --prompt",
    )
    a("--prompt", help="the prompt to tune for")
    O.add_options(p, ["seed"], helps={"seed": "the image's seed (0 to 2**64 - 1)"})
    a(
        "--noise",
        choices=("seed", "fresh"),
        default="seed",
        help="seed: tune for this seed's image; fresh: new noise each step, as in the paper",
    )
    O.add_options(
        p,
        ["max_steps", "patience", "lr", "sampling_steps", "guidance", "nag_scale", "nag_tau", "nag_alpha"]
        + ["grad_range", "resolution"],
    )
    O.add_options(p, ["guidance_2", "shift", "wan_experts", "frames"])
    a(
        "--out",
        help="output .safetensors (default: tuned.safetensors); a .json with the reward at "
        "each step is written beside it",
    )
    O.add_options(p, ["overwrite"], helps={"overwrite": "replace an existing --out file and the .json beside it"})
    O.add_options(p, ["device", "mixed_precision", "threads"])
    a(
        "--gradient-checkpointing",
        action="store_true",
        help="recompute UNet, VAE-decoder and reward activations in backward (less memory)",
    )
    O.add_options(p, ["offload_text_encoder"])
    # --- compute-saving options (docs/compute.md); the default is the paper's Algorithm 1 ---
    a(
        "--search-steps",
        type=int,
        default=None,
        metavar="S",
        help="search with S sampling steps (grad range scaled to match), then make the kept negative's "
        "image once at --sampling-steps (default: search at --sampling-steps, the paper). With --max-steps 4, "
        "S = 10 kept 73 %% of the paper search's gain at 32 %% of its UNet calls on the demo world",
    )
    # --- end of compute-saving options ---


def check_tune_numbers(ns) -> None:
    """Every numeric flag of tune, before anything is read."""
    check_common_numbers(ns)  # sampling settings and --lr
    # --max-steps, --patience (at most --max-steps) and --seed: the options layer's rules, which the
    # ComfyUI tune node runs too
    O.check_search(ns)


def validate_tune(ns) -> None:
    check_tune_inputs(ns)
    check_tune_out(ns.out, ns.overwrite)
    search = getattr(ns, "search_steps", None)
    if search is not None:
        O.check_int("--search-steps", search)
        if search > ns.sampling_steps:
            raise ConfigError(f"--search-steps {search} is above --sampling-steps {ns.sampling_steps}")


def check_tune_inputs(ns) -> None:
    """Tune's checks of the inputs of one search (the studio's Tune tab, which has no --out or
    --search-steps, runs these)."""
    check_tune_numbers(ns)
    validate_common(ns)
    if not ns.prompt or not ns.prompt.strip():
        raise ConfigError("--prompt is required and must not be empty")
    if ns.embedding and not os.path.isfile(ns.embedding):
        raise ConfigError(f"--embedding {ns.embedding}: {not_a_file(ns.embedding) or 'no such file'}")
    if ns.embedding:
        from reneg.predictor import is_predictor_file, load_predictor

        if is_predictor_file(ns.embedding):  # a predictor: its negative for --prompt is the start
            try:
                load_predictor(ns.embedding).global_embedding().check_dtype(*O.compute_dtype(ns))
            except ValueError as e:
                raise ConfigError(f"--embedding: {e}") from None
        else:
            check_embedding_arg("embedding", ns.embedding, ns)


def sidecar_path(out: str) -> str:
    """The ``.json`` beside a tuned embedding: the reward at each step."""
    return os.path.splitext(out)[0] + ".json"


def check_tune_out(out: str, overwrite: bool) -> None:
    """Everything ``--out`` needs, before any model loads: a ``.safetensors`` name in a folder that
    exists and takes a real write, and neither the file nor its ``.json`` there already (without
    ``--overwrite``) nor a folder in their place (ever)."""
    if not out.endswith(".safetensors") or not os.path.basename(out[: -len(".safetensors")]):
        raise ConfigError(f"--out {out}: expected a .safetensors file name")
    for path in (out, sidecar_path(out)):
        if os.path.isdir(path):
            raise ConfigError(f"--out {out}: {path} is a folder; give a file name")
        if os.path.lexists(path) and not overwrite:
            raise ConfigError(f"--out {out}: {path} already exists (pass --overwrite to replace it)")
    folder = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(folder):
        raise ConfigError(f"--out {out}: folder {folder} does not exist")
    check_out_dir(folder)  # a real write: a full disk or read-only mount fails here, not after tuning
    for path in (out, sidecar_path(out)):
        if os.path.lexists(path):
            continue
        try:  # the names themselves (too long, not allowed by the file system...)
            with open(path, "x"):
                pass
        except OSError as e:
            raise ConfigError(f"--out {out}: can not write {path} ({e.strerror or e})") from None
        try:
            os.unlink(path)
        except OSError:
            pass


def tune_start(backend, embedding: str | None, prompt: str) -> torch.Tensor:
    """The negative a tune of ``prompt`` starts from, as ``--embedding`` says: a predictor file's
    negative for this prompt, an embedding file's rows, or (empty) the null embedding. ``reneg tune``
    and the studio's Tune tab both start here."""
    from reneg.predictor import is_predictor_file, load_predictor

    if embedding and is_predictor_file(embedding):  # the predicted negative of this prompt
        model = load_predictor(embedding, expected_family=backend.family).to(backend.device)
        c = backend.encode_prompts([prompt])
        with torch.no_grad():
            return model(c.crossattn, c.pooled, c.mask)[0].float()
    if embedding:
        # a T5 file's padding as zero rows: rows alone keep its mask
        return load_embedding(embedding, expected_family=backend.family).model_rows().float()
    return backend.null_embedding()[0]


def run_tune(ns) -> dict:
    validate_tune(ns)
    from reneg.backends.loading import load_run_model, weights_dtype
    from reneg.frame_reward import per_frame
    from reneg.rewards import load_rewards, reward_files

    from .train import enable_checkpointing

    device = torch.device(ns.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    mixed = getattr(ns, "mixed_precision", "no")
    dtype = weights_dtype(mixed, device)
    frames, shift = getattr(ns, "frames", 1), getattr(ns, "shift", None)
    backend = load_run_model(ns, device, dtype)
    print(f"reneg tune: model {backend.describe()}", flush=True)
    reward = load_rewards(ns.rewards, device=device, dtype=dtype)
    for note in (backend.resolution_note(ns.resolution), backend.truncation_note([ns.prompt])):
        if note:
            print(f"reneg tune: {note}", flush=True)
    if getattr(ns, "gradient_checkpointing", False):
        enable_checkpointing(backend, reward)
    reward = per_frame(reward, frames)  # --frames: a clip's reward, the mean over its frames
    if getattr(ns, "offload_text_encoder", False):
        # the one prompt and E("") (the start, and the pooled vector an SDXL/Flux file carries) first
        backend.encode_prompts([ns.prompt])
        backend.null_embedding()
        moved = backend.offload_text_encoder("cpu", warn=lambda m: print(f"reneg tune: warning: {m}", flush=True))
        from .train import parameter_count

        parts = ", ".join(f"{name} ({parameter_count(n)} parameters)" for name, n in moved.items())
        print(f"reneg tune: --offload-text-encoder: the prompt encoded; moved {parts} to the CPU", flush=True)
    from reneg.predictor import is_predictor_file

    start = tune_start(backend, ns.embedding, ns.prompt)

    def on_step(rec):
        print(f"step {rec['step']}: reward {rec['reward']:.5f} (best {rec['best_reward']:.5f})", flush=True)

    from reneg.compute import ComputeMeter

    meter = ComputeMeter()
    guidance = guidance_of(ns, backend.family)
    res, _ = tune_for_seed(
        backend,
        reward,
        ns.prompt,
        ns.seed,
        start.to(device),
        ns.sampling_steps,
        guidance,
        tuple(ns.grad_range),
        ns.resolution,
        ns.resolution,
        ns.max_steps,
        ns.patience,
        ns.lr,
        noise=ns.noise,
        on_step=on_step,
        autocast_dtype=dtype if dtype != torch.float32 else None,
        search_steps=getattr(ns, "search_steps", None),
        meter=meter,
    )
    print(f"compute: {meter.short()}", flush=True)
    emb = as_embedding(backend, res.best)
    save_embedding(
        ns.out,
        emb,
        overwrite=ns.overwrite,
        kind="per-sample",
        prompt=ns.prompt,
        seed=ns.seed,
        noise_mode=ns.noise,
        **base_model_fields(ns.model),
        rewards=ns.rewards,
        reward_files=reward_files(ns.rewards),  # how reneg eval recognises them
        steps=len(res.history),
        lr=ns.lr,
        **{**guidance.metadata(), "guidance_scale": ns.guidance},
        start_embedding=os.path.basename(ns.embedding) if ns.embedding else "null",
        start_kind="predictor" if ns.embedding and is_predictor_file(ns.embedding) else None,
        start_reward=res.start_reward,
        best_reward=res.best_reward,
        frames=frames if frames > 1 else None,
        flow_shift=shift,
    )
    report = {
        "prompt": ns.prompt,
        "seed": ns.seed,
        "noise": ns.noise,
        "start_reward": res.start_reward,
        "best_reward": res.best_reward,
        "best_step": res.best_step,
        "stopped": res.stopped,
        "history": res.history,
        "embedding": ns.out,
        "search_steps": getattr(ns, "search_steps", None),
        "final_reward": res.final_reward,
        "compute": meter.to_json(),
    }
    atomic_write_json(sidecar_path(ns.out), report)
    return report

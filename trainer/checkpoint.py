"""Training checkpoints: everything needed to resume exactly, written atomically.

A checkpoint holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``; a file that would run code is refused.
"""

from __future__ import annotations

import json
import math
import os

import torch

from reneg.fileio import OutputError, atomic_torch_save, safe_torch_load

CHECKPOINT_NAME = "checkpoint.pt"
EMBEDDING_NAME = "embedding.safetensors"
STEP_MAX = 2**31 - 1  # the most --steps takes (reneg.options.COUNT_MAX)


def save_checkpoint(
    path: str,
    *,
    step: int,
    neg: torch.Tensor,
    optimizer,
    scheduler,
    skipped: int,
    config: dict,
    heldout: list[dict],
    extra: dict | None = None,
    best_neg: torch.Tensor | None = None,
) -> None:
    """``best_neg``: the embedding of the best held-out check (``--keep-best-by``), kept so that a resumed
    run can put ``embedding-best.safetensors`` back as it was at this step."""
    state = {
        "format": "reneg-train-checkpoint",
        "version": 1,
        "step": int(step),
        "neg": neg.detach().cpu().clone(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "skipped": int(skipped),
        "config": json.dumps(config, sort_keys=True),
        "heldout": json.dumps(heldout),
        "extra": json.dumps(extra or {}),
    }
    if best_neg is not None:
        state["best_neg"] = best_neg.detach().float().cpu().clone()
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    atomic_torch_save(path, state)


def save_run_files(out: str, write_embedding, write_checkpoint) -> None:
    """Write ``OUT/embedding.safetensors`` and ``OUT/checkpoint.pt`` all or nothing.

    ``write_embedding(path)`` writes the embedding, complete, to a hidden staging file beside its
    target; then ``write_checkpoint(path)`` writes the checkpoint (atomically, onto its own name: the
    commit point); then the embedding is renamed over its target. A failure in either write (a full
    disk, a read-only folder, an I/O error) leaves both files as they were.
    """
    staged = os.path.join(out, ".embedding.pending.tmp.safetensors")  # hidden; the writer wants .safetensors
    try:
        write_embedding(staged)
        write_checkpoint(os.path.join(out, CHECKPOINT_NAME))
    except BaseException:
        try:
            os.unlink(staged)
        except OSError:
            pass
        raise
    target = os.path.join(out, EMBEDDING_NAME)
    try:
        os.replace(staged, target)
    except OSError as e:
        raise OutputError(f"{target}: writing failed: {e.strerror or e}") from e


def _finite_number(v) -> bool:
    if isinstance(v, bool):
        return True
    if isinstance(v, (int, float)):
        try:
            return math.isfinite(v)
        except OverflowError:
            return False
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return bool(torch.isfinite(v).all())
    if isinstance(v, (list, tuple)):
        return all(_finite_number(x) for x in v)
    return True


def load_checkpoint(path: str) -> dict:
    """A checkpoint, checked; any failure is one ValueError naming the file, whatever it holds."""
    try:
        return _load_checkpoint(path)
    except (ValueError, OSError):
        raise
    except Exception as e:  # untrusted content (sparse or float8 tensors, odd objects...)
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        raise ValueError(
            f"{path}: not a readable training checkpoint ({type(e).__name__}{': ' + detail if detail else ''})"
        ) from None


def _load_checkpoint(path: str) -> dict:
    state = safe_torch_load(path, what="training checkpoint")
    if not isinstance(state, dict) or state.get("format") != "reneg-train-checkpoint":
        raise ValueError(
            f"{path}: not a ReNeg training checkpoint (expected format "
            f"'reneg-train-checkpoint', found {type(state).__name__}"
            f"{' ' + str(state.get('format'))[:60] if isinstance(state, dict) else ''})"
        )
    for key in ("step", "neg", "optimizer", "scheduler"):
        if key not in state:
            raise ValueError(f"{path}: training checkpoint lacks {key!r}")
    neg = state["neg"]
    if (
        not isinstance(neg, torch.Tensor)
        or neg.layout != torch.strided
        or neg.dtype != torch.float32
        or neg.dim() != 3
        or not torch.isfinite(neg).all()
    ):
        raise ValueError(f"{path}: training checkpoint holds no finite float32 [1, tokens, hidden] embedding")
    best = state.get("best_neg")
    if best is not None and (
        not isinstance(best, torch.Tensor)
        or best.layout != torch.strided
        or best.dtype != torch.float32
        or tuple(best.shape) != tuple(neg.shape)
        or not torch.isfinite(best).all()
    ):
        raise ValueError(
            f"{path}: training checkpoint's best embedding ('best_neg') is not a finite float32 tensor of "
            f"the embedding's shape {list(neg.shape)}"
        )
    # a corrupt file must fail here, with its name, not later inside the optimizer
    for key in ("step", "skipped"):
        v = state.get(key, 0)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= STEP_MAX:
            raise ValueError(
                f"{path}: training checkpoint has an invalid {key!r}: expected an integer from 0 to {STEP_MAX}, "
                f"found {str(v)[:40]}"
            )
    opt, sched = state["optimizer"], state["scheduler"]
    if (
        not isinstance(opt, dict)
        or not isinstance(opt.get("state"), dict)
        or not isinstance(opt.get("param_groups"), list)
        or not all(isinstance(g, dict) and "params" in g for g in opt["param_groups"])
        or not all(isinstance(s, dict) for s in opt["state"].values())
        or not isinstance(sched, dict)
    ):
        raise ValueError(f"{path}: training checkpoint has a malformed optimizer or scheduler state")
    for s in opt["state"].values():
        for k, v in s.items():
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all():
                raise ValueError(f"{path}: training checkpoint has NaN/inf in the optimizer state {k!r}")
    # the optimizer's settings (lr, betas, eps, weight decay) and the schedule's learning rates
    for where, d in [("optimizer", g) for g in opt["param_groups"]] + [("scheduler", sched)]:
        for k, v in d.items():
            if k != "params" and not _finite_number(v):
                raise ValueError(
                    f"{path}: training checkpoint has a non-finite {where} setting {k!r} ({str(v)[:40]}); "
                    f"it can not be resumed"
                )
    for key, default, kind in (("config", "{}", dict), ("heldout", "[]", list), ("extra", "{}", dict)):
        raw = state.get(key, default)
        try:
            value = json.loads(raw)
        except (TypeError, ValueError) as e:
            raise ValueError(
                f"{path}: training checkpoint has an unreadable {key!r} ({type(e).__name__}: {str(e)[:80]})"
            ) from None
        if not isinstance(value, kind) or (kind is list and not all(isinstance(v, dict) for v in value)):
            raise ValueError(
                f"{path}: training checkpoint's {key!r} is not a JSON {kind.__name__}"
                f"{' of objects' if kind is list else ''}"
            )
        state[key] = value
    return state


def find_resume(out: str, resume: str) -> str | None:
    """``--resume auto|latest`` -> the out folder's checkpoint if any; a path -> that path."""
    if resume in ("auto", "latest"):
        p = os.path.join(out, CHECKPOINT_NAME)
        if os.path.isfile(p):
            return p
        if resume == "latest":
            raise FileNotFoundError(f"{p}: no checkpoint to resume from")
        return None
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"{resume}: no such checkpoint")
    return resume

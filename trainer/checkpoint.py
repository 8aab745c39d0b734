"""Training checkpoints: everything needed to resume exactly, written atomically.

A checkpoint holds only tensors and plain Python values, so it loads with
``torch.load(weights_only=True)``; a file that would run code is refused.
"""

from __future__ import annotations

import json
import os

import torch

from reneg.fileio import atomic_torch_save, safe_torch_load

CHECKPOINT_NAME = "checkpoint.pt"


def save_checkpoint(path: str, *, step: int, neg: torch.Tensor, optimizer, scheduler, skipped: int,
                    config: dict, heldout: list[dict], extra: dict | None = None) -> None:
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
    if torch.cuda.is_available():
        state["rng_cuda"] = torch.cuda.get_rng_state_all()
    atomic_torch_save(path, state)


def load_checkpoint(path: str) -> dict:
    state = safe_torch_load(path, what="training checkpoint")
    if not isinstance(state, dict) or state.get("format") != "reneg-train-checkpoint":
        raise ValueError(f"{path}: not a ReNeg training checkpoint (expected format "
                         f"'reneg-train-checkpoint', found {type(state).__name__}"
                         f"{' ' + str(state.get('format')) if isinstance(state, dict) else ''})")
    for key in ("step", "neg", "optimizer", "scheduler"):
        if key not in state:
            raise ValueError(f"{path}: training checkpoint lacks {key!r}")
    if not isinstance(state["neg"], torch.Tensor) or not torch.isfinite(state["neg"]).all():
        raise ValueError(f"{path}: training checkpoint holds no finite embedding")
    state["config"] = json.loads(state.get("config", "{}"))
    state["heldout"] = json.loads(state.get("heldout", "[]"))
    state["extra"] = json.loads(state.get("extra", "{}"))
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

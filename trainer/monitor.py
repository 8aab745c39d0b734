"""Watching a training run for reward hacking, at its held-out checks.

A negative learned from a reward can learn what the reward likes rather than what people like, while
the training reward keeps rising. What shows it is what the training loss never sees, scored at every
held-out check (``--eval-every``): the training reward of the held-out images, each ``--monitor-reward``
and their diversity. :func:`hacking_warning` is the rule; :class:`HeldoutMonitor` keeps what it needs
across checks (and across a resume).
"""

from __future__ import annotations

import math
from typing import Sequence

DIVERSITY_DROP = 0.10  # a relative drop of the diversity larger than this, from its best check, counts
LEVEL = 0.95  # the paired interval's level for the rewards


def measure_label(measure: str) -> str:
    """How a message names a measure."""
    if measure == "heldout":
        return "held-out training reward"
    if measure == "diversity":
        return "held-out diversity"
    return f"held-out {measure}"


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def training_trend(
    train: Sequence[Sequence[float]], step: int, best_step: int, window: int, level: float = LEVEL
) -> tuple[float, float, bool] | None:
    """``(before, recent, rose)``: the mean training reward of the logged steps up to ``best_step``, over
    the last ``window`` steps up to ``step``, and whether ``recent`` is above ``before`` by more than noise
    (the lower end of the Welch interval of ``recent - before`` above 0); None when either has no finite
    value."""
    a = [float(r) for s, r in train if s <= best_step and _finite(r)]
    b = [float(r) for s, r in train if step - window < s <= step and _finite(r)]
    if not a or not b:
        return None
    from reneg.evaluation.stats import welch_ci

    lo = welch_ci(b, a, level)["lo"]  # recent minus before
    return math.fsum(a) / len(a), math.fsum(b) / len(b), lo is not None and lo > 0


def fell_significantly(
    measure: str, value: float, scores: Sequence[float] | None, best: dict, level: float = LEVEL
) -> bool:
    """Whether ``measure`` fell below its best check by more than noise (:func:`hacking_warning`'s rule 2)."""
    if not (_finite(value) and _finite(best.get("value"))):
        return False
    if measure == "diversity":
        b = float(best["value"])
        return b > 0 and (b - value) / b > DIVERSITY_DROP
    ci = paired_ci(scores, best.get("scores"), level)
    return ci is not None and ci["hi"] is not None and ci["hi"] < 0


def paired_ci(now: Sequence[float] | None, then: Sequence[float] | None, level: float = LEVEL) -> dict | None:
    """The Student-t interval of the paired differences ``now - then`` (this check's image minus an earlier
    check's image of the same prompt and seed), or None when the two can not be paired or a difference is
    not finite."""
    if not now or not then or len(now) != len(then):
        return None
    diffs = [float(a) - float(b) for a, b in zip(now, then)]
    if not all(math.isfinite(d) for d in diffs):
        return None
    from reneg.evaluation.stats import mean_ci

    return mean_ci(diffs, level)


def heldout_rise(now: Sequence[float] | None, then: Sequence[float] | None, level: float = LEVEL):
    """``(then_mean, now_mean)`` when the training reward of this check's held-out images (``now``) is
    above that of an earlier check's same images (``then``) by more than noise (:func:`hacking_warning`'s rule 1b:
    the paired interval's lower end above 0); None otherwise."""
    ci = paired_ci(now, then, level)
    if ci is None or ci["lo"] is None or ci["lo"] <= 0:
        return None
    return math.fsum(float(x) for x in then) / len(then), math.fsum(float(x) for x in now) / len(now)


def hacking_warning(
    measure: str,
    step: int,
    value: float,
    scores: Sequence[float] | None,
    best: dict | None,
    train: Sequence[Sequence[float]],
    window: int,
    kept: str | None = None,
    heldout_now: Sequence[float] | None = None,
    heldout_high: tuple[float, int, float] | None = None,
) -> str | None:
    """The warning for ``measure`` at the held-out check of ``step``, or None.

    The measures, each scored at every held-out check on the same held-out prompts and seeds:

    - ``heldout``: the training reward of the learned negative's held-out images;
    - each ``--monitor-reward`` (by its name): another reward's score of the same images;
    - ``diversity``: the mean pairwise ``1 - cos`` between the held-out images' features in the training
      reward's image tower (one image per held-out prompt: the spread across prompts, which falls when
      every image starts to look alike; :mod:`reneg.diversity`).

    The rule, checked for each measure against the best earlier check of that measure (its highest value;
    the first of equal ones): it warns when

    1. the training reward keeps rising, by any of three readings:

       a. on the training batches: its mean over the last ``--eval-every`` logged steps is above its mean
          over the steps up to the best check by more than noise (the 95 % Welch interval of the
          difference of the two means, each step's reward one value, lies above zero: a flat, noisy
          training reward does not count as rising; :func:`training_trend`);
       b. on the held-out images (for a monitor reward or the diversity, not for the training reward
          itself): the training reward of this check's images is above that of the best check's images
          by more than noise (the 95 % Student-t interval of the paired differences, same prompt and
          seed, lies above zero; :func:`heldout_rise`). The batches' reward is scattered by the batches'
          prompts and noise (a short rollout scatters it more), so that (a) can miss a rise that the
          same held-out images show plainly;
       c. on the held-out images (for a monitor reward or the diversity): the training reward of this
          check's images is the highest of the run so far (``heldout_high``). A monitor's best check is
          often one the training reward passed long ago, on a path that wandered down and up again; (b)
          then needs a large rise over it, while the training reward setting a new high as the monitor
          stands far below its own best is the plainest shape of reward hacking there is;

    2. and the measure fell by more than noise (:func:`fell_significantly`): for a reward, the 95 %
       Student-t interval of the paired differences (this check's image minus the best check's image of
       the same prompt and seed) lies below zero; for the diversity (one number a check), it is more than
       10 % below the best check's.

    A measure warns once (:meth:`HeldoutMonitor.observe`).

    ``value``/``scores``: this check's mean and per-image scores (no scores for the diversity);
    ``best``: the best earlier check of the measure, ``{"step", "value", "scores"}``; ``train``: the
    logged training reward as ``(step, reward)`` up to ``step``; ``window``: ``--eval-every``; ``kept``:
    the file that holds the best check's embedding, when ``--keep-best-by`` keeps this measure;
    ``heldout_now``: this check's per-image training reward (rule 1b, against ``best["heldout"]``, the
    best check's); ``heldout_high``: ``(previous high, its step, this check's value)`` when this check's
    held-out training reward is the highest so far (rule 1c), else None."""
    if not best or best.get("step") is None or best["step"] >= step or window < 1:
        return None
    if not fell_significantly(measure, value, scores, best):
        return None
    rose = None
    trend = training_trend(train, step, best["step"], window)
    if trend is not None and trend[2]:
        rose = f"from step {max(0, step - window)} the training reward rose ({trend[0]:.4f} -> {trend[1]:.4f})"
    elif measure != "heldout":
        held = heldout_rise(heldout_now, best.get("heldout"))
        if held is not None:
            rose = (
                f"the training reward of the held-out images rose ({held[0]:.4f} at step {best['step']} -> "
                f"{held[1]:.4f} at step {step})"
            )
        elif heldout_high is not None:
            rose = (
                f"the training reward of the held-out images reached a new high ({heldout_high[2]:.4f} at step "
                f"{step}, above {heldout_high[0]:.4f} at step {heldout_high[1]})"
            )
    if rose is None:
        return None
    keep = f"{kept} holds it" if kept else f"--keep-best-by {measure} keeps it"
    return (
        f"{rose} while {measure_label(measure)} fell ({best['value']:.4f} at step {best['step']} -> "
        f"{value:.4f} at step {step}): the embedding may be learning what the reward likes rather than what "
        f"people like (reward hacking); the best held-out checkpoint is step {best['step']} ({keep})"
    )


class HeldoutMonitor:
    """The best check of each measure (its step, value and per-image scores, and the training reward's
    per-image scores of that check, for :func:`hacking_warning`'s reading 1b), the training reward of
    every step, the warnings given, and (``--keep-best-by``) the best check of ``keep_best_by``.
    ``state()`` / ``HeldoutMonitor(..., state=...)`` round-trip through plain JSON, which the checkpoint
    carries, so a resumed run goes on exactly as the unbroken one would."""

    def __init__(self, measures: Sequence[str], keep_best_by: str | None = None, state: dict | None = None):
        self.measures = list(measures)
        self.keep_best_by = keep_best_by
        state = state or {}
        self.best: dict = {m: dict(b) for m, b in (state.get("best") or {}).items() if isinstance(b, dict)}
        self.train: list = [list(x) for x in state.get("train") or [] if isinstance(x, (list, tuple)) and len(x) == 2]
        self.warnings: list = [dict(w) for w in state.get("warnings") or [] if isinstance(w, dict)]
        keep = state.get("keep")
        self.keep: dict | None = dict(keep) if isinstance(keep, dict) else None

    def state(self) -> dict:
        return {"best": self.best, "train": self.train, "warnings": self.warnings, "keep": self.keep}

    def add_training_reward(self, step: int, reward: float) -> None:
        self.train = [x for x in self.train if x[0] < step]  # a step logged again (never, but harmless)
        self.train.append([int(step), float(reward)])

    def warned(self, measure: str) -> bool:
        return any(w.get("measure") == measure for w in self.warnings)

    def observe(
        self,
        step: int,
        values: dict,
        scores: dict,
        window: int,
        kept: str | None = None,
    ) -> tuple[list[dict], bool]:
        """One held-out check: ``values[m]`` its mean (None: not measured), ``scores[m]`` its per-image
        scores. Returns the new warnings (``{step, measure, message}``) and whether this check is a new
        best of ``keep_best_by`` (``self.keep`` then names it). A measure that has warned never warns
        again."""
        new, best_now = [], False
        # rule 1c: is this check's held-out training reward the highest so far (against the earlier checks)?
        prev, now = self.best.get("heldout"), values.get("heldout")
        high = None
        if prev and _finite(now) and prev.get("step") is not None and prev["step"] < step and now > prev["value"]:
            high = (float(prev["value"]), int(prev["step"]), float(now))
        held = scores.get("heldout")  # this check's per-image training reward (rule 1b, and kept with a best)
        held = None if held is None else [float(x) for x in held]
        for m in self.measures:
            v = values.get(m)
            if not _finite(v):
                continue
            s = scores.get(m)
            best = self.best.get(m)
            if not self.warned(m):
                msg = hacking_warning(
                    m, step, v, s, best, self.train, window, kept if m == self.keep_best_by else None, held, high
                )
                if msg:
                    w = {"step": int(step), "measure": m, "message": msg}
                    self.warnings.append(w)
                    new.append(w)
            if best is None or v > best["value"]:
                self.best[m] = {
                    "step": int(step),
                    "value": float(v),
                    "scores": None if s is None else [float(x) for x in s],
                    "heldout": held,
                }
                if m == self.keep_best_by:
                    self.keep = {"by": m, "step": int(step), "value": float(v)}
                    best_now = True
        return new, best_now

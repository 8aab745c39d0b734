"""Statistics of an evaluation: means with confidence intervals and paired win rates.

Pure Python (``math`` and ``statistics`` only), so it is exact and easy to check by hand.

- Mean: Student-t interval ``mean +- t_{n-1, 1-a/2} * s / sqrt(n)`` (``s`` the sample standard
  deviation). The t quantile is computed exactly for integer degrees of freedom (the closed-form
  CDF of Abramowitz & Stegun 26.7.3-4, inverted by bisection), so no SciPy is needed. With one value
  there is no interval (``lo`` and ``hi`` are ``None``).
- Win rate of A over B, paired by image (same prompt, same seed): ``(wins + ties / 2) / n``, with
  the Wilson score interval for that proportion. Wins, ties and losses are also reported separately.
  A pair is a tie when ``|a - b| <= tie_tol`` (default 0: exactly equal scores).
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Sequence

INTERVAL_METHOD = (
    "mean: Student-t 95% interval over images; win rate: (wins + ties/2) / n with the Wilson score interval"
)


def t_cdf(t: float, df: int) -> float:
    """CDF of Student's t with integer ``df >= 1`` (closed form, A&S 26.7.3-26.7.4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    df = int(df)
    theta = math.atan(t / math.sqrt(df))
    c2 = math.cos(theta) ** 2
    s = math.sin(theta)
    if df % 2 == 1:
        # A(t|df) = 2/pi (theta + sin cos (1 + 2/3 cos^2 + ... + 2.4..(df-3)/(1.3..(df-2)) cos^(df-3)))
        total, term = 0.0, 1.0
        if df > 1:
            total = 1.0
            for k in range(1, (df - 3) // 2 + 1):
                term *= (2 * k) / (2 * k + 1) * c2
                total += term
        a = 2 / math.pi * (theta + (s * math.cos(theta) * total if df > 1 else 0.0))
    else:
        # A(t|df) = sin (1 + 1/2 cos^2 + 1.3/(2.4) cos^4 + ... + 1.3..(df-3)/(2.4..(df-2)) cos^(df-2))
        total, term = 1.0, 1.0
        for k in range(1, (df - 2) // 2 + 1):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        a = s * total
    return 0.5 + 0.5 * a


def t_quantile(p: float, df: int) -> float:
    """Inverse of :func:`t_cdf` (bisection to 1e-12)."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    if p < 0.5:
        return -t_quantile(1 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2
        if hi > 1e12:
            return math.inf
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def _finite(values: Sequence[float], what: str) -> list[float]:
    out = [float(v) for v in values]
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{what}: {len(bad)} non-finite value(s) (e.g. {bad[0]})")
    return out


def mean_ci(values: Sequence[float], level: float = 0.95) -> dict:
    """``{n, mean, std, lo, hi, half}``; ``std``/``lo``/``hi``/``half`` are None for ``n < 2``."""
    v = _finite(values, "mean_ci")
    n = len(v)
    if n == 0:
        return {"n": 0, "mean": None, "std": None, "lo": None, "hi": None, "half": None}
    m = math.fsum(v) / n
    if n < 2:
        return {"n": 1, "mean": m, "std": None, "lo": None, "hi": None, "half": None}
    sd = math.sqrt(math.fsum((x - m) ** 2 for x in v) / (n - 1))
    half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": m, "std": sd, "lo": m - half, "hi": m + half, "half": half}


def welch_ci(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> dict:
    """Unpaired ``mean(a) - mean(b)`` with its Welch (Welch-Satterthwaite) Student-t interval:
    ``{mean, lo, hi}``; ``lo``/``hi`` are None when either side has fewer than 2 values."""
    a, b = _finite(a, "welch_ci"), _finite(b, "welch_ci")
    if not a or not b:
        return {"mean": None, "lo": None, "hi": None}
    ma, mb = math.fsum(a) / len(a), math.fsum(b) / len(b)
    if len(a) < 2 or len(b) < 2:
        return {"mean": ma - mb, "lo": None, "hi": None}
    va = math.fsum((x - ma) ** 2 for x in a) / (len(a) - 1) / len(a)
    vb = math.fsum((x - mb) ** 2 for x in b) / (len(b) - 1) / len(b)
    den = va**2 / (len(a) - 1) + vb**2 / (len(b) - 1)
    df = (va + vb) ** 2 / den if den > 0 else len(a) + len(b) - 2
    half = t_quantile(0.5 + level / 2, max(1, int(df))) * math.sqrt(va + vb)
    return {"mean": ma - mb, "lo": ma - mb - half, "hi": ma - mb + half}


def wilson(successes: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (``successes`` may be fractional: ties count half)."""
    if n <= 0:
        raise ValueError(f"wilson: need n >= 1, got {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson: successes {successes} outside [0, {n}]")
    z = NormalDist().inv_cdf(0.5 + level / 2)
    p = successes / n
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * math.sqrt(max(0.0, p * (1 - p) / n + z * z / (4 * n * n)))
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(a: Sequence[float], b: Sequence[float], tie_tol: float = 0.0, level: float = 0.95) -> dict:
    """Paired win rate of ``a`` over ``b``: ``{n, wins, ties, losses, rate, lo, hi}``."""
    a = _finite(a, "win_rate")
    b = _finite(b, "win_rate")
    if len(a) != len(b):
        raise ValueError(f"win_rate: paired scores differ in length ({len(a)} vs {len(b)})")
    if not (math.isfinite(tie_tol) and tie_tol >= 0):  # NaN would turn every loss into a tie
        raise ValueError(f"win_rate: tie_tol must be a finite number >= 0, got {tie_tol}")
    n = len(a)
    if n == 0:
        return {"n": 0, "wins": 0, "ties": 0, "losses": 0, "rate": None, "lo": None, "hi": None}
    wins = sum(1 for x, y in zip(a, b) if x - y > tie_tol)
    losses = sum(1 for x, y in zip(a, b) if y - x > tie_tol)
    ties = n - wins - losses
    s = wins + 0.5 * ties
    lo, hi = wilson(s, n, level)
    return {"n": n, "wins": wins, "ties": ties, "losses": losses, "rate": s / n, "lo": lo, "hi": hi}


def paired_differences(a: Sequence[float], b: Sequence[float]) -> list[float]:
    if len(a) != len(b):
        raise ValueError(f"paired_differences: lengths differ ({len(a)} vs {len(b)})")
    return [float(x) - float(y) for x, y in zip(a, b)]

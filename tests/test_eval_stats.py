"""reneg.evaluation.stats against hand-computed values (Wilson and t intervals written out by hand)."""

import math

import pytest

from reneg.evaluation import stats

Z = 1.959963984540054  # 97.5 % normal quantile


def test_t_quantile_matches_tables():
    # classic two-sided 95 % t table
    for df, t in [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (9, 2.2622), (30, 2.0423), (100, 1.9840)]:
        assert stats.t_quantile(0.975, df) == pytest.approx(t, abs=1e-4)
    assert stats.t_quantile(0.5, 7) == 0.0
    assert stats.t_quantile(0.025, 5) == pytest.approx(-stats.t_quantile(0.975, 5))
    # closed forms: df=1 is Cauchy, df=2 has t = (2p-1)/sqrt(2p(1-p))
    assert stats.t_cdf(1.0, 1) == pytest.approx(0.75)
    p = 0.9
    assert stats.t_quantile(p, 2) == pytest.approx((2 * p - 1) / math.sqrt(2 * p * (1 - p)), abs=1e-9)
    with pytest.raises(ValueError, match="degrees of freedom"):
        stats.t_cdf(1.0, 0)


def test_mean_ci_by_hand():
    ci = stats.mean_ci([1.0, 2.0, 3.0])
    # mean 2, sample sd 1, half = t(0.975, 2) * 1 / sqrt(3) = 4.302653 / 1.732051
    assert ci["n"] == 3 and ci["mean"] == 2.0 and ci["std"] == pytest.approx(1.0)
    assert ci["half"] == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)
    assert (ci["lo"], ci["hi"]) == pytest.approx((2 - 2.484138, 2 + 2.484138), abs=1e-5)


def test_mean_ci_single_value_and_constant():
    one = stats.mean_ci([0.25])
    assert one == {"n": 1, "mean": 0.25, "std": None, "lo": None, "hi": None, "half": None}
    const = stats.mean_ci([0.5] * 4)
    assert const["half"] == 0.0 and const["lo"] == const["hi"] == 0.5
    with pytest.raises(ValueError, match="non-finite"):
        stats.mean_ci([1.0, float("nan")])


def test_win_rate_with_ties():
    # wins: 1 (1>0), ties: 2 (2=2, 4=4), losses: 1 (3<5) -> rate (1 + 2/2) / 4 = 0.5
    w = stats.win_rate([1, 2, 3, 4], [0, 2, 5, 4])
    assert (w["n"], w["wins"], w["ties"], w["losses"]) == (4, 1, 2, 1)
    assert w["rate"] == 0.5
    # Wilson, p = 0.5, n = 4: centre 0.5, half = z/(1+z^2/4) * sqrt(0.25/4 + z^2/64)
    half = Z / (1 + Z * Z / 4) * math.sqrt(0.25 / 4 + Z * Z / 64)
    assert (w["lo"], w["hi"]) == pytest.approx((0.5 - half, 0.5 + half))
    assert (w["lo"], w["hi"]) == pytest.approx((0.150039, 0.849961), abs=1e-6)


def test_win_rate_tie_tolerance():
    w = stats.win_rate([1.0, 2.0, 3.0], [1.05, 1.0, 3.2], tie_tol=0.1)
    assert (w["wins"], w["ties"], w["losses"]) == (1, 1, 1)
    with pytest.raises(ValueError, match="tie_tol"):
        stats.win_rate([1.0], [1.0], tie_tol=-1)


def test_win_rate_all_wins():
    w = stats.win_rate([1.0] * 10, [0.0] * 10)
    assert (w["wins"], w["ties"], w["losses"], w["rate"]) == (10, 0, 0, 1.0)
    # Wilson with p = 1: upper bound 1, lower bound n / (n + z^2)
    assert w["hi"] == 1.0
    assert w["lo"] == pytest.approx(10 / (10 + Z * Z)) and w["lo"] == pytest.approx(0.722467, abs=1e-6)
    lost = stats.win_rate([0.0] * 10, [1.0] * 10)
    assert (
        lost["rate"] == 0.0
        and lost["lo"] == pytest.approx(0.0, abs=1e-12)
        and lost["hi"] == pytest.approx(1 - 0.722467, abs=1e-6)
    )


def test_win_rate_single_prompt():
    w = stats.win_rate([0.3], [0.2])
    assert (w["n"], w["rate"], w["hi"]) == (1, 1.0, 1.0)
    assert w["lo"] == pytest.approx(1 / (1 + Z * Z))  # 0.206549
    tie = stats.win_rate([0.3], [0.3])
    assert tie["ties"] == 1 and tie["rate"] == 0.5
    # p = 0.5, n = 1: half = z / (2 sqrt(1 + z^2))
    half = Z / (2 * math.sqrt(1 + Z * Z))
    assert (tie["lo"], tie["hi"]) == pytest.approx((0.5 - half, 0.5 + half))
    empty = stats.win_rate([], [])
    assert empty["n"] == 0 and empty["rate"] is None


def test_win_rate_rejects_unpaired():
    with pytest.raises(ValueError, match="differ in length"):
        stats.win_rate([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="lengths differ"):
        stats.paired_differences([1.0], [])
    assert stats.paired_differences([3.0, 1.0], [1.0, 1.5]) == [2.0, -0.5]

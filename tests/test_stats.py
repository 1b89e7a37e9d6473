"""`rlatent.run.stats.paired_difference` on hand-built cases whose answers are known: no difference gives
exactly [0, 0], a clear win an interval clear of 0, problems repeated across seeds a wider interval than the
same outcomes counted as independent problems, one seed the exact McNemar p."""

import math

import pytest

from rlatent.run.stats import mcnemar_exact, paired_difference


def seed(a, b, name="q"):
    """One seed's outcomes on problems `name0`, `name1`, ..."""
    return [f"{name}{i}" for i in range(len(a))], a, b


def test_identical_rows_differ_by_exactly_nothing():
    a = [1, 0, 1, 1, 0, 0, 1, 0]
    result = paired_difference([seed(a, a), seed(a[::-1], a[::-1], "r")])
    assert (result.difference, result.low, result.high, result.p) == (0.0, 0.0, 0.0, 1.0)
    assert (result.only_a, result.only_b, result.test) == (0, 0, "hierarchical bootstrap")


def test_a_clear_win_has_an_interval_clear_of_zero():
    # per seed: B right on 40 of 50, A on 10 of the same 50 (and never where B is wrong)
    a, b = [1] * 10 + [0] * 40, [1] * 40 + [0] * 10
    result = paired_difference([seed(a, b, f"s{s}-") for s in range(3)])
    assert result.difference == pytest.approx(0.6)
    assert 0.4 < result.low < 0.6 < result.high < 0.8
    assert result.p == pytest.approx(2 / 10_001)  # no replicate at or below 0: the smallest p it can give
    assert (result.seeds, result.pairs, result.problems, result.only_a, result.only_b) == (3, 150, 150, 0, 90)


def test_the_pooled_difference_weighs_every_seeds_problems_once():
    result = paired_difference([seed([0, 0], [1, 1]), seed([1, 1, 1, 1], [1, 1, 1, 0], "r")])
    assert result.difference == pytest.approx((2 - 1) / 6)  # (B right - A right) / all pairs


def test_problems_repeated_across_seeds_widen_the_interval():
    """Three seeds with the same outcomes on the same 60 problems: one experiment's worth of problems, not
    three. Pooled into one list of 180 independent problems (as a McNemar test over the concatenated seeds
    counts them) the interval shrinks by about sqrt(3), and the p-value with it."""
    a = [1, 0, 0, 1, 0, 1] * 10
    b = [1, 1, 0, 1, 1, 0] * 10
    shared = paired_difference([seed(a, b) for _ in range(3)])
    naive = paired_difference([seed(a * 3, b * 3)])
    assert shared.difference == naive.difference == pytest.approx(1 / 6)
    assert (shared.problems, naive.problems) == (60, 180)
    ratio = (shared.high - shared.low) / (naive.high - naive.low)
    assert 1.5 < ratio < 2.0  # sqrt(3) = 1.73
    assert naive.p == mcnemar_exact(30, 60) < 0.01 < shared.p


def test_seeds_with_their_own_draws_resample_apart():
    """The same outcomes on three seeds' own problems: a seed drawn twice in a replicate brings its problems
    twice, so the interval lies between the pooled list's and the shared problems' (about sqrt(5/3) x the
    pooled list's: E[sum of squared seed counts] / 9 = 5/9 against 1/3)."""
    a = [1, 0, 0, 1, 0, 1] * 10
    b = [1, 1, 0, 1, 1, 0] * 10
    own = paired_difference([seed(a, b, f"s{s}-") for s in range(3)])
    naive = paired_difference([seed(a * 3, b * 3)])
    assert own.problems == 180
    assert (own.high - own.low) / (naive.high - naive.low) == pytest.approx(math.sqrt(5 / 3), rel=0.1)


def test_one_seed_keeps_the_exact_mcnemar_p_and_a_bootstrap_interval_of_the_right_width():
    # 100 problems: B alone right on 20, A alone on 10. The difference's standard error is
    # sqrt((0.2 + 0.1 - 0.1^2) / 100) = 0.0539, so the 95 % interval is about 0.1 +- 0.106.
    a = [0] * 20 + [1] * 10 + [1] * 30 + [0] * 40
    b = [1] * 20 + [0] * 10 + [1] * 30 + [0] * 40
    result = paired_difference([seed(a, b)])
    assert result.test == "exact McNemar" and result.p == mcnemar_exact(10, 20)
    assert result.difference == pytest.approx(0.1)
    half = 1.959964 * math.sqrt((0.3 - 0.01) / 100)
    assert (result.high - result.low) / 2 == pytest.approx(half, rel=0.1)


def test_deterministic_for_a_seed():
    a, b = [1, 0, 1, 0, 0, 1, 1] * 9, [1, 1, 0, 1, 0, 1, 1] * 9
    pairs = [seed(a, b), seed(b, a[::-1], "r")]
    assert paired_difference(pairs) == paired_difference(pairs)
    assert paired_difference(pairs, replicates=500, rng_seed=1) != paired_difference(pairs, replicates=500, rng_seed=2)


def test_bad_input():
    with pytest.raises(ValueError, match="at least one seed"):
        paired_difference([])
    with pytest.raises(ValueError, match="seed 1: need one id and two outcomes per problem"):
        paired_difference([seed([1], [0]), (["q"], [1], [0, 1])])
    with pytest.raises(ValueError, match="at least one problem"):
        paired_difference([([], [], [])])

"""The statistics of an ablation table, as small pure functions (no scipy: it is not a dependency).

An ablation compares accuracies measured on a few hundred problems and a few seeds, where the
differences that matter are a few points: every number in the table therefore comes with an
interval, and two cells are compared with a paired test on the same problems.

- `wilson_interval`: 95 % interval of one accuracy (successes out of n problems). Wilson rather than
  the normal approximation p +- 1.96 sqrt(p(1-p)/n) because that one collapses to a zero-width
  interval at 0/n and n/n, exactly the small-model, small-eval cases an ablation starts with.
- `mean_t_interval`: mean and 95 % Student-t interval across seeds: seed-to-seed variation
  (initialisation, data order) is a separate source of noise that the Wilson interval of one run
  does not see; with 3 seeds the t quantile (4.30) is what makes that interval honest.
- `mcnemar_exact`: two policies graded on the same problems are paired; only the problems one gets
  right and the other wrong (the discordant pairs) say which is better. Under "equally good" each
  discordant pair goes either way with probability 1/2, so the exact test is a two-sided binomial
  test on them; exact because the discordant counts of small evaluations are far too small for
  the chi-square approximation.
- `paired_difference`: B - A over several seeds. Pooling the seeds' outcomes into one McNemar test treats a
  problem that three seeds answered as three independent problems (it is one problem, met three times), and
  treats the three seeds as all the seeds there could be. The difference gets a hierarchical bootstrap
  instead: resample the seeds, then the problems, each problem keeping one weight for every seed that met
  it; that gives its 95 % interval and a p-value. One seed keeps the exact McNemar p.
- `constant_answer`: the control every table needs beside its rows: what a policy that ignores the
  question scores. On a Yes/No task that is the majority rate of these problems, not 50 %.
  `constant_answer_split` splits a policy's answers by it: how often it says that answer, and how
  many it gets right with another.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

Z_975 = 1.959963984540054
"""The standard normal's 0.975 quantile: two-sided 95 %."""

T_975 = (12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836, 2.446911851, 2.364624252,
         2.306004135, 2.262157163, 2.228138852, 2.200985160, 2.178812830, 2.160368656, 2.144786688,
         2.131449546, 2.119905299, 2.109815578, 2.100922040, 2.093024054, 2.085963447, 2.079613845,
         2.073873068, 2.068657610, 2.063898562, 2.059538553, 2.055529439, 2.051830516, 2.048407142,
         2.045229642, 2.042272456)
"""Student t 0.975 quantiles for 1..30 degrees of freedom (index df - 1), to 9 decimals: the standard
table values, checked against a root of the regularised incomplete beta function (mpmath, 30 digits)."""


def wilson_interval(successes: int, n: int, z: float = Z_975) -> tuple[float, float]:
    """Wilson score interval (default 95 %) for `successes` out of `n`; (lower, upper) within [0, 1].

    The interval inverts the score test, so it stays inside [0, 1] and keeps a positive width at
    0/n and n/n (0/10 -> [0, 0.278]), where the normal approximation claims certainty.
    """
    if n <= 0:
        raise ValueError("wilson_interval needs n > 0 problems")
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} not in [0, {n}]")
    p = successes / n
    z2 = z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact bounds, not 1 - 1e-16
    high = 1.0 if successes == n else min(1.0, centre + half)
    return low, high


def t_quantile_975(df: int) -> float:
    """Student t 0.975 quantile for `df` degrees of freedom (two-sided 95 %).

    df 1..30 come from the table `T_975`; above 30 the Cornish-Fisher expansion of t around the normal
    quantile to fourth order in 1/df (Abramowitz & Stegun 26.7.5), whose error there is below 4e-8.
    """
    if df < 1:
        raise ValueError("the t quantile needs df >= 1")
    if df <= len(T_975):
        return T_975[df - 1]
    z = Z_975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def mean_t_interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, lower, upper): the mean of `values` (one per seed) and its 95 % Student-t interval.

    With one value the spread across seeds is unknown, so the bounds are None, not a zero-width
    interval that would look like certainty.
    """
    n = len(values)
    if n == 0:
        raise ValueError("mean_t_interval needs at least one value")
    mean = math.fsum(values) / n
    if n == 1:
        return mean, None, None
    variance = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    half = t_quantile_975(n - 1) * math.sqrt(variance / n)
    return mean, mean - half, mean + half


def discordant_pairs(a: Sequence[int], b: Sequence[int]) -> tuple[int, int]:
    """(problems only `a` got right, problems only `b` got right) of two 0/1 vectors on the same problems."""
    if len(a) != len(b):
        raise ValueError(f"paired outcomes need the same problems: {len(a)} vs {len(b)} outcomes")
    only_a = sum(1 for x, y in zip(a, b) if x and not y)
    only_b = sum(1 for x, y in zip(a, b) if y and not x)
    return only_a, only_b


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: P(a binomial(n, 1/2) count is at least as
    far from n/2 as observed), n = only_a + only_b; 1.0 when there is no discordant pair.

    Computed in exact rationals, so large n neither underflows nor loses the tail (b=10, c=2 -> 0.0386).
    """
    if only_a < 0 or only_b < 0:
        raise ValueError("discordant counts must be >= 0")
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1))
    return float(min(Fraction(1), Fraction(2 * tail, 2**n)))


BOOTSTRAP_REPLICATES = 10_000
"""Replicates of `paired_difference`'s bootstrap: its smallest p is 2 / 10,001, and its interval's ends move by
well under a point between RNG seeds."""

SeedOutcomes = tuple[Sequence[Hashable], Sequence[int], Sequence[int]]
"""One seed's paired outcomes: (problem ids, 0/1 outcomes of A, 0/1 outcomes of B), one entry per problem."""


@dataclass(frozen=True)
class PairedDifference:
    """Accuracy of B minus accuracy of A on paired outcomes, pooled over seeds, with its 95 % interval."""

    difference: float  # pooled accuracy B - pooled accuracy A (every seed's problems counted once each)
    low: float
    high: float
    p: float           # two-sided, against "no difference"
    test: str          # "exact McNemar" (one seed) or "hierarchical bootstrap" (several)
    seeds: int
    pairs: int         # (seed, problem) pairs
    problems: int      # distinct problems among them
    only_a: int        # pairs A got right and B wrong
    only_b: int


def paired_difference(seeds: Sequence[SeedOutcomes], replicates: int = BOOTSTRAP_REPLICATES,
                      rng_seed: int = 0) -> PairedDifference:
    """B - A over `seeds`, each the outcomes of one seed of A and the same seed of B on the same problems.

    The interval is a percentile bootstrap that resamples what another experiment would draw anew: first the
    seeds (with replacement), then the problems. Problems are resampled by the Poisson bootstrap: each distinct
    problem id gets a Poisson(1) multiplicity, the number of times a resample with replacement of n problems
    takes one as n grows (Hanley & MacGibbon 2006). Unlike a resample of one fixed list, it is defined on any
    collection of problems: a problem that several seeds met keeps one weight for all of them (the clustering:
    a seed that saw the same 300 problems as another adds its training noise, not 300 new problems), while
    seeds with their own data draws resample their own problems, apart. A replicate whose drawn seeds get no
    problem at all (possible only with a handful of problems) is drawn again. The p-value is the bootstrap's,
    2 x the smaller share of replicates on either side of 0 (each count plus 1, so never 0), which keeps it
    consistent with the interval: p < 0.05 when the interval excludes 0. With one seed, it is the exact
    McNemar p of the discordant pairs instead: the exact test of that design, at any sample size.
    Deterministic for a given `rng_seed`.
    """
    if not seeds:
        raise ValueError("paired_difference needs at least one seed")
    ids: dict[Hashable, int] = {}
    entries = []  # (seed, problem index, outcome of B - outcome of A)
    for seed, (problems, a, b) in enumerate(seeds):
        if not len(problems) == len(a) == len(b) > 0:
            raise ValueError(f"seed {seed}: need one id and two outcomes per problem, at least one problem; got "
                             f"{len(problems)}, {len(a)}, {len(b)}")
        entries += [(seed, ids.setdefault(q, len(ids)), int(bool(y)) - int(bool(x))) for q, x, y in zip(problems, a, b)]
    diff = np.zeros((len(seeds), len(ids)))  # (S, U): summed B - A of seed s on problem u
    count = np.zeros((len(seeds), len(ids)))  # (S, U): how often seed s met problem u
    for seed, problem, d in entries:
        diff[seed, problem] += d
        count[seed, problem] += 1
    estimates = _bootstrap(diff, count, replicates, np.random.default_rng(rng_seed))
    low, high = np.quantile(estimates, [0.025, 0.975])
    only_a = sum(d < 0 for _, _, d in entries)
    only_b = sum(d > 0 for _, _, d in entries)
    if len(seeds) == 1:
        p, test = mcnemar_exact(only_a, only_b), "exact McNemar"
    else:
        tail = min(np.count_nonzero(estimates <= 0), np.count_nonzero(estimates >= 0)) + 1
        p, test = min(1.0, 2 * int(tail) / (replicates + 1)), "hierarchical bootstrap"
    return PairedDifference(float(diff.sum() / count.sum()), float(low), float(high), p, test, len(seeds),
                            len(entries), len(ids), only_a, only_b)


def _bootstrap(diff: np.ndarray, count: np.ndarray, replicates: int, rng: np.random.Generator,
               chunk: int = 2000) -> np.ndarray:
    """`replicates` resampled pooled differences (see `paired_difference`), `chunk` at a time to bound memory.

    Problems whose columns agree (the same B - A and count on every seed) enter every replicate alike, so they
    are drawn as one group whose total weight is Poisson(group size), a sum of independent Poisson(1)s: the
    same distribution, at a cost set by the number of distinct columns (at most 3^seeds), not of problems.
    """
    columns, sizes = np.unique(np.concatenate([diff, count]).T, axis=0, return_counts=True)  # (G, 2S), (G,)
    n_seeds = diff.shape[0]
    diff, count = columns[:, :n_seeds].T, columns[:, n_seeds:].T  # (S, G) each
    kept: list[np.ndarray] = []
    while (done := sum(len(k) for k in kept)) < replicates:
        size = min(chunk, replicates - done)
        drawn = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=size)  # (R, S): seeds drawn
        weights = rng.poisson(sizes, size=(size, len(sizes)))  # (R, G): each group's total multiplicity
        num = ((drawn @ diff) * weights).sum(axis=1)
        den = ((drawn @ count) * weights).sum(axis=1)
        kept.append(num[den > 0] / den[den > 0])
    return np.concatenate(kept)[:replicates]


def constant_answer(references: Mapping[Hashable, Sequence[str]]) -> tuple[str, dict[Hashable, list[int]]]:
    """The best answer that ignores the question, and its per-problem outcomes.

    `references`: the reference answers of each group of problems (one group per seed). The answer is the
    commonest reference over every group, chosen on these very problems, so no constant answer scores more;
    per group, 1 where giving it to every problem is right. Ties go to the reference seen first.
    """
    answer = Counter(ref for refs in references.values() for ref in refs).most_common(1)[0][0]
    return answer, {group: [int(ref == answer) for ref in refs] for group, refs in references.items()}


def constant_answer_split(answer: str, predictions: Sequence[str | None], correct: Sequence[int],
                          references: Sequence[str]) -> tuple[int, int]:
    """(problems answered with the constant `answer`, problems right whose reference is another answer).

    A policy can gain accuracy by saying the commonest answer more often, without reading a single problem;
    phase 2 does exactly that when the reward pays a base rate. Counted before and after, the first number
    shows that drift and the second the part of the accuracy the drift cannot make.
    """
    if not len(predictions) == len(correct) == len(references):
        raise ValueError(f"need one prediction, outcome and reference per problem, got {len(predictions)}, "
                         f"{len(correct)}, {len(references)}")
    said = sum(p == answer for p in predictions)
    return said, sum(bool(right) and ref != answer for right, ref in zip(correct, references))

"""How sure a difference of two AUCs on the same examples is: DeLong's method.

A pruning step compares a candidate model with the base model on one selection split. Both
score the same examples, so their AUCs are correlated and the standard error of their
difference is much smaller than either AUC's own: DeLong, DeLong and Clarke-Pearson (1988)
give it from the "structural components" of the two AUCs (per positive, the share of negatives
it outranks; per negative, the share of positives that outrank it), computed here with
midranks in O(n log n) (Sun and Xu, 2014). Pure numpy: no model, no process group.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from statistics import NormalDist
from typing import Sequence, Tuple

import numpy as np


def midranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks of `x`, ties sharing the mean of their ranks.

    Args:
        x: 1-D array.

    Returns:
        float64 ranks, in the order of `x`.
    """
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    n = len(x)
    ranks = np.empty(n, dtype=np.float64)
    # Runs of equal values get the mean of positions i..j (1-based).
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], n]
    mean_rank = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def structural_components(scores: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """DeLong's structural components of one classifier's AUC.

    Args:
        scores: [n] scores (higher: more likely positive).
        labels: [n] 0/1.

    Returns:
        (v10 [positives], v01 [negatives]): per positive, the share of negatives it outranks
        (ties count a half); per negative, the share of positives that outrank it. Their
        means are both the AUC.
    """
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels], scores[~labels]
    m, n = len(pos), len(neg)
    if m == 0 or n == 0:
        raise ValueError(f"AUC needs positives and negatives: got {m} positives, {n} negatives")
    all_ranks = midranks(np.concatenate([pos, neg]))
    v10 = (all_ranks[:m] - midranks(pos)) / n
    v01 = 1.0 - (all_ranks[m:] - midranks(neg)) / m
    return v10, v01


@dataclass(frozen=True)
class PairedAUC:
    """Two AUCs on the same examples and their difference `a - b` with DeLong's standard error."""

    auc_a: float
    auc_b: float
    difference: float
    standard_error: float

    def upper_bound(self, z: float) -> float:
        """The one-sided upper confidence bound of `b - a` (how much worse `a` may be) at
        normal quantile `z` (1.645 for 95%).

        Args:
            z: the standard normal quantile of the confidence.

        Returns:
            (AUC b - AUC a) + z x standard error.
        """
        return -self.difference + z * self.standard_error


def paired_auc(scores_a: Sequence[float], scores_b: Sequence[float], labels: Sequence[float]) -> PairedAUC:
    """AUC of two classifiers on the same examples and DeLong's standard error of their difference.

    Args:
        scores_a, scores_b: [n] scores of the two classifiers on the same examples.
        labels: [n] 0/1.

    Returns:
        `PairedAUC` (difference = AUC a - AUC b).

    Raises:
        ValueError: lengths differ, or one class is missing.
    """
    a, b, y = (np.asarray(v) for v in (scores_a, scores_b, labels))
    if not len(a) == len(b) == len(y):
        raise ValueError(f"paired_auc: scores_a, scores_b and labels differ in length ({len(a)}, {len(b)}, {len(y)})")
    va10, va01 = structural_components(a, y)
    vb10, vb01 = structural_components(b, y)
    m, n = len(va10), len(va01)
    d10, d01 = va10 - vb10, va01 - vb01
    # Var(AUC_a - AUC_b) = Var(d10) / m + Var(d01) / n, sample variances (DeLong's S matrices).
    var = (np.var(d10, ddof=1) if m > 1 else 0.0) / m + (np.var(d01, ddof=1) if n > 1 else 0.0) / n
    auc_a, auc_b = float(va10.mean()), float(vb10.mean())
    return PairedAUC(auc_a, auc_b, auc_a - auc_b, math.sqrt(max(var, 0.0)))


def auc_standard_error(scores: Sequence[float], labels: Sequence[float]) -> Tuple[float, float]:
    """One classifier's AUC and DeLong's standard error of it.

    Args:
        scores: [n] scores.
        labels: [n] 0/1.

    Returns:
        (AUC, standard error).
    """
    v10, v01 = structural_components(np.asarray(scores), np.asarray(labels))
    m, n = len(v10), len(v01)
    var = (np.var(v10, ddof=1) if m > 1 else 0.0) / m + (np.var(v01, ddof=1) if n > 1 else 0.0) / n
    return float(v10.mean()), math.sqrt(max(var, 0.0))


def spent_alpha(confidence: float, test_index: int) -> float:
    """The error rate test `test_index` (1-based) of a sequence may spend so that all of them
    together spend at most 1 - `confidence`: alpha / (k (k + 1)), which sums to alpha over
    k = 1, 2, ... (a Bonferroni split that needs no bound on the number of tests).

    Args:
        confidence: the confidence over the whole sequence, in (0, 1).
        test_index: the test's place in the sequence, from 1.

    Returns:
        The test's error rate, (1 - confidence) / (k (k + 1)).

    Raises:
        ValueError: a confidence outside (0, 1), or a test index below 1.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if test_index < 1:
        raise ValueError(f"test_index counts from 1, got {test_index}")
    return (1.0 - confidence) / (test_index * (test_index + 1))


@dataclass(frozen=True)
class DropTest:
    """One step of the noise-aware stop: is the candidate's AUC drop below the base model's
    within `max_drop`, with the stated confidence over the whole sequence of steps?"""

    drop: float  # base AUC - candidate AUC on the selection split
    standard_error: float  # DeLong's, of that paired difference
    z: float  # the normal quantile this test uses (1 - its error rate)
    upper_bound: float  # drop + z * standard_error
    max_drop: float
    accepted: bool  # upper_bound <= max_drop


def drop_test(paired: PairedAUC, max_drop: float, confidence: float, test_index: int) -> DropTest:
    """Accept a candidate only when the one-sided upper confidence bound of its AUC drop is
    within `max_drop`, each test of the sequence at its share of the error rate
    (`spent_alpha`): with 18 looks at a noisy split, a point estimate within the bound is
    accepted by luck; the bound is not, at rate at most 1 - confidence over all looks.

    Args:
        paired: `paired_auc(candidate, base, labels)` on the selection split.
        max_drop: the largest AUC drop to accept (absolute AUC).
        confidence: the confidence over the whole sequence (0.95: at most 5% of sequences
            accept some step whose true drop exceeds `max_drop`).
        test_index: this test's place in the sequence, from 1.

    Returns:
        `DropTest`.
    """
    return bound_test(paired, max_drop, spent_alpha(confidence, test_index))


def bound_test(paired: PairedAUC, max_drop: float, alpha: float) -> DropTest:
    """The stop test at error rate `alpha`: accept when the one-sided upper confidence bound of
    the candidate's AUC drop, at 1 - alpha, is within `max_drop`.

    Args:
        paired: `paired_auc(candidate, base, labels)` on the candidate's split.
        max_drop: the largest AUC drop to accept (absolute AUC).
        alpha: the test's error rate, in (0, 1).

    Returns:
        `DropTest`.

    Raises:
        ValueError: an error rate outside (0, 1).
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    z = NormalDist().inv_cdf(1.0 - alpha)
    upper = paired.upper_bound(z)
    return DropTest(-paired.difference, paired.standard_error, z, upper, max_drop, upper <= max_drop)


def drop_p_value(paired: PairedAUC, max_drop: float) -> float:
    """The one-sided p-value of "the true drop exceeds `max_drop`" (normal, DeLong's standard
    error): `bound_test` accepts at error rate alpha when it is at most alpha.

    Args:
        paired: `paired_auc(candidate, base, labels)`.
        max_drop: the bound.

    Returns:
        The p-value in [0, 1] (0 or 1 when the standard error is 0).
    """
    drop = -paired.difference
    if paired.standard_error <= 0.0:
        return 0.0 if drop <= max_drop else 1.0
    return 1.0 - NormalDist().cdf((max_drop - drop) / paired.standard_error)

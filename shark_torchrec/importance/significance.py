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
        normal quantile `z` (1.645 for 95%)."""
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

"""DeLong's paired AUC difference against a brute-force reference (every positive against
every negative, the covariance written out as in DeLong et al. 1988)."""

import itertools

import numpy as np
import pytest

from shark_torchrec.importance.significance import midranks, paired_auc


def brute_force(a, b, y):
    """AUCs and the standard error of their difference from the definition."""
    pos = [i for i in range(len(y)) if y[i]]
    neg = [i for i in range(len(y)) if not y[i]]

    def psi(x, z):
        return 1.0 if x > z else 0.5 if x == z else 0.0

    comps = []
    for s in (a, b):
        v10 = [sum(psi(s[i], s[j]) for j in neg) / len(neg) for i in pos]
        v01 = [sum(psi(s[i], s[j]) for i in pos) / len(pos) for j in neg]
        comps.append((v10, v01))
    auc = [sum(v10) / len(v10) for v10, _ in comps]

    def cov(u, v):
        mu, mv = sum(u) / len(u), sum(v) / len(v)
        return sum((x - mu) * (z - mv) for x, z in zip(u, v)) / (len(u) - 1)

    (a10, a01), (b10, b01) = comps
    s10 = cov(a10, a10) + cov(b10, b10) - 2 * cov(a10, b10)
    s01 = cov(a01, a01) + cov(b01, b01) - 2 * cov(a01, b01)
    return auc[0], auc[1], (s10 / len(pos) + s01 / len(neg)) ** 0.5


@pytest.mark.parametrize("seed, n, ties", [(0, 40, False), (1, 60, True), (2, 25, True)])
def test_paired_auc_matches_the_definition(seed, n, ties):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.4).astype(int)
    y[:2] = [0, 1]
    a = y * 0.8 + rng.normal(size=n)
    b = a + rng.normal(scale=0.7, size=n)
    if ties:  # coarse scores: many ties within and across classes
        a, b = np.round(a * 2) / 2, np.round(b * 2) / 2
    got = paired_auc(a, b, y)
    auc_a, auc_b, se = brute_force(a.tolist(), b.tolist(), y.tolist())
    assert got.auc_a == pytest.approx(auc_a, abs=1e-12) and got.auc_b == pytest.approx(auc_b, abs=1e-12)
    assert got.difference == pytest.approx(auc_a - auc_b, abs=1e-12)
    assert got.standard_error == pytest.approx(se, rel=1e-9)
    assert got.upper_bound(1.645) == pytest.approx(auc_b - auc_a + 1.645 * se)


def test_midranks_share_ties_and_errors_name_the_problem():
    assert midranks(np.array([3.0, 1.0, 3.0, 2.0])).tolist() == [3.5, 1.0, 3.5, 2.0]
    for perm in itertools.permutations([0.1, 0.1, 0.2]):
        r = midranks(np.array(perm))
        assert sorted(r.tolist()) == [1.5, 1.5, 3.0]
    with pytest.raises(ValueError, match="positives and negatives"):
        paired_auc([0.1, 0.2], [0.2, 0.1], [1, 1])
    with pytest.raises(ValueError, match="differ in length"):
        paired_auc([0.1, 0.2], [0.2], [1, 0])

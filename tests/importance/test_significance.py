"""DeLong's paired AUC difference against a brute-force reference (every positive against
every negative, the covariance written out as in DeLong et al. 1988)."""

import itertools

import numpy as np
import pytest

from shark_torchrec.importance.significance import auc_standard_error, drop_test, midranks, paired_auc, spent_alpha


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


def test_one_auc_standard_error_matches_the_definition():
    rng = np.random.default_rng(3)
    y = (rng.random(50) < 0.3).astype(int)
    y[:2] = [0, 1]
    a = np.round(y * 0.8 + rng.normal(size=50), 1)
    # One AUC's variance is the paired one's with a classifier that carries no variance of its own.
    flat = np.zeros(50)
    auc, se = auc_standard_error(a, y)
    auc_a, _, se_pair = brute_force(a.tolist(), flat.tolist(), y.tolist())
    assert auc == pytest.approx(auc_a, abs=1e-12) and se == pytest.approx(se_pair, rel=1e-9)


def test_the_error_rate_is_spent_over_the_sequence_of_tests():
    shares = [spent_alpha(0.95, k) for k in range(1, 10_000)]
    assert sum(shares) <= 0.05 and sum(shares) > 0.0499
    assert shares == sorted(shares, reverse=True)  # later looks are stricter
    for bad in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="confidence"):
            spent_alpha(bad, 1)
    with pytest.raises(ValueError, match="test_index"):
        spent_alpha(0.95, 0)


def planted_steps(seed, n=500, steps=8, loss_per_step=0.01):
    """A base model and a sequence of pruned candidates on a small dev split (n rows): the
    candidate of step k has lost k * loss_per_step of the base model's separation of the
    classes and adds noise of its own (fine-tuning on a fresh sample), so its true AUC drop
    grows with k from about 0.0065 at step 1 (measured on 200,000 rows)."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.5).astype(int)
    signal = rng.normal(size=n)
    base = 1.2 * y + signal
    cands = [(1.2 - loss_per_step * k) * y + signal + rng.normal(scale=0.2, size=n) for k in range(1, steps + 1)]
    return y, base, cands


def first_rejected(y, base, cands, accept):
    for k, c in enumerate(cands, start=1):
        if not accept(k, paired_auc(c, base, y)):
            return k
    return len(cands) + 1


def test_a_noisy_dev_split_fools_the_point_rule_but_not_the_drop_test():
    """The planted sequence's every step truly drops AUC by more than the bound 0.005 (the
    first by about 0.0065), so any accepted step is a wrong decision. The point rule (dev
    drop <= bound: the old loop's) accepts a step in many runs: the paired difference's noise
    (SE about 0.0044 on 500 rows) lets a lucky candidate pass. The drop test accepts a
    step in at most 5% of runs (its confidence), and the spread of its decisions is noise,
    not a rule that never accepts (with a loose bound it accepts)."""
    bound, runs = 0.005, 200
    point_wrong = test_wrong = 0
    for seed in range(runs):
        y, base, cands = planted_steps(seed)
        point_wrong += first_rejected(y, base, cands, lambda k, p: -p.difference <= bound) > 1
        test_wrong += first_rejected(y, base, cands, lambda k, p: drop_test(p, bound, 0.95, k).accepted) > 1
    assert point_wrong / runs > 0.2, point_wrong
    assert test_wrong / runs <= 0.05, test_wrong
    y, base, cands = planted_steps(0)
    assert drop_test(paired_auc(cands[0], base, y), 0.2, 0.95, 1).accepted
    d = drop_test(paired_auc(cands[0], base, y), bound, 0.95, 3)
    assert d.upper_bound == pytest.approx(d.drop + d.z * d.standard_error) and d.z > 2.3  # step 3 spends 0.05 / 12


def test_the_served_model_is_the_smallest_accepted_after_a_gatekeeper_and_holm():
    """`choose_served` tests the first candidate at the whole error rate (a failure serves
    nothing), then the others by Holm's step-down (smallest p-value at alpha / k first; a failure
    ends it), and serves the accepted one with the fewest bytes (ties: ours, then int8). Over
    simulated choices whose every candidate sits exactly at the bound, it serves one at most at
    the error rate; testing every candidate at the whole rate and taking the smallest accepted
    would serve one about three times as often."""
    import numpy as np

    from shark_torchrec.importance.significance import PairedAUC, bound_test, drop_p_value
    from shark_torchrec.jobs.easy_path import TEST_ORDER, choose_served

    def drop(d, se):
        return PairedAUC(0.9 - d, 0.9, -d, se)

    good, bad = drop(0.0, 0.0001), drop(0.004, 0.001)
    assert TEST_ORDER == ("torchrec-int8", "torchrec-int4", "final")
    # All pass: the fewest bytes is served, whether ours or int4.
    cands = [("torchrec-int8", 500, good), ("torchrec-int4", 250, good), ("final", 100, good)]
    chosen, tests = choose_served(cands, 0.002, 0.95)
    assert chosen == "final" and list(tests) == ["torchrec-int8", "torchrec-int4", "final"]
    assert choose_served(cands[:2] + [("final", 300, good)], 0.002, 0.95)[0] == "torchrec-int4"
    # int4 fails: ours is still tested and served (neither of the two blocks the other).
    chosen, tests = choose_served([cands[0], ("torchrec-int4", 250, bad), ("final", 100, good)], 0.002, 0.95)
    assert chosen == "final" and list(tests) == ["torchrec-int8", "final", "torchrec-int4"]
    assert tests["final"].z == pytest.approx(1.95996, abs=1e-4)  # first of two: alpha / 2
    assert tests["torchrec-int4"].z == pytest.approx(1.64485, abs=1e-4) and not tests["torchrec-int4"].accepted
    # The gatekeeper fails: nothing else is tested, nothing served.
    chosen, tests = choose_served([("torchrec-int8", 500, bad), ("final", 100, good)], 0.002, 0.95)
    assert chosen is None and list(tests) == ["torchrec-int8"]
    # Holm's rates: a drop that passes at alpha but not alpha / 2 passes when tested second,
    # after the other passed, and fails when tested first, and then so does the other.
    near = drop(0.0, 0.0011)  # 1.645 * SE = 0.0018 passes; 1.96 * SE = 0.0022 does not
    assert bound_test(near, 0.002, 0.05).accepted and not bound_test(near, 0.002, 0.025).accepted
    chosen, tests = choose_served([cands[0], ("torchrec-int4", 250, near), ("final", 100, good)], 0.002, 0.95)
    assert chosen == "final" and tests["torchrec-int4"].accepted and list(tests)[1] == "final"
    worse = drop(0.0015, 0.001)  # p = 0.31: tested after `near`
    assert drop_p_value(worse, 0.002) > drop_p_value(near, 0.002)
    chosen, tests = choose_served([cands[0], ("torchrec-int4", 250, near), ("final", 100, worse)], 0.002, 0.95)
    assert chosen == "torchrec-int8" and not tests["torchrec-int4"].accepted and not tests["final"].accepted
    # Ours alone: one test at the whole rate.
    chosen, tests = choose_served([("final", 300, near)], 0.002, 0.95)
    assert chosen == "final" and tests["final"].z == pytest.approx(1.64485, abs=1e-4)
    # Ties in bytes: ours, then int8.
    tie = [("torchrec-int8", 250, good), ("torchrec-int4", 250, good), ("final", 250, good)]
    assert choose_served(tie, 0.002, 0.95)[0] == "final"
    assert choose_served(tie[:2], 0.002, 0.95)[0] == "torchrec-int8"

    # Every candidate exactly at the bound (true drop 0.002), estimates with SE 0.001.
    rng = np.random.default_rng(0)
    runs, se = 20_000, 0.001
    served = served_any = 0
    for est in rng.normal(0.002, se, size=(runs, 3)):
        cands = [(name, nbytes, drop(d, se)) for (name, nbytes), d in zip([("a", 3), ("b", 2), ("c", 1)], est)]
        served += choose_served(cands, 0.002, 0.95)[0] is not None
        served_any += any(bound_test(p, 0.002, 0.05).accepted for _, _, p in cands)
    assert served / runs < 0.056 and served_any / runs > 0.12

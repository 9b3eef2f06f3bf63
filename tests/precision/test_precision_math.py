"""The pure math of F-Quantization: quantization, stochastic rounding, priorities, budgets."""

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.precision.labels import split_tagged, tag_labels
from shark_torchrec.precision.priority import (
    FP16,
    FP32,
    INT8,
    NO_CUT,
    ROW_MAP_BYTES,
    BudgetError,
    budget_counts,
    decay_factors,
    decay_table,
    decayed,
    groups_by_cuts,
    groups_by_threshold,
    kth_largest_cuts,
    ranking_keys,
    row_bytes,
    updated,
)
from shark_torchrec.precision.quantize import (
    dequantize_rows,
    dequantize_rows_int8,
    fitted_scale_bias,
    quantize_rows,
    quantize_rows_int8,
    requantize_with,
    round_fp16_stochastic,
    rounding_noise,
)


def noise_for(step, n, d, table=7):
    return rounding_noise(3, step, table, torch.arange(n), torch.arange(d))


def test_int8_rows_error_bounds_and_edge_cases():
    g = torch.Generator().manual_seed(0)
    rows = torch.cat(
        [
            torch.randn(50, 16, generator=g) * 0.01,
            torch.randn(50, 16, generator=g) * 100,
            torch.zeros(1, 16),  # all-zero row
            torch.full((1, 16), 3.0),  # constant row
            torch.tensor([[1e30, -1e30] + [0.0] * 14]),  # beyond fp16
        ]
    )
    for noise in (None, noise_for(0, len(rows), 16)):
        codes, sb = quantize_rows_int8(rows, noise)
        back = dequantize_rows_int8(codes, sb)
        assert torch.isfinite(back).all() and torch.isfinite(sb.float()).all()
        scale = sb[:, 0].float()
        clamped = rows.clamp(-65504, 65504)
        err = (back - clamped).abs().max(dim=1).values
        # Nearest: half a step; stochastic: under one step (plus fp32 arithmetic).
        bound = scale * (0.5 if noise is None else 1.0) + 1e-6 * clamped.abs().max(dim=1).values + 1e-7
        assert (err[:-1] <= bound[:-1]).all(), err[:-1] - bound[:-1]
        assert back[100].abs().max() == 0 and (back[101] == 3.0).all()
    # Restoring from saved values and scale/bias gives the same codes.
    codes, sb = quantize_rows_int8(rows[:100], noise_for(1, 100, 16))
    assert torch.equal(requantize_with(dequantize_rows_int8(codes, sb), sb), codes)


def test_rounding_noise_is_a_deterministic_function():
    a = rounding_noise(1, 5, 9, torch.tensor([3, 4, 1 << 40]), torch.arange(8))
    b = rounding_noise(1, 5, 9, torch.tensor([3, 4, 1 << 40]), torch.arange(8))
    c = rounding_noise(1, 6, 9, torch.tensor([3, 4, 1 << 40]), torch.arange(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.min() >= 0 and a.max() < 1
    big = rounding_noise(0, 0, 0, torch.arange(20000), torch.arange(16))
    assert abs(big.mean().item() - 0.5) < 0.01
    # A row's noise does not depend on which other rows are rounded with it.
    assert torch.equal(a[1], rounding_noise(1, 5, 9, torch.tensor([4]), torch.arange(8))[0])


def test_fp16_stochastic_rounding_keeps_tiny_updates():
    """1000 updates of -1e-4 from 1.0 (a fifth of an fp16 step): round-to-nearest loses them
    all, stochastic rounding moves the values as fp32 would, on average."""
    n, steps, delta = 512, 1000, -1e-4
    sr = torch.ones(n, 1, dtype=torch.float16)
    nearest = torch.ones(n, 1, dtype=torch.float16)
    for s in range(steps):
        sr = round_fp16_stochastic(sr.float() + delta, noise_for(s, n, 1))
        nearest = (nearest.float() + delta).half()
    assert (nearest == 1.0).all()
    assert abs(sr.float().mean().item() - (1.0 + steps * delta)) < 0.003


def test_int8_stochastic_rounding_is_unbiased():
    n, steps, delta = 256, 1000, -1e-4
    base = torch.linspace(-1, 1, 16).repeat(n, 1)
    rows_sr = base.clone()
    rows_nearest = base.clone()
    for s in range(steps):
        upd = torch.zeros_like(base)
        upd[:, 5] = delta
        c, sb = quantize_rows_int8(rows_sr + upd, noise_for(s, n, 16))
        rows_sr = dequantize_rows_int8(c, sb)
        c, sb = quantize_rows_int8(rows_nearest + upd)
        rows_nearest = dequantize_rows_int8(c, sb)
    want = base[0, 5] + steps * delta
    assert abs(rows_sr[:, 5].mean().item() - want) < 0.03
    assert abs(rows_nearest[:, 5].mean().item() - want) > 0.09  # stuck: the update vanished


def test_lazy_decay_equals_eager_updates():
    alpha, beta = 2.0, 0.3
    present = [0, 3, 4, 9]
    pos = {0: 1.0, 3: 0.0, 4: 2.0, 9: 1.0}
    neg = {0: 2.0, 3: 1.0, 4: 0.0, 9: 0.0}
    eager = 0.0
    for step in range(12):
        x = alpha * pos.get(step, 0) + neg.get(step, 0)
        eager = (1 - beta) * eager + beta * x
    score, last = torch.zeros(1), torch.zeros(1, dtype=torch.int32)
    for step in present:
        score = updated(score, last, step, torch.tensor([pos[step]]), torch.tensor([neg[step]]), alpha, beta)
        last = torch.tensor([step], dtype=torch.int32)
    assert abs(decayed(score, last, 11, beta).item() - eager) < 1e-6


def test_a_decay_factor_depends_on_the_steps_alone():
    """A row decays by the same factor wherever it sits in the tensor and whatever the thread
    count: torch's pow, called on the whole tensor, rounds the elements of its loop's scalar
    tail (the last elements, and the end of every thread's share) apart from the rest, for beta
    0.99 at k = 19. The factor is the vectorized loop's (a block of 64 has no tail), and the
    table ends at its first 0, which stands for every later k."""
    beta = 0.99
    base = torch.tensor(1.0 - beta)
    vectorized = torch.pow(base, torch.full((64,), 19.0))[0]
    assert vectorized != torch.pow(base, torch.full((1,), 19.0))[0]  # the case this test is about
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            for n in (1, 33, 70_001):
                steps = torch.full((n,), 19, dtype=torch.int32)
                assert torch.equal(decay_factors(beta, steps), vectorized.expand(n)), (n_threads, n)
                got = decayed(torch.ones(n), torch.full((n,), 1, dtype=torch.int32), 20, beta)
                assert torch.equal(got, vectorized.expand(n)), (n_threads, n)
    finally:
        torch.set_num_threads(threads)
    table = decay_table(beta, 10**6)
    assert len(table) < 64 and table[-1] == 0 and bool((table[:-1] > 0).all())
    assert bool((table[1:] <= table[:-1]).all())
    assert decay_factors(beta, torch.tensor([10**6])).item() == 0.0
    slow = decay_table(1e-3, 40_000)  # grown past one block
    assert len(slow) > 40_000 and torch.equal(slow[:64], torch.pow(torch.tensor(1 - 1e-3), torch.arange(64.0)))
    assert decay_table(1.0, 5).tolist() == [1.0, 0.0]
    # float32 whatever torch's default dtype; a device's copy follows the table as it grows.
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(torch.float64)
        assert decay_table(0.25, 3).dtype == torch.float32
    finally:
        torch.set_default_dtype(default)
    assert decayed(torch.ones(2), torch.zeros(2, dtype=torch.int32), 3, 0.25).dtype == torch.float32
    meta = decay_table(2e-3, 100, torch.device("meta"))
    assert meta.device.type == "meta" and len(meta) == len(decay_table(2e-3, 100))
    assert len(decay_table(2e-3, 20_000, torch.device("meta"))) == len(decay_table(2e-3, 0)) > 20_000


def test_budget_counts_fit_and_refuse_impossible_budgets():
    for dim in (16, 64):
        for budget in (0.35, 0.5, 0.8):
            try:
                c = budget_counts(10_000, dim, budget, 0.02)
            except BudgetError:
                assert dim == 16 and budget == 0.35  # int8 + row map alone is 0.375 at dim 16
                continue
            used = sum(n * row_bytes(dim, g) for g, n in enumerate(c.as_tuple())) + 10_000 * ROW_MAP_BYTES
            assert used <= budget * 10_000 * dim * 4
            assert sum(c.as_tuple()) == 10_000 and c.fp32 <= 200
    c35 = budget_counts(10_000, 64, 0.35, 0.02)
    assert c35.int8 > 0 and c35.fp16 > 0 and c35.fp32 > 0


def test_thresholds_and_cuts():
    s = torch.tensor([0.0, 5.0, 50.0, 500.0])
    assert groups_by_threshold(s, 10, 100).tolist() == [INT8, INT8, FP16, FP32]
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(1000, generator=g).round(decimals=1)  # many ties
    rows = torch.randperm(1000, generator=g)
    keys = ranking_keys(scores, rows)
    assert len(set(keys.tolist())) == 1000
    shards = [torch.sort(keys[:600]).values, torch.sort(keys[600:]).values]

    def count(cuts):
        return sum(len(sk) - torch.searchsorted(sk, cuts) for sk in shards)

    cuts = kth_largest_cuts(count, torch.tensor([37, 400, 0]))
    groups = groups_by_cuts(keys, cuts[:2])
    assert [(groups == k).sum().item() for k in (FP32, FP16, INT8)] == [37, 363, 600]
    assert cuts[2] == NO_CUT
    # Monotone: a higher score never gets a less precise group.
    assert scores[groups == FP32].min() >= scores[groups == FP16].max()
    assert scores[groups == FP16].min() >= scores[groups == INT8].max()
    # Ties go to the lower row id.
    tied = (scores == scores[keys == cuts[1]]).nonzero().flatten()
    fp16_tied = rows[tied][groups[tied] == FP16]
    int8_tied = rows[tied][groups[tied] == INT8]
    if len(fp16_tied) and len(int8_tied):
        assert fp16_tied.max() < int8_tied.min()


def test_labels_travel_in_the_weights():
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"], values=torch.arange(5), lengths=torch.tensor([1, 2, 0, 2], dtype=torch.int32)
    )
    labels = torch.tensor([1.0, 0.0])
    w, lab = split_tagged(tag_labels(kjt, labels).weights())
    assert lab.tolist() == [1, 0, 0, 0, 0] and (w == 1.0).all()
    weighted = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"],
        values=torch.arange(5),
        lengths=torch.tensor([1, 2, 0, 2], dtype=torch.int32),
        weights=torch.tensor([0.5, 2.0, 3.0, -1.5, 7.25]),
    )
    w, lab = split_tagged(tag_labels(weighted, torch.tensor([0.0, 1.0])).weights())
    assert lab.tolist() == [0, 1, 1, 1, 1]
    assert torch.allclose(w, weighted.weights(), rtol=1e-6)


def test_low_bit_rows_error_bounds_and_unbiased_rounding():
    """Int4 and int2 follow the int8 rules with 15 and 3 levels: within half a step to nearest,
    under a step stochastically, and stochastic rounding is unbiased: averaged over many noise
    draws a row comes back as it was, where rounding to nearest stays off by up to half a step."""
    from shark_torchrec.precision.quantize import dequantize_rows, levels, quantize_rows

    g = torch.Generator().manual_seed(0)
    rows = torch.randn(64, 16, generator=g)
    width = rows.max(dim=1).values - rows.min(dim=1).values
    for bits in (4, 2):
        top = levels(bits)
        for noise, half in ((None, 0.5), (noise_for(0, 64, 16), 1.0)):
            codes, sb = quantize_rows(rows, bits, noise)
            assert int(codes.max()) <= top
            err = (dequantize_rows(codes, sb) - rows).abs().max(dim=1).values
            assert (err <= sb[:, 0].float() * half + 1e-6).all(), bits
            assert (sb[:, 0].float() <= width / top * 1.01 + 1e-6).all()
        scale = quantize_rows(rows, bits)[1][:, :1].float()
        draws = 400
        mean = sum(dequantize_rows(*quantize_rows(rows, bits, noise_for(s, 64, 16))) for s in range(draws)) / draws
        # Each draw is off by at most one step, so the mean of 400 is within 4 sigma < 0.1 step.
        assert ((mean - rows).abs() <= 0.1 * scale + 1e-6).all(), bits
        nearest = dequantize_rows(*quantize_rows(rows, bits))
        assert ((nearest - rows).abs() > 0.2 * scale).float().mean() > 0.3  # to nearest: biased


def test_packed_codes_are_what_fbgemm_reads():
    """Our packing of int4/int2 rows, looked up through FBGEMM's INT4/INT2 inference TBE, gives
    the values we dequantize."""
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import IntNBitTableBatchedEmbeddingBagsCodegen

    from shark_torchrec.precision.quantize import dequantize_rows, pack_codes, quantize_rows, unpack_codes

    rows = torch.randn(6, 16, generator=torch.Generator().manual_seed(1))
    for bits, ty in ((4, SparseType.INT4), (2, SparseType.INT2), (8, SparseType.INT8)):
        codes, sb = quantize_rows(rows, bits, noise_for(2, 6, 16))
        packed = pack_codes(codes, bits)
        assert packed.shape == (6, 16 * bits // 8) and torch.equal(unpack_codes(packed, bits), codes)
        tbe = IntNBitTableBatchedEmbeddingBagsCodegen(
            [("t", 6, 16, ty, EmbeddingLocation.HOST)],
            device="cpu",
            pooling_mode=PoolingMode.NONE,
            row_alignment=1,
            output_dtype=SparseType.FP32,
        )
        tbe.fill_random_weights()
        w, scale_bias = tbe.split_embedding_weights()[0]
        w.copy_(packed)
        scale_bias.copy_(sb.contiguous().view(torch.uint8))
        got = tbe(torch.arange(6, dtype=torch.int32), torch.arange(7, dtype=torch.int32)).float()
        torch.testing.assert_close(got, dequantize_rows(codes, sb), rtol=0, atol=1e-6)


def test_fitted_scale_bias_never_rounds_worse_than_the_min_max_range():
    """Per row, the least-squares range quantizes with at most the min/max range's squared
    error (int8, int4, int2), about half of it for int2 on Gaussian rows; codes stay in range
    and an all-equal row stays exact."""
    rows = torch.randn(500, 64, generator=torch.Generator().manual_seed(0))
    rows[:5] = 3.0  # all-equal rows
    for bits in (8, 4, 2):
        codes, sb = quantize_rows(rows, bits)
        plain = ((dequantize_rows(codes, sb) - rows) ** 2).sum(dim=1)
        fsb = fitted_scale_bias(rows, bits)
        fcodes = requantize_with(rows, fsb, bits)
        assert int(fcodes.max()) <= (1 << bits) - 1
        fitted = ((dequantize_rows(fcodes, fsb) - rows) ** 2).sum(dim=1)
        assert bool((fitted <= plain + 1e-6).all()), bits
        assert float(fitted[:5].max()) == 0.0
        if bits == 2:
            assert float(fitted.sum()) < 0.6 * float(plain.sum())


def test_the_one_bit_tier_takes_the_rows_the_tiers_above_cannot_hold():
    """`one_bit_tier_counts`: the dropped tier's rule with 1-bit rows in its place: a head in the
    most precise tier (at most the head fraction of rows, half the spare bytes), then as many
    rows as fit in the tier above int1, the rest int1; None when every row fits above int1;
    a budget below all rows in 1 bit refused; more bytes never fewer rows above int1."""
    from shark_torchrec.precision.priority import INT1, INT2, INT4, INT8, BudgetError, one_bit_tier_counts

    cost = {INT8: 68, INT4: 36, INT2: 20, INT1: 12}
    tiers = [INT4, INT2, INT1]
    assert one_bit_tier_counts(100, 100 * 12 + 200, cost, tiers, 0.02) == {INT4: 2, INT2: 19, INT1: 79}
    # The head is capped by half the spare bytes: 100 // 24 = 4 rows of a 10% head.
    assert one_bit_tier_counts(100, 100 * 12 + 200, cost, tiers, 0.10) == {INT4: 4, INT2: 13, INT1: 83}
    # A tier between the head's and the one above int1 gets none, as with dropped rows.
    assert one_bit_tier_counts(100, 100 * 12 + 200, cost, [INT8, INT4, INT2, INT1], 0.02)[INT4] == 0
    assert one_bit_tier_counts(100, 100 * 12 + 200, cost, [INT2, INT1], 0.02) == {INT2: 25, INT1: 75}
    assert one_bit_tier_counts(100, 100 * 20 + 100, cost, tiers, 0.02) is None  # all fit in int4/int2
    assert one_bit_tier_counts(100, 1200, cost, [INT1], 0.02) == {INT1: 100}
    with pytest.raises(BudgetError, match="every row in 1 bit takes 1200 bytes, the budget leaves 1199"):
        one_bit_tier_counts(100, 1199, cost, tiers, 0.02)
    with pytest.raises(ValueError, match="the last tier must be int1"):
        one_bit_tier_counts(100, 5000, cost, [INT4, INT2], 0.02)
    above = [
        sum(v for g, v in one_bit_tier_counts(1000, 12000 + b, cost, tiers, 0.02).items() if g != INT1)
        for b in range(0, 7900, 50)
    ]
    assert above == sorted(above) and above[0] == 0 and above[-1] > 900


def test_the_rule_one_tier_up_and_tier_sets_whose_rows_do_not_shrink():
    """With `cheapest=` the same rule plans a set whose least precise tier is not int1 (the
    export's fallback for symmetric tiers when every row fits above int1): as many rows as fit in
    the tier above it, the rest in it, its floor refused by name. A served set with int1 whose
    less precise tier's row is no smaller than a more precise one's is refused, naming both."""
    from shark_torchrec.precision.priority import (
        INT1,
        INT2,
        INT2S,
        INT4S,
        BudgetError,
        check_served_tiers,
        one_bit_tier_counts,
        row_bytes,
    )

    cost = {INT4S: 9, INT2S: 5, INT1: 3}
    assert one_bit_tier_counts(100, 100 * 5 + 40, cost, [INT4S, INT2S], 0.02, cheapest=INT2S) == {INT4S: 10, INT2S: 90}
    assert one_bit_tier_counts(100, 100 * 9, cost, [INT4S, INT2S], 0.02, cheapest=INT2S) is None
    with pytest.raises(BudgetError, match="every row in int2s takes 500 bytes, the budget leaves 499"):
        one_bit_tier_counts(100, 499, cost, [INT4S, INT2S], 0.02, cheapest=INT2S)
    with pytest.raises(ValueError, match="the last tier must be int2s"):
        one_bit_tier_counts(100, 900, cost, [INT4S, INT2S, INT1], 0.02, cheapest=INT2S)
    assert row_bytes(8, INT4S) < row_bytes(8, INT2)  # 5 and 6 bytes at dim 8
    with pytest.raises(ValueError, match=r"at dim 8 a int2 row \(6 bytes\) is no smaller than a int4s row \(5\)"):
        check_served_tiers(("int4s", "int2", "int1"), 8)
    check_served_tiers(("int4s", "int2", "int1"), 16)  # 9 and 8 bytes: served
    check_served_tiers(("int4s", "int2s", "int1"), 8)  # 5, 3 and 2 bytes


def test_ranked_rows_break_ties_by_table_name_then_row():
    """Rows of equal score go to the table first by name (not first in the layout), then the
    lower row: the order the export's 1-bit plan and the store's model budget both rely on."""
    from shark_torchrec.precision.priority import ranked_rows

    # Tables laid out b (3 rows) then a (2 rows): positions 0-2 are b's rows, 3-4 a's.
    assert ranked_rows(torch.tensor([1.0, 2.0, 1.0, 1.0, 2.0]), ["b", "a"], [3, 2]).tolist() == [4, 1, 3, 0, 2]
    assert ranked_rows(torch.zeros(5), ["b", "a"], [3, 2]).tolist() == [3, 4, 0, 1, 2]
    assert ranked_rows(torch.zeros(0), [], []).tolist() == []


def test_one_bit_magnitude_codes_are_the_nearest_byte():
    """A 1-bit row's magnitude is kept as the nearest of the byte's 256 values (the lower on a
    tie): 0 for 0, the largest for anything above it, and within 4.53% (half an eighth of an
    octave) between."""
    from shark_torchrec.precision.quantize import ONE_BIT_MAGNITUDES, magnitude_codes, sign_magnitude_rows

    gen = torch.Generator().manual_seed(0)
    m = torch.cat(
        [torch.tensor([0.0, 1e-30, 3e-8, 1.0, 234.0, 1e6]), 10 ** torch.empty(5000).uniform_(-7, 2.3, generator=gen)]
    )
    codes = magnitude_codes(m)
    nearest = (ONE_BIT_MAGNITUDES[None, :] - m.clamp(max=float(ONE_BIT_MAGNITUDES[-1]))[:, None]).abs().argmin(1)
    assert codes.dtype == torch.uint8 and torch.equal(codes.long(), nearest)
    assert codes[:2].tolist() == [0, 0] and codes[3] == 192 and codes[5] == 255
    inside = (m > 1e-7) & (m < 234.0)
    assert bool(((ONE_BIT_MAGNITUDES[codes.long()] - m).abs()[inside] <= 0.0453 * m[inside]).all())
    signs, mag = sign_magnitude_rows(torch.tensor([[0.5, -1.5, 0.0, -0.0]]))
    assert signs.tolist() == [[1, 0, 1, 1]] and mag.tolist() == [[magnitude_codes(torch.tensor(0.5)).item()]]


def test_one_bit_rows_refuse_a_nan_and_warn_of_a_magnitude_past_the_byte():
    """A row holding a NaN has no magnitude to keep: refused, counted; a row whose mean magnitude
    is above the byte's largest (234.75) is served at it, with a warning that says so."""
    from shark_torchrec.precision.quantize import ONE_BIT_MAGNITUDES, sign_magnitude_rows

    with pytest.raises(ValueError, match="1 of the rows hold a NaN"):
        sign_magnitude_rows(torch.tensor([[0.5, float("nan")], [1.0, -1.0]]))
    with pytest.warns(UserWarning, match="1 rows have a mean magnitude above 234.75.*largest here 300"):
        _, mag = sign_magnitude_rows(torch.tensor([[300.0, -300.0], [1.0, -1.0]]))
    assert ONE_BIT_MAGNITUDES[mag.long()].flatten().tolist() == [float(ONE_BIT_MAGNITUDES[-1]), 1.0]


@pytest.mark.parametrize("bits", [4, 2])
def test_symmetric_rows_take_the_best_scale_byte(bits):
    """A symmetric row (tiers int4s, int2s) serves s x (code - centre), centre 7.5 or 1.5, with s
    a byte on the 1-bit magnitude grid: on Gaussian, heavy-tailed and off-centre rows of 16 and
    64 values its squared error is the least any of the 255 scale bytes gives (each with nearest
    codes), its codes fit the bits, a row of zeros serves zeros (scale byte 0), a NaN is refused
    and a value past the largest scale's reach warns and is clipped there."""
    from shark_torchrec.precision.quantize import ONE_BIT_MAGNITUDES, symmetric_rows, symmetric_values

    gen = torch.Generator().manual_seed(3)
    top, centre = (1 << bits) - 1, ((1 << bits) - 1) / 2
    for dim in (16, 64):
        rows = torch.cat(
            [
                torch.randn(500, dim, generator=gen) * 0.05,
                torch.randn(500, dim, generator=gen) * 0.01 / torch.rand(500, dim, generator=gen).clamp_min(0.05),
                torch.randn(200, dim, generator=gen) + 3.0,  # far from zero: every level on one side
            ]
        )
        codes, scale = symmetric_rows(rows, bits)
        assert codes.dtype == scale.dtype == torch.uint8 and scale.shape == (len(rows), 1)
        assert int(codes.max()) <= top
        served = symmetric_values(codes, scale, bits)
        assert torch.equal(served, (codes.float() - centre) * ONE_BIT_MAGNITUDES[scale.long()])  # one rounding
        err = ((served - rows) ** 2).sum(1)
        best = torch.full_like(err, float("inf"))
        for code in range(1, 256):
            step = ONE_BIT_MAGNITUDES[code]
            nearest = torch.round(rows / step + centre).clamp(0, top)
            best = torch.minimum(best, (((nearest - centre) * step - rows) ** 2).sum(1))
        assert torch.equal(err, best)
    zero_codes, zero_scale = symmetric_rows(torch.zeros(2, 8), bits)
    assert zero_scale.tolist() == [[0], [0]]
    assert torch.equal(symmetric_values(zero_codes, zero_scale, bits), torch.zeros(2, 8))
    with pytest.raises(ValueError, match=f"int{bits}s rows: 1 of the rows hold a NaN"):
        symmetric_rows(torch.tensor([[0.5, float("nan")], [1.0, -1.0]]), bits)
    reach = float(centre * ONE_BIT_MAGNITUDES[-1])
    with pytest.warns(UserWarning, match=f"1 rows hold a value beyond {reach:.1f}.*largest here 5000"):
        far_codes, far_scale = symmetric_rows(torch.tensor([[5000.0, -1.0], [1.0, -1.0]]), bits)
    assert float(symmetric_values(far_codes, far_scale, bits)[0, 0]) == reach
    with pytest.raises(ValueError, match="4 or 2 bits, got 3"):
        symmetric_rows(torch.zeros(1, 8), 3)

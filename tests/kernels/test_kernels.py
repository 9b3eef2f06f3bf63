"""`torch.ops.shark.mixed_lookup` (C++) against its reference (torch around FBGEMM's INT-N op),
bit for bit, on random group layouts: every group and dropped rows, duplicate ids, empty bags,
multi-id bags, weighted bags, sum, mean and no pooling; and the same error for a bad id."""

import pytest
import torch

from helpers.kernel_layouts import bags, random_layout, same_bits
from shark_torchrec.kernels import mixed_lookup
from shark_torchrec.kernels.reference import mixed_lookup_reference


@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
@pytest.mark.parametrize("dim,alignment,groups", [(16, 1, 5), (8, 16, 5), (24, 1, 3), (8, 1, 5)])
@pytest.mark.parametrize("weighted", [False, True])
def test_fused_lookup_equals_the_reference_bit_for_bit(pooling, dim, alignment, groups, weighted):
    gen = torch.Generator().manual_seed(dim * 7 + alignment + groups)
    tables = [37, 5, 120]
    w, offsets, row_map, ends, shift = random_layout(gen, tables, dim, groups, alignment=alignment)
    base = torch.tensor([0, 37, 42, 0])  # a fourth feature shares the first table
    rows = torch.tensor([37, 5, 120, 37])
    feats = [37, 5, 120, 37]
    B = 9
    lengths = torch.randint(0, 5, (len(feats) * B,), generator=gen)
    lengths[0], lengths[1] = 4, 0  # bag 0 repeats ids (below), bag 1 is empty
    values, lengths = bags(gen, feats, B, max_len=4, lengths=lengths)
    values[1] = values[0]
    values[3] = values[0]
    psw = torch.rand(values.numel(), generator=gen) if weighted else None
    names = ["a", "b", "c", "d"]
    args = (w, offsets, row_map, ends, shift, base, rows, values, lengths, psw, dim, B, pooling, alignment, names)
    got = mixed_lookup(*args)
    want = mixed_lookup_reference(*args)
    assert same_bits(got, want)
    if pooling != "none":
        assert torch.equal(got[1, :dim], torch.zeros(dim))  # the empty bag (feature 0, sample 1)
    # Every group (and dropped rows) was read.
    keys = torch.repeat_interleave(base, lengths.view(4, B).sum(1)) + values
    read = torch.bucketize(row_map[keys], ends, right=True).unique().tolist()
    assert set(read) >= set(range(groups)) | {5}, read


def test_one_id_per_bag_and_no_ids():
    gen = torch.Generator().manual_seed(3)
    w, offsets, row_map, ends, shift = random_layout(gen, [50], 8)
    base, rows = torch.tensor([0]), torch.tensor([50])
    for B in (0, 1, 64):
        values = torch.randint(0, 50, (B,), generator=gen)
        lengths = torch.ones(B, dtype=torch.int32)
        args = (w, offsets, row_map, ends, shift, base, rows, values, lengths, None, 8, B, "sum", 1, ["x"])
        assert same_bits(mixed_lookup(*args), mixed_lookup_reference(*args))


@pytest.mark.parametrize("bad", [-1, 5])
def test_an_id_outside_its_table_names_the_feature_and_id(bad):
    gen = torch.Generator().manual_seed(4)
    w, offsets, row_map, ends, shift = random_layout(gen, [7, 5], 8)
    base, rows = torch.tensor([0, 7]), torch.tensor([7, 5])
    values = torch.tensor([1, 2, 3, bad, 4])
    lengths = torch.tensor([2, 1, 1, 1])
    args = (w, offsets, row_map, ends, shift, base, rows, values, lengths, None, 8, 2, "sum", 1, ["user", "item"])
    msg = f"feature item: id {bad} outside its table of 5 rows"
    with pytest.raises(ValueError, match=msg):
        mixed_lookup(*args)
    with pytest.raises(ValueError, match=msg):
        mixed_lookup_reference(*args)


def test_the_op_scripts_and_has_a_fake_for_tracing():
    @torch.jit.script
    def scripted(w, o, m, e, s, b, r, v, l, d: int, B: int):
        return torch.ops.shark.mixed_lookup(w, o, m, e, s, b, r, v, l, None, d, B, 0, 1, "x")

    gen = torch.Generator().manual_seed(5)
    w, offsets, row_map, ends, shift = random_layout(gen, [20], 8)
    base, rows = torch.tensor([0]), torch.tensor([20])
    values, lengths = bags(gen, [20], 6, 3)
    want = mixed_lookup_reference(
        w, offsets, row_map, ends, shift, base, rows, values, lengths, None, 8, 6, "sum", 1, ["x"]
    )
    assert same_bits(scripted(w, offsets, row_map, ends, shift, base, rows, values, lengths, 8, 6), want)
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) for t in (w, offsets, row_map, ends, shift, base, rows, values, lengths)]
        out = torch.ops.shark.mixed_lookup(*fake, None, 8, 6, 0, 1, "x")
    assert out.shape == (6, 8)


@pytest.mark.parametrize("dim", [16, 64, 12])
def test_fused_update_equals_the_torch_update_bit_for_bit(dim):
    """`torch.ops.shark.update_rows_hashed_` (the store's CPU update) against the store's torch
    update (its reference), on rows in all five groups: ordinary rows, rows of fp16-subnormal
    values (the exact rounding rule), constant rows (integer scale 0), rows beyond fp16's range
    (clamped), rows whose minimum stays exactly 0 (the sequential min/max), a column slice (its
    noise starts at its global column), over several steps; at dims of two and eight vectors of
    eight values, and at 12 (not a multiple of 8: the scalar integer path)."""
    import copy

    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter

    tiers = ("fp32", "fp16", "int8", "int4", "int2")[: 5 if dim % 8 == 0 else 4]  # int2 needs 8 | dim
    tables = [
        LocalTable("t0", 300, dim, global_rows=300, table_id=3),
        LocalTable("t1", 200, dim, global_rows=400, row_offset=200, col_offset=16, table_id=5),
    ]
    policy = PrecisionPolicy(
        mode="shark",
        tiers=tiers,
        row_fractions=(0.2,) * (len(tiers) - 1),
        optimizer="sgd",
        learning_rate=1.0,
    ).resolved([dim])
    fused = RowGroupStore(tables, ["a", "b"], [0, 1], policy, StepCounter())
    n = fused.num_rows
    gen = torch.Generator().manual_seed(0)
    fused.set_groups(torch.randint(0, len(tiers), (n,), generator=gen).to(torch.int8))
    values = torch.randn(n, dim, generator=gen)
    values[:40] *= 1e-6  # fp16 subnormals
    values[40:60] = 0.5  # constant rows
    values[60:70] *= 1e5  # beyond fp16's range
    values[70:90] = values[70:90].abs() + 0.5
    values[70:90, 3] = 0.0  # a minimum of exactly 0, kept by a zero gradient there
    fused.write_rows(torch.arange(n), values)
    reference = copy.deepcopy(fused)
    for step in range(1, 4):
        keys = torch.randperm(n, generator=gen)[: n // 2]
        grad = torch.randn(len(keys), dim, generator=gen) * 0.01
        grad[keys < 40] *= 1e-6
        grad[(keys >= 40) & (keys < 60)] = 0.0  # constant rows stay constant
        grad[(keys >= 70) & (keys < 90), 3] = 0.0
        scale = torch.rand(len(keys), generator=gen)
        fused.step_rows(keys, grad, scale, step, kernels="cpp")
        reference.step_rows(keys, grad, scale, step, kernels="torch")
        assert torch.equal(fused.weights, reference.weights), step
    groups = fused.groups_of(torch.arange(n))
    assert set(groups[:40].tolist()) == set(range(len(tiers)))  # the subnormal rows span every group
    assert not torch.equal(fused.read_rows(torch.arange(n)), values)  # the rows did move


@pytest.mark.parametrize(
    "dim,tiers,alignment",
    [
        (16, ("fp32", "fp16", "int8", "int4", "int2"), 1),
        (12, ("fp32", "fp16", "int8", "int4"), 1),  # int4 rows of 8 bytes: 2-byte words
        (8, ("fp32", "fp16", "int8", "int4", "int2", "dropped"), 16),
        (16, ("fp32", "int4", "dropped"), 1),
    ],
)
def test_row_conversion_equals_the_torch_moves_bit_for_bit(dim, tiers, alignment):
    """`torch.ops.shark.convert_rows_` against the store's torch moves (its reference): rows
    moved in place (every group keeps its size) and into a rebuilt buffer (sizes change, rows
    dropped and revived from the fallback row), on fp16 subnormals, constant rows and values
    beyond fp16's range, four regroupings in a row."""
    import copy

    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter
    from shark_torchrec.precision.priority import GROUP_NAMES

    tables = [
        LocalTable("t0", 300, dim, global_rows=300, table_id=3),
        LocalTable("t1", 200, dim, global_rows=400, row_offset=200, col_offset=16, table_id=5),
    ]
    policy = PrecisionPolicy(mode="shark", tiers=tiers, row_fractions=(0.2,) * (len(tiers) - 1)).resolved([dim])
    store = RowGroupStore(tables, ["a", "b"], [0, 1], policy, StepCounter())
    store.row_alignment = alignment  # as on CUDA (16): padded rows
    n = store.num_rows
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([GROUP_NAMES.index(t) for t in tiers], dtype=torch.int8)
    store.set_groups(ids[torch.randint(0, len(ids), (n,), generator=gen)])
    values = torch.randn(n, dim, generator=gen)
    values[:40] *= 1e-6  # fp16 subnormals
    values[40:60] = 0.5  # constant rows
    values[60:70] *= 1e5  # beyond fp16's range
    store.write_rows(torch.arange(n), values)
    fused, reference = copy.deepcopy(store), copy.deepcopy(store)
    fused.kernels, reference.kernels = "cpp", "torch"
    for r in range(4):
        if r % 2 == 0:  # the same sizes: moved in place
            new = fused.groups_of(torch.arange(n))[torch.randperm(n, generator=gen)]
        else:  # new sizes: a rebuilt buffer
            new = ids[torch.randint(0, len(ids), (n,), generator=gen)]
        moved = fused.set_groups(new)
        assert moved == reference.set_groups(new)
        if r == 0:  # a tag outside the groups: refused by name on both paths, nothing changed
            for store in (fused, reference):
                for bad in (-1, len(GROUP_NAMES)):
                    tags = new.clone()
                    tags[7] = bad
                    with pytest.raises(ValueError, match=f"set_groups: group tags must be in .* {bad}"):
                        store.set_groups(tags)
            assert torch.equal(fused.row_map, reference.row_map)
        assert sum(moved.values()) > n // 2
        assert torch.equal(fused.row_map, reference.row_map)
        assert torch.equal(fused.weights, reference.weights), r


def test_row_conversion_of_rows_whose_extreme_is_a_signed_zero():
    """Integer rows whose minimum or maximum is zero, held as -0 and +0 in either order: the
    scale and bias (whose sign bit follows the zero found) equal the torch reference's."""
    import copy

    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter

    dim = 16
    policy = PrecisionPolicy(mode="shark", tiers=("fp32", "int8", "int4", "int2"), row_fractions=(0.5, 0.2, 0.2))
    store = RowGroupStore([LocalTable("t", 8, dim, global_rows=8)], ["f"], [0], policy.resolved([dim]), StepCounter())
    store.set_groups(torch.zeros(8, dtype=torch.int8))
    values = torch.rand(8, dim, generator=torch.Generator().manual_seed(0)) + 0.5
    # Columns 3 and 11 share a lane of an eight-wide pass: its order of the two zeros differs
    # from the sequential loop's.
    values[0, 3], values[0, 11] = -0.0, 0.0  # the minimum is zero, -0 first
    values[1, 3], values[1, 11] = 0.0, -0.0  # +0 first
    values[2:4] = -values[2:4]
    values[2, 3], values[2, 11] = 0.0, -0.0  # the maximum is zero
    values[3, 3], values[3, 11] = -0.0, 0.0
    store.write_rows(torch.arange(8), values)
    fused, reference = copy.deepcopy(store), copy.deepcopy(store)
    fused.kernels, reference.kernels = "cpp", "torch"
    for g in (2, 3, 4):
        new = torch.tensor([g] * 4 + [0] * 4, dtype=torch.int8)
        fused.set_groups(new)
        reference.set_groups(new)
        assert torch.equal(fused.weights, reference.weights), g
        back = torch.zeros(8, dtype=torch.int8)
        fused.set_groups(back)
        reference.set_groups(back)
        assert torch.equal(fused.weights, reference.weights), g


def test_row_conversion_checks_every_row_before_writing():
    """A row outside its buffer or in no group is an error, and nothing is written."""
    from shark_torchrec.kernels import convert_rows_

    buf = torch.arange(64, dtype=torch.uint8)
    before = buf.clone()
    at, group = torch.tensor([0, 32]), torch.tensor([1, 1])
    with pytest.raises(RuntimeError, match="bytes outside its buffer"):
        convert_rows_(buf, torch.tensor([0, 40]), group, buf, at, group, 16, 1)  # 32 bytes from 40
    with pytest.raises(RuntimeError, match="group outside 0-4"):
        convert_rows_(buf, at, torch.tensor([1, 5]), buf, at, group, 16, 1)
    assert torch.equal(buf, before)


@pytest.mark.parametrize(
    "optimizer,signal,tiers",
    [
        ("rowwise_adagrad", "eq7", ("fp32", "fp16", "int8", "int4", "int2")),
        ("sgd", "eq7-grad", ("fp32", "fp16", "int8", "int4", "int2", "dropped")),
        ("rowwise_adagrad", "eq7", ("fp32", "int8", "dropped")),
    ],
)
def test_the_optimizer_step_on_cpu_equals_the_torch_step_bit_for_bit(optimizer, signal, tiers):
    """The whole optimizer step of the CPU path (Eq. 7, Adagrad state, the C++ row update that
    hashes its own noise windows) against the torch path, over five steps of two tables (one
    a row and column slice): rows, momentum, scores, last steps, fallback gradients and the
    count of skipped non-finite rows all equal."""
    import copy

    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter
    from shark_torchrec.precision.priority import GROUP_NAMES

    dim = 16
    tables = [
        LocalTable("t0", 300, dim, global_rows=300, table_id=3),
        LocalTable("t1", 200, dim, global_rows=400, row_offset=200, col_offset=16, table_id=5),
    ]
    policy = PrecisionPolicy(
        mode="shark",
        tiers=tiers,
        row_fractions=(0.2,) * (len(tiers) - 1),
        optimizer=optimizer,
        learning_rate=0.3,
        signal=signal,
    ).resolved([dim])
    store = RowGroupStore(tables, ["a", "b"], [0, 1], policy, StepCounter())
    n = store.num_rows
    gen = torch.Generator().manual_seed(0)
    ids = torch.tensor([GROUP_NAMES.index(t) for t in tiers], dtype=torch.int8)
    store.set_groups(ids[torch.randint(0, len(ids), (n,), generator=gen)])
    store.write_rows(torch.arange(n), torch.randn(n, dim, generator=gen))
    fused, reference = copy.deepcopy(store), copy.deepcopy(store)
    fused.kernels, reference.kernels = "cpp", "torch"
    for step in range(1, 6):
        fused.step.value = reference.step.value = step
        keys = torch.randperm(n, generator=gen)[: n // 2]
        grad = torch.randn(len(keys), dim, generator=gen) * 0.1
        grad[3, 2] = float("nan")  # skipped
        total = torch.randint(1, 5, (len(keys),), generator=gen).float()
        pos = torch.minimum(total, torch.randint(0, 3, (len(keys),), generator=gen).float())
        fused.apply_update(keys, grad, total, pos)
        reference.apply_update(keys, grad, total, pos)
        for name in ("weights", "momentum", "row_priority", "row_seen_step", "fallback_grad"):
            assert torch.equal(getattr(fused, name), getattr(reference, name)), (step, name)
    assert fused.nonfinite_rows == reference.nonfinite_rows == 5
    assert not torch.equal(fused.weights, store.weights)


def test_fused_update_skips_dropped_rows_and_refuses_a_key_outside_the_store():
    """A dropped row has no bytes (the reference writes nothing for it); a key beyond the row
    map is an error, not a write outside the buffer."""
    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter

    policy = PrecisionPolicy(
        mode="shark", tiers=("fp32", "int8", "dropped"), row_fractions=(0.3, 0.3), optimizer="sgd", learning_rate=1.0
    ).resolved([8])
    store = RowGroupStore([LocalTable("t", 50, 8, global_rows=50)], ["a"], [0], policy, StepCounter())
    store.set_groups(torch.tensor([0] * 10 + [2] * 20 + [5] * 20, dtype=torch.int8))
    before = store.weights.clone()
    store.step_rows(torch.tensor([45]), torch.ones(1, 8), torch.ones(1), 1, kernels="cpp")
    assert torch.equal(store.weights, before)
    from shark_torchrec.kernels import update_rows_, update_rows_hashed_

    start, table = store.noise_starts(torch.tensor([0]), 1)
    with pytest.raises(RuntimeError, match="outside the row map or the group tables"):
        update_rows_(
            store.weights,
            store._op_offsets,
            store.row_map,
            store._range_ends,
            store._range_shift,
            torch.tensor([50]),
            torch.ones(1, 8),
            torch.ones(1),
            table,
            start,
            8,
            1,
        )
    with pytest.raises(RuntimeError, match="outside the row map or the group tables"):
        update_rows_hashed_(
            store.weights,
            store._op_offsets,
            store.row_map,
            store._range_ends,
            store._range_shift,
            torch.tensor([50]),
            torch.ones(1, 8),
            torch.ones(1),
            store.table_base,
            store._table_ids,
            store._row_offset,
            store._col_offset,
            0,
            table,
            8,
            1,
        )
    assert torch.equal(store.weights, before)


@pytest.mark.parametrize("pooling", ["sum", "mean", "none"])
@pytest.mark.parametrize("weighted,labelled", [(False, True), (True, True), (True, False)])
@pytest.mark.parametrize("batch_size", [7, 1, 16])  # 1: bags divided as integers; 16: a power of two
def test_row_gradient_reduction_equals_the_torch_backward_bit_for_bit(pooling, weighted, labelled, batch_size):
    """`torch.ops.shark.row_grads` against the store's torch backward (`_row_grads_torch`):
    multi-id, empty and repeated-row bags, over three features sharing rows."""
    from types import SimpleNamespace

    from shark_torchrec.kernels import POOLING_CODES
    from shark_torchrec.modules.row_lookup import RowLookup

    gen = torch.Generator().manual_seed(len(pooling) * 10 + weighted * 2 + labelled)
    F, B, D = 3, batch_size, 8
    lengths = torch.randint(0, 4, (F * B,), generator=gen) if B > 1 else torch.randint(2, 8, (F,), generator=gen)
    nnz = int(lengths.sum())
    keys = torch.randint(0, max(2, min(12, nnz // 3)), (nnz,), generator=gen)  # few rows: many repeats
    seg = torch.repeat_interleave(torch.arange(F * B), lengths)
    grad = torch.randn(nnz, D, generator=gen) if pooling == "none" else torch.randn(B, F * D, generator=gen)
    psw = torch.rand(nnz, generator=gen) if weighted else None
    labels = (torch.rand(nnz, generator=gen) < 0.3).float() if labelled else None
    order = torch.argsort(keys, stable=True)
    _, counts = torch.unique_consecutive(keys[order], return_counts=True)
    store = SimpleNamespace(feature_names=["a", "b", "c"], dim=D, pooling=pooling)
    want = RowLookup._row_grads_torch(store, grad, order, counts, seg, lengths, psw, labels, B)
    got = torch.ops.shark.row_grads(grad, order, counts, seg, lengths, psw, labels, B, POOLING_CODES[pooling], D)
    assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])
    assert int(counts.max()) > 2


@pytest.mark.parametrize(
    "F,B,most_rows,max_len",
    [
        (3, 7, 12, 4),  # few rows: long runs, empty and multi-id bags
        (4, 64, 5_000_000, 3),  # keys of 23 bits: three radix passes
        (2, 16, 1 << 40, 2),  # keys past 32 bits
        (2, 64, 1 << 59, 2),  # key and id do not fit one word: sorted as pairs
        (3, 5, 1, 2),  # every id reads row 0 of its table
        (3, 4, 10, 0),  # no ids at all
        (2, 0, 10, 0),  # an empty batch
    ],
)
def test_ids_by_row_equals_the_torch_grouping(F, B, most_rows, max_len):
    """`torch.ops.shark.ids_by_row` against the store's torch grouping (`_ids_by_row_torch`: a
    stable argsort and unique_consecutive): every tensor equal, so the ids of one row keep
    their input order (which the gradient sums, and so the goldens, depend on)."""
    from types import MethodType, SimpleNamespace

    from shark_torchrec.kernels import ids_by_row
    from shark_torchrec.modules.row_lookup import RowLookup

    gen = torch.Generator().manual_seed(F * 1000 + B)
    lengths = torch.randint(0, max_len + 1, (F * B,), generator=gen)
    nnz = int(lengths.sum())
    rows = torch.randint(1, most_rows + 1, (F,), generator=gen) if most_rows > 1 else torch.ones(F, dtype=torch.int64)
    # Tables stacked in feature order, the last feature sharing the first's table (as shared features do).
    feature_base = torch.cumsum(rows, 0) - rows
    feature_base[-1] = 0
    feature = torch.repeat_interleave(torch.arange(F * B) // max(B, 1), lengths)
    values = (torch.rand(nnz, generator=gen, dtype=torch.float64) * rows[feature]).long()
    store = SimpleNamespace(feature_names=[f"f{i}" for i in range(F)], feature_base=feature_base)
    store._bags_and_keys = MethodType(RowLookup._bags_and_keys, store)
    want = RowLookup._ids_by_row_torch(store, values, lengths, B)
    got = ids_by_row(values, lengths, feature_base, B)
    for name, g, w in zip(("seg", "order", "uniq", "counts"), got, want):
        assert g.dtype == w.dtype == torch.int64 and torch.equal(g, w), name
    if max_len and most_rows == 12:
        assert int(want[3].max()) > 2  # rows read by several ids


def test_ids_by_row_has_a_fake_for_tracing():
    """`torch.compile` and export trace the op through its fake: ids-long bags and order, and
    distinct rows of a size only known at run time."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    values, lengths, base = torch.tensor([3, 1, 3, 0]), torch.tensor([1, 1, 2, 0]), torch.tensor([0, 5])
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        seg, order, uniq, counts = torch.ops.shark.ids_by_row(
            *(mode.from_tensor(t) for t in (values, lengths, base)), 2
        )
    assert seg.shape == order.shape == (4,) and seg.dtype == order.dtype == uniq.dtype == counts.dtype == torch.int64
    assert uniq.shape == counts.shape and not isinstance(uniq.shape[0], int)


def test_ids_by_row_refuses_lengths_that_do_not_add_up():
    from shark_torchrec.kernels import ids_by_row

    with pytest.raises(RuntimeError, match="lengths"):
        ids_by_row(torch.arange(5), torch.tensor([2, 2]), torch.tensor([0]), 2)
    with pytest.raises(RuntimeError, match="reads row -1"):
        ids_by_row(torch.tensor([0, -1]), torch.tensor([1, 1]), torch.tensor([0]), 2)
    huge = 2**63 - 1  # a length whose sum with the ids so far overflows
    with pytest.raises(RuntimeError, match="bag 1 has"):
        ids_by_row(torch.tensor([0]), torch.tensor([1, huge, huge]), torch.tensor([0, 0, 0]), 1)
    with pytest.raises(RuntimeError, match="1-D integer"):
        ids_by_row(torch.tensor([0, 1]), torch.tensor([1.7, 1.2]), torch.tensor([0]), 2)
    with pytest.raises(RuntimeError, match="1-D integer"):
        ids_by_row(torch.arange(4).reshape(2, 2), torch.tensor([2, 2]), torch.tensor([0]), 2)


def test_a_failed_build_is_an_error_with_the_compiler_output(tmp_path, monkeypatch):
    """No silent slow path: a source that does not compile raises KernelBuildError naming the
    command and carrying g++'s message; nothing is left in the library directory."""
    from shark_torchrec import kernels

    broken = tmp_path / "broken.cpp"
    broken.write_text("int main() { return not_declared_here; }\n")
    monkeypatch.setattr(kernels, "SOURCES", [broken])
    monkeypatch.setenv("SHARK_KERNELS_DIR", str(tmp_path / "lib"))
    with pytest.raises(kernels.KernelBuildError, match="(?s)failed.*not_declared_here"):
        kernels.build(quiet=True)
    assert list((tmp_path / "lib").iterdir()) == []


def test_torch_reached_through_a_symlink_finds_the_same_library(tmp_path, monkeypatch):
    """The cached library's name hashes the build flags, which name torch's directories: a
    .venv reached through a symlink (the docs test's scratch folders link it) must not make
    another name, and so another 15-45 s build, each time."""
    from pathlib import Path

    from torch.utils import cpp_extension

    from shark_torchrec import kernels

    real = kernels.library_path()
    torch_dir = Path(torch.__file__).resolve().parent
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "torch").symlink_to(torch_dir)
    linked = tmp_path / "site" / "torch"
    monkeypatch.setattr(torch, "__file__", str(linked / "__init__.py"))
    monkeypatch.setattr(cpp_extension, "_TORCH_PATH", str(linked))
    assert any(str(linked) in p for p in cpp_extension.include_paths())  # the link is what torch reports
    assert kernels.library_path() == real


def test_the_ops_agree_across_parallel_tasks():
    """Sizes past the ops' parallel grains (64 bags, 256 rows), so that the work splits into
    tasks: lookup, update and gradient reduction still agree bit for bit, and of two bad ids in
    different tasks the first is named."""
    import copy
    from types import SimpleNamespace

    from shark_torchrec.kernels import POOLING_CODES
    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter
    from shark_torchrec.modules.row_lookup import RowLookup

    if torch.get_num_threads() < 2:
        pytest.skip("one thread: no parallel tasks")
    gen = torch.Generator().manual_seed(11)
    tables, D, B = [400, 90, 700], 16, 300
    w, offsets, row_map, ends, shift = random_layout(gen, tables, D)
    base, rows = torch.tensor([0, 400, 490]), torch.tensor(tables)
    values, lengths = bags(gen, tables, B, max_len=3)
    psw = torch.rand(values.numel(), generator=gen)
    for pooling in ("sum", "mean", "none"):
        args = (w, offsets, row_map, ends, shift, base, rows, values, lengths, psw, D, B, pooling, 1, ["a", "b", "c"])
        assert same_bits(mixed_lookup(*args), mixed_lookup_reference(*args)), pooling
    bad = values.clone()
    first, later = int(lengths[:B].sum()) + 1, values.numel() - 2  # in feature b, and late in feature c
    bad[first], bad[later] = 90, 700
    with pytest.raises(ValueError, match="feature b: id 90 outside its table of 90 rows"):
        mixed_lookup(w, offsets, row_map, ends, shift, base, rows, bad, lengths, None, D, B, "sum", 1, ["a", "b", "c"])

    policy = PrecisionPolicy(
        mode="shark",
        tiers=("fp32", "fp16", "int8", "int4", "int2"),
        row_fractions=(0.2, 0.2, 0.2, 0.2),
        optimizer="sgd",
        learning_rate=1.0,
    ).resolved([D])
    fused = RowGroupStore([LocalTable("t", 3000, D, global_rows=3000)], ["f"], [0], policy, StepCounter())
    fused.set_groups(torch.randint(0, 5, (3000,), generator=gen).to(torch.int8))
    fused.write_rows(torch.arange(3000), torch.randn(3000, D, generator=gen))
    reference = copy.deepcopy(fused)
    keys = torch.randperm(3000, generator=gen)[:2000]
    grad, scale = torch.randn(2000, D, generator=gen), torch.rand(2000, generator=gen)
    fused.step_rows(keys, grad, scale, 1, kernels="cpp")
    reference.step_rows(keys, grad, scale, 1, kernels="torch")
    assert torch.equal(fused.weights, reference.weights)

    F = 3
    keys = torch.randint(0, 1500, (values.numel(),), generator=gen)
    seg = torch.repeat_interleave(torch.arange(F * B), lengths)
    order = torch.argsort(keys, stable=True)
    _, counts = torch.unique_consecutive(keys[order], return_counts=True)
    assert len(counts) > 512
    out_grad = torch.randn(B, F * D, generator=gen)
    store = SimpleNamespace(feature_names=["a", "b", "c"], dim=D, pooling="mean")
    want = RowLookup._row_grads_torch(store, out_grad, order, counts, seg, lengths, psw, None, B)
    got = torch.ops.shark.row_grads(out_grad, order, counts, seg, lengths, psw, None, B, POOLING_CODES["mean"], D)
    assert same_bits(got[0], want[0]) and same_bits(got[1], want[1])


def test_an_empty_batch_trains_through_the_ops():
    """No ids at all (batch size 0): the forward gives an empty output and the backward
    updates nothing, as the torch path did."""
    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter

    policy = PrecisionPolicy(
        mode="shark", tiers=("fp32", "fp16", "int8"), row_fractions=(0.3, 0.3), optimizer="sgd", learning_rate=1.0
    ).resolved([8])
    store = RowGroupStore([LocalTable("t", 20, 8, global_rows=20)], ["a"], [0], policy, StepCounter())
    store.set_groups(torch.tensor([0] * 5 + [1] * 5 + [2] * 10, dtype=torch.int8))
    before = store.weights.clone()
    out = store.forward(torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long), None, 0)
    assert out.shape == (0, 8)
    out.sum().backward()
    assert torch.equal(store.weights, before)


def test_importing_after_an_export_loaded_its_library_does_not_abort(tmp_path):
    """serve.py loads an export's copy of the library; importing shark_torchrec afterwards in the
    same process must use it, not register the ops a second time (which aborts the process)."""
    import shutil
    import subprocess
    import sys

    from shark_torchrec import kernels

    copy_path = tmp_path / "shark_kernels.so"
    shutil.copyfile(kernels.load(), copy_path)
    script = (
        "import torch, sys; torch.ops.load_library(sys.argv[1]); "
        "import shark_torchrec.kernels as k; print(k.load(), torch.ops.shark.mixed_lookup)"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(copy_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "shark.mixed_lookup" in proc.stdout


def test_ranking_key_ops_equal_their_torch_references():
    """A reassignment's keys from the C++ ops equal torch's, key for key and group for group:
    scores of 0, -0.0, negative, NaN, tiny and large, rows up to just below 2^32, cuts at keys,
    between them and NO_CUT, several tier sets; the same scores stored, decayed and divided per
    byte in the op as `decayed` and `per_byte_scores` do, for betas whose factors underflow
    after 23 steps and after thousands, at step 0 and with rows seen after the step; bad
    arguments are refused by name."""
    from shark_torchrec.kernels import groups_by_ranking, split_ranking_keys
    from shark_torchrec.precision.priority import (
        NO_CUT,
        decay_table,
        decayed,
        groups_by_ranking_torch,
        per_byte_scores,
        ranking_keys,
        split_ranking_keys_torch,
    )

    gen = torch.Generator().manual_seed(3)
    n = 20_000
    scores = torch.rand(n, generator=gen) ** 6
    kind = torch.randint(0, 8, (n,), generator=gen)
    scores[kind == 0] = 0.0
    scores[kind == 1] = -0.0
    scores[kind == 2] = -torch.rand(int((kind == 2).sum()), generator=gen)
    scores[kind == 3] = float("nan")
    scores[kind == 4] = 1e-40  # subnormal
    scores[kind == 5] = 3e38
    for first in (0, 12_345, (1 << 32) - n):
        want, got = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
        assert split_ranking_keys(scores, first, got) == split_ranking_keys_torch(scores, first, want)
        assert torch.equal(got, want)
        keys = ranking_keys(scores, torch.arange(first, first + n))
        ordered = torch.sort(keys).values
        for tiers in ([0, 1, 2], [2, 3, 4, 5], [3, 4]):
            picks = ordered[torch.randint(0, n, (len(tiers) - 1,), generator=gen)]
            cuts = sorted((picks + torch.randint(-1, 2, picks.shape, generator=gen)).tolist(), reverse=True)
            for c in (cuts, [NO_CUT] * (len(tiers) - 1), [NO_CUT] + cuts[1:]):
                want_g, got_g = torch.empty(n, dtype=torch.int8), torch.empty(n, dtype=torch.int8)
                groups_by_ranking_torch(scores, first, c, tiers, want_g)
                groups_by_ranking(scores, first, c, tiers, got_g)
                assert torch.equal(got_g, want_g), (first, tiers, c)
    # Stored Eq. 7 scores decayed (and divided per byte: 4 x dim, 192 and 384 where division is
    # not a product by the reciprocal) in the op: the torch code's keys, for the same odd scores,
    # seen steps after the step (no decay) and step 0.
    stored = scores * torch.rand(n, generator=gen)
    seen = torch.randint(0, 60, (n,), generator=gen, dtype=torch.int32)
    for beta, step, divisor in ((0.99, 40, 1.0), (0.1, 50, 192.0), (1e-3, 70_000, 384.0), (0.5, 0, 256.0)):
        decayed_scores = per_byte_scores(decayed(stored, seen, step, beta), divisor / 4)
        for first in (0, (1 << 32) - n):
            want, got = torch.empty(n, dtype=torch.int64), torch.empty(n, dtype=torch.int64)
            z = split_ranking_keys(stored, first, got, seen, step, decay_table(beta, step), divisor)
            assert z == split_ranking_keys_torch(decayed_scores, first, want), (beta, step)
            assert torch.equal(got, want), (beta, step, divisor)
    out = torch.empty(n, dtype=torch.int64)
    with pytest.raises(RuntimeError, match="2 factors do not reach 40 steps"):
        torch.ops.shark.split_ranking_keys(stored, 0, out, torch.zeros(n, dtype=torch.int32), 40, torch.ones(2), 1.0)
    with pytest.raises(RuntimeError, match="rows must lie in"):
        split_ranking_keys(scores, 1 << 32, out)
    with pytest.raises(RuntimeError, match="one cut fewer than groups"):
        groups_by_ranking(scores, 0, [5, 3], [0, 1], torch.empty(n, dtype=torch.int8))
    with pytest.raises(RuntimeError, match="float32"):
        split_ranking_keys(scores.double(), 0, out)


def test_changed_rows_equals_a_decode_of_the_row_map():
    """The rows a new grouping moves and the new groups' sizes, from the C++ op, equal a full
    decode of the row map (the torch reference): random maps over empty and full groups,
    nothing moved, everything moved, a tail past a block; a tag outside the groups is refused
    by name."""
    from shark_torchrec.kernels import changed_rows

    gen = torch.Generator().manual_seed(5)
    for n, ends in ((200_000, [10, 30, 30, 60, 100]), (70_001, [0, 0, 50, 50, 50]), (5, [1, 2, 3, 4, 5])):
        ends_t = torch.tensor(ends, dtype=torch.int32)
        row_map = torch.randint(0, ends[-1] + 3, (n,), generator=gen, dtype=torch.int32)
        old = torch.bucketize(row_map, ends_t, right=True).to(torch.int8)
        for new in (old.clone(), (old + 1) % 6, torch.randint(0, 6, (n,), generator=gen).to(torch.int8)):
            rows, sizes = changed_rows(row_map, ends_t, new, 6)
            assert torch.equal(rows, (new != old).nonzero().flatten())
            assert torch.equal(sizes, torch.bincount(new.long(), minlength=6))
    bad = torch.zeros(5, dtype=torch.int8)
    bad[3] = -2
    with pytest.raises(RuntimeError, match="1 rows have group -2, not in"):
        changed_rows(torch.zeros(5, dtype=torch.int32), torch.tensor([1, 2], dtype=torch.int32), bad, 6)
    with pytest.raises(RuntimeError, match="int8 CPU tensor of 5 rows"):
        changed_rows(torch.zeros(5, dtype=torch.int32), torch.tensor([1], dtype=torch.int32), bad[:4], 6)


@pytest.mark.parametrize("signal", ["eq7", "eq7-grad"])
def test_priority_op_equals_the_torch_eq7(signal):
    """A step's Eq. 7 update of the touched rows from our C++ op equals the torch code, bit for
    bit, through the store's `apply_update`: touched sets of 1, 7, 33 and 70,001 rows (the op
    splits 70,001 over threads), scores of 0 and rows last seen long ago or after the step,
    several betas and alphas, a seen step whose distance wraps in int32 as torch's does; a key
    outside the table, and a decay table that does not reach, are refused by name."""
    import copy

    from shark_torchrec.kernels import update_priorities_
    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter
    from shark_torchrec.precision.priority import updated

    gen = torch.Generator().manual_seed(7)
    rows, D = 150_000, 8
    for beta, alpha in ((0.9, 1.0), (0.01, 3.0), (1e-4, 0.37)):
        policy = PrecisionPolicy(
            mode="shark", tiers=("fp32", "int8"), row_fractions=(0.5,), beta=beta, alpha=alpha, signal=signal
        ).resolved([D])
        store = RowGroupStore([LocalTable("t", rows, D, global_rows=rows)], ["f"], [0], policy, StepCounter())
        store.set_groups(torch.zeros(rows, dtype=torch.int8))
        store.row_priority[:] = torch.rand(rows, generator=gen) ** 3
        store.row_priority[torch.rand(rows, generator=gen) < 0.3] = 0.0
        store.row_seen_step[:] = torch.randint(0, 400, (rows,), generator=gen, dtype=torch.int32)
        store.step.value = 300
        for n in (1, 7, 33, 70_001):
            keys = torch.randperm(rows, generator=gen)[:n]
            grad = torch.randn(n, D, generator=gen) * 1e-3
            pos = torch.randint(0, 5, (n,), generator=gen).float()
            total = pos + torch.randint(0, 5, (n,), generator=gen).float()
            fused, reference = copy.deepcopy(store), copy.deepcopy(store)
            fused.kernels, reference.kernels = "cpp", "torch"
            fused.apply_update(keys, grad, total, pos)
            reference.apply_update(keys, grad, total, pos)
            assert torch.equal(fused.row_priority, reference.row_priority), (beta, n)
            assert torch.equal(fused.row_seen_step, reference.row_seen_step), (beta, n)
            assert not torch.equal(fused.row_priority, store.row_priority)
    one = torch.zeros(1)
    with pytest.raises(RuntimeError, match="key 5 outside"):
        update_priorities_(
            torch.zeros(5), torch.zeros(5, dtype=torch.int32), torch.tensor([5]), one, one, 1, 1.0, 0.5, torch.ones(2)
        )
    # The decay table must reach the oldest row's steps, unless it ends at 0 (then every later
    # factor is 0).
    op = torch.ops.shark.update_priorities_
    priority, seen, ones = torch.ones(5), torch.zeros(5, dtype=torch.int32), torch.ones(1)
    with pytest.raises(RuntimeError, match="2 factors do not reach 3 steps"):
        op(priority, seen, torch.tensor([1]), ones, ones, 4, 1.0, 0.5, torch.tensor([1.0, 0.5]))
    op(priority, seen, torch.tensor([1]), ones, ones, 4, 1.0, 0.5, torch.tensor([1.0, 0.0]))
    assert priority[1].item() == 0.5 * 0.0 + 0.5 * 2.0 and seen[1].item() == 4  # decayed to 0, plus 2
    # step - 1 - seen past 2^31 wraps negative in torch's int32 arithmetic: no decay, as there.
    seen[2] = -(2**31) + 5
    want = updated(priority[2:3], seen[2:3], 10, ones, ones, 1.0, 0.5)
    op(priority, seen, torch.tensor([2]), ones, ones, 10, 1.0, 0.5, torch.tensor([1.0, 0.5]))
    assert torch.equal(priority[2:3], want) and want.item() == 0.5 * 1.0 + 0.5 * 2.0


def test_adagrad_op_equals_the_torch_step_scale():
    """Row-wise Adagrad's state update and step scales from our C++ op equal the torch code of
    `RowOptimizer._step_scale`, bit for bit: touched sets of 1, 7, 33 and 70,001 rows (torch's
    sqrt rounds its vectorized body apart from the correctly rounded one, and 70,001 rows are
    split over threads), states of 0, gradients from 1e-9 to 10, several learning rates and
    epsilons; a key outside the state is refused by name."""
    from shark_torchrec.kernels import rowwise_adagrad_scales_
    from shark_torchrec.modules.row_optimizer import RowOptimizer

    class Policy:
        optimizer, learning_rate, eps = "rowwise_adagrad", 0.0, 0.0

    class Rows(RowOptimizer):
        policy = Policy()

    rows = Rows()
    gen = torch.Generator().manual_seed(3)
    size, D = 150_000, 16
    for lr, eps in ((0.1, 1e-8), (0.0371, 1e-6), (1.3, 1e-10)):
        Policy.learning_rate, Policy.eps = lr, eps
        state = torch.rand(size, generator=gen) ** 4 * 1e-3
        state[torch.rand(size, generator=gen) < 0.2] = 0.0
        for n in (1, 7, 33, 70_001):
            keys = torch.randperm(size, generator=gen)[:n]
            grad = torch.randn(n, D, generator=gen) * 10 ** torch.empty(n, 1).uniform_(-9, 1, generator=gen)
            reference_state, fused_state = state.clone(), state.clone()
            reference = rows._step_scale(reference_state, keys, grad)
            fused = rowwise_adagrad_scales_(fused_state, keys, (grad * grad).mean(dim=1), lr, eps)
            assert torch.equal(fused, reference), (lr, n)
            assert torch.equal(fused_state, reference_state), (lr, n)
            if n > 1:  # (one row's tiny gradient may leave its state as it was)
                assert not torch.equal(fused_state, state)
    with pytest.raises(RuntimeError, match="key 5 outside"):
        rowwise_adagrad_scales_(torch.zeros(5), torch.tensor([5]), torch.zeros(1), 0.1, 1e-8)


@pytest.mark.parametrize("kernels", ["cpp", "torch"])
def test_a_gradient_whose_square_overflows_skips_the_row(kernels):
    """Row-wise Adagrad: a finite gradient whose mean square overflows (|g| = 1e20) is skipped
    and counted like a non-finite one, on both paths, where it would have set the row's state to
    inf and stopped the row for good; the other rows step."""
    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter

    policy = PrecisionPolicy(
        mode="shark", tiers=("fp32", "int8"), row_fractions=(0.5,), optimizer="rowwise_adagrad", learning_rate=0.1
    ).resolved([8])
    store = RowGroupStore([LocalTable("t", 10, 8, global_rows=10)], ["f"], [0], policy, StepCounter())
    store.set_groups(torch.zeros(10, dtype=torch.int8))
    store.write_rows(torch.arange(10), torch.ones(10, 8))
    store.kernels = kernels
    store.step.value = 1
    before = store.read_rows(torch.arange(10)).clone()
    grad = torch.full((3, 8), 0.5)
    grad[1, 4] = 1e20
    store.apply_update(torch.tensor([2, 5, 7]), grad, torch.ones(3), torch.zeros(3))
    after = store.read_rows(torch.arange(10))
    assert store.nonfinite_rows == 1
    assert torch.equal(after[5], before[5]) and float(store.momentum[5]) == 0.0
    assert not torch.equal(after[2], before[2]) and bool(torch.isfinite(store.momentum).all())


def test_mean_squares_in_blocks_equal_the_whole_expression(monkeypatch):
    """The optimizer's mean squares, made a block of rows at a time in its scratch buffer, equal
    (g * g).mean(dim=1) of the whole gradient bit for bit, for blocks of many rows, of one row,
    and a last block of one row."""
    import shark_torchrec.modules.row_optimizer as row_optimizer

    rows = row_optimizer.RowOptimizer()
    gen = torch.Generator().manual_seed(5)
    for scratch in (1 << 20, 100, 64):
        monkeypatch.setattr(row_optimizer, "_SQUARES_SCRATCH", scratch)
        for n, d in ((1, 64), (7, 16), (41_557, 64), (1_001, 8), (3, 3), (0, 64), (65, 64)):
            g = torch.randn(n, d, generator=gen) * 10 ** torch.empty(n, 1).uniform_(-9, 3, generator=gen)
            assert torch.equal(rows._mean_squares(g), (g * g).mean(dim=1)), (scratch, n, d)


def _store(dim, pooling, weighted, optimizer, tiers, rows=(30, 20), label_tagged=True, **policy):
    """Two tables (the second a row and column slice of its table) under three features (a and c
    share t0)."""
    from shark_torchrec.modules.precision_policy import PrecisionPolicy
    from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter

    tables = [
        LocalTable("t0", rows[0], dim, global_rows=rows[0], table_id=3),
        LocalTable("t1", rows[1], dim, global_rows=2 * rows[1], row_offset=rows[1], col_offset=8, table_id=5),
    ]
    resolved = PrecisionPolicy(
        mode="shark",
        tiers=tiers,
        row_fractions=(0.2,) * (len(tiers) - 1),
        optimizer=optimizer,
        learning_rate=0.3,
        **policy,
    ).resolved([dim])
    return RowGroupStore(
        tables,
        ["a", "b", "c"],
        [0, 1, 0],
        resolved,
        StepCounter(),
        pooling=pooling,
        weighted=weighted,
        label_tagged=label_tagged,
    )


def _batch(gen, B, rows):
    """0-3 ids a bag of the three features, each id's weight tagged with its sample's label
    (`tag_labels`' layout)."""
    lengths = torch.randint(0, 4, (3 * B,), generator=gen)
    per_bag = torch.tensor([rows[0], rows[1], rows[0]]).repeat_interleave(B)
    values = (torch.rand(int(lengths.sum()), generator=gen) * per_bag.repeat_interleave(lengths)).long()
    labels = (torch.rand(B, generator=gen) < 0.4).to(torch.int32).repeat(3).repeat_interleave(lengths)
    weights = torch.rand(len(values), generator=gen) + 0.5
    tagged = ((weights.view(torch.int32) & ~1) | labels).view(torch.float32)
    return values, lengths, tagged


@pytest.mark.parametrize(
    "pooling,weighted,optimizer,dim,rows,batches,labelled",
    [
        ("sum", False, "rowwise_adagrad", 64, (30, 20), (9, 16, 1, 33, 8), True),
        ("mean", True, "rowwise_adagrad", 12, (30, 20), (9, 16, 1, 33, 8), True),
        ("none", False, "sgd", 4, (30, 20), (9, 16, 1, 33, 8), False),
        ("sum", True, "sgd", 40, (30, 20), (9, 16, 1, 33, 8), True),
        # thousands of distinct rows a step: both threads, several blocks of rows each
        ("sum", True, "rowwise_adagrad", 16, (6000, 4000), (1500, 2048, 1024), True),
    ],
    ids=["sum-adagrad-64", "mean-weighted-12", "none-sgd-4-unlabelled", "sum-weighted-sgd-40", "many-rows"],
)
def test_the_fused_backward_equals_the_separate_steps_bit_for_bit(
    monkeypatch, pooling, weighted, optimizer, dim, rows, batches, labelled
):
    """A store whose CPU backward runs as one op (`row_grads_update_`: row gradients, the
    optimizer, the row update; then Eq. 7) against the same store on the torch path (the ids
    grouped and the row gradients summed by torch, then Eq. 7, Adagrad or SGD and the row update
    in torch: each the reference of an op): steps of multi-id, empty and repeated-row bags over
    two tables (one a row and column slice), one gradient a NaN and one whose square overflows,
    batches of 1 (bags divided as integers) and of powers of two: outputs, rows, optimizer
    state, scores, last steps and skipped rows equal."""
    import copy

    from shark_torchrec.modules import row_lookup, row_optimizer
    from shark_torchrec.precision.priority import GROUP_NAMES

    tiers = ("fp32", "fp16", "int8", "int4", "int2")[: 5 if dim % 8 == 0 else 4]  # int2 rows need dim % 8 == 0
    store = _store(dim, pooling, weighted, optimizer, tiers, rows=rows, label_tagged=labelled)
    n = store.num_rows
    gen = torch.Generator().manual_seed(dim)
    ids = torch.tensor([GROUP_NAMES.index(t) for t in tiers], dtype=torch.int8)
    store.set_groups(ids[torch.randint(0, len(ids), (n,), generator=gen)])
    store.write_rows(torch.arange(n), torch.randn(n, dim, generator=gen))
    fused, reference = copy.deepcopy(store), copy.deepcopy(store)
    fused.kernels, reference.kernels = "cpp", "torch"
    assert fused.can_fuse_backward() and not reference.can_fuse_backward()
    calls = []
    real = row_optimizer.row_grads_update_
    monkeypatch.setattr(row_optimizer, "row_grads_update_", lambda *a: calls.append(len(a[5])) or real(*a))
    torch_sums = []
    real_sums = row_lookup.RowLookup._row_grads_torch
    monkeypatch.setattr(row_lookup.RowLookup, "_row_grads_torch", lambda *a: torch_sums.append(1) or real_sums(*a))
    for step, B in enumerate(batches, start=1):
        fused.step.value = reference.step.value = step
        values, lengths, tagged = _batch(gen, B, rows)
        outs = [s(values, lengths, tagged, B) for s in (fused, reference)]
        assert same_bits(outs[0], outs[1]), step
        upstream = torch.randn(outs[0].shape, generator=gen)
        if step == 2:
            upstream[0, 0] = float("nan")  # the rows of bag (a, 0) (or of the first id) are skipped
            upstream[1, 1] = 1e20  # finite, but its square overflows under Adagrad
        for s, out in zip((fused, reference), outs):
            out.backward(upstream)
        for name in ("weights", "momentum", "row_priority", "row_seen_step"):
            assert torch.equal(getattr(fused, name), getattr(reference, name)), (step, name)
    assert len(calls) == len(torch_sums) == len(batches)
    assert fused.nonfinite_rows == reference.nonfinite_rows > 0
    assert not torch.equal(fused.weights, store.weights)
    if rows[0] > 1000:
        assert min(calls) > 2 * 512  # each thread's share spans more than one block of rows


@pytest.mark.parametrize(
    "tiers,policy",
    [
        (("fp32", "int8", "dropped"), {}),  # dropped rows' gradients go to their fallback rows
        (("fp32", "int8"), {"signal": "eq7-grad"}),  # Eq. 7 weighted by the gradients' norms
        (("fp32", "int8"), {"momentum_dtype": "bf16"}),  # a state rounded with its own noise
    ],
)
def test_stores_that_need_the_steps_apart_do_not_fuse_them(tiers, policy):
    """The fused backward stands in only where it equals the separate steps; elsewhere the
    store keeps them (and trains as before: `test_the_optimizer_step_on_cpu_...`)."""
    store = _store(16, "sum", False, "rowwise_adagrad", tiers, **policy)
    store.kernels = "cpp"
    assert not store.can_fuse_backward()
    assert _store(16, "sum", False, "rowwise_adagrad", ("fp32", "int8")).can_fuse_backward()


def test_the_fused_mean_squares_are_torchs_and_a_torch_that_adds_otherwise_is_caught(monkeypatch):
    """`row_mean_squares` adds each row in torch's order: equal to (g * g).mean(dim=1) bit for
    bit for every width the stores allow up to 4096, on rows spanning 2^-30 to 2^30 (where
    another order changes most rows' last bits); a torch that adds otherwise is caught by
    `fused_backward_agrees`, with a warning, and the store keeps the separate steps."""
    import shark_torchrec.kernels as kernels

    gen = torch.Generator().manual_seed(1)
    for dim in (4, 8, 12, 16, 20, 28, 36, 64, 68, 100, 128, 132, 256, 520, 1024, 4096):
        rows = torch.randn(300, dim, generator=gen) * torch.exp2(torch.randint(-30, 30, (300, dim), generator=gen))
        assert same_bits(kernels.row_mean_squares(rows), (rows * rows).mean(dim=1)), dim
    monkeypatch.setattr(kernels, "_agrees", {})
    monkeypatch.setattr(kernels, "row_mean_squares", lambda rows: (rows * rows).sum(dim=1).flip(0) / rows.shape[1])
    with pytest.warns(UserWarning, match="another order"):
        assert not kernels.fused_backward_agrees(16)
    store = _store(16, "sum", False, "rowwise_adagrad", ("fp32", "int8"))
    assert not store.can_fuse_backward()


def test_arguments_that_defeat_a_total_are_refused_not_read_out_of_range():
    """Found under ASan and UBSan with hand-made arguments (none of the other tests reach
    them): lengths near 2^62 that wrapped the bags' running sum to the number of ids, a
    negative count balanced by a larger one, a block start whose sum with its length
    overflowed, a negative feature base or group offset. Each read memory out of range, made
    garbage or read as a marker; each is now a clear error."""
    from shark_torchrec.kernels import POOLING_CODES, split_ranking_keys

    gen = torch.Generator().manual_seed(5)
    w, offsets, row_map, ends, shift = random_layout(gen, [50], 8)
    base, rows = torch.tensor([0]), torch.tensor([50])
    values = torch.tensor([3])

    def lookup(lengths, base=base, offsets=offsets):
        B = len(lengths)
        return mixed_lookup(w, offsets, row_map, ends, shift, base, rows, values, lengths, None, 8, B, "sum", 1, ["x"])

    huge = 1 << 62
    with pytest.raises(RuntimeError, match="bag 0 has 4611686018427387904 ids where 1"):
        lookup(torch.tensor([huge, huge, huge, huge + 1]))  # adds up to 1 in int64
    with pytest.raises(RuntimeError, match="feature_base must be >= 0"):
        lookup(torch.tensor([1]), base=torch.tensor([-1]))
    with pytest.raises(RuntimeError, match="group_offsets must be >= 0"):
        lookup(torch.tensor([1]), offsets=offsets - offsets.max() - 1)
    assert lookup(torch.tensor([1])).shape == (1, 8)

    grad, order, seg = torch.randn(1, 8), torch.tensor([0, 1]), torch.tensor([0, 0])
    lengths = torch.tensor([2])
    for counts, says in (([3, -1], "row 0 counts 3 ids where 2 remain"), ([-1, 3], "row 0 counts -1 ids")):
        with pytest.raises(RuntimeError, match=says):
            torch.ops.shark.row_grads(
                grad, order, torch.tensor(counts), seg, lengths, None, None, 1, POOLING_CODES["sum"], 8
            )

    with pytest.raises(RuntimeError, match="rows must lie in"):
        split_ranking_keys(torch.rand(4), (1 << 63) - 2, torch.empty(4, dtype=torch.int64))


def test_ids_and_bags_out_of_range_are_refused_not_read():
    """Found by a review after the sanitizer run: the order's and the bags' values (not only
    their counts), the weights' and labels' lengths, and a feature base so large that base +
    id wrapped negative (the lookup skipped such an id: zeros, no error). Each read out of
    range (a crash, or garbage) or was silently wrong; each is now a clear error."""
    from shark_torchrec.kernels import POOLING_CODES

    gen = torch.Generator().manual_seed(5)
    w, offsets, row_map, ends, shift = random_layout(gen, [50], 8)

    def lookup(base):
        return mixed_lookup(
            w,
            offsets,
            row_map,
            ends,
            shift,
            torch.tensor([base]),
            torch.tensor([50]),
            torch.tensor([3]),
            torch.tensor([1]),
            None,
            8,
            1,
            "sum",
            1,
            ["x"],
        )

    with pytest.raises(RuntimeError, match="outside the group tables|row map"):
        lookup((1 << 63) - 2)  # + 3 wrapped negative
    assert lookup(0).abs().sum() > 0

    grad, lengths = torch.randn(1, 8), torch.tensor([2])

    def row_grads(order, seg, psw=None, labels=None, pooling="sum"):
        return torch.ops.shark.row_grads(
            grad,
            torch.tensor(order),
            torch.tensor([2]),
            torch.tensor(seg),
            lengths,
            psw,
            labels,
            1,
            POOLING_CODES[pooling],
            8,
        )

    for order, seg, says in (
        ([0, 3], [0, 0], r"order\[1\] = 3 is no id of 2"),
        ([0, 1 << 40], [0, 0], "is no id of 2"),
        ([0, 1], [0, 1 << 40], r"seg\[1\] = 1099511627776 is no bag of 1"),
        ([0, 1], [0, 5], "is no bag of 1"),
        ([0, 1], [-1, 0], "is no bag of 1"),
    ):
        for pooling in ("sum", "mean"):
            with pytest.raises(RuntimeError, match=says):
                row_grads(order, seg, pooling=pooling)
    with pytest.raises(RuntimeError, match=r"per_sample_weights: one per id \(2\), got 1"):
        row_grads([0, 1], [0, 0], psw=torch.tensor([1.0]))
    with pytest.raises(RuntimeError, match=r"labels: one per id \(2\), got 3"):
        row_grads([0, 1], [0, 0], labels=torch.tensor([1.0, 0.0, 1.0]))
    assert row_grads([1, 0], [0, 0], psw=torch.tensor([1.0, 2.0]), labels=torch.tensor([1.0, 0.0]))[0].shape[0] == 1

    with pytest.raises(RuntimeError, match="beyond int64"):
        torch.ops.shark.ids_by_row(torch.tensor([5]), torch.tensor([1]), torch.tensor([(1 << 63) - 2]), 1)

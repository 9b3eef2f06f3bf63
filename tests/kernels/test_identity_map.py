"""A one-tier store keeps no row map: its rows sit in key order in their one group, and every op
(C++, Triton, their torch references) reads an empty row map as the identity. Each op on the
empty map must equal the same op on the explicit identity map, bit for bit; a store of one
tier must train as one that keeps the map, and take it back when a checkpoint's mixed groups
are loaded into it."""

import copy

import pytest
import torch

from helpers.checks import check_row_map
from helpers.kernel_layouts import bags, same_bits
from shark_torchrec.kernels import mixed_lookup, update_rows_
from shark_torchrec.kernels.reference import mixed_lookup_reference
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter
from shark_torchrec.precision.priority import GROUP_NAMES, INT4, INT8, row_bytes
from shark_torchrec.precision.quantize import rounding_noise_starts
from shark_torchrec.triton_kernels import mixed_lookup as triton_lookup
from shark_torchrec.triton_kernels import update_rows_ as triton_update
from shark_torchrec.triton_kernels.reference import mixed_lookup_torch, update_rows_torch

TABLES = [37, 5, 120]


def one_group_layout(gen, group, dim):
    """Every row of TABLES in `group`, in key order: the buffer, offsets, the explicit identity
    map, range_ends and range_shift (the layout a one-tier store has)."""
    n = sum(TABLES)
    rb = row_bytes(dim, group)
    w = torch.randint(0, 256, (n * rb,), generator=gen, dtype=torch.uint8)
    rows = w.view(n, rb)
    if group == 0:
        rows[:, : 4 * dim].view(torch.float32).copy_(torch.randn(n, dim, generator=gen))
    elif group == 1:
        rows[:, : 2 * dim].view(torch.float16).copy_(torch.randn(n, dim, generator=gen).half())
    else:
        sb = torch.stack([torch.rand(n, generator=gen) * 0.1, torch.randn(n, generator=gen)], 1)
        rows[:, :4].view(torch.float16).copy_(sb.half())
    offsets = torch.zeros(group + 1, dtype=torch.int64)
    ends = torch.tensor([0] * group + [n] * (5 - group), dtype=torch.int32)
    shift = torch.zeros(6, dtype=torch.int32)
    shift[5] = n
    return w, offsets, torch.arange(n, dtype=torch.int32), ends, shift


EMPTY = torch.zeros(0, dtype=torch.int32)


@pytest.mark.parametrize("group", range(5))
@pytest.mark.parametrize("pooling,weighted", [("sum", False), ("mean", True), ("none", False)])
def test_every_lookup_reads_an_empty_map_as_the_identity(group, pooling, weighted):
    gen = torch.Generator().manual_seed(group)
    dim = 16
    w, offsets, identity, ends, shift = one_group_layout(gen, group, dim)
    base, rows = torch.tensor([0, 37, 42, 0]), torch.tensor([37, 5, 120, 37])
    B = 9
    values, lengths = bags(gen, [37, 5, 120, 37], B, max_len=4)
    psw = torch.rand(values.numel(), generator=gen) if weighted else None
    tail = (base, rows, values, lengths, psw, dim, B, pooling, 1, list("abcd"))
    want = mixed_lookup_reference(w, offsets, identity, ends, shift, *tail)
    assert want.abs().sum() > 0
    for op in (mixed_lookup, mixed_lookup_reference, triton_lookup, mixed_lookup_torch):
        assert same_bits(op(w, offsets, EMPTY, ends, shift, *tail), want), op


def test_an_id_outside_its_table_is_named_under_the_identity_map():
    gen = torch.Generator().manual_seed(1)
    w, offsets, _, ends, shift = one_group_layout(gen, INT4, 8)
    base, rows = torch.tensor([0, 37, 42]), torch.tensor([37, 5, 120])
    tail = (torch.tensor([1, 5, 3]), torch.tensor([1, 1, 1]), None, 8, 1, "sum", 1, ["u", "item", "c"])
    for op in (mixed_lookup, triton_lookup, mixed_lookup_torch):
        with pytest.raises((RuntimeError, ValueError), match="feature item: id 5 outside its table of 5 rows"):
            op(w, offsets, EMPTY, ends, shift, base, rows, *tail)


@pytest.mark.parametrize("group", range(5))
def test_every_update_reads_an_empty_map_as_the_identity(group):
    gen = torch.Generator().manual_seed(10 + group)
    dim = 16
    w, offsets, identity, ends, shift = one_group_layout(gen, group, dim)
    n = 70
    keys = torch.randperm(sum(TABLES), generator=gen)[:n]
    grad = torch.randn(n, dim, generator=gen)
    scale = torch.rand(n, generator=gen)
    start, table = rounding_noise_starts(7, 3, 0, keys, torch.zeros(n, dtype=torch.long))
    want = w.clone()
    update_rows_(want, offsets, identity, ends, shift, keys, grad, scale, table, start, dim, 1)
    assert not torch.equal(want, w)
    for op in (update_rows_, triton_update, update_rows_torch):
        got = w.clone()
        op(got, offsets, EMPTY, ends, shift, keys, grad, scale, table, start, dim, 1)
        assert torch.equal(got, want), op
    got = w.clone()
    with pytest.raises(RuntimeError, match="outside the row map or the group tables"):
        outside = torch.tensor([sum(TABLES)])
        update_rows_(got, offsets, EMPTY, ends, shift, outside, grad[:1], scale[:1], table, start[:1], dim, 1)


def store_of(policy):
    tables = [
        LocalTable("t0", 300, 16, global_rows=300, table_id=3),
        LocalTable("t1", 200, 16, global_rows=200, table_id=5),
    ]
    return RowGroupStore(tables, ["a", "b"], [0, 1], policy.resolved([16]), StepCounter())


def test_a_one_tier_store_keeps_no_row_map_and_trains_as_one_that_does():
    store = store_of(PrecisionPolicy(mode="int4", optimizer="rowwise_adagrad", learning_rate=0.1))
    n = store.num_rows
    store.set_groups(torch.full((n,), INT4, dtype=torch.int8))
    assert store.identity_map and store.row_map.numel() == 0
    check_row_map(store)
    assert sum(b["embedding_bytes"] for b in store.table_bytes()) == n * row_bytes(16, INT4)
    # Its twin keeps the explicit map (what a one-tier store held before).
    twin = copy.deepcopy(store)
    twin.identity_map, twin.row_map = False, torch.arange(n, dtype=torch.int32)
    gen = torch.Generator().manual_seed(0)
    store.write_rows(torch.arange(n), torch.randn(n, 16, generator=gen))
    twin.write_rows(torch.arange(n), store.read_rows(torch.arange(n)))
    for step in range(1, 4):
        keys = torch.randperm(n, generator=gen)[: n // 2]
        grad = torch.randn(len(keys), 16, generator=gen) * 0.01
        scale = torch.rand(len(keys), generator=gen)
        for kernels in ("cpp", "torch"):
            a, b = copy.deepcopy(store), copy.deepcopy(twin)
            a.step_rows(keys, grad, scale, step, kernels=kernels)
            b.step_rows(keys, grad, scale, step, kernels=kernels)
            assert torch.equal(a.weights, b.weights), (step, kernels)
        store.step_rows(keys, grad, scale, step, kernels="cpp")
        twin.step_rows(keys, grad, scale, step, kernels="cpp")
    assert store.row_map.numel() == 0
    # The same groups again (a checkpoint of this tier) move nothing and keep no map.
    assert set(store.set_groups(torch.full((n,), INT4, dtype=torch.int8)).values()) == {0}
    assert store.identity_map


def test_mixed_groups_loaded_into_a_one_tier_store_bring_the_row_map_back():
    store = store_of(PrecisionPolicy(mode="int4", optimizer="sgd", learning_rate=0.1))
    n = store.num_rows
    store.set_groups(torch.full((n,), INT4, dtype=torch.int8))
    refused = torch.full((n,), INT4, dtype=torch.int8)
    refused[0] = 5  # dropped: not a tier of this policy
    with pytest.raises(ValueError, match="rows can be dropped only"):
        store.set_groups(refused)
    assert store.identity_map and store.row_map.numel() == 0  # nothing changed
    values = torch.randn(n, 16, generator=torch.Generator().manual_seed(2))
    store.write_rows(torch.arange(n), values)
    before = store.read_rows(torch.arange(n))
    groups = torch.full((n,), INT4, dtype=torch.int8)
    groups[::3] = INT8
    moved = store.set_groups(groups)
    assert moved[GROUP_NAMES[INT8]] == len(groups[::3])
    assert not store.identity_map and store.row_map.numel() == n
    check_row_map(store)
    assert torch.equal(store.groups_of(torch.arange(n)), groups)
    assert torch.allclose(store.read_rows(torch.arange(n)), before, atol=1e-2)  # int4 -> int8 holds the values

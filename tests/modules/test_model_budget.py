"""One memory budget for all tables of a collection (`budget_scope="model"`): rows of every
table compete by priority per byte; sharded on 2 ranks (row-wise, column-wise and
data-parallel tables) it picks the rows a row-by-row reference picks, also when the tables
belong to two collections of one model (`share_model_budget`)."""

import warnings

import pytest
import torch

from helpers import mp_workers as W
from helpers.reference import model_budget_groups
from shark_torchrec.distributed.env import launch
from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.precision.priority import (
    FP16,
    FP32,
    INT8,
    ROW_MAP_BYTES,
    BudgetError,
    decayed,
    model_budget_cuts,
    per_byte_scores,
    ranking_keys,
    sliced_row_bytes,
)


def cuts_for(scores, dims, budget, fp32_fraction=0.02, groups=(FP32, FP16, INT8)):
    """model_budget_cuts on whole tables held in one process."""
    keys, base = [], 0
    for s, d in zip(scores, dims):
        keys.append(torch.sort(ranking_keys(per_byte_scores(s, d), torch.arange(len(s)) + base)).values)
        base += len(s)

    def count_at_least(cut):
        return torch.tensor([len(k) - int(torch.searchsorted(k, torch.tensor(cut))) for k in keys])

    cuts = model_budget_cuts(
        count_at_least, [len(s) for s in scores], [(d,) for d in dims], dims, budget, fp32_fraction, groups
    )
    out, base = [], 0
    for s, d in zip(scores, dims):
        k = ranking_keys(per_byte_scores(s, d), torch.arange(len(s)) + base)
        base += len(s)
        g = torch.full((len(s),), max(groups), dtype=torch.int8)
        for cut, group in reversed(list(zip(cuts, sorted(groups)[:-1]))):
            g[k >= cut] = group
        out.append(g)
    return out


def used_bytes(groups, dims):
    return sum(sum(sliced_row_bytes((d,), int(x)) for x in g.tolist()) for g, d in zip(groups, dims))


def test_a_small_hot_table_keeps_precision_a_large_cold_one_gives_up():
    gen = torch.Generator().manual_seed(0)
    hot, cold = torch.rand(20, generator=gen) + 10.0, torch.rand(2000, generator=gen)
    dims = [16, 16]
    per_table = PrecisionPolicy(memory_budget=0.45, fp32_fraction=0.0, optimizer="sgd", learning_rate=0.1, eps=1e-8)
    assert per_table.budget_scope == "table"
    groups = cuts_for([hot, cold], dims, 0.45, fp32_fraction=0.0)
    assert bool((groups[0] == FP16).all())  # every hot row fp16: a table-wise 0.45 would keep most int8
    fp32_bytes = (20 + 2000) * 16 * 4
    assert used_bytes(groups, dims) <= 0.45 * fp32_bytes
    # The spare bytes are spent: one more fp16 row would not fit.
    assert used_bytes(groups, dims) + sliced_row_bytes((16,), FP16) - sliced_row_bytes((16,), INT8) > 0.45 * fp32_bytes
    # Reference, row by row.
    want = model_budget_groups({"a": hot, "b": cold}, {"a": (16,), "b": (16,)}, 0.45, 0.0)
    assert torch.equal(groups[0], want["a"]) and torch.equal(groups[1], want["b"])


def test_priority_is_per_byte_and_budget_is_monotone():
    gen = torch.Generator().manual_seed(1)
    narrow, wide = torch.rand(300, generator=gen), torch.rand(300, generator=gen)
    dims = [16, 64]
    fp32_bytes = 300 * 16 * 4 + 300 * 64 * 4
    used, precise = [], []
    for budget in (0.4, 0.5, 0.7, 0.9, 1.2):
        groups = cuts_for([narrow, wide], dims, budget, fp32_fraction=0.05)
        want = model_budget_groups({"a": narrow, "b": wide}, {"a": (16,), "b": (64,)}, budget, 0.05)
        assert torch.equal(groups[0], want["a"]) and torch.equal(groups[1], want["b"]), budget
        used.append(used_bytes(groups, dims))
        precise.append(sum(int((g != INT8).sum()) for g in groups))
        assert used[-1] <= budget * fp32_bytes
    assert used == sorted(used) and precise == sorted(precise)
    # Equal scores: a row of the narrow table is worth four of the wide one per byte.
    same = torch.full((300,), 0.5)
    groups = cuts_for([same, same], dims, 0.45, fp32_fraction=0.0)
    assert bool((groups[0] == FP16).all()) and 0 < int((groups[1] == FP16).sum()) < 300  # narrow first


def test_a_model_budget_with_dropped_rows_keeps_a_head_as_the_reference_does():
    """Tiers int8/int4/int2/dropped over two tables of different dims, at budgets that drop
    rows and budgets that do not: the cuts give the row-by-row reference's groups (the head of
    the model-wide ranking int8, the next rows int2, the rest dropped), the bytes (with a
    fallback row per table) fit, and rows only gain precision as the budget grows."""
    from shark_torchrec.precision.priority import DROPPED, INT2, INT4

    gen = torch.Generator().manual_seed(2)
    narrow, wide = torch.rand(600, generator=gen) ** 4, torch.rand(400, generator=gen) ** 4
    dims = [16, 64]
    groups = (INT8, INT4, INT2, DROPPED)
    fp32_bytes = 600 * 16 * 4 + 400 * 64 * 4
    last = None
    for budget in (0.04, 0.06, 0.08, 0.1, 0.14, 0.2, 0.3):
        got = cuts_for([narrow, wide], dims, budget, fp32_fraction=0.05, groups=groups)
        want = model_budget_groups({"a": narrow, "b": wide}, {"a": (16,), "b": (64,)}, budget, 0.05, groups)
        assert torch.equal(got[0], want["a"]) and torch.equal(got[1], want["b"]), budget
        assert used_bytes(got, dims) + 4 * (16 + 64) <= budget * fp32_bytes, budget
        everything = torch.cat(got)
        if bool((everything == DROPPED).any()):
            assert 0 < int((everything == INT8).sum()) <= 50 and not bool((everything == INT4).any()), budget
        cumulative = [int((everything <= g).sum()) for g in groups]
        if last is not None:
            assert all(a >= b for a, b in zip(cumulative, last)), budget
        last = cumulative
    assert bool((torch.cat(cuts_for([narrow, wide], dims, 0.08, 0.05, groups)) == DROPPED).any())


def test_a_model_budget_below_the_floor_is_refused():
    with pytest.raises(BudgetError, match="model's tables"):
        cuts_for([torch.rand(10), torch.rand(10)], [16, 16], 0.3)
    with pytest.raises(ValueError, match="budget_scope"):
        PrecisionPolicy(budget_scope="model", row_fractions=(0.1, 0.2))
    with pytest.raises(ValueError, match="budget_scope"):
        PrecisionPolicy(budget_scope="rack")


MIXED = {"t0": "row_wise", "t1": "column_wise", "t2": "data_parallel"}
SHARED = {"reassign_every": 1, "memory_budget": 0.5, "budget_scope": "model", "fp32_fraction": 0.05}


def final_groups_and_reference(tables, steps, widths):
    """Each table's groups (every 4-column unit alike) and the row-by-row reference's on the
    final scores of all tables under one budget."""
    policy = W.policy(**SHARED)
    scores = {}
    for n, rows, _ in W.TABLES:
        groups = tables[f"{n}.row_group"]
        assert (groups == groups[:, :1]).all(), n  # every 4-column unit (slice) of a row alike
        scores[n] = decayed(
            tables[f"{n}.row_priority"][:, 0], tables[f"{n}.row_seen_step"][:, 0], steps - 1, policy.beta
        )
    want = model_budget_groups(scores, widths, SHARED["memory_budget"], SHARED["fp32_fraction"])
    return {n: tables[f"{n}.row_group"][:, 0] for n, _, _ in W.TABLES}, want


def test_two_collections_on_two_ranks_share_one_budget():
    """Row-wise and column-wise tables in one collection, a data-parallel table in another, on
    2 ranks under one model budget (`share_model_budget`): after the last reassignment every
    slice and replica of a row is in the same group, the groups are the row-by-row
    reference's over all three tables' final scores, they differ from the per-table rule's,
    and the bytes the collections report fit the budget together; the gradient-weighted
    signal is refused for the column-wise table."""
    steps = 3
    got = launch(W.two_collection_run, 2, MIXED, steps, SHARED)
    widths = {n: (8, 8) if MIXED[n] == "column_wise" else (W.DIM,) for n, _, _ in W.TABLES}
    groups, want = final_groups_and_reference(got["tables"], steps, widths)
    for n, rows, _ in W.TABLES:
        assert torch.equal(groups[n], want[n]), n
    per_table = [int((want[n] != INT8).sum()) / rows for n, rows, _ in W.TABLES]
    assert max(per_table) - min(per_table) > 0.2, per_table  # not each table's own share
    mem = got["memory"]
    fp32 = sum(rows * W.DIM * 4 for _, rows, _ in W.TABLES)
    assert sum(mem[n]["embedding_bytes"] for n, _, _ in W.TABLES) <= 0.5 * fp32
    assert sum(mem[n]["embedding_bytes"] for n, _, _ in W.TABLES) > 0.45 * fp32  # and spent
    # signal="eq7-grad" needs whole rows: the same plan (t1 column-wise) is refused, naming the table.
    assert "needs whole rows" in got["grad_signal_refusal"] and "['t1']" in got["grad_signal_refusal"]


def test_collections_of_one_model_share_one_budget_unsharded():
    """The same on one process: coupled, the groups are the reference's over all tables;
    left alone, each collection spends the budget on its own tables (other groups, a warning);
    collections whose policies differ cannot share."""
    from shark_torchrec.modules.model_budget import share_model_budget

    steps = 3
    widths = {n: (W.DIM,) for n, _, _ in W.TABLES}
    results = {}
    for share in (True, False):
        model = W.TwoCollections(SHARED)
        for m in (model.a, model.b):
            m.materialize(torch.device("cpu"), init=W.init_values)
        budget = share_model_budget(model) if share else None
        assert (budget is not None) == share
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            W.two_collection_steps(model, steps, 0, 1)
        assert any("share_model_budget" in str(w.message) for w in caught) != share
        tables = {**W.logical_tables(model.a), **W.logical_tables(model.b)}
        results[share] = final_groups_and_reference(tables, steps, widths)
    groups, want = results[True]
    for n, _, _ in W.TABLES:
        assert torch.equal(groups[n], want[n]), n
    assert not model.a.groups_fresh and not model.b.groups_fresh
    alone, _ = results[False]  # (model: the unshared one, last built)
    assert any(not torch.equal(alone[n], want[n]) for n, _, _ in W.TABLES)
    odd = W.TwoCollections(SHARED)
    odd.b = MixedPrecisionEmbeddingBagCollection(
        W.tables()[2:], precision_policy=W.policy(**{**SHARED, "memory_budget": 0.6})
    )
    for m in (odd.a, odd.b):
        m.materialize(torch.device("cpu"))
    with pytest.raises(ValueError, match="differ in memory_budget"):
        share_model_budget(odd)


def test_the_planner_sizes_a_table_for_the_most_the_model_budget_lets_it_take():
    """The storage estimate of a whole table under a model budget bounds its bytes when its
    rows outrank every other table's (the most it can take), and exceeds the per-table one."""
    from shark_torchrec.planner.storage import model_scope_share, shard_bytes

    policy = W.policy(memory_budget=0.6, budget_scope="model", fp32_fraction=0.05).resolved([W.DIM])
    tables = {n: (rows, W.DIM) for n, rows, _ in W.TABLES}
    share = model_scope_share(policy, tables)
    metadata = ROW_MAP_BYTES + 4 + 8  # row map, Adagrad state, score: what shard_bytes adds per row besides weights
    for hot, rows, _ in W.TABLES:
        scores = [torch.full((r,), 10.0) if n == hot else torch.rand(r) for n, r, _ in W.TABLES]
        groups = cuts_for(scores, [W.DIM] * len(scores), 0.6, fp32_fraction=0.05)
        taken = used_bytes([groups[[n for n, _, _ in W.TABLES].index(hot)]], [W.DIM])
        estimate = shard_bytes(share[hot], hot, rows, rows, W.DIM) - rows * (metadata - ROW_MAP_BYTES)
        assert taken <= estimate, hot
        assert estimate > shard_bytes(policy, hot, rows, rows, W.DIM) - rows * (metadata - ROW_MAP_BYTES), hot


def test_a_collection_below_its_floor_is_paid_for_by_the_others_once_shared():
    """Tiers int8/int2/dropped at 0.07 of fp32: the second collection's one small table cannot
    meet it alone (its row map and fallback row), so it starts at its floor with a warning;
    shared, every table starts at its share and the model's bytes fit the budget, and one step
    counter serves both collections (one that sits out a step still sees it counted)."""
    from shark_torchrec.modules.model_budget import share_model_budget

    kw = {"tiers": ("int8", "int2", "dropped"), "memory_budget": 0.07, "budget_scope": "model", "reassign_every": 1}
    fp32 = sum(rows * W.DIM * 4 for _, rows, _ in W.TABLES)

    def embedding_bytes(model):
        return sum(b["embedding_bytes"] for m in (model.a, model.b) for s in m.stores for b in s.table_bytes())

    with pytest.warns(UserWarning, match="start at their floors"):
        alone = W.TwoCollections(kw)
        for m in (alone.a, alone.b):
            m.materialize(torch.device("cpu"), init=W.init_values)
    assert embedding_bytes(alone) > 0.07 * fp32
    shared = W.TwoCollections(kw)
    for m in (shared.a, shared.b):
        m.materialize(torch.device("cpu"), init=W.init_values)
    share_model_budget(shared)
    assert embedding_bytes(shared) <= 0.07 * fp32
    keys, lengths, values, labels, G = W.batch(0)
    kjt, _, _ = W.local_kjt(keys, lengths, values, labels, 0, 1)
    first, _ = kjt.split([3, 1])
    sum(v.sum() for v in shared.a(first).to_dict().values()).backward()  # only collection a trains
    W.two_collection_steps(shared, 1, 0, 1)  # then both: one step each, counted once
    assert shared.a.step_counter is shared.b.step_counter and shared.a.step_counter.value == 2
    assert all(s.step is shared.a.step_counter for m in (shared.a, shared.b) for s in m.stores)
    assert not shared.b.groups_fresh and embedding_bytes(shared) <= 0.07 * fp32


@pytest.mark.parametrize("implementation", ["cpp", "torch"])
def test_split_keys_count_as_a_sort_of_all_the_keys(implementation):
    """Reassignment sorts only the keys of rows with a score (`split_keys`): the rows of score 0
    come out in order, and the two runs count the keys at or above any cut as a sorted array of
    all the keys does (chunks of rows split across the runs), with the C++ op and its torch
    reference; the groups read off the sorted runs (`groups_from_sorted_keys`) are
    `groups_by_cuts` of the keys."""
    from shark_torchrec.kernels import split_ranking_keys
    from shark_torchrec.modules import reassign
    from shark_torchrec.precision.priority import (
        NO_CUT,
        groups_by_cuts,
        groups_from_sorted_keys,
        ranking_keys,
        split_ranking_keys_torch,
    )

    gen = torch.Generator().manual_seed(0)
    n, lo = 2_500, 300
    scores = torch.rand(n, generator=gen)
    scores[torch.rand(n, generator=gen) < 0.6] = 0.0
    scores[:40] = 0.0  # the first chunk's rows all of score 0
    keys = ranking_keys(scores, torch.arange(n) + 7)
    split = split_ranking_keys if implementation == "cpp" else split_ranking_keys_torch
    old, reassign.CHUNK_ROWS = reassign.CHUNK_ROWS, 256
    try:
        zeros, others = reassign.split_keys(
            lambda a, b, out: split(scores[a - lo : b - lo], a - lo + 7, out), lo, lo + n
        )
    finally:
        reassign.CHUNK_ROWS = old
    assert torch.equal(zeros, torch.sort(keys[scores == 0]).values)  # already in order
    others.numpy().sort()
    everything = torch.sort(keys).values
    assert torch.equal(others, everything[len(zeros) :])
    cuts = torch.cat([everything[torch.randint(0, n, (50,), generator=gen)], torch.tensor([0, 1 << 32, 1 << 62])])
    for cut in cuts:
        want = n - int(torch.searchsorted(everything, cut))
        got = sum(len(k) - int(torch.searchsorted(k, cut)) for k in (zeros, others))
        assert got == want
    # The groups read off the sorted runs are those of the keys under the same cuts.
    for tiers in ([0, 1, 2], [2, 3, 4, 5], [3, 4], [2]):
        picks = everything[torch.randint(0, n, (len(tiers) - 1,), generator=gen)]
        cuts = sorted((picks + torch.randint(-1, 2, picks.shape, generator=gen)).tolist(), reverse=True)
        for c in (cuts, [NO_CUT] * (len(tiers) - 1), [NO_CUT] + cuts[1:], [0] * (len(tiers) - 1)):
            out = torch.full((n,), -1, dtype=torch.int8)
            groups_from_sorted_keys((zeros, others), c, tiers, 7, out)
            assert torch.equal(out, groups_by_cuts(keys, c, tiers)), (tiers, c)

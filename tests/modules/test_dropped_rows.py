"""The dropped tier: rows with no bytes of their own that read their table's fallback row.

The fallback row takes the summed gradient of the table's dropped ids (over every shard of a
row-split table), a dropped row comes back from the fallback when its priority earns it, rows
are dropped only when the budget cannot keep them stored, and all of it is checkpointed,
exported, and equal on 1 and 2 ranks to the plain-torch reference."""

import json
import warnings

import pytest
import torch

from conftest import TINY, run_shark
from helpers import mp_workers as W
from helpers.checks import assert_follows_the_reference, check_row_map, compare_export
from shark_torchrec.distributed.env import launch
from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter
from shark_torchrec.precision.priority import DROPPED, FP32, INT8, ROW_MAP_BYTES, BudgetError, budget_counts, row_bytes


def store_of(rows=(40, 24), dim=8, **policy) -> RowGroupStore:
    tables = [LocalTable(f"t{i}", r, dim, global_rows=r, table_id=i) for i, r in enumerate(rows)]
    kw = {
        "mode": "shark",
        "tiers": ("int8", "dropped"),
        "row_fractions": (0.5,),
        "optimizer": "sgd",
        "learning_rate": 1.0,
        **policy,
    }
    store = RowGroupStore(
        tables,
        [f"f{i}" for i in range(len(rows))],
        list(range(len(rows))),
        PrecisionPolicy(**kw).resolved([dim]),
        StepCounter(),
    )
    g = torch.cat(
        [
            torch.tensor([INT8, DROPPED], dtype=torch.int8).repeat_interleave(torch.tensor([r // 2, r - r // 2]))
            for r in rows
        ]
    )
    store.set_groups(g)
    return store


def test_dropped_ids_train_their_tables_fallback_row_and_come_back_from_it():
    store = store_of()
    check_row_map(store)
    n, D = store.num_rows, store.dim
    values = torch.randn(n, D, generator=torch.Generator().manual_seed(0))
    store.write_rows(torch.arange(n), values)
    dropped = store.row_group == DROPPED
    kept_before = store.read_rows(torch.arange(n))[~dropped]
    assert torch.equal(
        store.read_rows(dropped.nonzero().flatten()), torch.zeros(int(dropped.sum()), D)
    )  # fallback starts at 0
    # One step touching dropped and stored rows of both tables.
    keys = torch.tensor([1, 25, 30, 39, 41, 60])  # t0: stored 1, dropped 25 30 39; t1 (from 40): stored 41, dropped 60
    grad = torch.randn(len(keys), D, generator=torch.Generator().manual_seed(1))
    store.apply_update(keys, grad, torch.ones(len(keys)), torch.zeros(len(keys)))
    store.apply_fallback_update()
    fallback = store.fallback_rows()
    assert torch.allclose(
        fallback[0], -(grad[1] + grad[2] + grad[3]), atol=1e-6
    )  # SGD, lr 1: minus the summed gradient
    assert torch.allclose(fallback[1], -grad[5], atol=1e-6)
    after = store.read_rows(torch.arange(n))
    assert torch.equal(after[dropped], fallback[store.table_of_rows(dropped.nonzero().flatten())])
    untouched = ~dropped & ~torch.isin(torch.arange(n), keys)
    assert torch.equal(after[untouched], store.read_rows(torch.arange(n))[untouched])
    assert not torch.equal(after[~dropped], kept_before)  # rows 1 and 41 stepped
    # Reassignment: some dropped rows come back (as the fallback, rounded into int8), some
    # stored rows are dropped; the fallback rows survive the rebuild.
    g = store.row_group.clone()
    g[[25, 30, 60]] = INT8
    g[[0, 2, 40]] = DROPPED
    store.set_groups(g)
    check_row_map(store)
    assert torch.equal(store.fallback_rows(), fallback)
    back = store.read_rows(torch.tensor([25, 30, 60]))
    want = fallback[[0, 0, 1]]
    step = (want.max(1).values - want.min(1).values) / 255
    assert ((back - want).abs().max(1).values <= step + 1e-6).all()
    assert torch.equal(store.read_rows(torch.tensor([0, 2, 40])), fallback[[0, 0, 1]])
    sizes = store.table_bytes()
    assert (
        sizes[0]["rows_dropped"] == 20 - 2 + 2
        and sizes[0]["embedding_bytes"] == 20 * row_bytes(D, INT8) + 40 * ROW_MAP_BYTES + 4 * D
    )


def test_rows_are_dropped_only_when_the_budget_needs_it():
    rows, dim = 1000, 16
    groups = (INT8, 4, DROPPED)  # int8, int2, dropped
    last_dropped, last_bytes = rows + 1, 0
    for budget in (0.08, 0.1, 0.14, 0.2, 0.204, 0.3, 0.4):
        c = budget_counts(rows, dim, budget, 0.0, groups=groups)
        used = sum(n * row_bytes(dim, g) for g, n in enumerate(c.as_tuple())) + rows * ROW_MAP_BYTES + 4 * dim
        assert used <= budget * rows * dim * 4 + 1e-6, budget
        assert c.dropped <= last_dropped and used >= last_bytes, budget
        stored_floor = (rows * (row_bytes(dim, 4) + ROW_MAP_BYTES) + 4 * dim) / (rows * dim * 4)
        assert (c.dropped > 0) == (budget < stored_floor), budget  # dropped only below the all-int2 floor
        assert c.dropped == 0 or c.int8 == 0, budget
        last_dropped, last_bytes = c.dropped, used
    with pytest.raises(BudgetError, match="the row map and the fallback row take"):
        budget_counts(rows, dim, 0.05, 0.0, groups=groups)


def test_a_tight_budget_keeps_a_head_in_the_top_tier_before_dropping():
    """Tiers int8/int4/int2/dropped, fp32_fraction 0.02: where the budget drops rows, the
    highest ranked 2% (within half the weight bytes) stay int8 and the rest of the kept rows are
    int2; where every row fits stored, at least that head stays int8. Rows only gain
    precision as the budget grows (the rows in the k most precise tiers never shrink), and
    the bytes fit. With the head's size 0 (fp32_fraction 0) or no tier above the cheapest
    stored one, every kept row is in the cheapest one."""
    from shark_torchrec.precision.priority import INT2, INT4

    rows, dim = 10_000, 64
    groups = (INT8, INT4, INT2, DROPPED)
    fp32 = rows * dim * 4
    last = None
    for budget in (0.02, 0.03, 0.05, 0.07, 0.0939, 0.094, 0.1, 0.15, 0.3):
        c = budget_counts(rows, dim, budget, 0.02, groups=groups).as_tuple()
        used = sum(n * row_bytes(dim, g) for g, n in enumerate(c)) + rows * ROW_MAP_BYTES + 4 * dim
        assert used <= budget * fp32 + 1e-6, budget
        weights = budget * fp32 - rows * ROW_MAP_BYTES - 4 * dim
        head = min(200, int(weights / 2 // row_bytes(dim, INT8)))
        if c[DROPPED]:
            assert c[INT8] == head and c[INT4] == 0, (budget, c)
            # Nothing is dropped that the bytes the head leaves could keep in int2.
            assert used + row_bytes(dim, INT2) > budget * fp32, budget
        else:
            assert c[INT8] >= 200, (budget, c)
        cumulative = [sum(c[: g + 1]) for g in groups]
        if last is not None:
            assert all(a >= b for a, b in zip(cumulative, last)), budget
        last = cumulative
    assert budget_counts(rows, dim, 0.05, 0.02, groups=groups).int8 == 200  # the head at 0.05
    assert budget_counts(rows, dim, 0.02, 0.02, groups=groups).int8 < 200  # capped by half the weight bytes
    tail_only = budget_counts(rows, dim, 0.05, 0.0, groups=groups)
    assert tail_only.int8 == 0 and tail_only.dropped > 0
    no_head = budget_counts(rows, dim, 0.05, 0.02, groups=(INT2, DROPPED))
    assert no_head.int2 + no_head.dropped == rows and no_head.dropped > 0


def test_a_budget_that_drops_every_row_of_a_table_warns_naming_it():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    tables = [EmbeddingBagConfig(name="tiny", embedding_dim=16, num_embeddings=100, feature_names=["f"])]
    policy = PrecisionPolicy(tiers=("int8", "dropped"), memory_budget=0.074, optimizer="sgd", learning_rate=0.1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        MixedPrecisionEmbeddingBagCollection(tables, device=torch.device("cpu"), precision_policy=policy)
    assert any("'tiny'" in str(w.message) and "drops every one" in str(w.message) for w in caught)


DROP = {"reassign_every": 1, "tiers": ("fp32", "int8", "dropped"), "memory_budget": None, "row_fractions": (0.1, 0.5)}


def test_dropped_rows_follow_the_reference_unsharded_on_two_ranks_and_through_a_checkpoint(tmp_path):
    """fp32, int8 and dropped rows (fixed fractions), reassigned every step so rows are
    dropped and revived: the unsharded module and 2 row-wise ranks (each holding a copy of
    every table's fallback row, summed over both) against the plain-torch reference; the
    2-rank checkpoint (DCP) loads into the unsharded module with the same fallback rows."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    steps = 3
    want = W.reference_math_run(steps, DROP)
    tiers = (FP32, INT8, DROPPED)
    assert_follows_the_reference(W.unsharded_run(steps, DROP), want, tiers)
    got = launch(W.sharded_run, 2, "row_wise", steps, DROP, False, str(tmp_path / "ckpt"))
    assert sorted(w for ws in got["widths"] for w in ws) == [16, 16]
    assert_follows_the_reference(got, want, tiers)
    for n, _, _ in W.TABLES:
        assert (got["tables"][f"{n}.fallback"].flatten() - want["tables"][f"{n}.fallback"]).abs().max() <= 1e-6, n
        assert want["tables"][f"{n}.fallback"].abs().sum() > 0, n  # the fallback did train
    # Every shard's copy of a table's fallback row came back from the checkpoint.
    copies = [c for rank in got["fallback_copies"] for c in rank]
    assert sorted({(n, r0 > 0) for n, r0, _ in copies}) == sorted((n, s) for n, _, _ in W.TABLES for s in (False, True))
    for n, _, v in copies:
        assert torch.equal(v, got["tables"][f"{n}.fallback"].flatten()), n
    dcp_to_torch_save(str(tmp_path / "ckpt"), str(tmp_path / "full.pt"))
    state = torch.load(tmp_path / "full.pt")
    module = W.make_module(False, DROP)
    module.materialize(torch.device("cpu"))
    module.load_state_dict(state)
    again = module.state_dict()
    for n, _, _ in W.TABLES:
        for key in ("fallback", "fallback_momentum", "weight", "row_group"):
            assert torch.equal(again[f"embedding_bags.{n}.{key}"], state[f"embedding_bags.{n}.{key}"]), (n, key)


def test_dropped_rows_train_export_and_serve_from_the_command_line(tmp_path):
    out = tmp_path / "drop"
    run_shark(
        "train",
        *TINY,
        "--synthetic-train-rows",
        "2000",
        "--embedding-dim",
        "16",
        "--precision",
        "shark",
        "--tiers",
        "int8",
        "int2",
        "dropped",
        "--memory-budget",
        "0.15",
        "--budget-scope",
        "model",
        "--reassign-every",
        "5",
        "--out",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    )
    m = json.loads((out / "m.json").read_text())
    assert m["rows_dropped"] > 0 and m["rows_int2"] > 0 and m["embedding_bytes"] <= 0.15 * m["fp32_embedding_bytes"]
    diff, ebc = compare_export(out / "checkpoints", m)
    assert diff < 1e-5 and ebc.group_rows()["rows_dropped"] == m["rows_dropped"]
    # Served in tiers without `dropped`: the rows dropped in training come back (as their fallback row).
    served = tmp_path / "served"
    run_shark(
        "export", str(out / "checkpoints"), "--out", str(served), "--tiers", "fp16", "int8", "--memory-budget", "0.5"
    )
    rec = json.loads((served / "export.json").read_text())
    assert rec["rows_dropped"] == 0 and rec["rows_fp16"] + rec["rows_int8"] == sum(
        v for k, v in m.items() if k.startswith("rows_")
    )


def test_a_model_budget_starts_small_tables_at_their_floor_paid_by_the_large_ones():
    from shark_torchrec.precision.budget import model_start_budgets

    policy = PrecisionPolicy(
        tiers=("int8", "int2", "dropped"), memory_budget=0.1, budget_scope="model", optimizer="sgd", learning_rate=0.1
    ).resolved([16])
    tables = {"tiny": (10, 16), "big": (5000, 16)}
    shares = model_start_budgets(policy, tables)
    fp32 = {n: r * d * 4 for n, (r, d) in tables.items()}
    assert shares["tiny"] > 0.1 > shares["big"]  # the tiny table alone could not meet 0.1
    total = sum(
        budget_counts(r, d, shares[n], 0.0, groups=policy.groups).as_tuple()[g] * row_bytes(d, g)
        for n, (r, d) in tables.items()
        for g in range(6)
    ) + sum(r * ROW_MAP_BYTES + 4 * d for r, d in tables.values())
    assert total <= 0.1 * sum(fp32.values()) + 1e-6
    # A table without rows takes nothing and gives nothing (it divided by its 0 fp32 bytes).
    stored = PrecisionPolicy(
        tiers=("int8", "int2"), memory_budget=0.2, budget_scope="model", optimizer="sgd", learning_rate=0.1
    ).resolved([16])
    with_empty = model_start_budgets(stored, {**tables, "empty": (0, 16)})
    assert with_empty == {**model_start_budgets(stored, tables), "empty": 0.2}
    with pytest.raises(BudgetError, match="model's tables"):
        model_start_budgets(
            PrecisionPolicy(
                tiers=("int8", "int2", "dropped"),
                memory_budget=0.0626,
                budget_scope="model",
                optimizer="sgd",
                learning_rate=0.1,
            ).resolved([16]),
            tables,
        )


def test_a_resumed_module_with_dropped_rows_continues_bit_for_bit():
    """State dict taken after 2 steps, loaded into a fresh module: 2 more steps give exactly
    the tensors of the module that never stopped (fallback rows and their optimizer state
    included), with rows dropped and revived at every step."""

    def train(module, steps):
        for step in steps:
            keys, lengths, values, labels, G = W.batch(step)
            kjt, _, _ = W.local_kjt(keys, lengths, values, labels, 0, 1)
            out = module(kjt)
            (torch.cat([out.to_dict()[k] for k in keys], dim=1) * G).sum().backward()

    straight = W.make_module(False, DROP)
    straight.materialize(torch.device("cpu"), init=W.init_values)
    train(straight, range(2))
    saved = {k: v.clone() for k, v in straight.state_dict().items()}
    train(straight, range(2, 4))
    resumed = W.make_module(False, DROP)
    resumed.materialize(torch.device("cpu"))
    resumed.load_state_dict(saved)
    train(resumed, range(2, 4))
    want, got = straight.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys() and any(k.endswith(".fallback") for k in want)
    for k in want:
        assert torch.equal(want[k], got[k]), k

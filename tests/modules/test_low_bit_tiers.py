"""Rows in int4 and int2 (FBGEMM's packed layouts) beside fp32, fp16 and int8: moves keep the
values, updates round stochastically, one-tier and ranked modes train and export the same
logits."""

import json
import re

import pytest
import torch

from conftest import TINY, run_shark
from helpers.checks import check_row_map, compare_export
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter
from shark_torchrec.precision.priority import FP16, FP32, INT2, INT4, INT8, ROW_MAP_BYTES, row_bytes

ALL = ("fp32", "fp16", "int8", "int4", "int2")


def store_of(rows=(300, 200), dim=16, **policy) -> RowGroupStore:
    tables = [LocalTable(f"t{i}", r, dim, global_rows=r, table_id=i) for i, r in enumerate(rows)]
    kw = {
        "mode": "shark",
        "tiers": ALL,
        "row_fractions": (0.2, 0.2, 0.2, 0.2),
        "optimizer": "sgd",
        "learning_rate": 1.0,
        **policy,
    }
    return RowGroupStore(
        tables,
        [f"f{i}" for i in range(len(rows))],
        list(range(len(rows))),
        PrecisionPolicy(**kw).resolved([dim]),
        StepCounter(),
    )


def step_of(values: torch.Tensor, bits: int) -> torch.Tensor:
    return (values.max(dim=1).values - values.min(dim=1).values) / ((1 << bits) - 1)


def test_rows_move_between_all_five_groups_keeping_their_values():
    store = store_of()
    n = store.num_rows
    g0 = torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    store.set_groups(g0)
    values = torch.randn(n, store.dim, generator=torch.Generator().manual_seed(1))
    store.write_rows(torch.arange(n), values)
    before = store.read_rows(torch.arange(n))
    check_row_map(store)
    for seed, same_sizes in ((2, False), (3, True)):
        g1 = (
            g0[torch.randperm(n, generator=torch.Generator().manual_seed(seed))]
            if same_sizes
            else (torch.randint(0, 5, (n,), generator=torch.Generator().manual_seed(seed)).to(torch.int8))
        )
        store.set_groups(g1)
        check_row_map(store)
        after = store.read_rows(torch.arange(n))
        stay = g0 == g1
        assert torch.equal(after[stay], before[stay])  # untouched rows keep their bytes
        err = (after - before).abs().max(dim=1).values
        assert (err[g1 == FP32] == 0).all()
        for g, bits in ((INT8, 8), (INT4, 4), (INT2, 2)):
            moved = (g1 == g) & ~stay
            assert (err[moved] <= step_of(before[moved], bits) * 0.51 + 1e-6).all(), bits
        counts = torch.bincount(g1.long(), minlength=5).tolist()
        want = sum(c * row_bytes(store.dim, g) for g, c in enumerate(counts))
        assert sum(b["embedding_bytes"] for b in store.table_bytes()) == want + n * ROW_MAP_BYTES
        g0, before = g1, after


@pytest.mark.parametrize("group, bits", [(INT4, 4), (INT2, 2)])
def test_low_bit_updates_round_stochastically(group, bits):
    """Updates of a quarter step, through the store's update path: the rows move by the sum of
    their updates on average; rounded to nearest they would not move."""
    n, steps = 4096, 60
    store = store_of(rows=(n,), dim=16)
    store.set_groups(torch.full((n,), group, dtype=torch.int8))
    start = torch.linspace(-1, 1, 16).repeat(n, 1)  # columns 0 and 15 hold the scale and bias
    store.write_rows(torch.arange(n), start)
    start = store.read_rows(torch.arange(n))
    delta = 0.25 * 2 / ((1 << bits) - 1)  # a quarter of the row's step
    grad = torch.zeros(n, 16)
    grad[:, 5] = delta / steps * 4  # total movement: 4 x delta over the steps
    for _ in range(steps):
        store.apply_update(torch.arange(n), grad, torch.ones(n), torch.zeros(n))
        store.step.value += 1
    moved = (start - store.read_rows(torch.arange(n)))[:, 5]
    # Each step a row jumps down one step (2 / levels) with probability update / step, else
    # stays: over 60 steps about one jump, with a variance under one step^2; over 4096 rows the
    # mean is within 0.016 step (1 sigma) of the sum of the updates, here asked within 0.0625.
    assert abs(moved.mean().item() - 4 * delta) < 0.25 * delta, (moved.mean().item(), 4 * delta)
    nearest = store_of(rows=(n,), dim=16)
    nearest.set_groups(torch.full((n,), group, dtype=torch.int8))
    nearest.write_rows(torch.arange(n), start)
    for _ in range(steps):
        values = nearest.read_rows(torch.arange(n)) - grad  # sgd, lr 1
        nearest.write_rows(torch.arange(n), values)  # no step: to nearest
    assert (nearest.read_rows(torch.arange(n))[:, 5] == start[:, 5]).all()  # stuck


@pytest.mark.parametrize("precision", ["int4", "int2"])
def test_one_low_bit_tier_trains_and_exports_the_same_logits(tmp_path, precision):
    out = tmp_path / precision
    run_shark(
        "train",
        *TINY,
        "--synthetic-train-rows",
        "2000",
        "--precision",
        precision,
        "--out",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    )
    m = json.loads((out / "m.json").read_text())
    rows = sum(t["fp32_embedding_bytes"] for t in m["tables"].values()) // (8 * 4)
    assert m[f"rows_{precision}"] == rows and m["test_auc"] > 0.55
    bits = 4 if precision == "int4" else 2
    # One tier: rows in key order, no row map (`identity_map`): the rows' bytes and nothing more.
    assert m["embedding_bytes"] == rows * (8 * bits // 8 + 4)
    diff, ebc = compare_export(out / "checkpoints", m)
    assert diff < 1e-5 and ebc.group_rows()[f"rows_{precision}"] == rows


def test_rows_ranked_into_low_bit_tiers_train_and_export(tmp_path):
    out = tmp_path / "mix"
    run_shark(
        "train",
        *TINY,
        "--synthetic-train-rows",
        "2000",
        "--precision",
        "shark",
        "--tiers",
        "fp16",
        "int8",
        "int4",
        "int2",
        "--row-fractions",
        "0.05",
        "0.1",
        "0.2",
        "--reassign-every",
        "5",
        "--out",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    )
    m = json.loads((out / "m.json").read_text())
    assert all(m[f"rows_{g}"] > 0 for g in ("fp16", "int8", "int4", "int2")) and m["rows_fp32"] == 0
    diff, _ = compare_export(out / "checkpoints", m)
    assert diff < 1e-5


def test_low_bit_flags_are_checked_by_name(capsys):
    from shark_torchrec.config import parse_cli

    for flags, named in (
        (["--precision", "shark", "--tiers", "fp16", "int3"], "tiers"),
        (["--precision", "int2", "--embedding-dim", "12"], "int2 rows need embedding dims that are multiples of 8"),
        (["--precision", "shark", "--tiers", "fp16", "int4", "--row-fractions", "0.1", "0.2"], "row_fractions"),
        (["--precision", "shark", "--tiers", "fp16", "int8", "int4", "--t8", "1", "--t16", "2"], "threshold mode"),
        (["--precision", "shark", "--tiers", "int4", "int2", "--memory-budget", "0.1"], "below what"),
    ):
        with pytest.raises(SystemExit):
            parse_cli(flags)
        assert named in capsys.readouterr().err, flags
    assert parse_cli(["--precision", "shark", "--tiers", "int4", "int2", "--memory-budget", "0.25"]).quant.tiers == (
        "int4",
        "int2",
    )
    commas = parse_cli(["--precision", "shark", "--tiers", "int4,int2", "--memory-budget", "0.25"])
    assert commas.quant.policy(0.1, 1e-8, 0).tiers == ("int4", "int2")
    # In Python too: what a one-tier mode would ignore is refused, naming it.
    for kwargs, named in (
        (dict(mode="int4", memory_budget=0.3), "memory_budget 0.3 is not used: mode 'int4' keeps every row in int4"),
        (dict(mode="fp16", tiers=("int8", "int4")), "tiers ('int8', 'int4') are not used"),
        (dict(mode="shark", tiers="int4"), "tiers is a sequence of tier names"),
    ):
        with pytest.raises(ValueError, match=re.escape(named)):
            PrecisionPolicy(**kwargs)


LOW_BIT = {
    "reassign_every": 1,
    "tiers": ("fp16", "int8", "int4", "int2"),
    "memory_budget": None,
    "row_fractions": (0.1, 0.2, 0.3),
}


def test_low_bit_rows_follow_the_reference_unsharded_and_on_two_ranks():
    """Rows ranked into fp16, int8, int4 and int2: the unsharded module and 2 row-wise ranks
    against the plain-torch reference (tests/helpers/reference.py: packed codes are not its business,
    the values and groups are), reassigned every step."""
    from helpers import mp_workers as W
    from helpers.checks import assert_follows_the_reference
    from shark_torchrec.distributed.env import launch

    want = W.reference_math_run(3, LOW_BIT)
    tiers = (FP16, INT8, INT4, INT2)
    assert_follows_the_reference(W.unsharded_run(3, LOW_BIT), want, tiers)
    assert_follows_the_reference(launch(W.sharded_run, 2, "row_wise", 3, LOW_BIT), want, tiers)


def test_low_bit_checkpoint_moves_between_plans_and_world_sizes(tmp_path):
    """Saved by 2 row-wise ranks with rows in fp16/int8/int4/int2, loaded by 1 table-wise rank:
    every tensor identical (int4 and int2 codes restored exactly under their scale/bias)."""
    from shark_torchrec.jobs.checkpoint import load_full_state, resolve_checkpoint

    flags = [
        *TINY,
        "--synthetic-train-rows",
        "2000",
        "--precision",
        "shark",
        "--tiers",
        "fp16",
        "int8",
        "int4",
        "int2",
        "--row-fractions",
        "0.05",
        "0.1",
        "0.2",
        "--reassign-every",
        "5",
    ]
    a, b = tmp_path / "a", tmp_path / "b"
    run_shark("train", *flags, "--nproc", "2", "--sharding-types", "row_wise", "--out", str(a))
    run_shark(
        "train",
        *flags,
        "--sharding-types",
        "table_wise",
        "--checkpoint",
        str(a / "checkpoints"),
        "--epochs",
        "0",
        "--out",
        str(b),
    )
    sa = load_full_state(resolve_checkpoint(a / "checkpoints"))["model"]
    sb = load_full_state(resolve_checkpoint(b / "checkpoints"))["model"]
    groups = torch.cat([sa[k][:, 0] for k in sa if k.endswith(".row_group")])
    assert all(int((groups == g).sum()) > 0 for g in (FP16, INT8, INT4, INT2))
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_grad_signal_weights_each_step_by_the_row_gradient_norm():
    """`eq7-grad`: two rows seen equally often score in proportion to their gradient norms
    (Eq. 7 alone scores them the same); t8/t16 refuse the signal."""
    scores = {}
    for signal in ("eq7", "eq7-grad"):
        store = store_of(signal=signal, beta=0.5)
        store.step.value = 1
        keys = torch.tensor([0, 1])
        grad = torch.zeros(2, store.dim)
        grad[0, 0], grad[1, 0] = 1.0, 3.0
        store.apply_update(keys, grad, total=torch.tensor([2.0, 2.0]), pos=torch.tensor([1.0, 1.0]))
        scores[signal] = store.row_priority[keys].clone()
    assert scores["eq7"][0] == scores["eq7"][1] > 0
    assert torch.allclose(scores["eq7-grad"], scores["eq7"] * torch.tensor([1.0, 3.0]))
    with pytest.raises(ValueError, match="signal 'eq7-grad'"):
        PrecisionPolicy(mode="shark", t8=1.0, t16=2.0, signal="eq7-grad")

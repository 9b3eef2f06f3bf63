"""The mixed-precision embedding collection: store invariants, sharded equality, training."""

import json

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from conftest import TINY, run_shark
from helpers import mp_workers as W
from helpers.checks import assert_follows_the_reference, check_row_map
from shark_torchrec.distributed.env import launch
from shark_torchrec.jobs.checkpoint import load_full_state, resolve_checkpoint
from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.row_groups import IdError, LocalTable, RowGroupStore, StepCounter
from shark_torchrec.precision.priority import FP16, FP32, INT8, ROW_MAP_BYTES, row_bytes


def make_store(rows=(500, 300), dim=16, **policy):
    tables = [LocalTable(f"t{i}", r, dim, global_rows=r, table_id=i) for i, r in enumerate(rows)]
    pol = PrecisionPolicy(
        **{"mode": "shark", "memory_budget": 0.6, "optimizer": "rowwise_adagrad", "learning_rate": 0.1, **policy}
    ).resolved([dim])
    store = RowGroupStore(tables, [f"f{i}" for i in range(len(rows))], list(range(len(rows))), pol, StepCounter())
    return store


def int8_step(values: torch.Tensor) -> torch.Tensor:
    return (values.max(dim=1).values - values.min(dim=1).values) / 255


def test_reassignment_keeps_every_row_once_and_its_values():
    store = make_store()
    n = store.num_rows
    g0 = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(0)).to(torch.int8)
    store.set_groups(g0)
    values = torch.randn(n, store.dim, generator=torch.Generator().manual_seed(1))
    store.write_rows(torch.arange(n), values)
    before = store.read_rows(torch.arange(n))
    check_row_map(store)
    g1 = torch.randint(0, 3, (n,), generator=torch.Generator().manual_seed(2)).to(torch.int8)
    moved = store.set_groups(g1)
    check_row_map(store)
    after = store.read_rows(torch.arange(n))
    assert sum(moved.values()) == int((g0 != g1).sum())
    stay = g0 == g1
    assert torch.equal(after[stay], before[stay])  # untouched rows keep their bytes
    err = (after - before).abs().max(dim=1).values
    assert (err[g1 == FP32] == 0).all()
    to16 = (g1 == FP16) & ~stay
    assert (err[to16] <= before[to16].abs().max(dim=1).values * 2**-11 + 1e-7).all()
    to8 = (g1 == INT8) & ~stay
    assert (err[to8] <= int8_step(before[to8]) * 0.51 + 1e-6).all()
    # Same group sizes: rows swap slots in place (no new buffer).
    buffer = store.weights.data_ptr()
    g2 = g1[torch.randperm(n, generator=torch.Generator().manual_seed(3))]
    store.set_groups(g2)
    assert store.weights.data_ptr() == buffer
    check_row_map(store)
    again = store.read_rows(torch.arange(n))
    assert torch.equal(again[g2 == g1], after[g2 == g1])
    err = (again - after).abs().max(dim=1).values
    assert (err[g2 == FP32] == 0).all()
    assert (err[g2 == INT8] <= int8_step(after[g2 == INT8]) * 0.51 + 1e-6).all()


def test_budget_mode_monotone_and_within_budget():
    store = make_store(rows=(2000,), dim=64, memory_budget=0.35, fp32_fraction=0.05)
    ebc_policy = store.policy
    from shark_torchrec.modules.reassign import reassign_stores

    store.set_groups(torch.full((2000,), INT8, dtype=torch.int8))
    store.row_priority = torch.rand(2000, generator=torch.Generator().manual_seed(0)).round(decimals=2)
    store.row_seen_step = torch.zeros(2000, dtype=torch.int32)
    store.step.value = 1
    reassign_stores([store], ebc_policy, {"t0": (2000, 64)}, pg=None)
    check_row_map(store)
    s, g = store.row_priority, store.row_group
    counts = store.group_counts()
    assert all(c > 0 for c in counts), counts
    assert s[g == FP32].min() >= s[g == FP16].max() and s[g == FP16].min() >= s[g == INT8].max()
    emb = store.table_bytes()[0]["embedding_bytes"]
    assert emb == sum(c * row_bytes(64, k) for k, c in enumerate(counts)) + 2000 * ROW_MAP_BYTES
    assert emb <= 0.35 * 2000 * 64 * 4


def test_nonfinite_gradients_are_skipped():
    store = make_store()
    store.set_groups(
        torch.tensor([FP32, FP16, INT8] * (store.num_rows // 3) + [INT8] * (store.num_rows % 3), dtype=torch.int8)
    )
    store.write_rows(torch.arange(store.num_rows), torch.randn(store.num_rows, store.dim))
    keys = torch.tensor([0, 1, 2, 3])
    grad = torch.randn(4, store.dim)
    grad[1, 3] = float("nan")
    grad[2, 0] = float("inf")
    store.apply_update(keys, grad, torch.ones(4), torch.zeros(4))
    assert store.nonfinite_rows == 2
    assert torch.isfinite(store.read_rows(torch.arange(store.num_rows))).all()
    assert torch.isfinite(store.momentum).all()


def test_training_updates_round_stochastically():
    """Updates far below a rounding step, through the store's update (`apply_update`, what
    training runs): fp16 and int8 rows move by the sum of their updates on average. Rounded to
    nearest they would not move at all (the math alone: tests/precision/test_precision_math.py)."""
    n, steps = 128, 100
    store = make_store(rows=(2 * n,), dim=16, optimizer="sgd", learning_rate=1.0)
    fp16_rows, int8_rows = torch.arange(n), torch.arange(n, 2 * n)
    store.set_groups(torch.tensor([FP16] * n + [INT8] * n, dtype=torch.int8))
    start = torch.cat([torch.ones(n, 16), torch.linspace(-1, 1, 16).repeat(n, 1)])
    store.write_rows(torch.arange(2 * n), start)
    start = store.read_rows(torch.arange(2 * n))
    # Per step: -2e-4 on every fp16 value (0.41 of the fp16 step below 1.0, 2^-11), -2e-3 on
    # column 5 of the int8 rows (0.26 of their step 2/255; columns 0 and 15 hold the row's
    # min and max, so the scale and bias stay).
    grad = torch.zeros(2 * n, 16)
    grad[fp16_rows] = 2e-4
    grad[int8_rows, 5] = 2e-3
    keys = torch.arange(2 * n)
    for _ in range(steps):
        store.apply_update(keys, grad, torch.ones(2 * n), torch.zeros(2 * n))
        store.step.value += 1  # each step draws new rounding noise
    moved = start - store.read_rows(keys)
    assert (store.row_group[fp16_rows] == FP16).all() and (store.row_group[int8_rows] == INT8).all()
    # Nearest rounding moves nothing. Stochastic: a sum of 100 unbiased roundings, per value a
    # standard deviation under sqrt(100) / 2 rounding steps, so the mean over 128 x 16 fp16
    # values is within ~5e-5 of the sum of the updates (0.02) and over 128 int8 values within
    # ~4e-3 (of 0.2).
    assert abs(moved[fp16_rows].mean().item() - steps * 2e-4) < 0.002
    assert abs(moved[int8_rows, 5].mean().item() - steps * 2e-3) < 0.02
    others = torch.tensor([c for c in range(16) if c != 5])
    assert moved[int8_rows][:, others].abs().max() < 0.01  # untouched columns stay within a step


def tables_dim8():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    return [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])]


def test_ids_outside_their_table_are_named():
    ebc = MixedPrecisionEmbeddingBagCollection(
        tables_dim8(), device=torch.device("cpu"), precision_policy=PrecisionPolicy(mode="int8", memory_budget=None)
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.tensor([3, 10]), lengths=torch.tensor([1, 1], dtype=torch.int32)
    )
    with pytest.raises(IdError, match=r"feature 'f': id 10 is outside table 't' \(rows 0..9\)"):
        ebc(kjt)
    lenient = MixedPrecisionEmbeddingBagCollection(
        tables_dim8(),
        device=torch.device("cpu"),
        precision_policy=PrecisionPolicy(mode="int8", memory_budget=None, bad_ids="row0"),
    )
    out = lenient(
        KeyedJaggedTensor.from_lengths_sync(
            keys=["f"], values=torch.tensor([-4]), lengths=torch.tensor([1], dtype=torch.int32)
        )
    )
    row0 = lenient(
        KeyedJaggedTensor.from_lengths_sync(
            keys=["f"], values=torch.tensor([0]), lengths=torch.tensor([1], dtype=torch.int32)
        )
    )
    assert torch.equal(out.values(), row0.values())


def test_default_policy_weighs_positives_twice():
    """Paper Eq. 7's default alpha = 2, as the policy and the CLI (`--precision shark`) build
    it: after one step, a row seen once in a positive sample scores twice a row seen once in a
    negative one."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from shark_torchrec.config import QuantConfig, parse_cli
    from shark_torchrec.precision.labels import tag_labels

    policies = {
        "PrecisionPolicy()": PrecisionPolicy(),
        "QuantConfig": QuantConfig(precision="shark").policy(0.1, 1e-8, 0),
        "cli": parse_cli(["--precision", "shark"]).quant.policy(0.1, 1e-8, 0),
    }
    table = EmbeddingBagConfig(name="t", embedding_dim=32, num_embeddings=10, feature_names=["f"])
    for name, policy in policies.items():
        ebc = MixedPrecisionEmbeddingBagCollection([table], device=torch.device("cpu"), precision_policy=policy)
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f"], values=torch.tensor([3, 5]), lengths=torch.tensor([1, 1], dtype=torch.int32)
        )
        ebc(tag_labels(kjt, torch.tensor([1.0, 0.0]))).values().sum().backward()  # row 3 positive, row 5 negative
        W.end_of_step(ebc)
        scores = ebc.stores[0].scores_now()
        assert scores[5] > 0 and scores[3] == 2 * scores[5], (name, scores[3].item(), scores[5].item())


CASES = {
    # sharding type: (policy overrides, tolerance of the comparison with the unsharded module)
    "table_wise": ({"reassign_every": 1}, 1e-5),
    "row_wise": ({"reassign_every": 1}, 1e-5),
    "data_parallel": ({"reassign_every": 1}, 1e-5),
    # Column slices quantize their own columns (other int8 blocks than the whole row) and
    # row-wise Adagrad keeps one state per slice, as in TorchRec: compare with SGD, in
    # threshold mode (budget counts depend on the slice width), within int8 steps.
    "column_wise": ({"reassign_every": 1, "optimizer": "sgd", "memory_budget": None, "t8": 0.5, "t16": 1.5}, 0.05),
}


@pytest.mark.parametrize("sequence", [False, True], ids=["bags", "sequence"])
def test_unsharded_module_follows_the_reference(sequence):
    """The training math (outputs, Adagrad, stochastic rounding, Eq. 7, budget reassignment)
    against a plain-torch reference that shares no code with the store."""
    overrides = {"reassign_every": 1}
    assert_follows_the_reference(W.unsharded_run(3, overrides, sequence), W.reference_math_run(3, overrides, sequence))


@pytest.mark.parametrize("sharding_type", list(CASES))
def test_two_ranks_match_the_unsharded_module(sharding_type):
    """Sharded on 2 ranks: the same as the unsharded module (the same store code in another
    layout) and, but for column-wise slices, as the plain-torch reference (the math)."""
    overrides, tol = CASES[sharding_type]
    steps = 3
    got = launch(W.sharded_run, 2, sharding_type, steps, overrides)
    ref = W.unsharded_run(steps, overrides)
    if sharding_type != "column_wise":
        assert_follows_the_reference(got, W.reference_math_run(steps, overrides))
    if sharding_type == "column_wise":
        assert got["widths"] == [[8], [8]]  # really sliced
    for a, b in zip(got["outputs"], ref["outputs"]):
        assert (a - b).abs().max() <= tol
    store = ref["stores"][0]
    counts = store.group_counts()
    assert all(c > 0 for c in counts), counts
    for i, t in enumerate(store.tables):
        lo, hi = int(store.table_base[i]), int(store.table_base[i + 1])
        want = store.read_rows(torch.arange(lo, hi))
        assert (got["tables"][f"{t.name}.weight"] - want).abs().max() <= tol, t.name
        assert torch.equal(got["tables"][f"{t.name}.row_group"][:, 0], store.row_group[lo:hi]), t.name
        mem = got["memory"][t.name]
        assert [mem["rows_fp32"], mem["rows_fp16"], mem["rows_int8"]] == [
            int((store.row_group[lo:hi] == g).sum()) for g in range(3)
        ]


def test_column_wise_budget_counts_each_row_once():
    """Budget mode on 2 column-wise slices of every table: each slice holds every row, and a
    row is ranked once (not once per slice). Rows per group are the budget rule's counts for
    the slice width (each slice is a table of that width with its own row map,
    `_tables_for_budget`), every slice of a row is in the same group, and the groups are the
    rule's ranking of the scores."""
    from helpers.reference import budget_groups
    from shark_torchrec.precision.priority import budget_counts, decayed

    steps, overrides = 3, {"reassign_every": 1, "memory_budget": 0.6}
    got = launch(W.sharded_run, 2, "column_wise", steps, overrides)
    assert got["widths"] == [[8], [8]]  # really sliced
    policy = W.policy(**overrides)
    for n, rows, _ in W.TABLES:
        counts = budget_counts(rows, 8, policy.memory_budget, policy.fp32_fraction)
        groups = got["tables"][f"{n}.row_group"]
        assert groups.shape == (rows, W.DIM // 4) and (groups == groups[:, :1]).all(), n  # slices alike
        assert [int((groups[:, 0] == g).sum()) for g in range(3)] == list(counts.as_tuple()[:3]), n
        mem = got["memory"][n]
        assert [mem["rows_fp32"], mem["rows_fp16"], mem["rows_int8"]] == list(counts.as_tuple()[:3]), n
        # The last reassignment (after the last step) ranked the scores as of that step.
        scores = decayed(
            got["tables"][f"{n}.row_priority"][:, 0], got["tables"][f"{n}.row_seen_step"][:, 0], steps - 1, policy.beta
        )
        per_group = [(FP32, counts.fp32), (FP16, counts.fp16), (INT8, counts.int8)]
        assert not torch.equal(groups[:, 0], budget_groups(torch.zeros(rows), per_group)), n  # not the start
        assert torch.equal(groups[:, 0], budget_groups(scores, per_group)), n


SMALL = [*TINY, "--precision", "shark", "--memory-budget", "0.55", "--reassign-every", "10"]


def test_checkpoint_moves_between_plans_and_world_sizes(tmp_path):
    """Saved by 2 ranks with row-wise shards, loaded by 1 rank table-wise: every tensor of
    the logical tables (values, int8 scales, groups, scores, optimizer state) is identical."""
    a, b = tmp_path / "a", tmp_path / "b"
    run_shark("train", *SMALL, "--nproc", "2", "--sharding-types", "row_wise", "--out-dir", str(a))
    run_shark(
        "train",
        *SMALL,
        "--sharding-types",
        "table_wise",
        "--checkpoint",
        str(a / "checkpoints"),
        "--epochs",
        "0",
        "--out-dir",
        str(b),
    )
    sa = load_full_state(resolve_checkpoint(a / "checkpoints"))["model"]
    sb = load_full_state(resolve_checkpoint(b / "checkpoints"))["model"]
    mixed = [k for k in sa if ".embedding_bags." in k]
    assert {k.rsplit(".", 1)[1] for k in mixed} == {
        "weight",
        "qparams",
        "row_group",
        "row_priority",
        "row_seen_step",
        "momentum",
    }
    groups = torch.cat([sa[k][:, 0] for k in mixed if k.endswith("row_group")])
    assert all(int((groups == g).sum()) > 0 for g in range(3))
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_fp32_model_converts_explicitly(tmp_path):
    fp32, mixed = tmp_path / "fp32", tmp_path / "mixed"
    run_shark("train", *TINY, "--out-dir", str(fp32))
    refused = run_shark(
        "train", *SMALL, "--checkpoint", str(fp32 / "checkpoints"), "--out-dir", str(mixed), check=False
    )
    assert refused.returncode == 2 and "--init-from" in refused.stderr
    run_shark("train", *SMALL, "--init-from", str(fp32 / "checkpoints"), "--epochs", "0", "--out-dir", str(mixed))
    sa = load_full_state(resolve_checkpoint(fp32 / "checkpoints"))["model"]
    sb = load_full_state(resolve_checkpoint(mixed / "checkpoints"))["model"]
    for k in (k for k in sa if k.endswith(".weight") and ".embedding_bags." in k):
        groups = sb[k.replace(".weight", ".row_group")][:, 0]
        err = (sa[k] - sb[k]).abs().max(dim=1).values
        assert (err[groups == FP32] == 0).all()
        assert (err[groups == FP16] <= sa[k][groups == FP16].abs().max(dim=1).values * 2**-11).all()
        assert (err[groups == INT8] <= int8_step(sa[k][groups == INT8]) * 0.51 + 1e-6).all()


def test_trains_within_half_a_point_of_fp32(tmp_path):
    args = [
        "--synthetic-train-rows",
        "20000",
        "--synthetic-eval-rows",
        "4000",
        "--synthetic-scale",
        "0.05",
        "--batch-size",
        "256",
        "--embedding-dim",
        "16",
        "--no-progress",
    ]
    auc = {}
    for precision in ("fp32", "shark"):
        out = tmp_path / precision
        extra = ["--memory-budget", "0.5", "--reassign-every", "20"] if precision == "shark" else []
        run_shark(
            "train",
            *args,
            "--precision",
            precision,
            *extra,
            "--out-dir",
            str(out),
            "--metrics-out",
            str(out / "m.json"),
        )
        m = json.loads((out / "m.json").read_text())
        auc[precision] = m["test_auc"]
        if precision == "shark":
            assert m["embedding_bytes"] <= 0.5 * m["fp32_embedding_bytes"]
            assert m["rows_fp32"] > 0 and m["rows_fp16"] > 0 and m["rows_int8"] > 0
    assert auc["fp32"] > 0.7
    assert abs(auc["shark"] - auc["fp32"]) <= 0.005, auc


def test_data_parallel_placement_trains_without_nan(tmp_path):
    """Stock fp16 tables placed data-parallel go NaN (a dense optimizer's epsilon underflows
    in fp16); ours update every group with the same row-wise rule."""
    out = tmp_path / "dp"
    run_shark(
        "train",
        *TINY,
        "--precision",
        "fp16",
        "--nproc",
        "2",
        "--allow-data-parallel",
        "--sharding-types",
        "data_parallel",
        "--lr",
        "0.5",
        "--out-dir",
        str(out),
        "--metrics-out",
        str(out / "m.json"),
    )
    m = json.loads((out / "m.json").read_text())
    assert m["test_auc"] == m["test_auc"] and m["test_auc"] > 0.6  # not NaN, and learned
    assert m["test_logloss"] == m["test_logloss"]


def test_planner_fits_what_fp32_cannot():
    """Memory for 0.45 of the fp32 tables: TorchRec's planner refuses the fp32 model, and
    plans ours with our storage estimator."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import Topology
    from torchrec.distributed.planner.types import PlannerError
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from shark_torchrec.distributed.mixed_precision import MixedPrecisionEmbeddingBagCollectionSharder
    from shark_torchrec.planner.storage import make_planner, shard_bytes

    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=64, num_embeddings=4_000_000, feature_names=[f"f{i}"])
        for i in range(4)
    ]
    fp32 = 4 * 4_000_000 * 64 * 4
    topology = lambda: Topology(world_size=2, compute_device="cpu", ddr_cap=int(fp32 * 0.45 / 2 * 2))
    with pytest.raises(PlannerError):
        make_planner(topology()).plan(
            EmbeddingBagCollection(tables=tables, device=torch.device("meta")), [EmbeddingBagCollectionSharder()]
        )
    policy = PrecisionPolicy(memory_budget=0.35)
    ours = MixedPrecisionEmbeddingBagCollection(tables, precision_policy=policy)
    plan = make_planner(topology()).plan(ours, [MixedPrecisionEmbeddingBagCollectionSharder()])
    assert set(plan.plan[""]) == {t.name for t in tables}
    # The estimate is the module's own accounting: weights + row map within the budget,
    # plus optimizer state and scores.
    assert shard_bytes(policy, "t0", 4_000_000, 4_000_000, 64) <= (0.35 * 256 + 12) * 4_000_000


def test_memory_saving_is_real(tmp_path):
    """A table of ~2 GB in fp32 under a 0.35 budget: the process never holds an fp32 copy.
    Its peak RSS (torch and TorchRec's own ~350 MB included) stays well below the fp32 size."""
    import subprocess
    import sys
    from pathlib import Path

    probe = Path(__file__).parents[1] / "helpers" / "rss_probe.py"
    out = subprocess.run(
        [sys.executable, str(probe), "7800000", "64", "12"], capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    m = json.loads(out.stdout.strip().splitlines()[-1])
    assert m["finite"]
    assert m["embedding_bytes"] <= 0.35 * m["fp32_bytes"]
    assert m["peak_rss_bytes"] < 0.8 * m["fp32_bytes"], m
    assert m["peak_rss_bytes"] - m["rss_before_bytes"] < 0.6 * m["fp32_bytes"], m


@pytest.mark.parametrize("sharding_type", ["table_wise", "row_wise", "data_parallel", "column_wise"])
def test_sequence_twin_two_ranks_match_the_unsharded_module(sharding_type):
    """MixedPrecisionEmbeddingCollection (one vector per id): the same equality and
    reassignment checks as the bag collection, and the same plain-torch reference."""
    overrides, tol = CASES[sharding_type]
    steps = 3
    got = launch(W.sharded_run, 2, sharding_type, steps, overrides, True)
    ref = W.unsharded_run(steps, overrides, True)
    if sharding_type != "column_wise":
        assert_follows_the_reference(got, W.reference_math_run(steps, overrides, True))
    for a, b in zip(got["outputs"], ref["outputs"]):
        assert a.shape == b.shape and (a - b).abs().max() <= tol
    store = ref["stores"][0]
    assert all(c > 0 for c in store.group_counts()), store.group_counts()
    for i, t in enumerate(store.tables):
        lo, hi = int(store.table_base[i]), int(store.table_base[i + 1])
        assert (got["tables"][f"{t.name}.weight"] - store.read_rows(torch.arange(lo, hi))).abs().max() <= tol, t.name
        assert torch.equal(got["tables"][f"{t.name}.row_group"][:, 0], store.row_group[lo:hi]), t.name


def test_stock_collection_converts_in_memory():
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from shark_torchrec.modules.mixed_precision import to_mixed_precision

    torch.manual_seed(0)
    stock = EmbeddingBagCollection(
        [EmbeddingBagConfig(name="t", embedding_dim=16, num_embeddings=300, feature_names=["f"])]
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"], values=torch.randint(0, 300, (40,)), lengths=torch.full((20,), 2, dtype=torch.int32)
    )
    want = stock(kjt).values()
    exact = to_mixed_precision(stock, PrecisionPolicy(mode="fp32", memory_budget=None))
    assert torch.allclose(exact(kjt).values(), want, atol=1e-6)
    small = to_mixed_precision(stock, PrecisionPolicy(memory_budget=0.5))
    assert all(c > 0 for c in small.stores[0].group_counts())
    step = (stock.embedding_bags["t"].weight.max(1).values - stock.embedding_bags["t"].weight.min(1).values).max() / 255
    assert (small(kjt).values() - want).abs().max() <= 2 * step  # two ids a bag, half a step each


@pytest.mark.parametrize("sharding_type", ["column_wise", "row_wise"])
def test_sharded_checkpoint_loads_unsharded(tmp_path, sharding_type):
    """Saved (DCP) by 2 ranks, loaded by the unsharded module: groups, scores and optimizer
    state identical; values identical, or within one int8 step where column-wise shards had
    quantized each half of a row on its own."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    overrides = {"reassign_every": 2, "memory_budget": 0.6}
    got = launch(W.sharded_run, 2, sharding_type, 3, overrides, False, str(tmp_path / "ckpt"))
    dcp_to_torch_save(str(tmp_path / "ckpt"), str(tmp_path / "full.pt"))
    state = torch.load(tmp_path / "full.pt")
    module = W.make_module(False, overrides)
    module.materialize(torch.device("cpu"))
    module.load_state_dict(state)
    assert module.step_counter.value == 3
    store = module.stores[0]
    assert all(c > 0 for c in store.group_counts())
    again = module.state_dict()
    for n, _, _ in W.TABLES:
        for key in ("row_group", "row_priority", "row_seen_step"):
            assert torch.equal(again[f"embedding_bags.{n}.{key}"][:, 0], state[f"embedding_bags.{n}.{key}"][:, 0]), (
                n,
                key,
            )
        w, want = again[f"embedding_bags.{n}.weight"], got["tables"][f"{n}.weight"]
        int8 = again[f"embedding_bags.{n}.row_group"][:, 0] == INT8
        if sharding_type == "column_wise":
            assert torch.equal(w[~int8], want[~int8])
            assert ((w[int8] - want[int8]).abs().max(dim=1).values <= int8_step(want[int8]) + 1e-6).all()
        else:
            assert torch.equal(w, want)


def test_weighted_collection_keeps_its_weights_and_counts_labels():
    """Tables with real per-id weights: the label bit rides in the weight, pooling still uses
    the weight (to one ulp), and the positives are counted."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from shark_torchrec.modules.mixed_precision import to_mixed_precision
    from shark_torchrec.precision.labels import tag_labels

    torch.manual_seed(0)
    stock = EmbeddingBagCollection(
        [EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=50, feature_names=["f"])], is_weighted=True
    )
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["f"],
        values=torch.tensor([1, 2, 3, 1]),
        lengths=torch.tensor([2, 2], dtype=torch.int32),
        weights=torch.tensor([0.5, 2.0, -1.0, 3.0]),
    )
    ours = to_mixed_precision(stock, PrecisionPolicy(mode="shark", row_fractions=(1.0, 0.0), alpha=2.0, beta=1.0))
    out = ours(tag_labels(kjt, torch.tensor([1.0, 0.0])))
    assert torch.allclose(out.values(), stock(kjt).values(), rtol=1e-6, atol=1e-6)
    out.values().sum().backward()
    W.end_of_step(ours)
    # beta = 1: the score is this batch's alpha * positives + negatives.
    scores = ours.stores[0].scores_now()
    assert scores[1].item() == 2.0 + 1.0 and scores[2].item() == 2.0 and scores[3].item() == 1.0

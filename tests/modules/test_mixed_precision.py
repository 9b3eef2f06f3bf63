"""The mixed-precision embedding collections unsharded: the row-group store's invariants (every row
once, budgets, rounding, bad ids, non-finite gradients), the training math against the plain-
torch reference, conversions from stock collections, real memory savings."""

import json

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from helpers import mp_workers as W
from helpers.checks import assert_follows_the_reference, check_row_map, int8_step
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


@pytest.mark.parametrize("sequence", [False, True], ids=["bags", "sequence"])
def test_unsharded_module_follows_the_reference(sequence):
    """The training math (outputs, Adagrad, stochastic rounding, Eq. 7, budget reassignment)
    against a plain-torch reference that shares no code with the store."""
    overrides = {"reassign_every": 1}
    assert_follows_the_reference(W.unsharded_run(3, overrides, sequence), W.reference_math_run(3, overrides, sequence))


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


def test_state_loads_a_chunk_of_rows_at_a_time(monkeypatch):
    """Loading a state dict rounds rows into their groups a chunk at a time (a whole table at
    once held several fp32 copies of it): chunks of 7 rows give the bytes of one chunk."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    import shark_torchrec.modules.mixed_precision as mp

    configs = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=16, num_embeddings=r, feature_names=[f"f{i}"])
        for i, r in enumerate((90, 61))
    ]

    def collection():
        return MixedPrecisionEmbeddingBagCollection(
            configs, PrecisionPolicy(memory_budget=0.5, fp32_fraction=0.1), device=torch.device("cpu")
        )

    source = collection()
    store = source.stores[0]
    store.set_groups(torch.randint(0, 3, (store.num_rows,), generator=torch.Generator().manual_seed(0)).to(torch.int8))
    store.write_rows(
        torch.arange(store.num_rows), torch.randn(store.num_rows, 16, generator=torch.Generator().manual_seed(1))
    )
    state = source.state_dict()
    whole = collection()
    whole.load_state_dict(state)
    monkeypatch.setattr(mp, "CHUNK_ROWS", 7)
    written, write = [], mp.write_saved_rows

    def spy(store, keys, *rest):
        written.append(keys.clone())
        write(store, keys, *rest)

    monkeypatch.setattr(mp, "write_saved_rows", spy)
    chunked = collection()
    chunked.load_state_dict(state)
    assert max(len(k) for k in written) == 7 and torch.equal(torch.cat(written), torch.arange(151))
    keys = torch.arange(store.num_rows)
    assert torch.equal(chunked.stores[0].row_group, store.row_group)
    assert torch.equal(chunked.stores[0].weights, whole.stores[0].weights)
    assert torch.equal(chunked.stores[0].read_rows(keys), store.read_rows(keys))

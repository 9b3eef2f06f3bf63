"""The planner's storage estimate for mixed-precision tables: both collections sized by our
bytes, and whole-table shards sized exactly as the built store allocates them."""

import pytest
import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingStorageEstimator
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv, ShardingType

from helpers import mp_workers as W
from shark_torchrec.config import ConfigError
from shark_torchrec.distributed.env import init_distributed, shutdown_distributed
from shark_torchrec.distributed.mixed_precision import (
    MixedPrecisionEmbeddingBagCollectionSharder,
    MixedPrecisionEmbeddingCollectionSharder,
)
from shark_torchrec.planner.storage import MixedPrecisionStorageEstimator, make_planner, shard_bytes

POLICIES = {
    "budget": {},
    "budget_sgd": {"memory_budget": 0.4, "optimizer": "sgd"},
    "int8": {"mode": "int8", "memory_budget": None},
    "int4_bf16_state": {"mode": "int4", "memory_budget": None, "momentum_dtype": "bf16"},  # no row map, 2-byte state
    "fp16": {"mode": "fp16", "memory_budget": None, "optimizer": "sgd"},
}


def sharder(sequence: bool):
    return MixedPrecisionEmbeddingCollectionSharder() if sequence else MixedPrecisionEmbeddingBagCollectionSharder()


def storage_by_shard(module, sequence: bool, topology: Topology, ours: bool, constraints=None) -> dict:
    """(table, sharding type, shard index) -> the planner's DDR bytes for that shard, from
    TorchRec's storage estimator alone or followed by ours."""
    estimators = [EmbeddingStorageEstimator(topology=topology, constraints=constraints)]
    if ours:
        estimators.append(MixedPrecisionStorageEstimator(topology, constraints))
    enumerator = EmbeddingEnumerator(topology=topology, batch_size=64, constraints=constraints, estimator=estimators)
    out = {}
    for option in enumerator.enumerate(module, [sharder(sequence)]):
        for i, shard in enumerate(option.shards):
            out[(option.name, option.sharding_type, i)] = (shard.storage.ddr, shard.size)
    return out


@pytest.mark.parametrize("sequence", [False, True], ids=["bag", "sequence"])
def test_both_collections_are_sized_by_our_bytes(sequence):
    """Every shard of every sharding type: our estimator replaces the fp32 tensor bytes
    TorchRec counted by shard_bytes(...) (the sequence collection used to keep fp32 bytes)."""
    policy = W.policy()
    module = W.make_module(sequence, {})
    topology = Topology(world_size=2, compute_device="cpu")
    stock = storage_by_shard(module, sequence, topology, ours=False)
    ours = storage_by_shard(module, sequence, topology, ours=True)
    assert stock.keys() == ours.keys()
    rows = {n: r for n, r, _ in W.TABLES}
    types = {key[1] for key in stock}
    assert {ShardingType.TABLE_WISE.value, ShardingType.ROW_WISE.value, ShardingType.COLUMN_WISE.value} <= types, types
    for key, (stock_bytes, (r, c)) in stock.items():
        name = key[0]
        assert ours[key][0] - stock_bytes == shard_bytes(policy, name, rows[name], r, c) - r * c * 4, key


def allocated_bytes(store) -> int:
    """What a store really holds for its rows: the group buffer, the row map (one int32 a
    row; none for one tier), the row-wise optimizer state and the priority state."""
    tensors = (store.weights, store.row_map, store.momentum, store.row_priority, store.row_seen_step)
    return sum(t.numel() * t.element_size() for t in tensors)


@pytest.mark.parametrize("policy_name", list(POLICIES))
@pytest.mark.parametrize("sequence", [False, True], ids=["bag", "sequence"])
def test_whole_table_estimate_is_what_the_store_allocates(sequence, policy_name):
    """Plan table-wise on one rank, shard with that plan: the bytes the estimator added for
    each table's shard sum to exactly what the built stores allocate (not only a bound)."""
    overrides = POLICIES[policy_name]
    constraints = {n: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]) for n, _, _ in W.TABLES}
    topology = Topology(world_size=1, compute_device="cpu")
    module = W.make_module(sequence, overrides)
    stock = storage_by_shard(module, sequence, topology, ours=False, constraints=constraints)
    ours = storage_by_shard(module, sequence, topology, ours=True, constraints=constraints)
    # TorchRec's bytes minus its fp32 tensor bytes are its input/output buffers: what is
    # left of ours is the estimate of our tables' state.
    estimate = {key[0]: ours[key][0] - (stock[key][0] - r * c * 4) for key, (_, (r, c)) in stock.items()}
    assert len(estimate) == len(W.TABLES)

    env = init_distributed()
    try:
        model = W.Wrap(W.make_module(sequence, overrides))
        plan = make_planner(topology, constraints).plan(model, [sharder(sequence)])
        assert {ps.sharding_type for ps in plan.plan["ebc"].values()} == {ShardingType.TABLE_WISE.value}
        dmp = DistributedModelParallel(
            model,
            env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
            device=env.device,
            plan=plan,
            sharders=[sharder(sequence)],
        )
        stores = [store for store, _ in dmp.module.ebc.stores()]
        assert sorted(t.name for s in stores for t in s.tables) == sorted(estimate)
        assert sum(estimate.values()) == sum(allocated_bytes(s) for s in stores)
    finally:
        shutdown_distributed()


def test_a_model_budget_sizes_tables_against_every_collection_of_the_model():
    """Two collections with budget_scope="model" (they may share one budget): a table is sized
    for what every model-scope table of the model leaves it, not its own collection alone."""
    from shark_torchrec.planner.storage import model_scope_share

    kw = {"memory_budget": 0.5, "budget_scope": "model", "fp32_fraction": 0.05}
    model = W.TwoCollections(kw, device=torch.device("meta"))
    topology = Topology(world_size=2, compute_device="cpu")
    stock = storage_by_shard(model, False, topology, ours=False)
    got = storage_by_shard(model, False, topology, ours=True)
    policy = W.policy(**kw).resolved([W.DIM])
    every = {(path, n): (rows, W.DIM) for path, names in W.SPLIT for n, rows, _ in W.TABLES if n in names}
    alone = {k: v for k, v in every.items() if k[0] == "b"}
    rows = dict((n, r) for n, r, _ in W.TABLES)["t2"]
    want = shard_bytes(model_scope_share(policy, every)[("b", "t2")], "t2", rows, rows, W.DIM)
    narrower = shard_bytes(model_scope_share(policy, alone)[("b", "t2")], "t2", rows, rows, W.DIM)
    assert want > narrower
    key = ("t2", ShardingType.TABLE_WISE.value, 0)
    assert got[key][0] - stock[key][0] == want - rows * W.DIM * 4


def test_the_enumerator_keeps_the_sharders_order():
    """The types a constraint allows come in the sharder's order, whatever the order of the
    constraint's list: TorchRec's own filter intersects them as sets, whose order followed
    the process's string hashing, and with it which of several equally priced types a tie
    went to (PYTHONHASHSEED changed the plan)."""
    from shark_torchrec.planner.storage import OrderedEmbeddingEnumerator

    constraints = {"t": ParameterConstraints(sharding_types=["column_wise", "table_wise", "table_column_wise"])}
    topology = Topology(world_size=2, compute_device="cpu")
    enumerator = OrderedEmbeddingEnumerator(topology=topology, batch_size=64, constraints=constraints)
    for allowed in (
        ["data_parallel", "table_wise", "column_wise", "table_column_wise"],
        ["table_column_wise", "row_wise", "column_wise", "table_wise"],
    ):
        want = [t for t in allowed if t in constraints["t"].sharding_types]
        assert enumerator._filter_sharding_types("t", allowed) == want
        kernels = ["fused", "dense", "quant"]
        assert enumerator._filter_compute_kernels("t", kernels, "table_wise") == ["fused", "quant"]
        assert enumerator._filter_compute_kernels("t", kernels[::-1], "table_wise") == ["quant", "fused"]


def bag_module(sizes, dim: int):
    """Our bag collection of one feature per table, in the default policy."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig

    from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection

    tables = [
        EmbeddingBagConfig(name=f"t{i}", embedding_dim=dim, num_embeddings=n, feature_names=[f"f{i}"])
        for i, n in enumerate(sizes)
    ]
    return MixedPrecisionEmbeddingBagCollection(tables=tables, precision_policy=W.policy())


def planned_types(module, cap: int = 0, **train) -> set:
    """The sharding types `plan_on` gives our bag collection on 2 CPU ranks (`cap`: each
    rank's bytes, 0 for TorchRec's default)."""
    from shark_torchrec.config import TrainConfig
    from shark_torchrec.distributed.sharding import plan_on

    topology = Topology(world_size=2, local_world_size=2, compute_device="cpu", **({"ddr_cap": cap} if cap else {}))
    plan = plan_on(module, [MixedPrecisionEmbeddingBagCollectionSharder()], topology, TrainConfig(**train))
    return {ps.sharding_type for per_module in plan.plan.values() for ps in per_module.values()}


def test_a_cpu_plan_keeps_to_one_sharding_type_where_tables_fit():
    """Eleven tables priced alike on 2 CPU ranks: every table table-wise. With every type on
    offer (as before), the planner split one table row-wise to even its estimates out and
    the others went to a second type: three groups, each with its own exchanges a step."""
    module = bag_module([100] * 11, 64)
    assert planned_types(module) == {ShardingType.TABLE_WISE.value}


def test_a_table_no_rank_holds_is_split_row_wise():
    """A table of 200,000 x 32 on ranks that hold 0.8 of it, as our estimator sizes it: no
    table-wise or column-wise plan fits (dim 32 is one column shard), so the planner is given
    the row-wise types too, and splits it. Types the user names get no such second try."""
    from torchrec.distributed.planner.types import PlannerError

    module = bag_module([200_000], 32)
    cap = int(0.8 * shard_bytes(W.policy().resolved([32]), "t0", 200_000, 200_000, 32))
    assert planned_types(module, cap=cap) == {ShardingType.ROW_WISE.value}
    assert planned_types(module, cap=10**9) == {ShardingType.TABLE_WISE.value}
    with pytest.raises(ConfigError, match=r"--sharding-types table_wise\) on cpu: no plan fits") as e:
        planned_types(module, cap=cap, sharding_types=(ShardingType.TABLE_WISE.value,))
    assert isinstance(e.value.__cause__, PlannerError)


def test_named_sharding_types_no_sharder_offers_are_the_flags_error():
    """`--sharding-types row_wise` for stock tables on CPU, where TorchRec's bag sharder offers
    no row-wise type: one line naming the flag and what the model's sharders do offer there
    (TorchRec's enumerator raised a RuntimeError, a traceback)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from shark_torchrec.config import TrainConfig
    from shark_torchrec.distributed.sharding import plan_on

    module = EmbeddingBagCollection(
        tables=[EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=10, feature_names=["f0"])],
        device=torch.device("meta"),
    )
    topology = Topology(world_size=1, local_world_size=1, compute_device="cpu")
    sharders = [EmbeddingBagCollectionSharder(), MixedPrecisionEmbeddingBagCollectionSharder()]
    with pytest.raises(ConfigError, match=r"--sharding-types row_wise\) on cpu: not offered there") as e:
        plan_on(module, sharders, topology, TrainConfig(sharding_types=("row_wise",)))
    offered = str(e.value).split("this model's sharders offer ")[1]
    assert "table_wise" in offered and "row_wise" not in offered.replace("table_wise", "")


def test_the_configs_sharding_type_names_are_torchrecs():
    """config.SHARDING_TYPES (the names `--sharding-types` takes, checked without importing
    TorchRec) are TorchRec's own for a collection, every one the planner may be given."""
    from shark_torchrec.config import SHARDING_TYPES
    from shark_torchrec.distributed import sharding

    assert set(SHARDING_TYPES) == set(sharding._ALL_TYPES)
    assert set(SHARDING_TYPES) <= {t.value for t in ShardingType}

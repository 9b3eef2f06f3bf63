"""A storage estimator that tells TorchRec's planner what our tables really take.

TorchRec's `EmbeddingStorageEstimator` sizes a table from its (fp32) parameter. For tables of
a `MixedPrecisionEmbeddingBagCollection` or `MixedPrecisionEmbeddingCollection` this
estimator runs after it and replaces the fp32 tensor bytes of each shard by ours: weights in
the policy's groups, int8 scales/biases, the row map, the row-wise optimizer state and the
priority scores.

In budget mode a table's group counts are fixed, but which rows (and so which row-wise or
table-row-wise shard) hold the fp32 and fp16 ones follows the scores, so each shard is sized
for the worst case: as many of the table's most precise rows as it can hold. Whole-table
shards (table-wise, column-wise, data-parallel) are sized exactly: what the built store
allocates (tests/distributed/test_planner_storage.py). With one budget for all tables of a collection
(`budget_scope="model"`) a table is sized for the most it can take: the model's budget less the
other tables at their floor, over every model-scope collection of the model (they may share one
budget, `share_model_budget`; `model_scope_share`). Threshold mode has no bound (every row
may reach fp32), so shards are sized as fp32 rows plus our metadata.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.types import ParameterConstraints, ShardEstimator, ShardingOption, Topology

from shark_torchrec.modules.mixed_precision import (
    MixedPrecisionEmbeddingBagCollection,
    MixedPrecisionEmbeddingCollection,
)
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.precision.budget import table_floor_bytes, target_counts
from shark_torchrec.precision.priority import DROPPED, FP32, ROW_MAP_BYTES, GroupCounts, row_bytes


def model_scope_share(policy: PrecisionPolicy, tables: Dict[str, Tuple[int, int]]) -> Dict[str, PrecisionPolicy]:
    """With one budget for all tables (`budget_scope="model"`) a table may take more than the
    budget of its own bytes, up to what the others leave at their floor: per table, a policy
    whose per-table budget is that bound (fp32 rows capped by the model's fp32 share), for
    sizing its shards.

    Args:
        policy: the collection's resolved policy.
        tables: every table under the budget (of every model-scope collection of the model,
            which may share it: `share_model_budget`): key -> (rows, dim).

    Returns:
        key -> the policy to size that table's shards with (per-table scope).
    """
    total_fp32 = sum(r * d * 4 for r, d in tables.values())
    floors = {n: table_floor_bytes(r, d, policy.groups) for n, (r, d) in tables.items()}
    all_rows = sum(r for r, _ in tables.values())
    out = {}
    for n, (r, d) in tables.items():
        cap = policy.memory_budget * total_fp32 - (sum(floors.values()) - floors[n])
        out[n] = dataclasses.replace(
            policy,
            budget_scope="table",
            memory_budget=min(max(cap / max(r * d * 4, 1), 1e-9), 1.5),  # 1.5: above all-fp32 plus the row map
            fp32_fraction=min(1.0, policy.fp32_fraction * all_rows / max(r, 1)),
        )
    return out


def shard_bytes(policy: PrecisionPolicy, table: str, table_rows: int, shard_rows: int, shard_cols: int) -> int:
    """Upper bound on what one shard of a table takes in training (see module doc); with a
    model-wide budget, pass the table's policy from `model_scope_share`.

    Args:
        policy: the collection's resolved policy (or the table's, see above).
        table: the table's name (for error messages).
        table_rows: the table's global rows.
        shard_rows, shard_cols: the shard's size.

    Returns:
        Bytes: weights (with scales, and the fallback row with the dropped tier), plus per row
        the row map and, when the policy keeps them, the row-wise optimizer state and the score.
    """
    if policy.threshold_mode:
        counts = GroupCounts(table_rows, 0, 0)
    else:
        counts = target_counts(policy, table_rows, shard_cols, table)
    # The shard holds as many of the table's most precise rows as it can (the worst case).
    weights, left = 0, shard_rows
    for g, n in enumerate(counts.as_tuple()):
        x = min(left, n)
        weights += x * row_bytes(shard_cols, g)
        left -= x
    if DROPPED in policy.groups:
        weights += row_bytes(shard_cols, FP32)  # every shard keeps its copy of the table's fallback row
    extra = ROW_MAP_BYTES if policy.scored else 0  # a one-tier store keeps no row map (the identity)
    if policy.optimizer == "rowwise_adagrad":
        extra += policy.momentum_torch_dtype.itemsize
    if policy.scored:
        extra += 8
    return weights + shard_rows * extra


class MixedPrecisionStorageEstimator(ShardEstimator):
    """Put after TorchRec's storage estimator (see `estimators`)."""

    def __init__(self, topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None) -> None:
        self._topology = topology

    def estimate(self, sharding_options: List[ShardingOption], sharder_data_map=None, **_: object) -> None:
        gpu = self._topology.compute_device != "cpu"
        ours = [
            o
            for o in sharding_options
            if isinstance(o.module[1], (MixedPrecisionEmbeddingBagCollection, MixedPrecisionEmbeddingCollection))
        ]
        policies = {}
        for option in ours:
            sharder = (sharder_data_map or {}).get(option.module_type_key)
            # Both collections keep their rows in a RowGroupStore; their meta fp32
            # parameters are only shapes for the planner.
            policies[id(option)] = option.module[1].resolved_policy(getattr(sharder, "fused_params", None))
        # With a model-wide budget a table may take what every other model-scope table of the
        # model leaves at its floor (the collections may share one budget: share_model_budget).
        model_tables = {
            (o.module[0], o.name): (o.tensor.shape[0], o.tensor.shape[1])
            for o in ours
            if policies[id(o)].budget_mode and policies[id(o)].budget_scope == "model"
        }
        for option in ours:
            policy = policies[id(option)]
            if (option.module[0], option.name) in model_tables:
                policy = model_scope_share(policy, model_tables)[(option.module[0], option.name)]
            rows = option.tensor.shape[0]
            for shard in option.shards:
                if shard.storage is None:
                    continue
                r, c = shard.size
                fp32 = r * c * option.tensor.element_size()
                our_bytes = shard_bytes(policy, option.name, rows, r, c)
                if gpu:
                    shard.storage.hbm = max(shard.storage.hbm - fp32, 0) + our_bytes
                else:
                    shard.storage.ddr = max(shard.storage.ddr - fp32, 0) + our_bytes


def estimators(
    topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None
) -> List[ShardEstimator]:
    """TorchRec's default estimators followed by ours: pass to `EmbeddingEnumerator`.

    Args:
        topology: the planner's topology.
        constraints: the planner's constraints, if any.

    Returns:
        TorchRec's perf and storage estimators, then `MixedPrecisionStorageEstimator`.
    """
    from torchrec.distributed.planner.constants import DEFAULT_PERF_ESTIMATOR
    from torchrec.distributed.planner.shard_estimators import (
        EmbeddingPerfEstimatorFactory,
        EmbeddingStorageEstimator,
    )

    return [
        EmbeddingPerfEstimatorFactory.create(DEFAULT_PERF_ESTIMATOR, topology=topology, constraints=constraints),
        EmbeddingStorageEstimator(topology=topology, constraints=constraints),
        MixedPrecisionStorageEstimator(topology, constraints),
    ]


class OrderedEmbeddingEnumerator(EmbeddingEnumerator):
    """TorchRec's EmbeddingEnumerator, keeping the sharding types and compute kernels a
    constraint allows in the sharder's order. TorchRec 1.8 intersects the constraint's list
    with the sharder's as sets, so where options tie in its estimates (a table table-wise,
    column-wise or table-column-wise in one shard, all priced alike) the one planned followed
    the process's string hashing (PYTHONHASHSEED): runs of one config got different plans.
    In the sharder's order the first type wins a tie (table-wise, for TorchRec's sharders and
    ours), the same in every run."""

    def _filter_sharding_types(self, name: str, allowed_sharding_types: List[str], sharder_key: str = "") -> List[str]:
        kept = set(super()._filter_sharding_types(name, allowed_sharding_types, sharder_key))
        return [t for t in allowed_sharding_types if t in kept]

    def _filter_compute_kernels(self, name: str, allowed_compute_kernels: List[str], sharding_type: str) -> List[str]:
        kept = set(super()._filter_compute_kernels(name, allowed_compute_kernels, sharding_type))
        return [k for k in allowed_compute_kernels if k in kept]


def make_planner(
    topology: Topology, constraints: Optional[Dict[str, ParameterConstraints]] = None, batch_size: Optional[int] = None
):
    """TorchRec's EmbeddingShardingPlanner, sizing mixed-precision tables with our bytes.

    Args:
        topology: the ranks and their devices.
        constraints: table -> its constraints (e.g. `sharding_constraints`), if any.
        batch_size: the batch size the planner's estimates assume (default: TorchRec's).

    Returns:
        The planner.
    """
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.constants import BATCH_SIZE

    bs = batch_size or BATCH_SIZE
    enumerator = OrderedEmbeddingEnumerator(
        topology=topology, batch_size=bs, constraints=constraints, estimator=estimators(topology, constraints)
    )
    return EmbeddingShardingPlanner(topology=topology, batch_size=bs, enumerator=enumerator, constraints=constraints)

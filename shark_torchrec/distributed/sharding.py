"""Shard a model with TorchRec's planner and DistributedModelParallel."""

from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.distributed.comm import get_local_size
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ModuleSharder, ShardingEnv, ShardingPlan, ShardingType
from torchrec.modules.embedding_configs import BaseEmbeddingConfig
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from shark_torchrec.config import SHARDING_TYPES, ConfigError, TrainConfig
from shark_torchrec.distributed.env import DistEnv
from shark_torchrec.distributed.memory import table_of_key
from shark_torchrec.modules.initial_rows import initial_rows


def default_sharders(cfg: TrainConfig) -> List[ModuleSharder[nn.Module]]:
    """Our mixed-precision sharders and TorchRec's EBC sharder, all given the same fused_params
    (FBGEMM's fused row-wise Adagrad or SGD at the embedding learning rate).

    Args:
        cfg: the `[train]` group (`emb_optimizer`, `lr`, `eps`).

    Returns:
        The sharders, ours first.
    """
    from shark_torchrec.distributed.mixed_precision import (
        MixedPrecisionEmbeddingBagCollectionSharder,
        MixedPrecisionEmbeddingCollectionSharder,
    )

    fused = {
        "optimizer": EmbOptimType.EXACT_SGD if cfg.emb_optimizer == "sgd" else EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        "learning_rate": cfg.lr,
        "eps": cfg.eps,
    }
    return [
        MixedPrecisionEmbeddingBagCollectionSharder(fused_params=fused),
        MixedPrecisionEmbeddingCollectionSharder(fused_params=fused),
        EmbeddingBagCollectionSharder(fused_params=fused),
    ]


def embedding_configs(model: nn.Module) -> Dict[str, BaseEmbeddingConfig]:
    """Every embedding table config in an (unsharded) model, by table name.

    Args:
        model: the model (its collections have `embedding_bag_configs` or `embedding_configs`).

    Returns:
        table name -> its config.
    """
    out: Dict[str, BaseEmbeddingConfig] = {}
    for m in model.modules():
        if hasattr(m, "embedding_bag_configs"):
            out.update({c.name: c for c in m.embedding_bag_configs()})
        elif hasattr(m, "embedding_configs"):
            out.update({c.name: c for c in m.embedding_configs()})
    return out


# Every sharding type TorchRec offers a collection: the planner may pick any when the user names
# none and the tables need it. On CPU the plan first keeps to the types TorchRec's own
# EmbeddingBagCollectionSharder offers there (`_CPU_TYPES`, no row-wise ones): each sharding
# type a plan uses is one more group with its own input and output exchange every step, which
# TorchRec's planner does not price, and it split one small table row-wise just to even its
# per-rank estimates out. On 2 ranks those three groups made our step 1.19-1.23x as long as
# the plan of one type (bench/README.md).
_ALL_TYPES = SHARDING_TYPES  # (`--sharding-types` is checked against the same list)
_CPU_TYPES = (
    ShardingType.TABLE_WISE.value,
    ShardingType.COLUMN_WISE.value,
    ShardingType.TABLE_COLUMN_WISE.value,
    ShardingType.DATA_PARALLEL.value,
)


def sharding_types(cfg: TrainConfig, device_type: str, fallback: bool = False) -> List[str]:
    """The sharding types the planner may choose from.

    Args:
        cfg: the `[train]` group: `sharding_types` (empty: the defaults), minus data-parallel
            unless `allow_data_parallel`.
        device_type: the planner's compute device ("cpu", "cuda").
        fallback: the types to plan with when the defaults found no plan that fits (every
            type TorchRec has for a collection); the same as the first list where that
            already holds them all or the user named the types.

    Returns:
        The types, in the order ties go to the first.

    Raises:
        ConfigError: no sharding type is left.
    """
    if cfg.sharding_types:
        types = list(cfg.sharding_types)
    else:
        types = list(_CPU_TYPES if device_type == "cpu" and not fallback else _ALL_TYPES)
    if not cfg.allow_data_parallel:
        types = [t for t in types if t != ShardingType.DATA_PARALLEL.value]
    if not types:
        raise ConfigError("no sharding type left: allow data_parallel or name a sharded type")
    return types


def sharding_constraints(tables: Iterable[str], types: Sequence[str]) -> Dict[str, ParameterConstraints]:
    """The planner's constraints: the sharding types each table may take.

    Args:
        tables: the table names.
        types: the sharding types (`sharding_types`).

    Returns:
        table -> its constraints (the same types for every table).
    """
    return {t: ParameterConstraints(sharding_types=list(types)) for t in tables}


def plan_on(
    model: nn.Module, sharders: Sequence[ModuleSharder[nn.Module]], topology: Topology, cfg: TrainConfig
) -> ShardingPlan:
    """TorchRec's planner with our storage estimator (`make_planner`) on one process: within the
    default sharding types, or, when no plan within them fits the topology, within all.

    Args:
        model: the unsharded model.
        sharders: the sharders the plan is for.
        topology: the ranks, their devices and memory.
        cfg: the `[train]` group (the sharding types allowed).

    Returns:
        The plan.
    """
    from torchrec.distributed.planner.types import PlannerError

    from shark_torchrec.planner.storage import make_planner

    tables = embedding_configs(model)
    first = sharding_types(cfg, topology.compute_device)
    every = sharding_types(cfg, topology.compute_device, fallback=True)
    try:
        try:
            return make_planner(topology, sharding_constraints(tables, first)).plan(model, list(sharders))
        except PlannerError:
            if every == first:
                raise
        return make_planner(topology, sharding_constraints(tables, every)).plan(model, list(sharders))
    except (PlannerError, RuntimeError) as e:
        # Types the user named that the sharders do not offer here (TorchRec's enumerator: a
        # RuntimeError) or that no plan fits in: the flag's to change, one line.
        if not cfg.sharding_types or not (isinstance(e, PlannerError) or "No available sharding type" in str(e)):
            raise
        kinds = {type(m) for m in model.modules()}  # the planner picks a module's sharder by its exact type
        offered = [t for s in sharders if s.module_type in kinds for t in s.sharding_types(topology.compute_device)]
        offered = sorted(set(offered), key=offered.index)
        if isinstance(e, PlannerError):
            reason = f"no plan fits: {str(e).strip().splitlines()[0] if str(e).strip() else 'PlannerError'}"
        else:
            reason = "not offered there"
        raise ConfigError(
            f"train.sharding_types (--sharding-types {' '.join(cfg.sharding_types)}) on "
            f"{topology.compute_device}: {reason}; this model's sharders offer {', '.join(offered)} there"
        ) from e


def plan_sharding(
    model: nn.Module,
    env: DistEnv,
    cfg: TrainConfig,
    sharders: Sequence[ModuleSharder[nn.Module]],
) -> ShardingPlan:
    """The sharding plan (`plan_on`) of rank 0, the same on every rank (collective: every rank
    calls it).

    Args:
        model: the unsharded model.
        env: the ranks and their device.
        cfg: the `[train]` group (the sharding types allowed).
        sharders: the sharders the plan is for.

    Returns:
        The plan.
    """
    from torchrec.distributed.collective_utils import invoke_on_rank_and_broadcast_result

    # The planner's host size must be the one TorchRec's sharding reads from LOCAL_WORLD_SIZE
    # (table_row_wise splits a table over one host's ranks): Topology's default, the whole
    # world, would plan TwRw shards over every rank of a multi-host job. (A world of one has
    # no such variable to read: get_local_size would only warn.)
    local_world_size = get_local_size(env.world_size) if env.world_size > 1 else 1
    topology = Topology(world_size=env.world_size, local_world_size=local_world_size, compute_device=env.device.type)
    return invoke_on_rank_and_broadcast_result(dist.GroupMember.WORLD, 0, plan_on, model, list(sharders), topology, cfg)


def shard_model(
    model: nn.Module,
    env: DistEnv,
    cfg: TrainConfig,
    sharders: Optional[Sequence[ModuleSharder[nn.Module]]] = None,
    plan: Optional[ShardingPlan] = None,
) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """Wrap a model in DistributedModelParallel over the default process group.

    Args:
        model: the unsharded model.
        env: the ranks and their device.
        cfg: the `[train]` group (sharders' optimizer, sharding types).
        sharders: default `default_sharders(cfg)`.
        plan: default a new plan (`plan_sharding`, collective).

    Returns:
        (the sharded model, its plan).
    """
    sharders = list(sharders or default_sharders(cfg))
    plan = plan or plan_sharding(model, env, cfg, sharders)
    dmp = DistributedModelParallel(
        module=model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=env.device,
        plan=plan,
        sharders=sharders,
    )
    return dmp, plan


def init_embedding_weights(
    dmp: nn.Module, configs: Dict[str, BaseEmbeddingConfig], seed: int, skip_fresh_mixed: bool = False
) -> None:
    """Deterministic, sharding-independent init of every table (TorchRec's default law:
    uniform(+-sqrt(1 / num_embeddings))).

    Args:
        dmp: the sharded model; its mixed-precision modules and stock tables are written in place.
        configs: table name -> config, every table of the model.
        seed: the seed of the values (with the table's name and the row block).
        skip_fresh_mixed: leave the mixed-precision modules whose policy's seed is `seed` as
            they are, for a caller that knows nothing wrote them since they were built (they
            then already hold these rows: a sharded module fills its rows from the same law at
            construction). Writing them again took 0.5 s per 3.8 M rows at dim 64.
    """
    from shark_torchrec.distributed.mixed_precision import ShardedMixedPrecisionModule

    def law(table: str, r0: int, r1: int) -> torch.Tensor:
        cfg = configs[table]
        return initial_rows(seed, table, cfg.num_embeddings, cfg.embedding_dim, r0, r1)

    mixed = set()
    for m in dmp.modules():
        if isinstance(m, ShardedMixedPrecisionModule):
            if not (skip_fresh_mixed and m.precision_policy.seed == seed):
                m.fill_rows(law)
            mixed.update(m._table_names)
    if len(mixed) == len(configs):
        return
    state = dmp.state_dict()
    with torch.no_grad():
        for key, tensor in state.items():
            table = table_of_key(key, configs) if key.endswith(".weight") else None
            if table is None or table in mixed:
                continue
            cfg = configs[table]
            rows, dim = cfg.num_embeddings, cfg.embedding_dim
            if isinstance(tensor, ShardedTensor):
                for shard in tensor.local_shards():
                    r0, c0 = shard.metadata.shard_offsets
                    nr, nc = shard.metadata.shard_sizes
                    if nr == 0 or nc == 0:
                        continue
                    full = initial_rows(seed, table, rows, dim, r0, r0 + nr)
                    shard.tensor.copy_(full[:, c0 : c0 + nc])
            else:
                tensor.copy_(initial_rows(seed, table, rows, dim, 0, rows))


def build_optimizer(dmp: DistributedModelParallel, cfg: TrainConfig) -> CombinedOptimizer:
    """Fused optimizer of the sharded tables + Adagrad for the dense part.

    Data-parallel tables (only when allowed) get TorchRec's RowWiseAdagrad at the embedding
    learning rate, the same rule as the fused tables, instead of the dense optimizer.

    Args:
        dmp: the sharded model.
        cfg: the `[train]` group (`dense_lr`, `lr`, `eps`, `emb_optimizer`).

    Returns:
        The combined optimizer: `fused`, `dense` and, when there are any, `dp_tables`.
    """
    params = dict(in_backward_optimizer_filter(dmp.named_parameters()))
    dp_tables = {k: v for k, v in params.items() if ".embedding_bags." in k}
    dense = {k: v for k, v in params.items() if k not in dp_tables}
    optims = [
        ("fused", dmp.fused_optimizer),
        (
            "dense",
            KeyedOptimizerWrapper(dense, lambda p: torch.optim.Adagrad(p, lr=cfg.dense_lr, eps=cfg.eps)),
        ),
    ]
    if dp_tables:
        optims.append(
            (
                "dp_tables",
                KeyedOptimizerWrapper(
                    dp_tables,
                    lambda p: (
                        torch.optim.SGD(p, lr=cfg.lr)
                        if cfg.emb_optimizer == "sgd"
                        else RowWiseAdagrad(p, lr=cfg.lr, eps=cfg.eps)
                    ),
                ),
            )
        )
    return CombinedOptimizer(optims)

"""Worker of the table-row-wise test: 4 ranks laid out as 2 hosts x 2 on one machine
(importable by spawned ranks). Tables, batches, policy and the unsharded reference come from
mp_workers."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torchrec.distributed.types import ShardingType

from helpers import mp_workers as W
from shark_torchrec.config import TrainConfig
from shark_torchrec.distributed.env import init_distributed, shutdown_distributed
from shark_torchrec.distributed.mixed_precision import ShardedMixedPrecisionModule
from shark_torchrec.distributed.sharding import shard_model

LOCAL_WORLD_SIZE = 2  # ranks per simulated host


def pretend_hosts(local_world_size: int) -> None:
    """Make this process one of `local_world_size` ranks of a host: TorchRec's TwRw sharding
    takes the host size from LOCAL_WORLD_SIZE (its intra/cross-host process groups), and the
    local launcher set it to the whole world.

    Args:
        local_world_size: ranks per simulated host.
    """
    rank = int(os.environ["RANK"])
    os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    os.environ["LOCAL_RANK"] = str(rank % local_world_size)


def _train_step(dmp, smod, step: int, rank: int, world: int) -> torch.Tensor:
    """One forward/backward/optimizer step on this rank's share of global batch `step`;
    returns the pooled outputs of the whole global batch (gathered from every rank)."""
    keys, lengths, values, labels, G = W.batch(step)
    kjt, lo, hi = W.local_kjt(keys, lengths, values, labels, rank, world)
    out = dmp(kjt)
    pooled = torch.cat([out.to_dict()[k] for k in keys], dim=1)
    ((pooled * G[lo:hi]).sum() / (hi - lo)).backward()
    dmp.fused_optimizer.step()
    gathered = [torch.zeros_like(pooled) for _ in range(world)]
    dist.all_gather(gathered, pooled.detach())
    return torch.cat(gathered)


def _local_shards(state: dict) -> dict:
    """key -> [(shard offsets, tensor clone)] of this rank's shards of a sharded state dict."""
    out = {}
    for key, value in state.items():
        if hasattr(value, "local_shards"):
            out[key] = [(list(s.metadata.shard_offsets), s.tensor.clone()) for s in value.local_shards()]
        else:
            out[key] = [([], value.clone())]
    return out


def _same(a: dict, b: dict) -> bool:
    """Whether two `_local_shards` results hold the same shards with identical tensors."""
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k]) and all(o1 == o2 and torch.equal(t1, t2) for (o1, t1), (o2, t2) in zip(a[k], b[k]))
        for k in a
    )


def twrw_run(steps: int, pol_kw: dict, save_to: str):
    """Train the bag collection table-row-wise on 2 hosts x 2 ranks, save a DCP checkpoint,
    train one more step, then load the checkpoint back.

    Args:
        steps: training steps before the checkpoint.
        pol_kw: PrecisionPolicy overrides (see mp_workers.policy).
        save_to: DCP checkpoint directory.

    Returns:
        On rank 0: outputs per step, gathered tables (as of the checkpoint), precision_memory(),
        the plan's shards per table ([placement rank, row offset, rows]), each rank's local
        table slices, the sizes of TorchRec's intra- and cross-host process groups, and per
        rank (whether the extra step changed its shards, whether the reload restored them
        exactly).
    """
    pretend_hosts(LOCAL_WORLD_SIZE)
    env = init_distributed()
    rank, world = env.rank, env.world_size
    model = W.Wrap(W.make_module(False, pol_kw))
    # shark train's own planning (its sharders, our storage estimator, its topology) with
    # only table_row_wise allowed; its fused_params must agree with the policy's learning rate.
    train = TrainConfig(sharding_types=(ShardingType.TABLE_ROW_WISE.value,), lr=W.policy(**pol_kw).learning_rate)
    dmp, plan = shard_model(model, env, train)
    smod = dmp.module.ebc
    assert isinstance(smod, ShardedMixedPrecisionModule)
    smod.fill_rows(W.init_values)
    outs = [_train_step(dmp, smod, step, rank, world) for step in range(steps)]

    state = smod.state_dict()
    dcp.save(state, checkpoint_id=save_to)
    saved = _local_shards(state)
    result = {
        "outputs": outs,
        "tables": W.logical_tables(smod, smod._mp_prefix),
        "memory": smod.precision_memory(),
        "shards": {
            name: [[int(s.placement.rank()), s.shard_offsets[0], s.shard_sizes[0]] for s in ps.sharding_spec.shards]
            for name, ps in plan.plan["ebc"].items()
        },
        "sharding_types": sorted({ps.sharding_type for ps in plan.plan["ebc"].values()}),
        "host_group_sizes": [
            smod._embedding_shardings[0]._intra_pg.size(),
            smod._embedding_shardings[0]._cross_pg.size(),
        ],
    }
    local = [(t.name, t.row_offset, t.rows) for store, _ in smod.stores() for t in store.tables]
    everyone = [None] * world
    dist.all_gather_object(everyone, local)
    result["local_tables"] = everyone

    # One more step moves values and groups; loading the checkpoint must bring them back.
    _train_step(dmp, smod, steps, rank, world)
    moved_on = not _same(saved, _local_shards(smod.state_dict()))
    template = smod.state_dict()
    dcp.load(template, checkpoint_id=save_to)
    smod.load_state_dict(template)
    restored = _same(saved, _local_shards(smod.state_dict()))
    flags = [None] * world
    dist.all_gather_object(flags, (moved_on, restored))
    result["moved_on_then_restored"] = flags
    shutdown_distributed()
    return result

"""Train a one-rank sharded model (a row-wise table of ~1 GB in fp32 and a data-parallel table of
~256 MB) under a 0.35 budget, save a checkpoint through the jobs' `save_checkpoint`, load it
back through `load_checkpoint`, and print peak RSS as JSON at each stage (run as a separate
process so that its peak is its own).

    python rss_probe_sharded.py BIG_ROWS REPLICATED_ROWS DIM STEPS OUT_DIR [eager]

`eager` saves and loads through `model.state_dict()` instead (what the probe is there to tell
apart)."""

import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.distributed.env import init_distributed, shutdown_distributed
from shark_torchrec.distributed.mixed_precision import MixedPrecisionEmbeddingBagCollectionSharder
from shark_torchrec.jobs import checkpoint
from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.precision.labels import tag_labels


def rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class Wrap(torch.nn.Module):
    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt):
        return self.ebc(kjt)


def eager_load(model, load, optimizer, check=None):
    """The load through `state_dict()` (every row decoded to fp32 first)."""
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    load(state)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optim"])


def main(big: int, replicated: int, dim: int, steps: int, out: str, eager: bool) -> None:
    torch.manual_seed(0)
    init_distributed()
    before = rss()
    tables = [
        EmbeddingBagConfig(name="big", embedding_dim=dim, num_embeddings=big, feature_names=["f"]),
        EmbeddingBagConfig(name="rep", embedding_dim=dim, num_embeddings=replicated, feature_names=["g"]),
    ]
    policy = PrecisionPolicy(memory_budget=0.35, reassign_every=4, optimizer="rowwise_adagrad", learning_rate=0.1)
    model = Wrap(MixedPrecisionEmbeddingBagCollection(tables, device=torch.device("meta"), precision_policy=policy))
    sharders = [MixedPrecisionEmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=1, compute_device="cpu"),
        constraints={
            "big": ParameterConstraints(sharding_types=["row_wise"]),
            "rep": ParameterConstraints(sharding_types=["data_parallel"]),
        },
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=sharders,
    )
    after_init = rss()
    B = 4096
    for step in range(steps):
        f = (torch.rand(B * 4) ** 4 * big).long()  # skewed: hot rows repeat
        g = (torch.rand(B * 2) ** 4 * replicated).long()
        kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["f", "g"],
            values=torch.cat([f, g]),
            lengths=torch.cat([torch.full((B,), 4, dtype=torch.int32), torch.full((B,), 2, dtype=torch.int32)]),
        )
        pooled = dmp(tag_labels(kjt, (torch.rand(B) < 0.3).float())).values()
        (pooled**2).sum().backward()
        dmp.fused_optimizer.step()  # as a TorchRec user does (the rows updated in the backward)
    after_train = rss()
    if eager:
        checkpoint.lazy_state_dict = lambda m: m.state_dict()
    t0 = time.perf_counter()
    ckpt = checkpoint.save_checkpoint(Path(out), steps, dmp, dmp.fused_optimizer, {}, keep=1)
    save_seconds = time.perf_counter() - t0
    saved = sum(p.stat().st_size for p in ckpt.iterdir())
    after_save = rss()
    if eager:
        checkpoint.load_state_in_place = eager_load
    t0 = time.perf_counter()
    checkpoint.load_checkpoint(ckpt, dmp, dmp.fused_optimizer, {})  # the resume path
    load_seconds = time.perf_counter() - t0
    smod = dmp.module.ebc
    memory = smod.precision_memory()
    print(
        json.dumps(
            {
                "rss_before_bytes": before,
                "peak_rss_after_init_bytes": after_init,
                "peak_rss_after_train_bytes": after_train,
                "peak_rss_after_save_bytes": after_save,
                "peak_rss_after_load_bytes": rss(),
                "fp32_bytes": (big + replicated) * dim * 4,
                "embedding_bytes": sum(m["embedding_bytes"] for m in memory.values()),
                "checkpoint_bytes": saved,
                "save_seconds": save_seconds,
                "load_seconds": load_seconds,
                "sharding": {n: p.sharding_type for n, p in plan.plan["ebc"].items()},
            }
        )
    )
    shutdown_distributed()


if __name__ == "__main__":
    a = sys.argv[1:]
    main(int(a[0]), int(a[1]), int(a[2]), int(a[3]), a[4], len(a) > 5 and a[5] == "eager")

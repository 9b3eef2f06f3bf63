"""A TorchRec model of your own (not DLRM) with SHARK's mixed-precision rows.

What changes against a stock TorchRec job is marked `# SHARK:`: the two collections are ours
(same constructor, plus an optional PrecisionPolicy), our two sharders go in front of TorchRec's,
the planner is TorchRec's with our storage estimator (`make_planner`; the stock one sizes our
tables as fp32), and the train pipeline is `LabelTaggingTrainPipeline` (it hands each id its
sample's label, which paper Eq. 7 weighs). The learning rate and optimizer come from the
sharders' `fused_params`, as for stock fused tables; rows update in the backward pass and are
regrouped every `reassign_every` steps with no call of yours; the optimizer state is in
`fused_optimizer`.

    torchrun --nproc_per_node 2 examples/own_model.py      # 2 ranks (gloo on CPU, NCCL on GPU)
    python examples/own_model.py                          # 1 rank

It trains on a small synthetic problem, checkpoints with torch.distributed.checkpoint, loads the
checkpoint into a freshly sharded model, and prints (rank 0) a JSON line with what it saw.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel, get_default_sharders
from torchrec.distributed.planner import Topology
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from torchrec.streamable import Pipelineable

from shark_torchrec.distributed.env import exit_without_teardown
from shark_torchrec.distributed.mixed_precision import (  # SHARK: our sharders
    MixedPrecisionEmbeddingBagCollectionSharder,
    MixedPrecisionEmbeddingCollectionSharder,
    lazy_state_dict,  # SHARK: checkpoints without an fp32 copy of the rows
    load_state_in_place,
)
from shark_torchrec.distributed.sharding import embedding_configs, sharding_constraints
from shark_torchrec.distributed.train_pipeline import LabelTaggingTrainPipeline  # SHARK: labels reach the rows
from shark_torchrec.modules.mixed_precision import (  # SHARK: in place of EmbeddingBagCollection / EmbeddingCollection
    MixedPrecisionEmbeddingBagCollection,
    MixedPrecisionEmbeddingCollection,
)
from shark_torchrec.modules.model_budget import share_model_budget  # SHARK: one budget over all collections
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.planner.storage import make_planner  # SHARK: TorchRec's planner, our tables' real bytes

DIM = 16
USERS, TAGS, ITEMS = 2000, 300, 1000
GLOBAL_BATCH = 64
STEPS = 40


@dataclass
class Batch(Pipelineable):
    """A user's id and tags (bags), the items they saw (a sequence), two dense values, a label."""

    dense: torch.Tensor
    user_features: KeyedJaggedTensor
    history: KeyedJaggedTensor
    labels: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            *(
                x.to(device=device, non_blocking=non_blocking)
                for x in (self.dense, self.user_features, self.history, self.labels)
            )
        )

    def record_stream(self, stream: torch.Stream) -> None:
        for x in (self.dense, self.user_features, self.history, self.labels):
            x.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(*(x.pin_memory() for x in (self.dense, self.user_features, self.history, self.labels)))


@torch.fx.wrap  # a leaf for the fx trace TorchRec's train pipeline makes of the model
def mean_per_sample(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """[B, D] means of a jagged [sum(lengths), D] (0 for an empty sequence)."""
    segment = torch.repeat_interleave(torch.arange(lengths.numel(), device=lengths.device), lengths)
    sums = torch.zeros(lengths.numel(), values.shape[1], device=values.device).index_add_(0, segment, values)
    return sums / lengths.clamp_min(1)[:, None]


class ClickModel(nn.Module):
    """Pooled user features and the mean of the history's item vectors, then an MLP."""

    def __init__(self, user_tables: nn.Module, item_table: nn.Module) -> None:
        super().__init__()
        self.user_tables = user_tables
        self.item_table = item_table
        self.head = nn.Sequential(nn.Linear(2 + 3 * DIM, 32), nn.ReLU(), nn.Linear(32, 1))

    def forward(self, batch: Batch):
        users = self.user_tables(batch.user_features).values()  # [B, 2 * DIM]
        seq = self.item_table(batch.history)["item_seen"]  # one vector per history item
        history = mean_per_sample(seq.values(), seq.lengths())
        logits = self.head(torch.cat([batch.dense, users, history], dim=1)).squeeze(1)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach())  # TorchRec's pipeline returns the second item


def make_model() -> ClickModel:
    user_tables = [
        EmbeddingBagConfig(name="user_id", embedding_dim=DIM, num_embeddings=USERS, feature_names=["user"]),
        EmbeddingBagConfig(
            name="user_tags", embedding_dim=DIM, num_embeddings=TAGS, feature_names=["tags"], pooling=PoolingType.MEAN
        ),
    ]
    item_tables = [
        EmbeddingConfig(name="item_ids", embedding_dim=DIM, num_embeddings=ITEMS, feature_names=["item_seen"])
    ]
    policy = PrecisionPolicy(reassign_every=10)  # SHARK: default budget for dim 16 (0.43 of fp32)
    meta = torch.device("meta")
    return ClickModel(
        MixedPrecisionEmbeddingBagCollection(user_tables, device=meta, precision_policy=policy),
        MixedPrecisionEmbeddingCollection(item_tables, device=meta, precision_policy=policy),
    )


def batches(seed: int, rank: int, world: int):
    """Local batches of a synthetic problem: users with an even id and tag 7 click more."""
    g = torch.Generator().manual_seed(seed)
    local = GLOBAL_BATCH // world
    for _ in range(STEPS):
        user = (torch.rand(GLOBAL_BATCH, generator=g) ** 2 * USERS).long()
        tags_len = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
        tags = torch.randint(0, TAGS, (int(tags_len.sum()),), generator=g)
        hist_len = torch.randint(1, 6, (GLOBAL_BATCH,), generator=g)
        hist = (torch.rand(int(hist_len.sum()), generator=g) ** 3 * ITEMS).long()
        dense = torch.randn(GLOBAL_BATCH, 2, generator=g)
        tag_start = torch.cumsum(tags_len, 0) - tags_len
        has7 = torch.tensor([bool((tags[s : s + n] == 7).any()) for s, n in zip(tag_start.tolist(), tags_len.tolist())])
        p = torch.sigmoid(1.5 * (user % 2 == 0).float() + 1.0 * has7.float() + 0.5 * dense[:, 0] - 1.0)
        labels = (torch.rand(GLOBAL_BATCH, generator=g) < p).float()
        lo, hi = rank * local, (rank + 1) * local  # this rank's samples of the global batch
        t0, t1 = int(tag_start[lo]), int(tag_start[hi - 1] + tags_len[hi - 1])
        h_start = torch.cumsum(hist_len, 0) - hist_len
        h0, h1 = int(h_start[lo]), int(h_start[hi - 1] + hist_len[hi - 1])
        user_kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["user", "tags"],
            values=torch.cat([user[lo:hi], tags[t0:t1]]),
            lengths=torch.cat([torch.ones(local, dtype=torch.int32), tags_len[lo:hi].int()]),
        )
        hist_kjt = KeyedJaggedTensor.from_lengths_sync(
            keys=["item_seen"], values=hist[h0:h1], lengths=hist_len[lo:hi].int()
        )
        yield Batch(dense[lo:hi], user_kjt, hist_kjt, labels[lo:hi])


def local_parts(t):
    """This rank's pieces of a (sharded) tensor."""
    return [s.tensor for s in t.local_shards()] if hasattr(t, "local_shards") else [t]


def shard(model: nn.Module, world: int, device: torch.device) -> DistributedModelParallel:
    fused = {"optimizer": EmbOptimType.EXACT_ROWWISE_ADAGRAD, "learning_rate": 0.05, "eps": 1e-8}
    sharders = [  # SHARK: our sharders first; TorchRec's own for any stock module
        MixedPrecisionEmbeddingBagCollectionSharder(fused_params=fused),
        MixedPrecisionEmbeddingCollectionSharder(fused_params=fused),
        *get_default_sharders(),
    ]
    # SHARK: our tables' bytes; and on CPU the sharding types TorchRec's own bag sharder offers
    # there: offered every type, the planner may split small tables row-wise, an exchange a step
    # it does not price (docs/f-quantization.md, "Sharding"). Here it places each collection's
    # tables whole, on one rank each.
    types = ["table_wise", "column_wise", "table_column_wise"] if device.type == "cpu" else None
    constraints = sharding_constraints(embedding_configs(model), types) if types else None
    planner = make_planner(Topology(world_size=world, compute_device=device.type), constraints)
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(
        model, env=ShardingEnv.from_process_group(dist.GroupMember.WORLD), device=device, plan=plan, sharders=sharders
    )


def main() -> int:
    torchrun = "RANK" in os.environ
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torchrun:
        dist.init_process_group(backend)
    else:
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    torch.manual_seed(0)  # the same dense weights on every rank

    dmp = shard(make_model(), world, device)
    share_model_budget(
        dmp
    )  # SHARK: with budget_scope="model", one budget over both collections (here: per table, a no-op)
    dense_params = {k: v for k, v in dmp.named_parameters() if "head" in k}
    dense_opt = torch.optim.Adagrad(dense_params.values(), lr=0.05)
    pipeline = LabelTaggingTrainPipeline(dmp, dense_opt, device, features=["user_features", "history"])  # SHARK
    data = batches(seed=1, rank=rank, world=world)
    losses = []
    while True:
        try:
            loss, _ = pipeline.progress(data)
        except StopIteration:
            break
        losses.append(float(loss))
    pipeline.detach()  # the model's own forward back (the pipeline had rewritten it)

    # The optimizer state of our tables is where TorchRec users look for it.
    optim_state = dmp.fused_optimizer.state_dict()["state"]
    momentum_keys = sorted(k for entry in optim_state.values() for k in entry)

    ckpt = tempfile.mkdtemp() if rank == 0 else None
    box = [ckpt]
    dist.broadcast_object_list(box, src=0)
    ckpt = box[0]
    # SHARK: lazy_state_dict decodes the rows a block at a time as DCP writes them (state_dict()
    # would hold every row in fp32 at once).
    dcp.save({"model": lazy_state_dict(dmp), "optim": dmp.fused_optimizer.state_dict()}, checkpoint_id=ckpt)

    fresh = shard(make_model(), world, device)
    # SHARK: load_state_in_place puts each row read straight into its store (loading through
    # fresh.state_dict() also works, but decodes every row to fp32 first).
    load_state_in_place(fresh, lambda state: dcp.load(state, checkpoint_id=ckpt), fresh.fused_optimizer)
    dmp.eval()
    fresh.eval()
    probe = next(batches(seed=2, rank=rank, world=world))
    with torch.no_grad():
        same = bool(torch.equal(dmp(probe)[1][1], fresh(probe)[1][1]))
    trained_state, reloaded_state = (
        dmp.fused_optimizer.state_dict()["state"],
        fresh.fused_optimizer.state_dict()["state"],
    )
    momentum_equal = all(
        all(torch.equal(a, b) for a, b in zip(local_parts(value), local_parts(reloaded_state[key][name])))
        for key, entry in trained_state.items()
        for name, value in entry.items()
    )
    groups = [0, 0, 0]
    for m in (dmp.module.user_tables, dmp.module.item_table):
        for row in m.precision_memory().values():
            for i, g in enumerate(("rows_fp32", "rows_fp16", "rows_int8")):
                groups[i] += row[g]
    step = dmp.module.user_tables.step_counter.value
    n = len(losses) // 4
    result = {
        "world_size": world,
        "steps": step,
        "loss_first_quarter": sum(losses[:n]) / n,
        "loss_last_quarter": sum(losses[-n:]) / n,
        "rows_fp32_fp16_int8": groups,
        "momentum_keys": momentum_keys,
        "reloaded_predictions_equal": same,
        "reloaded_momentum_equal": momentum_equal,
        "memory_budget": dmp.module.user_tables.precision_policy.memory_budget,
        "learning_rate": dmp.module.user_tables.precision_policy.learning_rate,
        "ranks_by_table": {
            table: sorted({r for r in (ps.ranks or [])})
            for module in dmp.plan.plan.values()
            for table, ps in module.items()
        },
    }
    if rank == 0:
        print(json.dumps(result))
    # Both ranks done before the group goes (and before the checkpoint does).
    dist.barrier()
    if rank == 0:
        shutil.rmtree(ckpt, ignore_errors=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    # Output flushed, then no interpreter teardown: during it a gloo worker thread still
    # releasing a finished collective's tensors aborts the process (see exit_without_teardown).
    exit_without_teardown(main())

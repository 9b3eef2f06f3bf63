"""Worker functions for the 2-process tests of the mixed-precision collection (importable by
spawned ranks)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.types import ShardingEnv
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from shark_torchrec.distributed.env import init_distributed, shutdown_distributed
from shark_torchrec.distributed.mixed_precision import (
    MixedPrecisionEmbeddingBagCollectionSharder,
    MixedPrecisionEmbeddingCollectionSharder,
    ShardedMixedPrecisionModule,
)
from shark_torchrec.modules.mixed_precision import (
    MixedPrecisionEmbeddingBagCollection,
    MixedPrecisionEmbeddingCollection,
)
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.precision.labels import tag_labels

TABLES = [("t0", 300, ["f0"]), ("t1", 120, ["f1", "f1b"]), ("t2", 64, ["f2"])]
DIM = 16
GLOBAL_BATCH = 32


def tables(sequence: bool = False):
    cls = EmbeddingConfig if sequence else EmbeddingBagConfig
    return [cls(name=n, embedding_dim=DIM, num_embeddings=r, feature_names=f) for n, r, f in TABLES]


def make_module(sequence: bool, pol_kw: dict):
    """The collection of TABLES; `pol_kw` overrides the policy, and its `weighted` key (not a
    policy field) makes the bag collection weighted (`is_weighted`)."""
    kw = dict(pol_kw)
    weighted = kw.pop("weighted", False)
    if sequence:
        return MixedPrecisionEmbeddingCollection(tables(True), precision_policy=policy(**kw))
    return MixedPrecisionEmbeddingBagCollection(tables(), is_weighted=weighted, precision_policy=policy(**kw))


ID_GRAD = torch.randn(7, DIM, generator=torch.Generator().manual_seed(5))


def policy(**kw) -> PrecisionPolicy:
    base = dict(
        mode="shark",
        memory_budget=0.6,
        fp32_fraction=0.1,
        reassign_every=1000,
        optimizer="rowwise_adagrad",
        learning_rate=0.5,
    )
    base.update(kw)
    return PrecisionPolicy(**base)


def init_values(table: str, r0: int, r1: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(map(ord, table)))
    rows = dict((n, r) for n, r, _ in TABLES)[table]
    full = torch.rand(rows, DIM, generator=g) * 2 - 1
    return full[r0:r1]


def batch(step: int):
    """A global batch (KJT, labels, output-gradient weights), the same on every rank."""
    g = torch.Generator().manual_seed(1000 + step)
    keys, lengths, values = [], [], []
    for n, rows, feats in TABLES:
        for f in feats:
            ln = torch.randint(0, 4, (GLOBAL_BATCH,), generator=g)
            # Skewed ids so that some rows repeat within the batch.
            v = (torch.rand(int(ln.sum()), generator=g) ** 3 * rows).long()
            keys.append(f)
            lengths.append(ln)
            values.append(v)
    labels = (torch.rand(GLOBAL_BATCH, generator=g) < 0.4).float()
    G = torch.randn(GLOBAL_BATCH, DIM * len(keys), generator=g)
    return keys, torch.stack(lengths), values, labels, G


def id_weights(step: int, values):
    """Per-id weights of `batch(step)`'s ids for a weighted collection, the same on every rank
    (in (0.5, 1.5), so a weight that is lost or misplaced changes the output)."""
    g = torch.Generator().manual_seed(2000 + step)
    return [torch.rand(len(v), generator=g) + 0.5 for v in values]


def local_kjt(keys, lengths, values, labels, rank: int, world: int, weights=None):
    B = GLOBAL_BATCH // world
    lo, hi = rank * B, (rank + 1) * B
    vals, lens, ws = [], [], []
    for i in range(len(keys)):
        off = torch.cat([torch.zeros(1, dtype=torch.long), lengths[i].cumsum(0)])
        vals.append(values[i][off[lo] : off[hi]])
        lens.append(lengths[i][lo:hi])
        if weights is not None:
            ws.append(weights[i][off[lo] : off[hi]])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=keys,
        values=torch.cat(vals),
        lengths=torch.cat(lens).int(),
        weights=torch.cat(ws) if weights is not None else None,
    )
    return tag_labels(kjt, labels[lo:hi]), lo, hi


def end_of_step(trained) -> None:
    """What a TorchRec user does after the backward pass: DMP's fused optimizer `step()`, which
    for our modules only carries the learning rate (the step itself ended with the backward
    pass, so it must not advance twice); nothing for the unsharded collection."""
    if isinstance(trained, DistributedModelParallel):
        trained.fused_optimizer.step()


class Wrap(nn.Module):
    def __init__(self, ebc):
        super().__init__()
        self.ebc = ebc

    def forward(self, kjt):
        return self.ebc(kjt)


def logical_tables(module, prefix: str = "embedding_bags") -> dict:
    """Whole tables from the state dict (sharded ones gathered on rank 0): dequantized
    values, groups and, when the policy scores rows, scores and the step each was taken."""
    sd = module.state_dict()
    out = {}
    for n, rows, _ in TABLES:
        for key in ("weight", "row_group", "row_priority", "row_seen_step", "fallback"):
            if f"{prefix}.{n}.{key}" not in sd:
                continue
            v = sd[f"{prefix}.{n}.{key}"]
            if hasattr(v, "local_shards"):
                full = torch.zeros(v.size(), dtype=v.dtype) if dist.get_rank() == 0 else None
                v.gather(0, full)
                out[f"{n}.{key}"] = full
            else:
                out[f"{n}.{key}"] = v.clone()
    return out


def sequence_loss(out, keys, kjt, batch: int):
    values = torch.cat([out[k].values() for k in keys])
    ids = kjt.values()
    return values, (values * ID_GRAD[ids % 7]).sum() / batch


def sharded_model(sharding_type, pol_kw: dict, sequence: bool = False) -> DistributedModelParallel:
    """Our collection of TABLES in a DMP, each table sharded as `sharding_type` says (one type,
    or table -> type)."""
    world = dist.get_world_size()
    model = Wrap(make_module(sequence, pol_kw))
    sharders = [
        MixedPrecisionEmbeddingCollectionSharder() if sequence else MixedPrecisionEmbeddingBagCollectionSharder()
    ]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        constraints={
            n: ParameterConstraints(
                sharding_types=[sharding_type[n] if isinstance(sharding_type, dict) else sharding_type], min_partition=8
            )
            for n, _, _ in TABLES
        },
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    return DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=sharders,
    )


def local_state_equal(a, b) -> bool:
    """Whether two models of the same plan hold the same state on this rank, bit for bit."""
    sa, sb = a.state_dict(), b.state_dict()
    if sorted(sa) != sorted(sb):
        return False
    for k, v in sa.items():
        w = sb[k]
        pa = [s.tensor for s in v.local_shards()] if hasattr(v, "local_shards") else [v]
        pb = [s.tensor for s in w.local_shards()] if hasattr(w, "local_shards") else [w]
        if len(pa) != len(pb) or not all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(pa, pb)):
            return False
    return True


def sharded_run(sharding_type, steps: int, pol_kw: dict, sequence: bool = False, save_to: str = "", reload_as=None):
    env = init_distributed()
    rank, world = env.rank, env.world_size
    dmp = sharded_model(sharding_type, pol_kw, sequence)
    smod = dmp.module.ebc
    assert isinstance(smod, ShardedMixedPrecisionModule)
    smod.fill_rows(init_values)
    widths = sorted({t.dim for store, _ in smod.stores() for t in store.tables})
    outs = []
    for step in range(steps):
        keys, lengths, values, labels, G = batch(step)
        weights = id_weights(step, values) if pol_kw.get("weighted") else None
        kjt, lo, hi = local_kjt(keys, lengths, values, labels, rank, world, weights)
        out = dmp(kjt)
        if sequence:
            pooled, loss = sequence_loss(out, keys, kjt, hi - lo)
        else:
            pooled = torch.cat([out.to_dict()[k] for k in keys], dim=1)
            loss = (pooled * G[lo:hi]).sum() / (hi - lo)
        loss.backward()
        end_of_step(dmp)
        if sequence:  # per-id vectors: rank 0's share is comparable with the reference's head
            outs.append(pooled.detach() if rank == 0 else None)
        else:
            gathered = [torch.zeros_like(pooled) for _ in range(world)]
            dist.all_gather(gathered, pooled.detach())
            outs.append(torch.cat(gathered))
    copies = lazy_refusal = in_place_equal = None
    if save_to:
        import torch.distributed.checkpoint as dcp

        from shark_torchrec.distributed import lazy_rows
        from shark_torchrec.distributed.mixed_precision import lazy_state_dict

        # Saved twice: as the state dict gives it, and through lazy blocks of 7 rows (the
        # caller compares the two checkpoints).
        dcp.save(smod.state_dict(), checkpoint_id=save_to)
        lazy_rows.BLOCK_BYTES = 7 * 4 * DIM
        dcp.save(lazy_state_dict(smod), checkpoint_id=save_to + "_lazy")
        if reload_as is not None:
            # Loaded straight into the stores of a model of the plan `reload_as` (load_state_in_place,
            # 7-row blocks), and as state_dict() loads into another: the same state.
            from shark_torchrec.distributed.mixed_precision import load_state_in_place

            # The checkpoint saved from state_dict() (one chunk a shard, as older checkpoints)
            # loads in place the same way.
            models = [sharded_model(reload_as, pol_kw, sequence).module.ebc for _ in range(3)]
            in_place, from_eager, through_fp32 = models
            load_state_in_place(in_place, lambda st: dcp.load(st["model"], checkpoint_id=save_to + "_lazy"))
            load_state_in_place(from_eager, lambda st: dcp.load(st["model"], checkpoint_id=save_to))
            state = through_fp32.state_dict()
            dcp.load(state, checkpoint_id=save_to + "_lazy")
            through_fp32.load_state_dict(state)
            same = [None] * world
            mine = local_state_equal(in_place, through_fp32) and local_state_equal(from_eager, through_fp32)
            dist.all_gather_object(same, mine)
            in_place_equal = all(same)
        try:  # a lazy state dict cannot be loaded into: refused by name, nothing loaded
            smod.load_state_dict(lazy_state_dict(smod))
            lazy_refusal = None
        except ValueError as e:
            lazy_refusal = str(e)
        if any(s.has_dropped for s, _ in smod.stores()):
            # Load it back over zeroed fallback rows: each shard's copy must come back (the
            # checkpoint holds each table's fallback once, from the shard at row 0).
            for store, _ in smod.stores():
                for i in range(len(store.tables)):
                    store.set_fallback_rows(i, torch.zeros(store.dim), 0.0)
            state = smod.state_dict()
            dcp.load(state, checkpoint_id=save_to)
            smod.load_state_dict(state)
            mine = [
                (t.name, t.row_offset, store.fallback_rows()[i].clone())
                for store, _ in smod.stores()
                for i, t in enumerate(store.tables)
            ]
            copies = [None] * world
            dist.all_gather_object(copies, mine)
    all_widths = [None] * world
    dist.all_gather_object(all_widths, widths)
    result = {
        "widths": all_widths,
        "outputs": outs,
        "tables": logical_tables(smod, smod._mp_prefix),
        "memory": smod.precision_memory(),
        "fallback_copies": copies,
        "lazy_refusal": lazy_refusal,
        "in_place_equal": in_place_equal,
    }
    shutdown_distributed()
    return result


def unsharded_run(steps: int, pol_kw: dict, sequence: bool = False, world: int = 2, kernels=None):
    """The steps of `sharded_run` on the unsharded module (whole global batches); `kernels`
    forces the stores' lookup and update kernels ("cpp", "triton", "torch"; None: by device)."""
    ebc = make_module(sequence, pol_kw)
    ebc.materialize(torch.device("cpu"), init=init_values)
    for store in ebc.stores:
        store.kernels = kernels
    outs = []
    for step in range(steps):
        keys, lengths, values, labels, G = batch(step)
        weights = id_weights(step, values) if pol_kw.get("weighted") else None
        kjt, lo, hi = local_kjt(keys, lengths, values, labels, 0, 1, weights)
        out = ebc(kjt)
        if sequence:
            vec, loss = sequence_loss(out, keys, kjt, GLOBAL_BATCH)
            # Rank 0 of `world` holds the first samples of each feature: its ids, in order.
            head, _, _ = local_kjt(keys, lengths, values, labels, 0, world)
            sel = torch.cat(
                [
                    torch.arange(o, o + n)
                    for o, n in zip(
                        [0] + torch.tensor(kjt.length_per_key()).cumsum(0).tolist()[:-1], head.length_per_key()
                    )
                ]
            )
            outs.append(vec.detach()[sel])
        else:
            vec = torch.cat([out.to_dict()[k] for k in keys], dim=1)
            loss = (vec * G).sum() / GLOBAL_BATCH
            outs.append(vec.detach())
        loss.backward()
        end_of_step(ebc)
    return {"outputs": outs, "stores": ebc.stores, "tables": logical_tables(ebc, ebc._mp_prefix)}


def reference_math_run(steps: int, pol_kw: dict, sequence: bool = False, world: int = 2):
    """The steps of `sharded_run` through the plain-torch reference (tests/helpers/reference.py),
    outputs shaped as `sharded_run` returns them."""
    from helpers.reference import Reference, bag_id_grads

    p = policy(**pol_kw).resolved([DIM])
    ref = Reference(
        {n: init_values(n, 0, rows) for n, rows, _ in TABLES},
        [(f, n) for n, _, feats in TABLES for f in feats],
        learning_rate=p.learning_rate,
        eps=p.eps,
        alpha=p.alpha,
        beta=p.beta,
        seed=p.seed,
        memory_budget=p.memory_budget,
        fp32_fraction=p.fp32_fraction,
        reassign_every=p.reassign_every,
        groups=p.groups,
        row_fractions=p.row_fractions,
        momentum_dtype=p.momentum_dtype or "fp32",
    )
    head = GLOBAL_BATCH // world  # rank 0's samples
    outs = []
    for step in range(steps):
        keys, lengths, values, labels, G = batch(step)
        bag_lengths, ids = dict(zip(keys, lengths)), dict(zip(keys, values))
        id_labels = {f: labels[torch.repeat_interleave(torch.arange(GLOBAL_BATCH), bag_lengths[f])] for f in keys}
        if sequence:
            vectors = ref.per_id(ids)
            outs.append(torch.cat([vectors[f][: int(bag_lengths[f][:head].sum())] for f in keys]))
            # loss = sum over ids of row . ID_GRAD[id % 7], over the global batch
            id_grads = {f: ID_GRAD[ids[f] % 7] / GLOBAL_BATCH for f in keys}
        else:
            outs.append(ref.pooled(bag_lengths, ids))
            # loss = sum(pooled * G) over the global batch
            id_grads = bag_id_grads(G / GLOBAL_BATCH, bag_lengths, keys, DIM)
        ref.train_step(step, ids, id_grads, id_labels)
    return {"outputs": outs, "tables": ref.state(), "moved_rows": ref.moved_rows}


# Two collections of one model under one budget: t0 and t1 in the first, t2 in the second.
SPLIT = (("a", ("t0", "t1")), ("b", ("t2",)))


class TwoCollections(nn.Module):
    def __init__(self, pol_kw: dict, device=None):
        super().__init__()
        by_name = {c.name: c for c in tables()}
        self.a, self.b = (
            MixedPrecisionEmbeddingBagCollection(
                [by_name[n] for n in names], precision_policy=policy(**pol_kw), device=device
            )
            for _, names in SPLIT
        )

    def forward(self, kjt):
        a_keys = [f for n, _, feats in TABLES if n in SPLIT[0][1] for f in feats]
        first, second = kjt.split([len(a_keys), len(kjt.keys()) - len(a_keys)])
        return {**self.a(first).to_dict(), **self.b(second).to_dict()}


def two_collection_steps(model, steps: int, rank: int, world: int) -> None:
    for step in range(steps):
        keys, lengths, values, labels, G = batch(step)
        kjt, lo, hi = local_kjt(keys, lengths, values, labels, rank, world)
        out = model(kjt)
        pooled = torch.cat([out[k] for k in keys], dim=1)
        ((pooled * G[lo:hi]).sum() / (hi - lo)).backward()
        end_of_step(model)


def two_collection_run(sharding_type: dict, steps: int, pol_kw: dict, share: bool = True):
    """`sharded_run` with the tables split over two collections of one model, sharing one
    model budget (`share_model_budget`)."""
    from shark_torchrec.modules.model_budget import share_model_budget

    env = init_distributed()
    rank, world = env.rank, env.world_size
    model = TwoCollections(pol_kw, device=torch.device("meta"))
    sharders = [MixedPrecisionEmbeddingBagCollectionSharder()]
    planner = EmbeddingShardingPlanner(
        topology=Topology(world_size=world, compute_device="cpu"),
        constraints={n: ParameterConstraints(sharding_types=[sharding_type[n]], min_partition=8) for n, _, _ in TABLES},
    )
    plan = planner.collective_plan(model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
        device=torch.device("cpu"),
        plan=plan,
        sharders=sharders,
    )
    if share:
        share_model_budget(dmp)
    mods = [dmp.module.a, dmp.module.b]
    for m in mods:
        assert isinstance(m, ShardedMixedPrecisionModule)
        m.fill_rows(init_values)
    two_collection_steps(dmp, steps, rank, world)
    result = {"tables": {}, "memory": {}}
    for m in mods:
        result["tables"].update(logical_tables(m, m._mp_prefix))
        result["memory"].update(m.precision_memory())
    try:  # the gradient-weighted signal under the same plan (a column-wise table): refused
        DistributedModelParallel(
            TwoCollections({**pol_kw, "signal": "eq7-grad"}, device=torch.device("meta")),
            env=ShardingEnv.from_process_group(dist.GroupMember.WORLD),
            device=torch.device("cpu"),
            plan=plan,
            sharders=sharders,
        )
        result["grad_signal_refusal"] = None
    except ValueError as e:
        result["grad_signal_refusal"] = str(e)
    shutdown_distributed()
    return result

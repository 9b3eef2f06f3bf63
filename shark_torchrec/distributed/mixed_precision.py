"""Sharding `MixedPrecisionEmbeddingBagCollection` with DistributedModelParallel.

The shape follows TorchRec's ITEP: a sharder for our module type, a subclass of the stock
`ShardedEmbeddingBagCollection` (so input and output all-to-alls, every sharding type and
`TrainPipelineSparseDist` are TorchRec's own), whose lookups build our kernel: a
`RowGroupStore` per group of local shards instead of FBGEMM's training TBE.

The planner sees the `fused` kernel (so its estimators apply); `shard()` switches each table
to `customized_kernel` before the sharded module is built.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Type

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.metadata import ShardMetadata
from torch.distributed._shard.sharded_tensor import Shard, ShardedTensor, ShardedTensorMetadata, TensorProperties
from torchrec.distributed.embedding import EmbeddingCollectionSharder, ShardedEmbeddingCollection
from torchrec.distributed.embedding_kernel import BaseEmbedding
from torchrec.distributed.embedding_lookup import GroupedEmbeddingsLookup, GroupedPooledEmbeddingsLookup
from torchrec.distributed.embedding_types import EmbeddingComputeKernel, GroupedEmbeddingConfig
from torchrec.distributed.embeddingbag import (
    EmbeddingBagCollectionSharder,
    ShardedEmbeddingBagCollection,
)
from torchrec.distributed.types import ParameterSharding, ShardingEnv, ShardingType
from torchrec.modules.embedding_configs import PoolingType
from torchrec.optim.fused import EmptyFusedOptimizer, FusedOptimizer, FusedOptimizerModule
from torchrec.optim.keyed import KeyedOptimizer
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from shark_torchrec.config import ConfigError
from shark_torchrec.distributed.lazy_rows import LazyRows, RowSink, block_rows, row_blocks
from shark_torchrec.modules.initial_rows import initial_rows
from shark_torchrec.modules.mixed_precision import (
    UNIT,
    MixedPrecisionEmbeddingBagCollection,
    MixedPrecisionEmbeddingCollection,
    check_ids,
    check_saved_groups,
    feature_tables,
    pop_table_states,
    restore_store,
    starting_groups,
    table_id,
    table_state_block,
    table_state_keys,
    write_saved_rows,
)
from shark_torchrec.modules.model_budget import ModelBudget, reassign_collection
from shark_torchrec.modules.precision_policy import PolicyError, PrecisionPolicy, training_from_fused_params
from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter
from shark_torchrec.precision.priority import DROPPED, GROUP_NAMES

# Column scale of each state tensor against the table's columns (see modules.mixed_precision).
STATE_COLUMNS = {
    "weight": 1.0,
    "qparams": 2 / UNIT,
    "row_group": 1 / UNIT,
    "row_priority": 1 / UNIT,
    "row_seen_step": 1 / UNIT,
    "momentum": 1 / UNIT,
    "fallback": 1.0,  # [1, D]: one row per table
    "fallback_momentum": 1 / UNIT,
}
FALLBACK_KEYS = ("fallback", "fallback_momentum")
STATE_DTYPES = {
    "weight": torch.float32,
    "qparams": torch.float16,
    "row_group": torch.int8,
    "row_priority": torch.float32,
    "row_seen_step": torch.int32,
    "momentum": torch.float32,
    "fallback": torch.float32,
    "fallback_momentum": torch.float32,
}


class _ThroughAnchor(torch.autograd.Function):
    """A module output, unchanged and not copied, made to depend on the step anchor: its
    backward passes the output's gradient on as it is and hands the (empty) anchor an empty
    gradient, whose arrival ends the step. (Adding `anchor.sum()` did the same with a copy of
    the output forward and a sum of its gradient backward.)"""

    @staticmethod
    def forward(ctx, values: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.anchor_grad = anchor.new_zeros(anchor.shape)
        return values.view_as(values)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad, ctx.anchor_grad


class MixedPrecisionEmbeddingBag(BaseEmbedding, FusedOptimizerModule):
    """The kernel of one group of local shards: forward and fused update via a RowGroupStore."""

    def __init__(
        self,
        config: GroupedEmbeddingConfig,
        pg: Optional[dist.ProcessGroup],
        sharding_type: Optional[str],
        policy: PrecisionPolicy,
        step: StepCounter,
        label_tagged: bool,
        device: Optional[torch.device] = None,
        sequence: bool = False,
    ) -> None:
        super().__init__()
        self._config = config
        replicated = sharding_type == ShardingType.DATA_PARALLEL.value
        rank = dist.get_rank(pg) if pg is not None else 0
        tables, features, ftab = [], [], []
        for i, t in enumerate(config.embedding_tables):
            md = t.local_metadata
            r0, c0 = md.shard_offsets if md is not None else (0, 0)
            tables.append(
                LocalTable(
                    name=t.name,
                    rows=t.local_rows,
                    dim=t.local_cols,
                    row_offset=r0,
                    col_offset=c0,
                    global_rows=t.num_embeddings,
                    table_id=table_id(t.name),
                    counts_once=c0 == 0 and (not replicated or rank == 0),
                )
            )
            features += t.feature_names
            ftab += [i] * len(t.feature_names)
        self.store = RowGroupStore(
            tables,
            features,
            ftab,
            policy,
            step,
            pooling="none" if sequence else ("mean" if config.pooling == PoolingType.MEAN else "sum"),
            label_tagged=label_tagged,
            weighted=config.is_weighted and not sequence,
            replicated_pg=pg if replicated else None,
            device=device,
        )
        self._optim = EmptyFusedOptimizer()

    @property
    def config(self) -> GroupedEmbeddingConfig:
        return self._config

    @property
    def fused_optimizer(self) -> FusedOptimizer:
        return self._optim

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        self.store.training_enabled = self.training
        return self.store(features.values(), features.lengths(), features.weights_or_none(), features.stride())

    def flush(self) -> None:
        pass

    def purge(self) -> None:
        pass

    def named_parameters_by_table(self) -> Iterator[Tuple[str, nn.Parameter]]:
        return iter(())

    def named_split_embedding_weights(self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True):
        return iter(())


class MixedPrecisionPooledLookup(GroupedPooledEmbeddingsLookup):
    """TorchRec's pooled lookup of a sharding's grouped tables, each group's kernel a
    `MixedPrecisionEmbeddingBag` instead of FBGEMM's.

    Args:
        *args, **kwargs: as for `GroupedPooledEmbeddingsLookup`.
        policy: the collection's resolved policy.
        step: the collection's step counter.
        label_tagged: whether training batches carry labels in the ids' weights.
    """

    def __init__(
        self, *args: Any, policy: PrecisionPolicy, step: StepCounter, label_tagged: bool, **kwargs: Any
    ) -> None:
        self._mp_args = (policy, step, label_tagged)
        super().__init__(*args, **kwargs)

    def _create_embedding_kernel(self, config, device, pg, sharding_type, env=None) -> BaseEmbedding:
        policy, step, label_tagged = self._mp_args
        return MixedPrecisionEmbeddingBag(
            config, pg, sharding_type.value if sharding_type else None, policy, step, label_tagged, device
        )

    def flush(self) -> None:
        pass

    def purge(self) -> None:
        pass


class MixedPrecisionSequenceLookup(GroupedEmbeddingsLookup):
    """The sequence twin of `MixedPrecisionPooledLookup` (one vector per id, no pooling).

    Args:
        *args, **kwargs: as for `GroupedEmbeddingsLookup`.
        sharding_type: the sharding's type (a data-parallel group is replicated).
        policy, step, label_tagged: as for `MixedPrecisionPooledLookup`.
    """

    def __init__(
        self,
        *args: Any,
        sharding_type: str,
        policy: PrecisionPolicy,
        step: StepCounter,
        label_tagged: bool,
        **kwargs: Any,
    ) -> None:
        self._mp_args = (sharding_type, policy, step, label_tagged)
        super().__init__(*args, **kwargs)

    def _create_embedding_kernel(self, config, pg, device, env=None) -> BaseEmbedding:
        sharding_type, policy, step, label_tagged = self._mp_args
        return MixedPrecisionEmbeddingBag(config, pg, sharding_type, policy, step, label_tagged, device, sequence=True)

    def flush(self) -> None:
        pass

    def purge(self) -> None:
        pass


class MixedPrecisionOptimizer(KeyedOptimizer):
    """The module's entry in DMP's fused optimizer, shaped as TorchRec's fused tables' one.

    Per table a parameter key `<collection>.<table>.weight` and, for row-wise Adagrad, its state
    `<table>.momentum1`: a ShardedTensor over the stores' momentum (views, no copy), so
    `fused_optimizer.state_dict()`, DCP and `load_state_dict` see and restore the optimizer state
    as for stock fused tables (and an fp32 checkpoint's momentum loads by name). A column-wise
    table's `momentum1` holds its first column slice's state; every slice's own state is also in
    the module's state dict (`momentum`, per 4-column unit).

    Rows update in the backward pass; `step()` only carries the param group's `lr` (which LR
    schedulers set) into the next update, as FBGEMM's fused optimizer does.
    """

    def __init__(self, module: "ShardedMixedPrecisionModule") -> None:
        self._module = module
        params: Dict[str, torch.Tensor] = {}
        state: Dict[Any, Any] = {}
        momentum = module._momentum_state()
        for table in module._table_names:
            key = torch.empty(0)  # the parameter's identity: no fp32 weight exists
            params[f"{module._mp_prefix}.{table}.weight"] = key
            state[key] = {f"{table}.momentum1": momentum[table]} if table in momentum else {}
        super().__init__(
            params, state, [{"params": list(params.values()), "lr": module.precision_policy.learning_rate}]
        )

    def step(self, closure: Any = None) -> None:
        self._module.precision_policy.learning_rate = self.param_groups[0]["lr"]

    def zero_grad(self, set_to_none: bool = False) -> None:
        pass


def lazy_state_dict(model: nn.Module) -> Dict[str, Any]:
    """`model.state_dict()` for saving: the rows of every sharded mixed-precision table come
    as `LazyRows` blocks of about 16 MB of fp32 each, decoded from the store only when DCP
    writes them, so a save holds the store and the blocks in flight instead of an fp32 copy of
    every row and its state (about twice the fp32 table). DCP's file writer keeps the last block
    of each state tensor until its file is closed: about 33 MB a table at most. Everything else
    (an unsharded collection too) is as `state_dict()` gives it. Like TorchRec's own state dict,
    it reads the live tables: save it before training on.

        dcp.save({"model": lazy_state_dict(dmp), "optim": dmp.fused_optimizer.state_dict()}, checkpoint_id=path)

    It is for saving only: load into `model.state_dict()` (loading into this one is refused).
    A checkpoint saved either way loads the same, into any plan and world size.

    Args:
        model: a model holding sharded mixed-precision collections (any other module's state is
            taken as usual).

    Returns:
        The state dict.
    """
    ours = [m for m in model.modules() if isinstance(m, ShardedMixedPrecisionModule)]
    for m in ours:
        m.lazy_state = True
    try:
        return model.state_dict()
    finally:
        for m in ours:
            m.lazy_state = False


class _RowLoad:
    """One sharded collection's load straight into its stores (`load_state_in_place`): the
    `RowSink`s of its state dict hand every piece DCP reads to `receiver(...)`, which puts it
    in place. The first pass reads `row_group` and `qparams` (kept as 1 and 10 bytes a row), so
    that the second can write each piece of `weight` into the rows' groups as it arrives,
    integer rows with their saved scale and bias (`write_saved_rows`, as `fill_table_state`).

    Pieces that cover a shard's whole width go in at once: DCP reads a saved chunk at a time
    (16 MB of fp32 for a checkpoint from `lazy_state_dict`, a whole shard from `state_dict()`).
    A piece of only some columns (a checkpoint saved column-wise, loaded otherwise) waits in a
    buffer the size of its local table in fp32 until every column of it has come (`weight` and
    `momentum`, whose mean is over a whole row)."""

    FIRST = ("row_group", "qparams")
    FIRST_SUFFIXES = (".row_group", ".qparams")
    SECOND = ("weight", "row_priority", "row_seen_step", "momentum", "fallback", "fallback_momentum")

    def __init__(self, module: "ShardedMixedPrecisionModule") -> None:
        self.module = module
        self.keys: Tuple[str, ...] = self.FIRST
        self.done = False
        self.tables = [(store, i, t) for store, _ in module.stores() for i, t in enumerate(store.tables)]
        self.groups = {(id(s), i): torch.full((t.rows,), -1, dtype=torch.int8) for s, i, t in self.tables}
        self.q_first = {(id(s), i): torch.zeros(t.rows, 2, dtype=torch.float16) for s, i, t in self.tables}
        self.q_ref = {(id(s), i): torch.zeros(t.rows, 2, dtype=torch.float16) for s, i, t in self.tables}
        self.q_seen = {(id(s), i): torch.zeros(t.rows, dtype=torch.bool) for s, i, t in self.tables}
        self.q_same = {(id(s), i): torch.ones(t.rows, dtype=torch.bool) for s, i, t in self.tables}
        self.partial: Dict[Tuple[int, int, str], List[Any]] = {}  # (slot, key) -> [buffer, elements filled]
        self.fallbacks: Dict[Tuple[int, int], Dict[str, torch.Tensor]] = {}

    def receiver(self, store: RowGroupStore, i: int, key: str):
        """The `deliver` of the sink of local table `i`'s `key` (one sink a shard)."""

        def deliver(offsets: Tuple[int, int], values: torch.Tensor) -> None:
            self.put(store, i, key, offsets[0], offsets[1], values)

        return deliver

    def put(self, store, i: int, key: str, r0: int, c0: int, values: torch.Tensor) -> None:
        """Place a piece: rows r0.. of local table i, state columns c0.. of `key`."""
        t = store.tables[i]
        k = STATE_COLUMNS[key]
        width = int(t.dim * k)
        n = values.shape[0]
        whole = c0 == 0 and values.shape[1] == width
        slot = (id(store), i)
        if key in FALLBACK_KEYS:
            buf = self.fallbacks.setdefault(slot, {}).setdefault(key, torch.zeros(1, width))
            buf[:, c0 : c0 + values.shape[1]] = values.float()
            return
        lo = int(store.table_base[i])
        if key == "row_group":
            if c0 == 0:  # the first unit's, as a load through state_dict() takes
                self.groups[slot][r0 : r0 + n] = values[:, 0].to(torch.int8)
        elif key == "qparams":
            # Exact codes need one scale and bias over the whole row: every unit equal to the
            # first piece's first unit (equality carries over pieces in any order); the pair
            # kept is the row's first unit's, bit for bit, as state_dict()'s load keeps it.
            q = values.view(n, -1, 2)
            rows = slice(r0, r0 + n)
            same = (q == q[:, :1]).all(dim=2).all(dim=1)
            seen = self.q_seen[slot][rows]
            ref = torch.where(seen[:, None], self.q_ref[slot][rows], q[:, 0])
            self.q_same[slot][rows] &= same & (q[:, 0] == ref).all(dim=1)
            self.q_ref[slot][rows] = ref
            self.q_seen[slot][rows] = True
            if c0 == 0:
                self.q_first[slot][rows] = q[:, 0]
        elif key in ("row_priority", "row_seen_step"):
            if c0 == 0:  # every unit holds the row's value; the first unit's piece is read once
                target = store.row_priority if key == "row_priority" else store.row_seen_step
                target[lo + r0 : lo + r0 + n] = values[:, 0].to(target.dtype)
        elif key in ("weight", "momentum"):
            if not whole:  # the table's columns wait for the rest (a momentum is a whole row's mean)
                entry = self.partial.setdefault((*slot, key), [torch.zeros(t.rows, width), 0])
                entry[0][r0 : r0 + n, c0 : c0 + values.shape[1]] = values.float()
                entry[1] += values.numel()
                if entry[1] < entry[0].numel():
                    return
                del self.partial[(*slot, key)]
                r0, values = 0, entry[0]
            if key == "momentum":
                store.momentum[lo + r0 : lo + r0 + len(values)] = values.float().mean(dim=1)
            else:
                rows = slice(r0, r0 + len(values))
                write_saved_rows(
                    store,
                    torch.arange(lo + r0, lo + r0 + len(values)),
                    values.float(),
                    self.q_first[slot][rows],
                    self.q_seen[slot][rows] & self.q_same[slot][rows],
                )

    def first_pass_done(self) -> None:
        """Every row's group read: set each store's groups (values come in the second pass)."""
        for store, _ in self.module.stores():
            parts = []
            for i, t in enumerate(store.tables):
                g = self.groups[(id(store), i)]
                if bool((g < 0).any()):
                    raise ValueError(f"checkpoint load: rows of table {t.name} got no row_group")
                try:  # e.g. a checkpoint of a run with the dropped tier, loaded under --tiers without it
                    check_saved_groups(t.name, g, self.module.precision_policy)
                except PolicyError as e:
                    raise ConfigError(str(e)) from None
                parts.append(g)
            if parts:
                store.set_groups(torch.cat(parts))
        self.groups.clear()

    def second_pass_done(self) -> None:
        """Apply the fallback rows (and share them as a load does), once every piece came."""
        if self.partial:
            (sid, i, key), _ = next(iter(self.partial.items()))
            name = next(t.name for s, j, t in self.tables if id(s) == sid and j == i)
            raise ValueError(f"checkpoint load: {key} of table {name} came with columns missing")
        for store, i, t in self.tables:
            slot = (id(store), i)
            fb = self.fallbacks.get(slot)
            if fb and "fallback" in fb and store.has_dropped:
                m = fb.get("fallback_momentum")
                store.set_fallback_rows(i, fb["fallback"], None if m is None else m.mean())
        self.module.groups_fresh = False
        if DROPPED in self.module.precision_policy.groups:
            self.module._share_loaded_fallbacks()
        self.done = True


def load_state_in_place(
    model: nn.Module,
    load: Callable[[Dict[str, Any]], None],
    optimizer: Optional[Any] = None,
    check: Optional[Callable[[Dict[str, Any]], Any]] = None,
) -> Dict[str, Any]:
    """Load a checkpoint with no fp32 copy of the mixed-precision rows: where `state_dict()`
    would decode every row to fp32 to be overwritten, each row goes from the read buffer
    straight into its store, a block at a time (`_RowLoad`). Two passes of `load`: the rows'
    groups and integer scales first, then everything else. Any other module's state, and the
    optimizer's, load as usual (one pass when the model has no collection of ours). The
    checkpoint must hold our tables' state (a stock fp32 TorchRec checkpoint has no row groups:
    load it through `state_dict()`, which starts the rows in their starting groups). DCP must
    read with one thread (its default).

    Args:
        model: a model (its sharded mixed-precision collections load in place).
        load: `load(state)` reads the checkpoint into `state` in place, `{"model": ...}` and, with
            an optimizer, `"optim"` (e.g. `lambda s: dcp.load(s, checkpoint_id=path)`).
        optimizer: the model's optimizer, loaded too, or None.
        check: called with each pass's state before anything is read (e.g. to refuse a
            checkpoint that lacks an entry, so that nothing is loaded then). Without it, a load
            that fails in its second pass leaves the rows in their loaded groups with values
            partly loaded: load again before training.

    Returns:
        The state `load` filled in the last pass (its model entries already applied).
    """
    ours = [m for m in model.modules() if isinstance(m, ShardedMixedPrecisionModule)]
    for m in ours:
        m.row_load = _RowLoad(m)
    try:
        first = {k: v for k, v in model.state_dict().items() if k.endswith(_RowLoad.FIRST_SUFFIXES) and _is_ours(v)}
        for m in ours:
            m.row_load.keys = _RowLoad.SECOND
        state: Dict[str, Any] = {"model": model.state_dict()}
        if optimizer is not None:
            state["optim"] = optimizer.state_dict()
        if check is not None:
            if ours:
                check({"model": first})
            check(state)
        if ours:
            load({"model": first})
            for m in ours:
                m.row_load.first_pass_done()
        load(state)
        for m in ours:
            m.row_load.second_pass_done()
        model.load_state_dict(state["model"])
        if optimizer is not None:
            optimizer.load_state_dict(state["optim"])
    finally:
        for m in ours:
            m.row_load = None
    return state


def _is_ours(value: Any) -> bool:
    """A first-pass entry of a collection of ours: a sharded tensor (its shards may all be on
    other ranks) or, for a data-parallel table, a sink."""
    return isinstance(value, (ShardedTensor, RowSink))


def refuse_lazy(per_table: Dict[str, Dict[str, Any]], where: str, replicated: Sequence[str] = ()) -> None:
    """Refuse to load from a state dict whose rows are `LazyRows` (taken by `lazy_state_dict`):
    a `dcp.load` into it reads into temporaries, so its values are not the checkpoint's.

    Args:
        per_table: table -> key -> value, as `pop_table_states` gives them.
        where: the collection's prefix, for the message.
        replicated: the data-parallel tables.

    Raises:
        ValueError: naming the first lazy entry.
    """
    for table, state in per_table.items():
        for key, value in state.items():
            parts = [s.tensor for s in value.local_shards()] if isinstance(value, ShardedTensor) else [value]
            # A data-parallel table's state is a plain tensor, except in a lazy state dict (its
            # blocks, on rank 0 only: other ranks hold none of them).
            blocks_elsewhere = isinstance(value, ShardedTensor) and table in replicated
            if blocks_elsewhere or any(isinstance(p, LazyRows) for p in parts):
                raise ValueError(
                    f"{where}.{table}.{key}: this state dict came from lazy_state_dict, whose rows are read when saved "
                    "and cannot be loaded into; load into model.state_dict() instead"
                )


class ShardedMixedPrecisionModule:
    """What the sharded bag and sequence collections share (put before the TorchRec base)."""

    _mp_prefix = "embedding_bags"
    _mp_sequence = False

    def __init__(
        self,
        module: Any,
        table_name_to_parameter_sharding: Dict[str, ParameterSharding],
        env: ShardingEnv,
        **kwargs: Any,
    ) -> None:
        # The user's policy, its unset fields taken from this sharder's TorchRec fused_params.
        fused = kwargs.get("fused_params")
        object.__setattr__(self, "precision_policy", module.resolved_policy(fused))
        if fused and "optimizer_state_dtypes" in fused:
            # Taken into the policy (momentum_dtype). TorchRec groups tables by a tuple of the
            # fused_params' items, which a dict value cannot be part of.
            kwargs["fused_params"] = {k: v for k, v in fused.items() if k != "optimizer_state_dtypes"}
        object.__setattr__(self, "step_counter", StepCounter())
        object.__setattr__(self, "_label_tagged", module.label_tagged)
        super().__init__(module, table_name_to_parameter_sharding, env, **kwargs)
        configs = module.embedding_configs() if self._mp_sequence else module.embedding_bag_configs()
        self._mp_configs = list(configs)
        self._pg = env.process_group
        self._table_rows = {c.name: c.num_embeddings for c in configs}
        self._feature_tables = feature_tables(configs)
        self._slice_widths = {
            name: self._column_widths(name, ps) for name, ps in table_name_to_parameter_sharding.items()
        }
        sliced = sorted(n for n, w in self._slice_widths.items() if len(w) > 1)
        if self.precision_policy.signal != "eq7" and sliced:
            # Each column slice sees only its columns' gradient: its copy of a row's score
            # would differ from the other slices', and the row's slices could part tiers.
            raise ConfigError(  # a flag (--signal) beside the plan's types
                f"precision policy: signal {self.precision_policy.signal!r} needs whole rows, but tables {sliced} "
                "are sharded by columns: use signal 'eq7' or a plan without column-wise sharding"
            )
        self.last_moved: Dict[str, int] = {}
        self.reassign_seconds = 0.0
        self.model_budget: Optional[ModelBudget] = None  # set by share_model_budget
        self.warned_alone = False
        self.lazy_state = False  # set by lazy_state_dict: state-dict rows decoded when written
        self.row_load: Optional[_RowLoad] = None  # set by load_state_in_place: rows loaded as they are read
        self._assign_initial_groups()
        # The rows start as TorchRec's sharded tables do, from its default law (not zeros), and
        # the same whatever the plan and world size (`initial_rows`, seeded by the policy's
        # seed); `init_embedding_weights` or a checkpoint may write others.
        seed, shapes = self.precision_policy.seed, {c.name: (c.num_embeddings, c.embedding_dim) for c in configs}
        self.fill_rows(lambda t, r0, r1: initial_rows(seed, t, *shapes[t], r0, r1))
        self.step_counter.on_step_end = self._end_of_step
        self._mp_optimizer = MixedPrecisionOptimizer(self)

    def _mp_shardings(self) -> List[Tuple[Any, str]]:
        if self._mp_sequence:
            return [(sh, st) for st, sh in self._sharding_type_to_sharding.items()]
        return list(zip(self._embedding_shardings, self._sharding_types))

    # ------------------------------------------------------------------ construction
    def _create_lookups(self) -> None:
        for sharding, st in self._mp_shardings():
            pg = self._env.process_group if st == ShardingType.DATA_PARALLEL.value else sharding._pg
            if st == ShardingType.TABLE_ROW_WISE.value:
                # TwRw keeps the groups of every rank (no `_grouped_embedding_configs`): this
                # rank's are its row slices of its host's tables.
                grouped_configs = sharding._grouped_embedding_configs_per_rank[sharding._rank]
            else:
                grouped_configs = sharding._grouped_embedding_configs
            if self._mp_sequence:
                self._lookups.append(
                    MixedPrecisionSequenceLookup(
                        grouped_configs=grouped_configs,
                        pg=pg,
                        device=self._device,
                        env=self._env,
                        sharding_type=st,
                        policy=self.precision_policy,
                        step=self.step_counter,
                        label_tagged=self._label_tagged,
                    )
                )
                continue
            self._lookups.append(
                MixedPrecisionPooledLookup(
                    grouped_configs=grouped_configs,
                    pg=pg,
                    device=self._device,
                    sharding_type=ShardingType(st),
                    env=self._env,
                    policy=self.precision_policy,
                    step=self.step_counter,
                    label_tagged=self._label_tagged,
                )
            )

    def init_data_parallel(self) -> None:
        # Our kernels sum data-parallel gradients themselves (RowGroupStore._sum_replicas):
        # no DDP wrapper, which would find no parameter to reduce.
        pass

    def _initialize_torch_state(self, skip_registering: bool = False) -> None:
        setattr(self, self._mp_prefix, nn.ModuleDict({t: nn.Module() for t in self._table_names}))
        self._model_parallel_name_to_local_shards = OrderedDict()
        self._model_parallel_name_to_shards_wrapper = OrderedDict()
        self._model_parallel_name_to_sharded_tensor = OrderedDict()
        self._model_parallel_name_to_dtensor = OrderedDict()
        if not skip_registering:
            self._register_state_dict_hook(ShardedMixedPrecisionModule._mp_state_dict_hook)
            self._register_load_state_dict_pre_hook(self._mp_load_hook, with_module=False)

    def reset_parameters(self) -> None:
        pass

    def _column_widths(self, name: str, ps: ParameterSharding) -> Tuple[int, ...]:
        """The widths of a table's column slices (one full-width slice unless column-wise)."""
        dim = next(c.embedding_dim for c in self._mp_configs if c.name == name)
        spec = ps.sharding_spec
        if spec is None or not getattr(spec, "shards", None):
            return (dim,)
        by_col = {s.shard_offsets[1]: s.shard_sizes[1] for s in spec.shards}
        return tuple(by_col[c] for c in sorted(by_col))

    def stores(self) -> List[Tuple[RowGroupStore, str]]:
        """Every store this rank holds (one per group of local shards), with its sharding type.

        Returns:
            [(store, sharding type's value)], in the order of the lookups.
        """
        out = []
        for lookup, (_, st) in zip(self._lookups, self._mp_shardings()):
            for kernel in lookup._emb_modules:
                out.append((kernel.store, st))
        return out

    def _tables_for_budget(self) -> Dict[str, Tuple[int, int]]:
        """table -> (global rows, the width its per-table budget is computed at: its narrowest
        column slice, each slice being a table of that width with its own row map)."""
        return {n: (self._table_rows[n], min(w)) for n, w in self._slice_widths.items()}

    @torch.no_grad()
    def _assign_initial_groups(self, shares: Optional[Dict[str, float]] = None) -> None:
        tables = self._tables_for_budget()
        for store, _ in self.stores():
            store.set_groups(starting_groups(store, self.precision_policy, tables, shares))
        self.groups_fresh = True

    # ------------------------------------------------------------------ one model budget (BudgetMember)
    def budget_policy(self) -> PrecisionPolicy:
        """The resolved policy the rows train under (`BudgetMember`).

        Returns:
            The module's precision policy.
        """
        return self.precision_policy

    def budget_stores(self) -> List[RowGroupStore]:
        """This rank's stores (`BudgetMember`).

        Returns:
            The stores of `stores()`, without their sharding types.
        """
        return [s for s, _ in self.stores()]

    def budget_tables(self) -> Dict[str, Tuple[int, int]]:
        """table -> (global rows, its narrowest column slice's width) (`BudgetMember`).

        Returns:
            The dict, one entry per table of the module.
        """
        return self._tables_for_budget()

    def budget_widths(self) -> Dict[str, Tuple[int, ...]]:
        """table -> the widths of its column slices (`BudgetMember`).

        Returns:
            A copy of the dict, one entry per table of the module.
        """
        return dict(self._slice_widths)

    def budget_group(self) -> Optional[dist.ProcessGroup]:
        """The process group the module is sharded over (`BudgetMember`).

        Returns:
            The sharding's process group.
        """
        return self._pg

    def restart_groups(self, shares: Dict[str, float]) -> None:
        """Start the rows again at these per-table shares of a model-wide budget.

        Args:
            shares: table -> its budget (fraction of its own fp32 bytes).
        """
        self._assign_initial_groups(shares)

    @torch.no_grad()
    def fill_rows(self, init) -> None:
        """Write initial values: `init(table, row0, row1)` returns fp32 [row1 - row0, dim] of
        the logical table; each shard takes its block (rounded to nearest in its group).

        Args:
            init: (table name, first row, end row) -> fp32 [rows, dim], the rows of the whole
                table (all its columns); called for at most 65,536 rows at a time.
        """
        for store, _ in self.stores():
            for i, t in enumerate(store.tables):
                lo = int(store.table_base[i])
                for r in range(0, t.rows, 1 << 16):
                    n = min(1 << 16, t.rows - r)
                    values = init(t.name, t.row_offset + r, t.row_offset + r + n)
                    store.write_rows(torch.arange(lo + r, lo + r + n), values[:, t.col_offset : t.col_offset + t.dim])

    # ------------------------------------------------------------------ training
    @property
    def fused_optimizer(self) -> KeyedOptimizer:
        return self._mp_optimizer

    def _end_of_step(self, step: int) -> None:
        """A backward pass updated the rows: reassign them when due (all ranks reach this
        point in the same step, so the collective reassignment lines up)."""
        self.finish_step()
        p = self.precision_policy
        if p.scored and step % p.reassign_every == 0:
            self.reassign()

    def finish_step(self) -> None:
        """The step's update of the fallback rows (gradients summed over a row-split table's
        shards first: collective)."""
        if DROPPED in self.precision_policy.groups:
            self._sum_fallback_grads()
            for store, _ in self.stores():
                store.apply_fallback_update()

    def use_step_counter(self, counter: StepCounter) -> None:
        """Count steps with `counter` (a shared model budget's), in the stores too.

        Args:
            counter: the step counter.
        """
        object.__setattr__(self, "step_counter", counter)
        for store, _ in self.stores():
            store.step = counter

    # ------------------------------------------------------------------ dropped rows' fallback
    def _row_split_tables(self) -> List[str]:
        """Tables whose rows are split over ranks: each shard keeps a copy of the fallback row."""
        split = (ShardingType.ROW_WISE.value, ShardingType.TABLE_ROW_WISE.value)
        return sorted(n for n, ps in self.module_sharding_plan.items() if ps.sharding_type in split)

    def _fallback_exchange(self, fill, take) -> None:
        """All-reduce (sum) over ranks a [row-split tables, dim + 1] buffer that `fill(buf,
        index, store, i, table)` writes into for each local shard of such a table, then hand
        each such shard its table's summed row, `take(store, i, table, row)`. Nothing when the
        module has no row-split table (whole tables, column slices and replicas see every
        dropped id of their rows themselves)."""
        names = self._row_split_tables()
        if not names:
            return
        index = {n: i for i, n in enumerate(names)}
        dims = {c.name: c.embedding_dim for c in self._mp_configs}
        buf = torch.zeros(len(names), max(dims[n] for n in names) + 1)
        local = [(store, i, t) for store, _ in self.stores() for i, t in enumerate(store.tables) if t.name in index]
        for store, i, t in local:
            fill(buf, index[t.name], store, i, t)
        if dist.get_world_size(self._pg) > 1:
            dist.all_reduce(buf, group=self._pg)
        for store, i, t in local:
            take(store, i, t, buf[index[t.name]])

    def _sum_fallback_grads(self) -> None:
        """A row-split table's fallback gradient is the sum over its shards' dropped ids: every
        shard's copy of the row then takes the same step (so 1 and 2 ranks agree)."""

        def fill(buf, k, store, i, t):
            buf[k, : t.dim] += store.fallback_grad[i]

        def take(store, i, t, row):
            store.fallback_grad[i] = row[: t.dim]

        self._fallback_exchange(fill, take)

    def _share_loaded_fallbacks(self) -> None:
        """After a load: a row-split table's fallback row (and its optimizer state) reaches
        every shard from the one at row 0, the only one the checkpoint hands it to."""

        def fill(buf, k, store, i, t):
            if t.row_offset == 0:
                buf[k, : t.dim] = store.fallback_rows()[i]
                buf[k, -1] = store.fallback_momentum[i] if store.fallback_momentum.numel() else 0.0

        def take(store, i, t, row):
            store.set_fallback_rows(i, row[: t.dim], row[-1])

        self._fallback_exchange(fill, take)

    def reassign(self) -> Dict[str, int]:
        """Regroup all rows by score now (collective: every rank calls it); with a shared
        model budget, the rows of every collection under it.

        Returns:
            Rows moved into each group.
        """
        return reassign_collection(self)

    def note_reassigned(self, moved: Dict[str, int], seconds: float) -> None:
        """This collection's rows were regrouped (by itself, or by a shared model budget, which
        splits its time between its collections).

        Args:
            moved: rows moved into each group (over every collection of the budget).
            seconds: this collection's share of the time the regrouping took.
        """
        self.groups_fresh = False
        self.reassign_seconds += seconds
        self.last_moved = moved

    def output_dist(self, ctx, output):
        return self._tied_to_step(super().output_dist(ctx, output))

    def compute_and_output_dist(self, ctx, input):
        return self._tied_to_step(super().compute_and_output_dist(ctx, input))

    def _tied_to_step(self, awaitable):
        """In a training forward, the module's output goes through the step anchor, so its
        backward pass ends a step on every rank, also one whose lookups hold no rows (their
        outputs are empty and would carry no gradient to the anchor)."""
        if torch.is_grad_enabled():
            self.step_counter.begin(self.training)
            if self.training:
                awaitable.callbacks.append(self._through_anchor)
        return awaitable

    def _through_anchor(self, out):
        anchor = self.step_counter.anchor
        if isinstance(out, KeyedTensor):
            values = _ThroughAnchor.apply(out.values(), anchor)
            return KeyedTensor(
                keys=out.keys(), length_per_key=out.length_per_key(), values=values, key_dim=out.key_dim()
            )
        if out:  # sequence collection: {feature: JaggedTensor}
            name = next(iter(out))
            jt = out[name]
            values = _ThroughAnchor.apply(jt.values(), anchor)
            out[name] = JaggedTensor(values=values, lengths=jt.lengths(), weights=jt.weights_or_none())
        return out

    def input_dist(self, ctx, features: KeyedJaggedTensor):
        # Ids are checked here, on the global ids, once; the kernels trust them.
        features = check_ids(features, self._feature_tables, self.precision_policy.bad_ids)
        return super().input_dist(ctx, features)

    # ------------------------------------------------------------------ memory
    def overhead_seconds(self) -> Dict[str, float]:
        """Time this rank spent on priority updates and on reassignments.

        Returns:
            {"priority_seconds": summed over this rank's stores, "reassign_seconds": this
            collection's share of the regroupings so far}.
        """
        return {
            "priority_seconds": sum(s.priority_seconds for s, _ in self.stores()),
            "reassign_seconds": self.reassign_seconds,
        }

    def precision_memory(self) -> Dict[str, Dict[str, int]]:
        """Per table, summed over ranks (collective): embedding/optimizer/priority bytes and
        rows per group (rows of column-wise slices and replicas counted once).

        Returns:
            table -> {"embedding_bytes", "optimizer_bytes", "priority_bytes", "rows_<group>"}, the
            same on every rank.
        """
        names = sorted(self._table_rows)
        fields = ("embedding_bytes", "optimizer_bytes", "priority_bytes", *(f"rows_{g}" for g in GROUP_NAMES))
        vec = torch.zeros(len(names), len(fields), dtype=torch.float64)
        rank = dist.get_rank(self._pg)
        for store, st in self.stores():
            replicated = st == ShardingType.DATA_PARALLEL.value
            if replicated and rank != 0:
                continue
            for t, b in zip(store.tables, store.table_bytes()):
                i = names.index(t.name)
                for j, f in enumerate(fields):
                    if f.startswith("rows_") and t.col_offset != 0:
                        continue
                    vec[i, j] += b[f]
        if dist.get_world_size(self._pg) > 1:
            dist.all_reduce(vec, group=self._pg)
        return {n: {f: int(vec[i, j]) for j, f in enumerate(fields)} for i, n in enumerate(names)}

    # ------------------------------------------------------------------ state dict
    def _momentum_state(self) -> Dict[str, Any]:
        """table -> its row-wise Adagrad state as TorchRec lays out `momentum1`: a ShardedTensor
        [rows] over this rank's stores (views), or for a data-parallel table the plain tensor.
        Column slices other than the first are left out (see MixedPrecisionOptimizer)."""
        if self.precision_policy.optimizer != "rowwise_adagrad":
            return {}
        local: Dict[str, List[Tuple[LocalTable, torch.Tensor]]] = {}
        for store, _ in self.stores():
            for i, t in enumerate(store.tables):
                if t.col_offset == 0:
                    lo = int(store.table_base[i])
                    local.setdefault(t.name, []).append((t, store.momentum[lo : lo + t.rows]))
        out: Dict[str, Any] = {}
        for table in self._table_names:
            spec = self.module_sharding_plan[table].sharding_spec
            entries = local.get(table, [])
            if spec is None:  # data-parallel: every rank holds the whole table
                out[table] = entries[0][1]
                continue
            first = {(s.shard_offsets[0], s.shard_sizes[0]): s for s in spec.shards if s.shard_offsets[1] == 0}
            shards_md = [
                ShardMetadata(shard_offsets=[r0], shard_sizes=[n], placement=s.placement)
                for (r0, n), s in sorted(first.items())
            ]
            md = ShardedTensorMetadata(
                shards_metadata=shards_md,
                size=torch.Size([self._table_rows[table]]),
                tensor_properties=TensorProperties(dtype=self.precision_policy.momentum_torch_dtype),
            )
            shards = [
                Shard(tensor=m, metadata=next(x for x in shards_md if x.shard_offsets[0] == t.row_offset))
                for t, m in entries
            ]
            out[table] = ShardedTensor._init_from_local_shards_and_global_metadata(
                shards, sharded_tensor_metadata=md, process_group=self._pg
            )
        return out

    def _state_metadata(self, table: str, key: str, dim: int, lazy: bool = False) -> Optional[ShardedTensorMetadata]:
        """The global layout of one state tensor of a table (None for a data-parallel table,
        whose state is a plain tensor); `lazy` splits every shard into `block_rows(dim)` blocks
        (as `_local_state(lazy=True)` does), and a data-parallel table's rows into blocks on
        rank 0."""
        spec = self.module_sharding_plan[table].sharding_spec
        k = STATE_COLUMNS[key]
        if spec is None and not (lazy and key not in FALLBACK_KEYS):
            return None
        if spec is None:
            # Data-parallel, saved lazily: blocks of the whole table, all written by rank 0
            # (DCP writes a plain tensor as one piece, which would decode the whole table at once).
            per_block = block_rows(dim)
            device = self._device.type if self._device else "cpu"
            return ShardedTensorMetadata(
                shards_metadata=[
                    ShardMetadata(shard_offsets=[r0, 0], shard_sizes=[n, int(dim * k)], placement=f"rank:0/{device}")
                    for r0, n in row_blocks(0, self._table_rows[table], per_block)
                ],
                size=torch.Size([self._table_rows[table], int(dim * k)]),
                tensor_properties=TensorProperties(dtype=STATE_DTYPES[key]),
            )
        if key in FALLBACK_KEYS:
            # One row: each column slice's piece comes from the shard at row 0 (the others hold copies).
            first = [s for s in spec.shards if s.shard_offsets[0] == 0]
            return ShardedTensorMetadata(
                shards_metadata=[
                    ShardMetadata(
                        shard_offsets=[0, int(s.shard_offsets[1] * k)],
                        shard_sizes=[1, int(s.shard_sizes[1] * k)],
                        placement=s.placement,
                    )
                    for s in first
                ],
                size=torch.Size([1, int(dim * k)]),
                tensor_properties=TensorProperties(dtype=STATE_DTYPES[key]),
            )
        per_block = block_rows(dim) if lazy else None
        shards = [
            ShardMetadata(
                shard_offsets=[r0, int(s.shard_offsets[1] * k)],
                shard_sizes=[n, int(s.shard_sizes[1] * k)],
                placement=s.placement,
            )
            for s in spec.shards
            for r0, n in (
                row_blocks(s.shard_offsets[0], s.shard_sizes[0], per_block)
                if per_block
                else [(s.shard_offsets[0], s.shard_sizes[0])]
            )
        ]
        return ShardedTensorMetadata(
            shards_metadata=shards,
            size=torch.Size([self._table_rows[table], int(dim * k)]),
            tensor_properties=TensorProperties(dtype=STATE_DTYPES[key]),
        )

    def _local_state(self, lazy: bool = False) -> Dict[str, Dict[str, List[Tuple[ShardMetadata, torch.Tensor]]]]:
        """table -> key -> [(shard metadata, local tensor)] for the shards on this rank; `lazy`
        gives the rows as `LazyRows` blocks (decoded when read), a data-parallel table's on rank
        0 only. While `row_load` is set, each shard is one `RowSink` (the layout of
        `state_dict()`: DCP then reads every saved chunk once, however it was saved)."""
        dims = {c.name: c.embedding_dim for c in self._mp_configs}
        out: Dict[str, Dict[str, list]] = {}
        for store, _ in self.stores():
            for i, t in enumerate(store.tables):
                replicated = self.module_sharding_plan[t.name].sharding_spec is None
                for key in table_state_keys(store):
                    k = STATE_COLUMNS[key]
                    fallback = key in FALLBACK_KEYS
                    if fallback and t.row_offset != 0:
                        continue  # a copy: the shard at row 0 writes the table's fallback row
                    if self.row_load is not None and key not in self.row_load.keys:
                        continue
                    if lazy and replicated and not fallback and dist.get_rank(self._pg) != 0:
                        continue  # rank 0 writes a data-parallel table's blocks (see _state_metadata)
                    if fallback:
                        blocks = [(0, 1)]
                    elif lazy:
                        blocks = [
                            (r0 - t.row_offset, n)
                            for r0, n in row_blocks(t.row_offset, t.rows, block_rows(dims[t.name]))
                        ]
                    else:
                        blocks = [(0, t.rows)]
                    for start, n in blocks:
                        md = ShardMetadata(
                            shard_offsets=[0 if fallback else t.row_offset + start, int(t.col_offset * k)],
                            shard_sizes=[n, int(t.dim * k)],
                            placement=f"rank:{dist.get_rank()}/{self._device.type if self._device else 'cpu'}",
                        )
                        if self.row_load is not None:
                            tensor = RowSink(
                                (n, int(t.dim * k)),
                                STATE_DTYPES[key],
                                self.row_load.receiver(store, i, key),
                            )
                        elif lazy:
                            tensor = LazyRows(
                                (n, int(t.dim * k)),
                                STATE_DTYPES[key],
                                lambda store=store, i=i, key=key, a=start, b=start + n: table_state_block(
                                    store, i, key, a, b
                                ),
                            )
                        else:
                            tensor = table_state_block(store, i, key)
                        out.setdefault(t.name, {}).setdefault(key, []).append((md, tensor))
        return out

    @staticmethod
    def _mp_state_dict_hook(module, destination, prefix, _local_metadata) -> None:
        lazy = module.lazy_state and module.row_load is None
        local = module._local_state(lazy)
        dims = {c.name: c.embedding_dim for c in module._mp_configs}
        keys = ["weight", "qparams", "row_group"]
        if module.precision_policy.scored:
            keys += ["row_priority", "row_seen_step"]
        if module.precision_policy.optimizer == "rowwise_adagrad":
            keys.append("momentum")
        if DROPPED in module.precision_policy.groups:
            keys.append("fallback")
            if module.precision_policy.optimizer == "rowwise_adagrad":
                keys.append("fallback_momentum")
        if module.row_load is not None:
            keys = [k for k in keys if k in module.row_load.keys]
        for table in module._table_names:
            for key in keys:
                md = module._state_metadata(table, key, dims[table], lazy)
                entries = local.get(table, {}).get(key, [])
                name = f"{prefix}{module._mp_prefix}.{table}.{key}"
                if md is None:  # data-parallel: a plain, replicated tensor
                    destination[name] = entries[0][1]
                    continue
                shards = [Shard(tensor=t, metadata=m) for m, t in entries]
                destination[name] = ShardedTensor._init_from_local_shards_and_global_metadata(
                    shards, sharded_tensor_metadata=md, process_group=module._pg
                )
        if module.row_load is None or "weight" in module.row_load.keys:
            destination[f"{prefix}precision_step"] = torch.tensor([module.step_counter.value], dtype=torch.int64)

    def _mp_load_hook(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:
        per_table = pop_table_states(state_dict, prefix, self._mp_prefix, self._table_names)
        if self.row_load is not None and self.row_load.done:
            # load_state_in_place has put the rows in (these entries are its sinks): only the
            # step is left to take.
            step_key = f"{prefix}precision_step"
            if step_key in state_dict:
                self.step_counter.value = int(state_dict.pop(step_key)[0])
            return
        replicated = [n for n in self._table_names if self.module_sharding_plan[n].sharding_spec is None]
        refuse_lazy(per_table, f"{prefix}{self._mp_prefix}", replicated)  # before anything is changed
        self.groups_fresh = False
        step_key = f"{prefix}precision_step"
        if step_key in state_dict:
            self.step_counter.value = int(state_dict.pop(step_key)[0])
        tables = self._tables_for_budget()
        for store, _ in self.stores():
            states = [{k: self._local_piece(v, k, t) for k, v in per_table[t.name].items()} for t in store.tables]
            restore_store(store, states, self.precision_policy, tables)
        if DROPPED in self.precision_policy.groups:
            self._share_loaded_fallbacks()

    @staticmethod
    def _local_piece(value, key: str, t: LocalTable) -> Optional[torch.Tensor]:
        """This shard's block of a state tensor (sharded, or a full plain tensor)."""
        k = STATE_COLUMNS[key]
        c0, c1 = int(t.col_offset * k), int((t.col_offset + t.dim) * k)
        if key in FALLBACK_KEYS:
            if isinstance(value, ShardedTensor):
                if t.row_offset != 0:
                    return None  # filled from the shard at row 0 after the load
                for shard in value.local_shards():
                    if list(shard.metadata.shard_offsets) == [0, c0]:
                        return shard.tensor
                raise KeyError(f"{key} of table {t.name}: no local shard at column {c0}")
            return value[:, c0:c1]
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                if list(shard.metadata.shard_offsets) == [t.row_offset, c0]:
                    return shard.tensor
            raise KeyError(f"{key} of table {t.name}: no local shard at row {t.row_offset}, column {c0}")
        return value[t.row_offset : t.row_offset + t.rows, c0:c1]


class ShardedMixedPrecisionEmbeddingBagCollection(ShardedMixedPrecisionModule, ShardedEmbeddingBagCollection):
    """`MixedPrecisionEmbeddingBagCollection` sharded by DMP: TorchRec's sharded bag collection with
    our lookups (`MixedPrecisionEmbeddingBagCollectionSharder` builds it)."""

    _mp_prefix = "embedding_bags"
    _mp_sequence = False


class ShardedMixedPrecisionEmbeddingCollection(ShardedMixedPrecisionModule, ShardedEmbeddingCollection):
    """`MixedPrecisionEmbeddingCollection` sharded by DMP: TorchRec's sharded sequence collection with
    our lookups (`MixedPrecisionEmbeddingCollectionSharder` builds it)."""

    _mp_prefix = "embeddings"
    _mp_sequence = True


class _MixedPrecisionSharder:
    """What both sharders share: the sharding types offered, the `fused` kernel advertised to
    the planner (so its estimators apply), and the switch to our kernel in `shard()`."""

    _module_cls: Type[nn.Module]
    _sharded_cls: Type[nn.Module]
    _types: Tuple[str, ...]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # fused_params our update does not implement (momentum, weight decay, another
        # optimizer) are refused here, on every rank, where the planner met them on rank 0 alone
        # (with `collective_plan` the other ranks then waited for its plan). A contradiction
        # with a collection's own policy can only be seen when it is sharded.
        if self.fused_params:
            training_from_fused_params(self.fused_params, PrecisionPolicy())

    def sharding_types(self, compute_device_type: str) -> List[str]:
        return list(self._types)

    def shardable_parameters(self, module: nn.Module) -> Dict[str, torch.Tensor]:
        """Each table's shape, as a meta tensor: our module registers no parameters."""
        return {c.name: torch.empty(c.num_embeddings, c.embedding_dim, device="meta") for c in module._mp_configs()}

    def compute_kernels(self, sharding_type: str, compute_device_type: str) -> List[str]:
        if sharding_type == ShardingType.DATA_PARALLEL.value:
            return [EmbeddingComputeKernel.DENSE.value]
        return [EmbeddingComputeKernel.FUSED.value]

    def shard(
        self,
        module: nn.Module,
        params: Dict[str, ParameterSharding],
        env: ShardingEnv,
        device: Optional[torch.device] = None,
        module_fqn: Optional[str] = None,
    ) -> nn.Module:
        custom = {
            name: dataclasses.replace(ps, compute_kernel=EmbeddingComputeKernel.CUSTOMIZED_KERNEL.value)
            for name, ps in params.items()
        }
        return self._sharded_cls(
            module,
            custom,
            env,
            fused_params=self.fused_params,
            device=device,
            qcomm_codecs_registry=self.qcomm_codecs_registry,
            module_fqn=module_fqn,
        )

    @property
    def module_type(self) -> Type[nn.Module]:
        return self._module_cls

    @property
    def sharded_module_type(self) -> Type[nn.Module]:
        return self._sharded_cls


class MixedPrecisionEmbeddingBagCollectionSharder(_MixedPrecisionSharder, EmbeddingBagCollectionSharder):
    """Add this to DMP's sharders (before the defaults) to shard our bag collection.
    table_row_wise (row-wise within a host) is offered here only: TorchRec 1.8 has no
    sequence TwRw sharding."""

    _module_cls = MixedPrecisionEmbeddingBagCollection
    _sharded_cls = ShardedMixedPrecisionEmbeddingBagCollection
    _types = (
        ShardingType.DATA_PARALLEL.value,
        ShardingType.TABLE_WISE.value,
        ShardingType.ROW_WISE.value,
        ShardingType.TABLE_ROW_WISE.value,
        ShardingType.COLUMN_WISE.value,
        ShardingType.TABLE_COLUMN_WISE.value,
    )


class MixedPrecisionEmbeddingCollectionSharder(_MixedPrecisionSharder, EmbeddingCollectionSharder):
    """The sequence twin: add it to DMP's sharders to shard MixedPrecisionEmbeddingCollection."""

    _module_cls = MixedPrecisionEmbeddingCollection
    _sharded_cls = ShardedMixedPrecisionEmbeddingCollection
    _types = (
        ShardingType.DATA_PARALLEL.value,
        ShardingType.TABLE_WISE.value,
        ShardingType.ROW_WISE.value,
        ShardingType.COLUMN_WISE.value,
    )

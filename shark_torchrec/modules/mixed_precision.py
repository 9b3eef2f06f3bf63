"""`MixedPrecisionEmbeddingBagCollection` and `MixedPrecisionEmbeddingCollection`: TorchRec's
collections with rows kept in fp32, fp16, int8, int4 and int2 groups, or dropped (a dropped row
reads its table's one trained fallback row).

Constructed like `EmbeddingBagCollection` (table configs) plus a `PrecisionPolicy`. The
TorchRec parameters stay on the meta device (the planner reads their shapes); the rows live
in a `RowGroupStore`. Sharded by DMP with `MixedPrecisionEmbeddingBagCollectionSharder`
(`shark_torchrec.distributed.mixed_precision`); used unsharded (after `materialize(device)`),
it holds every table in one store. Either way the rows train in the backward pass, as FBGEMM's
fused tables do, and a training step (with its reassignment when due) ends with that backward
pass: no optimizer call is needed. The module exposes no parameters.

State dict, per table (the same keys sharded and unsharded, so checkpoints move between
plans): `embedding_bags.<table>.weight` fp32 [rows, D] (the dequantized rows, made when the
state dict is taken), and per 4-column unit (so that column-wise shards of any width can be
restored): `qparams` fp16 [rows, D/2] (int8 scale and bias), `row_group` int8 [rows, D/4],
`row_priority` fp32 and `row_seen_step` int32 [rows, D/4] (score as of the step the row was
last seen) and `momentum` fp32 [rows, D/4]; `fallback` (the table's fallback row) and
`fallback_momentum`; plus `precision_step`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import warnings
import zlib
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, EmbeddingConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection
from torchrec.sparse.jagged_tensor import JaggedTensor, KeyedJaggedTensor, KeyedTensor

from shark_torchrec.modules.model_budget import ModelBudget, reassign_collection
from shark_torchrec.modules.precision_policy import PolicyError, PrecisionPolicy
from shark_torchrec.modules.row_groups import CHUNK_ROWS, IdError, LocalTable, RowGroupStore, StepCounter
from shark_torchrec.precision.budget import initial_groups, model_start_budgets, table_floor_bytes, target_counts
from shark_torchrec.precision.priority import GROUP_NAMES, INT_BITS, BudgetError

UNIT = 4  # columns per unit of per-row checkpoint state
STATE_KEYS = (
    "weight",
    "qparams",
    "row_group",
    "row_priority",
    "row_seen_step",
    "momentum",
    "fallback",
    "fallback_momentum",
)


def table_id(name: str) -> int:
    """A table's stable id for its rounding noise (the same in every process).

    Args:
        name: the table's name.

    Returns:
        crc32 of the name.
    """
    return zlib.crc32(name.encode())


def feature_tables(configs: Sequence[Any]) -> Dict[str, tuple]:
    """feature -> (table name, rows) of a collection's configs.

    Args:
        configs: TorchRec table configs (`name`, `num_embeddings`, `feature_names`).

    Returns:
        feature -> (table name, rows).
    """
    return {f: (c.name, c.num_embeddings) for c in configs for f in c.feature_names}


def check_ids(features: KeyedJaggedTensor, tables: Dict[str, tuple], bad_ids: str) -> KeyedJaggedTensor:
    """Ids must lie in their table. Checked once, on the input's global ids (before any
    all-to-all), by the unsharded and the sharded collections alike. `bad_ids="error"`:
    IdError naming the feature, the id and the table; `"row0"`: such ids become row 0.

    Args:
        features: the input's ids.
        tables: feature -> (table name, rows) (`feature_tables`); other features are not checked.
        bad_ids: `error` or `row0`.

    Returns:
        `features` itself when every id is in its table, else (with `row0`) a copy whose bad
        ids are 0.

    Raises:
        IdError: with `error`, the first bad id.
    """
    values = features.values()
    if values.numel() == 0:
        return features
    keys = features.keys()
    lengths = features.length_per_key()
    limits = torch.repeat_interleave(
        torch.tensor([tables[k][1] if k in tables else 1 << 62 for k in keys], dtype=torch.int64),
        torch.tensor(lengths, dtype=torch.int64),
    )
    bad = (values < 0) | (values >= limits)
    if not bool(bad.any()):
        return features
    if bad_ids == "row0":
        return KeyedJaggedTensor(
            keys=keys,
            values=torch.where(bad, torch.zeros_like(values), values),
            lengths=features.lengths(),
            weights=features.weights_or_none(),
        )
    i = int(bad.nonzero()[0])
    key = keys[int(torch.searchsorted(torch.tensor(lengths).cumsum(0), torch.tensor(i), right=True))]
    table, rows = tables[key]
    raise IdError(
        f"feature {key!r}: id {int(values[i])} is outside table {table!r} "
        f"(rows 0..{rows - 1}); {int(bad.sum())} such ids in this batch"
    )


def starting_groups(
    store: RowGroupStore,
    policy: PrecisionPolicy,
    budget_tables: Dict[str, Tuple[int, int]],
    shares: Optional[Dict[str, float]] = None,
) -> torch.Tensor:
    """Every row's group before any score exists (see `initial_groups`).

    Args:
        store: the rows (its local tables).
        policy: the collection's resolved policy.
        budget_tables: every table of the collection -> (global rows, the width its budget
            is computed for).
        shares: with a model-wide budget, each table's starting budget; default: the
            collection's tables alone under the budget (`model_start_budgets`). A budget
            shared by several collections (`ModelBudget`) passes the model's.

    Returns:
        int8 group ids over the store's row space.
    """
    if shares is None and policy.budget_mode and policy.budget_scope == "model":
        try:
            shares = model_start_budgets(policy, budget_tables)
        except BudgetError as e:
            # This collection's tables alone cannot meet the budget; other collections may
            # pay for them once the model's budget is shared (share_model_budget restarts
            # every table at its share, or refuses the budget for the whole model).
            warnings.warn(
                f"{e}: the collection's tables start at their floors; share the model's budget with its other "
                "collections (share_model_budget), or its first reassignment will refuse the budget",
                stacklevel=2,
            )
            shares = {
                n: max(policy.memory_budget, table_floor_bytes(r, d, policy.groups) / max(r * d * 4, 1))
                for n, (r, d) in budget_tables.items()
            }
    parts = []
    for t in store.tables:
        table_policy = policy
        if shares is not None:
            table_policy = dataclasses.replace(policy, budget_scope="table", memory_budget=min(shares[t.name], 1.5))
        counts = target_counts(table_policy, t.total_rows, budget_tables[t.name][1], t.name)
        if t.total_rows and counts.dropped == t.total_rows and t.row_offset == 0 and t.col_offset == 0:
            warnings.warn(
                f"table {t.name!r}: the memory budget {policy.memory_budget} drops every one of its "
                f"{t.total_rows} rows (each lookup returns the table's one fallback row); "
                "raise the budget to keep some",
                stacklevel=2,
            )
        parts.append(initial_groups(policy, counts, t.row_offset, t.rows))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int8)


def pop_table_states(
    state_dict: Dict[str, Any], prefix: str, collection: str, tables: Sequence[str]
) -> Dict[str, Dict[str, Any]]:
    """Take our keys (see module doc) out of a state dict being loaded: table -> key -> value.
    A table without `weight` is an error naming it.

    Args:
        state_dict: the state dict being loaded; our keys are removed from it.
        prefix: the module's prefix in it.
        collection: `embedding_bags` or `embeddings`.
        tables: the module's table names.

    Returns:
        table -> key (`weight`, `qparams`, ...) -> value, for the keys present.

    Raises:
        KeyError: tables without `weight`.
    """
    out: Dict[str, Dict[str, Any]] = {}
    for table in tables:
        for key in STATE_KEYS:
            name = f"{prefix}{collection}.{table}.{key}"
            if name in state_dict:
                out.setdefault(table, {})[key] = state_dict.pop(name)
    missing = [t for t in tables if "weight" not in out.get(t, {})]
    if missing:
        raise KeyError(f"state dict has no weights for tables {missing}")
    return out


@torch.no_grad()
def check_saved_groups(table: str, groups: torch.Tensor, policy: PrecisionPolicy) -> None:
    """Refuse a checkpoint whose rows sit in groups the module's policy does not keep: loaded as
    they are, such rows would stay there (a one-tier module never regroups) and take other
    bytes than the policy, and the planner, were sized for.

    Args:
        table: the table's name, for the message.
        groups: the checkpoint's group of each of the table's rows here (int).
        policy: the module's resolved policy.

    Raises:
        PolicyError: naming the table, its rows per group and the policy's tiers.
    """
    tags = groups.long()
    tags = tags[(tags >= 0) & (tags < len(GROUP_NAMES))]  # other tags are refused by `set_groups`
    counts = torch.bincount(tags, minlength=len(GROUP_NAMES)).tolist()
    foreign = {GROUP_NAMES[g]: n for g, n in enumerate(counts) if n and g not in policy.groups}
    if foreign:
        kept = ", ".join(GROUP_NAMES[g] for g in policy.groups)
        found = ", ".join(f"{n} {name}" for name, n in foreign.items())
        raise PolicyError(
            f"checkpoint load: table {table} has {found} rows, which this module's precision policy does not keep "
            f"(it keeps {kept}): load it into a module with the tiers it was saved with, or convert it "
            "(`shark train --init-from`, or export it for serving with `--tiers`)"
        )


def restore_store(
    store: RowGroupStore,
    states: Sequence[Dict[str, torch.Tensor]],
    policy: PrecisionPolicy,
    budget_tables: Dict[str, Tuple[int, int]],
    any_tiers: bool = False,
) -> None:
    """Load one state per local table: groups from the checkpoint (or the starting groups
    when it has none, e.g. an fp32 TorchRec checkpoint), then values, scores and optimizer.
    `budget_tables`: every table of the collection -> (global rows, dim its budget uses).
    Rows saved in tiers the policy does not keep are refused (`check_saved_groups`) unless
    `any_tiers`.

    Args:
        store: the store to fill.
        states: one per local table of the store, in its order: key -> this shard's block
            (`pop_table_states`' keys).
        policy: the collection's resolved policy.
        budget_tables: see above.
        any_tiers: keep rows in tiers the policy does not keep (a caller regroups them).
    """
    fallback = starting_groups(store, policy, budget_tables)
    groups = []
    for i, state in enumerate(states):
        lo, hi = int(store.table_base[i]), int(store.table_base[i + 1])
        if "row_group" in state and not any_tiers:
            check_saved_groups(store.tables[i].name, state["row_group"][:, 0], policy)
        groups.append(state["row_group"][:, 0].to(torch.int8) if "row_group" in state else fallback[lo:hi])
    store.set_groups(torch.cat(groups) if groups else fallback)
    for i, state in enumerate(states):
        fill_table_state(store, i, state)


def _units(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Repeat a per-row value [n] or [n, k] over the row's dim / UNIT units."""
    n = dim // UNIT
    return x[:, None].expand(-1, n).contiguous() if x.dim() == 1 else x.repeat(1, n)


def table_state_keys(store: RowGroupStore) -> List[str]:
    """The checkpoint keys a store's tables have (see module doc): `weight`, `qparams`,
    `row_group`, and when the store keeps them `row_priority`, `row_seen_step`, `momentum`,
    `fallback`, `fallback_momentum`.

    Args:
        store: the store.

    Returns:
        The keys, in `STATE_KEYS`' order.
    """
    keys = ["weight", "qparams", "row_group"]
    if store.row_priority.numel():
        keys += ["row_priority", "row_seen_step"]
    if store.momentum.numel():
        keys.append("momentum")
    if store.has_dropped:
        keys.append("fallback")
        if store.fallback_momentum.numel():
            keys.append("fallback_momentum")
    return keys


def table_state_block(
    store: RowGroupStore, index: int, key: str, start: int = 0, stop: Optional[int] = None
) -> torch.Tensor:
    """One checkpoint tensor of one local table, for its rows `start` to `stop` (a block of
    rows is decoded on its own, so a checkpoint can be written a block at a time).

    Args:
        store: the store.
        index: the table's index among the store's local tables.
        key: one of `table_state_keys(store)`.
        start, stop: the rows, counted from the table's first local row (stop None: to its
            end); ignored for the one-row `fallback` keys.

    Returns:
        [stop - start, dim * columns of `key`] (a copy, except that a per-row value at dim 4
        may be a view of the store's own).
    """
    lo, hi = int(store.table_base[index]), int(store.table_base[index + 1])
    r0, r1 = lo + start, (hi if stop is None else lo + stop)
    D = store.dim
    if key == "weight":
        return store.read_rows(torch.arange(r0, r1)) if r1 > r0 else torch.empty(0, D)
    if key == "qparams":
        return _units(store.int_scale_bias(torch.arange(r0, r1)), D)
    if key == "row_group":
        return _units(store.groups_of(torch.arange(r0, r1)), D)
    # Scores as stored (as of each row's last update) with that step: decaying them here
    # would round differently from a run that never stopped.
    if key == "row_priority":
        return _units(store.row_priority[r0:r1], D)
    if key == "row_seen_step":
        return _units(store.row_seen_step[r0:r1], D)
    if key == "momentum":  # saved as fp32 whatever the store keeps (bf16 values convert exactly)
        return _units(store.momentum[r0:r1].float(), D)
    # The table's fallback row (what its dropped rows read) and its optimizer state.
    if key == "fallback":
        return store.fallback_rows()[index : index + 1]
    if key == "fallback_momentum":
        return _units(store.fallback_momentum[index : index + 1], D)
    raise KeyError(f"no checkpoint key {key!r}")


def local_table_state(store: RowGroupStore, index: int) -> Dict[str, torch.Tensor]:
    """Checkpoint tensors of the rows of one table held by a store (see module doc).

    Args:
        store: the store.
        index: the table's index among the store's local tables.

    Returns:
        key -> tensor, for the keys of `table_state_keys(store)`.
    """
    return {key: table_state_block(store, index, key) for key in table_state_keys(store)}


@torch.no_grad()
def write_saved_rows(
    store: RowGroupStore,
    keys: torch.Tensor,
    values: torch.Tensor,
    scale_bias: Optional[torch.Tensor],
    one_per_row: Optional[torch.Tensor],
) -> None:
    """Rows read from a checkpoint, into their current groups: rounded to nearest, and integer
    rows whose saved scale and bias are one per row (not several column slices' own) get their
    exact codes back under it.

    Args:
        store: the store.
        keys: [n] row keys.
        values: [n, dim] fp32 values.
        scale_bias: [n, 2] fp16, each row's saved scale and bias (its first unit's), or None.
        one_per_row: [n] bool, whether every unit of the row saved that same pair, or None.
    """
    store.write_rows(keys, values)
    if scale_bias is None:
        return
    same = one_per_row & (scale_bias[:, 0] != 0)
    groups = store.groups_of(keys)
    for g in INT_BITS:
        exact = (groups == g) & same
        if bool(exact.any()):
            store.write_int_exact(g, keys[exact], values[exact], scale_bias[exact])


@torch.no_grad()
def fill_table_state(store: RowGroupStore, index: int, state: Dict[str, torch.Tensor]) -> None:
    """Write one local table's checkpoint tensors into a store whose groups are already set:
    values rounded to nearest into each row's group (integer rows with one scale and bias per
    row get their exact codes back), then optimizer state, scores and the fallback row.

    Args:
        store: the store.
        index: the table's index among the store's local tables.
        state: key -> this table's block (`local_table_state`'s keys; `weight` required).
    """
    lo, hi = int(store.table_base[index]), int(store.table_base[index + 1])
    if hi == lo:
        return
    q = state["qparams"].view(hi - lo, -1, 2) if "qparams" in state else None
    weight = state["weight"]
    # A chunk of rows at a time: rounding a whole table at once holds several fp32 copies of it.
    for a in range(0, hi - lo, CHUNK_ROWS):
        b = min(a + CHUNK_ROWS, hi - lo)
        write_saved_rows(
            store,
            torch.arange(lo + a, lo + b),
            weight[a:b].float(),
            None if q is None else q[a:b, 0],
            None if q is None else (q[a:b] == q[a:b, :1]).all(dim=2).all(dim=1),
        )
    if "momentum" in state and store.momentum.numel():
        store.momentum[lo:hi] = state["momentum"].float().mean(dim=1)
    if "row_priority" in state and store.row_priority.numel():
        store.row_priority[lo:hi] = state["row_priority"].float()[:, 0]
        store.row_seen_step[lo:hi] = state["row_seen_step"][:, 0].to(torch.int32)
    if store.has_dropped and state.get("fallback") is not None:
        fm = state.get("fallback_momentum")
        store.set_fallback_rows(index, state["fallback"], None if fm is None else fm.float().mean())


def build_stores(
    configs: Sequence[Any],
    policy: PrecisionPolicy,
    step: StepCounter,
    label_tagged: bool,
    weighted: bool,
    sequence: bool,
    device: torch.device,
    init: Optional[Callable[[str, int, int], torch.Tensor]] = None,
) -> tuple[List[RowGroupStore], List[List[str]]]:
    """One store per (pooling, dim) holding whole tables, filled from `init(table, r0, r1)`
    (default: TorchRec's uniform(+-sqrt(1/rows))), a chunk of rows at a time.

    Args:
        configs: the tables' configs.
        policy: the collection's resolved policy.
        step: the collection's step counter.
        label_tagged: whether training batches carry labels in the ids' weights.
        weighted: whether per-id weights are pooling weights.
        sequence: a sequence collection (no pooling).
        device: where the rows live.
        init: fp32 initial values of rows [r0, r1) of a table.

    Returns:
        (the stores, each store's features in its input order).
    """
    by_kind: Dict[tuple, List[Any]] = {}
    for c in configs:
        pooling = "none" if sequence else ("mean" if c.pooling == PoolingType.MEAN else "sum")
        by_kind.setdefault((pooling, c.embedding_dim), []).append(c)
    stores, store_features = [], []
    for (pooling, dim), cfgs in by_kind.items():
        features, ftab = [], []
        for i, c in enumerate(cfgs):
            features += c.feature_names
            ftab += [i] * len(c.feature_names)
        store = RowGroupStore(
            [
                LocalTable(c.name, c.num_embeddings, dim, global_rows=c.num_embeddings, table_id=table_id(c.name))
                for c in cfgs
            ],
            features,
            ftab,
            policy,
            step,
            pooling=pooling,
            label_tagged=label_tagged,
            weighted=weighted,
            device=device,
        )
        store.set_groups(starting_groups(store, policy, {c.name: (c.num_embeddings, c.embedding_dim) for c in configs}))
        for i, c in enumerate(cfgs):
            lo = int(store.table_base[i])
            for r0 in range(0, c.num_embeddings, 1 << 16):
                r1 = min(r0 + (1 << 16), c.num_embeddings)
                values = (
                    init(c.name, r0, r1)
                    if init
                    else (torch.rand(r1 - r0, dim) * 2 - 1) * (1.0 / c.num_embeddings) ** 0.5
                )
                store.write_rows(torch.arange(lo + r0, lo + r1), values)
        stores.append(store)
        store_features.append(features)
    return stores, store_features


class _MixedPrecisionRows:
    """What the bag and sequence collections share when used unsharded."""

    _sequence = False
    _mp_prefix = "embedding_bags"

    def _mp_init(self, policy: Optional[PrecisionPolicy], label_tagged: bool, device) -> None:
        configs = self._mp_configs()
        if policy is not None and not isinstance(policy, PrecisionPolicy):
            raise TypeError(
                f"{type(self).__name__}: precision_policy must be a PrecisionPolicy, not {type(policy).__name__} "
                "(for a dict d: PrecisionPolicy(**d))"
            )
        # The policy as the user gave it: a sharder resolves it again with its fused_params.
        self.precision_policy = policy or PrecisionPolicy()
        # Resolved now, so that an unreachable budget is refused when the module is built.
        self._unsharded_policy = self.precision_policy.resolved([c.embedding_dim for c in configs])
        self.label_tagged = label_tagged
        self.step_counter = StepCounter()
        self.step_counter.on_step_end = self._end_of_step
        self.model_budget: Optional[ModelBudget] = None  # set by share_model_budget
        self.groups_fresh = True
        self.warned_alone = False
        self._any_tiers_loads = False  # `loading_any_tiers`
        self._stores: List[RowGroupStore] = []
        self._store_features: List[List[str]] = []
        self._feature_tables = feature_tables(configs)
        # TorchRec's constructor registered a meta `weight` parameter per table; the rows live
        # in our stores, so none is exposed (the state dict still names each table's weight).
        setattr(self, self._mp_prefix, nn.ModuleDict({c.name: nn.Module() for c in configs}))
        self._register_state_dict_hook(_MixedPrecisionRows._rows_state_dict_hook)
        self._register_load_state_dict_pre_hook(self._rows_load_hook, with_module=False)
        if device is not None and torch.device(device).type != "meta":
            self.materialize(torch.device(device))

    def resolved_policy(self, fused_params: Optional[Dict[str, Any]] = None) -> PrecisionPolicy:
        """The policy with its defaults applied for these tables (see `PrecisionPolicy.resolved`)."""
        return self.precision_policy.resolved([c.embedding_dim for c in self._mp_configs()], fused_params)

    # The same state dict keys as the sharded module (plain, whole-table tensors here), so
    # checkpoints move between unsharded and sharded use. Before `materialize` the module
    # only describes its tables: a meta tensor per table's weight, which is what TorchRec's
    # sharding reads (shapes), as for its own collections.
    @staticmethod
    def _rows_state_dict_hook(module, destination, prefix, _local_metadata) -> None:
        if not module._stores:
            for c in module._mp_configs():
                destination[f"{prefix}{module._mp_prefix}.{c.name}.weight"] = torch.empty(
                    c.num_embeddings, c.embedding_dim, device="meta"
                )
            return
        for store in module._stores:
            for i, t in enumerate(store.tables):
                for key, value in local_table_state(store, i).items():
                    destination[f"{prefix}{module._mp_prefix}.{t.name}.{key}"] = value
        destination[f"{prefix}precision_step"] = torch.tensor([module.step_counter.value], dtype=torch.int64)

    def _rows_load_hook(self, state_dict, prefix, *args) -> None:
        if not self._stores:
            raise RuntimeError(f"{type(self).__name__}: call materialize(device) before loading a state dict")
        self.groups_fresh = False
        step_key = f"{prefix}precision_step"
        if step_key in state_dict:
            self.step_counter.value = int(state_dict.pop(step_key)[0])
        configs = self._mp_configs()
        states = pop_table_states(state_dict, prefix, self._mp_prefix, [c.name for c in configs])
        tables = {c.name: (c.num_embeddings, c.embedding_dim) for c in configs}
        for store in self._stores:
            restore_store(
                store, [states[t.name] for t in store.tables], self._unsharded_policy, tables, self._any_tiers_loads
            )

    @contextlib.contextmanager
    def loading_any_tiers(self) -> Iterator[None]:
        """Within it, `load_state_dict` keeps rows saved in tiers this collection's policy does
        not keep (otherwise refused), for a caller that regroups them right after, as the
        serving export does. Such rows take other bytes than the policy's until then, and
        forever in a one-tier collection (it never regroups)."""
        self._any_tiers_loads = True
        try:
            yield
        finally:
            self._any_tiers_loads = False

    def _mp_configs(self) -> List[Any]:
        raise NotImplementedError

    def _mp_weighted(self) -> bool:
        return False

    def materialize(self, device: torch.device, init: Optional[Callable[[str, int, int], torch.Tensor]] = None) -> None:
        """Allocate the rows on `device` for unsharded use; `init(table, row0, row1)` gives
        fp32 initial values (default: TorchRec's uniform(+-sqrt(1/rows)))."""
        self._stores, self._store_features = build_stores(
            self._mp_configs(),
            self._unsharded_policy,
            self.step_counter,
            self.label_tagged,
            self._mp_weighted(),
            self._sequence,
            device,
            init,
        )

    @property
    def stores(self) -> List[RowGroupStore]:
        """The stores of the rows (empty before `materialize`)."""
        return self._stores

    def precision_memory(self) -> Dict[str, Dict[str, int]]:
        """Per table, as the sharded module's `precision_memory()` gives it: embedding,
        optimizer and priority bytes, and rows per group.

        Returns:
            table -> {"embedding_bytes", "optimizer_bytes", "priority_bytes", "rows_<group>"}
            (empty before `materialize`).
        """
        out = {
            t.name: {k: int(v) for k, v in b.items()} for s in self._stores for t, b in zip(s.tables, s.table_bytes())
        }
        return dict(sorted(out.items()))

    def _lookup_all(self, features: KeyedJaggedTensor):
        """[(feature names, store output)] per store."""
        if not self._stores:
            raise RuntimeError(
                f"{type(self).__name__} has no rows here: shard it with DMP and our sharder, "
                "or call materialize(device)"
            )
        features = check_ids(features, self._feature_tables, self._unsharded_policy.bad_ids)
        if torch.is_grad_enabled():
            self.step_counter.begin(self.training)
        keys = features.keys()
        out = []
        for store, names in zip(self._stores, self._store_features):
            missing = [n for n in names if n not in keys]
            if missing:
                raise KeyError(f"features {missing} are missing from the input")
            sub = features.permute([keys.index(n) for n in names])
            store.training_enabled = self.training
            out.append((names, sub, store(sub.values(), sub.lengths(), sub.weights_or_none(), sub.stride())))
        return out

    def _end_of_step(self, step: int) -> None:
        """A backward pass updated the rows (unsharded use): the fallback rows of dropped ids
        take their step, then rows are reassigned when due."""
        self.finish_step()
        p = self._unsharded_policy
        if p.scored and step % p.reassign_every == 0:
            self.reassign()

    def finish_step(self) -> None:
        """The step's update of the fallback rows (from their dropped ids' gradients)."""
        for store in self._stores:
            store.apply_fallback_update()

    def use_step_counter(self, counter: StepCounter) -> None:
        """Count steps with `counter` (a shared model budget's), in the stores too."""
        self.step_counter = counter
        for store in self._stores:
            store.step = counter

    def reassign(self) -> None:
        """Regroup every row by its score now (with a shared model budget: every collection's)."""
        reassign_collection(self)

    def note_reassigned(self, moved: Dict[str, int], seconds: float) -> None:
        """This collection's rows were regrouped."""
        self.groups_fresh = False

    # ------------------------------------------------------------------ one model budget (BudgetMember)
    def budget_policy(self) -> PrecisionPolicy:
        """The resolved policy the rows train under (`BudgetMember`)."""
        return self._unsharded_policy

    def budget_stores(self) -> List[RowGroupStore]:
        """The stores (`BudgetMember`); RuntimeError before `materialize`."""
        if not self._stores:
            raise RuntimeError(
                f"{type(self).__name__} holds no rows: share the model budget of the model DMP returns, "
                "or after materialize(device)"
            )
        return self._stores

    def budget_tables(self) -> Dict[str, Tuple[int, int]]:
        """table -> (rows, dim) (`BudgetMember`)."""
        return {c.name: (c.num_embeddings, c.embedding_dim) for c in self._mp_configs()}

    def budget_widths(self) -> Dict[str, Tuple[int, ...]]:
        """table -> (dim,): one slice per table (`BudgetMember`)."""
        return {c.name: (c.embedding_dim,) for c in self._mp_configs()}

    def budget_group(self):
        """None: unsharded, no process group (`BudgetMember`)."""
        return None

    @torch.no_grad()
    def restart_groups(self, shares: Dict[str, float]) -> None:
        """Start the rows again at these per-table shares of a model-wide budget."""
        for store in self.budget_stores():
            store.set_groups(starting_groups(store, self._unsharded_policy, self.budget_tables(), shares))


def _check_config_types(module: str, tables: Sequence[Any], kind: type, other: str) -> None:
    """Refuse a table config of the other collection's kind by name: TorchRec's own
    constructors took an EmbeddingConfig for a bag table, or the reverse, and failed later
    on a missing attribute, or not at all."""
    for t in tables:
        if not isinstance(t, kind):
            raise TypeError(
                f"{module}: table {getattr(t, 'name', t)!r} is a {type(t).__name__}; this collection takes "
                f"{kind.__name__} (for the other kind, use {other})"
            )


class MixedPrecisionEmbeddingBagCollection(_MixedPrecisionRows, EmbeddingBagCollection):
    """Drop-in for `EmbeddingBagCollection` whose rows live in precision groups (fp32, fp16,
    int8, int4, int2, or dropped, as the policy's tiers say).

    `label_tagged`: training batches carry labels in the per-id weights
    (`shark_torchrec.precision.labels.tag_labels`); they count for the priorities and are
    never pooling weights unless the collection `is_weighted`.
    """

    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        is_weighted: bool = False,
        device: Optional[torch.device] = None,
        precision_policy: Optional[PrecisionPolicy] = None,
        label_tagged: bool = True,
    ) -> None:
        _check_config_types(type(self).__name__, tables, EmbeddingBagConfig, "MixedPrecisionEmbeddingCollection")
        EmbeddingBagCollection.__init__(self, tables=tables, is_weighted=is_weighted, device=torch.device("meta"))
        for t in tables:
            if t.pooling not in (PoolingType.SUM, PoolingType.MEAN):
                raise ValueError(f"table {t.name}: pooling {t.pooling} is not supported")
        self._mp_init(precision_policy, label_tagged, device)

    def _mp_configs(self):
        return self.embedding_bag_configs()

    def _mp_weighted(self) -> bool:
        return self.is_weighted()

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        keys, lengths, values = [], [], []
        for names, _, out in self._lookup_all(features):
            keys += names
            lengths += [out.shape[1] // max(len(names), 1)] * len(names)
            values.append(out)
        return KeyedTensor(keys=keys, length_per_key=lengths, values=torch.cat(values, dim=1))


class MixedPrecisionEmbeddingCollection(_MixedPrecisionRows, EmbeddingCollection):
    """Drop-in for `EmbeddingCollection` (sequence features, one vector per id) whose rows
    live in the policy's precision groups. Per-id weights carry only labels here (TorchRec's
    EmbeddingCollection has no pooling weights)."""

    _sequence = True
    _mp_prefix = "embeddings"

    def __init__(
        self,
        tables: List[EmbeddingConfig],
        device: Optional[torch.device] = None,
        precision_policy: Optional[PrecisionPolicy] = None,
        label_tagged: bool = True,
    ) -> None:
        _check_config_types(type(self).__name__, tables, EmbeddingConfig, "MixedPrecisionEmbeddingBagCollection")
        EmbeddingCollection.__init__(self, tables=tables, device=torch.device("meta"))
        self._mp_init(precision_policy, label_tagged, device)

    def _mp_configs(self):
        return self.embedding_configs()

    def forward(self, features: KeyedJaggedTensor) -> Dict[str, JaggedTensor]:
        out: Dict[str, JaggedTensor] = {}
        for names, sub, values in self._lookup_all(features):
            lengths = sub.length_per_key()
            for name, part, jt in zip(names, torch.split(values, lengths), sub.to_dict().values()):
                out[name] = JaggedTensor(values=part, lengths=jt.lengths())
        return out


def to_mixed_precision(module: Any, policy: Optional[PrecisionPolicy] = None, label_tagged: bool = True):
    """An unsharded TorchRec `EmbeddingBagCollection` / `EmbeddingCollection` with
    materialised weights, as our module: the same tables, each row rounded to nearest into its
    starting group. (For sharded models and checkpoints: `shark train --init-from CKPT`, or
    `shark_torchrec.jobs.checkpoint.load_weights`.)

    Args:
        module: the TorchRec collection (left unchanged).
        policy: the new module's policy (default: `PrecisionPolicy()`).
        label_tagged: whether training batches will carry labels in the ids' weights.

    Returns:
        A `MixedPrecisionEmbeddingBagCollection` or `MixedPrecisionEmbeddingCollection`, its
        rows on the weights' device.

    Raises:
        TypeError: not a TorchRec collection, or already ours.
        ValueError: the weights are on the meta device.
    """
    if isinstance(module, _MixedPrecisionRows):
        raise TypeError("already a mixed-precision collection")
    if isinstance(module, EmbeddingBagCollection):
        configs = module.embedding_bag_configs()
        new = MixedPrecisionEmbeddingBagCollection(
            configs, is_weighted=module.is_weighted(), precision_policy=policy, label_tagged=label_tagged
        )
        weights = {c.name: module.embedding_bags[c.name].weight for c in configs}
    elif isinstance(module, EmbeddingCollection):
        configs = module.embedding_configs()
        new = MixedPrecisionEmbeddingCollection(configs, precision_policy=policy, label_tagged=label_tagged)
        weights = {c.name: module.embeddings[c.name].weight for c in configs}
    else:
        raise TypeError(
            f"expected a TorchRec EmbeddingBagCollection or EmbeddingCollection, got {type(module).__name__}"
        )
    device = next(iter(weights.values())).device
    if device.type == "meta":
        raise ValueError("the collection's weights are on the meta device: nothing to convert")
    new.materialize(device, init=lambda t, r0, r1: weights[t][r0:r1].detach().float())
    return new

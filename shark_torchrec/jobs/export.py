"""From a checkpoint to models for serving: the trained model unsharded, its inference twin, and
the export directory that serves raw lines with torch alone.

The models come from the checkpoint alone (its config, table shapes and the data schema in
`meta.json`, and the DCP tensors), so a model can be exported where the training data is not.
The export directory (`export_checkpoint`) also needs the data: its dev split checks the export,
and its train split gives the vocabularies (rebuilt as training built them).

Export directory:

    model.pt                 the inference model (torch.save of the DLRMTrainModule; needs this package)
    embedding_collection.pt  its collection, TorchScript over KJT (needs TorchRec to load)
    export.json              bytes, rows per group, the largest logit difference on dev to the model served
                             (the trained one; with serving tiers, the trained one regrouped into them)
    serving_model.pt         the whole model, TorchScript on plain tensors (torch + shark_kernels.so)
    shark_kernels.so         our compiled lookup op, which serving_model.pt calls (for this torch version)
    serving.json             fields, raw-line layout and encoding (what serve.py reads)
    vocab.json               vocabulary encoding: per served field, its values in row order
    serve.py                 the standalone loader (a verbatim copy of shark_torchrec/serve.py)
    README.md                how to load and call it
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from shark_torchrec import kernels
from shark_torchrec.config import ConfigError, DataConfig, JobConfig, config_from_dict
from shark_torchrec.data.schema import DataError, Schema
from shark_torchrec.jobs.checkpoint import CheckpointError, load_full_state, read_meta, resolve_checkpoint
from shark_torchrec.jobs.run_dir import staged_files
from shark_torchrec.kernels.ranked_map import build_ranked_layout, ranked_map_bytes, ranked_map_bytes_per_row
from shark_torchrec.kernels.reference import mixed_lookup_ranked_reference
from shark_torchrec.models.build import model_from_config
from shark_torchrec.models.dlrm import DLRMTrainModule
from shark_torchrec.models.serving import serving_model
from shark_torchrec.modules.inference import ONE_BIT_LAYOUT, MixedPrecisionInferenceEmbeddingBagCollection
from shark_torchrec.modules.mixed_precision import (
    UNIT,
    MixedPrecisionEmbeddingBagCollection,
    table_state_block,
    table_state_keys,
)
from shark_torchrec.modules.model_budget import ModelBudget
from shark_torchrec.modules.precision_policy import MAX_MEMORY_BUDGET, PolicyError, PrecisionPolicy
from shark_torchrec.modules.row_groups import CHUNK_ROWS, IdError
from shark_torchrec.precision.priority import (
    DROPPED,
    FP16,
    FP32,
    INT1,
    INT_BITS,
    ROW_MAP_BYTES,
    SERVED_GROUP_NAMES,
    SYMMETRIC_BITS,
    BudgetError,
    add_occurrences_,
    by_precision,
    check_served_tiers,
    one_bit_tier_counts,
    per_byte_scores,
    ranked_rows,
    row_bytes,
)
from shark_torchrec.precision.quantize import (
    fitted_scale_bias,
    pack_codes,
    quantize_rows,
    requantize_with,
    sign_magnitude_rows,
    symmetric_rows,
)

ONE_BIT = SERVED_GROUP_NAMES[INT1]  # the served-only tier's name (`ServingTiers`)


def load_trained_model(path: str | Path) -> Tuple[DLRMTrainModule, JobConfig]:
    """The checkpoint's model, unsharded on CPU, in eval mode.

    Args:
        path: a checkpoint folder, or a directory of them (the newest that passes its check).

    Returns:
        (the model, the config it was trained with).

    Raises:
        CheckpointError: the checkpoint fails its check, or predates export support (its
            meta.json has no schema).
    """
    path = resolve_checkpoint(path)
    meta = read_meta(path)
    if "schema" not in meta:
        raise CheckpointError(f"checkpoint {path} predates export support (its meta.json has no schema)")
    cfg = config_from_dict(meta["config"], where=f"{path}/meta.json")
    schema = Schema(**meta["schema"])
    model = model_from_config(cfg, schema, device=torch.device("cpu"))
    if cfg.quant.precision == "fp32":  # stock tables: materialize them on CPU to take the weights
        model = _materialized(model)
    state = load_full_state(path)["model"]
    model.load_state_dict(state, strict=True)
    return model.eval(), cfg


def _materialized(model: torch.nn.Module) -> torch.nn.Module:
    for m in model.modules():
        for pname, p in list(m.named_parameters(recurse=False)):
            if p.is_meta:
                setattr(m, pname, torch.nn.Parameter(torch.empty(p.shape), requires_grad=p.requires_grad))
    return model


def export_inference_model(path: str | Path) -> Tuple[DLRMTrainModule, JobConfig]:
    """The checkpoint's model with its mixed-precision collection replaced by
    `MixedPrecisionInferenceEmbeddingBagCollection` (same rows, same groups, no training state).

    Args:
        path: a checkpoint folder, or a directory of them.

    Returns:
        (the inference model, in eval mode; its config).

    Raises:
        CheckpointError: the checkpoint holds stock fp32 tables (no row groups).
    """
    model, cfg = load_trained_model(path)
    if cfg.quant.precision == "fp32":
        raise CheckpointError(
            f"checkpoint {path} holds fp32 TorchRec tables: there are no row groups to export "
            "(TorchRec's quantize_embeddings serves such a model)"
        )
    return to_inference(model), cfg


SERVING_ROUNDING = ("nearest", "fitted")


@dataclass(frozen=True)
class ServingTiers:
    """Tiers for serving chosen at export from the trained priorities: `tiers` (e.g. int8,
    int4, int2, dropped), a `memory_budget` and its `budget_scope` (`table` or `model`), and
    how integer rows get their scale and bias: `fitted` (the default: `fitted_scale_bias`, the
    range refit by least squares for a smaller error per row; on frappe at 0.10 of fp32 bytes
    +0.0010 AUC over `nearest`, bench/README.md) or `nearest` (the row's min/max range, rounded
    to nearest, as TorchRec's post-training quantization).

    `int1` is a tier for serving only (`regroup_for_serving`): 1-bit rows, each value +a or -a
    by its sign (one magnitude a row in a byte, `sign_magnitude_rows`), for the rows the other tiers
    cannot hold, where `dropped` would give them their
    table's mean row; the two exclude each other, and int1 takes the model-wide budget.
    `int4s` and `int2s`, served only too and planned with int1 below them: symmetric int4 and
    int2 rows with one scale byte a row (`symmetric_rows`), dim / 2 + 1 and dim / 4 + 1 bytes
    where int4 and int2 take 3 more."""

    tiers: Tuple[str, ...]
    memory_budget: float
    budget_scope: str = "model"
    rounding: str = "fitted"

    def __post_init__(self) -> None:
        # Settings of `shark export` (--tiers, --memory-budget, --budget-scope, --rounding) and
        # `shark compress --serve-tiers`: ConfigError and BudgetError, the user's to fix.
        if self.rounding not in SERVING_ROUNDING:
            raise ConfigError(f"serving rounding must be one of {SERVING_ROUNDING}, got {self.rounding!r}")
        _check_served_tiers(self.tiers)
        # Most precise first, however given (`--tiers int1 int4` was recorded in that order,
        # though planned by precision).
        object.__setattr__(self, "tiers", tuple(SERVED_GROUP_NAMES[g] for g in by_precision(self.tiers)))
        budget = self.memory_budget
        if not 0 < budget <= 1:
            hint = f" (for {budget:g}% give {budget / 100:g})" if 1 < budget <= 100 else ""
            raise BudgetError(f"serving budget {budget:g}: a fraction of the fp32 tables' bytes, in (0, 1]{hint}")
        if ONE_BIT in self.tiers and self.budget_scope != "model":
            raise ConfigError("serving tiers: int1 is planned over the whole model: --budget-scope model")


def _check_served_tiers(tiers: Tuple[str, ...], dim: Optional[int] = None) -> None:
    """`check_served_tiers`, its refusal (of the --tiers given) a ConfigError with its message."""
    try:
        check_served_tiers(tiers, dim)
    except ValueError as e:
        raise ConfigError(str(e)) from None


@torch.no_grad()
def regroup_for_serving(
    model: DLRMTrainModule,
    serving: ServingTiers,
    data=None,
    counts: Optional[Dict[str, torch.Tensor]] = None,
    progress: bool = True,
) -> Dict[str, Any]:
    """Put a loaded model's rows into tiers for serving, in place: rows ranked by their
    priorities (the budget rule of `serving`) and quantized from their trained values
    (`serving.rounding`), so low tiers are reached without training in them. A table's
    fallback row (for its dropped rows) is the mean of the trained values of the rows it
    replaces.

    A mixed-precision model (`--precision shark` or `freq`) ranks its rows by the priorities
    they had at the end of training. A model of stock fp32 tables (`--precision fp32`, what
    a TorchRec user already trains) or a one-tier run (`--precision int8`, ...) has none: its
    rows are ranked by `training_priorities`, Eq. 7's increments summed over one pass of
    `data`'s training split.

    Args:
        model: from `load_trained_model`.
        serving: the tiers and the budget.
        data: the model's `Dataset` (as training opened it); needed for stock fp32 tables.
        counts: `training_priorities` of this model and data, when already counted (several
            exports of one model share them); None: counted here.
        progress: show the counting pass's progress bar.

    Returns:
        {"serving_tiers", "serving_budget", "serving_budget_scope", "serving_rounding",
        "serving_priorities"} for the export record.

    Raises:
        CheckpointError: the model has no trained priorities and no data is given to count them on.
        ConfigError / BudgetError: tiers or budget the policy refuses, named.
    """
    arch = model.model.sparse_arch
    trained = arch.embedding_bag_collection
    policy, priorities = _ranking_policy(trained)  # refuses what is not an EmbeddingBagCollection, named
    _check_one_served_module(trained.embedding_bag_configs())  # before any pass over the data
    if priorities != "trained" and data is None and counts is None:
        raise CheckpointError(
            "a model without trained priorities (stock fp32 tables, or a one-tier run) has its rows ranked by "
            "their occurrences in the training split: the data is needed"
        )
    record = {
        "serving_tiers": list(serving.tiers),
        "serving_budget": serving.memory_budget,
        "serving_budget_scope": serving.budget_scope,
        "serving_rounding": serving.rounding,
        "serving_priorities": priorities,
    }
    if ONE_BIT in serving.tiers:
        # A tier the training store does not hold: the export plans the rows and builds the
        # served layout itself.
        configs = trained.embedding_bag_configs()
        _check_served_tiers(serving.tiers, configs[0].embedding_dim if configs else None)  # before the pass
        _check_one_bit_floor(serving, configs)  # before the pass too
        if priorities != "trained" and counts is None:
            counts = counted_priorities(model, data, progress)
        configs, dim, value, score = _rows_and_scores(trained, counts)
        groups = _one_bit_groups(serving, policy, configs, score)
        if groups is not None:
            _install_served(model, configs, value, groups, serving.rounding)
            return record
        # Every row fits in the tiers above int1: their own rule, without 1-bit rows.
        serving = dataclasses.replace(serving, tiers=tuple(t for t in serving.tiers if t != ONE_BIT))
    configs = trained.embedding_bag_configs()
    store_budget = serving_store_budget(serving, configs)
    floor = served_min_budget(
        configs[0].embedding_dim if configs else 4,
        serving.tiers,
        sum(c.num_embeddings for c in configs),
        len(configs),
    )

    def refused(e: Exception) -> BudgetError:
        dim = configs[0].embedding_dim if configs else "?"
        if serving.memory_budget < floor:  # the served floor says it all: the store's own terms would only confuse
            return BudgetError(_below_floor(serving, dim, floor))
        head = (
            f"serving budget {serving.memory_budget} cannot be met "
            f"{'table by table' if serving.budget_scope == 'table' else 'over the model'} in {', '.join(serving.tiers)}"
        )
        return BudgetError(f"{head} (the store's rule, given {store_budget:.4f} in its own terms, said: {e})")

    try:
        new_policy = dataclasses.replace(
            policy,
            mode=policy.mode if priorities == "trained" else "shark",  # ranked by Eq. 7's counts
            tiers=tuple(serving.tiers),
            memory_budget=store_budget,
            budget_scope=serving.budget_scope,
            row_fractions=None,
            t8=None,
            t16=None,
        )
        new_policy.resolved([c.embedding_dim for c in configs])  # the tiers at these dims (int2: a multiple of 8)
    except BudgetError as e:
        raise refused(e) from e
    except PolicyError as e:  # the policy's rules refuse the tiers given (--tiers), named
        raise ConfigError(str(e)) from e
    try:
        ebc = MixedPrecisionEmbeddingBagCollection(
            tables=configs, precision_policy=new_policy, device=torch.device("cpu")
        )
    except BudgetError as e:
        raise refused(e) from e
    stock = None  # the trained fp32 tables, for a collection without trained priorities
    if priorities == "trained":
        state = _trained_rows_state(trained)  # trained values in their trained groups, scores, step
    else:
        if counts is None:
            counts = counted_priorities(model, data, progress)
        stock = _fp32_tables(trained)
        state = _counted_rows_state(ebc, stock, counts)
    if "dropped" not in serving.tiers:
        # Rows dropped in training load as stored rows of the cheapest serving tier, with the
        # value they served (their fallback row's), before they are ranked again.
        cheapest = ebc.resolved_policy().groups[-1]
        for key, value in state.items():
            if key.endswith(".row_group"):
                state[key] = torch.where(value == DROPPED, torch.full_like(value, cheapest), value)
    with ebc.loading_any_tiers():  # the trained groups, regrouped into the serving tiers below
        ebc.load_state_dict(state)
    del state
    # Each store's rows as trained: the trained tables themselves where they are fp32, else read
    # from the trained collection's stores a chunk at a time (no copy of either).
    if stock is None:
        source = _store_sources(trained)
        values = [_TrainedRows(s.table_base, [source[t.name] for t in s.tables], s.dim) for s in ebc.stores]
    else:
        values = [_TrainedRows.of_store(s, stock) for s in ebc.stores]
    loaded_groups = [s.row_group.clone() for s in ebc.stores]  # int8 a row
    try:
        if serving.budget_scope == "model":
            # The model's only collection: its budget is the model's (no warning that it stands alone).
            ModelBudget([("embedding_bag_collection", ebc)]).reassign()
        else:
            ebc.reassign()
    except BudgetError as e:
        raise refused(e) from e
    if stock is not None:
        # The rows were loaded in their starting groups; those the reassignment moved were
        # converted from there. Each gets its trained value again, rounded to nearest into its
        # group (as a row loaded in fp32 and converted once would be).
        for store, before, start in zip(ebc.stores, values, loaded_groups):
            moved = (store.row_group != start).nonzero().flatten()
            for a in range(0, len(moved), CHUNK_ROWS):
                k = moved[a : a + CHUNK_ROWS]
                store.write_rows(k, before[k])
    for store, before in zip(ebc.stores, values):
        if not store.has_dropped:
            continue
        dropped = store.row_group == DROPPED
        for i in range(len(store.tables)):
            lo, hi = int(store.table_base[i]), int(store.table_base[i + 1])
            mine = dropped[lo:hi].nonzero().flatten() + lo
            if len(mine):
                store.set_fallback_rows(i, before.mean_of(mine))
    if serving.rounding == "fitted":
        for store, before in zip(ebc.stores, values):
            groups = store.row_group
            for g, bits in INT_BITS.items():
                keys = (groups == g).nonzero().flatten()
                for a in range(0, len(keys), CHUNK_ROWS):
                    k = keys[a : a + CHUNK_ROWS]
                    store.write_int_exact(g, k, before[k], fitted_scale_bias(before[k], bits))
    arch.embedding_bag_collection = ebc
    return record


def _fp32_tables(trained: EmbeddingBagCollection) -> Dict[str, torch.Tensor]:
    """A collection without trained priorities' rows as fp32, by table name: a stock
    collection's own weights (no copy), or a one-tier run's as its state dict decodes them."""
    state = trained.state_dict()
    return {c.name: state[f"embedding_bags.{c.name}.weight"].detach().float() for c in trained.embedding_bag_configs()}


def _store_sources(collection: MixedPrecisionEmbeddingBagCollection) -> Dict[str, Tuple[Any, int]]:
    """table name -> (the store holding it, its first key there): `_TrainedRows`' way to read
    a table from a store on demand."""
    return {t.name: (s, int(s.table_base[i])) for s in collection.stores for i, t in enumerate(s.tables)}


class _TrainedRows:
    """Rows as they trained, by key over tables back to back, a chunk at a time: each table
    either a tensor of its rows (the trained fp32 tables themselves) or the trained store it is
    read from on demand (`RowGroupStore.read_rows` of its keys there; a dropped row reads its
    fallback row, the value it served).

    Args:
        table_base: int64 [T + 1], the first key of each table (and the end).
        tables: per table its rows [rows, D], or (store, first key of the table in the store).
        dim: the rows' dim.
    """

    def __init__(self, table_base: torch.Tensor, tables: List[Any], dim: int) -> None:
        self.table_base = table_base.long()
        self.tables = tables
        self.dim = dim

    @classmethod
    def of_store(cls, store, stock: Dict[str, torch.Tensor]) -> "_TrainedRows":
        """A store's rows from its tables' trained fp32 values (`_fp32_tables`, no copy)."""
        return cls(store.table_base, [stock[t.name] for t in store.tables], store.dim)

    def mean_of(self, keys: torch.Tensor) -> torch.Tensor:
        """The mean of these rows (ascending keys of one table): gathered, then torch's mean,
        as the fallback rows of every export so far were computed."""
        return self[keys].mean(dim=0)

    def __getitem__(self, keys: torch.Tensor) -> torch.Tensor:
        """The rows of these keys, in order."""
        table = torch.searchsorted(self.table_base, keys, right=True) - 1
        out = torch.empty(len(keys), self.dim)
        for i in torch.unique(table).tolist():
            at = (table == i).nonzero().flatten()
            t = self.tables[i]
            local = keys[at] - self.table_base[i]
            out[at] = t[local] if isinstance(t, torch.Tensor) else t[0].read_rows(local + t[1])
        return out


def _check_one_served_module(configs) -> None:
    """Refuse, naming the tables, a collection that one served module cannot hold (tables of
    several dims or poolings, or a pooling other than sum and mean), as
    `MixedPrecisionInferenceEmbeddingBagCollection` would, but before the rows are ranked."""
    kinds = {(c.embedding_dim, c.pooling) for c in configs}
    if len(kinds) > 1 or any(p not in (PoolingType.SUM, PoolingType.MEAN) for _, p in kinds):
        tables = ", ".join(f"{c.name} (dim {c.embedding_dim}, {c.pooling.name.lower()})" for c in configs)
        raise NotImplementedError(
            f"serving: one module serves tables of one dim and one pooling (sum or mean), got {tables}"
        )


def _rows_and_scores(trained, counts: Optional[Dict[str, torch.Tensor]]):
    """Every row of a loaded collection and the priority it is ranked by, tables back to back
    in the order of its configs.

    Args:
        trained: the loaded collection (ours with trained priorities, stock tables, or a one-tier run).
        counts: `training_priorities` for a collection without trained priorities, else None.

    Returns:
        (configs, dim, `_TrainedRows` of the rows as they served in training: the fp32 tables
        themselves, or read from the collection's stores a chunk at a time, never all decoded
        at once; float32 [rows] priorities: the scores at the last step, or the counts). The
        tables have one dim.
    """
    configs = trained.embedding_bag_configs()
    names = [c.name for c in configs]
    dim = configs[0].embedding_dim
    if isinstance(trained, MixedPrecisionEmbeddingBagCollection):
        tables = _store_sources(trained)
    else:
        tables = _fp32_tables(trained)
    if counts is not None:
        scores = {m: counts[m].float() for m in names}
    else:  # the trained scores, table by table from its store
        scores = {}
        for c in configs:
            store, lo = tables[c.name]
            scores[c.name] = store.scores_now(lo, lo + c.num_embeddings).float()
    base = torch.tensor([0] + [c.num_embeddings for c in configs]).cumsum(0)
    return configs, dim, _TrainedRows(base, [tables[m] for m in names], dim), torch.cat([scores[m] for m in names])


def _below_floor(serving: ServingTiers, dim, floor: float) -> str:
    """The refusal of a serving budget below what its tiers can reach at this dim."""
    return (
        f"serving budget {serving.memory_budget} is below what a served model in {', '.join(serving.tiers)} "
        f"can reach at dim {dim}: {floor:.4f} of fp32 with the ranked row map"
    )


def _one_bit_floor(serving: ServingTiers, configs) -> float:
    """What these tables can reach at least in the serving tiers (`served_min_budget`)."""
    return served_min_budget(
        configs[0].embedding_dim, serving.tiers, sum(c.num_embeddings for c in configs), len(configs)
    )


def _check_one_bit_floor(serving: ServingTiers, configs) -> None:
    """Refuse a budget below what these tables can reach in the serving tiers (every row in
    the cheapest, plus the ranked map: `served_min_budget`), naming the floor, before the rows
    are counted or ranked."""
    if not configs:
        return
    floor = _one_bit_floor(serving, configs)
    if serving.memory_budget < floor:
        raise BudgetError(_below_floor(serving, configs[0].embedding_dim, floor))


def _one_bit_groups(serving: ServingTiers, policy: PrecisionPolicy, configs, score: torch.Tensor):
    """Each row's group under the rank rule with the 1-bit tier (`one_bit_tier_counts`): rows
    ranked over the whole model as the store's rule ranks them (score per byte, ties by table
    name, then row); None when every row fits in the tiers above int1 and the store's own rule
    reads them (no symmetric tier among them)."""
    tiers = by_precision(serving.tiers)
    dim = configs[0].embedding_dim
    names = [c.name for c in configs]
    rows = [c.num_embeddings for c in configs]
    n = sum(rows)
    cost = {g: row_bytes(dim, g) for g in tiers}

    def weight_bytes(groups: int) -> float:
        # The budget less the ranked map of this many groups and up to 3 bytes before each group
        # table (each starts at a multiple of 4).
        return serving.memory_budget * n * dim * 4 - ranked_map_bytes(n, len(configs), groups, False) - 3 * groups

    try:
        plan = one_bit_tier_counts(n, weight_bytes(len(tiers)), cost, tiers, policy.fp32_fraction)
        if plan is None and any(g in SYMMETRIC_BITS for g in tiers):
            # Every row fits above int1, and no stored rule reads the symmetric tiers: the same
            # rule one tier up (int4s int2s int1: as many int4s rows as fit, the rest int2s, the
            # map one code smaller), until one fits.
            above = list(tiers[:-1])
            while plan is None and len(above) > 1:
                plan = one_bit_tier_counts(
                    n, weight_bytes(len(above)), cost, above, policy.fp32_fraction, cheapest=above[-1]
                )
                above = above[:-1]
            plan = {g: (plan or {above[0]: n}).get(g, 0) for g in tiers}
    except BudgetError as e:
        raise BudgetError(f"{_below_floor(serving, dim, _one_bit_floor(serving, configs))} ({e})") from e
    if plan is None and len(tiers) > 2:
        return None
    if plan is None:  # one tier above int1, and every row fits in it
        plan = {tiers[0]: n, INT1: 0}
    order = ranked_rows(per_byte_scores(score, dim), names, rows)
    groups = torch.empty(n, dtype=torch.int64)
    at = 0
    for g in tiers:
        groups[order[at : at + plan[g]]] = g
        at += plan[g]
    return groups


def _install_served(model: DLRMTrainModule, configs, value: "_TrainedRows", groups: torch.Tensor, rounding: str):
    """Replace the model's collection by the inference module of `value`'s rows (tables back
    to back, read a chunk at a time) in `groups` (a stored group id per row), each group's rows
    in key order."""
    dim = configs[0].embedding_dim
    rows = [c.num_embeddings for c in configs]
    rb = [row_bytes(dim, g) for g in range(len(SERVED_GROUP_NAMES))]
    encoded, offsets, capacity, total = [], [], [], 0
    slots = torch.zeros(len(groups), dtype=torch.int64)
    for g in range(len(SERVED_GROUP_NAMES)):
        keys = (groups == g).nonzero().flatten()
        slots[keys] = torch.arange(len(keys))
        capacity.append(len(keys))
        total = (total + 3) // 4 * 4 if len(keys) else total
        offsets.append(total)
        total += len(keys) * rb[g]
        parts = [_encoded_rows(value[keys[a : a + CHUNK_ROWS]], g, rounding) for a in range(0, len(keys), CHUNK_ROWS)]
        encoded.append(torch.cat(parts) if parts else None)
    weights = torch.zeros(total, dtype=torch.uint8)
    for g, e in enumerate(encoded):
        if e is not None:
            weights[offsets[g] : offsets[g] + e.numel()] = e.flatten()
    layout = build_ranked_layout(weights, offsets, capacity, rb, groups, slots, torch.tensor([0] + rows).cumsum(0))
    model.model.sparse_arch.embedding_bag_collection = MixedPrecisionInferenceEmbeddingBagCollection(configs, layout)


def _integer_rows(values: torch.Tensor, group: int, rounding: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(unpacked codes, fp16 scale and bias) of fp32 rows in an int8/int4/int2 group, the range
    `fitted` (`fitted_scale_bias`) or `nearest` (the row's min/max)."""
    bits = INT_BITS[group]
    if rounding == "fitted":
        sb = fitted_scale_bias(values, bits)
        return requantize_with(values, sb, bits), sb
    return quantize_rows(values, bits)


def _encoded_rows(values: torch.Tensor, group: int, rounding: str) -> torch.Tensor:
    """fp32 rows as the bytes of a served group's rows: fp32, fp16 (nearest), an int8/int4/int2
    row (fp16 scale and bias, then the codes packed low bits first; `fitted` or `nearest` range),
    a 1-bit row (a magnitude code byte, then a sign bit a value: `sign_magnitude_rows`,
    whatever the rounding, since a sign has no other nearest code), or a symmetric int4 or int2
    row (a scale code byte, then the codes two or four a byte: `symmetric_rows`, whose scale is
    fitted whatever the rounding)."""
    if group == FP32:
        return values.contiguous().view(torch.uint8)
    if group == FP16:
        return values.clamp(-65504.0, 65504.0).half().contiguous().view(torch.uint8)
    if group == INT1:
        codes, magnitude = sign_magnitude_rows(values)
        return torch.cat([magnitude, pack_codes(codes, 1)], dim=1)
    if group in SYMMETRIC_BITS:
        codes, scale = symmetric_rows(values, SYMMETRIC_BITS[group])
        return torch.cat([scale, pack_codes(codes, SYMMETRIC_BITS[group])], dim=1)
    codes, sb = _integer_rows(values, group, rounding)
    return torch.cat([sb.contiguous().view(torch.uint8), pack_codes(codes, INT_BITS[group])], dim=1)


def _ranking_policy(trained: torch.nn.Module) -> Tuple[PrecisionPolicy, str]:
    """(the policy whose settings the serving policy starts from, what ranks the rows:
    "trained" priorities or "training split occurrences") for a loaded collection.

    Raises:
        CheckpointError: not an EmbeddingBagCollection.
    """
    if isinstance(trained, MixedPrecisionEmbeddingBagCollection) and trained.precision_policy.scored:
        return trained.precision_policy, "trained"
    if isinstance(trained, EmbeddingBagCollection):  # stock tables, or one of our one-tier runs
        # A one-tier run keeps its own settings (head size, bad ids, seed); stock tables take the defaults.
        return getattr(trained, "precision_policy", None) or PrecisionPolicy(mode="shark"), "training split occurrences"
    raise CheckpointError(f"cannot serve a {type(trained).__name__} in tiers: not an EmbeddingBagCollection")


def counted_priorities(model: DLRMTrainModule, data, progress: bool = True) -> Optional[Dict[str, torch.Tensor]]:
    """The counts `regroup_for_serving` ranks a model's rows by when it trained without
    priorities, to count once and pass to several of its calls (`counts`).

    Args:
        model: from `load_trained_model`.
        data: the model's `Dataset`.
        progress: show the pass's progress bar.

    Returns:
        `training_priorities` of the model's tables over the training split, with its policy's
        alpha; None for a model with trained priorities (nothing to count).
    """
    trained = model.model.sparse_arch.embedding_bag_collection
    policy, priorities = _ranking_policy(trained)
    if priorities == "trained":
        return None
    return training_priorities(trained.embedding_bag_configs(), data, policy.alpha, progress=progress)


def training_priorities(
    configs, data, alpha: float, batch_size: int = 4096, progress: bool = True
) -> Dict[str, torch.Tensor]:
    """Each row's priority for serving a model that trained without priorities (stock fp32
    tables): Eq. 7's increments summed over one pass of the training split
    (`add_occurrences_`: alpha for a positive example's lookup, 1 for a negative one's). The
    paper's decay is left out on purpose: after training it would rank rows by the last few
    batches they were seen in.

    Args:
        configs: the collection's table configs (features map to tables through them).
        data: the model's `Dataset`, its fields as training saw them.
        alpha: the weight of a positive example.
        batch_size: lines read at a time.
        progress: show a progress bar.

    Returns:
        table name -> float64 [rows] sums.

    Raises:
        IdError: an id outside its table, naming the feature, the id and the table.
        DataError: a table none of whose features the data has.
    """
    from tqdm import tqdm

    table_of = {f: c for c in configs for f in c.feature_names}
    counts = {c.name: torch.zeros(c.num_embeddings, dtype=torch.float64) for c in configs}
    checked = False
    batches = data.batches("train", batch_size)
    for batch in tqdm(batches, desc="row priorities (training split)", unit="batch", disable=not progress):
        kjt = batch.sparse_features
        if not checked:  # a table none of whose features the data has would rank by row id alone
            missing = [f for f in table_of if f not in kjt.keys()]
            if missing:
                raise DataError(
                    f"counting serving priorities: the training split has no feature {', '.join(missing)} "
                    f"(tables {', '.join(sorted({table_of[f].name for f in missing}))}); it has {kjt.keys()}"
                )
            checked = True
        positive = batch.labels > 0.5
        for f in kjt.keys():
            c = table_of.get(f)
            if c is None:
                continue
            jt = kjt[f]
            ids = jt.values()
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= c.num_embeddings):
                bad = int(ids[(ids < 0) | (ids >= c.num_embeddings)][0])
                raise IdError(
                    f"counting serving priorities over the training split: feature {f}: id {bad} is outside "
                    f"table {c.name} ({c.num_embeddings} rows)"
                )
            add_occurrences_(counts[c.name], ids, torch.repeat_interleave(positive, jt.lengths()), alpha)
    return counts


class _LazyTableRows:
    """A trained table's rows as the state's `weight`, decoded a block at a time as
    `fill_table_state` slices it (`weight[a:b]`): no fp32 copy of the table."""

    def __init__(self, store, index: int) -> None:
        self.store, self.index = store, index

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return table_state_block(self.store, self.index, "weight", rows.start or 0, rows.stop)


def _trained_rows_state(trained: MixedPrecisionEmbeddingBagCollection) -> Dict[str, Any]:
    """What `trained.state_dict()` gives (values in their trained groups, scale and bias,
    scores, optimizer state, fallback rows, step), without its copies: the rows are read from
    the trained stores a block at a time (`_LazyTableRows`), and each per-column-slice entry is
    one row's value broadcast (`expand`) over its columns, as the state dict repeats it."""
    state: Dict[str, Any] = {}
    for store in trained.stores:
        units = store.dim // UNIT
        groups = store.row_group  # decoded once a store: int8 a row
        for i, t in enumerate(store.tables):
            lo, hi = int(store.table_base[i]), int(store.table_base[i + 1])
            n, p = hi - lo, f"embedding_bags.{t.name}."
            for key in table_state_keys(store):
                if key == "weight":
                    state[p + key] = _LazyTableRows(store, i)
                elif key == "qparams":
                    state[p + key] = store.int_scale_bias(torch.arange(lo, hi))[:, None, :].expand(n, units, 2)
                elif key == "row_group":
                    state[p + key] = groups[lo:hi][:, None].expand(n, units)
                elif key in ("row_priority", "row_seen_step"):
                    state[p + key] = getattr(store, key)[lo:hi][:, None].expand(n, units)
                elif key == "momentum":
                    state[p + key] = store.momentum[lo:hi].float()[:, None].expand(n, units)
                else:  # the fallback row and its state: one a table
                    state[p + key] = table_state_block(store, i, key)
    state["precision_step"] = torch.tensor([trained.step_counter.value], dtype=torch.int64)
    return state


def _counted_rows_state(ebc: MixedPrecisionEmbeddingBagCollection, stock: Dict[str, torch.Tensor], counts) -> Dict:
    """A state dict that loads the trained tables' rows (`_fp32_tables`: stock tables, or a
    one-tier run's) into `ebc` in the groups it starts in (`starting_groups`, within the
    budget), rounded to nearest, each row's score its count (as of the last step, so no decay
    applies when the rows are ranked).

    Nothing here is a copy a row: `ebc`'s state dict would decode every row to fp32 and give
    its per-column-slice entries (scale and bias, group, score, step: about 0.8 of the fp32
    table at dim 64), all replaced. So each entry is one row's, broadcast (`expand`) to the
    table's rows: the trained values and counts; else the fresh store's first row (its
    optimizer state, zero in every row before training). The groups are the store's own, so
    loading moves no row and the store never holds the tables in fp32; no scale and bias is
    given, so integer rows are rounded from the values. `regroup_for_serving` writes the rows
    that its reassignment moves again from the trained values."""
    state: Dict[str, torch.Tensor] = {}
    for store in ebc.stores:
        start_groups = store.row_group  # decoded once a store: int8 a row
        for i, t in enumerate(store.tables):
            p = f"embedding_bags.{t.name}."
            rows = int(store.table_base[i + 1] - store.table_base[i])
            for key in table_state_keys(store):
                if key == "weight":
                    state[p + key] = stock[t.name]
                    continue
                if key in ("fallback", "fallback_momentum"):  # one row a table
                    state[p + key] = table_state_block(store, i, key)
                    continue
                if key == "qparams":  # rounded from the values instead
                    continue
                first = table_state_block(store, i, key, 0, 1)
                if key == "row_group":
                    lo = int(store.table_base[i])
                    start = start_groups[lo : lo + rows].to(first.dtype)
                    state[p + key] = start[:, None].expand(rows, first.shape[1])
                    continue
                if key == "row_priority":
                    # float32 scores, as the store keeps them: counts past 2^24 round (ties among the hottest rows).
                    state[p + key] = counts[t.name].float()[:, None].expand(rows, first.shape[1])
                    continue
                elif key == "row_seen_step":
                    first = torch.zeros_like(first)
                state[p + key] = first.expand(rows, *first.shape[1:])
    state["precision_step"] = torch.ones(1, dtype=torch.int64)  # scores as of step 0: the rows' own
    return state


def served_min_budget(dim: int, tiers, rows: int = 0, tables: int = 0) -> float:
    """The smallest budget (fraction of fp32 bytes) a served model in these tiers can reach:
    every row in the cheapest stored tier (nothing with the dropped tier), plus the ranked row
    map. Given the model's rows and tables, the exact floor the export can meet: with the map's
    fixed bytes (its last block's padding, each table's slots), up to 3 bytes before each group
    table and, with dropped rows, a fallback row per table; without them, a row's share alone.

    Args:
        dim: the tables' dim.
        tiers: the serving tiers (names).
        rows: the rows of all tables (0: a row's share only).
        tables: the tables.

    Returns:
        The fraction.
    """
    stored = [t for t in tiers if t != "dropped"]
    dropped = "dropped" in tiers
    # The least precise stored tier, whatever order the tiers were given in (`int2 int8` too).
    cheapest = 0 if dropped or not stored else row_bytes(dim, by_precision(stored)[-1])
    per_row = ranked_map_bytes_per_row(len(stored), dropped)
    if not rows:
        return (cheapest + per_row) / (4 * dim)
    fixed = ranked_map_bytes(rows, tables, len(stored), dropped) - rows * per_row + 3 * len(stored)
    fixed += tables * row_bytes(dim, FP32) if dropped else 0
    return (rows * (cheapest + per_row) + fixed) / (rows * 4 * dim)


def serving_store_budget(serving: ServingTiers, configs) -> float:
    """The budget the training store's rule must be given so that the served model, whose
    ranked row map costs `ranked_map_bytes_per_row` where the store's costs `ROW_MAP_BYTES`, is
    within `serving.memory_budget`: the bytes the cheaper map frees go to the rows. The map's
    bytes are counted whole (the last block's padding, each table's start and fallback slot).
    With one budget per table, each table is given the difference a row makes at its dim, and
    the map's fixed bytes are taken off all tables together (a tiny table's share of them would
    otherwise cancel the difference for every table): the served model is within the budget in
    total, each table's rows and their share of the map within it.

    Args:
        serving: the serving tiers and budget.
        configs: the tables' configs (one dim: the served module's).

    Returns:
        The budget for the store's rule (a fraction of fp32 bytes), at most the policy's 1.5.

    Raises:
        BudgetError: the served budget cannot be met by the store's rule at all.
    """
    stored = [t for t in serving.tiers if t != "dropped"]
    per_row = ranked_map_bytes_per_row(len(stored), "dropped" in serving.tiers)
    rows = sum(c.num_embeddings for c in configs)
    fp32 = sum(c.num_embeddings * c.embedding_dim * 4 for c in configs)
    # What the map costs beyond its rows' share: the last block's padding, each table's slots.
    fixed = ranked_map_bytes(rows, len(configs), len(stored), "dropped" in serving.tiers) - rows * per_row
    if serving.budget_scope == "model":
        raised = serving.memory_budget + (rows * (ROW_MAP_BYTES - per_row) - fixed) / max(fp32, 1)
    else:
        dim = max((c.embedding_dim for c in configs), default=4)
        raised = serving.memory_budget + (ROW_MAP_BYTES - per_row) / (4 * dim) - fixed / max(fp32, 1)
    if raised <= 0:
        raise BudgetError(
            f"serving budget {serving.memory_budget} leaves nothing for the rows once the ranked row map's fixed "
            f"bytes ({fixed:.0f}) are paid"
        )
    return min(raised, MAX_MEMORY_BUDGET)


def to_inference(model: DLRMTrainModule) -> DLRMTrainModule:
    """Swap a loaded mixed-precision model's collection for its inference twin, in place (the
    training store, with its scores and optimizer state, is dropped).

    Args:
        model: a mixed-precision model from `load_trained_model` (or `regroup_for_serving`).

    Returns:
        The same model, in eval mode.
    """
    sparse_arch = model.model.sparse_arch
    if not isinstance(sparse_arch.embedding_bag_collection, MixedPrecisionInferenceEmbeddingBagCollection):
        # (`regroup_for_serving` with 1-bit rows already put the inference module in.)
        sparse_arch.embedding_bag_collection = MixedPrecisionInferenceEmbeddingBagCollection.from_trained(
            sparse_arch.embedding_bag_collection
        )
    return model.eval()


SERVING_MODEL = "serving_model.pt"
KERNELS_FILE = "shark_kernels.so"  # torch.ops.shark, which the serving model's lookup calls
SERVING_MANIFEST = "serving.json"
VOCAB_FILE = "vocab.json"
RECIPE_FILE = "serve.py"


def export_checkpoint(
    checkpoint: Path,
    out: Path,
    base_checkpoint: Optional[str] = None,
    serving: Optional[ServingTiers] = None,
    progress: bool = True,
    data_source: Optional[str] = None,
) -> Dict[str, Any]:
    """Write the export directory of a checkpoint (see the module docstring): a mixed-precision
    model, or one of stock fp32 tables served in `serving`'s tiers.

    Args:
        checkpoint: a checkpoint (or a directory of them: the newest).
        out: the export directory (created if absent; files of an earlier export are replaced,
            all at the end: an export that fails leaves them as they were).
        base_checkpoint: the uncompressed model's checkpoint, for the figures beside it.
        serving: tiers and budget to serve in, rows ranked by their priorities
            (`regroup_for_serving`); None: the rows as trained (refused for stock fp32 tables).
        progress: show the progress bar of the pass that counts rows for `serving`.
        data_source: where the model's data is now (`csv:DIR`, `criteo:DIR`), when its folder
            moved since training; None: where the checkpoint's run read it. The same data: its
            vocabulary must give every table the rows the model has.

    Returns:
        export.json's record: bytes beside the fp32 tables and beside TorchRec's per-table int8
        (`quantize_embeddings`), rows per group, and the largest logit difference over the dev
        split to the model the export serves: the trained model, or with `serving` the trained
        model regrouped into those tiers (a check of the export, not of what the tiers cost),
        and the served model's dev AUC. With `serving`, also what the tiers cost: the trained
        model's dev AUC (`dev_auc_trained`) and the largest logit difference to it
        (`max_abs_logit_diff_dev_to_trained`).
    """
    from shark_torchrec.data import open_dataset
    from shark_torchrec.distributed.memory import torchrec_int8_bytes
    from shark_torchrec.jobs.evaluation import binary_metrics

    model, qcfg = load_trained_model(checkpoint)  # read once: logits first, then swapped in place
    if qcfg.quant.precision == "fp32" and serving is None:
        raise CheckpointError(
            f"checkpoint {checkpoint} holds fp32 TorchRec tables: there are no row groups to export as trained; "
            "give serving tiers and a budget (--tiers, --memory-budget) to serve its rows in them"
        )
    trained_configs = model.model.sparse_arch.embedding_bag_collection.embedding_bag_configs()
    base_shapes = None
    if base_checkpoint:  # checked before any work
        base_shapes = read_meta(resolve_checkpoint(base_checkpoint))["tables"]
        # The uncompressed model holds this model's tables (pruning removes some, quantizing
        # changes none): an unrelated checkpoint's bytes were reported beside it as its base.
        wrong = [
            f"{c.name}: {list(base_shapes[c.name]) if c.name in base_shapes else 'absent'} there, "
            f"{[c.num_embeddings, c.embedding_dim]} here"
            for c in trained_configs
            if c.name not in base_shapes or list(base_shapes[c.name]) != [c.num_embeddings, c.embedding_dim]
        ]
        if wrong:
            raise CheckpointError(
                f"--base-checkpoint {base_checkpoint} is not this model's uncompressed base ({'; '.join(wrong[:3])})"
            )
    if data_source:
        qcfg.dataset = dataclasses.replace(qcfg.dataset, data=data_source)
    data = open_dataset(qcfg.dataset, qcfg.train.seed)
    if data_source:
        # Other data would give ids other rows without an error: its vocabulary must at least
        # size every table as the model's.
        want = {f: c.num_embeddings for c in trained_configs for f in c.feature_names}
        have = dict(zip(data.full_schema.sparse_names, data.full_schema.num_embeddings))
        wrong = [
            f"field {f}: {have.get(f, 'no')} rows, the model's table {n}" for f, n in want.items() if have.get(f) != n
        ]
        if wrong:
            raise DataError(f"--data {data_source}: not the data this model was trained on ({'; '.join(wrong[:3])})")
    if qcfg.model.kept_fields:
        data = data.with_fields(list(qcfg.model.kept_fields))

    def dev_logits(forward):
        with torch.no_grad():
            return [forward(b) for b in data.batches("dev", qcfg.train.eval_batch_size)]

    def largest_difference(want, got) -> float:
        return max((w - g).abs().max().item() for w, g in zip(want, got)) if want else 0.0

    # Each dev batch's real samples (not padding) and their labels, read once for every AUC below.
    dev_real, real_labels = [], []
    for b in data.batches("dev", qcfg.train.eval_batch_size):
        dev_real.append(b.sample_weights > 0)
        real_labels.append(b.labels[dev_real[-1]])
    dev_labels = torch.cat(real_labels)

    def dev_auc(logits) -> float:
        return binary_metrics(torch.cat([x[r] for x, r in zip(logits, dev_real)]), dev_labels)["auc"]

    regrouped: Dict[str, Any] = {}
    trained_logits = None
    if serving is not None:
        # What the serving tiers cost: the model as trained, before its rows are regrouped.
        trained_logits = dev_logits(lambda b: model(b)[1][1])
        regrouped = regroup_for_serving(model, serving, data, progress=progress)
    arch = model.model.sparse_arch
    served = arch.embedding_bag_collection
    if isinstance(served, MixedPrecisionInferenceEmbeddingBagCollection):
        # 1-bit rows: no training store holds them, so the served module is checked against
        # stock tables holding its rows as the op's torch reference decodes them.
        arch.embedding_bag_collection = _decoded_twin(served)
    want = dev_logits(lambda b: model(b)[1][1])
    arch.embedding_bag_collection = served
    exported = to_inference(model)
    diff = largest_difference(want, dev_logits(lambda b: exported(b)[1][1]))
    ebc = exported.model.sparse_arch.embedding_bag_collection
    configs = ebc.embedding_bag_configs()
    record: Dict[str, Any] = {
        "checkpoint": str(checkpoint),
        "inference_bytes": ebc.memory_bytes(),
        **ebc.group_rows(),
        "fp32_bytes": sum(c.num_embeddings * c.embedding_dim * 4 for c in configs),
        "torchrec_int8_bytes": torchrec_int8_bytes((c.num_embeddings, c.embedding_dim) for c in configs),
        "max_abs_logit_diff_dev": diff,
        "dev_auc": dev_auc(want),
        **regrouped,
    }
    if trained_logits is not None:
        # max_abs_logit_diff_dev checks the export against the model it serves (here the
        # regrouped one, so it reads 0 however coarse the tiers): these say what the tiers cost.
        record["dev_auc_trained"] = dev_auc(trained_logits)
        record["max_abs_logit_diff_dev_to_trained"] = largest_difference(trained_logits, want)
    if base_shapes is not None:
        record["base_fp32_bytes"] = sum(r * d * 4 for r, d in base_shapes.values())
        record["base_torchrec_int8_bytes"] = torchrec_int8_bytes(base_shapes.values())
    # Written beside `out` and moved in once all are written: an export that fails part way
    # leaves an earlier export in `out` whole (and no folder where there was none).
    with staged_files(out, stale=(VOCAB_FILE,)) as staging:
        torch.save(exported, staging / "model.pt")
        torch.jit.script(ebc).save(str(staging / "embedding_collection.pt"))
        (staging / "export.json").write_text(json.dumps(record, indent=2))
        serving = serving_model(exported, data.schema.num_dense)

        def served(b):  # the scripted model on the batch's tensors, as serve.py calls it
            return serving(b.dense_features, b.sparse_features.values(), b.sparse_features.lengths())

        checks = {
            "max_abs_logit_diff_dev": largest_difference(want, dev_logits(served)),
            "rows_int1": record.get("rows_int1", 0),  # with `one_bit_layout`: what serve.py checks the library by
            "rows_int4s": record.get("rows_int4s", 0),  # with `served_groups`: likewise
            "rows_int2s": record.get("rows_int2s", 0),
        }
        write_serving_files(serving, data, qcfg.dataset, staging, checks)
    return record


def _decoded_twin(served: MixedPrecisionInferenceEmbeddingBagCollection) -> EmbeddingBagCollection:
    """A stock `EmbeddingBagCollection` of the served module's tables whose rows are the served
    rows as `mixed_lookup_ranked_reference` (torch and FBGEMM, not our op) reads them."""
    n = served.num_rows
    keys = torch.arange(n)
    rows = mixed_lookup_ranked_reference(
        served.weights, served._offsets, served.blocks, served.code_groups, served.table_base, served.table_fallback,
        torch.tensor([0]), torch.tensor([n]), keys, torch.ones(n, dtype=torch.int64), None, served.dim, n, "none",
        served.row_alignment, ["rows"],
    )  # fmt: skip
    twin = EmbeddingBagCollection(tables=served.embedding_bag_configs(), device=torch.device("cpu"))
    with torch.no_grad():
        for i, c in enumerate(served.embedding_bag_configs()):
            lo, hi = int(served.table_base[i]), int(served.table_base[i + 1])
            twin.embedding_bags[c.name].weight.copy_(rows[lo:hi])
    return twin


def write_serving_files(
    scripted: torch.jit.ScriptModule,
    data,
    data_config: DataConfig,
    out: Path,
    checks: Optional[Dict[str, Any]] = None,
) -> None:
    """Write what serving needs beside the model files: serving_model.pt, serving.json,
    vocab.json (vocabulary encoding), serve.py and README.md.

    Args:
        scripted: the model as `shark_torchrec.models.serving.serving_model` scripts it.
        data: the model's `Dataset` as training opened it (a pruned model's view of its kept
            fields included): its layout, encoder and full field list describe raw lines.
        data_config: the data settings it was opened with (recorded: source, min_count).
        out: an existing folder holding no vocabulary file (`export_checkpoint` gives its
            staging folder, and removes an earlier export's vocabulary when this writes none).
        checks: figures recorded in serving.json (e.g. the largest logit difference on dev).
    """
    from shark_torchrec import serve as recipe

    scripted.save(str(out / SERVING_MODEL))
    # The scripted lookup calls our C++ op: the library ships beside the model.
    shutil.copyfile(kernels.load(), out / KERNELS_FILE)
    fields = list(scripted.feature_names)
    all_fields = list(data.full_schema.sparse_names)
    unknown = [f for f in fields if f not in all_fields]
    if unknown:
        raise DataError(
            f"export: model field(s) {', '.join(unknown)} are not fields of the data {data.full_schema.sparse_names}"
        )
    manifest: Dict[str, Any] = {
        "format": recipe.FORMAT,
        "version": recipe.VERSION,
        "one_bit_layout": ONE_BIT_LAYOUT,  # the library's, shipped beside
        "model": SERVING_MODEL,
        "interface": (
            "forward(dense [B, Nd] float32, values [nnz] int64, lengths [F * B] int) -> logits [B]; "
            "bag f * B + b is field f of sample b"
        ),
        "kernels": KERNELS_FILE,
        "torch": torch.__version__,
        "kernels_built_for": kernels.built_for(),  # torch version, CPU architecture, instruction sets
        "fields": fields,
        "dense": list(data.schema.dense_names),
        "field_rows": dict(zip(fields, scripted.lookup.feature_rows.tolist())),
        "data": data_config.data,
        "parsing": data.layout.describe() if data.layout is not None else None,
        "encoding": None,
    }
    vocab_path = out / VOCAB_FILE
    if data.layout is not None:
        encoding = data.encoder.describe(all_fields)
        if encoding["kind"] == "vocab":
            values = encoding.pop("values")
            vocab_path.write_text(json.dumps({f: values[f] for f in fields}))
            encoding.update(file=VOCAB_FILE, min_count=data_config.min_count)
        manifest["encoding"] = encoding
    manifest.update(checks or {})
    (out / SERVING_MANIFEST).write_text(json.dumps(manifest, indent=2))
    (out / RECIPE_FILE).write_text(Path(recipe.__file__).read_text())
    (out / "README.md").write_text(_serving_readme(manifest))


def _serving_readme(manifest: Dict[str, Any]) -> str:
    fields = ", ".join(manifest["fields"])
    dense = ", ".join(manifest["dense"]) or "none"
    if manifest["parsing"] is None:
        lines = (
            "This model was trained on synthetic data: there is no raw-line layout, so call it with\n"
            "encoded tensors (row ids of each field; serving.json's field_rows has the table sizes).\n"
        )
    else:
        p, e = manifest["parsing"], manifest["encoding"]
        how = (
            "vocabulary (vocab.json; row 0 for values not in it)"
            if e["kind"] == "vocab"
            else f"hash (crc32 of 'field_index:value' modulo {e['size']})"
        )
        lines = (
            f"Raw lines: {p['num_columns']} columns split by {p['delimiter']!r} "
            f"({'with' if p['header'] else 'without'} a header line in a file, which score_file checks; "
            "score_lines takes data lines only; the label column may be left out),\n"
            f"categorical values encoded by {how}, exactly as training read its files.\n"
        )
    return f"""# Serving export (shark-torchrec)

Load with torch only (no shark_torchrec, no TorchRec, no FBGEMM), the torch version
serving.json names ({manifest["torch"]}):

    python serve.py . LINES_FILE                 # one logit per data line

    import serve                                 # this directory on sys.path
    model = serve.load(".")
    logits = model.score_file("test.csv")        # or model.score_lines([...raw lines...])

Or without serve.py:

    import torch
    torch.ops.load_library("shark_kernels.so")   # registers the lookup's op
    m = torch.jit.load("serving_model.pt")
    logits = m(dense, values, lengths)           # {manifest["interface"]}

Fields (model order): {fields}
Dense features: {dense}
{lines}
Files: serving_model.pt (TorchScript), shark_kernels.so (its lookup op, compiled C++),
serving.json (fields, raw-line layout, encoding),
vocab.json (vocabulary encoding), serve.py (the loader), model.pt and embedding_collection.pt
(the same model for shark_torchrec / TorchRec), export.json (bytes and checks).
"""

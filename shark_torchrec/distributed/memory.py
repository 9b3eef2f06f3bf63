"""Embedding memory of a sharded model, as allocated, summed over ranks."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, Mapping, Tuple

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import BaseEmbeddingConfig

from shark_torchrec.precision.priority import GROUP_NAMES


def table_of_key(key: str, tables: Iterable[str]) -> str | None:
    """The table a state-dict key belongs to (a dotted component equal to its name).

    Args:
        key: a state-dict key (`/` counts as `.`).
        tables: the table names.

    Returns:
        The first component of `key` that is a table name, or None.
    """
    for part in key.replace("/", ".").split("."):
        if part in tables:
            return part
    return None


def _local_bytes(t) -> tuple[int, bool]:
    """(bytes held on this rank, whether the tensor is sharded)."""
    if isinstance(t, ShardedTensor):
        return sum(s.tensor.numel() * s.tensor.element_size() for s in t.local_shards()), True
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size(), False
    return 0, False


def _accumulate(state: Mapping[str, object], tables, out: Dict[str, int], rank: int) -> None:
    for key, value in state.items():
        table = table_of_key(key, tables)
        if table is None:
            continue
        if isinstance(value, Mapping):
            _accumulate({f"{key}.{k}": v for k, v in value.items()}, tables, out, rank)
            continue
        n, sharded = _local_bytes(value)
        # A replicated (data-parallel) tensor is counted once, on rank 0.
        if sharded or rank == 0:
            out[table] += n


def embedding_memory(
    model: torch.nn.Module,
    optimizer,
    configs: Mapping[str, BaseEmbeddingConfig],
) -> Dict[str, object]:
    """Bytes per table and in total: weights (`embedding_bytes`; for mixed-precision tables
    with int8 scales/biases, the row map and alignment padding), optimizer state
    (`optimizer_bytes`), the same tables as fp32 weights (`fp32_embedding_bytes`), and for
    mixed-precision tables the priority scores (`priority_bytes`, training-only state like
    the optimizer's) and rows per group (`rows_fp32`, `rows_fp16`, `rows_int8`, `rows_int4`,
    `rows_int2`).

    Collective in a process group of several ranks: every rank calls it.

    Args:
        model: the (sharded) model.
        optimizer: its optimizer (the state of stock TorchRec tables is counted from it).
        configs: table name -> config, every table of the model.

    Returns:
        The totals over all tables, and `tables`: table -> its own figures (rows per group for
        mixed-precision tables; stock tables report `rows_fp32`).
    """
    from shark_torchrec.distributed.mixed_precision import ShardedMixedPrecisionModule

    rank = dist.get_rank() if dist.is_initialized() else 0
    mixed: Dict[str, Dict[str, int]] = {}
    for m in model.modules():
        if isinstance(m, ShardedMixedPrecisionModule):
            mixed.update(m.precision_memory())
    tables = [t for t in configs if t not in mixed]
    weights: Dict[str, int] = defaultdict(int)
    optim: Dict[str, int] = defaultdict(int)
    if tables:
        _accumulate(model.state_dict(), tables, weights, rank)
        _accumulate(optimizer.state_dict()["state"], tables, optim, rank)
    vec = torch.tensor([[weights[t], optim[t]] for t in tables], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
    per_table: Dict[str, Dict[str, int]] = {
        t: {
            "embedding_bytes": int(vec[i, 0]),
            "optimizer_bytes": int(vec[i, 1]),
            "rows_fp32": configs[t].num_embeddings,
        }
        for i, t in enumerate(tables)
    }
    per_table.update(mixed)
    for t, c in configs.items():
        per_table[t]["fp32_embedding_bytes"] = c.num_embeddings * c.embedding_dim * 4
    keys = (
        "embedding_bytes",
        "optimizer_bytes",
        "fp32_embedding_bytes",
        "priority_bytes",
        *(f"rows_{g}" for g in GROUP_NAMES),
    )
    total = {k: sum(v.get(k, 0) for v in per_table.values()) for k in keys}
    return {**total, "tables": {t: per_table[t] for t in configs}}


# TorchRec's `quantize_embeddings` builds FBGEMM inference tables with FBGEMM's default row
# alignment (16 bytes) on every device; tests check this against a real allocation.
TORCHREC_QUANT_ROW_ALIGNMENT = 16


def torchrec_int8_bytes(shapes: Iterable[Tuple[int, int]]) -> int:
    """Bytes of tables of these (rows, dim) after TorchRec's `quantize_embeddings(dtype=torch.qint8)`:
    per row, the int8 codes plus an fp16 scale and bias, rounded up to the row alignment.

    Args:
        shapes: (rows, dim) of each table.

    Returns:
        The bytes, summed over the tables.
    """
    from fbgemm_gpu.split_embedding_configs import SparseType
    from fbgemm_gpu.split_table_batched_embeddings_ops_inference import rounded_row_size_in_bytes

    return sum(
        rows * rounded_row_size_in_bytes(dim, SparseType.INT8, TORCHREC_QUANT_ROW_ALIGNMENT) for rows, dim in shapes
    )

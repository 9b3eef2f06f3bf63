"""Embedding memory of a sharded model, as allocated, summed over ranks."""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, Iterable, Mapping

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import ShardedTensor
from torchrec.modules.embedding_configs import BaseEmbeddingConfig


def table_of_key(key: str, tables: Iterable[str]) -> str | None:
    """The table a state-dict key belongs to (a dotted component equal to its name)."""
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
    """Bytes per table and in total: weights (`embedding_bytes`), optimizer state
    (`optimizer_bytes`), and the same tables as fp32 weights (`fp32_embedding_bytes`)."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    tables = list(configs)
    weights: Dict[str, int] = defaultdict(int)
    optim: Dict[str, int] = defaultdict(int)
    _accumulate(model.state_dict(), tables, weights, rank)
    _accumulate(optimizer.state_dict()["state"], tables, optim, rank)
    vec = torch.tensor([[weights[t], optim[t]] for t in tables], dtype=torch.float64)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(vec)
    per_table = {
        t: {
            "embedding_bytes": int(vec[i, 0]),
            "optimizer_bytes": int(vec[i, 1]),
            "fp32_embedding_bytes": configs[t].num_embeddings * configs[t].embedding_dim * 4,
        }
        for i, t in enumerate(tables)
    }
    total = {k: sum(v[k] for v in per_table.values()) for k in ("embedding_bytes", "optimizer_bytes", "fp32_embedding_bytes")}
    return {**total, "tables": per_table}

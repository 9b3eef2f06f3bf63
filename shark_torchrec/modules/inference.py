"""`MixedPrecisionInferenceEmbeddingBagCollection`: the serving twin of our mixed-precision
collection.

It keeps what a lookup needs and nothing a trainer needs: one uint8 buffer with three FBGEMM
inference table-batched-embedding tables (fp32 rows, fp16 rows, int8 rows with their fp16 scale
and bias), and the row map (an int8 group and an int32 slot per row). No scores, no optimizer
state, no fp32 copy. A lookup is one call to FBGEMM's mixed-precision inference TBE
(`int_nbit_split_embedding_codegen_lookup_function`, the kernel behind TorchRec's quantized
collections), which runs the three precisions in one module on CPU and GPU; pooling is done here.

It stands where TorchRec's quantized `EmbeddingBagCollection` would: `forward(KJT) -> KeyedTensor`
and `embedding_bag_configs()`, so `DLRM(embedding_bag_collection=...)` takes it.
"""

from __future__ import annotations

from typing import Dict, List

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from shark_torchrec.modules.row_groups import group_lookup
from shark_torchrec.precision.priority import ROW_MAP_BYTES

_TYPES = (SparseType.FP32, SparseType.FP16, SparseType.INT8)


class MixedPrecisionInferenceEmbeddingBagCollection(nn.Module):
    def __init__(
        self,
        tables: List[EmbeddingBagConfig],
        weights: torch.Tensor,
        row_group: torch.Tensor,
        row_slot: torch.Tensor,
        group_offsets: List[int],
        row_alignment: int = 1,
    ) -> None:
        super().__init__()
        dims = {t.embedding_dim for t in tables}
        poolings = {t.pooling for t in tables}
        if len(dims) != 1 or len(poolings) != 1 or poolings.pop() not in (PoolingType.SUM, PoolingType.MEAN):
            raise NotImplementedError("one module serves tables of one dim and one pooling (sum or mean)")
        self._configs = list(tables)
        self.dim: int = dims.pop()
        self.mean_pooling: bool = tables[0].pooling == PoolingType.MEAN
        self.row_alignment: int = row_alignment
        self.feature_names: List[str] = [f for t in tables for f in t.feature_names]
        base, feature_base, feature_rows = [0], [], []
        for t in tables:
            feature_base += [base[-1]] * len(t.feature_names)
            feature_rows += [t.num_embeddings] * len(t.feature_names)
            base.append(base[-1] + t.num_embeddings)
        if row_group.numel() != base[-1]:
            raise ValueError(f"row map has {row_group.numel()} rows, the tables {base[-1]}")
        self.register_buffer("weights", weights)
        self.register_buffer("row_group", row_group.to(torch.int8))
        self.register_buffer("row_slot", row_slot.to(torch.int32))
        self.register_buffer("feature_base", torch.tensor(feature_base, dtype=torch.int64))
        self.register_buffer("feature_rows", torch.tensor(feature_rows, dtype=torch.int64))
        D = self.dim
        self.register_buffer("_D_offsets", torch.arange(0, 3 * D + 1, D, dtype=torch.int32))
        self.register_buffer("_tys", torch.tensor([t.as_int() for t in _TYPES], dtype=torch.uint8))
        self.register_buffer("_placements", torch.full((3,), EmbeddingLocation.HOST.value, dtype=torch.int32))
        self.register_buffer("_offsets", torch.tensor(list(group_offsets), dtype=torch.int64))

    @classmethod
    def from_trained(cls, collection) -> "MixedPrecisionInferenceEmbeddingBagCollection":
        """From a materialized (unsharded) `MixedPrecisionEmbeddingBagCollection`: the same
        bytes of every row, the same groups; the training state is left behind."""
        stores = collection.stores
        if len(stores) != 1:
            raise NotImplementedError("export needs the collection's tables in one store (one dim, one pooling)")
        s = stores[0]
        return cls(
            collection.embedding_bag_configs(), s.weights.clone(), s.row_group.clone(), s.row_slot.clone(),
            list(s._offsets), s.row_alignment,
        )

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return False

    def memory_bytes(self) -> int:
        """Weights (with int8 scales and biases) plus the row map."""
        return int(self.weights.numel() + self.row_group.numel() * ROW_MAP_BYTES)

    def group_rows(self) -> Dict[str, int]:
        counts = torch.bincount(self.row_group.long(), minlength=3).tolist()
        return {"rows_fp32": counts[0], "rows_fp16": counts[1], "rows_int8": counts[2]}

    def _check_ids(self, values: torch.Tensor, per_feature: torch.Tensor) -> None:
        limit = torch.repeat_interleave(self.feature_rows, per_feature, output_size=values.numel())
        bad = (values < 0) | (values >= limit)
        if bool(bad.any()):
            at = int(torch.nonzero(bad)[0])
            f = int(torch.searchsorted(torch.cumsum(per_feature, 0), at, right=True))
            raise ValueError(
                f"feature {self.feature_names[f]}: id {int(values[at])} outside its table of {int(self.feature_rows[f])} rows"
            )

    def _one_id_per_bag(self, lengths: torch.Tensor, nnz: int, bags: int) -> bool:
        """Eager only: the fast path's data-dependent test (exported programs take the
        general path)."""
        return not torch.compiler.is_exporting() and nnz == bags and bool((lengths == 1).all())

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        # No data-dependent shapes below, and data-dependent branches only in eager mode, so
        # the module scripts (torch.jit.script) and exports (torch.export) as well as it runs.
        keys = features.keys()
        kjt = features
        if keys != self.feature_names:
            kjt = features.permute([keys.index(n) for n in self.feature_names])
        F, D, B = len(self.feature_names), self.dim, kjt.stride()
        values = kjt.values().long()
        lengths = kjt.lengths()
        nnz = values.numel()
        per_feature = lengths.view(F, B).sum(1)
        base = torch.repeat_interleave(self.feature_base, per_feature, output_size=nnz)
        if torch.jit.is_scripting():
            self._check_ids(values, per_feature)
        elif torch.compiler.is_exporting():
            limit = torch.repeat_interleave(self.feature_rows, per_feature, output_size=nnz)
            torch._assert_async(~((values < 0) | (values >= limit)).any(), "an id is outside its table")
        else:
            self._check_ids(values, per_feature)
        rows_of = base + values
        g = self.row_group[rows_of]
        slot = self.row_slot[rows_of]
        # Ids grouped by precision, each group in input order, by counting (no sort): dest[i]
        # is where id i goes. The TBE then sees 3 sequence features (one per group table) of
        # nnz + 1 bags, group k's ids filling its first per_group[k] bags, one id each.
        in0, in1 = g == 0, g == 1
        c0, c1 = torch.cumsum(in0, 0), torch.cumsum(in1, 0)
        n0 = c0[-1:] if nnz else torch.zeros(1, dtype=torch.int64, device=g.device)
        n1 = c1[-1:] if nnz else torch.zeros(1, dtype=torch.int64, device=g.device)
        position = torch.arange(1, nnz + 1, device=g.device)
        dest = torch.where(in0, c0, torch.where(in1, n0 + c1, n0 + n1 + position - c0 - c1)) - 1
        grouped = torch.empty_like(slot).index_put_((dest,), slot)
        per_group = torch.cat([n0, n1, nnz - n0 - n1]).to(torch.int32)
        ends = torch.arange(1, nnz + 2, dtype=torch.int32, device=g.device)[None, :].clamp(max=per_group[:, None]) + (
            torch.cumsum(per_group, 0, dtype=torch.int32) - per_group
        )[:, None]
        offsets = torch.cat([torch.zeros(1, dtype=torch.int32, device=g.device), ends.flatten()])
        rows = self._lookup(grouped, offsets)
        single = False
        if not torch.jit.is_scripting():
            single = self._one_id_per_bag(lengths, nnz, F * B)
        if single:
            # One id per bag (DLRM's usual input): pooling is putting each row where its
            # (sample, feature) goes in the [B, F * D] output; one gather does it.
            out = rows.index_select(0, dest.view(F, B).t().reshape(-1)).view(B, F * D)
            return KeyedTensor(keys=self.feature_names, length_per_key=[D] * F, values=out)
        seg = torch.repeat_interleave(torch.arange(F * B, device=values.device), lengths, output_size=nnz)
        pooled = torch.zeros(F * B, D, dtype=rows.dtype, device=rows.device).index_add_(0, seg, rows.index_select(0, dest))
        if self.mean_pooling:
            pooled = pooled / lengths.clamp_min(1).to(pooled.dtype)[:, None]
        out = pooled.view(F, B, D).transpose(0, 1).reshape(B, F * D)
        return KeyedTensor(keys=self.feature_names, length_per_key=[D] * F, values=out)

    def _lookup(self, indices: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return group_lookup(
            self.weights, self._offsets, self._tys, self._D_offsets, self._placements,
            self.dim, indices, offsets, self.row_alignment,
        )

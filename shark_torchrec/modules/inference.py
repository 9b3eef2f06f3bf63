"""`MixedPrecisionInferenceEmbeddingBagCollection`: the serving twin of our mixed-precision
collection.

It keeps what a lookup needs and nothing a trainer needs: one uint8 buffer with five group
tables in FBGEMM's inference table-batched-embedding layout (fp32, fp16, int8, int4 and int2
rows, integer rows with their fp16 scale and bias; a sixth of 1-bit rows, served only, when the
export put rows there), each holding its rows in key order, and the
ranked row map (`shark_torchrec.kernels.ranked_map`: a row's group in bit planes and its slot
as its rank among its group's rows, about half a byte a row where the training store's row
map takes four; dropped rows read their table's fallback row). No scores, no optimizer state,
no fp32 copy. A lookup is one call of our fused op `torch.ops.shark.mixed_lookup_ranked`
(`shark_torchrec.kernels`): ids, map, groups, dequantization and pooling in one pass per bag,
parallel over bags. Its reference, torch around FBGEMM's INT-N inference TBE
(`shark_torchrec.kernels.reference`), agrees with it bit for bit and serves in eager mode
where the op has no kernel (off CPU; untested here, without a GPU).

It stands where TorchRec's quantized `EmbeddingBagCollection` would: `forward(KJT) -> KeyedTensor`
and `embedding_bag_configs()`, so `DLRM(embedding_bag_collection=...)` takes it. Its lookup and
pooling live in `MixedPrecisionPooledLookup`, which takes plain tensors (ids and bag lengths) and
so scripts into an artifact that loads without TorchRec (the serving export).
"""

from __future__ import annotations

from typing import Dict, List

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

import shark_torchrec.kernels  # noqa: F401  (loads torch.ops.shark)
from shark_torchrec.kernels.ranked_map import BLOCK_ROWS, RankedLayout, ranked_from_row_map, ranked_group_rows
from shark_torchrec.kernels.reference import mixed_lookup_ranked_reference
from shark_torchrec.precision.priority import GROUP_NAMES, INT1, SERVED_GROUP_NAMES, row_bytes

# The layout of 1-bit rows this module reads: the kernel library's (`torch.ops.shark.one_bit_layout`).
ONE_BIT_LAYOUT = int(torch.ops.shark.one_bit_layout())


class MixedPrecisionPooledLookup(nn.Module):
    """The lookup and pooling of the inference collection on plain tensors: ids and bag
    lengths in, pooled rows out. No TorchRec type appears in its methods, so a scripted copy
    loads with torch alone (plus our kernel library, `torch.ops.load_library`); the serving export
    (`shark_torchrec.models.serving`) holds one.

    Args:
        feature_names: the features, in the order of the output's blocks of `dim` columns.
        feature_base: per feature, the first row of its table in the row map.
        feature_rows: per feature, the rows of its table.
        dim: embedding dim of every table.
        mean_pooling: bags are averaged (else summed).
        weights: FBGEMM's uint8 buffer of the group tables (fp32 rows and the fallback rows of
            dropped rows, fp16, int8, int4, int2), each table's rows in key order.
        group_offsets: byte offset of each group table in `weights`.
        blocks, code_groups, table_base, table_fallback: the ranked row map
            (`shark_torchrec.kernels.ranked_map.RankedLayout`).
        num_rows: the rows of all tables (keys 0 .. num_rows - 1).
        row_alignment: FBGEMM's row alignment of the buffer.
    """

    def __init__(
        self,
        feature_names: List[str],
        feature_base: List[int],
        feature_rows: List[int],
        dim: int,
        mean_pooling: bool,
        weights: torch.Tensor,
        group_offsets: List[int],
        blocks: torch.Tensor,
        code_groups: torch.Tensor,
        table_base: torch.Tensor,
        table_fallback: torch.Tensor,
        num_rows: int,
        row_alignment: int = 1,
    ) -> None:
        super().__init__()
        if not (len(feature_names) == len(feature_base) == len(feature_rows)):
            raise ValueError(
                f"{len(feature_names)} features, {len(feature_base)} table bases, {len(feature_rows)} table sizes"
            )
        self.dim: int = dim
        self.mean_pooling: bool = mean_pooling
        self.row_alignment: int = row_alignment
        self.num_rows: int = num_rows
        # 3: a 1-bit row is one magnitude code byte and a sign bit a value (2, before 2026-12-02:
        # an fp16 magnitude; 1, before 2026-11-30: an fp16 scale and bias, then the bits):
        # `__setstate__` refuses the older layouts.
        self.one_bit_layout: int = ONE_BIT_LAYOUT
        self.feature_names: List[str] = list(feature_names)
        self.register_buffer("weights", weights)
        self.register_buffer("blocks", blocks.to(torch.int32))
        self.register_buffer("code_groups", code_groups.to(torch.int32))
        self.register_buffer("table_base", table_base.to(torch.int64))
        self.register_buffer("table_fallback", table_fallback.to(torch.int64))
        self.register_buffer("feature_base", torch.tensor(feature_base, dtype=torch.int64))
        self.register_buffer("feature_rows", torch.tensor(feature_rows, dtype=torch.int64))
        self.register_buffer("_offsets", torch.tensor(list(group_offsets), dtype=torch.int64))

    def __setstate__(self, state: Dict) -> None:
        # A module pickled before the ranked row map (b206c29) holds the int32 row map and its
        # rows in the store's slot order: refuse it by name rather than fail on a missing buffer.
        if "row_map" in state.get("_buffers", {}) and "blocks" not in state.get("_buffers", {}):
            raise RuntimeError(
                "this inference module was saved before the ranked row map (shark-torchrec b206c29): "
                "export it again from its checkpoint (`shark export CKPT --out DIR`)"
            )
        # 1-bit rows pickled in an earlier layout (a scale and bias, or an fp16 magnitude, a row)
        # would be read wrongly.
        code_groups = state.get("_buffers", {}).get("code_groups")
        if (
            state.get("one_bit_layout") != ONE_BIT_LAYOUT
            and code_groups is not None
            and bool((code_groups == INT1).any())
        ):
            raise RuntimeError(
                f"this inference module holds 1-bit rows in the earlier layout {state.get('one_bit_layout', 1)} "
                f"(1: an fp16 scale and bias a row; 2: an fp16 magnitude; this library reads {ONE_BIT_LAYOUT}: "
                "a magnitude byte): "
                "export it again from its checkpoint (`shark export CKPT --out DIR --tiers ... int1`)"
            )
        super().__setstate__(state)

    def plain_lookup(self) -> "MixedPrecisionPooledLookup":
        """A `MixedPrecisionPooledLookup` over the same tensors (shared, not copied): this
        module without whatever a subclass adds (the collection's KJT interface).

        Returns:
            The plain lookup.
        """
        return MixedPrecisionPooledLookup(
            self.feature_names,
            self.feature_base.tolist(),
            self.feature_rows.tolist(),
            self.dim,
            self.mean_pooling,
            self.weights,
            self._offsets.tolist(),
            self.blocks,
            self.code_groups,
            self.table_base,
            self.table_fallback,
            self.num_rows,
            self.row_alignment,
        )

    def forward(self, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Pooled rows of bags laid out feature-major, as a KJT lays them out.

        Args:
            values: [nnz] int ids, each within its feature's table.
            lengths: [F * B] ids per bag; bag f * B + b is feature f of sample b.

        Returns:
            [B, F * dim] float32: sample b's pooled rows, feature by feature.
        """
        F = len(self.feature_names)
        if lengths.dim() != 1 or lengths.numel() % F != 0:
            raise ValueError(f"lengths of shape {list(lengths.shape)}: expected [{F} features * batch]")
        return self.pooled(values, lengths, lengths.numel() // F)

    def memory_bytes(self) -> int:
        """Weights (with the integer rows' scales and biases) plus the ranked row map (block
        records and each table's start and fallback slot).

        Returns:
            The bytes.
        """
        return int(
            self.weights.numel()
            + self.blocks.numel() * 4
            + self.table_base.numel() * 8
            + self.table_fallback.numel() * 8
        )

    def group_rows(self) -> Dict[str, int]:
        """Rows per group: rows_fp32, rows_fp16, rows_int8, rows_int4, rows_int2, rows_dropped,
        then rows_int1, rows_int4s and rows_int2s for the served-only tiers the module has rows
        in (`shark export --tiers`).

        Returns:
            "rows_<group>" -> the rows in that group.
        """
        counts = ranked_group_rows(self.blocks, self.code_groups, self.num_rows)
        return {
            f"rows_{name}": counts[g] for g, name in enumerate(SERVED_GROUP_NAMES) if g < len(GROUP_NAMES) or counts[g]
        }

    def pooled(self, values: torch.Tensor, lengths: torch.Tensor, B: int) -> torch.Tensor:
        """`forward` with the batch size given: [B, F * dim] from feature-major bags, by our
        fused C++ op (`torch.ops.shark.mixed_lookup_ranked`: ranked map, groups,
        dequantization and pooling in one pass; its reference, torch around FBGEMM's INT-N op,
        is `shark_torchrec.kernels.reference`). It scripts, and `torch.export` sees it through
        its registered fake.

        Args:
            values: [nnz] int ids, each within its feature's table.
            lengths: [F * B] ids per bag; bag f * B + b is feature f of sample b.
            B: the batch size.

        Returns:
            [B, F * dim] float32: sample b's pooled rows, feature by feature.
        """
        if not torch.jit.is_scripting() and not self.weights.is_cpu:
            # The op has a CPU kernel only; elsewhere its reference (FBGEMM's INT-N op) serves.
            return mixed_lookup_ranked_reference(
                self.weights,
                self._offsets,
                self.blocks,
                self.code_groups,
                self.table_base,
                self.table_fallback,
                self.feature_base,
                self.feature_rows,
                values,
                lengths,
                None,
                self.dim,
                B,
                "mean" if self.mean_pooling else "sum",
                self.row_alignment,
                self.feature_names,
            )
        return torch.ops.shark.mixed_lookup_ranked(
            self.weights,
            self._offsets,
            self.blocks,
            self.code_groups,
            self.table_base,
            self.table_fallback,
            self.feature_base,
            self.feature_rows,
            values,
            lengths,
            None,
            self.dim,
            B,
            1 if self.mean_pooling else 0,
            self.row_alignment,
            "\n".join(self.feature_names),
        )


class MixedPrecisionInferenceEmbeddingBagCollection(MixedPrecisionPooledLookup):
    """The serving twin of `MixedPrecisionEmbeddingBagCollection` (see the module doc): TorchRec's
    collection interface (`forward(KJT) -> KeyedTensor`, `embedding_bag_configs()`) over
    `MixedPrecisionPooledLookup`. Usually built with `from_trained`.

    Args:
        tables: the tables' configs, one dim and one pooling (sum or mean) for all.
        layout: the tables' rows back to back in `tables`' order, in group tables and the
            ranked row map (`RankedLayout`; `from_trained` makes it from a training store).
        row_alignment: FBGEMM's row alignment of the buffer.

    Raises:
        NotImplementedError: tables of several dims or poolings, or another pooling.
        ValueError: the map does not cover the tables' rows.
    """

    def __init__(self, tables: List[EmbeddingBagConfig], layout: RankedLayout, row_alignment: int = 1) -> None:
        dims = {t.embedding_dim for t in tables}
        poolings = {t.pooling for t in tables}
        if len(dims) != 1 or len(poolings) != 1 or poolings.pop() not in (PoolingType.SUM, PoolingType.MEAN):
            raise NotImplementedError("one module serves tables of one dim and one pooling (sum or mean)")
        base, feature_base, feature_rows = [0], [], []
        for t in tables:
            feature_base += [base[-1]] * len(t.feature_names)
            feature_rows += [t.num_embeddings] * len(t.feature_names)
            base.append(base[-1] + t.num_embeddings)
        if layout.blocks.shape[0] != (base[-1] + BLOCK_ROWS - 1) // BLOCK_ROWS or layout.table_base.tolist() != base:
            raise ValueError(
                f"the ranked map covers {layout.blocks.shape[0]} blocks of {BLOCK_ROWS} rows and tables at "
                f"{layout.table_base.tolist()}; the tables have {base[-1]} rows at {base}"
            )
        super().__init__(
            [f for t in tables for f in t.feature_names],
            feature_base,
            feature_rows,
            dims.pop(),
            tables[0].pooling == PoolingType.MEAN,
            layout.weights,
            layout.group_offsets.tolist(),
            layout.blocks,
            layout.code_groups,
            layout.table_base,
            layout.table_fallback,
            base[-1],
            row_alignment,
        )
        self._configs = list(tables)

    @classmethod
    def from_trained(cls, collection) -> "MixedPrecisionInferenceEmbeddingBagCollection":
        """From a materialized (unsharded) `MixedPrecisionEmbeddingBagCollection`: the same
        bytes of every row, the same groups, each group's rows put in key order under the
        ranked map; the training state is left behind.

        Args:
            collection: the trained collection, its tables in one store.

        Returns:
            The inference collection, over the collection's tables' configs.

        Raises:
            TypeError: `collection` is not an unsharded `MixedPrecisionEmbeddingBagCollection`
                (a sharded one, a sequence collection).
            RuntimeError: it was not materialized (it holds no rows).
            NotImplementedError: its tables are in several stores (several dims or poolings).
        """
        from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection

        if not isinstance(collection, MixedPrecisionEmbeddingBagCollection):
            why = "load the trained state into an unsharded, materialized collection first"
            why += " (a sharded model's checkpoint loads into one; sequence collections are not served)"
            raise TypeError(
                "from_trained takes an unsharded MixedPrecisionEmbeddingBagCollection, "
                f"not {type(collection).__name__}: {why}"
            )
        stores = collection.stores
        if not stores:
            raise RuntimeError(
                "from_trained: the collection holds no rows: call materialize(device) and load the trained state first"
            )
        if len(stores) != 1:
            raise NotImplementedError(
                "from_trained needs the collection's tables in one store (one dim, one pooling), "
                f"got {len(stores)} stores"
            )
        s = stores[0]
        weights, offsets, _, ends, shift = s.op_layout
        row_map = s.map_values(torch.arange(s.num_rows))  # a one-tier store keeps none (the identity)
        layout = ranked_from_row_map(
            weights,
            offsets.tolist(),
            list(s.capacity),
            [row_bytes(s.dim, g, s.row_alignment) for g in range(len(GROUP_NAMES) - 1)],
            row_map,
            ends,
            shift,
            s.table_base,
        )
        return cls(collection.embedding_bag_configs(), layout, s.row_alignment)

    def embedding_bag_configs(self) -> List[EmbeddingBagConfig]:
        return self._configs

    def is_weighted(self) -> bool:
        return False

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:  # type: ignore[override]
        keys = features.keys()
        kjt = features
        if keys != self.feature_names:
            kjt = features.permute([keys.index(n) for n in self.feature_names])
        out = self.pooled(kjt.values(), kjt.lengths(), kjt.stride())
        return KeyedTensor(keys=self.feature_names, length_per_key=[self.dim] * len(self.feature_names), values=out)

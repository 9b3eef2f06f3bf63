"""The references of `torch.ops.shark.mixed_lookup` and `mixed_lookup_ranked`: torch code
around FBGEMM's INT-N inference op (`int_nbit_split_embedding_codegen_lookup_function`), which
reads fp32, fp16, int8, int4 and int2 rows in one call (the ranked map decoded in torch by
`decode_ranked_map`). It shares no code with the C++ kernel; tests hold the two equal, bit for
bit, on random groups, duplicate, empty, weighted and multi-id bags.
"""

from __future__ import annotations

from typing import List, Optional

import fbgemm_gpu  # noqa: F401  (registers torch.ops.fbgemm)
import torch
from fbgemm_gpu.split_embedding_configs import SparseType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation, PoolingMode

from shark_torchrec.kernels.ranked_map import decode_ranked_map

ONE_BIT_GROUP = 6  # served 1-bit rows (`shark_torchrec.precision.priority.INT1`): read in torch
# Served symmetric int4 and int2 rows (`shark_torchrec.precision.priority.INT4S`, `INT2S`): read
# in torch. Group id -> bits.
SYMMETRIC_GROUP_BITS = {7: 4, 8: 2}
GROUP_TYPES = (SparseType.FP32, SparseType.FP16, SparseType.INT8, SparseType.INT4, SparseType.INT2)

# FBGEMM's codes, written as literals in `group_lookup` (TorchScript reads no Python globals).
assert int(PoolingMode.NONE) == 2 and SparseType.FP32.as_int() == 0


def group_lookup(
    weights: torch.Tensor,
    group_offsets: torch.Tensor,
    group_types: torch.Tensor,
    D_offsets: torch.Tensor,
    placements: torch.Tensor,
    dim: int,
    indices: torch.Tensor,
    offsets: torch.Tensor,
    row_alignment: int,
) -> torch.Tensor:
    """One fp32 row per index from the group tables (fp32, fp16, int8, int4, int2; as many as
    `group_types` lists) of one uint8 buffer, through FBGEMM's mixed-precision inference TBE:
    the tables are its sequence features, `offsets` its bags. TorchScript compiles it.

    Args:
        weights: the uint8 buffer.
        group_offsets: int64 byte offset of each group table.
        group_types: uint8 FBGEMM `SparseType` of each group table.
        D_offsets: int32 [groups + 1], 0, dim, 2 * dim, ...
        placements: int32 `EmbeddingLocation.HOST` per group table.
        dim: embedding dim.
        indices: slots, grouped: group k's are bags of one in feature k.
        offsets: int32 or int64 bag offsets over the group features.
        row_alignment: FBGEMM's row alignment of the buffer.

    Returns:
        [len(indices), dim] float32, one row per index.
    """
    return torch.ops.fbgemm.int_nbit_split_embedding_codegen_lookup_function(
        dev_weights=weights,
        uvm_weights=torch.empty(0, dtype=torch.uint8),
        weights_placements=placements,
        weights_offsets=group_offsets,
        weights_tys=group_types,
        D_offsets=D_offsets,
        total_D=(D_offsets.numel() - 1) * dim,
        max_int2_D=dim,
        max_int4_D=dim,
        max_int8_D=dim,
        max_float16_D=dim,
        max_float32_D=dim,
        indices=indices,
        offsets=offsets,
        pooling_mode=2,  # PoolingMode.NONE
        indice_weights=None,
        output_dtype=0,  # SparseType.FP32
        lxu_cache_weights=torch.empty(0, 0, dtype=torch.uint8),
        lxu_cache_locations=torch.empty(0, dtype=torch.int32),
        row_alignment=row_alignment,
        max_float8_D=0,
        fp8_exponent_bits=-1,
        fp8_exponent_bias=-1,
    )


def mixed_lookup_reference(
    weights: torch.Tensor,
    group_offsets: torch.Tensor,
    row_map: torch.Tensor,
    range_ends: torch.Tensor,
    range_shift: torch.Tensor,
    feature_base: torch.Tensor,
    feature_rows: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    dim: int,
    batch_size: int,
    pooling: str,
    row_alignment: int,
    feature_names: List[str],
) -> torch.Tensor:
    """`shark_torchrec.kernels.mixed_lookup` in torch and FBGEMM: the same arguments, the same
    result, the same error for an id outside its table. It also runs where the op does not
    (FBGEMM's op has CUDA kernels; that path is untested here, on machines without a GPU).

    Args:
        weights, group_offsets, row_map, range_ends, range_shift, feature_base, feature_rows,
            values, lengths, per_sample_weights, dim, batch_size, pooling, row_alignment,
            feature_names: as for `shark_torchrec.kernels.mixed_lookup`.

    Returns:
        [B, F * dim] float32, or [nnz, dim] with pooling "none" (as the op).

    Raises:
        ValueError: an id outside its feature's table (naming the feature and the id).
    """
    keys = _checked_keys(feature_base, feature_rows, values, lengths, feature_names, batch_size)
    m = keys.to(torch.int32) if row_map.numel() == 0 else row_map[keys]  # empty: the identity map
    g = torch.bucketize(m, range_ends, right=True)
    slots = (m - range_shift[g]).long()
    return _read_and_pool(
        weights,
        group_offsets,
        g,
        slots,
        values,
        lengths,
        per_sample_weights,
        dim,
        batch_size,
        pooling,
        row_alignment,
        feature_base.numel(),
    )


def mixed_lookup_ranked_reference(
    weights: torch.Tensor,
    group_offsets: torch.Tensor,
    blocks: torch.Tensor,
    code_groups: torch.Tensor,
    table_base: torch.Tensor,
    table_fallback: torch.Tensor,
    feature_base: torch.Tensor,
    feature_rows: torch.Tensor,
    values: torch.Tensor,
    lengths: torch.Tensor,
    per_sample_weights: Optional[torch.Tensor],
    dim: int,
    batch_size: int,
    pooling: str,
    row_alignment: int,
    feature_names: List[str],
) -> torch.Tensor:
    """`shark_torchrec.kernels.mixed_lookup_ranked` in torch and FBGEMM: the ranked map decoded
    in torch (`decode_ranked_map`), the rows read by FBGEMM's INT-N op.

    Args:
        weights, group_offsets, blocks, code_groups, table_base, table_fallback, feature_base,
            feature_rows, values, lengths, per_sample_weights, dim, batch_size, pooling,
            row_alignment, feature_names: as for `shark_torchrec.kernels.mixed_lookup_ranked`.

    Returns:
        [B, F * dim] float32, or [nnz, dim] with pooling "none" (as the op).

    Raises:
        ValueError: an id outside its feature's table (naming the feature and the id).
        RuntimeError: a key beyond the map's rows (feature tables that do not match the map).
    """
    keys = _checked_keys(feature_base, feature_rows, values, lengths, feature_names, batch_size)
    if keys.numel() and int(keys.max()) >= int(table_base[-1]):
        raise RuntimeError("shark::mixed_lookup_ranked: a row map entry points outside the group tables")
    g, slots = decode_ranked_map(blocks, code_groups, table_base, table_fallback, keys)
    return _read_and_pool(
        weights,
        group_offsets,
        g,
        slots,
        values,
        lengths,
        per_sample_weights,
        dim,
        batch_size,
        pooling,
        row_alignment,
        feature_base.numel(),
    )


def _checked_keys(feature_base, feature_rows, values, lengths, feature_names, batch_size) -> torch.Tensor:
    """Each id's row key (its table's first key plus the id); an id outside its table raises."""
    F = feature_base.numel()
    values = values.long()
    lengths = lengths.long()
    nnz = values.numel()
    per_feature = lengths.view(F, batch_size).sum(1)
    limit = torch.repeat_interleave(feature_rows, per_feature, output_size=nnz)
    bad = (values < 0) | (values >= limit)
    if bool(bad.any()):
        at = int(torch.nonzero(bad)[0])
        f = int(torch.searchsorted(torch.cumsum(per_feature, 0), at, right=True))
        raise ValueError(
            f"feature {feature_names[f]}: id {int(values[at])} outside its table of {int(feature_rows[f])} rows"
        )
    return torch.repeat_interleave(feature_base, per_feature, output_size=nnz) + values


def _read_and_pool(
    weights, group_offsets, g, slots, values, lengths, per_sample_weights, dim, batch_size, pooling, row_alignment, F
) -> torch.Tensor:
    """Each id's row (group g, slot; dropped rows, group 5, read the fp32 table) by FBGEMM's
    INT-N op (1-bit rows, group 6, and symmetric int4 and int2 rows, groups 7 and 8, which FBGEMM
    does not read, in torch), weighted and pooled per bag."""
    B, D = batch_size, dim
    dev = weights.device
    lengths = lengths.long()
    nnz = values.numel()
    g = torch.where(g == len(GROUP_TYPES), torch.zeros_like(g), g)  # dropped rows read the fp32 table
    in_torch = g >= ONE_BIT_GROUP
    if bool(in_torch.any()):
        per_id = torch.empty(nnz, D, device=dev)
        rest = (~in_torch).nonzero().flatten()
        per_id[rest] = _fbgemm_rows(weights, group_offsets, g[rest], slots[rest], D, row_alignment)
        at = (g == ONE_BIT_GROUP).nonzero().flatten()
        if len(at):
            per_id[at] = _one_bit_rows(weights, int(group_offsets[ONE_BIT_GROUP]), slots[at], D, row_alignment)
        for group, bits in SYMMETRIC_GROUP_BITS.items():
            at = (g == group).nonzero().flatten()
            if len(at):
                offset = int(group_offsets[group])
                per_id[at] = _symmetric_rows(weights, offset, slots[at], D, row_alignment, bits)
    else:
        per_id = _fbgemm_rows(weights, group_offsets, g, slots, D, row_alignment)
    if per_sample_weights is not None:
        per_id = per_id * per_sample_weights.float()[:, None]
    if pooling == "none":
        return per_id
    seg = torch.repeat_interleave(torch.arange(F * B, device=dev), lengths, output_size=nnz)
    pooled = torch.zeros(F * B, D, device=dev).index_add_(0, seg, per_id)
    if pooling == "mean":
        pooled = pooled / lengths.clamp_min(1).to(pooled.dtype)[:, None]
    return pooled.view(F, B, D).transpose(0, 1).reshape(B, F * D)


def _one_bit_rows(
    weights: torch.Tensor, offset: int, slots: torch.Tensor, dim: int, row_alignment: int
) -> torch.Tensor:
    """1-bit rows read in torch: each row one byte for its magnitude a (`ONE_BIT_MAGNITUDES`),
    then a bit a value, low bits first; a value is -a + 2a x bit (exact, as the op computes it).
    The magnitudes are the library's table (`torch.ops.shark.one_bit_magnitudes`), which the
    tests hold equal to the export's (`shark_torchrec.precision.quantize.ONE_BIT_MAGNITUDES`)."""
    rb = (dim // 8 + 1 + row_alignment - 1) // row_alignment * row_alignment
    at = offset + slots.long()[:, None] * rb + torch.arange(1 + dim // 8, device=weights.device)[None, :]
    raw = weights[at]
    a = torch.ops.shark.one_bit_magnitudes().to(weights.device)[raw[:, :1].long()]
    bits = (raw[:, 1:].long()[:, :, None] >> torch.arange(8, device=weights.device)) & 1
    return bits.reshape(len(slots), dim).float() * (2 * a) - a


def _symmetric_rows(
    weights: torch.Tensor, offset: int, slots: torch.Tensor, dim: int, row_alignment: int, bits: int
) -> torch.Tensor:
    """Symmetric int4 or int2 rows read in torch: each row one byte for its scale s (the 1-bit
    magnitude table, `torch.ops.shark.one_bit_magnitudes`), then its codes 8 / bits a byte, low
    bits first; a value is s x (code - (2^bits - 1) / 2), one rounding, as the op computes it."""
    per_byte = 8 // bits
    raw_bytes = 1 + dim // per_byte
    rb = (raw_bytes + row_alignment - 1) // row_alignment * row_alignment
    at = offset + slots.long()[:, None] * rb + torch.arange(raw_bytes, device=weights.device)[None, :]
    raw = weights[at]
    s = torch.ops.shark.one_bit_magnitudes().to(weights.device)[raw[:, :1].long()]
    shifts = torch.arange(0, 8, bits, device=weights.device)
    codes = (raw[:, 1:].long()[:, :, None] >> shifts) & ((1 << bits) - 1)
    return (codes.reshape(len(slots), dim).float() - ((1 << bits) - 1) / 2.0) * s


def _fbgemm_rows(weights, group_offsets, g, slots, D: int, row_alignment: int) -> torch.Tensor:
    """One row per (group g < 5, slot) by FBGEMM's INT-N op, in the order given."""
    dev = weights.device
    placement = EmbeddingLocation.DEVICE if dev.type == "cuda" else EmbeddingLocation.HOST
    groups = min(group_offsets.numel(), len(GROUP_TYPES))
    group_offsets = group_offsets[:groups]
    perm = torch.argsort(g, stable=True)
    per_group = torch.bincount(g, minlength=groups)
    bags = max(int(per_group.max()), 1) if g.numel() else 1
    ends = (
        torch.arange(1, bags + 1, device=dev)[None, :].clamp(max=per_group[:, None])
        + (torch.cumsum(per_group, 0) - per_group)[:, None]
    )
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64, device=dev), ends.flatten()])
    rows = group_lookup(
        weights,
        group_offsets.long(),
        torch.tensor([t.as_int() for t in GROUP_TYPES[:groups]], dtype=torch.uint8, device=dev),
        torch.arange(0, groups * D + 1, D, dtype=torch.int32, device=dev),
        torch.full((groups,), placement.value, dtype=torch.int32, device=dev),
        D,
        slots[perm],
        offsets,
        row_alignment,
    )
    per_id = torch.empty_like(rows)
    per_id[perm] = rows
    return per_id

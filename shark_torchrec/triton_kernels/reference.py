"""Plain torch references of the Triton kernels, with their arguments: `mixed_lookup_torch` and
`update_rows_torch`. They share no code with the kernels (nor with the C++ ops): rows are
gathered byte by byte from the group tables and decoded with `shark_torchrec.precision.quantize`,
the math the store itself uses. They run on any device, and import neither fbgemm_gpu nor
torchrec, so `bench/gpu_kernels.py` checks the kernels against them where only torch is.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from shark_torchrec.precision.priority import DROPPED, INT_BITS, row_bytes
from shark_torchrec.precision.quantize import (
    dequantize_rows,
    pack_codes,
    quantize_rows,
    round_fp16_stochastic,
    unpack_codes,
)


def _locate(
    group_offsets, row_map, range_ends, range_shift, keys, dim, row_alignment
) -> Tuple[torch.Tensor, torch.Tensor]:
    """(group 0-5 of each key's row, the byte offset of its own row; a dropped row's offset is
    its table's fallback row in the fp32 table)."""
    m = keys.long() if row_map.numel() == 0 else row_map[keys].long()  # empty: the identity map
    g = torch.bucketize(m, range_ends.to(m.device).long(), right=True)
    slot = m - range_shift.to(m.device).long()[g]
    table_group = torch.where(g == DROPPED, torch.zeros_like(g), g)
    rb = torch.tensor([row_bytes(dim, g, row_alignment) for g in range(DROPPED)], device=m.device)
    return g, group_offsets.to(m.device).long()[table_group] + slot * rb[table_group]


def _decode(weights: torch.Tensor, at: torch.Tensor, group: int, dim: int) -> torch.Tensor:
    """fp32 values of the rows of one group starting at byte offsets `at`."""
    raw = row_bytes(dim, group)  # without padding
    b = weights[at[:, None] + torch.arange(raw, device=at.device)]
    if group == 0:
        return b.view(torch.float32)
    if group == 1:
        return b.view(torch.float16).float()
    return dequantize_rows(unpack_codes(b[:, 4:], INT_BITS[group]), b[:, :4].contiguous().view(torch.float16))


def mixed_lookup_torch(
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
    """`shark_torchrec.triton_kernels.mixed_lookup` in plain torch: the same arguments, result
    and error. Each bag is summed in id order, from zero.

    Args:
        weights, group_offsets, row_map, range_ends, range_shift, feature_base, feature_rows,
            values, lengths, per_sample_weights, dim, batch_size, pooling, row_alignment,
            feature_names: as for `shark_torchrec.triton_kernels.mixed_lookup`.

    Returns:
        [batch_size, F * dim] float32, or [len(values), dim] with pooling "none".

    Raises:
        ValueError: an id outside its table (naming the feature and the id).
    """
    dev = weights.device
    F, B, D = feature_base.numel(), batch_size, dim
    values, lengths = values.to(dev).long(), lengths.to(dev).long()
    nnz = values.numel()
    per_feature = lengths.view(F, B).sum(1)
    limit = torch.repeat_interleave(feature_rows.to(dev), per_feature, output_size=nnz)
    bad = (values < 0) | (values >= limit)
    if bool(bad.any()):
        at = int(torch.nonzero(bad)[0])
        f = int(torch.searchsorted(torch.cumsum(per_feature, 0), at, right=True))
        raise ValueError(
            f"feature {feature_names[f]}: id {int(values[at])} outside its table of {int(feature_rows[f])} rows"
        )
    keys = torch.repeat_interleave(feature_base.to(dev), per_feature, output_size=nnz) + values
    g, at = _locate(group_offsets, row_map, range_ends, range_shift, keys, dim, row_alignment)
    rows = torch.empty(nnz, D, device=dev)
    table_group = torch.where(g == DROPPED, torch.zeros_like(g), g)
    for k in range(group_offsets.numel()):
        sel = (table_group == k).nonzero().flatten()
        if len(sel):
            rows[sel] = _decode(weights, at[sel], k, D)
    if per_sample_weights is not None:
        rows = rows * per_sample_weights.to(dev).float()[:, None]
    if pooling == "none":
        return rows
    bag = torch.repeat_interleave(torch.arange(F * B, device=dev), lengths, output_size=nnz)
    first = torch.cumsum(lengths, 0) - lengths
    pos = torch.arange(nnz, device=dev) - first[bag]
    longest = int(lengths.max()) if lengths.numel() else 0
    dense = torch.zeros(F * B, max(longest, 1), D, device=dev)
    dense[bag, pos] = rows
    acc = torch.zeros(F * B, D, device=dev)
    for p in range(longest):  # in id order; the zeros past a bag's end add nothing
        acc = acc + dense[:, p]
    if pooling == "mean":
        acc = acc / lengths.clamp_min(1).float()[:, None]
    return acc.view(F, B, D).transpose(0, 1).reshape(B, F * D)


def update_rows_torch(
    weights: torch.Tensor,
    group_offsets: torch.Tensor,
    row_map: torch.Tensor,
    range_ends: torch.Tensor,
    range_shift: torch.Tensor,
    keys: torch.Tensor,
    row_grad: torch.Tensor,
    step_scale: torch.Tensor,
    noise_table: torch.Tensor,
    noise_start: torch.Tensor,
    dim: int,
    row_alignment: int,
) -> None:
    """`shark_torchrec.triton_kernels.update_rows_` in plain torch: rows `keys` (distinct) become
    old - row_grad * step_scale, rounded back into their groups with the noise windows
    noise_table[noise_start[i] : noise_start[i] + dim] (`round_fp16_stochastic`, `quantize_rows`).
    Dropped rows are skipped.

    Args:
        weights, group_offsets, row_map, range_ends, range_shift, keys, row_grad, step_scale,
            noise_table, noise_start, dim, row_alignment: as for
            `shark_torchrec.triton_kernels.update_rows_` (`weights` is updated in place).
    """
    dev = weights.device
    D = dim
    keys = keys.to(dev).long()
    g, at = _locate(group_offsets, row_map, range_ends, range_shift, keys, dim, row_alignment)
    cols = torch.arange(D, device=dev)
    for k in range(group_offsets.numel()):
        sel = (g == k).nonzero().flatten()
        if not len(sel):
            continue
        new = _decode(weights, at[sel], k, D) - row_grad.to(dev)[sel] * step_scale.to(dev).float()[sel][:, None]
        noise = noise_table.to(dev)[noise_start.to(dev).long()[sel][:, None] + cols]
        if k == 0:
            b = new.contiguous().view(torch.uint8)
        elif k == 1:
            b = round_fp16_stochastic(new, noise).view(torch.uint8)
        else:
            codes, sb = quantize_rows(new, INT_BITS[k], noise)
            b = torch.cat([sb.contiguous().view(torch.uint8), pack_codes(codes, INT_BITS[k])], dim=1)
        weights[at[sel][:, None] + torch.arange(b.shape[1], device=dev)] = b

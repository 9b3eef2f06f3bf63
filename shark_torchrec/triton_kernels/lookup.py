"""The fused lookup in Triton: ids -> row map -> group and slot -> the row's bytes -> dequantized,
weighted and pooled into the output layout, in two kernels of one program per bag: the first
locates every id's row (its group and byte offset), the second pools the rows. (One kernel
walking each id from id to row map to row, four dependent reads an id, was 1.9x slower on an
H200: bench/results/gpu_kernels/two_pass.log.) Results are those of
`shark_torchrec.kernels.mixed_lookup` (C++, CPU) bit for bit: an integer row's value is scale *
code + bias (the product of an fp16 scale and a code of at most 8 bits is exact in fp32, so this
is FBGEMM's fma), a weighted id's row is multiplied by its weight and rounded, a bag is summed
in id order from zero, and the mean divides at the end (IEEE division). The kernels are compiled
without fp contraction so that nothing else is fused.
"""

from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from shark_torchrec.triton_kernels.layout import (
    check_tables,
    group_of,
    load_half,
    map_argument,
    pick,
    row_bytes,
)

POOLING_CODES = {"sum": 0, "mean": 1, "none": 2}


@triton.jit
def _locate_kernel(
    offs_ptr,
    map_ptr,
    ends_ptr,
    shift_ptr,
    base_ptr,
    frows_ptr,
    values_ptr,
    starts_ptr,
    loc_ptr,
    bad_ptr,
    B,
    map_rows,
    buffer_bytes,
    used_groups,
    rb0,
    rb1,
    rb2,
    rb3,
    rb4,
    BLOCK_I: tl.constexpr,
    IDENTITY: tl.constexpr,
):
    """Pass 1 of the two-pass lookup, one program per bag: each id's row as one int64, its
    byte offset times 8 plus its stored group, or -1 for an id to skip (a bad id or a row
    outside the tables: the first such id in bad_ptr[0], a row outside the tables as
    bad_ptr[1] = 1). All ids are located at once, so the pooling pass has one dependent read
    per id (the row) instead of four."""
    bag = tl.program_id(0)
    f = bag // B
    start = tl.load(starts_ptr + bag)
    end = tl.load(starts_ptr + bag + 1)
    base = tl.load(base_ptr + f)
    table_rows = tl.load(frows_ptr + f)
    e0 = tl.load(ends_ptr + 0)
    e1 = tl.load(ends_ptr + 1)
    e2 = tl.load(ends_ptr + 2)
    e3 = tl.load(ends_ptr + 3)
    e4 = tl.load(ends_ptr + 4)
    ii = tl.arange(0, BLOCK_I)
    c = start
    while c < end:
        i = c + ii
        c += BLOCK_I
        live = i < end
        idx = tl.load(values_ptr + i, mask=live, other=0)
        ok = (idx >= 0) & (idx < table_rows)
        first_bad = tl.min(tl.where(live & ~ok, i, end))
        if first_bad < end:
            tl.atomic_min(bad_ptr, first_bad)
        located = live & ok
        key = base + idx
        in_map = idx < map_rows - base  # not key < map_rows: a huge base wraps the key negative
        if IDENTITY:  # no stored map: a row's number is its key
            m = tl.where(located & in_map, key, 0).to(tl.int32)
        else:
            m = tl.load(map_ptr + key, mask=located & in_map, other=0)
        g = group_of(m, e0, e1, e2, e3, e4)
        slot = (m - tl.load(shift_ptr + g, mask=located, other=0)).to(tl.int64)
        tg = tl.where(g == 5, 0, g)  # a dropped row reads its table's fallback row, in the fp32 table
        rb = pick(tg, rb0, rb1, rb2, rb3, rb4)
        at = tl.load(offs_ptr + tg, mask=located & (tg < used_groups), other=0) + slot * rb
        fits = in_map & (tg < used_groups) & (slot >= 0) & (at + rb <= buffer_bytes)
        if tl.max((located & ~fits).to(tl.int32)) > 0:
            tl.atomic_max(bad_ptr + 1, 1)
        located = located & fits
        tl.store(loc_ptr + i, tl.where(located, at * 8 + tg, -1), mask=live)


@triton.jit
def _pooled_row(w_ptr, loc_ptr, psw_ptr, i, end, j, in_row, WEIGHTED: tl.constexpr):
    """Id i's row (zeros past `end` or for a skipped id), dequantized and weighted, fp32 [BLOCK_D]."""
    loc = tl.load(loc_ptr + i, mask=i < end, other=-1)
    live = loc >= 0
    tg = (loc & 7).to(tl.int32)
    row = w_ptr + (loc >> 3)
    mask = in_row & live
    v32 = tl.load(row.to(tl.pointer_type(tl.float32)) + j, mask=mask & (tg == 0), other=0.0)
    v16 = tl.load(row.to(tl.pointer_type(tl.float16)) + j, mask=mask & (tg == 1), other=0.0)
    is_int = live & (tg >= 2)
    bits = tl.where(tg == 2, 8, tl.where(tg == 3, 4, 2))
    scale = load_half(row, is_int)
    bias = load_half(row + 2, is_int)
    at_bit = j * bits
    byte = tl.load(row + 4 + (at_bit >> 3), mask=mask & is_int, other=0).to(tl.int32)
    code = (byte >> (at_bit & 7)) & ((1 << bits) - 1)
    vint = code.to(tl.float32) * scale + bias
    v = tl.where(tg == 0, v32, tl.where(tg == 1, v16.to(tl.float32), vint))
    if WEIGHTED:
        v = v * tl.load(psw_ptr + i, mask=live, other=0.0)
    return v, mask


@triton.jit
def _pool_kernel(
    w_ptr,
    loc_ptr,
    starts_ptr,
    psw_ptr,
    out_ptr,
    B,
    F,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_I: tl.constexpr,
    POOLING: tl.constexpr,
    WEIGHTED: tl.constexpr,
):
    """Pass 2 of the two-pass lookup, one program per bag: the located rows, dequantized,
    weighted and pooled, a bag summed in id order from zero. The loop is unrolled BLOCK_I ids
    deep: their rows are independent reads, which the compiler can issue before the adds."""
    bag = tl.program_id(0)
    f = bag // B
    b = bag % B
    start = tl.load(starts_ptr + bag)
    end = tl.load(starts_ptr + bag + 1)
    j = tl.arange(0, BLOCK_D)
    in_row = j < D
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    c = start
    while c < end:
        for r in tl.static_range(BLOCK_I):
            v, mask = _pooled_row(w_ptr, loc_ptr, psw_ptr, c + r, end, j, in_row, WEIGHTED)
            if POOLING == 2:
                tl.store(out_ptr + (c + r).to(tl.int64) * D + j, v, mask=mask)
            else:
                acc += v  # in id order; a row past the bag's end adds zeros, exactly
        c += BLOCK_I
    if POOLING != 2:
        if POOLING == 1:
            n = tl.maximum(end - start, 1).to(tl.float32)
            acc = tl.div_rn(acc, tl.zeros([BLOCK_D], dtype=tl.float32) + n)
        tl.store(out_ptr + b.to(tl.int64) * F * D + f * D + j, acc, mask=in_row)


def mixed_lookup(
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
    ids_per_block: int = 2,
    num_warps: Optional[int] = None,
) -> torch.Tensor:
    """Pooled (or one row per id) fp32 embeddings of jagged ids over the group tables: the
    arguments and result of `shark_torchrec.kernels.mixed_lookup`, on the tensors' device (CUDA;
    CPU through Triton's interpreter).

    Args:
        weights: uint8 buffer of the group tables.
        group_offsets: int64 byte offset of each group table (the fp32 table at a multiple of 4).
        row_map: int32 [rows] the row map.
        range_ends: int32 [5] where each group's numbers end.
        range_shift: int32 [6] what a group's numbers are shifted by to give slots.
        feature_base: int64 [F] each feature's first row in the row map.
        feature_rows: int64 [F] each feature's table size (ids must be below it).
        values: the ids, feature-major (all of feature 0's bags, then feature 1's ...).
        lengths: [F * batch_size] ids per bag.
        per_sample_weights: one weight per id, or None.
        dim: embedding dim (a multiple of 4).
        batch_size: bags per feature.
        pooling: "sum", "mean" or "none".
        row_alignment: the rows' byte alignment.
        feature_names: for the error naming a feature and an id outside its table.
        ids_per_block: how deep the pooling loop is unrolled (ids whose rows a program reads
            together), a power of 2 (a speed setting only).
        num_warps: warps a program (a bag) runs on; by default one per 128 columns, at most 4.

    Returns:
        [batch_size, F * dim] float32, or [len(values), dim] with pooling "none".

    Raises:
        ValueError: an id outside its table (naming the feature and the id), or bad tables.
    """
    check_tables("triton mixed_lookup", weights, group_offsets, row_map, range_ends, range_shift, dim, row_alignment)
    if ids_per_block < 1 or ids_per_block & (ids_per_block - 1):
        raise ValueError(f"ids_per_block must be a power of 2, not {ids_per_block}")
    if pooling not in POOLING_CODES:
        raise ValueError(f"pooling must be one of {sorted(POOLING_CODES)}, not {pooling!r}")
    if feature_base.numel() and int(feature_base.min()) < 0:  # keys before the row map: read out of range
        raise ValueError("triton mixed_lookup: feature_base must be >= 0")
    dev = weights.device
    F, B, D = feature_base.numel(), batch_size, dim
    values = values.to(device=dev, dtype=torch.int64).contiguous()
    lengths = lengths.to(device=dev, dtype=torch.int64)
    if lengths.numel() != F * B:
        raise ValueError(f"lengths: [{F} features * {B}] expected, got {list(lengths.shape)}")
    nnz = values.numel()
    if feature_rows.numel() != F:
        raise ValueError(f"feature_rows: one per feature ({F}) expected, got {feature_rows.numel()}")
    weighted = per_sample_weights is not None
    if weighted and per_sample_weights.numel() != nnz:
        raise ValueError(f"per_sample_weights: one per id ({nnz}) expected, got {per_sample_weights.numel()}")
    starts = torch.zeros(F * B + 1, dtype=torch.int64, device=dev)
    torch.cumsum(lengths, 0, out=starts[1:])
    # One sync for the three. Lengths none of them negative whose running sum turns negative
    # overflowed int64 (near 2^62 each, they could wrap to the number of ids and pass the total).
    total, negative, wrapped = torch.stack([starts[-1], (lengths < 0).sum(), (starts < 0).sum()]).tolist()
    if negative:
        raise ValueError(f"lengths: {negative} negative")
    if wrapped:
        raise ValueError("lengths: their running sum overflows int64")
    if total != nnz:
        raise ValueError(f"lengths add up to {total}, values has {nnz}")
    out = torch.empty((nnz, D) if pooling == "none" else (B, F * D), dtype=torch.float32, device=dev)
    if F * B == 0 or out.numel() == 0:
        return out.zero_()
    psw = per_sample_weights.to(device=dev, dtype=torch.float32).contiguous() if weighted else out
    feature_rows = feature_rows.to(dev, torch.int64)
    bad = torch.tensor([nnz, 0], dtype=torch.int64, device=dev)  # the first bad id; a layout error
    map_read, map_rows, identity = map_argument(row_map, range_ends, dev)
    tables = (
        group_offsets.to(dev, torch.int64),
        map_read,
        range_ends.to(dev, torch.int32),
        range_shift.to(dev, torch.int32),
        feature_base.to(dev, torch.int64),
        feature_rows,
        values,
        starts,
    )
    sizes = (map_rows, weights.numel(), group_offsets.numel(), *row_bytes(D, row_alignment))
    shape = dict(
        D=D,
        BLOCK_D=triton.next_power_of_2(D),
        BLOCK_I=ids_per_block,
        POOLING=POOLING_CODES[pooling],
        WEIGHTED=weighted,
        num_warps=num_warps or max(1, min(4, D // 128)),
        enable_fp_fusion=False,
    )
    loc = torch.empty(nnz, dtype=torch.int64, device=dev)
    _locate_kernel[(F * B,)](*tables, loc, bad, B, *sizes, BLOCK_I=32, IDENTITY=identity)
    _pool_kernel[(F * B,)](weights, loc, starts, psw, out, B, F, **shape)
    at, layout_bad = bad.tolist()  # (one sync: the error must be raised here, not found later)
    if at < nnz:
        f = int(torch.searchsorted(starts[B::B], at, right=True))
        raise ValueError(
            f"feature {feature_names[f]}: id {int(values[at])} outside its table of {int(feature_rows[f])} rows"
        )
    if layout_bad:
        raise ValueError("triton mixed_lookup: a row map entry points outside the group tables")
    return out

"""The group tables' layout as the Triton kernels read it (the C++ twin is
`shark_torchrec/kernels/layout.h`): one uint8 buffer holds a table per group (fp32, fp16,
int8, int4, int2 rows in FBGEMM's layout: an integer row is its fp16 scale and bias, then its
codes packed low bits first); the row map gives each row an int32 whose group is the number of
range_ends at or below it (5: dropped, read from its table's fallback row in the fp32 table),
and whose slot is the number minus range_shift[group]. An empty row map is the identity."""

from __future__ import annotations

import os
from typing import List

import torch
import triton
import triton.language as tl

from shark_torchrec.precision.priority import DROPPED
from shark_torchrec.precision.priority import row_bytes as group_row_bytes

GROUPS = DROPPED  # stored groups: ids 0-4 (fp32, fp16, int8, int4, int2); DROPPED, 5, stores no row


def row_bytes(dim: int, alignment: int) -> List[int]:
    """Bytes of one row of each stored group at `dim`, padded to `alignment`.

    Args:
        dim: the embedding dim.
        alignment: rows are padded to a multiple of this many bytes.

    Returns:
        [fp32, fp16, int8, int4, int2] row bytes.
    """
    return [group_row_bytes(dim, g, alignment) for g in range(GROUPS)]


def map_argument(row_map: torch.Tensor, range_ends: torch.Tensor, dev: torch.device):
    """What the kernels take of a row map. An empty row map is the identity (a one-tier store
    keeps none): a row's number is its key, the rows are range_ends' last entry, and the
    kernels read no map (they are handed range_ends in its place, a tensor they never load).

    Args:
        row_map: the op's row map (int32, possibly empty).
        range_ends: the op's range_ends.
        dev: the kernels' device.

    Returns:
        (the tensor to pass as the map, the rows it covers, whether it is the identity).
    """
    if row_map.numel() == 0:
        ends = range_ends.to(dev, torch.int32)
        return ends, int(range_ends[-1]), True
    return row_map.to(dev).contiguous(), row_map.numel(), False


def check_tables(
    op: str,
    weights: torch.Tensor,
    group_offsets: torch.Tensor,
    row_map: torch.Tensor,
    range_ends: torch.Tensor,
    range_shift: torch.Tensor,
    dim: int,
    row_alignment: int,
) -> None:
    """The checks the C++ ops make of the group tables, with the same words, plus the alignment
    the kernels' fp32 and fp16 reads need, and the device.

    Args:
        op: the op's name, for the messages.
        weights, group_offsets, row_map, range_ends, range_shift, dim, row_alignment: the op's
            arguments (as for `shark_torchrec.kernels.mixed_lookup`).

    Raises:
        ValueError: naming the op and what is wrong.
    """
    if weights.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"{op}: CUDA tensors only (on CPU, the C++ op in shark_torchrec.kernels; or Triton's "
            f"interpreter, TRITON_INTERPRET=1 before triton is imported), got {weights.device}"
        )
    if weights.dtype != torch.uint8 or not weights.is_contiguous():
        raise ValueError(f"{op}: weights must be contiguous uint8")
    if row_map.dtype != torch.int32:
        raise ValueError(f"{op}: row_map must be int32")
    if range_ends.numel() != GROUPS or range_shift.numel() != GROUPS + 1:
        raise ValueError(f"{op}: range_ends [5], range_shift [6] expected")
    if dim <= 0 or dim % 4 or dim > 4096:
        raise ValueError(f"{op}: dim {dim} must be a multiple of 4 (as FBGEMM's tables need) up to 4096")
    if row_alignment <= 0:
        raise ValueError(f"{op}: row_alignment must be positive")
    if not 0 < group_offsets.numel() <= GROUPS:
        raise ValueError(f"{op}: one to 5 group tables expected, got {group_offsets.numel()}")
    offs = group_offsets.tolist()
    if min(offs) < 0:  # a row at a negative offset would be read before the buffer
        raise ValueError(f"{op}: group_offsets must be >= 0")
    # The kernels read fp32 and fp16 rows as such: their addresses must be aligned.
    rb = row_bytes(dim, row_alignment)
    if weights.data_ptr() % 4 or offs[0] % 4 or rb[0] % 4 or (len(offs) > 1 and (offs[1] % 2 or rb[1] % 2)):
        raise ValueError(
            f"{op}: fp32 rows must start at multiples of 4 bytes and fp16 rows of 2 (the buffer at "
            f"{weights.data_ptr() % 16} mod 16, tables at {offs}, rows of {rb[:2]} bytes)"
        )


@triton.jit
def group_of(m, e0, e1, e2, e3, e4):
    """bucketize(m, range_ends, right=True): 0-4 a stored group, 5 dropped."""
    return (
        (e0 <= m).to(tl.int32)
        + (e1 <= m).to(tl.int32)
        + (e2 <= m).to(tl.int32)
        + (e3 <= m).to(tl.int32)
        + (e4 <= m).to(tl.int32)
    )


@triton.jit
def pick(g, a0, a1, a2, a3, a4):
    """a_g (g in 0..4)."""
    return tl.where(g == 0, a0, tl.where(g == 1, a1, tl.where(g == 2, a2, tl.where(g == 3, a3, a4))))


@triton.jit
def half_of_bytes(lo, hi):
    """The fp16 whose bytes (little-endian) are lo, hi, as fp32."""
    return (lo.to(tl.int32) | (hi.to(tl.int32) << 8)).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def load_half(p, mask):
    """The fp16s at byte addresses p (where mask), as fp32, read byte by byte: an integer row's
    scale and bias need not be 2-byte aligned when rows are not padded."""
    return half_of_bytes(tl.load(p, mask=mask, other=0), tl.load(p + 1, mask=mask, other=0))


@triton.jit
def load_half_scalar(p):
    """The fp16 at byte address p, as fp32 (`load_half` of one unmasked address)."""
    return half_of_bytes(tl.load(p), tl.load(p + 1))


@triton.jit
def store_half(p, h):
    """Write the fp16 h at byte address p, byte by byte."""
    b = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    tl.store(p, (b & 0xFF).to(tl.uint8))
    tl.store(p + 1, (b >> 8).to(tl.uint8))


@triton.jit
def next_half(h, UP: tl.constexpr):
    """nextafter of a finite fp16 towards +inf (UP) or -inf, as std::nextafter."""
    b = h.to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    zero = (b & 0x7FFF) == 0
    negative = (b & 0x8000) != 0
    if UP:
        nb = tl.where(zero, 0x0001, tl.where(negative, b - 1, b + 1))
    else:
        nb = tl.where(zero, 0x8001, tl.where(negative, b + 1, b - 1))
    return nb.to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def clamp_fp16_range(v):
    """v clamped to [-65504, 65504], the finite fp16 range."""
    # NaN stays NaN, as std::min/max and torch.clamp keep it (tl's default returns the other operand).
    return tl.minimum(
        tl.maximum(v, -65504.0, propagate_nan=tl.PropagateNan.ALL), 65504.0, propagate_nan=tl.PropagateNan.ALL
    )


@triton.jit
def round_down_fp16(x):
    """The largest fp16 at or below the fp32 x."""
    h = x.to(tl.float16)
    return tl.where(h.to(tl.float32) > x, next_half(h, False), h)


@triton.jit
def round_up_fp16(x):
    """The smallest fp16 at or above the fp32 x."""
    h = x.to(tl.float16)
    return tl.where(h.to(tl.float32) < x, next_half(h, True), h)


@triton.jit
def round_fp16_stochastic(value, noise):
    """`shark_torchrec.precision.quantize.round_fp16_stochastic`, elementwise: noise added to
    the 13 mantissa bits fp16 drops, then truncated; fp16 subnormals take the exact rule."""
    v = clamp_fp16_range(value)
    bits = v.to(tl.int32, bitcast=True)
    r = (noise * 8192.0).to(tl.int32)
    fast = clamp_fp16_range(((bits + r) & -8192).to(tl.float32, bitcast=True)).to(tl.float16)
    near = v.to(tl.float16)
    lo = tl.where(near.to(tl.float32) > v, next_half(near, False), near)
    hi = next_half(lo, True)
    lo32 = lo.to(tl.float32)
    gap = hi.to(tl.float32) - lo32
    p = tl.where(gap > 0, tl.div_rn(v - lo32, tl.where(gap > 0, gap, 1.0)), 0.0)
    exact = tl.where(noise < p, hi, lo)
    return tl.where((bits & 0x7FFFFFFF) < 0x38800000, exact, fast)

"""The row update in Triton: each touched row read from its group, stepped (new = old - grad *
step_scale), and written back in its group with stochastic rounding, in place, one program a
row. Results are those of `shark_torchrec.kernels.update_rows_` (C++, CPU) and of the torch
reference bit for bit, given the same noise: fp32 exact; fp16 with noise added to the mantissa
bits it drops (subnormals: the exact rule); integer rows requantized over the new row's range,
bias rounded down and scale up to fp16, codes floor(x + noise). Compiled without fp
contraction, with IEEE division.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from shark_torchrec.triton_kernels.layout import (
    check_tables,
    clamp_fp16_range,
    group_of,
    load_half_scalar,
    map_argument,
    pick,
    round_down_fp16,
    round_fp16_stochastic,
    round_up_fp16,
    row_bytes,
    store_half,
)


@triton.jit
def _step_int_row(row, grad_ptr, noise_ptr, step_scale, D: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr):
    """An integer row of BITS bits: decoded, stepped, requantized with noise, written back.
    Values are held as [bytes, codes per byte] so that packing is a sum along the second axis."""
    PER: tl.constexpr = 8 // BITS
    TOP: tl.constexpr = (1 << BITS) - 1
    k = tl.arange(0, BLOCK_D // PER)
    p = tl.arange(0, PER)
    jj = k[:, None] * PER + p[None, :]
    live = jj < D
    live_bytes = k < D // PER
    scale = load_half_scalar(row)
    bias = load_half_scalar(row + 2)
    byte = tl.load(row + 4 + k, mask=live_bytes, other=0).to(tl.int32)
    code = (byte[:, None] >> (p[None, :] * BITS)) & TOP
    old = code.to(tl.float32) * scale + bias
    t = tl.load(grad_ptr + jj, mask=live, other=0.0) * step_scale
    x = clamp_fp16_range(old - t)
    lo = tl.min(tl.where(live, x, float("inf")))
    hi = tl.max(tl.where(live, x, float("-inf")))
    new_bias = round_down_fp16(lo)
    b32 = new_bias.to(tl.float32)
    new_scale = round_up_fp16(tl.div_rn(hi - b32, tl.full([], TOP, tl.float32)))
    s32 = new_scale.to(tl.float32)
    inv = tl.where(s32 > 0, tl.div_rn(tl.full([], 1.0, tl.float32), tl.maximum(s32, 1e-30)), 0.0)
    noise = tl.load(noise_ptr + jj, mask=live, other=0.0)
    q = tl.floor((x - b32) * inv + noise)
    q = tl.minimum(tl.maximum(q, 0.0), TOP * 1.0).to(tl.int32)
    packed = tl.sum(q << (p[None, :] * BITS), axis=1)
    store_half(row, new_scale)
    store_half(row + 2, new_bias)
    tl.store(row + 4 + k, packed.to(tl.uint8), mask=live_bytes)


@triton.jit
def _update_kernel(
    w_ptr,
    offs_ptr,
    map_ptr,
    ends_ptr,
    shift_ptr,
    keys_ptr,
    grad_ptr,
    scale_ptr,
    noise_ptr,
    noise_start_ptr,
    bad_ptr,
    map_rows,
    noise_len,
    buffer_bytes,
    used_groups,
    rb0,
    rb1,
    rb2,
    rb3,
    rb4,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    IDENTITY: tl.constexpr,
):
    i = tl.program_id(0).to(tl.int64)
    key = tl.load(keys_ptr + i)
    in_map = (key >= 0) & (key < map_rows)
    if IDENTITY:  # no stored map: a row's number is its key
        m = tl.where(in_map, key, 0).to(tl.int32)
    else:
        m = tl.load(map_ptr + key, mask=in_map, other=0)
    g = group_of(
        m,
        tl.load(ends_ptr + 0),
        tl.load(ends_ptr + 1),
        tl.load(ends_ptr + 2),
        tl.load(ends_ptr + 3),
        tl.load(ends_ptr + 4),
    )
    if in_map == 0:
        tl.atomic_min(bad_ptr, i)  # the wrapper raises, naming the first such row
    elif g < 5:  # a dropped row has no bytes of its own to update (nor a noise window to check)
        slot = (m - tl.load(shift_ptr + g)).to(tl.int64)
        rb = pick(g, rb0, rb1, rb2, rb3, rb4)
        at = tl.load(offs_ptr + g, mask=g < used_groups, other=0) + slot * rb
        at_noise = tl.load(noise_start_ptr + i)
        # The C++ op's checks: the row inside the buffer, the noise window inside the table.
        fits = (g < used_groups) & (slot >= 0) & (at + rb <= buffer_bytes) & (at_noise >= 0)
        fits = fits & (at_noise + D <= noise_len)
        if fits == 0:
            tl.atomic_min(bad_ptr, i)
        else:
            row = w_ptr + at
            grad = grad_ptr + i * D
            noise = noise_ptr + at_noise
            s = tl.load(scale_ptr + i)
            if g == 0:
                j = tl.arange(0, BLOCK_D)
                live = j < D
                r = row.to(tl.pointer_type(tl.float32)) + j
                t = tl.load(grad + j, mask=live, other=0.0) * s
                tl.store(r, tl.load(r, mask=live, other=0.0) - t, mask=live)
            elif g == 1:
                j = tl.arange(0, BLOCK_D)
                live = j < D
                r = row.to(tl.pointer_type(tl.float16)) + j
                t = tl.load(grad + j, mask=live, other=0.0) * s
                new = tl.load(r, mask=live, other=0.0).to(tl.float32) - t
                tl.store(r, round_fp16_stochastic(new, tl.load(noise + j, mask=live, other=0.0)), mask=live)
            elif g == 2:
                _step_int_row(row, grad, noise, s, D, BLOCK_D, 8)
            elif g == 3:
                _step_int_row(row, grad, noise, s, D, BLOCK_D, 4)
            else:
                _step_int_row(row, grad, noise, s, D, BLOCK_D, 2)


def update_rows_(
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
    """Rows `keys` (distinct) become old - row_grad * step_scale, written back in place in their
    groups with stochastic rounding: the arguments and effect of `shark_torchrec.kernels.update_rows_`.
    Dropped rows are skipped. Keys must be distinct (programs would race on a row) and
    gradients finite (what a NaN becomes in an integer row is not defined: the store skips
    rows with non-finite gradients before it calls the op, as for the C++ op).

    Args:
        weights: uint8 buffer of the group tables, updated in place.
        group_offsets, row_map, range_ends, range_shift: the group tables (see `mixed_lookup`).
        keys: [n] distinct row keys.
        row_grad: [n, dim] float32 gradients.
        step_scale: [n] what each gradient is multiplied by (the optimizer's step size).
        noise_table: uniform [0, 1) floats (`shark_torchrec.precision.quantize.rounding_noise_starts`).
        noise_start: [n] where each row's noise window starts in the table.
        dim: embedding dim (a multiple of 4).
        row_alignment: the rows' byte alignment.

    Raises:
        ValueError: a key outside the row map, a noise window outside the table, or bad tables.
    """
    check_tables("triton update_rows_", weights, group_offsets, row_map, range_ends, range_shift, dim, row_alignment)
    dev = weights.device
    n, D = keys.numel(), dim
    if tuple(row_grad.shape) != (n, D) or step_scale.numel() != n or noise_start.numel() != n:
        raise ValueError(
            f"row_grad [{n}, {D}], step_scale [{n}] and noise_start [{n}] expected, got "
            f"{list(row_grad.shape)}, {list(step_scale.shape)}, {list(noise_start.shape)}"
        )
    if n == 0:
        return
    keys = keys.to(dev, torch.int64).contiguous()
    noise_start = noise_start.to(dev, torch.int64).contiguous()
    bad = torch.full((1,), n, dtype=torch.int64, device=dev)
    map_read, map_rows, identity = map_argument(row_map, range_ends, dev)
    _update_kernel[(n,)](
        weights,
        group_offsets.to(dev, torch.int64),
        map_read,
        range_ends.to(dev, torch.int32),
        range_shift.to(dev, torch.int32),
        keys,
        row_grad.to(dev, torch.float32).contiguous(),
        step_scale.to(dev, torch.float32).contiguous(),
        noise_table.to(dev, torch.float32).contiguous(),
        noise_start,
        bad,
        map_rows,
        noise_table.numel(),
        weights.numel(),
        group_offsets.numel(),
        *row_bytes(D, row_alignment),
        D=D,
        BLOCK_D=triton.next_power_of_2(D),
        IDENTITY=identity,
        num_warps=max(1, min(4, D // 128)),
        enable_fp_fusion=False,
    )
    at = int(bad)  # (one sync: an error must be raised here, not found later)
    if at < n:
        # Rows before it in launch order may already be written (so with the C++ op).
        raise ValueError(
            f"triton update_rows_: row {at} (key {int(keys[at])}) is outside the row map or the group "
            "tables, or its noise window is out of range"
        )

"""Row-wise int8, int4 and int2 quantization and stochastic rounding with reproducible noise.

Integer rows use FBGEMM's inference layout: per row an fp16 scale and an fp16 bias, value =
code * scale + bias with codes in [0, 2^bits - 1] (asymmetric, so the int8 step is
(max - min) / 255; the paper's Eq. 6 divides a symmetric range by 255 where 127 would be
right, which an asymmetric code avoids). Int4 and int2 codes are packed two and four to a
byte, low bits first (`pack_codes`).

Stochastic rounding draws its uniform noise from a hash of (seed, step, table, row, column):
every replica of a row rounds the same way, and a resumed or differently sharded run
reproduces the same bits.
"""

from __future__ import annotations

import warnings
from typing import Tuple

import torch

FP16_MAX = 65504.0

# splitmix64 constants, written as signed int64.
_M1 = -7046029254386353131  # 0x9E3779B97F4A7C15
_M2 = -4658895280553007687  # 0xBF58476D1CE4E5B9
_M3 = -7723592293110705685  # 0x94D049BB133111EB
_LOW = {s: (1 << (64 - s)) - 1 for s in (30, 27, 31)}


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (wrapping multiply, logical shifts)."""
    x = x ^ ((x >> 30) & _LOW[30])
    x = x * _M2
    x = x ^ ((x >> 27) & _LOW[27])
    x = x * _M3
    return x ^ ((x >> 31) & _LOW[31])


_NOISE_BITS = 20
_NOISE_MASK = (1 << _NOISE_BITS) - 1
_NOISE_TAIL = 1 << 13  # rows up to 8192 columns read a window without wrapping
_NOISE_TABLE: dict = {}  # device -> the table there (made on CPU, copied once per device)


def _noise_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """2^20 uniform [0, 1) floats from a fixed generator (the same in every process), followed
    by a copy of its first entries so that any window of up to _NOISE_TAIL starts anywhere;
    on `device`, copied there once."""
    device = torch.device(device)
    if device not in _NOISE_TABLE:
        if not _NOISE_TABLE:
            g = torch.Generator().manual_seed(0x5EED5A7C)
            t = torch.rand(1 << _NOISE_BITS, generator=g)
            _NOISE_TABLE[torch.device("cpu")] = torch.cat([t, t[:_NOISE_TAIL]])
        _NOISE_TABLE[device] = _NOISE_TABLE[torch.device("cpu")].to(device)
    return _NOISE_TABLE[device]


def rounding_noise_starts(
    seed: int,
    step: int,
    tables: torch.Tensor | int,
    rows: torch.Tensor,
    first_cols: torch.Tensor,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Where each row's noise window starts in `noise_table()`: `rounding_noise` of a row whose
    global columns are first_cols[i] .. first_cols[i] + D - 1 is noise_table()[start[i] : start[i] + D]
    (D up to 8192). The fused update (`torch.ops.shark.update_rows_`) reads it so.

    Args:
        seed, step, tables, rows: as for `rounding_noise`.
        first_cols: [n] each row's first global column.

    Returns:
        (start int64 [n], the table, on the device of `rows`).
    """
    off = _row_offsets(seed, step, tables, rows)
    return (off + first_cols.to(torch.int64)) & _NOISE_MASK, _noise_table(rows.device)


def noise_head(seed: int, step: int) -> int:
    """The part of every row's noise hash that depends on (seed, step) only (the fused
    row update, `torch.ops.shark.update_rows_hashed_`, hashes the rest per row).

    Args:
        seed: the policy's seed.
        step: the training step.

    Returns:
        An int64 value.
    """
    return int(_mix(torch.tensor(((seed * 1_000_003 + step) * 998_244_353) % (1 << 62))))


def _row_offsets(seed: int, step: int, tables: torch.Tensor | int, rows: torch.Tensor) -> torch.Tensor:
    head = noise_head(seed, step)
    t = torch.as_tensor(tables, dtype=torch.int64)
    # Hashing is per row; per element it is one add, one mask and one gather from a fixed
    # table of uniform numbers (hashing every element cost more than the update itself):
    # element (row, col) reads entry (offset(row) + global col) mod 2^20.
    r = _mix(_mix(t * _M3 + head) + rows.to(torch.int64) * _M1)
    return (r >> 24) & _NOISE_MASK


def rounding_noise(
    seed: int,
    step: int,
    tables: torch.Tensor | int,
    rows: torch.Tensor,
    cols: torch.Tensor,
) -> torch.Tensor:
    """Uniform [0, 1) noise of shape [len(rows), D], a pure function of
    (seed, step, table id, global row, global column).

    `tables` is one id or one per row; `cols` is [D] or [len(rows), D] global columns.

    Args:
        seed: the policy's seed.
        step: the training step.
        tables: see above.
        rows: [n] global row ids.
        cols: see above.

    Returns:
        float32 [n, D] noise.
    """
    off = _row_offsets(seed, step, tables, rows)
    table = _noise_table()
    if cols.dim() == 2:  # [n, D] global columns, consecutive per row: a window per row
        D = cols.shape[1]
        if D and bool((cols[:, -1] - cols[:, 0] == D - 1).all()) and D <= _NOISE_TAIL:
            start = (off + cols[:, 0].to(torch.int64)) & _NOISE_MASK
            return table.as_strided((len(table) - D + 1, D), (1, 1))[start]
        idx = (off[:, None] + cols.to(torch.int64)) & _NOISE_MASK
        return table[idx]
    idx = (off[:, None] + cols.to(torch.int64)[None, :]) & _NOISE_MASK
    return table[idx]


def state_noise_bits(seed: int, step: int, tables: torch.Tensor | int, rows: torch.Tensor) -> torch.Tensor:
    """16 uniform random bits a row, a pure function of (seed, step, table id, global row),
    hashed apart from the rows' own rounding noise: what rounds a row's optimizer state
    (`round_bf16_stochastic`).

    Args:
        seed: the policy's seed.
        step: the training step.
        tables: one table id, or one a row.
        rows: [n] global row ids.

    Returns:
        int32 [n] in [0, 2^16).
    """
    head = noise_head(seed, step)
    t = torch.as_tensor(tables, dtype=torch.int64)
    r = _mix(_mix(t * _M1 + head + _M3) + rows.to(torch.int64) * _M2)  # other constants than _row_offsets
    return ((r >> 24) & 0xFFFF).to(torch.int32)


def round_bf16_stochastic(values: torch.Tensor, noise_bits: torch.Tensor) -> torch.Tensor:
    """Finite fp32 -> bf16, rounding up (in magnitude) with probability equal to the distance
    to the lower neighbour: the 16 low bits of each value's fp32 pattern plus 16 random bits,
    truncated. Unbiased within a binade, so many increments below bf16's resolution still add
    up in expectation (rounding to nearest would drop every one of them).

    Args:
        values: finite float32 values.
        noise_bits: int32 of the same shape, uniform in [0, 2^16) (`state_noise_bits`).

    Returns:
        bfloat16 values of the same shape.
    """
    bits = values.float().contiguous().view(torch.int32)
    sign = bits & -(1 << 31)
    magnitude = bits & 0x7FFFFFFF
    # Below the largest finite bf16 the carry moves to the next bf16 up; at it, truncate.
    rounded = torch.where(magnitude < 0x7F7F0000, magnitude + noise_bits, magnitude) & -(1 << 16)
    rounded = torch.where(magnitude > 0x7F800000, 0x7FC00000, rounded)  # a NaN stays NaN (not inf)
    return (rounded | sign).view(torch.float32).to(torch.bfloat16)


def round_fp16_stochastic(values: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """fp32 -> fp16, rounding away from zero with probability equal to the distance to the
    fp16 value below (in magnitude) over the gap, so E[result] = value (values are clamped to
    +-65504 first). Normal range: add noise to the 13 fp32 mantissa bits fp16 drops, then
    truncate; fp16 subnormals take the exact (slower) path.

    Args:
        values: fp32 values.
        noise: uniform [0, 1) noise of the same shape (`rounding_noise`).

    Returns:
        fp16 values.
    """
    v = values.clamp(-FP16_MAX, FP16_MAX).contiguous()
    bits = v.view(torch.int32)
    r = (noise * 8192).to(torch.int32)
    fast = ((bits + r) & ~0x1FFF).view(torch.float32).clamp_(-FP16_MAX, FP16_MAX).to(torch.float16)
    tiny = (bits & 0x7FFFFFFF) < 0x38800000  # |v| < 2^-14: an fp16 subnormal
    if bool(tiny.any()):
        fast[tiny] = _round_fp16_exact(v[tiny], noise[tiny])
    return fast


def _round_fp16_exact(v: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    near = v.to(torch.float16)
    lo = torch.where(near.float() > v, torch.nextafter(near, near.new_tensor(-float("inf"))), near)
    hi = torch.nextafter(lo, lo.new_tensor(float("inf")))
    lo32, hi32 = lo.float(), hi.float()
    gap = hi32 - lo32
    p = torch.where(gap > 0, (v - lo32) / gap, torch.zeros_like(v))
    return torch.where(noise < p, hi, lo)


def _round_down_fp16(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    return torch.where(h.float() > x, torch.nextafter(h, h.new_tensor(-float("inf"))), h)


def _round_up_fp16(x: torch.Tensor) -> torch.Tensor:
    h = x.to(torch.float16)
    return torch.where(h.float() < x, torch.nextafter(h, h.new_tensor(float("inf"))), h)


def levels(bits: int) -> int:
    """The largest code of a `bits`-bit row (codes 0..levels).

    Args:
        bits: 8, 4 or 2.

    Returns:
        2^bits - 1.

    Raises:
        ValueError: another bit width.
    """
    if bits not in (8, 4, 2):
        raise ValueError(f"integer rows have 8, 4 or 2 bits, not {bits}")
    return (1 << bits) - 1


def quantize_rows(
    values: torch.Tensor, bits: int, noise: torch.Tensor | None = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row-wise asymmetric `bits`-bit integers (8, 4 or 2): returns (codes uint8 [n, D], one
    code per value in 0..2^bits - 1, unpacked; scale_bias fp16 [n, 2]).

    The bias is the row minimum rounded down to fp16 and the scale the range over the largest
    code rounded up to fp16, so every value lies inside the code range. With `noise`, codes
    are rounded stochastically (unbiased); without, to nearest. Values beyond the fp16 range
    are clamped to +-65504; an all-equal row gets scale 0.

    Args:
        values: [n, D] rows.
        bits: 8, 4 or 2.
        noise: uniform [0, 1) noise [n, D] for stochastic rounding (see `rounding_noise`).

    Returns:
        (codes, scale_bias); `pack_codes` lays codes out as FBGEMM reads them.
    """
    top = levels(bits)
    v = values.float().clamp(-FP16_MAX, FP16_MAX)
    if v.shape[0] == 0:
        return torch.empty(v.shape, dtype=torch.uint8, device=v.device), torch.empty(
            0, 2, dtype=torch.float16, device=v.device
        )
    lo, hi = torch.aminmax(v, dim=1)
    bias = _round_down_fp16(lo)
    # Divided by a tensor, not the number `top`: torch on CUDA divides by a Python number as a
    # multiply by its reciprocal, a bit off at times, which made GPU results differ from CPU's
    # (and from our kernels', which divide exactly) in a few rows in 100,000.
    scale = _round_up_fp16((hi - bias.float()) / torch.full_like(hi, float(top)))
    s32 = scale.float()
    # An all-equal row has scale 0: multiplying by 0 sends every code to 0 (= the bias).
    inv = torch.where(s32 > 0, 1.0 / s32.clamp_min(1e-30), torch.zeros_like(s32))
    x = (v - bias.float()[:, None]) * inv[:, None]
    if noise is not None:
        x = torch.floor_(x.add_(noise))
    else:
        x = torch.round_(x)
    codes = x.clamp_(0, top).to(torch.uint8)
    return codes, torch.stack([scale, bias], dim=1)


def quantize_rows_int8(values: torch.Tensor, noise: torch.Tensor | None = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """`quantize_rows` with 8 bits.

    Args:
        values, noise: as for `quantize_rows`.

    Returns:
        (codes uint8 [n, D], scale_bias fp16 [n, 2]).
    """
    return quantize_rows(values, 8, noise)


def dequantize_rows(codes: torch.Tensor, scale_bias: torch.Tensor) -> torch.Tensor:
    """fp32 values code * scale + bias of unpacked codes (any bit width).

    Args:
        codes: [n, D] unpacked codes.
        scale_bias: [n, 2] fp16 (scale, bias) per row.

    Returns:
        [n, D] float32.
    """
    sb = scale_bias.float()
    return codes.float() * sb[:, :1] + sb[:, 1:2]


dequantize_rows_int8 = dequantize_rows


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpacked codes [n, D] -> FBGEMM's packed row bytes [n, D * bits / 8]: value j of a row
    sits in byte j * bits // 8 at bit (j * bits) % 8, low bits first (what its INT4 and INT2
    table-batched embeddings read). D must be a multiple of 8 / bits.

    Args:
        codes: uint8 [n, D] codes, each below 2^bits.
        bits: 8 (returned as is), 4, 2 or 1 (1-bit served rows, `sign_magnitude_rows`).

    Returns:
        uint8 [n, D * bits / 8].

    Raises:
        ValueError: D is not a multiple of 8 / bits.
    """
    per_byte = 8 // bits
    if bits == 8:
        return codes
    n, D = codes.shape
    if D % per_byte:
        raise ValueError(f"a {bits}-bit row packs {per_byte} values a byte: dim {D} is not a multiple of {per_byte}")
    c = codes.view(n, D // per_byte, per_byte).to(torch.int32)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    return (c << shifts).sum(dim=2).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """FBGEMM's packed row bytes [n, B] -> unpacked codes [n, B * 8 / bits].

    Args:
        packed: uint8 [n, B] packed rows (`pack_codes`).
        bits: 8 (returned as is), 4, 2 or 1.

    Returns:
        uint8 codes.
    """
    if bits == 8:
        return packed
    n, nbytes = packed.shape
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    c = (packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)
    return c.view(n, nbytes * (8 // bits)).to(torch.uint8)


def requantize_with(codes_values: torch.Tensor, scale_bias: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Codes that reproduce `codes_values` (values already of the form code * scale + bias)
    under the given scale/bias: used to restore integer rows exactly from a checkpoint.

    Args:
        codes_values: [n, D] values.
        scale_bias: [n, 2] (scale, bias) per row; a row of scale 0 gets codes 0.
        bits: 8, 4 or 2.

    Returns:
        uint8 [n, D] unpacked codes: each value's nearest code, clamped to 0..2^bits - 1.
    """
    sb = scale_bias.float()
    s = sb[:, :1]
    safe = torch.where(s > 0, s, torch.ones_like(s))
    x = torch.round((codes_values.float() - sb[:, 1:2]) / safe)
    return torch.where(s > 0, x, torch.zeros_like(x)).clamp(0, levels(bits)).to(torch.uint8)


def fitted_scale_bias(values: torch.Tensor, bits: int, iterations: int = 20) -> torch.Tensor:
    """A scale and bias per row that quantize the rows to nearest with a smaller squared error
    than the min/max range (`quantize_rows`): starting from that range, alternately round
    every value to its nearest code and refit scale and bias to the codes by least squares
    (values ~ bias + scale * code), keeping a row's new pair only when its error falls. Values
    outside the fitted range are clamped to the end codes: with 2 and 4 bits a narrower range
    than the row's extremes loses less to the many values inside than to the few outside.
    On Gaussian rows of 64 values it halves int2's error and cuts int4's by about a tenth.

    Args:
        values: [n, D] fp32 rows.
        bits: 8, 4 or 2.
        iterations: refits at most.

    Returns:
        fp16 [n, 2] (scale, bias): use with `requantize_with` to get the codes.
    """
    values = values.float()
    _, start = quantize_rows(values, bits)
    best_sb = start.float()

    def error(sb: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        codes = requantize_with(values, sb, bits).float()
        return ((codes * sb[:, :1] + sb[:, 1:2] - values) ** 2).sum(dim=1), codes

    mean = values.mean(dim=1, keepdim=True)
    centred = values - mean  # the same every refit
    best, codes = error(best_sb)
    for _ in range(iterations):
        code_mean = codes.mean(dim=1, keepdim=True)
        c = codes - code_mean
        var = (c * c).sum(dim=1)
        scale = torch.where(var > 0, (c * centred).sum(dim=1) / var.clamp_min(1e-30), best_sb[:, 0])
        bias = mean[:, 0] - scale * code_mean[:, 0]
        sb = torch.stack([scale.clamp(0, 65504.0), bias.clamp(-65504.0, 65504.0)], dim=1).half().float()
        err, new_codes = error(sb)
        better = err < best
        if not bool(better.any()):
            break
        best = torch.where(better, err, best)
        best_sb = torch.where(better[:, None], sb, best_sb)
        codes = torch.where(better[:, None], new_codes, codes)
    return best_sb.half()


# A 1-bit row's magnitude is one byte, a code c: 0 for c = 0, else 2^((c - 192) / 8), in eighth
# octaves (neighbours 9.05% apart, so a magnitude is kept within 4.53%) from 2^-23.875 (6.5e-8)
# to 2^7.875 (234.8). The values are made as one of eight fp32 fractions 2^(r / 8) times a power
# of two (exact), as the kernel library makes them (`one_bit_magnitude` in kernels/layout.h):
# the same bits in both.
_MAGNITUDE_FRACTIONS = (
    1.0,
    1.0905077457427979,
    1.1892070770263672,
    1.2968395948410034,
    1.4142135381698608,
    1.5422108173370361,
    1.6817928552627563,
    1.8340080976486206,
)  # float32(2^(r / 8)), r = 0..7
ONE_BIT_MAGNITUDES = torch.tensor(
    [0.0] + [_MAGNITUDE_FRACTIONS[(c - 192) % 8] * 2.0 ** ((c - 192) // 8) for c in range(1, 256)],
    dtype=torch.float32,
)


def magnitude_codes(magnitude: torch.Tensor) -> torch.Tensor:
    """Each magnitude's code byte: the nearest value of `ONE_BIT_MAGNITUDES` (the lower on a tie).

    Args:
        magnitude: fp32 magnitudes, >= 0.

    Returns:
        uint8 codes of the same shape.
    """
    m = magnitude.float().clamp(0.0, float(ONE_BIT_MAGNITUDES[-1]))
    table = ONE_BIT_MAGNITUDES.to(m.device)
    above = torch.searchsorted(table, m.contiguous()).clamp(1, 255)  # first value >= m
    below = above - 1
    nearer_above = (table[above] - m) < (m - table[below])
    return torch.where(nearer_above, above, below).to(torch.uint8)


def sign_magnitude_rows(values: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """1-bit rows (the served-only tier): each value becomes +a or -a by its sign, with one
    magnitude a per row, the mean absolute value (for fixed signs the least-squares a), kept as
    a one-byte code (`magnitude_codes`: eighth-octave steps, kept within 4.53%).

    Two levels symmetric about zero cost one magnitude where a fitted pair (scale and bias)
    costs two, and they served better on frappe at every budget measured (bench/README.md,
    "1-bit rows"); the magnitude in a byte rather than an fp16 leaves room for more rows in the
    tiers above at the tightest budgets ("A 1-bit row's magnitude in a byte").

    Args:
        values: [n, D] fp32 rows.

    Returns:
        (codes uint8 [n, D], 1 for a value >= 0, else 0; magnitude codes uint8 [n, 1]): a value
        is served as -a + 2a x code with a = ONE_BIT_MAGNITUDES[magnitude code];
        `pack_codes(codes, 1)` packs the codes eight a byte, low bits first.

    Raises:
        ValueError: a row holds a NaN (it has no magnitude to keep).

    Warns:
        when rows' mean magnitudes exceed the byte's largest (234.75): they are served at it.
    """
    v = values.float().clamp(-FP16_MAX, FP16_MAX)
    magnitude = v.abs().mean(dim=1, keepdim=True)
    if bool(torch.isnan(magnitude).any()):
        raise ValueError(f"1-bit rows: {int(torch.isnan(magnitude).sum())} of the rows hold a NaN")
    top = float(ONE_BIT_MAGNITUDES[-1])
    over = int((magnitude > top).sum())
    if over:
        warnings.warn(
            f"1-bit rows: {over} rows have a mean magnitude above {top:.2f}, the largest a magnitude byte "
            f"holds (largest here {float(magnitude.max()):.4g}): they are served at +-{top:.2f}",
            stacklevel=2,
        )
    return (v >= 0).to(torch.uint8), magnitude_codes(magnitude)


# Symmetric integer rows (the served-only `int4s` and `int2s` tiers): a code c of b bits reads
# s x (c - (2^b - 1) / 2), levels symmetric about zero, none at it, one scale s a row as a byte
# on the 1-bit magnitude grid. The scale codes tried a row, in eighth-octave steps from
# `above` steps over max|v| / centre down: on Gaussian and Student-t rows (16 and 64 values) the
# least-error code over all 255 lay from 2 below to 6 above that start for 4 bits and from 23
# below to 8 above for 2 bits (a coarser grid can fall closer to a few values than a finer one;
# 2 bits clip the tails hard, and a row far from zero may use only its two upper levels).
_SYMMETRIC_SEARCH = {4: (8, 24), 2: (12, 40)}  # bits -> (steps above, steps tried)


def symmetric_centre(bits: int) -> float:
    """The code a symmetric row's zero sits at.

    Args:
        bits: the codes' bits.

    Returns:
        (2^bits - 1) / 2: 7.5 for 4 bits, 1.5 for 2.
    """
    return ((1 << bits) - 1) / 2.0


def symmetric_rows(values: torch.Tensor, bits: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric integer rows (the served-only `int4s` and `int2s` tiers): each value becomes
    s x (c - centre), c a code of `bits` bits and centre = (2^bits - 1) / 2, with one scale s a
    row kept as a byte on the 1-bit magnitude grid (`ONE_BIT_MAGNITUDES`, eighth-octave steps).
    The row's scale is the one of a window of grid steps around max|v| / centre (4 bits: 8
    steps above it down to 15 below; 2 bits: 12 above down to 27 below, the outliers clipped to
    +-centre x s) whose codes (nearest, clamped) give the least squared error; a tie keeps the
    larger scale.

    A byte for the scale where `int4` and `int2` rows keep an fp16 scale and bias (dim / 2 + 1
    and dim / 4 + 1 bytes a row, not + 4) leaves room for more rows in them under a budget
    shared with int1 rows (bench/README.md, "Symmetric int4 rows", "Symmetric int2 rows").

    Args:
        values: [n, D] fp32 rows.
        bits: 4 or 2.

    Returns:
        (codes uint8 [n, D] in 0..2^bits - 1; scale codes uint8 [n, 1]): a value is served as
        ONE_BIT_MAGNITUDES[scale code] x (code - centre), one fp32 rounding (`symmetric_values`);
        `pack_codes(codes, bits)` packs them, low bits first. A row of zeros has scale code 0.

    Raises:
        ValueError: bits other than 4 or 2, or a row holding a NaN.

    Warns:
        when rows' largest magnitudes exceed what the largest scale reaches (centre x 234.75):
        their values are clipped there.
    """
    if bits not in _SYMMETRIC_SEARCH:
        raise ValueError(f"symmetric rows have 4 or 2 bits, got {bits}")
    tier = f"int{bits}s"
    centre, top = symmetric_centre(bits), (1 << bits) - 1
    above, steps = _SYMMETRIC_SEARCH[bits]
    v = values.float().clamp(-FP16_MAX, FP16_MAX)
    if bool(torch.isnan(v).any()):
        raise ValueError(f"{tier} rows: {int(torch.isnan(v).any(dim=1).sum())} of the rows hold a NaN")
    table = ONE_BIT_MAGNITUDES.to(v.device)
    amax = v.abs().amax(dim=1, keepdim=True) if v.shape[1] else v.new_zeros(v.shape[0], 1)
    reach = centre * float(table[-1])
    over = int((amax > reach).sum())
    if over:
        warnings.warn(
            f"{tier} rows: {over} rows hold a value beyond {reach:.1f}, the largest a scale byte reaches "
            f"(largest here {float(amax.max()):.4g}): they are clipped there",
            stacklevel=2,
        )
    first = magnitude_codes(amax / centre).long() + above
    best_err = best_scale = best_codes = None
    for step in range(steps):
        scale_code = (first - step).clamp(1, 255)
        s = table[scale_code]
        codes = torch.round(v / s + centre).clamp(0, top)
        err = (((codes - centre) * s - v) ** 2).sum(dim=1, keepdim=True)
        if best_err is None:
            best_err, best_scale, best_codes = err, scale_code, codes
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_scale = torch.where(better, scale_code, best_scale)
            best_codes = torch.where(better, codes, best_codes)
    zero = amax == 0
    best_scale = torch.where(zero, torch.zeros_like(best_scale), best_scale)
    best_codes = torch.where(zero, torch.zeros_like(best_codes), best_codes)
    return best_codes.to(torch.uint8), best_scale.to(torch.uint8)


def symmetric_values(codes: torch.Tensor, scale_codes: torch.Tensor, bits: int) -> torch.Tensor:
    """The fp32 values symmetric integer rows serve (`symmetric_rows`).

    Args:
        codes: uint8 [n, D] codes.
        scale_codes: uint8 [n, 1] scale codes.
        bits: 4 or 2.

    Returns:
        float32 [n, D]: ONE_BIT_MAGNITUDES[scale code] x (code - (2^bits - 1) / 2).
    """
    s = ONE_BIT_MAGNITUDES.to(codes.device)[scale_codes.long()]
    return (codes.float() - symmetric_centre(bits)) * s

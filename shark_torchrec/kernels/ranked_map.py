"""The ranked row map: where a served row lies, in about half a byte a row instead of the
training store's four.

The training store's row map gives every row an int32 slot (`ROW_MAP_BYTES`), since rows move
between tiers while training. A served model's rows no longer move, so its group tables can
hold their rows in key order, and a row's slot is then its rank among the rows of its group:
the number of rows of that group before it. The ranked map stores just enough to compute it.

Layout. Row keys (the tables' rows back to back, as in the row map) are cut into blocks of 64.
Each row has a code: `c < U` for the U stored groups present (`code_groups[c]` is the group
id, most precise first), `U` for a dropped row (when any row is dropped). A block's record is
int32 words: P bit planes of 64 bits each (two words, low word first; a row's code is its bit
across the planes, P = ceil(log2(codes))), then per stored code the slot of the block's first
row of that code in its group table. So a stored row's slot is its block's base for its code
plus a popcount of the rows of the same code before it in the block; a dropped row reads its
table's fallback row (`table_fallback`, a slot in the fp32 table, after the fp32 rows). Bytes a
row: (8 P + 4 U) / 64, e.g. 0.375 for int4/int2/dropped, 0.44 for fp32/fp16/int8 or
int4/int2/int1, 0.75 with all six stored groups and dropped rows (`ranked_map_bytes_per_row`).

Served rows can also be 1-bit (group `INT1`, 6: one byte for the magnitude a, an eighth-octave
code, then a bit a value, low bits first, read as +a or -a) or symmetric int4 or int2 (groups
`INT4S`, 7, and `INT2S`, 8: one byte for the scale s on the same grid, then the codes two or
four a byte, read as s x (code - 7.5) or s x (code - 1.5)): the export puts rows there, the
training store never does. A map holds at most 8 codes (three bit planes).

`torch.ops.shark.mixed_lookup_ranked` (lookup.cpp) reads it; `decode_ranked_map` (torch) is the
reference decoder its tests hold it to, through `mixed_lookup_ranked_reference`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Sequence

import torch

BLOCK_ROWS = 64  # rows a record covers: one 64-bit word per bit plane
GROUPS = 5  # the training store's stored groups: fp32, fp16, int8, int4, int2
DROPPED = 5  # the group id of a dropped row
INT1 = 6  # the served-only 1-bit group (`shark_torchrec.precision.priority.INT1`)
INT4S = 7  # the served-only symmetric int4 group (`shark_torchrec.precision.priority.INT4S`)
INT2S = 8  # the served-only symmetric int2 group (`shark_torchrec.precision.priority.INT2S`)
STORED = (0, 1, 2, 3, INT4S, 4, INT2S, INT1)  # the group ids a served module stores rows of, most precise first
MAX_CODES = 8  # three bit planes: the most the lookup reads


def planes_for(num_codes: int) -> int:
    """Bit planes for this many codes: ceil(log2(codes)) (0 for one code).

    Args:
        num_codes: the distinct codes (stored groups present, plus one if rows are dropped).

    Returns:
        The planes.
    """
    return max(0, math.ceil(math.log2(num_codes))) if num_codes > 1 else 0


def ranked_map_bytes_per_row(stored_groups: int, dropped: bool) -> float:
    """Bytes a row of the ranked map costs with this many stored groups (plus the dropped tier),
    block records over the rows (the last block's padding not counted).

    Args:
        stored_groups: the stored groups the rows can be in.
        dropped: whether rows can be dropped.

    Returns:
        (8 x planes + 4 x stored groups) / 64.
    """
    return (8 * planes_for(stored_groups + int(dropped)) + 4 * stored_groups) / BLOCK_ROWS


def ranked_map_bytes(rows: int, tables: int, stored_groups: int, dropped: bool) -> float:
    """Bytes the whole ranked map takes, as the inference module holds it: the block records
    of every block (the last one's padding included) and each table's start and fallback slot
    (int64 each, the starts one longer).

    Args:
        rows: the rows of all tables.
        tables: the tables.
        stored_groups, dropped: as for `ranked_map_bytes_per_row`.

    Returns:
        The bytes.
    """
    padded = -(-rows // BLOCK_ROWS) * BLOCK_ROWS
    return padded * ranked_map_bytes_per_row(stored_groups, dropped) + 16 * tables + 8


@dataclass
class RankedLayout:
    """A served store's rows in key order per group table, and their ranked map.

    Attributes:
        weights: uint8 buffer of the group tables (fp32 rows then the fallback rows, fp16, int8,
            int4, int2, int1, int4s, int2s), FBGEMM's row layout, as the training store's buffer.
        group_offsets: int64 [5 to 9] (by group id, up to the largest group present: 7 long with
            1-bit rows, 8 with symmetric int4 rows, 9 with symmetric int2 rows; the dropped
            id's unused),
            byte offset of each group table.
        blocks: int32 [ceil(rows / 64), 2 P + U], the block records.
        code_groups: int32 [codes], the group id of each code, most precise first (dropped, 5,
            last if present).
        table_base: int64 [T + 1], each table's first row key, then the rows.
        table_fallback: int64 [T], the slot of each table's fallback row in the fp32 table (-1
            for a table without dropped rows).
    """

    weights: torch.Tensor
    group_offsets: torch.Tensor
    blocks: torch.Tensor
    code_groups: torch.Tensor
    table_base: torch.Tensor
    table_fallback: torch.Tensor

    def map_bytes(self) -> int:
        """Bytes of the map: block records, table bases and fallback slots.

        Returns:
            4 x block record entries + 8 x (table bases + fallback slots); the weights not counted.
        """
        return int(self.blocks.numel() * 4 + self.table_base.numel() * 8 + self.table_fallback.numel() * 8)


def _pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """[blocks, 64] of 0/1 -> int32 [blocks, 2]: the 64-bit word (bit k = column k), low word first."""
    word = (bits.to(torch.int64) << torch.arange(BLOCK_ROWS, dtype=torch.int64)).sum(1)  # distinct bits: no carry
    return word.view(torch.int32).view(-1, 2)


def build_ranked_layout(
    weights: torch.Tensor,
    group_offsets: Sequence[int],
    capacity: Sequence[int],
    row_bytes: Sequence[int],
    groups: torch.Tensor,
    slots: torch.Tensor,
    table_base: torch.Tensor,
) -> RankedLayout:
    """The ranked layout of a store's rows: each stored group's rows copied into a table of
    their own in key order, the fallback rows of the tables that drop rows after the fp32 rows,
    and the block records.

    Args:
        weights: the store's uint8 buffer.
        group_offsets: byte offset of each of its group tables (by group id).
        capacity: rows of each of its group tables (by group id).
        row_bytes: bytes of a row of each stored group (by group id; padded as the buffer's rows
            are). Each is as long as the largest group id present, plus one.
        groups: int64 [rows] group id of each row key (5: dropped, 6: 1-bit, 7 and 8: symmetric
            int4 and int2).
        slots: int64 [rows] slot of each row in its group's table (a dropped row: its table's
            fallback row's slot in the fp32 table).
        table_base: int64 [T + 1], each table's first row key, then the rows.

    Returns:
        The layout (`RankedLayout`).
    """
    rows = int(groups.numel())
    present = [g for g in STORED if bool((groups == g).any())]
    has_dropped = bool((groups == DROPPED).any())
    code_groups = present + ([DROPPED] if has_dropped else [])
    if len(code_groups) > MAX_CODES:
        raise ValueError(f"a ranked map holds at most {MAX_CODES} codes (groups), got {code_groups}")
    code_of = torch.full((INT2S + 1,), -1, dtype=torch.int8)
    code_of[torch.tensor(code_groups, dtype=torch.int64)] = torch.arange(len(code_groups), dtype=torch.int8)
    nblocks = (rows + BLOCK_ROWS - 1) // BLOCK_ROWS
    codes = torch.zeros(nblocks * BLOCK_ROWS, dtype=torch.int8)  # padding rows: code 0, after every real row
    codes[:rows] = code_of[groups]
    by_block = codes.view(nblocks, BLOCK_ROWS)
    words: List[torch.Tensor] = [_pack_bits((by_block >> j) & 1) for j in range(planes_for(len(code_groups)))]
    for c in range(len(present)):
        per_block = (by_block == c).sum(1)
        words.append((torch.cumsum(per_block, 0) - per_block).to(torch.int32)[:, None])
    blocks = torch.cat(words, 1) if words else torch.zeros(nblocks, 0, dtype=torch.int32)

    # Which stored rows go where: each group's rows in key order, the fp32 table followed by one
    # fallback row per table that drops rows (in table order).
    T = int(table_base.numel()) - 1
    table_fallback = torch.full((T,), -1, dtype=torch.int64)
    # The offsets' entries, by group id: the training store's five, up to the largest served-only
    # group present.
    ids = list(range(max(present + [GROUPS - 1]) + 1))
    taken: List[torch.Tensor] = []
    for g in ids:
        take = slots[groups == g].to(torch.int64) if g != DROPPED else slots[:0].to(torch.int64)
        if g == 0 and has_dropped:
            dropped_keys = (groups == DROPPED).nonzero().flatten()
            table = torch.searchsorted(table_base, dropped_keys, right=True) - 1  # sorted, as the keys
            tables, counts = torch.unique_consecutive(table, return_counts=True)
            first = slots[dropped_keys[torch.cumsum(counts, 0) - counts]].to(torch.int64)
            table_fallback[tables] = torch.arange(len(take), len(take) + len(first), dtype=torch.int64)
            take = torch.cat([take, first])
        taken.append(take)
    # Group tables back to back, each with rows starting at a multiple of 4 bytes (as the store's).
    offsets: List[int] = []
    total = 0
    for i, g in enumerate(ids):
        if len(taken[i]):
            total = (total + 3) // 4 * 4
        offsets.append(total)
        total += len(taken[i]) * (int(row_bytes[g]) if g != DROPPED else 0)
    new_weights = torch.zeros(total, dtype=torch.uint8)
    for i, g in enumerate(ids):
        rb, n = int(row_bytes[g]) if g != DROPPED else 0, len(taken[i])
        if n:
            cap = int(capacity[g])
            old = weights[int(group_offsets[g]) : int(group_offsets[g]) + cap * rb].view(cap, rb)
            dst = new_weights[offsets[i] : offsets[i] + n * rb].view(n, rb)
            torch.index_select(old, 0, taken[i], out=dst)
    return RankedLayout(
        weights=new_weights,
        group_offsets=torch.tensor(offsets, dtype=torch.int64),
        blocks=blocks.contiguous(),
        code_groups=torch.tensor(code_groups, dtype=torch.int32),
        table_base=table_base.to(torch.int64).clone(),
        table_fallback=table_fallback,
    )


def decode_ranked_map(
    blocks: torch.Tensor,
    code_groups: torch.Tensor,
    table_base: torch.Tensor,
    table_fallback: torch.Tensor,
    keys: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The group and slot of row keys, from the ranked map, in plain torch (the reference of
    what `mixed_lookup_ranked` computes for each id; it shares no code with it).

    Args:
        blocks, code_groups, table_base, table_fallback: the map (`RankedLayout`).
        keys: int64 row keys.

    Returns:
        (group id of each key, 5 for dropped; slot in the table it reads: a dropped row's
        fallback row's slot in the fp32 table).
    """
    n_codes = int(code_groups.numel())
    P = planes_for(n_codes)
    stored = n_codes - int(n_codes > 0 and int(code_groups[-1]) == DROPPED)
    block, pos = keys // BLOCK_ROWS, keys % BLOCK_ROWS
    rec = blocks[block].to(torch.int64)
    # Each plane's 64 bits of the key's block, as 64 0/1 columns.
    cols = torch.arange(BLOCK_ROWS, dtype=torch.int64)
    code = torch.zeros_like(keys)
    same = torch.ones(keys.numel(), BLOCK_ROWS, dtype=torch.bool)
    plane_bits = []
    for j in range(P):
        lo, hi = rec[:, 2 * j] & 0xFFFFFFFF, rec[:, 2 * j + 1] & 0xFFFFFFFF
        bits = torch.where(cols < 32, (lo[:, None] >> cols) & 1, (hi[:, None] >> (cols - 32)) & 1)
        plane_bits.append(bits)
        code |= bits.gather(1, pos[:, None]).squeeze(1) << j
    for j, bits in enumerate(plane_bits):
        same &= bits == ((code >> j) & 1)[:, None]
    before = (same & (cols[None, :] < pos[:, None])).sum(1)
    groups = torch.where(code < n_codes, code_groups.to(torch.int64)[code.clamp(max=max(n_codes - 1, 0))], -1)
    base = torch.zeros_like(keys)
    is_stored = code < stored
    if bool(is_stored.any()):
        base[is_stored] = rec[is_stored, 2 * P + code[is_stored]]
    slots = base + before
    dropped = code == stored
    if bool(dropped.any()) and table_fallback.numel():
        table = torch.searchsorted(table_base, keys[dropped], right=True) - 1
        slots[dropped] = table_fallback[table]
    return groups, slots


def ranked_from_row_map(
    weights: torch.Tensor,
    group_offsets: Sequence[int],
    capacity: Sequence[int],
    row_bytes: Sequence[int],
    row_map: torch.Tensor,
    range_ends: torch.Tensor,
    range_shift: torch.Tensor,
    table_base: torch.Tensor,
) -> RankedLayout:
    """`build_ranked_layout` of a store given by its int32 row map (the training store's layout,
    `RowGroupStore.op_layout`).

    Args:
        weights, group_offsets, capacity, row_bytes: the store's buffer and group tables.
        row_map, range_ends, range_shift: its row map (see `mixed_lookup`).
        table_base: int64 [T + 1], each table's first row key, then the rows.

    Returns:
        The layout.
    """
    groups = torch.bucketize(row_map, range_ends.to(row_map.dtype), right=True)
    slots = row_map.to(torch.int64) - range_shift.to(torch.int64)[groups]
    return build_ranked_layout(weights, group_offsets, capacity, row_bytes, groups, slots, table_base)


def ranked_group_rows(blocks: torch.Tensor, code_groups: torch.Tensor, rows: int) -> List[int]:
    """Rows per group id (fp32, fp16, int8, int4, int2, dropped, int1, int4s, int2s) under a ranked map, from
    its last block alone: a stored code's rows are that block's base plus its own rows of the code.

    Args:
        blocks, code_groups: the map.
        rows: the rows it covers (keys 0 .. rows - 1; the last block's padding is not counted).

    Returns:
        Nine counts, by group id.
    """
    counts = [0] * (INT2S + 1)
    if rows == 0:
        return counts
    n_codes = int(code_groups.numel())
    P = planes_for(n_codes)
    stored = n_codes - int(n_codes > 0 and int(code_groups[-1]) == DROPPED)
    last = (rows - 1) // BLOCK_ROWS
    keys = torch.arange(last * BLOCK_ROWS, rows, dtype=torch.int64)
    empty = torch.zeros(1, dtype=torch.int64)
    groups, _ = decode_ranked_map(blocks, code_groups, empty, empty[:0], keys)
    for c in range(stored):
        g = int(code_groups[c])
        counts[g] = int(blocks[last, 2 * P + c]) + int((groups == g).sum())
    counts[DROPPED] = rows - sum(counts)
    return counts

"""Initial values of embedding rows that do not depend on how a table is sharded: TorchRec's
default law, uniform(+-sqrt(1 / rows)), drawn in blocks of rows from generators seeded by
(seed, table name, block), so every shard of every plan and world size draws the same values
for the same rows."""

from __future__ import annotations

import zlib

import torch

INIT_BLOCK_ROWS = 1 << 16


def table_index(name: str) -> int:
    """A stable number per table name (not Python's salted hash).

    Args:
        name: the table's name.

    Returns:
        The CRC-32 of its UTF-8 bytes.
    """
    return zlib.crc32(name.encode())


def initial_rows(seed: int, table: str, num_rows: int, dim: int, row0: int, row1: int) -> torch.Tensor:
    """Rows [row0, row1) of a table's initial weights, uniform within +-sqrt(1 / num_rows).

    Args:
        seed: the run's seed.
        table: the table's name.
        num_rows: the table's rows (all shards).
        dim: its full dim.
        row0, row1: the rows wanted.

    Returns:
        fp32 [row1 - row0, dim].
    """
    bound = (1.0 / num_rows) ** 0.5
    out = []
    for b in range(row0 // INIT_BLOCK_ROWS, (row1 - 1) // INIT_BLOCK_ROWS + 1):
        g = torch.Generator().manual_seed((seed * 1_000_003 + table_index(table) * 7919 + b) % (2**63))
        lo = b * INIT_BLOCK_ROWS
        hi = min(lo + INIT_BLOCK_ROWS, num_rows)
        block = torch.rand((hi - lo, dim), generator=g) * (2 * bound) - bound
        out.append(block[max(row0, lo) - lo : min(row1, hi) - lo])
    return torch.cat(out) if out else torch.empty(0, dim)

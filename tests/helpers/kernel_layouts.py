"""Random group tables for the kernel tests (C++ and Triton): a buffer in FBGEMM's layout, a row
map over every group and dropped rows, jagged bags, and bitwise equality."""

import torch

from shark_torchrec.precision.priority import INT_BITS as BITS


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (torch.equal takes -0.0 for +0.0)."""
    return a.shape == b.shape and torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


def random_layout(gen, rows_per_table, dim, groups=5, fallbacks=None, alignment=1):
    """A buffer of `groups` group tables in FBGEMM's layout with random contents, and a row map
    that puts every row in a random group (or dropped, reading a fallback row in the fp32 table)."""
    n = sum(rows_per_table)
    fallbacks = len(rows_per_table) if fallbacks is None else fallbacks
    g = torch.randint(0, groups + 1, (n,), generator=gen)  # groups, plus `groups` = dropped
    counts = torch.bincount(g, minlength=groups + 1).tolist()
    cap = counts[:groups]
    cap[0] += fallbacks  # the fallback rows sit after the fp32 rows
    raw = (4 * dim, 2 * dim, dim + 4, dim // 2 + 4, dim // 4 + 4)
    rb = [(r + alignment - 1) // alignment * alignment for r in raw[:groups]]
    offsets, at = [], 0
    for k in range(groups):
        offsets.append(at)
        at += (cap[k] * rb[k] + 3) // 4 * 4
    w = torch.zeros(at, dtype=torch.uint8)
    for k in range(groups):
        tab = w[offsets[k] : offsets[k] + cap[k] * rb[k]].view(cap[k], rb[k])
        if k == 0:
            tab[:, : 4 * dim].view(torch.float32).copy_(torch.randn(cap[k], dim, generator=gen))
        elif k == 1:
            tab[:, : 2 * dim].view(torch.float16).copy_(torch.randn(cap[k], dim, generator=gen).half())
        else:
            sb = torch.stack([torch.rand(cap[k], generator=gen) * 0.1, torch.randn(cap[k], generator=gen)], 1)
            tab[:, :4].view(torch.float16).copy_(sb.half())
            tab[:, 4 : 4 + dim * BITS[k] // 8] = torch.randint(
                0, 256, (cap[k], dim * BITS[k] // 8), generator=gen, dtype=torch.uint8
            )
    # Row map numbers: group k's rows count from its range start; dropped rows from the end of
    # the stored ranges, shifted onto fallback slots counts[0] .. counts[0] + fallbacks - 1.
    starts = torch.tensor([0] + torch.cumsum(torch.tensor(cap), 0).tolist())
    range_ends = starts[1:].to(torch.int32)
    row_map = torch.empty(n, dtype=torch.int32)
    table_of = torch.repeat_interleave(torch.arange(len(rows_per_table)), torch.tensor(rows_per_table))
    for k in range(groups):
        m = (g == k).nonzero().flatten()
        row_map[m] = (starts[k] + torch.randperm(counts[k], generator=gen)).to(torch.int32)
    dropped = (g == groups).nonzero().flatten()
    # The dropped range starts at range_ends[-1]; value = end + table, slot = counts[0] + table.
    row_map[dropped] = (starts[groups] + table_of[dropped]).to(torch.int32)
    shift = [int(s) for s in starts[:groups]] + [int(starts[groups]) - counts[0]]
    range_ends = torch.cat([range_ends, range_ends[-1:].repeat(5 - groups)])
    shift = torch.tensor(shift[:groups] + [shift[0]] * (5 - groups) + [shift[-1]], dtype=torch.int32)
    return w, torch.tensor(offsets, dtype=torch.int64), row_map, range_ends, shift


def bags(gen, rows_per_table, batch, max_len, lengths=None):
    F = len(rows_per_table)
    if lengths is None:
        lengths = torch.randint(0, max_len + 1, (F * batch,), generator=gen)
    per_feature = lengths.view(F, batch).sum(1)
    values = torch.cat([torch.randint(0, r, (int(c),), generator=gen) for r, c in zip(rows_per_table, per_feature)])
    return values, lengths

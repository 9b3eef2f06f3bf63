"""The served lookup's time an id in each integer tier, side by side.

    .venv/bin/python bench/served_lookup_tiers.py [--rows 200000] [--dim 64] [--batch 4096] [--ids 32] [--rounds 15]

One table of `--rows` rows, every row in one tier (int8, int4, int4s, int2, int2s, int1),
random codes and scales, served by `torch.ops.shark.mixed_lookup_ranked` (the inference module's op) on the same
random ids (`--batch` bags of `--ids` ids, sum pooling). The tiers run in a shuffled order each
round; the table prints each tier's median time an id over the rounds with its min-max, and the
ratio of medians to int2, measured in this one run: what a 1-bit row (a served-only tier) costs
against the int2 rows it replaces in the tail, and a symmetric row (int4s, int2s: one scale
byte) against its fp16-scale twin.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shark_torchrec.kernels import mixed_lookup_ranked  # noqa: E402
from shark_torchrec.kernels.ranked_map import build_ranked_layout  # noqa: E402
from shark_torchrec.precision.priority import (  # noqa: E402
    INT1,
    INT2,
    INT2S,
    INT4,
    INT4S,
    INT8,
    SERVED_GROUP_NAMES,
    row_bytes,
)


def one_tier_layout(group: int, rows: int, dim: int, gen: torch.Generator):
    """A served layout of one table whose rows are all in `group`, random bytes and scales."""
    rb = [row_bytes(dim, g) for g in range(len(SERVED_GROUP_NAMES))]
    capacity = [0] * len(rb)
    capacity[group] = rows
    w = torch.randint(0, 256, (rows * rb[group],), dtype=torch.uint8, generator=gen)
    if group in (INT1, INT4S, INT2S):  # one magnitude (scale) code byte (here 0.3 to 1.0), then the codes
        w.view(rows, rb[group])[:, 0] = torch.randint(178, 193, (rows,), dtype=torch.uint8, generator=gen)
    else:  # integer rows: fp16 scale and bias
        w.view(rows, rb[group])[:, :4].view(torch.float16).copy_(torch.rand(rows, 2, generator=gen).half())
    groups = torch.full((rows,), group)
    return build_ranked_layout(w, [0] * len(rb), capacity, rb, groups, torch.arange(rows), torch.tensor([0, rows]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=4096)
    p.add_argument("--ids", type=int, default=32)
    p.add_argument("--rounds", type=int, default=15)
    args = p.parse_args()
    gen = torch.Generator().manual_seed(0)
    tiers = {
        SERVED_GROUP_NAMES[g]: one_tier_layout(g, args.rows, args.dim, gen)
        for g in (INT8, INT4, INT4S, INT2, INT2S, INT1)
    }
    values = torch.randint(0, args.rows, (args.batch * args.ids,), generator=gen)
    lengths = torch.full((args.batch,), args.ids)
    rest = (torch.tensor([0]), torch.tensor([args.rows]), values, lengths, None, args.dim, args.batch, "sum", 1, ["f"])
    times = {name: [] for name in tiers}
    order = list(tiers)
    rng = random.Random(0)
    for r in range(args.rounds + 2):
        rng.shuffle(order)
        for name in order:
            lay = tiers[name]
            layout = (lay.weights, lay.group_offsets, lay.blocks, lay.code_groups, lay.table_base, lay.table_fallback)
            t = time.perf_counter()
            mixed_lookup_ranked(*layout, *rest)
            if r >= 2:  # two warm-up rounds
                times[name].append((time.perf_counter() - t) / values.numel() * 1e9)
    base = statistics.median(times["int2"])
    print(f"{args.rows:,} rows of dim {args.dim}, {args.batch} bags of {args.ids} ids, {args.rounds} rounds")
    print("| tier | bytes a row | ns an id, median [min, max] | median / int2's |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        g = SERVED_GROUP_NAMES.index(name)
        med = statistics.median(ts)
        print(f"| {name} | {row_bytes(args.dim, g)} | {med:.1f} [{min(ts):.1f}, {max(ts):.1f}] | {med / base:.2f} |")


if __name__ == "__main__":
    main()

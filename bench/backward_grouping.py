"""The backward's first step, grouping a batch's ids by the row they read: the C++ op
(`torch.ops.shark.ids_by_row`, one radix sort) against its torch reference (a stable argsort
and `unique_consecutive`, `RowLookup._ids_by_row_torch`), on the same ids.

    .venv/bin/python bench/backward_grouping.py [--batch-sizes 1024 4096 16384] [--repeats 300]
        [--uniform]

The ids: 11 features of one id a bag, 3.6M rows in all (the size of `precision_speed.py`'s
default), each feature's ids Zipf-like (Pareto, shape 1.2: half of them its first row), or
with `--uniform` uniform over its table (nearly every id a distinct row). The two
run in turns, one call each, `--repeats` times; the table gives each one's median time (p10-p90)
and the ratio torch / op of the medians. It exits non-zero if the two ever disagree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from types import MethodType, SimpleNamespace

import torch
from tqdm import tqdm

from shark_torchrec.kernels import ids_by_row
from shark_torchrec.modules.row_lookup import RowLookup


def ids(batch_size: int, features: int, rows: int, seed: int, uniform: bool):
    """Lengths, ids and each feature's first row key: one id a bag, Zipf-like or uniform ids."""
    gen = torch.Generator().manual_seed(seed)
    per_table = rows // features
    feature_base = torch.arange(features, dtype=torch.int64) * per_table
    lengths = torch.ones(features * batch_size, dtype=torch.int64)
    u = torch.rand(features * batch_size, generator=gen, dtype=torch.float64)
    if uniform:
        values = (u * per_table).long()
    else:
        values = (u.pow(-1 / 1.2) - 1).long().clamp(max=per_table - 1)  # Pareto(1, 1.2) - 1
    return values, lengths, feature_base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--features", type=int, default=11)
    p.add_argument("--rows", type=int, default=3_600_000)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--uniform", action="store_true", help="uniform ids instead of Zipf-like")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    spread = "uniform" if args.uniform else "Zipf-like"
    print(f"{args.features} features, {args.rows:,} rows, {spread} ids, {args.threads} threads", end="")
    print(f", {args.repeats} turns each")
    print("| batch | ids | distinct rows | torch ms (p10-p90) | op ms (p10-p90) | torch / op |")
    print("|---|---|---|---|---|---|")
    for B in args.batch_sizes:
        values, lengths, feature_base = ids(B, args.features, args.rows, seed=B, uniform=args.uniform)
        store = SimpleNamespace(feature_names=[f"f{i}" for i in range(args.features)], feature_base=feature_base)
        store._bags_and_keys = MethodType(RowLookup._bags_and_keys, store)
        ways = {
            "torch": lambda: RowLookup._ids_by_row_torch(store, values, lengths, B),
            "op": lambda: ids_by_row(values, lengths, feature_base, B),
        }
        want, got = ways["torch"](), ways["op"]()
        if not all(torch.equal(a, b) for a, b in zip(want, got)):
            print(f"batch {B}: the op and the torch reference disagree", file=sys.stderr)
            return 1
        times = {k: [] for k in ways}
        for _ in tqdm(range(args.repeats), desc=f"batch {B}", leave=False):
            for name, fn in ways.items():
                t = time.perf_counter()
                fn()
                times[name].append((time.perf_counter() - t) * 1e3)

        def cell(ts):
            q = statistics.quantiles(ts, n=10)
            return f"{statistics.median(ts):.3f} ({q[0]:.3f}-{q[-1]:.3f})"

        ratio = statistics.median(times["torch"]) / statistics.median(times["op"])
        shape = f"| {B} | {values.numel():,} | {len(want[2]):,} |"
        print(f"{shape} {cell(times['torch'])} | {cell(times['op'])} | {ratio:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

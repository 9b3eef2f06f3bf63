"""Where a mixed-precision lookup + update spends its time, against FBGEMM's fused fp32 TBE.

    .venv/bin/python bench/precision_profile.py [--tables 11] [--rows 300000] [--repeats 15]

One store of `--tables` tables (dim 64, budget 0.35: fp32, fp16 and int8 rows) and the same
tables in FBGEMM's training TBE (row-wise Adagrad, fused), fed the same skewed ids (one id per
feature per sample, global batch 4096). Prints medians of forward and forward+backward for
both, measured side by side in one run, then a torch.profiler table of ours.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from fbgemm_gpu.split_table_batched_embeddings_ops_common import EmbeddingLocation
from fbgemm_gpu.split_table_batched_embeddings_ops_training import (
    ComputeDevice,
    SplitTableBatchedEmbeddingBagsCodegen,
)
from torch.profiler import profile

from shark_torchrec.modules.mixed_precision import starting_groups
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=11)
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args()
    T, R, D, B = args.tables, args.rows, args.dim, args.batch_size
    torch.manual_seed(0)
    policy = PrecisionPolicy(memory_budget=0.35, optimizer="rowwise_adagrad", learning_rate=0.1).resolved([D])
    store = RowGroupStore(
        [LocalTable(f"t{i}", R, D, global_rows=R, table_id=i) for i in range(T)],
        [f"f{i}" for i in range(T)],
        list(range(T)),
        policy,
        StepCounter(),
    )
    store.set_groups(starting_groups(store, policy, {f"t{i}": (R, D) for i in range(T)}))
    ids = (torch.rand(T * B) ** 3 * R).long()  # skewed: hot rows repeat
    lengths = torch.ones(T * B, dtype=torch.int64)
    labels = torch.ones(T * B)
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(R, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.1,
    )
    offsets = torch.arange(T * B + 1)

    def ours_fwd():
        store(ids, lengths, labels, B)

    def ours_step():
        store(ids, lengths, labels, B).sum().backward()

    def fbgemm_fwd():
        tbe(ids, offsets)

    def fbgemm_step():
        tbe(ids, offsets).sum().backward()

    rows = {
        name: median_ms(fn, args.repeats)
        for name, fn in (
            ("ours forward", ours_fwd),
            ("fbgemm forward", fbgemm_fwd),
            ("ours forward+backward", ours_step),
            ("fbgemm forward+backward", fbgemm_step),
        )
    }
    print(
        f"{T} tables x {R:,} rows, dim {D}, {T * B:,} ids ({len(torch.unique(ids)):,} distinct rows); "
        f"groups fp32/fp16/int8 = {store.group_counts()}; medians of {args.repeats}"
    )
    for name, ms in rows.items():
        print(f"  {name:<25} {ms:8.2f} ms")
    print(
        f"  ratio ours/fbgemm: forward {rows['ours forward'] / rows['fbgemm forward']:.2f}, "
        f"forward+backward {rows['ours forward+backward'] / rows['fbgemm forward+backward']:.2f}"
    )
    with profile() as prof:
        for _ in range(5):
            ours_step()
    print("\nours, forward+backward, 5 steps, by self CPU time:")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

"""Where a mixed-precision lookup + update spends its time, against FBGEMM's fused fp32 TBE.

    .venv/bin/python bench/precision_profile.py [--tables 11] [--rows 300000] [--repeats 7]
        [--calls 5] [--mixes fp32,fp16,int8@0.35 int8,int4,int2@0.125] [--profile] [--separate]

One store per tier mix (`TIERS@BUDGET`; dim 64) and the same tables in FBGEMM's training TBE
(fp32, row-wise Adagrad, fused), fed the same skewed ids (one id per feature per sample,
global batch 4096). The store's groups come from priorities: a few steps of training on those
ids, then a reassignment, so that hot rows sit in the precise tiers as in a run. Each repeat
times every function `--calls` times in turn (FBGEMM, then each mix, forward then forward +
backward), so that all see the same machine state; the ratios are the median (min-max) of the
repeats' own ratios ours/FBGEMM. `--profile` adds a torch.profiler table of each mix's steps.

The step (forward + backward) is timed two ways, each against FBGEMM's step of the same kind:
`step` backpropagates `output.sum()`, whose gradient is one value expanded over the output, so
both sides also pay for `.sum()` and for making that gradient contiguous (a copy of the whole
output, the same on both sides, which brings every ratio nearer 1); `model step` backpropagates
a fixed contiguous random gradient of the output's shape, as a model's layers above the lookup
hand it down, so the ratio is that of the embedding work alone.

With `--separate`, each mix's model step is also timed with its backward as separate ops (the
gradient sums, the mean squares, the Adagrad state and the row update one after the other, as
before `torch.ops.shark.row_grads_update_`; the same store, so the same rows), in the same
repeats: the fused backward's gain, side by side.
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
from tqdm import tqdm

from shark_torchrec.modules.mixed_precision import starting_groups
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.reassign import reassign_stores
from shark_torchrec.modules.row_groups import LocalTable, RowGroupStore, StepCounter
from shark_torchrec.precision.priority import GROUP_NAMES


def mean_ms(fn, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t) / calls * 1e3


def spread(xs) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}-{max(xs):.2f})"


def make_store(mix: str, T: int, R: int, D: int, ids, lengths, labels, B: int) -> RowGroupStore:
    tiers, budget = mix.split("@")
    policy = PrecisionPolicy(
        memory_budget=float(budget), tiers=tuple(tiers.split(",")), optimizer="rowwise_adagrad", learning_rate=0.1
    ).resolved([D])
    tables = {f"t{i}": (R, D) for i in range(T)}
    store = RowGroupStore(
        [LocalTable(f"t{i}", R, D, global_rows=R, table_id=i) for i in range(T)],
        [f"f{i}" for i in range(T)],
        list(range(T)),
        policy,
        StepCounter(),
    )
    store.set_groups(starting_groups(store, policy, tables))
    for _ in range(3):  # scores for the hot rows, then groups by priority
        store(ids, lengths, labels, B).sum().backward()
        store.step.value += 1
    reassign_stores([store], policy, tables, None)
    return store


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tables", type=int, default=11)
    p.add_argument("--rows", type=int, default=300_000)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--mixes", nargs="+", default=["fp32,fp16,int8@0.35", "int8,int4,int2@0.125"])
    p.add_argument("--profile", action="store_true")
    p.add_argument("--separate", action="store_true", help="also time the model step with the backward's ops apart")
    args = p.parse_args()
    T, R, D, B = args.tables, args.rows, args.dim, args.batch_size
    torch.manual_seed(0)
    ids = (torch.rand(T * B) ** 3 * R).long()  # skewed: hot rows repeat
    lengths = torch.ones(T * B, dtype=torch.int64)
    labels = (torch.rand(T * B) < 0.3).float()
    tbe = SplitTableBatchedEmbeddingBagsCodegen(
        [(R, D, EmbeddingLocation.HOST, ComputeDevice.CPU)] * T,
        optimizer=EmbOptimType.EXACT_ROWWISE_ADAGRAD,
        learning_rate=0.1,
    )
    offsets = torch.arange(T * B + 1)
    upstream = torch.randn(B, T * D) * 1e-3  # a model-like output gradient: contiguous, one value a place
    stores = {mix: make_store(mix, T, R, D, ids, lengths, labels, B) for mix in args.mixes}

    def fwd(store):
        return lambda: store(ids, lengths, labels, B)

    def step(store):
        return lambda: store(ids, lengths, labels, B).sum().backward()

    def model_step(store):
        return lambda: store(ids, lengths, labels, B).backward(upstream)

    def model_step_separate(store):
        def step():
            store.can_fuse_backward = lambda: False  # (an instance attribute hides the method)
            try:
                store(ids, lengths, labels, B).backward(upstream)
            finally:
                del store.can_fuse_backward

        return step

    fns = {
        ("fbgemm", "forward"): lambda: tbe(ids, offsets),
        ("fbgemm", "step"): lambda: tbe(ids, offsets).sum().backward(),
        ("fbgemm", "model step"): lambda: tbe(ids, offsets).backward(upstream),
    }
    for mix, store in stores.items():
        fns[(mix, "forward")] = fwd(store)
        fns[(mix, "step")] = step(store)
        fns[(mix, "model step")] = model_step(store)
        if args.separate:
            fns[(mix, "model step, separate ops")] = model_step_separate(store)
    for fn in fns.values():  # warm up
        fn()
    times = {k: [] for k in fns}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for k, fn in fns.items():
            times[k].append(mean_ms(fn, args.calls))
    print(
        f"{T} tables x {R:,} rows, dim {D}, {T * B:,} ids ({len(torch.unique(ids)):,} distinct rows); "
        f"ms a call, mean of {args.calls} calls; median (min-max) of {args.repeats} interleaved repeats"
    )
    print(
        "| mix | rows per group | forward ms | FBGEMM forward ms | forward ratio "
        "| step ms | FBGEMM step ms | step ratio | model step ms | FBGEMM model step ms | model step ratio |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for mix, store in stores.items():
        counts = store.group_counts()
        groups = ", ".join(f"{GROUP_NAMES[g]} {c:,}" for g, c in zip(store.policy.groups, counts))
        ratio = {
            kind: [a / b for a, b in zip(times[(mix, kind)], times[("fbgemm", kind)])]
            for kind in ("forward", "step", "model step")
        }
        print(
            f"| {mix} | {groups} | {spread(times[(mix, 'forward')])} | {spread(times[('fbgemm', 'forward')])} | "
            f"{spread(ratio['forward'])} | {spread(times[(mix, 'step')])} | {spread(times[('fbgemm', 'step')])} | "
            f"{spread(ratio['step'])} | {spread(times[(mix, 'model step')])} | "
            f"{spread(times[('fbgemm', 'model step')])} | {spread(ratio['model step'])} |"
        )
    if args.separate:
        print("\n| mix | model step ms, fused backward | model step ms, separate ops | fused / separate |")
        print("|---|---|---|---|")
        for mix in stores:
            fused, apart = times[(mix, "model step")], times[(mix, "model step, separate ops")]
            print(f"| {mix} | {spread(fused)} | {spread(apart)} | {spread([a / b for a, b in zip(fused, apart)])} |")
    if args.profile:
        for mix, store in stores.items():
            with profile() as prof:
                for _ in range(5):
                    model_step(store)()
            print(f"\n{mix}, forward+backward (model step), 5 steps, by self CPU time:")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


if __name__ == "__main__":
    main()

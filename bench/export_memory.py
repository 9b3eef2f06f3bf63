"""Memory and time of putting a model's fp32 tables into serving tiers (`regroup_for_serving`,
what `shark export CKPT --tiers ... --memory-budget B` does to a model trained in fp32).

    .venv/bin/python bench/export_memory.py [--scale 3] [--points int4,int2@0.1 int4,int2,dropped@0.06 int4,int1@0.06]

A DLRM's stock fp32 tables (synthetic schema, `--scale` x the default cardinalities, dim 64;
scale 3 is 3.8 M rows, 0.98 GB) are ranked by their occurrences in the first `--count-rows`
training rows (204,800: 50 batches of 4,096) and regrouped at each point, each point in a
fresh process. A thread samples the process's resident memory every 5 ms while the regrouping runs; the table
gives the peak above the resident memory just before it, as a multiple of the fp32 tables, and
the wall time. One invocation, one process a point: the figures vary by a few tenths of the
fp32 tables between invocations (freed memory the allocator has not returned yet counts).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss() -> int:
    """This process's resident bytes (Linux)."""
    return int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) * 1024


def one_point(scale: float, point: str, count_rows: int, trained: bool = False) -> dict:
    """Regroup fresh fp32 tables at `point` ("tier,tier@budget") in this process and measure it;
    with `trained`, the tables as a model trained with priorities holds them (see `main`)."""
    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, str(ROOT / "bench"))
    import torch
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    from common import FirstRows
    from shark_torchrec.config import DataConfig, ModelConfig
    from shark_torchrec.data import open_dataset
    from shark_torchrec.jobs.export import ServingTiers, regroup_for_serving, training_priorities
    from shark_torchrec.models.dlrm import build_dlrm, table_configs
    from shark_torchrec.modules.precision_policy import PrecisionPolicy

    torch.manual_seed(0)
    tiers, _, budget = point.partition("@")
    data = open_dataset(DataConfig(synthetic_scale=scale), 0)
    tables = table_configs(data.schema, 64)
    stock = EmbeddingBagCollection(tables=tables)

    counts = training_priorities(stock.embedding_bag_configs(), FirstRows(data, count_rows), PrecisionPolicy().alpha)
    ebc = stock
    if trained:
        import gc

        from shark_torchrec.modules.mixed_precision import to_mixed_precision

        ebc = to_mixed_precision(stock, PrecisionPolicy(mode="shark", memory_budget=0.35))
        del stock
        gc.collect()
        store = ebc.stores[0]
        store.row_priority.copy_(torch.cat([counts[t.name] for t in store.tables]).float())
        ebc.step_counter.value = 1  # scores as of step 1, their own step 0: decayed once alike
        ebc.reassign()  # hot rows in the precise tiers, as after training
        counts = None
    model = build_dlrm(data.schema, ModelConfig(embedding_dim=64), ebc=ebc, seed=0)
    fp32 = sum(c.num_embeddings for c in tables) * 64 * 4
    before = rss()
    peak, done = [before], threading.Event()

    def watch() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.005)

    watcher = threading.Thread(target=watch)
    watcher.start()
    start = time.perf_counter()
    regroup_for_serving(model, ServingTiers(tuple(tiers.split(",")), float(budget), "model"), counts=counts)
    seconds = time.perf_counter() - start
    done.set()
    watcher.join()
    return {
        "point": point,
        "fp32_bytes": fp32,
        "peak_above_fp32": (peak[0] - before) / fp32,
        "seconds": seconds,
        "rows": sum(c.num_embeddings for c in tables),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--points", nargs="+", default=["int4,int2@0.1", "int4,int2,dropped@0.06", "int4,int1@0.06"])
    p.add_argument("--count-rows", type=int, default=204_800, help="training rows the tiers are ranked on")
    p.add_argument(
        "--trained",
        action="store_true",
        help="the tables as a model trained with priorities: our module in the paper's tiers at 0.35, each row's "
        "score its count, reassigned once (what `shark compress --serve-tiers` exports)",
    )
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # a child process: one point
    args = p.parse_args()
    if args.one is not None:
        print(json.dumps(one_point(args.scale, args.one, args.count_rows, args.trained)))
        return
    rows = []
    for point in args.points:
        out = subprocess.run(
            [sys.executable, __file__, "--scale", str(args.scale), "--count-rows", str(args.count_rows)]
            + (["--trained"] if args.trained else [])
            + ["--one", point],
            check=True,
            capture_output=True,
            text=True,
        )
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    first = rows[0]
    print(
        f"`bench/export_memory.py --scale {args.scale} --points {' '.join(args.points)}"
        f"{' --trained' if args.trained else ''}` "
        f"({first['rows']:,} rows, fp32 tables {first['fp32_bytes'] / 1e9:.2f} GB; one process a point)\n"
    )
    print("| point | peak memory above the model, x fp32 tables | seconds |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['point']} | +{r['peak_above_fp32']:.2f}x | {r['seconds']:.1f} |")


if __name__ == "__main__":
    main()

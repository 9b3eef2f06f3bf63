"""Training throughput and peak memory of `shark train` on synthetic data, 1 and 2 ranks.

Each configuration runs REPEATS times as a fresh process (so peak RSS is its own); the
table reports medians and the 2-rank/1-rank ratio measured in the same invocation.

    .venv/bin/python bench/train_throughput.py [--repeats 3] [--steps 60] [--batch-size 4096]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import shark_train  # noqa: E402


def run_once(nproc: int, repeat: int, args: argparse.Namespace, tmp: Path) -> dict:
    out = tmp / f"n{nproc}-r{repeat}"
    cmd = [
        "--nproc",
        str(nproc),
        "--synthetic-train-rows",
        str(args.steps * args.batch_size),
        "--synthetic-eval-rows",
        "4096",
        "--batch-size",
        str(args.batch_size),
        "--eval-batch-size",
        "4096",
        "--embedding-dim",
        str(args.embedding_dim),
    ]
    m = shark_train(cmd, out)
    return {
        "samples_per_s": m["steps"] * args.batch_size / m["train_seconds"],
        "peak_rss_gib": m["peak_rss_bytes"] / 2**30,
        "embedding_bytes": m["embedding_bytes"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--json-out", default="")
    args = p.parse_args()
    results = {1: [], 2: []}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(n, r) for r in range(args.repeats) for n in (1, 2)]  # interleaved: drift hits both
        for nproc, repeat in tqdm(runs, desc="bench runs"):
            results[nproc].append(run_once(nproc, repeat, args, Path(tmp)))
    summary = {}
    for nproc, rs in results.items():
        summary[nproc] = {
            "samples_per_s_median": statistics.median(r["samples_per_s"] for r in rs),
            "samples_per_s_all": [round(r["samples_per_s"]) for r in rs],
            "peak_rss_gib_median": statistics.median(r["peak_rss_gib"] for r in rs),
        }
    emb = results[1][0]["embedding_bytes"]
    print(
        f"synthetic tables: {emb / 2**20:.0f} MiB fp32 embeddings, dim {args.embedding_dim}, "
        f"global batch {args.batch_size}, {args.steps} steps, {args.repeats} repeats"
    )
    print(f"{'ranks':>5} {'samples/s (median)':>20} {'all runs':>28} {'peak RSS/rank GiB':>18}")
    for nproc, s in summary.items():
        print(
            f"{nproc:>5} {s['samples_per_s_median']:>20.0f} {str(s['samples_per_s_all']):>28} "
            f"{s['peak_rss_gib_median']:>18.2f}"
        )
    print(
        "2-rank / 1-rank throughput ratio: "
        f"{summary[2]['samples_per_s_median'] / summary[1]['samples_per_s_median']:.2f}"
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()

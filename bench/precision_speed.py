"""Training speed of the mixed-precision module against stock TorchRec's fused fp32 EBC.

    .venv/bin/python bench/precision_speed.py [--repeats 3] [--steps 60] [--scale 3] [--ranks 1,2]
        [--mixes fp32,fp16,int8@0.35 int8,int4,int2@0.125]

Synthetic data with tables of a few million rows in all (`--scale` multiplies every field's
cardinality; scale 3 gives 3.6M rows), global batch 4096, dim 64: lookups dominate. For each
rank count, an fp32 run and a run of each tier mix (`TIERS@BUDGET`) alternate within every
repeat (same invocation, same machine state); the table reports median samples/s, the step-time
ratio mix/fp32 as the median (min-max) of the repeats' own ratios, and the share of the mix's
training time spent on priority updates and on reassignments.
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


def run_once(mix: str, nproc: int, args, out: Path) -> dict:
    cmd = [
        "--nproc",
        str(nproc),
        "--synthetic-train-rows",
        str(args.steps * args.batch_size),
        "--synthetic-eval-rows",
        "4096",
        "--synthetic-scale",
        str(args.scale),
        "--batch-size",
        str(args.batch_size),
        "--eval-batch-size",
        "4096",
        "--embedding-dim",
        str(args.embedding_dim),
    ]
    if mix == "fp32":
        cmd += ["--precision", "fp32"]
    else:
        tiers, budget = mix.split("@")
        cmd += [
            "--precision",
            "shark",
            "--tiers",
            *tiers.split(","),
            "--memory-budget",
            budget,
            "--reassign-every",
            str(args.reassign_every),
        ]
    m = shark_train(cmd, out)
    return {
        "samples_per_s": m["steps"] * args.batch_size / m["train_seconds"],
        "train_seconds": m["train_seconds"],
        "priority_seconds": m.get("priority_seconds", 0.0),
        "reassign_seconds": m.get("reassign_seconds", 0.0),
        "memory_ratio": m["embedding_bytes"] / m["fp32_embedding_bytes"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=4096)
    p.add_argument("--embedding-dim", type=int, default=64)
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--ranks", default="1,2")
    p.add_argument("--mixes", nargs="+", default=["fp32,fp16,int8@0.35", "int8,int4,int2@0.125"])
    p.add_argument("--reassign-every", type=int, default=100)
    p.add_argument("--json-out", default="")
    args = p.parse_args()
    ranks = [int(n) for n in args.ranks.split(",")]
    kinds = ["fp32", *args.mixes]
    results = {(n, k): [] for n in ranks for k in kinds}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(n, k, r) for r in range(args.repeats) for n in ranks for k in kinds]
        for n, k, r in tqdm(jobs, desc="runs"):
            results[(n, k)].append(run_once(k, n, args, Path(tmp) / f"{k.replace(',', '-')}-n{n}-r{r}"))
    print(
        f"batch {args.batch_size}, dim {args.embedding_dim}, scale {args.scale}, {args.steps} steps, "
        f"reassigning every {args.reassign_every} steps; medians of {args.repeats} (ratios: of the repeats' own)"
    )
    print(
        "| ranks | tiers@budget | samples/s | fp32 samples/s | step time ratio, median (min-max) | "
        "priority % | reassign % | bytes / fp32 |"
    )
    print("|---|---|---|---|---|---|---|---|")
    summary = []
    for n in ranks:
        f = results[(n, "fp32")]
        fs = statistics.median(r["samples_per_s"] for r in f)
        for k in args.mixes:
            s = results[(n, k)]
            ss = statistics.median(r["samples_per_s"] for r in s)
            ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(f, s)]
            pr = statistics.median(r["priority_seconds"] / r["train_seconds"] for r in s) * 100
            re = statistics.median(r["reassign_seconds"] / r["train_seconds"] for r in s) * 100
            mem = statistics.median(r["memory_ratio"] for r in s)
            summary.append(
                {
                    "ranks": n,
                    "mix": k,
                    "fp32_samples_per_s": fs,
                    "shark_samples_per_s": ss,
                    "step_time_ratio": statistics.median(ratios),
                    "ratio_min": min(ratios),
                    "ratio_max": max(ratios),
                    "priority_pct": pr,
                    "reassign_pct": re,
                    "memory_ratio": mem,
                }
            )
            print(
                f"| {n} | {k} | {ss:,.0f} | {fs:,.0f} | "
                f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}) "
                f"| {pr:.1f} | {re:.1f} | {mem:.3f} |"
            )
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"runs": {f"{k[0]}-{k[1]}": v for k, v in results.items()}, "summary": summary}, indent=2)
        )


if __name__ == "__main__":
    main()

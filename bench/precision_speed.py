"""Training speed of the mixed-precision module against stock TorchRec's fused fp32 EBC.

    .venv/bin/python bench/precision_speed.py [--repeats 3] [--steps 60] [--scale 3]

Synthetic data with tables of a few million rows in all (`--scale` multiplies every field's
cardinality; scale 3 gives 3.6M rows), global batch 4096, dim 64: lookups dominate. For 1
and 2 ranks, fp32 and shark runs alternate (same invocation, same machine state); the table
reports median samples/s, the step-time ratio shark/fp32, and the share of shark's training
time spent on priority updates and on reassignments.
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


def run_once(precision: str, nproc: int, args, out: Path) -> dict:
    cmd = [
        "--precision", precision,
        "--nproc", str(nproc),
        "--synthetic-train-rows", str(args.steps * args.batch_size),
        "--synthetic-eval-rows", "4096", "--synthetic-scale", str(args.scale),
        "--batch-size", str(args.batch_size), "--eval-batch-size", "4096",
        "--embedding-dim", str(args.embedding_dim),
    ]
    if precision == "shark":
        cmd += ["--memory-budget", str(args.budget), "--reassign-every", str(args.reassign_every)]
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
    p.add_argument("--budget", type=float, default=0.35)
    p.add_argument("--reassign-every", type=int, default=20)
    p.add_argument("--json-out", default="")
    args = p.parse_args()
    results = {(n, prec): [] for n in (1, 2) for prec in ("fp32", "shark")}
    with tempfile.TemporaryDirectory() as tmp:
        jobs = [(n, prec, r) for r in range(args.repeats) for n in (1, 2) for prec in ("fp32", "shark")]
        for n, prec, r in tqdm(jobs, desc="runs"):
            results[(n, prec)].append(run_once(prec, n, args, Path(tmp) / f"{prec}-n{n}-r{r}"))
    print(f"batch {args.batch_size}, dim {args.embedding_dim}, scale {args.scale}, {args.steps} steps, "
          f"shark budget {args.budget} reassigning every {args.reassign_every} steps; medians of {args.repeats}")
    print(f"{'ranks':>5} {'fp32 samples/s':>15} {'shark samples/s':>16} {'step time ratio':>16} "
          f"{'priority %':>10} {'reassign %':>10} {'shark bytes/fp32':>16}")
    summary = []
    for n in (1, 2):
        f, s = results[(n, "fp32")], results[(n, "shark")]
        fs = statistics.median(r["samples_per_s"] for r in f)
        ss = statistics.median(r["samples_per_s"] for r in s)
        pr = statistics.median(r["priority_seconds"] / r["train_seconds"] for r in s) * 100
        re = statistics.median(r["reassign_seconds"] / r["train_seconds"] for r in s) * 100
        mem = statistics.median(r["memory_ratio"] for r in s)
        summary.append({"ranks": n, "fp32_samples_per_s": fs, "shark_samples_per_s": ss, "step_time_ratio": fs / ss,
                        "priority_pct": pr, "reassign_pct": re, "memory_ratio": mem})
        print(f"{n:>5} {fs:>15,.0f} {ss:>16,.0f} {fs / ss:>16.2f} {pr:>10.1f} {re:>10.1f} {mem:>16.3f}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"runs": {f"{k[0]}-{k[1]}": v for k, v in results.items()}, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()

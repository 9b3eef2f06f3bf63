"""Test AUC and log loss of `shark train` over several seeds.

    .venv/bin/python bench/train_quality.py --seeds 5 -- --data csv:../shared/data/frappe --label click

Everything after `--` is passed to `shark train`; each seed is a fresh process.
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
from common import shark_train, split_passthrough  # noqa: E402


def main() -> None:
    own, extra = split_passthrough(sys.argv[1:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--json-out", default="")
    args = p.parse_args(own)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in tqdm(range(args.seeds), desc="seeds"):
            out = Path(tmp) / f"s{seed}"
            m = shark_train([*extra, "--seed", str(seed)], out)
            rows.append(
                {
                    "seed": seed,
                    "test_auc": m["test_auc"],
                    "test_logloss": m["test_logloss"],
                    "train_seconds": m["train_seconds"],
                    "epochs": m["epochs_completed"],
                }
            )
    print("shark train " + " ".join(extra))
    print(f"{'seed':>4} {'test AUC':>9} {'logloss':>8} {'epochs':>6} {'train s':>8}")
    for r in rows:
        print(
            f"{r['seed']:>4} {r['test_auc']:>9.4f} {r['test_logloss']:>8.4f} "
            f"{r['epochs']:>6} {r['train_seconds']:>8.1f}"
        )
    for k in ("test_auc", "test_logloss"):
        v = [r[k] for r in rows]
        print(
            f"{k}: mean {statistics.mean(v):.4f}  std {statistics.stdev(v) if len(v) > 1 else 0:.4f}  "
            f"min {min(v):.4f}  max {max(v):.4f}"
        )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()

"""Memory and quality of each row-precision policy against its fp32 twin, over paired seeds.

    .venv/bin/python bench/precision_quality.py --seeds 5 --dims 16,64 --out bench/results/frappe \
        -- --data csv:../shared/data/frappe --label click --epochs 15 --early-stopping-patience 2
    .venv/bin/python bench/precision_quality.py --seeds 5 --cv 5 --dims 16,64 --out bench/results/criteo \
        -- --data criteo:../shared/data/criteo_kaggle_8k --epochs 3 --early-stopping-patience 1

For every (dim, seed) each method trains with the same seed as its fp32 twin: the same
initial values (before rounding into groups) and the same data order. Reported: embedding
bytes over fp32 bytes, test AUC and log loss, and the mean and spread of the per-seed AUC
difference to fp32. Writes `results.json`, `table.md` and `auc_vs_memory.png` into --out.
Everything after `--` goes to `shark train`; each run is a fresh process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).parent))
from common import pyplot, shark_train, split_passthrough  # noqa: E402

METHODS = ("fp32", "fp16", "int8", "freq", "shark")


def run(extra, method, dim, seed, budget, out: Path, cv: int = 0) -> dict:
    flags = ["--precision", method, "--embedding-dim", str(dim), "--seed", str(seed)]
    if cv:
        flags += ["--folds", str(cv), "--fold", str(seed)]  # "seed" s is fold s
    if method in ("freq", "shark"):
        flags += ["--memory-budget", str(budget)]
    m = shark_train([*extra, *flags], out)
    return {
        "method": method,
        "dim": dim,
        "seed": seed,
        "memory_ratio": m["embedding_bytes"] / m["fp32_embedding_bytes"],
        "test_auc": m["test_auc"],
        "test_logloss": m["test_logloss"],
        "rows": [m["rows_fp32"], m["rows_fp16"], m["rows_int8"]],
        "train_seconds": m["train_seconds"],
    }


def summarize(rows, methods, dims):
    out = []
    for dim in dims:
        base = {r["seed"]: r for r in rows if r["dim"] == dim and r["method"] == "fp32"}
        for method in methods:
            rs = [r for r in rows if r["dim"] == dim and r["method"] == method]
            if not rs:
                continue
            diffs = [r["test_auc"] - base[r["seed"]]["test_auc"] for r in rs if r["seed"] in base]
            out.append(
                {
                    "dim": dim,
                    "method": method,
                    "seeds": len(rs),
                    "memory_ratio": statistics.mean(r["memory_ratio"] for r in rs),
                    "test_auc": statistics.mean(r["test_auc"] for r in rs),
                    "test_logloss": statistics.mean(r["test_logloss"] for r in rs),
                    "auc_diff_mean": statistics.mean(diffs) if diffs else float("nan"),
                    "auc_diff_std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
                }
            )
    return out


def markdown(summary, command) -> str:
    lines = [
        f"`{command}`",
        "",
        "| dim | method | emb. bytes / fp32 | test AUC | log loss | AUC - fp32 (mean ± std over seeds) |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {s['dim']} | {s['method']} | {s['memory_ratio']:.3f} | {s['test_auc']:.4f} | {s['test_logloss']:.4f} | "
            f"{s['auc_diff_mean']:+.4f} ± {s['auc_diff_std']:.4f} (n={s['seeds']}) |"
        )
    return "\n".join(lines) + "\n"


def plot(summary, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for dim, marker in zip(sorted({s["dim"] for s in summary}), "os^"):
        for s in (s for s in summary if s["dim"] == dim):
            ax.errorbar(
                s["memory_ratio"],
                s["auc_diff_mean"],
                yerr=s["auc_diff_std"],
                fmt=marker,
                capsize=3,
                color=colors.get(s["method"], "k"),
                label=f"{s['method']} dim {dim}",
            )
    ax.legend(fontsize=7, ncol=2)
    ax.axhline(0, color="gray", lw=0.5)
    ax.set_xlabel("embedding bytes / fp32 bytes")
    ax.set_ylabel("test AUC - fp32 twin")
    ax.set_title("Row precision: memory against AUC")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    argv = sys.argv[1:]
    own, extra = split_passthrough(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--dims", default="16,64")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--budget", type=float, default=0.35, help="memory budget of freq and shark")
    p.add_argument(
        "--budget-dim16",
        type=float,
        default=0.5,
        help="budget at dim 16, where int8 rows and the row map alone take 0.39",
    )
    p.add_argument("--cv", type=int, default=0, help="k-fold cross-validation: run s uses fold s (seeds = folds)")
    p.add_argument("--out", required=True)
    args = p.parse_args(own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    dims = [int(d) for d in args.dims.split(",")]
    methods = args.methods.split(",")
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    done = {(r["method"], r["dim"], r["seed"]) for r in rows}
    jobs = [(m, d, s) for d in dims for s in range(args.seeds) for m in methods if (m, d, s) not in done]
    for method, dim, seed in tqdm(jobs, desc="runs"):
        budget = args.budget_dim16 if dim <= 16 else args.budget
        rows.append(run(extra, method, dim, seed, budget, out / "runs" / f"{method}-d{dim}-s{seed}", args.cv))
        results_path.write_text(json.dumps(rows, indent=2))  # resumable: finished runs are kept
    summary = summarize(rows, methods, dims)
    command = "bench/precision_quality.py " + " ".join(argv)
    text = markdown(summary, command)
    (out / "table.md").write_text(text)
    plot(summary, out / "auc_vs_memory.png")
    print(text)


if __name__ == "__main__":
    main()

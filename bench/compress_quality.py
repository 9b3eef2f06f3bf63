"""The paper's Table 4 on our data: base, F-Q, F-P and F-Q + F-P, over paired seeds.

    .venv/bin/python bench/compress_quality.py --seeds 5 --out DIR -- --data csv:../shared/data/frappe --label click \\
        --epochs 10 --early-stopping-patience 2 --target-memory 0.25 --max-auc-drop 0.002

Per seed (`--seed s`, or fold s with `--cv`): one `shark compress` run in DIR/runs/s<s> (base,
F-P, F-Q + F-P), then baselines written into that run's `baselines/` folder, each starting from
the same base checkpoint: `fq` (F-Q alone: our module at the budget max(R, int8 floor)),
`fp16`, `int8` and `freq` (the same fine-tuning), and `fp_permutation` (the pruning loop ranked
by Permutation). Then `shark report` for the run. Memory is embedding bytes over the base
model's fp32 bytes. Finished seeds are kept (the script resumes).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import split_passthrough  # noqa: E402
from shark_torchrec.config import parse_cli  # noqa: E402
from shark_torchrec.data import open_dataset  # noqa: E402
from shark_torchrec.precision.priority import min_budget  # noqa: E402

SHARK = str(Path(sys.executable).parent / "shark")
ROWS = ("base (fp32)", "F-Q", "F-P", "F-Q + F-P")


def sh(*args: str) -> None:
    proc = subprocess.run([SHARK, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: shark {' '.join(args)}\n{proc.stderr[-3000:]}")


def one_seed(extra, seed: int, cv: int, run: Path) -> dict:
    common = [*extra, "--seed", str(seed), "--no-progress"] + (["--folds", str(cv), "--fold", str(seed)] if cv else [])
    cfg = parse_cli(common, prog="compress_quality")
    if not (run / "metrics.json").is_file():
        sh("compress", *common, "--out", str(run), *(["--resume"] if (run / "stages.json").is_file() else []))
    base_ckpt = json.loads((run / "stages.json").read_text())["base"]["checkpoint"]
    data = open_dataset(cfg.dataset, seed)
    steps = data.num_batches("train", cfg.train.batch_size)
    finetune = ["--init-from", base_ckpt, "--epochs", str(cfg.compress.quant_epochs),
                "--eval-every", str(max(1, steps // max(cfg.compress.quant_evals_per_epoch, 1))), "--early-stopping-patience", "2"]
    budget = math.ceil(max(cfg.prune.target_memory, min_budget(cfg.model.embedding_dim)) * 1e4) / 1e4
    baselines = {
        "fq": ["--precision", "shark", "--memory-budget", f"{budget:.4f}"],
        "fp16": ["--precision", "fp16"],
        "int8": ["--precision", "int8"],
        "freq": ["--precision", "freq", "--memory-budget", f"{budget:.4f}"],
    }
    for name, flags in baselines.items():
        out = run / "baselines" / name
        if not (out / "metrics.json").is_file():
            sh("train", *_without(common, ("--epochs", "--early-stopping-patience", "--eval-every")), *finetune, *flags, "--out", str(out))
    out = run / "baselines" / "fp_permutation"
    if not (out / "metrics.json").is_file():
        sh("prune", *common, "--checkpoint", base_ckpt, "--method", "permutation", "--out", str(out))
    sh("report", str(run))
    from shark_torchrec.report import collect

    info = collect(run)
    by_name = {p["name"]: p for p in info["points"] + info["baselines"]}
    return {
        "seed": seed,
        "rows": {
            "base (fp32)": by_name["base (fp32)"],
            "F-Q": by_name["fq"],
            "F-P": by_name.get("F-P", by_name["base (fp32)"]),
            "F-Q + F-P": by_name["F-Q + F-P"],
            **{n: by_name[n] for n in ("fp16", "int8", "freq", "fp_permutation")},
        },
        "kept_fields": info["stages"]["prune"]["kept_fields"],
    }


def _without(args, flags):
    """`args` minus each flag in `flags` and its value."""
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
            continue
        if a in flags:
            skip = True
            continue
        out.append(a)
    return out


def summarize(results):
    names = list(results[0]["rows"])
    out = []
    for n in names:
        auc = [r["rows"][n]["auc"] for r in results]
        diff = [r["rows"][n]["auc"] - r["rows"]["base (fp32)"]["auc"] for r in results]
        out.append({
            "name": n,
            "auc": statistics.mean(auc),
            "logloss": statistics.mean(r["rows"][n]["logloss"] for r in results),
            "memory": statistics.mean(r["rows"][n]["memory"] for r in results),
            "diff": (statistics.mean(diff), statistics.stdev(diff) if len(diff) > 1 else 0.0),
            "n": len(results),
        })
    return out


def main() -> None:
    argv = sys.argv[1:]
    own, extra = split_passthrough(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--cv", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else []
    done = {r["seed"] for r in results}
    for seed in tqdm([s for s in range(args.cv or args.seeds) if s not in done], desc="seeds"):
        results.append(one_seed(extra, seed, args.cv, out / "runs" / f"s{seed}"))
        path.write_text(json.dumps(results, indent=2))
    summary = summarize(results)
    lines = [f"`bench/compress_quality.py {' '.join(argv)}`", "",
             "| model | test AUC | log loss | memory (of fp32) | AUC - base (mean ± std, paired) |", "|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['name']} | {s['auc']:.4f} | {s['logloss']:.4f} | {100 * s['memory']:.1f}% | "
                     f"{s['diff'][0]:+.4f} ± {s['diff'][1]:.4f} (n={s['n']}) |")
    text = "\n".join(lines) + "\n"
    (out / "table.md").write_text(text)
    plot(summary, out / "auc_vs_memory.png")
    print(text)


def plot(summary, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for s in summary:
        main_row = s["name"] in ROWS
        ax.errorbar([100 * s["memory"]], [s["auc"]], yerr=[s["diff"][1]], fmt="o" if main_row else "x", capsize=3, label=s["name"])
    ax.set_xscale("log")
    ax.set_xlabel("embedding memory, % of fp32 (log)")
    ax.set_ylabel("test AUC (mean over seeds)")
    ax.set_title("SHARK: F-Q, F-P and both (bars: std of the paired AUC difference to base)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

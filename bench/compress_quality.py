"""Can a user trust `shark compress`? Over many seeds (or folds x seeds): how often the served
model's test AUC drop from the base model exceeds `--max-auc-drop`, with its binomial interval,
the memory each run saved, and the served model beside TorchRec's post-training int8 and int4
of the same base model, on test (which no decision of the pipeline reads).

    .venv/bin/python bench/compress_quality.py --seeds 10 --out DIR -- --data csv:../shared/data/frappe \\
        --label click --epochs 10 --early-stopping-patience 2 --target-memory 0.15 --max-auc-drop 0.002 \\
        --tiers fp32 fp16 int8 int4 int2 --fallback torchrec
    ... --dev-rows 500 ...          # the small-dev variant: dev cut to its first 500 lines
    ... --cv 5 --seeds 2 ...        # k-fold (--folds/--fold) x seeds, e.g. criteo_kaggle_8k

Per run (seed s, fold f): one `shark compress` run in DIR/runs/s<s>[f<f>] (resumed if cut off);
its export stage logs test figures of the base model, ours (the pruned, quantized model as
exported) and TorchRec's int8 and int4 of the base model (`quantize_embeddings`), each paired
against the base model (`export.json` `easy_path`), and this script reads them. "Served" is
what the run exported (`export.json` `exported_model`: ours, or with `--fallback torchrec` a
TorchRec model; `shark_torchrec/jobs/easy_path.py`). Memory is embedding bytes as allocated
over the base model's fp32 bytes. Finished runs are kept in DIR/results.json (the script
resumes); DIR/table.md and DIR/drop_vs_memory.png are rewritten.

`--table4` also writes the paper's Table 4 baselines into each run's `baselines/` (F-Q alone,
fp16-all, int8-all, freq, Permutation pruning), as `shark report` shows them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import clopper_pearson, flags_of, paired, pyplot, split_passthrough  # noqa: E402
from shark_torchrec.config import parse_cli  # noqa: E402

SHARK = str(Path(sys.executable).parent / "shark")
MODELS = ("served", "final", "torchrec-int4", "torchrec-int8")
NAMES = {
    "served": "served (what the run exported)",
    "final": "ours (F-P + F-Q)",
    "torchrec-int4": "TorchRec int4 of the base",
    "torchrec-int8": "TorchRec int8 of the base",
}


def sh(*args: str) -> None:
    proc = subprocess.run([SHARK, *args], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"failed: shark {' '.join(args)}\n{proc.stderr[-3000:]}")


def small_dev(extra: list[str], rows: int) -> list[str]:
    """`extra` with `--data csv:DIR` pointing at a copy of DIR whose dev file keeps its header and
    first `rows` lines (made once under the system's temp folder, never in the repository, in a
    folder named by a hash of DIR's path and its dev file's size; the other files are links)."""
    import hashlib

    if "--data" not in extra or not extra[extra.index("--data") + 1].startswith("csv:"):
        raise SystemExit("--dev-rows needs `--data csv:DIR` (as two words) after --")
    i = extra.index("--data")
    src_dir = Path(extra[i + 1].partition(":")[2]).resolve()
    dev = [f for f in src_dir.iterdir() if f.stem == "dev"]
    if len(dev) != 1:
        raise SystemExit(f"--dev-rows: {src_dir} has no single dev file")
    key = hashlib.sha256(f"{src_dir}|{dev[0].stat().st_size}|{rows}".encode()).hexdigest()[:12]
    dst = Path(tempfile.gettempdir()) / "shark-bench-data" / f"{src_dir.name}-dev{rows}-{key}"
    dst.mkdir(parents=True, exist_ok=True)
    for f in src_dir.iterdir():
        target = dst / f.name
        if f == dev[0]:
            if not target.is_file():
                with f.open() as inp:
                    lines = [line for _, line in zip(range(rows + 1), inp)]
                if len(lines) < rows + 1:
                    raise SystemExit(f"--dev-rows {rows}: {f} has only {len(lines) - 1} lines after its header")
                tmp = target.with_suffix(".tmp")
                tmp.write_text("".join(lines))
                tmp.replace(target)
        elif not target.is_symlink():
            target.symlink_to(f)
    return [*extra[: i + 1], f"csv:{dst}", *extra[i + 2 :]]


def one_run(extra: list[str], seed: int, fold: int | None, folds: int, run: Path, table4: bool) -> dict:
    common = [*extra, "--seed", str(seed), "--no-progress"] + (
        ["--folds", str(folds), "--fold", str(fold)] if folds else []
    )
    cfg = parse_cli(common, prog="compress_quality")
    if not (run / "metrics.json").is_file():
        sh("compress", *common, "--out", str(run), *(["--resume"] if (run / "stages.json").is_file() else []))
    metrics = json.loads((run / "metrics.json").read_text())
    seconds = sum(metrics["stage_seconds"].values())  # the pipeline's own time, resumed or not
    easy = metrics["export"]["easy_path"]
    models = {
        key: {
            "test_auc": easy[key]["test"]["auc"],
            "test_drop": easy[key]["test"]["drop"],
            "test_drop_se": easy[key]["test"]["drop_standard_error"],
            "memory": easy[key]["memory"],
            "confirm_drop": easy[key]["drop"],
            # The choice's inputs (drop and standard error on the candidate's choice split, and
            # its test when tried), kept so that another choice rule can be replayed on these runs.
            "choice": easy[key].get("choice"),
        }
        for key in ("base", "final", "torchrec-int4", "torchrec-int8")
    }
    rows4 = table4_baselines(common, cfg, seed, run) if table4 else None
    return {
        "table4": rows4,
        "seed": seed,
        "fold": fold,
        "seconds": seconds,
        "models": models,
        "served": easy["exported_model"],
        "served_passed_selection_test": easy["exported_within_bound"],
        "pruned_fields": metrics["pruned_fields"],
        "stop_reason": metrics["stop_reason"],
        "quant_budget": metrics["quant_budget"],
        "choice_rows": easy.get("choice_rows"),
        "confirm_rows": easy["rows"],
        "max_auc_drop": cfg.prune.max_auc_drop,
    }


def served(record: dict, key: str) -> dict:
    return record["models"][record["served"] if key == "served" else key]


def summarize(records: list[dict]) -> list[dict]:
    bound = records[0]["max_auc_drop"]
    out = []
    for key in MODELS:
        rows = [served(r, key) for r in records]
        over = sum(m["test_drop"] > bound for m in rows)
        out.append(
            {
                "model": key,
                "n": len(rows),
                "over": over,
                "rate": over / len(rows),
                "rate_ci": clopper_pearson(over, len(rows)),
                "drop": paired([m["test_drop"] for m in rows]),
                "drop_range": (min(m["test_drop"] for m in rows), max(m["test_drop"] for m in rows)),
                "memory": statistics.mean(m["memory"] for m in rows),
                "memory_range": (min(m["memory"] for m in rows), max(m["memory"] for m in rows)),
                "vs_int4": paired(
                    [m["test_auc"] - r["models"]["torchrec-int4"]["test_auc"] for m, r in zip(rows, records)]
                ),
            }
        )
    return out


def markdown(records: list[dict], summary: list[dict], command: str) -> str:
    bound = records[0]["max_auc_drop"]
    n = len(records)
    served_counts = {k: sum(r["served"] == k for r in records) for k in ("final", "torchrec-int4", "torchrec-int8")}
    lines = [
        f"`{command}`",
        "",
        f"{n} runs; bound --max-auc-drop {bound}; test rows per run: the base model's test split. "
        "Drops are base minus model test AUC, paired per run; rates with Clopper-Pearson 95% intervals; "
        "memory is embedding bytes as allocated over the base model's fp32 bytes.",
        "",
        "| model | runs over the bound | rate [95% CI] | test AUC drop, mean [95% CI] (min, max) | "
        "memory, mean (min, max) | AUC - TorchRec int4, mean [95% CI] |",
        "|---|---|---|---|---|---|",
    ]
    for s in summary:
        d, v = s["drop"], s["vs_int4"]
        lines.append(
            f"| {NAMES[s['model']]} | {s['over']}/{s['n']} | "
            f"{s['rate']:.2f} [{s['rate_ci'][0]:.2f}, {s['rate_ci'][1]:.2f}] | "
            f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}] "
            f"({s['drop_range'][0]:+.4f}, {s['drop_range'][1]:+.4f}) | "
            f"{s['memory']:.3f} ({s['memory_range'][0]:.3f}, {s['memory_range'][1]:.3f}) | "
            + ("" if s["model"] == "torchrec-int4" else f"{v['mean']:+.4f} [{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}]")
            + " |"
        )
    lines += [
        "",
        "Served: " + ", ".join(f"{NAMES[k]} {c}" for k, c in served_counts.items()) + ".",
        "",
        "| run | fields pruned | F-Q budget | served | passed its selection test | memory saved | "
        "test AUC drop | confirm drop |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        m = served(r, "served")
        name = f"s{r['seed']}" + (f"f{r['fold']}" if r["fold"] is not None else "")
        lines.append(
            f"| {name} | {len(r['pruned_fields'])} | {r['quant_budget']:.3f} | {r['served']} | "
            f"{'yes' if r['served_passed_selection_test'] else 'no'} | {1 - m['memory']:.3f} | "
            f"{m['test_drop']:+.4f} | {m['confirm_drop']:+.4f} |"
        )
    return "\n".join(lines) + "\n"


def plot(records: list[dict], path: Path, title: str) -> None:
    plt = pyplot()

    bound = records[0]["max_auc_drop"]
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for key, marker in (("final", "o"), ("torchrec-int4", "s"), ("torchrec-int8", "^"), ("served", "x")):
        rows = [served(r, key) for r in records]
        ax.scatter(
            [m["memory"] for m in rows],
            [m["test_drop"] for m in rows],
            marker=marker,
            label=NAMES[key],
            s=40 if key == "served" else 25,
            alpha=0.8,
        )
    ax.axhline(bound, color="k", linestyle="--", linewidth=1, label=f"--max-auc-drop {bound}")
    ax.ticklabel_format(useOffset=False, style="plain", axis="y")
    ax.set_xlabel("embedding memory, fraction of the base model's fp32 bytes")
    ax.set_ylabel("test AUC drop from the base model (per run)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------ the paper's Table 4
def table4_baselines(common: list[str], cfg, seed: int, run: Path) -> dict:
    """F-Q alone, fp16, int8 and freq from the same base checkpoint, and Permutation pruning,
    written into the run's `baselines/` (what `shark report` shows beside the pipeline).

    Returns:
        {row name: {"auc", "logloss", "memory"}} of the report's points and baselines (test).
    """
    from shark_torchrec.data import open_dataset
    from shark_torchrec.precision.priority import min_budget

    base_ckpt = json.loads((run / "stages.json").read_text())["base"]["checkpoint"]
    steps = open_dataset(cfg.dataset, seed).num_batches("train", cfg.train.batch_size)
    finetune = [
        "--init-from",
        base_ckpt,
        "--epochs",
        str(cfg.compress.quant_epochs),
        "--eval-every",
        str(max(1, steps // max(cfg.compress.quant_evals_per_epoch, 1))),
        "--early-stopping-patience",
        "2",
    ]
    budget = math.ceil(max(cfg.prune.target_memory, min_budget(cfg.model.embedding_dim)) * 1e4) / 1e4
    baselines = {
        "fq": ["--precision", "shark", "--memory-budget", f"{budget:.4f}"],
        "fp16": ["--precision", "fp16"],
        "int8": ["--precision", "int8"],
        "freq": ["--precision", "freq", "--memory-budget", f"{budget:.4f}"],
    }
    train_args = flags_of(
        "train", _without(common, ("--epochs", "--early-stopping-patience", "--eval-every", "--tiers"))
    )
    for name, flags in baselines.items():
        out = run / "baselines" / name
        if not (out / "metrics.json").is_file():
            sh("train", *train_args, *finetune, *flags, "--out", str(out))
    out = run / "baselines" / "fp_permutation"
    if not (out / "metrics.json").is_file():
        sh(
            "prune",
            *flags_of("prune", _without(common, ("--tiers",))),
            "--checkpoint",
            base_ckpt,
            "--method",
            "permutation",
            "--out",
            str(out),
        )
    sh("report", str(run))
    from shark_torchrec.report import collect

    info = collect(run)
    return {
        p["name"]: {"auc": p["auc"], "logloss": p["logloss"], "memory": p["memory"]}
        for p in info["points"] + info["baselines"]
    }


def table4_markdown(records: list[dict]) -> str:
    """Mean test AUC, log loss and memory per Table 4 row, and the paired difference to base."""
    names = list(records[0]["table4"])
    lines = ["| model | test AUC | log loss | memory (of fp32) | AUC - base, mean [95% CI] |", "|---|---|---|---|---|"]
    for n in names:
        rows = [r["table4"][n] for r in records if n in r["table4"]]
        d = paired([r["table4"][n]["auc"] - r["table4"]["base (fp32)"]["auc"] for r in records if n in r["table4"]])
        ci = f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]" if d["n"] > 1 else f"{d['mean']:+.4f}"
        lines.append(
            f"| {n} | {statistics.mean(x['auc'] for x in rows):.4f} | "
            f"{statistics.mean(x['logloss'] for x in rows):.4f} | "
            f"{100 * statistics.mean(x['memory'] for x in rows):.1f}% | {ci} (n={d['n']}) |"
        )
    return "\n".join(lines) + "\n"


def _without(args: list[str], flags) -> list[str]:
    """`args` minus each flag in `flags` and its values (up to the next flag; `--flag=value` too)."""
    out, skip = [], False
    for a in args:
        if a.startswith("--"):
            skip = a.split("=", 1)[0] in flags
        if not skip:
            out.append(a)
    return out


def main() -> None:
    argv = sys.argv[1:]
    own, extra = split_passthrough(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--cv", type=int, default=0, help="folds per seed (--folds/--fold); 0: the given splits")
    p.add_argument("--dev-rows", type=int, default=0, help="cut dev to its first N lines (csv data)")
    p.add_argument("--table4", action="store_true", help="also the paper's Table 4 baselines per run")
    p.add_argument("--out", required=True)
    args = p.parse_args(own)
    if args.dev_rows:
        if args.cv:
            raise SystemExit("--dev-rows cuts dev, but with --cv folds are drawn from all the lines: give one of them")
        extra = small_dev(extra, args.dev_rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else []
    if results and "models" not in results[0]:
        raise SystemExit(f"{path} was written by the older Table 4 version of this script: choose another --out")
    done = {(r["seed"], r["fold"]) for r in results}
    units = [(s, f) for s in range(args.seeds) for f in (range(args.cv) if args.cv else [None])]
    for seed, fold in tqdm([u for u in units if u not in done], desc="runs"):
        name = f"s{seed}" + (f"f{fold}" if fold is not None else "")
        results.append(one_run(extra, seed, fold, args.cv, out / "runs" / name, args.table4))
        path.write_text(json.dumps(results, indent=2))
    command = "bench/compress_quality.py " + " ".join(argv)
    text = markdown(results, summarize(results), command)
    (out / "table.md").write_text(text)
    if all(r.get("table4") for r in results):
        text4 = f"`{command}`\n\n" + table4_markdown(results)
        (out / "table4.md").write_text(text4)
        text += "\n" + text4
    plot(results, out / "drop_vs_memory.png", f"{out.name}: test AUC drop against memory, per run")
    print(text)


if __name__ == "__main__":
    main()

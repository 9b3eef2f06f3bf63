"""Quality of field rankings: test AUC after removing the lowest-ranked fields and fine-tuning.

    .venv/bin/python bench/importance_quality.py --seeds 5 --keep 3,5,7 --out DIR \\
        -- --data csv:../shared/data/frappe --label click
    .venv/bin/python bench/importance_quality.py --cv 5 --remove 5,10,15,20 --out DIR \\
        -- --data criteo:../shared/data/criteo_kaggle_8k

Per seed (or fold, with `--cv`): one base DLRM is trained (early stopping on dev), every method
ranks its fields on dev, and for each method and each size the lowest-ranked fields are
removed from that same base model (`prune_tables`, `--removals` slice and/or constant) and the
pruned model is fine-tuned on train for `--finetune-epochs`, keeping the epoch of best dev AUC
(epoch 0: no fine-tuning);
its test AUC is recorded. Methods share base model, data order and fine-tuning, so the table
gives each method's mean test AUC and its paired difference to taylor (mean ± std over
seeds). Finished seeds are kept in results.json (the script resumes).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import pyplot, split_passthrough  # noqa: E402
from shark_torchrec.config import parse_cli  # noqa: E402
from shark_torchrec.distributed.env import init_distributed  # noqa: E402
from shark_torchrec.importance.model_scoring import METHODS, field_means, score_fields  # noqa: E402
from shark_torchrec.jobs.checkpoint import resolve_checkpoint  # noqa: E402
from shark_torchrec.jobs.evaluation import evaluate  # noqa: E402
from shark_torchrec.jobs.prune import support_batches  # noqa: E402
from shark_torchrec.jobs.remove_tables import prune_tables  # noqa: E402
from shark_torchrec.jobs.trainer import fit, quiet_libraries, train_steps  # noqa: E402

REFERENCE = "taylor"


def one_seed(base_cfg, seed: int, cv: int, sizes, keep_mode: bool, removals, epochs: int, out: Path, env) -> list:
    cfg = copy.deepcopy(base_cfg)
    cfg.train.seed = seed
    if cv:
        cfg.dataset.folds, cfg.dataset.fold = cv, seed
    cfg.run.out_dir, cfg.run.progress = str(out), False
    cfg.validate()
    base = fit(cfg, env)
    fields = list(base.dataset.schema.sparse_names)
    ckpt = resolve_checkpoint(Path(cfg.run.out_dir) / "checkpoints")
    test = evaluate(base.model, base.dataset, "test", cfg.train.eval_batch_size, env)
    rows = [
        {
            "seed": seed,
            "method": "base",
            "removal": "-",
            "kept": len(fields),
            "test_auc": test["auc"],
            "test_logloss": test["logloss"],
            "ranking": None,
        }
    ]
    means = field_means(base.model, base.dataset, "dev", cfg.train.eval_batch_size, env)
    for method in METHODS:
        imp = score_fields(base.model, base.dataset, method, "dev", cfg.train.eval_batch_size, env, seed=seed)
        ranking = [r["field"] for r in imp.ranking() if r["field"] in fields]
        for size in sizes:
            n_remove = len(fields) - size if keep_mode else size
            if not 0 < n_remove < len(fields):
                continue
            removed = ranking[:n_remove]
            for removal in removals:
                rcfg = copy.deepcopy(cfg)
                rcfg.model.field_removal = removal
                pruned = prune_tables(
                    base.model,
                    base.optimizer,
                    rcfg,
                    base.dataset,
                    env,
                    removed,
                    ckpt,
                    {f: means[f] for f in removed},
                )
                # Epoch 0 is the pruned model as it is: fine-tuning must earn its place on dev.
                dev = evaluate(pruned.model, pruned.dataset, "dev", cfg.train.eval_batch_size, env)
                best = (dev, evaluate(pruned.model, pruned.dataset, "test", cfg.train.eval_batch_size, env), 0)
                for epoch in range(epochs):
                    batches = support_batches(pruned.dataset, 1 << 62, cfg.train.batch_size, env, seed * 100 + epoch)
                    train_steps(pruned.model, pruned.optimizer, batches, env, cfg.quant.precision)
                    dev = evaluate(pruned.model, pruned.dataset, "dev", cfg.train.eval_batch_size, env)
                    if dev["auc"] > best[0]["auc"]:
                        best = (
                            dev,
                            evaluate(pruned.model, pruned.dataset, "test", cfg.train.eval_batch_size, env),
                            epoch + 1,
                        )
                rows.append(
                    {
                        "seed": seed,
                        "method": method,
                        "removal": removal,
                        "kept": len(fields) - n_remove,
                        "removed": removed,
                        "test_auc": best[1]["auc"],
                        "test_logloss": best[1]["logloss"],
                        "dev_auc": best[0]["auc"],
                        "best_epoch": best[2],
                        "ranking": ranking,
                    }
                )
    return rows


def summarize(rows):
    out = []
    keys = sorted({(r["removal"], r["kept"]) for r in rows if r["method"] != "base"}, key=lambda x: (x[0], -x[1]))
    base = [r["test_auc"] for r in rows if r["method"] == "base"]
    out.append(
        {"removal": "-", "kept": "all", "method": "base", "auc": statistics.mean(base), "n": len(base), "diff": None}
    )
    for removal, kept in keys:
        ref = {
            r["seed"]: r["test_auc"]
            for r in rows
            if (r["method"], r["removal"], r["kept"]) == (REFERENCE, removal, kept)
        }
        for method in METHODS:
            mine = {
                r["seed"]: r["test_auc"]
                for r in rows
                if (r["method"], r["removal"], r["kept"]) == (method, removal, kept)
            }
            if not mine:
                continue
            diffs = [mine[s] - ref[s] for s in mine if s in ref]
            out.append(
                {
                    "removal": removal,
                    "kept": kept,
                    "method": method,
                    "auc": statistics.mean(mine.values()),
                    "n": len(mine),
                    "diff": (statistics.mean(diffs), statistics.stdev(diffs) if len(diffs) > 1 else 0.0)
                    if diffs
                    else None,
                }
            )
    return out


def markdown(summary, command: str, total_fields: int) -> str:
    lines = [
        f"`{command}`",
        "",
        f"| removal | kept fields (of {total_fields}) | method | test AUC (mean) | "
        f"AUC - {REFERENCE} (mean ± std, paired) |",
        "|---|---|---|---|---|",
    ]
    for s in summary:
        d = "" if s["diff"] is None else f"{s['diff'][0]:+.4f} ± {s['diff'][1]:.4f} (n={s['n']})"
        lines.append(f"| {s['removal']} | {s['kept']} | {s['method']} | {s['auc']:.4f} | {d} |")
    return "\n".join(lines) + "\n"


COLORS = {"taylor-signed": "tab:blue", "taylor": "tab:orange", "permutation": "tab:green", "random": "tab:red"}


def plot(summary, path: Path, removal: str) -> None:
    """Left: every method. Right: taylor against permutation, zoomed, with the spread of
    their paired difference (std over seeds) as error bars on permutation."""
    plt = pyplot()

    base = next(s["auc"] for s in summary if s["method"] == "base")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, methods in zip(axes, (METHODS, (REFERENCE, "permutation"))):
        zoom = len(methods) == 2
        for method in methods:
            pts = sorted(
                (s["kept"], s["auc"], (s["diff"] or (0, 0))[1])
                for s in summary
                if s["method"] == method and s["removal"] == removal
            )
            if pts:
                ax.errorbar(
                    [p[0] for p in pts],
                    [p[1] for p in pts],
                    yerr=[p[2] for p in pts] if zoom else None,
                    fmt="o-",
                    capsize=3,
                    color=COLORS[method],
                    label=method,
                )
        ax.axhline(base, color="gray", ls="--", label="all fields")
        ax.set_xlabel("fields kept")
        ax.set_ylabel("test AUC (mean over seeds)")
        ax.set_title(
            f"Pruning by field ranking ({removal} removal, fine-tuned)"
            if not zoom
            else f"{REFERENCE} vs permutation (bars: std of the paired difference)",
            fontsize=10,
        )
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    argv = sys.argv[1:]
    own, extra = split_passthrough(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--cv", type=int, default=0, help="k-fold cross-validation: run s uses fold s (seeds = folds)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--keep", help="comma-separated numbers of fields kept")
    group.add_argument("--remove", help="comma-separated numbers of fields removed")
    p.add_argument("--removals", default="slice", help="slice, constant or both (comma-separated)")
    p.add_argument("--finetune-epochs", type=int, default=3)
    p.add_argument("--out", required=True)
    args = p.parse_args(own)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    env = init_distributed()
    cfg = parse_cli(extra, prog="importance_quality")
    sizes = [int(x) for x in (args.keep or args.remove).split(",")]
    removals = args.removals.split(",")
    results_path = out / "results.json"
    rows = json.loads(results_path.read_text()) if results_path.exists() else []
    if any(r["method"] == "taylor-abs" for r in rows):  # written before the rename
        rows = [
            {**r, "method": {"taylor-abs": "taylor", "taylor": "taylor-signed"}.get(r["method"], r["method"])}
            for r in rows
        ]
    done = {r["seed"] for r in rows}
    seeds = range(args.cv or args.seeds)
    for seed in tqdm([s for s in seeds if s not in done], desc="seeds"):
        rows += one_seed(
            cfg, seed, args.cv, sizes, bool(args.keep), removals, args.finetune_epochs, out / "runs" / f"s{seed}", env
        )
        results_path.write_text(json.dumps(rows, indent=2))
    summary = summarize(rows)
    command = "bench/importance_quality.py " + " ".join(argv)
    total = max(r["kept"] for r in rows if r["method"] == "base")
    text = markdown(summary, command, total)
    (out / "table.md").write_text(text)
    for removal in removals:
        plot(summary, out / f"auc_vs_kept_{removal}.png", removal)
    print(text)


if __name__ == "__main__":
    main()

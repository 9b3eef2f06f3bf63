"""Scoring time of F-Permutation (Taylor) against Permutation (T = 1), side by side.

    .venv/bin/python bench/importance_speed.py [--repeats 5] [--out bench/results/importance_speed]

For each dataset a base DLRM is trained once (1 rank, in this process), then the methods are
timed in turns on the same model and the same rows, `--repeats` times; the table gives the
median scoring seconds (model computation and all-reduces, not data reading), the median wall
seconds of the whole scoring call (reading included: what a user waits for), and the ratios
permutation / taylor and permutation / taylor-signed of both. Datasets: criteo_kaggle_8k (27
fields, scored on its 7,200 train rows: the dev split is a single batch) and synthetic data
widened with extra noise fields (28 and 52 fields with the dense one, scored on
`--eval-rows` dev rows, 20,000 by default).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from common import pyplot, write_table  # noqa: E402
from shark_torchrec.config import JobConfig  # noqa: E402
from shark_torchrec.distributed.env import init_distributed  # noqa: E402
from shark_torchrec.importance.model_scoring import score_fields  # noqa: E402
from shark_torchrec.jobs.trainer import fit, quiet_libraries  # noqa: E402

METHODS = ("taylor", "taylor-signed", "permutation")


def datasets(shared: Path, eval_rows: int):
    criteo = JobConfig()
    criteo.dataset.data = f"criteo:{shared / 'criteo_kaggle_8k'}"
    yield "criteo_kaggle_8k", criteo, "train"
    for extra in (16, 40):
        syn = JobConfig()
        syn.dataset.synthetic_scale, syn.dataset.synthetic_train_rows = 0.1, 100_000
        syn.dataset.synthetic_eval_rows = eval_rows
        syn.dataset.synthetic_noise_fields = extra
        yield f"synthetic+{extra}", syn, "dev"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "bench/results/importance_speed"))
    p.add_argument("--shared", default=str(ROOT.parent / "shared/data"))
    p.add_argument("--eval-rows", type=int, default=20_000, help="synthetic: dev rows scored")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (0 where one round takes minutes)")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quiet_libraries()
    env = init_distributed()
    rows = []
    for name, cfg, split in datasets(Path(args.shared), args.eval_rows):
        cfg.run.out_dir, cfg.run.progress = tempfile.mkdtemp(prefix="imp-speed-"), False
        trained = fit(cfg.validate(), env)
        seconds = {m: [] for m in METHODS}
        wall = {m: [] for m in METHODS}
        fields = samples = 0
        for _ in tqdm(range(args.repeats + args.warmup), desc=name):  # the first --warmup rounds warm up
            for m in METHODS:
                t0 = time.perf_counter()
                r = score_fields(trained.model, trained.dataset, m, split, cfg.train.eval_batch_size, env)
                wall[m].append(time.perf_counter() - t0)
                seconds[m].append(r.scoring_seconds)
                fields, samples = len(r.fields), r.samples
        med = {m: statistics.median(s[args.warmup :]) for m, s in seconds.items()}
        med_wall = {m: statistics.median(s[args.warmup :]) for m, s in wall.items()}
        rows.append(
            {
                "dataset": name,
                "fields": fields,
                "rows": samples,
                "split": split,
                "seconds": med,
                "all_seconds": seconds,
                "wall_seconds": med_wall,
                "all_wall_seconds": wall,
                "permutation_over_taylor": med["permutation"] / med["taylor"],
                "permutation_over_taylor_signed": med["permutation"] / med["taylor-signed"],
                "permutation_over_taylor_wall": med_wall["permutation"] / med_wall["taylor"],
                "wall_spread": {m: [min(s[args.warmup :]), max(s[args.warmup :])] for m, s in wall.items()},
                "goal_n_over_4": fields / 4,
            }
        )
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    lines = [
        f"`bench/importance_speed.py --repeats {args.repeats} --eval-rows {args.eval_rows} --warmup {args.warmup}` "
        f"(1 rank, CPU; median of {args.repeats} timed rounds; wall = the whole call, reading included, [min, max])",
        "",
        "| data | fields (N) | rows scored | taylor s | taylor-signed s | permutation s | perm / taylor "
        "| perm / taylor-signed | goal N/4 | taylor wall s | permutation wall s | perm / taylor, wall |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        s, w, sp = r["seconds"], r["wall_seconds"], r["wall_spread"]
        lines.append(
            f"| {r['dataset']} | {r['fields']} | {r['rows']} | {s['taylor']:.3f} | {s['taylor-signed']:.3f} | "
            f"{s['permutation']:.3f} | {r['permutation_over_taylor']:.1f}x | "
            f"{r['permutation_over_taylor_signed']:.1f}x | "
            f"{r['goal_n_over_4']:.1f}x | {w['taylor']:.2f} [{sp['taylor'][0]:.2f}, {sp['taylor'][1]:.2f}] | "
            f"{w['permutation']:.2f} [{sp['permutation'][0]:.2f}, {sp['permutation'][1]:.2f}] | "
            f"{r['permutation_over_taylor_wall']:.2f}x |"
        )
    write_table(out, lines)
    plot(rows, out / "scoring_time.png")


def plot(rows, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(7, 3.8))
    width = 0.27
    for k, m in enumerate(METHODS):
        xs = [i + (k - 1) * width for i in range(len(rows))]
        ax.bar(xs, [r["seconds"][m] for r in rows], width, label=m)
    ax.set_xticks(range(len(rows)), [f"{r['dataset']}\n(N={r['fields']})" for r in rows])
    ax.set_ylabel("scoring seconds (median)")
    ax.set_title("Field scoring time: F-Permutation vs Permutation (T=1)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""What a 1-bit served tier would give at the lowest budgets, simulated before it was built.

(The tier has since been built, `shark export --tiers ... int1`; its measured points equal these
within 0.0001: bench/README.md. The script stays as the record of the decision. The built tier
has since become +-a by each value's sign, one magnitude a row (`sign_magnitude_rows`; an fp16,
10 bytes at dim 64, then a byte, 9), which served better; the two fitted levels simulated here
are the first form.)

    .venv/bin/python bench/served_1bit_headroom.py --frontier DIR [--base fp32] [--budgets 0.08,0.07,0.06,0.05]

Our served tiers stop at int2: at dim 64 an int2 row is 20 bytes (16 of codes, an fp16 scale and
bias), 7.8% of its fp32 bytes. Below about 8% a budget is met by dropping rows to their table's
fallback row, and on frappe that costs AUC fast: -0.0089 at 0.06 (`bench/README.md`). A 1-bit
row (8 bytes of codes and the same fp16 pair: 12 bytes, 4.7%) keeps which side of two levels
each value lies on. This script measures, on the trained models of one `bench/frontier.py`
output, what serving the rows ranked lowest in 1 bit instead of dropping them would give, before
anyone builds the tier into the store, the ranked map and the lookup.

For every unit (seed) of the output that holds a trained `--base` run (`shark-paper+eq7` or
`fp32`) and its `fp32` twin, the model's rows as trained are read once, ranked by their
end-of-training priorities (Eq. 7; for `fp32`, their occurrences in the training split,
`training_priorities`, as `shark export` ranks them; all tables share the dim, so one ranking
over the model is the model-scope rule, ties broken as the export's keys break them), and served
by a plain fp32 `EmbeddingBagCollection` whose rows hold the values each tier would return (fake
quantization):
- `int2/dropped`: the top rows int2 (fitted scale and bias, `fitted_scale_bias`, as
  `shark export --rounding fitted`), the rest their table's fallback row (the mean of the rows
  it replaces). It is what `shark export --tiers int2 dropped` serves, rebuilt here to check the
  simulation: paired against the frontier's exported twin (`BASE>int2/dropped@B~fit`) when the
  output holds it.
- `int2/int1`: the top rows int2, the rest 1-bit: each value one of two levels per row, fitted
  by 2-means (a row's values split at its mean, then at the midpoint of the two side means,
  20 times), the low level and the step rounded to fp16.
- `int4/int2/int1`: the same with the top 2% of rows in int4 (the head `shark export` kept at
  0.08 in `frontier_rankmap_d64`).
Bytes are counted, not allocated: rows (int4 36, int2 20, int1 12 at dim 64), the ranked map at
(8 x planes + 4 x stored groups) / 64 a row with its padding and per-table slots, as
`serving_store_budget` counts it, and one fp32 fallback row per table for `int2/dropped` (the
export's store reserves a little more, so it keeps a few rows fewer); each budget is filled
with the most int2 (int4) rows it holds (a budget below a mix's floor serves every row in its
cheapest tier, over the budget: the table marks it).

Prints and writes OUT (default: the frontier folder's `served_1bit_BASE/`): results.json, table.md
(test AUC minus fp32 per point, with the paired 95% interval over units; against the exported
`int2/dropped` twin and TorchRec int2 where the frontier output has them) and
auc_vs_bytes.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import paired, pyplot, write_table  # noqa: E402
from frontier import FP32Model  # noqa: E402
from shark_torchrec.jobs.export import counted_priorities  # noqa: E402
from shark_torchrec.kernels.ranked_map import ranked_map_bytes  # noqa: E402
from shark_torchrec.precision.priority import INT2, INT4, per_byte_scores, ranked_rows, row_bytes  # noqa: E402
from shark_torchrec.precision.quantize import fitted_scale_bias, requantize_with  # noqa: E402

HEAD_FRACTION = 0.02  # int4 rows of `int4/int2/int1`
MIXES = ("int2/dropped", "int2/int1", "int4/int2/int1")


def one_bit(values: torch.Tensor, iterations: int = 20) -> torch.Tensor:
    """Each row's values as one of two levels (2-means per row), low level and step in fp16.

    Args:
        values: [n, D] fp32 rows.
        iterations: threshold refits.

    Returns:
        [n, D] the values a 1-bit row would serve.
    """
    cut = values.mean(dim=1, keepdim=True)
    for _ in range(iterations):
        up = values >= cut
        n_up = up.sum(dim=1, keepdim=True)
        n_down = values.shape[1] - n_up
        hi = (values * up).sum(dim=1, keepdim=True) / n_up.clamp_min(1)
        lo = (values * ~up).sum(dim=1, keepdim=True) / n_down.clamp_min(1)
        hi = torch.where(n_up > 0, hi, lo)  # a constant row: both levels its value
        lo = torch.where(n_down > 0, lo, hi)
        cut = (hi + lo) / 2
    low = lo.half().float()
    step = (hi - lo).half().float()
    return torch.where(values >= low + step / 2, low + step, low)


def integer(values: torch.Tensor, bits: int) -> torch.Tensor:
    """The values an int`bits` row with fitted scale and bias serves (`shark export --rounding fitted`)."""
    sb = fitted_scale_bias(values, bits).float()
    return requantize_with(values, sb, bits).float() * sb[:, :1] + sb[:, 1:2]


def tier_row_bytes(dim: int) -> dict:
    """Bytes of a row in each tier at `dim` (codes + fp16 scale and bias): the 1-bit rows as this
    simulation made them, two fitted levels (the built tier's sign and magnitude take 2 bytes
    less, `row_bytes(dim, INT1)`)."""
    return {"int4": row_bytes(dim, INT4), "int2": row_bytes(dim, INT2), "int1": dim // 8 + 4}


def plan(mix: str, budget: float, n: int, dim: int, tables: int) -> dict:
    """Rows per tier of `mix` that fill `budget` x fp32 bytes (the top ranked rows the most precise).

    Args:
        mix: one of MIXES.
        budget: fraction of the fp32 bytes.
        n: rows of the model.
        dim: embedding dim.
        tables: tables of the model (their fallback rows, with dropped rows).

    Returns:
        {"int4": rows, "int2": rows, "rest": rows, "bytes": counted bytes}.
    """
    rb = tier_row_bytes(dim)
    tiers = mix.split("/")
    dropped = "dropped" in tiers
    stored = len(tiers) - int(dropped)
    # The whole ranked map, as `serving_store_budget` counts it; one fp32 fallback row per table with dropped rows.
    fixed = ranked_map_bytes(n, tables, stored, dropped) + (tables * dim * 4 if dropped else 0)
    avail = budget * n * dim * 4 - fixed
    rest = 0 if dropped else rb["int1"]
    head = round(HEAD_FRACTION * n) if "int4" in tiers else 0
    k = int((avail - head * rb["int4"] - (n - head) * rest) // (rb["int2"] - rest))
    k = max(0, min(n - head, k))
    used = fixed + head * rb["int4"] + k * rb["int2"] + (n - head - k) * rest
    return {"int4": head, "int2": k, "rest": n - head - k, "bytes": used}


def served_values(mix: str, p: dict, values: torch.Tensor, order: torch.Tensor, table_of: torch.Tensor) -> torch.Tensor:
    """The rows `mix` serves under plan `p`, in key order.

    Args:
        mix: one of MIXES.
        p: from `plan`.
        values: [n, D] trained rows, in key order.
        order: keys by priority, highest first.
        table_of: [n] each key's table index.

    Returns:
        [n, D] fp32.
    """
    head, mid, tail = order[: p["int4"]], order[p["int4"] : p["int4"] + p["int2"]], order[p["int4"] + p["int2"] :]
    out = torch.empty_like(values)
    if len(head):
        out[head] = integer(values[head], 4)
    out[mid] = integer(values[mid], 2)
    if not len(tail):
        return out
    if mix.endswith("dropped"):
        # A table's fallback row: the mean of the trained rows it replaces (as `regroup_for_serving`).
        tt = table_of[tail]
        sums = torch.zeros(int(table_of.max()) + 1, values.shape[1]).index_add_(0, tt, values[tail])
        counts = torch.bincount(tt, minlength=sums.shape[0]).clamp_min(1)
        out[tail] = (sums / counts[:, None])[tt]
    else:
        out[tail] = one_bit(values[tail])
    return out


def evaluate_unit(run_dir: Path, budgets: list, progress) -> dict:
    """Test AUC of every (mix, budget) point on one trained model, and the model's own."""
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    m = FP32Model(run_dir)
    names = [c.name for c in m.configs]
    rows = [c.num_embeddings for c in m.configs]
    dim = m.configs[0].embedding_dim
    if any(c.embedding_dim != dim for c in m.configs):
        raise SystemExit(f"{run_dir}: tables of several dims; this simulation ranks one dim")
    blocks = {c.name: [] for c in m.configs}
    with torch.no_grad():
        for c, f, kjt in m.row_blocks():  # one bag per row: the rows as trained
            if f == c.feature_names[0]:
                blocks[c.name].append(m.ebc(kjt).to_dict()[f].float())
    values = torch.cat([torch.cat(blocks[c.name]) for c in m.configs])
    scores = counted_priorities(m.model, m.data)  # a model without priorities: as the export counts them
    if scores is None:
        scores = {}
        for store in m.ebc.stores:
            for i, t in enumerate(store.tables):
                scores[t.name] = store.scores_now(int(store.table_base[i]), int(store.table_base[i + 1])).float()
    # Ranked as the export ranks them: score per byte in float32 (the division turns the
    # smallest subnormal Eq. 7 scores into 0), ties (most rows' Eq. 7 scores decay to 0 under
    # the paper's beta) broken as the ranking keys break them: tables by name, then row.
    scores = {n: per_byte_scores(scores[n].float(), dim) for n in names}
    zero_rows = int(sum(int((scores[n] == 0).sum()) for n in names))
    order = ranked_rows(torch.cat([scores[n] for n in names]), names, rows)
    table_of = torch.repeat_interleave(torch.arange(len(names)), torch.tensor(rows))
    fp32_bytes = sum(rows) * dim * 4
    rec = {"trained_auc": m.evaluate()["auc"], "rows": sum(rows), "zero_score_rows": zero_rows, "points": {}}
    for budget in budgets:
        for mix in MIXES:
            p = plan(mix, budget, sum(rows), dim, len(names))
            v = served_values(mix, p, values, order, table_of)
            ebc = EmbeddingBagCollection(tables=m.configs, device=torch.device("cpu"))
            with torch.no_grad():
                for name, part in zip(names, torch.split(v, rows)):
                    ebc.embedding_bags[name].weight.copy_(part)
            rec["points"][f"{mix}@{budget:g}"] = {
                "test_auc": m.evaluate(ebc)["auc"],
                "bytes_ratio": p["bytes"] / fp32_bytes,
                "rows": {k: p[k] for k in ("int4", "int2", "rest")},
            }
            progress.update(1)
    return rec


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frontier", type=Path, required=True, help="a bench/frontier.py output folder (its dim's)")
    ap.add_argument("--base", default="shark-paper+eq7", help="the trained method served (shark-paper+eq7 or fp32)")
    ap.add_argument("--budgets", default="0.08,0.07,0.06,0.05")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    budgets = [float(b) for b in args.budgets.split(",")]
    out = args.out or args.frontier / f"served_1bit_{args.base}"
    out.mkdir(parents=True, exist_ok=True)
    frontier = json.loads((args.frontier / "results.json").read_text())
    by = {(r["method"], r["unit"]): r for r in frontier["records"]}
    units = sorted(u for (m, u) in by if m == args.base and ("fp32", u) in by)
    if not units:
        raise SystemExit(f"{args.frontier}: no unit holds both a trained {args.base} run and its fp32 twin")

    records = {}
    with tqdm(total=len(units) * len(budgets) * len(MIXES), desc="points") as progress:
        for u in units:
            run = args.frontier / "runs" / f"{args.base}-{u}"
            records[u] = evaluate_unit(run, budgets, progress)
            (out / "results.json").write_text(json.dumps({"frontier": str(args.frontier), "records": records}))

    def ci(d: dict) -> str:
        return f"{d['mean']:+.4f} [{d['ci'][0]:+.4f}, {d['ci'][1]:+.4f}]"

    lines = [
        f"`bench/served_1bit_headroom.py --frontier {args.frontier} --base {args.base} --budgets {args.budgets}` "
        f"({len(units)} units; "
        "fake-quantized rows, bytes counted)",
        "",
        "| point | bytes / fp32 | int4 / int2 / rest rows | AUC - fp32 [95% CI] | AUC - trained model | "
        "minus exported int2/dropped | minus TorchRec int2 |",
        "|---|---|---|---|---|---|---|",
    ]
    summary = {}
    fp32 = {u: by[("fp32", u)]["test_auc"] for u in units}
    for key in records[units[0]]["points"]:
        pts = [records[u]["points"][key] for u in units]
        vs_fp32 = paired([p["test_auc"] - fp32[u] for p, u in zip(pts, units)])
        vs_trained = paired([p["test_auc"] - records[u]["trained_auc"] for p, u in zip(pts, units)])
        mix, budget = key.split("@")
        twin = f"{args.base}>int2/dropped@{budget}~fit"
        cells = []
        for ref in (twin, "torchrec-int2"):
            common = [u for u in units if (ref, u) in by]
            if len(common) > 1:
                cells.append(
                    ci(paired([records[u]["points"][key]["test_auc"] - by[(ref, u)]["test_auc"] for u in common]))
                )
            else:
                cells.append("")
        r = pts[0]["rows"]
        nbytes = statistics.mean(p["bytes_ratio"] for p in pts)
        over = " (over: the tiers' floor)" if nbytes > float(budget) + 5e-4 else ""
        lines.append(
            f"| {key} | {nbytes:.3f}{over} | {r['int4']} / {r['int2']} / {r['rest']} | {ci(vs_fp32)} | "
            f"{ci(vs_trained)} | {cells[0]} | {cells[1]} |"
        )
        summary[key] = {"bytes": nbytes, "vs_fp32": vs_fp32, "vs_trained": vs_trained}
    zeros = [records[u]["zero_score_rows"] for u in units]
    lines += [
        "",
        f"Rows ranked with a score of 0 (tied; ordered by table name, then row): {min(zeros)}-{max(zeros)} of "
        f"{records[units[0]]['rows']} per unit.",
    ]
    write_table(out, lines)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for mix, marker in zip(MIXES, "sov"):
        pts = [(v["bytes"], v["vs_fp32"]) for k, v in summary.items() if k.startswith(mix + "@")]
        xs = [100 * b for b, _ in pts]
        ys = [d["mean"] for _, d in pts]
        err = [[d["mean"] - d["ci"][0] for _, d in pts], [d["ci"][1] - d["mean"] for _, d in pts]]
        ax.errorbar(xs, ys, yerr=err, fmt=marker + "-", capsize=3, label=mix)
    for ref in ("torchrec-int2", "torchrec-int4"):
        common = [u for u in units if (ref, u) in by]
        if common:
            d = paired([by[(ref, u)]["test_auc"] - fp32[u] for u in common])
            x = 100 * statistics.mean(by[(ref, u)]["bytes_allocated"] / by[(ref, u)]["fp32_bytes"] for u in common)
            ax.errorbar(
                [x], [d["mean"]], yerr=[[d["mean"] - d["ci"][0]], [d["ci"][1] - d["mean"]]], fmt="k^", capsize=3
            )
            ax.annotate(ref, (x, d["mean"]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.axhline(0, color="gray", lw=0.5)
    ax.axhline(-0.002, color="gray", lw=0.5, ls=":")
    ax.set_xlabel("embedding bytes, % of fp32 (counted)")
    ax.set_ylabel("test AUC - fp32 (paired mean, 95% CI)")
    ax.set_title(f"served from the trained {args.base} models: 1-bit rows against dropped rows", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "auc_vs_bytes.png", dpi=120)
    plt.close(fig)
    (out / "results.json").write_text(
        json.dumps(
            {"frontier": str(args.frontier), "base": args.base, "records": records, "summary": summary}, indent=1
        )
    )


if __name__ == "__main__":
    main()

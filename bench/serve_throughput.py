"""CPU inference throughput: our mixed-precision inference module against TorchRec's own.

    .venv/bin/python bench/serve_throughput.py [--scale 3] [--dim 64] [--batches 256,1024,4096] [--repeats 5]

One DLRM (synthetic schema, `--scale` x the default cardinalities: scale 3 is 3.6 M rows, 0.9 GB
at dim 64 in fp32) is served these ways, with the same dense weights and the same batches:
- `torchrec fp32`: `quantize_embeddings(dtype=torch.float)`, TorchRec's fp32 inference module;
- `torchrec int8`, `torchrec int4`: `quantize_embeddings(dtype=torch.qint8 / torch.quint4x2)`;
- `shark paper`: `MixedPrecisionInferenceEmbeddingBagCollection` exported from a
  `MixedPrecisionEmbeddingBagCollection` at `--budget` in the paper's tiers (fp32/fp16/int8),
  read by our fused op (`torch.ops.shark.mixed_lookup_ranked`, the ranked row map);
- `shark low`: the same at `--low-budget` in `--low-tiers` (int8/int4/int2 by default);
- with `--served-tiers` (e.g. `int4,int1`), `shark served`: the fp32 tables put into those tiers
  at `--served-budget` by the export (`regroup_for_serving`, rows ranked by their occurrences in
  `--count-rows` rows of the training split), the route a model trained in fp32 serves by, and
  the only one with 1-bit rows (which no model trains in);
- with `--reference-glue`, `shark paper, reference glue`: the `shark paper` module read by the
  op's reference (torch code around FBGEMM's INT-N op, the ranked map decoded in torch; its
  large temporaries disturb the modules timed after it in a round);
- with `--row-map`, `shark paper, int32 row map` and `shark low ..., int32 row map`: the same
  rows read through the training store's int32 row map (`torch.ops.shark.mixed_lookup`, what
  served before the ranked row map); results.json then gives each ranked module's lookup time
  against its twin's per round (`lookup_vs_row_map`).
For each batch size the modules run in turns, in a shuffled order (seeded by the round), within
each of `--repeats` rounds of `--steps` forwards, after a warm-up; the table gives median
samples/s of the whole model's forward, and the ratio to TorchRec fp32 and to TorchRec int8 as
the median (min-max) of the rounds' own ratios (each round times them side by side). Each
module's embedding bytes as allocated (state dict) are beside it.

In the same rounds each module's embedding collection is also timed alone on the same batches
(`--no-lookup-alone` skips it): its share of the forward, and the ratio a module would reach
over TorchRec fp32 if its lookup cost nothing (TorchRec fp32's forward over that forward less
its lookup), the ceiling any embedding kernel has on this model and machine.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchrec.inference.modules import quantize_embeddings  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor  # noqa: E402

from common import FirstRows, pyplot, write_table  # noqa: E402
from shark_torchrec.config import DataConfig, ModelConfig  # noqa: E402
from shark_torchrec.data import open_dataset  # noqa: E402
from shark_torchrec.jobs.easy_path import allocated_bytes  # noqa: E402  (packed int4 bytes, as allocated)
from shark_torchrec.kernels.reference import mixed_lookup_ranked_reference  # noqa: E402
from shark_torchrec.models.dlrm import build_dlrm, table_configs  # noqa: E402
from shark_torchrec.modules.inference import MixedPrecisionInferenceEmbeddingBagCollection  # noqa: E402
from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection  # noqa: E402
from shark_torchrec.modules.precision_policy import PrecisionPolicy  # noqa: E402


class ReferenceGlue(torch.nn.Module):
    """A `MixedPrecisionInferenceEmbeddingBagCollection` read by the fused op's reference (torch
    around FBGEMM's INT-N op), for timing the op against what it replaced."""

    def __init__(self, ebc: MixedPrecisionInferenceEmbeddingBagCollection) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        e = self.ebc
        kjt = features.permute([features.keys().index(n) for n in e.feature_names])
        out = mixed_lookup_ranked_reference(
            e.weights,
            e._offsets,
            e.blocks,
            e.code_groups,
            e.table_base,
            e.table_fallback,
            e.feature_base,
            e.feature_rows,
            kjt.values(),
            kjt.lengths(),
            None,
            e.dim,
            kjt.stride(),
            "mean" if e.mean_pooling else "sum",
            e.row_alignment,
            e.feature_names,
        )
        return KeyedTensor(keys=e.feature_names, length_per_key=[e.dim] * len(e.feature_names), values=out)


class RowMapLookup(torch.nn.Module):
    """A training store's rows read through its int32 row map (`torch.ops.shark.mixed_lookup`, as
    the served model read them before the ranked row map): the same rows and bytes as `shark
    paper` but the map, for timing the ranked map against the map it replaced."""

    def __init__(self, mp: MixedPrecisionEmbeddingBagCollection) -> None:
        super().__init__()
        (store,) = mp.stores
        self.layout = store.op_layout
        self.store = store
        self.names = [f for t in mp.embedding_bag_configs() for f in t.feature_names]
        self.dim = store.dim

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        kjt = features.permute([features.keys().index(n) for n in self.names])
        s = self.store
        out = torch.ops.shark.mixed_lookup(
            *self.layout,
            s.feature_base,
            s.feature_rows,
            kjt.values(),
            kjt.lengths(),
            None,
            self.dim,
            kjt.stride(),
            0,
            s.row_alignment,
            "\n".join(self.names),
        )
        return KeyedTensor(keys=self.names, length_per_key=[self.dim] * len(self.names), values=out)


def served_module(stock: EmbeddingBagCollection, schema, mcfg, data, args):
    """The stock fp32 tables served in `--served-tiers` at `--served-budget` as `shark export`
    serves a model trained in fp32: rows ranked by their occurrences (Eq. 7's increments) in the
    first `--count-rows` rows of the training split, then quantized and laid out by
    `regroup_for_serving`; `stock` is left as it was (the TorchRec modules quantize it)."""
    from shark_torchrec.jobs.export import ServingTiers, regroup_for_serving, training_priorities

    configs = stock.embedding_bag_configs()
    counts = training_priorities(configs, FirstRows(data, args.count_rows), PrecisionPolicy().alpha)
    model = build_dlrm(schema, mcfg, ebc=copy.deepcopy(stock), seed=0)
    regroup_for_serving(
        model, ServingTiers(tuple(args.served_tiers.split(",")), args.served_budget, "model"), counts=counts
    )
    return model.model.sparse_arch.embedding_bag_collection


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=3.0)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--budget", type=float, default=0.35)
    p.add_argument("--low-tiers", default="int8,int4,int2")
    p.add_argument("--low-budget", type=float, default=0.125)
    p.add_argument("--served-tiers", default="", help="also serve the fp32 tables in these tiers (e.g. int4,int1)")
    p.add_argument("--served-budget", type=float, default=0.06)
    p.add_argument("--count-rows", type=int, default=1_000_000, help="training rows the served tiers are ranked on")
    p.add_argument("--batches", default="256,1024,4096")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--no-lookup-alone", action="store_true", help="do not time the embedding collections alone")
    p.add_argument(
        "--reference-glue",
        action="store_true",
        help="also time the op's reference (its large temporaries disturb the modules timed after it)",
    )
    p.add_argument(
        "--row-map",
        action="store_true",
        help="also serve our two modules' rows through the training store int32 row map (mixed_lookup)",
    )
    p.add_argument("--out", default=str(ROOT / "bench/results/serve"))
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    data = open_dataset(
        DataConfig(synthetic_scale=args.scale, synthetic_eval_rows=max(int(b) for b in args.batches.split(",")) * 4), 0
    )
    schema = data.schema
    tables = table_configs(schema, args.dim)
    mcfg = ModelConfig(embedding_dim=args.dim)

    # Our modules, materialized at their budgets (groups as a fresh model starts them), then exported.
    def ours(policy: PrecisionPolicy, keep=None) -> MixedPrecisionInferenceEmbeddingBagCollection:
        mp = MixedPrecisionEmbeddingBagCollection(tables=tables, precision_policy=policy, device=torch.device("cpu"))
        if keep is not None:
            keep.append(mp)
        return MixedPrecisionInferenceEmbeddingBagCollection.from_trained(mp)

    trained: list = []  # the training stores, for --row-map
    keep = trained if args.row_map else None
    shark_paper = ours(PrecisionPolicy(memory_budget=args.budget), keep)
    shark_low = ours(PrecisionPolicy(tiers=tuple(args.low_tiers.split(",")), memory_budget=args.low_budget), keep)
    low = f"shark low ({args.low_tiers} @{args.low_budget})"
    dense = build_dlrm(schema, mcfg, ebc=EmbeddingBagCollection(tables=tables, device=torch.device("meta")), seed=0)

    def with_ebc(ebc) -> torch.nn.Module:
        m = copy.deepcopy(dense)
        m.model.sparse_arch.embedding_bag_collection = ebc
        return m.eval()

    stock = EmbeddingBagCollection(tables=tables)  # fp32 weights, from which TorchRec quantizes
    served = None
    if args.served_tiers:
        served_name = f"shark served ({args.served_tiers} @{args.served_budget})"
        served = served_module(stock, schema, mcfg, data, args)
    holder = torch.nn.Sequential(stock)
    fp32 = quantize_embeddings(holder, dtype=torch.float, inplace=False)[0]
    int8 = quantize_embeddings(holder, dtype=torch.qint8, inplace=False)[0]
    int4 = quantize_embeddings(holder, dtype=torch.quint4x2, inplace=False)[0]
    del holder, stock
    models = {
        "torchrec fp32": with_ebc(fp32),
        "torchrec int8": with_ebc(int8),
        "torchrec int4": with_ebc(int4),
        "shark paper": with_ebc(shark_paper),
        low: with_ebc(shark_low),
    }
    if served is not None:
        models[served_name] = with_ebc(served)
    if args.reference_glue:
        models["shark paper, reference glue"] = with_ebc(ReferenceGlue(shark_paper))
    twins = {}  # ranked module -> its int32-row-map twin
    if args.row_map:
        for name, mp in zip(("shark paper", low), trained):
            twins[name] = f"{name}, int32 row map"
            models[twins[name]] = with_ebc(RowMapLookup(mp))
    sizes = {
        "torchrec fp32": allocated_bytes(fp32),
        "torchrec int8": allocated_bytes(int8),
        "torchrec int4": allocated_bytes(int4),
        "shark paper": shark_paper.memory_bytes(),
        low: shark_low.memory_bytes(),
        "shark paper, reference glue": shark_paper.memory_bytes(),
    }
    if served is not None:
        sizes[served_name] = served.memory_bytes()
    for (name, twin), mp in zip(twins.items(), trained):
        sizes[twin] = sum(b["embedding_bytes"] for b in mp.stores[0].table_bytes())
        # The two maps read the same rows: the same pooled values, bit for bit.
        kjt = next(iter(data.batches("test", 512))).sparse_features
        with torch.inference_mode():
            ranked = models[name].model.sparse_arch.embedding_bag_collection(kjt).values()
            int32 = models[twin].model.sparse_arch.embedding_bag_collection(kjt).values()
        if not torch.equal(ranked, int32):
            raise SystemExit(f"{name}: the ranked map and the int32 row map read different rows")

    rows = []
    for bs in [int(b) for b in args.batches.split(",")]:
        batches = [b for _, b in zip(range(args.steps), data.batches("test", bs))]
        times = {k: [] for k in models}
        lookup_times = {k: [] for k in models}
        with torch.inference_mode():
            for k, m in models.items():  # warm-up
                for b in batches[:2]:
                    m(b)
            for r in range(args.repeats):
                # Each round in its own order (seeded): a module timed right after another's large
                # temporaries, or always first, would carry that position in every round.
                order = list(models)
                random.Random(r).shuffle(order)
                for k in order:
                    m = models[k]
                    t0 = time.perf_counter()
                    for b in batches:
                        m(b)
                    times[k].append(time.perf_counter() - t0)
                    if not args.no_lookup_alone:
                        ebc = m.model.sparse_arch.embedding_bag_collection
                        t0 = time.perf_counter()
                        for b in batches:
                            ebc(b.sparse_features)
                        lookup_times[k].append(time.perf_counter() - t0)
        n = sum(b.labels.numel() for b in batches)
        for k in models:
            row = {
                "batch": bs,
                "module": k,
                "samples_per_s": n / statistics.median(times[k]),
                "embedding_bytes": sizes[k],
            }
            for base, key in (("torchrec fp32", "vs_fp32"), ("torchrec int8", "vs_int8")):
                ratios = [times[base][i] / times[k][i] for i in range(args.repeats)]  # same round
                row.update({key: statistics.median(ratios), f"{key}_min": min(ratios), f"{key}_max": max(ratios)})
            if lookup_times[k] and k in twins:
                ratios = [lookup_times[twins[k]][i] / lookup_times[k][i] for i in range(args.repeats)]
                row.update(
                    {
                        "lookup_vs_row_map": statistics.median(ratios),
                        "lookup_vs_row_map_range": [min(ratios), max(ratios)],
                    }
                )
            if lookup_times[k]:
                share = [lookup_times[k][i] / times[k][i] for i in range(args.repeats)]
                ceiling = [
                    times["torchrec fp32"][i] / max(times[k][i] - lookup_times[k][i], 1e-9) for i in range(args.repeats)
                ]
                row.update(
                    {
                        "lookup_ms": statistics.median(lookup_times[k]) / len(batches) * 1e3,
                        "lookup_share": statistics.median(share),
                        "zero_lookup_vs_fp32": statistics.median(ceiling),
                    }
                )
            rows.append(row)
    (out / "results.json").write_text(json.dumps(rows, indent=2))
    total_rows = sum(c.num_embeddings for c in tables)
    lines = [
        f"`bench/serve_throughput.py --scale {args.scale} --dim {args.dim} --budget {args.budget} "
        f"--batches {args.batches} --repeats {args.repeats} --steps {args.steps}{' --row-map' if args.row_map else ''}"
        + (
            f" --served-tiers {args.served_tiers} --served-budget {args.served_budget} --count-rows {args.count_rows}"
            if args.served_tiers
            else ""
        )
        + "`"
        f" ({total_rows:,} rows, 1 process, CPU, median of {args.repeats} rounds of {args.steps} batches)",
        "",
        "| batch | module | samples/s | vs torchrec fp32, median (min-max) of rounds | vs torchrec int8 | "
        "lookup alone, ms a batch | lookup share of forward | vs fp32 if the lookup cost nothing | "
        "embedding bytes | bytes vs fp32 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        alone = (
            f"{r['lookup_ms']:.2f} | {r['lookup_share']:.2f} | {r['zero_lookup_vs_fp32']:.2f}x"
            if "lookup_ms" in r
            else "| |"
        )
        lines.append(
            f"| {r['batch']} | {r['module']} | {r['samples_per_s']:,.0f} | "
            f"{r['vs_fp32']:.2f}x ({r['vs_fp32_min']:.2f}-{r['vs_fp32_max']:.2f}) | "
            f"{r['vs_int8']:.2f}x ({r['vs_int8_min']:.2f}-{r['vs_int8_max']:.2f}) | {alone} | "
            f"{r['embedding_bytes']:,} | {r['embedding_bytes'] / sizes['torchrec fp32']:.3f} |"
        )
    write_table(out, lines)
    plot(rows, out / "serve_throughput.png")


def plot(rows, path: Path) -> None:
    plt = pyplot()

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for k in dict.fromkeys(r["module"] for r in rows):
        pts = [(r["batch"], r["samples_per_s"]) for r in rows if r["module"] == k]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=k)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("batch size")
    ax.set_ylabel("samples/s (median)")
    ax.set_title("CPU inference throughput (DLRM forward)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()

"""Where the inference module's time goes: its FBGEMM call alone against the whole forward,
beside TorchRec's fp32 inference collection, on the same batches (medians of `--repeats`).

    .venv/bin/python bench/serve_profile.py [--scale 0.3] [--batch 2048] [--repeats 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from torchrec.inference.modules import quantize_embeddings  # noqa: E402
from torchrec.modules.embedding_modules import EmbeddingBagCollection  # noqa: E402

from shark_torchrec.config import DataConfig  # noqa: E402
from shark_torchrec.data import open_dataset  # noqa: E402
from shark_torchrec.models.dlrm import table_configs  # noqa: E402
from shark_torchrec.modules.inference import MixedPrecisionInferenceEmbeddingBagCollection  # noqa: E402
from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection  # noqa: E402
from shark_torchrec.modules.precision_policy import PrecisionPolicy  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=float, default=0.3)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--batch", type=int, default=2048)
    p.add_argument("--repeats", type=int, default=10)
    args = p.parse_args()
    data = open_dataset(DataConfig(synthetic_scale=args.scale, synthetic_eval_rows=4 * args.batch), 0)
    tables = table_configs(data.schema, args.dim)
    mp = MixedPrecisionEmbeddingBagCollection(
        tables=tables, precision_policy=PrecisionPolicy(memory_budget=0.35), device=torch.device("cpu")
    )
    ours = MixedPrecisionInferenceEmbeddingBagCollection.from_trained(mp)
    del mp
    fp32 = quantize_embeddings(
        torch.nn.Sequential(EmbeddingBagCollection(tables=tables)), dtype=torch.float, inplace=False
    )[0]
    batches = [b.sparse_features for b in data.batches("test", args.batch)]

    # The exact TBE inputs our forward builds for each batch (grouped slots and offsets).
    calls = []
    for kjt in batches:
        F, B = len(ours.feature_names), kjt.stride()
        values, nnz = kjt.values().long(), kjt.values().numel()
        rows_of = torch.repeat_interleave(ours.feature_base, kjt.lengths().view(F, B).sum(1), output_size=nnz) + values
        m = ours.row_map[rows_of]
        tier = torch.bucketize(m, ours.range_ends, right=True)
        g, slot = ours._lookup_group[tier], m - ours.range_shift[tier]
        grouped = torch.cat([slot[g == k] for k in range(3)])
        per_group = torch.stack([(g == k).sum() for k in range(3)]).to(torch.int32)
        ends = (
            torch.arange(1, nnz + 2, dtype=torch.int32)[None, :].clamp(max=per_group[:, None])
            + (torch.cumsum(per_group, 0, dtype=torch.int32) - per_group)[:, None]
        )
        calls.append((grouped, torch.cat([torch.zeros(1, dtype=torch.int32), ends.flatten()])))

    def per_batch_ms(fn) -> float:
        times = []
        with torch.inference_mode():
            fn()  # warm-up
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) / len(batches) * 1e3)
        return statistics.median(times)

    results = {
        "TorchRec fp32 collection (whole forward)": per_batch_ms(lambda: [fp32(b) for b in batches]),
        "ours (whole forward)": per_batch_ms(lambda: [ours(b) for b in batches]),
        "ours: the FBGEMM call alone": per_batch_ms(lambda: [ours._lookup(i, o) for i, o in calls]),
    }
    print(
        f"`bench/serve_profile.py --scale {args.scale} --dim {args.dim} --batch {args.batch} --repeats {args.repeats}` "
        f"({len(batches)} batches of {args.batch} x {len(tables)} features; ms per batch, median)\n"
    )
    for k, v in results.items():
        print(f"| {k} | {v:.3f} ms |")


if __name__ == "__main__":
    main()

"""A reassignment's time with the ranking keys made by our C++ ops against their torch
reference, side by side in one run.

    .venv/bin/python bench/reassign_speed.py [--rows 3600000] [--seen 0.4] [--repeats 7] [--churn 0.02]

One table of `--rows` rows (dim 64, the paper's tiers at budget 0.35) whose rows have scores as
after training: a share `--seen` of them seen at some step of the last 100, the rest at 0. The
first reassignment moves rows into the groups their scores earn; each repeat then times a
reassignment (no row moves: the steady state, where the keys and the cuts are most of the work)
with the store on the C++ ops and on the torch reference (`kernels="torch"`), in turn, then a
reassignment after a share `--churn` of the rows got new scores (rows move, as between two
reassignments of a training run). Printed: each case's and path's median (min-max)
milliseconds and the median (min-max) of the repeats' own ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from tqdm import tqdm

from shark_torchrec.modules.mixed_precision import MixedPrecisionEmbeddingBagCollection
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.reassign import reassign_stores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=3_600_000)
    ap.add_argument("--seen", type=float, default=0.4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--profile", action="store_true", help="then print a cProfile of 3 reassignments after new scores")
    ap.add_argument("--churn", type=float, default=0.02, help="share of rows given new scores before a moving case")
    args = ap.parse_args()
    torch.manual_seed(0)
    policy = PrecisionPolicy(memory_budget=0.35, reassign_every=100)
    table = EmbeddingBagConfig(name="t", embedding_dim=64, num_embeddings=args.rows, feature_names=["f"])
    store = MixedPrecisionEmbeddingBagCollection([table], device=torch.device("cpu"), precision_policy=policy).stores[0]
    seen = torch.rand(args.rows) < args.seen
    store.row_priority[:] = torch.where(seen, torch.rand(args.rows) ** 4, torch.zeros(args.rows))
    store.row_seen_step[:] = torch.randint(0, 100, (args.rows,), dtype=torch.int32)
    store.step.value = 101
    tables = {"t": (args.rows, 64)}
    moved = reassign_stores([store], store.policy, tables, None)
    print(f"first reassignment moved {moved}")
    churn = int(args.churn * args.rows)
    times = {(case, k): [] for case in ("no move", "moves") for k in ("cpp", "torch")}
    for _ in tqdm(range(args.repeats), desc="repeats"):
        for kernels in ("cpp", "torch"):
            store.kernels = kernels
            t0 = time.perf_counter()
            again = reassign_stores([store], store.policy, tables, None)
            times["no move", kernels].append((time.perf_counter() - t0) * 1e3)
            assert sum(again.values()) == 0, again  # both paths give the groups it already has
            rows = torch.randint(0, args.rows, (churn,))
            store.row_priority[rows] = torch.rand(churn) ** 4
            store.row_seen_step[rows] = 100
            t0 = time.perf_counter()
            moved = reassign_stores([store], store.policy, tables, None)
            times["moves", kernels].append((time.perf_counter() - t0) * 1e3)
    store.kernels = None
    print(f"last reassignment after new scores moved {moved}")
    if args.profile:
        import cProfile
        import pstats

        profile = cProfile.Profile()
        for _ in range(3):
            rows = torch.randint(0, args.rows, (churn,))
            store.row_priority[rows] = torch.rand(churn) ** 4
            profile.enable()
            reassign_stores([store], store.policy, tables, None)
            profile.disable()
        pstats.Stats(profile).sort_stats("tottime").print_stats(15)
    for case in ("no move", "moves"):
        for kernels in ("cpp", "torch"):
            ms = times[case, kernels]
            print(f"{case:>7}, {kernels:>5}: {statistics.median(ms):.1f} ms ({min(ms):.1f}-{max(ms):.1f})")
        ratios = [c / t for c, t in zip(times[case, "cpp"], times[case, "torch"])]
        print(
            f"{case:>7}, C++ / torch: {statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f}), "
            f"{args.repeats} repeats"
        )


if __name__ == "__main__":
    main()

"""Moving rows between precision groups: thresholds from the scores of all shards of a table.

Every replica of a row (data-parallel copies, column-wise slices) holds the same score, so
every copy computes the same group. In budget mode the cuts come from the ranking of all of a
table's rows over all ranks, found by bisection on the ranking key with one small all-reduce
per step (about 64 in all): no rank ever gathers another rank's scores.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.row_groups import RowGroupStore
from shark_torchrec.precision.priority import (
    groups_by_cuts,
    groups_by_threshold,
    kth_largest_cuts,
    ranking_keys,
)


def budget_targets(policy: PrecisionPolicy, tables: Dict[str, Tuple[int, int]], names: Sequence[str]) -> torch.Tensor:
    """[T, 2] int64: rows in fp32, rows in fp32 or fp16, per table (global counts)."""
    from shark_torchrec.modules.mixed_precision import target_counts

    out = torch.zeros(len(names), 2, dtype=torch.int64)
    for i, n in enumerate(names):
        rows, dim = tables[n]
        c = target_counts(policy, rows, dim, n)
        out[i, 0] = c.fp32
        out[i, 1] = c.fp32 + c.fp16
    return out


@torch.no_grad()
def reassign_stores(
    stores: Sequence[RowGroupStore],
    policy: PrecisionPolicy,
    tables: Dict[str, Tuple[int, int]],
    pg: Optional[dist.ProcessGroup],
) -> Dict[str, int]:
    """Regroup every row of `stores` by its current score. `tables` maps every table of the
    module (on all ranks, the same) to (global rows, dim used for the budget). Collective over
    `pg` in budget mode: all ranks call it together. Returns rows moved into each group."""
    moved = {"fp32": 0, "fp16": 0, "int8": 0}
    if policy.threshold_mode:
        for s in stores:
            for k, v in s.set_groups(groups_by_threshold(s.scores_now(), policy.t8, policy.t16)).items():
                moved[k] += v
        return moved
    names = sorted(tables)
    index = {n: i for i, n in enumerate(names)}
    targets = budget_targets(policy, tables, names)
    keys: List[torch.Tensor] = []
    sorted_keys: List[Tuple[int, torch.Tensor]] = []
    row_tables: List[torch.Tensor] = []
    for s in stores:
        all_rows = torch.arange(s.num_rows)
        k = ranking_keys(s.scores_now() if s.row_priority.numel() else torch.zeros(s.num_rows), s.global_rows(all_rows))
        keys.append(k)
        t_local = s.table_of_rows(all_rows)
        row_tables.append(torch.tensor([index[t.name] for t in s.tables], dtype=torch.int64)[t_local] if s.num_rows else t_local)
        for i, t in enumerate(s.tables):
            if t.counts_once:
                lo, hi = int(s.table_base[i]), int(s.table_base[i + 1])
                sorted_keys.append((index[t.name], torch.sort(k[lo:hi]).values))

    def count_at_least(cuts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(cuts)
        for ti, sk in sorted_keys:
            out[ti] += len(sk) - torch.searchsorted(sk, cuts[ti])
        if pg is not None and dist.get_world_size(pg) > 1:
            dist.all_reduce(out, group=pg)
        return out

    cuts = kth_largest_cuts(count_at_least, targets)
    for s, k, rt in zip(stores, keys, row_tables):
        for name, v in s.set_groups(groups_by_cuts(k, cuts[rt, 0], cuts[rt, 1])).items():
            moved[name] += v
    return moved

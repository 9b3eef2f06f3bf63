"""Moving rows between precision groups: thresholds from the scores of all shards of a table.

Every replica of a row (data-parallel copies, column-wise slices) holds the same score, so
every copy computes the same group. In budget mode the cuts come from the ranking of all of a
table's rows over all ranks, found by bisection on the ranking key with one small all-reduce
per step (about 64 in all): no rank ever gathers another rank's scores.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from shark_torchrec.kernels import groups_by_ranking, split_ranking_keys
from shark_torchrec.modules.precision_policy import PrecisionPolicy
from shark_torchrec.modules.row_groups import CHUNK_ROWS, RowGroupStore
from shark_torchrec.modules.row_lookup import kernels_for
from shark_torchrec.precision.budget import budget_targets
from shark_torchrec.precision.priority import (
    GROUP_NAMES,
    decay_table,
    groups_by_ranking_torch,
    groups_by_threshold,
    groups_from_sorted_keys,
    kth_largest_cuts,
    model_budget_cuts,
    per_byte_scores,
    split_ranking_keys_torch,
)


def _chunks(lo: int, hi: int):
    for a in range(lo, hi, CHUNK_ROWS):
        yield a, min(a + CHUNK_ROWS, hi)


def split_keys(
    keys_of_block: Callable[[int, int, torch.Tensor], int], lo: int, hi: int
) -> Tuple[torch.Tensor, torch.Tensor]:
    """A table's ranking keys in one buffer of 8 bytes a row, as two runs: the keys of rows
    whose score is 0 (never seen, or decayed to nothing: often most rows of a big table), in
    ascending order already, and the others, to be sorted. A zero score's key is the complement
    of its row, and rows come in order, so that run needs no sort; together the two runs count
    the keys at or above any cut as a sort of all of them would.

    Args:
        keys_of_block: writes the keys of store rows [a, b) into its third argument as
            `split_ranking_keys` does (zero-score keys first, ascending), returning how many
            are zero-score keys.
        lo, hi: the table's rows in the store.

    Returns:
        (zeros, others): views of the buffer; zeros ascending, others in no order.
    """
    buf = torch.empty(hi - lo, dtype=torch.int64)
    chunk = torch.empty(min(CHUNK_ROWS, hi - lo), dtype=torch.int64)
    n_zero, n_other = 0, 0
    for a, b in reversed(list(_chunks(lo, hi))):  # last rows first: the smallest zero-score keys
        out = chunk[: b - a]
        z = keys_of_block(a, b, out)
        buf[n_zero : n_zero + z] = out[:z]
        n_zero += z
        k = b - a - z
        buf[len(buf) - n_other - k : len(buf) - n_other] = out[z:]
        n_other += k
    return buf[:n_zero], buf[n_zero:]


def _sort_in_place(keys: List[torch.Tensor]) -> None:
    """Sort each int64 tensor in place with numpy (no second copy, no index array: torch.sort
    makes both), several at once: numpy's sort releases the GIL, so the tables sort in as many
    threads as torch's intra-op pool has, largest first."""
    order = sorted(keys, key=len, reverse=True)
    workers = min(len(order), torch.get_num_threads())
    if workers <= 1:
        for k in order:
            k.numpy().sort()
        return
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda k: k.numpy().sort(), order))


@torch.no_grad()
def reassign_stores(
    stores: Sequence[RowGroupStore],
    policy: PrecisionPolicy,
    tables: Dict[str, Tuple[int, int]],
    pg: Optional[dist.ProcessGroup],
    widths: Optional[Dict[str, Tuple[int, ...]]] = None,
    prefixes: Optional[Sequence[str]] = None,
) -> Dict[str, int]:
    """Regroup every row of `stores` by its current score. `tables` maps every table of the
    module (on all ranks, the same) to (global rows, dim used for the budget); `widths` maps
    it to its column-slice widths (default: one slice of that dim), which the model-wide
    budget (`policy.budget_scope == "model"`) charges. `prefixes` (one per store) name the
    tables of stores from several collections apart: a table is `tables[prefix + name]`.
    Collective over `pg` in budget mode: all ranks call it together. Returns rows moved into
    each group.

    Memory: scores and keys are made a chunk of rows at a time; the only full-size
    temporaries are the new group tags (1 byte a row) and, in budget mode, each table's
    ranking keys (8 bytes a row, sorted in place; rows of score 0 need no sort: `split_keys`),
    from which the tables' groups are then read, one store's tags at a time (each table's keys
    freed as it is grouped): at most the keys and one store's tags at once.

    Args:
        stores: the stores whose rows are regrouped (this rank's).
        policy: the resolved policy (threshold or budget mode, tiers, budget).
        tables: see above.
        pg: the process group the tables are sharded over (None: this process only).
        widths: see above.
        prefixes: see above (default: no prefix).

    Returns:
        Rows moved into each group (by group name), over the stores.
    """
    moved = {name: 0 for name in GROUP_NAMES}
    if policy.threshold_mode:
        for s in stores:
            groups = torch.empty(s.num_rows, dtype=torch.int8)
            for a, b in _chunks(0, s.num_rows):
                groups[a:b] = groups_by_threshold(s.scores_now(a, b), policy.t8, policy.t16)
            for k, v in s.set_groups(groups).items():
                moved[k] += v
        return moved
    names = sorted(tables)
    index = {n: i for i, n in enumerate(names)}
    model_scope = policy.budget_mode and policy.budget_scope == "model"
    widths = {n: tuple(widths[n]) if widths and n in widths else (tables[n][1],) for n in names}
    full_dim = {n: sum(widths[n]) for n in names}
    # Model scope: keys unique across tables (ties go to the lower row of the table first by name).
    model_base = dict(zip(names, torch.tensor([0] + [tables[n][0] for n in names]).cumsum(0).tolist()))
    if model_scope and sum(tables[n][0] for n in names) >= 1 << 32:
        raise ValueError("budget_scope='model' ranks at most 2^32 rows over all tables under the budget: use 'table'")

    prefixes = list(prefixes) if prefixes is not None else [""] * len(stores)

    def scores_of(s: RowGroupStore, name: str, a: int, b: int) -> torch.Tensor:
        # Model scope ranks by score per byte (keys unique across tables by their row base).
        scores = s.scores_now(a, b)
        return per_byte_scores(scores, full_dim[name]) if model_scope else scores

    def first_row(s: RowGroupStore, name: str, i: int, a: int) -> int:
        # Store row a of local table i: global row = position in the table + its row offset.
        return a - int(s.table_base[i]) + s.tables[i].row_offset + (model_base[name] if model_scope else 0)

    # Each scored store's decay factors, read by the C++ key op (seen steps are >= 0: no row waits longer).
    decay = {s: decay_table(s.policy.beta, s.step.value) for s in stores if s.row_priority.numel()}

    def keys_of_block(s: RowGroupStore, name: str, i: int, a: int, b: int, out: torch.Tensor) -> int:
        # The keys are made by our C++ op where the store's kernels are (CPU), which decays the
        # stored scores (and divides them per byte) itself, as scores_of does; else by torch.
        if kernels_for(s) != "cpp":
            return split_ranking_keys_torch(scores_of(s, name, a, b), first_row(s, name, i, a), out)
        if not s.row_priority.numel():  # no scores kept: all 0
            return split_ranking_keys(s.scores_now(a, b), first_row(s, name, i, a), out)
        return split_ranking_keys(
            s.row_priority[a:b],
            first_row(s, name, i, a),
            out,
            s.row_seen_step[a:b],
            s.step.value - 1,  # scores as of the last completed step, as `scores_now`
            decay[s],
            float(4 * full_dim[name]) if model_scope else 1.0,  # `per_byte_scores`
        )

    grouping = {s: groups_by_ranking if kernels_for(s) == "cpp" else groups_by_ranking_torch for s in stores}

    # (store, local table) -> (table index, keys of score 0, the others)
    sorted_keys: Dict[Tuple[RowGroupStore, int], Tuple[int, torch.Tensor, torch.Tensor]] = {}
    for s, prefix in zip(stores, prefixes):
        for i, t in enumerate(s.tables):
            if not t.counts_once:
                continue
            lo, hi = int(s.table_base[i]), int(s.table_base[i + 1])
            name = prefix + t.name
            zeros, others = split_keys(lambda a, b, out: keys_of_block(s, name, i, a, b, out), lo, hi)
            sorted_keys[s, i] = (index[name], zeros, others)
    _sort_in_place([others for *_, others in sorted_keys.values()])

    def count_at_least(cuts: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(cuts)
        for ti, zeros, others in sorted_keys.values():
            for sk in (zeros, others):
                out[ti] += len(sk) - torch.searchsorted(sk, cuts[ti])
        if pg is not None and dist.get_world_size(pg) > 1:
            dist.all_reduce(out, group=pg)
        return out

    if model_scope:
        shared = model_budget_cuts(
            lambda cut: count_at_least(torch.full((len(names), 1), cut, dtype=torch.int64))[:, 0],
            [tables[n][0] for n in names],
            [widths[n] for n in names],
            [full_dim[n] for n in names],
            policy.memory_budget,
            policy.fp32_fraction,
            policy.groups,
        )
        cuts = torch.tensor([shared] * len(names), dtype=torch.int64).reshape(len(names), -1)
    else:
        cuts = kth_largest_cuts(count_at_least, budget_targets(policy, tables, names))
    tiers = sorted(policy.groups)
    # A table counted here takes its groups from its sorted keys (each key holds its row); a
    # copy counted elsewhere (a replica, a column slice) ranks its scores again, to the same
    # groups. One store's group tags at a time, each table's keys freed once it is grouped.
    for s, prefix in zip(stores, prefixes):
        groups = torch.empty(s.num_rows, dtype=torch.int8)
        for i, t in enumerate(s.tables):
            lo, hi = int(s.table_base[i]), int(s.table_base[i + 1])
            name = prefix + t.name
            table_cuts = [int(x) for x in cuts[index[name]]]
            if (s, i) in sorted_keys:
                _, zeros, others = sorted_keys.pop((s, i))
                first = first_row(s, name, i, lo)
                groups_from_sorted_keys((zeros, others), table_cuts, tiers, first, groups[lo:hi])
                del zeros, others
                continue
            for a, b in _chunks(lo, hi):
                grouping[s](scores_of(s, name, a, b), first_row(s, name, i, a), table_cuts, tiers, groups[a:b])
        for name, v in s.set_groups(groups).items():
            moved[name] += v
        del groups
    return moved

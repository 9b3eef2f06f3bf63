"""Budget and tier math on whole tables: how many rows each tier holds, which rows start
where, and how one model-wide budget is first shared between tables.

Pure functions of a tier rule and table sizes (no stores, no process groups): the
collections (`shark_torchrec.modules`) apply them to their rows, the reassignment turns them
into cuts over the ranking of scores, and the planner sizes shards with them.
"""

from __future__ import annotations

from typing import Dict, Optional, Protocol, Sequence, Tuple

import torch

from shark_torchrec.precision.priority import (
    DROPPED,
    FP32,
    INT8,
    ROW_MAP_BYTES,
    BudgetError,
    GroupCounts,
    budget_counts,
    groups_by_threshold,
    row_bytes,
)


class TierRule(Protocol):
    """What the math here reads of a policy (`shark_torchrec.modules.precision_policy.
    PrecisionPolicy`, resolved, is one)."""

    groups: Tuple[int, ...]
    scored: bool
    threshold_mode: bool
    row_fractions: Optional[Tuple[float, ...]]
    memory_budget: Optional[float]
    fp32_fraction: float
    t8: Optional[float]
    t16: Optional[float]


def target_counts(policy: TierRule, rows: int, dim: int, table: str) -> GroupCounts:
    """Rows per group of a whole table in budget mode, row-fractions mode or a one-group mode.

    Args:
        policy: a resolved policy (`PrecisionPolicy.resolved`: budget mode needs its budget).
        rows: the table's global rows.
        dim: the width its budget is computed at.
        table: its name (for error messages).

    Returns:
        Rows per group id.
    """
    groups = policy.groups
    if not policy.scored:
        return GroupCounts.of({groups[0]: rows})
    if policy.threshold_mode:
        return GroupCounts.of({INT8: rows})
    if policy.row_fractions is not None:
        counts, left = {}, rows
        for g, fraction in zip(groups, policy.row_fractions):
            counts[g] = min(left, int(fraction * rows))
            left -= counts[g]
        counts[groups[-1]] = left
        return GroupCounts.of(counts)
    if policy.memory_budget is None:
        raise ValueError("target_counts needs a resolved policy (PrecisionPolicy.resolved sets the default budget)")
    return budget_counts(rows, dim, policy.memory_budget, policy.fp32_fraction, table=table, groups=groups)


def budget_targets(policy: TierRule, tables: Dict[str, Tuple[int, int]], names: Sequence[str]) -> torch.Tensor:
    """Per-table cumulative targets for the cuts of a per-table budget.

    Args:
        policy: a resolved policy with K groups.
        tables: table -> (global rows, dim its budget uses).
        names: the tables, in the order of the output's rows.

    Returns:
        [T, K - 1] int64: per table, the rows in the most precise group, in the two most
        precise, ... (with the paper's: fp32, fp32 or fp16).
    """
    groups = policy.groups
    out = torch.zeros(len(names), len(groups) - 1, dtype=torch.int64)
    for i, n in enumerate(names):
        rows, dim = tables[n]
        per_group = target_counts(policy, rows, dim, n).as_tuple()
        for k in range(len(groups) - 1):
            out[i, k] = sum(per_group[g] for g in groups[: k + 1])
    return out


def initial_groups(policy: TierRule, counts: GroupCounts, row_offset: int, rows: int) -> torch.Tensor:
    """Groups before any score exists. Threshold mode: every row int8 (all scores are 0 <
    t8, unless t8 = 0). Other modes: the budget rule on all-zero scores, i.e. by row id, the
    lowest ids most precise (with vocabularies sorted by frequency, the hottest rows).

    Args:
        policy: the resolved policy.
        counts: the table's rows per group (`target_counts`).
        row_offset: the first global row held here.
        rows: the rows held here.

    Returns:
        int8 [rows] group ids.
    """
    if policy.threshold_mode:
        return groups_by_threshold(torch.zeros(1), policy.t8, policy.t16).expand(rows).clone()
    return groups_by_row_id(counts, row_offset, rows)


def groups_by_row_id(counts: GroupCounts, row_offset: int, rows: int) -> torch.Tensor:
    """The budget rule on all-zero scores for rows [row_offset, row_offset + rows): the
    lowest global ids most precise (slices, no per-row temporaries).

    Args:
        counts: the table's rows per group.
        row_offset: the first global row held here.
        rows: the rows held here.

    Returns:
        int8 [rows] group ids.
    """
    per_group = counts.as_tuple()
    cheapest = max(g for g, n in enumerate(per_group) if n) if any(per_group) else INT8
    g = torch.full((rows,), cheapest, dtype=torch.int8)
    # Most precise last: group k takes the global rows below the cumulative count up to k.
    for group in reversed(range(cheapest)):
        g[: max(0, sum(per_group[: group + 1]) - row_offset)] = group
    return g


def table_floor_bytes(rows: int, dim: int, groups: Sequence[int]) -> int:
    """The fewest bytes a table can take under these groups: every row in the cheapest one
    plus the row map (with the dropped tier, the table's fp32 fallback row too).

    Args:
        rows, dim: the table's size.
        groups: the group ids rows can be in.

    Returns:
        The bytes.
    """
    cheapest = max(groups)
    extra = row_bytes(dim, FP32) if cheapest == DROPPED else 0
    return rows * (row_bytes(dim, cheapest) + ROW_MAP_BYTES) + extra


def model_start_budgets(policy: TierRule, tables: Dict[str, Tuple[int, int]]) -> Dict[str, float]:
    """Per-table budgets that start a model-wide budget (`budget_scope="model"`) before any
    score exists: every table at the model's budget, except that a table whose own floor
    (`table_floor_bytes`) lies above it gets that floor, paid for by the others in proportion
    to their room above theirs. The tables' bytes then add up to at most the model's budget.

    Args:
        policy: a resolved budget-mode policy.
        tables: every table under the budget -> (global rows, dim its budget uses).

    Returns:
        table -> budget (fraction of its own fp32 bytes).

    Raises:
        BudgetError: the tables' floors add up to more than the model's budget.
    """
    budget = policy.memory_budget
    fp32 = {n: r * d * 4 for n, (r, d) in tables.items()}
    floor = {n: table_floor_bytes(r, d, policy.groups) / max(fp32[n], 1) for n, (r, d) in tables.items()}
    excess = sum((floor[n] - budget) * fp32[n] for n in tables if floor[n] > budget)
    room = {n: (budget - floor[n]) * fp32[n] for n in tables if floor[n] <= budget}
    if excess > sum(room.values()) + 1e-6:
        total = sum(fp32.values())
        raise BudgetError(
            f"memory budget {budget} is below what the model's tables can reach: their floors take "
            f"{sum(floor[n] * fp32[n] for n in tables) / max(total, 1):.3f} of fp32"
        )
    share = sum(room.values())
    out = {}
    for n in tables:
        if floor[n] > budget:
            out[n] = floor[n]
        else:
            # (A table without rows gives nothing and takes nothing: its share is the budget.)
            out[n] = budget - (excess * room[n] / share / fp32[n] if share > 0 and fp32[n] > 0 else 0.0)
    return out

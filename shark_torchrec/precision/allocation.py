"""Tiers for served rows chosen by the error each tier would give a row, weighed by the row's
priority, under one byte budget (`shark export --allocation error`).

The rank rule (`one_bit_tier_counts`, `model_budget_cuts`) fills the tiers in priority order: the
most frequent rows take the precise tiers whatever their values. This rule asks, per row, what
each tier would cost it: a row's loss from serving it in tier g is taken as its priority w (how
often it is looked up, Eq. 7 or counted occurrences) times the squared error e_g of its values
in g. The rows' tiers minimise sum_i w_i e_i(g_i) subject to sum_i bytes(g_i) <= budget: each
row takes argmin_g w_i e_i(g) + lam * bytes(g), with the price lam found by bisection (the
Lagrangian relaxation, exact up to the rows at the final price, which are filled by their gain
per byte). A frequent row whose values 1 bit already holds well goes to 1 bit; a rarer row with
spread values keeps 4.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from shark_torchrec.precision.priority import BudgetError

__all__ = ["allocate_by_error"]

_BISECTIONS = 100  # halvings of the price's log-range: far below any row's step between tiers


def _choices(cost_of_error: torch.Tensor, costs: torch.Tensor, price: float) -> torch.Tensor:
    """Per row, the tier of least w * e + price * bytes; ties go to the cheaper tier (the
    tiers come cheapest first, and argmin keeps the first)."""
    return torch.argmin(cost_of_error + price * costs[None, :], dim=1)


def allocate_by_error(
    weights: torch.Tensor, errors: torch.Tensor, costs: Sequence[float], budget_bytes: float
) -> torch.Tensor:
    """Each row's tier: least sum of weight x squared error over the rows, within a byte budget.

    Args:
        weights: float [n] >= 0, a row's priority (its lookups); a row of weight 0 takes the
            cheapest tier.
        errors: float [n, G], the squared error of row i's values served in tier g (0 for a
            tier that holds the row exactly).
        costs: the G tiers' bytes a row, strictly increasing (cheapest first).
        budget_bytes: the bytes all rows may take.

    Returns:
        int64 [n]: each row's tier, an index into `costs`.

    Raises:
        ValueError: shapes or costs that do not fit, or a negative or non-finite weight or error.
        BudgetError: every row in the cheapest tier does not fit.
    """
    n = weights.shape[0]
    if errors.dim() != 2 or errors.shape[0] != n or errors.shape[1] != len(costs) or not costs:
        raise ValueError(f"allocate_by_error: errors {tuple(errors.shape)} for {n} rows and {len(costs)} tiers")
    if any(b <= a for a, b in zip(costs[:-1], costs[1:])):
        raise ValueError(f"allocate_by_error: tier costs must rise strictly, got {list(costs)}")
    w = weights.double()
    e = errors.double()
    if not bool(torch.isfinite(w).all() and (w >= 0).all() and torch.isfinite(e).all() and (e >= 0).all()):
        raise ValueError("allocate_by_error: weights and errors must be finite and >= 0")
    c = torch.tensor([float(x) for x in costs], dtype=torch.float64)
    floor = n * float(c[0])
    if floor > budget_bytes + 1e-6:
        raise BudgetError(
            f"every row in the cheapest tier takes {floor:.0f} bytes, the budget leaves {budget_bytes:.0f}"
        )
    if n == 0:
        return torch.zeros(0, dtype=torch.int64)
    loss = w[:, None] * e

    def spent(choice: torch.Tensor) -> float:
        return float(c[choice].sum())

    best = torch.argmin(loss, dim=1)  # at price 0: no row pays for bytes it does not use
    # ...but among tiers of equal loss the cheapest (argmin keeps the first, cheapest first).
    if spent(best) <= budget_bytes + 1e-6:
        return best
    # Bracket the price: at `hi` every row takes the cheapest tier (the largest loss saved by a
    # byte is below it), at `lo` the choice overspends.
    gain = (loss[:, :1] - loss) / (c[None, :] - c[:1]).clamp_min(1e-30)
    hi = max(float(gain[:, 1:].max()), 1e-300) * 2.0
    lo = hi
    while spent(_choices(loss, c, lo)) <= budget_bytes + 1e-6 and lo > 1e-300:
        lo /= 1024.0
    for _ in range(_BISECTIONS):
        mid = math.sqrt(lo * hi)
        if spent(_choices(loss, c, mid)) <= budget_bytes + 1e-6:
            hi = mid
        else:
            lo = mid
    choice = _choices(loss, c, hi)
    # The rows that would move up at the lower price, best gain per byte first, while bytes last.
    richer = _choices(loss, c, lo)
    moved = (richer != choice).nonzero().flatten()
    if len(moved):
        extra = c[richer[moved]] - c[choice[moved]]
        saved = loss[moved, choice[moved]] - loss[moved, richer[moved]]
        order = torch.argsort(saved / extra, descending=True, stable=True)
        left = budget_bytes - spent(choice)
        take = torch.cumsum(extra[order], 0) <= left + 1e-6
        up = moved[order[take]]
        choice[up] = richer[up]
    return choice

"""Row priority (paper Eq. 7) and the rules that turn priorities into precision groups.

Eq. 7, applied every step to every row:  w <- (1 - beta) * w + beta * (alpha * c_pos + c_neg),
with c_pos / c_neg the positive / negative examples of the step's batch that contain the row.
A row absent from a batch only decays, so we store (w, step last updated) and apply the
missing (1 - beta)^k factors when the row is next seen or when scores are read.

What beta does in practice: 1 / beta is roughly the memory of the score in steps. The
paper's beta = 0.99 keeps 1% of the past per step, so the score is essentially the weighted
count of the row in the last batch that contained it, and it falls a hundredfold for every
step the row is absent: a recency signal. Small beta (0.01) averages over ~100 steps: a
frequency signal. In threshold mode the scale matters too: a row seen in every batch with
mean weighted count c per batch converges to c, so t8 and t16 are weighted occurrences per
batch (of our global batch size), not the paper's absolute numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch

FP32, FP16, INT8, INT4, INT2, DROPPED = 0, 1, 2, 3, 4, 5  # group (tier) ids, from most to least precise
GROUP_NAMES = ("fp32", "fp16", "int8", "int4", "int2", "dropped")
PAPER_GROUPS = (FP32, FP16, INT8)  # the paper's tiers, the default
INT_BITS = {INT8: 8, INT4: 4, INT2: 2}  # integer groups: bits per value
# The 1-bit tier is served only (`shark export --tiers ... int1`): no training store holds it, so
# it takes the next id, after `dropped`, whose id checkpoints keep. A 1-bit row keeps each value's
# sign and one magnitude a in a byte (an eighth-octave code): it serves +a or -a
# (`sign_magnitude_rows`).
INT1 = 6
# The symmetric 4- and 2-bit tiers are served only too, planned with int1 below them: codes c
# read as s x (c - 7.5) or s x (c - 1.5), with one scale s a row in a byte on the 1-bit
# magnitude grid (dim / 2 + 1 and dim / 4 + 1 bytes where int4's and int2's fp16 scale and bias
# take 4: at dim 16, 9 bytes, not 12; at dim 64, 17, not 20), fitted per row (`symmetric_rows`).
INT4S = 7
INT2S = 8
SERVED_GROUP_NAMES = GROUP_NAMES + ("int1", "int4s", "int2s")  # the group ids a served module's rows can have
SERVED_ONLY = SERVED_GROUP_NAMES[len(GROUP_NAMES) :]  # tiers no training store holds: the export plans them
SYMMETRIC_BITS = {INT4S: 4, INT2S: 2}  # the symmetric groups: bits per value
SERVED_PRECISION_ORDER = (FP32, FP16, INT8, INT4, INT4S, INT2, INT2S, INT1, DROPPED)  # most precise first
ROW_MAP_BYTES = 4  # one int32 slot per row, numbered across the group tables (the group follows from its range)
DEFAULT_BUDGET = 0.35  # the paper tiers' default budget wherever int8 rows leave room for it (dim >= 45)
BUDGET_MARGIN = 0.05  # the default's room above the all-int8 floor at smaller dims


# The head rule, for budgets with the dropped tier: the highest ranked rows, at most the
# policy's `fp32_fraction` of the rows and at most this share of the bytes the budget leaves
# for weights, keep the most precise stored tier before the rest share what is left. Without
# a head every kept row sat in the cheapest tier at such budgets, so the hottest rows lost as
# much as the tail (synthetic Criteo-like data at 0.05 of fp32: bench/README.md).
HEAD_MAX_BYTES_SHARE = 0.5


# Eq. 7's decay factors (1 - beta)^k come from a table, one per beta, of torch's pow
# evaluated in its vectorized loop. Called on a whole tensor, torch's pow rounds the elements of
# its vectorized loop and of the loop's scalar tail differently (for beta 0.99 the two differ at
# k = 19), and which elements fall in a tail depends on the tensor's length and on the thread
# count (every thread's share has one), so the same row could decay by two factors in two
# calls. Blocks of a multiple of 64 elements (the loop's step at any vector width) below torch's
# one-thread grain (32,768) have no tail. And a table read is a gather, where pow took about 6 ns
# an element (Intel Xeon, two threads; a third of a reassignment's time).
_DECAY_BLOCK = 16384
_decay_tables: Dict[Tuple[float, torch.device], torch.Tensor] = {}


def decay_table(beta: float, max_steps: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """(1 - beta)^k in float32 for k = 0 .. max_steps at least, or up to the first k whose
    factor is 0 (every later factor is 0 too): one table per beta (and device), grown as steps
    need it. A small beta's table is long: about 103 / beta entries before its factors reach 0
    (10,347 for beta 0.01), 4 bytes each, made as the steps need them. (The precision policy
    refuses a beta below about 3e-8, for which 1 - beta rounds to 1 and nothing would decay.)

    Args:
        beta: Eq. 7's rate, in (0, 1].
        max_steps: the largest k the caller will read.
        device: where the table is wanted (default: CPU); it is made on the CPU.

    Returns:
        float32 [n]: entry k is the factor of k steps; if n <= max_steps, the last entry is 0
        and stands for every k past it.
    """
    device = torch.device("cpu") if device is None else torch.device(device)
    base = torch.tensor(1.0 - beta, dtype=torch.float32)
    cpu_key = (float(base), torch.device("cpu"))
    table = _decay_tables.get(cpu_key, torch.empty(0, dtype=torch.float32))
    while len(table) <= max_steps and not (len(table) and float(table[-1]) == 0.0):
        k = torch.arange(len(table), len(table) + _DECAY_BLOCK, dtype=torch.float32)
        block = torch.pow(base, k)
        zeros = (block == 0).nonzero()  # the earlier blocks have none
        table = torch.cat([table, block[: int(zeros[0]) + 1] if len(zeros) else block])
    _decay_tables[cpu_key] = table
    if device.type == "cpu":
        return table
    key = (float(base), device)
    if key not in _decay_tables or len(_decay_tables[key]) != len(table):  # copied again as it grows
        _decay_tables[key] = table.to(device)
    return _decay_tables[key]


def decay_factors(beta: float, steps: torch.Tensor) -> torch.Tensor:
    """(1 - beta)^steps in float32, from `decay_table`: the same factor for the same steps
    wherever it is read.

    Args:
        beta: Eq. 7's rate.
        steps: integer tensor of steps since the scores were stored, >= 0.

    Returns:
        float32, the shape of `steps`.
    """
    table = decay_table(beta, int(steps.max()) if steps.numel() else 0, steps.device)
    return table[steps.clamp_max(len(table) - 1).long()]


def decayed(score: torch.Tensor, last_step: torch.Tensor, step: int, beta: float) -> torch.Tensor:
    """Scores as of `step`, applying the decay of the steps since each row was last updated.

    Args:
        score: the stored scores.
        last_step: the step each was last updated at.
        step: the step to decay to (a row updated after it is not decayed).
        beta: Eq. 7's rate: each step keeps 1 - beta of a score.

    Returns:
        score x (1 - beta)^(step - last_step), float32 (`decay_factors`).
    """
    return score * decay_factors(beta, (step - last_step).clamp_min(0))


def updated(
    score: torch.Tensor,
    last_step: torch.Tensor,
    step: int,
    positives: torch.Tensor,
    negatives: torch.Tensor,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """Eq. 7 for rows present at `step` (score as of step - 1, then this step's update).

    Args:
        score, last_step: the rows' stored scores and the steps they were last updated at.
        step: this step.
        positives, negatives: the rows' positive and negative examples in this step's batch.
        alpha: the weight of a positive example.
        beta: Eq. 7's rate.

    Returns:
        The new scores (to store with `step`).
    """
    prev = decayed(score, last_step, step - 1, beta)
    return (1.0 - beta) * prev + beta * (alpha * positives + negatives)


def add_occurrences_(counts: torch.Tensor, ids: torch.Tensor, positive: torch.Tensor, alpha: float) -> torch.Tensor:
    """Eq. 7's increments summed without decay, in place: each lookup of a row adds `alpha` when
    its example is positive and 1 when it is negative. Over a whole training split this ranks
    rows by how often (and how often positively) the data uses them, the priority of rows that
    trained without one (stock fp32 tables) when they are put into tiers for serving.

    Args:
        counts: [rows] float64, the running sums (updated in place).
        ids: [n] the rows looked up.
        positive: [n] bool, whether each lookup's example is positive.
        alpha: the weight of a positive example.

    Returns:
        `counts`.
    """
    inc = torch.where(positive, torch.tensor(float(alpha), dtype=counts.dtype), torch.tensor(1.0, dtype=counts.dtype))
    return counts.index_add_(0, ids.long(), inc)


def row_bytes(dim: int, group: int, row_alignment: int = 1) -> int:
    """Bytes of one row's weights in a group (int8/int4/int2 rows carry an fp16 scale and bias,
    then their codes packed 2, 4 or 8 to a byte; a 1-bit row one byte for its magnitude, then a
    sign bit a value; a symmetric int4 or int2 row one byte for its scale, then its codes two or
    four a byte; a dropped row has none).

    Args:
        dim: the row's width.
        group: the group id.
        row_alignment: rows are padded to a multiple of this many bytes.

    Returns:
        The bytes.
    """
    raw = (4 * dim, 2 * dim, dim + 4, dim // 2 + 4, dim // 4 + 4, 0, dim // 8 + 1, dim // 2 + 1, dim // 4 + 1)[group]
    return (raw + row_alignment - 1) // row_alignment * row_alignment


def min_budget(dim: int, cheapest: int = INT8) -> float:
    """The smallest budget (fraction of fp32 bytes) a table of this dim can reach: every row
    in the cheapest group (int8 by default: codes, fp16 scale and bias) plus the row map.

    Args:
        dim: the table's dim.
        cheapest: the cheapest group id the rows can be in.

    Returns:
        The fraction of the table's fp32 bytes.
    """
    return (row_bytes(dim, cheapest) + ROW_MAP_BYTES) / (4 * dim)


def default_budget(dims: Iterable[int], cheapest: int = INT8) -> float:
    """The budget a policy gets when none is given, for tables of these dims: the larger of
    0.35 of fp32 bytes and the narrowest table's all-int8 floor plus 0.05 (room for some
    fp16/fp32 rows), rounded up to a hundredth: 0.43 at dim 16, 0.37 at 32, 0.35 from 40 up.

    Args:
        dims: the embedding dims of the tables the budget applies to.

    Returns:
        A budget every table of these dims can meet.
    """
    floor = max((min_budget(d, cheapest) for d in dims), default=0.0)
    if cheapest != INT8:  # below int8: the floor plus the margin, not the paper tiers' 0.35
        return math.ceil((floor + BUDGET_MARGIN) * 100 - 1e-9) / 100
    return max(DEFAULT_BUDGET, math.ceil((floor + BUDGET_MARGIN) * 100 - 1e-9) / 100)


@dataclass(frozen=True)
class GroupCounts:
    """Rows per group of a table (0 for groups the policy does not use)."""

    fp32: int
    fp16: int
    int8: int
    int4: int = 0
    int2: int = 0
    dropped: int = 0

    def as_tuple(self) -> Tuple[int, ...]:
        """Rows per group, in group-id order (fp32, fp16, int8, int4, int2, dropped).

        Returns:
            The six counts.
        """
        return (self.fp32, self.fp16, self.int8, self.int4, self.int2, self.dropped)

    @staticmethod
    def of(counts: Dict[int, int]) -> "GroupCounts":
        """From {group id: rows}.

        Args:
            counts: group id -> rows (a group left out has none).

        Returns:
            The GroupCounts.
        """
        return GroupCounts(*(int(counts.get(g, 0)) for g in range(len(GROUP_NAMES))))


class BudgetError(ValueError):
    """A memory budget below what the tables can reach (the message names the budget and the
    floor), or outside the range a budget takes."""


def budget_counts(
    rows: int,
    dim: int,
    budget: float,
    fp32_fraction: float,
    row_alignment: int = 1,
    table: str = "",
    groups: Sequence[int] = PAPER_GROUPS,
    reserved: float = 0.0,
) -> GroupCounts:
    """Rows per group for a table whose embedding bytes (weights + row map) must stay within
    `budget` x its fp32 bytes: from the most precise of `groups` down, each takes as many rows
    as fit while the rest stay in the cheapest one (fp32 at most `fp32_fraction` of the rows).
    With the paper's groups: up to `fp32_fraction` fp32, as many fp16 as fit, the rest int8.
    With the dropped tier, the table's fp32 fallback row is paid for first, and a head of the
    highest ranked rows (`HEAD_MAX_BYTES_SHARE`, at most `fp32_fraction` of them) keeps the
    most precise stored tier before anything else; rows are dropped (lowest ranked first) only
    when the budget cannot keep the rest in the cheapest stored tier. `reserved`: bytes taken
    off the budget before the rows share it.

    Args:
        rows, dim: the table's size.
        budget: the fraction of its fp32 bytes its embedding bytes may take.
        fp32_fraction: at most this fraction of the rows in fp32 (with the dropped tier, in the head).
        row_alignment: rows are padded to a multiple of this many bytes.
        table: the table's name (for the error message).
        groups: the group ids rows can be in.
        reserved: see above.

    Returns:
        Rows per group.

    Raises:
        BudgetError: even every row in the cheapest group does not fit.
    """
    groups = sorted(groups)
    if DROPPED in groups and len(groups) > 1:
        if rows == 0:
            return GroupCounts.of({})
        stored = groups[:-1]
        top, cheapest = stored[0], stored[-1]
        reserved += row_bytes(dim, FP32, row_alignment)  # the fallback row
        cap = budget * rows * dim * 4 - rows * ROW_MAP_BYTES - reserved
        if cap < -1e-6:
            need = (rows * ROW_MAP_BYTES + reserved) / max(rows * dim * 4, 1)
            raise BudgetError(
                f"memory budget {budget} is below what table {table or '?'} (dim {dim}, {rows} rows) can reach: "
                f"every row dropped, the row map and the fallback row take {need:.3f} of fp32"
            )
        top_bytes, kept_bytes = row_bytes(dim, top, row_alignment), row_bytes(dim, cheapest, row_alignment)
        head = 0
        if top != cheapest:
            head = min(int(fp32_fraction * rows), int(max(cap, 0.0) * HEAD_MAX_BYTES_SHARE // top_bytes))
        left = cap - head * top_bytes
        if left < (rows - head) * kept_bytes - 1e-6:
            kept = min(rows - head, int(max(left, 0.0) // kept_bytes))
            return GroupCounts.of({top: head, cheapest: kept, DROPPED: rows - head - kept})
        # Every row fits stored: the stored tiers' rule, which keeps at least the head in the
        # top tier (its spare bytes cover the head's), so the rows' tiers rise with the budget.
        return budget_counts(rows, dim, budget, fp32_fraction, row_alignment, table, stored, reserved)
    cheapest = groups[-1]
    cap = budget * rows * dim * 4 - rows * ROW_MAP_BYTES - reserved
    bytes_of = {g: row_bytes(dim, g, row_alignment) for g in groups}
    floor = rows * bytes_of[cheapest]
    if cap < floor - 1e-6 and rows > 0:
        need = (floor + rows * ROW_MAP_BYTES) / max(rows * dim * 4, 1)
        raise BudgetError(
            f"memory budget {budget} is below what table {table or '?'} (dim {dim}) can reach: "
            f"all rows {GROUP_NAMES[cheapest]} plus the row map take {need:.3f} of fp32"
        )
    spare = max(cap - floor, 0.0)
    counts: Dict[int, int] = {}
    left = rows
    for g in groups[:-1]:
        limit = min(left, int(fp32_fraction * rows)) if g == FP32 else left
        counts[g] = min(limit, int(spare // (bytes_of[g] - bytes_of[cheapest])))
        spare -= counts[g] * (bytes_of[g] - bytes_of[cheapest])
        left -= counts[g]
    counts[cheapest] = left
    return GroupCounts.of(counts)


def groups_by_threshold(scores: torch.Tensor, t8: float, t16: float) -> torch.Tensor:
    """Threshold mode (the paper): w < t8 -> int8, t8 <= w < t16 -> fp16, else fp32.

    Args:
        scores: the rows' scores.
        t8, t16: the thresholds.

    Returns:
        int8 group ids, the shape of `scores`.
    """
    g = torch.full(scores.shape, FP32, dtype=torch.int8)
    g[scores < t16] = FP16
    g[scores < t8] = INT8
    return g


def ranking_keys(scores: torch.Tensor, global_rows: torch.Tensor) -> torch.Tensor:
    """A unique int64 per row ordering rows by (score descending, global row ascending).

    Scores are non-negative fp32, whose bit patterns order like the values; the low 32 bits
    hold the complement of the row id so ties go to the lower row id. A larger key means a
    higher priority.

    Args:
        scores: the rows' scores (negatives count as 0).
        global_rows: the rows' global ids (below 2^32).

    Returns:
        int64 keys.
    """
    bits = scores.clamp_min(0).contiguous().view(torch.int32).to(torch.int64)
    return (bits << 32) | (0xFFFFFFFF - global_rows.to(torch.int64))


def ranked_rows(scores: torch.Tensor, names: Sequence[str], rows: Sequence[int]) -> torch.Tensor:
    """The rows of tables laid back to back (in `names`' order), highest priority first, as the
    model-wide budget ranks them: by `ranking_keys`, the tables numbered in name order (so ties
    go to the table first by name, then the lower row).

    Args:
        scores: [sum(rows)] the rows' scores (per byte, as the budget compares them).
        names: the tables' names, in the order their rows are laid out.
        rows: the tables' rows.

    Returns:
        int64 [sum(rows)] row positions.
    """
    size = dict(zip(names, rows))
    first, start = 0, {}
    for m in sorted(names):
        start[m] = first
        first += size[m]
    model_rows = torch.cat([start[m] + torch.arange(size[m]) for m in names] + [torch.zeros(0, dtype=torch.int64)])
    return torch.argsort(ranking_keys(scores, model_rows), descending=True)


def by_precision(tiers: Iterable[str]) -> List[int]:
    """Served tier names as group ids, most precise first (`SERVED_PRECISION_ORDER`: int4s after
    int4, int2s after int2, int1 after them, dropped last).

    Args:
        tiers: names from `SERVED_GROUP_NAMES`.

    Returns:
        The group ids.
    """
    return sorted((SERVED_GROUP_NAMES.index(t) for t in tiers), key=SERVED_PRECISION_ORDER.index)


def groups_by_cuts(keys: torch.Tensor, cuts: Sequence[int], groups: Sequence[int] = PAPER_GROUPS) -> torch.Tensor:
    """Budget mode: keys >= cuts[0] -> groups[0] (the most precise), >= cuts[1] -> groups[1],
    ..., else the last (cheapest) group; len(cuts) = len(groups) - 1.

    Args:
        keys: the rows' ranking keys (`ranking_keys`).
        cuts: non-increasing cuts (`kth_largest_cuts`, `model_budget_cuts`).
        groups: the group ids rows can be in.

    Returns:
        int8 group ids, the shape of `keys`.
    """
    groups = sorted(groups)
    g = torch.full(keys.shape, groups[-1], dtype=torch.int8)
    for cut, group in reversed(list(zip(cuts, groups[:-1]))):
        g[keys >= cut] = group
    return g


def split_ranking_keys_torch(scores: torch.Tensor, first_row: int, out: torch.Tensor) -> int:
    """The ranking keys of consecutive rows written into `out` as two runs: the keys of +0.0
    scores first, ascending (the last row's first), then the others in row order. The torch
    reference of `torch.ops.shark.split_ranking_keys`.

    Args:
        scores: [n] float32 scores of rows first_row, first_row + 1, ...
        first_row: the global row of the first.
        out: [n] int64, written.

    Returns:
        How many zero-score keys lead.
    """
    keys = ranking_keys(scores, torch.arange(first_row, first_row + len(scores), device=scores.device))
    zero = (keys >> 32) == 0  # a score of +0.0: its bits are 0
    zk, ok = keys[zero].flip(0), keys[~zero]
    out[: len(zk)] = zk
    out[len(zk) :] = ok
    return len(zk)


def groups_by_ranking_torch(
    scores: torch.Tensor, first_row: int, cuts: Sequence[int], groups: Sequence[int], out: torch.Tensor
) -> None:
    """`groups_by_cuts` of consecutive rows' ranking keys, into `out`: the torch reference of
    `torch.ops.shark.groups_by_ranking`.

    Args:
        scores: [n] float32 scores of rows first_row, first_row + 1, ...
        first_row: the global row of the first.
        cuts: non-increasing key cuts.
        groups: the group ids rows can be in.
        out: [n] int8, written.
    """
    rows = torch.arange(first_row, first_row + len(scores), device=scores.device)
    out.copy_(groups_by_cuts(ranking_keys(scores, rows), cuts, groups))


def groups_from_sorted_keys(
    runs: Sequence[torch.Tensor], cuts: Sequence[int], groups: Sequence[int], first_row: int, out: torch.Tensor
) -> None:
    """`groups_by_cuts` of a table's rows read off its sorted ranking keys: a key holds its
    row, so the rows above each cut are a run's top slice, and no score is computed again.
    Only the rows above the lowest cut are written one by one; the others take the last
    (cheapest) group in one fill. Equal to `groups_by_cuts` of the same keys, row for row.

    Args:
        runs: the table's ranking keys, each tensor ascending (together: every row once).
        cuts: non-increasing key cuts, one fewer than `groups`.
        groups: the group ids rows can be in.
        first_row: the global row (as in the keys) of `out`'s first row.
        out: int8 [rows of the table], written.
    """
    groups = sorted(groups)
    out.fill_(groups[-1])
    if not cuts:
        return
    bounds = torch.tensor(list(cuts), dtype=torch.int64)
    for keys in runs:
        at = torch.searchsorted(keys, bounds).tolist()  # keys[at[j]:] reach cuts[j]
        top = len(keys)
        for j, group in enumerate(groups[:-1]):  # the most precise first: each row written once
            if at[j] < top:
                rows = 0xFFFFFFFF - (keys[at[j] : top] & 0xFFFFFFFF) - first_row
                out.index_fill_(0, rows, group)
            top = min(top, at[j])


NO_CUT = (1 << 63) - 1  # a cut no key reaches: keys are below 2^63 - 2^32


def kth_largest_cuts(count_at_least, targets: torch.Tensor) -> torch.Tensor:
    """For each entry n of `targets` (int64, any shape), the largest cut K with
    count_at_least(K) >= n: exactly the n rows of highest key have key >= K (keys are unique).
    Entries with n = 0 get NO_CUT. `count_at_least` maps a cut tensor of the targets' shape to
    counts of that shape (a collective over shards, in the distributed case); it is called
    the same number of times everywhere, as the loop only reads its results.

    Args:
        count_at_least: see above.
        targets: int64 row counts n, any shape.

    Returns:
        int64 cuts, the shape of `targets`.
    """
    lo = torch.zeros_like(targets)
    hi = torch.full_like(targets, NO_CUT)
    for _ in range(64):
        if bool(((hi - lo) <= 1).all()):
            break
        mid = lo + (hi - lo) // 2
        ok = count_at_least(mid) >= targets
        lo = torch.where(ok, mid, lo)
        hi = torch.where(ok, hi, mid)
    return torch.where(targets > 0, lo, torch.full_like(targets, NO_CUT))


def smallest_fitting_cut(fits: Callable[[int], bool], hi: int = NO_CUT) -> int:
    """The smallest cut K in [0, hi] with `fits(K)`, for a `fits` that holds at `hi` and keeps
    holding as the cut rises (a higher cut admits fewer rows): `fits(0)`, then bisection. Its
    calls depend only on its results, so a collective `fits` is called alike on every rank.

    Args:
        fits: cut -> whether the rows of key >= cut fit.
        hi: a cut known to fit.

    Returns:
        The cut.
    """
    if fits(0):
        return 0
    lo = 0
    while hi - lo > 1:
        mid = lo + (hi - lo) // 2
        if fits(mid):
            hi = mid
        else:
            lo = mid
    return hi


def sliced_row_bytes(widths: Sequence[int], group: int, row_alignment: int = 1) -> int:
    """Bytes one row of a table costs in a group, over all its column slices (each slice a
    row of its own width, integer slices with their own scale and bias), row map included.

    Args:
        widths: the table's column-slice widths.
        group: the group id.
        row_alignment: rows are padded to a multiple of this many bytes.

    Returns:
        The bytes.
    """
    return sum(row_bytes(w, group, row_alignment) + ROW_MAP_BYTES for w in widths)


def per_byte_scores(scores: torch.Tensor, dim: int) -> torch.Tensor:
    """Priority per byte for the model-wide budget: a row's score over its fp32 bytes (4 x dim),
    so that a row of a wide table must earn its precision with a higher score.

    Args:
        scores: the rows' scores.
        dim: the table's full dim.

    Returns:
        scores / (4 x dim).
    """
    return scores / float(4 * dim)


def model_budget_cuts(
    count_at_least: Callable[[int], torch.Tensor],
    rows: Sequence[int],
    widths: Sequence[Sequence[int]],
    dims: Sequence[int],
    budget: float,
    fp32_fraction: float,
    groups: Sequence[int] = PAPER_GROUPS,
    row_alignment: int = 1,
    reserved: float = 0.0,
) -> List[int]:
    """One budget for all tables (`--budget-scope model`): the ranking-key cuts that put rows
    into the groups, the same cuts for every table, so rows of all tables compete by key
    (priority per byte, `per_byte_scores`; keys unique across tables).

    The rule of `budget_counts`, over the whole model: every row starts in the cheapest group,
    which must fit; then from the most precise group down, each takes the rows of highest key
    while the spare bytes last (fp32 at most `fp32_fraction` of all rows). The sum over tables
    of embedding bytes (weights, scales, row map) stays within `budget` x their fp32 bytes.

    Args:
        count_at_least: cut -> int64 [T], per table the rows whose key is >= cut (a collective
            over the shards when sharded; called the same number of times on every rank, as
            the search only reads its results).
        rows, widths, dims: per table its global rows, column-slice widths and full dim.
        budget: fraction of the tables' fp32 bytes.
        fp32_fraction: at most this fraction of all rows in fp32; with the dropped tier, also
            the largest head (`HEAD_MAX_BYTES_SHARE`).
        groups: the group ids rows can be in.

    Returns:
        len(groups) - 1 non-increasing cuts for `groups_by_cuts`.

    Raises:
        BudgetError: every row in the cheapest group does not fit.
    """
    groups = sorted(groups)
    if DROPPED in groups and len(groups) > 1:
        # The rule of `budget_counts` with the dropped tier, over the whole model: the head
        # (`HEAD_MAX_BYTES_SHARE`, over all rows) in the top stored tier first, then the rows
        # that fit in the cheapest stored tier, the rest dropped; if every row fits stored,
        # the stored tiers' rule.
        stored = groups[:-1]
        top, kept = stored[0], stored[-1]
        n = torch.tensor([int(r) for r in rows], dtype=torch.float64)
        fp32_total = sum(4.0 * d * int(r) for r, d in zip(rows, dims))
        map_bytes = sum(int(r) * ROW_MAP_BYTES * len(w) for r, w in zip(rows, widths))
        kept_cost = torch.tensor(
            [float(sum(row_bytes(x, kept, row_alignment) for x in w)) for w in widths], dtype=torch.float64
        )
        top_cost = torch.tensor(
            [float(sum(row_bytes(x, top, row_alignment) for x in w)) for w in widths], dtype=torch.float64
        )
        reserved += sum(
            float(sum(row_bytes(x, FP32, row_alignment) for x in w)) for w in widths
        )  # a fallback row per table
        cap = budget * fp32_total - map_bytes - reserved
        if cap < -1e-6:
            raise BudgetError(
                f"memory budget {budget} is below what the model's tables can reach: every row dropped, "
                f"the row map alone takes {map_bytes / max(fp32_total, 1.0):.3f} of fp32"
            )
        head_cut, head_counts = NO_CUT, torch.zeros(len(rows), dtype=torch.int64)
        if top != kept:
            tried: Dict[int, torch.Tensor] = {NO_CUT: head_counts}

            def head_fits(cut: int) -> bool:  # the rows of key >= cut make a head within the head rule
                if cut not in tried:
                    tried[cut] = count_at_least(cut)
                c = tried[cut]
                return (
                    float(c.sum()) <= fp32_fraction * float(n.sum()) + 1e-9
                    and float((c.to(torch.float64) * top_cost).sum()) <= max(cap, 0.0) * HEAD_MAX_BYTES_SHARE + 1e-6
                )

            head_cut = smallest_fitting_cut(head_fits)
            head_counts = tried[head_cut]
        left = cap - float((head_counts.to(torch.float64) * top_cost).sum())
        if left >= float(((n - head_counts.to(torch.float64)) * kept_cost).sum()) - 1e-6:
            return model_budget_cuts(
                count_at_least, rows, widths, dims, budget, fp32_fraction, stored, row_alignment, reserved=reserved
            ) + [0]

        def fits(cut: int) -> bool:  # the rows of key >= cut, past the head, fit in the kept tier
            c = torch.maximum(count_at_least(cut) - head_counts, torch.zeros_like(head_counts))
            return float((c.to(torch.float64) * kept_cost).sum()) <= left + 1e-6

        return [head_cut] * (len(stored) - 1) + [min(smallest_fitting_cut(fits, head_cut), head_cut)]
    cheapest = groups[-1]
    n = torch.tensor([int(r) for r in rows], dtype=torch.float64)
    cost = torch.tensor(
        [[sliced_row_bytes(w, g, row_alignment) for g in range(len(GROUP_NAMES))] for w in widths], dtype=torch.float64
    ).reshape(len(rows), len(GROUP_NAMES))
    fp32_total = float((n * torch.tensor([4.0 * d for d in dims], dtype=torch.float64)).sum())
    floor = float((n * cost[:, cheapest]).sum()) if len(rows) else 0.0
    cap = budget * fp32_total - reserved
    if floor > cap + 1e-6:
        raise BudgetError(
            f"memory budget {budget} is below what the model's tables can reach: all rows "
            f"{GROUP_NAMES[cheapest]} plus the row map take {floor / max(fp32_total, 1.0):.3f} of fp32"
        )
    spare = cap - floor
    total_rows = float(n.sum())
    spent = 0.0
    prev_cut, prev_counts = NO_CUT, torch.zeros(len(rows), dtype=torch.int64)
    cuts: List[int] = []
    for g in groups[:-1]:
        extra = cost[:, g] - cost[:, cheapest]
        # (fits, extra bytes, counts) per cut tried; prev_cut itself adds nothing.
        tried: Dict[int, Tuple[bool, float, torch.Tensor]] = {prev_cut: (True, 0.0, prev_counts)}

        def fits(cut: int) -> bool:
            if cut not in tried:
                c = count_at_least(cut)
                more = float(((c - prev_counts).to(torch.float64) * extra).sum())
                ok = spent + more <= spare + 1e-6
                if g == FP32:
                    ok = ok and float(c.sum()) <= fp32_fraction * total_rows + 1e-9
                tried[cut] = (ok, more, c)
            return tried[cut][0]

        cut = smallest_fitting_cut(fits, prev_cut)
        _, more, counts = tried[cut]
        spent += more
        prev_cut, prev_counts = cut, counts
        cuts.append(cut)
    return cuts


def one_bit_tier_counts(
    rows: int,
    weight_bytes: float,
    cost: Dict[int, float],
    tiers: Sequence[int],
    head_fraction: float,
    cheapest: int = INT1,
) -> Optional[Dict[int, int]]:
    """Rows per served tier when the least precise tier is 1-bit (`INT1`, served only): the
    rule of the dropped tier (`model_budget_cuts`) with the 1-bit tier where the dropped rows
    were. The head (at most `head_fraction` of the rows and `HEAD_MAX_BYTES_SHARE` of the bytes
    above the all-1-bit floor) takes the most precise tier, then as many rows as fit take the
    tier just above int1, the rest int1; tiers between those two get none. Ranked rows fill the
    tiers in rank order, so the counts are the plan.

    Args:
        rows: the rows of the model.
        weight_bytes: the bytes the rows' weights may take (the budget less the row map).
        cost: bytes of a row per group id in `tiers`.
        tiers: the group ids, most precise first, `INT1` last.
        head_fraction: the policy's `fp32_fraction`: the largest head, as a fraction of the rows.
        cheapest: the group id `tiers` must end with: int1, or for a served set whose rows all
            fit above int1 and that has no stored rule of its own (symmetric tiers), the tier
            above it, the same rule again.

    Returns:
        {group id: rows}, or None when every row fits in the tiers above the cheapest (the
        caller then plans them without it: the stored tiers' own rule, or for symmetric tiers
        this rule one tier up).

    Raises:
        BudgetError: every row in the cheapest tier does not fit.
    """
    if not tiers or tiers[-1] != cheapest:
        raise ValueError(
            f"one_bit_tier_counts: the last tier must be {SERVED_GROUP_NAMES[cheapest]}, got {list(tiers)}"
        )
    floor = rows * cost[cheapest]
    if floor > weight_bytes + 1e-6:
        what = "1 bit" if cheapest == INT1 else SERVED_GROUP_NAMES[cheapest]
        raise BudgetError(f"every row in {what} takes {floor:.0f} bytes, the budget leaves {weight_bytes:.0f}")
    above = list(tiers[:-1])
    if not above:
        return {cheapest: rows}
    top, kept = above[0], above[-1]
    spare = weight_bytes - floor
    head = 0
    if top != kept:
        head = min(int(head_fraction * rows), int(spare * HEAD_MAX_BYTES_SHARE // (cost[top] - cost[cheapest])))
    left = spare - head * (cost[top] - cost[cheapest])
    if left >= (rows - head) * (cost[kept] - cost[cheapest]) - 1e-6:
        return None
    k = max(0, min(rows - head, int(left // (cost[kept] - cost[cheapest]))))
    counts = {g: 0 for g in tiers}
    counts[top] += head
    counts[kept] += k
    counts[cheapest] = rows - head - k
    return counts


def tier_names_problem(tiers: Sequence[str], known: Sequence[str]) -> Optional[str]:
    """What is wrong with a list of tier names, or None: a name not in `known`, or one given twice.

    Args:
        tiers: the names given.
        known: the names allowed.

    Returns:
        The problem, named, or None.
    """
    unknown = [t for t in tiers if t not in known]
    if unknown:
        return f"unknown tier {', '.join(map(repr, unknown))}; the tiers are {', '.join(known)}"
    twice = sorted({t for t in tiers if list(tiers).count(t) > 1})
    if twice:
        return f"{', '.join(twice)} given more than once, got {tuple(tiers)}"
    return None


def check_served_tiers(tiers: Sequence[str], dim: Optional[int] = None) -> None:
    """Refuse serving tiers that cannot be served: names outside `SERVED_GROUP_NAMES` or given
    twice, the 1-bit tier alone or beside `dropped` (int1 holds the rows the other tiers cannot,
    which dropped would otherwise take), int1 at a dim that is not a multiple of 8, a symmetric
    tier (int4s, int2s) without int1 (the export plans them with int1 below), or, with int1 and
    the dim known, a tier whose row is no smaller than the more precise one's (int2 below int4s
    at dim 8).

    Args:
        tiers: the tier names.
        dim: the tables' embedding dim, when known.

    Raises:
        ValueError: naming the problem.
    """
    problem = tier_names_problem(tiers, SERVED_GROUP_NAMES)
    if problem:
        raise ValueError(f"serving tiers: {problem}")
    if tuple(tiers) == ("int1",):
        raise ValueError(
            "serving tiers: int1 holds the rows the tiers above it cannot; give them too (e.g. int4 int2 int1)"
        )
    if "int1" in tiers and "dropped" in tiers:
        raise ValueError(
            "serving tiers: int1 and dropped exclude each other (int1 holds the rows the other tiers cannot, a "
            "sign bit a value and one magnitude byte a row"
            + (f": {row_bytes(dim, INT1)} bytes a row at dim {dim}" if dim and dim % 8 == 0 else "")
            + f"); choose one, got {tuple(tiers)}"
        )
    if "int1" in tiers and dim is not None and dim % 8:
        raise ValueError(f"serving tier int1 needs an embedding dim that is a multiple of 8, got {dim}")
    if "int1" in tiers and dim is not None:
        # The 1-bit plan fills the tiers in precision order, each cheaper than the one above: at
        # dim 8 an int4s row (5 bytes) is smaller than an int2 row (6), so int2 would only cost.
        ids = by_precision(tiers)
        for hi, lo in zip(ids, ids[1:]):
            if row_bytes(dim, lo) >= row_bytes(dim, hi):
                raise ValueError(
                    f"serving tiers: at dim {dim} a {SERVED_GROUP_NAMES[lo]} row ({row_bytes(dim, lo)} bytes) is no "
                    f"smaller than a {SERVED_GROUP_NAMES[hi]} row ({row_bytes(dim, hi)}): drop "
                    f"{SERVED_GROUP_NAMES[lo]}, got {tuple(tiers)}"
                )
    symmetric = [t for t in ("int4s", "int2s") if t in tiers]
    if symmetric and "int1" not in tiers:
        raise ValueError(
            f"serving tiers: {' and '.join(symmetric)} (symmetric rows with a one-byte scale) "
            f"{'is' if len(symmetric) == 1 else 'are'} planned with int1 below; add int1 (e.g. "
            f"{' '.join(symmetric)} int1), got {tuple(tiers)}"
        )

"""What a mixed-precision embedding collection should compute in training, in plain torch.

Each table is kept as its logical fp32 values plus, per row, a precision group, the row-wise
Adagrad momentum and the paper's Eq. 7 score. One training step, written out from the method
(not from the store): pooled outputs (sum pooling, bags of any length) or per-id vectors
(sequence features); per-row gradients summed from the output gradient; row-wise Adagrad as
FBGEMM's EXACT_ROWWISE_ADAGRAD (m += mean(g^2); w -= lr * g / (sqrt(m) + eps)); each updated
row rounded back into its group, stochastically, with the noise of (seed, step, table, global
row, global column); Eq. 7 scores; and every `reassign_every` steps the budget rule (rows
ranked by score descending, then global row ascending; the budget's count of the most precise
group first, then the next group's count, ...: with the paper's groups fp32, fp16, the rest
int8), moved rows rounded to nearest into their new group. Groups may include int4 and int2.

It shares no code with RowGroupStore, the modules or the distributed package: only the pure
functions of `shark_torchrec.precision` (the rounding noise, fp16 stochastic rounding, int8
quantization, Eq. 7's update and decay, the budget counts), which tests/precision/test_precision_math.py
checks on their own.
"""

from __future__ import annotations

import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from shark_torchrec.precision.priority import (
    DROPPED,
    FP16,
    INT_BITS,
    PAPER_GROUPS,
    ROW_MAP_BYTES,
    budget_counts,
    decayed,
    updated,
)
from shark_torchrec.precision.quantize import (
    dequantize_rows,
    quantize_rows,
    round_bf16_stochastic,
    round_fp16_stochastic,
    rounding_noise,
    state_noise_bits,
)


def rounded_to_nearest(values: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """The fp32 values rows take when stored to nearest in their groups."""
    out = values.clone()
    half = groups == FP16
    out[half] = values[half].clamp(-65504.0, 65504.0).half().float()
    for g, bits in INT_BITS.items():
        m = groups == g
        out[m] = dequantize_rows(*quantize_rows(values[m], bits))
    return out


def rounded_stochastically(values: torch.Tensor, groups: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The fp32 values rows take when stored in their groups with stochastic rounding."""
    out = values.clone()
    half = groups == FP16
    out[half] = round_fp16_stochastic(values[half], noise[half]).float()
    for g, bits in INT_BITS.items():
        m = groups == g
        out[m] = dequantize_rows(*quantize_rows(values[m], bits, noise[m]))
    return out


def budget_groups(scores: torch.Tensor, counts: Sequence[Tuple[int, int]]) -> torch.Tensor:
    """Groups of a whole table's rows (scores in global row order): ranked by score
    descending, then row ascending, the first `counts[0][1]` rows in group `counts[0][0]`, the
    next `counts[1][1]` in `counts[1][0]`, ... (groups most precise first)."""
    # Rows are in ascending order; a stable sort by descending score keeps ties so.
    order = torch.sort(-scores, stable=True).indices
    group = torch.empty(len(scores), dtype=torch.int8)
    start = 0
    for g, n in counts:
        group[order[start : start + n]] = g
        start += n
    return group


class ReferenceTable:
    """One whole table: logical values [rows, D] and per-row group, momentum and score."""

    def looked_up(self) -> torch.Tensor:
        """What a lookup of each row returns: its value, or for a dropped row the fallback."""
        dropped = self.group == DROPPED
        return torch.where(dropped[:, None], self.fallback.expand(self.rows, -1), self.values)

    def __init__(
        self,
        name: str,
        values: torch.Tensor,
        budget: Optional[float],
        fp32_fraction: float,
        groups: Sequence[int],
        fractions: Optional[Sequence[float]] = None,
    ) -> None:
        self.name = name
        self.table_id = zlib.crc32(name.encode())
        self.rows, self.dim = values.shape
        groups = sorted(groups)
        if fractions is not None:  # fixed fractions of the rows per group, the rest the last
            sizes = [int(f * self.rows) for f in fractions]
            self.counts = [*zip(groups, sizes), (groups[-1], self.rows - sum(sizes))]
        else:
            per_group = budget_counts(self.rows, self.dim, budget, fp32_fraction, groups=groups).as_tuple()
            self.counts = [(g, per_group[g]) for g in groups]
        # Before any score: the lowest row ids most precise.
        self.group = torch.empty(self.rows, dtype=torch.int8)
        start = 0
        for g, n in self.counts:
            self.group[start : start + n] = g
            start += n
        self.values = rounded_to_nearest(values.float(), self.group)
        # Dropped rows: no value of their own; they read the table's fallback row, which
        # starts at zero and takes the summed gradient of the table's dropped ids.
        self.fallback = torch.zeros(self.dim)
        self.fallback_momentum = torch.zeros(())
        self.momentum = torch.zeros(self.rows)
        self.score = torch.zeros(self.rows)
        self.seen_step = torch.zeros(self.rows, dtype=torch.int32)


class Reference:
    """Tables and features of a collection; `features` lists (feature, table) in the
    collection's order (a table's features in the order of its config)."""

    def __init__(
        self,
        tables: Dict[str, torch.Tensor],
        features: Sequence[Tuple[str, str]],
        *,
        learning_rate: float,
        eps: float,
        alpha: float,
        beta: float,
        seed: int,
        memory_budget: float,
        fp32_fraction: float,
        reassign_every: int,
        groups: Sequence[int] = PAPER_GROUPS,
        row_fractions: Optional[Sequence[float]] = None,
        momentum_dtype: str = "fp32",
    ) -> None:
        self.momentum_dtype = momentum_dtype
        self.tables = {
            n: ReferenceTable(n, v, memory_budget, fp32_fraction, groups, row_fractions) for n, v in tables.items()
        }
        self.features = list(features)
        self.lr, self.eps, self.alpha, self.beta, self.seed = learning_rate, eps, alpha, beta, seed
        self.reassign_every = reassign_every
        self.moved_rows = 0  # rows that changed group in reassignments so far

    # ------------------------------------------------------------------ forward
    def pooled(self, lengths: Dict[str, torch.Tensor], ids: Dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, F * D]: per sample, each feature's rows summed (sum pooling), features side by side."""
        out = []
        for feature, table in self.features:
            t = self.tables[table]
            bag = torch.repeat_interleave(torch.arange(len(lengths[feature])), lengths[feature])
            out.append(torch.zeros(len(lengths[feature]), t.dim).index_add_(0, bag, t.looked_up()[ids[feature]]))
        return torch.cat(out, dim=1)

    def per_id(self, ids: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Sequence features: one row per id."""
        return {f: self.tables[t].looked_up()[ids[f]] for f, t in self.features}

    # ------------------------------------------------------------------ training
    def train_step(
        self,
        step: int,
        ids: Dict[str, torch.Tensor],
        id_grads: Dict[str, torch.Tensor],
        id_labels: Dict[str, torch.Tensor],
    ) -> None:
        """Update every row the step's ids touched. Per feature: `ids` [n], `id_grads` [n, D]
        the loss gradient of each id's row (for sum pooling, its bag's output gradient),
        `id_labels` [n] the label of each id's sample. Then reassign when due."""
        for name, t in self.tables.items():
            mine = [f for f, table in self.features if table == name]
            if not mine:
                continue
            rows = torch.cat([ids[f] for f in mine])
            # A row's gradient is the sum over its ids, taken in the order of the collection's
            # features and samples (floating-point sums depend on order; the rounding after
            # them is exact only for identical inputs).
            grad = torch.zeros(t.rows, t.dim).index_add_(0, rows, torch.cat([id_grads[f] for f in mine]))
            seen = torch.bincount(rows, minlength=t.rows).float()
            positives = torch.zeros(t.rows).index_add_(0, rows, torch.cat([id_labels[f] for f in mine]))
            touched = (seen > 0).nonzero().flatten()
            # Eq. 7: w <- (1 - beta) w + beta (alpha c_pos + c_neg), absent steps decayed lazily.
            t.score[touched] = updated(
                t.score[touched],
                t.seen_step[touched],
                step,
                positives[touched],
                seen[touched] - positives[touched],
                self.alpha,
                self.beta,
            )
            t.seen_step[touched] = step
            dropped = t.group[touched] == DROPPED
            if bool(dropped.any()):  # the fallback row's step: the sum of the dropped ids' gradients
                fg = grad[touched[dropped]].sum(dim=0)
                t.fallback_momentum = t.fallback_momentum + (fg * fg).mean()
                t.fallback = t.fallback - fg * (self.lr / (t.fallback_momentum.sqrt() + self.eps))
                touched = touched[~dropped]
            # Row-wise Adagrad. lr / (sqrt(m) + eps) is formed first, as the module does, so that
            # both round the same fp32 numbers and the stochastic rounding can match bit for bit.
            g = grad[touched]
            m = t.momentum[touched] + (g * g).mean(dim=1)
            if self.momentum_dtype == "bf16":  # kept in bf16, rounded with the row's own 16 random bits
                bits = state_noise_bits(self.seed, step, t.table_id, touched)
                t.momentum[touched] = round_bf16_stochastic(m, bits).float()
            else:
                t.momentum[touched] = m
            new = t.values[touched] - g * (self.lr / (m.sqrt() + self.eps))[:, None]
            noise = rounding_noise(self.seed, step, t.table_id, touched, torch.arange(t.dim))
            t.values[touched] = rounded_stochastically(new, t.group[touched], noise)
        if (step + 1) % self.reassign_every == 0:
            self.reassign(step)

    def reassign(self, step: int) -> None:
        """The budget rule on the scores as of `step`."""
        for t in self.tables.values():
            group = budget_groups(decayed(t.score, t.seen_step, step, self.beta), t.counts)
            moved = group != t.group
            revived = moved & (t.group == DROPPED)  # a dropped row comes back as the fallback
            t.values[revived] = t.fallback
            t.values[moved] = rounded_to_nearest(t.values[moved], group[moved])
            t.group = group
            self.moved_rows += int(moved.sum())

    def state(self) -> Dict[str, torch.Tensor]:
        out: Dict[str, torch.Tensor] = {}
        for n, t in self.tables.items():
            out[f"{n}.weight"] = t.looked_up().clone()
            out[f"{n}.row_group"] = t.group.clone()
            out[f"{n}.fallback"] = t.fallback.clone()
        return out


def bag_id_grads(
    out_grad: torch.Tensor, lengths: Dict[str, torch.Tensor], features: List[str], dim: int
) -> Dict[str, torch.Tensor]:
    """Sum pooling: every id of bag (sample b, feature f) gets the bag's output gradient,
    out_grad[b, f * dim : (f + 1) * dim]."""
    out = {}
    for k, f in enumerate(features):
        bag = torch.repeat_interleave(torch.arange(len(lengths[f])), lengths[f])
        out[f] = out_grad[:, k * dim : (k + 1) * dim][bag]
    return out


def model_budget_groups(
    scores: Dict[str, torch.Tensor],
    widths: Dict[str, Sequence[int]],
    budget: float,
    fp32_fraction: float,
    groups: Sequence[int] = PAPER_GROUPS,
    reserved: float = 0.0,
) -> Dict[str, torch.Tensor]:
    """One budget over all tables, row by row: every row of every table in one list, ranked
    by score over the row's fp32 bytes (descending; ties: tables by name, then row ascending);
    every row starts in the cheapest group; then each group from the most precise takes the
    next rows of the list while its extra bytes fit in what the budget leaves (fp32 at most
    `fp32_fraction` of all rows), stopping at the first row that does not fit.

    With the dropped tier: a fp32 fallback row per table is paid first; then the head, the
    first rows of the list while they number at most `fp32_fraction` of all rows and their
    weights take at most half of what the budget leaves for weights, goes to the most precise
    stored tier; if every other row then fits in the cheapest stored tier, the rule above over
    the stored tiers (the fallback rows reserved); else the next rows of the list take the
    cheapest stored tier while they fit and the rest are dropped."""
    groups = sorted(groups)
    cheapest = groups[-1]

    def cost(name: str, g: int) -> int:  # bytes of one row in group g over its slices, row map included
        per_value = {0: 4.0, 1: 2.0, 2: 1.0, 3: 0.5, 4: 0.25, DROPPED: 0.0}[g]
        return sum(int(w * per_value) + (4 if g in INT_BITS else 0) + ROW_MAP_BYTES for w in widths[name])

    entries = []
    for name in sorted(scores):
        dim = sum(widths[name])
        for row, s in enumerate(scores[name].tolist()):
            entries.append((-(torch.tensor(s, dtype=torch.float32) / (4 * dim)).item(), name, row))
    entries.sort(key=lambda e: (e[0], sorted(scores).index(e[1]), e[2]))
    fp32_bytes = sum(4 * sum(widths[n]) * len(scores[n]) for n in scores)
    if cheapest == DROPPED and len(groups) > 1:
        stored = groups[:-1]
        top, kept = stored[0], stored[-1]
        fallbacks = sum(4 * sum(widths[n]) for n in scores)
        weights = budget * fp32_bytes - reserved - fallbacks - sum(cost(n, DROPPED) * len(scores[n]) for n in scores)
        out = {n: torch.full((len(scores[n]),), DROPPED, dtype=torch.int8) for n in scores}
        head_bytes, at = 0.0, 0
        while top != kept and at < len(entries):
            _, name, row = entries[at]
            extra = cost(name, top) - cost(name, DROPPED)
            if at + 1 > fp32_fraction * len(entries) + 1e-9 or head_bytes + extra > 0.5 * weights + 1e-6:
                break
            head_bytes += extra
            out[name][row] = top
            at += 1
        left = weights - head_bytes
        if sum(cost(name, kept) - cost(name, DROPPED) for _, name, _ in entries[at:]) <= left + 1e-6:
            return model_budget_groups(scores, widths, budget, fp32_fraction, stored, reserved + fallbacks)
        for _, name, row in entries[at:]:
            extra = cost(name, kept) - cost(name, DROPPED)
            if extra > left + 1e-6:
                break
            left -= extra
            out[name][row] = kept
        return out
    spare = budget * fp32_bytes - reserved - sum(cost(n, cheapest) * len(scores[n]) for n in scores)
    out = {n: torch.full((len(scores[n]),), cheapest, dtype=torch.int8) for n in scores}
    at = 0
    for g in groups[:-1]:
        taken = 0
        while at < len(entries):
            _, name, row = entries[at]
            extra = cost(name, g) - cost(name, cheapest)
            if extra > spare + 1e-6 or (g == 0 and taken + 1 > fp32_fraction * len(entries) + 1e-9):
                break
            spare -= extra
            out[name][row] = g
            taken += 1
            at += 1
    return out
